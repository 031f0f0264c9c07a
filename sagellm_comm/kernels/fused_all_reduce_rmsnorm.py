"""All-reduce fused with the residual add and RMSNorm that end every tensor-parallel block.

Given on every rank ``x`` ([rows, hidden], this rank's partial sums), ``residual`` ([rows, hidden]) and
``weight`` ([hidden]), every rank gets::

    reduced      = sum over ranks of x, in rank order, in fp32, rounded to the dtype   (= the all-reduce)
    new_residual = (reduced + residual) in fp32, rounded to the dtype                 (= torch's add)
    normed       = new_residual * rsqrt(mean(new_residual ** 2) + eps) * weight, in fp32, rounded

in one pass over the reduced data: the reduced row never goes back to memory before it is normalised.
Rounding ``reduced`` to the dtype first makes ``new_residual`` bit-identical to the unfused sequence
(all-reduce, then add).

The workspace, flags, epochs, staging slots, bounded waits and error record are those of
``sagellm_comm/kernels/all_reduce.py`` (its docstring states the invariants; its helpers are imported, not copied), so
these kernels and the plain all-reduce kernels can be called in any order on one workspace: each call
advances the same device-side epoch and uses staging slot ``epoch % 2``.

Algorithms (``W`` ranks; a *row* is the unit of work, so the norm's reduction stays inside one program):

* one-shot: each rank copies ``x`` into its staging slot; barrier; program ``b`` owns rows
  ``b, b + P, ...``: reads each of its rows from every rank's slot, reduces, adds the residual, normalises
  and writes both outputs.  Every rank computes every row from the same data in the same order, so the
  outputs are bit-identical when the residuals are (as they are in tensor parallelism).
* two-shot: rows are cut into ``W`` chunks of ``cdiv(rows, W)``; rank ``r`` reduces and normalises chunk
  ``r`` only, writes ``new_residual`` over its own staged ``x`` rows (nobody else reads chunk ``r`` of rank
  ``r``'s slot) and ``normed`` into the slot's second half; barrier; every rank gathers both outputs of
  chunk ``c`` from rank ``c``.  Each row is computed exactly once, so every rank gets identical bits even if
  the residuals differ.  The staged message takes twice its size of the slot.

Row ``i`` of chunk ``c`` belongs to program ``i % P`` on every rank and in every phase, so program ``b``
only waits for program ``b`` of its peers (invariant 1 of ``sagellm_comm/kernels/all_reduce.py``).  No end barrier is
needed: only staging slots are read by peers, and they are double-buffered by epoch parity (invariant 3).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    PAD_BYTES,
    PHASE_MID,
    _barrier,
    _finish,
    _nan_unless,
    _pick,
    _prologue,
    _ptr,
    _reduce_tile,
    _start_barrier,
)


@triton.jit
def _add_norm_row(
    bases,
    peers,
    src_offsets,
    offs,
    cmask,
    residual,
    weight_f32,
    hidden,
    eps,
    ok,
    DTYPE: tl.constexpr,
    W: tl.constexpr,
):
    """Reduce one row from every rank's slot, add the residual, RMS-normalise: (new_residual, normed).

    NaN when ``ok`` is False (a wait before it failed): a failed call's outputs never pass for results."""
    reduced = _nan_unless(ok, _reduce_tile(bases, peers, src_offsets, offs, cmask, DTYPE, W)).to(DTYPE)
    res = tl.load(residual + offs, mask=cmask, other=0.0)
    new_res = (reduced.to(tl.float32) + res.to(tl.float32)).to(DTYPE)
    v = new_res.to(tl.float32)
    mean_sq = tl.sum(v * v, axis=0) / hidden
    rstd = 1.0 / tl.sqrt_rn(mean_sq + eps)
    normed = (v * rstd * weight_f32).to(DTYPE)
    return new_res, normed


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def all_reduce_rmsnorm_kernel(
    inp,
    residual,
    weight,
    normed_out,
    residual_out,
    table,
    ctrl,
    num_rows,
    hidden,
    eps,
    rank,
    slot_bytes,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Fused all-reduce + residual add + RMSNorm of ``[num_rows, hidden]`` (see the module docstring).

    ``inp``, ``residual``, ``normed_out``, ``residual_out``: contiguous ``[num_rows, hidden]`` of one dtype
    (``residual_out`` may alias ``residual``, ``normed_out`` may alias ``inp``); ``weight``: ``[hidden]``.
    ``BLOCK_H >= hidden``: a program holds one whole row.  With ``VIRTUAL`` every tensor but ``weight`` is
    ``[W, num_rows, hidden]`` and rank ``r`` (grid axis 1) uses row block ``r``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        shift = rank * num_rows * hidden
        inp += shift
        residual += shift
        normed_out += shift
        residual_out += shift
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = PAD_BYTES + slot_bytes * (1 + epoch % 2)
    src_offsets = tl.full([WP], 0, tl.int64) + slot_offset  # every rank's staged rows: no zero-copy here
    my_slot = _ptr(_pick(bases, peers, rank) + slot_offset, DTYPE)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    weight_f32 = tl.load(weight + cols, mask=cmask, other=0.0).to(tl.float32)

    if TWO_SHOT:
        chunk = tl.cdiv(num_rows, W)
        normed_stage = num_rows * hidden  # element offset of the slot's second half
        for c in tl.static_range(W):
            rows_in_chunk = tl.minimum(chunk, num_rows - c * chunk)
            for i in range(pid, rows_in_chunk, num_programs):
                offs = (c * chunk + i) * hidden + cols
                tl.store(my_slot + offs, tl.load(inp + offs, mask=cmask), mask=cmask, cache_modifier=".cg")
        ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
        ok = ok & healthy

        # This rank's chunk: reduce, add, normalise; publish both results in its own slot.
        rows_mine = tl.minimum(chunk, num_rows - rank * chunk)
        for i in range(pid, rows_mine, num_programs):
            offs = (rank * chunk + i) * hidden + cols
            new_res, normed = _add_norm_row(
                bases, peers, src_offsets, offs, cmask, residual, weight_f32, hidden, eps, ok, DTYPE, W
            )
            tl.store(my_slot + offs, new_res, mask=cmask, cache_modifier=".cg")
            tl.store(my_slot + normed_stage + offs, normed, mask=cmask, cache_modifier=".cg")
            tl.store(residual_out + offs, new_res, mask=cmask)
            tl.store(normed_out + offs, normed, mask=cmask)
        ok = _barrier(bases, peers, ctrl, table, rank, PHASE_MID, pid, epoch + 1, timeout, W, WP, USE_PTX) & ok

        # Gather chunk c's two results from rank c.
        for c in tl.static_range(W):
            if c != rank:
                owner = _ptr(_pick(bases, peers, c) + slot_offset, DTYPE)
                rows_in_chunk = tl.minimum(chunk, num_rows - c * chunk)
                for i in range(pid, rows_in_chunk, num_programs):
                    offs = (c * chunk + i) * hidden + cols
                    new_res = _nan_unless(ok, tl.load(owner + offs, mask=cmask, cache_modifier=".cg"))
                    normed = _nan_unless(ok, tl.load(owner + normed_stage + offs, mask=cmask, cache_modifier=".cg"))
                    tl.store(residual_out + offs, new_res, mask=cmask)
                    tl.store(normed_out + offs, normed, mask=cmask)
    else:
        for row in range(pid, num_rows, num_programs):
            offs = row * hidden + cols
            tl.store(my_slot + offs, tl.load(inp + offs, mask=cmask), mask=cmask, cache_modifier=".cg")
        ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
        ok = ok & healthy
        for row in range(pid, num_rows, num_programs):
            offs = row * hidden + cols
            new_res, normed = _add_norm_row(
                bases, peers, src_offsets, offs, cmask, residual, weight_f32, hidden, eps, ok, DTYPE, W
            )
            tl.store(residual_out + offs, new_res, mask=cmask)
            tl.store(normed_out + offs, normed, mask=cmask)
    _finish(ctrl, epoch, num_programs)
