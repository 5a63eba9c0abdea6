"""Benchmark: event-loop lag when the outside world stops answering (issue 10's two cases).

Run as root:  .venv/bin/python bench/loop_lag.py [--runs 3]

1. notify: NOTIFY_SOCKET bound in a fresh namespace (net.unix.max_dgram_qlen 10) and never
   read; settle 0, min_interval 0; the WAN flapped 15 times 0.3 s apart.
2. resolver: no `helo:`, a name server that never answers, a host name /etc/hosts does not
   know; the WAN comes up right after READY, while the FQDN lookup still hangs.

Each reports ETRNs received, `etrnd status` round trips over the control socket (a probe
every 50 ms), the daemon's own longest loop step (its stall detector, `loop` in status) and
SIGTERM -> exit. Only namespaces this script creates are touched; they are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.service.test_daemon import PORT, Wan, write_config  # noqa: E402
from tests.service.test_stall_e2e import (  # noqa: E402
    FLAPS,
    Sink,
    StatusProbe,
    blackhole_config,
    blackholed,
    flap,
)
from tests.support.daemonproc import Daemon, ScriptServer, wait_for  # noqa: E402
from tests.support.nettools import linked  # noqa: E402


def ms(values: list[float]) -> str:
    v = sorted(x * 1000 for x in values)
    p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
    return (f"median {statistics.median(v):.1f} ms, p99 {p99:.1f} ms, max {v[-1]:.1f} ms "
            f"(n={len(v)})")


def notify_case(tmp: Path) -> str:
    with linked("bl", "198.51.100.1", "198.51.100.2") as pair:
        wan = Wan(pair.office, pair.isp, pair.office_if, pair.isp_if)
        wan.carrier(True)
        Sink(wan.office, str(tmp / "notify"))  # bound, never read; ends with the namespace
        server = ScriptServer(wan.office, PORT, "250")
        config = write_config(tmp / "etrnd.yaml", wan.wan)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")}
        daemon = Daemon(config, tmp / "log", wan.office, env)
        try:
            daemon.wait_event("daemon_ready")
            probe = StatusProbe(tmp / "control.sock")
            with probe.running():
                wait_for(lambda: probe.latencies, 10, "status")
                at_ready = probe.last["loop"]["longest_step_ms"]
                flap(wan, FLAPS, 0.3)
                wait_for(lambda: len(server.etrns()) >= FLAPS, 30, "ETRNs")
            code, took = daemon.stop()
        finally:
            daemon.stop()
            server.close()
        return (f"notify: {len(server.etrns())}/{FLAPS} ETRNs; status {ms(probe.latencies)}; "
                f"longest loop step {probe.last['loop']['longest_step_ms']} ms (at ready "
                f"{at_ready} ms), stalls {probe.last['loop']['stalls']}; SIGTERM -> exit "
                f"{code} in {took * 1000:.0f} ms")


def resolver_case(tmp: Path) -> str:
    relays = (f"  - {{name: isp, host: 127.0.0.1, port: {PORT}, tls: none, timeout: 5s,\n"
              "      etrn: ['@example.test']}\n")
    with linked("br", "198.51.100.1", "198.51.100.2") as pair:
        wan = Wan(pair.office, pair.isp, pair.office_if, pair.isp_if)
        wan.carrier(True)
        server = ScriptServer(wan.office, PORT, "250")
        config = blackhole_config(tmp / "etrnd.yaml", wan.wan, relays)
        with blackholed(wan) as ns:
            daemon = Daemon(config, tmp / "log", ns)
            try:
                daemon.wait_event("daemon_ready")
                probe = StatusProbe(tmp / "control.sock")
                with probe.running():
                    up = time.monotonic()
                    wan.office.ip("link", "set", wan.wan, "up")
                    etrn = wait_for(server.etrns, 10, "ETRN")[0][2]
                    helo = daemon.wait_event("helo_name", timeout=15)
                code, took = daemon.stop()
            finally:
                daemon.stop()
                server.close()
    return (f"resolver: link-up -> ETRN {1000 * (etrn - up):.1f} ms (FQDN lookup gave up "
            f"after {helo['elapsed_ms']} ms); status {ms(probe.latencies)}; longest loop step "
            f"{probe.last['loop']['longest_step_ms']} ms, stalls {probe.last['loop']['stalls']}; "
            f"SIGTERM -> exit {code} in {took * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for run in range(args.runs):
        for case in (notify_case, resolver_case):
            with tempfile.TemporaryDirectory() as tmp:
                print(f"run {run + 1}: {case(Path(tmp))}", flush=True)


if __name__ == "__main__":
    main()
