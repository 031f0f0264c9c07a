"""The copy-engine path of :class:`~sagellm_comm.fused.gemm.GemmAllReduce`: cuBLAS per row part, the
reduction folded into the owner's ``addmm``, every transfer between GPUs by DMA copy engines, ordered by the
barriers of ``sagellm_comm/kernels/copy_engine.py``.

:class:`CopyEnginePath` is a mixin of :class:`GemmAllReduce`: it reads the rank's GEMM workspace, world size,
``ce_chunks``, tile-buffer size and side stream from it, and owns the pipeline's launchers
(:meth:`_init_copy_engine`).
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import torch
import triton

from sagellm_comm.kernels import copy_engine as _ce
from sagellm_comm.kernels import gemm_all_reduce as _gk

from ..arguments import check_int
from ..launch import Launcher as _Launcher
from ..workspace import _tensor_at


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


MAX_CE_CHUNKS = (_ce.MAX_STEPS.value - 1) // 2  # two barrier steps per chunk, one more for the end


class CopyEnginePath:
    """The copy-engine pipeline's sizing (:meth:`copy_engine_chunks`, :meth:`copy_engine_fits`) and run."""

    @property
    def ce_chunks(self) -> int | None:
        """Row chunks of the copy-engine path, 1..:data:`MAX_CE_CHUNKS`; None: by M (:meth:`copy_engine_chunks`).
        Setting it changes the next calls of this rank: set it alike on every rank."""
        return self._ce_chunks

    @ce_chunks.setter
    def ce_chunks(self, value: int | None) -> None:
        self._ce_chunks = None if value is None else check_int(value, "ce_chunks", 1, MAX_CE_CHUNKS)

    def _init_copy_engine(self, index: int, sms: int) -> None:
        """The pipeline's launchers and per-dtype workspace views (``index``: CUDA device; ``sms``: its SMs)."""
        self._ce_barrier = _Launcher(_ce.ce_barrier_kernel, self.use_ptx, index, num_warps=1)
        self._ce_sum = _Launcher(_ce.ce_sum_rows_kernel, self.use_ptx, index, num_warps=8 if self.use_ptx else 4)
        self._ce_gather = _Launcher(_ce.ce_gather_kernel, self.use_ptx, index, num_warps=8 if self.use_ptx else 4)
        self._ce_block = 4096 if self.use_ptx else 64  # elements per program step of the row sum and the gather
        self._sms = sms
        self._ce_views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}

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
        ``W`` parts per row chunk (the ``W - 1`` pulled ones and this rank's own product)."""
        if self.workspace is None:
            return False
        chunks = self.copy_engine_chunks(m)
        w = self.world_size
        scratch = len(chunks) * w * triton.cdiv(chunks[0][1], w) * n if w > 2 else 0
        return max(m * n, scratch) * itemsize <= self.buffer_bytes and 2 * len(chunks) < _ce.MAX_STEPS.value

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
        self._ce_barrier((1, 1), self._ce_barrier_args(out, step, last))

    def _ce_barrier_args(self, out: torch.Tensor, step: int, last: bool) -> tuple:
        ws = self.workspace
        w = ws.world_size
        return self._ce_barrier.bind(
            table=ws.table, ctrl=ws.control, out=out, numel=out.numel() if last else 0, rank=ws.rank, step=step,
            timeout=self._timeout, W=w, WP=triton.next_power_of_2(w), LAST=last, USE_PTX=self.use_ptx, BLOCK=1024,
        )  # fmt: skip

    def _ce_preload(self, scratch: torch.Tensor, gather_args: tuple, out: torch.Tensor) -> None:
        """Load the pipeline's kernels before any barrier of this call can spin (see ``_Launcher.preload``)."""
        w = self.workspace.world_size
        for last in (False, True):
            self._ce_barrier.preload(self._ce_barrier_args(out, 0, last))
        if w > 2:
            self._ce_sum.preload(self._ce_sum.bind(scratch=scratch, out=scratch, numel=0, stride=0, ROWS=w,
                                                   BLOCK=self._ce_block))  # fmt: skip
        self._ce_gather.preload(gather_args)

    def _copy_engine(self, a, b, bias, out, m, n, check=None) -> torch.Tensor:
        """The copy-engine pipeline of ``sagellm_comm/kernels/copy_engine.py``: cuBLAS on the caller's stream
        computes the peers' parts of each row chunk into this rank's buffer P, then its own part onto the peers'
        partials (pulled by the copy engines on the side stream); the copy engines gather the reduced parts.

        ``out`` None: the result is left in P (zero-copy; the gather overwrites this rank's partials of the
        peers' parts, which the peers pulled before they signalled the barrier that precedes it).  ``check``: a
        launch to enqueue first, once the pipeline's kernels are loaded (check mode's fingerprint)."""
        ws = self.workspace
        w, rank = ws.world_size, ws.rank
        bufs, scratch = self._copy_engine_views(a.dtype)
        mine = bufs[rank]
        zero_copy = out is None
        flat_out = mine[: m * n] if zero_copy else out.view(-1)
        chunks = self.copy_engine_chunks(m)
        last_start, last_rows = chunks[-1]
        each = triton.cdiv(last_rows, w)  # rows of a part of the last chunk (see ``part``)
        gather_args = self._ce_gather.bind(
            table=ws.table, out=flat_out, rank=rank, start=last_start * n, part=each * n,
            end=(last_start + last_rows) * n, W=w, BLOCK=self._ce_block,
        )  # fmt: skip
        self._ce_preload(scratch, gather_args, flat_out)
        if check is not None:
            check()
        side = self.side_stream
        on_gpu = side is not None
        current = torch.cuda.current_stream(self.device) if on_gpu else None
        if on_gpu:
            side.wait_stream(current)

        def part(c: int, p: int) -> tuple[int, int]:  # rows [lo, hi) of part p of chunk c
            start, rows = chunks[c]
            each = triton.cdiv(rows, w)
            return start + min(p * each, rows), start + min((p + 1) * each, rows)

        per = triton.cdiv(chunks[0][1], w) * n  # elements of the largest part

        def scratch_rows(c: int) -> torch.Tensor:  # S(c), W > 2: W rows of ``per`` elements, row p rank p's partial
            return scratch[c * w * per : (c + 1) * w * per]

        def rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            return t[lo * n : hi * n]

        def on_side():
            return torch.cuda.stream(side) if on_gpu else _nullcontext()

        pulled: dict[int, torch.cuda.Event] = {}

        # The bias goes into rank 0's partials before they are rounded, as on the sequential path (added to the
        # reduced sum, it would round twice).
        carries_bias = bias is not None and rank == 0

        def product(lo: int, hi: int, out: torch.Tensor, with_bias: bool) -> None:
            if with_bias:
                torch.addmm(bias, a[lo:hi], b, out=out)
            else:
                torch.matmul(a[lo:hi], b, out=out)

        def peers_parts(c: int) -> None:  # caller's stream
            for p in range(w):
                lo, hi = part(c, p)
                if p != rank and hi > lo:
                    product(lo, hi, rows(mine, lo, hi).view(hi - lo, n), carries_bias)

        def pull(c: int) -> None:  # side stream, after a barrier that follows every rank's peers_parts(c)
            lo, hi = part(c, rank)
            s = scratch_rows(c)
            for p in range(w):
                if p != rank and hi > lo:
                    # At W = 2 the one partial lands where the own part's GEMM accumulates onto it.
                    dst = rows(mine, lo, hi) if w == 2 else s[p * per : p * per + (hi - lo) * n]
                    dst.copy_(rows(bufs[p], lo, hi))
            if on_gpu:
                pulled[c] = torch.cuda.Event()
                pulled[c].record(side)

        def own_part(c: int) -> None:  # caller's stream
            lo, hi = part(c, rank)
            if hi > lo:
                target = rows(mine, lo, hi).view(hi - lo, n)
                if w > 2:
                    # Every rank's partial rounded, as the pulled ones are; then the W partials summed in rank order
                    # in fp32 and rounded once into the own part's rows.  (Accumulating the own product onto the
                    # peers' sum rounded first would round twice: 1 and 2**-9 from two peers, -1 of its own, gave
                    # 0 in bf16 where the exact sum 2**-9 is representable.)
                    count = (hi - lo) * n
                    own = scratch_rows(c)[rank * per : rank * per + count].view(hi - lo, n)
                    product(lo, hi, own, carries_bias)
                    if on_gpu:
                        current.wait_event(pulled[c])
                    programs = max(1, min(self.reduce_programs, triton.cdiv(count, self._ce_block)))
                    self._ce_sum.launch(
                        (programs, 1), scratch=scratch_rows(c), out=rows(mine, lo, hi), numel=count, stride=per,
                        ROWS=w, BLOCK=self._ce_block,
                    )  # fmt: skip
                elif carries_bias:
                    # Rank 0's product and the bias rounded once into scratch (the sequential path's partial),
                    # then added to the peer's partial: the sequential path's sum.
                    own = scratch[: (hi - lo) * n].view(hi - lo, n)
                    product(lo, hi, own, True)
                    if on_gpu:
                        current.wait_event(pulled[c])
                    target.add_(own)
                else:
                    if on_gpu:
                        current.wait_event(pulled[c])
                    # In place (beta = 1) onto the peer's partial: torch.addmm(S, ..., out=other) would first
                    # copy S into ``other`` on this stream.
                    target.addmm_(a[lo:hi], b)

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
            self._ce_gather((programs, w - 1), gather_args)
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
