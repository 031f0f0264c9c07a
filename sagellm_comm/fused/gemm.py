"""GEMM + all-reduce, the row-parallel linear: its path policy and the per-rank fused / chunked / sequential paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass

import torch
import triton

from sagellm_comm.kernels import all_reduce as _ark
from sagellm_comm.kernels import copy_engine as _ce
from sagellm_comm.kernels import fingerprint as _fp
from sagellm_comm.kernels import gemm_all_reduce as _gk

from ..custom_all_reduce import CustomAllReduce
from ..errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    ShapeMismatchError,
    WorkspaceExhaustedError,
)
from ..launch import Launcher as _Launcher
from ..launch import interpreting as _interpreting
from ..launch import timeout_ticks as _timeout_ticks
from ..selector import Selection
from ..workspace import SymmetricWorkspace, _tensor_at
from ._common import FUSED_DTYPES, GEMM_PATHS, _check_2d


@dataclass(frozen=True)
class GemmRule:
    """Use ``path`` when ``min_m <= M <= max_m``, the ``[M, N]`` output has at least ``min_bytes`` bytes, and
    the world size is listed (if a list is given)."""

    id: str
    path: str
    min_m: int = 1
    max_m: int | None = None
    world_sizes: tuple[int, ...] | None = None
    reason: str = ""
    min_bytes: int = 0


# Measured on one H100 with virtual ranks (bench/results/fused_h100_virtual.md, docs/fused.md): cuBLAS then our
# all-reduce was the fastest path, or within 1% of it, at every M, N and world size; the fused Triton GEMM alone
# is 1.15-1.6x slower than cuBLAS, which the overlap does not win back, and the chunked pipeline loses to
# contention.  So the default never picks a path measured slower than sequential; a rule override (or
# path="fused") selects the others where real multi-GPU measurements say they pay.
DEFAULT_GEMM_RULES: tuple[GemmRule, ...] = (
    GemmRule(
        "measured-copy-engine-2",
        "copy_engine",
        min_m=2048,
        world_sizes=(2,),
        min_bytes=32 << 20,
        reason="measured on 2 x H100 (NVLink): 1.14-1.30x faster than cuBLAS then our all-reduce at M >= 2048 with "
        "outputs >= 32 MB (bench/results/2xh100/fused_2xh100_077d3da.md)",
    ),
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

    def select(
        self,
        m: int,
        world_size: int,
        fused_fits: bool = True,
        output_bytes: int = 0,
        copy_engine_fits: bool = True,
    ) -> Selection:
        sel = Selection("sequential", "no-rule", f"no rule matches M={m}, world_size={world_size}")
        for r in self.rules:
            if (
                m >= r.min_m
                and (r.max_m is None or m <= r.max_m)
                and (r.world_sizes is None or world_size in r.world_sizes)
                and output_bytes >= r.min_bytes
            ):
                sel = Selection(r.path, r.id, r.reason or f"rule {r.id}")
                break
        if sel.algo == "fused" and not fused_fits:
            sel = Selection("chunked", "fused-capacity", "output over the GEMM workspace: chunked pipeline instead")
        if sel.algo == "copy_engine" and not copy_engine_fits:
            sel = Selection("sequential", "copy-engine-capacity", "output over the GEMM workspace: sequential instead")
        return sel


def copy_engine_units(count: int) -> list[tuple[list[int], list[int]]]:
    """The copy-engine path's units for ``count`` row chunks: ``(peers_of, own_of)`` per unit, in order.

    Each unit runs the GEMMs of the peers' parts of the chunks in ``peers_of`` and of the own parts of the
    chunks in ``own_of`` on the caller's stream, then one barrier (``sagellm_comm/kernels/copy_engine.py``):
    ``P(0) | P(1) | O(0) P(2) | O(1) P(3) | ... | O(C-2) | O(C-1)``.  From two chunks on, a whole unit lies
    between the barrier after ``P(c)`` and ``O(c)``, so the pull ``O(c)`` waits for runs under a GEMM;
    ``C + 2`` units (barriers).
    """
    units = [([0], [])] + [([c], [c - 2] if c >= 2 else []) for c in range(1, count)]
    return units + [([], [c]) for c in range(max(0, count - 2), count)]


# ====================================================================== GEMM + all-reduce: one rank
_FLAG_AREA_BYTES = _gk.DATA_OFFSET.value - _ark.PAD_BYTES.value  # produced + reduced tile flags (int64)


def gemm_workspace_bytes(max_output_bytes: int) -> int:
    """``slot_bytes`` to ask a :class:`SymmetricWorkspace` for, so it holds two ``[M, N]`` tile buffers of
    ``max_output_bytes`` each plus the tile flags (the region is ``PAD_BYTES + 3 * slot_bytes``)."""
    return triton.cdiv(_FLAG_AREA_BYTES + 2 * int(max_output_bytes), 3)


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
        reduce_programs: programs of the copy-engine path's row sum at W > 2, which runs on the caller's
            stream between GEMMs (default: two per SM).
        ce_chunks: row chunks of the copy-engine path (default: by M, see :meth:`copy_engine_chunks`).
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
        reduce_programs: int | None = None,
        ce_chunks: int | None = None,
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
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.use_ptx else 8
        if consumer_programs is None:
            consumer_programs = max(1, min(_ark.MAX_BLOCKS.value, sms // 4))
        self.consumer_programs = consumer_programs
        if num_chunks < 1:
            raise InvalidArgumentError(f"num_chunks must be >= 1, got {num_chunks}")
        self.num_chunks = num_chunks
        if ce_chunks is not None and not 1 <= ce_chunks <= (_ce.MAX_STEPS.value - 1) // 2:
            raise InvalidArgumentError(f"ce_chunks must be 1..{(_ce.MAX_STEPS.value - 1) // 2}, got {ce_chunks}")
        self.ce_chunks = ce_chunks
        self.reduce_programs = reduce_programs or (2 * sms if self.use_ptx else 2)
        # Tile buffer of one parity (see sagellm_comm/kernels/gemm_all_reduce.py): what is left after the flags, halved.
        self.buffer_bytes = 0 if ws is None else (3 * ws.slot_bytes - _FLAG_AREA_BYTES) // 2 // 256 * 256
        index = self.device.index or 0
        self._producers: dict[tuple, _Launcher] = {}
        self._consumer = _Launcher(
            _gk.tile_all_reduce_kernel, self.use_ptx, index, num_warps=4 if not self.use_ptx else 8
        )
        self._side = torch.cuda.Stream(self.device, priority=-1) if self.use_ptx else None
        self.last_selection: Selection | None = None
        self._ce_barrier = _Launcher(_ce.ce_barrier_kernel, self.use_ptx, index, num_warps=1)
        self._check = _Launcher(_fp.fingerprint_check_kernel, self.use_ptx, index, num_warps=1)
        self._ce_sum = _Launcher(_ce.ce_sum_rows_kernel, self.use_ptx, index, num_warps=8 if self.use_ptx else 4)
        self._ce_gather = _Launcher(_ce.ce_gather_kernel, self.use_ptx, index, num_warps=8 if self.use_ptx else 4)
        self._ce_block = 4096 if self.use_ptx else 64  # elements per program step of the row sum and the gather
        self._sms = sms
        self._ce_views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}

    # ------------------------------------------------------------------ policy
    def fused_fits(self, m: int, n: int, itemsize: int) -> bool:
        if self.workspace is None:
            return False
        cfg = _gemm_config(m, self.use_ptx)
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        return m * n * itemsize <= self.buffer_bytes and tiles <= _gk.MAX_TILES.value

    def copy_engine_chunks(self, m: int) -> list[tuple[int, int]]:
        """Row chunks ``(start, rows)`` of the copy-engine path for ``M = m``, of equal size.

        Default count (``ce_chunks=None``), measured on 2 x H100 (``bench/results/2xh100/``): 2 up to
        M = 4096, 4 above.  (A half-size last chunk, to shorten the one exposed gather, measured slower.)
        """
        count = max(1, min(self.ce_chunks or (2 if m <= 4096 else 4), m))
        unit = triton.cdiv(m, count)
        return [(start, min(unit, m - start)) for start in range(0, m, unit)]

    def copy_engine_fits(self, m: int, n: int, itemsize: int) -> bool:
        """The copy-engine path holds the ``[M, N]`` partials in tile buffer 0 and, at W > 2, in buffer 1,
        ``W - 1`` pulled parts per row chunk (at W = 2 that term is at most half of ``M * N``)."""
        if self.workspace is None:
            return False
        chunks = self.copy_engine_chunks(m)
        w = self.world_size
        scratch = len(chunks) * (w - 1) * triton.cdiv(chunks[0][1], w) * n
        return max(m * n, scratch) * itemsize <= self.buffer_bytes and 2 * len(chunks) < _ce.MAX_STEPS.value

    def select(self, m: int, n: int, itemsize: int = 2) -> Selection:
        """The path ``path="auto"`` runs for an ``[m, n]`` output, with rule id and reason."""
        return self.selector.select(
            m, self.world_size, self.fused_fits(m, n, itemsize), m * n * itemsize, self.copy_engine_fits(m, n, itemsize)
        )

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
            if path == "copy_engine" and not self.copy_engine_fits(m, n, itemsize):
                raise WorkspaceExhaustedError(
                    f"copy_engine path: a [{m}, {n}] output needs {m * n * itemsize} bytes; the GEMM workspace "
                    f"holds {self.buffer_bytes}" + ("" if self.workspace is not None else " (no GEMM workspace)")
                )
            sel = Selection(path, "user", f"path={path} requested")
        else:
            raise InvalidArgumentError(f"path must be auto or one of {GEMM_PATHS}, got {path!r}")
        self.last_selection = sel
        return sel

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None = None,
        path: str = "auto",
        zero_copy: bool = False,
    ):
        """``[M, N]`` = all-reduce of ``a @ b`` over the ranks (+ ``bias``); a new tensor.

        ``a``: ``[M, K_shard]``, ``b``: ``[K_shard, N]`` (any strides; e.g. ``weight.t()``), bf16 or fp16.
        ``path``: ``auto`` (the selector), ``fused``, ``chunked``, ``copy_engine`` or ``sequential``.
        ``zero_copy``: where the copy-engine path runs, return the result as a view of this rank's GEMM
        workspace instead of a new tensor (saves the local copy of this rank's part: 1/W of the output).  The
        view is overwritten by the next call on this workspace: consume or copy it before then.  Other paths
        ignore it.
        """
        ws = self.workspace
        if ws is not None and ws._error_view[0]:
            ws.raise_if_failed()
        m, n, _ = self._validate(a, b, bias)
        sel = self._pick(path, m, n, a.element_size())
        if ws is not None and sel.algo in ("fused", "copy_engine"):
            if self.use_ptx:
                ws.enter_stream(torch._C._cuda_getCurrentRawStream(self.device.index or 0))
            if ws.check:
                self._launch_check(f"gemm_{sel.algo}", m * n, a.dtype)
        if sel.algo == "copy_engine":
            out = None if zero_copy else torch.empty((m, n), dtype=a.dtype, device=self.device)
            return self._copy_engine(a, b, bias, out, m, n)
        out = torch.empty((m, n), dtype=a.dtype, device=self.device)
        if sel.algo == "fused":
            self.launch_fused(a, b, bias, out, m, n)
        elif sel.algo == "chunked":
            self._chunked(a, b, bias, out, m)
        else:
            self._matmul(a, b, bias, out)
            self._reduce(out)
        return out

    def _launch_check(self, algo: str, numel: int, dtype: torch.dtype, table=None, ctrl=None, ranks: int = 1):
        """Check mode: the fingerprint comparison of this call (``kernels/fingerprint.py``), before its kernels."""
        ws = self.workspace
        w = ws.world_size
        args = (
            ws.table if table is None else table, ws.control if ctrl is None else ctrl, ws.rank,
            _fp.ALGO_CODES[algo], numel, _fp.DTYPE_CODES[str(dtype).removeprefix("torch.")], self._timeout,
        )  # fmt: skip
        self._check((1, ranks), args, (w, triton.next_power_of_2(w), self.use_ptx, ranks > 1))

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

    # ------------------------------------------------------------------ copy-engine pipeline
    def _copy_engine_views(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every rank's tile buffer 0 as mapped here (flat ``dtype``), and this rank's buffer 1 (scratch)."""
        views = self._ce_views.get(dtype)
        if views is None:
            ws = self.workspace
            elems = self.buffer_bytes // torch.empty((), dtype=dtype).element_size()
            bufs = [_tensor_at(p + _gk.DATA_OFFSET.value, elems, dtype, ws.device, ws) for p in ws.peer_ptrs]
            scratch = _tensor_at(
                ws.peer_ptrs[ws.rank] + _gk.DATA_OFFSET.value + self.buffer_bytes, elems, dtype, ws.device, ws
            )
            views = self._ce_views[dtype] = (bufs, scratch)
        return views

    def _ce_step(self, step: int, out: torch.Tensor, last: bool = False) -> None:
        """Barrier ``step``; the ``last`` one fills ``out`` with NaN if this rank's error latch is set."""
        ws = self.workspace
        w = ws.world_size
        args = (ws.table, ws.control, out, out.numel() if last else 0, ws.rank, step, self._timeout)
        self._ce_barrier((1, 1), args, (w, triton.next_power_of_2(w), last, self.use_ptx, 1024))

    def _ce_preload(self, scratch: torch.Tensor, gather_args: tuple, out: torch.Tensor) -> None:
        """Load the pipeline's kernels before any barrier of this call can spin (see ``_Launcher.preload``)."""
        ws = self.workspace
        w, wp = ws.world_size, triton.next_power_of_2(ws.world_size)
        for last in (False, True):
            args = (ws.table, ws.control, out, out.numel() if last else 0, ws.rank, 0, self._timeout)
            self._ce_barrier.preload(args, (w, wp, last, self.use_ptx, 1024))
        if w > 2:
            self._ce_sum.preload((scratch, scratch, 0, 0), (w - 1, self._ce_block))
        self._ce_gather.preload(gather_args, (w, self._ce_block))

    def _copy_engine(self, a, b, bias, out, m, n) -> torch.Tensor:
        """The copy-engine pipeline of ``sagellm_comm/kernels/copy_engine.py``: cuBLAS on the caller's stream
        computes the peers' parts of each row chunk into this rank's buffer P, then its own part onto the peers'
        partials (pulled by the copy engines on the side stream); the copy engines gather the reduced parts.

        ``out`` None: the result is left in P (zero-copy; the gather overwrites this rank's partials of the
        peers' parts, which the peers pulled before they signalled the barrier that precedes it)."""
        ws = self.workspace
        w, rank = ws.world_size, ws.rank
        bufs, scratch = self._copy_engine_views(a.dtype)
        mine = bufs[rank]
        zero_copy = out is None
        flat_out = mine[: m * n] if zero_copy else out.view(-1)
        chunks = self.copy_engine_chunks(m)
        last_start, last_rows = chunks[-1]
        each = triton.cdiv(last_rows, w)  # rows of a part of the last chunk (see ``part``)
        gather_args = (ws.table, flat_out, rank, last_start * n, each * n, (last_start + last_rows) * n)
        self._ce_preload(scratch, gather_args, flat_out)
        side = self._side
        on_gpu = side is not None
        current = torch.cuda.current_stream(self.device) if on_gpu else None
        if on_gpu:
            side.wait_stream(current)

        def part(c: int, p: int) -> tuple[int, int]:  # rows [lo, hi) of part p of chunk c
            start, rows = chunks[c]
            each = triton.cdiv(rows, w)
            return start + min(p * each, rows), start + min((p + 1) * each, rows)

        per = triton.cdiv(chunks[0][1], w) * n  # elements of the largest part

        def scratch_rows(c: int) -> torch.Tensor:  # S(c): W - 1 rows of ``per`` elements
            return scratch[c * (w - 1) * per : (c + 1) * (w - 1) * per]

        def rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            return t[lo * n : hi * n]

        def on_side():
            return torch.cuda.stream(side) if on_gpu else _nullcontext()

        pulled: dict[int, torch.cuda.Event] = {}

        def peers_parts(c: int) -> None:  # caller's stream
            for p in range(w):
                lo, hi = part(c, p)
                if p != rank and hi > lo:
                    torch.matmul(a[lo:hi], b, out=rows(mine, lo, hi).view(hi - lo, n))

        def pull(c: int) -> None:  # side stream, after a barrier that follows every rank's peers_parts(c)
            lo, hi = part(c, rank)
            s = scratch_rows(c)
            slot = 0
            for p in range(w):
                if p != rank:
                    if hi > lo:
                        # At W = 2 the one partial lands where the own part's GEMM accumulates onto it.
                        dst = rows(mine, lo, hi) if w == 2 else s[slot * per : slot * per + (hi - lo) * n]
                        dst.copy_(rows(bufs[p], lo, hi))
                    slot += 1
            if on_gpu:
                pulled[c] = torch.cuda.Event()
                pulled[c].record(side)

        def own_part(c: int) -> None:  # caller's stream
            lo, hi = part(c, rank)
            if hi > lo:
                if on_gpu:
                    current.wait_event(pulled[c])
                if w > 2:  # the W - 1 partials, summed in rank order into the own part's rows
                    count = (hi - lo) * n
                    programs = max(1, min(self.reduce_programs, triton.cdiv(count, self._ce_block)))
                    self._ce_sum(
                        (programs, 1), (scratch_rows(c), rows(mine, lo, hi), count, per), (w - 1, self._ce_block)
                    )
                # In place (beta = 1) onto the peers' partials: torch.addmm(S, ..., out=other) would first
                # copy S into ``other`` on this stream.
                target = rows(mine, lo, hi).view(hi - lo, n)
                target.addmm_(a[lo:hi], b)
                if bias is not None:
                    target += bias

        def gather(c: int) -> None:  # side stream, after a barrier that follows every rank's own_part(c)
            for p in range(w):
                lo, hi = part(c, p)
                if p != rank and hi > lo:
                    rows(flat_out, lo, hi).copy_(rows(bufs[p], lo, hi))

        # Caller's stream: units of GEMMs, each followed by a barrier (on this stream, where the GEMMs leave
        # the SMs free); after it the side stream pulls the partials of the chunks whose peers' parts the
        # unit computed and gathers the chunks whose own parts it computed.  Peers' parts run ahead of the
        # own parts, so each pull has a GEMM to hide under.  The last chunk's gather, which nothing hides,
        # runs on the SMs instead (the caller's stream), where the GEMMs are done.
        units = copy_engine_units(len(chunks))
        for step, (peers_of, own_of) in enumerate(units):
            for c in own_of:
                own_part(c)
            for c in peers_of:
                peers_parts(c)
            self._ce_step(step, flat_out)
            if on_gpu:
                done = torch.cuda.Event()
                done.record(current)
                side.wait_event(done)
            with on_side():
                for c in peers_of:
                    pull(c)
                for c in own_of:
                    if c != len(chunks) - 1:
                        gather(c)
        if w > 1:
            programs = max(1, min(self._sms // (w - 1), triton.cdiv(each * n, self._ce_block)))
            self._ce_gather((programs, w - 1), gather_args, (w, self._ce_block))
        with on_side():  # after the last barrier: this rank's own parts, a local copy beside the SMs' gather
            if not zero_copy:
                for c in range(len(chunks)):
                    lo, hi = part(c, rank)
                    if hi > lo:
                        rows(flat_out, lo, hi).copy_(rows(mine, lo, hi))
            if on_gpu:
                side.wait_stream(current)  # the SMs' gather: read from the peers before the closing barrier
            self._ce_step(len(units), flat_out, last=True)
        if on_gpu:
            current.wait_stream(side)
            if not zero_copy:
                out.record_stream(side)
        return flat_out.view(m, n)

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
