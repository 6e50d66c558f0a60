"""The GPUs this host really has, and what runs on them, as NVML sees them.

NVML comes from nvidia-ml-py (``import pynvml``) and the driver's libnvidia-ml. Where
either is missing the probe says so (``available`` is False): the agent then reports
no GPUs and the controller uses the ones declared in the inventory.
"""

from __future__ import annotations

import logging
from typing import Any

from gpujobq.protocol import messages

log = logging.getLogger(__name__)


class Probe:
    """NVML, initialised once for the agent's lifetime."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml
        except ImportError:
            log.info("nvidia-ml-py is not installed: no GPU discovery")
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.info("NVML unavailable: %s", exc)
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def discover(self) -> tuple[messages.GPU, ...]:
        """Every GPU NVML lists: index, UUID, name, memory."""
        if self._nvml is None:
            return ()
        nv = self._nvml
        found = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            found.append(messages.GPU(
                index=index, uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                name=_text(nv.nvmlDeviceGetName(handle)),
                memory=int(nv.nvmlDeviceGetMemoryInfo(handle).total)))
        return tuple(found)

    def processes(self, index: int) -> tuple[int, ...]:
        """PIDs of the compute processes on a GPU, as NVML lists them.

        Graphics processes (a display server on a workstation's GPU) are not jobs'
        leftovers and would hold the GPU back for good: they do not count.
        """
        if self._nvml is None:
            return ()
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        return tuple(sorted({p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)}))

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
