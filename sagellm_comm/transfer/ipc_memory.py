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
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from sagellm_comm.ipc import CudaIpcMemory, PeerMemory, SharedFileMemory

_OPEN_LOCK = threading.Lock()
_OPENED: dict[tuple, list] = {}  # (kind, device, key) -> [base address, references, memory]
_LEAKED: list = []  # staging buffers a launch may still read when their agent closed (kept, never freed)


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
    """Host buffers for launches: ``acquire(nbytes)`` gives one no launch reads, ``busy(index, event)`` ties it to
    a launch.  Launches on one stream complete in order, so only the oldest busy buffer is ever queried."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: list[torch.Tensor] = []
        self.free: list[int] = []
        self.busy_queue: deque = deque()  # (index, event), oldest first

    def acquire(self, nbytes: int) -> tuple[int, np.ndarray, int]:
        """``(index, uint8 numpy view of at least nbytes, address)`` of a buffer no launch is reading."""
        while self.busy_queue and self.busy_queue[0][1].query():
            self.free.append(self.busy_queue.popleft()[0])
        if self.free:
            index = self.free.pop()
            if self.buffers[index].numel() < nbytes:
                self.buffers[index] = self._new(nbytes)
        else:
            index = len(self.buffers)
            self.buffers.append(self._new(nbytes))
        buffer = self.buffers[index]
        return index, buffer.numpy(), buffer.data_ptr()

    def release(self, index: int) -> None:
        """The launch that used buffer ``index`` already completed (it ran on the host)."""
        self.free.append(index)

    def busy(self, index: int, event) -> None:
        self.busy_queue.append((index, event))

    def _new(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(4096, -(-nbytes // 4096) * 4096), dtype=torch.uint8, pin_memory=self.pinned)

    def close(self, timeout_s: float) -> None:
        """Drop the buffers once no launch reads them; after ``timeout_s`` the busy ones are left to the garbage
        collector's owner (leaked rather than freed under a running kernel)."""
        deadline = time.monotonic() + timeout_s
        while self.busy_queue and time.monotonic() < deadline:
            if self.busy_queue[0][1].query():
                self.busy_queue.popleft()
            else:
                time.sleep(1e-4)
        if self.busy_queue:
            _LEAKED.append(self.buffers)
        self.busy_queue.clear()
        self.buffers = []
        self.free.clear()


def device_memory(device: torch.device) -> PeerMemory:
    return CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
