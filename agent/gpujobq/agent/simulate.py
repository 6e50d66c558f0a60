"""gpujobq-agent simulate: many complete agents in one process, to load-test a controller.

Each simulated host is a real agent (``core.Agent`` + ``server.AgentServer``): its own
SSH server on its own port, its own ed25519 host key and spool folder, the real
protocol. Only the work is fake: they share one instant runtime (nothing runs) and
offer virtual GPUs without asking NVML. All of them live on one asyncio loop, so a
hundred hosts cost one process and a few seconds to start.

    DIR/agentNNN/ssh_host_ed25519_key(.pub)   host key, made once and reused
    DIR/agentNNN/spool/                       the agent's spool (results until acked)

Once all listen, the `hosts:` section of an inventory naming them is written (to a
temporary file, then renamed) for the controller under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import resource
import signal
import time

import yaml
from gpujobq.agent import core, runtime, server, spool
from gpujobq.protocol import inventory
from gpujobq.protocol import sshkeys as keys

log = logging.getLogger(__name__)

DEFAULT_DIR = pathlib.Path("var/simulate")
HOST_KEY = "ssh_host_ed25519_key"
# libyaml's dumper where PyYAML has it: four times faster for a thousand hosts.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    count: int
    gpus: int  # virtual GPUs per agent
    listen: str
    base_port: int  # agent i listens on base_port + i; 0: any free port
    dir: pathlib.Path
    authorized_keys: pathlib.Path
    name_prefix: str = "sim"
    heartbeat: float = 5.0
    lease: float = core.DEFAULT_LEASE
    inventory_out: pathlib.Path | None = None


@dataclasses.dataclass
class Simulated:
    """One running agent of the simulation."""

    name: str
    port: int
    host_key: pathlib.Path
    agent: core.Agent
    server: server.AgentServer
    lease_watch: asyncio.Task[None]


def name(prefix: str, i: int) -> str:
    """The host name of agent ``i``."""
    return f"{prefix}{i:03d}"


async def run(options: Options, chosen: runtime.Runtime) -> None:
    """Start every agent, write the inventory, and serve until SIGTERM or SIGINT."""
    _raise_open_files(options.count)
    stopping = _stop_on_signals()  # from the start: a signal while starting stops them too
    began = time.monotonic()
    sims = await start(options, chosen)
    try:
        if not stopping.is_set():
            _announce(options, sims, time.monotonic() - began)
        await stopping.wait()
    finally:
        await stop(sims)


def _announce(options: Options, sims: list[Simulated], took: float) -> None:
    """Write the inventory, then say on stdout that all listen (where, which ports)."""
    ports = [s.port for s in sims]
    line = f"simulating {len(sims)} agents on {options.listen} ports {min(ports)}-{max(ports)}"
    if options.inventory_out is not None:
        write_inventory(options.inventory_out, options, sims)
        line += f"; inventory: {options.inventory_out}"
    log.info("%d agents listening after %.2f s", len(sims), took)
    print(line, flush=True)


async def start(options: Options, chosen: runtime.Runtime) -> list[Simulated]:
    """Start the agents one after another (each start is a few ms); all or none."""
    sims: list[Simulated] = []
    try:
        for i in range(options.count):
            sims.append(await _start_one(options, chosen, i))
    except BaseException:
        await stop(sims)
        raise
    return sims


async def _start_one(options: Options, chosen: runtime.Runtime, i: int) -> Simulated:
    folder = options.dir / f"agent{i:03d}"
    host_key = folder / HOST_KEY
    host = name(options.name_prefix, i)
    keys.ensure_private_key(host_key, comment=f"gpujobq-agent simulated host {host}")
    agent = core.Agent(host=host, runtime=chosen,
                       spool=spool.Spool(folder / "spool"), probe=None, lease=options.lease)
    srv = server.AgentServer(agent, heartbeat_interval=options.heartbeat)
    port = await srv.start(options.listen, options.base_port + i if options.base_port else 0,
                           host_key, options.authorized_keys)
    watch = asyncio.create_task(agent.watch_lease(), name=f"lease {agent.host}")
    return Simulated(name=agent.host, port=port, host_key=host_key, agent=agent, server=srv,
                     lease_watch=watch)


async def stop(sims: list[Simulated]) -> None:
    """Close every server, then stop what their agents hold (as one agent's exit does)."""
    for sim in sims:
        sim.lease_watch.cancel()
    await asyncio.gather(*(s.server.close() for s in sims), return_exceptions=True)
    await asyncio.gather(*(s.agent.shutdown() for s in sims), return_exceptions=True)


def inventory_text(options: Options, sims: list[Simulated]) -> str:
    """inventory.yaml's `hosts:` naming every simulated agent, checked as the controller would."""
    hosts = [
        {
            "name": sim.name,
            "address": options.listen,
            "port": sim.port,
            "host_key_file": f"{sim.host_key.absolute()}.pub",
            "gpus": [{"index": g, "virtual": True} for g in range(options.gpus)],
        }
        for sim in sims
    ]
    text = yaml.dump({"hosts": hosts}, Dumper=_DUMPER, sort_keys=False,
                     default_flow_style=None)
    inventory.loads(text.encode(), "the simulated inventory")  # raises if it drifts
    return text


def write_inventory(path: pathlib.Path, options: Options, sims: list[Simulated]) -> None:
    """Written whole or not at all: a controller watching the file never reads half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(inventory_text(options, sims))
    os.replace(tmp, path)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call on the running loop)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping


def _raise_open_files(count: int) -> None:
    """Each agent holds a listening socket and a controller connection: lift the soft limit."""
    need = 256 + 4 * count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning("open files limited to %d; %d agents may need %d", target, count, need)
