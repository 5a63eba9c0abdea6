"""The docs' Docker and Compose commands, run for real: the image built with podman, on a test WAN.

No registry is reachable, so the Dockerfile's base image is a local stand-in made from a
debootstrapped bookworm (tests/podman.py says what differs). The commands are read from
the docs and translated to podman only where podman needs it (see `translate`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import docs
from tests.support import podman as pm
from tests.support.daemonproc import wait_for
from tests.support.nettools import Linked, linked
from tests.support.rootfs import CACHE, _locked

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
ISP, OFFICE = "192.0.2.1", "192.0.2.2"
BASE_PYTHON = "3.11"  # the Python of the Dockerfile's base image (python:3.11-slim-bookworm)
PASSWORD = secrets.token_urlsafe(12)  # the relay's AUTH password, must reach it and no log


def sh_block(name: str, marker: str) -> list[list[str]]:
    """The commands of the ```sh block of `name` that contains `marker`, as argv lists."""
    for block in docs.sh_blocks(docs.read(name)):
        if marker in block:
            text = block.replace("\\\n", " ")
            argvs = (shlex.split(line, comments=True) for line in text.splitlines())
            return [argv for argv in argvs if argv]
    raise AssertionError(f"no ```sh block with {marker!r} in {name}")


def docker_commands() -> list[list[str]]:
    return sh_block("README.md", "docker build")


def compose_commands() -> list[list[str]]:
    return sh_block("docs/deployment.md", "docker compose up")


@dataclass
class Env:
    """Names and paths of one test run: unique, so runs on a shared machine never collide."""

    tmp: Path
    image: str
    name: str = field(default_factory=lambda: f"etrnd-test-{os.getpid()}-{secrets.token_hex(3)}")

    def host_path(self, path: str) -> str:
        # The README's host files live in /etc/etrnd; ours live in the test's directory.
        if path == "/etc/etrnd":
            return str(self.tmp)
        return str(self.tmp / Path(path).name) if path.startswith("/etc/etrnd/") else path


def translate(argv: list[str], env: Env, compose: Path | None = None) -> list[str]:
    """A README command as this test runs it. Differences, all because of podman:

    `docker` -> `podman` (`docker compose` -> `podman-compose`, from PyPI); the tmpfs's
    `uid=10001,gid=10001` -> `U` (podman 4.3 refuses uid=/gid=; `U` chowns it to the
    image's user); `build` gains `--format docker` (else the HEALTHCHECK is dropped) and
    an offline wheelhouse mounted for the build only; `run` gains `--read-only-tmpfs=false`
    (podman's --read-only would add a writable /tmp, Docker's does not). The names `etrnd`
    become this run's unique container/image names; /etc/etrnd/ files, the test's copies.
    (`sudoedit` is not translated: `host_command` types the password instead.)
    """
    if argv[0] == "sudo":
        argv = argv[1:]
    if argv[0] != "docker":
        return [env.host_path(a) for a in argv]
    if argv[1] == "compose":
        assert compose is not None
        return [str(compose), *argv[2:]]
    sub, rest = argv[1], argv[2:]
    out = ["podman", sub]
    if sub == "build":
        out += ["--format", "docker", "--pull=never", "--layers=false"]
    if sub == "run":
        out.append("--read-only-tmpfs=false")
    named = False
    for i, arg in enumerate(rest):
        if arg == "etrnd" and sub == "build":
            arg = env.image
        elif arg == "etrnd" and sub == "run":
            arg = env.name if rest[i - 1] == "--name" else env.image
        elif arg == "etrnd" and not named:
            arg, named = env.name, True  # logs/exec/kill/stop NAME [COMMAND...]
        elif arg == "." and sub == "build":
            arg = str(ROOT)
        elif rest[i - 1] == "--tmpfs":
            arg = arg.replace("uid=10001,gid=10001", "U")
        elif rest[i - 1] == "-v":
            src, _, dst = arg.partition(":")
            arg = f"{env.host_path(src)}:{dst}"
        out.append(arg)
    return out


def host_command(argv: list[str], env: Env) -> None:
    """A README line that runs on the host, from the source directory, as root."""
    if argv[0] == "sudoedit":  # the operator types the relay's password
        (path,) = argv[1:]
        with Path(env.host_path(path)).open("w") as fh:  # in place: mode and owner stay
            fh.write(PASSWORD + "\n")
        return
    subprocess.run(translate(argv, env), check=True, timeout=30, cwd=ROOT)


def wheelhouse() -> Path:
    """Wheels of the project's dependencies and build backend for the base image's Python.

    Fetched by the host's pip, so the image build can run offline: pip in a container cannot
    verify TLS to the index this machine's pip uses (its CA bundle and index settings are host
    configuration). Cached, keyed by the requirements.
    """
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = sorted([*meta["build-system"]["requires"], *meta["project"]["dependencies"]])
    key = hashlib.sha256(json.dumps([reqs, BASE_PYTHON]).encode()).hexdigest()[:12]
    path = CACHE / f"wheels-{key}"
    with _locked(CACHE / f"{path.name}.lock"):
        if not path.is_dir():
            tmp = path.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            res = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                                  "--only-binary=:all:", "--python-version", BASE_PYTHON,
                                  "--dest", str(tmp), *reqs],
                                 capture_output=True, text=True, timeout=600, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"pip download failed:\n{res.stderr[-3000:]}")
            tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    """The README's `docker build`, run with podman against the stand-in base; removed after."""
    try:
        pm.check_usable()
    except pm.PodmanUnavailable as exc:
        pytest.skip(str(exc))
    pm.stand_in_base()
    tmp = tmp_path_factory.mktemp("build")
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheelhouse\n")
    env = Env(tmp, f"localhost/etrnd-test:{os.getpid()}-{secrets.token_hex(3)}")
    (build,) = [c for c in docker_commands() if c[:2] == ["docker", "build"]]
    cmd = translate(build, env)
    # Build-only mounts (podman's `build -v`): never part of the image.
    cmd[2:2] = ["-v", f"{wheelhouse()}:/wheelhouse:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    started = time.monotonic()
    try:
        pm.podman(*cmd[1:], timeout=900)
        yield env.image, time.monotonic() - started
    finally:
        pm.podman("rmi", "-f", env.image, check=False)


class Relay:
    """tests/etrn_server.py on port 25 in the ISP namespace, asking for AUTH PLAIN."""

    def __init__(self, net: Linked) -> None:
        env = {**os.environ, "ETRN_SERVER_AUTH": f"office:{PASSWORD}"}
        self.proc = net.isp.popen(sys.executable, "-m", "tests.support.etrn_server", ISP, "25",
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: "READY" in self.lines, 30, "the relay to listen")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def etrns(self) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith("ETRN ")]


def write_config(path: Path, etrn: list[str], iface: str) -> None:
    """Edit the installed example config as the README says: relays and watch, nothing else.

    Its `password_file: isp` stays: the image's $CREDENTIALS_DIRECTORY finds the secret.
    """
    data = yaml.safe_load(path.read_text())
    data["watch"].update(interfaces=[iface], settle="0s", min_interval="0s")
    (relay,) = data["relays"]
    assert relay["name"] == "isp" and relay["auth"]["password_file"] == "isp", relay
    relay.update(host=ISP, port=25, tls="none", timeout="10s", etrn=etrn)
    relay["auth"]["allow_plaintext"] = True  # the test relay has no TLS
    data["retry"]["first_delay"] = "1s"
    # Written in place, never replaced: the container's bind mount pins the file's inode.
    with path.open("w") as fh:
        fh.write(json.dumps(data))  # JSON is YAML


def prepare(tmp: Path, net: Linked) -> None:
    """compose.yaml's header: the example config beside it, edited; the secret, 0400."""
    shutil.copyfile(ROOT / "config" / "etrnd.example.yaml", tmp / "etrnd.yaml")
    write_config(tmp / "etrnd.yaml", ["@example.org"], net.office_if)
    secret = tmp / "isp.secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o400)


def wan_up(net: Linked) -> None:
    net.isp.ip("link", "set", net.isp_if, "up")
    net.office.ip("link", "set", net.office_if, "up")
    net.office.ip("route", "add", "default", "via", ISP, "dev", net.office_if)


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def logs(name: str) -> list[dict[str, Any]]:
    res = pm.podman("logs", name)
    return events(res.stdout + res.stderr)


def wait_event(name: str, event: str, timeout: float = 30,
               where: Any = lambda e: True) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in logs(name) if e["event"] == event and where(e)), None)
    result: dict[str, Any] = wait_for(found, timeout, f"{event} in the container's log")
    return result


def assert_locked_down(name: str, ns: str) -> None:
    """What an operator can check of a running container: the README's restrictions hold."""
    status = pm.podman("exec", name, "cat", "/proc/1/status", netns=ns).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split()[:2] == ["10001", "10001"]
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0
    assert int(fields["CapBnd"], 16) == 0  # --cap-drop ALL
    assert fields["NoNewPrivs"].strip() == "1"
    root = pm.podman("exec", name, "touch", "/etc/etrnd/x", netns=ns, check=False)
    assert "Read-only file system" in root.stderr
    mounts = pm.podman("exec", name, "cat", "/proc/mounts", netns=ns).stdout
    assert re.search(r"^tmpfs /run/etrnd tmpfs rw,.*mode=750,uid=10001,gid=10001", mounts, re.M)
    assert re.search(r" /run/secrets/isp \S+ ro,", mounts)
    inspect = json.loads(pm.podman("inspect", name).stdout)[0]
    assert inspect["HostConfig"]["NetworkMode"] == "host"
    assert inspect["Config"]["Healthcheck"]["Test"] == ["CMD", "etrnd", "check"]


def test_readme_docker_run_on_a_test_wan(image: tuple[str, float], tmp_path: Path) -> None:
    commands = docker_commands()
    verbs = [" ".join(c[:2]) for c in commands]
    assert verbs == ["docker build", "sudo install", "sudo install", "sudo install",
                     "sudoedit /etc/etrnd/isp.secret", "sudo chown", "docker run", "docker run",
                     "docker logs", "docker exec", "docker kill", "docker stop"], \
        "README's Docker block changed: update me"
    env = Env(tmp_path, image[0])
    with linked("d", ISP, OFFICE) as net:
        relay = Relay(net)
        ns = net.office.name
        try:
            # The host's files, from the source directory: the example config, installed and
            # then edited (relays, watch); the secret typed in and given to the image's user.
            for argv in commands[1:6]:
                host_command(argv, env)
                if argv[-1] == "/etc/etrnd/etrnd.yaml":
                    write_config(tmp_path / "etrnd.yaml", ["@example.org"], net.office_if)
            secret = (tmp_path / "isp.secret").stat()
            assert (secret.st_uid, secret.st_mode & 0o777) == (10001, 0o600)
            # check-config in the container finds the secret by the example's bare name...
            commands = commands[5:]  # from here on as before the install lines: run is [2]
            check = translate(commands[1], env)
            assert pm.podman(*check[1:], netns=ns).stdout.startswith("config ")
            # ...and without it says where it looked; systemd-run is no advice in a container.
            at = check.index(next(a for a in check if a.endswith(":/run/secrets/isp:ro")))
            res = pm.podman(*check[1:at - 1], *check[at + 1:], netns=ns, check=False)
            assert res.returncode == 2, res
            assert ("relays[isp].auth.password_file: cannot read /run/secrets/isp: "
                    "No such file or directory") in res.stderr, res.stderr
            assert "systemd-run" not in res.stderr
            # Started with the WAN down: nothing to do until it comes up.
            run = translate(commands[2], env)
            pm.podman(*run[1:], netns=ns, timeout=120)
            ready = wait_event(env.name, "daemon_ready")
            assert ready["link"] == "down"
            assert_locked_down(env.name, ns)

            # `docker logs -f`: one JSON event a line, as they happen.
            follow = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", *translate(commands[3], env)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=pm.env())
            followed: list[str] = []
            threading.Thread(target=lambda: followed.extend(follow.stdout or ()),
                             daemon=True).start()
            try:
                wan_up(net)
                wait_for(lambda: relay.etrns() == ["@example.org"], 30, "the ETRN at the ISP")
                assert "AUTH office ok" in relay.lines  # the mounted secret reached the relay
                done = wait_for(lambda: [e for e in events("".join(followed))
                                         if e["event"] == "round_done"], 30,
                                "round_done from `logs -f`")
                assert done[0]["accepted"] == ["@example.org"]
                starts = [e for e in events("".join(followed)) if e["event"] == "round_start"]
                assert [e["reason"] for e in starts] == ["link_up"]
            finally:
                follow.terminate()
                follow.wait(10)

            # The health check, on demand (podman's timer needs systemd on the host).
            health = pm.podman("healthcheck", "run", env.name, netns=ns, check=False)
            assert health.returncode == 0, health.stdout + health.stderr
            status = pm.podman(*translate(commands[4], env)[1:], netns=ns)
            assert "@example.org: accepted 250" in status.stdout

            # Reload: the next round (asked for with `etrnd trigger`) uses the new config.
            write_config(tmp_path / "etrnd.yaml", ["@example.org", "#office-queue"],
                         net.office_if)
            pm.podman(*translate(commands[5], env)[1:], netns=ns)
            wait_event(env.name, "config_reloaded", where=lambda e: e["changed"] == ["isp"])
            pm.podman("exec", env.name, "etrnd", "trigger", netns=ns)
            wait_for(lambda: relay.etrns()[1:] == ["@example.org", "#office-queue"], 30,
                     "a round with the reloaded config")

            # SIGTERM (`docker stop`): exits by itself, with 0, at once.
            started = time.monotonic()
            pm.podman(*translate(commands[6], env)[1:], netns=ns)
            stopped = time.monotonic() - started
            state = json.loads(pm.podman("inspect", env.name).stdout)[0]["State"]
            assert (state["ExitCode"], state["OOMKilled"]) == (0, False)
            assert stopped < 2, f"docker stop took {stopped:.2f}s"
            size = json.loads(pm.podman("image", "inspect", env.image).stdout)[0]["Size"]
            print(f"image: built in {image[1]:.1f}s, {size / 1e6:.1f} MB; stopped in "
                  f"{stopped:.2f}s")  # figures for the README (pytest -s)

            # Every line of the log is one JSON event; the password is in none of them.
            res = pm.podman("logs", env.name)
            lines = (res.stdout + res.stderr).splitlines()
            assert all(line.startswith("{") and "event" in json.loads(line) for line in lines)
            assert [e["event"] for e in events("\n".join(lines))][-1] == "daemon_stop"
            assert PASSWORD not in "\n".join(lines)
            assert "Traceback" not in "\n".join(lines)
        finally:
            pm.podman("rm", "-f", "-t", "0", env.name, check=False, netns=ns)


def health(name: str, ns: str) -> tuple[int, str]:
    """`podman healthcheck run` (the image's HEALTHCHECK, now) and the container's health."""
    run = pm.podman("healthcheck", "run", name, netns=ns, check=False)
    state = json.loads(pm.podman("inspect", name, netns=ns).stdout)[0]["State"]
    # Docker and newer podman say State.Health, podman 4.3 State.Healthcheck.
    return run.returncode, (state.get("Health") or state["Healthcheck"])["Status"]


def test_healthcheck_unhealthy_while_every_relay_fails(image: tuple[str, float],
                                                       tmp_path: Path) -> None:
    env = Env(tmp_path, image[0])
    with linked("h", ISP, OFFICE) as net:
        prepare(tmp_path, net)
        config = tmp_path / "etrnd.yaml"
        data = yaml.safe_load(config.read_text())
        data["health"] = {"warning_after": "1s", "critical_after": "2s"}
        data["retry"].update(first_delay="1s", max_delay="1s")
        config.write_text(json.dumps(data))
        os.chown(tmp_path / "isp.secret", 10001, 10001)
        ns = net.office.name
        wan_up(net)  # nothing listens at the ISP yet: every round is refused
        relay = None
        try:
            pm.podman("run", "-d", "--name", env.name, "--network", "host", "--read-only",
                      "--read-only-tmpfs=false", "--tmpfs", "/run/etrnd:U,mode=0750",
                      "-v", f"{config}:/etc/etrnd/etrnd.yaml:ro",
                      "-v", f"{tmp_path / 'isp.secret'}:/run/secrets/isp:ro", env.image,
                      netns=ns)
            wait_event(env.name, "etrn_session_failed")
            # Failed checks after the image's --start-period (15 s), three in a row (its
            # --retries), make it unhealthy.
            code, status = wait_for(lambda: (h := health(env.name, ns))[1] == "unhealthy" and h,
                                    60, "the container unhealthy")
            assert code == 1
            check = pm.podman("exec", env.name, "etrnd", "check", netns=ns, check=False)
            assert check.returncode == 2, check
            assert check.stdout.startswith("ETRND CRITICAL - isp: no accepted round for "), check
            assert f"connection refused ({ISP}:25)" in check.stdout
            print(check.stdout.strip())  # for the report (pytest -s)
            # The ISP's relay comes back: the next retry is accepted, the container healthy.
            relay = Relay(net)
            wait_for(lambda: relay is not None and relay.etrns(), 30, "the ETRN at the ISP")
            code, status = wait_for(lambda: (h := health(env.name, ns))[0] == 0 and h, 30,
                                    "a passing health check")
            assert status == "healthy"
            # No volume on a read-only root: the state file cannot be kept, and it says so.
            failed = wait_event(env.name, "state_file_failed")
            assert "Read-only file system" in failed["reason"]
        finally:
            pm.podman("rm", "-f", "-t", "0", env.name, check=False, netns=ns)
            if relay is not None:
                relay.proc.terminate()


def test_readme_compose_starts_the_same_container(image: tuple[str, float],
                                                  tmp_path: Path) -> None:
    commands = compose_commands()
    assert [c[:3] for c in commands] == [["docker", "compose", "run"],
                                         ["docker", "compose", "up"],
                                         ["docker", "compose", "exec"],
                                         ["docker", "compose", "kill"],
                                         ["docker", "compose", "down"]]
    check_config, up, exec_status, kill_hup, down = commands
    tool = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("podman-compose is not installed (the [test] extra installs it from PyPI)")
    env = Env(tmp_path, image[0])
    text = (ROOT / "compose.yaml").read_text()
    assert text.count("uid=10001,gid=10001") == 1
    (tmp_path / "compose.yaml").write_text(text.replace("uid=10001,gid=10001", "U"))
    project = env.name.replace("-", "_")
    run_env = {**pm.env(), "ETRND_IMAGE": env.image, "COMPOSE_PROJECT_NAME": project}
    with linked("c", ISP, OFFICE) as net:
        prepare(tmp_path, net)
        os.chown(tmp_path / "isp.secret", 10001, 10001)  # as compose.yaml's header says
        relay = Relay(net)
        wan_up(net)  # already up at start: the daemon's first look starts a round

        def compose(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
            cmd = ["nsenter", f"--net=/run/netns/{net.office.name}",
                   *translate(argv, env, Path(tool))]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                                 env=run_env, check=False)
            assert res.returncode == 0 or not check, res.stdout + res.stderr
            return res

        try:
            # check-config first, in a one-off container with the service's mounts.
            check = compose(check_config)
            assert "config /etc/etrnd/etrnd.yaml: valid" in check.stdout, check
            compose(up)
            names = pm.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                              "--format", "{{.Names}}").stdout.split()
            assert len(names) == 1, names
            name = names[0]
            wait_for(lambda: relay.etrns() == ["@example.org"], 30, "the ETRN at the ISP")
            assert "AUTH office ok" in relay.lines
            assert_locked_down(name, net.office.name)
            assert "@example.org: accepted 250" in compose(exec_status).stdout
            compose(kill_hup)
            wait_event(name, "config_reloaded")
            compose(down)
            assert pm.podman("container", "exists", name, check=False).returncode == 1
        finally:
            compose(down, check=False)
            pm.podman("rm", "-f", "-t", "0", f"{project}_etrnd_1", check=False)
            pm.podman("pod", "rm", "-f", f"pod_{project}", check=False)
