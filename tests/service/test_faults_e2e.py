"""Faults on real interfaces; after each, one link-up makes a real Postfix deliver all its queue."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from etrnd.service.control import ControlError, request
from tests.support.nettools import Netns, sh, unique, veth
from tests.support.postfix import (
    ISP_ADDR,
    OFFICE_ADDR,
    POSTFIX,
    PREFIX_LEN,
    IspOffice,
    isp_and_office,
    wait_until,
)

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
FLAKY_ADDR = "198.51.100.3"  # adversary alternating 451 / 250 per connection
SILENT_ADDR = "198.51.100.4"  # adversary that never greets: a round always in flight
UNREACHABLE = "203.0.113.7"  # no route to it from the office namespace
N = 4  # messages queued per scenario


@dataclass
class Rig:
    env: IspOffice
    daemon: subprocess.Popen[bytes]
    config: Path
    socket: Path
    log_path: Path
    delivered: int = 0  # messages the receiver should hold so far

    def status(self) -> dict[str, Any]:
        return request(self.socket, {"cmd": "status"}, timeout=5)

    def link_up_seen(self) -> bool:
        try:
            return bool(self.status()["link"]["up"])
        except ControlError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        out = []
        for line in self.log()[since:].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == name:
                        out.append(event)
        return out

    def link(self, up: bool) -> None:
        self.env.set_office_link(up)

    def queue_while_down(self, count: int = N) -> None:
        """Link down (and seen down), then `count` messages the ISP cannot deliver."""
        self.link(False)
        wait_until(lambda: not self.link_up_seen(), 10, "the daemon to see the link down")
        before = self.env.postfix.deferred()
        self.env.postfix.enqueue(count, f"user@{self.env.domain}")
        wait_until(lambda: self.env.postfix.deferred() >= before + count, 30,
                   f"{count} more deferred messages at the ISP")
        self.delivered += count

    def final_link_up_delivers(self) -> None:
        self.link(True)
        self.env.receiver.wait_count(self.delivered, timeout=30)
        wait_until(lambda: self.env.postfix.queue() == [], 30, "the ISP queue to drain")
        assert self.env.receiver.count() == self.delivered
        self.assert_healthy()

    def assert_healthy(self) -> None:
        assert self.daemon.poll() is None, self.log()[-3000:]
        text = self.log()
        assert "Traceback" not in text
        for bad in ("round_crashed", "daemon_fatal", "control_error", "link_watch_failed"):
            assert f'"{bad}"' not in text, bad
        assert self.status()["ok"] is True


def _config(path: Path, env: IspOffice, sock: Path) -> str:
    return (
        f"watch: {{interfaces: [{env.office_if}], up_when: carrier, settle: 0s, "
        "min_interval: 0s, down_hold: 0s}\n"
        "relays:\n"
        # The first host has no route: failover must reach Postfix at once.
        f"  - {{name: isp, hosts: ['{UNREACHABLE}', '{ISP_ADDR}'], tls: none,"
        f" helo: office.{env.domain}, timeout: 5s, etrn: ['@{env.domain}']}}\n"
        f"  - {{name: flaky, host: '{FLAKY_ADDR}', tls: none, helo: office.{env.domain},"
        f" timeout: 1s, etrn: ['@{env.domain}']}}\n"
        f"  - {{name: silent, host: '{SILENT_ADDR}', tls: none, helo: office.{env.domain},"
        f" timeout: 1s, etrn: ['@{env.domain}']}}\n"
        f"  - {{name: dead, host: '{UNREACHABLE}', tls: none, helo: office.{env.domain},"
        f" timeout: 1s, etrn: ['@{env.domain}']}}\n"
        "retry: {first_delay: 100ms, max_delay: 500ms, give_up_after: 0}\n"
        f"control: {{socket: {sock}}}\nlog: {{level: info, format: json}}\n")


def _adversary(ns: Netns, address: str, mode: str) -> subprocess.Popen[bytes]:
    proc = ns.popen(sys.executable, "-m", "tests.support.adversary", "--listen", f"{address}:25",
                    "--mode", mode, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"ready"), line + (proc.stderr.read() if proc.stderr else b"")
    return proc


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("faults")
    with isp_and_office(root) as env:
        # After heavy flapping a connect over the carrier-less link was seen to wait for the
        # full 30 s SYN timeout despite ignore_routes_with_linkdown: keep deferral quick.
        sh("postconf", "-c", str(env.postfix.config_dir), "-e", "smtp_connect_timeout=2s")
        env.postfix.command(POSTFIX, "-c", str(env.postfix.config_dir), "reload")
        for addr in (FLAKY_ADDR, SILENT_ADDR):
            env.isp.ip("addr", "add", f"{addr}/32", "dev", env.isp_if)
        _adversary(env.isp, FLAKY_ADDR, "alternate")
        _adversary(env.isp, SILENT_ADDR, "silent")
        sock = root / "control.sock"
        config = root / "etrnd.yaml"
        config.write_text(_config(config, env, sock))
        log_path = root / "daemon.log"
        with log_path.open("wb") as log:
            daemon = env.office.popen(sys.executable, "-m", "etrnd", "run", "-c", str(config),
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        rig = Rig(env, daemon, config, sock, log_path)
        wait_until(lambda: rig.link_up_seen(), 15, "the daemon to start and see the link up")
        yield rig
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, rig.log()[-3000:]


def test_link_flapping_while_the_relay_alternates_4xx_and_250(rig: Rig) -> None:
    rig.queue_while_down()
    mark = len(rig.log())
    started = rig.status()["rounds_started"]
    # 120 transitions at up to ~20 Hz (a loaded machine only makes them slower): each
    # half-period is a transition the daemon must follow.
    period = 0.025
    for flips in range(120):
        tick = time.monotonic()
        rig.link(flips % 2 == 0)
        time.sleep(max(0.0, period - (time.monotonic() - tick)))
    rig.final_link_up_delivers()
    assert rig.status()["rounds_started"] > started
    flaky = [e["code"] for e in rig.events("etrn_reply", mark) if e["relay"] == "flaky"]
    assert 451 in flaky and 250 in flaky, flaky
    cancelled = [e for e in rig.events("round_cancelled", mark) if e.get("reason") == "link_down"]
    assert cancelled, "no round was ever cancelled by a link-down during the flapping"


def test_enobufs_storm_still_ends_in_the_right_state(rig: Rig, tmp_path: Path) -> None:
    env = rig.env
    storm_if = unique("est")
    env.office.ip("link", "add", storm_if, "type", "ifb")
    env.office.ip("link", "set", storm_if, "up")
    out = tmp_path / "watch.out"
    with out.open("wb") as sink:
        # A tiny buffer and no kernel filter: the route storm must overflow the socket.
        watch = env.office.popen(
            sys.executable, "-m", "etrnd.link.watcher", "--interfaces", env.office_if,
            "--up-when", "carrier", "--settle", "0", "--min-interval", "0", "--down-hold", "0",
            "--debug-rcvbuf", "4096", "--debug-no-filter", cwd=ROOT, stdout=sink,
            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "event=ready" in out.read_text(), 15, "etrnd.link.watcher to be ready")
        rig.queue_while_down()
        for storm in range(3):
            batch = "".join(f"route add 2001:db8:{storm + 1}:{n:x}::/64 dev {storm_if}\n"
                            for n in range(1500))
            # The link changes while thousands of route events flood the socket.
            routes = subprocess.Popen(env.office.cmd("ip", "-6", "-batch", "-"),
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            assert routes.stdin is not None
            routes.stdin.write(batch.encode())
            routes.stdin.close()
            rig.link(storm % 2 == 0)
            assert routes.wait(30) == 0
        # The last storm left the link down; bring it up inside one more storm.
        routes = subprocess.Popen(env.office.cmd("ip", "-6", "-batch", "-"),
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert routes.stdin is not None
        routes.stdin.write("".join(f"route del 2001:db8:1:{n:x}::/64 dev {storm_if}\n"
                                   for n in range(1500)).encode())
        routes.stdin.close()
        rig.final_link_up_delivers()
        assert routes.wait(30) == 0

        def settled_up() -> bool:
            lines = [ln for ln in out.read_text().splitlines()
                     if " event=up " in ln or " event=down " in ln or "event=round" in ln]
            return bool(lines) and "event=round" in lines[-1]

        wait_until(settled_up, 10, "the watcher's last decision to be a round after the up")
        # How many storms overflow the socket depends on scheduling (a re-read can swallow
        # the next storm); what matters is that overflows happened and the state is right.
        wait_until(lambda: "netlink_resynced" in out.read_text(), 10,
                   "an overflow followed by a full re-read")
        assert "Traceback" not in out.read_text()
    finally:
        watch.terminate()
        watch.wait(10)
        env.office.ip("link", "del", storm_if, check=False)


def _recreate_link(env: IspOffice) -> None:
    """The veth pair again, same names and addresses, as a reconnecting modem would."""
    veth(env.isp, env.isp_if, env.office, env.office_if)
    env.isp.ip("addr", "add", f"{ISP_ADDR}/{PREFIX_LEN}", "dev", env.isp_if)
    for addr in (FLAKY_ADDR, SILENT_ADDR):
        env.isp.ip("addr", "add", f"{addr}/32", "dev", env.isp_if)
    env.office.ip("addr", "add", f"{OFFICE_ADDR}/{PREFIX_LEN}", "dev", env.office_if)
    env.isp.run("sysctl", "-qw", f"net.ipv4.conf.{env.isp_if}.ignore_routes_with_linkdown=1")
    env.isp.ip("link", "set", env.isp_if, "up")


def test_wan_interface_deleted_mid_round(rig: Rig) -> None:
    env = rig.env
    rig.queue_while_down()
    mark = len(rig.log())
    rig.link(True)
    # The silent relay's round is certainly in flight now (its server never greets).
    wait_until(lambda: any(e["relay"] == "silent" for e in rig.events("round_start", mark)),
               10, "a round on the silent relay")
    env.office.ip("link", "del", env.office_if)  # takes the ISP end with it
    wait_until(lambda: not rig.link_up_seen(), 10, "the daemon to see the WAN vanish")
    assert rig.daemon.poll() is None
    _recreate_link(env)
    rig.final_link_up_delivers()
    reasons = {e.get("reason") for e in rig.events("round_cancelled", mark)}
    assert "link_down" in reasons


def test_unreachable_relay_address_fails_fast_and_fails_over(rig: Rig) -> None:
    rig.queue_while_down()
    mark = len(rig.log())
    rig.final_link_up_delivers()
    failed = [e for e in rig.events("etrn_session_failed", mark) if e["host"] == UNREACHABLE]
    assert {e["relay"] for e in failed} >= {"isp", "dead"}
    assert all("unreachable" in e["text"].lower() or "connect" in e["text"].lower()
               for e in failed), failed
    isp = [e for e in rig.events("etrn_reply", mark) if e["relay"] == "isp"]
    assert isp and isp[0]["host"] == ISP_ADDR and isp[0]["code"] == 250

    def dead_keeps_retrying() -> bool:
        dead = next(r for r in rig.status()["relays"] if r["name"] == "dead")
        return dead["state"] in ("running", "waiting") and dead["attempts"] >= 3

    wait_until(dead_keeps_retrying, 10, "the unreachable relay to keep retrying on its own")


def _abuse(path: Path, payload: bytes | None, hold: float = 0.0) -> None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        if payload is not None:
            s.sendall(payload)
        time.sleep(hold)
        with contextlib.suppress(OSError):
            s.recv(4096)


def test_control_socket_flood_leaves_the_daemon_serving(rig: Rig) -> None:
    rig.queue_while_down()
    rss_before = _rss_kb(rig.daemon.pid)
    fds_before = len(os.listdir(f"/proc/{rig.daemon.pid}/fd"))
    payloads: list[tuple[bytes | None, float]] = (
        [(b"not json\n", 0)] * 150 + [(b'{"cmd": "reboot"}\n', 0)] * 50
        + [(b'{"cmd": "trigger", "relay": ["x"]}\n', 0)] * 50
        + [(b"\xff\xfe\x00garbage\n", 0)] * 50 + [(b"x" * (1 << 20), 0)] * 20
        + [(b'{"cmd": "status"' + b" " * 5000 + b"}\n", 0)] * 20
        + [(None, 3.0)] * 20  # connect and say nothing past the request timeout
    )
    threads = [threading.Thread(target=_abuse, args=(rig.socket, p, h)) for p, h in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    # The flood is over: requests are served again, and nothing leaked.
    wait_until(lambda: rig.status()["ok"] is True, 10, "status to answer after the flood")
    trig = request(rig.socket, {"cmd": "trigger", "relay": "nope"})
    assert trig["ok"] is False and "no relay named" in trig["error"]
    wait_until(lambda: len(os.listdir(f"/proc/{rig.daemon.pid}/fd")) <= fds_before + 2, 10,
               "the daemon's open files to return to their count before the flood")
    assert _rss_kb(rig.daemon.pid) < rss_before + 16 * 1024
    rig.final_link_up_delivers()
    assert rig.events("control_bad_request")


def test_sighup_storm_with_good_and_bad_configs(rig: Rig) -> None:
    rig.queue_while_down()
    mark = len(rig.log())
    good = rig.config.read_text()
    bad = good.replace("give_up_after: 0", "give_up_after: -1")
    try:
        for n in range(200):
            if n % 20 == 0:
                rig.config.write_text(bad if n % 40 == 0 else good)
            rig.daemon.send_signal(signal.SIGHUP)
            time.sleep(0.002)
    finally:
        rig.config.write_text(good)
    rig.daemon.send_signal(signal.SIGHUP)  # the last reload reads the good file
    wait_until(lambda: bool(rig.events("config_reloaded", mark)), 10, "a successful reload")
    assert rig.events("config_reload_failed", mark), "no reload ever saw the bad file"
    assert rig.daemon.poll() is None
    rig.final_link_up_delivers()
    names = {r["name"] for r in rig.status()["relays"]}
    assert names == {"isp", "flaky", "silent", "dead"}


def _rss_kb(pid: int) -> int:
    status: IO[str]
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
