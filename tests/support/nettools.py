"""Test helpers: network namespaces and veth pairs that are always removed."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A short name unique to this process and call; interface names fit IFNAMSIZ (15)."""
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"[:15]


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*cmd), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.name, *args, check=check)

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.cmd(*cmd), **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def netns(prefix: str = "etn") -> Iterator[Netns]:
    """Create a namespace with loopback up; kill what we started in it and delete it."""
    ns = Netns(unique(prefix))
    sh("ip", "netns", "add", ns.name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        for proc in ns.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        sh("ip", "netns", "del", ns.name, check=False)


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair with one end in each namespace (the pair dies with either namespace)."""
    sh("ip", "link", "add", a_name, "netns", a.name, "type", "veth",
       "peer", "name", b_name, "netns", b.name)


def uplink(office: Netns, name: str, mine: str, isp: Netns, theirs: str, metric: str) -> None:
    """A WAN `name` in `office` joined to `isp` (a veth, both ends up, /24 addresses) with a
    default route through it at `metric`: one line of a multi-homed office."""
    peer = unique("up")
    veth(office, name, isp, peer)
    office.ip("addr", "add", f"{mine}/24", "dev", name)
    isp.ip("addr", "add", f"{theirs}/24", "dev", peer)
    for ns, dev in ((office, name), (isp, peer)):
        ns.ip("link", "set", dev, "up")
    office.ip("route", "add", "default", "via", theirs, "dev", name, "metric", metric)


CLONE_NEWNET = 0x40000000


def enter(ns: Netns) -> None:
    """Move the calling thread into `ns` (setns(2) is per thread: the process's other threads,
    and the sockets they open, stay where they are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class Linked:
    """Two namespaces joined by a veth pair: the ISP side and the office side (the WAN)."""

    isp: Netns
    office: Netns
    isp_if: str
    office_if: str


@contextlib.contextmanager
def linked(prefix: str = "e", isp_addr: str | None = None, office_addr: str | None = None,
           prefix_len: int = 24) -> Iterator[Linked]:
    """Both namespaces, the veth pair between them and (optionally) an address at each end;
    links are left down, since when each comes up is what the caller is testing."""
    with netns(f"{prefix}isp") as isp, netns(f"{prefix}ofc") as office:
        pair = Linked(isp, office, unique(f"{prefix}i"), unique(f"{prefix}o"))
        veth(isp, pair.isp_if, office, pair.office_if)
        if isp_addr is not None:
            isp.ip("addr", "add", f"{isp_addr}/{prefix_len}", "dev", pair.isp_if)
        if office_addr is not None:
            office.ip("addr", "add", f"{office_addr}/{prefix_len}", "dev", pair.office_if)
        yield pair
