"""A scripted ODMR provider (RFC 2645) for faults Exim cannot produce on demand, as a subprocess.

    python -m tests.support.odmr_server HOST PORT MESSAGES ACTION [ACTION ...]

Speaks EHLO/AUTH (PLAIN, CRAM-MD5; user odmruser, password odmrpass)/ATRN, answers ATRN
with 250 and then, as the provider does, becomes the SMTP client on the same connection
(smtplib, over the accepted socket) offering MESSAGES queued messages (user<N>@example.test).
Each session takes the next ACTION (the last one repeats):

- `stall:K`: deliver up to K messages, then say nothing until the customer hangs up;
- `quit`: deliver everything still queued, then QUIT;
- `die:N`: MAIL, RCPT, DATA for the first message, N octets of its body, then close the
  connection without the final dot (the provider's leg dying mid-DATA);
- `longline` / `big:N`: the first message carries a 3000-octet line / is N octets long; each
  next MAIL follows the reply to DATA at once, without RSET (as smtplib, and RFC 5321 allow).

Message bodies hold lines starting with a dot (so dot-stuffing is exercised), and a
`Received: ... id prov<N>` header naming the provider's queue ID.

A message leaves the queue only when the customer answered 250 to its end of DATA, or a 5xx
(then it is bounced, as a real provider does).
Prints `READY`, then one line per event: `SESSION n`, `ATRN arg`, `SENT rcpt code`,
`STALL`, `HUNG_UP_AFTER seconds`, `DIED`, `QUIT`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import smtplib
import socket
import socketserver
import sys
import threading
import time

USER, PASSWORD = "odmruser", "odmrpass"


class Provider:
    def __init__(self, messages: int, actions: list[str]) -> None:
        self.queue = [f"user{n}@example.test" for n in range(messages)]
        self.actions = actions
        self.sessions = 0
        self.lock = threading.Lock()

    def next_action(self) -> tuple[int, str]:
        with self.lock:
            self.sessions += 1
            action = self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]
            return self.sessions, action


def say(*words: object) -> None:
    print(*words, flush=True)


class Session(socketserver.StreamRequestHandler):
    server: Server

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def read(self) -> str:
        return self.rfile.readline().decode("ascii", "replace").rstrip("\r\n")

    def handle(self) -> None:
        provider = self.server.provider
        number, action = provider.next_action()
        say("SESSION", number)
        self.reply("220 scripted.provider.test ESMTP")
        authed = False
        while line := self.read():
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reply("250-scripted.provider.test\r\n250-AUTH PLAIN CRAM-MD5\r\n250 ATRN")
            elif verb == "AUTH":
                authed = self.auth(arg)
                self.reply("235 Authentication succeeded" if authed
                           else "535 Incorrect authentication data")
            elif verb == "ATRN":
                say("ATRN", arg)
                if not authed:
                    self.reply("530 ATRN is not permitted without authentication")
                    continue
                self.reply("250 ODMR provider turning line around")
                self.turn_around(action)
                return
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not here")

    def auth(self, arg: str) -> bool:
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            if not initial:
                self.reply("334 ")
                initial = self.read()
            parts = base64.b64decode(initial).split(b"\0")
            return parts[1:] == [USER.encode(), PASSWORD.encode()]
        if mechanism.upper() == "CRAM-MD5":
            challenge = f"<{time.monotonic_ns()}@scripted.provider.test>".encode()
            self.reply("334 " + base64.b64encode(challenge).decode())
            user, _, digest = base64.b64decode(self.read()).decode().partition(" ")
            good = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
            return user == USER and hmac.compare_digest(digest, good)
        return False

    def turn_around(self, action: str) -> None:
        """Now the SMTP client on the same connection, as RFC 2645 section 5 says."""
        provider = self.server.provider
        client = smtplib.SMTP(local_hostname="scripted.provider.test", timeout=60)
        client.sock = self.request
        client.file = self.rfile  # what the customer sent after our 250 may be buffered here
        code, _ = client.getreply()  # the customer's 220 greeting
        if code != 220:
            return
        client.ehlo()
        budget = int(action.split(":")[1]) if action.startswith("stall:") else len(provider.queue)
        for n, rcpt in enumerate(list(provider.queue)[:budget]):
            body = message(rcpt, action if n == 0 else "")
            if action.startswith("die:"):
                client.mail("sender@isp.test")
                client.rcpt(rcpt)
                client.putcmd("data")
                client.getreply()
                stuffed = body.replace(b"\r\n.", b"\r\n..")
                self.request.sendall(stuffed[:int(action.split(":")[1])])
                self.request.shutdown(socket.SHUT_RDWR)  # no final dot: the leg dies
                say("DIED")
                return
            client.mail("sender@isp.test")
            code, _ = client.rcpt(rcpt)
            if code == 250:
                try:
                    code, _ = client.data(body)
                except smtplib.SMTPDataError as exc:
                    code = exc.smtp_code
            else:
                client.rset()
            say("SENT", rcpt, code)
            if code == 250 or code >= 500:
                provider.queue.remove(rcpt)
        if action.startswith("stall:"):
            say("STALL")
            started = time.monotonic()
            self.request.settimeout(600)
            try:
                while self.request.recv(4096):
                    pass  # whatever the customer says now goes unanswered
            except OSError:
                pass
            say("HUNG_UP_AFTER", f"{time.monotonic() - started:.3f}")
            return
        client.quit()
        say("QUIT")


def message(rcpt: str, action: str) -> bytes:
    """One message for `rcpt`: a 3000-octet line for `longline`, N octets for `big:N`/`die:N`
    (doubled: `die` stops half-way), else short."""
    number = rcpt.partition("@")[0].removeprefix("user")
    head = (f"Received: from office by scripted.provider.test with esmtp id prov{number}; "
            "Sun, 6 Dec 2026 05:00:00 +0000\r\nFrom: sender@isp.test\r\nTo: {rcpt}\r\n"
            f"Message-ID: <scripted{number}@isp.test>\r\nSubject: scripted\r\n\r\n"
            f"for {rcpt}\r\n.leading dot\r\n").replace("{rcpt}", rcpt)
    if action == "longline":
        head += "y" * 3000 + "\r\n"
    size = int(action.split(":")[1]) * (2 if action.startswith("die:") else 1) \
        if action.startswith(("big:", "die:")) else 0
    row = "x" * 70 + "\r\n.dot\r\n"
    return (head + row * (max(size - len(head), 0) // len(row)) + "end\r\n").encode()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], provider: Provider) -> None:
        self.provider = provider
        super().__init__(address, Session)


def main(host: str, port: int, messages: int, actions: list[str]) -> None:
    with Server((host, port), Provider(messages, actions)) as server:
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        say("READY")
        server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] or ["quit"])
