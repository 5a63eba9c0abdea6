"""The docs' gateway recipes, run as written under a real systemd (PID 1 in systemd-nspawn).

One container boots Debian's systemd in a network namespace whose `ppp0` is a veth to an "ISP"
namespace. There tests/isp_relay.py (aiosmtpd) answers as mail.isp.example: STARTTLS with a
test CA, AUTH, ETRN (250, and 459 for example.net). Inside the container the README's install
block runs line by line (the only adaptation: the package source is the wheel of this
checkout), then each test checks what an operator would, with systemctl and journalctl, and runs
the commands docs/deployment.md and docs/logs.md print for `etrnd send` and debug logs.
The tests share that one booted machine and run in file order; the last one reboots it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import docs
from tests.support.daemonproc import wait_for
from tests.support.nettools import Netns, netns, unique, veth
from tests.support.promlab import sample
from tests.support.rootfs import cached_root
from tests.support.systemdbox import Machine, booted, missing_tools, overlay

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
README = docs.read("README.md")
PACKAGES = ("systemd", "dbus", "python3", "python3-venv", "sudo", "ca-certificates", "jq")
ISP, WAN = "198.51.100.1", "198.51.100.2"
USR1 = "systemctl kill --kill-whom=main -s USR1 etrnd"
# Unique, so finding it anywhere in the journal can only mean it leaked.
PASSWORD = "pw-" + secrets.token_hex(12)
# Where the recipes this test runs are printed, besides the README's own sections.
IP_UP = "`etrnd send` from a shell or an ip-up script"  # docs/deployment.md
DEBUG_LOGS = "Debug logs: what was said on the wire"  # docs/logs.md


@dataclass
class Relay:
    """tests/isp_relay.py in the ISP namespace; `events` is what it printed, one dict a line."""

    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def etrns(self) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if "etrn" in e]

    def wait_etrns(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        return wait_for(lambda: len(self.etrns()) >= count and self.etrns(), timeout,
                        f"{count} ETRNs at the ISP (got {self.etrns()})")


@dataclass
class Gateway:
    box: Machine
    relay: Relay
    office: Netns
    root: Path
    binds: dict[str, str]
    log: Path
    timings: dict[str, float] = field(default_factory=dict)

    def status_text(self) -> str:
        return self.box.show("etrnd", "StatusText")["StatusText"]

    def wan(self, up: bool) -> None:
        if up:
            self.office.ip("link", "set", "ppp0", "up")
            self.office.ip("route", "replace", "default", "via", ISP, "dev", "ppp0")
        else:
            self.office.ip("link", "set", "ppp0", "down")

    def journal(self, args: str) -> list[dict[str, Any]]:
        out = self.box.out(f"journalctl --no-pager -o json {args}")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.journal(f"-b -u etrnd EVENT={name}")

    def main_pid(self) -> int:
        return int(self.box.show("etrnd", "MainPID")["MainPID"])


def _setup_files(tmp: Path) -> Path:
    import trustme

    setup = tmp / "setup"
    setup.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(setup / "etrnd-test-ca.crt"))
    ca.issue_cert("mail.isp.example").private_key_and_cert_chain_pem.write_to_path(
        str(tmp / "relay.pem"))
    (setup / "password").write_text(PASSWORD + "\n")
    (tmp / "relay-password").write_text(PASSWORD + "\n")
    # sudoedit runs $SUDO_EDITOR on a copy of the file: this "editor" types the password.
    editor = setup / "type-password"
    editor.write_text('#!/bin/sh\ncat /setup/password > "$1"\n')
    editor.chmod(0o755)
    # pip inside finds the wheels built here instead of an index (the container is offline).
    (setup / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    for p in setup.iterdir():
        p.chmod(p.stat().st_mode | 0o444)
    return setup


def _wheels(tmp: Path) -> Path:
    wheels = tmp / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                          "--wheel-dir", str(wheels), str(ROOT)],
                         capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot build etrnd and its dependencies as wheels: {res.stderr[-500:]}")
    return wheels


def install(box: Machine, wheel: str, timings: dict[str, float]) -> None:
    """The README's install block, line by line, as root in the container's /src checkout."""
    box.run("cp /setup/etrnd-test-ca.crt /usr/local/share/ca-certificates/ && "
            "update-ca-certificates && cp /setup/pip.conf /etc/pip.conf && "
            f"printf '{ISP} mail.isp.example\\n127.0.1.1 %s\\n' \"$(hostname)\" >> /etc/hosts")
    recipe = docs.commands("README.md", "Install on a gateway", "sudo python3 -m venv")
    assert recipe[-1] == "journalctl -u etrnd -f", recipe
    assert recipe[0].endswith("/pip install ."), recipe  # the unpacked source
    for line in recipe[:-1]:
        started = time.monotonic()
        if line.endswith("/pip install ."):  # offline here: this checkout's wheel instead
            line = line.removesuffix(".") + wheel
        box.run(line, cwd="/src", timeout=300, env=["SUDO_EDITOR=/setup/type-password"])
        timings[line] = time.monotonic() - started
    # `journalctl -u etrnd -f` follows: it must show the daemon's ready line, then we stop it.
    follow = subprocess.Popen(box.argv(recipe[-1]), stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        seen = []
        for line in follow.stdout:
            seen.append(line)
            if "daemon_ready" in line:
                break
        assert any("daemon_ready" in s for s in seen), seen
    finally:
        follow.terminate()
        follow.wait(10)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if missing := missing_tools():
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/test.sh installs them)")
    try:
        root = cached_root("bookworm", include=PACKAGES)
    except RuntimeError as exc:
        pytest.skip(f"no Debian root file system for systemd: {str(exc)[:300]}")
    tmp = tmp_path_factory.mktemp("systemd")
    tmp.chmod(0o755)
    setup, wheels = _setup_files(tmp), _wheels(tmp)
    wheel = "/wheels/" + next(wheels.glob("etrnd-*.whl")).name
    binds = {str(wheels): "/wheels", str(setup): "/setup", str(ROOT): "/src"}
    log = tmp / "nspawn.log"
    with contextlib.ExitStack() as stack:
        try:
            merged = stack.enter_context(overlay(root, tmp / "layer"))
        except OSError as exc:
            pytest.skip(str(exc))
        isp, office = stack.enter_context(netns("sdisp")), stack.enter_context(netns("sdgw"))
        isp_if = unique("sdi")
        veth(isp, isp_if, office, "ppp0")  # the example config watches ppp0
        isp.ip("addr", "add", f"{ISP}/24", "dev", isp_if)
        isp.ip("link", "set", isp_if, "up")
        office.ip("addr", "add", f"{WAN}/24", "dev", "ppp0")
        proc = isp.popen(sys.executable, "-m", "tests.support.isp_relay", ISP, "25",
                         str(tmp / "relay.pem"), "office", str(tmp / "relay-password"),
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        relay = Relay(proc)
        threading.Thread(target=relay.read, daemon=True).start()
        with booted(merged, office.name, binds, log) as box:
            gateway = Gateway(box, relay, office, merged, binds, log)
            gateway.timings["boot"] = time.monotonic() - box.started
            install(box, wheel, gateway.timings)
            yield gateway  # the last test reboots it: its own booted() stops that one


def test_recipe_starts_the_service_and_it_waits_for_the_link(gw: Gateway) -> None:
    assert gw.box.out("systemctl is-active etrnd") == "active"
    assert gw.box.out("systemctl is-enabled etrnd") == "enabled"
    assert gw.status_text().startswith("link down;"), gw.status_text()
    assert gw.relay.etrns() == []
    print("install timings:", {k[:40]: round(v, 2) for k, v in gw.timings.items()})


def test_check_config_from_a_shell_checks_the_credential_where_the_unit_loads_it(
        gw: Gateway) -> None:
    out = gw.box.out("sudo etrnd check-config")
    assert ("secret relays[isp].auth.password_file: credential 'isp': etrnd.service loads it "
            "from /etc/etrnd/isp.secret: readable, one line") in out
    # Without root it cannot read the source: a note, not a failure.
    res = gw.box.run("setpriv --reuid=65534 --regid=65534 --clear-groups etrnd check-config")
    assert "which this user cannot read (run check-config as root to check it)" in res.stdout
    # A unit that would not find the credential, or a missing source file, is a problem.
    res = gw.box.run("mv /etc/etrnd/isp.secret /etc/etrnd/isp.moved && etrnd check-config; "
                     "rc=$?; mv /etc/etrnd/isp.moved /etc/etrnd/isp.secret; exit $rc", check=False)
    assert res.returncode == 2, res
    assert ("relays[isp].auth.password_file: etrnd.service loads credential 'isp' from "
            "/etc/etrnd/isp.secret: cannot read: No such file or directory") in res.stderr


def test_check_config_knows_the_unit_makes_the_socket_directory(gw: Gateway) -> None:
    # Stopped, the unit's RuntimeDirectory=etrnd is gone: check-config asks systemd, learns
    # the unit makes it at start, and does not warn; a directory no unit makes is a warning.
    other = "sed 's|/run/etrnd/control.sock|/run/etrnd-nowhere/control.sock|' " \
            "/etc/etrnd/etrnd.yaml > /root/other.yaml && etrnd check-config -c /root/other.yaml"
    try:
        gw.box.run("systemctl stop etrnd && test ! -e /run/etrnd")
        res = gw.box.run("etrnd check-config")
        assert res.returncode == 0 and "control.socket" not in res.stderr, res
        res = gw.box.run(other)
        assert res.returncode == 0, res
        assert ("control.socket: directory /run/etrnd-nowhere does not exist: run fails to "
                "create the socket unless it is made first (a unit's "
                "RuntimeDirectory=etrnd-nowhere does; etrnd.service has RuntimeDirectory=etrnd)"
                ) in res.stderr, res.stderr
    finally:
        gw.box.run("systemctl start etrnd")
        wait_for(lambda: gw.status_text().startswith("link down;"), 30,
                 f"the restarted service to wait for the link (is {gw.status_text()!r})")


def test_wan_up_sends_etrn_with_auth_over_tls(gw: Gateway) -> None:
    gw.wan(up=True)
    etrns = gw.relay.wait_etrns(3)
    assert [(e["etrn"], e["code"]) for e in etrns] == [
        ("@example.org", 250), ("example.net", 459), ("#office-queue", 250)]
    assert all(e["tls"] and e["user"] == "office" for e in etrns), etrns
    assert {"auth": "office", "ok": True} in gw.relay.events
    wait_for(lambda: gw.status_text() == "link up; isp: 2/3 accepted", 30,
             f"StatusText to show the accepted round (is {gw.status_text()!r})")
    status = gw.box.out("sudo etrnd status")
    assert "link: UP" in status and "@example.org" in status, status
    assert json.loads(gw.box.out("etrnd status --json"))["relays"][0]["name"] == "isp"


def test_journal_fields_work_as_the_readme_shows(gw: Gateway) -> None:
    replies = gw.journal("-u etrnd RELAY=isp ETRN_CODE=250")
    assert {r["ETRN_ARG"] for r in replies} == {"@example.org", "#office-queue"}
    assert all(r["EVENT"] == "etrn_reply" and r["PRIORITY"] == "6" for r in replies), replies
    errors = gw.box.out("journalctl --no-pager -u etrnd -p err")
    assert re.search(r"etrn_refused .*arg=example\.net .*code=459", errors), errors
    only = gw.box.out("journalctl --no-pager -u etrnd EVENT=etrn_reply -o cat").splitlines()
    assert len(only) == 2 and all(line.startswith("etrn_reply ") for line in only), only
    # Every command of the README's Logs block runs and answers (-f: until its first line).
    for line in docs.commands("README.md", "Logs"):
        if line.endswith(" -f"):
            follow = subprocess.Popen(gw.box.argv(line), stdout=subprocess.PIPE, text=True)
            assert follow.stdout is not None and follow.stdout.readline()
            follow.terminate()
            follow.wait(10)
            continue
        out = gw.box.out(line.replace("journalctl", "journalctl --no-pager"))
        assert out and "-- No entries --" not in out, line
        if "jq" in line:
            assert '["@example.org","250"]' in out, out


def test_status_trigger_reload_block_runs(gw: Gateway) -> None:
    lines = docs.commands("README.md", "Status, trigger, reload")
    assert lines == ["etrnd status", "etrnd status --json", "etrnd trigger",
                     "systemctl reload etrnd"], lines
    sent, reloads = len(gw.relay.etrns()), len(gw.events("config_reloaded"))
    for line in lines:
        out = gw.box.out(line)
        assert out or line.startswith("systemctl"), line
    assert len(gw.relay.wait_etrns(sent + 3)) == sent + 3  # trigger: one more round
    wait_for(lambda: len(gw.events("config_reloaded")) == reloads + 1, 30, "config_reloaded")
    # The block's comment: a signal does the same as `etrnd trigger`. (`pidof etrnd`, which
    # it used to show, finds nothing: the process is python3 running a script.) Only to the
    # main process: plain `systemctl kill` also signals whatever else is in the cgroup, and
    # right after a reload that failed now and then ("auxiliary processes: Input/output error").
    assert f"(also: {USR1})" in README
    gw.box.run(USR1)
    assert len(gw.relay.wait_etrns(sent + 6)) == sent + 6


def test_hardening_is_real_and_nothing_complains(gw: Gateway) -> None:
    pid = gw.main_pid()
    status = dict(line.split(":\t", 1) for line in
                  gw.box.out(f"cat /proc/{pid}/status").splitlines() if ":\t" in line)
    uid = int(status["Uid"].split()[0])
    assert 61184 <= uid <= 65519, status["Uid"]  # systemd's DynamicUser= range
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    # The secret's source stays root-only; the service got its own copy through systemd.
    assert gw.box.out("stat -c '%u %a' /etc/etrnd/isp.secret") == "0 600"
    assert gw.box.out("stat -c '%u %a' /run/credentials/etrnd.service/isp") == f"{uid} 400"
    # Still sees link events (the round above started on one) with its unprivileged buffer.
    # Once per start (earlier tests in this module restart the service).
    starts = gw.events("daemon_start")
    assert len(gw.events("netlink_rcvbuf_limited")) == len(starts) >= 1
    warnings = gw.journal("-b -u etrnd -p warning")
    # On a busy machine the loop may really be held up: event_loop_stalled says so, rightly.
    complaints = {str(e.get("EVENT") or e.get("MESSAGE")) for e in warnings} - {
        "event_loop_stalled"}
    # The 459 for example.net is an error, and makes its round_done a warning; nothing else.
    assert complaints == {"etrn_refused", "round_done", "netlink_rcvbuf_limited"}, complaints
    assert all("example.net" in e["REFUSED"] for e in warnings if e["EVENT"] == "round_done")
    # StateDirectory= under DynamicUser: the state file is written (no state_file_failed
    # above), privately, and holds the relay's last success for the next start.
    assert gw.box.out("stat -c '%u %a' /var/lib/private/etrnd") == f"{uid} 700"
    state = json.loads(wait_for(lambda: gw.box.out("cat /var/lib/etrnd/state.json",
                                                   check=False), 30, "the state file"))
    assert state["relays"]["isp"]["last_success"]["text"].startswith("250 ")


def test_reload_keeps_a_bad_config_and_uses_a_good_one(gw: Gateway) -> None:
    box, relay = gw.box, gw.relay
    sent = len(relay.etrns())
    good = box.out("cat /etc/etrnd/etrnd.yaml")
    box.run("sed -i 's/^  settle: 2s/  settle: 2 fortnights/' /etc/etrnd/etrnd.yaml")
    box.run("systemctl reload etrnd")
    failed = wait_for(lambda: gw.events("config_reload_failed"), 30, "config_reload_failed")
    assert "watch.settle" in failed[0]["PROBLEMS"], failed
    assert box.out("systemctl is-active etrnd") == "active"
    box.run(USR1)  # a round with the old config: the same three
    assert [e["etrn"] for e in relay.wait_etrns(sent + 3)[sent:]] == [
        "@example.org", "example.net", "#office-queue"]
    # A valid edit: another argument and debug logging, used by the next round.
    box.run("cat > /etc/etrnd/etrnd.yaml <<'EOF'\n" + good.replace(
        'etrn: ["@example.org", "example.net", "#office-queue"]',
        'etrn: ["@example.org", "@example.com"]').replace("level: info", "level: debug")
        + "\nEOF")
    reloads = len(gw.events("config_reloaded"))
    box.run("systemctl reload etrnd")
    wait_for(lambda: len(gw.events("config_reloaded")) > reloads, 30, "config_reloaded")
    box.run(USR1)
    assert [e["etrn"] for e in relay.wait_etrns(sent + 5)[sent + 3:]] == [
        "@example.org", "@example.com"]
    # At debug level the SMTP dialogue is logged, AUTH included: the secret in no form.
    sends = [e["MESSAGE"] for e in gw.events("smtp_send") if e["PRIORITY"] == "7"]
    assert any(m.startswith("smtp_send") and "AUTH" in m for m in sends), sends
    # The README's debug-log queries find that dialogue.
    for line in docs.commands("docs/logs.md", DEBUG_LOGS, "journalctl"):
        out = box.out(line.replace("journalctl", "journalctl --no-pager"))
        assert "smtp_send" in out and "AUTH PLAIN <redacted>" in out, (line, out)
    export = box.out("journalctl --no-pager -o export")  # every field of every unit
    for form in (PASSWORD, base64.b64encode(f"\0office\0{PASSWORD}".encode()).decode(),
                 base64.b64encode(PASSWORD.encode()).decode()):
        assert form not in export
    assert box.out("systemctl show -p ActiveState --value etrnd") == "active"


def test_send_from_an_ip_up_script(gw: Gateway) -> None:
    """The README's ip-up line: systemd-run hands `send` the same credential."""
    lines = docs.commands("docs/deployment.md", IP_UP, "systemd-run ")
    assert len(lines) == 1, lines
    sent = len(gw.relay.etrns())
    res = gw.box.run(lines[0], check=False)
    assert res.returncode == 0, res  # the current config: @example.org and @example.com
    assert [e["etrn"] for e in gw.relay.wait_etrns(sent + 2)[sent:]] == [
        "@example.org", "@example.com"]
    # With -v (the README's debug advice) the dialogue shows, AUTH redacted.
    res = gw.box.run(lines[0] + " -v")
    assert "AUTH PLAIN <redacted>" in res.stderr + res.stdout and PASSWORD not in res.stderr, res
    gw.relay.wait_etrns(sent + 4)
    # The ip-up form: returns at once; the round runs in a transient unit that logs to the
    # journal and is collected when it ends, so the next link-up can use the name again.
    (background,) = docs.commands("docs/deployment.md", IP_UP, "systemd-run ", "--no-block")
    unit = re.search(r"--unit=(\S+)", background)
    assert unit is not None and "CollectMode=inactive-or-failed" in background, background
    name = unit[1]

    def lines() -> int:
        return len([e for e in gw.journal(f"-u {name}")
                    if "relay isp: accepted: @example.org, @example.com" in e.get("MESSAGE", "")])

    for n in (1, 2):
        assert gw.box.run(background).returncode == 0
        gw.relay.wait_etrns(sent + 4 + 2 * n)
        wait_for(lambda: lines() >= n, 60, f"send {n}'s line")  # noqa: B023 (called at once)
        wait_for(lambda: gw.box.show(name, "LoadState")["LoadState"] == "not-found", 60,
                 f"{name} to be collected")
    # Without systemd-run there is no credential: refused, with the way out named.
    res = gw.box.run("etrnd send", check=False)
    assert res.returncode == 2 and "systemd-run" in res.stderr, res


def test_watchdog_holds_across_idle_and_flapping(gw: Gateway) -> None:
    box = gw.box
    box.run("mkdir -p /etc/systemd/system/etrnd.service.d && printf '[Service]\\n"
            "WatchdogSec=2s\\nRestartSec=1s\\n' > /etc/systemd/system/etrnd.service.d/test.conf"
            " && systemctl daemon-reload && systemctl restart etrnd")
    props = box.show("etrnd", "WatchdogUSec", "MainPID", "NRestarts")
    assert props["WatchdogUSec"] == "2s", props
    deadline = time.monotonic() + 5  # two and a half watchdog intervals idle ...
    while time.monotonic() < deadline:
        assert box.show("etrnd", "MainPID", "NRestarts") == {
            "MainPID": props["MainPID"], "NRestarts": props["NRestarts"]}
    for _ in range(20):  # ... and about two more while the link flaps
        gw.wan(up=False)
        gw.wan(up=True)
        time.sleep(0.2)
    assert box.show("etrnd", "MainPID", "NRestarts", "ActiveState") == {
        "MainPID": props["MainPID"], "NRestarts": props["NRestarts"], "ActiveState": "active"}
    assert "Watchdog timeout" not in box.out("journalctl --no-pager -b -u etrnd")


def test_stop_kill_and_bad_config(gw: Gateway) -> None:
    box = gw.box
    box.run("systemctl stop etrnd")
    p = box.show("etrnd", "ActiveState", "Result", "ExecMainStatus",
                 "ActiveExitTimestampMonotonic", "InactiveEnterTimestampMonotonic")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), (
        p, box.out("journalctl --no-pager -b -u etrnd -n 30 -o cat"))
    stop = (int(p["InactiveEnterTimestampMonotonic"]) - int(p["ActiveExitTimestampMonotonic"]))
    gw.timings["stop"] = stop / 1e6
    assert stop < 1_000_000, f"systemctl stop took {stop / 1e6:.3f} s"
    assert gw.events("daemon_stop")

    box.run("systemctl start etrnd")
    before = box.show("etrnd", "MainPID", "NRestarts")
    box.run(f"kill -9 {before['MainPID']}")
    wait_for(lambda: box.show("etrnd", "ActiveState", "NRestarts") == {
        "ActiveState": "active", "NRestarts": str(int(before["NRestarts"]) + 1)}, 60,
        "Restart=on-failure to bring etrnd back after SIGKILL")
    assert gw.main_pid() != int(before["MainPID"])

    box.run("cp /etc/etrnd/etrnd.yaml /root/good.yaml && echo 'bogus: 1' >> /etc/etrnd/etrnd.yaml")
    assert box.run("systemctl restart etrnd", check=False).returncode != 0
    p = box.show("etrnd", "ActiveState", "SubState", "ExecMainStatus", "NRestarts")
    # failed/failed, not auto-restart: RestartPreventExitStatus=2 ends it at once.
    assert (p["ActiveState"], p["SubState"], p["ExecMainStatus"]) == ("failed", "failed", "2"), p
    assert "bogus: unknown key" in box.out("journalctl --no-pager -b -u etrnd -o cat")
    box.run("cp /root/good.yaml /etc/etrnd/etrnd.yaml && systemctl reset-failed etrnd && "
            "rm /etc/systemd/system/etrnd.service.d/test.conf && systemctl daemon-reload")


def test_metrics_work_under_the_hardened_unit(gw: Gateway) -> None:
    """docs/metrics.md: `metrics:` served under the unit as shipped (DynamicUser,
    RestrictAddressFamilies, ProcSubset=pid hides /proc/stat); the link is up, so the start
    brings a round."""
    box = gw.box
    gw.wan(up=True)
    box.run("cp /etc/etrnd/etrnd.yaml /root/no-metrics.yaml && "
            "printf 'metrics: {listen: \"127.0.0.1:9469\"}\\n' >> /etc/etrnd/etrnd.yaml")
    listening, done = len(gw.events("metrics_listening")), len(gw.events("round_done"))
    sent = len(gw.relay.etrns())
    box.run("systemctl restart etrnd")
    wait_for(lambda: len(gw.events("metrics_listening")) > listening, 30, "metrics_listening")
    wait_for(lambda: len(gw.events("round_done")) > done, 60, "the round to end")
    text = box.out("python3 -c 'import urllib.request as u; "
                   "print(u.urlopen(\"http://127.0.0.1:9469/metrics\").read().decode())'")
    # Whatever the config holds by now (the reload test changes its arguments), the
    # counters match what the relay really answered: 459 for example.net, 250 for the rest.
    answered = [e["etrn"] for e in gw.relay.etrns()[sent:]]
    refused = answered.count("example.net")
    assert answered, "no ETRN reached the relay"
    isp = {"relay": "isp"}
    result = "refused" if refused else "accepted"
    assert sample(text, "etrnd_rounds_total", result=result, **isp) == 1, text
    assert sample(text, "etrnd_rounds_started_total", reason="link_up", **isp) == 1, text
    assert sample(text, "etrnd_replies_total", command="ETRN", **{"class": "2xx"},
                  **isp) == len(answered) - refused
    assert (sample(text, "etrnd_replies_total", command="ETRN", **{"class": "4xx"}, **isp)
            or 0) == refused
    assert sample(text, "etrnd_link_up") == 1
    assert re.search(r"^process_resident_memory_bytes [1-9]", text, re.M), text
    assert re.search(r"^process_open_fds [1-9]", text, re.M), text
    assert box.out("systemctl is-active etrnd") == "active"
    box.run("cp /root/no-metrics.yaml /etc/etrnd/etrnd.yaml && systemctl stop etrnd")


def test_starts_at_boot(gw: Gateway) -> None:
    """Reboot the container: the enabled unit is ready, and reports the link, on its own."""
    gw.box.nspawn.terminate()
    gw.box.nspawn.wait(60)
    with booted(gw.root, gw.office.name, gw.binds, gw.log) as box:
        gw.box = box
        wait_for(lambda: box.out("systemctl is-active etrnd", check=False) == "active", 60,
                 "etrnd active after boot")
        ready = time.monotonic() - box.started
        start = box.show("etrnd", "ExecMainStartTimestampMonotonic",
                         "ActiveEnterTimestampMonotonic")
        to_ready = (int(start["ActiveEnterTimestampMonotonic"])
                    - int(start["ExecMainStartTimestampMonotonic"])) / 1e6
        print(f"boot -> etrnd active {ready:.2f} s (polled); exec -> READY=1 {to_ready:.3f} s; "
              f"stop {gw.timings.get('stop', 0):.3f} s")
        wait_for(lambda: gw.status_text().startswith("link up;"), 30, "link up after boot")
