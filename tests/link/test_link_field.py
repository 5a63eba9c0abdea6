"""Link states from the field (issue 11): nexthop objects, route replace, dormant links.

Each case runs the real watcher in a namespace of its own against what `ip` does to real
veth interfaces; the expected decision and its `why` are written in the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.link.test_netlink import Watcher, ip, wan_pair
from tests.support.nettools import Netns, netns

pytestmark = pytest.mark.root


@pytest.fixture
def ns() -> Iterator[Netns]:
    with netns("etf") as n:
        yield n


def wan_up(ns: Netns, addr: str = "203.0.113.2/24", prefix: str = "wan") -> tuple[str, str]:
    wan, peer = wan_pair(ns, prefix)
    for dev in (wan, peer):
        ip(ns, "link", "set", dev, "up")
    ip(ns, "addr", "add", addr, "dev", wan)
    return wan, peer


# --- 1. nexthop objects ------------------------------------------------------------------
@pytest.mark.parametrize("compat", ["1", "0"])
def test_nexthop_object_deleted_brings_down(ns: Netns, compat: str) -> None:
    # compat 0: routes carry only the nexthop id (no expanded via/dev), as on routers that
    # turned the compatibility off; the watcher must resolve the id itself.
    ns.run("sysctl", "-qw", f"net.ipv4.nexthop_compat_mode={compat}")
    wan, _ = wan_up(ns)
    w = Watcher(ns, "--interfaces", wan, "--family", "ipv4", "--settle", "0")
    w.ready("down")
    ip(ns, "nexthop", "add", "id", "10", "via", "203.0.113.1", "dev", wan)
    ip(ns, "route", "add", "default", "nhid", "10")
    assert w.decision("up")["why"] == f"{wan}: carrier up, 203.0.113.2/24, default via 203.0.113.1"
    ip(ns, "nexthop", "del", "id", "10")  # the kernel sends only RTM_DELNEXTHOP
    assert w.decision("down")["why"] == f"{wan}: 203.0.113.2/24 but no ipv4 default route"
    assert "default" not in ns.ip("route").stdout


def test_nexthop_group_and_state_at_start(ns: Netns) -> None:
    ns.run("sysctl", "-qw", "net.ipv4.nexthop_compat_mode=0")
    wan, _ = wan_up(ns)
    other, _ = wan_up(ns, "198.51.100.2/24", "oth")
    ip(ns, "nexthop", "add", "id", "1", "via", "198.51.100.1", "dev", other)
    ip(ns, "nexthop", "add", "id", "2", "via", "203.0.113.1", "dev", wan)
    ip(ns, "nexthop", "add", "id", "3", "group", "1/2")
    ip(ns, "route", "add", "default", "nhid", "3")
    # Already up at start: the snapshot reads the nexthops before the routes.
    w = Watcher(ns, "--interfaces", wan, "--family", "ipv4", "--settle", "0")
    assert w.ready("up")["why"] == f"{wan}: carrier up, 203.0.113.2/24, default via 203.0.113.1"
    ip(ns, "nexthop", "del", "id", "1")  # the group keeps its hop through wan
    ip(ns, "nexthop", "del", "id", "2")  # the group is now empty: the kernel drops it
    assert w.decision("down")["why"].endswith("no ipv4 default route")


def test_nexthop_flushed_by_carrier_loss_silently(ns: Netns) -> None:
    wan, peer = wan_up(ns)
    ip(ns, "nexthop", "add", "id", "7", "via", "203.0.113.1", "dev", wan)
    ip(ns, "route", "add", "default", "nhid", "7")
    w = Watcher(ns, "--interfaces", wan, "--family", "ipv4", "--settle", "0")
    w.ready("up")
    ip(ns, "link", "set", peer, "down")  # carrier loss flushes nexthop 7 and its route
    w.decision("down", timeout=10)
    ip(ns, "link", "set", peer, "up")
    w.next(rf"event=state .*{wan}: 203.0.113.2/24 but no ipv4 default route", timeout=10)
    assert "nhid" not in ns.ip("route").stdout
    ip(ns, "nexthop", "add", "id", "7", "via", "203.0.113.1", "dev", wan)
    ip(ns, "route", "add", "default", "nhid", "7")
    w.decision("up")


# --- 2. route replace, multipath why -------------------------------------------------------
def test_replace_replaces_and_multipath_why_names_our_hop(ns: Netns) -> None:
    wan0, _ = wan_up(ns, "203.0.113.2/24", "wzero")
    wan1, _ = wan_up(ns, "198.51.100.2/24", "wone")
    ip(ns, "route", "add", "default", "nexthop", "via", "203.0.113.1", "dev", wan0,
       "nexthop", "via", "198.51.100.1", "dev", wan1)
    w = Watcher(ns, "--interfaces", wan1, "--family", "ipv4", "--settle", "0")
    assert w.ready("up")["why"] == f"{wan1}: carrier up, 198.51.100.2/24, default via 198.51.100.1"
    ip(ns, "route", "replace", "default", "via", "203.0.113.1", "dev", wan0)
    assert w.decision("down")["why"] == f"{wan1}: 198.51.100.2/24 but no ipv4 default route"
    ip(ns, "route", "replace", "default", "nexthop", "via", "203.0.113.1", "dev", wan0,
       "nexthop", "via", "198.51.100.1", "dev", wan1)
    assert w.decision("up")["why"].endswith("default via 198.51.100.1")
    # A route with another metric is another route: adding one replaces nothing.
    ip(ns, "route", "add", "default", "via", "203.0.113.1", "dev", wan0, "metric", "50")
    ip(ns, "route", "replace", "default", "via", "203.0.113.1", "dev", wan0, "metric", "50")
    ip(ns, "route", "del", "default", "via", "203.0.113.1", "dev", wan0, "metric", "50")
    ip(ns, "route", "replace", "default", "via", "198.51.100.1", "dev", wan1)
    ip(ns, "route", "replace", "default", "via", "203.0.113.1", "dev", wan0)
    w.decision("down")
    assert sum("event=down" in line for line in w.lines) == 2, w.lines


def test_ipv6_replace_replaces(ns: Netns) -> None:
    wan0, _ = wan_up(ns, "203.0.113.2/24", "wzero")
    wan1, _ = wan_up(ns, "198.51.100.2/24", "wone")
    ip(ns, "-6", "addr", "add", "2001:db8:1::2/64", "dev", wan1, "nodad")
    ip(ns, "-6", "addr", "add", "2001:db8::2/64", "dev", wan0, "nodad")
    ip(ns, "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", wan1)
    w = Watcher(ns, "--interfaces", wan1, "--family", "ipv6", "--settle", "0")
    w.ready("up")
    ip(ns, "-6", "route", "replace", "default", "via", "2001:db8::1", "dev", wan0)
    assert w.decision("down")["why"].endswith("no ipv6 default route")


# --- 3. dormant links ----------------------------------------------------------------------
def test_dormant_is_not_up(ns: Netns) -> None:
    wan, peer = wan_pair(ns)
    ip(ns, "link", "set", peer, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier", "--settle", "0")
    w.ready("down")
    ip(ns, "link", "set", wan, "mode", "dormant")
    ip(ns, "link", "set", wan, "up")  # UP,LOWER_UP ... state DORMANT: 802.1X not done yet
    w.next(rf'event=state .*why="{wan}: carrier up but dormant"')
    assert "state DORMANT" in ns.ip("link", "show", wan).stdout
    # The supplicant is done: it sets the operstate to UP (what wpa_supplicant does).
    ns.run(sys.executable, "-c", _SET_OPER_UP, wan)
    w.decision("up")
    # Carrier lost and back: the first message after carrier-on may still carry a stale
    # operstate; in link mode dormant that must not count as up.
    ip(ns, "link", "set", peer, "down")
    w.decision("down", timeout=10)
    ip(ns, "link", "set", peer, "up")
    w.next(rf'event=state .*why="{wan}: carrier up but dormant', timeout=10)
    assert not [line for line in w.lines if "event=up" in line][1:], w.lines


def test_default_mode_stale_operstate_is_up_at_once(ns: Netns) -> None:
    # The veth quirk: LOWER_UP with a stale LOWERLAYERDOWN first; the flags decide.
    wan, peer = wan_pair(ns)
    ip(ns, "link", "set", wan, "up")
    w = Watcher(ns, "--interfaces", wan, "--up-when", "carrier", "--settle", "0")
    w.ready("down")
    ip(ns, "link", "set", peer, "up")
    assert w.decision("up", timeout=10)["why"] == f"{wan}: carrier up"


# IFLA_OPERSTATE = IF_OPER_UP (6) on RTM_SETLINK, as a supplicant does; `ip` has no verb.
_SET_OPER_UP = """
import sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname=sys.argv[1])[0]
    ipr.link('set', index=idx, IFLA_OPERSTATE='UP')
"""


# --- 4. down_hold (issue 18) ------------------------------------------------------------------
def test_route_blip_is_held_and_a_real_down_is_dated_from_its_start(ns: Netns) -> None:
    wan, _ = wan_up(ns)
    ip(ns, "addr", "add", "203.0.113.3/24", "dev", wan)
    ip(ns, "route", "add", "default", "via", "203.0.113.1", "dev", wan)
    w = Watcher(ns, "--interfaces", wan, "--family", "ipv4", "--settle", "0",
                "--min-interval", "0", "--log-level", "debug", down_hold="2s")
    w.ready("up")
    w.next(r"event=round\b")
    # A gateway change as dhcpcd and udhcpc's script make it: delete, then add.
    batch = "route del default via 203.0.113.1\nroute add default via 203.0.113.9\n"
    sh_batch(ns, batch)
    _, blip = w.next(r"\blink_blip\b")
    assert float(blip["duration_ms"]) < 2000, blip
    assert blip["why"].endswith("but no ipv4 default route"), blip
    assert any("event=state up=true" in line and "via 203.0.113.9" in line
               for line in w.lines), w.lines
    # A real down: acted on once the hold is over, and dated from when it began.
    deleted = time.monotonic()
    ip(ns, "route", "del", "default")
    arrived, _ = w.next(r"event=down\b", 6)
    assert 1.9 <= arrived - deleted <= 4, arrived - deleted
    logged = [line for line in w.lines if " link_down " in line and "held_ms=" in line]
    assert logged, w.lines
    # An up is acted on at once, hold or not.
    ip(ns, "route", "add", "default", "via", "203.0.113.1", "dev", wan)
    w.next(r"event=up\b")
    w.next(r"event=round\b")
    assert not [line for line in w.lines if "event=down" in line][1:], w.lines
    assert sum("event=round" in line for line in w.lines) == 2, w.lines


def sh_batch(ns: Netns, batch: str) -> None:
    subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=batch, text=True, check=True,
                   timeout=10)
