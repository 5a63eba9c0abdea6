"""hangup.Line over a real loopback TCP connection: a hang-up is a 421, a FIN and a drain.

The peer plays a provider in the middle of its data block: it keeps writing after our
hang-up, as Exim does (it reads replies only after its final dot). It must never see a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from structlog.testing import capture_logs

from etrnd.outputs.logs import get_logger
from etrnd.protocols.odmr.hangup import DRAIN_QUIET, Line

CHUNK = b"x" * 65536


class Server(asyncio.Protocol):
    """What the SMTP server would see through the Line."""

    def __init__(self) -> None:
        self.data = 0
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += len(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Line, Server, asyncio.StreamReader,
                                        asyncio.StreamWriter]]:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[tuple[Line, Server]] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            line, server = Line(transport, get_logger()), Server()
            line.set_protocol(server)
            made.set_result((line, server))

    listener = await loop.create_server(Accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line, server = await made
    try:
        yield line, server, reader, writer
    finally:
        writer.close()
        listener.close()


async def test_a_hang_up_mid_transfer_is_421_fin_and_a_drain_never_a_reset() -> None:
    async with pair() as (line, server, reader, writer):
        for _ in range(16):  # 1 MiB of "DATA" before the hang-up
            writer.write(CHUNK)
        await writer.drain()
        with capture_logs() as events:
            line.hang_up("421 4.3.2 office.test closing the session, try again later")
            assert server.eof.is_set()  # the server stops at once
            seen = server.data
            for _ in range(64):  # the provider finishes its data block: 4 MiB more
                writer.write(CHUNK)
                await writer.drain()  # a reset would raise ConnectionResetError here
            writer.write(b".\r\n")
            await writer.drain()
            # ... then reads our reply: the 421, and our FIN after it.
            assert await reader.readline() == (b"421 4.3.2 office.test closing the session, "
                                               b"try again later\r\n")
            assert await reader.read() == b""
            writer.close()
            await asyncio.wait_for(server.lost.wait(), 10)
        assert server.data == seen  # nothing after the hang-up reached the server
        drained = [e for e in events if e["event"] == "odmr_hangup_drained"]
        assert drained and drained[0]["drained"] >= 64 * len(CHUNK) - len(CHUNK), events
        assert not [e for e in events if e["event"] == "odmr_hangup_forced"]


async def test_a_quiet_provider_that_has_our_fin_is_let_go() -> None:
    # It read our 421 and FIN but never closes: once it has acknowledged the FIN and sent
    # nothing for DRAIN_QUIET, the connection is closed (a late write gets EPIPE, not a reset
    # in the middle of a transfer), long before the drain limit.
    async with pair() as (line, server, reader, _writer):
        loop = asyncio.get_running_loop()
        started = loop.time()
        line.hang_up("421 4.4.2 office.test Error: timeout exceeded")
        assert (await reader.readline()).startswith(b"421 ")
        await asyncio.wait_for(server.lost.wait(), DRAIN_QUIET + 5)
        assert DRAIN_QUIET <= loop.time() - started < DRAIN_QUIET + 5


async def test_close_after_the_providers_quit_is_a_plain_close() -> None:
    # aiosmtpd closes after 221; Exim sends QUIT and its FIN together: nothing to drain.
    async with pair() as (line, server, _reader, writer):
        writer.write_eof()
        await asyncio.wait_for(server.eof.wait(), 5)
        with capture_logs() as events:
            line.close()
            await asyncio.wait_for(server.lost.wait(), 5)
        assert not [e for e in events if e["event"].startswith("odmr_hangup")], events
