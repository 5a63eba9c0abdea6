"""pyroute2's rtnetlink socket without its package `__init__`, which loads every family it has.

`import pyroute2` runs an `__init__` that imports conntrack, ipset, nl80211, NDB, IPDB,
plan9 and more (163 modules): more than half of pyroute2's import time, paid by every start
and by every `etrnd send` from an ip-up script, for parts etrnd never uses. Importing
`pyroute2.iproute.linux` directly still runs that `__init__` first, so the package module is
put in place here without running it; it runs the real `__init__` on the first attribute
it lacks (PEP 562), so other code in the same process that does `from pyroute2 import X`
keeps working.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def _package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return  # not installed as a package: let the ordinary import say so
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    origin = spec.origin

    def complete(name: str) -> Any:
        # `from pyroute2 import config` asks for a subpackage: import it, nothing more.
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        # Any other name: the whole __init__, once; it defines every public name.
        del package.__dict__["__getattr__"]
        with open(origin, encoding="utf-8") as source:
            exec(compile(source.read(), origin, "exec"), package.__dict__)  # noqa: S102
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

    package.__dict__["__getattr__"] = complete  # PEP 562
    sys.modules["pyroute2"] = package


_package()

from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402
from pyroute2.netlink import nlmsg  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

__all__ = ["AsyncIPRoute", "NetlinkError", "nlmsg", "rtmsg"]
