"""Test helper: `etrnd run` as a subprocess (optionally in a namespace), read through its log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.nettools import Netns

ROOT = Path(__file__).resolve().parents[2]
# SIGTERM -> exit takes 0.1-0.5 s on an idle machine (bench/loop_lag.py; the product's
# budget is 1 s); a loaded CI box stretches interpreter teardown. A broken stop waits for a
# relay's timeout (5 s here) or a backoff (30 s), so this bound still tells them apart.
STOP_WITHIN = 3.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `predicate` returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """A running `etrnd run -c CONFIG`, its JSON log in a file, stopped by PID at the end."""

    def __init__(self, config: Path, log: Path, ns: Netns | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        cmd = [sys.executable, "-m", "etrnd", "run", "-c", str(config)]
        if ns is not None:
            cmd = ns.cmd(*cmd)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
        self.ns = ns

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        text = self.log_path.read_text(errors="replace")
        # The daemon may be writing a line right now: only complete lines are events.
        for line in text[:text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def wait_event(self, name: str, count: int = 1, timeout: float = 10,
                   where: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"etrnd exited with {self.proc.returncode}:\n{self.text()}")
            matching = [e for e in self.events(name) if where(e)]
            return matching[count - 1] if len(matching) >= count else None

        result: dict[str, Any] = wait_for(check, timeout, f"{count}x {name} in the log")
        return result

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "etrnd", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)

    def status(self) -> dict[str, Any]:
        res = self.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        result: dict[str, Any] = json.loads(res.stdout)
        return result

    def stop(self, timeout: float = 5) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._log.close()
        return code, time.monotonic() - start


@contextmanager
def running(config: Path, log: Path, ns: Netns | None = None,
            env: dict[str, str] | None = None) -> Iterator[Daemon]:
    daemon = Daemon(config, log, ns, env)
    try:
        daemon.wait_event("daemon_ready")
        yield daemon
    finally:
        daemon.stop()


class ScriptServer:
    """tests/etrn_server.py as a subprocess; `etrns()` lists what it received."""

    def __init__(self, ns: Netns | None, port: int, *replies: str) -> None:
        cmd = [sys.executable, "-m", "tests.support.etrn_server", "127.0.0.1", str(port), *replies]
        self.proc = subprocess.Popen(ns.cmd(*cmd) if ns else cmd, stdout=subprocess.PIPE,
                                     cwd=ROOT, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "READY"
        self._lines: list[str] = []
        import threading

        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.strip())

    def etrns(self) -> list[tuple[str, str, float]]:
        out = []
        for line in list(self._lines):
            _, arg, code, stamp = line.split(" ")
            out.append((arg, code, float(stamp)))
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
