"""SMTP transcripts at debug level: one event per line each way, AUTH redacted, bodies sized.

API (for every SMTP leg: ETRN client, ODMR client and reversed server role, local relay):

- `Transcript(log)`: one per connection, `log` already bound to its context (`relay=`,
  `host=`, and e.g. `leg="local"` for the relay to the office MTA). Feed it the raw bytes of
  each direction as they go over the wire: `sent(data, tls)` for what this process wrote,
  `received(data, tls)` for what it read; `tls` is the session's TLS state as text (see
  `tls_state`). Each complete line becomes one debug event `smtp_send` / `smtp_recv` with the
  fields `line` and `tls`; a line is sanitised like reply texts (one printable line, at most
  `MAX_LINE` characters). Bytes may be fed in any chunks; a line waits for its LF.
- Redaction is by protocol state, whatever the role or mechanism (PLAIN, LOGIN, CRAM-MD5, any
  other): `AUTH <mech> <initial-response>` shows as `AUTH <MECH> <redacted>`, and every line
  the same side sends until the other side's reply is not 334 shows as `<redacted>` (RFC 4954
  section 4). A token once redacted is also redacted wherever the peer echoes it back.
- Message bodies are never logged: once one side answers 354 (RFC 5321 section 4.1.1.4), the
  other side's bytes up to the lone `.` line become one event `line="<message body>"` with
  `size=` (bytes on the wire, dot-stuffing included, the final `.` line excluded).
- `TranscriptSMTP(..., transcript_log=log)`: an `aiosmtplib.SMTP` that taps its protocol
  from the greeting on (every command, STARTTLS, AUTH step, DATA, reply; a reply it cannot
  parse is logged as received before the error propagates). Its `.transcript` is the
  Transcript, to hand on to whatever takes over the connection (ODMR's reversed role). With a
  logger that filters out debug it is a plain `aiosmtplib.SMTP` (no tap, no cost,
  `.transcript` None); `transcript_log=None` likewise.
- `tap(protocol, transcript)`: the same tap on an `aiosmtplib.protocol.SMTPProtocol` made
  elsewhere. A server-role protocol (e.g. an `aiosmtpd.smtp.SMTP` subclass taking over the
  same transport after ATRN) feeds the same `Transcript`, so the AUTH/DATA state carries on:

      def data_received(self, data: bytes) -> None:
          self.transcript.received(data, tls_state(self.transport))
          super().data_received(data)

      async def push(self, status: AnyStr) -> None:
          await super().push(status)
          self.transcript.sent(...status as bytes... + b"\r\n", tls_state(self.transport))

  (aiosmtpd logs body lines itself to the stdlib logger `mail.log` at DEBUG: keep that
  logger below DEBUG or unrouted.)
"""

from __future__ import annotations

import logging
from asyncio import BaseTransport
from typing import Any, Literal

from aiosmtplib import SMTP
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

from etrnd.protocols.replies import clean_text

MAX_LINE = 300  # characters per logged line, as for reply texts
REDACTED = "<redacted>"
BODY = "<message body>"
# Shorter tokens (an empty response, "=", "*" to cancel) cannot carry a secret worth hiding
# and would redact half the dialogue if the peer echoed them.
_MIN_ECHO_TOKEN = 4

Direction = Literal["send", "recv"]
_OTHER: dict[Direction, Direction] = {"send": "recv", "recv": "send"}


def debug_enabled(log: Any) -> bool:
    """True when `log` (a structlog logger) lets debug events through."""
    check = getattr(log, "is_enabled_for", None)
    if check is None:  # a lazy proxy: bind() resolves it to the configured logger
        check = log.bind().is_enabled_for
    return bool(check(logging.DEBUG))


def tls_state(transport: BaseTransport | None) -> str:
    """`none`, or the protocol version in use, e.g. `TLSv1.3`."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return "none"
    return str(ssl_object.version() or "tls")


class Transcript:
    """Turns the bytes of one SMTP connection into redacted `smtp_send`/`smtp_recv` events."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._partial: dict[Direction, bytes] = {"send": b"", "recv": b""}
        self._auth: Direction | None = None  # the side inside an AUTH exchange
        self._body: dict[Direction, int | None] = {"send": None, "recv": None}  # bytes so far
        self._midline: dict[Direction, bool] = {"send": False, "recv": False}  # body only
        self._tokens: set[str] = set()  # redacted AUTH tokens, hidden wherever they reappear

    def sent(self, data: bytes, tls: str) -> None:
        """Bytes this process wrote to the peer."""
        self._feed("send", data, tls)

    def received(self, data: bytes, tls: str) -> None:
        """Bytes this process read from the peer."""
        self._feed("recv", data, tls)

    def _feed(self, way: Direction, data: bytes, tls: str) -> None:
        buffer = self._partial[way] + data
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            self._line(way, buffer[start : end + 1], tls)
            start = end + 1
        rest = buffer[start:]
        size = self._body[way]
        if size is not None and len(rest) > 2:
            # Inside a body a long partial line cannot be the final "." one: count it now
            # rather than keep megabytes around for a log line.
            self._body[way] = size + len(rest)
            self._midline[way] = True
            rest = b""
        self._partial[way] = rest[: MAX_LINE * 4]  # a longer line is cut when logged anyway

    def _line(self, way: Direction, raw: bytes, tls: str) -> None:
        size = self._body[way]
        if size is not None:
            if raw.rstrip(b"\r\n") == b"." and not self._midline[way]:
                self._body[way] = None
                self._emit(way, BODY, tls, size=size)
                self._emit(way, ".", tls)
            else:
                self._body[way] = size + len(raw)
                self._midline[way] = False
            return
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if self._auth == way:
            text = self._redact_auth_step(text)
        elif text[:5].upper() == "AUTH ":
            self._auth = way
            text = self._redact_auth_command(text)
        elif _reply_code(text) is not None:
            self._on_reply(way, text)
        self._emit(way, self._hide_tokens(text), tls)

    def _on_reply(self, way: Direction, text: str) -> None:
        code = _reply_code(text)
        last = len(text) < 4 or text[3] != "-"
        peer = _OTHER[way]
        if last and self._auth == peer and code != 334:
            self._auth = None  # AUTH over (235, 5xx...): the peer's lines are plain again
        if last and code == 354:
            # 354 answers DATA and nothing else: the peer now sends the message itself. Not
            # waiting to have seen the DATA line errs on the side of logging less.
            self._body[peer] = 0

    def _redact_auth_command(self, text: str) -> str:
        parts = text.split(" ")
        mechanism = parts[1].upper() if len(parts) > 1 else ""
        if len(parts) > 2:
            self._remember(" ".join(parts[2:]))
            return f"AUTH {mechanism} {REDACTED}"
        return f"AUTH {mechanism}".rstrip()

    def _redact_auth_step(self, text: str) -> str:
        self._remember(text)
        return REDACTED

    def _remember(self, token: str) -> None:
        for part in (token, *token.split()):
            if len(part.strip()) >= _MIN_ECHO_TOKEN:
                self._tokens.add(part.strip())

    def _hide_tokens(self, text: str) -> str:
        for token in self._tokens:
            if token in text:
                text = text.replace(token, REDACTED)
        return text

    def _emit(self, way: Direction, text: str, tls: str, **extra: Any) -> None:
        event = "smtp_send" if way == "send" else "smtp_recv"
        self._log.debug(event, line=clean_text(text, MAX_LINE), tls=tls, **extra)


def _reply_code(text: str) -> int | None:
    if len(text) >= 3 and text[:3].isdigit() and (len(text) == 3 or text[3] in " -"):
        return int(text[:3])
    return None


def _reply_bytes(response: SMTPResponse) -> bytes:
    """aiosmtplib's parsed reply back as its wire lines (it joins them with LF)."""
    lines = response.message.split("\n")
    out = [
        f"{response.code}{'-' if i < len(lines) - 1 else ' '}{text}".rstrip() + "\r\n"
        for i, text in enumerate(lines)
    ]
    return "".join(out).encode("utf-8", "surrogateescape")


class _TappedProtocol(SMTPProtocol):
    """SMTPProtocol whose writes and parsed replies also go to a Transcript."""

    _transcript: Transcript

    def write(self, data: bytes) -> None:
        super().write(data)
        self._transcript.sent(data, tls_state(self.transport))

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109
        try:
            response = await super().read_response(timeout)
        except Exception:
            # Garbage, half a reply, then a drop: exactly what the operator needs to see.
            # The session is over (aiosmtplib closes it), so nothing is logged twice.
            if self._buffer:
                self._transcript.received(bytes(self._buffer).rstrip(b"\r\n") + b"\r\n",
                                          tls_state(self.transport))
            raise
        self._transcript.received(_reply_bytes(response), tls_state(self.transport))
        return response


def tap(protocol: SMTPProtocol, transcript: Transcript) -> None:
    """Make an aiosmtplib protocol report every line to `transcript` from now on."""
    # The instance changes class rather than being wrapped: aiosmtplib keeps a direct
    # reference to it (and hands it to loop.start_tls), so it must stay the same object.
    protocol._transcript = transcript  # type: ignore[attr-defined]
    protocol.__class__ = _TappedProtocol


class TranscriptSMTP(SMTP):
    """`aiosmtplib.SMTP` with a debug transcript when `transcript_log` allows debug."""

    def __init__(self, *args: Any, transcript_log: Any = None, **kwargs: Any) -> None:
        self.transcript: Transcript | None = None
        if transcript_log is not None and debug_enabled(transcript_log):
            self.transcript = Transcript(transcript_log)
        self._tapped: SMTPProtocol | None = None
        super().__init__(*args, **kwargs)

    # aiosmtplib assigns self.protocol right after connecting and before it reads the
    # greeting: the one moment to tap that misses nothing and copies none of its code.
    @property
    def protocol(self) -> SMTPProtocol | None:
        return self._tapped

    @protocol.setter
    def protocol(self, value: SMTPProtocol | None) -> None:
        if value is not None and self.transcript is not None:
            tap(value, self.transcript)
        self._tapped = value


__all__ = ["BODY", "MAX_LINE", "REDACTED", "Transcript", "TranscriptSMTP", "debug_enabled",
           "tap", "tls_state"]
