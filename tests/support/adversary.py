"""A scripted adversarial SMTP server: each connection plays the next misbehaviour in a script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tests.support.fakesmtp import OK, Command

MEGABYTE = 1 << 20
# Bytes that are not UTF-8, plus terminal escapes and BEL: what a log line must never carry raw.
NASTY = b"\xff\xfe\xc3\x28 queued \x1b[31mred\x1b[0m\x07 \x9b2J \xe2\x80\xae"


class Conn:
    """One client connection, with the moves a hostile server can make on it."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 commands: list[Command]) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self._commands = commands
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Each write is its own TCP segment: "byte by byte" must really be byte by byte.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(self, data: bytes | str) -> None:
        """A str is one reply line (CRLF added); bytes go out exactly as given."""
        raw = data if isinstance(data, bytes) else data.encode("utf-8") + b"\r\n"
        self.writer.write(raw)
        await self.writer.drain()

    async def drip(self, data: bytes | str, delay: float, chunk: int = 1) -> None:
        raw = data if isinstance(data, bytes) else data.encode("utf-8") + b"\r\n"
        for i in range(0, len(raw), chunk):
            self.writer.write(raw[i:i + chunk])
            await self.writer.drain()
            await asyncio.sleep(delay)

    async def command(self) -> str | None:
        """The client's next line (recorded), or None at EOF."""
        line = await self.reader.readline()
        if not line:
            return None
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        self._commands.append(Command(self.index, text, False))
        return text

    async def hang(self) -> None:
        """Say nothing more; note what the client still says until it goes away."""
        while await self.command() is not None:
            pass

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a crashing server or middlebox does."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Behaviour = Callable[[Conn], Awaitable[None]]


async def converse(conn: Conn, *, greeting: str = "220 adversary.test ESMTP",
                   extensions: Sequence[str] = ("ETRN",),
                   on: dict[str, Callable[[Conn, str], Awaitable[bool]]] | None = None,
                   etrn: str | bytes = OK, drip: float | None = None) -> None:
    """A plain SMTP server, except where `on[VERB]` takes over (it returns False to end)."""
    say: Callable[[bytes | str], Awaitable[None]] = (
        conn.send if drip is None else (lambda d: conn.drip(d, drip)))
    await say(greeting)
    while (line := await conn.command()) is not None:
        verb = line.split(" ", 1)[0].upper()
        if on and verb in on:
            if not await on[verb](conn, line):
                return
            continue
        if verb == "EHLO":
            names = ["adversary.test", *extensions]
            await say("".join(f"250-{n}\r\n" for n in names[:-1]) + f"250 {names[-1]}")
        elif verb == "ETRN":
            await say(etrn)
        elif verb == "QUIT":
            await say("221 bye")
            return
        elif verb in ("HELO", "NOOP", "RSET"):
            await say("250 ok")
        else:
            await say("502 5.5.2 not implemented")


def replying(etrn: str | bytes, **kw: object) -> Behaviour:
    async def play(conn: Conn) -> None:
        await converse(conn, etrn=etrn, **kw)  # type: ignore[arg-type]
    return play


def slow_greeting(delay: float) -> Behaviour:
    async def play(conn: Conn) -> None:
        await asyncio.sleep(delay)
        await converse(conn)
    return play


async def silent(conn: Conn) -> None:
    await conn.hang()


async def greet_421(conn: Conn) -> None:
    await conn.send("421 4.3.2 adversary.test too busy, closing")


async def garbage_greeting(conn: Conn) -> None:
    await conn.send(b"\x00\xff\xfe\x80GARBAGE " + NASTY + b"\r\n")
    await conn.hang()


async def megaline(conn: Conn) -> None:
    """A 1 MB reply line to ETRN, then silence."""
    async def line(c: Conn, _: str) -> bool:
        await c.send(b"250 " + b"x" * MEGABYTE + b"\r\n")
        await c.hang()
        return False
    await converse(conn, on={"ETRN": line})


async def endless_multiline(conn: Conn) -> None:
    """`250-...` continuation lines, as fast as the client takes them, for ever."""
    async def flood(c: Conn, _: str) -> bool:
        chunk = b"250-still going, more to come\r\n" * 256
        with contextlib.suppress(ConnectionError):
            while not c.writer.is_closing():
                await c.send(chunk)
        return False
    await converse(conn, on={"ETRN": flood})


async def reset_after_ehlo(conn: Conn) -> None:
    async def ehlo(c: Conn, _: str) -> bool:
        await c.send("250-adversary.test\r\n250 ETRN")
        c.reset()
        return False
    await converse(conn, on={"EHLO": ehlo})


async def starttls_broken(conn: Conn) -> None:
    """Offers STARTTLS, says go ahead, then answers the ClientHello with non-TLS bytes."""
    async def starttls(c: Conn, _: str) -> bool:
        await c.send("220 2.0.0 ready to start TLS")
        await c.reader.read(1)  # the client's ClientHello has begun
        await c.send(b"250 this is not a TLS record\r\n" * 4)
        c.writer.close()
        return False
    await converse(conn, extensions=("ETRN", "STARTTLS"), on={"STARTTLS": starttls})


async def auth_bad_base64(conn: Conn) -> None:
    """AUTH LOGIN whose every challenge is invalid base64 (and never succeeds)."""
    async def auth(c: Conn, _: str) -> bool:
        await c.send("334 %%%not*base64!!")
        if await c.command() is None:  # the client's next AUTH step
            return False
        await c.send("334 ????==??")
        return True
    await converse(conn, extensions=("ETRN", "AUTH LOGIN"), on={"AUTH": auth})


def dripped(delay: float) -> Behaviour:
    """Every reply split into one-byte TCP segments with `delay` between them."""
    async def play(conn: Conn) -> None:
        await converse(conn, drip=delay, etrn="250 2.0.0 Queuing for node example.test started")
    return play


def slowloris(delay: float) -> Behaviour:
    """The ETRN reply trickles a byte every `delay`: each byte arrives, the reply never ends."""
    async def trickle(c: Conn, _: str) -> bool:
        with contextlib.suppress(ConnectionError):
            await c.drip(b"250-" + b"z" * 10_000, delay)
        return False
    return lambda conn: converse(conn, on={"ETRN": trickle})


ok = replying(OK)

# Named behaviours for the command line (soak, namespaced e2e tests).
BEHAVIOURS: dict[str, Behaviour] = {
    "ok": ok,
    "451": replying("451 4.3.0 local error, try again"),
    "458": replying("458 Already processing example.test"),
    "459": replying("459 <example.test>: service unavailable"),
    "502": replying("502 5.5.2 ETRN not implemented"),
    "nasty": replying(b"250 " + NASTY + b"\r\n"),
    "greet_421": greet_421,
    "garbage": garbage_greeting,
    "reset_after_ehlo": reset_after_ehlo,
    "megaline": megaline,
    "endless": endless_multiline,
    "starttls_broken": starttls_broken,
    "drip": dripped(0.001),
    "slow_greeting": slow_greeting(0.2),
    "silent": silent,
}


@dataclass
class Adversary:
    """Connection n plays script[n] (then `then` for ever); or `chooser(n)` if given."""

    script: list[Behaviour] = field(default_factory=list)
    then: Behaviour = ok
    chooser: Callable[[int], Behaviour] | None = None
    commands: list[Command] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def lines(self, verb: str) -> list[Command]:
        return [c for c in self.commands if c.line.upper().split(" ")[0] == verb.upper()]

    def _next(self, index: int) -> Behaviour:
        if self.chooser is not None:
            return self.chooser(index)
        return self.script[index] if index < len(self.script) else self.then

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.connections
        self.connections += 1
        try:
            await self._next(index)(Conn(index, reader, writer, self.commands))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@contextlib.asynccontextmanager
async def serve(adv: Adversary, host: str = "127.0.0.1",
                port: int = 0) -> AsyncIterator[Adversary]:
    """Listen until the block ends (adv.port is set); every connection is closed at the end."""
    server = await asyncio.start_server(adv._handle, host, port)
    adv.port = server.sockets[0].getsockname()[1]
    try:
        yield adv
    finally:
        server.close()
        for task in list(adv._tasks):
            task.cancel()
        await asyncio.gather(*adv._tasks, return_exceptions=True)
        await server.wait_closed()


def _chooser(mode: str, seed: int) -> Callable[[int], Behaviour]:
    if mode == "alternate":  # 4xx, 250, 4xx, 250 ...
        return lambda n: BEHAVIOURS["451"] if n % 2 == 0 else ok
    if mode == "random":
        rng = random.Random(seed)
        names = sorted(BEHAVIOURS)
        return lambda n: BEHAVIOURS[rng.choice(names)]
    return lambda n: BEHAVIOURS[mode]


async def _main(host: str, port: int, mode: str, seed: int) -> None:
    adv = Adversary(chooser=_chooser(mode, seed))
    async with serve(adv, host, port):
        print(f"ready {adv.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    print(f"connections {adv.connections} etrn {len(adv.lines('ETRN'))}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.support.adversary")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    p.add_argument("--mode", default="random", help="alternate | random | a behaviour name")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    h, _, pt = a.listen.rpartition(":")
    if a.mode not in ("alternate", "random") and a.mode not in BEHAVIOURS:
        sys.exit(f"unknown mode {a.mode!r}; one of alternate, random, {', '.join(BEHAVIOURS)}")
    asyncio.run(_main(h, int(pt), a.mode, a.seed))
