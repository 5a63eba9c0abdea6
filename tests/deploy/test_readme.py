"""The docs say what the code does: the README's commands run, every event name is real."""

from __future__ import annotations

import ast
import asyncio
import builtins
import re
import ssl
import subprocess
from pathlib import Path

import aiosmtplib

from etrnd.config.model import ConfigError
from etrnd.config.schema import parse_yaml
from tests.support import docs

ROOT = Path(__file__).resolve().parents[2]
README = docs.read("README.md")
EVENTS = "docs/events.md"
# The README's sections, in order: what an operator looks for (issue 20).
SECTIONS = ["Quick start", "Install on a gateway", "Docker", "Commands", "Configuration",
            "Status, trigger, reload", "Logs", "Troubleshooting",
            "ODMR: when the ISP cannot reach you", "Two lines: a fixed line and an LTE backup",
            "More documentation"]


def test_readme_names_the_two_commands() -> None:
    assert "\nscripts/demo.sh\n" in README
    assert "\nscripts/test.sh\n" in README
    assert (ROOT / ".ci" / "run").read_text().count("scripts/test.sh") == 1
    # The test command is labelled as the developers' one, not an operator's step.
    quick = docs.section("README.md", "Quick start")
    (block,) = [b for b in docs.sh_blocks(quick) if "scripts/test.sh" in b]
    assert "# For developers" in block.split("scripts/test.sh")[0].rsplit("scripts/demo.sh", 1)[1]


def test_readme_is_short_and_in_an_operators_order() -> None:
    assert len(README.splitlines()) <= 250
    headings = [m.group(2) for m in docs.HEADING.finditer(README)
                if m.group(1) in ("##", "###") and not docs.in_code(README, m.start())]
    assert headings == SECTIONS


def test_every_config_the_docs_show_is_valid() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown = [(page.name, block) for page in pages
             for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
             if block.startswith(("watch:", "relays:"))]
    assert len(shown) >= 3
    for name, block in shown:
        try:
            parse_yaml(block, name, defer_credentials=True)
        except ConfigError as exc:
            raise AssertionError(f"{name}: {exc.problems}\n{block}") from None


def test_demo_command_shows_a_250_within_seconds() -> None:
    res = subprocess.run([str(ROOT / "scripts" / "demo.sh"), "--seconds", "3"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert re.search(r"info +link_up iface=lo", out)
    assert re.search(r"etrn_reply relay=toy-isp .*code=250 text=\"Queuing started\"", out)
    assert "[toy ISP] received ETRN @example.org, answered 250 Queuing started" in out
    assert "link: UP" in out  # the demo ends with `etrnd status`
    assert "Traceback" not in out


def documented_events() -> dict[str, set[str]]:
    """Each event of docs/events.md's tables with its levels (`| `name` | info, warning | ...`)."""
    events: dict[str, set[str]] = {}
    for line in docs.read(EVENTS).splitlines():
        row = re.match(r"\| `([a-z_0-9]+)` \| ([a-z, ]+) \|", line)
        if row:
            assert row.group(1) not in events, f"{row.group(1)} twice in {EVENTS}"
            events[row.group(1)] = set(row.group(2).replace(" ", "").split(","))
    assert len(events) > 50
    return events


def test_every_documented_event_exists_in_the_code() -> None:
    code = "".join(p.read_text() for p in (ROOT / "etrnd").rglob("*.py"))
    missing = [n for n in sorted(documented_events()) if f'"{n}"' not in code]
    assert missing == []


LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception"}
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _strings(node: ast.expr | None, names: dict[str, set[str]]) -> set[str] | None:
    """The event names an expression can take: a string, either branch of `a if c else b`,
    or a local variable assigned such values; None when it cannot be told from the source."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = _strings(node.body, names), _strings(node.orelse, names)
        return None if body is None or orelse is None else body | orelse
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    return None


def logged_events() -> tuple[set[str], list[str]]:
    """Every event name the package logs, and the log calls whose event it cannot tell."""
    events, unknown, _ = log_calls()
    return events, unknown


def log_calls() -> tuple[set[str], list[str], dict[str, set[str]]]:
    """Every event name the package logs, the log calls whose event it cannot tell, and the
    levels of each event where the call names it.

    A log call is `x.debug/info/warning/error(EVENT, ...)`, or `level(EVENT, ...)` where the
    code picked `level = log.info if ... else log.warning`; journal.py and logs.py also
    write `{"event": ...}` records of their own (log_events_dropped).
    """
    events: set[str] = set()
    unknown: list[str] = []
    levels: dict[str, set[str]] = {}
    for path in sorted((ROOT / "etrnd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef
                                                                        | ast.AsyncFunctionDef))]:
            names: dict[str, set[str]] = {}
            chosen: set[str] = set()  # the levels `level = log.info if ... else ...` picks
            for node in ast.walk(func):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    values = _strings(node.value, {})
                    if values is not None:
                        names[node.targets[0].id] = values
                    if node.targets[0].id == "level":
                        chosen |= {n.attr for n in ast.walk(node.value)
                                   if isinstance(n, ast.Attribute) and n.attr in LOG_METHODS}
            for node in ast.walk(func):
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values, strict=True):
                        if isinstance(key, ast.Constant) and key.value == "event":
                            events |= {v for v in _strings(value, names) or ()
                                       if EVENT_NAME.fullmatch(v)}
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                f = node.func
                if not ((isinstance(f, ast.Attribute) and f.attr in LOG_METHODS
                         and not (isinstance(f.value, ast.Name) and f.value.id == "logging"))
                        or (isinstance(f, ast.Name) and f.id == "level")):
                    continue
                found = _strings(node.args[0], names)
                if found is None:
                    unknown.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
                else:
                    events |= found
                    level = {f.attr} if isinstance(f, ast.Attribute) else chosen
                    for event in found:
                        levels.setdefault(event, set()).update(level)
    return events, unknown, levels


def test_every_logged_event_is_documented_at_its_level() -> None:
    logged, unknown, levels = log_calls()
    assert unknown == [], "log calls whose event name this test cannot read"
    assert {"link_up", "link_down", "smtp_send", "round_done", "log_events_dropped"} <= logged
    documented = documented_events()
    assert sorted(logged - set(documented)) == [], f"logged but missing from {EVENTS}"
    wrong = {e: (documented[e], found) for e, found in levels.items()
             if found and documented[e] != found}
    assert wrong == {}, f"{EVENTS} says another level (documented, logged)"


EVENT_LIKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


def error_names() -> set[str]:
    """What an `error=` field can say: a failure class the code names, or an exception of the
    libraries a session goes through (aiosmtplib, ssl, asyncio, builtins)."""
    code = "".join(p.read_text() for p in (ROOT / "etrnd").rglob("*.py"))
    names = set(re.findall(r'"([A-Z][A-Za-z]+)"', code))
    for module in (aiosmtplib, ssl, asyncio, builtins):
        names |= {n for n, v in vars(module).items()
                  if isinstance(v, type) and issubclass(v, BaseException)}
    return names


def test_troubleshooting_table_names_what_the_code_logs() -> None:
    """Each row's middle column quotes the journal: `event key=value ...`. The event must be
    one the code logs and an `error=` one a session can report, or the operator greps in vain
    (the README once sent them to `etrn_session_failed error=AuthenticationFailed` for a
    wrong password, which the code logs as `etrn_auth_failed code=535`)."""
    header, *rows = docs.table(docs.section("README.md", "Troubleshooting"))
    assert [h.split()[0] for h in header] == ["symptom", "what", "what"], header
    assert len(rows) >= 10 and all(len(row) == 3 for row in rows), rows
    logged, _ = logged_events()
    errors = error_names()
    quoted: list[str] = []
    for symptom, shows, _ in rows:
        for span in re.findall(r"`([^`]+)`", shows):
            words = span.split()
            if EVENT_LIKE.fullmatch(words[0]):
                quoted.append(words[0])
                assert words[0] in logged, f"{symptom}: {words[0]} is not an event the code logs"
            for word in words:
                if word.startswith("error="):
                    assert word.removeprefix("error=") in errors, f"{symptom}: {word}"
    assert {"etrn_auth_failed", "etrn_refused", "etrn_session_failed"} <= set(quoted)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_every_link_in_the_docs_leads_somewhere() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and dest.suffix == ".md":
                ids = {anchor(m.group(2)) for m in docs.HEADING.finditer(dest.read_text())}
                if fragment not in ids:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


REPO_PATH = re.compile(r"(?:tests|bench|etrnd|scripts|config|systemd|man|docs)/\S+")


def test_every_file_and_test_the_docs_name_exists() -> None:
    """A path in backticks (`bench/soak.py --cycles 10000`, `tests/x.py::test_y`) is a file of
    the repository, and a named test is defined in it: SECURITY.md backs each claim so."""
    pages = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
    wrong = []
    for page in pages:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            if not REPO_PATH.match(span):
                continue
            path, _, test = span.split()[0].rstrip(".,:;)").partition("::")
            if not (ROOT / path).exists():
                wrong.append(f"{page.name}: {span} (no such file)")
            elif test and not re.search(rf"def {re.escape(test)}\(", (ROOT / path).read_text()):
                wrong.append(f"{page.name}: {span} (no such test)")
    assert wrong == []
