"""SSH keys for both ends: the agent's host key, the controller's client key, authorized_keys."""

from __future__ import annotations

import os
import pathlib

import asyncssh


def ensure_private_key(path: pathlib.Path, comment: str) -> asyncssh.SSHKey:
    """Load the ed25519 key at ``path``, creating it (and ``path.pub``) when missing."""
    if path.exists():
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key())
    pathlib.Path(f"{path}.pub").write_bytes(key.export_public_key())
    return key


def authorize(authorized_keys: pathlib.Path, public_key: bytes) -> bool:
    """Add a public key to an authorized_keys file unless it is there; True if added."""
    line = public_key.strip()
    authorized_keys.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = authorized_keys.read_bytes().splitlines() if authorized_keys.exists() else []
    if any(_key_part(e) == _key_part(line) for e in existing):
        return False
    with open(authorized_keys, "ab") as fh:
        fh.write(line + b"\n")
    os.chmod(authorized_keys, 0o600)
    return True


def _key_part(line: bytes) -> bytes:
    parts = line.split()
    return b" ".join(parts[:2])
