"""The one place that picks a relay's protocol: `relay.protocol` names its attempt."""

from __future__ import annotations

from etrnd.config.model import Relay
from etrnd.protocols import etrn
from etrnd.protocols.seam import SendAttempt


def attempt_for(relay: Relay) -> SendAttempt:
    """The attempt function of `relay.protocol` ("etrn" or "odmr", RFC 1985 / RFC 2645)."""
    if relay.protocol == "odmr":
        # Imported when a relay uses it: aiosmtpd and the turnaround cost start-up time.
        from etrnd.protocols.odmr import client

        return client.attempt
    return etrn.attempt
