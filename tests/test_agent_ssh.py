"""The agent's SSH face, against a real asyncssh server on 127.0.0.x.

Key auth only, no shell, only its verbs; jobs are idempotent by (job_id, attempt);
results wait in the spool until acked.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import AsyncIterator

import asyncssh
import pytest
from gpujobq.agent import core, process, server, spool
from gpujobq.controller import agents
from gpujobq.protocol import messages, sshkeys, wire


class Env:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.host_key = root / "host_key"
        self.client_key_path = root / "client_key"
        sshkeys.ensure_private_key(self.host_key, "agent")
        self.client_key = sshkeys.ensure_private_key(self.client_key_path, "controller")
        sshkeys.authorize(root / "authorized_keys", self.client_key.export_public_key())
        self.spool = spool.Spool(root / "spool")
        self.agent = core.Agent(host="t", runtime=process.ProcessRuntime(sys.executable),
                                spool=self.spool)
        self.server = server.AgentServer(self.agent, heartbeat_interval=0.2)
        self.port = 0

    def host_public_key(self) -> asyncssh.SSHKey:
        return asyncssh.read_public_key(f"{self.host_key}.pub")

    async def connect(self, client_key: asyncssh.SSHKey | None = None
                      ) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            "127.0.0.2", self.port, username="gpujobq",
            client_keys=[client_key or self.client_key],
            known_hosts=([self.host_public_key()], [], []), agent_path=None, config=[],
        )


@pytest.fixture
async def env(tmp_path: pathlib.Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    e.port = await e.server.start("127.0.0.2", 0, e.host_key, tmp_path / "authorized_keys")
    yield e
    await e.server.close()
    await e.agent.shutdown()


class Channel:
    """A raw job channel, as the controller opens it."""

    def __init__(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        self.proc = proc

    def send(self, msg: messages.Down) -> None:
        self.proc.stdin.write(wire.frame(msg))

    async def next(self, kind: type, timeout: float = 15) -> messages.Up:
        async with asyncio.timeout(timeout):
            while True:
                body = await wire.read_frame(self.proc.stdout)
                assert body is not None, "channel closed"
                msg = wire.decode_up(body)
                if isinstance(msg, kind):
                    return msg


def run_job(code: str, attempt: int = 1, job_id: str = "job1", **kw: object) -> messages.RunJob:
    return messages.RunJob(job_id=job_id, attempt=attempt, code=code.encode(),
                           config=b"user_id: u\n", time_limit=30, grace=1, **kw)


async def test_unknown_client_key_is_refused(env: Env) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await env.connect(stranger)


async def test_no_shell_no_unknown_verbs_no_forwarding(env: Env) -> None:
    async with await env.connect() as conn:
        result = await conn.run("sh -c id", encoding=None)
        assert result.exit_status == 2
        assert b"verbs are hello, jobs" in result.stderr
        shell = await conn.run(encoding=None)  # no command: a shell request
        assert shell.exit_status == 2
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", env.port)


async def test_no_sftp_no_remote_or_socket_forwarding_no_passwords(
        env: Env, tmp_path: pathlib.Path) -> None:
    async with await env.connect() as conn:
        with pytest.raises((asyncssh.SFTPError, asyncssh.ChannelOpenError,
                            asyncssh.ProcessError)):
            async with conn.start_sftp_client() as sftp:
                await sftp.listdir("/")
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", env.port)
        # Unix sockets (the docker daemon's, above all) are out of reach too.
        sock = tmp_path / "s.sock"
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection(str(sock))
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path(str(tmp_path / "r.sock"), str(sock))
        # A pty is refused, so no terminal session either.
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("hello", term_type="xterm", request_pty="force")
        # The connection survives all of that and still answers its verbs.
        assert (await conn.run("hello", encoding=None)).exit_status == 0
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.2", env.port, username="gpujobq", password="x",
                               client_keys=None, known_hosts=([env.host_public_key()], [], []),
                               agent_path=None, config=[], preferred_auth="password,"
                               "keyboard-interactive")


async def test_hello(env: Env) -> None:
    async with await env.connect() as conn:
        result = await conn.run("hello", encoding=None, check=True)
        hello = wire.decode_hello(result.stdout)
        assert (hello.host, hello.runtime, hello.jobs) == ("t", "process", ())


async def test_controller_refuses_an_agent_with_another_host_key(env: Env) -> None:
    class Handler:
        def on_connected(self, link: object, hello: object) -> None:
            raise AssertionError("must not connect")

        def on_messages(self, link: object, msgs: object) -> None: ...
        def on_disconnected(self, link: object) -> None: ...

    impostor_key = asyncssh.generate_private_key("ssh-ed25519")
    link = agents.Link(name="t", address="127.0.0.2", port=env.port, user="gpujobq",
                       host_key=impostor_key.convert_to_public(), client_key=env.client_key,
                       handler=Handler(), backoff_max=0.2)
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            while link.last_error is None:  # noqa: ASYNC110 - polling another task's field
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert not link.connected
    assert "host key" in link.last_error.lower()


async def test_repeated_runjob_is_a_no_op(env: Env, tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "runs.txt"
    code = (
        f"import time\nopen({str(marker)!r}, 'a').write('run\\n')\n"
        "time.sleep(0.5)\nprint('done')"
    )
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        ch.send(run_job(code))
        await ch.next(messages.Started)
        ch.send(run_job(code))  # while running
        exited = await ch.next(messages.Exited)
        assert (exited.reason, exited.exit_code, exited.stdout) == ("exit_code", 0, b"done\n")
        ch.send(run_job(code))  # after it ended, before the ack: the result again, no new run
        again = await ch.next(messages.Exited)
        assert again == exited
    assert marker.read_text() == "run\n"


async def test_results_wait_for_the_ack_and_survive_a_new_channel(env: Env) -> None:
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        ch.send(run_job("print('kept')"))
        first = await ch.next(messages.Exited)
        ch.proc.close()
    assert env.spool.folder("job1", 1).exists()
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        resent = await ch.next(messages.Exited)  # replayed when the channel opens
        assert resent == first
        beat = await ch.next(messages.Heartbeat)
        assert beat.jobs == (messages.HeldJob(job_id="job1", attempt=1, finished=True),)
        ch.send(messages.Ack(job_id="job1", attempt=1))
        while (await ch.next(messages.Heartbeat)).jobs:
            pass
    assert not env.spool.folder("job1", 1).exists()


async def test_cancel_and_a_newer_attempt_stop_the_old_one(env: Env) -> None:
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        ch.send(run_job("import time; time.sleep(60)", attempt=1))
        await ch.next(messages.Started)
        ch.send(run_job("print('second')", attempt=2))
        results = {}
        while len(results) < 2:
            msg = await ch.next(messages.Exited)
            results[msg.attempt] = msg
        assert results[1].reason == "cancelled_by_user"
        assert (results[2].reason, results[2].stdout) == ("exit_code", b"second\n")

        ch.send(run_job("import time; time.sleep(60)", job_id="job2"))
        await ch.next(messages.Started)
        ch.send(messages.Cancel(job_id="job2", attempt=1))
        cancelled = await ch.next(messages.Exited)
        assert (cancelled.job_id, cancelled.reason) == ("job2", "cancelled_by_user")


async def test_garbage_on_the_channel_does_not_kill_the_agent(env: Env) -> None:
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        ch.proc.stdin.write(b"\x00\x00\x00\x03abc")  # a frame that is not a message
        ch.send(run_job("print('still here')"))
        exited = await ch.next(messages.Exited)
        assert exited.stdout == b"still here\n"


async def test_restart_keeps_results_and_drops_unfinished(env: Env, tmp_path: pathlib.Path
                                                          ) -> None:
    async with await env.connect() as conn:
        ch = Channel(await conn.create_process("jobs", encoding=None))
        ch.send(run_job("print('finished')", job_id="done"))
        await ch.next(messages.Exited)
        ch.send(run_job("import time; time.sleep(60)", job_id="busy"))
        await ch.next(messages.Started)
    await env.agent.shutdown()
    reborn = core.Agent(host="t", runtime=process.ProcessRuntime(sys.executable),
                        spool=spool.Spool(tmp_path / "spool"))
    held = {(h.job_id, h.finished) for h in reborn.hello().jobs}
    assert held == {("done", True)}
    assert not env.spool.folder("busy", 1).exists()
