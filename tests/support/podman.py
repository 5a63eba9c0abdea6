"""Test helper: podman with a config of its own, and a local stand-in for the Python base image."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.rootfs import CACHE, _locked, cached_root

# The base image the Dockerfile names. No registry is reachable, so a stand-in with that name is
# made locally (see `stand_in_base`).
PYTHON_IMAGE = "python:3.11-slim-bookworm"
# What `docker` resolves that short name to; podman finds the local image under this name.
PYTHON_IMAGE_FULL = f"docker.io/library/{PYTHON_IMAGE}"
# Debian packages of the stand-in: python3-venv for a pip that may install (see below), and
# what the real slim image adds to Debian (its Dockerfile installs these three).
BASE_PACKAGES = ("python3-venv", "ca-certificates", "netbase", "tzdata")
# Added on top of the imported root. Like the real image: Python's own directory first on PATH,
# a UTF-8 locale, and /usr/local/bin/python3 with a pip that may install and uninstall there.
BASE_CONTAINERFILE = """\
FROM {imported}
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
RUN python3 -m venv /usr/local && /usr/local/bin/pip --version
CMD ["python3"]
"""

HOME = CACHE / "podman"
# Stock podman fails on this kind of host (crun cannot set RLIMIT_NOFILE without
# CAP_SYS_RESOURCE; cgroups v1 "hybrid"): runc, cgroupfs, fixed ulimits, no systemd/journald.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "/run/etrnd-tests-podman/libpod"
"""
# Our own storage, so the cached base and what tests build never mix with the host's images.
STORAGE_CONF = f"""\
[storage]
driver = "overlay"
graphroot = "{HOME}/storage"
runroot = "/run/etrnd-tests-podman/storage"
"""
# No registry to search: a short name that is not local must fail, never reach the network.
REGISTRIES_CONF = """\
unqualified-search-registries = []
short-name-mode = "permissive"
"""


class PodmanUnavailable(RuntimeError):
    """podman is missing or cannot run containers here; the message says why."""


def env() -> dict[str, str]:
    """The environment for podman and podman-compose: our three config files."""
    HOME.mkdir(parents=True, exist_ok=True)
    files = {"containers.conf": CONTAINERS_CONF, "storage.conf": STORAGE_CONF,
             "registries.conf": REGISTRIES_CONF}
    for name, text in files.items():
        path = HOME / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)  # atomic: a concurrent test run never reads half a file
    return {**os.environ, "CONTAINERS_CONF": str(HOME / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(HOME / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(HOME / "registries.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120, netns: str | None = None,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS` with our config; in network namespace `netns` if given.

    `ip netns exec` cannot be used (it remounts /sys and runc then finds no cgroups);
    `nsenter --net` only switches the network namespace, which is what "the host" then means.
    """
    cmd = ["podman", *args]
    if netns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(),
                          input=input, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc


def check_usable() -> None:
    """Raise PodmanUnavailable (with the reason) unless podman can run a container here."""
    for tool in ("podman", "runc", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            raise PodmanUnavailable(f"{tool} is not installed (scripts/test.sh installs it)")
    try:
        podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise PodmanUnavailable(f"podman does not work here: {exc}") from exc


def _image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def stand_in_base() -> tuple[str, dict[str, object]]:
    """Make sure `python:3.11-slim-bookworm` exists locally; return its name and recipe.

    The real image is Debian bookworm with a CPython built into /usr/local and a pip there
    that may install and uninstall. The stand-in: a debootstrapped bookworm (cached by
    tests/rootfs.py) imported with `podman import`, plus a virtual environment made AT
    /usr/local from Debian's python3, so /usr/local/bin/python3 and /usr/local/bin/pip exist
    and pip may change that environment (Debian's own pip refuses to, PEP 668). Differences:
    Debian's CPython 3.11.2 and a larger Debian userland instead of the latest 3.11.x.
    Built once, kept in our podman storage, keyed by the root and this recipe.
    """
    root = cached_root("bookworm", include=BASE_PACKAGES)
    recipe: dict[str, object] = {"root": root.name, "containerfile": BASE_CONTAINERFILE}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    keyed = f"localhost/etrnd-test-python-base:{key}"
    with _locked(CACHE / "podman-base.lock"):
        if not _image_exists(keyed):
            started = time.monotonic()
            imported = f"localhost/etrnd-test-debian-import:{key}"
            tar = subprocess.Popen(["tar", "-C", str(root), "--exclude=./.etrnd-test-root.json",
                                    "-c", "."], stdout=subprocess.PIPE)
            proc = subprocess.run(
                ["podman", "import", "--change", "CMD=[\"bash\"]", "-", imported],
                stdin=tar.stdout, capture_output=True, text=True, env=env(), timeout=600,
                check=False)
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
            if proc.returncode != 0 or tar.returncode != 0:
                raise RuntimeError(f"podman import failed: {proc.stderr[-2000:]}")
            with tempfile.TemporaryDirectory() as context:  # empty: the build copies nothing
                containerfile = Path(context) / "Containerfile"
                containerfile.write_text(BASE_CONTAINERFILE.format(imported=imported))
                podman("build", "--format", "docker", "--pull=never", "--network", "none",
                       "-f", str(containerfile), "-t", keyed, context, timeout=600)
            podman("rmi", imported, check=False)
            podman("image", "inspect", keyed)  # fail here, not in the test, if it is broken
            (HOME / f"base-{key}.json").write_text(json.dumps(
                {**recipe, "seconds": round(time.monotonic() - started, 1)}) + "\n")
        # The name the Dockerfile uses points at the stand-in of this recipe.
        podman("tag", keyed, PYTHON_IMAGE_FULL)
    return PYTHON_IMAGE_FULL, recipe


__all__ = ["PYTHON_IMAGE", "PYTHON_IMAGE_FULL", "PodmanUnavailable", "check_usable", "env",
           "podman", "stand_in_base"]
