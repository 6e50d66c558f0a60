"""The GPUs this host really has, as NVML sees them (none where NVML is absent)."""

from __future__ import annotations

import logging

from gpujobq.protocol import messages

log = logging.getLogger(__name__)


def detect() -> tuple[messages.GPU, ...]:
    try:
        import pynvml  # provided by nvidia-ml-py on GPU hosts
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable: %s", exc)
        return ()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            found.append(messages.GPU(index=index, uuid=str(uuid)))
        return tuple(found)
    finally:
        pynvml.nvmlShutdown()
