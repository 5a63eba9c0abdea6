"""check-config says what is wrong in the words of someone editing YAML, and warns about
valid configs that will not work here; every command's --help says what it does and exits."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "etrnd.example.yaml"
RELAY = "relays:\n  - name: isp\n    host: 127.0.0.1\n"


def check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    res = subprocess.run([sys.executable, "-m", "etrnd", "check-config", "-c", str(path), *args],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def problems_of(tmp_path: Path, content: str | bytes) -> list[str]:
    """check-config's problem lines for a file holding `content`; it must exit 2."""
    path = tmp_path / "etrnd.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    res = check(path)
    assert res.returncode == 2, res
    head, *lines = res.stderr.splitlines()
    assert head == f"etrnd: invalid configuration {path}:"
    return [line.replace(str(path), "FILE").strip() for line in lines]


BOOLEANS = "unquoted yes/no/on/off/true/false are booleans"


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param("relays: []\n", "relays: the list is empty; give at least one relay",
                 id="empty-relays"),
    pytest.param(RELAY + "    etrn: []\n",
                 "relays[isp].etrn: the list is empty; give at least one argument",
                 id="empty-etrn"),
    pytest.param(RELAY + "    port: twenty-five\n    etrn: ['@a.test']\n",
                 "relays[isp].port: should be a whole number, not 'twenty-five'",
                 id="integer"),
    pytest.param(RELAY + "    port: 0\n    etrn: ['@a.test']\n",
                 "relays[isp].port: should be 1 or more, not 0", id="range"),
    pytest.param(RELAY + "    verify: maybe\n    etrn: ['@a.test']\n",
                 "relays[isp].verify: should be true or false, not 'maybe'", id="boolean"),
    pytest.param(RELAY + "    tls: yes\n    etrn: ['@a.test']\n",
                 f"relays[isp].tls: YAML read yes as true ({BOOLEANS}); write one of 'none', "
                 "'opportunistic', 'starttls' or 'implicit'", id="yaml-boolean-choice"),
    pytest.param(RELAY + "    tls: maybe\n    etrn: ['@a.test']\n",
                 "relays[isp].tls: must be 'none', 'opportunistic', 'starttls' or 'implicit', "
                 "not 'maybe'", id="choice"),
    pytest.param(RELAY + "    etrn: [yes, 1985]\n",
                 f"relays[isp].etrn.0: YAML read yes as true ({BOOLEANS}); quote it: 'yes'\n"
                 "relays[isp].etrn.1: YAML read 1985 as a number; quote it: '1985'",
                 id="yaml-boolean-text"),
    pytest.param("watch: {interfaces: ppp0}\n" + RELAY + "    etrn: ['@a.test']\n",
                 "watch.interfaces: should be a list: write [ppp0]", id="list"),
    pytest.param("relays:\n  - name: isp\n\thost: 127.0.0.1\n",
                 "FILE:3:1: a tab character: YAML does not allow tabs here (indentation, "
                 "before a value); use spaces", id="tab"),
    pytest.param(b"relays:\n  - name: isp\n    host: h\xe9.example\n",
                 "FILE:3:12: not UTF-8 text (byte 0xe9); save the file as UTF-8", id="latin-1"),
    pytest.param("relays:\n  - name: isp\n    host: a\x07b\n",
                 "FILE:3:12: control character U+0007; YAML allows none but tab and line "
                 "breaks: remove it", id="control"),
    pytest.param(RELAY + "    etrn: ['@a.test', #office-queue]\n",
                 "FILE:4:23: '#' starts a comment here, so YAML did not read #office-queue and "
                 "failed on the next line; quote it: \"#office-queue\"", id="hash-in-list"),
    pytest.param(RELAY + "    etrn: [#office-queue]\nretry: {first_delay: 5s}\n",
                 "FILE:4:12: '#' starts a comment here, so YAML did not read #office-queue and "
                 "failed at the end of the file; quote it: \"#office-queue\"",
                 id="hash-swallows-the-rest"),
    pytest.param(RELAY + "    etrn: #office-queue\n",
                 "relays[isp].etrn: is empty: write a list, e.g. [a, b] ('#' starts a comment, "
                 "so YAML read nothing here; quote it: \"#office-queue\")", id="hash-after-key"),
    pytest.param(RELAY + "    etrn: ['@a.test']\nretry:\n",
                 "retry: is empty: give its keys (key: value), or leave it out for the "
                 "defaults", id="empty-section"),
    pytest.param("relays:\n  - name: isp\n   host: 127.0.0.1\n",
                 "FILE:3:4: YAML syntax: the indentation is off: this line does not line up "
                 "with the keys above it (YAML: expected <block end>, but found '<block "
                 "mapping start>')", id="indentation"),
    pytest.param(RELAY + "    etrn:\n      - #office-queue\n",
                 "relays[isp].etrn.0: is empty ('#' starts a comment, so YAML read nothing "
                 "here; quote it: \"#office-queue\")", id="hash-list-item"),
    pytest.param(RELAY + "    etrn: [@example.org]\n",
                 "FILE:4:12: a value that begins with '@' must be quoted: write "
                 "\"@example.org\"", id="at"),
    pytest.param("relays:\n  - host: mail.isp.test\n    etrn: ['@a.test']\n    tls: no\n"
                 "  - {name: b, hosts: [127.0.0.2], etrn: ['@a.test'], port: x}\n",
                 f"relays[mail.isp.test].tls: YAML read no as false ({BOOLEANS}); write one "
                 "of 'none', 'opportunistic', 'starttls' or 'implicit'\n"
                 "relays[b].port: should be a whole number, not 'x'", id="named-by-label"),
    pytest.param("relays:\n  - name: isp\n    host: 127.0.0.1\n    username: office\n"
                 "    tiemout: 5s\n    etrn: ['@a.test']\nretry: {first_dealy: 1s}\n",
                 "relays[isp].username: unknown key; did you mean auth.username?\n"
                 "relays[isp].tiemout: unknown key; did you mean timeout?\n"
                 "retry.first_dealy: unknown key; did you mean first_delay?", id="unknown-keys"),
    pytest.param("relays:\n  - {name: a, host: h.test, etrn: [x], tls: 1}\n"
                 "  - {name: a, host: h.test, etrn: [x]}\n",
                 "relays.0.tls: YAML read 1 as a number; write one of 'none', 'opportunistic', "
                 "'starttls' or 'implicit'", id="same-name-by-position"),
])
def test_problem_in_plain_words(tmp_path: Path, content: str | bytes, expected: str) -> None:
    assert problems_of(tmp_path, content) == expected.splitlines()


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    """A config that draws no warning: real-looking names, a socket directory that exists."""
    path = tmp_path / "etrnd.yaml"
    path.write_text(RELAY + "    etrn: ['@office.test']\n"
                    f"control: {{socket: {tmp_path / 'control.sock'}}}\n")
    return path


def warned(res: subprocess.CompletedProcess[str]) -> list[str]:
    """The warning lines of a check-config that exited 0."""
    assert res.returncode == 0, res.stderr
    if not res.stderr:
        return []
    head, *lines = res.stderr.splitlines()
    assert head.startswith("etrnd: ") and head.endswith(
        " (exit 0; --strict makes them errors):"), head
    return [line.strip() for line in lines]


def test_a_clean_config_draws_no_warning(clean: Path) -> None:
    res = check(clean)
    assert warned(res) == [] and res.stdout.startswith(f"config {clean}: valid\n")
    assert check(clean, "--strict").returncode == 0


def test_the_shipped_example_passes_and_says_what_to_edit() -> None:
    res = check(EXAMPLE)
    found = warned(res)
    assert res.stdout.startswith(f"config {EXAMPLE}: valid\n")
    assert found[:3] == [
        "relays[isp].host: mail.isp.example is a placeholder (reserved example names never "
        "resolve, RFC 2606): put your provider's relay",
        "relays[isp].helo: gw.example.org is a placeholder: put this gateway's name as your "
        "provider knows it, or leave helo out (the FQDN)",
        "relays[isp].etrn: @example.org, example.net, #office-queue are the example's "
        "placeholders: put your own @domains, nodes or #queues",
    ]
    # --strict turns every warning into a problem: the same lines, exit 2, no summary.
    strict = check(EXAMPLE, "--strict")
    assert strict.returncode == 2 and strict.stdout == ""
    head, *lines = strict.stderr.splitlines()
    assert head == f"etrnd: invalid configuration {EXAMPLE} (--strict: warnings are errors):"
    assert [line.strip() for line in lines] == found


@pytest.fixture
def open_dir() -> Iterator[Path]:
    # Not under tmp_path: pytest makes its parents 0700, which would hide any file in them.
    path = Path(tempfile.mkdtemp(prefix="etrnd-words-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.mark.parametrize(("relay", "expected"), [
    ("    port: 25\n    tls: implicit\n",
     "relays[isp].port: 25 with tls: implicit: port 25 starts in plain text, so the TLS "
     "handshake fails; use port 465, or tls: starttls on port 25"),
    ("    port: 25\n    protocol: odmr\n    auth: {username: u, password_file: PW}\n",
     "relays[isp].port: 25 with protocol: odmr: providers take ATRN on port 366 (RFC 2645) "
     "and answer it on 25 with 502; leave port out or set 366"),
])
def test_ports_that_cannot_work(clean: Path, open_dir: Path, relay: str, expected: str) -> None:
    pw = open_dir / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    text = clean.read_text().replace(RELAY, RELAY + relay.replace("PW", str(pw)))
    clean.write_text(text.replace("'@office.test'", "office.test"))
    assert warned(check(clean)) == [expected]
    assert check(clean, "--strict").returncode == 2


def test_watched_interface_that_does_not_exist(clean: Path) -> None:
    clean.write_text("watch: {interfaces: [lo, 'l[o]', nosuch-if0, 'nosuch*']}\n"
                     + clean.read_text())
    [line] = warned(check(clean))
    # `lo` and `l[o]` match the loopback interface every namespace has.
    assert line.startswith("watch.interfaces: nosuch-if0, nosuch* match no interface now "
                           "(present: "), line
    assert line.endswith("); right if it appears with the link (ppp, a modem), else a typo: "
                         "no round would ever start"), line


def test_control_socket_directory_missing(clean: Path, tmp_path: Path) -> None:
    clean.write_text(clean.read_text().replace("control.sock", "nodir/control.sock"))
    [line] = warned(check(clean))
    # Not under /run: no hint about RuntimeDirectory=, which makes directories there only.
    assert line == (f"control.socket: directory {tmp_path / 'nodir'} does not exist: "
                    "run fails to create the socket unless it is made first"), line
    clean.write_text(clean.read_text().replace(f"{tmp_path}/nodir", "/run/etrnd-nodir"))
    [line] = warned(check(clean))
    assert line.startswith("control.socket: directory /run/etrnd-nodir does not exist: "
                           "run fails to create the socket unless it is made first (a unit's "
                           "RuntimeDirectory=etrnd-nodir does; "), line


@pytest.mark.root
def test_password_file_only_root_can_read(clean: Path, open_dir: Path) -> None:
    secret = open_dir / "isp.secret"
    secret.write_text("s3cret-pw\n")
    clean.write_text(clean.read_text().replace(
        RELAY, RELAY + f"    tls: starttls\n    auth: {{username: u, password_file: {secret}}}\n"))
    for mode in (0o600, 0o640):
        secret.chmod(mode)
        assert warned(check(clean)) == [
            f"relays[isp].auth.password_file: only root may read it (mode {mode:04o}), so the "
            f"unit's DynamicUser= cannot read {secret}; make it a credential: "
            f"LoadCredential=isp:{secret} in the unit and password_file: isp"]
    secret.chmod(0o644)
    assert warned(check(clean)) == []
    open_dir.chmod(0o700)
    [line] = warned(check(clean))
    assert line.startswith(f"relays[isp].auth.password_file: only root may enter its "
                           f"directory {open_dir} (mode 0700)"), line
    # A systemd credential is handed to the unit's user by systemd: no such warning.
    clean.write_text(clean.read_text().replace(f"password_file: {secret}", "password_file: isp"))
    assert warned(check(clean)) == []


def commands() -> list[str]:
    """Every subcommand the parser has (a new one must say its exit codes too)."""
    import argparse

    from etrnd.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.parametrize("command", commands())
def test_help_says_what_and_exit_codes(command: str) -> None:
    res = subprocess.run([sys.executable, "-m", "etrnd", command, "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"usage: etrnd {command} " in text and "-c FILE, --config FILE" in text
    exits = text[text.index("\nexit status:\n"):]
    assert "  0  " in exits
    if command == "run":
        for line in ("SIGTERM, SIGINT  stop", "SIGHUP           re-read the config",
                     "SIGUSR1          start a round now", "2  invalid configuration"):
            assert line in text, text
    if command == "send":
        assert "3  some refused permanently" in exits and "4  some still failing" in exits
    if command == "check-config":
        assert "--strict" in text and "2  invalid, or warnings with --strict" in exits


def test_the_docs_example_is_what_check_config_prints(tmp_path: Path) -> None:
    from tests.support.docs import section

    text = section("docs/configuration.md", "`etrnd check-config`: problems and warnings")
    block = text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    path = tmp_path / "etrnd.yaml"
    path.write_text(RELAY + "    tls: yes\n    port: twenty-five\n    etrn: ['@a.test']\n"
                    "  - {name: backup, host: 127.0.0.2, etrn: []}\n")
    assert block[0] == "etrnd: invalid configuration /etc/etrnd/etrnd.yaml:"
    assert problems_of(tmp_path, path.read_text()) == [line.strip() for line in block[1:]]
