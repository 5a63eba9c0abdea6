"""The ODMR lab itself: the real Exim provider says what RFC 2645 (and FIELD-NOTES) say it does.

These pin the provider's replies that the etrnd interop tests rely on, with a plain smtplib
client, so a broken lab fails here and not as a puzzling etrnd failure.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.exim import PASSWORD, USER
from tests.support.odmrlab import ASKED, EMPTY, ISP_ADDR, NOT_ASKED, OdmrLab, odmr_lab

pytestmark = pytest.mark.root

# Runs in the office namespace: each argument is one dialogue, `;`-separated commands after
# EHLO; prints [[command, code, text], ...] per dialogue as one JSON line.
PROBE = r"""
import base64, json, smtplib, sys
host, port = sys.argv[1], int(sys.argv[2])
for dialogue in sys.argv[3:]:
    s = smtplib.SMTP(host, port, local_hostname="office.example.test", timeout=20)
    code, text = s.ehlo()
    out = [["EHLO", code, text.decode()]]
    for cmd in dialogue.split(";"):
        if cmd.startswith("AUTH "):
            user, password = cmd.split()[1:]
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            code, text = s.docmd("AUTH", "PLAIN " + token)
            cmd = "AUTH PLAIN"
        else:
            verb, _, arg = cmd.partition(" ")
            code, text = s.docmd(verb, arg)
        out.append([cmd, code, text.decode()])
        if code == 250 and cmd.startswith("ATRN"):
            break  # turned around: the provider now waits for our 220; just hang up
    s.close()
    print(json.dumps(out), flush=True)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[OdmrLab]:
    with odmr_lab(tmp_path, wan_up=True) as env:
        yield env


def probe(lab: OdmrLab, port: int, *dialogues: str) -> list[list[tuple[str, int, str]]]:
    res = lab.office.run(sys.executable, "-c", PROBE, ISP_ADDR, str(port), *dialogues,
                         timeout=60)
    return [[(c, code, text) for c, code, text in json.loads(line)]
            for line in res.stdout.splitlines()]


def test_exim_provider_replies(lab: OdmrLab) -> None:
    lab.queue_mail(1, domains=ASKED[:1], not_asked=1)
    good, bad = f"AUTH {USER} {PASSWORD}", f"AUTH {USER} wrong"
    odmr = probe(lab, 366, "ATRN example.test", f"{bad};ATRN example.test",
                 f"{good};ATRN refused.example", f"{good};ATRN {EMPTY}",
                 f"{good};ATRN {ASKED[0]}")
    ehlo = odmr[0][0][2]
    assert "ATRN" in ehlo.split("\n")
    assert "AUTH PLAIN LOGIN CRAM-MD5" in ehlo.split("\n")
    assert odmr[0][1] == ("ATRN example.test", 530, "ATRN is not permitted without authentication")
    assert odmr[1][1:] == [("AUTH PLAIN", 535, "Incorrect authentication data"),
                           ("ATRN example.test", 530,
                            "ATRN is not permitted without authentication")]
    assert odmr[2][1:] == [("AUTH PLAIN", 235, "Authentication succeeded"),
                           ("ATRN refused.example", 450, "ATRN request refused")]
    assert odmr[3][2] == (f"ATRN {EMPTY}", 453, "You have no mail")
    assert odmr[4][2] == (f"ATRN {ASKED[0]}", 250, "ODMR provider turning line around")

    smtp = probe(lab, 25, f"{good};ATRN {ASKED[0]}")
    assert "ATRN" not in smtp[0][0][2].split("\n")
    assert smtp[0][2] == (f"ATRN {ASKED[0]}", 502, "ATRN command used when not advertised")

    # We hung up after the turnaround: the provider kept both messages.
    assert lab.exim.queue_count() == 2
    assert lab.exim.queued_recipients() == [f"other0@{NOT_ASKED}", f"user0@{ASKED[0]}"]
