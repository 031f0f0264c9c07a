"""Peer memory: allocate a rank's region, export a handle, open the peers' handles.

Three implementations of one small interface, chosen by where the ranks live:

* :class:`CudaIpcMemory`: one process per rank on CUDA devices (one GPU each, or several ranks sharing a
  GPU under MPS).  Regions come from ``cudaMalloc`` directly (not torch's caching allocator, whose tensors
  sit at offsets inside larger allocations), handles are ``cudaIpcMemHandle_t`` bytes, and peers open them
  with ``cudaIpcOpenMemHandle`` (lazy peer access).  Uses CuPy's runtime bindings.
* :class:`SharedFileMemory`: one process per rank on the CPU, for the Triton interpreter
  (``TRITON_INTERPRET=1``).  Regions are files in the shared directory (:func:`sagellm_comm.shm.shared_dir`,
  ``/dev/shm``) mapped shared; the handle is the path.
* Virtual ranks in one process need no handles at all: :mod:`sagellm_comm.virtual` builds the pointer
  tables directly.

A process cannot open its own CUDA IPC handle, so callers use the local pointer for their own rank.

Also here: :func:`tensor_at` (a torch view of raw peer memory mapped in this process) and
:func:`cuda_allocation` (the allocation that holds a device address: a tensor from torch's caching allocator sits
at an offset inside a larger ``cudaMalloc``, and IPC handles name whole allocations).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import capture, shm
from .cupy_probe import require_cupy
from .errors import P2PFailedError

HOST_REGISTER_PORTABLE_MAPPED = 0x3  # cudaHostRegisterPortable | cudaHostRegisterMapped
CAN_USE_HOST_POINTER = 91  # cudaDevAttrCanUseHostPointerForRegisteredMem
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the addresses (unified addressing)


class PeerMemory(ABC):
    """Allocate this rank's region and map peers' regions into this process."""

    @abstractmethod
    def allocate(self, nbytes: int) -> int:
        """Allocate ``nbytes`` of zeroed memory for this rank; return its address in this process."""

    @abstractmethod
    def fill(self, ptr: int, nbytes: int, value: int) -> None:
        """Set ``nbytes`` bytes at ``ptr`` (inside a region from :meth:`allocate`) to ``value``."""

    @abstractmethod
    def export(self, ptr: int) -> Any:
        """A picklable handle a peer process can open (only for regions from :meth:`allocate`)."""

    @abstractmethod
    def open(self, handle: Any, nbytes: int) -> int:
        """Map a peer's region; return its address in this process."""

    @abstractmethod
    def close(self, ptr: int) -> None:
        """Unmap a region opened with :meth:`open`."""

    @abstractmethod
    def free(self, ptr: int) -> None:
        """Release a region from :meth:`allocate`."""

    @abstractmethod
    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy ``nbytes`` from address ``src`` to ``dst`` (either may be a peer's mapped region) in order on raw
        stream ``stream``: the copy engine on a GPU (``cudaMemcpyAsync``); a plain memory copy, done on return,
        for shared files."""

    def capturing(self) -> bool:
        """Whether :meth:`free` or :meth:`close` now would break a CUDA-graph capture in progress (never, for memory
        that is not CUDA's)."""
        return False


def cupy_runtime():
    """CuPy's CUDA runtime module (``cupy.cuda.runtime``); ``BackendNotSupportedError`` without CuPy."""
    require_cupy("the custom all-reduce")
    from cupy.cuda import runtime

    return runtime


class CudaIpcMemory(PeerMemory):
    """CUDA IPC regions on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._rt = cupy_runtime()
        capture.track()  # from now on a capture on any thread defers this memory's frees (capturing())

    def _on_device(self):
        import cupy

        return cupy.cuda.Device(self.device.index if self.device.index is not None else 0)

    def allocate(self, nbytes: int) -> int:
        with self._on_device():
            ptr = None
            try:
                ptr = self._rt.malloc(nbytes)
                self._rt.memset(ptr, 0, nbytes)
                self._rt.deviceSynchronize()
            except Exception as exc:
                if ptr is not None:  # allocated, but not zeroed: not kept
                    with contextlib.suppress(Exception):
                        self._rt.free(ptr)
                raise P2PFailedError(f"cudaMalloc of {nbytes} bytes on {self.device} failed: {exc}") from exc
        return int(ptr)

    def fill(self, ptr: int, nbytes: int, value: int) -> None:
        with self._on_device():
            self._rt.memset(ptr, value, nbytes)
            self._rt.deviceSynchronize()

    def export(self, ptr: int) -> bytes:
        with self._on_device():
            return bytes(self._rt.ipcGetMemHandle(ptr))

    def export_range(self, ptr: int) -> tuple[bytes, int, int]:
        """``(handle, offset, size)`` for any device address ``ptr``: the IPC handle of the allocation that holds
        it (e.g. a caching-allocator segment), ``ptr``'s offset in it and the allocation's size; a peer adds the
        offset to the address :meth:`open` gives it."""
        with self._on_device():
            base, size = cuda_allocation(ptr)
            try:
                return bytes(self._rt.ipcGetMemHandle(base)), ptr - base, size
            except Exception as exc:
                raise P2PFailedError(
                    f"cudaIpcGetMemHandle failed for the allocation at {base:#x} on {self.device}: {exc}. Memory "
                    "from cuMemCreate (PyTorch's expandable_segments:True) has no legacy IPC handle; allocate the "
                    "pool without expandable segments"
                ) from exc

    def open(self, handle: bytes, nbytes: int) -> int:
        with self._on_device():
            try:
                return int(self._rt.ipcOpenMemHandle(handle, self._rt.cudaIpcMemLazyEnablePeerAccess))
            except Exception as exc:
                raise P2PFailedError(
                    f"cudaIpcOpenMemHandle failed on {self.device}: {exc}. Peers must be on this node and "
                    "have peer access (or share this GPU under MPS)."
                ) from exc

    def mapped_bytes(self, ptr: int) -> int:
        """The bytes of the allocation :meth:`open` mapped at ``ptr`` (``cuMemGetAddressRange`` of the mapping: what
        the peer allocated, whatever its metadata says)."""
        with self._on_device():
            base, size = cuda_allocation(ptr)
        if base != ptr:
            raise P2PFailedError(f"the mapping at {ptr:#x} on {self.device} lies inside another at {base:#x}")
        return size

    def close(self, ptr: int) -> None:
        with self._on_device():
            self._rt.ipcCloseMemHandle(ptr)

    def free(self, ptr: int) -> None:
        with self._on_device():
            self._rt.free(ptr)

    def capturing(self) -> bool:
        """Whether a CUDA graph is being captured anywhere in this process (:func:`sagellm_comm.capture.underway`:
        a ``torch.cuda.CUDAGraph`` on any thread, or this thread's current stream on this memory's device or the
        current device): ``cudaFree`` and ``cudaIpcCloseMemHandle`` are not allowed then (they invalidate it)."""
        return capture.underway(self.device)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._rt.memcpyAsync(dst, src, nbytes, MEMCPY_DEFAULT, stream)

    def host_register(self, ptr: int, nbytes: int) -> None:
        """Pin and map host memory (a shared file's pages) so kernels on this device write it at address ``ptr``
        (``cudaHostRegister``, portable + mapped; needs :meth:`host_pointer_usable`)."""
        with self._on_device():
            try:
                self._rt.hostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE_MAPPED)
            except Exception as exc:
                raise P2PFailedError(f"cudaHostRegister of {nbytes} bytes at {ptr:#x} failed: {exc}") from exc

    def host_unregister(self, ptr: int) -> None:
        with self._on_device():
            self._rt.hostUnregister(ptr)

    def host_pointer_usable(self) -> bool:
        """Registered host memory has the same address on this device (UVA; true on x86-64 and Grace hosts)."""
        return bool(self._rt.deviceGetAttribute(CAN_USE_HOST_POINTER, self.device.index or 0))


class SharedFileMemory(PeerMemory):
    """Regions as shared files in :func:`sagellm_comm.shm.shared_dir` (``/dev/shm``; the temporary directory
    where that is missing or not writable), for CPU processes under the interpreter.

    Each file this process creates (``sagellm-comm-<pid>-<random>``) carries an owner lock (an exclusive
    ``flock``, dropped by the kernel however the process exits) until it is freed or unlinked, so the one
    stale-file sweep of shared memory (:func:`sagellm_comm.shm.sweep_stale`, run here when a
    ``SharedFileMemory`` is made and when a transfer inbox is made) removes the files of a process killed before
    it could (mid-rendezvous, say)."""

    def __init__(self):
        self.directory = shm.shared_dir()  # where the sweep looks: the files of a killed process are found
        self._maps: dict[int, tuple[torch.Tensor, str | None, Any]] = {}  # ptr -> (mapping, own file, its lock)
        shm.sweep_stale()

    def _map(self, path: str, nbytes: int, lock=None) -> int:
        mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        ptr = mapped.data_ptr()
        self._maps[ptr] = (mapped, path if lock is not None else None, lock)
        return ptr

    def allocate(self, nbytes: int) -> int:
        path = os.path.join(self.directory, f"{shm.WORKSPACE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        lock = None
        try:
            open(path, "wb").close()
            lock = shm.OwnerLock(path)  # owned before its pages are reserved (no sweep takes it)
            shm.reserve(lock.fd, nbytes, path)  # zeros, their memory reserved
            return self._map(path, nbytes, lock)
        except BaseException:  # not mapped: neither the file nor its lock stays
            shm.remove_owned(path, lock)
            raise

    def fill(self, ptr: int, nbytes: int, value: int) -> None:
        for base, (mapped, _, _) in self._maps.items():
            if base <= ptr and ptr + nbytes <= base + mapped.numel():
                mapped[ptr - base : ptr - base + nbytes].fill_(value)
                return
        raise ValueError(f"address {ptr:#x} (+{nbytes}) is not inside a region of this process")

    def export(self, ptr: int) -> str:
        return self._maps[ptr][1]

    def open(self, handle: str, nbytes: int) -> int:
        if not os.path.exists(handle):
            raise P2PFailedError(f"peer region {handle} does not exist (peer exited or freed it)")
        return self._map(handle, nbytes)

    def close(self, ptr: int) -> None:
        self._maps.pop(ptr, None)

    def free(self, ptr: int) -> None:
        _, path, lock = self._maps.pop(ptr, (None, None, None))
        if path is not None:
            shm.remove_owned(path, lock)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def unlink(self, ptr: int) -> None:
        """Remove the file behind this process's region once every peer has mapped it (mappings stay valid)."""
        mapped, path, lock = self._maps[ptr]
        if path is not None:
            shm.remove_owned(path, lock)
        self._maps[ptr] = (mapped, None, None)

    def tensor(self, ptr: int) -> torch.Tensor:
        """The uint8 tensor that keeps the mapping at ``ptr`` alive."""
        return self._maps[ptr][0]


@lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise P2PFailedError(f"the CUDA driver library (libcuda.so.1) cannot be loaded: {exc}") from None
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]  # fmt: skip
    lib.cuMemGetAddressRange_v2.restype = ctypes.c_int
    return lib


def cuda_allocation(ptr: int) -> tuple[int, int]:
    """``(base, nbytes)`` of the CUDA allocation holding device address ``ptr`` (``cuMemGetAddressRange``; the
    device's context must be current, as it is inside :class:`CudaIpcMemory` or after torch touched it)."""
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    status = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise P2PFailedError(f"cuMemGetAddressRange failed for address {ptr:#x} (CUresult {status})")
    return int(base.value), int(size.value)


class _RawStorageOwner:
    """Keeps ``owner`` alive while a tensor built on memory it manages exists."""

    def __init__(self, owner: Any):
        self.owner = owner


def tensor_at(ptr: int, numel: int, dtype: torch.dtype, device: torch.device, owner: Any) -> torch.Tensor:
    """A tensor view of ``numel`` elements at raw address ``ptr`` on ``device`` (memory this process mapped:
    a peer's region, a shared file); ``owner`` is kept alive as long as the tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        import cupy

        mem = cupy.cuda.UnownedMemory(ptr, numel * itemsize, _RawStorageOwner(owner), device.index or 0)
        arr = cupy.ndarray((numel * itemsize,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        flat = torch.as_tensor(arr, device=device)
    else:
        raw = (np.ctypeslib.ctypes.c_uint8 * (numel * itemsize)).from_address(ptr)
        raw.owner = owner  # the array, and so the tensor, holds ``raw``
        flat = torch.from_numpy(np.ctypeslib.as_array(raw))
    return flat.view(dtype)
