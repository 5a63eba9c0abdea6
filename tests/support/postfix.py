"""Test helper: a private Postfix "ISP" and a counting SMTP receiver "office" in namespaces."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.nettools import Netns, linked, sh

ROOT = Path(__file__).resolve().parents[2]
ISP_ADDR = "198.51.100.1"
OFFICE_ADDR = "198.51.100.2"
PREFIX_LEN = 24
POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin") or "/usr/sbin/postfix"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail with `what` at the deadline (no sleep-and-hope)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Postfix:
    """A running private Postfix instance: its own config, queue, data and log under `root`."""

    ns: Netns
    root: Path
    address: str

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "postfix.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def command(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Postfix commands fail silently until their logging is up; `script` shows why.
        line = " ".join(["ip", "netns", "exec", self.ns.name, *cmd])
        res = subprocess.run(["script", "-qec", line, "/dev/null"], capture_output=True,
                             text=True, timeout=60, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"{line} failed ({res.returncode}): {res.stdout}{res.stderr}\n"
                               f"{self.log()[-2000:]}")
        return res

    def enqueue(self, count: int, recipient: str, sender: str = "sender@isp.test") -> None:
        """Submit `count` messages through this instance's own sendmail (no SMTP needed)."""
        for n in range(count):
            message = f"From: {sender}\nTo: {recipient}\nSubject: test {n}\n\nmessage {n}\n"
            subprocess.run(
                [*self.ns.cmd("/usr/sbin/sendmail", "-C", str(self.config_dir), "-f", sender,
                              recipient)],
                input=message, text=True, check=True, capture_output=True, timeout=30)

    def queue(self) -> list[dict[str, object]]:
        """The queue as `postqueue -j` reports it, one dict per message."""
        # Inside the namespace: postqueue checks that inet_interfaces exist where it runs.
        res = self.ns.run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def deferred(self) -> int:
        return sum(1 for m in self.queue() if m.get("queue_name") == "deferred")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _main_cf(root: Path, address: str, relay_domains: tuple[str, ...],
             transport: dict[str, str], settings: dict[str, str]) -> str:
    values = {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "maillog_file": str(root / "log" / "postfix.log"),
        "maillog_file_prefixes": str(root / "log"),
        "myhostname": "isp.test", "mydomain": "isp.test", "myorigin": "isp.test",
        "mydestination": "", "alias_maps": "", "alias_database": "",
        "inet_interfaces": address, "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8", "relay_domains": " ".join(relay_domains),
        "transport_maps": "inline:{ " + ", ".join(f"{d}={t}" for d, t in transport.items())
                          + " }" if transport else "",
        "smtp_dns_support_level": "disabled", "smtpd_peername_lookup": "no",
        # The ISP must never retry on its own: any delivery in the test is ETRN's doing.
        "queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
        "smtpd_banner": "$myhostname ESMTP",
    }
    values.update(settings)
    return "".join(f"{k} = {v}\n" for k, v in values.items())


@contextlib.contextmanager
def postfix(ns: Netns, root: Path, *, address: str, relay_domains: tuple[str, ...] = (),
            transport: dict[str, str] | None = None,
            settings: dict[str, str] | None = None) -> Iterator[Postfix]:
    """Start a private Postfix in `ns` listening on `address`; always stopped on exit.

    `relay_domains` are accepted and (by default) flushed on ETRN; `transport` maps a domain
    to a next hop such as `smtp:[198.51.100.2]:25`; `settings` override any main.cf value.
    """
    root = own_directory(root)
    fresh = not (root / "queue").exists()
    _configure(root, address, relay_domains, transport or {}, settings or {})
    if fresh:
        _copy_checked_queue(root / "queue")
    instance = Postfix(ns, root, address)
    try:
        instance.command(POSTFIX, "-c", str(instance.config_dir), "start")
        yield instance
    finally:
        _stop(instance)


def _configure(root: Path, address: str, relay_domains: tuple[str, ...],
               transport: dict[str, str], settings: dict[str, str]) -> None:
    """An instance's own main.cf and master.cf, data and log directories under `root`."""
    for sub in ("etc", "data", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _let_postfix_through(root)
    shutil.chown(root / "data", "postfix")
    shutil.copy("/etc/postfix/master.cf", root / "etc" / "master.cf")
    main_cf = root / "etc" / "main.cf"
    main_cf.write_text(_main_cf(root, address, relay_domains, transport, settings))
    # Postfix rereads a main.cf changed less than 2 s ago every 0.3 s until it "cools down"
    # (dict_load_file: it may still be being edited), 1.5-2 s of every start. Ours is
    # written and closed: dated a minute back, it is read once.
    an_old_time = time.time() - 60
    os.utime(main_cf, (an_old_time, an_old_time))
    sh("postconf", "-c", str(root / "etc"), "-F", "*/*/chroot = n")


@functools.cache
def _checked_queue() -> Path:
    """A queue directory tree made and passed by a real `postfix check`, once per process.

    That check is ~0.25 s of a `postfix start` on a new queue (postfix-script check-fatal:
    post-install create-missing makes the directories with their owners and modes, postsuper
    scans them; check-warn verifies owners and modes); a start without it takes ~0.05 s.
    Each instance gets a copy of this tree (see _copy_checked_queue) and skips only a check
    already passed on an identical one. The template is configured like every instance (same
    master.cf, a main.cf of the same shape) but carries only its queue into them. Removed at
    exit.
    Raises RuntimeError, with Postfix's words, if the check fails.
    """
    root = Path(tempfile.mkdtemp(prefix="etrnd-postfix-queue-"))
    atexit.register(shutil.rmtree, root, True)
    root.chmod(0o711)
    _configure(root, "127.0.0.1", (), {}, {})
    (root / "queue").mkdir()  # the postfix command enters it before it runs the check
    # No namespace needed: the check opens no socket. `script`: Postfix's reason on failure.
    line = f"{POSTFIX} -c {root / 'etc'} check"
    res = subprocess.run(["script", "-qec", line, "/dev/null"], capture_output=True,
                         text=True, timeout=60, check=False)
    if res.returncode != 0:
        log = root / "log" / "postfix.log"
        raise RuntimeError(f"{line} failed ({res.returncode}): {res.stdout}{res.stderr}\n"
                           f"{log.read_text(errors='replace') if log.exists() else ''}")
    return root / "queue"


def _copy_checked_queue(queue: Path) -> None:
    """Copy the checked tree to `queue` (owners, groups, setgid modes as the check left
    them) and touch quick-start, which tells postfix-script to skip its checks once."""
    sh("cp", "-a", "--", str(_checked_queue()), str(queue))
    (queue / "quick-start").touch()


def _let_postfix_through(root: Path) -> None:
    """Add search (o+x, not read) permission on the path down to `root` for user postfix.

    pytest's tmp_path sits under 0700 directories, which Postfix's unprivileged daemons
    could not enter; o+x lets them reach their own directories without listing anything.
    """
    for directory in (root, *root.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def own_directory(root: Path) -> Path:
    """Where Postfix's files really go: `root` becomes a symbolic link to a new directory
    outside pytest's basetemp. The o+x that _let_postfix_through adds there does not last on
    a shared machine: any other pytest session that starts resets pytest-of-root to 0700,
    and Postfix then fails with "open lock file .../master.lock: Permission denied".
    Callers that put files for Postfix under `root` first call this themselves and use the
    path it returns (an existing directory is used as it is)."""
    if root.exists():
        return root.resolve()
    real = Path(tempfile.mkdtemp(prefix="etrnd-postfix-"))
    real.chmod(0o711)
    atexit.register(shutil.rmtree, real, True)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(real, target_is_directory=True)
    return real


def _stop(instance: Postfix) -> None:
    """Stop the instance as `postfix stop` does (SIGTERM to the master, which passes it to
    its process group), and return once the master and every process of its group exited.

    Not `postfix stop` itself: it polls in 1 s sleeps, and /proc/PID of the master, which is
    not our child, outlives its exit until PID 1 reaps it (1.4-1.9 s here). A pidfd reports
    the exit itself; SIGKILL for what is left after 10 s.
    """
    pid = instance.master_pid()
    master = _open_master(pid) if pid is not None else None
    if pid is None or master is None:
        # Nothing of ours to signal (a stale pid file names no master): Postfix says so.
        instance.command(POSTFIX, "-c", str(instance.config_dir), "stop", check=False)
        return
    try:
        signal.pidfd_send_signal(master, signal.SIGTERM)
        if not _wait_group_gone(pid, 10):
            for member in _group(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)  # Postfix's own, by PID
            _wait_group_gone(pid, 5)
    finally:
        os.close(master)


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state, process group) of `pid` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = text.partition(" (")[2].rpartition(")")
    fields = rest.split()
    return name, fields[0], int(fields[2])


def _open_master(pid: int) -> int | None:
    """A pidfd for `pid` if it is a Postfix master (named master, leader of its own process
    group) that has not exited, else None: a stale pid file must not make us signal a
    stranger that reused the number."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    stat_ = _stat(pid)
    if stat_ is None or stat_[0] != "master" or stat_[1] == "Z" or stat_[2] != pid:
        os.close(fd)
        return None
    return fd


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that have not exited (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat_ = _stat(int(entry.name))
            if stat_ is not None and stat_[2] == pgid and stat_[1] != "Z":
                members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process of group `pgid` is left; False at the deadline (seconds)."""
    deadline = time.monotonic() + timeout
    while members := _group(pgid):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        fds = []
        for member in members:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(member))
        try:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            # Any exit wakes us; the next scan sees what is left (and any late child).
            poller.poll(min(left, 0.5) * 1000)
        finally:
            for fd in fds:
                os.close(fd)
    return True


@dataclass
class Receiver:
    """An aiosmtpd server in a namespace that stores every message it accepts as a file."""

    maildir: Path
    address: str
    port: int

    def count(self) -> int:
        return sum(1 for p in self.maildir.iterdir() if p.suffix == ".eml")

    def wait_count(self, expected: int, timeout: float = 30) -> None:
        wait_until(lambda: self.count() >= expected, timeout,
                   f"{expected} messages at the receiver (have {self.count()})")


@contextlib.contextmanager
def receiver(ns: Netns, root: Path, address: str, port: int = 25) -> Iterator[Receiver]:
    """Run the receiver in `ns` (stopped by the namespace's own cleanup, and here)."""
    root.mkdir(parents=True, exist_ok=True)
    proc = ns.popen(sys.executable, "-m", "tests.support.postfix", "receive", address, str(port),
                    str(root), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (root / "ready").exists() or proc.poll() is not None, 20,
                   "the receiver to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"receiver died: {proc.stderr.read() if proc.stderr else ''!r}")
        yield Receiver(root, address, port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


@dataclass
class IspOffice:
    """Two namespaces joined by a veth pair: Postfix at the ISP, a receiver at the office."""

    isp: Netns
    office: Netns
    isp_if: str
    office_if: str
    postfix: Postfix
    receiver: Receiver
    domain: str

    def set_office_link(self, up: bool) -> None:
        self.office.ip("link", "set", self.office_if, "up" if up else "down")

    def etrnd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m etrnd ARGS` inside the office namespace."""
        return subprocess.run(self.office.cmd(sys.executable, "-m", "etrnd", *args),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)

    def write_config(self, path: Path, etrn: tuple[str, ...] | None = None,
                     extra: str = "") -> Path:
        """An etrnd config for the office side that points at the ISP's Postfix."""
        args = etrn or (f"@{self.domain}",)
        path.write_text(
            "relays:\n"
            f"  - name: isp\n    host: {ISP_ADDR}\n    helo: office.{self.domain}\n"
            f"    timeout: 10s\n    etrn: {json.dumps(list(args))}\n"
            "retry: {first_delay: 200ms, max_delay: 1s, give_up_after: 5s}\n"
            f"log: {{level: debug, format: json}}\n{extra}")
        return path


@contextlib.contextmanager
def isp_and_office(root: Path, domain: str = "example.test", *,
                   office_link_up: bool = True,
                   settings: dict[str, str] | None = None) -> Iterator[IspOffice]:
    """ISP namespace with Postfix relaying `domain` to the office; office namespace receiving.

    With `office_link_up=False` the office end of the link starts down: the ISP then cannot
    deliver (its connect fails at once) until set_office_link(True). `settings` override
    main.cf values of the ISP's Postfix.
    """
    with linked("e", ISP_ADDR, OFFICE_ADDR, PREFIX_LEN) as pair:
        isp, office, isp_if, office_if = pair.isp, pair.office, pair.isp_if, pair.office_if
        # Without this a connect over a link without carrier waits ~3 s for ARP.
        isp.run("sysctl", "-qw", f"net.ipv4.conf.{isp_if}.ignore_routes_with_linkdown=1")
        # Lets the receiver listen while its link is still down.
        office.run("sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1")
        isp.ip("link", "set", isp_if, "up")
        if office_link_up:
            office.ip("link", "set", office_if, "up")
        with postfix(isp, root / "isp", address=ISP_ADDR, relay_domains=(domain,),
                     transport={domain: f"smtp:[{OFFICE_ADDR}]:25"},
                     settings=settings) as mta, \
                receiver(office, root / "office", OFFICE_ADDR) as rcv:
            yield IspOffice(isp, office, isp_if, office_if, mta, rcv, domain)


def _receive(address: str, port: int, maildir: Path) -> None:
    """Entry point of the receiver process: accept everything, one file per message."""
    import asyncio
    import itertools

    from aiosmtpd.smtp import SMTP, Envelope, Session

    counter = itertools.count()

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session,
                              envelope: Envelope) -> str:
            n = next(counter)
            tmp = maildir / f".{n}.tmp"
            content = envelope.content or b""
            tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
            tmp.rename(maildir / f"{n}.eml")  # atomic: the test never counts half a message
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Handler(), hostname="office.test"),
                                          address, port)
        (maildir / "ready").touch()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "receive":
        _receive(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit("usage: python -m tests.support.postfix receive ADDRESS PORT DIR")
