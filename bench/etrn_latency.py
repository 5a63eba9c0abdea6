"""Benchmark: WAN link-up -> ETRN received at the ISP, etrnd vs. a dispatcher-style script.

Run as root:  .venv/bin/python bench/etrn_latency.py [--flaps 50] [--idle 60]
                  [--log-level info] [--no-dispatchers]

Two namespaces joined by a veth pair: the "office" runs the contender, the "isp" runs the
toy ETRN server (`python -m etrnd.demo --serve`), which prints the CLOCK_MONOTONIC time each
ETRN arrives. This process sets the WAN admin up through netlink in the office namespace
(as pppd does with ppp0), stamping the time just before. The floor and etrnd each get such a
lab of their own and run at the same time, flapped in turn (the order alternating), so a busy
moment of a shared machine hurts both alike; the dispatchers follow, one after the other, in
the floor's lab. (Flapping the *peer* end
instead changes the carrier, which the kernel reports through linkwatch, rate-limited to
about one event a second: flaps faster than that are never seen by anyone.) Contenders:

- etrnd: `etrnd run`, settle 0, min_interval 0, watching the WAN with up_when: carrier;
- dispatcher + etrnd send: what an ip-up / networkd-dispatcher hook does: a netlink watcher
  (`ip monitor link`) that spawns `etrnd send` on each link-up;
- dispatcher + smtplib: the same watcher spawning the smallest possible one-shot client
  (`python3 -S -c` with smtplib), a lower bound for any spawn-per-event design;
- floor: bench/floor.py, a bare prototype (pyroute2 link events + one aiosmtplib session,
  nothing else): etrnd's overhead is measured against it in the same run.

Also: start -> READY=1 time (etrnd, with its StateDirectory= as systemd gives it: the first
start without a cached config apart, and the floor), `etrnd send` on its own (the first one,
without a cached config, apart), and idle RSS and wake-ups (context switches) over --idle s.
Only namespaces this script creates are touched; they are removed at the end.
"""

from __future__ import annotations

import argparse
import compileall
import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pyroute2 import IPRoute

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.nettools import Netns, enter, linked  # noqa: E402

ISP, OFFICE, PORT = "198.51.100.1", "198.51.100.2", 25

WATCHER = r"""
import subprocess, sys
iface, cmd = sys.argv[1], sys.argv[2:]
up = False
mon = subprocess.Popen(["ip", "-o", "monitor", "link"], stdout=subprocess.PIPE, text=True)
print("READY", flush=True)
for line in mon.stdout:
    if f" {iface}@" not in line and f" {iface}:" not in line:
        continue
    flags = line[line.index("<") + 1:line.index(">")].split(",") if "<" in line else []
    now_up = "UP" in flags and "LOWER_UP" in flags
    if now_up and not up:
        subprocess.Popen(cmd)
    up = now_up
"""

ONESHOT = (
    "import smtplib,sys; s=smtplib.SMTP(sys.argv[1], int(sys.argv[2]), "
    "local_hostname='office.example.test', timeout=5); s.ehlo(); "
    "s.docmd('ETRN', '@example.test'); s.quit()"
)




_readers: dict[int, queue.Queue[str]] = {}


def read_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The next stdout line, or None at the deadline. A reader thread per process, since
    select() on a buffered pipe misses lines that an earlier readline() already buffered."""
    lines = _readers.get(proc.pid)
    if lines is None:
        lines = _readers[proc.pid] = queue.Queue()
        stream = proc.stdout
        assert stream is not None
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in stream],
                         daemon=True).start()
    try:
        return lines.get(timeout=timeout) if timeout > 0 else lines.get_nowait()
    except queue.Empty:
        return None


@contextmanager
def lab(prefix: str) -> Iterator[tuple[Netns, Netns, str, str]]:
    with linked(prefix, ISP, OFFICE) as pair:
        isp, office, isp_if, wan = pair.isp, pair.office, pair.isp_if, pair.office_if
        isp.run("sysctl", "-qw", f"net.ipv4.conf.{isp_if}.ignore_routes_with_linkdown=1")
        office.run("sysctl", "-qw", f"net.ipv4.conf.{wan}.ignore_routes_with_linkdown=1")
        office.ip("link", "set", wan, "up")
        isp.ip("link", "set", isp_if, "up")
        yield isp, office, isp_if, wan


def write_config(tmp: Path, wan: str, fmt: str = "json", level: str = "warning") -> Path:
    config = tmp / "etrnd.yaml"
    config.write_text(
        f"watch: {{interfaces: [{wan}], up_when: carrier, settle: 0s, min_interval: 0s,"
        " down_hold: 0s}\n"
        f"relays:\n  - {{name: isp, host: {ISP}, port: {PORT}, tls: none, timeout: 5s,\n"
        "      helo: office.example.test, etrn: ['@example.test']}\n"
        "retry: {first_delay: 1s, max_delay: 1s, give_up_after: 5s}\n"
        f"control: {{socket: {tmp / 'control.sock'}}}\n"
        f"log: {{level: {level}, format: {fmt}}}\n")
    return config


class KernelStamps:
    """Stamps each RTM_NEWLINK that says the WAN is up, on a raw socket of its own (in a
    Python thread, so the stamp can be late by a GIL switch and the column is approximate): tells
    the kernel's share (the link-up request itself takes ~1 ms here) from the contender's."""

    def __init__(self, index: int) -> None:
        self.stamps: list[float] = []
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self._sock.bind((0, 1))  # RTMGRP_LINK
        self._index = index
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            data = self._sock.recv(1 << 16)
            now = time.monotonic()
            # nlmsghdr (16 bytes), then ifinfomsg: family, pad, type, index, flags, change.
            index, flags = struct.unpack_from("iI", data, 16 + 4)
            if index == self._index and flags & 0x1 and flags & 0x10000:  # IFF_UP, LOWER_UP
                self.stamps.append(now)

    def first_after(self, t0: float) -> float:
        # The stamping thread may not have run yet on a busy machine: wait for it, briefly.
        deadline = time.monotonic() + 2.0
        while not any(t >= t0 for t in self.stamps) and time.monotonic() < deadline:
            time.sleep(0.001)
        return min((t for t in self.stamps if t >= t0), default=float("nan"))


class Lane:
    """One contender's lab: its ISP server, its WAN, and this process's netlink sockets in
    its office namespace (flapping and stamping happen there)."""

    def __init__(self, isp: Netns, office: Netns, wan: str) -> None:
        self.isp, self.office, self.wan = isp, office, wan
        self.server = isp.popen(sys.executable, "-m", "etrnd.demo", "--serve", f"{ISP}:{PORT}",
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert read_line(self.server, 10) == "READY"  # type: ignore[arg-type]
        enter(office)  # the sockets below stay in this namespace
        self.ipr = IPRoute()
        self.index = self.ipr.link_lookup(ifname=wan)[0]
        self.kernel = KernelStamps(self.index)
        self.latencies: list[float] = []
        self.from_event: list[float] = []

    def flap(self) -> None:
        """WAN down, WAN up (stamped), wait for the ETRN at the server."""
        self.ipr.link("set", index=self.index, state="down")
        time.sleep(0.15)  # let the contender see the down and finish any session
        while read_line(self.server, 0) is not None:  # type: ignore[arg-type]
            pass
        t0 = time.monotonic()
        self.ipr.link("set", index=self.index, state="up")
        line = read_line(self.server, 5.0)  # type: ignore[arg-type]
        if line is None:
            raise RuntimeError("no ETRN within 5 s of link-up")
        received = float(line.split()[-1])
        self.latencies.append((received - t0) * 1000)
        self.from_event.append((received - self.kernel.first_after(t0)) * 1000)
        time.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(name: str, values: list[float]) -> str:
    values = [v for v in values if v == v]  # a kernel stamp that never came is NaN
    return (f"{name:<28} n={len(values):<3} median {statistics.median(values):8.2f} ms  "
            f"p99 {pct(values, 99):8.2f} ms  min {min(values):7.2f}  max {max(values):8.2f}")


def ready_time(office: Netns, cmd: list[str], tmp: Path, runs: int,
               env: dict[str, str] | None = None) -> list[float]:
    """Seconds from spawning `cmd` (`etrnd run`, the floor) to its READY=1 datagram."""
    times = []
    for _ in range(runs):
        path = Path(tempfile.mktemp(prefix="notify", dir=tmp))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(10)
        t0 = time.monotonic()
        proc = subprocess.Popen(office.cmd(*cmd),
                                env={**os.environ, **(env or {}), "NOTIFY_SOCKET": str(path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        while b"READY=1" not in sock.recv(4096):
            pass
        times.append(time.monotonic() - t0)
        proc.terminate()
        proc.wait(5)
        sock.close()
    return times


def send_time(office: Netns, config: Path, runs: int, cache: Path) -> list[float]:
    """Seconds for `etrnd send` (an ip-up dispatcher's call) to finish one accepted round,
    keeping its validated config in `cache` (as $XDG_CACHE_HOME)."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        office.run("env", f"XDG_CACHE_HOME={cache}", sys.executable, "-m", "etrnd", "send",
                   "-c", str(config))
        times.append(time.monotonic() - t0)
    return times


def proc_stats(pid: int) -> tuple[int, int]:
    """(VmRSS kB, context switches of all threads): every switch is a wake-up or preemption."""
    rss = switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                switches += int(line.split()[1])
    return rss, switches


def loadavg() -> str:
    return "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start(lane: Lane, cmd: list[str], etrnd: bool,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = lane.office.popen(*cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=ROOT, env=env)
    if not etrnd:
        assert read_line(proc, 10) == "READY"  # type: ignore[arg-type]
    elif read_line(lane.server, 10) is None:  # type: ignore[arg-type]
        # The start-up round (link already up) tells us it is watching.
        raise RuntimeError("etrnd did not send its start-up ETRN")
    return proc  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flaps", type=int, default=50)
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement, seconds")
    parser.add_argument("--log-level", default="warning", choices=["info", "warning"],
                        help="etrnd's log.level (info: every event line is written)")
    parser.add_argument("--no-dispatchers", action="store_true",
                        help="skip the two spawn-per-event contenders")
    args = parser.parse_args()
    # An installed etrnd has its bytecode (pip compiles it); a checkout run with
    # PYTHONDONTWRITEBYTECODE would compile every module at each start instead.
    compileall.compile_dir(ROOT / "etrnd", quiet=1)
    with lab("b") as (isp_a, office_a, _, wan_a), lab("c") as (isp_b, office_b, _, wan_b), \
            tempfile.TemporaryDirectory() as tmpdir, ExitStack() as procs:
        tmp = Path(tmpdir)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        (tmp / "ready").mkdir(mode=0o700)
        # `etrnd send` keeps its validated config in $XDG_CACHE_HOME/etrnd (root's own when an
        # ip-up script runs it): here, not in the machine's /root/.cache.
        os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
        config_a = write_config(tmp / "a", wan_a, level=args.log_level)
        config_b = write_config(tmp / "b", wan_b, level=args.log_level)
        # The floor and etrnd each in a lab of their own, both running, flapped in turn
        # (etrnd first in odd flaps): a busy moment of the machine hurts both alike.
        floor, etrnd = Lane(isp_a, office_a, wan_a), Lane(isp_b, office_b, wan_b)
        print(f"{loadavg()} at start", flush=True)
        for lane, cmd, is_etrnd in (
                (floor, [sys.executable, str(ROOT / "bench" / "floor.py"), wan_a, ISP,
                         str(PORT)], False),
                (etrnd, [sys.executable, "-m", "etrnd", "run", "-c", str(config_b)], True)):
            # etrnd keeps its state file, as under systemd (StateDirectory=).
            env = {**os.environ, "STATE_DIRECTORY": str(tmp / "b")} if is_etrnd else None
            proc = start(lane, cmd, is_etrnd, env)
            procs.callback(proc.terminate)
        for i in range(args.flaps):
            for lane in (floor, etrnd) if i % 2 == 0 else (etrnd, floor):
                lane.flap()
        procs.close()
        for name, lane in (("floor (bench/floor.py)", floor), ("etrnd run", etrnd)):
            print(report(name, lane.latencies), flush=True)
            print(report("  from the kernel's event", lane.from_event), flush=True)
        print(f"etrnd / floor: median "
              f"{statistics.median(etrnd.latencies) / statistics.median(floor.latencies):.2f}x"
              f", p99 {pct(etrnd.latencies, 99) / pct(floor.latencies, 99):.2f}x; "
              f"{loadavg()}", flush=True)

        if not args.no_dispatchers:
            dispatchers = {
                "dispatcher + etrnd send": [
                    sys.executable, "-c", WATCHER, wan_a, sys.executable, "-m", "etrnd",
                    "send", "-c", str(config_a)],
                "dispatcher + smtplib": [
                    sys.executable, "-c", WATCHER, wan_a, sys.executable, "-S", "-c", ONESHOT,
                    ISP, str(PORT)],
            }
            for name, cmd in dispatchers.items():
                floor.latencies, floor.from_event = [], []
                with ExitStack() as stack:
                    stack.callback(start(floor, cmd, False).terminate)
                    for _ in range(args.flaps):
                        floor.flap()
                print(report(name, floor.latencies), flush=True)
                print(report("  from the kernel's event", floor.from_event), flush=True)

        starts = {
            "etrnd run": [sys.executable, "-m", "etrnd", "run", "-c", str(config_a)],
            "floor": [sys.executable, str(ROOT / "bench" / "floor.py"), wan_a, ISP, str(PORT)],
        }
        # etrnd starts as systemd starts it, with its StateDirectory= (the validated config is
        # kept there): the first start validates the file (cold), the others read the cache.
        state = {"STATE_DIRECTORY": str(tmp / "ready")}
        cold = ready_time(office_a, starts["etrnd run"], tmp, 1, state)[0]
        ready: dict[str, list[float]] = {name: [] for name in starts}
        for _ in range(5):  # interleaved, so a busy moment hurts both alike
            for name, cmd in starts.items():
                ready[name] += ready_time(office_a, cmd, tmp, 2,
                                          state if name == "etrnd run" else None)
        print(f"start -> READY=1 (etrnd run, first start: no cached config): "
              f"{cold * 1000:.0f} ms", flush=True)
        for name, times in ready.items():
            print(f"start -> READY=1 ({name}): median {statistics.median(times) * 1000:.0f} ms,"
                  f" max {max(times) * 1000:.0f} ms over {len(times)} starts", flush=True)
        ratio = statistics.median(ready["etrnd run"]) / statistics.median(ready["floor"])
        print(f"READY etrnd / floor: {ratio:.2f}x; {loadavg()}", flush=True)
        first = send_time(office_a, config_a, 1, tmp / "send-cache")[0]  # a cache of its own
        sends = send_time(office_a, config_a, 10, tmp / "send-cache")
        print(f"etrnd send, first (no cached config): {first * 1000:.0f} ms", flush=True)
        print(f"etrnd send (link up, one ETRN): median {statistics.median(sends) * 1000:.0f} ms,"
              f" max {max(sends) * 1000:.0f} ms over {len(sends)} runs; {loadavg()}",
              flush=True)

        if args.idle > 0:
            while read_line(floor.server, 0.2) is not None:  # `send`'s ETRNs, read or not
                pass
            proc = office_a.popen(sys.executable, "-m", "etrnd", "run", "-c", str(config_a),
                                  stderr=subprocess.DEVNULL, cwd=ROOT,
                                  env={**os.environ, "STATE_DIRECTORY": str(tmp / "a")})
            if read_line(floor.server, 10) is None:  # type: ignore[arg-type]
                raise RuntimeError("the idle etrnd did not send its start-up ETRN")
            time.sleep(2.0)  # its state file is written right after that round
            # `ip netns exec` execs python in place, so the Popen PID is the daemon's.
            rss0, sw0 = proc_stats(proc.pid)
            time.sleep(args.idle)
            rss1, sw1 = proc_stats(proc.pid)
            proc.terminate()
            proc.wait(5)
            print(f"idle {args.idle:g} s: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, "
                  f"{sw1 - sw0} context switches ({(sw1 - sw0) / args.idle:.2f}/s)", flush=True)
        floor.ipr.close()
        etrnd.ipr.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
