"""All-reduce + residual add + RMSNorm in one kernel (``kernels/fused_all_reduce_rmsnorm.py``), per rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from sagellm_comm.kernels import fingerprint as _fp
from sagellm_comm.kernels import fused_all_reduce_rmsnorm as _rmk

from ..errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    NotInitializedError,
    ShapeMismatchError,
    WorkspaceExhaustedError,
)
from ..launch import Launcher as _Launcher
from ..launch import interpreting as _interpreting
from ..launch import timeout_ticks as _timeout_ticks
from ..selector import ENGINE_ALGO, AlgoSelector, Selection
from ..workspace import SymmetricWorkspace
from ._common import MAX_HIDDEN, RMSNORM_DTYPES, _check_2d, rmsnorm_reference


class FusedAllReduceRMSNorm:
    """All-reduce + residual add + RMSNorm of one rank, on the custom all-reduce's workspace.

    Args:
        workspace: the rank's :class:`SymmetricWorkspace` (the one its :class:`CustomAllReduce` uses).
        selector: one-shot/two-shot policy by bytes (the all-reduce's default rules when omitted).
        timeout_s: bound of every device-side wait.
        max_programs: programs per launch (rows are spread over them); all must be co-resident.  Agreed by
            the group with the workspace (``workspace.max_programs``); any other value raises.
        fallback: ``fallback(tensor) -> tensor``, an in-place all-reduce used when the fused kernels cannot
            run the call (message over the workspace); without it such calls raise.
    """

    def __init__(
        self,
        workspace: SymmetricWorkspace,
        selector: AlgoSelector | None = None,
        timeout_s: float = 30.0,
        max_programs: int | None = None,
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if workspace.device.type == "cpu" and not _interpreting():
            raise BackendNotSupportedError("fused kernels on CPU tensors need TRITON_INTERPRET=1; use CUDA tensors")
        if max_programs is not None and max_programs != workspace.max_programs:
            raise InvalidArgumentError(
                f"max_programs={max_programs} differs from the {workspace.max_programs} programs this workspace's "
                "group agreed on (every rank must launch the same grid)"
            )
        max_programs = workspace.max_programs
        self.workspace = workspace
        self.selector = selector or AlgoSelector()
        self.max_programs = max_programs
        self.fallback = fallback
        self.use_ptx = workspace.device.type == "cuda"
        self._timeout = _timeout_ticks(timeout_s, self.use_ptx)
        self._launchers: dict[int, _Launcher] = {}
        self._check = _Launcher(_fp.fingerprint_check_kernel, self.use_ptx, workspace.device.index or 0, num_warps=1)
        self.last_selection: Selection | None = None

    def select(self, nbytes: int) -> Selection:
        """``one_shot``, ``two_shot`` or ``unfused`` for a message of ``nbytes``, with rule id and reason."""
        slot = self.workspace.slot_bytes
        sel = self.selector.select(nbytes, self.workspace.world_size, slot)
        if sel.algo not in ("one_shot", "two_shot", ENGINE_ALGO):
            # The all-reduce policy may name kernels the fused pass does not implement (e.g. lamport, a
            # latency-bound choice): one-shot has the same single-barrier latency profile.
            sel = Selection("one_shot", f"fused-{sel.rule_id}", f"{sel.algo} is not fused; one-shot instead")
        if sel.algo == "two_shot" and 2 * nbytes > slot:
            if nbytes <= slot:
                return Selection("one_shot", "fused-two-shot-capacity", "two-shot stages 2x the message; one-shot fits")
            sel = Selection(ENGINE_ALGO, "over-workspace", f"{nbytes} bytes exceed the {slot}-byte workspace")
        if sel.algo == ENGINE_ALGO:
            return Selection("unfused", sel.rule_id, f"{sel.reason}; all-reduce then torch add + RMSNorm")
        return sel

    def _launcher(self, num_warps: int) -> _Launcher:
        launcher = self._launchers.get(num_warps)
        if launcher is None:
            index = self.workspace.device.index or 0
            launcher = _Launcher(_rmk.all_reduce_rmsnorm_kernel, self.use_ptx, index, num_warps=num_warps)
            self._launchers[num_warps] = launcher
        return launcher

    def validate(self, x, residual, weight, rows_dims: int = 2) -> tuple[int, int]:
        """Check shapes/dtypes/devices; return ``(rows, hidden)`` of one rank."""
        dev = self.workspace.device
        for name, t in (("x", x), ("residual", residual), ("weight", weight)):
            _check_2d(name, t, dev, RMSNORM_DTYPES)
        if x.dim() != rows_dims or not x.is_contiguous() or not residual.is_contiguous():
            raise InvalidArgumentError(
                f"x and residual must be contiguous {rows_dims}-d tensors, got x {tuple(x.shape)}"
            )
        if residual.shape != x.shape or residual.dtype != x.dtype or weight.dtype != x.dtype:
            raise ShapeMismatchError(
                f"residual {tuple(residual.shape)} {residual.dtype} and weight {weight.dtype} must match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
        hidden = x.shape[-1]
        if weight.shape != (hidden,) or not weight.is_contiguous():
            raise ShapeMismatchError(f"weight must be a contiguous [{hidden}] tensor, got {tuple(weight.shape)}")
        if not 1 <= hidden <= MAX_HIDDEN:
            raise InvalidArgumentError(f"hidden size must be in 1..{MAX_HIDDEN}, got {hidden}")
        return x.shape[-2], hidden

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, algo: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed, new_residual)`` for this rank's partial sums ``x`` ([rows, hidden]).

        ``new_residual = residual + all_reduce(x)``, ``normed = rmsnorm(new_residual) * weight`` (fp32 math,
        outputs in x's dtype, identical bits on every rank).  ``x`` and ``residual`` are not modified; two
        new tensors are returned.  ``algo``: ``auto``, ``one_shot``, ``two_shot`` or ``unfused``.
        """
        if self.workspace._error_view[0]:
            self.workspace.raise_if_failed()
        if self.workspace.closed:
            raise NotInitializedError("the workspace of the fused all-reduce was closed")
        rows, hidden = self.validate(x, residual, weight)
        nbytes = x.numel() * x.element_size()
        sel = self._pick(algo, nbytes)
        normed = torch.empty_like(x)
        new_residual = torch.empty_like(x)
        if sel.algo == "unfused":
            if self.fallback is None:
                raise WorkspaceExhaustedError(
                    f"{nbytes} bytes do not fit the fused kernels' workspace ({self.workspace.slot_bytes} bytes) "
                    "and no fallback all-reduce is attached"
                )
            reduced = self.fallback(x.clone())
            torch.add(residual, reduced, out=new_residual)
            normed.copy_(rmsnorm_reference(new_residual, weight, eps))
            return normed, new_residual
        if rows:
            self.launch(sel.algo, x, residual, weight, normed, new_residual, rows, hidden, eps)
        return normed, new_residual

    def _pick(self, algo: str, nbytes: int) -> Selection:
        if algo == "auto":
            sel = self.select(nbytes)
        elif algo in ("one_shot", "two_shot", "unfused"):
            need = nbytes * (2 if algo == "two_shot" else 1)
            if algo != "unfused" and need > self.workspace.slot_bytes:
                raise WorkspaceExhaustedError(
                    f"algo={algo} stages {need} bytes, over the {self.workspace.slot_bytes}-byte workspace"
                )
            sel = Selection(algo, "user", f"algo={algo} requested")
        else:
            raise InvalidArgumentError(f"algo must be auto, one_shot, two_shot or unfused, got {algo!r}")
        self.last_selection = sel
        return sel

    def launch(
        self,
        algo,
        x,
        residual,
        weight,
        normed,
        new_residual,
        rows,
        hidden,
        eps,
        table=None,
        ctrl=None,
        virtual_ranks: int = 1,
    ) -> None:
        """Enqueue the kernel on the current stream (``virtual_ranks`` > 1: all ranks in one launch)."""
        ws = self.workspace
        block_h = triton.next_power_of_2(hidden)
        num_warps = 4 if block_h <= 1024 else 8 if block_h <= 4096 else 16
        work = triton.cdiv(rows, ws.world_size) if algo == "two_shot" else rows
        programs = max(1, min(work, self.max_programs))
        table = ws.table if table is None else table
        ctrl = ws.control if ctrl is None else ctrl
        if self.use_ptx:
            ws.enter_stream(torch._C._cuda_getCurrentRawStream(ws.device.index or 0))
        if ws.check:
            w = ws.world_size
            check_args = (
                table, ctrl, ws.rank, _fp.ALGO_CODES[f"rmsnorm_{algo}"], rows * hidden,
                _fp.DTYPE_CODES[str(x.dtype).removeprefix("torch.")], self._timeout,
            )  # fmt: skip
            self._check((1, virtual_ranks), check_args, (w, triton.next_power_of_2(w), self.use_ptx, virtual_ranks > 1))
        args = (
            x,
            residual,
            weight,
            normed,
            new_residual,
            table,
            ctrl,
            rows,
            hidden,
            float(eps),
            ws.rank,
            ws.slot_bytes,
            self._timeout,
        )
        constexprs = (
            ws.world_size,
            triton.next_power_of_2(ws.world_size),
            block_h,
            algo == "two_shot",
            self.use_ptx,
            virtual_ranks > 1,
        )
        self._launcher(num_warps)((programs, virtual_ranks), args, constexprs)

    def check_errors(self) -> None:
        """Raise ``CommTimeoutError`` naming the missing peer if a kernel timed out (no device sync)."""
        self.workspace.raise_if_failed()
