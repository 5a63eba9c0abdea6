"""The documentation the tests hold to its word: README.md and docs/*.md, read by heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADING = re.compile(r"^(#{1,6}) (.*)$", re.M)


def read(name: str) -> str:
    """A documentation file by its path in the repository, e.g. "docs/logs.md"."""
    return (ROOT / name).read_text()


def section(name: str, heading: str) -> str:
    """The text under `heading` (any level) in `name`, up to the next heading of the same or a
    higher level; its subsections included."""
    text = read(name)
    for match in HEADING.finditer(text):
        if match.group(2).strip() == heading:
            level = len(match.group(1))
            end = len(text)
            for nxt in HEADING.finditer(text, match.end()):
                if len(nxt.group(1)) <= level and not in_code(text, nxt.start()):
                    end = nxt.start()
                    break
            return text[match.end():end]
    raise AssertionError(f"{name}: no heading {heading!r}")


def in_code(text: str, pos: int) -> bool:
    """Whether `pos` is inside a ``` block (where a "# comment" line is no heading)."""
    return text.count("```", 0, pos) % 2 == 1


def sh_blocks(text: str) -> list[str]:
    """The bodies of the ```sh blocks in `text`."""
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def commands(name: str, heading: str, starts: str = "", contains: str = "") -> list[str]:
    """The commands of the first sh block under `heading` of `name` whose first command starts
    with `starts` and which contains `contains`; comments and blank lines dropped."""
    for block in sh_blocks(section(name, heading)):
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if lines and lines[0].startswith(starts) and contains in block:
            return lines
    raise AssertionError(f"{name}: no sh block starting {starts!r} under {heading!r}")


def table(text: str) -> list[list[str]]:
    """The rows of the first markdown table in `text`, header first, each as its cells (a cell
    holds no ` | `; the |---| line is dropped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows
