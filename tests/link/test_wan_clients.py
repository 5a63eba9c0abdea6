"""The link as real WAN clients leave it (issue 18): dnsmasq to dhcpcd, dhclient and udhcpc;
radvd to the kernel's own RA handling. The watcher runs with the product's default down_hold.

Each test is one client's whole life: the lease (exactly one round), renewals (none), what the
field gets wrong (a deprecated lease past rebind, a gateway changed by delete+add, a router
that dies without a word), then the release or final RA (a down).
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.link.test_netlink import Watcher
from tests.support.daemonproc import wait_for
from tests.support.nettools import Linked, linked
from tests.support.wanclients import (
    ISP_GW,
    ISP_GW2,
    ROUTER_LIFETIME,
    T1,
    T2,
    Client,
    Dnsmasq,
    Radvd,
    default_route,
    ra_route_expiry,
    stopping,
)

pytestmark = pytest.mark.root
HOLD = 5.0  # watch.down_hold's default, which these tests run with


@dataclass
class Wan:
    net: Linked
    tmp: Path

    @property
    def isp(self) -> str:
        return self.net.isp_if

    @property
    def office(self) -> str:
        return self.net.office_if

    def watcher(self, family: str) -> Watcher:
        # No --down-hold: the default is what is under test. min_interval 0: every link-up
        # the watcher decides shows as a round, so "exactly one" is exact.
        return Watcher(self.net.office, "--interfaces", self.office, "--family", family,
                       "--settle", "0", "--min-interval", "0", "--log-level", "debug",
                       down_hold=None)


@pytest.fixture
def wan(tmp_path: Path) -> Iterator[Wan]:
    with linked("wc", isp_addr=ISP_GW) as net:
        net.isp.ip("addr", "add", f"{ISP_GW2}/24", "dev", net.isp_if)
        for ns, dev in ((net.isp, net.isp_if), (net.office, net.office_if)):
            # No IPv6 DAD (a tentative link-local holds radvd's first RA for an interval,
            # ~4 s): the lab's addresses are the test's own, nothing else can hold one.
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
            ns.ip("link", "set", dev, "up")
        yield Wan(net, tmp_path)


def decided(w: Watcher, mark: int) -> list[str]:
    """The decisions (up, down, round) the watcher printed after line `mark`."""
    return [line.split("event=")[1].split()[0] for line in w.lines[mark:]
            if re.search(r"event=(up|down|round)\b", line)]


def drain(w: Watcher, seconds: float = 0.3) -> None:
    """Read what the watcher printed up to now (lines only arrive through next())."""
    with contextlib.suppress(AssertionError):
        w.next(r"^\b$", seconds)  # matches nothing: reads every line for `seconds`


def lease(wan: Wan, kind: str, t1: int = T1, t2: int = T2) -> tuple[Dnsmasq, Client, Watcher]:
    server = Dnsmasq(wan.net.isp, wan.isp, wan.tmp, t1=t1, t2=t2)
    w = wan.watcher("ipv4")
    w.ready("down")
    client = Client(kind, wan.net.office, wan.office, wan.tmp)
    client.start()
    up = w.decision("up", timeout=40)
    assert up["why"].endswith(f"default via {ISP_GW}"), up
    w.next(r"event=round\b")
    return server, client, w


def renewals(client: Client, server: Dnsmasq, w: Watcher, count: int = 1) -> None:
    """Wait for `count` more DHCPACKs (renewals at T1), then check nothing was decided."""
    acks, mark = server.acks(), len(w.lines)
    for n in range(count):
        client.renew()
        wait_for(lambda n=n: server.acks() > acks + n, server.t1 + 10, f"renewal {n + 1}")
    drain(w)
    assert decided(w, mark) == [], w.lines[mark:]


def release(client: Client, w: Watcher) -> None:
    """A release is a real down: decided once the hold is over, dated from its start."""
    released = time.monotonic()
    client.release()
    arrived, _ = w.next(r"event=down\b", HOLD + 10)
    assert HOLD - 0.2 <= arrived - released <= HOLD + 3, arrived - released
    logged = [line for line in w.lines if " link_down " in line and "held_ms=" in line]
    assert logged and "since=" in logged[-1], w.lines[-5:]


# --- DHCPv4 ----------------------------------------------------------------------------------
def test_dhcpcd_deprecated_past_rebind_is_no_down(wan: Wan) -> None:
    server, client, w = lease(wan, "dhcpcd")
    with stopping(client, server):
        renewals(client, server, w)
        # The ISP's DHCP server goes away past T2: dhcpcd installed the lease with
        # preferred_lft = T2, so the kernel deprecates it, while the address, the route
        # and TCP all still work.
        mark = len(w.lines)
        server.stop()
        wait_for(lambda: "deprecated" in wan.net.office.ip("-4", "addr", "show",
                                                               wan.office).stdout,
                 T2 + 15, "the kernel to deprecate dhcpcd's address")
        _, state = w.next(r"event=state .*\(deprecated\)", 5)
        assert state["up"] == "true", state
        # The server answers again; dhcpcd rebinds the same lease.
        acks = server.acks()
        server.start()
        wait_for(lambda: server.acks() > acks, 30, "dhcpcd to rebind")
        wait_for(lambda: "deprecated" not in wan.net.office.ip(
            "-4", "addr", "show", wan.office).stdout, 10, "the rebound lease")
        drain(w)
        assert decided(w, mark) == [], w.lines[mark:]
        release(client, w)


@pytest.mark.parametrize("kind", ["dhcpcd", "udhcpc"])
def test_gateway_change_by_delete_and_add_is_a_blip(wan: Wan, kind: str) -> None:
    server, client, w = lease(wan, kind)
    with stopping(client, server):
        renewals(client, server, w)
        # The ISP hands out another router: at the next renewal the client deletes the old
        # default route and adds the new one (dhcpcd: RTM_DELROUTE, RTM_NEWROUTE µs apart).
        mark = len(w.lines)
        server.start(router=ISP_GW2)
        client.renew()
        _, blip = w.next(r"\blink_blip\b", T2 + 15)
        assert float(blip["duration_ms"]) < HOLD * 1000, blip
        wait_for(lambda: f"via {ISP_GW2}" in default_route(wan.net.office), 5, "new gateway")
        drain(w)
        assert decided(w, mark) == [], w.lines[mark:]
        assert any(f"default via {ISP_GW2}" in line for line in w.lines[mark:]), w.lines[mark:]
        release(client, w)


def wakeups(pid: int) -> int:
    """Context switches of a process, all its threads: each is a wake-up."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def idle_wakeups(w: Watcher, server: Dnsmasq, seconds: float) -> int:
    """The watcher's wake-ups in `seconds` with nothing on the line, i.e. no renewal: a
    window a renewal fell into (a loaded machine) is measured again after it."""
    for _ in range(3):
        acks = server.acks()
        drain(w, 1.0)  # the renewal's address update has been read
        before = wakeups(w.proc.pid)
        drain(w, seconds)
        after = wakeups(w.proc.pid)
        if server.acks() == acks:  # an ACK is logged before the client touches the address
            return after - before
    raise AssertionError(f"a renewal in each of 3 idle windows of {seconds} s: T1 too short")


def test_dhclient_one_round_none_on_renewal_down_on_release(wan: Wan) -> None:
    # dhclient renews at 3/4 of T1 plus a random part of the rest (6-8 s here): room for an
    # idle window between renewals.
    server, client, w = lease(wan, "dhclient", t1=8, t2=16)
    with stopping(client, server):
        mark = len(w.lines)
        renewals(client, server, w)
        # Between renewals nothing happens on the line: no timer may wake the watcher (a
        # DHCPv4 default route has no lifetime of its own).
        assert idle_wakeups(w, server, 3.0) == 0, "the watcher woke up on an idle DHCPv4 link"
        renewals(client, server, w)
        assert decided(w, mark) == [], w.lines[mark:]
        release(client, w)


# --- IPv6 router advertisements ----------------------------------------------------------------
def test_ra_router_killed_is_down_when_its_lifetime_ends(wan: Wan) -> None:
    radvd = Radvd(wan.net.isp, wan.isp, wan.tmp)
    w = wan.watcher("ipv6")
    w.ready("down")
    radvd.start()
    up = w.decision("up", timeout=30)
    assert "default via fe80::" in up["why"], up
    w.next(r"event=round\b")
    try:
        # Refreshed RAs (every 3-4 s) keep a 6 s lifetime alive: no down when the first
        # lifetime would have ended, nor in the 2 s after it (a down comes within 1.5 s).
        first, mark = ra_route_expiry(wan.net.office, wan.office), len(w.lines)
        assert first is not None
        wait_for(lambda: time.monotonic() > first + 2 and (ra_route_expiry(
            wan.net.office, wan.office) or 0) > first + 2, 2 * ROUTER_LIFETIME,
            "the RA lifetime refreshed past its first end")
        drain(w)
        assert decided(w, mark) == [], w.lines[mark:]
        # The router dies without a final RA: the kernel says nothing when the lifetime ends.
        radvd.kill(signal.SIGKILL)
        expires = ra_route_expiry(wan.net.office, wan.office)
        assert expires is not None
        arrived, down = w.next(r"event=down\b", ROUTER_LIFETIME + 5)
        late = arrived - expires
        print(f"router lifetime ended -> down: {late * 1000:.0f} ms")  # shown with -s
        assert -0.3 <= late <= 1.5, f"down {late:.2f} s after the router lifetime ended"
        assert down["why"].endswith("no ipv6 default route"), down
        # The route is still listed until the kernel's GC: it was gone for routing already.
        # The router comes back: a new RA (which may revive the expired route silently).
        radvd.start()
        w.decision("up", timeout=15)
        w.next(r"event=round\b")
        # A clean stop sends a final RA (router lifetime 0): an ordinary down, held.
        stopped = time.monotonic()
        radvd.kill(signal.SIGTERM)
        arrived, _ = w.next(r"event=down\b", HOLD + 10)
        assert HOLD - 0.2 <= arrived - stopped <= HOLD + 3, arrived - stopped
    finally:
        if radvd.proc is not None:
            radvd.kill(signal.SIGKILL)
