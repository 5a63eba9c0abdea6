"""TCP connect to a relay that does not wait on TCP's 1 s SYN retransmission (RFC 8305 style)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from typing import Any

# RFC 8305 section 5's "Connection Attempt Delay": with no answer to the first SYN after this
# many seconds a second socket sends its own to the same address; first to connect wins.
# A line that has just come up (PPP, LTE) loses its first packets now and then, and TCP would
# send a lost SYN again only after TCP_TIMEOUT_INIT, 1 s. (It does not help when ARP holds
# both SYNs: docs/performance.md.)
ATTEMPT_DELAY = 0.25

AddrInfo = tuple[int, tuple[Any, ...]]  # (family, sockaddr)


async def open_socket(host: str, port: int, source: str | None,
                      limit: float) -> socket.socket:
    """A connected non-blocking TCP socket to `host`:`port`, bound to `source` if given.

    The addresses of `host` are tried in getaddrinfo's order, each to the end (as asyncio's
    create_connection does without happy eyeballs); for each, a second attempt starts after
    ATTEMPT_DELAY s without an answer. An IP literal is not looked up; a name is, off the loop
    (the loop's executor). Everything runs within `limit` s. Every socket but the one
    returned is closed, including one that connects after the winner.

    Raises TimeoutError, socket.gaierror, or OSError worded as asyncio's create_connection
    words it ("Connect call failed (...)", "Multiple exceptions: ...").
    """
    async with asyncio.timeout(limit):
        infos = await _resolve(host, port)
        local = None if source is None else await _resolve(source, 0)
        exceptions: list[OSError] = []
        for family, address in infos:
            try:
                return await _race(family, address, local)
            except OSError as exc:
                exceptions.append(exc)
    if len(exceptions) == 1 or all(str(e) == str(exceptions[0]) for e in exceptions):
        raise exceptions[0]
    raise OSError("Multiple exceptions: {}".format(", ".join(str(e) for e in exceptions)))


async def _resolve(host: str, port: int) -> list[AddrInfo]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if literal.version == 4:
            return [(socket.AF_INET, (host, port))]
        if "%" not in host:  # a scoped address needs getaddrinfo to find its scope id
            return [(socket.AF_INET6, (host, port, 0, 0))]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError("getaddrinfo() returned empty list")
    return [(family, address) for family, _, _, _, address in infos]


async def _race(family: int, address: tuple[Any, ...],
                local: list[AddrInfo] | None) -> socket.socket:
    """Connect to one address: a second attempt after ATTEMPT_DELAY s, first connected wins.

    asyncio.staggered_race (3.11) is not used: when two attempts connect in the same loop
    pass it fails an assertion and loses the second socket.
    """
    attempts = [asyncio.ensure_future(_attempt(family, address, local))]
    winner: socket.socket | None = None
    try:
        done, _ = await asyncio.wait(attempts, timeout=ATTEMPT_DELAY)
        if not done:
            attempts.append(asyncio.ensure_future(_attempt(family, address, local)))
        while True:
            for attempt in attempts:
                if attempt.done() and attempt.exception() is None:
                    winner = attempt.result()
                    return winner
            pending = [attempt for attempt in attempts if not attempt.done()]
            if not pending:
                # Every attempt had an answer (refused, unreachable): the first one's counts.
                first = attempts[0].exception()
                assert first is not None
                raise first
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for attempt in attempts:
            attempt.add_done_callback(functools.partial(_close_loser, keep=winner))
            attempt.cancel()


def _close_loser(attempt: asyncio.Future[socket.socket], *, keep: socket.socket | None) -> None:
    # A cancelled attempt closes its own socket; one that connected in the meantime (its
    # result already set) is closed here. Its exception is read so asyncio does not log it.
    if attempt.cancelled():
        return
    if attempt.exception() is None and attempt.result() is not keep:
        attempt.result().close()


async def _attempt(family: int, address: tuple[Any, ...],
                   local: list[AddrInfo] | None) -> socket.socket:
    """One socket: bound like asyncio's create_connection binds it, connected, or closed."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local is not None:
            _bind(sock, family, local)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, family: int, local: list[AddrInfo]) -> None:
    errors: list[OSError] = []
    for local_family, local_address in local:
        if local_family != family:
            continue
        try:
            sock.bind(local_address)
            return
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            errors.append(OSError(exc.errno, f"error while attempting to bind on address "
                                             f"{local_address!r}: {reason}"))
    if errors:
        raise errors[-1]
    raise OSError(f"no matching local address with {family=} found")


__all__ = ["ATTEMPT_DELAY", "open_socket"]
