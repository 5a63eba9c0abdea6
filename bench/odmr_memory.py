"""Benchmark: peak RSS of `etrnd send` relaying one big ODMR message (issue 16), by size.

Run as root:  .venv/bin/python bench/odmr_memory.py [--sizes 10,40,60] [--runs 2] [--tree DIR]

The lab of the interop tests (tests/support/odmrlab.py): Exim 4.100 as the ODMR provider, a
private Postfix as the office MTA. Per size (MB = 10^6 octets) and run, one message of that
size is queued, `etrnd send` brings it home, and its peak RSS (VmHWM of /proc/PID/status,
sampled every 20 ms) and wall time (process start to exit) are printed. `--tree` runs the
etrnd package of another checkout (e.g. the code before issue 16) with this checkout's tests
and Python.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.protocols.test_odmr_stream import MB, message, send_sampled  # noqa: E402
from tests.support.odmrlab import ASKED, odmr_lab  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,40,60", help="message sizes in MB, comma-separated")
    parser.add_argument("--runs", type=int, default=2, help="runs per size")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose etrnd runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, \
            odmr_lab(Path(work), wan_up=True, retry_interval="1h") as lab:
        n = 0
        for size in (int(s) for s in args.sizes.split(",")):
            for run in range(args.runs):
                rcpt = f"user{n}@{ASKED[0]}"
                lab.exim.enqueue_message(rcpt, message(rcpt, n, size * MB))
                started = time.monotonic()
                res, peak = send_sampled(lab, lab.config(f"m{n}.yaml", domains=[ASKED[0]],
                                                         timeout="60s"), tree=args.tree)
                ok = res.returncode == 0 and "1 relayed" in res.stdout
                wall = time.monotonic() - started
                print(f"{size} MB run {run + 1}: peak RSS {peak / 1024:.1f} MiB, "
                      f"send took {wall:.1f} s"
                      f"{'' if ok else f' (FAILED: exit {res.returncode})'}", flush=True)
                n += 1


if __name__ == "__main__":
    main()
