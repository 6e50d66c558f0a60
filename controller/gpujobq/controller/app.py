"""The Litestar application and the controller's lifetime: store, agent links, dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncssh
from gpujobq.controller import agents, api, database, dispatcher, service, store
from gpujobq.controller.settings import Settings
from gpujobq.protocol import inventory
from litestar import Litestar

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Litestar:
    # Fail at start-up, not at the first request, on a bad inventory or a missing key.
    inv = inventory.load(settings.inventory)
    host_keys = {
        h.name: asyncssh.import_public_key(inventory.host_key_text(settings.inventory, h))
        for h in inv.hosts
    }
    client_key = asyncssh.read_private_key(str(settings.client_key))

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        clock = time.time
        db = database.open_database(settings.database)
        jobs = store.Store(db, clock)
        disp = dispatcher.Dispatcher(
            store=jobs,
            settings=settings,
            hosts={
                h.name: dispatcher.HostState(tuple(g.wire() for g in h.gpus), h.drain)
                for h in inv.hosts
            },
            clock=clock,
            inventory=inv,
        )
        for host in inv.hosts:
            disp.links[host.name] = agents.Link(
                name=host.name, address=host.address, port=host.port, user=host.user,
                host_key=host_keys[host.name], client_key=client_key, handler=disp,
                keepalive=settings.keepalive, backoff_max=settings.backoff_max,
            )
        app.state.service = service.JobService(
            store=jobs, dispatcher=disp, settings=settings, clock=clock
        )
        app.state.node_ids = jobs.node_ids(h.name for h in inv.hosts)
        tasks = [asyncio.create_task(link.run(), name=f"link {n}")
                 for n, link in disp.links.items()]
        tasks.append(asyncio.create_task(disp.run(), name="dispatcher"))
        log.info("controller up: %d agent host(s) in %s", len(inv.hosts), settings.inventory)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            db.close()

    return Litestar(
        route_handlers=api.ROUTES,
        lifespan=[lifespan],
        exception_handlers={Exception: api.error_response},
        request_max_body_size=settings.max_upload,
    )
