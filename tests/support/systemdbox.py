"""Test helper: Debian's systemd as PID 1 in systemd-nspawn, inside a test network namespace."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemonproc import wait_for
from tests.support.nettools import sh, unique

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools() -> list[str]:
    """The host commands booting a container needs that are not installed."""
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "mount")
            if shutil.which(t) is None]


@contextlib.contextmanager
def overlay(lower: Path, work: Path) -> Iterator[Path]:
    """`lower` (a cached root, never written) with a writable layer in `work`, mounted.

    Unlike nspawn --volatile=overlay it survives a reboot of the container; it is unmounted
    and its upper layer left to `work`'s owner (a pytest tmp dir) at the end. Raises OSError
    when this kernel or file system cannot mount it.
    """
    upper, scratch, merged = work / "upper", work / "work", work / "root"
    for d in (upper, scratch, merged):
        d.mkdir(parents=True)
    mounted = sh("mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lower},upperdir={upper},workdir={scratch}", str(merged), check=False)
    if mounted.returncode != 0:
        raise OSError(f"cannot mount an overlay file system: {mounted.stderr.strip()}")
    try:
        yield merged
    finally:
        sh("umount", "-l", str(merged), check=False)


@dataclass
class Machine:
    """A booted container: `run` executes a shell command inside, as root."""

    nspawn: subprocess.Popen[bytes]
    leader: int
    started: float  # time.monotonic() when nspawn was spawned
    log: Path

    def argv(self, script: str, env: Sequence[str] = ()) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
                "HOME=/root", "LANG=C.UTF-8", *env, "sh", "-c", script]

    def run(self, script: str, *, check: bool = True, timeout: float = 120,
            env: Sequence[str] = (), cwd: str = "/") -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(f"cd {cwd} && {script}", env), capture_output=True,
                             text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            journal = subprocess.run(self.argv("journalctl --no-pager -b -n 40 -o short-monotonic"),
                                     capture_output=True, text=True, timeout=60, check=False)
            raise AssertionError(f"in the container: {script!r} exited {res.returncode}\n"
                                 f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                                 f"journal:\n{journal.stdout}")
        return res

    def out(self, script: str, **kw: object) -> str:
        return self.run(script, **kw).stdout.strip()  # type: ignore[arg-type]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show UNIT -p ...` as a dict."""
        text = self.out(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _systemd_child_of(pid: int) -> int | None:
    """nspawn's child once it is the container's systemd (before that it is nspawn itself)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and comm == "systemd":
            return int(stat.parent.name)
    return None


@contextlib.contextmanager
def booted(root: Path, netns: str, binds: dict[str, str], log: Path) -> Iterator[Machine]:
    """Boot `root` with systemd as PID 1 in network namespace `netns`; binds are read-only.

    Yields once `systemctl is-system-running` says the boot finished; stops it with SIGTERM
    to the nspawn process (its own PID, never by name) and waits for it.
    """
    cmd = ["systemd-nspawn", "-b", "-D", str(root), "--register=no", "--keep-unit",
           "--console=passive", "-M", unique("etrnd-sd"),
           f"--network-namespace-path=/run/netns/{netns}",
           *(f"--bind-ro={src}:{dst}" for src, dst in binds.items())]
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def leader() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')[-2000:]}")
            return _systemd_child_of(proc.pid)
        box = Machine(proc, wait_for(leader, 60, "the container's PID 1"), started, log)

        def up() -> bool:
            # Nothing (nsenter too early) or "offline" until PID 1 listens; then --wait
            # blocks until the boot is done.
            state = box.out("systemctl is-system-running --wait", check=False)
            assert state not in ("maintenance", "stopping"), state
            return state in ("running", "degraded")
        wait_for(up, 120, "the container's boot to finish")
        yield box
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


__all__ = ["Machine", "booted", "missing_tools", "overlay"]
