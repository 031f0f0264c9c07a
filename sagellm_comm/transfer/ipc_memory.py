"""Memory the ``ipc`` transport maps and stages: peers' regions opened once per process, and host staging.

* :class:`PeerMaps`: a peer's region is opened through :mod:`sagellm_comm.ipc` (``CudaIpcMemory`` on GPUs,
  ``SharedFileMemory`` under the interpreter) once per process and reference-counted, since CUDA refuses to
  open one handle twice in a process and several regions (or agents) may share one allocation.
* :class:`CudaEvents`: raw CUDA events (no timing) of one transfer stream, through CuPy's runtime: the fork
  from the caller's stream and one completion event per launch, reused once it completed.
* :class:`Allocation`: memory of this process (a GPU agent's probe) freed with its last reference, so a copy
  that may still read it can keep it; :func:`keep_for_life` keeps memory a launch that may never complete can touch.
* :class:`Staging`: host buffers (pinned on GPUs, so the kernel reads them over PCIe) holding one launch's
  descriptor table; a buffer is given back (:meth:`Staging.release`) once the launch that read it completed.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError, TransferError
from sagellm_comm.ipc import CudaIpcMemory, PeerMemory, SharedFileMemory, cupy_runtime
from sagellm_comm.transfer.shared import open_transfer_file

_OPEN_LOCK = threading.Lock()
# (kind, device, key) -> [base address, references, memory, bytes mapped (the file's, or the CUDA allocation's)]
_OPENED: dict[tuple, list] = {}
# Memory a launch may still read or write when its agent closed (staging buffers, memory a removed link held): kept,
# never freed.
_LEAKED: list = []


def open_shared(memory: PeerMemory, key: str | bytes, device_index: int, end: int = 0) -> int:
    """Map ``key`` (a CUDA IPC handle, or the path of a peer's transfer file) once per process; returns its base
    address.  A path is mapped only when it is a transfer file (:func:`~sagellm_comm.transfer.shared.
    open_transfer_file`, ``InvalidArgumentError`` otherwise), through the descriptor that check opened (a file
    put in its place afterwards is never mapped).  What is mapped (the file, or the CUDA allocation the handle
    maps, measured once opened) must hold at least ``end`` bytes: ``InvalidArgumentError`` otherwise (the peer's
    metadata claims more than its memory has), the mapping closed unless another caller holds it."""
    cache_key = (type(memory).__name__, device_index, key)
    with _OPEN_LOCK:
        entry = _OPENED.get(cache_key)
        if entry is None:
            if isinstance(memory, SharedFileMemory):
                base, size = _map_transfer_file(memory, key)
            else:
                base = memory.open(key, 0)
                try:
                    size = memory.mapped_bytes(base)
                except BaseException:
                    memory.close(base)
                    raise
            if end > size:
                memory.close(base)
                raise _too_short(memory, end, size)
            entry = _OPENED[cache_key] = [base, 0, memory, size]
        elif end > entry[3]:
            raise _too_short(memory, end, entry[3])
        entry[1] += 1
        return entry[0]


def _too_short(memory: PeerMemory, end: int, size: int) -> InvalidArgumentError:
    what = "file" if isinstance(memory, SharedFileMemory) else "CUDA allocation its handle maps"
    return InvalidArgumentError(f"the metadata puts {end} bytes (offset and size) in the {what}, of {size} bytes")


def _map_transfer_file(memory: SharedFileMemory, path: str) -> tuple[int, int]:
    """``(base address, bytes)`` of a mapping of the transfer file at ``path``, whole."""
    try:
        owned = open_transfer_file(path, os.O_RDONLY, "peer file")
    except OSError as exc:
        raise BackendNotSupportedError(f"peer file {path} cannot be opened: {exc}") from None
    try:
        size = os.fstat(owned.fd).st_size
        if size == 0:
            raise BackendNotSupportedError(f"peer file {path} is empty")
        return memory.open(f"/proc/self/fd/{owned.fd}", size), size  # the file this descriptor holds
    finally:
        owned.close()


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

    def open(self, key: str | bytes, end: int = 0) -> int:
        """Map ``key`` (:func:`open_shared`; ``end``: the bytes a file must hold) for this link."""
        base = open_shared(self.memory, key, self.device_index, end)
        self.keys.append(key)
        return base

    def close(self) -> None:
        while self.keys:
            close_shared(self.memory, self.keys.pop(), self.device_index)


EVENT_DISABLE_TIMING = 0x2  # cudaEventDisableTiming
NOT_READY = 600  # cudaErrorNotReady


class CudaEvents:
    """Raw CUDA events ordering one transfer stream (``stream``, a raw handle) after its callers and telling the
    host when a launch completed.  A handle from :meth:`record` is given back with :meth:`reuse` once
    :meth:`done` said so."""

    def __init__(self, stream: int):
        self.rt = cupy_runtime()
        self.stream = stream
        self.free: list[int] = []
        self.made: list[int] = []
        self.fork = self._new()

    def _new(self) -> int:
        event = int(self.rt.eventCreateWithFlags(EVENT_DISABLE_TIMING))
        self.made.append(event)
        return event

    def follow(self, caller: int) -> None:
        """Work enqueued on the transfer stream from now on waits for what raw stream ``caller`` holds now."""
        self.rt.eventRecord(self.fork, caller)
        self.rt.streamWaitEvent(self.stream, self.fork, 0)

    def record(self) -> int:
        """An event recorded on the transfer stream after what it holds now."""
        event = self.free.pop() if self.free else self._new()
        self.rt.eventRecord(event, self.stream)
        return event

    def done(self, event: int) -> bool:
        status = self.rt.eventQuery(event)
        if status == 0:
            return True
        if status == NOT_READY:
            return False
        raise TransferError(f"the transfer stream failed: CUDA error {status} (cudaEventQuery)")

    def wait(self, stream: int, event: int) -> None:
        """Raw stream ``stream`` waits on the device for ``event``."""
        self.rt.streamWaitEvent(stream, event, 0)

    def reuse(self, event: int) -> None:
        self.free.append(event)

    def close(self) -> None:
        for event in self.made:
            self.rt.eventDestroy(event)
        self.made, self.free = [], []


def keep_for_life(memory: object) -> None:
    """Keep ``memory`` (whatever holds memory a launch that may never complete can still touch) referenced for the
    life of the process: leaked rather than freed under a running kernel."""
    _LEAKED.append(memory)


class Allocation:
    """``nbytes`` from ``memory.allocate`` at ``ptr``, freed once nothing references this object: its owner, and
    whatever keeps it for a copy that may still read it (a link of another agent of this process, while its test
    copy from the memory may still run).  Memory still referenced when the process exits is never freed."""

    def __init__(self, memory: PeerMemory, nbytes: int):
        self.ptr = memory.allocate(nbytes)
        self._free = weakref.finalize(self, memory.free, self.ptr)
        self._free.atexit = False


class Staging:
    """Host buffers for launches' descriptor tables: ``acquire(nbytes)`` gives one no launch reads; the caller
    gives it back with ``release(index)`` once the launch that reads it completed."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: list[torch.Tensor] = []
        self.views: list[np.ndarray] = []
        self.free: list[int] = []

    def acquire(self, nbytes: int) -> tuple[int, np.ndarray, int]:
        """``(index, uint8 numpy view of at least nbytes, address)`` of a buffer no launch is reading."""
        if self.free:
            index = self.free.pop()
            if len(self.views[index]) < nbytes:
                self.buffers[index] = self._new(nbytes)
                self.views[index] = self.buffers[index].numpy()
        else:
            index = len(self.buffers)
            self.buffers.append(self._new(nbytes))
            self.views.append(self.buffers[index].numpy())
        return index, self.views[index], self.buffers[index].data_ptr()

    def release(self, index: int) -> None:
        """The launch that read buffer ``index`` completed."""
        self.free.append(index)

    def _new(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(4096, -(-nbytes // 4096) * 4096), dtype=torch.uint8, pin_memory=self.pinned)

    def close(self, in_use: bool) -> None:
        """Drop the buffers; with ``in_use`` (a launch may still read one) they are kept for the life of the
        process instead (leaked rather than freed under a running kernel)."""
        if in_use:
            keep_for_life(self.buffers)
        self.buffers, self.views = [], []
        self.free.clear()


def device_memory(device: torch.device) -> PeerMemory:
    return CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
