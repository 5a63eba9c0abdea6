"""The runtime classes match the schema, and a cached config is the one a validation gives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticUndefined

from etrnd.config import loading, model, schema
from tests.protocols.test_fuzz import configs

ROOT = Path(__file__).resolve().parents[2]

# Configs that use every kind of value the cache has to carry: the example, and ones like
# the tests' (ODMR with LMTP, a local_mta shorthand, metrics, per-relay watches, hosts).
CONFIGS = {
    "example": (ROOT / "config" / "etrnd.example.yaml").read_text(),
    "odmr": """\
local_mta: 127.0.0.1:2525
watch: {interfaces: [eth1, 'ppp*'], up_when: address, family: ipv6, settle: 500ms}
relays:
  - name: fiber
    hosts: [mx1.isp.example, 192.0.2.7]
    port: 2526
    tls: starttls
    verify: false
    etrn: ['@example.org', '#queue', node]
    source: 192.0.2.1
    timeout: 1m
  - name: lte
    protocol: odmr
    host: odmr.isp.example
    auth: {username: office, password_file: PWFILE}
    etrn: [example.org, example.net]
    deliver_to: lmtp:/run/dovecot/lmtp
    max_message_size: 25MiB
    watch: {interfaces: [wwan0], only_when_down: fiber, down_hold: 0}
retry: {first_delay: 1s, max_delay: 2h, factor: 3, jitter: 0, give_up_after: 0}
repeat: 15m
control: {socket: /tmp/etrnd test/c.sock}
log: {level: debug, format: json}
metrics: {listen: '[::1]:9469'}
health: {warning_after: 0, critical_after: 1d}
""",
    "minimal": "relays: [{host: 127.0.0.1, etrn: ['@a.test']}]\n",
    "plaintext": """\
relays:
  - {host: '::1', port: 587, tls: none, etrn: [x], deliver_to: null,
     auth: {username: u, password_file: PWFILE, allow_plaintext: true}}
""",
}


def test_the_runtime_classes_have_the_schemas_fields_and_defaults() -> None:
    # The field lists are written twice (etrnd/config/model.py, schema.py): they must agree.
    assert {m.__name__ for m in schema.RUNTIME} == set(model.CLASSES)
    for pyd, runtime in schema.RUNTIME.items():
        mine = dataclasses.fields(runtime)
        assert [f.name for f in mine] == list(pyd.model_fields), runtime.__name__
        for field in mine:
            info = pyd.model_fields[field.name]
            where = f"{runtime.__name__}.{field.name}"
            if info.default is PydanticUndefined:
                assert field.default is dataclasses.MISSING, f"{where} is required in the schema"
            else:
                assert field.default == schema.runtime(info.default), where
        assert dataclasses.is_dataclass(runtime) and runtime.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_cached_config_is_the_one_a_full_validation_gives(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret-pw \n")  # with a notice: white space at its end
    (tmp_path / "isp").write_text("s3cret-pw\n")  # the example's credential
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    path = tmp_path / "etrnd.yaml"
    path.write_text(CONFIGS[name].replace("PWFILE", str(tmp_path / "pw")))
    full = schema.validate_file(path)
    assert loading.load_config(path) == full  # a miss: validated, then written
    assert list((tmp_path / "state").glob("config-*.json"))

    def no_validation(*args: object, **kw: object) -> model.Config:
        raise AssertionError("validated again: the cache was not used")

    monkeypatch.setattr(schema, "validate_bytes", no_validation)
    cached = loading.load_config(path)
    assert cached == full and repr(cached) == repr(full)
    assert [type(r) for r in cached.relays] == [model.Relay] * len(full.relays)


durations = st.sampled_from([0, 1, 2.5, "0s", "500ms", "30s", "5m", "2h", "1d", "0.25"])
names = st.sampled_from(["mx1.isp.example", "192.0.2.7", "2001:db8::25", "localhost"])
relays = st.fixed_dictionaries(
    {"protocol": st.sampled_from(["etrn", "odmr"])},
    optional={"host": names, "hosts": st.lists(names, min_size=1, max_size=3),
              "port": st.integers(1, 65535),
              "tls": st.sampled_from(["none", "opportunistic", "starttls", "implicit"]),
              "verify": st.booleans(), "helo": st.sampled_from(["gw.example.org", "[192.0.2.1]"]),
              "timeout": st.sampled_from([1, 0.5, "10s", "1m"]),
              "auth": st.fixed_dictionaries({"username": st.just("office"),
                                             "password_file": st.just("PWFILE")},
                                            optional={"allow_plaintext": st.booleans()}),
              "deliver_to": st.sampled_from(["127.0.0.1:25", "lmtp:[::1]:24", "lmtp:/run/lmtp",
                                             "mail.office.example"]),
              "max_message_size": st.sampled_from([1, 5000, "25M", "50MiB"]),
              "source": st.sampled_from(["auto", "kernel", "192.0.2.1", "2001:db8::1"]),
              "watch": st.fixed_dictionaries({}, optional={
                  "interfaces": st.lists(st.sampled_from(["wwan0", "lte*", "usb0"]),
                                         max_size=2),
                  "up_when": st.sampled_from(["carrier", "address"]), "settle": durations,
                  "family": st.sampled_from(["ipv4", "ipv6", "any"]),
                  "min_interval": durations, "down_hold": durations})})
valid_configs = st.fixed_dictionaries(
    {"relays": st.lists(relays, min_size=1, max_size=3)},
    optional={"local_mta": st.sampled_from(["127.0.0.1:25", {"address": "lmtp:/run/l",
                                                             "max_wait": "1m"}]),
              "watch": st.fixed_dictionaries({}, optional={
                  "interfaces": st.lists(st.sampled_from(["ppp0", "eth*", "wan"]), max_size=2),
                  "up_when": st.sampled_from(["carrier", "address", "default-route"]),
                  "settle": durations, "min_interval": durations, "down_hold": durations}),
              "retry": st.fixed_dictionaries({}, optional={
                  "first_delay": st.sampled_from([1, "5s"]), "max_delay": st.just("1h"),
                  "factor": st.sampled_from([1, 1.5, 3]), "jitter": st.sampled_from([0, 0.2, 1]),
                  "give_up_after": durations}),
              "repeat": durations, "control": st.just({"socket": "/run/x/c.sock"}),
              "log": st.fixed_dictionaries({}, optional={
                  "level": st.sampled_from(["debug", "error"]),
                  "format": st.sampled_from(["json", "journal"])}),
              "metrics": st.sampled_from([{}, {"listen": "[::1]:9469"}]),
              "health": st.fixed_dictionaries({}, optional={
                  "warning_after": st.sampled_from([0, "15m"]),
                  "critical_after": st.sampled_from([0, "1h", "2h"])})})


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pw") / "pw"
    path.write_text("s3cret\n")
    return str(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_configs, configs))
def test_the_cache_gives_back_every_accepted_config_value_for_value(
        password_file: str, tree: dict[str, Any]) -> None:
    tree = json.loads(json.dumps(tree).replace('"PWFILE"', json.dumps(password_file)))
    for i, relay in enumerate(tree["relays"]):  # the rules the strategies leave out
        relay.setdefault("name", f"r{i}")
        if "host" not in relay:
            relay.setdefault("hosts", ["mx.isp.example"])
        elif "hosts" in relay:
            del relay["hosts"]
        odmr = relay.get("protocol") == "odmr"
        relay.setdefault("etrn", ["example.org"] if odmr else ["@example.org", "#q"])
        if odmr:
            relay.setdefault("auth", {"username": "office", "password_file": password_file})
        else:
            relay.pop("deliver_to", None)
            relay.pop("max_message_size", None)
    try:
        config = schema.parse_config(tree)
    except model.ConfigError:
        return
    back = loading.decode(json.loads(json.dumps(loading.encode(config))))
    # repr too: 1 == 1.0, but an int where validation gives a float is not the same config.
    assert back == config and repr(back) == repr(config)
