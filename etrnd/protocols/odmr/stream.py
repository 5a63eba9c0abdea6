"""A message's DATA as it streams from the provider to the office MTA (RFC 5321 4.1.1.4, 4.5.2)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

from etrnd.protocols.odmr.office import Reply
from etrnd.protocols.replies import clean_text

# What goes to the office MTA at once (octets). With the office transport's write buffer
# (drained before more is read) and the provider's StreamReader (aiosmtpd's, 2 lines of 1001
# octets before it stops reading the socket) this bounds what a message costs in memory.
CHUNK = 64 * 1024
HEADER_LIMIT = 64 * 1024  # header octets kept to read Message-ID and Received from
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_RECEIVED_ID = re.compile(r"\bid\s+([^\s;]+)", re.IGNORECASE)

Send = Callable[[bytes, "Received"], Awaitable[None]]


@dataclass
class Received:
    """One message's DATA as it streamed through: its size and what its header names."""

    size: int = 0  # octets, dot-stuffing undone
    header: bytearray = field(default_factory=bytearray)
    in_header: bool = True
    problem: Reply | None = None  # why it is not (or no longer) going on to the office MTA

    def take(self, line: bytes) -> None:
        """A whole line (unstuffed): kept while it belongs to the header."""
        if self.in_header:
            if line == b"\r\n" or len(self.header) + len(line) > HEADER_LIMIT:
                self.in_header = False
            else:
                self.header += line

    def ids(self) -> tuple[str | None, str]:
        """(its Message-ID or None, the provider's queue ID from the topmost Received: line
        or ""), RFC 5322 3.6.4 and 3.6.7."""
        head = BytesHeaderParser(policy=compat32).parsebytes(bytes(self.header))
        mid, received = head.get("Message-ID"), head.get("Received")
        # An msg-id has no white space: what folding adds is not part of it.
        mid = clean_text("".join(str(mid).split()), 998) or None if mid else None
        found = _RECEIVED_ID.search(" ".join(str(received).split())) if received else None
        return mid, clean_text(found.group(1), 100) if found else ""


def data_octets(line: bytes) -> bytes:
    """A received DATA line as the office MTA must get it: every line end CRLF and every line
    starting with a dot doubled (RFC 5321 4.5.2), so a bare CR or LF inside the line can
    never end the message early at the office (SMTP smuggling)."""
    body = line[:-2]
    if b"\r" not in body and b"\n" not in body:
        return line  # the provider's own stuffing is already right
    content = line[1:] if line.startswith(b".") else line
    return _LEADING_DOT.sub(b"..", _LINE_END.sub(b"\r\n", content))


async def pass_on(reader: asyncio.StreamReader, message: Received, limit: int | None,
                  send: Send) -> None:
    """Read DATA from `reader` up to the lone dot, handing it to `send` CHUNK by CHUNK while
    `message.problem` is None. A line over 1000 octets (RFC 5321 4.5.3.1.6; `reader`'s limit)
    or a message over `limit` octets sets the problem (500, 552) and the rest is only read.
    """
    batch = bytearray()
    line_start = True
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            line = await reader.read(exc.consumed)  # a piece of the long line
            message.problem = message.problem or Reply(
                500, "5.5.2 Line too long (see RFC 5321 4.5.3.1.6)")
        if line_start and line == b".\r\n":
            break
        stuffed = line_start and line.startswith(b".")
        message.size += len(line) - stuffed
        if line_start:
            message.take(line[1:] if stuffed else line)
        line_start = line.endswith(b"\r\n")
        if limit is not None and message.size > limit and message.problem is None:
            message.problem = Reply(552, "5.3.4 message size exceeds fixed maximum message "
                                         f"size ({limit} octets)")
        if message.problem is None:
            batch += data_octets(line)
            if len(batch) >= CHUNK:
                await send(bytes(batch), message)
                batch.clear()
    if batch and message.problem is None:
        await send(bytes(batch), message)
