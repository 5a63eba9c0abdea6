"""What the daemon tells: the control socket's answers, `etrnd status`, STATUS=, metrics views."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from etrnd.link.state import not_public
from etrnd.outputs import status as status_doc
from etrnd.service.core import DaemonCore
from etrnd.service.history import RelayHistory

# STATUS= is a line for humans: the changes of this long (a link-up, its round) make one.
PUBLISH_DELAY = 0.01


class Reporting(DaemonCore):
    """Views of the daemon's state for status, the notify socket, metrics and the state file."""

    def wan_not_public(self, iface: str | None) -> str | None:
        """Why the ISP cannot connect back to `iface` (CGNAT, RFC 1918), or None."""
        watcher = self._watcher
        if watcher is None or iface is None:
            return None
        return not_public(watcher.addresses(iface, socket.AF_INET),
                          watcher.addresses(iface, socket.AF_INET6))

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "status":
            return {"ok": True, **self.status()}
        relay = request.get("relay")
        if relay is not None and (not isinstance(relay, str)
                                  or relay not in {r.label for r in self.config.relays}):
            return {"ok": False, "error": f"no relay named {str(relay)[:64]!r}"}
        done = self.trigger(relay, "trigger")
        return {"ok": True, "relays": list(done),
                "results": [{"relay": name, "what": what} for name, what in done.items()]}

    def status(self) -> dict[str, Any]:
        watcher = self._watcher
        links = self._links()
        # `link`: the only link, or (relays on links of their own) all of them in one.
        link = links[0] if len(links) == 1 else status_doc.LinkView(
            up=bool(watcher and watcher.up), why=watcher.why if watcher else "",
            since=max((ln.since for ln in links if ln.since is not None), default=None),
            transitions=sum(ln.transitions for ln in links),
            watching=tuple(p for ln in links for p in ln.watching),
            up_when=self.config.watch.up_when,
            not_public=next((ln.not_public for ln in links if ln.not_public), None))
        doc = status_doc.build(status_doc.DaemonView(
            path=self.path, config=self.config, started=self.started, link=link, links=links,
            rounds_started=self.rounds_started,
            last_round=self.last_round, tasks=len(asyncio.all_tasks()),
            statuses=self._status, running=self._tasks.keys(),
            round_due=watcher.round_due() if watcher else None, now=time.time(),
            config_loaded=self.config_loaded, reload_failed=self.reload_failed,
            repeat_next=self.repeat_next if self.config.repeat else None,
            state_file=self.state.as_dict()))
        if self._gate is not None:
            doc["local_mta"] = self._gate.as_dict()
            for relay in doc["relays"]:
                if relay["name"] in self._gate.waiting:
                    relay["state"] = "waiting-local-mta"
        # The stall detector's view: steps of the loop longer than threshold_ms.
        doc["loop"] = {"stalls": self.stalls.stalls,
                       "threshold_ms": round(self.stalls.threshold * 1000),
                       "longest_step_ms": round(self.stalls.longest * 1000, 1)}
        return doc

    def summary(self) -> str:
        """The one-line STATUS= that `systemctl status etrnd` shows."""
        watcher = self._watcher
        line = status_doc.summary(bool(watcher and watcher.up), self.config.relays,
                                  self._status, self._tasks.keys(), self._links())
        if self._gate is not None and self._gate.waiting:
            line += f"; waiting for the local MTA {self._gate.target}"
        return line

    def _links(self) -> list[status_doc.LinkView]:
        """Each link, the relays it drives and which of them wait on failover (wall clock)."""
        watcher = self._watcher
        if watcher is None:
            return []
        offset = time.time() - time.monotonic()  # the watcher's times are monotonic

        def wall(mono: float | None) -> float | None:
            return None if mono is None else mono + offset

        backs_up = {r.label: r.watch.only_when_down for r in self.config.relays
                    if r.watch is not None and r.watch.only_when_down}
        etrn = {r.label for r in self.config.relays if r.protocol == "etrn"}
        out = []
        for view in watcher.links():
            spec = watcher.plan.link(view.name)
            active = {r: t + offset for r in view.relays
                      if (t := watcher.may_run_since(r)) is not None}
            out.append(status_doc.LinkView(
                up=view.up, why=view.why, since=wall(view.since),
                transitions=self.link_transitions.get(view.name, 0),
                watching=spec.interfaces, up_when=spec.up_when,
                not_public=(self.wan_not_public(view.iface)
                            if view.up and etrn & set(view.relays) else None),
                name=view.name, relays=view.relays,
                standby=frozenset(r for r in view.relays if watcher.standby(r)),
                backs_up={r: backs_up[r] for r in view.relays if r in backs_up},
                active_since=active, holding=wall(view.holding)))
        return out

    def _metric_links(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        watcher = self._watcher
        return [] if watcher is None else [(v.name, v.up, v.relays) for v in watcher.links()]

    def _publish(self) -> None:
        """STATUS= for `systemctl status`: nothing at all without a notify socket; else built
        once for all the changes of the next PUBLISH_DELAY, so a link-up's connect goes first."""
        if self.notifier.enabled and self._publish_timer is None:
            self._publish_timer = asyncio.get_running_loop().call_later(
                PUBLISH_DELAY, self._publish_now)

    def _publish_now(self) -> None:
        self._publish_timer = None
        self.notifier.status(self.summary())

    def _last_successes(self) -> dict[str, float | None]:
        """For metrics: each relay's last accepted reply (wall clock), as status shows it."""
        marks = {r.label: (st.history.last_success if (st := self._status.get(r.label))
                           else None) for r in self.config.relays}
        return {label: mark.when if mark else None for label, mark in marks.items()}

    def _histories(self) -> tuple[dict[str, RelayHistory], dict[str, tuple[str, ...]]]:
        """For the state file: every relay's history and its configured arguments."""
        return ({name: st.history for name, st in self._status.items()},
                {r.label: r.etrn for r in self.config.relays})
