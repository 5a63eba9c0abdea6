"""Test helper: the ODMR lab: real Exim provider at the ISP, real Postfix at the office, a WAN."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.exim import PASSWORD, USER, Exim, exim_provider
from tests.support.nettools import Netns, linked
from tests.support.postfix import Postfix, own_directory, postfix, wait_until

ROOT = Path(__file__).resolve().parents[2]
ISP_ADDR = "198.51.100.1"
OFFICE_ADDR = "198.51.100.2"
ASKED = ("example.test", "example.net")  # what the office asks for with ATRN
NOT_ASKED = "third.example"  # queued at the provider for this customer, never asked for
EMPTY = "empty.example.test"  # the customer may ask for it; nothing is ever queued for it
CUSTOMER_DOMAINS = (*ASKED, EMPTY, NOT_ASKED)  # what the provider lets this customer ATRN
NOBODY = 65534  # owner of the office mailboxes (Postfix's virtual(8) refuses uids < 100)


@dataclass
class OfficeMTA:
    """A private Postfix on the office's 127.0.0.1:25 delivering every domain to one maildir."""

    postfix: Postfix
    maildir: Path

    def received(self) -> list[str]:
        """Recipients of the messages delivered into the mailbox (Delivered-To, one per file)."""
        new = self.maildir / "new"
        found = []
        for path in sorted(new.iterdir()) if new.exists() else []:
            for line in path.read_text(errors="replace").splitlines():
                if line.lower().startswith("delivered-to:"):
                    found.append(line.split(":", 1)[1].strip())
                    break
        return sorted(found)

    def count(self) -> int:
        return len(self.received())

    def wait_count(self, expected: int, timeout: float = 60) -> None:
        """Postfix says 250 at end of DATA and delivers a moment later: wait for the files."""
        wait_until(lambda: self.count() >= expected, timeout,
                   f"{expected} messages in the office mailbox (have {self.count()})")

    def defer(self, *recipients: str) -> None:
        """Answer `451 4.3.0` to RCPT TO for `recipients` from now on (none: accept all)."""
        table = "".join(f"{r} 451 4.3.0 office says try later\n" for r in recipients)
        (self.postfix.config_dir / "defer").write_text(table)
        self.postfix.command("/usr/sbin/postfix", "-c", str(self.postfix.config_dir), "reload")


@dataclass
class OdmrLab:
    """ISP namespace with Exim (ODMR on 366), office namespace with Postfix, a veth WAN."""

    isp: Netns
    office: Netns
    isp_if: str
    office_if: str
    exim: Exim
    mta: OfficeMTA
    workdir: Path

    def set_wan(self, up: bool) -> None:
        self.office.ip("link", "set", self.office_if, "up" if up else "down")

    def queue_mail(self, per_domain: int, domains: Sequence[str] = ASKED,
                   not_asked: int = 0) -> list[str]:
        """Queue `per_domain` messages for each of `domains` (interleaved) and `not_asked` for
        NOT_ASKED; returns the recipients etrnd should bring home, sorted."""
        wanted = [f"user{n}@{d}" for n in range(per_domain) for d in domains]
        others = [f"other{n}@{NOT_ASKED}" for n in range(not_asked)]
        self.exim.enqueue(wanted + others)
        return sorted(wanted)

    def config(self, name: str = "etrnd.yaml", *, domains: Sequence[str] = ASKED,
               password: str = PASSWORD, timeout: str = "10s", port: int = 366,
               host: str = ISP_ADDR,
               retry: str = "{first_delay: 200ms, max_delay: 1s, give_up_after: 5s}",
               extra: str = "", relay_extra: str = "") -> Path:
        """An etrnd config for the office: one ODMR relay at the provider (port 366 and AUTH
        CRAM-MD5 by default: no TLS in the lab, so nothing else may carry the password)."""
        secret = self.workdir / f"{name}.secret"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        port_line = f"    port: {port}\n" if port != 366 else ""  # 366: odmr's default
        path = self.workdir / name
        path.write_text(
            "relays:\n"
            f"  - name: isp\n    host: {host}\n    protocol: odmr\n{port_line}"
            "    tls: none\n    helo: office.example.test\n"
            f"    auth: {{username: {USER}, password_file: {secret}}}\n"
            f"    timeout: {timeout}\n    etrn: {json.dumps(list(domains))}\n"
            f"    deliver_to: 127.0.0.1:25\n{relay_extra}"
            f"retry: {retry}\n"
            f"control: {{socket: {self.workdir / (name + '.sock')}}}\n"
            f"log: {{level: debug, format: json}}\n{extra}")
        return path

    def etrnd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`python -m etrnd ARGS` inside the office namespace."""
        return subprocess.run(self.office.cmd(sys.executable, "-m", "etrnd", *args),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)

    def fetchmail(self, domains: Sequence[str] = ASKED, password: str = PASSWORD,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """One `fetchmail --protocol ODMR` poll from the office (own HOME, rc file, pidfile)."""
        home = self.workdir / "fetchmail"
        home.mkdir(exist_ok=True)
        rc = home / "fetchmailrc"
        rc.write_text(f"poll {ISP_ADDR} proto odmr port 366 user {USER} password {password} "
                      f"fetchdomains {','.join(domains)} smtphost 127.0.0.1\n")
        rc.chmod(0o600)
        env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
        return subprocess.run(
            self.office.cmd("fetchmail", "-f", str(rc), "--pidfile", str(home / "pid"),
                            "--nodetach", "--nosyslog", "-v"),
            capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _office_postfix(ns: Netns, root: Path,
                    domains: Sequence[str]) -> contextlib.AbstractContextManager[Postfix]:
    root = own_directory(root)  # Postfix's daemons must reach it whatever pytest does
    maildir = root / "mail"
    maildir.mkdir(parents=True, exist_ok=True)
    os.chown(maildir, NOBODY, NOBODY)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "defer").write_text("")
    return postfix(ns, root, address="127.0.0.1", settings={
        "myhostname": "office.example.test", "mydomain": "example.test",
        "smtpd_banner": "$myhostname ESMTP",
        "virtual_mailbox_domains": " ".join(domains),
        "virtual_mailbox_base": str(maildir), "virtual_mailbox_maps": "static:box/",
        "virtual_uid_maps": f"static:{NOBODY}", "virtual_gid_maps": f"static:{NOBODY}",
        "smtpd_recipient_restrictions":
            f"check_recipient_access texthash:{root / 'etc' / 'defer'}",
        # Local delivery must never wait for a retry timer of its own.
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
        # The big-message tests send 60 MB (Postfix's default limit is 10240000 octets).
        "message_size_limit": "100000000", "virtual_mailbox_limit": "0",
    })


@contextlib.contextmanager
def odmr_lab(workdir: Path, *, wan_up: bool = False, retry_interval: str = "5s",
             command_timeout: str = "30s") -> Iterator[OdmrLab]:
    """The whole lab, WAN down unless `wan_up`; every namespace and process is removed."""
    with linked("o", ISP_ADDR, OFFICE_ADDR, 24) as pair:
        # A connect over a link without carrier fails at once instead of waiting for ARP.
        pair.isp.run("sysctl", "-qw",
                     f"net.ipv4.conf.{pair.isp_if}.ignore_routes_with_linkdown=1")
        pair.isp.ip("link", "set", pair.isp_if, "up")
        if wan_up:
            pair.office.ip("link", "set", pair.office_if, "up")
        with exim_provider(pair.isp, workdir / "exim", address=ISP_ADDR,
                           domains=CUSTOMER_DOMAINS, retry_interval=retry_interval,
                           command_timeout=command_timeout) as exim, \
                _office_postfix(pair.office, workdir / "office", CUSTOMER_DOMAINS) as mta:
            yield OdmrLab(pair.isp, pair.office, pair.isp_if, pair.office_if, exim,
                          OfficeMTA(mta, workdir / "office" / "mail" / "box"), workdir)


__all__ = ["ASKED", "EMPTY", "ISP_ADDR", "NOT_ASKED", "OFFICE_ADDR", "OdmrLab", "OfficeMTA",
           "odmr_lab"]
