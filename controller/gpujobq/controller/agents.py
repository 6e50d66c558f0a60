"""One SSH link per agent host: connect, hello, job channel, reconnect with backoff.

The link pins the host's key (never ``known_hosts=None``), authenticates with the
controller's client key, keeps the connection alive with SSH keepalives, and carries
all job traffic on one long-lived ``jobs`` channel. It reports what happens to a
handler (the dispatcher) and never touches job state itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol

import asyncssh
from gpujobq.protocol import messages, wire

log = logging.getLogger(__name__)

# GCM first: large writes reach ~170 MB/s with it, against ~4 MB/s small-write defaults.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes128-ctr", "aes256-ctr")


READ_CHUNK = 1 << 20  # bytes of the job channel read at once
# What the agent may send on the job channel before the controller has read it, and in
# packets of up to this size: 8x SSH's usual 32 KiB, so live output crosses in an eighth
# as many packets (each one decrypted and handled on its own).
CHANNEL_WINDOW = 8 << 20
CHANNEL_PACKET = 256 << 10


class LinkDown(Exception):
    """The host's job channel is not open."""


class Handler(Protocol):
    def on_connected(self, link: Link, hello: messages.Hello) -> None: ...
    def on_messages(self, link: Link, msgs: list[messages.Up]) -> None: ...
    def on_disconnected(self, link: Link) -> None: ...


class Link:
    def __init__(
        self,
        *,
        name: str,
        address: str,
        port: int,
        user: str,
        host_key: asyncssh.SSHKey,
        client_key: asyncssh.SSHKey,
        handler: Handler,
        keepalive: float = 10.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.user = user
        self.host_key = host_key
        self.client_key = client_key
        self.handler = handler
        self.keepalive = keepalive
        self.backoff_max = backoff_max
        self.fingerprint: str = host_key.get_fingerprint()
        self.hello: messages.Hello | None = None
        self.last_error: str | None = None
        self.down_since: float | None = time.monotonic()  # never wall time: clocks step
        self._channel: asyncssh.SSHClientProcess[bytes] | None = None
        self._outbox: wire.Outbox | None = None
        self._conn: asyncssh.SSHClientConnection | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def send(self, msg: messages.Down) -> None:
        """Queue a message; it leaves with the others of this turn of the event loop."""
        if self._channel is None or self._outbox is None:
            raise LinkDown(f"agent {self.name} is not connected")
        self._outbox.send(msg)

    def drop(self, why: str) -> None:
        """Close the connection (the host went silent); run() reconnects with backoff."""
        self.last_error = why
        if self._conn is not None:
            self._conn.abort()

    async def run(self) -> None:
        """Keep the link up until cancelled."""
        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncssh.Error, messages.ProtocolError, TimeoutError) as exc:
                # A link that was up counts as a first failure again: backoff restarts.
                failures = 1 if self.down_since is None else failures + 1
                self.last_error = str(exc) or type(exc).__name__
                log.warning("agent %s: %s", self.name, self.last_error)
            except Exception as exc:
                failures += 1
                self.last_error = repr(exc)
                log.exception("agent %s: link failed", self.name)
            finally:
                await self._teardown()
            # Exponential backoff with full jitter: many controllers or hosts coming back
            # at once do not reconnect in lockstep.
            ceiling = min(self.backoff_max, 0.25 * 2 ** min(failures, 10))
            await asyncio.sleep(random.uniform(ceiling / 2, ceiling))

    async def _session(self) -> None:
        self._conn = await asyncio.wait_for(
            asyncssh.connect(
                self.address,
                self.port,
                username=self.user,
                client_keys=[self.client_key],
                known_hosts=([self.host_key], [], []),
                keepalive_interval=self.keepalive,
                keepalive_count_max=3,
                encryption_algs=_CIPHERS,
                agent_path=None,
                config=[],
            ),
            timeout=15,
        )
        hello_run = await asyncio.wait_for(
            self._conn.run("hello", encoding=None, check=True), timeout=15
        )
        stdout = hello_run.stdout
        assert isinstance(stdout, bytes)
        self.hello = wire.decode_hello(stdout)
        channel = await self._conn.create_process(
            "jobs", encoding=None, window=CHANNEL_WINDOW, max_pktsize=CHANNEL_PACKET)
        self._channel = channel
        self._outbox = wire.Outbox(channel.stdin.write, f"agent {self.name}")
        self.down_since = None
        self.last_error = None
        log.info("agent %s connected (runtime %s)", self.name, self.hello.runtime)
        self.handler.on_connected(self, self.hello)
        frames = wire.Frames()
        # Whatever has arrived is read at once and handed over as one burst: the handler
        # stores a burst's reports in one transaction.
        while chunk := await channel.stdout.read(READ_CHUNK):
            burst = []
            for msg in frames.decoded(chunk, wire.decode_up):
                if isinstance(msg, messages.ProtocolError):
                    log.warning("agent %s sent an unreadable message: %s", self.name, msg)
                else:
                    burst.append(msg)
            if burst:
                self.handler.on_messages(self, burst)
        if frames.partial:
            raise messages.ProtocolError("job channel ended inside a frame")
        raise ConnectionError("job channel closed by the agent")

    async def _teardown(self) -> None:
        was_up = self._channel is not None
        self._channel = self._outbox = None
        if self.down_since is None:
            self.down_since = time.monotonic()
        if self._conn is not None:
            self._conn.close()
            try:
                await asyncio.wait_for(self._conn.wait_closed(), 5)
            except (TimeoutError, asyncssh.Error, OSError):
                pass
            self._conn = None
        if was_up:
            self.handler.on_disconnected(self)
