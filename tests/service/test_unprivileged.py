"""The daemon as the unit runs it: no root, no capabilities; it still watches and sends."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.test_daemon import PORT, Wan, write_config
from tests.support.daemonproc import ScriptServer, wait_for
from tests.support.nettools import linked
from tests.support.nobody import nobody_python

pytestmark = pytest.mark.root


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can use (pytest's tmp_path is private to root)."""
    path = Path(f"/tmp/etrnd-unpriv-{os.getpid()}")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_runs_as_nobody_without_capabilities(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    with linked("eu") as pair:
        office = pair.office
        wan = Wan(office, pair.isp, pair.office_if, pair.isp_if)
        office.ip("link", "set", wan.wan, "up")
        server = ScriptServer(office, PORT, "250")
        run_dir = shared_dir / "run"
        run_dir.mkdir()
        os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
        config = write_config(run_dir / "etrnd.yaml", wan.wan)
        config.chmod(0o644)
        log = shared_dir / "log"
        python, env = nobody_python()  # the checkout itself may be out of nobody's reach
        with open(log, "wb") as out:
            proc = subprocess.Popen(office.cmd(
                "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                *python, "-m", "etrnd", "run", "-c", str(config)),
                stdout=out, stderr=subprocess.STDOUT, cwd=shared_dir, env=env)
        try:
            wait_for(lambda: "daemon_ready" in log.read_text(), 15, "daemon_ready")
            wan.carrier(True)
            wait_for(server.etrns, 10, "the ETRN from the unprivileged daemon")
            text = log.read_text()
            assert '"event": "netlink_rcvbuf_limited"' in text  # says what it could not do
            assert '"hint": "raise net.core.rmem_max or grant CAP_NET_ADMIN"' in text
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert f"Uid:\t{nobody.pw_uid}\t" in status
            assert "CapEff:\t0000000000000000" in status
        finally:
            proc.terminate()
            assert proc.wait(5) == 0
            server.close()
