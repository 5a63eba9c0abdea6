"""Shared fixtures: root-only tests skip cleanly elsewhere."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.support.nettools import is_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(reason="needs root (network namespaces)")
    skip_slow = pytest.mark.skip(reason="slow; set ETRND_SLOW=1")
    for item in items:
        if "root" in item.keywords and not is_root():
            item.add_marker(skip_root)
        if "slow" in item.keywords and os.environ.get("ETRND_SLOW") != "1":
            item.add_marker(skip_slow)


def pytest_configure(config: pytest.Config) -> None:
    # Without STATE_DIRECTORY, etrnd keeps its validated config in $XDG_CACHE_HOME/etrnd
    # (docs/configuration.md): the suite's etrnd processes keep theirs in a directory of the
    # run, removed at its end, not in the machine's ~/.cache.
    cache = tempfile.mkdtemp(prefix="etrnd-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
