"""Against a real Postfix at the "ISP": `etrnd send` from the office makes it deliver the queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.postfix import IspOffice, isp_and_office, wait_until

pytestmark = pytest.mark.root
N = 20


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


@pytest.fixture
def office_down(tmp_path: Path) -> Any:
    with isp_and_office(tmp_path, office_link_up=False) as env:
        yield env


def test_etrn_makes_postfix_deliver_the_whole_queue(office_down: IspOffice,
                                                    tmp_path: Path) -> None:
    env = office_down
    env.postfix.enqueue(N, f"user@{env.domain}")
    # Postfix tried each message once, failed (office unreachable) and will not retry by itself.
    wait_until(lambda: env.postfix.deferred() == N, 30, f"{N} deferred messages at the ISP")

    env.set_office_link(True)
    assert env.receiver.count() == 0
    assert env.postfix.deferred() == N  # still queued: nothing delivered before ETRN

    res = env.etrnd("send", "-c", str(env.write_config(tmp_path / "etrnd.yaml")))
    assert res.returncode == 0, res.stderr
    replies = events(res.stderr, "etrn_reply")
    assert [(r["arg"], r["code"], r["text"]) for r in replies] == [
        (f"@{env.domain}", 250, "Queuing started")]

    assert events(res.stderr, "etrn_retry") == []
    env.receiver.wait_count(N)
    wait_until(lambda: env.postfix.queue() == [], 30, "the ISP queue to drain")
    assert env.receiver.count() == N
    assert "Traceback" not in res.stderr


def test_domain_not_flushed_is_459_exit_3_without_retry(tmp_path: Path) -> None:
    with isp_and_office(tmp_path) as env:
        config = env.write_config(tmp_path / "etrnd.yaml", etrn=("@not-ours.test",))
        res = env.etrnd("send", "-c", str(config))
        log = env.postfix.log()
    assert res.returncode == 3, res.stderr
    refused = events(res.stderr, "etrn_refused")
    assert [(r["code"], r["outcome"]) for r in refused] == [(459, "refused_round")]
    assert "not-ours.test" in refused[0]["text"]
    assert events(res.stderr, "etrn_retry") == []
    # Postfix saw (and refused) exactly one ETRN: nothing was retried behind the log's back.
    assert log.count("reject: ETRN not-ours.test") == 1
