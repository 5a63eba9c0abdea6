"""Read the config's YAML keeping where each value was written; say syntax errors plainly."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

Loc = tuple[int | str, ...]
# PyYAML's words for the mistakes people make most, in the reader's terms. The original
# text follows for anything not listed here.
_SYNTAX_HINTS = {
    "mapping values are not allowed here":
        "a ':' here does not fit: quote a value that holds ': ', or check the indentation",
    "could not find expected ':'":
        "expected 'key: value' (a line continued without quotes, or the indentation is off)",
    "did not find expected key": "the indentation is off: keys of one mapping line up",
    "did not find expected '-' indicator":
        "the indentation is off: the items of one list line up",
}


class YamlError(Exception):
    """The file is not YAML etrnd can read; `problem` is one line: `FILE:LINE:COL: reason`."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class Place:
    """Where a value was written and how: `text` as written (None for a list or mapping)."""

    line: int  # 1-based, as editors count
    column: int
    text: str | None
    tag: str  # YAML's type for it: str, bool, int, float, null, seq, map
    plain: bool  # written without quotes


@dataclass(frozen=True)
class Document:
    """A parsed file: the data and the place of each value, keyed by its path of keys."""

    data: object
    lines: list[str]
    places: dict[Loc, Place] = field(default_factory=dict)

    def place(self, loc: Loc) -> Place | None:
        return self.places.get(loc)

    def comment_on(self, line: int) -> str | None:
        """The word a `#` turned into a comment on `line` (1-based) right after `key:` or
        `- `, as in `etrn: #office-queue`; None when the line has no such comment."""
        if not 1 <= line <= len(self.lines):
            return None
        text = self.lines[line - 1]
        start = comment_start(text)
        if start is None or start + 1 >= len(text) or text[start + 1].isspace():
            return None  # `# a remark` is a remark; `#office-queue` was meant as a value
        return _word(text, start)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:  # `? [a]: b` or `{a: 1}: b`: YAML allows it, no config key is one
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping",
                key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def decode(raw: bytes, source: str) -> str:
    """The file's text; raises YamlError naming the line and column of a non-UTF-8 byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        start = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[start:exc.start].decode("utf-8", "replace")) + 1
        raise YamlError(f"{source}:{line}:{column}: not UTF-8 text (byte 0x{raw[exc.start]:02x});"
                        " save the file as UTF-8") from None


def read(text: str, source: str = "<config>") -> Document:
    """Parse `text`; raises YamlError with one plain line for any syntax error."""
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)  # its reader checks the characters at once
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlError(_syntax(exc, text.splitlines(), source)) from None
    except yaml.reader.ReaderError as exc:
        raise YamlError(_reader(exc, text, source)) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: YAML syntax: {' '.join(str(exc).split())}") from None
    except RecursionError:
        # PyYAML composes recursively: `[[[[...` a few thousand deep exhausts the stack.
        raise YamlError(f"{source}: YAML syntax: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    places = dict(_places(node, ())) if node is not None else {}
    return Document(data=data, lines=text.splitlines(), places=places)


def _places(node: yaml.Node, loc: Loc) -> Iterator[tuple[Loc, Place]]:
    tag = node.tag.rsplit(":", 1)[-1]
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.ScalarNode):
        yield loc, Place(line, column, node.value, tag, node.style is None)
        return
    yield loc, Place(line, column, None, tag, True)
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _places(item, (*loc, i))
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield from _places(value, (*loc, key.value))


def comment_start(line: str) -> int | None:
    """Where a comment begins in one YAML line, or None. `#` begins one where a new token
    may start: at the start, after a blank, or right after `[`, `{` or `,` (YAML 1.1 §9)."""
    quote = ""
    for i, c in enumerate(line):
        prev = line[i - 1] if i else " "
        if quote:
            if c == quote and not (quote == '"' and prev == "\\"):
                quote = ""
        elif c in "'\"" and prev in " \t[{,:":
            quote = c
        elif c == "#" and prev in " \t[{,":
            return i
    return None


def _word(line: str, start: int) -> str:
    return re.split(r"[\s,\]}]", line[start:], maxsplit=1)[0]


def _cut_by_comment(lines: list[str], upto: int) -> tuple[int, int, str] | None:
    """The first `#` right after `[`, `{` or `,` before line `upto`: a value it hid."""
    for n, text in enumerate(lines[:upto], start=1):
        start = comment_start(text)
        if (start is not None and text[:start].rstrip()[-1:] in ("[", "{", ",")
                and text[start + 1:start + 2].strip()):  # `, # a remark` is one
            return n, start + 1, _word(text, start)
    return None


def _syntax(exc: yaml.MarkedYAMLError, lines: list[str], source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{source}: YAML syntax: {exc.problem or exc.context}"
    line, column = mark.line + 1, mark.column + 1
    problem = exc.problem or exc.context or "not YAML"
    cut = _cut_by_comment(lines, line)
    if cut is not None and not problem.startswith("duplicate key"):
        n, col, word = cut
        later = ("on the next line" if line == n + 1 else "at the end of the file"
                 if line > len(lines) else f"at line {line}")
        return (f"{source}:{n}:{col}: '#' starts a comment here, so YAML did not read "
                f"{word} and failed {later}; quote it: \"{word}\"")
    found = re.match(r"found character '(\\t|.)' that cannot start any token", problem)
    if found and found.group(1) == "\\t":
        return (f"{source}:{line}:{column}: a tab character: YAML does not allow tabs "
                "here (indentation, before a value); use spaces")
    if found:
        word = _word(lines[mark.line], mark.column) if mark.line < len(lines) else found.group(1)
        return (f"{source}:{line}:{column}: a value that begins with '{found.group(1)}' must be "
                f"quoted: write \"{word}\"")
    hint = _SYNTAX_HINTS.get(problem)
    if hint is None and problem.startswith("expected <block end>"):
        hint = "the indentation is off: this line does not line up with the keys above it"
    text = f"{hint} (YAML: {problem})" if hint else problem
    return f"{source}:{line}:{column}: YAML syntax: {text}"


def _reader(exc: yaml.reader.ReaderError, text: str, source: str) -> str:
    # A ReaderError counts characters from the start of the text: say line and column.
    before = text[:exc.position]
    line, column = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return (f"{source}:{line}:{column}: control character U+{ord(char):04X}; YAML allows none "
            "but tab and line breaks: remove it")


__all__ = ["Document", "Loc", "Place", "YamlError", "comment_start", "decode", "read"]
