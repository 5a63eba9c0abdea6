"""The floor for bench/etrn_latency.py: a bare link-up -> ETRN prototype, nothing else.

    python bench/floor.py IFNAME HOST PORT

pyroute2's asyncio socket subscribed to link events, and on each IFF_UP|IFF_LOWER_UP of
IFNAME one aiosmtplib session (connect, EHLO, ETRN, QUIT): no config, no logging, no
retries, no egress check, no status. Sends READY=1 to $NOTIFY_SOCKET once it is watching,
as etrnd does, so start-up can be compared too. What etrnd costs above this is the price of
everything it does besides; issue 21 holds it within 1.2x (latency) and 1.1x (READY).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiosmtplib
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


async def etrn(host: str, port: int) -> None:
    smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname="office.example.test",
                           start_tls=False, timeout=5)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.execute_command(b"ETRN", b"@example.test")
    await smtp.quit()


async def main(ifname: str, host: str, port: int) -> None:
    ipr = AsyncIPRoute()
    await ipr.bind(groups=RTMGRP_LINK)
    up = False
    async for msg in await ipr.link("dump"):
        if msg.get("ifname") == ifname:
            up = msg["flags"] & IFF_UP and msg["flags"] & IFF_LOWER_UP
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", notify)
    print("READY", flush=True)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        async for msg in ipr.get():
            if msg.get("ifname") != ifname:
                continue
            now_up = bool(msg["flags"] & IFF_UP and msg["flags"] & IFF_LOWER_UP)
            if now_up and not up:
                task = asyncio.create_task(etrn(host, port))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            up = now_up


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
