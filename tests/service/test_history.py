"""Failure causes in words, the refusal streak, and the state file's bounds (pure, no daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etrnd.outputs import statefile
from etrnd.outputs.health import duration
from etrnd.protocols.replies import classify_auth, classify_reply, failure
from etrnd.service.history import Mark, RelayHistory, cause

# Exception texts as aiosmtplib 5 and ssl raised them here (tests/service/test_status_e2e.py
# meets most of them on real sockets; DNS is here because a test must not ask a name server).
CASES = [
    (failure("SMTPConnectError", "Error connecting to mx.isp.example on port 25: [Errno -2] "
                                 "Name or service not known"), "mx.isp.example", 25,
     "dns", "DNS: cannot resolve mx.isp.example (Name or service not known)"),
    (failure("SMTPConnectError", "Error connecting to 203.0.113.1 on port 25: [Errno 111] "
                                 "Connect call failed ('203.0.113.1', 25)"), "203.0.113.1", 25,
     "refused", "connection refused (203.0.113.1:25)"),
    (failure("SMTPConnectError", "Error connecting to 203.0.113.1 on port 25: [Errno 113] "
                                 "Connect call failed ('203.0.113.1', 25)"), "203.0.113.1", 25,
     "connect", "cannot connect to 203.0.113.1:25: No route to host"),
    (failure("SMTPConnectTimeoutError", "Timed out connecting to 203.0.113.7 on port 25 after "
                                        "1.0 seconds"), "203.0.113.7", 25,
     "timeout", "time-out: no answer from 203.0.113.7:25"),
    (failure("SMTPConnectTimeoutError", "Timed out waiting for server ready message"),
     "203.0.113.1", 25, "timeout",
     "time-out: 203.0.113.1:25 took the connection but sent no greeting"),
    (failure("SSLCertVerificationError", "self-signed certificate"), "203.0.113.1", 25,
     "tls", "TLS certificate not accepted: self-signed certificate (203.0.113.1:25)"),
    (failure("SMTPConnectError", "Error connecting to 203.0.113.1 on port 465: [SSL: "
                                 "CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                 "unable to get local issuer certificate (_ssl.c:1006)"),
     "203.0.113.1", 465, "tls",
     "TLS certificate not accepted: unable to get local issuer certificate (203.0.113.1:465)"),
    (classify_auth(535, "5.7.8 authentication failed"), "203.0.113.1", 25, "auth",
     "AUTH refused: 535 5.7.8 authentication failed (check username and password)"),
    (failure("AuthWithoutTLS", "AUTH is configured but the session is not encrypted; "
                               "credentials not sent"), "203.0.113.1", 25, "auth_without_tls",
     "AUTH without TLS: AUTH is configured but the session is not encrypted; credentials not "
     "sent"),
    (classify_reply(459, "<example.org>: service unavailable"), "203.0.113.1", 25, "reply",
     "459 <example.org>: service unavailable"),
]


@pytest.mark.parametrize(("verdict", "host", "port", "kind", "text"), CASES)
def test_each_failure_names_its_cause(verdict: object, host: str, port: int, kind: str,
                                      text: str) -> None:
    assert cause(verdict, host, port) == (kind, text)  # type: ignore[arg-type]


def test_the_same_4xx_three_times_is_probably_a_refusal_but_busy_is_not() -> None:
    history = RelayHistory()
    refusal = classify_reply(458, "Administrative prohibition")
    assert [history.note_streak([refusal]) for _ in range(4)] == [False, False, True, False]
    assert history.hint is not None and "4 times in a row: probably a refusal" in history.hint
    assert "auth" in history.hint.lower() and "domains" in history.hint
    history.note_streak([classify_reply(250, "Queuing started")])
    assert history.hint is None
    busy = classify_reply(458, "Already processing example.org")
    assert not any(history.note_streak([busy]) for _ in range(5)) and history.hint is None


def test_state_file_round_trip_is_bounded_to_the_configured_relays(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    isp, old = RelayHistory(), RelayHistory()
    success = Mark(1.0, "reply", "250 Queuing started", 250, "203.0.113.1", "@example.org")
    isp.note([success], [])
    isp.arg("@example.org").note([success], [])
    isp.arg("@gone.example").note([success], [])
    isp.note([], [Mark(2.0, "refused", "connection refused (203.0.113.1:25)")])
    statefile.write(path, statefile.dump({"isp": isp, "old": old},
                                         {"isp": ("@example.org",)}, 3.0))
    saved = json.loads(path.read_text())
    assert set(saved["relays"]) == {"isp"} and set(saved["relays"]["isp"]["args"]) == {
        "@example.org"}
    loaded, problem = statefile.load(path, {"isp", "backup"})
    assert problem is None and set(loaded) == {"isp"}
    assert loaded["isp"].last_success == success and loaded["isp"].failures == 1
    assert loaded["isp"].failing_since == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


@pytest.mark.parametrize(("content", "says"), [
    (b"{", "not valid JSON"), (b'{"format": 99, "relays": {}}', "not an etrnd state file"),
    (b" " * (statefile.MAX_BYTES + 1), "larger than"),
])
def test_a_bad_state_file_is_a_warning_and_no_history(tmp_path: Path, content: bytes,
                                                      says: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    loaded, problem = statefile.load(path, {"isp"})
    assert loaded == {} and problem is not None and says in problem
    assert statefile.load(tmp_path / "missing.json", {"isp"}) == ({}, None)


def test_durations_read_like_a_person_wrote_them() -> None:
    assert [duration(s) for s in (0, 12, 200, 7500, 90061)] == [
        "0 s", "12 s", "3 min 20 s", "2 h 5 min", "1 d 1 h"]
