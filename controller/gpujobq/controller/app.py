"""The Litestar application and the controller's lifetime: store, agent links, dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal
import time
from collections.abc import AsyncIterator, Callable

import asyncssh
from gpujobq.controller import (
    adminapi,
    agents,
    api,
    artifacts,
    boardapi,
    commits,
    database,
    dispatcher,
    metrics,
    service,
    store,
    walsync,
)
from gpujobq.controller.settings import Settings
from gpujobq.protocol import inventory
from litestar import Litestar

log = logging.getLogger(__name__)


def link_factory(settings: Settings) -> dispatcher.LinkFactory:
    """Links to inventory hosts, with their pinned keys (InventoryError if one is unreadable)."""
    client_key = asyncssh.read_private_key(str(settings.client_key))

    def make(host: inventory.Host, handler: agents.Handler) -> agents.Link:
        text = inventory.host_key_text(settings.inventory, host)
        try:
            host_key = asyncssh.import_public_key(text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise inventory.InventoryError(f"host {host.name}: bad host key: {exc}") from exc
        return agents.Link(
            name=host.name, address=host.address, port=host.port, user=host.user,
            host_key=host_key, client_key=client_key, handler=handler,
            keepalive=settings.keepalive, backoff_max=settings.backoff_max,
        )

    return make


class Reloader:
    """Applies inventory.yaml again when it changes (polled) or on SIGHUP.

    A file that does not load keeps the last good inventory; the error is logged and
    shown to admins until a good edit replaces it.
    """

    def __init__(self, path: pathlib.Path, apply: Callable[[inventory.Inventory], list[str]],
                 clock: Callable[[], float]) -> None:
        self.path = path
        self.apply = apply
        self.clock = clock
        self.error: str | None = None
        self.loaded_at: float | None = None
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> list[str]:
        """Load and apply the file now; raises InventoryError (and keeps the old one)."""
        self._seen = self._signature()
        try:
            inv = inventory.load(self.path)
            changes = self.apply(inv)
        except inventory.InventoryError as exc:
            if str(exc) != self.error:  # said once, not at every retry
                log.error("inventory not reloaded, keeping the last good one: %s", exc)
            self.error = str(exc)
            raise
        self.error, self.loaded_at = None, self.clock()
        log.info("inventory reloaded: %s", "; ".join(changes) or "no changes")
        return changes

    def reload_quietly(self) -> None:
        try:
            self.reload()
        except inventory.InventoryError:
            pass
        except Exception as exc:  # never let a bug stop the watching
            log.exception("inventory reload failed")
            self.error = f"reload failed: {exc!r}"

    async def watch(self, interval: float) -> None:
        """Reload on change; a refused file is tried again (a rename may wait for a host
        to drain out of the fleet, with no further edit)."""
        while True:
            await asyncio.sleep(interval)
            if self._signature() != self._seen or self.error is not None:
                self.reload_quietly()


def create_app(settings: Settings) -> Litestar:
    # Fail at start-up, not at the first request, on a bad inventory or a missing key.
    inv = inventory.load(settings.inventory)
    links = link_factory(settings)
    for host in inv.hosts:
        inventory.host_key_text(settings.inventory, host)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        clock = time.time
        db = database.open_database(settings.database)
        checkpoints = commits.Checkpointer(settings.database)
        checkpoints.take_over(db)
        jobs = store.Store(db, clock)
        disp = dispatcher.Dispatcher(store=jobs, settings=settings, inventory=inv,
                                     link_factory=links, clock=clock)
        # The group transaction's fsync, off the event loop (see walsync).
        syncer = disp.commits.syncer = walsync.WalSync.of(db)
        syncer.start()

        def apply(new: inventory.Inventory) -> list[str]:
            changes = disp.apply_inventory(new)
            app.state.node_ids = jobs.node_ids(h.name for h in new.hosts)
            return changes

        reloader = Reloader(settings.inventory, apply, clock)
        reloader.loaded_at = clock()
        app.state.service = service.JobService(
            store=jobs, dispatcher=disp, settings=settings, clock=clock
        )
        app.state.reloader = reloader
        disp.observer = app.state.metrics = metrics.Metrics(app.state)
        app.state.loop = asyncio.get_running_loop()
        app.state.node_ids = jobs.node_ids(h.name for h in inv.hosts)
        tasks = [asyncio.create_task(disp.run(), name="dispatcher"),
                 asyncio.create_task(reloader.watch(settings.inventory_poll), name="inventory"),
                 asyncio.create_task(checkpoints.run(), name="checkpoints")]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_quietly)
        log.info("controller up: %d agent host(s) in %s", len(inv.hosts), settings.inventory)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            syncer.close()
            db.close()

    return Litestar(
        route_handlers=[*api.ROUTES, *adminapi.ROUTES, *artifacts.ROUTES, metrics.scrape,
                        *boardapi.ROUTES],
        lifespan=[lifespan],
        exception_handlers={Exception: api.error_response},
        after_exception=[metrics.count_refusal],
        request_max_body_size=settings.max_upload,
        openapi_config=api.openapi_config(),
        # Logging is the controller's own (one format, every line straight to stderr),
        # not Litestar's default: its format names the module, and its queue hands every
        # line to a thread of its own.
        logging_config=None,
    )
