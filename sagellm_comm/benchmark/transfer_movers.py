"""The transfer benchmark's backends, each moving the same blocks between the same two pools
(``transfer_config.py`` says what each one is).  A mover's ``enqueue(op, point)`` starts one request and, for
device-timed movers, leaves its completion on the current CUDA stream; ``blocking(op, point)`` returns once every
byte arrived.  ``op`` is ``"write"`` (local -> remote) or ``"read"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from sagellm_comm.benchmark.transfer_config import pool_blocks
from sagellm_comm.errors import CommTimeoutError
from sagellm_comm.transfer.descriptors import SMALL


@dataclass
class Point:
    """One measured shape: ``count`` blocks of ``block`` bytes, scattered over both pools."""

    block: int
    count: int
    local_ids: np.ndarray
    remote_ids: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.block * self.count

    def table(self) -> np.ndarray:
        """Byte triples ``(local_offset, remote_offset, nbytes)``."""
        table = np.empty((self.count, 3), dtype=np.int64)
        table[:, 0] = self.local_ids * self.block
        table[:, 1] = self.remote_ids * self.block
        table[:, 2] = self.block
        return table

    def blocks(self):
        """The request's blocks in the form the agent documents for its size: up to ``SMALL`` triples of Python
        ints as a list (what a caller posting one or a few blocks passes), more as :meth:`table`'s array."""
        table = self.table()
        return [tuple(row) for row in table.tolist()] if self.count <= SMALL else table


class AgentMover:
    """``TransferAgent`` (``ipc`` or ``nixl``), listed or prepared requests."""

    def __init__(self, agent, peer: str, prepared: bool, timeout: float):
        self.agent, self.peer, self.prepared, self.timeout = agent, peer, prepared, timeout
        # GPU pools only: a CPU run (the ipc path under the interpreter) is timed by the wall clock, GPU or not
        self.device_timed = agent.peer_backend(peer) == "ipc" and agent.peer_regions(peer)["pool"].device == "cuda"
        self._pools: dict[int, object] = {}
        self._tables: dict[int, list | np.ndarray] = {}

    def start(self, op: str, point: Point, notify: bytes | None = None):
        if self.prepared:
            pool = self._pools.get(point.block)
            if pool is None:
                pool = self._pools[point.block] = self.agent.prepare(self.peer, "pool", "pool", point.block)
            return getattr(pool, op)(point.local_ids, point.remote_ids, notify=notify)
        table = self._tables.get(id(point))
        if table is None:
            table = self._tables[id(point)] = point.blocks()
        return getattr(self.agent, op)(self.peer, "pool", "pool", table, notify=notify)

    def enqueue(self, op: str, point: Point) -> None:
        self.start(op, point).wait_on_stream()

    def blocking(self, op: str, point: Point) -> None:
        self.start(op, point).wait(self.timeout)

    def transport(self) -> str:
        return f"{self.agent.peer_backend(self.peer)}: {self.agent.peer_transport(self.peer)}"


class RawNixlMover:
    """NIXL's own API over the same pools: what a user of NIXL writes, the reference for our agent's cost."""

    device_timed = False

    def __init__(self, nixl_agent, remote: str, local_pool: torch.Tensor, remote_address: int, remote_device: int,
                 prepared: bool, timeout: float):  # fmt: skip
        self.agent, self.remote, self.prepared, self.timeout = nixl_agent, remote, prepared, timeout
        self.local = (local_pool.data_ptr(), local_pool.get_device() if local_pool.is_cuda else 0)
        self.remote_base = (remote_address, remote_device)
        self.mem = "VRAM" if local_pool.is_cuda else "DRAM"
        self.pool_bytes = local_pool.numel()
        self._sides: dict[int, tuple] = {}

    def _descs(self, base: tuple[int, int], ids: np.ndarray, block: int) -> np.ndarray:
        descs = np.empty((len(ids), 3), dtype=np.uint64)
        descs[:, 0] = ids * block + base[0]
        descs[:, 1] = block
        descs[:, 2] = base[1]
        return descs

    def blocking(self, op: str, point: Point) -> None:
        kind = "WRITE" if op == "write" else "READ"
        if self.prepared:
            sides = self._sides.get(point.block)
            if sides is None:
                every = np.arange(self.pool_bytes // point.block)
                local = self._descs(self.local, every, point.block)
                remote = self._descs(self.remote_base, every, point.block)
                sides = self._sides[point.block] = (
                    self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.mem),
                    self.agent.prep_xfer_dlist(self.remote, remote, self.mem),
                )
            handle = self.agent.make_prepped_xfer(kind, sides[0], point.local_ids.astype(np.int32), sides[1],
                                                  point.remote_ids.astype(np.int32))  # fmt: skip
        else:
            local = self.agent.get_xfer_descs(self._descs(self.local, point.local_ids, point.block), self.mem)
            remote = self.agent.get_xfer_descs(self._descs(self.remote_base, point.remote_ids, point.block), self.mem)
            handle = self.agent.initialize_xfer(kind, local, remote, self.remote)
        state = self.agent.transfer(handle)
        deadline = time.monotonic() + self.timeout
        while state == "PROC":
            if time.monotonic() > deadline:
                handle.release()
                raise CommTimeoutError(f"raw NIXL {op} did not complete within {self.timeout} s")
            state = self.agent.check_xfer_state(handle)
        handle.release()
        if state != "DONE":
            raise CommTimeoutError(f"raw NIXL {op} failed with state {state}")

    def transport(self) -> str:
        return "NIXL's Python API (initialize_xfer / make_prepped_xfer, transfer, check_xfer_state)"


class TorchMover:
    """torch ops over a mapping of the peer's pool: index_select + index_copy_ (scattered), copy_ (one block)."""

    def __init__(self, local_pool: torch.Tensor, remote_pool: torch.Tensor):
        self.local, self.remote = local_pool, remote_pool
        self.device_timed = local_pool.is_cuda
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def enqueue(self, op: str, point: Point) -> None:
        local = pool_blocks(self.local, point.block)
        remote = pool_blocks(self.remote, point.block)
        src, dst = (local, remote) if op == "write" else (remote, local)
        if point.count == 1:
            src_id, dst_id = (point.local_ids[0], point.remote_ids[0])
            if op == "read":
                src_id, dst_id = dst_id, src_id
            dst[int(dst_id)].copy_(src[int(src_id)])
            return
        index = self._index.get(id(point))
        if index is None:
            device = self.local.device
            index = self._index[id(point)] = (torch.as_tensor(point.local_ids, device=device),
                                              torch.as_tensor(point.remote_ids, device=device))  # fmt: skip
        src_index, dst_index = index if op == "write" else index[::-1]
        dst.index_copy_(0, dst_index, src.index_select(0, src_index))

    blocking = enqueue

    def transport(self) -> str:
        kind = "CUDA IPC mapping" if self.device_timed else "shared-file mapping"
        return f"torch index_select + index_copy_ (copy_ for one block) over the {kind} of the peer's pool"


class CopyEngineMover:
    """One ``cudaMemcpyAsync`` per block over the CUDA IPC mapping (copy engines; many host calls)."""

    device_timed = True

    def __init__(self, local_pool: torch.Tensor, remote_address: int):
        from cupy.cuda import runtime

        self.runtime = runtime
        self.local, self.remote = local_pool.data_ptr(), remote_address
        self.index = local_pool.device.index or 0

    def enqueue(self, op: str, point: Point) -> None:
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        memcpy, kind = self.runtime.memcpyAsync, self.runtime.memcpyDeviceToDevice
        for lid, rid in zip(point.local_ids.tolist(), point.remote_ids.tolist(), strict=True):
            local, remote = self.local + lid * point.block, self.remote + rid * point.block
            src, dst = (local, remote) if op == "write" else (remote, local)
            memcpy(dst, src, point.block, kind, stream)

    blocking = enqueue

    def transport(self) -> str:
        return "one cudaMemcpyAsync per block (copy engines) over the CUDA IPC mapping of the peer's pool"
