"""The README's commands run as written, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
    events = re.search(r"Events: (.*?)\n\n", README, re.S)
    assert events is not None
    names = re.findall(r"`([a-z_]+)`", events.group(1))
    code = "".join(p.read_text() for p in (ROOT / "etrnd").glob("*.py"))
    missing = [n for n in names if f'"{n}"' not in code]
    assert missing == []
