"""All-reduce + residual add + RMSNorm (+ FP8) in one kernel (``kernels/fused_all_reduce_rmsnorm.py``), per rank."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

from sagellm_comm.kernels import fused_all_reduce_rmsnorm as _rmk
from sagellm_comm.selector import AUTO, LAMPORT, ONE_SHOT

from ..arguments import check_finite
from ..custom_all_reduce import (
    MAX_KERNEL_ELEMENTS,
    CustomAllReduce,
    check_kernel_elements,
    fingerprint_launcher,
    lamport_tile_warps,
    launch_fingerprint_check,
    pdl_enabled,
    pdl_for_launch,
)
from ..errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    WorkspaceExhaustedError,
)
from ..launch import Launcher as _Launcher
from ..launch import interpreting as _interpreting
from ..launch import timeout_ticks as _timeout_ticks
from ..selector import (
    ENGINE_ALGO,
    FOLLOW_ALL_REDUCE,
    RMSNORM_PATHS,
    TWO_SHOT,
    UNFUSED_PATH,
    AlgoSelector,
    Selection,
    policy_from,
)
from ..workspace import SymmetricWorkspace, lamport_offset
from ._common import MAX_HIDDEN, check_rmsnorm_inputs, engine_all_reduced
from .fp8 import FP8_DTYPE, QUANT_CODES, check_quant, scales_shape, unfused_tail
from .rmsnorm_policy import FusionPolicy, fusion_policy_from

# The Lamport form splits a row over programs down to segments of this many elements (the plain Lamport kernel's
# smallest tile), at most MAX_SPLIT programs a row, and only while the rows' programs fill at most half the grid.
MIN_SEGMENT = 256
MAX_SPLIT = 8


def row_split(rows: int, hidden: int, programs: int, group: int = _rmk.FP8_GROUP.value) -> int:
    """Programs per row of the fused Lamport kernel (its ``SPLIT``): the largest power of two ``s`` with ``hidden``
    cut into whole ``group``-element groups (``hidden % (group * s) == 0``, so a group's FP8 scale stays inside one
    program), segments of at least ``MIN_SEGMENT`` elements, ``s <= MAX_SPLIT`` and the rows' programs filling at
    most half the grid (``rows * s <= programs // 2``; the kernel needs every row held at once); 1 (a program per
    row) when none is larger.

    The caps follow a profile on the H200 (virtual ranks W = 2-8, 1-4 tokens of 4096 and 8192): 4-8 programs a row
    were the fastest at most shapes, up to 2.9 us ahead of 16-32 (W = 8, 2 tokens of 8192, per-token FP8); 16
    were ahead at W = 4 with 1-2 tokens of 8192 (0.1-1.0 us)."""
    split = 1
    while (
        split * 2 <= MAX_SPLIT
        and rows * split * 2 <= programs // 2
        and hidden % (group * split * 2) == 0
        and hidden // (split * 2) >= MIN_SEGMENT
    ):
        split *= 2
    return split


def lamport_launch(rows: int, hidden: int, programs: int, use_ptx: bool, pdl: bool, launch_ranks: int,
                   ranks_on_device: int) -> tuple[int, bool]:  # fmt: skip
    """``(split, pdl)`` of a fused Lamport launch: programs per row (:func:`row_split` on a GPU; 1 under the
    interpreter, which runs programs one after another, so a split row would wait forever) and whether it uses
    programmatic dependent launch (``pdl``: :func:`~sagellm_comm.custom_all_reduce.pdl_enabled`).

    A split row's programs wait for each other inside the launch (the row exchange), and such launches run
    without PDL: with it, 4 virtual ranks on an H100 stalled about once in a few hundred calls of 3-4 split rows
    (hidden 5120-8192) for 60 s and returned wrong values, raising nothing; without it 32,000 calls of the same
    shapes ran in time, each bit-identical to the first.  An unsplit launch keeps the rule of the plain Lamport
    kernel (:func:`~sagellm_comm.custom_all_reduce.pdl_for_launch`)."""
    split = row_split(rows, hidden, programs) if use_ptx else 1
    return split, split == 1 and pdl_for_launch(pdl, launch_ranks, ranks_on_device)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class FusedAllReduceRMSNorm:
    """All-reduce + residual add + RMSNorm (+ FP8 quantisation) of one rank, on the custom all-reduce's workspace.

    Args:
        workspace: the rank's :class:`SymmetricWorkspace` (the one its :class:`CustomAllReduce` uses).
        selector: the all-reduce's algorithm policy by bytes (an :class:`AlgoSelector`, a policy file, or None:
            ``all_reduce``'s, whatever it is at each call, else the all-reduce's default rules); a fusion rule with
            path ``all_reduce_policy`` runs the fused form of the kernel it picks.
        timeout_s: bound of every device-side wait.
        max_programs: programs per launch (rows are spread over them); all must be co-resident.  Agreed by
            the group with the workspace (``workspace.max_programs``); any other value raises.
        fallback: ``fallback(tensor) -> tensor``, an in-place all-reduce (the engine's) used when the fused kernels
            do not run the call and ``all_reduce`` cannot either; without it such calls raise.
        policy: the fusion rules (a :class:`FusionPolicy`, a path read by :meth:`FusionPolicy.from_file`, or None:
            :data:`DEFAULT_FUSION_RULES`).  A ``selector`` or ``policy`` of another type raises
            ``InvalidArgumentError`` before anything is made.
        all_reduce: the :class:`~sagellm_comm.custom_all_reduce.CustomAllReduce` on the same workspace: a call the
            policy runs unfused (a rule, or ``algo="unfused"``) sums ``x`` on its kernels, the algorithm its own
            policy picks for the message, as the unfused chain the fusion rules are measured against does; where
            that policy picks the engine or the message is over the workspace, ``fallback`` runs.
    """

    def __init__(
        self,
        workspace: SymmetricWorkspace,
        selector: AlgoSelector | str | os.PathLike | None = None,
        timeout_s: float = 30.0,
        max_programs: int | None = None,
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
        policy: FusionPolicy | str | os.PathLike | None = None,
        all_reduce: CustomAllReduce | None = None,
    ):
        # Before anything: a policy of another type would fail untyped in the first call's decision.
        if selector is not None:
            selector = policy_from(selector, AlgoSelector, "selector must be an AlgoSelector, a policy file or None")
        policy = fusion_policy_from(policy)
        if workspace.device.type == "cpu" and not _interpreting():
            raise BackendNotSupportedError("fused kernels on CPU tensors need TRITON_INTERPRET=1; use CUDA tensors")
        if max_programs is not None and max_programs != workspace.max_programs:
            raise InvalidArgumentError(
                f"max_programs={max_programs} differs from the {workspace.max_programs} programs this workspace's "
                "group agreed on (every rank must launch the same grid)"
            )
        max_programs = workspace.max_programs
        self.workspace = workspace
        self._selector = selector
        self._default_selector = AlgoSelector()
        self.policy = policy
        self.max_programs = max_programs
        if all_reduce is not None and all_reduce.workspace is not workspace:
            raise InvalidArgumentError("all_reduce must be the CustomAllReduce on this workspace")
        self.fallback = fallback
        self.all_reduce = all_reduce
        self.use_ptx = workspace.device.type == "cuda"
        self.pdl = pdl_enabled(workspace.device, workspace.config)  # the Lamport form, as the plain Lamport kernel
        self._timeout = _timeout_ticks(timeout_s, self.use_ptx)
        self._launchers: dict[tuple[bool, int], _Launcher] = {}
        self._check = fingerprint_launcher(self.use_ptx, workspace.device.index or 0)
        self.last_selection: Selection | None = None

    # ------------------------------------------------------------------ policy
    @property
    def selector(self) -> AlgoSelector:
        """The all-reduce policy a fusion rule ``all_reduce_policy`` follows: the one given, else ``all_reduce``'s
        as it is now (a ``car.selector = ...`` set later is followed, as the unfused chain's all-reduce follows it),
        else the default rules."""
        if self._selector is not None:
            return self._selector
        return self._default_selector if self.all_reduce is None else self.all_reduce.selector

    @selector.setter
    def selector(self, selector: AlgoSelector) -> None:
        if not isinstance(selector, AlgoSelector):
            raise InvalidArgumentError(f"selector must be an AlgoSelector, got {selector!r}")
        self._selector = selector

    def select(
        self, nbytes: int, quant: str | None = None, rows: int | None = None, hidden: int | None = None,
        itemsize: int = 2,
    ) -> Selection:  # fmt: skip
        """``one_shot``, ``two_shot``, ``lamport`` or ``unfused`` for ``rows`` x ``hidden`` elements (``nbytes`` in
        all; one row when the shape is not given) in mode ``quant``, with rule id and reason."""
        if hidden is None:
            rows, hidden = 1, max(1, nbytes // itemsize)
        rows = 1 if rows is None else rows
        rule = self.policy.select(rows, hidden, self.workspace.world_size, quant)
        sel = rule
        if rule.algo == FOLLOW_ALL_REDUCE:
            sel = self.selector.select(nbytes, self.workspace.world_size, self.workspace.slot_bytes)
            if sel.algo == ENGINE_ALGO:
                return Selection(UNFUSED_PATH, sel.rule_id, f"{sel.reason}; all-reduce then torch ops")
        if sel.algo == UNFUSED_PATH:
            return sel
        return self._fit(sel, nbytes, rows, hidden, itemsize, quant)

    def _fit(self, sel: Selection, nbytes: int, rows: int, hidden: int, itemsize: int, quant) -> Selection:
        """``sel`` where its kernel takes the message, else the next one that does (rule id says why)."""
        if hidden > MAX_HIDDEN:  # a row is held by one program (or split rows' segments): no kernel takes it
            return Selection(
                UNFUSED_PATH, "fused-max-hidden",
                f"{sel.reason}; but hidden {hidden} exceeds the fused kernels' {MAX_HIDDEN}, so all-reduce then "
                "torch add + RMSNorm run",
            )  # fmt: skip
        if rows * hidden > MAX_KERNEL_ELEMENTS:  # the kernels' row offsets (row * hidden) are int32
            return Selection(
                UNFUSED_PATH, "fused-over-int32-index",
                f"{sel.reason}; but {rows * hidden} elements exceed the fused kernels' {MAX_KERNEL_ELEMENTS} "
                "(int32 element offsets), so all-reduce then torch add + RMSNorm run",
            )  # fmt: skip
        slot = self.workspace.slot_bytes
        if sel.algo == LAMPORT and rows * hidden > self.workspace.lamport_capacity:
            sel = Selection(
                ONE_SHOT, f"{sel.rule_id}+lamport-capacity",
                f"{sel.reason}; but {rows * hidden} elements exceed the Lamport buffers "
                f"({self.workspace.lamport_capacity}), so one-shot runs",
            )  # fmt: skip
        staged = _rmk.stage_bytes(rows, hidden, itemsize, QUANT_CODES[quant]) if sel.algo == TWO_SHOT else 0
        if staged > slot:  # the rule's choice, and why it does not run
            sel = Selection(
                ONE_SHOT, "fused-two-shot-capacity",
                f"{sel.reason}; but two-shot stages {staged} bytes (its outputs too), over the {slot}-byte workspace, "
                "so one-shot runs",
            )  # fmt: skip
        if sel.algo == ONE_SHOT and nbytes > slot:
            sel = Selection(UNFUSED_PATH, "over-workspace", f"{nbytes} bytes exceed the {slot}-byte workspace")
        return sel

    def pick(self, algo: str, x: torch.Tensor, rows: int, hidden: int, quant: str | None) -> Selection:
        nbytes = x.numel() * x.element_size()
        if algo == AUTO:
            sel = self.select(nbytes, quant, rows, hidden, x.element_size())
        elif algo in RMSNORM_PATHS:
            sel = Selection(algo, "user", f"algo={algo} requested")
            if algo != UNFUSED_PATH and hidden > MAX_HIDDEN:
                raise InvalidArgumentError(
                    f"algo={algo}: the fused kernels take hidden up to {MAX_HIDDEN}, got {hidden}; use algo='auto' "
                    "or 'unfused' (all-reduce then torch add + RMSNorm)"
                )
            if algo != UNFUSED_PATH:
                check_kernel_elements(rows * hidden, f"algo={algo}: a rank's [rows, hidden] block")
            if algo != UNFUSED_PATH and self._fit(sel, nbytes, rows, hidden, x.element_size(), quant) != sel:
                if algo == LAMPORT:
                    need = f"takes at most {self.workspace.lamport_capacity} elements, got {rows * hidden}"
                else:
                    staged = _rmk.stage_bytes(rows, hidden, x.element_size(), QUANT_CODES[quant])
                    need = f"stages {staged if algo == TWO_SHOT else nbytes} bytes"
                raise WorkspaceExhaustedError(
                    f"algo={algo} {need} (quant={quant}), over this workspace ({self.workspace.slot_bytes}-byte "
                    "slots); use algo='auto'"
                )
        else:
            raise InvalidArgumentError(f"algo must be auto or one of {RMSNORM_PATHS}, got {algo!r}")
        self.last_selection = sel
        return sel

    # ------------------------------------------------------------------ the call
    def validate(self, x, residual, weight, rows_dims: int = 2) -> tuple[int, int]:
        """Check shapes/dtypes/devices (:func:`check_rmsnorm_inputs` on this workspace's device); return
        ``(rows, hidden)`` of one rank."""
        return check_rmsnorm_inputs(x, residual, weight, self.workspace.device, rows_dims)

    @staticmethod
    def new_outputs(x: torch.Tensor, quant: str | None, scale: torch.Tensor | None):
        """``(out, scales, new_residual)`` for ``x`` (``[..., rows, hidden]``): ``out`` in x's dtype or FP8; ``scales``
        the caller's static scale, new dynamic scales (``[..., rows, 1 or hidden // 128]``), or None."""
        new_residual = torch.empty_like(x)
        if quant is None:
            return torch.empty_like(x), None, new_residual
        q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        if quant == "fp8":
            return q, scale, new_residual
        shape = (*x.shape[:-2], *scales_shape(x.shape[-2], x.shape[-1], quant))
        return q, torch.empty(shape, dtype=torch.float32, device=x.device), new_residual

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float = 1e-6,
        algo: str = "auto",
        quant: str | None = None,
        scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """For this rank's partial sums ``x`` ([rows, hidden]): ``(normed, new_residual)``, or with ``quant``
        ``(q, scale(s), new_residual)`` (``sagellm_comm/fused/fp8.py``).

        ``new_residual = residual + all_reduce(x)``, ``normed = rmsnorm(new_residual) * weight`` (fp32 math,
        outputs in x's dtype, identical bits on every rank).  ``x`` and ``residual`` are not modified; new tensors
        are returned.  ``algo``: ``auto``, ``one_shot``, ``two_shot``, ``lamport`` or ``unfused``.
        """
        if self.workspace.error_view[0]:
            self.workspace.raise_if_failed()
        if self.workspace.closed:
            raise self.workspace.closed_error("the workspace of the fused all-reduce")
        check_quant(quant, scale, x)
        eps = check_finite(eps, "eps", 0.0)
        # Any hidden size: over the kernels' MAX_HIDDEN the call runs unfused (pick says so, or refuses a kernel).
        rows, hidden = check_rmsnorm_inputs(x, residual, weight, self.workspace.device, max_hidden=None)
        sel = self.pick(algo, x, rows, hidden, quant)
        if sel.algo == UNFUSED_PATH:
            return unfused_tail(self._reduced(x, sel), residual, weight, eps, quant, scale)
        out, scales, new_residual = self.new_outputs(x, quant, scale)
        if rows:
            self.launch(sel.algo, x, residual, weight, out, scales, new_residual, rows, hidden, eps, quant)
        return (out, new_residual) if quant is None else (out, scales, new_residual)

    def _reduced(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        """``x`` summed over ranks for the unfused chain (a new tensor, the fp32 sum rounded once): on the
        all-reduce's kernels where its policy runs one for the message, else on the engine (``fallback``)."""
        car = self.all_reduce
        nbytes = x.numel() * x.element_size()
        if car is not None and nbytes <= self.workspace.slot_bytes:
            algo = car.resolve_algo(AUTO, x.numel(), nbytes)
            if algo != ENGINE_ALGO:
                if car.workspace.is_registered(x):  # read in place, and two-shot reduces there: x is not ours
                    return car.all_reduce(x.clone(), algo=algo)
                return car.all_reduce(x, out=torch.empty_like(x), algo=algo)
        if self.fallback is None:
            error = WorkspaceExhaustedError if sel.rule_id == "over-workspace" else BackendNotSupportedError
            raise error(f"{sel.reason}: the call runs unfused, and no fallback all-reduce is attached here")
        return engine_all_reduced(x, self.fallback, self.workspace.world_size)

    def _launcher(self, lamport: bool, num_warps: int, pdl: bool) -> _Launcher:
        launcher = self._launchers.get((lamport, num_warps, pdl))
        if launcher is None:
            index = self.workspace.device.index or 0
            if lamport:
                options = {"launch_pdl": True} if pdl else {}
                kernel = _rmk.lamport_all_reduce_rmsnorm_kernel
            else:
                options, kernel = {}, _rmk.all_reduce_rmsnorm_kernel
            launcher = _Launcher(kernel, self.use_ptx, index, num_warps=num_warps, **options)
            self._launchers[(lamport, num_warps, pdl)] = launcher
        return launcher

    def launch(
        self,
        algo,
        x,
        residual,
        weight,
        out,
        scales,
        new_residual,
        rows,
        hidden,
        eps,
        quant=None,
        table=None,
        ctrl=None,
        virtual_ranks: int = 1,
    ) -> None:
        """Enqueue the kernel of ``algo`` on the current stream (``virtual_ranks`` > 1: all ranks in one launch).

        ``scales``: the static scale, the dynamic scales' output, or None (no quantisation)."""
        ws = self.workspace
        w = ws.world_size
        lamport = algo == LAMPORT
        split, pdl = 1, False
        if lamport:
            programs = self.max_programs  # every Lamport launch on a workspace uses the same grid
            split, pdl = lamport_launch(rows, hidden, programs, self.use_ptx, self.pdl, virtual_ranks,
                                        ws.ranks_on_device)  # fmt: skip
        else:
            programs = max(1, min(triton.cdiv(rows, w) if algo == TWO_SHOT else rows, self.max_programs))
        block_h = triton.next_power_of_2(hidden // split)
        # A split row's segment is a plain Lamport tile: its warps as the plain kernel's (1024-element segments with
        # 4 warps were the slow points of the FP8 record before).
        num_warps = _warps(block_h) if split == 1 else lamport_tile_warps(block_h)
        table = ws.table if table is None else table
        ctrl = ws.control if ctrl is None else ctrl
        if self.use_ptx:
            ws.enter_stream(torch._C._cuda_getCurrentRawStream(ws.device.index or 0))
        named = dict(
            inp=x, residual=residual, weight=weight, out=out, scales=weight if scales is None else scales,
            residual_out=new_residual, table=table, ctrl=ctrl, num_rows=rows, hidden=hidden, eps=float(eps),
            rank=ws.rank, timeout=self._timeout, W=w, WP=triton.next_power_of_2(w), BLOCK_H=block_h,
            QUANT=QUANT_CODES[quant], USE_PTX=self.use_ptx, VIRTUAL=virtual_ranks > 1,
        )  # fmt: skip
        if lamport:
            named.update(lamport_offset=lamport_offset(ws.slot_bytes), cap=ws.lamport_capacity, PDL=pdl,
                         SPLIT=split)  # fmt: skip
        else:
            named.update(slot_bytes=ws.slot_bytes, TWO_SHOT=algo == TWO_SHOT)
        launcher = self._launcher(lamport, num_warps, pdl)
        values = launcher.bind(**named)
        if ws.check:
            # Loaded before the fingerprint kernel can spin: loading a module may wait for the device to go idle,
            # and the peers (other virtual ranks of this thread) have not launched their checks yet.
            launcher.preload(values)
            name = f"rmsnorm_{algo}" if quant is None else f"rmsnorm_{algo}_{quant}"
            launch_fingerprint_check(
                self._check, table, ctrl, ws.rank, w, name, (rows, hidden), x.dtype, self._timeout, virtual_ranks
            )
        launcher((programs, virtual_ranks), values)

    def check_errors(self) -> None:
        """Raise ``CommTimeoutError`` naming the missing peer if a kernel timed out (no device sync)."""
        self.workspace.raise_if_failed()
