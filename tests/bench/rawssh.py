"""The B10 baseline's server: an asyncssh server that writes N bytes on any exec channel.

python -m tests.bench.rawssh PORT HOST_KEY AUTHORIZED_KEYS
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh

CHUNK = b"x" * (1 << 16)


async def _session(process: asyncssh.SSHServerProcess[bytes]) -> None:
    left = int(process.command or "0")
    while left > 0:
        process.stdout.write(CHUNK[: min(left, len(CHUNK))])
        left -= len(CHUNK)
        await process.stdout.drain()
    process.exit(0)


async def main() -> None:
    port, host_key, authorized = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    await asyncssh.create_server(asyncssh.SSHServer, "127.0.0.1", port,
                                 server_host_keys=[host_key], authorized_client_keys=authorized,
                                 process_factory=_session, encoding=None)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
