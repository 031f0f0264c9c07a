"""The ``custom`` backend: intra-node all-reduce on our Triton kernels, everything else on the engine.

``CommBackend.create("custom")`` is a :class:`TorchDistributedBackend` (NCCL on CUDA; Gloo on the CPU under
the Triton interpreter, for tests) that, after ``init``, tries to set up the symmetric workspace over the
whole world.  It is used only when every check passes on every rank:

1. 2..8 ranks, all on one host (hostnames gathered over the CPU group);
2. CUDA: every pair of the ranks' GPUs reports peer access (ranks sharing one GPU need none), CuPy is
   installed for IPC handles;
3. a real self-test all-reduce through the opened peer mappings gives the exact expected sum on every rank
   (``canAccessPeer`` has lied before).

Otherwise every call goes to the engine and :attr:`CustomBackend.custom_reason` says why.  When active,
``all_reduce(tensor, op=SUM)`` on the world group runs the kernels for sizes up to the workspace (the
selector picks one-shot or two-shot; ``algo=`` overrides) and the engine for the rest (other ops, other
groups, larger messages, unsupported dtypes).  :attr:`CustomBackend.last_selection` records what ran.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import torch

from ..backend import ReduceOp, Work, register_comm_backend
from ..cupy_probe import cupy_present, require_cupy
from ..custom_all_reduce import SUPPORTED_DTYPES, CustomAllReduce
from ..errors import (
    BackendNotSupportedError,
    CommError,
    CommTimeoutError,
    InvalidArgumentError,
    NotInitializedError,
)
from ..kernels.all_reduce import MAX_WORLD
from ..launch import interpreting as _interpreting
from ..selector import KERNEL_ALGOS, AlgoSelector, Selection
from ..workspace import SymmetricWorkspace
from .torch_distributed import TorchDistributedBackend

log = logging.getLogger("sagellm_comm")

DEFAULT_MAX_BYTES = int(os.environ.get("SAGELLM_COMM_CUSTOM_MAX_BYTES", 64 << 20))
ALGO_CHOICES = ("auto", "one_shot", "two_shot", "lamport", "nccl")
_USER_SELECTIONS = {a: Selection(a, "user", f"algo={a} requested") for a in KERNEL_ALGOS}


def custom_available() -> bool:
    """The custom kernels can run here: CUDA with CuPy, or the CPU under the Triton interpreter."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        require_cupy("custom")
        return True
    if _interpreting():
        return True
    raise BackendNotSupportedError("custom needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on the CPU)")


class _EventWork(Work):
    """Handle of an all-reduce enqueued by the kernels (completion tracked by a CUDA event)."""

    def __init__(self, car: CustomAllReduce, tensor: torch.Tensor):
        self._car = car
        self._tensor = tensor
        self._event = None
        if tensor.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until the kernel finished; raise ``CommTimeoutError`` (or ``CollectiveMismatchError``) if it
        failed, or ``CommTimeoutError`` if it is still running after ``timeout`` seconds."""
        if self._event is not None:
            if timeout is None:
                self._event.synchronize()
            else:
                deadline = time.monotonic() + timeout
                while not self._event.query():
                    self._car.check_errors()  # a failure recorded by the kernel is reported at once
                    if time.monotonic() > deadline:
                        raise CommTimeoutError(
                            f"custom all-reduce on rank {self._car.rank} did not complete within {timeout:g}s",
                            details={"rank": self._car.rank, "timeout_s": timeout},
                        )
                    time.sleep(0.0002)
        self._car.check_errors()
        return self._tensor

    def is_completed(self) -> bool:
        return self._event is None or self._event.query()


class CustomBackend(TorchDistributedBackend):
    """Intra-node custom all-reduce with engine fallback (see the module docstring).

    Args:
        device: as for :class:`TorchDistributedBackend`.
        max_bytes: workspace capacity per rank (largest message the kernels take).
        selector: algorithm policy (default rules), or a path to a JSON policy file.
        kernel_timeout: bound in seconds of every device-side wait of the kernels.
    """

    kind = "custom"

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        selector: AlgoSelector | str | None = None,
        kernel_timeout: float = 30.0,
    ):
        engine = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
        if engine == "gloo" and not _interpreting():
            raise BackendNotSupportedError("custom needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
        super().__init__(engine, device=device)
        if isinstance(selector, str | os.PathLike):
            selector = AlgoSelector.from_file(selector)
        self.selector = selector or AlgoSelector()
        self.max_bytes = int(max_bytes)
        self.kernel_timeout = kernel_timeout
        self.custom: CustomAllReduce | None = None
        self.custom_reason = "not initialised"
        self.last_selection: Selection | None = None

    @property
    def name(self) -> str:
        return "custom"

    @property
    def engine_kind(self) -> str:
        """The engine that runs everything the kernels do not (``nccl`` or ``gloo``)."""
        return self.engine.kind

    # ------------------------------------------------------------------ lifecycle
    def init(self, *args: Any, **kwargs: Any) -> CustomBackend:
        super().init(*args, **kwargs)
        if self.custom is None:
            try:
                self.custom, self.custom_reason = self._setup_custom()
            except BaseException:
                self.destroy()
                raise
        return self

    def _exchange(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def _setup_custom(self) -> tuple[CustomAllReduce | None, str]:
        """Collective: decide on every rank together whether the kernels can run, and set them up."""
        local_ok, local_reason = self._local_checks()
        facts = self._exchange((socket.gethostname(), self.device.index, local_ok, local_reason))
        reason = self._group_verdict(facts)
        if reason is not None:
            return None, reason
        try:
            ws = SymmetricWorkspace.rendezvous(self.rank, self.world_size, self.max_bytes, self.device, self._exchange)
        except CommError as exc:
            verdicts = self._exchange(str(exc))
            return None, f"workspace setup failed: {verdicts}"
        # one program per SM, divided between ranks that share a GPU (MPS): ws.ranks_on_device
        car = CustomAllReduce(ws, selector=self.selector, timeout_s=self.kernel_timeout, fallback=self._engine_sum)
        ok = self._self_test(car)
        verdicts = self._exchange(ok)
        if not all(verdicts):
            car.close()
            bad = [r for r, v in enumerate(verdicts) if not v]
            return None, f"self-test all-reduce through peer mappings gave wrong results on ranks {bad}"
        return car, f"custom kernels on {self.world_size} ranks of one node ({self.device.type})"

    def _local_checks(self) -> tuple[bool, str]:
        if not 2 <= self.world_size <= MAX_WORLD.value:
            return False, f"world size {self.world_size} is outside 2..{MAX_WORLD.value}"
        if self.device.type == "cuda" and not cupy_present():
            return False, "CuPy is not installed (needed for CUDA IPC handles)"
        return True, ""

    def _group_verdict(self, facts: list[tuple]) -> str | None:
        bad = [(r, why) for r, (_, _, ok, why) in enumerate(facts) if not ok]
        if bad:
            return "; ".join(f"rank {r}: {why}" for r, why in bad)
        hosts = {h for h, *_ in facts}
        if len(hosts) > 1:
            return f"ranks span {len(hosts)} hosts ({sorted(hosts)}); the kernels need one node"
        if self.device.type == "cuda":
            devices = sorted({d for _, d, *_ in facts})
            for a in devices:
                for b in devices:
                    if a != b and not torch.cuda.can_device_access_peer(a, b):
                        return f"GPU {a} cannot access GPU {b} (no peer access): PCIe without P2P?"
        return None

    def _self_test(self, car: CustomAllReduce) -> bool:
        numel = min(4099, car.workspace.slot_bytes // 4)  # odd, and fits any workspace
        expected = float(sum(range(1, self.world_size + 1)))
        try:
            for algo in KERNEL_ALGOS:
                x = torch.full((numel,), float(self.rank + 1), dtype=torch.float32, device=self.device)
                car.all_reduce(x, algo=algo)
                car.synchronize()
                if not bool(torch.all(x == expected)):
                    return False
        except CommError:
            return False
        return True

    def reset(self) -> str:
        """Collective: rebuild the custom path on every rank together, after a device-side failure.

        A timed-out or mismatched call latches its workspace (every later call raises, every later output
        of a replayed graph is NaN).  Call ``reset()`` on every rank: the old workspace is released and a
        new one is made and self-tested exactly as at ``init``.  If that fails (a rank is gone, a peer
        mapping or the self-test fails), the backend keeps serving every call on the engine and
        :attr:`custom_reason` records why.  Returns :attr:`custom_reason`.  CUDA graphs captured before the
        reset hold the old workspace's addresses: capture them again.
        """
        if not self.is_initialized:
            raise NotInitializedError("reset() needs an initialised backend: call init() first")
        old, self.custom = self.custom, None
        if old is not None:
            try:
                old.close()
            except Exception as exc:  # an unusable device must not stop the fallback
                log.warning("sagellm-comm reset: closing the old workspace failed: %s", exc)
        try:
            self.custom, reason = self._setup_custom()
        except Exception as exc:
            self.custom, reason = None, f"reset failed on rank {self.rank}: {exc}; the engine runs every call"
        self.custom_reason = reason
        log.info("sagellm-comm reset on rank %d: %s", self.rank, reason)
        return reason

    def _engine_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return TorchDistributedBackend.all_reduce(self, tensor, ReduceOp.SUM)

    def destroy(self) -> None:
        if self.custom is not None:
            try:
                self.custom.close()
            finally:
                self.custom = None
                self.custom_reason = "destroyed"
        super().destroy()

    # ------------------------------------------------------------------ all-reduce
    def select(self, nbytes: int, itemsize: int = 2) -> Selection:
        """What ``all_reduce`` of ``nbytes`` (``itemsize``-byte elements) on the world group runs, and why."""
        if self.custom is None:
            return Selection(self.engine_kind, "custom-unavailable", self.custom_reason)
        return self.custom.select(nbytes, itemsize).ran_on(self.engine_kind)

    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False, algo: str = "auto"):
        """As :meth:`CommBackend.all_reduce`; SUM on the world group runs the kernels when they can.

        ``algo``: ``auto`` (the selector), ``one_shot``, ``two_shot``, ``lamport`` or ``nccl`` (the engine).
        """
        if algo not in ALGO_CHOICES:
            raise InvalidArgumentError(f"algo must be one of {ALGO_CHOICES}, got {algo!r}")
        car = self.custom
        if (
            car is None
            or algo == "nccl"
            or (group is not None and getattr(group, "handle", group) not in (None, self._world))
            or ReduceOp.parse(op) is not ReduceOp.SUM
            or not isinstance(tensor, torch.Tensor)
            or tensor.dtype not in SUPPORTED_DTYPES
            or not tensor.is_contiguous()
        ):
            self.last_selection = Selection(
                self.engine_kind, "engine", "not a kernel case (custom off, op, group, dtype or layout)"
            )
            return super().all_reduce(tensor, op, group, async_op)
        # The kernel path: ``car.all_reduce`` checks the device (typed error) and dtype/layout were checked
        # above, so nothing is validated twice; a live ``car`` means the backend is initialised.
        itemsize = tensor.element_size()
        nbytes = tensor.numel() * itemsize
        sel = car.select(nbytes, itemsize) if algo == "auto" else _USER_SELECTIONS[algo]
        if sel.algo not in KERNEL_ALGOS or nbytes > car.workspace.slot_bytes:
            if nbytes > car.workspace.slot_bytes and algo != "auto":
                raise InvalidArgumentError(
                    f"algo={algo} needs the message ({nbytes} bytes) to fit the {car.workspace.slot_bytes}-byte "
                    "workspace; use algo='auto' to fall back to the engine"
                )
            self.last_selection = sel.ran_on(self.engine_kind)
            return super().all_reduce(tensor, op, group, async_op)
        self.last_selection = sel
        car.all_reduce(tensor, algo=sel.algo)
        if async_op:
            return _EventWork(car, tensor)
        return tensor


register_comm_backend(
    "custom",
    CustomBackend,
    is_available=custom_available,
    priority=60,
    replace=True,
)
