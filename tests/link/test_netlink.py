"""Link watcher on real interfaces: a veth pair per test namespace, watcher as a subprocess."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etrnd.link.netlink import NLM_F_MULTI, RTM_NEWLINK, RTM_NEWROUTE, bpf_program
from tests.support.nettools import Netns, netns, unique, veth
from tests.support.nobody import nobody_python

REPO = Path(__file__).resolve().parents[2]
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _FIELD.findall(line)}


class Watcher:
    """`python -m etrnd.link.watcher` inside a namespace; every output line is kept and timed."""

    def __init__(self, ns: Netns, *args: str, wrap: tuple[str, ...] = (),
                 python: tuple[str, ...] = (sys.executable,),
                 env: dict[str, str] | None = None, down_hold: str | None = "0") -> None:
        # Downs at once unless a test says otherwise; None: the product's default.
        hold = ("--down-hold", down_hold) if down_hold is not None else ()
        self.proc = ns.popen(*wrap, *python, "-m", "etrnd.link.watcher", "--verbose", *hold,
                             *args,
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.lines: list[str] = []
        self._q: queue.Queue[tuple[float, str] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._q.put((time.monotonic(), raw.decode().rstrip("\n")))
        self._q.put(None)

    def next(self, pattern: str, timeout: float = 5.0) -> tuple[float, dict[str, str]]:
        """The next line matching `pattern` (a regex): (arrival time, its fields)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                break
            self.lines.append(item[1])
            if rx.search(item[1]):
                return item[0], fields(item[1])
        tail = "\n".join(self.lines[-30:])
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; got:\n{tail}")

    def decision(self, kind: str, timeout: float = 5.0) -> dict[str, str]:
        """The next up/down decision, which must be `kind`."""
        _, f = self.next(r"event=(up|down)\b", timeout)
        assert f["event"] == kind, f"expected {kind}, got {f}\n" + "\n".join(self.lines[-20:])
        return f

    def ready(self, state: str) -> dict[str, str]:
        """Wait for the initial state (the ready line and the initial decision after it)."""
        _, f = self.next(r"event=ready\b", 15)
        assert f["state"] == state, f
        _, initial = self.next(r"event=(up|down)\b")
        assert initial["event"] == state and initial["initial"] == "true", initial
        return f


@pytest.fixture
def ns() -> Iterator[Netns]:
    with netns("etw") as n:
        yield n


def wan_pair(ns: Netns, prefix: str = "wan") -> tuple[str, str]:
    """A veth pair inside `ns`: (the WAN end, its peer, both admin down)."""
    wan, peer = unique(prefix), unique("pr")
    veth(ns, wan, ns, peer)
    return wan, peer


def ip(ns: Netns, *args: str) -> None:
    ns.ip(*args)


# --- the BPF filter, run by a tiny classic-BPF interpreter (no root needed) ----------------
def run_bpf(prog: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = int.from_bytes(pkt[k:k + 4], "big")
        elif code == 0x30:
            acc = pkt[k]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x45):
            hit = acc == k if code == 0x15 else bool(acc & k)
            pc += jt if hit else jf
        pc += 1


def nlmsg(mtype: int, flags: int = 0, pid: int = 0, dst_len: int = 0) -> bytes:
    return (36).to_bytes(4, "little") + mtype.to_bytes(2, "little") + \
        flags.to_bytes(2, "little") + (1).to_bytes(4, "little") + pid.to_bytes(4, "little") + \
        bytes([2, dst_len]) + bytes(18)


@pytest.mark.parametrize(("msg", "passes"), [
    (nlmsg(RTM_NEWROUTE, dst_len=0), True),
    (nlmsg(RTM_NEWROUTE, dst_len=32), False),
    (nlmsg(RTM_NEWROUTE + 1, dst_len=24), False),
    (nlmsg(RTM_NEWROUTE, dst_len=32, pid=4242), True),      # a reply to our own request
    (nlmsg(RTM_NEWROUTE, dst_len=32, flags=NLM_F_MULTI), True),  # a dump reply
    (nlmsg(RTM_NEWLINK), True),
    (nlmsg(20), True),
    (nlmsg(RTM_NEWROUTE + 256, dst_len=32), True),
    (nlmsg(104, dst_len=32), True),  # RTM_NEWNEXTHOP: nhmsg's 2nd byte is a scope, not dst_len
    (nlmsg(105, dst_len=200), True),  # RTM_DELNEXTHOP
])
def test_bpf_filter(msg: bytes, passes: bool) -> None:
    assert (run_bpf(bpf_program(4242, little_endian=True), msg) != 0) is passes


# --- real interfaces --------------------------------------------------------------------
@pytest.mark.root
def test_carrier(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    ip(ns, "link", "set", wan, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier", "--settle", "0")
    assert w.ready("down")["why"] == f"{wan}: no carrier"
    assert not [line for line in w.lines if "rcvbuf_limited" in line]  # root: FORCE works
    ip(ns, "link", "set", peer, "up")
    assert w.decision("up")["why"] == f"{wan}: carrier up"
    ip(ns, "link", "set", peer, "down")
    w.decision("down")
    ip(ns, "link", "set", peer, "up")
    w.decision("up")
    ip(ns, "link", "set", wan, "down")
    assert w.decision("down")["why"] == f"{wan}: admin down"


@pytest.mark.root
def test_address_ipv6_linklocal_and_dadfailed_do_not_count(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "address", "--family", "ipv6")
    w.ready("down")
    # The peer owns ::2 already, so DAD on our side fails: tentative, then dadfailed.
    ip(ns, "-6", "addr", "add", "2001:db8::2/64", "dev", peer, "nodad")
    ip(ns, "-6", "addr", "add", "2001:db8::2/64", "dev", wan)
    deadline = time.monotonic() + 10
    while "dadfailed" not in ns.ip("-6", "addr", "show", "dev", wan).stdout:
        assert time.monotonic() < deadline, "DAD never failed"
        time.sleep(0.05)
    ip(ns, "-6", "addr", "add", "2001:db8::3/64", "dev", wan)  # unique: DAD passes
    up = w.decision("up", timeout=10)
    assert "2001:db8::3/64" in up["why"]
    assert not any("event=up" in line for line in w.lines[:-1])  # link-local, dadfailed
    ip(ns, "-6", "addr", "del", "2001:db8::3/64", "dev", wan)
    w.decision("down")


@pytest.mark.root
def test_address_ipv4_added_and_removed(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "address", "--family", "ipv4")
    assert "no global ipv4 address" in w.ready("down")["why"]
    ip(ns, "addr", "add", "198.51.100.2/24", "dev", wan)
    assert w.decision("up")["why"] == f"{wan}: carrier up, 198.51.100.2/24"
    ip(ns, "addr", "del", "198.51.100.2/24", "dev", wan)
    w.decision("down")


@pytest.mark.root
def test_default_route_and_silent_removal(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    ip(ns, "addr", "add", "198.51.100.2/24", "dev", wan)
    w = Watcher(ns, "--interfaces", wan, "--up-when", "default-route", "--family", "ipv4")
    assert "no ipv4 default route" in w.ready("down")["why"]
    ip(ns, "route", "add", "default", "via", "198.51.100.1", "dev", wan)
    assert w.decision("up")["why"].endswith("default via 198.51.100.1")
    ip(ns, "link", "set", wan, "down")  # IPv4 routes go with no RTM_DELROUTE
    w.decision("down")
    ip(ns, "link", "set", wan, "up")
    w.next(r"event=state .*no ipv4 default route")  # back up, and still knows: no route
    assert "default" not in ns.ip("route", "show", "dev", wan).stdout
    ip(ns, "route", "add", "default", "via", "198.51.100.1", "dev", wan)
    w.decision("up")
    ip(ns, "addr", "del", "198.51.100.2/24", "dev", wan)  # takes the route with it
    w.decision("down")
    ip(ns, "addr", "add", "198.51.100.2/24", "dev", wan)
    w.next(r"event=state .*no ipv4 default route")
    assert "event=up" not in w.lines[-1]


@pytest.mark.root
def test_glob_and_recreated_interface(ns: Netns) -> None:
    w = Watcher(ns, "--interfaces", "wwan*", "--up-when", "carrier")
    assert w.ready("down")["why"] == "no interface matches wwan*"
    wan, peer = wan_pair(ns, "wwan")
    for _ in range(2):  # the second time: same name, new index
        for dev in (wan, peer):
            ip(ns, "link", "set", dev, "up")
        assert w.decision("up")["why"] == f"{wan}: carrier up"
        ip(ns, "link", "del", wan)  # the kernel reports it admin-down, then deleted
        w.decision("down")
        w.next(r'event=state .*why="no interface matches wwan\*"')
        veth(ns, wan, ns, peer)


@pytest.mark.root
def test_startup_with_link_already_up(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    ip(ns, "addr", "add", "198.51.100.2/24", "dev", wan)
    ip(ns, "-6", "addr", "add", "2001:db8::2/64", "dev", wan, "nodad")
    ip(ns, "-6", "route", "add", "default", "via", "2001:db8::1", "dev", wan)
    w = Watcher(ns, "--interfaces", wan, "--settle", "0")
    assert w.ready("up")["why"] == f"{wan}: carrier up, 2001:db8::2/64, default via 2001:db8::1"
    w.next(r"event=round\b")


def _storm_batch(dev: str, count: int) -> Path:
    path = Path(f"/tmp/etrnd-storm-{dev}.batch")
    path.write_text("".join(f"route add 10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32 dev {dev}\n"
                            for i in range(count)))
    return path


@contextlib.contextmanager
def storm(ns: Netns, count: int) -> Iterator[subprocess.Popen[bytes]]:
    lan, lanp = unique("lan"), unique("lp")
    veth(ns, lan, ns, lanp)
    ip(ns, "link", "set", lan, "up")
    batch = _storm_batch(lan, count)
    try:
        proc = ns.popen("ip", "-batch", str(batch), stdout=subprocess.DEVNULL)
        yield proc
        proc.wait(60)
    finally:
        batch.unlink()


@pytest.mark.root
def test_route_storm_does_not_delay_link_up(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    ip(ns, "addr", "add", "198.51.100.2/24", "dev", wan)
    ip(ns, "route", "add", "default", "via", "198.51.100.1", "dev", wan)
    w = Watcher(ns, "--interfaces", wan, "--family", "ipv4", "--settle", "0")
    w.ready("up")
    delays, during = [], 0
    with storm(ns, 250_000) as proc:
        for _ in range(8):
            ip(ns, "link", "set", peer, "down")
            w.decision("down")
            ip(ns, "link", "set", peer, "up")
            t0 = time.monotonic()
            at, f = w.next(r"event=(up|down)\b", timeout=1.0)
            assert f["event"] == "up"
            delays.append(at - t0)
            during += proc.poll() is None
    assert during >= 3, "the storm ended before the toggles: make it bigger"
    assert max(delays) < 1.0
    assert "route add" not in ns.ip("route", "show", "dev", wan).stdout
    w.proc.terminate()
    w.proc.wait(5)
    with contextlib.suppress(AssertionError):
        w.next(r"$^", timeout=2)  # drain what is left
    assert not [line for line in w.lines if "netlink_overflow" in line]


@pytest.mark.root
def test_forced_overflow_is_recovered(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier",
                "--debug-no-filter", "--debug-rcvbuf", "4096")
    w.ready("up")
    # A reader that is not scheduled while the storm lasts (a busy machine): since etrnd
    # decodes a message in microseconds it may otherwise keep up with `ip -batch`.
    os.kill(w.proc.pid, signal.SIGSTOP)  # `ip netns exec` execs: this is the watcher
    try:
        with storm(ns, 30_000):
            pass  # the batch runs to its end
        ip(ns, "link", "set", peer, "down")  # lost in the overflow...
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    w.next(r"netlink_overflow", timeout=10)
    w.next(r"event=down\b", timeout=15)      # ...but a re-read finds it
    ip(ns, "link", "set", peer, "up")
    w.next(r"event=up\b", timeout=15)


@pytest.mark.root
def test_flapping_at_10hz_is_rate_limited(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier", "--settle", "0",
                "--min-interval", "1")
    w.ready("up")
    start = time.monotonic()
    while time.monotonic() - start < 3.0:
        ip(ns, "link", "set", peer, "down")
        time.sleep(0.05)  # pacing the flap itself, not waiting on the watcher
        ip(ns, "link", "set", peer, "up")
        time.sleep(0.05)
    end = time.monotonic()
    rounds: list[float] = []
    with contextlib.suppress(AssertionError):
        while True:  # the deferred round is due at most min_interval after the flapping
            rounds.append(float(w.next(r"event=round\b", timeout=1.5)[1]["mono"]))
    allowed = int((end - start + 1.5) / 1.0) + 1
    assert 2 <= len(rounds) <= allowed, rounds
    assert all(b - a >= 0.999 for a, b in itertools.pairwise(rounds)), rounds
    assert sum("event=up" in line for line in w.lines) > len(rounds)


@pytest.mark.root
def test_without_capabilities_the_buffer_is_capped_and_said_once(ns: Netns) -> None:
    if int(ns.run("sysctl", "-n", "net.core.rmem_max").stdout) >= 8 << 20:
        pytest.skip("rmem_max is large enough: nothing would be limited")
    wan, peer = wan_pair(ns)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    python, env = nobody_python()  # the checkout itself may be out of nobody's reach
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier",
                wrap=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all"), python=python, env=env)
    w.ready("up")
    limited = [line for line in w.lines if "netlink_rcvbuf_limited" in line]
    assert len(limited) == 1 and "wanted=8388608" in limited[0], w.lines
    ip(ns, "link", "set", peer, "down")
    w.decision("down")
