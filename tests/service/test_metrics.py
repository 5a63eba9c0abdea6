"""Prometheus metrics: a real Prometheus scrapes a real round; off costs nothing, on stays idle."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from etrnd.config.schema import parse_yaml
from tests.support.daemonproc import ROOT, Daemon, ScriptServer, running, wait_for
from tests.support.nettools import netns
from tests.support.postfix import ISP_ADDR, IspOffice, isp_and_office
from tests.support.promlab import prometheus, promtool, sample

DOCS = ROOT / "docs" / "metrics.md"
RELAY = "relays: [{name: isp, host: 127.0.0.1, port: 2, helo: gw.example.org, etrn: ['@x.test']}]\n"


# --- a daemon on loopback (no namespace needed: it watches an interface that does not exist)
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def idle_config(tmp_path: Path, metrics: str = "", watch: str = "") -> Path:
    path = tmp_path / "etrnd.yaml"
    watch = watch or f"{{interfaces: [nosuch{free_port()}]}}"  # no such interface: down
    path.write_text(f"watch: {watch}\n{RELAY}"
                    f"control: {{socket: {tmp_path / 'control.sock'}}}\n"
                    f"log: {{format: json}}\n{metrics}")
    return path


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.headers["Content-Type"], res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def wakeups(pid: int) -> int:
    """Context switches of every thread of `pid` so far: each is a wake-up (or preemption)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def etrnd_pid(pid: int) -> int:
    """The daemon itself: `ip netns exec` execs it, so the PID is the same (checked)."""
    assert "etrnd" in Path(f"/proc/{pid}/cmdline").read_text()
    return pid


def test_off_imports_nothing_and_on_serves(tmp_path: Path) -> None:
    env = {"PYTHONPROFILEIMPORTTIME": "1", "PATH": "/usr/bin:/bin"}
    off = Daemon(idle_config(tmp_path), tmp_path / "off.log", env=env)
    try:
        off.wait_event("daemon_ready")
    finally:
        assert off.stop()[0] == 0
    assert "import time:" in off.text()  # the measurement itself works
    assert "prometheus_client" not in off.text()

    port = free_port()
    config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
    on = Daemon(config, tmp_path / "on.log", env=env)
    try:
        on.wait_event("daemon_ready")
        assert on.events("metrics_listening")[0]["listen"] == f"127.0.0.1:{port}"
        status, ctype, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert sample(body, "etrnd_rounds_total", relay="isp", result="accepted") == 0
        assert sample(body, "etrnd_link_up") == 0
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        assert on.stop()[0] == 0
    assert "prometheus_client" in on.text()


FETCH = ("import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
         "sys.argv[1], timeout=10).read().decode())")


@pytest.mark.root
def test_metrics_on_add_no_idle_wakeups(tmp_path: Path) -> None:
    # In a namespace of its own: link events of other tests on the host would wake it.
    with netns("emi") as ns:
        config = idle_config(tmp_path, 'metrics: {listen: "127.0.0.1:9469"}\n')
        with running(config, tmp_path / "log", ns) as daemon:
            body = ns.run(sys.executable, "-c", FETCH, "http://127.0.0.1:9469/metrics").stdout
            assert sample(body, "etrnd_link_up") == 0
  # let the scrape's connection close and any start-up work end
            pid = etrnd_pid(daemon.proc.pid)
            before = wakeups(pid)
            time.sleep(3)
            assert wakeups(pid) - before == 0


def test_bad_clients_cannot_hold_the_listener(tmp_path: Path) -> None:
    port = free_port()
    config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
    with running(config, tmp_path / "log") as daemon, \
            socket.create_connection(("127.0.0.1", port)) as silent, \
            socket.create_connection(("127.0.0.1", port)) as flood:
        flood.sendall(b"GET /" + b"a" * 10000)  # no end of the request head in sight
        flood.settimeout(10)
        assert flood.recv(100) == b""  # dropped at once
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # ... and never the blank line
        status, _, body = get(f"http://127.0.0.1:{port}/metrics")  # others are served
        assert status == 200 and sample(body, "etrnd_link_up") == 0
        assert get(f"http://127.0.0.1:{port}/metrics?x=1")[0] == 200
        assert daemon.events("metrics_scrape_failed") == []


def test_a_port_in_use_is_logged_and_the_daemon_carries_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
        with running(config, tmp_path / "log") as daemon:
            failed = daemon.events("metrics_listen_failed")
            assert failed and failed[0]["reason"] == "Address already in use", failed
            assert failed[0]["listen"] == f"127.0.0.1:{port}"


def test_reload_moves_and_removes_the_listener(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{first}"}}\n')
    with running(config, tmp_path / "log") as daemon:
        assert get(f"http://127.0.0.1:{first}/metrics")[0] == 200
        idle_config(tmp_path, f'metrics: {{listen: "[::1]:{second}"}}\n')
        daemon.signal(1)  # SIGHUP
        daemon.wait_event("metrics_listening", count=2)
        assert get(f"http://[::1]:{second}/metrics")[0] == 200
        with pytest.raises(urllib.error.URLError):
            get(f"http://127.0.0.1:{first}/metrics")
        idle_config(tmp_path)
        daemon.signal(1)
        daemon.wait_event("config_reloaded", count=2)
        with pytest.raises(urllib.error.URLError):
            get(f"http://[::1]:{second}/metrics")


def test_metrics_a_reload_turns_on_see_the_link_already_up(tmp_path: Path) -> None:
    port = free_port()
    # Loopback is up (carrier): the link is up from the start, its decision long gone.
    config = idle_config(tmp_path, watch="{interfaces: [lo], up_when: carrier}")
    with running(config, tmp_path / "log") as daemon:
        assert daemon.events("daemon_ready")[0]["link"] == "up"
        config.write_text(config.read_text() + f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
        daemon.signal(1)  # SIGHUP
        daemon.wait_event("metrics_listening")
        body = get(f"http://127.0.0.1:{port}/metrics")[2]
        assert sample(body, "etrnd_link_up") == 1
        assert sample(body, "etrnd_link_transitions_total", to="up") is None  # none since


def test_last_success_survives_a_restart_and_failures_name_their_cause(tmp_path: Path) -> None:
    relay_port, metrics_port = free_port(), free_port()
    (tmp_path / "state").mkdir()
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}
    config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{metrics_port}"}}\n'
                         "retry: {first_delay: 200ms, max_delay: 1s}\n",
                         watch="{interfaces: [lo], up_when: carrier, settle: 0s}")
    config.write_text(config.read_text().replace("port: 2,", f"port: {relay_port}, tls: none,"))
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    server = ScriptServer(None, relay_port, "250")
    try:
        with running(config, tmp_path / "first.log", env=env) as daemon:
            daemon.wait_event("round_done")
            first = sample(get(url)[2], "etrnd_last_success_timestamp_seconds", relay="isp")
            assert first is not None and abs(first - time.time()) < 60
    finally:
        server.close()
    # The relay is gone: after the restart the link-up round finds nothing listening.
    with running(config, tmp_path / "second.log", env=env) as daemon:
        daemon.wait_event("etrn_retry")
        body = get(url)[2]
        assert sample(body, "etrnd_last_success_timestamp_seconds", relay="isp") == first
        failures = sample(body, "etrnd_attempt_failures_total", relay="isp", cause="refused")
        assert failures is not None and failures >= 1, body


# --- the real thing: Postfix at the ISP, Prometheus beside etrnd ---------------------------
def docs_scrape_config() -> str:
    """docs/metrics.md's prometheus.yml, scraping every second instead of every 15 s."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    [scrape] = [yaml.safe_load(b) for b in blocks if "scrape_configs" in b]
    for job in scrape["scrape_configs"]:
        job["scrape_interval"] = "1s"
    return yaml.safe_dump(scrape)


@pytest.fixture
def office_down(tmp_path: Path) -> Iterator[IspOffice]:
    with isp_and_office(tmp_path, office_link_up=False) as env:
        env.postfix.enqueue(3, f"user@{env.domain}")
        wait_for(lambda: env.postfix.deferred() == 3, 30, "3 deferred messages at the ISP")
        yield env


@pytest.mark.root
def test_prometheus_scrapes_a_real_round(office_down: IspOffice, tmp_path: Path) -> None:
    env = office_down
    config = env.write_config(tmp_path / "etrnd.yaml", extra=(
        f"watch: {{interfaces: [{env.office_if}], up_when: default-route, settle: 0s}}\n"
        f"control: {{socket: {tmp_path / 'control.sock'}}}\n"
        'metrics: {listen: "127.0.0.1:9469"}\n'))
    with running(config, tmp_path / "log", env.office), \
            prometheus(env.office, tmp_path / "prometheus", docs_scrape_config()) as prom:
        assert prom.wait_value('up{job="etrnd"} == 1') == 1
        assert prom.wait_value("etrnd_link_up") == 0
        before_up = time.time()
        env.set_office_link(True)
        env.office.ip("route", "add", "default", "via", ISP_ADDR, "dev", env.office_if)
        env.receiver.wait_count(3)

        assert prom.wait_value('etrnd_rounds_total{relay="isp",result="accepted"} == 1') == 1
        assert prom.value('etrnd_rounds_started_total{relay="isp",reason="link_up"}') == 1
        assert prom.value('sum(etrnd_rounds_total{relay="isp"})') == 1
        assert prom.value('etrnd_replies_total{relay="isp",command="ETRN",class="2xx"}') == 1
        assert prom.value("etrnd_link_up") == 1
        assert prom.value('etrnd_link_transitions_total{to="up"}') == 1
        assert prom.value('etrnd_link_up_to_etrn_seconds_count{relay="isp"}') == 1
        took = prom.value('etrnd_link_up_to_etrn_seconds_sum{relay="isp"}')
        assert took is not None and 0 < took < time.time() - before_up
        last = prom.value('etrnd_last_success_timestamp_seconds{relay="isp"}')
        assert last is not None and before_up <= last <= time.time()
        assert prom.value("etrnd_event_loop_stalls_total") == 0
        assert prom.value("process_resident_memory_bytes") is not None

        exposition = env.office.run(sys.executable, "-c", FETCH,
                                    "http://127.0.0.1:9469/metrics").stdout
        lint = promtool("check", "metrics", stdin=exposition)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_docs_name_every_metric_etrnd_serves(tmp_path: Path) -> None:
    port = free_port()
    config = idle_config(tmp_path, f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
    with running(config, tmp_path / "log"):
        body = get(f"http://127.0.0.1:{port}/metrics")[2]
    served = set(re.findall(r"^# TYPE (etrnd_\w+)", body, re.MULTILINE))
    documented = set(re.findall(r"`(etrnd_\w+?)(?:\{[^`]*)?`", DOCS.read_text()))
    assert served, body
    assert served - documented == set(), "served but not in docs/metrics.md"
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in documented}
    assert families - served == set(), "in docs/metrics.md but not served"


# --- in this process: the hooks the e2e tests cannot reach cheaply -------------------------
def counts(*series: tuple[str, dict[str, str]]) -> list[float]:
    """Current values (0 when absent) of `series` in what GET /metrics would return."""
    from etrnd.outputs import metrics

    text = metrics.exposition().decode()
    return [sample(text, name, **labels) or 0.0 for name, labels in series]


async def test_odmr_messages_and_atrn_replies_are_counted(tmp_path: Path) -> None:
    from etrnd.outputs import metrics
    from etrnd.service.rounds import run_round
    from tests.protocols.test_odmr_session import mails, no_sleep, relay_for
    from tests.support.odmr_provider import Office, Provider, serving

    queue = mails(5)
    office = Office(rcpt_replies={queue[2].rcpts[0]: ["451 4.3.0 mailbox busy"],
                                  queue[4].rcpts[0]: ["550 5.1.1 no such user"]})
    provider = Provider(queue=list(queue))  # like Exim: a 451 ends the ATRN session
    series = [("etrnd_odmr_messages_total", {"relay": "isp", "outcome": o})
              for o in ("relayed", "deferred", "refused")]
    series += [("etrnd_replies_total", {"relay": "isp", "command": "ATRN", "class": c})
               for c in ("2xx", "4xx")]
    await metrics.serve(parse_yaml(RELAY + f"metrics: {{listen: 127.0.0.1:{free_port()}}}\n"),
                        link_up=False, last_success=dict)
    try:
        before = counts(*series)
        async with serving(provider, office) as (port, office_port):
            relay, retry = relay_for(tmp_path, port, office_port)
            result = await run_round(relay, retry, None, sleep=no_sleep)
        after = counts(*series)
    finally:
        await metrics.close()
    m = result.messages
    assert (m.relayed, m.deferred, m.refused) == (4, 1, 1)
    # The session the 451 ended, the retry that took the rest, and (a turnaround relayed
    # mail) ATRN again until the provider says 453: each reply counted by its code's class.
    turned = provider.log.count("P: 250 turning line around")
    no_mail = provider.log.count("P: 453 You have no mail")
    assert turned == 2, provider.log
    # Messages counted as each settled, as the round's own counts.
    assert [a - b for a, b in zip(after, before, strict=True)] == [4, 1, 1, turned, no_mail]


def test_a_real_stall_is_counted(tmp_path: Path) -> None:
    import asyncio

    from etrnd.loop.stall import StallDetector
    from etrnd.outputs import metrics
    from etrnd.service.daemon import Daemon

    config = parse_yaml(RELAY + f"metrics: {{listen: 127.0.0.1:{free_port()}}}\n")
    detector = StallDetector(threshold=0.05, sample=False)
    Daemon(tmp_path / "etrnd.yaml", config, stalls=detector)  # wires on_stall

    async def main() -> list[float]:
        await metrics.serve(config, link_up=False, last_success=dict)
        try:
            [before] = counts(("etrnd_event_loop_stalls_total", {}))
            time.sleep(0.1)  # noqa: ASYNC251 - a blocking call on the loop: what is detected
            await asyncio.sleep(0.01)
            return [before, *counts(("etrnd_event_loop_stalls_total", {}))]
        finally:
            await metrics.close()

    with asyncio.Runner(loop_factory=detector.new_event_loop) as runner:
        before, after = runner.run(main())
    assert (detector.stalls, after - before) == (1, 1)
