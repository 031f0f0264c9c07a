"""CommBackend over torch.distributed: Gloo (CPU), NCCL (NVIDIA), RCCL (ROCm), HCCL (Ascend, torch_npu).

One class serves the four kinds; what differs between them is data, in :data:`ENGINES` (torch's
backend name, device type, whether operations finish on the host, which ops the engine lacks).

Validation: every argument is checked *before* torch.distributed is called (initialised, tensor
type/device/contiguity, list lengths, shapes and dtypes, ranks, groups, op/dtype pairs), so a rejected
call raises a typed error and leaves tensors and groups untouched.

Timeouts: the rendezvous runs on a TCPStore created with the backend's ``timeout``; every process
group is created with it too.  On Gloo (host-blocking) each operation is started with
``async_op=True`` and waited with ``work.wait(timeout)``, so a missing peer gives ``comm_timeout``
in bounded time.  On device engines a synchronous call returns once the collective is enqueued (the
current stream waits for it, as in torch); torch's watchdog bounds it with the same group timeout.
After a ``comm_timeout`` the group's state is undefined: destroy the backend.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.backend import (
    DEFAULT_TIMEOUT_S,
    CommBackend,
    GroupHandle,
    ReduceOp,
    Work,
    register_comm_backend,
)
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CollectiveFailedError,
    CommError,
    CommTimeoutError,
    GroupInvalidError,
    GroupNotFoundError,
    InvalidArgumentError,
    NotInitializedError,
    P2PFailedError,
    RankMismatchError,
    ShapeMismatchError,
    UnavailableError,
)

__all__ = ["ENGINES", "Engine", "TorchDistributedBackend"]


# ====================================================================== engines


def _require_gloo() -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        raise BackendNotSupportedError("gloo needs torch built with torch.distributed and Gloo")


def _require_nccl() -> None:
    if torch.version.hip is not None:
        raise BackendNotSupportedError("nccl needs a CUDA build of torch; this is a ROCm build: use 'rccl'")
    if torch.version.cuda is None or not dist.is_nccl_available():
        raise BackendNotSupportedError(
            f"nccl needs a CUDA build of torch and a GPU; torch {torch.__version__} has no CUDA/NCCL"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendNotSupportedError("nccl needs a CUDA build of torch and a GPU; no GPU is visible")


def _require_rccl() -> None:
    if torch.version.hip is None:
        raise BackendNotSupportedError(
            f"rccl needs a ROCm build of torch (torch.version.hip is None in torch {torch.__version__})"
        )
    if not dist.is_nccl_available():
        raise BackendNotSupportedError("rccl needs torch built with RCCL (dist.is_nccl_available() is False)")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendNotSupportedError("rccl needs an AMD GPU; none is visible to torch")


def _npu_api() -> Any:
    """The ``torch_npu.npu`` device API; importing torch_npu registers the 'hccl' process group."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError as exc:
        raise BackendNotSupportedError(
            f"hccl needs torch_npu (pip install torch_npu matching torch {torch.__version__}): {exc}"
        ) from exc
    return torch_npu.npu


def _require_hccl() -> None:
    npu = _npu_api()
    if not npu.is_available() or npu.device_count() == 0:
        raise BackendNotSupportedError("hccl needs an Ascend NPU; torch_npu sees none")
    if not hasattr(dist.Backend, "HCCL"):
        raise BackendNotSupportedError("hccl needs torch_npu to register the 'hccl' process-group backend")


@dataclass(frozen=True)
class Engine:
    """What one kind needs from torch.distributed.

    Attributes:
        kind: our name (``"rccl"``); torch_backend: torch's (``"nccl"`` on ROCm too).
        device_type: where tensors live; host_blocking: operations complete on the host (Gloo).
        native_avg: the engine reduces AVG itself (else SUM then divide, exact for floats).
        bitwise_ops: the engine offers BAND/BOR/BXOR.
    """

    kind: str
    torch_backend: str
    device_type: str
    host_blocking: bool
    native_avg: bool
    bitwise_ops: bool
    priority: int
    require: Callable[[], None]


ENGINES: dict[str, Engine] = {
    "gloo": Engine("gloo", "gloo", "cpu", True, False, True, 0, _require_gloo),
    "nccl": Engine("nccl", "nccl", "cuda", False, True, False, 50, _require_nccl),
    "rccl": Engine("rccl", "nccl", "cuda", False, True, False, 50, _require_rccl),
    "hccl": Engine("hccl", "hccl", "npu", False, False, False, 40, _require_hccl),
}

# torch 2.13 renamed the flat-tensor collectives; older torch (>= 2.4) has only the old names
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_TORCH_OPS = {
    ReduceOp.SUM: "SUM",
    ReduceOp.AVG: "AVG",
    ReduceOp.MAX: "MAX",
    ReduceOp.MIN: "MIN",
    ReduceOp.PRODUCT: "PRODUCT",
    ReduceOp.BAND: "BAND",
    ReduceOp.BOR: "BOR",
    ReduceOp.BXOR: "BXOR",
}


def _seconds(timeout: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout)


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    waits = ("timed out", "timeout", "monitoredbarrier")  # the last: a rank missed the barrier
    return isinstance(exc, TimeoutError) or any(word in text for word in waits)


# ====================================================================== work handle


class _TorchWork(Work):
    """Wraps a torch Work: bounded wait on Gloo, a post-step (AVG division) run once, typed errors."""

    def __init__(self, backend: TorchDistributedBackend, work: Any, what: str, result: Any, post=None):
        self._backend, self._work, self._what = backend, work, what
        self._result, self._post, self._done = result, post, False

    def wait(self, timeout: float | None = None) -> Any:
        if self._done:
            return self._result
        limit = self._backend.timeout if timeout is None else _check_timeout(timeout)
        try:
            if self._backend.engine.host_blocking:
                self._work.wait(_seconds(limit))
            else:  # stream semantics: the current stream waits, the host does not
                self._work.wait()
        except Exception as exc:
            raise self._backend._translate(exc, self._what, limit) from exc
        if self._post is not None:
            self._post()
        self._done = True
        return self._result

    def is_completed(self) -> bool:
        return self._done or bool(self._work.is_completed())


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (0 < timeout < float("inf")):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# ====================================================================== backend


class TorchDistributedBackend(CommBackend):
    """:class:`CommBackend` on torch.distributed for the kinds in :data:`ENGINES`.

    Args:
        kind: ``"gloo"``, ``"nccl"``, ``"rccl"`` or ``"hccl"``.
        device: override the device tensors must live on (default: CPU for Gloo, else
            ``<type>:<LOCAL_RANK % device_count>``, made current at init).
    """

    def __init__(self, kind: str = "gloo", *, device: str | torch.device | None = None):
        if kind not in ENGINES:
            raise BackendNotSupportedError(
                f"TorchDistributedBackend runs {', '.join(ENGINES)}, not {kind!r}", details={"kind": kind}
            )
        self.engine = ENGINES[kind]
        self.engine.require()
        self.kind = kind
        self._device_override = torch.device(device) if device is not None else None
        self._reset()

    def _reset(self) -> None:
        self._destroyed = getattr(self, "_initialized", False) or getattr(self, "_destroyed", False)
        self._initialized = False
        self._rank = self._world_size = -1
        self._device: torch.device | None = None
        self._world: GroupHandle | None = None
        self._groups: list[GroupHandle] = []
        self._owns_world = False
        self._store: Any = None
        self.timeout = DEFAULT_TIMEOUT_S

    # ------------------------------------------------------------------ lifecycle
    def init(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        local_rank: int | None = None,
    ) -> TorchDistributedBackend:
        """Join the world; missing arguments come from torchrun's env (read, never written).

        If torch.distributed's default group already exists (the caller made it), it is adopted
        after checking rank and world size, and :meth:`destroy` leaves it alone.  A world of one
        needs no address.  Raises ``comm_timeout`` when not every rank joins within ``timeout``.
        """
        timeout = _check_timeout(timeout)
        rank = _int_arg(rank, "RANK", "rank")
        world_size = _int_arg(world_size, "WORLD_SIZE", "world_size")
        if world_size < 1:
            raise GroupInvalidError(f"world_size must be >= 1, got {world_size}", details={"world_size": world_size})
        if not 0 <= rank < world_size:
            raise RankMismatchError(
                f"rank must be in [0, {world_size - 1}] for world_size={world_size}, got {rank}",
                details={"rank": rank, "world_size": world_size},
            )
        if self._initialized:
            if (rank, world_size) != (self._rank, self._world_size):
                raise RankMismatchError(
                    f"backend already initialised as rank {self._rank}/{self._world_size}, "
                    f"asked for {rank}/{world_size}; destroy() it first"
                )
            return self
        self.timeout = timeout
        if dist.is_initialized():
            self._adopt_world(rank, world_size)
        else:
            self._create_world(rank, world_size, master_addr, master_port)
        self._rank, self._world_size = rank, world_size
        try:  # past this point the world exists: undo it if the rest fails
            self._device = self._pick_device(_int_arg(local_rank, "LOCAL_RANK", "local_rank", default=rank))
            cpu = dist.group.WORLD if self.engine.host_blocking else self._gloo_group(range(world_size))
        except Exception as exc:
            self._teardown()
            self._reset()
            raise self._translate(exc, "init (device, cpu group)", timeout) from exc
        self._world = GroupHandle(tuple(range(world_size)), rank, dist.group.WORLD, cpu)
        self._initialized, self._destroyed = True, False
        return self

    def _adopt_world(self, rank: int, world_size: int) -> None:
        have = (dist.get_rank(), dist.get_world_size())
        if have != (rank, world_size):
            raise RankMismatchError(
                f"torch.distributed is already initialised as rank {have[0]}/{have[1]}, "
                f"but init was asked for rank {rank}/{world_size}",
                details={"existing": have, "requested": (rank, world_size)},
            )
        running = str(dist.get_backend())
        if self.engine.torch_backend not in running:
            raise BackendNotSupportedError(
                f"the existing default process group runs {running!r}; backend {self.kind!r} "
                f"needs {self.engine.torch_backend!r}"
            )
        self._owns_world = False

    def _create_world(self, rank: int, world_size: int, addr: str | None, port: int | None) -> None:
        if world_size == 1 and addr is None and port is None and "MASTER_PORT" not in os.environ:
            store: Any = dist.HashStore()
            where = "a local store"
        else:
            addr = addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
            port = _int_arg(port, "MASTER_PORT", "master_port")
            if not 0 < port < 65536:
                raise InvalidArgumentError(f"master_port must be in 1..65535, got {port}")
            where = f"{addr}:{port}"
            try:
                store = dist.TCPStore(
                    addr, port, world_size, rank == 0, timeout=_seconds(self.timeout), wait_for_workers=True
                )
            except Exception as exc:
                raise self._translate(exc, f"rendezvous at {where}", self.timeout) from exc
        try:
            dist.init_process_group(
                self.engine.torch_backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=_seconds(self.timeout),
            )
        except Exception as exc:
            raise self._translate(exc, f"init_process_group at {where}", self.timeout) from exc
        self._store, self._owns_world = store, True

    def _pick_device(self, local_rank: int) -> torch.device:
        if self._device_override is not None:
            return self._device_override
        kind = self.engine.device_type
        if kind == "cpu":
            return torch.device("cpu")
        api = _npu_api() if kind == "npu" else torch.cuda
        device = torch.device(kind, local_rank % api.device_count())
        api.set_device(device.index)
        return device

    def _gloo_group(self, ranks: Sequence[int]) -> Any:
        return dist.new_group(list(ranks), timeout=_seconds(self.timeout), backend="gloo")

    def destroy(self) -> None:
        if not self._initialized:
            return
        self._teardown()
        self._reset()

    def _teardown(self) -> None:
        for handle in reversed(self._groups):
            for pg in {id(p): p for p in (handle.engine_group, handle.cpu_group) if p is not None}.values():
                if not self._owns_world and _is_live(pg):
                    dist.destroy_process_group(pg)
        world_cpu = self._world.cpu_group if self._world is not None else None
        if world_cpu is not dist.group.WORLD and not self._owns_world and _is_live(world_cpu):
            dist.destroy_process_group(world_cpu)
        if self._owns_world and dist.is_initialized():
            dist.destroy_process_group()  # also frees every sub-group made on it
        self._groups.clear()

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.kind

    @property
    def rank(self) -> int:
        self._check_ready()
        return self._rank

    @property
    def world_size(self) -> int:
        self._check_ready()
        return self._world_size

    @property
    def device(self) -> torch.device:
        self._check_ready()
        return self._device

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def cpu_group(self) -> Any:
        self._check_ready()
        return self._world.cpu_group

    @property
    def world(self) -> GroupHandle:
        """The handle of the whole world (what ``group=None`` means)."""
        self._check_ready()
        return self._world

    # ------------------------------------------------------------------ groups
    def new_group(self, ranks: Sequence[int]) -> GroupHandle:
        """Sub-group of global ``ranks`` (sorted: group rank i is the i-th smallest). Every rank of
        the world must call it with the same ranks; non-members get a handle with ``rank == -1``."""
        self._check_ready()
        members = _check_group_ranks(ranks, self._world_size)
        try:
            engine_pg = dist.new_group(list(members), timeout=_seconds(self.timeout))
            cpu_pg = engine_pg if self.engine.host_blocking else self._gloo_group(members)
        except Exception as exc:
            raise self._translate(exc, f"new_group({list(members)})", self.timeout) from exc
        is_member = self._rank in members
        handle = GroupHandle(
            members,
            members.index(self._rank) if is_member else -1,
            engine_pg if is_member else None,
            cpu_pg if is_member else None,
        )
        self._groups.append(handle)
        return handle

    # ------------------------------------------------------------------ operations
    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(tensor, "tensor")
        rop = self._check_op(op, tensor.dtype)
        torch_op, post = self._reduction(rop, g, [tensor])
        start = lambda: dist.all_reduce(tensor, torch_op, g.engine_group, True)
        return self._run("all_reduce", g, async_op, tensor, post, start)

    def all_gather(self, output, tensor, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(tensor, "tensor")
        if isinstance(output, list | tuple):
            out = self._check_list(output, "output", g.world_size, tensor)
            start = lambda: dist.all_gather(out, tensor, g.engine_group, True)
        else:
            self._check_flat(output, "output", tensor, g.world_size * tensor.numel())
            flat_out, flat_in = output.view(-1), tensor.view(-1)
            start = lambda: _ALL_GATHER_FLAT(flat_out, flat_in, g.engine_group, True)
        return self._run("all_gather", g, async_op, output, None, start)

    def reduce_scatter(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(output, "output")
        rop = self._check_op(op, output.dtype)
        if isinstance(input, list | tuple):
            chunks = self._check_list(input, "input", g.world_size, output)
            torch_op, post = self._reduction(rop, g, [output])
            start = lambda: dist.reduce_scatter(output, chunks, torch_op, g.engine_group, True)
        else:
            self._check_flat(input, "input", output, g.world_size * output.numel())
            torch_op, post = self._reduction(rop, g, [output])
            start = lambda: _REDUCE_SCATTER_FLAT(output.view(-1), input.view(-1), torch_op, g.engine_group, True)
        return self._run("reduce_scatter", g, async_op, output, post, start)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(tensor, "tensor")
        root = g.ranks[_check_peer(src, g, "src", allow_self=True)]
        return self._run(
            "broadcast", g, async_op, tensor, None, lambda: dist.broadcast(tensor, root, g.engine_group, True)
        )

    def send(self, tensor, dst, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(tensor, "tensor")
        peer = g.ranks[_check_peer(dst, g, "dst")]
        work = self._run("send", g, True, None, None, lambda: dist.isend(tensor, peer, g.engine_group))
        return work if async_op else work.wait()

    def recv(self, tensor, src, group=None, async_op=False):
        g = self._group(group)
        self._check_tensor(tensor, "tensor")
        peer = g.ranks[_check_peer(src, g, "src")]
        work = self._run("recv", g, True, tensor, None, lambda: dist.irecv(tensor, peer, g.engine_group))
        return work if async_op else work.wait()

    def barrier(self, group=None, timeout=None):
        g = self._group(group)
        limit = self.timeout if timeout is None else _check_timeout(timeout)
        try:  # Gloo's monitored barrier names the ranks that did not arrive
            dist.monitored_barrier(g.cpu_group, timeout=_seconds(limit), wait_all_ranks=True)
        except Exception as exc:
            raise self._translate(exc, f"barrier over ranks {list(g.ranks)}", limit) from exc

    def all_to_all(self, output, input, group=None, async_op=False):
        g = self._group(group)
        n = g.world_size
        if isinstance(input, list | tuple) or isinstance(output, list | tuple):
            if not (isinstance(input, list | tuple) and isinstance(output, list | tuple)):
                raise InvalidArgumentError("all_to_all takes two lists or two tensors, not one of each")
            if len(input) != n:
                raise InvalidArgumentError(f"input must hold {n} tensors (one per rank), got {len(input)}")
            for i, chunk in enumerate(input):
                self._check_tensor(chunk, f"input[{i}]")
            outs = self._check_list(output, "output", n, None)
            dtype = input[0].dtype
            for i, t in enumerate([*input, *outs]):
                if t.dtype != dtype:
                    where = f"input[{i}]" if i < n else f"output[{i - n}]"
                    raise ShapeMismatchError(f"{where} has dtype {t.dtype}; all_to_all needs one dtype ({dtype})")
            # packed through all_to_all_single (every engine and torch version has it; Gloo before
            # torch 2.13 lacks the list form): one flat send buffer, one flat receive buffer
            send = torch.cat([t.reshape(-1) for t in input])
            recv = torch.empty(sum(o.numel() for o in outs), dtype=dtype, device=send.device)
            send_splits, recv_splits = [t.numel() for t in input], [o.numel() for o in outs]

            def unpack() -> None:
                for o, chunk in zip(outs, recv.split(recv_splits), strict=True):
                    o.copy_(chunk.view(o.shape))

            start = lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits, g.engine_group, True)
            return self._run("all_to_all", g, async_op, output, unpack, start)
        else:
            self._check_tensor(input, "input")
            self._check_flat(output, "output", input, input.numel())
            if input.dim() == 0 or input.shape[0] % n:
                raise ShapeMismatchError(
                    f"input dim 0 ({tuple(input.shape)}) must split evenly into {n} ranks",
                    details={"shape": tuple(input.shape), "world_size": n},
                )
            start = lambda: dist.all_to_all_single(output, input, group=g.engine_group, async_op=True)
        return self._run("all_to_all", g, async_op, output, None, start)

    # ------------------------------------------------------------------ machinery
    def _run(self, what: str, g: GroupHandle, async_op: bool, result: Any, post, start) -> Any:
        try:
            work = start()
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{what} rejected by {self.kind}: {exc}") from exc
        except Exception as exc:
            raise self._translate(exc, what, self.timeout) from exc
        handle = _TorchWork(self, work, f"{what} over ranks {list(g.ranks)}", result, post)
        return handle if async_op else handle.wait()

    def _translate(self, exc: BaseException, what: str, timeout: float) -> CommError:
        if isinstance(exc, CommError):
            return exc
        details = {"op": what, "backend": self.kind, "timeout_s": timeout}
        if _is_timeout(exc) or isinstance(exc, dist.DistStoreError):
            missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
            if missing:
                details["missing_ranks"] = [int(r) for r in missing.group(1).replace(",", " ").split()]
            who = f"; ranks {details['missing_ranks']} did not arrive" if missing else ""
            return CommTimeoutError(
                f"{what} did not complete within {timeout:g}s on {self.kind}{who}: a peer is missing, "
                f"slow or called a different operation ({exc})",
                details=details,
            )
        if what.startswith(("rendezvous", "init_process_group")):
            return UnavailableError(f"{what} failed: {exc}", details=details)
        cls = P2PFailedError if what.startswith(("send", "recv")) else CollectiveFailedError
        return cls(f"{what} failed on {self.kind}: {exc}", details=details)

    def _check_ready(self) -> None:
        if not self._initialized:
            state = "was destroyed" if self._destroyed else "is not initialised"
            raise NotInitializedError(
                f"backend {self.kind!r} {state}: call init(rank=, world_size=, master_addr=, master_port=) first"
            )

    def _group(self, group: Any) -> GroupHandle:
        self._check_ready()
        if group is None:
            return self._world
        handle = getattr(group, "handle", group)  # a CommGroup carries its GroupHandle
        if handle is None:  # a CommGroup over the whole world
            return self._world
        if not isinstance(handle, GroupHandle):
            raise InvalidArgumentError(f"group must come from new_group(), got {type(group).__name__}")
        if handle is not self._world and not any(handle is h for h in self._groups):
            raise GroupNotFoundError(
                f"group over ranks {list(handle.ranks)} does not belong to this backend (or was destroyed)"
            )
        if not handle.is_member:
            raise RankMismatchError(
                f"rank {self._rank} is not a member of the group over ranks {list(handle.ranks)}",
                details={"rank": self._rank, "group_ranks": list(handle.ranks)},
            )
        return handle

    def _check_tensor(self, tensor: Any, what: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
        expected = self._device
        if tensor.device.type != expected.type or (
            expected.index is not None and tensor.device.index not in (expected.index, None)
        ):
            raise InvalidArgumentError(
                f"{what} is on {tensor.device}, but backend {self.kind!r} needs tensors on {expected}; "
                f"move it with .to({str(expected)!r})",
                details={"given": str(tensor.device), "expected": str(expected)},
            )
        if tensor.is_sparse or not tensor.is_contiguous():
            raise InvalidArgumentError(f"{what} must be a dense contiguous tensor; call .contiguous() first")

    def _check_list(self, tensors: Any, what: str, n: int, like: torch.Tensor | None) -> list[torch.Tensor]:
        tensors = list(tensors)
        if len(tensors) != n:
            raise InvalidArgumentError(f"{what} must hold {n} tensors (one per rank), got {len(tensors)}")
        for i, t in enumerate(tensors):
            self._check_tensor(t, f"{what}[{i}]")
            if like is not None and (t.shape != like.shape or t.dtype != like.dtype):
                raise ShapeMismatchError(
                    f"{what}[{i}] is {tuple(t.shape)} {t.dtype}, expected {tuple(like.shape)} {like.dtype}",
                    details={"index": i, "shape": tuple(t.shape), "expected": tuple(like.shape)},
                )
        return tensors

    def _check_flat(self, tensor: Any, what: str, like: torch.Tensor, numel: int) -> None:
        self._check_tensor(tensor, what)
        if tensor.dtype != like.dtype or tensor.numel() != numel:
            raise ShapeMismatchError(
                f"{what} is {tuple(tensor.shape)} {tensor.dtype}; expected {numel} elements of {like.dtype}",
                details={"numel": tensor.numel(), "expected_numel": numel},
            )

    def _check_op(self, op: Any, dtype: torch.dtype) -> ReduceOp:
        rop = ReduceOp.parse(op)
        floating = dtype.is_floating_point or dtype.is_complex
        if rop is ReduceOp.AVG and not floating:
            raise InvalidArgumentError(f"ReduceOp.AVG needs a floating-point dtype, got {dtype}")
        if rop.is_bitwise and floating:
            raise InvalidArgumentError(f"ReduceOp.{rop.name} needs an integer or bool dtype, got {dtype}")
        if rop.is_bitwise and not self.engine.bitwise_ops:
            raise InvalidArgumentError(f"ReduceOp.{rop.name} is not supported by {self.kind}")
        if rop in (ReduceOp.MAX, ReduceOp.MIN) and dtype.is_complex:
            raise InvalidArgumentError(f"ReduceOp.{rop.name} is undefined for complex dtype {dtype}")
        return rop

    def _reduction(self, rop: ReduceOp, g: GroupHandle, outputs: list[torch.Tensor]):
        """torch op to run and a post-step: AVG is SUM then an in-place divide where not native."""
        if rop is ReduceOp.AVG and not self.engine.native_avg:
            n = g.world_size

            def divide() -> None:
                for t in outputs:
                    t.div_(n)

            return dist.ReduceOp.SUM, divide
        return getattr(dist.ReduceOp, _TORCH_OPS[rop]), None


# ====================================================================== argument checks


def _int_arg(value: Any, env: str, what: str, default: int | None = None) -> int:
    if value is None:
        text = os.environ.get(env)
        if text is None:
            if default is not None:
                return default
            raise InvalidArgumentError(f"{what} not given and ${env} is not set (run under torchrun or pass {what}=)")
        try:
            return int(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"${env}={text!r} is not an integer") from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}")
    return value


def _check_group_ranks(ranks: Any, world_size: int) -> tuple[int, ...]:
    try:
        members = list(ranks)
    except TypeError as exc:
        raise GroupInvalidError(f"group ranks must be a list of ints, got {ranks!r}") from exc
    if not members:
        raise GroupInvalidError("group ranks are empty; a group needs at least one rank")
    bad = [r for r in members if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise GroupInvalidError(f"group ranks must be ints, got {bad}")
    dups = sorted({r for r in members if members.count(r) > 1})
    if dups:
        raise GroupInvalidError(f"group ranks {members} repeat {dups}", details={"duplicates": dups})
    outside = [r for r in members if not 0 <= r < world_size]
    if outside:
        raise GroupInvalidError(
            f"group ranks {outside} are outside the world [0, {world_size - 1}]",
            details={"out_of_range": outside},
        )
    return tuple(sorted(members))


def _check_peer(peer: Any, g: GroupHandle, what: str, allow_self: bool = False) -> int:
    if isinstance(peer, bool) or not isinstance(peer, int):
        raise InvalidArgumentError(f"{what} must be an int rank, got {peer!r}")
    if not 0 <= peer < g.world_size:
        raise RankMismatchError(
            f"invalid {what} rank {peer}: the group has {g.world_size} ranks (valid 0..{g.world_size - 1})",
            details={what: peer, "group_size": g.world_size},
        )
    if peer == g.rank and not allow_self:
        raise RankMismatchError(f"invalid {what} rank {peer}: it is this rank; send/recv need another rank")
    return peer


def _is_live(pg: Any) -> bool:
    """True while ``pg`` is still registered with torch.distributed (not yet destroyed)."""
    if pg is None or not dist.is_initialized():
        return False
    try:
        dist.get_world_size(pg)
    except (RuntimeError, ValueError):
        return False
    return True


def _available(kind: str) -> bool:
    ENGINES[kind].require()  # raises BackendNotSupportedError naming what is missing
    return True


for _kind, _engine in ENGINES.items():
    register_comm_backend(
        _kind,
        functools.partial(TorchDistributedBackend, _kind),
        is_available=functools.partial(_available, _kind),
        priority=_engine.priority,
        replace=True,
    )
