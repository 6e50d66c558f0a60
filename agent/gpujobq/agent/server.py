"""The agent's SSH server: key auth only, no shell, only the agent's own verbs.

Verbs (the SSH exec command):
    hello   one msgpack Hello (host, runtime, GPUs, jobs held), then exit
    jobs    the long-lived job channel: length-prefixed messages both ways
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Any

import asyncssh
from gpujobq.agent import core
from gpujobq.protocol import messages, wire

log = logging.getLogger(__name__)

VERBS = ("hello", "jobs")
READ_CHUNK = 1 << 20  # bytes of the job channel read at once


class _KeyOnly(asyncssh.SSHServer):
    """Public-key authentication for every user; nothing else (no passwords, no forwarding)."""

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        log.info("controller connection from %s", peer[0] if peer else "?")


class AgentServer:
    def __init__(
        self, agent: core.Agent, *, heartbeat_interval: float = 5.0, keepalive: float = 15.0
    ) -> None:
        self.agent = agent
        self.heartbeat_interval = heartbeat_interval
        self.keepalive = keepalive
        self._listener: asyncssh.SSHAcceptor | None = None

    async def start(
        self, host: str, port: int, host_key: pathlib.Path, authorized_keys: pathlib.Path
    ) -> int:
        self._listener = await asyncssh.create_server(
            _KeyOnly,
            host,
            port,
            server_host_keys=[str(host_key)],
            authorized_client_keys=str(authorized_keys),
            process_factory=self._session,
            encoding=None,
            line_editor=False,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            keepalive_interval=self.keepalive,
            keepalive_count_max=3,
        )
        return self._listener.get_port()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        # An exception escaping a session handler closes the whole connection, and with
        # it the job channel: every handler is wrapped.
        command = (process.command or "").strip()
        try:
            if command == "hello":
                process.stdout.write(wire.encode(self.agent.hello()))
                process.exit(0)
            elif command == "jobs":
                await self._jobs(process)
                process.exit(0)
            else:
                process.stderr.write(f"gpujobq-agent: verbs are {', '.join(VERBS)}\n".encode())
                process.exit(2)
        except (asyncssh.Error, ConnectionError, BrokenPipeError):
            log.info("controller channel %r closed", command)
        except Exception:
            log.exception("session %r failed", command)
            process.exit(1)

    async def _jobs(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        outbox = wire.Outbox(process.stdout.write, "controller channel")
        send = outbox.send
        self.agent.attach(send)
        beats = asyncio.create_task(self._heartbeats(send))
        frames = wire.Frames()
        try:
            # Whatever has arrived is read at once: a burst of messages costs one read.
            while chunk := await process.stdin.read(READ_CHUNK):
                for msg in frames.decoded(chunk, wire.decode_down):
                    self._apply(msg)
            if frames.partial:
                raise messages.ProtocolError("job channel ended inside a frame")
        except messages.ProtocolError as exc:
            log.warning("closing job channel: %s", exc)
        finally:
            beats.cancel()
            self.agent.detach(send)

    def _apply(self, msg: messages.Down | messages.ProtocolError) -> None:
        if isinstance(msg, messages.ProtocolError):
            log.warning("ignoring a message the agent cannot read: %s", msg)
            return
        self.agent.handle(msg)

    async def _heartbeats(self, send: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                send(self.agent.heartbeat())
            except Exception:
                return
