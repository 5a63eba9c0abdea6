"""Test helper: etrnd as the user `nobody` runs it, from an installation nobody can read.

The checkout (and its editable install and .venv) may sit anywhere, e.g. in a `mktemp -d`
directory (0700) where CI clones it: `nobody` cannot reach it. So the package and its runtime
dependencies are copied once per test session into a world-readable directory and run by a
system interpreter of the same version that nobody can execute.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _runtime_distributions(name: str = "etrnd") -> list[md.Distribution]:
    """The distributions `name` needs at run time (no extras), recursively."""
    seen: dict[str, md.Distribution] = {}
    todo = [name]
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    del seen[name]
    return list(seen.values())


def _interpreter() -> str:
    """A python of our version that nobody can run (the venv's may live under /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for python in dict.fromkeys(c for c in candidates if c):
        probe = subprocess.run(
            [*NOBODY, python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=False, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return python
    raise RuntimeError(f"no python{version} that user nobody can run: tried {candidates}")


@functools.cache
def nobody_python() -> tuple[tuple[str, ...], dict[str, str]]:
    """(argv prefix, environment) that run `python` for nobody with etrnd importable."""
    target = Path(tempfile.mkdtemp(prefix="etrnd-nobody-", dir="/tmp"))
    atexit.register(shutil.rmtree, target, True)
    shutil.copytree(ROOT / "etrnd", target / "etrnd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dist in _runtime_distributions():
        for file in dist.files or []:
            if ".." in file.parts or "__pycache__" in file.parts:
                continue  # scripts in bin/, byte code
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target / file)
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return (_interpreter(), "-s"), env
