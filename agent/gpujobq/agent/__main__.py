"""gpujobq-agent: keygen, authorize, serve."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import shutil
import signal
import socket
import sys

from gpujobq.agent import core, gpus, process, server, spool
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

    sv = sub.add_parser("serve", help="run the agent's SSH server")
    sv.add_argument("--listen", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8022)
    sv.add_argument("--name", default=socket.gethostname(), help="host name it reports")
    sv.add_argument("--host-key", type=pathlib.Path, default=DEFAULT_DIR / "ssh_host_ed25519_key")
    sv.add_argument("--authorized-keys", type=pathlib.Path, default=DEFAULT_DIR / "authorized_keys")
    sv.add_argument("--spool", type=pathlib.Path, default=DEFAULT_DIR / "spool")
    sv.add_argument("--runtime", choices=["process"], default="process")
    sv.add_argument("--python", default=shutil.which("python3") or sys.executable,
                    help="interpreter for the process runtime")
    sv.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    sv.set_defaults(func=_serve)
    return p


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
    logging.getLogger(__name__).warning(
        "runtime 'process': jobs run as this user, NOT isolated; for trusted hosts only"
    )
    asyncio.run(_run(args))
    return 0


async def _run(args: argparse.Namespace) -> None:
    agent = core.Agent(
        host=args.name,
        runtime=process.ProcessRuntime(args.python),
        spool=spool.Spool(args.spool),
        gpus=gpus.detect(),
    )
    srv = server.AgentServer(agent, heartbeat_interval=args.heartbeat)
    port = await srv.start(args.listen, args.port, args.host_key, args.authorized_keys)
    logging.getLogger(__name__).info("agent %s listening on %s:%d", args.name, args.listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    await srv.close()
    await agent.shutdown()


if __name__ == "__main__":
    sys.exit(main())
