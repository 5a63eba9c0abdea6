"""etrnd: send SMTP ETRN to the ISP's relays when the WAN link comes up."""

import os

__version__ = "0.1.0"

# etrnd uses no pydantic plugin; looking for them reads every installed distribution's
# metadata at the first model (~15 ms of every start and every `etrnd send`). An explicit
# setting in the environment is kept.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
