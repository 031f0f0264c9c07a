"""The SM side of the copy-engine GEMM + all-reduce pipeline: a one-program barrier and a local reduction.

The pipeline (``sagellm_comm/fused/gemm.py``, path ``copy_engine``) moves every byte between GPUs with DMA
copy engines (``cudaMemcpyAsync`` on IPC-mapped peer addresses), so the all-reduce of GEMM chunk ``c``
runs beside the GEMM of chunk ``c + 1`` while taking almost no SM time from it.  Per chunk, on a side
stream of every rank::

    barrier(2c)       every rank's partial of chunk c is in its buffer P (the GEMM wrote it there)
    copy engines      pull part ``rank`` of chunk c from every peer's P into local scratch
    reduce            out[part rank] = P[part rank] = sum of the W partials in rank order (fp32 math)
    barrier(2c + 1)   every rank's reduced part of chunk c is in its P
    copy engines      pull part p of chunk c from peer p's P into out, for every peer p
    ...
    barrier(2C, LAST) after the last pulls: no peer reads this rank's P any more; advances the epoch

Each part is reduced exactly once, by its owner, and copied bit for bit: every rank ends with the same bits.

Barrier flags live in the fourth slot of the signal pad of the GEMM workspace (``kernels/all_reduce.py``
uses three phases of ``MAX_BLOCKS * MAX_WORLD`` words; the fourth fills the pad): flag
``CE_FLAG_WORD + step * MAX_WORLD + src`` of rank ``r``'s pad holds the epoch + 1 that rank ``src`` reached
at ``step``.  Steps ``0 .. MAX_BLOCKS - 1`` exist, so a call has at most ``(MAX_BLOCKS - 1) // 2`` chunks.
Invariants are those of ``kernels/all_reduce.py``: a barrier is one release store (system scope) per peer,
then bounded polls and one acquire load; the epoch (``ctrl[CE_EPOCH]``) lives on the device and only the
``LAST`` barrier of a call advances it, so CUDA-graph replays use fresh epochs; flags only grow; on timeout
the error latch and the host-mapped record name the missing peer (phase ``copy-engine``, block = step).
Kernel boundaries order the GEMM's stores and the copy engines' transfers against the flags: a barrier
runs after the work before it in its stream has completed, and a pull starts after the barrier before it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.all_reduce import MAX_BLOCKS, MAX_WORLD, NUM_PHASES, PAD_BYTES, _pick
from kernels.gemm_all_reduce import _wait_flags

CE_EPOCH = tl.constexpr(3)  # control word of the pipeline's epoch (ctrl[0..2] belong to the fused path)
CE_FLAG_WORD = tl.constexpr(NUM_PHASES.value * MAX_BLOCKS.value * MAX_WORLD.value)
MAX_STEPS = tl.constexpr(MAX_BLOCKS.value)
PHASE_COPY_ENGINE = tl.constexpr(4)  # error-record phase of a timed-out pipeline barrier
assert (CE_FLAG_WORD.value + MAX_STEPS.value * MAX_WORLD.value) * 4 <= PAD_BYTES.value


@triton.jit(do_not_specialize=["rank", "step", "timeout"])
def ce_barrier_kernel(
    table,
    ctrl,
    rank,
    step,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    LAST: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """Barrier ``step`` of this call among the ``W`` ranks; one program (launch with grid ``(1,)``)."""
    peers = tl.arange(0, WP)
    valid = peers < W
    bases = tl.load(table + peers, mask=valid, other=0)
    epoch = tl.load(ctrl + CE_EPOCH, volatile=True)
    target = epoch + 1
    word = CE_FLAG_WORD + step * MAX_WORLD
    remote = (bases + (word + rank) * 4).to(tl.pointer_type(tl.int32))
    tl.atomic_xchg(remote, tl.full([WP], 0, tl.int32) + target, mask=valid, sem="release", scope="sys")
    my_base = _pick(bases, peers, rank)
    # Padding lanes (W not a power of two) poll this rank's own first flag, a valid address, never awaited.
    mine = (my_base + (word + tl.where(valid, peers, 0)) * 4).to(tl.pointer_type(tl.int32))
    _wait_flags(mine, valid, target, ctrl, table, peers, PHASE_COPY_ENGINE, step, timeout, W, WP, USE_PTX)
    if LAST:
        # Only this rank's later barriers read the word, in stream order after this kernel.
        tl.store(ctrl + CE_EPOCH, target)


@triton.jit(do_not_specialize=["numel", "scratch_stride", "rank"])
def ce_reduce_kernel(
    out,
    own,
    scratch,
    numel,
    scratch_stride,
    rank,
    W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[i] = own[i] = sum over ranks r (in order) of partial_r[i]``, fp32 math, ``i < numel``.

    ``own``: this rank's partial (in its buffer P), overwritten with the result for the peers to pull;
    ``scratch``: the ``W - 1`` peers' partials, peer ``r`` at row ``r - (r > rank)`` of stride
    ``scratch_stride`` elements.  Local memory only: the copy engines brought the peers' data.
    """
    DTYPE: tl.constexpr = out.dtype.element_ty
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, numel, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(W):
            if r == rank:
                v = tl.load(own + offs, mask=mask, other=0.0)
            else:
                slot = r - (r > rank).to(tl.int32)
                v = tl.load(scratch + slot * scratch_stride + offs, mask=mask, other=0.0)
            acc += v.to(tl.float32)
        result = acc.to(DTYPE)
        tl.store(out + offs, result, mask=mask)
        tl.store(own + offs, result, mask=mask)
