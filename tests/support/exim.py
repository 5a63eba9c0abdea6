"""Test helper: a real Exim 4.100 ODMR provider (RFC 2645) from a cached Debian sid root."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.nettools import Netns
from tests.support.postfix import wait_until
from tests.support.rootfs import cached_root

HERE = Path(__file__).resolve().parent
CONF = "/etc/exim4/odmr.conf"  # inside the chroot
PACKAGES = ("exim4-daemon-heavy",)
USER, PASSWORD = "odmruser", "odmrpass"


def exim_root() -> Path:
    """The cached sid root holding exim4-daemon-heavy (built once, ~45 s; read-only to us)."""
    return cached_root("sid", install=PACKAGES)


@dataclass
class Exim:
    """A running Exim daemon (ports 25 and 366) in the ISP namespace, chrooted into a
    read-only bind mount of the cached root, with this test's own config (`conf`, on
    /etc/exim4) and spool (`spool`, with the logs, on /var/spool/exim4) bound over it.

    The mounts live in the mount namespace that `ip netns exec` gives the daemon, so they
    vanish with it and the shared root is never written; commands reach the daemon's view
    through `nsenter -m -t PID`. (Binds, not overlayfs: they work on any file system.)
    """

    ns: Netns
    address: str
    spool: Path
    view: Path
    proc: subprocess.Popen[bytes]

    def exim(self, *args: str, stdin: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `exim4 -C CONF ARGS` inside the daemon's chroot (as root, like the daemon)."""
        cmd = ["nsenter", "-t", str(self.proc.pid), "-m", "-n",
               "chroot", str(self.view), "/usr/sbin/exim4", "-C", CONF, *args]
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                             check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"exim4 {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stdout}{res.stderr}")
        return res

    def enqueue(self, recipients: Sequence[str], sender: str = "sender@isp.test") -> None:
        """Queue one message per recipient (batched SMTP on stdin, queue only: no delivery)."""
        batch = []
        for n, rcpt in enumerate(recipients):
            batch.append(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
                         f"From: {sender}\r\nTo: {rcpt}\r\nSubject: odmr test {n}\r\n\r\n"
                         f"message {n} for {rcpt}\r\n.\r\n")
        before = self.queue_count()
        self.exim("-odq", "-bS", stdin="".join(batch) + "QUIT\r\n")
        assert self.queue_count() == before + len(recipients), self.log()[-2000:]

    def enqueue_message(self, rcpt: str, message: str, sender: str = "sender@isp.test",
                        timeout: float = 120) -> None:
        """Queue one message given whole (header, blank line, body; CRLF line ends)."""
        stuffed = "".join("." + line if line.startswith(".") else line
                          for line in message.splitlines(keepends=True))
        before = self.queue_count()
        cmd = ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "chroot", str(self.view),
               "/usr/sbin/exim4", "-C", CONF, "-odq", "-bS"]
        subprocess.run(cmd, input=f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
                       f"{stuffed}.\r\nQUIT\r\n", capture_output=True, text=True,
                       timeout=timeout, check=True)
        assert self.queue_count() == before + 1, self.log()[-2000:]

    def queue_count(self) -> int:
        """`exim -bpc`: messages still in the provider's queue."""
        return int(self.exim("-bpc").stdout.strip())

    def queued_recipients(self) -> list[str]:
        """Undelivered recipients of every queued message, from `exim -bp`."""
        out = self.exim("-bp").stdout
        # -bp: a header line per message, then one indented line per undelivered recipient
        return sorted(line.strip() for line in out.splitlines()
                      if line.startswith(" ") and " " not in line.strip() and "@" in line)

    def log(self) -> str:
        path = self.spool / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delivered(self) -> list[str]:
        """Recipients Exim logged as delivered (`=>` lines) to the ODMR customer."""
        return re.findall(r" => (\S+) .*R=to_odmr_customer", self.log())


def _render(address: str, domains: Sequence[str], retry_interval: str,
            command_timeout: str) -> str:
    text = (HERE / "exim-odmr.conf").read_text()
    values = {"ADDRESS": address, "DOMAINS": ":".join(domains), "FIRST_DOMAIN": domains[0],
              "RETRY_INTERVAL": retry_interval, "COMMAND_TIMEOUT": command_timeout,
              "USER": USER, "PASSWORD": PASSWORD}
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _exim_ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "Debian-exim":
            return int(fields[2]), int(fields[3])
    raise RuntimeError(f"no Debian-exim user in {root}/etc/passwd")


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (Exim forks one per connection and delivery)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def exim_provider(ns: Netns, workdir: Path, *, address: str,
                  domains: Sequence[str] = ("example.test",), retry_interval: str = "5s",
                  command_timeout: str = "30s") -> Iterator[Exim]:
    """Start Exim in `ns` listening on `address` ports 25 and 366; always stopped on exit.

    `domains` are the ones the ODMR customer (odmruser/odmrpass) may ask for with ATRN;
    anything else asked for gets `450 ATRN request refused`. Raises RuntimeError when the
    sid root cannot be built or Exim does not start.
    """
    root = exim_root()
    conf, spool, view = workdir / "conf", workdir / "spool", workdir / "root"
    for directory in (conf, spool / "log", view):
        directory.mkdir(parents=True, exist_ok=True)
    uid, gid = _exim_ids(root)
    for directory in (spool, spool / "log"):
        os.chown(directory, uid, gid)
    (conf / Path(CONF).name).write_text(_render(address, domains, retry_interval,
                                                command_timeout))
    start = " && ".join([
        f"mount --bind {root} {view}", f"mount -o remount,bind,ro {view}",
        f"mount --bind {conf} {view}{Path(CONF).parent}",
        f"mount --bind {spool} {view}/var/spool/exim4",
        f"exec chroot {view} /usr/sbin/exim4 -C {CONF} -oP /var/spool/exim4/exim.pid "
        "-bdf -oX 25:366"])
    err = workdir / "exim.stderr"
    with err.open("wb") as stderr:
        proc = ns.popen("sh", "-c", start, stdin=subprocess.DEVNULL, stdout=stderr,
                        stderr=stderr)
    instance = Exim(ns, address, spool, view, proc)
    try:
        wait_until(lambda: proc.poll() is not None or "daemon started" in instance.log(), 30,
                   "exim to start")
        if proc.poll() is not None:
            raise RuntimeError(f"exim exited {proc.returncode}: "
                               f"{err.read_text(errors='replace')}{instance.log()}")
        yield instance
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon and every process it forked (by PID: only what we started)."""
    pids = [proc.pid, *_descendants(proc.pid)] if proc.poll() is None else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for pid in pids[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


__all__ = ["PASSWORD", "USER", "Exim", "exim_provider", "exim_root"]
