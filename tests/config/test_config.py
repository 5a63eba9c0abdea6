"""Config loading: the example is valid; every error names its key path; no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from etrnd.config.model import ConfigError
from etrnd.config.schema import parse_yaml, validate_file
from etrnd.config.values import parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "etrnd.example.yaml"


@pytest.fixture
def example_text(tmp_path: Path) -> str:
    secret = tmp_path / "isp"
    secret.write_text("s3cret-pw\n")
    text = EXAMPLE.read_text()
    assert "password_file: isp\n" in text  # the bare credential name the unit provides
    return text.replace("password_file: isp\n", f"password_file: {secret}\n")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    return info.value.problems


def test_example_is_valid(example_text: str) -> None:
    config = parse_yaml(example_text)
    relay = config.relays[0]
    assert relay.label == "isp"
    assert relay.etrn == ("@example.org", "example.net", "#office-queue")
    assert relay.auth is not None and relay.auth.password_file.value == "s3cret-pw"
    assert config.watch.settle == 2.0 and config.retry.max_delay == 600.0


def test_secret_never_in_repr(example_text: str) -> None:
    config = parse_yaml(example_text)
    assert "s3cret-pw" not in repr(config)
    assert "s3cret-pw" not in str(config)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), (12, 12), ("1.5", 1.5), (0, 0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1", -1, "5 minutes", "1w", True, None, "", "nan"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


MINIMAL = "relays:\n  - host: mail.isp.example\n    etrn: ['@example.org']\n"


def test_minimal_defaults() -> None:
    config = parse_yaml(MINIMAL)
    assert config.relays[0].effective_port == 25
    assert config.relays[0].tls == "opportunistic" and config.relays[0].verify
    assert config.watch.up_when == "default-route"


@pytest.mark.parametrize(
    ("arg", "ok"),
    [
        ("@example.org", True), ("example.net", True), ("#office-queue", True),
        ("@", False), ("#", False), ("@exa mple.org", False), ("@example.org\r\nQUIT", False),
        ("node\x00", False), ("\tnode", False), ("@exämple.org", False), ("a" * 300, False),
        ("@exa;mple", False), ("@-ok.example", False),  # Postfix: 501 (test_etrn_syntax)
    ],
)
def test_etrn_arguments(arg: str, ok: bool) -> None:
    text = f"relays:\n  - host: h.example\n    etrn: [{arg!r}]\n".replace("\\x00", "\\0")
    if ok:
        assert parse_yaml(text).relays[0].etrn == (arg,)
    else:
        found = problems(text)
        assert len(found) == 1 and found[0].startswith("relays[h.example].etrn.0: "), found


def test_every_problem_listed_with_key_path() -> None:
    text = (
        "watch: {settle: -1, up_when: sometimes, colour: red}\n"
        "relays:\n"
        "  - host: 'mail isp'\n"
        "    etrn: ['@ok.example', \"bad\\r\\nQUIT\"]\n"
        "    tls: maybe\n"
        "  - hosts: [a.example]\n"
        "    host: b.example\n"
        "    etrn: [x]\n"
        "retry: {first_delay: 10s, max_delay: 5s}\n"
        "log: {level: loud}\n"
    )
    found = problems(text)
    assert found == [
        "watch.up_when: must be 'carrier', 'address' or 'default-route', not 'sometimes'",
        "watch.settle: a duration must be a finite number >= 0",
        "watch.colour: unknown key",
        "relays[mail isp].host: must not contain white space or control characters",
        "relays[mail isp].tls: must be 'none', 'opportunistic', 'starttls' or 'implicit', "
        "not 'maybe'",
        "relays[mail isp].etrn.1: must not contain white space or control characters",
        "relays[b.example]: give exactly one of host or hosts",
        "retry: max_delay must not be shorter than first_delay",
        "log.level: must be 'debug', 'info', 'warning' or 'error', not 'loud'",
    ]


def test_a_scalar_where_a_list_belongs_says_list() -> None:
    # An operator writes `interfaces: ppp0`: YAML words, not pydantic's "valid tuple".
    found = problems("watch: {interfaces: ppp0}\nretry: 5s\n"
                     "relays: [{hosts: mx1.example, etrn: '@a.example'}]\n")
    assert found == [
        "watch.interfaces: should be a list: write [ppp0]",
        "relays[mx1.example].hosts: should be a list: write [mx1.example]",
        "relays[mx1.example].etrn: should be a list: write ['@a.example']",
        "retry: should be a mapping of keys (key: value), not '5s'",
    ]
    assert not [p for p in found if "tuple" in p or "dictionary" in p]


def test_missing_relays_and_empty_file() -> None:
    assert problems("watch: {}\n") == ["relays: required key is missing"]
    assert problems("") == ["(top level): the file is empty; at least relays: is required"]
    assert problems("- a\n- b\n")[0].startswith("(top level): must be a mapping")


def test_yaml_syntax_error_has_line_and_column() -> None:
    found = problems("relays:\n  - host: [unclosed\n")
    assert len(found) == 1 and "YAML syntax" in found[0] and found[0].startswith("<config>:")


def test_duplicate_keys_rejected() -> None:
    found = problems(MINIMAL + "relays: []\n")
    assert found == ["<config>:4:1: YAML syntax: duplicate key 'relays'"]


def test_plaintext_auth_policy(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x")
    base = (
        f"relays:\n  - host: h.example\n    etrn: [n]\n"
        f"    auth: {{username: u, password_file: {pw}"
    )
    assert problems(base + "}\n    tls: none\n")[0].startswith(
        "relays[h.example]: auth with tls: none")
    assert problems(base + ", allow_plaintext: true}\n")[0] == (
        "relays[h.example]: auth.allow_plaintext only applies with tls: none"
    )
    parse_yaml(base + ", allow_plaintext: true}\n    tls: none\n")


def test_password_from_credentials_directory(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "isp").write_text("pw-from-cred\n")
    text = (
        "relays:\n  - host: h.example\n    etrn: [n]\n"
        "    auth: {username: u, password_file: isp}\n"
    )
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert "CREDENTIALS_DIRECTORY is not set" in problems(text)[0]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    auth = parse_yaml(text).relays[0].auth
    assert auth is not None and auth.password_file.value == "pw-from-cred"


def test_duplicate_relay_names() -> None:
    text = MINIMAL + "  - host: mail.isp.example\n    etrn: [n]\n"
    assert problems(text) == ["(top level): relay name 'mail.isp.example' is used twice"]
    # Every name used twice is named, each once (a name on the third relay too).
    text += ("  - {name: b, host: c.example, etrn: [n]}\n"
             "  - {name: b, host: d.example, etrn: [n]}\n"
             "  - host: mail.isp.example\n    etrn: [n]\n")
    assert problems(text) == ["(top level): relay name 'mail.isp.example' is used twice",
                              "(top level): relay name 'b' is used twice"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate_file(tmp_path / "missing.yaml")
    missing = tmp_path / "missing.yaml"
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "etrnd", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_check_config_cli(tmp_path: Path, example_text: str) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(example_text)
    ok = run_cli("check-config", "-c", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "relay isp: mail.isp.example port 25" in ok.stdout
    assert "s3cret-pw" not in ok.stdout + ok.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("relays:\n  - host: h.example\n    etrn: ['a b']\n    port: 0\n")
    res = run_cli("check-config", "-c", str(bad))
    assert res.returncode == 2
    assert "relays[h.example].port: should be 1 or more, not 0" in res.stderr
    assert "relays[h.example].etrn.0: must not contain white space" in res.stderr
    assert "Traceback" not in res.stderr

    for path in (tmp_path / "nope.yaml", tmp_path):
        res = run_cli("check-config", "-c", str(path))
        assert res.returncode == 2 and "cannot read" in res.stderr and "Traceback" not in res.stderr


def test_shipped_example_passes_check_config_as_shipped(tmp_path: Path) -> None:
    # From a shell the unit's credential cannot be read: a note says so, it is not an error.
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    res = run_cli("check-config", "-c", str(EXAMPLE), env=env)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stdout.splitlines() if line.startswith("secret ")]
    assert len(notes) == 1, res.stdout
    assert notes[0].startswith("secret relays[isp].auth.password_file: not checked: 'isp' is a "
                               "systemd credential (LoadCredential=), present only inside the "
                               "service, and $CREDENTIALS_DIRECTORY is not set; "), notes
    # ... but the commands that would use the password refuse to start without it.
    for command in ("run", "send"):
        res = run_cli(command, "-c", str(EXAMPLE), env=env)
        assert res.returncode == 2, (command, res.stderr)
        assert "relays[isp].auth.password_file: 'isp' is a systemd credential" in res.stderr
        assert "systemd-run --wait --pipe -p LoadCredential=isp:FILE" in res.stderr


def test_check_config_still_fails_a_credential_it_can_read(tmp_path: Path) -> None:
    # Inside the service (or with $CREDENTIALS_DIRECTORY set) the credential is read as usual.
    (tmp_path / "isp").write_text("")
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    res = run_cli("check-config", "-c", str(EXAMPLE), env=env)
    assert res.returncode == 2
    assert f"relays[isp].auth.password_file: {tmp_path / 'isp'} is empty" in res.stderr


def test_credential_path_of_another_service_is_deferred_too(tmp_path: Path) -> None:
    # The path systemd gives a credential, /run/credentials/UNIT/NAME, is only there inside it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("relays:\n  - host: h.example\n    etrn: [n]\n    auth: {username: u, "
                   "password_file: /run/credentials/etrnd-test-none.service/isp}\n")
    res = run_cli("check-config", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert ("not checked: /run/credentials/etrnd-test-none.service/isp exists only inside "
            "etrnd-test-none.service") in res.stdout
    res = run_cli("send", "-c", str(cfg))
    assert res.returncode == 2 and "cannot read /run/credentials/" in res.stderr


def test_config_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(MINIMAL)
    res = run_cli("check-config", env={**os.environ, "ETRND_CONFIG": str(path)})
    assert res.returncode == 0 and str(path) in res.stdout


def test_password_with_blanks_at_its_ends_is_kept_but_noticed(tmp_path: Path) -> None:
    # `echo 'secret ' > file`: maybe genuine, so not an error; but AUTH would fail with no
    # clue, so check-config says so (a notice naming the file) and run warns at start.
    from tests.support.daemonproc import running

    secret = tmp_path / "isp"
    secret.write_text("s3cret-pw \n")
    config = tmp_path / "etrnd.yaml"
    config.write_text(
        "watch: {interfaces: [nosuch-if0]}\n"  # never up: run starts no round
        "relays:\n  - host: mail.isp.example\n    tls: starttls\n    etrn: ['@a.example']\n"
        f"    auth: {{username: office, password_file: {secret}}}\n"
        f"control: {{socket: {tmp_path / 'control.sock'}}}\n"
        "log: {level: info, format: json}\n")
    assert parse_yaml(config.read_text()).relays[0].auth.password_file.value == "s3cret-pw "
    res = run_cli("check-config", "-c", str(config))
    assert res.returncode == 0, res.stderr
    [line] = [ln for ln in res.stdout.splitlines() if ln.startswith("secret ")]
    assert line.startswith(
        f"secret relays[mail.isp.example].auth.password_file: notice: {secret}: ")
    assert "ends with white space" in line and "s3cret" not in res.stdout + res.stderr

    with running(config, tmp_path / "log") as daemon:
        warning = daemon.wait_event("password_white_space")
    assert (warning["level"], warning["relay"], warning["file"]) == (
        "warning", "mail.isp.example", str(secret))
    assert "s3cret" not in daemon.text()

    secret.write_text("s3cret-pw\n")
    assert "notice" not in run_cli("check-config", "-c", str(config)).stdout
