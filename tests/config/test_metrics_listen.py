"""`metrics.listen`: the forms an operator writes are taken, mistakes refused in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest

from etrnd.config.model import ConfigError
from etrnd.config.schema import parse_yaml

RELAY = "relays: [{name: isp, host: 127.0.0.1, port: 2, helo: gw.example.org, etrn: ['@x.test']}]\n"


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:9469", "127.0.0.1", 9469),
    ("[::1]:9469", "::1", 9469),
    ("localhost:9100", "localhost", 9100),
    ("0.0.0.0:9469", "0.0.0.0", 9469),
])
def test_listen_forms_accepted(listen: str, host: str, port: int) -> None:
    config = parse_yaml(RELAY + f'metrics: {{listen: "{listen}"}}\n')
    assert config.metrics is not None and config.metrics.listen == listen


def test_metrics_are_off_unless_configured_and_default_to_loopback() -> None:
    assert parse_yaml(RELAY).metrics is None
    config = parse_yaml(RELAY + "metrics: {}\n")
    assert config.metrics is not None and config.metrics.listen == "127.0.0.1:9469"


@pytest.mark.parametrize(("listen", "words"), [
    ("9469", 'should be "ADDRESS:PORT", e.g. 127.0.0.1:9469 or [::1]:9469'),
    ("127.0.0.1", 'should be "ADDRESS:PORT"'),
    (":9469", 'should be "ADDRESS:PORT"'),
    ("127.0.0.1:99999", "the port must be 1-65535"),
    ("127.0.0.1:0", "the port must be 1-65535"),
    ("::1:9469", "an IPv6 address goes in brackets, e.g. [::1]:9469"),
    ("[127.0.0.1]:9469", "'127.0.0.1' is not an IPv6 address"),
    ("300.1.2.3:9469", "'300.1.2.3' is not an IPv4 address"),
    ("local host:9469", "must not contain white space"),
])
def test_bad_listen_is_refused_in_plain_words(listen: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_yaml(RELAY + f'metrics: {{listen: "{listen}"}}\n')
    [problem] = err.value.problems
    assert problem.startswith("metrics.listen: "), problem
    assert words in problem, problem




def test_check_config_shows_the_url_and_warns_about_every_address(tmp_path: Path) -> None:
    from tests.config.test_check_config_words import check, warned

    path = tmp_path / "etrnd.yaml"
    base = ("watch: {interfaces: [lo]}\n" + RELAY.replace("example.org", "office.test")
            + f"control: {{socket: {tmp_path / 'control.sock'}}}\n")
    path.write_text(base + 'metrics: {listen: "[::1]:9469"}\n')
    res = check(path)
    assert warned(res) == [], res.stderr
    assert "metrics: http://[::1]:9469/metrics (Prometheus)" in res.stdout.splitlines()
    path.write_text(base + 'metrics: {listen: "0.0.0.0:9469"}\n')
    res = check(path)
    assert warned(res) == [
        "metrics.listen: 0.0.0.0:9469 serves the metrics on every address, the WAN's too, "
        "without authentication; give 127.0.0.1, [::1] or a management network's address "
        "(e.g. 127.0.0.1:9469)"]
    assert check(path, "--strict").returncode == 2
