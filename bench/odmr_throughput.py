"""Benchmark: ODMR (RFC 2645) through a real Exim provider into a real Postfix, etrnd vs fetchmail.

Run as root:  .venv/bin/python bench/odmr_throughput.py [--messages 50] [--rounds 5]
(needs `apt-get install fetchmail`; the Exim root is the tests' cached sid root.)

The lab of the interop tests (tests/odmrlab.py): Exim 4.100 as the ODMR provider in an "isp"
namespace, a private Postfix on the office's 127.0.0.1:25 delivering to a maildir, a veth WAN
that stays up. Each round queues --messages messages for the two asked domains (plus a few for
a domain never asked for), runs one contender once, and checks that every asked-for message
reached the office mailbox and nothing else left the provider. Contenders alternate round by
round, against the same provider in the same run:

- etrnd: `etrnd send` (one ODMR round: EHLO, AUTH PLAIN, ATRN, turnaround, relay to Postfix);
- fetchmail: `fetchmail --protocol ODMR` (AUTH CRAM-MD5, then relays bytes to Postfix).

Figures come from the provider's own log (millisecond stamps, the same clock for both):
- throughput: messages delivered (`=>` lines, each logged after the customer's 250 to the end
  of DATA, i.e. after the local Postfix accepted it) / seconds from the first to the last;
  this is the turnaround's steady state, whoever paces it (Exim forks per message);
- ATRN -> first message: from "ATRN ... received" to the first message's `=>` line;
- wall: the contender's whole run, process start to exit (start-up, AUTH and all);
- brought: how many of the queued messages that one run brought home (Exim sends at most 500
  per connection; etrnd asks again until the provider has nothing more, fetchmail does not).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.odmrlab import ASKED, OdmrLab, odmr_lab  # noqa: E402
from tests.support.postfix import wait_until  # noqa: E402

STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) "


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def parse_round(log: str) -> tuple[int, float, float]:
    """(messages delivered, messages/s first->last, ATRN->first message s) of one round's log."""
    atrn = [stamp(line) for line in log.splitlines() if re.match(STAMP + r"\[\d+\] ATRN ", line)]
    delivered = [stamp(line) for line in log.splitlines()
                 if re.match(STAMP + r"\[\d+\] \S+ => ", line)]
    if not atrn or not delivered:
        raise RuntimeError(f"no ATRN or no delivery in the provider's log:\n{log[-2000:]}")
    span = delivered[-1] - delivered[0]
    rate = (len(delivered) - 1) / span if span > 0 else float("nan")
    return len(delivered), rate, delivered[0] - atrn[0]


def run_round(lab: OdmrLab, name: str, config: Path,
              messages: int) -> tuple[float, float, float, int]:
    """One round for one contender; returns (messages/s, ATRN->first s, wall s, brought).

    A contender may bring fewer than were queued: Exim sends at most 500 per connection
    (connection_max_messages) and fetchmail, like etrnd before issue 16, stops there. What it
    left is counted, then removed from the provider, so the next round starts clean.
    """
    want = lab.queue_mail(messages // len(ASKED), not_asked=2)
    before_mta = lab.mta.count()
    log_start = len(lab.exim.log())
    t0 = time.monotonic()
    if name == "etrnd":
        res = lab.etrnd("send", "-c", str(config), timeout=600)
        ok = res.returncode == 0
    else:
        res = lab.fetchmail(timeout=600)
        ok = res.returncode == 0
    wall = time.monotonic() - t0
    if not ok:
        raise RuntimeError(f"{name} exited {res.returncode}:\n{res.stdout[-2000:]}"
                           f"{res.stderr[-2000:]}")
    # Exim's queue runs log (and defer what they could not send) after the contender is gone.
    wait_until(lambda: queue_runs_ended(lab.exim.log()[log_start:]), 300,
               "the provider's queue runs to end")
    count, rate, first = parse_round(lab.exim.log()[log_start:])
    lab.mta.wait_count(before_mta + count, timeout=300)
    left = asked_left(lab)
    if count + len(left) != len(want):
        raise RuntimeError(f"{name}: provider delivered {count} and holds {len(left)} of "
                           f"{len(want)}")
    deadline = time.monotonic() + 300
    while left:  # Exim's queue run may still hold some (locked) while it defers them
        lab.exim.exim("-Mrm", *left, check=False)
        left = asked_left(lab)
        if left and time.monotonic() > deadline:
            raise RuntimeError(f"could not remove what {name} left: {left[:5]}...")
        time.sleep(1 if left else 0)
    return rate, first, wall, count


def queue_runs_ended(log: str) -> bool:
    return log.count("Start ODMR queue run") == log.count("End queue run")


def asked_left(lab: OdmrLab) -> list[str]:
    """Exim ids of queued messages for the asked domains (`exim -bp`)."""
    ids, current = [], ""
    for line in lab.exim.exim("-bp").stdout.splitlines():
        header = re.match(r"^\s*\S+\s+\S+\s+(\S+-\S+-\S+) ", line)
        if header:
            current = header.group(1)
        elif line.strip() and not line.strip().startswith("other") and current not in ids:
            ids.append(current)
    return ids


def summary(values: list[float], unit: str, scale: float = 1.0, fmt: str = ".1f") -> str:
    scaled = [v * scale for v in values]
    return (f"median {statistics.median(scaled):{fmt}} {unit} "
            f"(min {min(scaled):{fmt}}, max {max(scaled):{fmt}})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50, help="per round (two domains)")
    parser.add_argument("--rounds", type=int, default=5, help="per contender")
    parser.add_argument("--only", choices=["etrnd", "fetchmail"], default=None)
    args = parser.parse_args()
    contenders = [args.only] if args.only else ["etrnd", "fetchmail"]
    results: dict[str, list[tuple[float, float, float, int]]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmpdir, \
            odmr_lab(Path(tmpdir), wan_up=True) as lab:
        # Exim routes every queued message before the first delivery (-qq): long for 1000.
        config = lab.config(timeout="120s", extra="")
        for n in range(args.rounds):
            for name in contenders if n % 2 == 0 else contenders[::-1]:
                results[name].append(run_round(lab, name, config, args.messages))
                rate, first, wall, brought = results[name][-1]
                print(f"round {n + 1} {name:<9} {rate:6.1f} msg/s  ATRN->first "
                      f"{first * 1000:6.0f} ms  wall {wall:5.2f} s  brought "
                      f"{brought}/{args.messages}", flush=True)
    print(f"\n{args.messages} messages per round, {args.rounds} rounds per contender:")
    for name, rows in results.items():
        print(f"{name:<9} throughput {summary([r[0] for r in rows], 'msg/s')}; "
              f"ATRN->first {summary([r[1] for r in rows], 'ms', 1000, '.0f')}; "
              f"wall {summary([r[2] for r in rows], 's', 1.0, '.2f')}; "
              f"brought {summary([r[3] for r in rows], 'messages', 1.0, '.0f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
