"""The runtime classes match the schema, and a cached config is the one a validation gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic_core import PydanticUndefined

from etrnd.config import loading, model, schema

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
