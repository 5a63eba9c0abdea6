"""Real WAN clients for link tests: dnsmasq (DHCPv4), dhcpcd, dhclient, udhcpc, radvd.

Every process runs inside the test's namespaces, by PID, and is stopped at the end. The DHCP
clients also run in a private mount and UTS namespace (`unshare -mu`) with a file of the
test's bind-mounted over /etc/resolv.conf and tmpfs over their state directories: their
scripts rewrite resolv.conf and may set the host name, which must never reach the host.
Lifetimes are made short by configuration (lease 2 min, T1 3 s, T2 6 s; router lifetime
6 s), and probing that proves nothing in a lab whose addresses are the test's own is off
(dhcpcd's ARP probe, IPv6 DAD), so the real-world waits stay short without sleeping.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemonproc import wait_for
from tests.support.nettools import Netns

ISP_GW = "198.51.100.1"      # the ISP end of the WAN, the lease's router
ISP_GW2 = "198.51.100.2"     # a second router on the same link, for a gateway change
POOL = ("198.51.100.50", "198.51.100.59")
RA_PREFIX = "2001:db8:18::"
T1, T2 = 3, 6                # dhcp-option 58/59: renew and rebind times (s), by default
ROUTER_LIFETIME = 6          # radvd AdvDefaultLifetime (s); its shortest sane value here


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Dnsmasq:
    """dnsmasq as the ISP's DHCPv4 server on one interface; its log is read for ACKs."""

    def __init__(self, ns: Netns, iface: str, tmp: Path, router: str = ISP_GW,
                 t1: int = T1, t2: int = T2) -> None:
        self.ns, self.iface, self.tmp, self.t1, self.t2 = ns, iface, tmp, t1, t2
        self.log = tmp / f"dnsmasq-{iface}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start(router)

    def start(self, router: str = ISP_GW) -> None:
        """(Re)start serving, with `router` as option 3; the lease file is kept."""
        self.stop()
        self.proc = self.ns.popen(
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={self.iface}", "--bind-interfaces", "--user=root", "--group=root",
            f"--dhcp-range={POOL[0]},{POOL[1]},255.255.255.0,2m", "--dhcp-authoritative",
            f"--dhcp-option=3,{router}", "--dhcp-option=6", f"--dhcp-option=58,{self.t1}",
            f"--dhcp-option=59,{self.t2}", "--no-ping", "--log-dhcp",
            f"--log-facility={self.log}", f"--dhcp-leasefile={self.tmp / 'dnsmasq.leases'}",
            f"--pid-file={self.tmp / 'dnsmasq.pid'}", stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def acks(self) -> int:
        """DHCPACKs sent so far (the first lease, then one per renewal or rebind)."""
        if not self.log.exists():
            return 0
        return len(re.findall(r"DHCPACK\(", self.log.read_text(errors="replace")))


CLIENTS = ("dhcpcd", "dhclient", "udhcpc")


@dataclass
class Client:
    """One DHCPv4 client on the office end of the WAN."""

    kind: str
    ns: Netns
    iface: str
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None

    def _private(self, *cmd: str) -> list[str]:
        # A private mount + UTS namespace: resolv.conf, state dirs and the host name are the
        # test's. `ip netns exec` already unshares mounts, but shares the host's files.
        resolv = self.tmp / "resolv.conf"
        resolv.touch()
        state = " ".join(f"mount -t tmpfs none {d} &&" for d in
                         ("/var/lib/dhcpcd", "/run/dhcpcd", "/var/lib/dhcp", "/run/udhcpc")
                         if Path(d).is_dir())
        script = f"mount --bind {resolv} /etc/resolv.conf && {state} exec \"$@\""
        return ["unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, "sh", *cmd]

    def argv(self) -> list[str]:
        if self.kind == "dhcpcd":
            # -B foreground, -4 DHCPv4 only, -K no carrier watching of its own. --noarp:
            # no ARP probe of the offered address (~6 s before dhcpcd binds it): the lab's
            # addresses are the test's own, nothing else can hold one.
            return ["dhcpcd", "-B", "-4", "-K", "-d", "-f", "/dev/null", "--noarp",
                    "--noipv4ll", "-o", "routers", self.iface]
        if self.kind == "dhclient":
            return ["dhclient", "-d", "-4", "-v", "-lf", str(self.tmp / "dhclient.leases"),
                    "-pf", str(self.tmp / "dhclient.pid"), self.iface]
        return ["udhcpc", "-f", "-i", self.iface, "-s", "/etc/udhcpc/default.script",
                "-t", "10", "-T", "1"]

    def start(self) -> None:
        out = open(self.tmp / f"{self.kind}.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = self.ns.popen(*self._private(*self.argv()), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def renew(self) -> None:
        """Renew now where the client would wait long: busybox udhcpc ignores T1 (option
        58) and renews at half the lease (60 s); SIGUSR1 is its own "renew now"."""
        if self.kind == "udhcpc":
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)

    def release(self) -> None:
        """Give the lease back as the client does on a clean `release`."""
        assert self.proc is not None
        if self.kind == "dhcpcd":
            # `dhcpcd -k` asks the running one over its control socket, which lives in the
            # client's private /run/dhcpcd: enter its mount namespace (SIGHUP is a rebind).
            self.ns.run("nsenter", "-t", str(self.proc.pid), "-m", "dhcpcd", "-k", "-4",
                        self.iface, timeout=20)
            self.proc.wait(10)
        elif self.kind == "udhcpc":
            self.proc.send_signal(signal.SIGUSR2)  # release, keep running unconfigured
        else:
            self.ns.run(*self._private("dhclient", "-r", "-4", "-lf",
                                       str(self.tmp / "dhclient.leases"), "-pf",
                                       str(self.tmp / "dhclient.pid"), self.iface), timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL if self.kind == "dhclient" else signal.SIGTERM)


class Radvd:
    """radvd advertising RA_PREFIX and a short router lifetime on the ISP end."""

    def __init__(self, ns: Netns, iface: str, tmp: Path,
                 lifetime: int = ROUTER_LIFETIME) -> None:
        self.ns, self.iface, self.tmp = ns, iface, tmp
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.conf = tmp / f"radvd-{iface}.conf"
        # radvd: MaxRtrAdvInterval >= 4, MinRtrAdvInterval <= 0.75 * Max, and the router
        # lifetime at least MaxRtrAdvInterval: an RA every 3-4 s refreshes a 6 s lifetime.
        self.conf.write_text(
            f"interface {iface} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n"
            f"  MaxRtrAdvInterval 4;\n  AdvDefaultLifetime {lifetime};\n"
            f"  prefix {RA_PREFIX}/64 {{ AdvOnLink on; AdvAutonomous on; }};\n}};\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.tmp / "radvd.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = self.ns.popen("radvd", "-n", "-m", "stderr", "-C", str(self.conf),
                                  "-p", str(self.tmp / "radvd.pid"), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)
        self.proc = None


def ra_route_expiry(ns: Netns, iface: str) -> float | None:
    """time.monotonic() at which the kernel's RA default route through `iface` expires,
    from RTA_CACHEINFO (10 ms ticks), or None when there is no such route."""
    out = ns.run(sys.executable, "-c", _EXPIRES, iface, check=False).stdout.split()
    return None if not out else time.monotonic() + int(out[0]) / 100


# Reads rta_expires with the kernel's own answer (ip prints whole seconds only).
_EXPIRES = """
import socket, sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname=sys.argv[1])[0]
    for m in ipr.get_routes(family=socket.AF_INET6, oif=idx):
        ci = m.get('RTA_CACHEINFO')
        if m['dst_len'] == 0 and ci and ci['rta_expires'] > 0:
            print(ci['rta_expires'])
"""


def default_route(ns: Netns, family: str = "-4") -> str:
    return ns.ip(family, "route", "show", "default").stdout.strip()


@contextlib.contextmanager
def stopping(*procs: Client | Dnsmasq) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def wait_default_route(ns: Netns, timeout: float, family: str = "-4") -> str:
    return str(wait_for(lambda: default_route(ns, family), timeout, f"a {family} default route"))
