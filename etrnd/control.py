"""Control socket server and its clients (placeholder until it lands)."""

from __future__ import annotations

import sys


def trigger_command(path: str | None, relay: str | None) -> int:
    print("etrnd: no daemon (trigger is not implemented yet)", file=sys.stderr)
    return 1


def status_command(path: str | None, as_json: bool) -> int:
    print("etrnd: no daemon (status is not implemented yet)", file=sys.stderr)
    return 1
