"""A scripted ETRN server run as a subprocess (inside a test namespace): one line per ETRN.

    python -m tests.support.etrn_server HOST PORT [REPLY ...]

Each ETRN takes the next REPLY (`451`, `250`, `458:Administrative prohibition` for a text of
its own, `hang`: never answer); when they run out, the last one repeats. Prints `READY` once
listening, then `ETRN <arg> <code> <monotonic>`. With `ETRN_SERVER_AUTH=user:password` in
the environment it offers AUTH PLAIN (RFC 4616) and prints `AUTH <user> ok|bad` for each attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import sys
import time

TEXT = {250: "Queuing started", 451: "Try again later", 458: "Already processing",
        459: "service unavailable", 502: "Command not implemented", 421: "Closing"}


async def main(host: str, port: int, script: list[str]) -> None:
    replies = list(script) or ["250"]
    user, _, password = os.environ.get("ETRN_SERVER_AUTH", "").partition(":")

    def next_reply() -> str:
        return replies.pop(0) if len(replies) > 1 else replies[0]

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 test.isp ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb, _, arg = line.decode("ascii", "replace").strip().partition(" ")
                verb = verb.upper()
                if verb in ("EHLO", "HELO"):
                    offer = b"250-AUTH PLAIN\r\n" if user else b""
                    writer.write(b"250-test.isp\r\n" + offer + b"250 ETRN\r\n")
                elif verb == "AUTH" and user:
                    try:
                        _, got_user, got_pw = base64.b64decode(arg.split()[1]).split(b"\0")
                    except (IndexError, ValueError, binascii.Error):
                        got_user, got_pw = b"", b""
                    ok = (got_user, got_pw) == (user.encode(), password.encode())
                    print(f"AUTH {got_user.decode(errors='replace')} {'ok' if ok else 'bad'}",
                          flush=True)
                    writer.write(b"235 Authenticated\r\n" if ok else  # Postfix's words
                                 b"535 5.7.8 Error: authentication failed: "
                                 b"authentication failure\r\n")
                elif verb == "ETRN":
                    reply = next_reply()
                    print(f"ETRN {arg} {reply.partition(':')[0]} {time.monotonic():.6f}",
                          flush=True)
                    if reply == "hang":
                        await asyncio.Event().wait()
                    number, _, own = reply.partition(":")
                    code = int(number)
                    writer.write(f"{code} {own or TEXT.get(code, 'Scripted')}\r\n".encode())
                elif verb == "QUIT":
                    writer.write(b"221 Bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(session, host, port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
