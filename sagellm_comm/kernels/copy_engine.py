"""The SM side of the copy-engine GEMM + all-reduce pipeline: a one-program barrier and a row sum.

The pipeline (``sagellm_comm/fused/gemm_copy_engine.py``, path ``copy_engine``) moves every byte between GPUs with DMA
copy engines (``cudaMemcpyAsync`` on IPC-mapped peer addresses: "Memcpy PtoP", no SM), and folds the
reduction into cuBLAS: the rank that owns a part computes its own GEMM of it with the peers' partials as
the ``C`` operand (``addmm``, beta = 1), so no reduction kernel competes with the GEMM for SMs.  The
output rows are cut into ``C`` chunks, every chunk into ``W`` parts (part ``p`` belongs to rank ``p``).
Rank ``r``'s caller stream runs the GEMMs in *units*, each followed by one barrier (a one-program kernel on
that stream, where the GEMM before it has left the SMs free)::

    P(0) | B0 | P(1) | B1 | O(0) P(2) | B2 | O(1) P(3) | B3 | ... | O(C-2) | B | O(C-1) | B

``P(c)``: cuBLAS computes the peers' parts of chunk ``c`` into this rank's buffer P.  ``O(c)``: it waits
for the pull of chunk ``c`` and computes its own part onto the peers' partials already in P's own rows
(``addmm_``, beta = 1; at ``W > 2`` the own product goes to scratch instead, rounded as the pulled partials are,
and ``ce_sum_rows_kernel`` sums the ``W`` partials there in rank order, rounding once).
After each barrier the side stream (waiting for it by an event) pulls, by copy engine, the own part's
partials of every chunk whose ``P`` the unit ran (from each peer's P: straight into P's own rows at
``W = 2``, into scratch ``S(c)`` at ``W > 2``), and gathers every chunk whose ``O`` it ran (each peer's
reduced part, from its P into ``out``) but the last.  Each pull has a GEMM to hide under before the ``O``
that needs it.  The last chunk's gather has nothing to hide under, so it runs on the SMs, which the GEMMs
have left free: ``ce_gather_kernel`` on the caller's stream after the last unit's barrier (8 MB in 30 us
against 38 us by one copy-engine transfer on 2 x H100).  Beside it the side stream copies this rank's own
parts from P into ``out`` (copy engines, DtoD), then runs a ``LAST`` barrier after the gather kernel: no
peer reads this rank's P any more; the epoch advances.  ``C + 2`` barriers for ``C >= 2``.

The barriers ride the caller's stream because a barrier on the side stream needs an SM while cuBLAS's
persistent GEMM holds all of them: on 2 x H100 such barriers waited 30-160 us for the GEMM to end, and the
GEMM stream then idled for the pull (the ce_schedule A/B records, in git at 55a2a51).

Each part is reduced exactly once, by its owner, and copied bit for bit: every rank ends with the same bits
(the owner's fp32 sum of the ranks' partials, rounded once: at ``W = 2`` its own product unrounded).

Barrier flags live in slot ``SLOT_COPY_ENGINE`` of the signal pad of the GEMM workspace (int64 words, see
``sagellm_comm/kernels/all_reduce.py``): flag
``CE_FLAG_WORD + step * MAX_WORLD + src`` of rank ``r``'s pad holds the epoch + 1 that rank ``src`` reached
at ``step``.  Steps ``0 .. MAX_BLOCKS - 1`` exist, so a call has at most ``(MAX_BLOCKS - 1) // 2`` chunks.
Invariants are those of ``sagellm_comm/kernels/all_reduce.py``, whose ``_barrier_at`` the barrier runs on this slot:
one release store (system scope) per peer, then bounded acquire polls; the epoch (``ctrl[CE_EPOCH]``) lives
on the device and only the ``LAST`` barrier of a call advances it, so CUDA-graph replays use fresh epochs;
flags only grow (64-bit, never wrap); on timeout the error latch and the host-mapped record name the missing peer (phase
``copy-engine``, block = step).
Kernel boundaries order the GEMM's stores and the copy engines' transfers against the flags: a barrier
runs after the work before it in its stream has completed, and a pull starts after the barrier before it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CTRL_CE_EPOCH,
    CTRL_LATCH,
    MAX_BLOCKS,
    MAX_WORLD,
    PHASE_COPY_ENGINE,
    SLOT_COPY_ENGINE,
    SLOT_WORDS,
    _barrier_at,
    _ptr,
)
from sagellm_comm.kernels.gemm_all_reduce import DATA_OFFSET

CE_EPOCH = CTRL_CE_EPOCH  # control word of the pipeline's epoch (ctrl[0..2] belong to the fused path)
CE_FLAG_WORD = tl.constexpr(SLOT_COPY_ENGINE.value * SLOT_WORDS.value)  # int64 word of flags[step 0][rank 0]
MAX_STEPS = tl.constexpr(MAX_BLOCKS.value)


@triton.jit(do_not_specialize=["numel", "rank", "step", "timeout"])
def ce_barrier_kernel(
    table,
    ctrl,
    out,
    numel,
    rank,
    step,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    LAST: tl.constexpr,
    USE_PTX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Barrier ``step`` of this call among the ``W`` ranks; one program (launch with grid ``(1,)``).

    The ``LAST`` barrier, the last writer of the call's ``numel``-element output ``out`` on every stream,
    fills ``out`` with NaN when this rank's error latch is set (a wait of this call or an earlier one failed):
    a failed call's output never passes for a sum.
    """
    peers = tl.arange(0, WP)
    bases = tl.load(table + peers, mask=peers < W, other=0)
    target = tl.load(ctrl + CE_EPOCH, volatile=True) + 1
    flag_index = CE_FLAG_WORD + step * MAX_WORLD
    _barrier_at(
        bases, peers, ctrl, table, rank, flag_index, PHASE_COPY_ENGINE, step, target, timeout, W, WP, USE_PTX, target
    )
    if LAST:
        # Only this rank's later barriers read the word, in stream order after this kernel.
        tl.store(ctrl + CE_EPOCH, target)
        if tl.load(ctrl + CTRL_LATCH, volatile=True) != 0:
            for first in range(0, numel, BLOCK):
                offs = first + tl.arange(0, BLOCK)
                tl.store(out + offs, tl.full([BLOCK], float("nan"), out.dtype.element_ty), mask=offs < numel)


@triton.jit(do_not_specialize=["numel", "stride"])
def ce_sum_rows_kernel(scratch, out, numel, stride, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i] = sum over rows j (in order) of scratch[j, i]``, fp32 math, ``i < numel``.

    Every rank's partial of this rank's part in rank order (the peers' pulled by the copy engines, its own from a
    GEMM); their sum lands in the part's rows of P (only for ``W > 2``).
    """
    DTYPE: tl.constexpr = scratch.dtype.element_ty
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(ROWS):
            acc += tl.load(scratch + j * stride + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + offs, acc.to(DTYPE), mask=mask)


@triton.jit(do_not_specialize=["rank"])
def ce_gather_kernel(table, out, rank, start, part, end, W: tl.constexpr, BLOCK: tl.constexpr):
    """The last chunk's gather, by the SMs: ``out[e] = P_p[e]`` for every peer ``p`` of this rank and every
    element ``e`` of its part, ``[start + p * part, min(start + (p + 1) * part, end))`` (element offsets into
    each rank's buffer P, which starts at ``DATA_OFFSET`` of its region).

    Grid ``(programs, W - 1)``: axis 1 picks the peer.  It runs on the caller's stream after the last unit's
    barrier, when the GEMMs have left every SM free; there the SMs' loads over NVLink move a part faster than
    one copy-engine transfer (8 MB: 30 vs 38 us on 2 x H100; the ce_tail records, in git at 55a2a51).
    ``start``, ``part`` and ``end`` are specialised on divisibility by 16, so parts of rows of a multiple of
    8 elements move in 16-byte accesses.
    """
    DTYPE: tl.constexpr = out.dtype.element_ty
    j = tl.program_id(1)
    p = j + (j >= rank).to(tl.int32)
    lo = start + p * part
    hi = tl.minimum(lo + part, end)
    src = _ptr(tl.load(table + p) + DATA_OFFSET, DTYPE)
    step = tl.num_programs(0) * BLOCK
    for first in range(lo + tl.program_id(0) * BLOCK, hi, step):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < hi
        tl.store(out + offs, tl.load(src + offs, mask=mask), mask=mask)
