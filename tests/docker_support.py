"""Whether the docker tests can run here: a daemon and the local job image.

CI sets GPUJOBQ_REQUIRE_DOCKER=1, which turns a missing daemon or image into a failure
instead of a skip.
"""

from __future__ import annotations

import os

import pytest
from gpujobq.agent import containers
from gpujobq.protocol import inventory

IMAGE = inventory.DEFAULT_IMAGE


def require_docker() -> None:
    required = os.environ.get("GPUJOBQ_REQUIRE_DOCKER") == "1"
    client = containers.available()
    problem = None
    if client is None:
        problem = "no Docker daemon answers"
    else:
        try:
            client.images.get(IMAGE)
        except Exception:
            problem = f"the job image {IMAGE} is missing (scripts/build-job-image.sh builds it)"
    if problem is None:
        return
    if required:
        pytest.fail(f"docker tests are required here (GPUJOBQ_REQUIRE_DOCKER=1): {problem}")
    pytest.skip(f"docker tests skipped: {problem}")
