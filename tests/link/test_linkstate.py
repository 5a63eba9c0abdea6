"""Link state machine: decoded events in, verdicts out; no network."""

from __future__ import annotations

import socket

import pytest

from etrnd.link.state import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_LOOPBACK,
    IFF_LOWER_UP,
    IFF_UP,
    AddrEvent,
    DefaultRoutes,
    LinkEvent,
    LinkState,
    NexthopEvent,
    RouteEvent,
    Snapshot,
    usable_address,
)

V4, V6 = socket.AF_INET, socket.AF_INET6
UP = IFF_UP | IFF_LOWER_UP


def link(index: int, name: str, flags: int = UP, deleted: bool = False) -> LinkEvent:
    return LinkEvent(index, name, flags, "UP" if flags & IFF_LOWER_UP else "DOWN", deleted)


def addr(index: int, address: str, plen: int = 24, family: int = V4, flags: int = 0,
         scope: int = 0, deleted: bool = False) -> AddrEvent:
    return AddrEvent(index, family, address, plen, flags, scope, deleted)


def route(index: int, gw: str | None = "198.51.100.1", family: int = V4,
          deleted: bool = False, priority: int = 0) -> RouteEvent:
    return RouteEvent(family, (index,), gw, 254, priority, deleted)


def snap(*events: LinkEvent | AddrEvent | RouteEvent) -> Snapshot:
    return Snapshot(tuple(e for e in events if isinstance(e, LinkEvent)),
                    tuple(e for e in events if isinstance(e, AddrEvent)),
                    tuple(e for e in events if isinstance(e, RouteEvent)), "start")


def test_carrier_needs_admin_up_and_lower_up() -> None:
    s = LinkState(["wan0"], "carrier")
    s.apply(snap(link(2, "wan0", IFF_UP)))
    v = s.verdict()
    assert not v.up and v.why == "wan0: no carrier"
    s.apply(link(2, "wan0", UP))
    assert s.verdict().up and s.verdict().iface == "wan0"
    s.apply(link(2, "wan0", IFF_LOWER_UP))
    assert s.verdict().why == "wan0: admin down"


def test_no_matching_interface() -> None:
    s = LinkState(["ppp0", "wwan*"], "carrier")
    s.apply(snap(link(2, "eth0")))
    assert s.verdict().why == "no interface matches ppp0, wwan*"


def test_glob_and_any_interface_skips_loopback() -> None:
    s = LinkState(["wwan*"], "carrier")
    s.apply(snap(link(1, "lo", UP | IFF_LOOPBACK), link(3, "wwan1")))
    assert s.verdict().iface == "wwan1"
    any_iface = LinkState([], "carrier")
    any_iface.apply(snap(link(1, "lo", UP | IFF_LOOPBACK)))
    assert not any_iface.verdict().up
    any_iface.apply(link(5, "eth9"))
    assert any_iface.verdict().iface == "eth9"


@pytest.mark.parametrize(("address", "family", "flags", "scope", "usable"), [
    ("198.51.100.2", V4, 0, 0, True),
    ("169.254.1.1", V4, 0, 0, False),
    ("127.0.0.1", V4, 0, 254, False),
    ("2001:db8::2", V6, 0, 0, True),
    ("fe80::1", V6, 0, 253, False),
    ("2001:db8::2", V6, IFA_F_TENTATIVE, 0, False),
    ("2001:db8::2", V6, IFA_F_DADFAILED, 0, False),
    # Deprecated (preferred lifetime 0, valid left) still works (issue 18).
    ("2001:db8::2", V6, IFA_F_DEPRECATED, 0, True),
    ("198.51.100.2", V4, IFA_F_DEPRECATED, 0, True),
])
def test_usable_address(address: str, family: int, flags: int, scope: int,
                        usable: bool) -> None:
    assert usable_address(addr(2, address, 64, family, flags, scope)) is usable


def test_address_condition_by_family() -> None:
    s = LinkState(["wan0"], "address", "ipv6")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2"), addr(2, "fe80::1", 64, V6, scope=253)))
    assert s.verdict().why == "wan0: no global ipv6 address"
    s.apply(addr(2, "2001:db8::2", 64, V6, IFA_F_TENTATIVE))
    assert not s.verdict().up
    s.apply(addr(2, "2001:db8::2", 64, V6, 0))  # DAD done: the same address, new flags
    assert s.verdict().up and "2001:db8::2/64" in s.verdict().why
    s.apply(addr(2, "2001:db8::2", 64, V6, deleted=True))
    assert not s.verdict().up
    s.family = "any"
    assert s.verdict().why == "wan0: carrier up, 198.51.100.2/24"


def test_default_route_condition_and_why() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), link(3, "lan0"), addr(2, "198.51.100.2"), route(3)))
    assert not s.verdict().up  # a default route through another interface does not count
    assert "no ipv4 default route" in s.verdict().why
    s.apply(route(2))
    v = s.verdict()
    assert v.up and v.why == "wan0: carrier up, 198.51.100.2/24, default via 198.51.100.1"
    s.apply(route(2, deleted=True))
    assert not s.verdict().up


def test_pointopoint_route_without_gateway() -> None:
    s = LinkState(["ppp0"], "default-route", "ipv4")
    s.apply(snap(link(7, "ppp0"), addr(7, "203.0.113.9", 32), route(7, gw=None)))
    assert s.verdict().why == "ppp0: carrier up, 203.0.113.9/32, default dev ppp0"


def test_any_interface_default_route() -> None:
    s = LinkState([], "default-route", "any")
    s.apply(snap(link(1, "lo", UP | IFF_LOOPBACK), addr(1, "127.0.0.1", 8, scope=254),
                 link(4, "eth1"), addr(4, "2001:db8::4", 64, V6),
                 route(4, "2001:db8::1", V6)))
    assert s.verdict().iface == "eth1"


def test_admin_down_drops_routes_silently_removed() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2"), route(2)))
    assert s.verdict().up
    s.apply(link(2, "wan0", 0))  # the kernel sends no RTM_DELROUTE for IPv4
    s.apply(link(2, "wan0", UP))
    assert not s.verdict().up
    assert "no ipv4 default route" in s.verdict().why


def test_carrier_loss_keeps_routes() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2"), route(2)))
    s.apply(link(2, "wan0", IFF_UP))
    assert s.verdict().why == "wan0: no carrier"
    s.apply(link(2, "wan0", UP))
    assert s.verdict().up


def test_interface_recreated_with_new_index_is_followed() -> None:
    s = LinkState(["ppp0"], "default-route", "ipv4")
    s.apply(snap(link(7, "ppp0"), addr(7, "203.0.113.9", 32), route(7, None)))
    s.apply(link(7, "ppp0", deleted=True))
    assert s.verdict().why == "no interface matches ppp0"
    s.apply(link(9, "ppp0"))
    assert "no global ipv4 address" in s.verdict().why  # nothing of index 7 survives
    s.apply(addr(9, "203.0.113.10", 32))
    s.apply(route(9, None))
    assert s.verdict().up


def test_rename_is_followed() -> None:
    s = LinkState(["wan0"], "carrier")
    s.apply(snap(link(2, "eth0")))
    assert not s.verdict().up
    s.apply(link(2, "wan0"))
    assert s.verdict().up


def test_requeried_default_routes_replace_known_ones() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2"), route(2)))
    s.apply(DefaultRoutes(2, V4, ()))
    assert not s.verdict().up
    s.apply(DefaultRoutes(2, V4, (route(2, "198.51.100.254"),)))
    assert s.verdict().why.endswith("default via 198.51.100.254")


def test_snapshot_replaces_everything() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2"), route(2)))
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2")))
    assert not s.verdict().up


def test_multipath_default_route_counts_for_each_hop() -> None:
    s = LinkState(["wan1"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), link(3, "wan1"), addr(3, "203.0.113.2"),
                 RouteEvent(V4, (2, 3), "198.51.100.1", 254, 0)))
    assert s.verdict().up


def test_operstate_holds_back_dormant_testing_notpresent_not_unknown() -> None:
    for state, up in [("DORMANT", False), ("TESTING", False), ("NOTPRESENT", False),
                      ("UNKNOWN", True), ("LOWERLAYERDOWN", True), ("UP", True)]:
        s = LinkState(["wan0"], "carrier")
        s.apply(snap(LinkEvent(2, "wan0", UP, state)))
        assert s.verdict().up is up, state
    # Link mode dormant: a stale operstate right after carrier-on is not "up" either.
    s = LinkState(["wan0"], "carrier")
    s.apply(snap(LinkEvent(2, "wan0", UP, "LOWERLAYERDOWN", linkmode=1)))
    assert s.verdict().why == "wan0: carrier up but dormant (link mode dormant)"
    s.apply(LinkEvent(2, "wan0", UP, "UP", linkmode=1))
    assert s.verdict().up


def test_route_by_nexthop_id_follows_the_nexthop() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(Snapshot((link(2, "wan0"), link(3, "wan1")), (addr(2, "198.51.100.2"),),
                     (RouteEvent(V4, (), None, 254, 0, nhid=9),), "start",
                     (NexthopEvent(5, 3, "203.0.113.1"), NexthopEvent(6, 2, "198.51.100.1"),
                      NexthopEvent(9, group=(5, 6)))))
    assert s.verdict().why == "wan0: carrier up, 198.51.100.2/24, default via 198.51.100.1"
    s.apply(NexthopEvent(6, deleted=True))
    assert not s.verdict().up


# --- issue 18: deprecated addresses, route lifetimes ---------------------------------------
def test_deprecated_address_counts_and_why_says_so() -> None:
    s = LinkState(["wan0"], "default-route", "ipv4")
    s.apply(snap(link(2, "wan0"), addr(2, "198.51.100.2", flags=IFA_F_DEPRECATED), route(2)))
    v = s.verdict()
    assert v.up and v.why == ("wan0: carrier up, 198.51.100.2/24 (deprecated), "
                              "default via 198.51.100.1")
    # A preferred address is named first; the deprecated one is still a source.
    s.apply(addr(2, "198.51.100.3"))
    assert "198.51.100.3/24, default" in s.verdict().why
    assert s.addresses("wan0", V4) == ["198.51.100.3", "198.51.100.2"]
    s.apply(addr(2, "198.51.100.3", deleted=True))
    s.apply(addr(2, "198.51.100.2", flags=IFA_F_DEPRECATED, deleted=True))  # valid_lft ran out
    assert s.verdict().why == "wan0: no global ipv4 address"


def ra(index: int, expires: float | None, deleted: bool = False) -> RouteEvent:
    return RouteEvent(V6, (index,), "fe80::1", 254, 1024, deleted, expires=expires)


def test_route_lifetime_is_tracked_refreshed_and_expired() -> None:
    s = LinkState(["wan0"], "default-route", "ipv6")
    s.apply(snap(link(2, "wan0"), link(3, "lan0"),
                 addr(2, "2001:db8::2", 64, V6), ra(2, 106.0), ra(3, 50.0)))
    assert s.verdict().up
    assert s.next_expiry() == (106.0, 2, V6)  # lan0 is not watched: its route has no timer
    assert s.expired(105.9) == set()
    # A later RA moves the expiry (learnt by re-reading the route at the old deadline).
    s.apply(DefaultRoutes(2, V6, (ra(2, 112.0),)))
    assert s.next_expiry() == (112.0, 2, V6)
    assert s.expired(112.0) == {(2, V6)}
    s.drop_expired(112.0)
    assert not s.verdict().up and s.verdict().why.endswith("but no ipv6 default route")
    assert s.next_expiry() is None
    # A static route (no expiry) never arms a timer.
    s.apply(RouteEvent(V6, (2,), "fe80::1", 254, 1024))
    assert s.verdict().up and s.next_expiry() is None
