"""A job's output folder, read back from the host side without trusting what is in it.

The job controls every name in the folder: links are never followed (a link to a host
file must not leak it), only regular files are read, and the total is capped.
"""

from __future__ import annotations

import os
import pathlib
import stat

from gpujobq.protocol import messages


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


def collect(folder: pathlib.Path, cap: int) -> tuple[tuple[messages.OutputFile, ...], list[str]]:
    """The regular files below ``folder`` (at most ``cap`` bytes together), and what was skipped."""
    files: list[messages.OutputFile] = []
    skipped: list[str] = []
    left = cap
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if _is_link(dirpath, d)]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            data = _read_regular(path, left)
            if data is None:
                skipped.append(rel)
                continue
            left -= len(data)
            files.append(messages.OutputFile(name=rel, data=data))
    return tuple(files), skipped


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
