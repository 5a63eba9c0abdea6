"""The validated-config cache, seen from real `etrnd` processes: what a warm start imports,
what a changed file, code or version does, whose cache is believed, what the cache holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pw-5b1f"
CONFIG = """\
watch: {interfaces: [etrnd-none0], up_when: carrier}
relays:
  - name: isp
    host: mail.isp.example
    tls: none
    etrn: ['@example.org']
    auth: {username: office, password_file: PWFILE, allow_plaintext: true}
"""
# How `etrnd run` and `etrnd send` load the config, after importing what they import.
LOAD = """\
import json, sys
import etrnd.send, etrnd.service.daemon
from etrnd.config.preflight import load_or_report
config = load_or_report(sys.argv[1])
print(json.dumps({"validated": "pydantic" in sys.modules, "yaml": "yaml" in sys.modules,
                  "config": repr(config),
                  "hosts": None if config is None else config.relays[0].all_hosts}))
sys.exit(0 if config is not None else 2)
"""


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "state").mkdir(mode=0o700)
    config = tmp_path / "etrnd.yaml"
    config.write_text(CONFIG.replace("PWFILE", str(tmp_path / "pw")))
    return {"dir": tmp_path, "config": config, "state": tmp_path / "state"}


def env_for(state: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STATE_DIRECTORY", "XDG_CACHE_HOME", "CREDENTIALS_DIRECTORY")}
    return {**env, "STATE_DIRECTORY": str(state), **more}


def load(config: Path, env: dict[str, str], cwd: Path = ROOT) -> dict[str, object]:
    res = subprocess.run([sys.executable, "-c", LOAD, str(config)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.stdout, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    out["stderr"], out["rc"] = res.stderr, res.returncode
    return out


def etrnd(*args: str, env: dict[str, str],
          python: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python, "-m", "etrnd", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_warm_start_imports_neither_pydantic_nor_yaml(lab: dict[str, Path]) -> None:
    env = env_for(lab["state"])
    cold = load(lab["config"], env)
    assert cold["validated"] and cold["rc"] == 0
    warm = load(lab["config"], env)
    assert not warm["validated"] and not warm["yaml"], "a warm start validated again"
    assert warm["config"] == cold["config"]
    # Where no cache can be written every start validates, and still loads.
    assert load(lab["config"], env_for(Path("/nonexistent/etrnd-state")))["validated"]


def imported(stderr: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {line.split("|")[2].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_real_run_and_send_started_warm_import_neither_pydantic_nor_yaml(
        lab: dict[str, Path]) -> None:
    # A relay on loopback where nothing listens (the port held, never listening): `send`
    # fails fast (exit 4) after its retries; `run` watches an interface that does not exist.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    lab["config"].write_text(
        "watch: {interfaces: [etrnd-none0], up_when: carrier}\n"
        f"relays: [{{name: isp, host: 127.0.0.1, port: {port}, tls: none, timeout: 1s,"
        " helo: office.test, etrn: ['@example.org']}]\n"
        "retry: {first_delay: 100ms, max_delay: 100ms, give_up_after: 300ms}\n"
        f"control: {{socket: {lab['dir'] / 'control.sock'}}}\n"
        "log: {level: warning, format: json}\n")
    env = env_for(lab["state"])
    try:
        sends = [etrnd("send", "-c", str(lab["config"]), env=env, python=("-X", "importtime"))
                 for _ in range(2)]
    finally:
        holder.close()
    assert [s.returncode for s in sends] == [4, 4], sends[1].stderr[-2000:]
    assert {"pydantic", "yaml"} <= imported(sends[0].stderr)  # cold: validated
    assert not {"pydantic", "yaml"} & imported(sends[1].stderr)
    notify = lab["dir"] / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(1.0)
    run = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "etrnd", "run", "-c",
                            str(lab["config"])], env={**env, "NOTIFY_SOCKET": str(notify)},
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 30
        ready = False
        while not ready and time.monotonic() < deadline and run.poll() is None:
            try:
                ready = b"READY=1" in sock.recv(4096)
            except TimeoutError:
                continue
        assert ready, "etrnd run never sent READY=1"
    finally:
        run.terminate()
        _, stderr = run.communicate(timeout=30)
        sock.close()
    assert run.returncode == 0, stderr[-2000:]
    assert "asyncio" in imported(stderr)
    assert not {"pydantic", "yaml"} & imported(stderr)


def test_an_edited_file_is_validated_again_with_the_same_problems(lab: dict[str, Path]) -> None:
    env = env_for(lab["state"])
    # `send --relay nosuch` loads (and caches) the config, then stops before any network.
    first = etrnd("send", "-c", str(lab["config"]), "--relay", "nosuch", env=env)
    assert first.returncode == 2 and "no relay named 'nosuch'" in first.stderr
    assert list(lab["state"].glob("config-*.json"))
    lab["config"].write_text(lab["config"].read_text().replace("tls: none", "tls: sometimes"))
    warm = etrnd("send", "-c", str(lab["config"]), env=env)
    cold = etrnd("send", "-c", str(lab["config"]), env=env_for(lab["dir"] / "no-cache"))
    assert warm.returncode == cold.returncode == 2
    assert "  relays[isp].tls: must be 'none', 'opportunistic', 'starttls' or 'implicit', " \
           "not 'sometimes'" in warm.stderr
    assert warm.stderr == cold.stderr


def test_a_password_that_cannot_be_read_is_reported_as_without_a_cache(
        lab: dict[str, Path]) -> None:
    env = env_for(lab["state"])
    assert load(lab["config"], env)["rc"] == 0
    (lab["dir"] / "pw").unlink()
    warm = load(lab["config"], env)
    cold = load(lab["config"], env_for(lab["dir"] / "no-cache"))
    assert warm["rc"] == cold["rc"] == 2
    assert f"relays[isp].auth.password_file: cannot read {lab['dir'] / 'pw'}: No such file" \
           in str(warm["stderr"])
    assert warm["stderr"] == cold["stderr"]


@pytest.mark.parametrize("where", ["STATE_DIRECTORY", "XDG_CACHE_HOME"])
def test_the_cache_holds_no_password_and_only_its_user_can_read_it(
        lab: dict[str, Path], where: str) -> None:
    env = env_for(lab["state"])
    if where == "XDG_CACHE_HOME":  # `etrnd send` from a shell or an ip-up script
        del env["STATE_DIRECTORY"]
        env["XDG_CACHE_HOME"] = str(lab["dir"] / "xdg")
    assert load(lab["config"], env)["validated"]
    directory = lab["state"] if where == "STATE_DIRECTORY" else lab["dir"] / "xdg" / "etrnd"
    files = list(directory.iterdir())
    assert [f.name[:7] for f in files] == ["config-"]
    assert PASSWORD not in files[0].read_text()
    assert str(lab["dir"] / "pw") in files[0].read_text()  # the password's file, read again
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not load(lab["config"], env)["validated"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_cache_another_user_owns_or_others_may_write_is_ignored(lab: dict[str, Path]) -> None:
    env = env_for(lab["state"])
    load(lab["config"], env)
    [cached] = lab["state"].glob("config-*.json")
    # A cache that says something else than the file: believed only when it is ours alone.
    cached.write_text(cached.read_text().replace('"mail.isp.example"', '"evil.example"'))
    assert load(lab["config"], env)["hosts"] == ["evil.example"]  # ours, 0600: believed
    # check-config never believes it.
    check = etrnd("check-config", "-c", str(lab["config"]), env=env)
    assert "relay isp: mail.isp.example port 25" in check.stdout, check.stderr
    for change in ("group-writable", "world-writable", "another owner"):
        if change == "another owner":
            os.chown(cached, 65534, 65534)
            cached.chmod(0o600)
        else:
            cached.chmod(0o620 if change == "group-writable" else 0o602)
        out = load(lab["config"], env)
        assert out["validated"] and out["hosts"] == ["mail.isp.example"], change
        # The full validation replaced the untrusted copy with one of its own.
        info = cached.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600), change
        assert "evil" not in cached.read_text(), change
        cached.write_text(cached.read_text().replace('"mail.isp.example"', '"evil.example"'))


def test_a_changed_config_source_or_version_validates_again(lab: dict[str, Path]) -> None:
    # A copy of etrnd, so its sources and version can change as an upgrade changes them.
    copy = lab["dir"] / "src"
    shutil.copytree(ROOT / "etrnd", copy / "etrnd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = env_for(lab["state"], PYTHONPATH=str(copy))

    def validated() -> bool:
        out = load(lab["config"], env, cwd=copy)
        assert out["rc"] == 0, out["stderr"]
        return bool(out["validated"])

    assert validated() and not validated()
    values = copy / "etrnd" / "config" / "values.py"
    values.write_text(values.read_text() + "\n# a changed line\n")
    assert validated() and not validated()
    init = copy / "etrnd" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9'))
    assert validated() and not validated()


def test_an_upgraded_pydantic_or_pyyaml_validates_again(lab: dict[str, Path]) -> None:
    # Copies of the installed validators first on the path, so their version can change as a
    # `pip install -U` changes it, with etrnd itself unchanged.
    import pydantic
    import yaml

    libs = lab["dir"] / "libs"
    for module in (pydantic, yaml):
        shutil.copytree(Path(module.__file__).parent, libs / module.__name__,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = env_for(lab["state"], PYTHONPATH=f"{ROOT}:{libs}")

    def validated() -> bool:
        out = load(lab["config"], env)
        assert out["rc"] == 0, out["stderr"]
        return bool(out["validated"])

    assert validated() and not validated()
    version = libs / "pydantic" / "version.py"
    version.write_text(re.sub(r"^VERSION = '", "VERSION = '9", version.read_text(), flags=re.M))
    assert validated() and not validated()
    init = libs / "yaml" / "__init__.py"
    init.write_text(init.read_text().replace("__version__ = '", "__version__ = '9"))
    assert validated() and not validated()

