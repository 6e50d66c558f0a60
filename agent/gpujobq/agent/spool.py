"""One folder per job attempt; the result stays there until the controller acks it.

    SPOOL/<job_id>-a<attempt>/job/solution.py, job/config.yaml   what the job runs
    SPOOL/<job_id>-a<attempt>/output/                            what the job may write
    SPOOL/<job_id>-a<attempt>/result.msgpack                     the Exited, once written
    SPOOL/<job_id>-a<attempt>/process.json                       process runtime: its group
    SPOOL/<job_id>-a<attempt>/run.msgpack                        the RunJob (no code): for
                                                                 re-adopting its container

An agent that restarts re-reads its spool: results not yet acked are sent again.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil

import msgspec
from gpujobq.protocol import messages

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<job>[A-Za-z0-9_-]{1,64})-a(?P<attempt>[0-9]{1,9})$")
RESULT = "result.msgpack"
PROCESS = "process.json"  # written and read by the process runtime (process.py)
RUN = "run.msgpack"


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
    finally:
        os.close(fd)


class SpoolError(ValueError):
    pass


class Spool:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root.absolute()  # bind mounts need absolute paths
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def folder(self, job_id: str, attempt: int) -> pathlib.Path:
        name = f"{job_id}-a{attempt}"
        if not _NAME.match(name):
            raise SpoolError(f"job id {job_id!r} cannot name a spool folder")
        return self.root / name

    def prepare(self, run: messages.RunJob, *, files: bool = True) -> pathlib.Path:
        """A fresh work folder holding the job's code and config; returns it.

        ``files=False`` (a runtime that runs nothing: instant) makes only the attempt's
        folder, where its result is kept until acked; the work folder is not created."""
        base = self.folder(run.job_id, run.attempt)
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:  # left by an earlier try of the same attempt
            shutil.rmtree(base)
            os.mkdir(base, 0o700)
        except FileNotFoundError:  # the spool itself was removed meanwhile
            base.mkdir(parents=True, mode=0o700)
        work = base / "job"
        if not files:
            return work
        bare = msgspec.structs.replace(run, code=b"", config=b"")
        _write(base / RUN, msgspec.msgpack.encode(bare), 0o600)
        # A container's unprivileged user reads the job folder (mounted read-only) and
        # writes the output folder; bind mounts skip the private spool folders above.
        # Modes are set explicitly: the umask would take bits off a mkdir's or open's.
        os.mkdir(work)
        os.chmod(work, 0o755)
        for name, data in (("solution.py", run.code), ("config.yaml", run.config)):
            _write(work / name, data, 0o644)
        output = base / "output"
        os.mkdir(output)
        os.chmod(output, 0o777)
        return work

    def store_result(self, exited: messages.Exited, *, sync: bool = True) -> None:
        """Keep a result until acked: whole or not at all (written aside, then renamed),
        and with ``sync`` on disk before this returns (it survives a power cut, not only
        the agent's own end)."""
        base = self.folder(exited.job_id, exited.attempt)
        tmp = base / (RESULT + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.msgpack.encode(exited))
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, base / RESULT)

    def drop(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.folder(job_id, attempt), ignore_errors=True)

    def unfinished(self) -> list[tuple[str, int, pathlib.Path]]:
        """(job_id, attempt, folder) of every attempt with no result stored."""
        return [(job_id, attempt, folder) for job_id, attempt, folder in self._attempts()
                if not (folder / RESULT).exists()]

    def _attempts(self) -> list[tuple[str, int, pathlib.Path]]:
        found = []
        for entry in sorted(self.root.iterdir()):
            name = _NAME.match(entry.name)
            if name and entry.is_dir():
                found.append((name["job"], int(name["attempt"]), entry))
        return found

    def adoptable(self, job_id: str, attempt: int) -> tuple[messages.RunJob, pathlib.Path] | None:
        """The RunJob and work folder of an unfinished attempt whose container still runs."""
        try:
            base = self.folder(job_id, attempt)
        except SpoolError:
            return None
        try:
            run = msgspec.msgpack.decode((base / RUN).read_bytes(), type=messages.RunJob)
        except (OSError, msgspec.DecodeError):
            return None
        if (base / RESULT).exists() or not (base / "job").is_dir():
            return None
        return run, base / "job"

    def recover(self, keep: frozenset[tuple[str, int]] = frozenset()
                ) -> list[messages.Exited]:
        """Results kept from before a restart; folders of jobs that never finished are removed.

        A job that was running when the agent stopped is not reported: the controller
        sees it missing from the agent's held jobs and requeues it as a platform failure.
        Run ``process.kill_leftovers`` first: the folders dropped here hold the records of
        job processes an earlier agent may have left running.
        """
        kept: list[messages.Exited] = []
        for job_id, attempt, entry in self._attempts():
            if (job_id, attempt) in keep and not (entry / RESULT).exists():
                continue  # its container runs on: the agent adopts it
            try:
                data = (entry / RESULT).read_bytes()
                kept.append(msgspec.msgpack.decode(data, type=messages.Exited))
            except (OSError, msgspec.DecodeError):
                log.info("dropping unfinished spool folder %s", entry.name)
                shutil.rmtree(entry, ignore_errors=True)
        return kept
