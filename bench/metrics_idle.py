"""Benchmark: what `metrics:` costs an idle daemon: RSS, threads, wake-ups, start -> ready.

Run as root:  .venv/bin/python bench/metrics_idle.py [--idle 10] [--runs 3]

Each run starts `etrnd run` in a network namespace of its own (so nobody else's link events
wake it), watching an interface that does not exist, once without `metrics:` and once with
`metrics: {listen: 127.0.0.1:9469}`. With metrics on it is scraped once first (a scrape
must leave nothing behind). Then, idle for --idle s: the context switches of every thread
(voluntary + involuntary, /proc/PID/task/*/status: each is a wake-up), its RSS (VmRSS) and
thread count. Only the namespaces this script creates are touched; they are removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FETCH = ("import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
         "'http://127.0.0.1:9469/metrics', timeout=10).read().decode())")


def sample(pid: int) -> tuple[int, int, int]:
    """(RSS in KiB, context switches of all threads, threads)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    switches, threads = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        threads += 1
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                switches += int(line.split()[1])
    return rss, switches, threads


def run(ns: str, tmp: Path, metrics: bool, idle: float) -> dict[str, float]:
    config = tmp / "etrnd.yaml"
    config.write_text(
        "watch: {interfaces: [nosuch0]}\n"
        "relays: [{name: isp, host: 127.0.0.1, helo: gw.example.org, etrn: ['@x.test']}]\n"
        f"control: {{socket: {tmp / 'control.sock'}}}\nlog: {{format: json}}\n"
        + ('metrics: {listen: "127.0.0.1:9469"}\n' if metrics else ""))
    log = tmp / "log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "etrnd",
                                 "run", "-c", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        while "daemon_ready" not in log.read_text():
            if proc.poll() is not None or time.monotonic() - started > 30:
                raise RuntimeError(log.read_text())
            time.sleep(0.005)
        ready = time.monotonic() - started
        if metrics:
            body = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FETCH],
                                  capture_output=True, text=True, check=True).stdout
            assert "etrnd_link_up 0.0" in body, body
        time.sleep(1.0)
        rss, before, threads = sample(proc.pid)
        time.sleep(idle)
        rss_after, after, _ = sample(proc.pid)
        return {"ready_s": ready, "rss_kib": rss_after, "rss_growth_kib": rss_after - rss,
                "wakeups": after - before, "threads": threads}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=10.0, help="idle measurement, seconds")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(args.runs):
        for mode in ("off", "on"):
            ns = f"emb{i}{mode}{time.monotonic_ns() % 100000}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
                with tempfile.TemporaryDirectory() as tmp:
                    results[mode].append(run(ns, Path(tmp), mode == "on", args.idle))
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=False)
            print(mode, json.dumps(results[mode][-1]), flush=True)
    for mode, rows in results.items():
        print(f"metrics {mode}: RSS {min(r['rss_kib'] for r in rows) / 1024:.1f}-"
              f"{max(r['rss_kib'] for r in rows) / 1024:.1f} MiB, wake-ups over "
              f"{args.idle:g} s: {sorted(int(r['wakeups']) for r in rows)}, threads "
              f"{sorted({int(r['threads']) for r in rows})}, start -> ready "
              f"{min(r['ready_s'] for r in rows):.2f}-{max(r['ready_s'] for r in rows):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
