"""gpujobq-agent: keygen, authorize, serve, simulate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import re
import shutil
import signal
import socket
import sys
from collections.abc import Callable

from gpujobq.agent import (
    containers,
    core,
    gpus,
    instant,
    process,
    runtime,
    server,
    simulate,
    spool,
    toolkit,
)
from gpujobq.protocol import inventory, jobconfig, messages
from gpujobq.protocol import sshkeys as keys

DEFAULT_DIR = pathlib.Path("var/agent")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at INFO
    return int(args.func(args) or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpujobq-agent", description=__doc__)
    sub = p.add_subparsers(required=True)

    kg = sub.add_parser("keygen", help="create the agent's SSH host key if missing")
    kg.add_argument("--host-key", type=pathlib.Path, default=DEFAULT_DIR / "ssh_host_ed25519_key")
    kg.set_defaults(func=_keygen)

    au = sub.add_parser("authorize", help="let a controller's public key connect")
    au.add_argument("public_key", type=pathlib.Path, help="the controller's .pub file")
    au.add_argument("--authorized-keys", type=pathlib.Path, default=DEFAULT_DIR / "authorized_keys")
    au.set_defaults(func=_authorize)

    # What the instant runtime answers for every job (load testing; see instant.py).
    fake = argparse.ArgumentParser(add_help=False)
    fake.add_argument("--instant-stdout", default="", metavar="TEXT",
                      help="instant runtime: each job's stdout, taken literally except "
                           "{job_id} and {attempt} (default empty)")
    fake.add_argument("--instant-stderr", default="", metavar="TEXT",
                      help="instant runtime: each job's stderr, as --instant-stdout")
    fake.add_argument("--instant-exit-code", type=_exit_code, default=0, metavar="N",
                      help="instant runtime: each job's exit code (default 0)")

    sv = sub.add_parser("serve", parents=[fake], help="run the agent's SSH server")
    sv.add_argument("--listen", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8022)
    sv.add_argument("--name", default=socket.gethostname(), help="host name it reports")
    sv.add_argument("--host-key", type=pathlib.Path, default=DEFAULT_DIR / "ssh_host_ed25519_key")
    sv.add_argument("--authorized-keys", type=pathlib.Path, default=DEFAULT_DIR / "authorized_keys")
    sv.add_argument("--spool", type=pathlib.Path, default=DEFAULT_DIR / "spool")
    sv.add_argument("--runtime", choices=["auto", "docker", "process", "instant"],
                    default="auto",
                    help="docker (isolated containers), process (NOT isolated, trusted hosts "
                         "only), instant (runs NOTHING: load-testing a controller), or auto: "
                         "docker when a daemon answers (default)")
    sv.add_argument("--python", default=shutil.which("python3") or sys.executable,
                    help="interpreter for the process runtime")
    sv.add_argument("--image", default=inventory.DEFAULT_IMAGE,
                    help="container image when the controller names none")
    sv.add_argument("--gpu-mode", choices=["request", "runtime"], default="request",
                    help="how containers get GPUs: device requests (default) or the legacy "
                         "`runtime: nvidia`")
    limits = containers.Limits()
    sv.add_argument("--memory", type=int, default=limits.memory, help="bytes per container")
    sv.add_argument("--cpus", type=float, default=limits.cpus, help="CPUs per container")
    sv.add_argument("--pids", type=int, default=limits.pids, help="processes per container")
    sv.add_argument("--tmp-size", type=int, default=limits.tmp_size, help="bytes of /tmp")
    sv.add_argument("--shm-size", type=int, default=limits.shm_size, help="bytes of /dev/shm")
    sv.add_argument("--output-size", type=int, default=limits.output_size,
                    help="bytes the job may write to /output (and per file)")
    sv.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    sv.add_argument("--lease", type=float, default=core.DEFAULT_LEASE,
                    help="seconds without a word from the controller before running jobs are "
                         "stopped (until the controller sends its own value)")
    sv.set_defaults(func=_serve)

    sm = sub.add_parser("simulate", parents=[fake],
                        help="many agents with the instant runtime in one process, to "
                             "load-test a controller")
    sm.add_argument("--count", type=int, default=10, help="agents (default 10)")
    sm.add_argument("--gpus", type=int, default=8, help="virtual GPUs per agent (default 8)")
    sm.add_argument("--listen", default="127.0.0.1",
                    help="address to bind, and the inventory's address (default 127.0.0.1)")
    sm.add_argument("--base-port", type=int, default=0,
                    help="agent i listens on BASE_PORT+i (default 0: any free port)")
    sm.add_argument("--dir", type=pathlib.Path, default=simulate.DEFAULT_DIR,
                    help="host keys and spools, in DIR/agentNNN/ (default var/simulate)")
    sm.add_argument("--authorized-keys", type=pathlib.Path,
                    help="the controller's key(s), for all agents (default DIR/authorized_keys)")
    sm.add_argument("--name-prefix", default="sim", help="host names PREFIXNNN (default sim)")
    sm.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    sm.add_argument("--lease", type=float, default=core.DEFAULT_LEASE,
                    help="as for serve")
    sm.add_argument("--inventory-out", type=pathlib.Path, metavar="FILE",
                    help="write the simulated hosts here (inventory.yaml's `hosts:`) once "
                         "all listen")
    sm.set_defaults(func=_simulate)
    return p


def _exit_code(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("an exit code is 0 to 255")
    return value


def _keygen(args: argparse.Namespace) -> int:
    keys.ensure_private_key(args.host_key, comment="gpujobq-agent host key")
    print(pathlib.Path(f"{args.host_key}.pub").read_text().strip())
    return 0


def _authorize(args: argparse.Namespace) -> int:
    added = keys.authorize(args.authorized_keys, args.public_key.read_bytes())
    print(f"{'added to' if added else 'already in'} {args.authorized_keys}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if not args.authorized_keys.exists():
        print(f"gpujobq-agent: {args.authorized_keys} is missing: run `gpujobq-agent "
              "authorize CONTROLLER_KEY.pub` first", file=sys.stderr)
        return 2
    keys.ensure_private_key(args.host_key, comment="gpujobq-agent host key")
    chosen = _runtime(args)
    if chosen is None:
        print("gpujobq-agent: --runtime docker, but no Docker daemon answers", file=sys.stderr)
        return 2
    asyncio.run(_run(args, chosen))
    return 0


def _runtime(args: argparse.Namespace) -> runtime.Runtime | None:
    log = logging.getLogger(__name__)
    if args.runtime == "instant":
        log.warning("%s", instant.WARNING)
        return _instant(args)
    client = containers.available() if args.runtime in ("auto", "docker") else None
    if client is not None:
        log.info("runtime 'docker': jobs run in hardened containers (default image %s)",
                 args.image)
        limits = containers.Limits(
            memory=args.memory, cpus=args.cpus, pids=args.pids, tmp_size=args.tmp_size,
            shm_size=args.shm_size, output_size=args.output_size,
        )
        return containers.DockerRuntime(client, host=args.name, default_image=args.image,
                                        limits=limits, gpu_mode=args.gpu_mode)
    if args.runtime == "docker":
        return None
    log.warning("runtime 'process': jobs run as this user, NOT isolated; for trusted hosts only")
    return process.ProcessRuntime(args.python)


def _instant(args: argparse.Namespace) -> instant.InstantRuntime:
    return instant.InstantRuntime(stdout=args.instant_stdout, stderr=args.instant_stderr,
                                  exit_code=args.instant_exit_code)


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _simulate(args: argparse.Namespace) -> int:
    authorized = args.authorized_keys or args.dir / "authorized_keys"
    if not authorized.exists():
        print(f"gpujobq-agent: {authorized} is missing: run `gpujobq-agent authorize "
              f"CONTROLLER_KEY.pub --authorized-keys {authorized}` first", file=sys.stderr)
        return 2
    if args.count < 1 or args.gpus < 0:
        print("gpujobq-agent: --count must be 1 or more, --gpus 0 or more", file=sys.stderr)
        return 2
    last = simulate.name(args.name_prefix, args.count - 1)
    if not re.match(jobconfig.ID_PATTERN, last):
        print(f"gpujobq-agent: {last!r} cannot name a host: letters, digits, '.', '_', '-'",
              file=sys.stderr)
        return 2
    if args.base_port and not 0 < args.base_port + args.count - 1 <= 65535:
        print("gpujobq-agent: --base-port + --count runs past port 65535", file=sys.stderr)
        return 2
    logging.getLogger(__name__).warning("%s", instant.WARNING)
    options = simulate.Options(
        count=args.count, gpus=args.gpus, listen=args.listen, base_port=args.base_port,
        dir=args.dir, authorized_keys=authorized, name_prefix=args.name_prefix,
        heartbeat=args.heartbeat, lease=args.lease, inventory_out=args.inventory_out,
    )
    # uvloop where installed: a hundred agents in one process spend most of their CPU in
    # the event loop (SSH packets, timers); no job ever runs here, so no subprocesses.
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(simulate.run(options, _instant(args)))
    return 0


async def _run(args: argparse.Namespace, chosen: runtime.Runtime) -> None:
    log = logging.getLogger(__name__)
    store = spool.Spool(args.spool)
    # Containers outlive the agent: those of unfinished attempts are adopted, the rest
    # (results stored, or nothing known of them) removed.
    adopt: dict[tuple[str, int], tuple[messages.RunJob, pathlib.Path]] = {}
    if isinstance(chosen, containers.DockerRuntime):
        stale = []
        for key, cid in (await chosen.leftovers()).items():
            found = store.adoptable(*key) if key[1] > 0 else None
            if found is None:
                stale.append(cid)
            else:
                adopt[key] = found
        await chosen.remove(stale)
        if stale:
            log.warning("removed %d container(s) of earlier runs", len(stale))
    # Before the spool is recovered (which drops the folders of unfinished attempts, and
    # with them the records of their processes) and before the controller can requeue
    # those attempts here. Whatever the runtime now: only the process runtime leaves
    # records, and `auto` may have chosen it last time. It logs each job it kills.
    await asyncio.to_thread(process.kill_leftovers, store)
    agent = core.Agent(
        host=args.name,
        runtime=chosen,
        spool=store,
        probe=gpus.Probe(),
        lease=args.lease,
        keep=frozenset(adopt),
    )
    if isinstance(chosen, containers.DockerRuntime) and agent.gpus:
        # Real GPUs go into containers through the NVIDIA toolkit's root hooks.
        found = await asyncio.to_thread(toolkit.installed)
        problem = toolkit.warning(found)
        if problem:
            log.warning("%s", problem)
            agent.warnings.append(problem)
    for run, workdir in adopt.values():
        agent.adopt(run, workdir)
    lease_watch = asyncio.create_task(agent.watch_lease())
    if agent.gpus:
        logging.getLogger(__name__).info(
            "NVML: %s", "; ".join(f"GPU {g.index} {g.name} {g.uuid}" for g in agent.gpus))
    srv = server.AgentServer(agent, heartbeat_interval=args.heartbeat)
    port = await srv.start(args.listen, args.port, args.host_key, args.authorized_keys)
    logging.getLogger(__name__).info("agent %s listening on %s:%d", args.name, args.listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    lease_watch.cancel()
    await srv.close()
    await agent.shutdown()


if __name__ == "__main__":
    sys.exit(main())
