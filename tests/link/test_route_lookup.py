"""The egress check's route look-up (link/egress.Router) answers as `ip route get` does, cheaply.

It runs beside every session's connect; with pyroute2 it cost ~0.5 ms of Python per session,
spent between the relay's 220 and our EHLO on a fast line (issue 21). Checked in a namespace
of the test's own with two lines, a default route on each (metrics 100 and 700) and a policy
rule for the second line's address, against iproute2's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from etrnd.link.rtnl import NLM_F_REQUEST, NLMSGHDR, RTM_GETLINK, RTM_NEWLINK, Rtnl, route_get
from tests.support.nettools import Netns, netns, unique, uplink

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import asyncio, json, sys, time
from etrnd.link.egress import Router

async def main(queries):
    router = Router()
    answers = [await router.via(dst, src) for dst, src in queries]
    costs = []
    for _ in range(200):
        started = time.process_time()
        await router.via(queries[0][0])
        costs.append(time.process_time() - started)
    router.close()
    print(json.dumps({"answers": answers, "cpu_median_s": sorted(costs)[100]}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


@pytest.fixture
def office() -> Iterator[tuple[Netns, str, str]]:
    with lab() as (_, office, wan, wwan):
        yield office, wan, wwan


@contextlib.contextmanager
def lab() -> Iterator[tuple[Netns, Netns, str, str]]:
    with netns("rli") as isp, netns("rlo") as office:
        wan, wwan = unique("wan"), unique("wwan")
        uplink(office, wan, "203.0.113.2", isp, "203.0.113.1", "100")
        uplink(office, wwan, "198.51.100.2", isp, "198.51.100.1", "700")
        office.ip("rule", "add", "from", "198.51.100.2", "table", "100")
        office.ip("route", "add", "default", "via", "198.51.100.1", "dev", wwan, "table", "100")
        yield isp, office, wan, wwan


def ip_route_get(ns: Netns, dst: str, src: str | None) -> str | None:
    res = ns.run("ip", "-j", "route", "get", dst, *(["from", src] if src else []), check=False)
    return json.loads(res.stdout)[0].get("dev") if res.returncode == 0 else None


def test_router_answers_as_ip_route_get(office: tuple[Netns, str, str]) -> None:
    ns, wan, wwan = office
    queries = [("192.0.2.25", None),  # the default route with the lower metric: wan
               ("192.0.2.25", "198.51.100.2"),  # the policy rule: wwan
               ("198.51.100.1", None),  # on-link
               ("127.0.0.1", None),
               ("2001:db8::25", None)]  # no IPv6 route at all: None, as `ip` fails
    res = subprocess.run(ns.cmd(sys.executable, "-c", PROBE, json.dumps(queries)), cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(res.stdout)
    assert got["answers"] == [ip_route_get(ns, dst, src) for dst, src in queries]
    assert got["answers"][:4] == [wan, wwan, wwan, "lo"]
    # pyroute2's look-up cost ~500 us of CPU here; struct and one datagram, a few dozen.
    assert got["cpu_median_s"] < 150e-6, got


def test_a_late_answer_is_not_taken_for_the_next_request() -> None:
    """A look-up cancelled by its time-out leaves its answer in the kept socket: the next
    request must not take it for its own, nor pass it on as an event."""
    async def main() -> None:
        rtnl = Rtnl()
        try:
            kind, body = route_get(socket.AF_INET, "127.0.0.1")
            late = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, 999, 0) + body
            rtnl.sock.send(late)  # answered at once: an RTM_NEWROUTE waits in the socket
            lo = bytes(4) + socket.if_nametoindex("lo").to_bytes(4, sys.byteorder) + bytes(8)
            answer = await rtnl.request(RTM_GETLINK, lo)
            assert [m.type for m in answer] == [RTM_NEWLINK]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await rtnl.events()
        finally:
            rtnl.close()

    asyncio.run(main())


SEND = r"""
import runpy, sys
sys.argv = ["etrnd", "send", "-c", sys.argv[1]]
try:
    runpy.run_module("etrnd", run_name="__main__")
except SystemExit as exc:
    print("exit", exc.code, "etrnd.link.netlink" in sys.modules, "pyroute2" in sys.modules,
          file=sys.stderr)
"""


@pytest.mark.parametrize("watched", ["wan", "wwan"])
def test_send_reads_the_link_state_only_when_the_route_leaves_elsewhere(
        watched: str, tmp_path: Path) -> None:
    """An ip-up script's `etrnd send`: with the route leaving through the one watched line,
    no link state is needed (nor its reader); leaving through another line, the state is
    read and the mismatch named as before. pyroute2 (~90 ms of imports) is in neither."""
    with lab() as (isp, office, wan, wwan):
        isp.ip("addr", "add", "192.0.2.25/32", "dev", "lo")
        server = isp.popen(sys.executable, "-m", "etrnd.demo", "--serve", "192.0.2.25:25",
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        config = tmp_path / "etrnd.yaml"
        config.write_text(
            f"watch: {{interfaces: [{wan if watched == 'wan' else wwan}], family: ipv4}}\n"
            "relays:\n  - {name: isp, host: 192.0.2.25, helo: office.example.test, "
            "timeout: 10s, source: kernel, etrn: ['@example.test']}\n"
            "log: {level: debug, format: json}\n")
        res = subprocess.run(office.cmd(sys.executable, "-c", SEND, str(config)), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
        events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
        egress = [e for e in events if e["event"].startswith("etrn_egress")]
        assert res.stderr.splitlines()[-1] == ("exit 0 False False" if watched == "wan"
                                               else "exit 0 True False"), res.stderr
        assert [(e["event"], e["route_iface"]) for e in egress] == [
            ("etrn_egress" if watched == "wan" else "etrn_egress_mismatch", wan)]
        if watched == "wwan":
            assert egress[0]["expected_iface"] == wwan  # the state said which line is up
