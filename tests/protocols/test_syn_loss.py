"""A lost first SYN costs a session ATTEMPT_DELAY, not TCP's 1 s retransmission; no socket leaks."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from etrnd.config.model import Relay
from etrnd.protocols import connect, etrn
from etrnd.protocols.replies import Verdict
from tests.support.fakesmtp import FakeSmtp, serve
from tests.support.nettools import Netns, enter, is_root, netns

T = TypeVar("T")


def in_netns(ns: Netns, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run `scenario` in an event loop on a thread that has entered `ns` (setns is per
    thread: this process's other threads, and the sockets they open, stay where they are)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter(ns)
            result.append(asyncio.run(scenario()))  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "scenario did not finish within 30 s"
    if errors:
        raise errors[0]
    return result[0]


async def run(ns: Netns, *cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, (cmd, out)
    return out.decode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def until(condition: Callable[[], bool], deadline: float) -> bool:
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.skipif(not is_root(), reason="needs root for a network namespace")
def test_a_dropped_first_syn_costs_the_attempt_delay_not_a_second() -> None:
    """The namespace's firewall drops the first SYN to the relay's port, as a line that is
    just coming up (or a veth whose far end is not yet active) does. Before: the ETRN
    waited for TCP's retransmission, ~1.0 s after the connect started."""
    with netns("syn") as ns:
        async def scenario() -> dict[str, Any]:
            fake = FakeSmtp()
            async with serve(fake):
                await run(ns, "iptables", "-I", "INPUT", "-p", "tcp", "--dport",
                          str(fake.port), "--syn", "-m", "statistic", "--mode", "nth",
                          "--every", "1000000", "--packet", "0", "-j", "DROP")
                relay = Relay(name="isp", host="127.0.0.1", port=fake.port, tls="none",
                              helo="office.test", timeout=5.0, etrn=("@example.test",))
                fds = open_fds()
                replies: dict[str, Verdict] = {}
                started = time.monotonic()
                ended = await etrn.session(relay, "127.0.0.1", ["@example.test"], replies)
                elapsed = time.monotonic() - started
                # A first socket left open would be accepted after its own retransmission
                # (1 s after the start): give it time to show up, then count.
                await asyncio.sleep(max(0.0, started + 1.5 - time.monotonic()))
                fds_back = await until(lambda: open_fds() == fds, time.monotonic() + 3)
                counters = await run(ns, "iptables", "-L", "INPUT", "-v", "-x", "-n")
                return {"ended": ended, "replies": replies, "elapsed": elapsed,
                        "sessions": fake.sessions, "etrn": len(fake.lines("ETRN")),
                        "fds_back": fds_back, "fds": (fds, open_fds()),
                        "dropped": int(re.findall(r"^\s*(\d+)\s.*DROP", counters, re.M)[0])}

        got = in_netns(ns, scenario)
    assert got["dropped"] == 1, got  # the first SYN really was lost
    assert got["ended"] is None and got["replies"]["@example.test"].code == 250, got
    assert got["elapsed"] < 0.7, got  # ~ATTEMPT_DELAY (0.25 s); TCP alone: ~1.0 s
    assert got["sessions"] == 1 and got["etrn"] == 1, got  # the first socket never connected
    assert got["fds_back"], got  # every socket of the session closed


async def test_no_second_syn_when_the_first_is_answered() -> None:
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        sock = await connect.open_socket("127.0.0.1", port, "127.0.0.1", 2.0)
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getpeername()[1] == port
        sock.close()
        assert await until(lambda: accepted == 1, time.monotonic() + 2)
        await asyncio.sleep(connect.ATTEMPT_DELAY * 2)
    assert accepted == 1


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_failures_are_worded_as_asyncio_words_them(host: str) -> None:
    """Status and `send` read the errno out of these texts (connection refused (h:p))."""
    port = closed_port()
    loop = asyncio.get_running_loop()
    with pytest.raises(OSError, match="Connect call failed") as asyncio_says:
        await loop.create_connection(asyncio.Protocol, host=host, port=port)
    fds = open_fds()
    with pytest.raises(OSError, match="Connect call failed") as we_say:
        await connect.open_socket(host, port, None, 2.0)
    assert str(we_say.value) == str(asyncio_says.value)
    assert we_say.value.errno == asyncio_says.value.errno
    await asyncio.sleep(0)
    assert open_fds() == fds


async def test_a_name_falls_over_to_its_next_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with AAAA and A: tried in the resolver's order, the refused one first. (The
    answer is the loop's getaddrinfo's, rewritten: this machine's names have one address.)"""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def two_addresses(host: str, port: int, **kw: Any) -> list[Any]:
        assert host == "relay.test"
        return [*(await real("::1", port, **kw)), *(await real("127.0.0.1", port, **kw))]

    monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
    async with server:
        started = time.monotonic()
        sock = await connect.open_socket("relay.test", port, None, 2.0)
        assert sock.getpeername()[0] == "127.0.0.1"
        assert time.monotonic() - started < connect.ATTEMPT_DELAY  # ::1 refused at once
        sock.close()
        server.close()
        with pytest.raises(OSError, match=r"^Multiple exceptions: \[Errno 111\] Connect call "
                                          r"failed \('::1', \d+, 0, 0\), \[Errno 111\]"):
            await connect.open_socket("relay.test", port, None, 2.0)


async def test_a_black_hole_is_bounded_by_the_limit() -> None:
    """A listener that never accepts does not answer once its backlog is full: the SYNs go
    unanswered (a backlog of 0 holds one), and both attempts end at the relay's time-out."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.create_connection(("127.0.0.1", port), timeout=2)]
        fds = open_fds()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await connect.open_socket("127.0.0.1", port, None, 0.6)
        assert 0.5 < time.monotonic() - started < 1.5
        await asyncio.sleep(0)
        assert open_fds() == fds
        for filler in fillers:
            filler.close()
