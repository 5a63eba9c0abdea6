"""The README's commands run as written, so they cannot rot."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_names_the_two_commands() -> None:
    assert "\nscripts/demo.sh\n" in README
    assert "\nscripts/test.sh\n" in README
    assert (ROOT / ".ci" / "run").read_text().count("scripts/test.sh") == 1


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


def test_every_documented_event_exists_in_the_code() -> None:
    events = re.search(r"\nEvents\b(.*?)\n\n", README, re.S)
    assert events is not None
    names = re.findall(r"`([a-z_]+)`", events.group(1))
    code = "".join(p.read_text() for p in (ROOT / "etrnd").rglob("*.py"))
    missing = [n for n in names if f'"{n}"' not in code]
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
    """Every event name the package logs, and the log calls whose event it cannot tell.

    A log call is `x.debug/info/warning/error(EVENT, ...)`, or `level(EVENT, ...)` where the
    code picked `level = log.info if ... else log.warning`; journal.py and logs.py also
    write `{"event": ...}` records of their own (log_events_dropped).
    """
    events: set[str] = set()
    unknown: list[str] = []
    for path in sorted((ROOT / "etrnd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef
                                                                        | ast.AsyncFunctionDef))]:
            names: dict[str, set[str]] = {}
            for node in ast.walk(func):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    values = _strings(node.value, {})
                    if values is not None:
                        names[node.targets[0].id] = values
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
    return events, unknown


def test_every_logged_event_is_in_the_readme() -> None:
    events = re.search(r"\nEvents\b(.*?)\n\n", README, re.S)
    assert events is not None
    documented = set(re.findall(r"`([a-z_]+)`", events.group(1)))
    logged, unknown = logged_events()
    assert unknown == [], "log calls whose event name this test cannot read"
    assert {"link_up", "link_down", "smtp_send", "round_done", "log_events_dropped"} <= logged
    assert sorted(logged - documented) == [], "logged but missing from the README's Events:"
