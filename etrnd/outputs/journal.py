"""Native journald protocol: one datagram of FIELD=value lines per event, no dependency."""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Any

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "etrnd"

# syslog priorities, as journalctl -p understands them.
PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}
# Short log keys that would be ambiguous (or clash with journald's own CODE_* fields) get a
# product prefix: `journalctl -u etrnd ETRN_CODE=459`.
FIELD_NAMES = {"code": "ETRN_CODE", "text": "ETRN_TEXT", "arg": "ETRN_ARG", "event": "EVENT",
               "level": "LEVEL"}


def field_name(key: str) -> str:
    """Journal field names are upper case [A-Z0-9_] and must not start with '_'."""
    name = FIELD_NAMES.get(key)
    if name is None:
        name = "".join(c if c.isalnum() and c.isascii() else "_" for c in key.upper())
        name = name.lstrip("_") or "FIELD"
        if name[0].isdigit():
            name = "F_" + name
    return name


def encode(event_dict: dict[str, Any], message: str) -> bytes:
    """Serialise an event; values with a newline use the binary length-prefixed form.

    `message` is the readable one-line form, so `journalctl` without -o verbose says it all.
    """
    level = str(event_dict.get("level", "info"))
    fields: list[tuple[str, str]] = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITY.get(level, 6))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
    ]
    fields += [(field_name(k), str(v)) for k, v in event_dict.items() if k != "timestamp"]
    out = bytearray()
    for name, value in fields:
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            out += name.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += name.encode() + b"=" + raw + b"\n"
    return bytes(out)


class JournalSender:
    """Sends to journald; large events go through a sealed memfd as journald expects.

    Never blocks: when journald does not keep up (its socket queue is full) the event is
    dropped and counted, and the next event that gets through is preceded by a
    `log_events_dropped count=N` event, so the loss itself is in the journal.
    """

    def __init__(self, path: str | None = None) -> None:
        # ETRND_JOURNAL_SOCKET lets tests capture exactly what journald would receive.
        self._path = path or os.environ.get("ETRND_JOURNAL_SOCKET") or DEFAULT_SOCKET
        self._sock = socket.socket(socket.AF_UNIX,
                                   socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.dropped = 0  # events given up since the last one that got through
        self.dropped_total = 0

    def send(self, event_dict: dict[str, Any], message: str) -> None:
        if self.dropped:
            count = self.dropped
            notice = {"event": "log_events_dropped", "level": "warning", "count": str(count),
                      "reason": "journald socket full"}
            if not self._send(encode(notice, f"log_events_dropped count={count} "
                                             "reason=\"journald socket full\"")):
                self._drop()
                return
            self.dropped = 0
        if not self._send(encode(event_dict, message)):
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        self.dropped_total += 1

    def _send(self, data: bytes) -> bool:
        """False only when journald has no room (the event should be counted as lost)."""
        try:
            self._sock.sendto(data, self._path)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too big for a datagram
                return True  # no journald at all: logging must never take the daemon down
            return self._send_memfd(data)
        return True

    def _send_memfd(self, data: bytes) -> bool:
        fd = os.memfd_create("etrnd-journal", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 2))
        try:
            os.write(fd, data)
            rights = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0,
                               self._path)
        except BlockingIOError:
            return False
        except OSError:
            pass
        finally:
            os.close(fd)
        return True
