"""ODMR (RFC 2645): AUTH, ATRN, then receive the provider's queue on the same connection."""

from __future__ import annotations

from collections.abc import Sequence

from etrnd.attempt import AttemptResult, OnHost, OnReply, ignore_host, ignore_reply
from etrnd.config import Relay
from etrnd.replies import failure


async def attempt(relay: Relay, args: Sequence[str], *, attempt: int = 1,
                  on_host: OnHost = ignore_host,
                  on_reply: OnReply = ignore_reply) -> AttemptResult:
    """Placeholder until the session lands: a transient failure, nothing sent."""
    on_host(relay.all_hosts[0])
    return AttemptResult(stop=failure("NotImplemented", "the ODMR session is not built yet"),
                         host=relay.all_hosts[0])
