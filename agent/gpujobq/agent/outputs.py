"""A job's output folder, read back from the host side without trusting what is in it.

The job controls every name in the folder: links are never followed (a link to a host
file must not leak it), only regular files are read, and their total size and count are
capped. What is read back travels in the Exited message and is kept with the job as its
artifacts (GET /api/artifacts/{job_id}).
"""

from __future__ import annotations

import os
import pathlib
import stat

from gpujobq.protocol import messages

# Files read back travel in one Exited message (frames are at most 256 MiB) and are
# stored with the job: at most this many bytes and files; the rest is listed as skipped.
FILES_CAP = 32 << 20
MAX_FILES = 1000
MAX_ENTRIES = 100_000  # names looked at, at most


def size(folder: pathlib.Path) -> int:
    """Bytes in regular files below ``folder``, links not followed."""
    total = 0
    stack = [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def collect(
    folder: pathlib.Path, cap: int = FILES_CAP, max_files: int = MAX_FILES
) -> tuple[tuple[messages.OutputFile, ...], str]:
    """The regular files below ``folder`` (at most ``cap`` bytes and ``max_files`` files
    together), and a detail naming what was left behind ("" when nothing was). At most
    MAX_ENTRIES names are looked at: a job may leave millions of empty files."""
    files: list[messages.OutputFile] = []
    skipped = Skipped()
    left, seen = cap, 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if _is_link(dirpath, d)]:
            seen += 1
            if seen > MAX_ENTRIES:
                skipped.stopped = True
                return tuple(files), skipped.detail()
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if not _utf8(rel):  # a name the result cannot carry: named, escaped
                skipped.add(os.fsencode(rel).decode("utf-8", "backslashreplace"))
                continue
            data = _read_regular(path, left) if len(files) < max_files else None
            if data is None:
                skipped.add(rel)
                continue
            left -= len(data)
            files.append(messages.OutputFile(name=rel, data=data))
    return tuple(files), skipped.detail()


class Skipped:
    """What was left behind: the first names, and how many in all."""

    SHOWN = 20

    def __init__(self) -> None:
        self.names: list[str] = []
        self.count = 0
        self.stopped = False  # the walk gave up at MAX_ENTRIES

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.names) < self.SHOWN:
            self.names.append(name)

    def detail(self) -> str:
        parts = []
        if self.count:
            more = self.count - len(self.names)
            parts.append(f"skipped in output: {', '.join(self.names)}"
                         + (f" and {more} more" if more else ""))
        if self.stopped:
            parts.append(f"output read no further than {MAX_ENTRIES} names")
        return "; ".join(parts)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk's surrogate escapes of undecodable bytes
        return False
    return True


def _is_link(dirpath: str, name: str) -> bool:
    return os.path.islink(os.path.join(dirpath, name))


def _read_regular(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # a link (ELOOP), a vanished file, no permission
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None  # a fifo, a device, or more than the cap allows
        return fh.read(limit)

