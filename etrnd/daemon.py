"""The daemon: link watcher + ETRN rounds (placeholder until it lands)."""

from __future__ import annotations

import sys


def run_command(path: str | None) -> int:
    print("etrnd: run is not implemented yet", file=sys.stderr)
    return 1
