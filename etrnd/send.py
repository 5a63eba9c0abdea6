"""`etrnd send`: one ETRN round now, without link watching (placeholder until the client lands)."""

from __future__ import annotations

import sys


def send_command(path: str | None, relay: str | None, args: list[str]) -> int:
    print("etrnd: send is not implemented yet", file=sys.stderr)
    return 1
