"""A self-contained demo: a toy ETRN server on loopback and `etrnd run` watching `lo`.

`python -m etrnd.demo` needs no root and no ISP. `--serve HOST:PORT` runs only the toy
server (benchmarks use it: it prints the monotonic time each ETRN arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

GREETING = b"220 isp.example ESMTP toy ETRN server\r\n"


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   quiet: bool) -> None:
    writer.write(GREETING)
    try:
        while True:
            async with asyncio.timeout(30):
                line = await reader.readline()
            if not line:
                break
            verb, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                writer.write(b"250-isp.example\r\n250-ETRN\r\n250 8BITMIME\r\n")
            elif verb == "ETRN":
                stamp = time.monotonic()
                writer.write(b"250 Queuing started\r\n")
                print(f"ETRN {arg} {stamp:.6f}" if quiet else
                      f"[toy ISP] received ETRN {arg}, answered 250 Queuing started",
                      flush=True)
            elif verb == "QUIT":
                writer.write(b"221 Bye\r\n")
                break
            elif verb in ("NOOP", "RSET"):
                writer.write(b"250 Ok\r\n")
            else:
                writer.write(b"502 Command not implemented\r\n")
            await writer.drain()
        await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, quiet: bool = False) -> asyncio.Server:
    return await asyncio.start_server(lambda r, w: _session(r, w, quiet), host, port)


def _config(port: int, socket_path: Path) -> str:
    return (
        "# written by etrnd.demo: watch loopback, relay to the toy ISP\n"
        "watch: {interfaces: [lo], up_when: carrier, settle: 0s, min_interval: 5s}\n"
        "relays:\n"
        f"  - {{name: toy-isp, host: 127.0.0.1, port: {port}, tls: none, timeout: 5s,\n"
        "      helo: gw.example.org, etrn: ['@example.org', '#office-queue']}\n"
        "retry: {first_delay: 1s, max_delay: 10s, give_up_after: 1m}\n"
        f"control: {{socket: {socket_path}}}\n"
        "log: {level: info, format: console}\n"
    )


async def _demo(seconds: float | None) -> int:
    server = await serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="etrnd-demo-") as tmp:
        config = Path(tmp) / "etrnd.yaml"
        config.write_text(_config(port, Path(tmp) / "control.sock"))
        print(f"[demo] toy ISP listening on 127.0.0.1:{port}; config {config}:", flush=True)
        print(config.read_text(), flush=True)
        print("[demo] starting: etrnd run -c", config, "(Ctrl-C stops)", flush=True)
        etrnd = [sys.executable, "-m", "etrnd"]
        daemon = await asyncio.create_subprocess_exec(*etrnd, "run", "-c", str(config))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await daemon.wait()
            if daemon.returncode is None:
                print("[demo] etrnd status:", flush=True)
                status = await asyncio.create_subprocess_exec(*etrnd, "status", "-c", str(config))
                await status.wait()
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            code = await daemon.wait()
            server.close()
    print(f"[demo] etrnd exited with status {code}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etrnd.demo", description=__doc__)
    parser.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    parser.add_argument("--serve", metavar="HOST:PORT", help="only run the toy ETRN server")
    args = parser.parse_args(argv)
    if args.serve:
        host, _, port = args.serve.rpartition(":")

        async def forever() -> None:
            await serve(host.strip("[]"), int(port), quiet=True)
            print("READY", flush=True)
            await asyncio.Event().wait()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(forever())
        return 0
    try:
        return asyncio.run(_demo(args.seconds))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
