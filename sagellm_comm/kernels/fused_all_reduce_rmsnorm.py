"""All-reduce fused with the residual add, RMSNorm and (optionally) FP8 quantisation that end every TP block.

Given on every rank ``x`` ([rows, hidden], this rank's partial sums), ``residual`` ([rows, hidden]) and
``weight`` ([hidden]), every rank gets::

    reduced      = sum over ranks of x, in rank order, in fp32, rounded to the dtype   (= the all-reduce)
    new_residual = (reduced + residual) in fp32, rounded to the dtype                 (= torch's add)
    normed       = new_residual * rsqrt(mean(new_residual ** 2) + eps) * weight, in fp32, rounded

in one pass over the reduced data: the reduced row never goes back to memory before it is normalised.
Rounding ``reduced`` to the dtype first makes ``new_residual`` bit-identical to the unfused sequence
(all-reduce, then add).  ``QUANT`` (a constexpr, ``sagellm_comm/kernels/fp8.py``) says what leaves as ``out``:

* ``QUANT_NONE``: ``normed`` itself;
* ``QUANT_STATIC``: ``e4m3(clamp(normed / s, -448, 448))`` with the caller's scale ``s`` (``scales[0]``);
* ``QUANT_PER_TOKEN``: the same with ``s = max(amax(|normed row|) / 448, FP8_SCALE_FLOOR)``, stored in
  ``scales[row]``;
* ``QUANT_GROUP``: one such scale per 128 elements of a row, ``scales[row, g]``.

``normed`` is quantised as the unfused chain would hold it (rounded to the dtype), so the quantiser sees the
same values as ``sagellm_comm.fused.quantize_fp8_reference`` applied to the unfused RMSNorm output.

The workspace, flags, epochs, staging slots, bounded waits and error record are those of
``sagellm_comm/kernels/all_reduce.py`` (its docstring states the invariants; its helpers are imported, not
copied), and the Lamport buffers, per-program state and sentinel those of
``sagellm_comm/kernels/lamport_all_reduce.py``, so these kernels and the plain all-reduce kernels can be
called in any order on one workspace: the barrier kernels advance the same device-side epoch and use staging
slot ``epoch % 2``, the Lamport kernels the same per-program Lamport counters.

Algorithms (``W`` ranks; a *row* is the unit of work, so the norm's reduction stays inside one program; row
``i`` belongs to program ``i % P`` on every rank and in every phase, so program ``b`` only waits for program
``b`` of its peers, invariant 1 of ``all_reduce.py``):

* one-shot: each rank copies ``x`` into its staging slot; barrier; program ``b`` owns rows
  ``b, b + P, ...``: reads each of its rows from every rank's slot, reduces, adds the residual, normalises,
  quantises and writes the outputs.  Every rank computes every row from the same data in the same order, so
  the outputs are bit-identical when the residuals are (as they are in tensor parallelism).
* two-shot: rows are cut into ``W`` chunks of ``cdiv(rows, W)``; rank ``r`` computes chunk ``r`` only and
  publishes it in its own slot: ``new_residual`` over its staged ``x`` rows (nobody else reads chunk ``r`` of
  rank ``r``'s slot), ``out`` and the scales behind them (:func:`_stage_regions`); barrier; every rank gathers
  chunk ``c``'s outputs from rank ``c``.  Each row is computed exactly once, so every rank gets identical bits
  even if the residuals differ.  No end barrier: only staging slots are read by peers, and they are
  double-buffered by epoch parity (invariant 3).
* Lamport (small messages): no barrier.  Each program pushes its rows of ``x`` into slot ``rank`` of the
  current Lamport buffer of every rank, clears what was pushed to it at the previous Lamport call, then polls
  its rows until no element holds the sentinel and finishes them as one-shot does.  Same buffers, rotation,
  per-program counters and bounded waits as the plain Lamport all-reduce (every launch uses the group's
  ``max_programs`` programs).  With few rows each row is split over ``SPLIT`` programs (whole 128-element
  groups each) that exchange the row's sum of squares, and per token its amax, through this rank's control
  words (:func:`_row_exchange`): a token then moves through as many programs as a plain all-reduce of its
  bytes, not through one.

A failed wait (or a workspace latched before the call) makes every value the call writes NaN, the scales
included (FP8 NaN is ``0x7F``): a failed call's outputs never pass for results.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CTRL_ROW,
    CTRL_ROW_WORDS,
    MAX_BLOCKS,
    PHASE_MID,
    PHASE_ROW,
    _barrier,
    _bounded_wait,
    _finish,
    _nan_unless,
    _pick,
    _prologue,
    _ptr,
    _rank_view,
    _reduce_tile,
    _slot_offset,
    _start_barrier,
)
from sagellm_comm.kernels.fp8 import (
    FP8_GROUP,
    QUANT_GROUP,
    QUANT_NONE,
    QUANT_PER_TOKEN,
    QUANT_STATIC,
    _dynamic_scale,
    _quantize_blocks,
    _to_e4m3,
)
from sagellm_comm.kernels.lamport_all_reduce import (
    _clear_previous,
    _load_state,
    _push_tile,
    _save_state,
    _wait_tile,
)

LAMPORT_CLEAR_BLOCK = tl.constexpr(1024)  # 32-bit words per program and step when clearing Lamport buffers


def stage_bytes(rows: int, hidden: int, itemsize: int, quant: int) -> int:
    """Bytes of the staging slot a two-shot call uses (host side of :func:`_stage_regions`)."""
    first = (rows * hidden * itemsize + 15) // 16 * 16
    out_itemsize = itemsize if quant == QUANT_NONE.value else 1
    second = (rows * hidden * out_itemsize + 15) // 16 * 16
    return first + second + rows * scale_columns(hidden, quant) * 4


def scale_columns(hidden: int, quant: int) -> int:
    """fp32 scales per row that ``quant`` produces (0: none, or the caller's one)."""
    if quant == QUANT_PER_TOKEN.value:
        return 1
    if quant == QUANT_GROUP.value:
        return hidden // FP8_GROUP.value
    return 0


@triton.jit
def _stage_regions(num_rows, hidden, ITEMSIZE: tl.constexpr, OUT_ITEMSIZE: tl.constexpr):
    """Byte offsets in a two-shot staging slot of the ``out`` rows and of their scales, 16-byte aligned.

    ``[0, rows * hidden * ITEMSIZE)``: the staged ``x`` (the owner's chunk overwritten by ``new_residual``);
    then ``out`` (``OUT_ITEMSIZE`` bytes an element); then the dynamic scales (fp32, ``rows * columns``).
    """
    elems = num_rows.to(tl.int64) * hidden
    out_offset = tl.cdiv(elems * ITEMSIZE, 16) * 16
    scale_offset = out_offset + tl.cdiv(elems * OUT_ITEMSIZE, 16) * 16
    return out_offset, scale_offset


@triton.jit
def _new_residual(reduced, ok, res, DTYPE: tl.constexpr):
    """``new_residual`` of a row (or part of one) from its all-reduced fp32 values: rounded to ``DTYPE`` (the
    all-reduce's output), added to the residual in fp32, rounded again (torch's add).  NaN where not ``ok``."""
    return (_nan_unless(ok, reduced).to(DTYPE).to(tl.float32) + res.to(tl.float32)).to(DTYPE)


@triton.jit
def _normalise(v, sum_sq, weight_f32, hidden, eps, DTYPE: tl.constexpr):
    """RMSNorm of ``v`` (fp32 ``new_residual``) given the row's sum of squares, rounded to ``DTYPE``."""
    rstd = 1.0 / tl.sqrt_rn(sum_sq / hidden + eps)
    return (v * rstd * weight_f32).to(DTYPE)


@triton.jit
def _quantize_row(normed, static_scale, ok, QUANT: tl.constexpr, BLOCK_H: tl.constexpr, USE_PTX: tl.constexpr):
    """``(out, scale)`` of one row: ``normed`` itself (``QUANT_NONE``) or its FP8 values and scale(s): a scalar
    (static, per-token) or ``[BLOCK_H // FP8_GROUP]`` (group).  Padding lanes of ``normed`` hold 0.

    Both are NaN where ``ok`` is False (a wait before them failed)."""
    if QUANT == QUANT_NONE:
        out = normed
        scale = static_scale
    else:
        y = _nan_unless(ok, normed.to(tl.float32))
        if QUANT == QUANT_GROUP:
            q, scale = _quantize_blocks(tl.reshape(y, [BLOCK_H // FP8_GROUP, FP8_GROUP]), USE_PTX)
            out = tl.reshape(q, [BLOCK_H])
        else:
            if QUANT == QUANT_PER_TOKEN:
                scale = _dynamic_scale(tl.max(tl.abs(y), axis=0))
            else:
                scale = static_scale
            out = _to_e4m3(tl.div_rn(y, scale), USE_PTX)
        scale = _nan_unless(ok, scale)
    return out, scale


@triton.jit
def _finish_row(
    reduced,
    ok,
    residual,
    offs,
    cmask,
    weight_f32,
    static_scale,
    hidden,
    eps,
    QUANT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DTYPE: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """The epilogue the barrier kernels run on a whole reduced row: ``(new_residual, out, scale)``."""
    new_res = _new_residual(reduced, ok, tl.load(residual + offs, mask=cmask, other=0.0), DTYPE)
    v = new_res.to(tl.float32)
    normed = _normalise(v, tl.sum(v * v, axis=0), weight_f32, hidden, eps, DTYPE)
    out, scale = _quantize_row(normed, static_scale, ok, QUANT, BLOCK_H, USE_PTX)
    return new_res, out, scale


ROW_EMPTY = tl.constexpr(-1)  # a row-exchange word nobody has written yet (all ones: a NaN no arithmetic makes)
ROW_FAILED = tl.constexpr(0x7FC00001)  # a program whose wait failed (a NaN payload no arithmetic makes)
ROW_NAN = tl.constexpr(0x7FC00000)  # every NaN value is published as this one
ROW_QUICK_POLLS = tl.constexpr(64)  # polls of a row exchange before its wait reads the clock and the latch


@triton.jit
def _poll_row(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr, _A: tl.constexpr,
              _B: tl.constexpr):  # fmt: skip
    """One poll of :func:`_row_exchange` for ``_bounded_wait``: ``args = (words, rank)``, ``state = (seen,)``;
    pending is the number of the row's words still empty."""
    words, _ = args
    seen = tl.load(words, volatile=True)
    return (seen,), tl.sum((seen == ROW_EMPTY).to(tl.int32), axis=0)


@triton.jit
def _this_rank(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr, _A: tl.constexpr,
               _B: tl.constexpr):  # fmt: skip
    """Whom a row exchange's timeout names: this rank (its own programs did not all run)."""
    _, rank = args
    return rank


@triton.jit
def _row_exchange(
    words,
    value,
    ok,
    latched,
    ctrl,
    table,
    rank,
    pid,
    call_flag,
    timeout,
    SPLIT: tl.constexpr,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """The ``SPLIT`` programs that share a row (``pid // SPLIT`` equal) exchange one fp32 ``value`` each.

    ``words``: the ``MAX_BLOCKS`` 32-bit words of this exchange in the current buffer of this rank's control words
    (one per program, empty: all ones).  Data is the flag, as in the Lamport all-reduce: this program stores its
    value's bits in its word (every NaN as one NaN, and ``ROW_FAILED`` if ``ok`` is False: a wait before it failed),
    then loads the row's words until none is empty, through the bounded wait, whose first ``ROW_QUICK_POLLS``
    polls are bare (a word is written by one aligned 32-bit store, so it is either empty or the whole value; the
    loads are volatile).  The programs of a launch run at once (the workspace's grid), so the wait ends; its
    deadline is twice the kernel timeout, so that a program waiting for a missing peer's data records that peer
    first.  ``call_flag`` names the call in a timeout record (``2 * call + 1`` or ``2 * call + 2``).

    Returns ``(values, ok, latched)``: the row's values in program order (the same vector in every program of the
    row, so each reduces it to the same bits), whether every program of the row published a value, and the latch.
    """
    bits = tl.where(value != value, ROW_NAN, value.to(tl.int32, bitcast=True))
    tl.store(words + pid, tl.where(ok, bits, ROW_FAILED))
    row_words = words + pid // SPLIT * SPLIT + tl.arange(0, SPLIT)
    seen = tl.load(row_words, volatile=True)
    pending = tl.sum((seen == ROW_EMPTY).to(tl.int32), axis=0)
    if (pending > 0) & (latched == 0):
        state, pending, latched = _bounded_wait(
            _poll_row, _this_rank, (row_words, rank), (seen,), pending, latched, ctrl, table, PHASE_ROW, pid,
            call_flag, timeout.to(tl.int64) * 2, W, WP, USE_PTX, False, False, False, ROW_QUICK_POLLS,
        )  # fmt: skip
        seen = state[0]
    failed = tl.sum((seen == ROW_FAILED).to(tl.int32), axis=0)
    return seen.to(tl.float32, bitcast=True), (pending == 0) & (failed == 0), latched


@triton.jit
def _store_scales(scales, row, scale, hidden, col0, width, QUANT: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row ``row``'s dynamic scale(s) into ``scales`` (``[rows, 1]`` or ``[rows, hidden // FP8_GROUP]`` fp32).

    ``col0``, ``width``: the columns of the row this program holds (``0``, ``hidden`` unless a row is split over
    programs; ``col0`` a multiple of ``FP8_GROUP``); ``scale`` holds the group scales of ``BLOCK_H // FP8_GROUP``
    groups from ``col0``, of which those inside the held columns are stored.  A per-token scale is stored by the
    program that holds the row's start."""
    if QUANT == QUANT_PER_TOKEN:
        if col0 == 0:
            tl.store(scales + row, scale)
    elif QUANT == QUANT_GROUP:
        g = tl.arange(0, BLOCK_H // FP8_GROUP)
        tl.store(scales + row * (hidden // FP8_GROUP) + col0 // FP8_GROUP + g, scale, mask=g < width // FP8_GROUP)


@triton.jit
def _load_scales(scales, row, hidden, QUANT: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row ``row``'s dynamic scale(s) from ``scales`` (the layout of :func:`_store_scales`)."""
    if QUANT == QUANT_GROUP:
        groups = hidden // FP8_GROUP
        g = tl.arange(0, BLOCK_H // FP8_GROUP)
        scale = tl.load(scales + row * groups + g, mask=g < groups, other=0.0, cache_modifier=".cg")
    else:
        scale = tl.load(scales + row, cache_modifier=".cg")
    return scale


@triton.jit
def _fp8_nan_unless(ok, q):
    """``q`` (e4m3fn) where ``ok``, else FP8 NaN (``0x7F``); selected on the bits."""
    bits = tl.where(ok, q.to(tl.uint8, bitcast=True), 0x7F)
    return bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _setup(weight, scales, col0, width, QUANT: tl.constexpr, BLOCK_H: tl.constexpr):
    """The columns ``col0 .. col0 + width - 1`` of a row this program holds, their mask, their weight in fp32 and
    the static scale (1.0 unless ``QUANT_STATIC``)."""
    lane = tl.arange(0, BLOCK_H)
    cols = col0 + lane
    cmask = lane < width
    weight_f32 = tl.load(weight + cols, mask=cmask, other=0.0).to(tl.float32)
    if QUANT == QUANT_STATIC:
        static_scale = tl.load(scales)
    else:
        static_scale = tl.full([], 1.0, tl.float32)
    return cols, cmask, weight_f32, static_scale


@triton.jit(do_not_specialize=["num_rows", "rank", "slot_bytes", "timeout"])
def all_reduce_rmsnorm_kernel(
    inp,
    residual,
    weight,
    out,
    scales,
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
    QUANT: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Fused all-reduce + residual add + RMSNorm (+ FP8) of ``[num_rows, hidden]``, one-shot or two-shot.

    ``inp``, ``residual``, ``residual_out``: contiguous ``[num_rows, hidden]`` of one dtype (``residual_out`` may
    alias ``residual``); ``weight``: ``[hidden]``; ``out``: ``[num_rows, hidden]``, the dtype (``QUANT_NONE``, may
    alias ``inp``) or e4m3fn; ``scales``: the caller's one-element fp32 scale (static), the ``[num_rows, 1]`` /
    ``[num_rows, hidden // 128]`` fp32 output (dynamic), any tensor (none).  ``BLOCK_H >= hidden``: a program
    holds one whole row.  With ``VIRTUAL`` every per-rank tensor gains a leading ``[W]`` dimension (the static
    scale is shared) and rank ``r`` (grid axis 1) uses block ``r``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        shift = rank * num_rows * hidden
        inp += shift
        residual += shift
        out += shift
        residual_out += shift
        if QUANT == QUANT_PER_TOKEN:
            scales += rank * num_rows
        if QUANT == QUANT_GROUP:
            scales += rank * num_rows * (hidden // FP8_GROUP)
    DTYPE: tl.constexpr = inp.dtype.element_ty
    OUT_DTYPE: tl.constexpr = out.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    src_offsets = tl.full([WP], 0, tl.int64) + slot_offset  # every rank's staged rows: no zero-copy here
    my_slot_base = _pick(bases, peers, rank) + slot_offset
    my_slot = _ptr(my_slot_base, DTYPE)
    cols, cmask, weight_f32, static_scale = _setup(weight, scales, 0, hidden, QUANT, BLOCK_H)

    if TWO_SHOT:
        chunk = tl.cdiv(num_rows, W)
        out_offset, scale_offset = _stage_regions(
            num_rows, hidden, DTYPE.primitive_bitwidth // 8, OUT_DTYPE.primitive_bitwidth // 8
        )
        for c in tl.static_range(W):
            rows_in_chunk = tl.minimum(chunk, num_rows - c * chunk)
            for i in range(pid, rows_in_chunk, num_programs):
                offs = (c * chunk + i) * hidden + cols
                tl.store(my_slot + offs, tl.load(inp + offs, mask=cmask), mask=cmask, cache_modifier=".cg")
        ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
        ok = ok & healthy

        # This rank's chunk: reduce, add, normalise, quantise; publish the results in its own slot.
        my_out = _ptr(my_slot_base + out_offset, OUT_DTYPE)
        my_scales = _ptr(my_slot_base + scale_offset, tl.float32)
        rows_mine = tl.minimum(chunk, num_rows - rank * chunk)
        for i in range(pid, rows_mine, num_programs):
            row = rank * chunk + i
            offs = row * hidden + cols
            reduced = _reduce_tile(bases, peers, src_offsets, offs, cmask, DTYPE, W)
            new_res, row_out, scale = _finish_row(
                reduced, ok, residual, offs, cmask, weight_f32, static_scale, hidden, eps, QUANT, BLOCK_H, DTYPE,
                USE_PTX,
            )  # fmt: skip
            tl.store(my_slot + offs, new_res, mask=cmask, cache_modifier=".cg")
            tl.store(my_out + offs, row_out, mask=cmask, cache_modifier=".cg")
            _store_scales(my_scales, row, scale, hidden, 0, hidden, QUANT, BLOCK_H)
            tl.store(residual_out + offs, new_res, mask=cmask)
            tl.store(out + offs, row_out, mask=cmask)
            _store_scales(scales, row, scale, hidden, 0, hidden, QUANT, BLOCK_H)
        ok = _barrier(bases, peers, ctrl, table, rank, PHASE_MID, pid, epoch + 1, timeout, W, WP, USE_PTX) & ok

        # Gather chunk c's results from rank c.
        for c in tl.static_range(W):
            if c != rank:
                owner_base = _pick(bases, peers, c) + slot_offset
                owner = _ptr(owner_base, DTYPE)
                owner_out = _ptr(owner_base + out_offset, OUT_DTYPE)
                owner_scales = _ptr(owner_base + scale_offset, tl.float32)
                rows_in_chunk = tl.minimum(chunk, num_rows - c * chunk)
                for i in range(pid, rows_in_chunk, num_programs):
                    row = c * chunk + i
                    offs = row * hidden + cols
                    new_res = _nan_unless(ok, tl.load(owner + offs, mask=cmask, cache_modifier=".cg"))
                    row_out = tl.load(owner_out + offs, mask=cmask, cache_modifier=".cg")
                    tl.store(residual_out + offs, new_res, mask=cmask)
                    if QUANT == QUANT_NONE:
                        tl.store(out + offs, _nan_unless(ok, row_out), mask=cmask)
                    else:
                        tl.store(out + offs, _fp8_nan_unless(ok, row_out), mask=cmask)
                        if QUANT != QUANT_STATIC:
                            scale = _nan_unless(ok, _load_scales(owner_scales, row, hidden, QUANT, BLOCK_H))
                            _store_scales(scales, row, scale, hidden, 0, hidden, QUANT, BLOCK_H)
    else:
        for row in range(pid, num_rows, num_programs):
            offs = row * hidden + cols
            tl.store(my_slot + offs, tl.load(inp + offs, mask=cmask), mask=cmask, cache_modifier=".cg")
        ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
        ok = ok & healthy
        for row in range(pid, num_rows, num_programs):
            offs = row * hidden + cols
            reduced = _reduce_tile(bases, peers, src_offsets, offs, cmask, DTYPE, W)
            new_res, row_out, scale = _finish_row(
                reduced, ok, residual, offs, cmask, weight_f32, static_scale, hidden, eps, QUANT, BLOCK_H, DTYPE,
                USE_PTX,
            )  # fmt: skip
            tl.store(residual_out + offs, new_res, mask=cmask)
            tl.store(out + offs, row_out, mask=cmask)
            _store_scales(scales, row, scale, hidden, 0, hidden, QUANT, BLOCK_H)
    _finish(ctrl, epoch, num_programs)


@triton.jit(do_not_specialize=["num_rows", "rank", "lamport_offset", "cap", "timeout"])
def lamport_all_reduce_rmsnorm_kernel(
    inp,
    residual,
    weight,
    out,
    scales,
    residual_out,
    table,
    ctrl,
    num_rows,
    hidden,
    eps,
    rank,
    lamport_offset,
    cap,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    QUANT: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
    PDL: tl.constexpr,
    SPLIT: tl.constexpr = 1,
):
    """Barrier-free fused all-reduce + residual add + RMSNorm (+ FP8) of ``num_rows * hidden <= cap`` elements.

    Tensors as for :func:`all_reduce_rmsnorm_kernel`; ``lamport_offset`` and ``cap`` as for the plain Lamport
    kernel (``sagellm_comm/kernels/lamport_all_reduce.py``), whose buffers, per-program state and grid (every
    launch on a workspace uses the same number of programs) this kernel shares.  With ``PDL`` only the peer
    table is read before ``griddepcontrol.wait``.

    ``SPLIT`` (a power of two, ``hidden % (128 * SPLIT) == 0``) programs share each row, and with ``SPLIT > 1``
    the grid of ``P`` programs must hold every row at once (``num_rows <= P // SPLIT``, as
    ``sagellm_comm.fused.rmsnorm.row_split`` chooses): program ``p`` holds the 128-aligned segment ``p % SPLIT``
    of row ``p // SPLIT`` (programs past ``SPLIT * num_rows`` hold none).  A row's programs push, poll and
    reduce their segments in parallel and meet in :func:`_row_exchange` for the row's sum of squares (and, per
    token, its amax): a few small rows then use as many programs as a plain all-reduce of the same bytes,
    instead of one program moving a whole row.  Each program publishes one value per exchange and call (a
    second row per program would overwrite its word while a row-mate may still read it).  The exchange needs
    the row's programs to run concurrently, which the Triton interpreter does not do: the host launches
    ``SPLIT = 1`` there.
    """
    rank, table, ctrl, peers, bases = _rank_view(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        shift = rank * num_rows * hidden
        inp += shift
        residual += shift
        out += shift
        residual_out += shift
        if QUANT == QUANT_PER_TOKEN:
            scales += rank * num_rows
        if QUANT == QUANT_GROUP:
            scales += rank * num_rows * (hidden // FP8_GROUP)
    DTYPE: tl.constexpr = inp.dtype.element_ty
    WIDE: tl.constexpr = DTYPE.primitive_bitwidth == 32
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # This program's segment and rows; its first row's input and residual, the weight, the Lamport state and the
    # latch: one round trip (the residual is needed only after the poll, its load hides behind it).
    segment = hidden // SPLIT
    row_step = num_programs // SPLIT
    first_row = tl.where(pid < row_step * SPLIT, pid // SPLIT, num_rows)
    col0 = (pid % SPLIT) * segment
    cols, cmask, weight_f32, static_scale = _setup(weight, scales, col0, segment, QUANT, BLOCK_H)
    first_offs = first_row * hidden + cols
    first_mask = cmask & (first_offs < num_rows * hidden)  # this program holds a row
    first = tl.load(inp + first_offs, mask=first_mask, other=0.0)
    first_res = tl.load(residual + first_offs, mask=first_mask, other=0.0)
    lepoch, buf, prev_buf, prev_words, latched = _load_state(ctrl, pid)
    if SPLIT > 1:
        row_calls = tl.load(ctrl + CTRL_ROW + pid, volatile=True)
    healthy = latched == 0
    slot_stride = cap * 4
    my_area = _pick(bases, peers, rank) + lamport_offset

    # 1. Push this program's segments into slot ``rank`` of buffer ``buf`` of every rank (a program without a
    #    row has an all-false mask: it stores nothing).
    slot_in_peer = lamport_offset + (buf * W + rank) * slot_stride
    _push_tile(first, bases, peers, slot_in_peer, first_offs, first_mask, W, DTYPE)
    for row in range(first_row + row_step, num_rows, row_step):
        offs = row * hidden + cols
        _push_tile(tl.load(inp + offs, mask=cmask, other=0.0), bases, peers, slot_in_peer, offs, cmask, W, DTYPE)

    # 2. Clear the previous call's pushes to this rank and save this program's state (as the plain kernel).
    _clear_previous(my_area, slot_stride, prev_buf, prev_words, pid, num_programs, W, LAMPORT_CLEAR_BLOCK)
    _save_state(ctrl, pid, num_rows * hidden, lepoch, DTYPE)
    if SPLIT > 1:
        # The row exchange's buffers alternate by this program's count of split-row calls (every program runs every
        # launch, so the counts agree); the other buffer, written at the previous such call and read by a launch
        # that has finished, is emptied for the next.
        exchange = (ctrl + CTRL_ROW_WORDS).to(tl.pointer_type(tl.int32))
        row_buf = (row_calls & 1).to(tl.int32)
        sum_words = exchange + row_buf * MAX_BLOCKS
        amax_words = exchange + (2 + row_buf) * MAX_BLOCKS
        tl.store(exchange + (1 - row_buf) * MAX_BLOCKS + pid, ROW_EMPTY)
        tl.store(exchange + (3 - row_buf) * MAX_BLOCKS + pid, ROW_EMPTY)
        tl.store(ctrl + CTRL_ROW + pid, row_calls + 1)

    # 3. Poll each segment until every source arrived; finish it as one-shot does, the row's sums exchanged.
    for row in range(first_row, num_rows, row_step):
        offs = row * hidden + cols
        reduced, pending, latched = _wait_tile(
            my_area, slot_stride, buf, offs, cmask, ctrl, table, pid, lepoch, latched, timeout, W, WP, WIDE, DTYPE,
            USE_PTX,
        )  # fmt: skip
        ok = healthy & (pending == 0)
        if row == first_row:
            res = first_res
        else:
            res = tl.load(residual + offs, mask=cmask, other=0.0)
        new_res = _new_residual(reduced, ok, res, DTYPE)
        v = new_res.to(tl.float32)
        sum_sq = tl.sum(v * v, axis=0)
        if SPLIT > 1:
            parts, arrived, latched = _row_exchange(
                sum_words, sum_sq, ok, latched, ctrl, table, rank, pid, 2 * lepoch + 1, timeout, SPLIT, W, WP, USE_PTX
            )  # fmt: skip
            sum_sq = tl.sum(parts, axis=0)
            ok = ok & arrived
            v = _nan_unless(ok, v)  # a row whose exchange failed is NaN in every segment, as the unsplit kernel's
            new_res = v.to(DTYPE)
        normed = _normalise(v, sum_sq, weight_f32, hidden, eps, DTYPE)
        if QUANT == QUANT_PER_TOKEN and SPLIT > 1:
            y = _nan_unless(ok, normed.to(tl.float32))
            parts, arrived, latched = _row_exchange(
                amax_words, tl.max(tl.abs(y), axis=0), ok, latched, ctrl, table, rank, pid, 2 * lepoch + 2, timeout,
                SPLIT, W, WP, USE_PTX,
            )  # fmt: skip
            scale = _nan_unless(ok & arrived, _dynamic_scale(tl.max(parts, axis=0)))
            row_out = _to_e4m3(tl.div_rn(y, scale), USE_PTX)
        else:
            row_out, scale = _quantize_row(normed, static_scale, ok, QUANT, BLOCK_H, USE_PTX)
        tl.store(residual_out + offs, new_res, mask=cmask)
        tl.store(out + offs, row_out, mask=cmask)
        _store_scales(scales, row, scale, hidden, col0, segment, QUANT, BLOCK_H)
