"""Reload (SIGHUP, ExecReload=): read the config off the loop, keep the old one if it is bad."""

from __future__ import annotations

import time

from etrnd.config.loading import load_config
from etrnd.config.model import Config, ConfigError
from etrnd.link.lines import plan
from etrnd.loop import offloop
from etrnd.outputs import logs, metrics
from etrnd.outputs.logs import get_logger
from etrnd.service.control import ControlError, ControlServer
from etrnd.service.core import DaemonCore

log = get_logger()
# Reading the config (and the secrets it names) at reload runs off the loop; a file system
# that hangs (a dead NFS server) fails the reload after this long, keeping the old config.
RELOAD_READ_TIMEOUT = 10.0


class Reloading(DaemonCore):
    """A new config applied in place: relays added, changed or removed, the rest untouched."""

    def request_reload(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # a SIGHUP storm collapses into one more reload
            return
        self._reloading = self._spawn(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            self.notifier.reloading(time.monotonic_ns() // 1000)
            try:
                new = await offloop.bounded(RELOAD_READ_TIMEOUT, load_config, self.path)
            except TimeoutError:
                self._reload_failed([f"reading the configuration took over "
                                     f"{RELOAD_READ_TIMEOUT:g}s"])
            except ConfigError as exc:
                self._reload_failed(exc.problems)
            else:
                await self._apply(new)
            self.notifier.ready(self.summary())
            if not self._reload_again:
                return

    def _reload_failed(self, problems: list[str]) -> None:
        self.reload_failed = (time.time(), list(problems))
        log.error("config_reload_failed", config=str(self.path), problems=problems,
                  kept="previous configuration")

    async def _apply(self, new: Config) -> None:
        old = self.config
        if new.control.socket != old.control.socket:
            server = ControlServer(new.control.socket, self.handle_request)
            try:
                await server.start()
            except ControlError as exc:
                self._reload_failed([str(exc)])
                return
            if self._control is not None:
                await self._control.close()
            self._control = server
        if new.log != old.log:
            logs.configure(new.log.level, new.log.format, background=True)
        kept = {r.label: r for r in new.relays}
        before = {r.label: r for r in old.relays}
        gone = {r.label for r in old.relays if kept.get(r.label) != r}  # changed or removed
        interrupted = gone & self._tasks.keys()
        self.cancel_rounds("config_reloaded", only=gone)
        for label in gone - kept.keys():
            self._status.pop(label, None)
            self._wake.pop(label, None)
        self.config = new
        self.config_loaded, self.reload_failed = time.time(), None
        self._set_gate(new)
        if self._watcher is not None and plan(new) != self._watcher.plan:
            self._watcher.reconfigure(plan(new))
        if new.repeat != old.repeat:
            self._restart_repeat()
        await metrics.serve(new, link_up=self._watcher is not None and self._watcher.up,
                            last_success=self._last_successes, links=self._metric_links())
        added = sorted(kept.keys() - before.keys())
        changed = sorted(gone & kept.keys())
        log.info("config_reloaded", config=str(self.path),
                 relays=[r.label for r in new.relays], added=added,
                 removed=sorted(before.keys() - kept.keys()), changed=changed)
        watcher = self._watcher
        if watcher is not None:
            # A relay added while its link is up (or changed mid-round: that round was
            # cancelled) would otherwise wait for the next link-up.
            for label in [*added, *sorted(interrupted & kept.keys())]:
                if watcher.may_run(label):
                    self.start_rounds(label, "config_reloaded")
        self.state.changed()
