"""The EHLO name without `helo:`: a machine name ISPs would refuse is warned about at start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etrnd.protocols.smtp import helo_problem
from tests.support.nettools import netns

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "bad"), [
    ("localhost", True), ("LOCALHOST.", True), ("gw", True),
    ("gw.example.org", False), ("[192.0.2.1]", False)])
def test_which_names_are_warned_about(name: str, bad: bool) -> None:
    assert (helo_problem(name) is not None) == bad


@pytest.mark.root
def test_send_without_helo_on_a_dotless_host_name_warns(tmp_path: Path) -> None:
    # Its own namespace (name server 127.0.0.53, where nothing listens: no lookup leaves
    # the machine) and its own UTS namespace, whose host name /etc/hosts does not know.
    config = tmp_path / "etrnd.yaml"
    config.write_text(
        "relays:\n  - {name: isp, host: 127.0.0.1, port: 2526, tls: none, timeout: 1s,\n"
        "      etrn: ['@example.test']}\n"  # no helo:; nothing listens: the round fails
        "retry: {first_delay: 50ms, max_delay: 50ms, give_up_after: 100ms}\n"
        "log: {level: info, format: json}\n")
    with netns("ehl") as ns:
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text("nameserver 127.0.0.53\n")
            (etc / "hosts").write_text("127.0.0.1 localhost\n")
            res = subprocess.run(
                ns.cmd("unshare", "--uts", "sh", "-c", 'hostname officegw && exec "$@"', "sh",
                       sys.executable, "-m", "etrnd", "send", "-c", str(config)),
                capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    events = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    assert res.returncode == 4, res.stderr
    [warning] = [e for e in events if e["event"] == "helo_name_fallback"]
    assert (warning["level"], warning["name"]) == ("warning", "officegw")
    assert "set helo:" in warning["reason"]
