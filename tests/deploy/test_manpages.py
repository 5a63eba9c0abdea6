"""etrnd(8) and etrnd.yaml(5): current, complete, clean for groff, and shipped in the sdist."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from etrnd.cli import build_parser
from etrnd.config.schema import Config, parse_yaml
from tests.support import docs

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"etrnd.8": ROOT / "man" / "etrnd.8", "etrnd.yaml.5": ROOT / "man" / "etrnd.yaml.5"}
GENERATOR = ROOT / "scripts" / "manpages.py"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (scripts/test.sh installs man-db and groff-base)"
    return path


def rendered(page: str) -> str:
    """The page as `man -l` shows it, as plain text, wide enough that no key is wrapped."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAN_KEEP_FORMATTING", "PAGER")}
    env |= {"MANWIDTH": "250", "LC_ALL": "C.UTF-8"}
    res = subprocess.run([tool("man"), "-l", str(PAGES[page])], capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout


def test_committed_pages_are_what_the_generator_writes() -> None:
    res = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, f"run scripts/manpages.py and commit man/:\n{res.stdout[-3000:]}"


@pytest.mark.parametrize("page", list(PAGES))
def test_groff_finds_no_warning(page: str) -> None:
    res = subprocess.run([tool("groff"), "-ww", "-z", "-man", str(PAGES[page])],
                         capture_output=True, text=True, timeout=60, check=False)
    assert (res.returncode, res.stderr) == (0, "")


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    yield "", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def sections(text: str, level: str) -> dict[str, str]:
    """A rendered page's sections (level ""; the header and footer lines count as such) or
    subsections (level "   ") by their title."""
    parts = re.split(rf"^{level}(\S[^\n]*)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_etrnd_8_has_every_command_and_option() -> None:
    page = sections(rendered("etrnd.8"), "")
    assert list(page)[1:-1] == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS",
                              "EXIT STATUS", "SIGNALS", "FILES", "ENVIRONMENT", "EXAMPLES",
                              "SEE ALSO"]
    described = sections(page["COMMANDS"], "   ")
    exit_codes = sections(page["EXIT STATUS"], "   ")
    missing = []
    for name, parser in commands():
        if name and f"etrnd {name} " not in page["SYNOPSIS"]:
            missing.append(f"etrnd {name}: SYNOPSIS")
        if name and not re.search(r"^       0 ", exit_codes.get(name, ""), re.M):
            missing.append(f"etrnd {name}: EXIT STATUS")
        where = described.get(name, "") if name else page["OPTIONS"]
        for action in parser._actions:
            if name and isinstance(action, argparse._HelpAction):
                continue  # -h is under OPTIONS, once: "after a command, that command's help"
            words = action.option_strings or ([] if action.dest == "command"
                                              else [str(action.metavar)])
            missing += [f"etrnd {name} {w}".replace("  ", " ") for w in words
                        if not re.search(r"(^|[ ,])" + re.escape(w) + r"([ ,\n]|$)", where)]
    assert missing == []


def nested(annotation: typing.Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a key's value is (or is a list of: then True), through `X | None`,
    `tuple[X, ...]` and `Annotated[X, ...]`."""
    listed = False
    for _ in range(5):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation, listed
        args = [a for a in typing.get_args(annotation) if a not in (type(None), Ellipsis)]
        if not args:
            break
        listed |= typing.get_origin(annotation) in (tuple, list)
        annotation = args[0]
    return None, listed


def config_keys(model: type[BaseModel], prefix: str = "",
                seen: set[type[BaseModel]] | None = None) -> Iterator[tuple[str, str | None]]:
    """Every key path of the schema (`relays[].auth.username`) and its description; a model's
    keys once, under the first key that holds it (the page refers to them elsewhere)."""
    seen = set() if seen is None else seen
    seen.add(model)
    for name, field in model.model_fields.items():
        yield prefix + name, field.description
        inner, listed = nested(field.annotation)
        if inner is not None and inner not in seen:
            yield from config_keys(inner, prefix + name + ("[]." if listed else "."), seen)


def test_etrnd_yaml_5_has_every_key_with_its_meaning() -> None:
    keys = dict(config_keys(Config))
    assert {"watch.settle", "relays[].auth.password_file", "retry.give_up_after"} <= set(keys)
    undescribed = [k for k, d in keys.items() if not d]
    assert undescribed == [], "add Field(description=...) in etrnd/config/schema.py"
    text = rendered("etrnd.yaml.5")
    missing = [k for k in keys if f"\n       {k} (" not in text]
    assert missing == []


def test_the_pages_example_config_is_valid() -> None:
    text = PAGES["etrnd.yaml.5"].read_text()
    example = text.split(".SH EXAMPLE\n.nf\n", 1)[1].split("\n.fi\n", 1)[0]
    config = parse_yaml(example.replace("\\-", "-").replace("\\e", "\\"), defer_credentials=True)
    assert [r.protocol for r in config.relays] == ["etrn", "odmr"]


def test_sdist_ships_the_pages_and_what_the_recipe_installs(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    (sdist,) = tmp_path.glob("etrnd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    assert {"man/etrnd.8", "man/etrnd.yaml.5"} <= names
    # The README's gateway recipe runs "from the unpacked source (a git clone or a release
    # tarball)": every file of the checkout it names is in the tarball.
    recipe = docs.commands("README.md", "Install on a gateway", "sudo python3 -m venv")
    # Relative words only: /etc/etrnd/... are the recipe's targets, and whether this host has
    # them (a gateway where the recipe ran) says nothing about the tarball.
    named = {w for line in recipe for w in line.split()
             if not Path(w).is_absolute() and (ROOT / w).is_file()}
    assert {"config/etrnd.example.yaml", "systemd/etrnd.service", "man/etrnd.8"} <= named
    assert sorted(named - names) == []
