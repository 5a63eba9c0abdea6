"""A unix datagram socket that is bound but not read until told (a busy supervisor/journald).

    python -m tests.support.dgram_sink ADDRESS   (a path, or @name for an abstract socket)

Run it inside the test's namespace: the receiving socket's queue limit is that namespace's
net.unix.max_dgram_qlen (10 in a new one). Prints `READY` once bound; after a line `read` on
stdin, prints every datagram (queued or new) as one JSON string per line until stdin closes.
"""

from __future__ import annotations

import json
import socket
import sys
import threading


def main(address: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "read":
        return

    def pump() -> None:
        while True:
            data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            if not data and ancdata:  # a big journal entry arrives as a memfd
                import array
                import os

                fds = array.array("i")
                fds.frombytes(ancdata[0][2][:4])
                with os.fdopen(fds[0], "rb") as memfd:
                    memfd.seek(0)
                    data = memfd.read()
            print(json.dumps(data.decode("utf-8", "replace")), flush=True)

    threading.Thread(target=pump, daemon=True).start()
    sys.stdin.read()  # until the test closes our stdin


if __name__ == "__main__":
    main(sys.argv[1])
