"""Reply classification follows the product's table, for every code a server may send."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etrnd.protocols.replies import (
    Outcome,
    classify_atrn,
    classify_auth,
    classify_reply,
    clean_text,
    pending_count,
)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.ACCEPTED), (251, Outcome.ACCEPTED), (252, Outcome.ACCEPTED),
        (253, Outcome.ACCEPTED),
        (421, Outcome.TRANSIENT), (450, Outcome.TRANSIENT), (451, Outcome.TRANSIENT),
        (452, Outcome.TRANSIENT), (458, Outcome.TRANSIENT), (499, Outcome.TRANSIENT),
        (459, Outcome.REFUSED_ROUND),
        (500, Outcome.REFUSED_RELAY), (502, Outcome.REFUSED_RELAY),
        (501, Outcome.REFUSED_ARG), (504, Outcome.REFUSED_ARG), (550, Outcome.REFUSED_ARG),
        (551, Outcome.REFUSED_ARG), (552, Outcome.REFUSED_ARG), (553, Outcome.REFUSED_ARG),
        (554, Outcome.REFUSED_ARG), (503, Outcome.REFUSED_ARG), (599, Outcome.REFUSED_ARG),
    ],
)
def test_reply_table(code: int, outcome: Outcome) -> None:
    verdict = classify_reply(code, "text")
    assert verdict.outcome is outcome
    assert verdict.code == code and verdict.error is None


@pytest.mark.parametrize("code", [-1, 0, 25, 220, 221, 235, 254, 299, 354, 600, 999])
def test_codes_that_are_no_etrn_answer_are_transient_protocol_errors(code: int) -> None:
    verdict = classify_reply(code, "whatever")
    assert verdict.outcome is Outcome.TRANSIENT and verdict.error == "ProtocolError"


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("OK, 14 pending messages for node example.org started", 14),
        ("2.0.0 OK, 3 pending messages for node x started", 3),
        ("7 messages queued", 7),
        ("OK, pending messages started", None),
        ("0 pending", 0),
    ],
)
def test_253_pending_count(text: str, count: int | None) -> None:
    assert pending_count(text) == count
    verdict = classify_reply(253, text)
    assert verdict.outcome is Outcome.ACCEPTED and verdict.pending == count


def test_pending_count_only_for_253() -> None:
    assert classify_reply(250, "2.0.0 Queuing for node 12 started").pending is None


def test_auth_refusals() -> None:
    assert classify_auth(535, "5.7.8 bad").outcome is Outcome.REFUSED_RELAY
    assert classify_auth(454, "4.7.0 try later").outcome is Outcome.TRANSIENT


def test_text_is_one_bounded_printable_line() -> None:
    hostile = "line one\r\nline two\x1b[31m\x00 \udcff" + "x" * 1000
    text = clean_text(hostile)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x00" not in text
    assert text.startswith("line one / line two") and len(text) <= 300
    text.encode("utf-8")  # no lone surrogates left: every log sink can write it


@given(st.integers(), st.text())
def test_classification_is_total(code: int, text: str) -> None:
    verdict = classify_reply(code, text)
    assert verdict.outcome in Outcome
    verdict.text.encode("utf-8")
    assert verdict.outcome is not Outcome.ACCEPTED or 250 <= code <= 253


@pytest.mark.parametrize(("code", "outcome"), [
    (250, Outcome.ACCEPTED), (453, Outcome.ACCEPTED),  # turnaround / no mail waiting
    (450, Outcome.REFUSED_RELAY), (502, Outcome.REFUSED_RELAY), (530, Outcome.REFUSED_RELAY),
    (535, Outcome.REFUSED_RELAY), (451, Outcome.TRANSIENT), (421, Outcome.TRANSIENT),
    (501, Outcome.REFUSED_ARG), (503, Outcome.REFUSED_ARG),
])
def test_atrn_reply_table(code: int, outcome: Outcome) -> None:
    """The ODMR rows of PRODUCT.md's reply table (RFC 2645 section 4.2.1)."""
    assert classify_atrn(code, "text").outcome is outcome
    assert classify_atrn(354, "go ahead").error == "ProtocolError"
