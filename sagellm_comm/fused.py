"""Fused tensor-parallel operations: all-reduce + residual + RMSNorm, and GEMM + all-reduce.

Per rank (one process per GPU, or the Triton interpreter with ranks as processes):

* :class:`FusedAllReduceRMSNorm` ``(workspace)`` -- on the custom all-reduce's own workspace (the kernels
  share its flags, epochs and staging slots; see ``kernels/fused_all_reduce_rmsnorm.py``).
* :class:`GemmAllReduce` ``(gemm_workspace, all_reduce)`` -- the row-parallel linear; paths ``fused`` (tile-level
  overlap, ``kernels/gemm_all_reduce.py``, on a dedicated workspace from :func:`gemm_workspace_bytes`),
  ``chunked`` (cuBLAS GEMM of row chunk i on the caller's stream while chunk i-1 is all-reduced on a side
  stream) and ``sequential`` (cuBLAS GEMM, then one all-reduce); :class:`GemmPathSelector` picks by M.

Group level: :func:`all_reduce_residual_rmsnorm` and :func:`gemm_all_reduce` use the ``custom`` backend's
workspace when it is active on the whole group, and otherwise fall back to ``backend.all_reduce`` plus torch
ops; :func:`last_selection` says which path ran and why.  Virtual ranks (N ranks on one GPU, for tests and
benchmarks): :class:`VirtualFused`.

Stream semantics everywhere: work is enqueued on the caller's current stream (side streams fork from it
and join back, so CUDA-graph capture works); calls return before completion; every rank must make the
same sequence of calls with the same shapes.  Errors: :class:`InvalidArgumentError` for bad inputs,
:class:`CommTimeoutError` (from ``check_errors`` or the next call) naming a peer that never arrived.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton

from kernels import all_reduce as _ark
from kernels import fused_all_reduce_rmsnorm as _rmk
from kernels import gemm_all_reduce as _gk

from .custom_all_reduce import INTERPRETER_SPINS_PER_SECOND, CustomAllReduce
from .errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    NotInitializedError,
    ShapeMismatchError,
    WorkspaceExhaustedError,
)
from .selector import AlgoSelector, Selection
from .workspace import SymmetricWorkspace, local_workspaces

FUSED_DTYPES = (torch.bfloat16, torch.float16)
RMSNORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_PATHS = ("fused", "chunked", "sequential")
MAX_HIDDEN = 16384


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _timeout_ticks(timeout_s: float, use_ptx: bool) -> int:
    if timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be positive, got {timeout_s}")
    return int(timeout_s * 1e9) if use_ptx else max(1, int(timeout_s * INTERPRETER_SPINS_PER_SECOND))


def rmsnorm_reference(new_residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``new_residual * rsqrt(mean(new_residual**2) + eps) * weight`` in fp32, rounded to the input dtype."""
    v = new_residual.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(new_residual.dtype)


class _Launcher:
    """Direct launches of one Triton kernel with cached binaries (the ``KernelLauncher`` pattern).

    The first launch of a specialisation goes through ``kernel[grid](...)``; later ones call the compiled
    binary's launcher with integer pointers.  The key holds what Triton specialises on: tensor dtypes and
    16-byte alignment, integers' divisibility by 16 and equality to 1, and the constexpr values.
    """

    def __init__(self, kernel, use_ptx: bool, device_index: int, **options):
        self.kernel = kernel
        self.use_ptx = use_ptx
        self.device_index = device_index
        self.options = options
        self.cache: dict[tuple, object] = {}

    @staticmethod
    def key(args: Sequence, constexprs: Sequence) -> tuple:
        return tuple(
            (a.dtype, a.data_ptr() % 16 == 0)
            if isinstance(a, torch.Tensor)
            else (a % 16 == 0, a == 1)
            if isinstance(a, int)
            else type(a)
            for a in args
        ) + tuple(constexprs)

    def is_loaded(self, args: Sequence, constexprs: Sequence) -> bool:
        """True when this specialisation's binary is compiled and loaded (its next launch cannot block)."""
        return self.key(args, constexprs) in self.cache

    def __call__(self, grid: tuple[int, int], args: Sequence, constexprs: Sequence) -> None:
        key = self.key(args, constexprs)
        compiled = self.cache.get(key)
        if compiled is not None:
            raw = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
            stream = torch._C._cuda_getCurrentRawStream(self.device_index)
            compiled.run(
                grid[0],
                grid[1],
                1,
                stream,
                compiled.function,
                compiled.packed_metadata,
                None,
                None,
                None,
                *raw,
                *constexprs,
            )
            return
        compiled = self.kernel[grid](*args, *constexprs, **self.options)
        if self.use_ptx and getattr(compiled, "run", None) is not None and hasattr(compiled, "packed_metadata"):
            self.cache[key] = compiled


def _check_2d(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise InvalidArgumentError(f"{name} is on {t.device}, the workspace is on {device}")


# ====================================================================== AR + residual + RMSNorm
class FusedAllReduceRMSNorm:
    """All-reduce + residual add + RMSNorm of one rank, on the custom all-reduce's workspace.

    Args:
        workspace: the rank's :class:`SymmetricWorkspace` (the one its :class:`CustomAllReduce` uses).
        selector: one-shot/two-shot policy by bytes (the all-reduce's default rules when omitted).
        timeout_s: bound of every device-side wait.
        max_programs: programs per launch (rows are spread over them); all must be co-resident.
        fallback: ``fallback(tensor) -> tensor``, an in-place all-reduce used when the fused kernels cannot
            run the call (message over the workspace); without it such calls raise.
    """

    def __init__(
        self,
        workspace: SymmetricWorkspace,
        selector: AlgoSelector | None = None,
        timeout_s: float = 30.0,
        max_programs: int = 32,
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if workspace.device.type == "cpu" and not _interpreting():
            raise BackendNotSupportedError("fused kernels on CPU tensors need TRITON_INTERPRET=1; use CUDA tensors")
        if not 1 <= max_programs <= _ark.MAX_BLOCKS.value:
            raise InvalidArgumentError(f"max_programs must be in 1..{_ark.MAX_BLOCKS.value}, got {max_programs}")
        self.workspace = workspace
        self.selector = selector or AlgoSelector()
        self.max_programs = max_programs
        self.fallback = fallback
        self.use_ptx = workspace.device.type == "cuda"
        self._timeout = _timeout_ticks(timeout_s, self.use_ptx)
        self._launchers: dict[int, _Launcher] = {}
        self.last_selection: Selection | None = None

    def select(self, nbytes: int) -> Selection:
        """``one_shot``, ``two_shot`` or ``unfused`` for a message of ``nbytes``, with rule id and reason."""
        slot = self.workspace.slot_bytes
        sel = self.selector.select(nbytes, self.workspace.world_size, slot)
        if sel.algo not in ("one_shot", "two_shot", "nccl"):
            # The all-reduce policy may name kernels the fused pass does not implement (e.g. lamport, a
            # latency-bound choice): one-shot has the same single-barrier latency profile.
            sel = Selection("one_shot", f"fused-{sel.rule_id}", f"{sel.algo} is not fused; one-shot instead")
        if sel.algo == "two_shot" and 2 * nbytes > slot:
            if nbytes <= slot:
                return Selection("one_shot", "fused-two-shot-capacity", "two-shot stages 2x the message; one-shot fits")
            sel = Selection("nccl", "over-workspace", f"{nbytes} bytes exceed the {slot}-byte workspace")
        if sel.algo == "nccl":
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
        args = (
            x,
            residual,
            weight,
            normed,
            new_residual,
            ws.table if table is None else table,
            ws.control if ctrl is None else ctrl,
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


# ====================================================================== GEMM + all-reduce: policy
@dataclass(frozen=True)
class GemmRule:
    """Use ``path`` when ``min_m <= M <= max_m`` (and the world size is listed, if a list is given)."""

    id: str
    path: str
    min_m: int = 1
    max_m: int | None = None
    world_sizes: tuple[int, ...] | None = None
    reason: str = ""


# Measured on one H100 with virtual ranks (bench/results/fused_h100_virtual.md, docs/fused.md): cuBLAS then our
# all-reduce was the fastest path, or within 1% of it, at every M, N and world size; the fused Triton GEMM alone
# is 1.15-1.6x slower than cuBLAS, which the overlap does not win back, and the chunked pipeline loses to
# contention.  So the default never picks a path measured slower than sequential; a rule override (or
# path="fused") selects the others where real multi-GPU measurements say they pay.
DEFAULT_GEMM_RULES: tuple[GemmRule, ...] = (
    GemmRule(
        "measured-sequential",
        "sequential",
        reason="measured fastest at every M on H100 (virtual ranks): cuBLAS GEMM, then one all-reduce",
    ),
)


class GemmPathSelector:
    """Ordered :class:`GemmRule` list -> :class:`Selection` (``algo`` is the path).  Never touches tensors.

    Capacity overrides every rule: a fused call whose output does not fit the GEMM workspace (or has more
    tiles than the flag area) runs ``chunked`` (rule ``fused-capacity``), and paths without a kernel
    workspace run ``sequential``.
    """

    def __init__(self, rules: Sequence[GemmRule] = DEFAULT_GEMM_RULES):
        for r in rules:
            if r.path not in GEMM_PATHS:
                raise InvalidArgumentError(f"rule {r.id}: path must be one of {GEMM_PATHS}, got {r.path!r}")
        self.rules = tuple(rules)

    def select(self, m: int, world_size: int, fused_fits: bool = True) -> Selection:
        sel = Selection("sequential", "no-rule", f"no rule matches M={m}, world_size={world_size}")
        for r in self.rules:
            if (
                m >= r.min_m
                and (r.max_m is None or m <= r.max_m)
                and (r.world_sizes is None or world_size in r.world_sizes)
            ):
                sel = Selection(r.path, r.id, r.reason or f"rule {r.id}")
                break
        if sel.algo == "fused" and not fused_fits:
            sel = Selection("chunked", "fused-capacity", "output over the GEMM workspace: chunked pipeline instead")
        return sel


# ====================================================================== GEMM + all-reduce: one rank
def gemm_workspace_bytes(max_output_bytes: int) -> int:
    """``slot_bytes`` to ask a :class:`SymmetricWorkspace` for, so it holds two ``[M, N]`` tile buffers of
    ``max_output_bytes`` each plus the tile flags (the region is ``PAD_BYTES + 3 * slot_bytes``)."""
    return triton.cdiv(8 * _gk.MAX_TILES.value + 2 * int(max_output_bytes), 3)


def _gemm_config(m: int, use_ptx: bool) -> dict:
    if not use_ptx:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1}
    if m <= 64:
        return {
            "BLOCK_M": max(16, triton.next_power_of_2(m)),
            "BLOCK_N": 64,
            "BLOCK_K": 128,
            "GROUP_M": 1,
            "num_warps": 4,
            "num_stages": 4,
        }
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


class GemmAllReduce:
    """Row-parallel linear of one rank: ``out = sum over ranks of a @ b (+ bias, added once)``.

    Args:
        gemm_workspace: a dedicated :class:`SymmetricWorkspace` (sized with :func:`gemm_workspace_bytes`)
            for the fused path's tile buffers and flags; None disables the fused path.
        all_reduce: the rank's :class:`CustomAllReduce` for the chunked and sequential paths (or a callable
            ``all_reduce(tensor) -> tensor``, in place, e.g. an engine's).
        selector: path policy (:class:`GemmPathSelector`).
        consumer_programs: programs of the fused path's reduction kernel (default: a quarter of the SMs).
        num_chunks: row chunks of the chunked path.
    """

    def __init__(
        self,
        gemm_workspace: SymmetricWorkspace | None,
        all_reduce: CustomAllReduce | Callable[[torch.Tensor], torch.Tensor],
        selector: GemmPathSelector | None = None,
        timeout_s: float = 30.0,
        consumer_programs: int | None = None,
        num_chunks: int = 4,
        world_size: int | None = None,
        device: torch.device | str | None = None,
    ):
        ws = gemm_workspace
        self.workspace = ws
        self.all_reduce = all_reduce
        self.selector = selector or GemmPathSelector()
        self.world_size = ws.world_size if ws is not None else int(world_size or 0)
        self.device = ws.device if ws is not None else torch.device(device or "cpu")
        self.use_ptx = self.device.type == "cuda"
        if ws is not None and ws.device.type == "cpu" and not _interpreting():
            raise BackendNotSupportedError("fused kernels on CPU tensors need TRITON_INTERPRET=1; use CUDA tensors")
        self._timeout = _timeout_ticks(timeout_s, self.use_ptx)
        if consumer_programs is None:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.use_ptx else 8
            consumer_programs = max(1, min(_ark.MAX_BLOCKS.value, sms // 4))
        self.consumer_programs = consumer_programs
        self.num_chunks = num_chunks
        # Tile buffer of one parity (see kernels/gemm_all_reduce.py): what is left after the flags, halved.
        self.buffer_bytes = 0 if ws is None else (3 * ws.slot_bytes - 8 * _gk.MAX_TILES.value) // 2 // 256 * 256
        index = self.device.index or 0
        self._producers: dict[tuple, _Launcher] = {}
        self._consumer = _Launcher(
            _gk.tile_all_reduce_kernel, self.use_ptx, index, num_warps=4 if not self.use_ptx else 8
        )
        self._side = torch.cuda.Stream(self.device, priority=-1) if self.use_ptx else None
        self.last_selection: Selection | None = None

    # ------------------------------------------------------------------ policy
    def fused_fits(self, m: int, n: int, itemsize: int) -> bool:
        if self.workspace is None:
            return False
        cfg = _gemm_config(m, self.use_ptx)
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        return m * n * itemsize <= self.buffer_bytes and tiles <= _gk.MAX_TILES.value

    def select(self, m: int, n: int, itemsize: int = 2) -> Selection:
        """The path ``path="auto"`` runs for an ``[m, n]`` output, with rule id and reason."""
        return self.selector.select(m, self.world_size, self.fused_fits(m, n, itemsize))

    def _validate(self, a, b, bias, batch: int | None = None) -> tuple[int, int, int]:
        for name, t in (("a", a), ("b", b)):
            _check_2d(name, t, self.device, FUSED_DTYPES)
        dims = 2 if batch is None else 3
        if a.dim() != dims or b.dim() != dims or b.dtype != a.dtype:
            raise ShapeMismatchError(
                f"a and b must be {dims}-d tensors of one dtype, got {tuple(a.shape)} {a.dtype}, "
                f"{tuple(b.shape)} {b.dtype}"
            )
        m, k = a.shape[-2:]
        k2, n = b.shape[-2:]
        if k != k2 or (batch is not None and (a.shape[0] != batch or b.shape[0] != batch)):
            raise ShapeMismatchError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain (a: [M, K], b: [K, N])")
        if bias is not None:
            _check_2d("bias", bias, self.device, FUSED_DTYPES)
            if bias.shape != (n,) or bias.dtype != a.dtype or not bias.is_contiguous():
                raise ShapeMismatchError(f"bias must be a contiguous [{n}] {a.dtype} tensor, got {tuple(bias.shape)}")
        if m == 0 or n == 0 or k == 0:
            raise InvalidArgumentError(f"empty GEMM: M={m}, K={k}, N={n}")
        return m, n, k

    def _pick(self, path: str, m: int, n: int, itemsize: int) -> Selection:
        if path == "auto":
            sel = self.select(m, n, itemsize)
        elif path in GEMM_PATHS:
            if path == "fused" and not self.fused_fits(m, n, itemsize):
                raise WorkspaceExhaustedError(
                    f"fused path: a [{m}, {n}] output needs {m * n * itemsize} bytes (and tiles <= "
                    f"{_gk.MAX_TILES.value}); the GEMM workspace holds {self.buffer_bytes}"
                )
            sel = Selection(path, "user", f"path={path} requested")
        else:
            raise InvalidArgumentError(f"path must be auto or one of {GEMM_PATHS}, got {path!r}")
        self.last_selection = sel
        return sel

    # ------------------------------------------------------------------ the call
    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto"):
        """``[M, N]`` = all-reduce of ``a @ b`` over the ranks (+ ``bias``); a new tensor.

        ``a``: ``[M, K_shard]``, ``b``: ``[K_shard, N]`` (any strides; e.g. ``weight.t()``), bf16 or fp16.
        ``path``: ``auto`` (the selector), ``fused``, ``chunked`` or ``sequential``.
        """
        if self.workspace is not None and self.workspace._error_view[0]:
            self.workspace.raise_if_failed()
        m, n, _ = self._validate(a, b, bias)
        sel = self._pick(path, m, n, a.element_size())
        out = torch.empty((m, n), dtype=a.dtype, device=self.device)
        if sel.algo == "fused":
            self.launch_fused(a, b, bias, out, m, n)
        elif sel.algo == "chunked":
            self._chunked(a, b, bias, out, m)
        else:
            self._matmul(a, b, bias, out)
            self._reduce(out)
        return out

    def _rank(self) -> int:
        if self.workspace is not None:
            return self.workspace.rank
        return getattr(getattr(self.all_reduce, "workspace", None), "rank", 0)

    def _matmul(self, a, b, bias, out) -> None:
        if bias is not None and self._rank() == 0:  # the bias is added once: rank 0's partial carries it
            torch.addmm(bias, a, b, out=out)
        else:
            torch.matmul(a, b, out=out)

    def _reduce(self, t: torch.Tensor) -> None:
        reduce = self.all_reduce.all_reduce if isinstance(self.all_reduce, CustomAllReduce) else self.all_reduce
        reduce(t)

    def _chunked(self, a, b, bias, out, m) -> None:
        chunk = triton.cdiv(m, self.num_chunks)
        if self._side is None:  # interpreter: no streams, same data path
            for start in range(0, m, chunk):
                self._matmul(a[start : start + chunk], b, bias, out[start : start + chunk])
                self._reduce(out[start : start + chunk])
            return
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        for start in range(0, m, chunk):
            rows = slice(start, start + chunk)
            self._matmul(a[rows], b, bias, out[rows])
            done = torch.cuda.Event()
            done.record(current)
            self._side.wait_event(done)
            with torch.cuda.stream(self._side):
                self._reduce(out[rows])
        current.wait_stream(self._side)

    def launch_fused(self, a, b, bias, out, m, n, table=None, ctrl=None, virtual_ranks: int = 1, one_shot=None):
        """Enqueue the fused path: the consumer on the side stream first, then the GEMM on the current one."""
        ws = self.workspace
        cfg = dict(_gemm_config(m, self.use_ptx))
        bm, bn, bk, gm = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        k = a.shape[-1]
        w, wp = ws.world_size, triton.next_power_of_2(ws.world_size)
        table = ws.table if table is None else table
        ctrl = ws.control if ctrl is None else ctrl
        if one_shot is None:
            one_shot = tiles < 2 * w  # tiny outputs: skip the second flag round trip
        consumers = max(1, min(self.consumer_programs, tiles))
        virtual = virtual_ranks > 1
        sa = a.stride()
        sb = b.stride()
        producer_args = (
            a,
            b,
            table,
            ctrl,
            m,
            n,
            k,
            sa[0] if virtual else 0,
            sa[-2],
            sa[-1],
            sb[0] if virtual else 0,
            sb[-2],
            sb[-1],
            ws.rank,
            self.buffer_bytes,
        )
        producer_constexprs = (w, wp, bm, bn, bk, gm, self.use_ptx, virtual)
        pkey = tuple(sorted(cfg.items()))
        producer = self._producers.get(pkey)
        if producer is None:
            producer = _Launcher(_gk.gemm_publish_kernel, self.use_ptx, self.device.index or 0, **cfg)
            self._producers[pkey] = producer
        consumer_args = (
            out,
            out if bias is None else bias,
            table,
            ctrl,
            m,
            n,
            ws.rank,
            self.buffer_bytes,
            self._timeout,
        )
        sub_m = min(bm, max(16, 8192 // bn))  # rows per slice: W slices of 8K elements in flight per program
        consumer_constexprs = (w, wp, bm, bn, gm, sub_m, bool(one_shot), bias is not None, self.use_ptx, virtual)
        loaded = producer.is_loaded(producer_args, producer_constexprs) and self._consumer.is_loaded(
            consumer_args, consumer_constexprs
        )
        producer_grid = (tiles * virtual_ranks, 1)  # virtual ranks interleaved (see gemm_publish_kernel)
        if self._side is None or not loaded:
            # Producer first, then the consumer, on the current stream (correct, no overlap).  The interpreter
            # runs one launch to completion before the next; on GPUs the first launch of a specialisation
            # compiles and loads a module, which may wait for the device to go idle -- never while a consumer
            # spins for tiles of a producer that is not launched yet.
            producer(producer_grid, producer_args, producer_constexprs)
            self._consumer((consumers, virtual_ranks), consumer_args, consumer_constexprs)
            return
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            # Launched first: its consumers * ranks programs are resident before the GEMM fills the GPU, and
            # the GEMM never waits, so it always has the remaining SMs (no co-residency deadlock).
            self._consumer((consumers, virtual_ranks), consumer_args, consumer_constexprs)
        producer(producer_grid, producer_args, producer_constexprs)
        current.wait_stream(self._side)
        out.record_stream(self._side)

    def check_errors(self) -> None:
        if self.workspace is not None:
            self.workspace.raise_if_failed()


# ====================================================================== virtual ranks (one GPU)
class VirtualFused:
    """The fused operations for the ``world_size`` virtual ranks of a :class:`VirtualRankGroup`, each call
    one launch per kernel for all ranks (grid axis 1 = rank), tensors stacked as ``[world_size, ...]``.

    Args:
        group: the virtual ranks (their all-reduce workspaces carry the AR + RMSNorm kernel).
        gemm_max_output_bytes: per-rank capacity of the fused GEMM's tile buffer (a dedicated workspace).
        consumer_programs: programs per rank of the fused GEMM's reduction (default: SMs / (4 * ranks)).
    """

    def __init__(
        self,
        group,
        gemm_max_output_bytes: int = 64 << 20,
        consumer_programs: int | None = None,
        selector: GemmPathSelector | None = None,
        num_chunks: int = 4,
    ):
        self.group = group
        self.world_size = w = group.world_size
        self.device = group.device
        self.rmsnorm = FusedAllReduceRMSNorm(group.workspaces[0], max_programs=group.max_programs)
        self._ar_table = torch.cat([ws.table for ws in group.workspaces])
        self._ar_ctrl = group.workspaces[0].control  # row 0 of every rank's [world_size, CTRL_WORDS] block
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._overlap_programs = max(1, sms // (4 * w))
        self.gemm_workspaces = local_workspaces(w, gemm_workspace_bytes(gemm_max_output_bytes), self.device)
        if consumer_programs is None:
            consumer_programs = self._overlap_programs
        self.gemm = GemmAllReduce(
            self.gemm_workspaces[0],
            self._all_reduce_stacked,
            selector=selector,
            consumer_programs=consumer_programs,
            num_chunks=num_chunks,
        )
        self._gemm_table = torch.cat([ws.table for ws in self.gemm_workspaces])
        self._gemm_ctrl = self.gemm_workspaces[0].control

    def _all_reduce_stacked(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_stacked(t.view(self.world_size, -1))

    def _all_reduce_beside_gemm(self, t: torch.Tensor) -> None:
        """The chunked path's all-reduce: few programs, so that it becomes resident while a GEMM holds SMs."""
        flat = t.view(self.world_size, -1)
        numel, itemsize = flat.shape[1], flat.element_size()
        algo = self.group.select(numel * itemsize).algo
        if algo not in ("one_shot", "two_shot"):
            self.group.all_reduce_stacked(flat)  # raises the group's typed error for what it cannot run
            return
        self.group.ranks[0]._launcher.launch(
            algo, flat, flat, numel, itemsize, False, self._ar_table, self._ar_ctrl, 0, self.world_size,
            self._overlap_programs, virtual=True,
        )  # fmt: skip

    def all_reduce_residual_rmsnorm(self, x, residual, weight, eps: float = 1e-6, algo: str = "auto"):
        """``x``, ``residual``: ``[world_size, rows, hidden]`` (row block r = rank r); ``weight``: ``[hidden]``.

        Returns ``(normed, new_residual)``, both ``[world_size, rows, hidden]``, one launch.
        """
        if x.dim() != 3 or x.shape[0] != self.world_size:
            raise InvalidArgumentError(f"x must be [world_size={self.world_size}, rows, hidden], got {tuple(x.shape)}")
        self.group.check_errors()
        rows, hidden = self.rmsnorm.validate(x, residual, weight, rows_dims=3)
        sel = self.rmsnorm._pick(algo, x[0].numel() * x.element_size())
        if sel.algo == "unfused":
            raise WorkspaceExhaustedError(f"{x[0].numel() * x.element_size()} bytes per rank exceed the workspace")
        normed, new_residual = torch.empty_like(x), torch.empty_like(x)
        if rows:
            self.rmsnorm.launch(
                sel.algo,
                x,
                residual,
                weight,
                normed,
                new_residual,
                rows,
                hidden,
                eps,
                table=self._ar_table,
                ctrl=self._ar_ctrl,
                virtual_ranks=self.world_size,
            )
        return normed, new_residual

    def gemm_all_reduce(self, a, b, bias=None, path: str = "auto", one_shot: bool | None = None):
        """``a``: ``[world_size, M, K]``, ``b``: ``[world_size, K, N]`` -> ``[world_size, M, N]``, every block the
        sum over ranks of ``a[r] @ b[r]`` (+ ``bias`` once)."""
        g = self.gemm
        for ws in self.gemm_workspaces:
            ws.raise_if_failed()
        m, n, _ = g._validate(a, b, bias, batch=self.world_size)
        sel = g._pick(path, m, n, a.element_size())
        w = self.world_size
        out = torch.empty((w, m, n), dtype=a.dtype, device=self.device)
        if sel.algo == "fused":
            g.launch_fused(
                a, b, bias, out, m, n, table=self._gemm_table, ctrl=self._gemm_ctrl, virtual_ranks=w, one_shot=one_shot
            )
        elif sel.algo == "sequential":
            self._bmm(a, b, bias, out)
            self._all_reduce_stacked(out)
        else:
            chunk = triton.cdiv(m, g.num_chunks)
            stage = torch.empty((g.num_chunks, w * chunk * n), dtype=a.dtype, device=self.device)
            current = torch.cuda.current_stream(self.device)
            g._side.wait_stream(current)
            for i, start in enumerate(range(0, m, chunk)):
                rows = slice(start, start + chunk)
                part = stage[i, : w * min(chunk, m - start) * n].view(w, -1, n)  # contiguous per chunk
                self._bmm(a[:, rows], b, bias, part)
                done = torch.cuda.Event()
                done.record(current)
                g._side.wait_event(done)
                with torch.cuda.stream(g._side):
                    self._all_reduce_beside_gemm(part)
                    out[:, rows].copy_(part)  # virtual ranks only: rank blocks are not contiguous per chunk
            current.wait_stream(g._side)
            stage.record_stream(g._side)
        return out

    @staticmethod
    def _bmm(a, b, bias, out) -> None:
        torch.bmm(a, b, out=out)
        if bias is not None:
            out[0] += bias  # once: rank 0's partial carries the bias

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for ws in self.gemm_workspaces:
            ws.close()


# ====================================================================== group level
class _GroupState:
    def __init__(self):
        self.rmsnorm: FusedAllReduceRMSNorm | None = None
        self.gemm: GemmAllReduce | None = None
        self.last: Selection | None = None


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _group_state(group):
    from .group import _resolve

    g = _resolve(group)
    backend = g.backend
    state = _STATE.get(backend)
    if state is None:
        state = _STATE[backend] = _GroupState()
    car = getattr(backend, "custom", None)
    if car is None:
        why = getattr(backend, "custom_reason", None) or f"backend {backend.name!r} has no custom workspace"
        return g, backend, state, None, why
    if g.handle is not None:
        return g, backend, state, None, "sub-group: the custom workspace spans the whole world only"
    return g, backend, state, car, ""


def last_selection(group=None) -> Selection | None:
    """What the last group-level fused call on ``group``'s backend ran (path, rule id, reason)."""
    from .group import _resolve

    state = _STATE.get(_resolve(group).backend)
    return None if state is None else state.last


def all_reduce_residual_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``new_residual = residual + all_reduce(x)``, ``normed = rmsnorm(new_residual)
    * weight`` over ``group`` (default group if None).

    ``x``, ``residual``: ``[tokens, hidden]``; ``weight``: ``[hidden]``; one dtype.  With the ``custom`` backend
    active on the whole group, one fused kernel (:class:`FusedAllReduceRMSNorm`); otherwise the group's
    all-reduce then torch add and RMSNorm (fp32 math), the reason recorded in :func:`last_selection`.
    Enqueued on the current stream; inputs are not modified.
    """
    g, backend, state, car, why = _group_state(group)
    if car is not None and x.dtype in RMSNORM_DTYPES:
        if state.rmsnorm is None:
            state.rmsnorm = FusedAllReduceRMSNorm(
                car.workspace,
                selector=car.selector,
                timeout_s=car.timeout_s,
                max_programs=car.max_programs,
                fallback=car.fallback,
            )
        out = state.rmsnorm(x, residual, weight, eps)
        state.last = state.rmsnorm.last_selection
        return out
    if car is not None:
        why = f"dtype {x.dtype} is not fused"
    if residual.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ShapeMismatchError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}")
    reduced = x.clone()
    g.all_reduce(reduced)
    new_residual = residual + reduced
    state.last = Selection("unfused", "custom-unavailable", f"{why}; all-reduce then torch add + RMSNorm")
    return rmsnorm_reference(new_residual, weight, eps), new_residual


def gemm_all_reduce(
    a: torch.Tensor, b: torch.Tensor, group=None, bias: torch.Tensor | None = None, path: str = "auto"
) -> torch.Tensor:
    """Row-parallel linear over ``group``: ``sum over ranks of a @ b`` (+ ``bias`` once), ``[M, N]``.

    ``a``: ``[M, K_shard]``, ``b``: ``[K_shard, N]`` of this rank.  With the ``custom`` backend active on the
    whole group, :class:`GemmAllReduce` (its dedicated GEMM workspace is set up collectively on the first
    call); otherwise ``torch.matmul`` then the group's all-reduce (reason in :func:`last_selection`).
    """
    g, backend, state, car, why = _group_state(group)
    if car is not None and a.dtype in FUSED_DTYPES:
        if state.gemm is None:
            ws = SymmetricWorkspace.rendezvous(
                backend.rank,
                backend.world_size,
                gemm_workspace_bytes(backend.max_bytes),
                backend.device,
                backend._exchange,
            )
            state.gemm = GemmAllReduce(
                ws, car, timeout_s=car.timeout_s, consumer_programs=2 if ws.device.type == "cpu" else None
            )
        out = state.gemm(a, b, bias, path=path)
        state.last = state.gemm.last_selection
        return out
    if car is not None:
        why = f"dtype {a.dtype} is not fused"
    out = torch.matmul(a, b)
    if bias is not None and g.rank == 0:
        out += bias
    g.all_reduce(out)
    state.last = Selection("sequential", "custom-unavailable", f"{why}; matmul then all-reduce")
    return out
