"""Property tests: the config loader only ever says `key.path: reason`; replies are always safe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etrnd.config.model import Config, ConfigError
from etrnd.config.schema import parse_config, parse_yaml
from etrnd.protocols.replies import Outcome, classify_auth, classify_reply, clean_text, failure

ROOT = Path(__file__).resolve().parents[2]
# One line, something before the colon (a key path, `(top level)` or `file:line:col`).
PROBLEM = re.compile(r"^[^\n]*\S: [^\n]*\S$")
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_only_config_errors(text_or_tree: Any, *, from_text: bool) -> Config | None:
    try:
        if from_text:
            return parse_yaml(text_or_tree)
        return parse_config(text_or_tree)
    except ConfigError as exc:
        problems = exc.problems
    assert problems, "a ConfigError with no problem in it"
    for problem in problems:
        assert PROBLEM.match(problem), f"not `key.path: reason`: {problem!r}"
    return None


# --- wire values of an accepted config -----------------------------------------------------

def _wire_token(value: str) -> bool:
    """What goes into an SMTP command line: printable ASCII, no space, no CR/LF/NUL."""
    return bool(value) and all(33 <= ord(c) <= 126 for c in value)


def assert_wire_safe(config: Config) -> None:
    for relay in config.relays:
        for arg in relay.etrn:
            assert _wire_token(arg), f"ETRN argument {arg!r} accepted"
        if relay.helo is not None:
            assert _wire_token(relay.helo), f"helo {relay.helo!r} accepted"
        for host in relay.all_hosts:
            assert _wire_token(host), f"host {host!r} accepted"
        if relay.auth is not None:
            # Sent base64-encoded, so UTF-8 is fine; a line break or NUL never is.
            assert not any(c.isspace() or ord(c) < 32 or ord(c) == 127
                           for c in relay.auth.username)


# --- strategies -------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e400", "30s", "500ms", "2h", "nan", "inf", ".inf",
                     "any", "carrier", "none", "starttls", "@x.test", "#q", "a\r\nb", "a\0b",
                     "[x]", "[é]", "[\u0085]", "[1.2.3.4]", "é.test", "a b", "\u2028"]),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(), st.none()), children,
                        max_size=4)),
    max_leaves=20,
)

# Values that are valid, nearly valid, or hostile, for each key that reaches the wire.
tokens = st.one_of(
    st.sampled_from(["@example.org", "example.net", "#office-queue", "mail.isp.example",
                     "192.0.2.1", "2001:db8::1", "[192.0.2.1]", "[IPv6:2001:db8::1]",
                     "gw.example.org", "office"]),
    st.text(max_size=30),
    st.builds(lambda a, bad, b: a + bad + b, st.sampled_from(["@a.test", "[1.2.3.4", "x", ""]),
              st.sampled_from(["\r\n", "\n", "\r", "\0", " ", "\t", "\x0b", "\u2028", "\x85",
                               "é", "\x9b", "\ufeff", "]"]),
              st.sampled_from(["", "QUIT", "b.test", "]", "x"])),
)
relays = st.fixed_dictionaries(
    {"host": tokens, "etrn": st.lists(tokens, min_size=1, max_size=3)},
    optional={"helo": tokens, "name": tokens, "port": st.one_of(st.integers(), tokens),
              "tls": st.sampled_from(["none", "opportunistic", "starttls", "implicit", "x"]),
              "timeout": scalars, "verify": scalars,
              "auth": st.fixed_dictionaries({"username": tokens,
                                             "password_file": st.just("/nonexistent/pw")})},
)
configs = st.fixed_dictionaries(
    {"relays": st.lists(relays, min_size=1, max_size=2)},
    optional={"watch": st.fixed_dictionaries({}, optional={
                  "interfaces": st.lists(tokens, max_size=2), "settle": scalars,
                  "min_interval": scalars, "up_when": scalars, "family": scalars}),
              "retry": st.dictionaries(st.sampled_from(["first_delay", "max_delay", "factor",
                                                        "jitter", "give_up_after", "bogus"]),
                                       scalars, max_size=3),
              "repeat": scalars,
              "control": st.fixed_dictionaries({"socket": tokens}),
              "log": st.dictionaries(st.sampled_from(["level", "format"]), scalars)},
)


@FAST
@given(st.text(max_size=300))
@example("watch: {settle: " + "9" * 400 + "}\nrelays: [{host: a.test, etrn: ['@x']}]")
@example("? [a]\n: b\n")
@example("{a: 1}: 2\n")
@example("[" * 5000)
@example("\x9b")
@example("relays: !!python/object:os.system [ls]")
def test_any_text_is_a_config_or_config_errors(text: str) -> None:
    assert_only_config_errors(text, from_text=True)


@FAST
@given(trees)
def test_any_yaml_tree_is_a_config_or_config_errors(tree: Any) -> None:
    assert_only_config_errors(tree, from_text=False)
    # And the same tree as YAML text (keys of any type, anchors, quoting) through the parser.
    assert_only_config_errors(yaml.safe_dump(tree, allow_unicode=True), from_text=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
@example({"relays": [{"host": "a.test", "etrn": ["@x"], "helo": "[é]"}]})
@example({"relays": [{"host": "[a]b]", "etrn": ["@x"]}]})
@example({"relays": [{"host": "a.test", "etrn": ["@x"]}], "control": {"socket": "/tmp/a\0b"}})
def test_accepted_configs_put_nothing_unsafe_on_the_wire(tree: dict[str, Any]) -> None:
    config = assert_only_config_errors(tree, from_text=False)
    if config is not None:
        assert_wire_safe(config)
        assert "\0" not in str(config.control.socket)


@FAST
@given(configs)
def test_yaml_text_of_config_shaped_trees(tree: dict[str, Any]) -> None:
    config = assert_only_config_errors(yaml.safe_dump(tree, allow_unicode=True),
                                       from_text=True)
    if config is not None:
        assert_wire_safe(config)


# --- replies ----------------------------------------------------------------------------

# aiosmtplib hands over text decoded with surrogateescape: lone surrogates are real input.
reply_text = st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
                       st.text(min_size=500, max_size=5000))


def assert_safe_text(text: str) -> None:
    assert text.isprintable() and "\n" not in text and "\r" not in text
    assert len(text) <= 300
    text.encode("utf-8")  # no lone surrogate survives (it would break JSON/journal output)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-10**6, max_value=10**6), reply_text)
def test_any_reply_is_classified_safely(code: int, text: str) -> None:
    verdict = classify_reply(code, text)
    assert isinstance(verdict.outcome, Outcome)
    assert_safe_text(verdict.text)
    if 250 <= code <= 253:
        assert verdict.outcome is Outcome.ACCEPTED
    elif not 200 <= code <= 599:
        assert verdict.outcome is Outcome.TRANSIENT and verdict.error == "ProtocolError"
    if verdict.pending is not None:
        assert code == 253 and verdict.pending >= 0
    auth = classify_auth(code, text)
    assert_safe_text(auth.text)
    assert_safe_text(failure("X", text, code).text)


@settings(max_examples=200, deadline=None)
@given(reply_text, st.integers(min_value=1, max_value=400))
def test_clean_text_respects_its_limit(text: str, limit: int) -> None:
    cleaned = clean_text(text, max(limit, 4))
    assert len(cleaned) <= max(limit, 4)
    assert cleaned.isprintable()


# --- the command line on bad files: exit 2, problems listed, no traceback ----------------------

BAD_FILES = [
    "watch: {settle: " + "9" * 400 + "}\nrelays: [{host: a.test, etrn: ['@x']}]\n",
    "? [a]\n: b\n",
    "[" * 5000 + "\n",
    "relays: [{host: a.test, etrn: ['@x'], helo: '[é]'}]\n",
    "relays: [{host: a.test, etrn: [\"@x\\r\\nQUIT\"]}]\n",
    "relays: [{host: a.test, etrn: ['@x']}]\ncontrol: {socket: \"/tmp/a\\0b\"}\n",
    "\x9b\n",
    "relays:\n  - host: a.test\n    etrn: ['@x']\n    host: b.test\n",
]


def test_cli_reports_bad_files_without_traceback(tmp_path: Path) -> None:
    for n, text in enumerate(BAD_FILES):
        path = tmp_path / f"bad{n}.yaml"
        path.write_text(text)
        res = subprocess.run([sys.executable, "-m", "etrnd", "check-config", "-c", str(path)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
        assert res.returncode == 2, (text[:80], res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        lines = res.stderr.splitlines()
        assert lines[0].startswith("etrnd: invalid configuration ")
        assert lines[1:] and all(PROBLEM.match(line.strip()) for line in lines[1:]), lines
