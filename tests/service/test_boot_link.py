"""A WAN that comes up after start: the first ETRN must not wait a second for an ARP probe.

The gateway of the field: static address and default route on the WAN, no carrier when etrnd
starts, the name server behind the WAN, no `helo:` (so etrnd looks the machine's FQDN up).
A DNS query sent while the carrier is down leaves the next hop's ARP entry INCOMPLETE; the
first SYN after the line comes back then waits in that entry's queue for the kernel's next
probe (net.ipv4.neigh.*.retrans_time_ms, 1 s): the ETRN reached the ISP ~1 s after link_up.
etrnd now sends nothing into a down WAN, so the entry is fresh and the SYN leaves at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.daemonproc import ROOT, wait_for
from tests.support.nettools import is_root, linked

pytestmark = [pytest.mark.root, pytest.mark.skipif(not is_root(), reason="needs root")]

ISP, OFFICE, RESOLVER = "198.51.100.1", "198.51.100.2", "203.0.113.53"
# Far below the kernel's 1 s ARP retransmission, far above a loaded CI box's few ms.
WITHOUT_ARP_WAIT = 0.5


def _events(log: Path, name: str) -> list[dict[str, object]]:
    text = log.read_text(errors="replace")
    lines = text[:text.rfind("\n") + 1].splitlines()
    return [e for e in map(json.loads, (x for x in lines if x.startswith("{")))
            if e.get("event") == name]


@pytest.mark.parametrize("run", range(3))
def test_first_etrn_after_a_late_carrier_does_not_wait_for_arp(tmp_path: Path, run: int) -> None:
    tmp_path.chmod(0o755)
    with linked("bt", isp_addr=ISP) as net:
        isp, office = net.isp, net.office
        isp.ip("addr", "add", f"{RESOLVER}/32", "dev", "lo")  # nothing listens: port closed
        # The office's WAN is configured (static), but the ISP's end is down: no carrier.
        office.ip("link", "set", net.office_if, "up")
        office.ip("addr", "add", f"{OFFICE}/24", "dev", net.office_if)
        office.ip("route", "add", "default", "via", ISP)
        server = isp.popen(sys.executable, "-u", "-m", "etrnd.demo", "--serve", f"{ISP}:25",
                           stdout=subprocess.PIPE, cwd=ROOT)
        assert server.stdout is not None
        assert server.stdout.readline().startswith(b"READY")
        (tmp_path / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
        (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
        config = tmp_path / "etrnd.yaml"
        config.write_text(
            f"watch: {{interfaces: [{net.office_if}], up_when: default-route, settle: 0s,"
            " min_interval: 0s, down_hold: 0s}\n"
            f"relays: [{{name: isp, host: {ISP}, tls: none, etrn: ['@example.org'],"
            " timeout: 10s}]\n"
            f"control: {{socket: {tmp_path}/control.sock}}\n"
            "log: {level: info, format: json}\n")
        log = tmp_path / "etrnd.log"
        # Its own mount and UTS namespaces: the resolver and the short host name are the
        # test's, the host's /etc stays untouched.
        script = (f"mount --bind {tmp_path}/resolv.conf /etc/resolv.conf && "
                  f"mount --bind {tmp_path}/hosts /etc/hosts && hostname gw && "
                  f"exec {sys.executable} -m etrnd run -c {config}")
        with open(log, "wb") as out:
            daemon = office.popen("unshare", "-mu", "sh", "-c", script, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_for(lambda: _events(log, "daemon_ready"), 20, "daemon_ready")
            assert _events(log, "link_down"), log.read_text()
            # What etrnd sent into the down WAN: nothing, so no ARP entry is waiting.
            neigh = office.ip("neigh", "show", "dev", net.office_if).stdout
            assert "INCOMPLETE" not in neigh, neigh
            isp.ip("link", "set", net.isp_if, "up")  # the line comes back
            line = server.stdout.readline().decode()
            assert line.startswith("ETRN @example.org"), line
            arrived = float(line.split()[-1])  # the server's CLOCK_MONOTONIC at the ETRN
            up = wait_for(lambda: _events(log, "link_up"), 5, "link_up")[0]
            # link_up's wall-clock time against now: the ETRN arrived right after it.
            assert isinstance(up["timestamp"], str)
            logged = time.time() - (time.monotonic() - arrived)
            up_at = datetime.fromisoformat(up["timestamp"].replace("Z", "+00:00")).timestamp()
            print(f"link_up -> ETRN at the ISP: {(logged - up_at) * 1000:.1f} ms")  # -s shows it
            assert logged - up_at < WITHOUT_ARP_WAIT, (logged - up_at, log.read_text())
        finally:
            daemon.terminate()
            daemon.wait(10)
