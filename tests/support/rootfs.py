"""Debian root file systems for tests (systemd in nspawn, image bases, Exim from sid), cached."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# Bump when the recipe below changes in a way the key does not capture.
RECIPE = 1
CACHE = Path(os.environ.get("ETRND_TEST_CACHE", "/var/cache/etrnd-tests"))


def debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (no host names in our code).

    `ETRND_DEBIAN_MIRROR` overrides it. Raises RuntimeError when none is configured.
    """
    if env := os.environ.get("ETRND_DEBIAN_MIRROR"):
        return env
    candidates: list[str] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in {"", ".list", ".sources"}:
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
            elif line.startswith("deb "):
                candidates += [w for w in line.split()[1:] if "://" in w][:1]
    for uri in candidates:
        if re.search(r"/debian/?$", uri):
            return uri.rstrip("/")
    raise RuntimeError("no Debian archive in /etc/apt sources; set ETRND_DEBIAN_MIRROR")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another test run (or engineer) may build the same root
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], log: Path, **kw: object) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); log {log}:\n{tail}")


def cached_root(suite: str, *, include: Sequence[str] = (), install: Sequence[str] = (),
                variant: str = "minbase") -> Path:
    """A debootstrapped `suite` root with `include` (debootstrap) and `install` (apt in chroot).

    Built once and kept under $ETRND_TEST_CACHE (default /var/cache/etrnd-tests), keyed by
    what it was built from; concurrent callers wait for one build. Treat it as read-only:
    boot it with nspawn --volatile=overlay, import it as an image, or copy it. Raises
    RuntimeError with the build log's tail when debootstrap or apt fails (e.g. no mirror).
    """
    recipe = {"recipe": RECIPE, "suite": suite, "variant": variant,
              "include": sorted(include), "install": sorted(install)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = CACHE / f"root-{suite}-{key}"
    done = root / ".etrnd-test-root.json"
    if done.exists():
        return root
    with _locked(CACHE / f"root-{suite}-{key}.lock"):
        if done.exists():
            return root
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (scripts/test.sh installs it)")
        tmp = CACHE / f"root-{suite}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log = CACHE / f"root-{suite}-{key}.log"
        log.write_text(json.dumps(recipe) + "\n")
        started = time.monotonic()
        cmd = ["debootstrap", f"--variant={variant}"]
        if include:
            cmd.append("--include=" + ",".join(include))
        _run([*cmd, suite, str(tmp), debian_mirror()], log)
        if install:
            # Packages whose maintainer scripts would start services: forbid that in a chroot.
            policy = tmp / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                   "LC_ALL": "C"}
            _run(["chroot", str(tmp), "apt-get", "install", "-y", "-q",
                  "--no-install-recommends", *install], log, env=env)
            policy.unlink()
            _run(["chroot", str(tmp), "apt-get", "clean"], log, env=env)
        recipe["seconds"] = round(time.monotonic() - started, 1)
        (tmp / done.name).write_text(json.dumps(recipe) + "\n")
        tmp.rename(root)
    return root


__all__ = ["CACHE", "cached_root", "debian_mirror"]
