"""The NVIDIA Container Toolkit on this host: its version, checked against known CVEs.

Its hooks run as root at every GPU container's start, so an old toolkit is a container
escape (docs/security.md lists the CVEs behind MINIMUM).
"""

from __future__ import annotations

import re
import subprocess

MINIMUM = (1, 19, 1)  # CVE-2026-24260; earlier: CVE-2025-23266/23267, CVE-2025-23359, ...
COMMANDS = (["nvidia-ctk", "--version"], ["nvidia-container-cli", "--version"])
_VERSION = re.compile(r"(?:version|cli-version):?\s*v?(\d+)\.(\d+)\.(\d+)", re.IGNORECASE)


def parse(text: str) -> tuple[int, int, int] | None:
    """The version in ``nvidia-ctk --version`` or ``nvidia-container-cli --version``."""
    found = _VERSION.search(text)
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def installed() -> tuple[int, int, int] | None:
    """The toolkit's version, or None when neither command answers with one."""
    for command in COMMANDS:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        version = parse(done.stdout + done.stderr)
        if version is not None:
            return version
    return None


def warning(version: tuple[int, int, int] | None) -> str | None:
    """What to tell admins about a host that runs GPU containers with this toolkit."""
    wanted = ".".join(map(str, MINIMUM))
    if version is None:
        return (f"NVIDIA Container Toolkit version unknown (no nvidia-ctk or "
                f"nvidia-container-cli answered): {wanted} or later is required")
    if version < MINIMUM:
        return (f"NVIDIA Container Toolkit {'.'.join(map(str, version))} has known container "
                f"escapes: upgrade to {wanted} or later (docs/security.md)")
    return None
