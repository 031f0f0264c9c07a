"""Memory the ``ipc`` transport maps and stages: peers' regions opened once per process, and host staging.

* :class:`PeerMaps`: a peer's region is opened through :mod:`sagellm_comm.ipc` (``CudaIpcMemory`` on GPUs,
  ``SharedFileMemory`` under the interpreter) once per process and reference-counted, since CUDA refuses to
  open one handle twice in a process and several regions (or agents) may share one allocation.
* :class:`Staging`: host buffers (pinned on GPUs, so the kernel reads them over PCIe) holding one launch's
  descriptor table and notification record; a buffer is reused once the launch that read it completed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sagellm_comm.ipc import CudaIpcMemory, PeerMemory, SharedFileMemory

_OPEN_LOCK = threading.Lock()
_OPENED: dict[tuple, list] = {}  # (kind, device, key) -> [base address, references, memory]


def open_shared(memory: PeerMemory, key: str | bytes, device_index: int) -> int:
    """Map ``key`` (a CUDA IPC handle or a shared file path) once per process; returns its base address."""
    cache_key = (type(memory).__name__, device_index, key)
    with _OPEN_LOCK:
        entry = _OPENED.get(cache_key)
        if entry is None:
            if isinstance(memory, SharedFileMemory):
                base = memory.open(key, os.stat(key).st_size)
            else:
                base = memory.open(key, 0)
            entry = _OPENED[cache_key] = [base, 0, memory]
        entry[1] += 1
        return entry[0]


def close_shared(memory: PeerMemory, key: str | bytes, device_index: int) -> None:
    cache_key = (type(memory).__name__, device_index, key)
    with _OPEN_LOCK:
        entry = _OPENED.get(cache_key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _OPENED[cache_key]
            entry[2].close(entry[0])


@dataclass
class PeerMaps:
    """The peer memory one link opened (closed together by :meth:`close`)."""

    memory: PeerMemory
    device_index: int
    keys: list

    def open(self, key: str | bytes) -> int:
        base = open_shared(self.memory, key, self.device_index)
        self.keys.append(key)
        return base

    def close(self) -> None:
        while self.keys:
            close_shared(self.memory, self.keys.pop(), self.device_index)


class Staging:
    """Host buffers for launches; ``acquire(nbytes)`` gives a free one, ``busy(index, event)`` ties it to a launch."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: list[torch.Tensor] = []
        self.events: list = []

    def acquire(self, nbytes: int) -> tuple[int, np.ndarray, int]:
        """``(index, uint8 numpy view of at least nbytes, address)`` of a buffer no launch is reading."""
        nbytes = max(4096, (nbytes + 4095) // 4096 * 4096)
        for index, event in enumerate(self.events):
            if event is None or event.query():
                self.events[index] = None
                if self.buffers[index].numel() < nbytes:
                    self.buffers[index] = self._new(nbytes)
                buffer = self.buffers[index]
                return index, buffer.numpy(), buffer.data_ptr()
        if len(self.buffers) >= 4096:  # thousands of launches queued and none done: wait for the oldest
            self.events[0].synchronize()
            return self.acquire(nbytes)
        self.buffers.append(self._new(nbytes))
        self.events.append(None)
        buffer = self.buffers[-1]
        return len(self.buffers) - 1, buffer.numpy(), buffer.data_ptr()

    def busy(self, index: int, event) -> None:
        self.events[index] = event

    def _new(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def close(self) -> None:
        for event in self.events:
            if event is not None:
                event.synchronize()
        self.buffers.clear()
        self.events.clear()


def device_memory(device: torch.device) -> PeerMemory:
    return CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
