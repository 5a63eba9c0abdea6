"""`etrnd run` against a real Postfix ISP: a WAN link-up makes it deliver the whole queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemonproc import running, wait_for
from tests.support.postfix import ISP_ADDR, IspOffice, isp_and_office

pytestmark = pytest.mark.root
N = 20


@pytest.fixture
def queued(tmp_path: Path) -> Iterator[IspOffice]:
    """ISP holding N messages for the office, which is unreachable (its WAN is down)."""
    with isp_and_office(tmp_path, office_link_up=False) as env:
        env.postfix.enqueue(N, f"user@{env.domain}")
        wait_for(lambda: env.postfix.deferred() == N, 30, f"{N} deferred messages at the ISP")
        yield env


def daemon_config(env: IspOffice, tmp_path: Path, watch: str) -> Path:
    return env.write_config(tmp_path / "etrnd.yaml", extra=(
        f"watch: {{interfaces: [{env.office_if}], down_hold: 0s, {watch}}}\n"
        f"control: {{socket: {tmp_path / 'control.sock'}}}\n"))


def wan_up(env: IspOffice) -> None:
    """What pppd does: the link comes up, then the default route through it."""
    env.set_office_link(True)
    env.office.ip("route", "add", "default", "via", ISP_ADDR, "dev", env.office_if)


def test_wan_down_then_up_delivers_every_queued_message(queued: IspOffice,
                                                        tmp_path: Path) -> None:
    env = queued
    config = daemon_config(env, tmp_path, "up_when: default-route, settle: 0s")
    with running(config, tmp_path / "log", env.office) as daemon:
        assert daemon.events("daemon_ready")[0]["link"] == "down"
        assert env.receiver.count() == 0
        wan_up(env)
        reply = daemon.wait_event("etrn_reply", timeout=15)
        assert (reply["code"], reply["text"]) == (250, "Queuing started")
        env.receiver.wait_count(N)
        wait_for(lambda: env.postfix.queue() == [], 30, "the ISP queue to drain")
        assert env.receiver.count() == N
        assert len(daemon.events("round_start")) == 1
        assert daemon.events("etrn_retry") == []


def test_daemon_started_with_the_link_already_up_delivers(queued: IspOffice,
                                                          tmp_path: Path) -> None:
    env = queued
    wan_up(env)
    assert env.receiver.count() == 0  # Postfix does not retry by itself: only ETRN helps
    config = daemon_config(env, tmp_path, "up_when: default-route, settle: 0s")
    with running(config, tmp_path / "log", env.office) as daemon:
        assert daemon.events("daemon_ready")[0]["link"] == "up"
        env.receiver.wait_count(N)
        assert daemon.events("round_start")[0]["reason"] == "link_up"


def test_flapping_at_10_hz_starts_few_rounds_and_still_delivers(queued: IspOffice,
                                                               tmp_path: Path) -> None:
    env = queued
    min_interval = 1.0
    config = daemon_config(env, tmp_path,
                           f"up_when: carrier, settle: 0s, min_interval: {min_interval}s")
    with running(config, tmp_path / "log", env.office) as daemon:
        flaps = 30
        start = time.monotonic()
        for _ in range(flaps):  # 10 Hz: up 50 ms, down 50 ms (slower on a loaded machine)
            env.set_office_link(True)
            time.sleep(0.05)
            env.set_office_link(False)
            time.sleep(0.05)
        env.set_office_link(True)
        flapped = time.monotonic() - start
        daemon.wait_event("link_up", count=flaps + 1)
        env.receiver.wait_count(N, timeout=30)
        rounds = daemon.events("round_start")
        # One round at the first up, then at most one per min_interval, plus the final up's.
        allowed = int(flapped / min_interval) + 2
        assert 1 <= len(rounds) <= allowed, (len(rounds), allowed)
