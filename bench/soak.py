"""Soak: thousands of WAN up/down cycles against a randomly misbehaving relay; nothing may grow.

Run as root from the repo: `.venv/bin/python bench/soak.py --cycles 10000 --max-seconds 900`.
It creates two network namespaces joined by a veth pair (ISP: the adversarial server from
tests/adversary.py in `random` mode; office: `etrnd run` watching its end of the pair),
flips the office end up and down, waits for each round to start, and reports the daemon's
RSS, open file descriptors and asyncio task count at start and end, rounds started versus
expected, and every exception or crash event in its log. Everything it made is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from etrnd.service.control import ControlError, request  # noqa: E402
from tests.support.nettools import linked  # noqa: E402

ISP_ADDR, OFFICE_ADDR = "198.51.100.1", "198.51.100.2"
# Events that mean a bug, not a bad server.
CRASH_EVENTS = ("round_crashed", "daemon_fatal", "control_error", "link_watch_failed",
                "netlink_error")


def _daemon(config: str, task_file: str) -> int:
    """`etrnd run`, plus SIGUSR2 -> write len(asyncio.all_tasks()) to task_file."""
    from etrnd.config.loading import load_config
    from etrnd.outputs import logs
    from etrnd.service.daemon import Daemon

    cfg = load_config(config)
    logs.configure(cfg.log.level, cfg.log.format)

    trace = os.environ.get("ETRND_SOAK_TRACEMALLOC") == "1"
    first: list[Any] = []
    if trace:
        import tracemalloc
        tracemalloc.start(8)

    async def main() -> int:
        def dump() -> None:
            if trace:  # where the memory grew since the first dump, for leak hunting
                snap = tracemalloc.take_snapshot()
                if first:
                    top = snap.compare_to(first[0], "traceback")[:8]
                    Path(task_file + ".malloc").write_text(
                        "\n\n".join(f"{d.size_diff} B, {d.count_diff} blocks\n"
                                      + "\n".join(d.traceback.format()) for d in top))
                else:
                    first.append(snap)
            Path(task_file).write_text(str(len(asyncio.all_tasks())))
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump)
        return await Daemon(Path(config), cfg).run()

    return asyncio.run(main())


def _proc(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {k: v for k, _, v in (ln.partition(":") for ln in status)}
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "hwm_kb": int(fields["VmHWM"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields["Threads"])}


def _tasks(pid: int, task_file: Path) -> int:
    task_file.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not task_file.exists() or not task_file.read_text():
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.01)
    return int(task_file.read_text())


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def soak(cycles: int, max_seconds: float, seed: int, workdir: Path,
         hold: float) -> dict[str, Any]:
    import random

    from pyroute2 import IPRoute

    rng = random.Random(seed)

    workdir.mkdir(parents=True, exist_ok=True)
    sock, config = workdir / "control.sock", workdir / "etrnd.yaml"
    task_file, log_path = workdir / "tasks", workdir / "daemon.log"
    with linked("s", ISP_ADDR, OFFICE_ADDR) as pair:
        isp, office, isp_if, office_if = pair.isp, pair.office, pair.isp_if, pair.office_if
        isp.ip("link", "set", isp_if, "up")
        adversary = isp.popen(sys.executable, "-m", "tests.support.adversary", "--listen",
                              f"{ISP_ADDR}:25", "--mode", "random", "--seed", str(seed),
                              cwd=ROOT, stdout=subprocess.PIPE)
        assert adversary.stdout is not None
        assert adversary.stdout.readline().startswith(b"ready")
        config.write_text(
            f"watch: {{interfaces: [{office_if}], up_when: carrier, settle: 0s, "
            "min_interval: 0s, down_hold: 0s}\n"
            f"relays:\n  - {{name: isp, host: {ISP_ADDR}, tls: none, helo: office.test,"
            " timeout: 1s, etrn: ['@example.test', '#q']}\n"
            "retry: {first_delay: 50ms, max_delay: 200ms, give_up_after: 0}\n"
            f"control: {{socket: {sock}}}\nlog: {{level: info, format: json}}\n")
        with log_path.open("wb") as log:
            daemon = office.popen(sys.executable, str(Path(__file__).resolve()), "--daemon",
                                  str(config), str(task_file), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=log)
        pid = daemon.pid

        def status() -> dict[str, Any]:
            return request(sock, {"cmd": "status"}, timeout=5)

        def ready() -> bool:
            try:
                return status()["ok"] is True
            except ControlError:
                return False

        assert _wait(ready, 20), "daemon did not start"
        ipr = IPRoute(netns=office.name, flags=0)
        index = ipr.link_lookup(ifname=office_if)[0]

        def cycle() -> bool:
            """Up, wait for the round; down, wait for the daemon to see it. False: missed."""
            before = status()["rounds_started"]
            ipr.link("set", index=index, state="up")
            started = _wait(lambda: status()["rounds_started"] > before, 5)
            # Up for a random while, so sessions get cut at every step of the conversation.
            time.sleep(rng.uniform(0, 2 * hold))
            ipr.link("set", index=index, state="down")
            _wait(lambda: not status()["link"]["up"], 5)
            return started

        def snapshot() -> dict[str, Any]:
            time.sleep(1.5)  # let cancelled sessions finish their QUIT (<= 0.5 s) first
            return {**_proc(pid), "tasks": _tasks(pid, task_file),
                    "rounds_started": status()["rounds_started"]}

        warmup = min(50, cycles)
        for _ in range(warmup):
            cycle()
        start = snapshot()
        t0, done, missed = time.monotonic(), 0, 0
        while done < cycles - warmup and time.monotonic() - t0 < max_seconds:
            missed += not cycle()
            done += 1
            if done % 1000 == 0:
                print(f"{done + warmup} cycles, {time.monotonic() - t0:.0f}s, "
                      f"rss {_proc(pid)['rss_kb']} KiB", flush=True)
        elapsed = time.monotonic() - t0
        end = snapshot()
        alive = daemon.poll() is None
        ipr.close()
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(10)
        adversary.send_signal(signal.SIGTERM)
        out, _ = adversary.communicate(timeout=10)
    text = log_path.read_text(errors="replace")
    events: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                name = json.loads(line).get("event", "?")
            except ValueError:
                continue
            events[name] = events.get(name, 0) + 1
        elif line.strip():
            events["<non-json line>"] = events.get("<non-json line>", 0) + 1
    return {
        "cycles": done + warmup, "measured_cycles": done, "seconds": round(elapsed, 1),
        "start": start, "end": end,
        "rounds_started_measured": end["rounds_started"] - start["rounds_started"],
        "rounds_expected_measured": done, "cycles_without_round": missed,
        "daemon_alive_at_end": alive, "daemon_exit": rc,
        "tracebacks": text.count("Traceback"),
        "crash_events": {k: events.get(k, 0) for k in CRASH_EVENTS},
        "adversary": out.decode().strip(),
        "events": dict(sorted(events.items())),
    }


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--daemon":
        return _daemon(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--max-seconds", type=float, default=900.0,
                   help="stop cycling after this long even if --cycles is not reached")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--hold-ms", type=float, default=10.0,
                   help="mean time the link stays up after the round started")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(f"/tmp/etrnd-soak-{os.getpid()}")
    result = soak(args.cycles, args.max_seconds, args.seed, workdir, args.hold_ms / 1000)
    print(json.dumps(result, indent=2))
    s, e = result["start"], result["end"]
    print(f"\ncycles {result['cycles']} in {result['seconds']}s (+warm-up); "
          f"RSS {s['rss_kb']} -> {e['rss_kb']} KiB, fds {s['fds']} -> {e['fds']}, "
          f"tasks {s['tasks']} -> {e['tasks']}; rounds {result['rounds_started_measured']} "
          f"of {result['rounds_expected_measured']} expected; tracebacks "
          f"{result['tracebacks']}, crash events {sum(result['crash_events'].values())}")
    ok = (result["daemon_alive_at_end"] and result["tracebacks"] == 0
          and not any(result["crash_events"].values())
          and result["rounds_started_measured"] == result["rounds_expected_measured"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
