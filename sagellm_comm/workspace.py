"""Symmetric workspace: one region per rank, mapped by every peer, plus this rank's control words.

Region layout (``kernels/all_reduce.py`` and ``kernels/lamport_all_reduce.py`` in this package are the
authority)::

    [ signal pad (PAD_BYTES) | registered region (slot_bytes) | staging slot 0 | staging slot 1 |
      Lamport buffers: 3 x world_size x capacity fp32, initialised to the sentinel 0xFF bytes ]

The kernels get an int64 *pointer table* on the device, built once here: ``table[0:W]`` every rank's
region base as mapped in this process, ``table[W]`` this rank's error record (int64[8] in pinned host
memory, read by the host without a device sync); and this rank's control words (device
int32[CTRL_WORDS]: epoch, finished programs, error latch, the Lamport kernel's per-program state).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sagellm_comm.kernels import all_reduce as _k
from sagellm_comm.kernels import lamport_all_reduce as _lk

from .errors import CommTimeoutError, InvalidArgumentError, NotInitializedError
from .ipc import CudaIpcMemory, PeerMemory, SharedFileMemory

ALIGN_BYTES = 256
DEFAULT_SLOT_BYTES = 64 * 1024 * 1024


LAMPORT_MAX_ELEMS = 128 * 1024  # latency-bound messages only: 256 KB of bf16, 512 KB of fp32


def lamport_capacity(slot_bytes: int) -> int:
    """Elements per (buffer, source) of the Lamport area (never more than the slot holds in bf16)."""
    return min(slot_bytes // 2, LAMPORT_MAX_ELEMS)


def lamport_offset(slot_bytes: int) -> int:
    """Byte offset of the Lamport area in a region (after the signal pad, registered region, 2 slots)."""
    return _k.PAD_BYTES.value + 3 * slot_bytes


def region_bytes(slot_bytes: int, world_size: int) -> int:
    """Bytes of one rank's region for ``slot_bytes`` of message capacity and ``world_size`` ranks."""
    return lamport_offset(slot_bytes) + _lk.lamport_bytes(world_size, lamport_capacity(slot_bytes))


def _device_identity(device: torch.device) -> str:
    """What makes two ranks' devices the same chip: the GPU's UUID (robust to per-process
    ``CUDA_VISIBLE_DEVICES``), else the device string."""
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            return str(uuid)
    return str(device)


def _round_slot(slot_bytes: int) -> int:
    if slot_bytes <= 0:
        raise InvalidArgumentError(f"workspace size must be positive, got {slot_bytes} bytes")
    return int(math.ceil(slot_bytes / ALIGN_BYTES) * ALIGN_BYTES)


class SymmetricWorkspace:
    """One rank's view of the symmetric workspace.

    Build it with :meth:`rendezvous` (one process per rank) or :func:`local_workspaces` (virtual ranks
    in one process).  ``peer_ptrs[r]`` is rank ``r``'s region as mapped in this process.

    Args:
        rank, world_size: this rank and the number of ranks (2..8).
        slot_bytes: message capacity in bytes (the largest all-reduce the custom kernels take).
        peer_ptrs: base address of every rank's region in this process.
        device: where the data lives (``cuda:i``, or ``cpu`` under the Triton interpreter).
        release: called by :meth:`close` to unmap peers and free the local region.
        ranks_on_device: how many ranks of the group share this rank's device (virtual ranks, MPS): the
            kernels' programs of all of them must be resident at once, so they divide its SMs.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        slot_bytes: int,
        peer_ptrs: Sequence[int],
        device: torch.device,
        release: Callable[[], None] | None = None,
        local_region: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        error_record: torch.Tensor | None = None,
        ranks_on_device: int = 1,
    ):
        if not 2 <= world_size <= _k.MAX_WORLD.value:
            raise InvalidArgumentError(
                f"the custom all-reduce supports 2..{_k.MAX_WORLD.value} ranks, got world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is out of range for world_size={world_size}")
        if len(peer_ptrs) != world_size:
            raise InvalidArgumentError(f"expected {world_size} peer pointers, got {len(peer_ptrs)}")
        self.rank = rank
        self.world_size = world_size
        self.ranks_on_device = max(1, int(ranks_on_device))
        self.slot_bytes = slot_bytes
        self.device = torch.device(device)
        self.peer_ptrs = [int(p) for p in peer_ptrs]
        self._release = release
        self._local_region = local_region
        on_cuda = self.device.type == "cuda"
        if control is None:
            control = torch.zeros(_k.CTRL_WORDS.value, dtype=torch.int32, device=self.device)
        if error_record is None:
            error_record = torch.zeros(_k.ERR_WORDS.value, dtype=torch.int64, pin_memory=on_cuda)
        self.control = control
        self.error_record = error_record
        self._error_view = self.error_record.numpy()  # host view: reading it never syncs the device
        table = self.peer_ptrs + [self.error_record.data_ptr()]
        self.table = torch.tensor(table, dtype=torch.int64, device=self.device)
        # The registered (zero-copy) region of this rank, as a flat byte tensor.
        self._registered_ptr = self.peer_ptrs[rank] + _k.PAD_BYTES.value
        self.lamport_offset = lamport_offset(slot_bytes)
        self.lamport_capacity = lamport_capacity(slot_bytes)
        self.closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def rendezvous(
        cls,
        rank: int,
        world_size: int,
        slot_bytes: int,
        device: torch.device | str,
        exchange: Callable[[Any], list[Any]],
        memory: PeerMemory | None = None,
    ) -> SymmetricWorkspace:
        """Collective: allocate this rank's region, exchange handles with ``exchange``, open the peers.

        ``exchange(obj)`` must return the list of every rank's ``obj`` in rank order (e.g. an
        ``all_gather_object`` over the group's CPU side).  Every rank must call this with the same
        ``world_size`` and ``slot_bytes``.
        """
        device = torch.device(device)
        slot_bytes = _round_slot(slot_bytes)
        if memory is None:
            memory = CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
        nbytes = region_bytes(slot_bytes, world_size)
        local = memory.allocate(nbytes)
        opened: list[int] = []
        try:
            # Before any peer can push: the Lamport area starts as all sentinels.
            memory.fill(local + lamport_offset(slot_bytes), nbytes - lamport_offset(slot_bytes), _lk.SENTINEL_BYTE)
            where = (socket.gethostname(), _device_identity(device))
            handles = exchange((memory.export(local), slot_bytes, where))
            sizes = {h[1] for h in handles}
            if len(handles) != world_size or sizes != {slot_bytes}:
                raise InvalidArgumentError(
                    f"workspace rendezvous mismatch: {len(handles)} ranks answered (expected {world_size}), "
                    f"slot sizes {sorted(sizes)} (every rank must ask for the same size)"
                )
            ptrs = []
            for r, (handle, *_) in enumerate(handles):
                if r == rank:
                    ptrs.append(local)
                else:
                    ptr = memory.open(handle, nbytes)
                    opened.append(ptr)
                    ptrs.append(ptr)
            # Every rank has mapped every region: shared files can go from the file system now.
            exchange(None)
            if isinstance(memory, SharedFileMemory):
                memory.unlink(local)
        except BaseException:
            for ptr in opened:
                memory.close(ptr)
            memory.free(local)
            raise

        def release() -> None:
            for ptr in opened:
                memory.close(ptr)
            memory.free(local)

        sharing = sum(1 for *_, other in handles if other == where)
        return cls(rank, world_size, slot_bytes, ptrs, device, release, ranks_on_device=sharing)

    # ------------------------------------------------------------------ use
    def registered_tensor(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``numel`` elements aliasing this rank's registered region (zero-copy input)."""
        self._check_open()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.slot_bytes:
            from .errors import WorkspaceExhaustedError

            raise WorkspaceExhaustedError(
                f"{numel} x {dtype} is {nbytes} bytes, over the workspace's {self.slot_bytes} bytes"
            )
        if self._local_region is not None:
            start = _k.PAD_BYTES.value
            return self._local_region[start : start + nbytes].view(dtype)
        return _tensor_at(self._registered_ptr, numel, dtype, self.device, owner=self)

    def is_registered(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` starts at this rank's registered region."""
        return tensor.data_ptr() == self._registered_ptr

    def error(self) -> dict | None:
        """The first device-side error recorded by a kernel, or None (no device sync)."""
        if self._error_view[_k.ERR_STATUS.value] == 0:
            return None
        v = self._error_view
        return {
            "peer": int(v[_k.ERR_PEER.value]),
            "phase": ("start", "mid", "end", "lamport", "copy-engine")[int(v[_k.ERR_PHASE.value])],
            "block": int(v[_k.ERR_BLOCK.value]),
            "epoch": int(v[_k.ERR_EPOCH.value]),
        }

    def raise_if_failed(self) -> None:
        """Raise :class:`CommTimeoutError` naming the peer that never arrived, if a kernel timed out."""
        err = self.error()
        if err is not None:
            where = ("step " if err["phase"] == "copy-engine" else "program ") + str(err["block"])
            raise CommTimeoutError(
                f"custom all-reduce on rank {self.rank}: peer rank {err['peer']} never arrived at the "
                f"{err['phase']} barrier of call {err['epoch']} ({where}); the workspace is "
                "unusable now: destroy the backend and create it again",
                details={"rank": self.rank, **err},
            )

    def _check_open(self) -> None:
        if self.closed:
            raise NotInitializedError("the symmetric workspace was closed (destroy() was called)")

    def close(self) -> None:
        """Unmap peers and free this rank's region (idempotent).  The device must be idle."""
        if self.closed:
            return
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._release is not None:
            self._release()
        self.table = self.control = self._local_region = None  # type: ignore[assignment]


class _RawStorageOwner:
    """Keeps the workspace alive while a tensor built on its memory exists."""

    def __init__(self, owner: Any):
        self.owner = owner


def _tensor_at(ptr: int, numel: int, dtype: torch.dtype, device: torch.device, owner: Any) -> torch.Tensor:
    """A tensor view of ``numel`` elements at raw address ``ptr`` on ``device``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        import cupy

        mem = cupy.cuda.UnownedMemory(ptr, numel * itemsize, _RawStorageOwner(owner), device.index or 0)
        arr = cupy.ndarray((numel * itemsize,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        flat = torch.as_tensor(arr, device=device)
    else:
        buf = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (numel * itemsize)).from_address(ptr))
        flat = torch.from_numpy(buf)
    return flat.view(dtype)


def local_workspaces(world_size: int, slot_bytes: int, device: torch.device | str) -> list[SymmetricWorkspace]:
    """Virtual ranks: ``world_size`` workspaces in this process, regions allocated on one device.

    The regions are freed when the last of the returned workspaces is closed.
    """
    device = torch.device(device)
    slot_bytes = _round_slot(slot_bytes)
    nbytes = region_bytes(slot_bytes, world_size)
    regions = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(world_size)]
    for region in regions:
        region[lamport_offset(slot_bytes) :].fill_(_lk.SENTINEL_BYTE)
    ptrs = [r.data_ptr() for r in regions]
    # Control words and error records of all ranks in one allocation each: the one-launch mode of
    # virtual ranks finds rank r's at row r.
    control = torch.zeros(world_size, _k.CTRL_WORDS.value, dtype=torch.int32, device=device)
    errors = torch.zeros(world_size, _k.ERR_WORDS.value, dtype=torch.int64, pin_memory=device.type == "cuda")
    open_count = [world_size]

    def release() -> None:
        open_count[0] -= 1
        if open_count[0] == 0:
            regions.clear()

    return [
        SymmetricWorkspace(
            r,
            world_size,
            slot_bytes,
            ptrs,
            device,
            release,
            regions[r],
            control=control[r],
            error_record=errors[r],
            ranks_on_device=world_size,
        )
        for r in range(world_size)
    ]
