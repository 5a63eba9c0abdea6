"""`pip install .` gives a working `etrnd` command, built from what the Docker build copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import etrnd

ROOT = Path(__file__).resolve().parents[2]
# Everything a wheel build needs, and all the Dockerfile's build stage copies (checked in
# test_packaging): building from a copy of just these proves that list is complete.
BUILD_INPUTS = ("pyproject.toml", "README.md", "etrnd")


def _copy_build_inputs(dest: Path) -> Path:
    dest.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with etrnd installed from a freshly built wheel; returns its bin dir.

    The runtime dependencies are not downloaded again: the new venv sees this venv's
    site-packages through a .pth file, added only *after* pip ran so pip cannot mistake the
    editable install here for the one it is installing.
    """
    tmp = tmp_path_factory.mktemp("install")
    src = _copy_build_inputs(tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Build isolation fetches the build backend (hatchling) from PyPI, as `pip install .` would.
    _run(*pip, "wheel", "-q", "--no-deps", "--wheel-dir", tmp / "dist", src, cwd=tmp)
    wheels = sorted((tmp / "dist").glob("etrnd-*.whl"))
    assert len(wheels) == 1, f"expected one etrnd wheel, got {wheels}"

    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    _run(*pip, "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
         wheels[0], cwd=tmp)
    purelib = Path(
        _run(venv / "bin" / "python", "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).strip()
    )
    (purelib / "zz_etrnd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _clean_env() -> dict[str, str]:
    # No PYTHONPATH or config from the test run may leak into what a user would run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ETRND_"))}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_etrnd_command_reports_version(installed: Path, tmp_path: Path) -> None:
    out = _run(installed / "etrnd", "--version", cwd=tmp_path, env=_clean_env())
    assert out.strip() == f"etrnd {etrnd.__version__}"


def test_python_dash_m_is_the_same_program(installed: Path, tmp_path: Path) -> None:
    out = _run(installed / "python", "-m", "etrnd", "--version", cwd=tmp_path, env=_clean_env())
    assert out.strip() == f"etrnd {etrnd.__version__}"


def test_installed_copy_runs_not_the_source_tree(installed: Path, tmp_path: Path) -> None:
    where = _run(installed / "python", "-c", "import etrnd; print(etrnd.__file__)",
                 cwd=tmp_path, env=_clean_env())
    assert Path(where.strip()).is_relative_to(installed.parent), where


def test_help_lists_every_command(installed: Path, tmp_path: Path) -> None:
    out = _run(installed / "etrnd", "--help", cwd=tmp_path, env=_clean_env())
    for command in ("run", "check-config", "send", "trigger", "status"):
        assert command in out


def test_wheel_ships_type_information(installed: Path, tmp_path: Path) -> None:
    where = _run(installed / "python", "-c", "import etrnd; print(etrnd.__file__)",
                 cwd=tmp_path, env=_clean_env())
    assert (Path(where.strip()).parent / "py.typed").is_file()
