"""Structured logging: one event per line, the same keys as console, JSON or journal fields."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from etrnd.outputs import journal
from etrnd.outputs.linewriter import LineWriter

Level = str
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
# Keys whose values must never be rendered, whoever passes them by mistake.
_SECRET_KEYS = frozenset({"password", "secret", "passwd", "auth_password", "token"})

EventDict = MutableMapping[str, Any]


def get_logger() -> Any:
    """The process-wide logger; call sites pass a stable snake_case event name and fields."""
    return structlog.get_logger("etrnd")


def _redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "**********"
    return event_dict


def plain(value: object) -> str:
    """A field value as text: lists comma-joined (`args=@a.example,#q`), the rest as str()."""
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(plain(v) for v in value) if value else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _quote(value: object) -> str:
    text = plain(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def render_message(event_dict: EventDict) -> str:
    """`event k=v ...`: grep-able, one line, values quoted only when needed."""
    fields = " ".join(
        f"{k}={_quote(v)}" for k, v in event_dict.items()
        if k not in ("timestamp", "level", "event")
    )
    return f"{event_dict.get('event', '')} {fields}".rstrip()


def render_logfmt(event_dict: EventDict) -> str:
    """`ts level event k=v ...` for terminals and plain files."""
    return f"{event_dict.get('timestamp', '')} {event_dict.get('level', 'info'):<7} " + (
        render_message(event_dict)
    )


class _LineRenderer:
    def __init__(self, fmt: str) -> None:
        self._fmt = fmt

    def __call__(self, _: Any, __: str, event_dict: EventDict) -> str:
        if self._fmt == "json":
            return json.dumps(event_dict, default=str, ensure_ascii=False)
        return render_logfmt(event_dict)


class _JournalRenderer:
    """Turns the event into journal fields and sends them; the stdlib layer gets nothing."""

    def __init__(self, sender: journal.JournalSender) -> None:
        self._sender = sender

    def __call__(self, _: Any, __: str, event_dict: EventDict) -> str:
        fields = {k: plain(v) for k, v in event_dict.items()}
        self._sender.send(fields, render_message(event_dict))
        raise structlog.DropEvent


def journal_stream_matches(stream: TextIO) -> bool:
    """True when stderr is the journal stream systemd set up ($JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def pick_format(fmt: str, stream: TextIO) -> str:
    if fmt != "auto":
        return fmt
    if journal_stream_matches(stream):
        return "journal"
    return "console" if stream.isatty() else "json"


def iso(wall: float) -> str:
    """UTC ISO 8601 with milliseconds, as in every log line and in `etrnd status`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def _timestamp(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = iso(time.time())
    return event_dict


_writers: dict[int, LineWriter] = {}


def _background(out: TextIO, fmt: str) -> LineWriter:
    """The one thread-backed writer for `out`, its drop notice in the format `fmt`."""
    render = _LineRenderer(fmt)

    def notice(count: int) -> str:
        return render(None, "", {"timestamp": iso(time.time()), "level": "warning",
                                 "event": "log_events_dropped", "count": count,
                                 "reason": "log stream not read fast enough"})

    writer = _writers.get(id(out))
    if writer is None or writer.stream is not out:
        writer = _writers[id(out)] = LineWriter(out, notice)
    writer.notice = notice
    return writer


def configure(level: Level = "info", fmt: str = "auto", stream: TextIO | None = None,
              journal_socket: str | None = None, background: bool = False) -> str:
    """Set up structlog for the whole process; returns the format actually chosen.

    `background`: lines are written by a thread (the daemon: its loop must never wait on a
    pipe that is read slowly); without it, writes are synchronous (one-shot commands).
    """
    out = stream if stream is not None else sys.stderr
    chosen = pick_format(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _redact,
    ]
    if chosen == "journal":
        processors.append(_JournalRenderer(journal.JournalSender(journal_socket)))
    else:
        processors += [_timestamp, _LineRenderer(chosen)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(
            cast(TextIO, _background(out, chosen)) if background and chosen != "journal"
            else out),
        cache_logger_on_first_use=False,
    )
    return chosen
