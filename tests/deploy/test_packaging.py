"""The systemd unit, Dockerfile and compose file: linted by the real tools, and their facts.

Checked here what an operator relies on: systemd accepts the unit without a single warning and
rates its sandbox "OK" or better; hadolint has nothing to say about the Dockerfile; the image,
the compose file and the unit agree with the daemon's own defaults (config path, socket
directory) and run it the way the docs say.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from etrnd.config.credentials import CREDENTIALS_ENV
from etrnd.config.model import DEFAULT_PATH, ENV_CONFIG, Control
from tests.deploy.test_install import BUILD_INPUTS

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "etrnd.service"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
# Where the README installs the command (a venv in /opt/etrnd linked here, or pipx/uv with
# their bin dir set to /usr/local/bin).
INSTALLED_ETRND = "/usr/local/bin/etrnd"
MAX_EXPOSURE = 2.0  # systemd-analyze security: <= 2.0 is "OK", lower is better


def _tool(name: str) -> str:
    """A tool next to this interpreter (venv console scripts) or on PATH; skip if absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test.sh installs it)")
    return found


# --- systemd unit -------------------------------------------------------------------------

@dataclass
class Unit:
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def one(self, section: str, key: str) -> str:
        values = self.values(section, key)
        assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
        return values[0]

    def words(self, section: str, key: str) -> set[str]:
        """Space-separated list settings; an empty assignment resets, as in systemd."""
        result: set[str] = set()
        for value in self.values(section, key):
            result = set() if not value else result | set(value.split())
        return result


def parse_unit(text: str) -> Unit:
    unit = Unit()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not handled: {line}"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"not a unit file line: {raw!r}"
        unit.sections[section].append((key.strip(), value.strip()))
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's etrnd.

    `systemd-analyze verify` insists the ExecStart binary exists; /usr/local/bin/etrnd
    exists on a gateway, not on a CI runner. Nothing else changes.
    """
    etrnd = _tool("etrnd")
    text = UNIT.read_text()
    rewritten, count = re.subn(
        rf"^ExecStart={re.escape(INSTALLED_ETRND)} ", f"ExecStart={etrnd} ", text, flags=re.M
    )
    assert count == 1, f"ExecStart does not run {INSTALLED_ETRND}"
    path = tmp_path / UNIT.name
    path.write_text(rewritten)
    return path


def _verify(path: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", path.name],
        cwd=path.parent, capture_output=True, text=True, timeout=60,
    )
    complaints = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    return result.returncode, complaints


def test_systemd_accepts_the_unit_without_warnings(testable_unit: Path) -> None:
    rc, complaints = _verify(testable_unit)
    assert rc == 0 and not complaints, "systemd-analyze verify:\n" + "\n".join(complaints)


def test_verify_check_would_catch_a_warning(testable_unit: Path) -> None:
    # systemd only *warns* about an unknown or misspelt key and exits 0; make sure such a
    # warning would fail the test above rather than pass unseen.
    text = testable_unit.read_text().replace("[Service]\n", "[Service]\nProtectSytem=strict\n")
    testable_unit.write_text(text)
    _rc, complaints = _verify(testable_unit)
    assert any("ProtectSytem" in line for line in complaints), complaints


def _security(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=true", *extra, str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_sandbox_exposure_is_ok_or_better(testable_unit: Path) -> None:
    result = _security(testable_unit)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, f"no overall exposure line in:\n{result.stdout}{result.stderr}"
    score, verdict = float(match.group(1)), match.group(2)
    print(f"systemd-analyze security: exposure {score} {verdict}")
    assert score <= MAX_EXPOSURE, (
        f"exposure {score} {verdict} (want <= {MAX_EXPOSURE}):\n{result.stdout}"
    )


def test_sandbox_keeps_only_the_host_network(testable_unit: Path) -> None:
    # The one deliberate gap in the sandbox: the host's network (netlink must see the real
    # WAN). Every capability check and the rest of the isolation must pass.
    result = _security(testable_unit, "--json=short")
    assert result.returncode == 0, result.stderr
    checks: list[dict[str, Any]] = json.loads(result.stdout)
    failed = {c["name"] for c in checks if c["set"] is False or (c["exposure"] or 0) > 0}
    allowed = {
        "PrivateNetwork=",  # netlink needs the host's interfaces
        "IPAddressDeny=",  # the ISP's relays can be anywhere
        "RestrictAddressFamilies=~AF_NETLINK",  # link events
        "RestrictAddressFamilies=~AF_UNIX",  # control socket, journal, notify
        "RestrictAddressFamilies=~AF_(INET|INET6)",  # SMTP
        "RootDirectory=/RootImage=",  # a chroot would need its own Python install
        "DeviceAllow=",  # ProtectClock= itself allows reading the RTC
        "UMask=",  # 0007: the service's own group shares the control socket
    }
    assert failed <= allowed, f"unexpected sandbox gaps: {sorted(failed - allowed)}"


def test_unit_runs_the_daemon_as_documented(unit: Unit) -> None:
    assert unit.one("Service", "ExecStart") == f"{INSTALLED_ETRND} run"
    assert unit.one("Service", "ExecReload") == """/bin/sh -c 'kill -HUP "$MAINPID"'"""
    assert unit.one("Service", "Type") == "notify"
    assert unit.one("Service", "NotifyAccess") == "main"
    assert unit.one("Service", "Restart") == "on-failure"
    # A bad config (exit 2) cannot be cured by restarting.
    assert "2" in unit.words("Service", "RestartPreventExitStatus")
    watchdog = unit.one("Service", "WatchdogSec")
    assert re.fullmatch(r"[1-9]\d*(s|min)?", watchdog), watchdog


def test_unit_waits_for_the_network_stack_not_for_the_link(unit: Unit) -> None:
    assert "network.target" in unit.words("Unit", "After")
    for key in ("After", "Wants", "Requires", "BindsTo"):
        assert "network-online.target" not in unit.words("Unit", key), key
    assert unit.words("Install", "WantedBy") == {"multi-user.target"}


def test_unit_directories_match_the_daemons_defaults(unit: Unit) -> None:
    assert Path("/etc") / unit.one("Service", "ConfigurationDirectory") == DEFAULT_PATH.parent
    assert Path("/run") / unit.one("Service", "RuntimeDirectory") == Control().socket.parent
    # Group needs x on the directory to reach the 0660 socket; others get nothing.
    mode = int(unit.one("Service", "RuntimeDirectoryMode"), 8)
    assert mode & 0o010 and not mode & 0o007, oct(mode)
    assert unit.one("Service", "LoadCredential") == "isp:/etc/etrnd/isp.secret"


def test_unit_sandbox_facts(unit: Unit) -> None:
    s = "Service"
    assert unit.one(s, "DynamicUser") == "yes"
    assert unit.words(s, "RestrictAddressFamilies") == {
        "AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"
    }
    assert unit.values(s, "CapabilityBoundingSet") == [""]
    assert unit.values(s, "AmbientCapabilities") == [""]
    assert unit.one(s, "ProtectSystem") == "strict"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
                "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute"):
        assert unit.one(s, key) == "yes", key
    assert unit.one(s, "ProtectProc") == "invisible"
    assert unit.one(s, "ProcSubset") == "pid"
    assert unit.one(s, "SystemCallArchitectures") == "native"
    filters = unit.values(s, "SystemCallFilter")
    assert "@system-service" in filters
    denied = {w for f in filters if f.startswith("~") for w in f[1:].split()}
    assert {"@privileged", "@resources"} <= denied
    # The daemon must see and use the host's own interfaces and reach any ISP address.
    assert not unit.values(s, "PrivateNetwork")
    assert not unit.values(s, "IPAddressDeny")


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

_UNDER_MDWE = textwrap.dedent("""
    import ctypes, mmap, sys
    # The sandbox is really on: a writable+executable mapping is refused.
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping was allowed: MDWE is not in effect")
    except OSError:
        pass
    import aiosmtplib, pydantic, pyroute2, structlog, yaml
    import etrnd.cli, etrnd.config.schema, etrnd.service.daemon
    # The daemon's socket filter: a classic BPF program laid out with ctypes.
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]
    prog = (SockFilter * 2)(SockFilter(0x06, 0, 0, 0xFFFFFFFF), SockFilter(0x06, 0, 0, 0))
    SockFprog(2, prog)
    sys.exit(etrnd.cli.main(["check-config", "-c", sys.argv[1]]))
""")


def test_runtime_works_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes must not break CPython, pydantic-core or the BPF struct.

    The kernel's PR_SET_MDWE (what systemd >= 255 uses for that setting; older versions use
    an equivalent seccomp filter) is set here, then a fresh interpreter inherits it across
    exec, imports everything the daemon does and validates a config.
    """
    config = tmp_path / "etrnd.yaml"
    config.write_text("relays:\n  - host: mail.isp.example\n    etrn: ['@example.org']\n")
    probe = subprocess.run(
        [sys.executable, "-c",
         f"import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, "
         f"{PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)"],
        capture_output=True, timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to reproduce the setting")

    def enter_mdwe() -> None:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        if prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")

    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, str(config)],
        preexec_fn=enter_mdwe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "valid" in result.stdout


# --- Dockerfile -----------------------------------------------------------------------------

@dataclass
class Instruction:
    op: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage (index 0 = before the first FROM: ARGs)."""
    stages: list[list[Instruction]] = [[]]
    logical = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        if logical.strip():
            op, _, args = logical.strip().partition(" ")
            if op.upper() == "FROM":
                stages.append([])
            stages[-1].append(Instruction(op.upper(), args.strip()))
        logical = ""
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _find(stage: list[Instruction], op: str) -> list[Instruction]:
    return [i for i in stage if i.op == op]


def _global_args(stages: list[list[Instruction]]) -> dict[str, str]:
    args = {}
    for instr in _find(stages[0], "ARG"):
        name, _, default = instr.args.partition("=")
        args[name] = default
    return args


def _stage_args(stage: list[Instruction]) -> dict[str, str]:
    return dict(i.args.partition("=")[::2] for i in _find(stage, "ARG"))


def test_hadolint_has_nothing_to_say() -> None:
    hadolint = _tool("hadolint")
    # An inline ignore would make "no warnings" meaningless.
    assert "hadolint ignore" not in DOCKERFILE.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not findings, findings


def test_base_image_is_a_pinned_slim_python_build_argument(
    stages: list[list[Instruction]],
) -> None:
    base = _global_args(stages)
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+(@sha256:[0-9a-f]{64})?",
                        base.get("PYTHON_IMAGE", "")), base
    froms = [stage[0].args.split()[0] for stage in stages[1:]]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    assert set(froms) == {"${PYTHON_IMAGE}"}, froms


def test_image_runs_etrnd_run_as_non_root(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    entrypoint = _find(final, "ENTRYPOINT")[-1].exec_form()
    cmd = _find(final, "CMD")[-1].exec_form()
    assert entrypoint + cmd == ["etrnd", "run"]
    user = _find(final, "USER")[-1].args
    uid = user.split(":")[0]
    assert uid not in ("", "0", "root"), user
    assert _find(final, "STOPSIGNAL")[-1].args == "SIGTERM"


def test_image_user_owns_the_socket_directory(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    uid, _, gid = _find(final, "USER")[-1].args.partition(":")
    assert _stage_args(final).get("ETRND_UID") == uid == gid, "USER is not ETRND_UID:ETRND_UID"
    runs = " ".join(i.args for i in _find(final, "RUN"))
    # The account behind USER: same numbers, so file ownership and compose's tmpfs agree.
    assert re.search(r'groupadd [^&]*--gid "\$\{ETRND_UID\}" etrnd\b', runs), runs
    assert re.search(r'useradd [^&]*--uid "\$\{ETRND_UID\}" --gid etrnd\b', runs), runs
    socket_dir = str(Control().socket.parent)
    assert re.search(rf"install -d -o etrnd -g etrnd -m 07[0-7]0 {socket_dir}\b", runs), runs


def test_healthcheck_asks_the_daemon(stages: list[list[Instruction]]) -> None:
    checks = _find(stages[-1], "HEALTHCHECK")
    assert len(checks) == 1
    _options, _, command = checks[0].args.partition("CMD ")
    # `etrnd check` (Nagios exit codes): unhealthy while relays fail, not only without a daemon.
    assert json.loads(command) == ["etrnd", "check"]
    # The state file's directory, the daemon's own, named the way systemd names it.
    env = " ".join(i.args for i in _find(stages[-1], "ENV"))
    assert "STATE_DIRECTORY=/var/lib/etrnd" in env
    runs = " ".join(i.args for i in _find(stages[-1], "RUN"))
    assert re.search(r"install -d -o etrnd -g etrnd -m 0750 [^&]*/var/lib/etrnd\b", runs), runs


def test_image_config_path_is_the_daemons_default(stages: list[list[Instruction]]) -> None:
    env = " ".join(i.args for i in _find(stages[-1], "ENV"))
    assert f"{ENV_CONFIG}={DEFAULT_PATH}" in shlex.split(env)
    assert str(DEFAULT_PATH) == "/etc/etrnd/etrnd.yaml"


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_build_context_holds_what_the_build_copies_and_nothing_private(
    stages: list[list[Instruction]],
) -> None:
    copied: list[str] = []
    for stage in stages[1:]:
        for instr in _find(stage, "COPY"):
            words = [w for w in instr.args.split() if not w.startswith("--")]
            copied += [w.rstrip("/") for w in words[:-1]]
    # test_install builds the wheel from exactly these, so they are known to be enough.
    assert sorted(copied) == sorted(BUILD_INPUTS)
    for path in ("pyproject.toml", "README.md", "etrnd/cli.py", "etrnd/py.typed"):
        assert _dockerignore_allows(path), path
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_config.py", "isp.secret",
                 "etrnd.yaml", "etrnd/__pycache__/cli.cpython-311.pyc"):
        assert not _dockerignore_allows(path), path


# --- compose.yaml ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert list(services) == ["etrnd"]
    svc: dict[str, Any] = services["etrnd"]
    svc["_top_secrets"] = compose.get("secrets", {})
    return svc


def _tmpfs_options(service: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    entries = service.get("tmpfs", [])
    for entry in [entries] if isinstance(entries, str) else entries:
        path, _, opts = entry.partition(":")
        yield path, dict(o.partition("=")[::2] for o in opts.split(",") if o)


def test_compose_uses_the_hosts_network(service: dict[str, Any]) -> None:
    assert service["network_mode"] == "host"


def test_compose_locks_the_container_down(service: dict[str, Any]) -> None:
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert not service.get("cap_add")
    assert any(o.startswith("no-new-privileges") and not o.endswith(":false")
               for o in service["security_opt"])
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert not service.get("privileged")


def test_compose_socket_tmpfs_belongs_to_the_image_user(
    service: dict[str, Any], stages: list[list[Instruction]],
) -> None:
    uid, _, gid = _find(stages[-1], "USER")[-1].args.partition(":")
    tmpfs = dict(_tmpfs_options(service))
    socket_dir = str(Control().socket.parent)
    assert socket_dir in tmpfs, f"no writable {socket_dir} on a read-only root: {tmpfs}"
    assert tmpfs[socket_dir].get("uid") == uid, tmpfs[socket_dir]
    assert tmpfs[socket_dir].get("gid") == gid, tmpfs[socket_dir]


def test_compose_mounts_config_read_only_and_password_as_secret(
    service: dict[str, Any], stages: list[list[Instruction]],
) -> None:
    mounts = [v.split(":") for v in service["volumes"]]
    config = [m for m in mounts if m[1] == str(DEFAULT_PATH)]
    assert config and config[0][2:] == ["ro"], mounts
    assert service["secrets"] == ["isp"]  # appears as /run/secrets/isp
    assert "file" in service["_top_secrets"]["isp"]
    # The example config's bare credential name finds it: the image looks in /run/secrets.
    env = shlex.split(" ".join(i.args for i in _find(stages[-1], "ENV")))
    assert f"{CREDENTIALS_ENV}=/run/secrets" in env
    example = yaml.safe_load((ROOT / "config" / "etrnd.example.yaml").read_text())
    assert example["relays"][0]["auth"]["password_file"] == "isp"


def test_compose_builds_with_the_dockerfiles_base(
    service: dict[str, Any], stages: list[list[Instruction]],
) -> None:
    assert service["build"]["args"]["PYTHON_IMAGE"] == _global_args(stages)["PYTHON_IMAGE"]
