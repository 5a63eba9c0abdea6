"""Debian's Prometheus server and promtool, unpacked once (cached) and run in a test's namespace.

`python -m tests.support.promlab` unpacks them ahead of time (scripts/test.sh does, as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.nettools import Netns

CACHE = Path(os.environ.get("ETRND_TEST_CACHE", "/var/cache/etrnd-tests"))
# Debian 12's package: a Go binary that needs nothing else to run. `apt-get download` +
# `dpkg -x` get it without installing it (no prometheus user, no service started).
PACKAGE = "prometheus"
UNPACKED = CACHE / "prometheus-deb"
PORT = 9090  # inside the test's own namespace, so it cannot clash with anything


def _apt_download(into: Path) -> Path:
    def download() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", "-q", PACKAGE], cwd=into, text=True,
                              capture_output=True, check=False, timeout=300)

    got = download()
    if got.returncode != 0:  # a bare machine may not have the package lists yet
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        got = download()
    if got.returncode != 0:
        raise RuntimeError(f"apt-get download {PACKAGE} failed: {got.stderr.strip()}")
    debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} left no .deb in {into}")
    return debs[-1]


def unpacked() -> Path:
    """usr/bin of Debian's prometheus package, unpacked under the test cache (once, locked)."""
    bin_dir = UNPACKED / "usr" / "bin"
    if (bin_dir / "promtool").is_file():
        return bin_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "prometheus-deb.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be unpacking it right now
        if (bin_dir / "promtool").is_file():
            return bin_dir
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user downloads into it (else a warning)
            deb = _apt_download(Path(tmp))
            staging = Path(tmp) / "root"
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True, timeout=120)
            staging.rename(UNPACKED)
    return bin_dir


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` in a text exposition (any label order), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def promtool(*args: str, stdin: str | None = None,
             ns: Netns | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(unpacked() / "promtool"), *args]
    return subprocess.run(ns.cmd(*cmd) if ns is not None else cmd, input=stdin, text=True,
                          capture_output=True, check=False, timeout=60)


@dataclass
class Prometheus:
    """A running Prometheus in `ns`, answering PromQL through its HTTP API."""

    ns: Netns
    url: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query (promtool, i.e. GET /api/v1/query); the result vector."""
        res = promtool("query", "instant", "-o", "json", self.url, expr, ns=self.ns)
        if res.returncode != 0:
            raise AssertionError(f"query {expr!r} failed: {res.stderr.strip()}")
        result: list[dict[str, Any]] = json.loads(res.stdout)
        return result

    def value(self, expr: str) -> float | None:
        """The single sample `expr` yields, or None while it yields none."""
        vector = self.query(expr)
        assert len(vector) <= 1, f"{expr!r} gave {len(vector)} series: {vector}"
        return float(vector[0]["value"][1]) if vector else None

    def wait_value(self, expr: str, timeout: float = 30) -> float:
        """Wait until `expr` yields a sample (the scrape came, the condition holds)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expr)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {expr!r}; "
                    f"up: {self.query('up')}\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)


@contextlib.contextmanager
def prometheus(ns: Netns, workdir: Path, config: str) -> Iterator[Prometheus]:
    """Prometheus with `config` (prometheus.yml text) in `ns`, on 127.0.0.1:PORT; stopped by PID."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    check = promtool("check", "config", str(workdir / "prometheus.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = ns.popen(str(unpacked() / "prometheus"),
                        f"--config.file={workdir / 'prometheus.yml'}",
                        f"--storage.tsdb.path={workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{PORT}",
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.monotonic() + 30
        # 2.42's promtool has no `check ready`: a query answers once the server is ready.
        while promtool("query", "instant", url, "vector(1)", ns=ns).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prometheus(ns, url, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


if __name__ == "__main__":
    print(f"== Prometheus for the tests: {unpacked().parent.parent}", file=sys.stderr)
