"""Two-shot all-reduce whose payload travels as FP8: about half the bytes of a 16-bit two-shot.

The message is cut into ``W`` chunks as in ``sagellm_comm/kernels/all_reduce.py``'s two-shot, each a multiple
of ``FP8_GROUP`` (128) elements, so a 128-element *block* never straddles two chunks.  Every block that leaves a
rank travels as 128 e4m3fn values and one fp32 scale (``sagellm_comm/kernels/fp8.py``:
``s = max(amax / 448, FP8_SCALE_FLOOR)``, ``q = e4m3(v / s)``), 132 bytes instead of 256 (bf16):

1. rank ``r`` quantises every chunk ``c != r`` of its input and stages it in its slot (``q`` at byte ``c * chunk``
   of the slot's FP8 region, the scales at block ``c * chunk / 128`` of its scale region);
2. start barrier;
3. rank ``r`` reduces chunk ``r``: in rank order, fp32, its own term from its input at full precision and every
   peer's dequantised ``q * s``; then quantises the sum the same way and publishes it in the same place of its own
   slot (nobody reads chunk ``r`` of rank ``r``'s slot in phase 1), and writes ``q * s`` rounded to the input
   dtype into its output;
4. mid barrier;
5. every rank gathers chunk ``c`` from rank ``c`` and writes ``q * s`` rounded to the input dtype.

Each chunk's result is computed once and every rank (its owner included) returns the dequantised published
values, so all ranks get identical bits.  The error against an fp32 sum has two parts: each peer's term rounded
to 4 significant bits relative to its block's largest magnitude, and the sum rounded once more the same way
(``bench/fp8_payload_error.py`` measures it); a block scale is at least ``2**-117``, so a block whose largest
magnitude is under about ``2.5e-33`` keeps fewer bits (at most ``2**-127`` off an element for each rounding).
A block's scale is taken from its finite values, and a
non-finite element (an inf or NaN in an input) travels as FP8 NaN: it is NaN in the output (FP8 has no infinity),
the other elements of its block are unaffected.  A sum of finite terms is finite: past the fp32 range (a peer's
term rounded up by its FP8 step can carry a sum that fits fp32 past it) it saturates at +-FLT_MAX, and past a 16-bit
dtype's range at that dtype's largest value.

Flags, epochs, the double-buffered staging slot (``epoch % 2``), bounded waits, the error record and NaN outputs
after a failed wait are those of ``all_reduce.py`` (its invariants 1-5); there is no zero-copy form (the input
is read by its own rank only, to quantise it), so no end barrier.  Staging a message of ``n`` elements takes
``W * chunk`` bytes of FP8 and ``4 * W * chunk / 128`` bytes of scales (:func:`stage_bytes`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    PHASE_MID,
    _barrier,
    _finish,
    _nan_unless,
    _pick,
    _prologue,
    _ptr,
    _slot_offset,
    _start_barrier,
)
from sagellm_comm.kernels.fp8 import FP8_GROUP, _dynamic_scale, _from_e4m3, _to_e4m3

FLT32_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite fp32 value


def chunk_elements(numel: int, world_size: int) -> int:
    """Elements per chunk: ``cdiv(numel, W)`` rounded up to a multiple of 128 (host side of the kernel's)."""
    group = FP8_GROUP.value
    per_rank = (numel + world_size - 1) // world_size
    return (per_rank + group - 1) // group * group


def stage_bytes(numel: int, world_size: int) -> int:
    """Bytes of the staging slot a call of ``numel`` elements uses: the FP8 region, then the scales."""
    chunk = chunk_elements(numel, world_size)
    return (world_size * chunk + 15) // 16 * 16 + world_size * chunk // FP8_GROUP.value * 4


@triton.jit
def _saturated(v, dtype: tl.constexpr):
    """fp32 ``v`` in ``dtype``, finite values saturating at its largest: a peer's term rounded up by its FP8 step
    can carry a sum that fits the dtype past its range (65408 in fp16 to 65504 + 1139), which the cast would make
    inf.  Infinite and NaN values stay."""
    if dtype == tl.float16 or dtype == tl.bfloat16:
        big: tl.constexpr = 65504.0 if dtype == tl.float16 else 3.3895313892515355e38
        v = tl.where(tl.abs(v) <= FLT32_MAX, tl.minimum(tl.maximum(v, -big), big), v)
    return v.to(dtype)


@triton.jit
def _finite_sum(acc, own):
    """The fp32 sum ``acc`` of a chunk's terms, ``own`` the reducing rank's: an infinity that only an overflow of
    finite terms made (a peer's infinite or NaN input arrives as NaN) held at +-FLT_MAX."""
    overflow = (tl.abs(acc) == float("inf")) & (tl.abs(own) < float("inf"))
    return tl.where(overflow, tl.where(acc > 0, FLT32_MAX, -FLT32_MAX), acc)


@triton.jit
def _tile(c, tile, chunk, numel, BLOCK: tl.constexpr):
    """Element offsets ``[BLOCK // 128, 128]`` of tile ``tile`` of chunk ``c``, their mask, the tile's block indices
    (``[BLOCK // 128]``, into the scale region) and their mask."""
    blocks = tl.arange(0, BLOCK // FP8_GROUP)
    in_chunk = tile * BLOCK + blocks[:, None] * FP8_GROUP + tl.arange(0, FP8_GROUP)[None, :]
    offs = c * chunk + in_chunk
    mask = (in_chunk < chunk) & (offs < numel)
    first = c * chunk + tile * BLOCK + blocks * FP8_GROUP  # each block's first element
    block_mask = (tile * BLOCK + blocks * FP8_GROUP < chunk) & (first < numel)
    return offs, mask, first // FP8_GROUP, block_mask


@triton.jit
def _quantize_finite_blocks(v, USE_PTX: tl.constexpr):
    """As ``kernels/fp8.py``'s block quantiser, except that a block's scale comes from its finite values and an
    infinite element travels as FP8 NaN: an inf (an input's, or a sum with one) is non-finite in its element only,
    instead of an inf scale that turns every other element of the block into ``0 * inf = NaN``."""
    a = tl.abs(v)
    finite = a < float("inf")  # False for inf and NaN
    s = _dynamic_scale(tl.max(tl.where(finite, a, 0.0), axis=1))
    v = tl.where(finite | (v != v), v, float("nan"))
    return _to_e4m3(tl.div_rn(v, s[:, None]), USE_PTX), s


@triton.jit
def _publish(q_region, scale_region, offs, mask, block_ids, block_mask, q, s):
    """Store a quantised tile: its FP8 bits and its block scales."""
    tl.store(q_region + offs, q.to(tl.uint8, bitcast=True), mask=mask, cache_modifier=".cg")
    tl.store(scale_region + block_ids, s, mask=block_mask, cache_modifier=".cg")


@triton.jit
def _dequantized(q_region, scale_region, offs, mask, block_ids, block_mask, USE_PTX: tl.constexpr):
    """``q * s`` (fp32) of a published tile; 0 where masked."""
    bits = tl.load(q_region + offs, mask=mask, other=0, cache_modifier=".cg")
    s = tl.load(scale_region + block_ids, mask=block_mask, other=0.0, cache_modifier=".cg")
    return _from_e4m3(bits.to(tl.float8e4nv, bitcast=True), USE_PTX) * s[:, None]


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def two_shot_fp8_all_reduce_kernel(
    inp,
    out,
    table,
    ctrl,
    numel,
    rank,
    slot_bytes,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Two-shot all-reduce of ``numel`` elements with an FP8 payload (module docstring); ``out`` may alias ``inp``.

    ``BLOCK``: elements per tile, a multiple of 128.  With ``VIRTUAL``, ``inp``/``out`` are ``[W, numel]`` and row
    ``r`` belongs to rank ``r`` (grid axis 1).
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    chunk = tl.multiple_of(tl.cdiv(tl.cdiv(numel, W), FP8_GROUP) * FP8_GROUP, FP8_GROUP)
    scale_offset = tl.cdiv(W * chunk, 16) * 16
    tiles_per_chunk = tl.cdiv(chunk, BLOCK)
    my_base = _pick(bases, peers, rank) + slot_offset
    my_q = _ptr(my_base, tl.uint8)
    my_scales = _ptr(my_base + scale_offset, tl.float32)

    # 1. Quantise and stage the chunks peers reduce (chunk ``rank`` is reduced here, from ``inp``).
    for c in tl.static_range(W):
        if c != rank:
            for tile in range(pid, tiles_per_chunk, num_programs):
                offs, mask, block_ids, block_mask = _tile(c, tile, chunk, numel, BLOCK)
                v = tl.load(inp + offs, mask=mask, other=0.0).to(tl.float32)
                q, s = _quantize_finite_blocks(v, USE_PTX)
                _publish(my_q, my_scales, offs, mask, block_ids, block_mask, q, s)
    ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
    ok = ok & healthy

    # 2. Reduce chunk ``rank`` in rank order (own term at full precision), publish it as FP8, keep its dequantised
    #    value: the one every peer will read.
    for tile in range(pid, tiles_per_chunk, num_programs):
        offs, mask, block_ids, block_mask = _tile(rank, tile, chunk, numel, BLOCK)
        own = tl.load(inp + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros(offs.shape, tl.float32)
        for p in tl.static_range(W):
            peer = _pick(bases, peers, p) + slot_offset
            # Full-shape masks: the interpreter's ``&`` of a tensor and a scalar condition is not a boolean.
            theirs = _dequantized(
                _ptr(peer, tl.uint8), _ptr(peer + scale_offset, tl.float32), offs, mask & (offs * 0 + p != rank),
                block_ids, block_mask & (block_ids * 0 + p != rank), USE_PTX,
            )  # fmt: skip
            acc += tl.where(p == rank, own, theirs)
        q, s = _quantize_finite_blocks(_nan_unless(ok, _finite_sum(acc, own)), USE_PTX)
        _publish(my_q, my_scales, offs, mask, block_ids, block_mask, q, s)
        tl.store(out + offs, _saturated(_from_e4m3(q, USE_PTX) * s[:, None], DTYPE), mask=mask)
    ok = _barrier(bases, peers, ctrl, table, rank, PHASE_MID, pid, epoch + 1, timeout, W, WP, USE_PTX) & ok

    # 3. Gather chunk ``c`` from rank ``c``.
    for c in tl.static_range(W):
        if c != rank:
            owner = _pick(bases, peers, c) + slot_offset
            for tile in range(pid, tiles_per_chunk, num_programs):
                offs, mask, block_ids, block_mask = _tile(c, tile, chunk, numel, BLOCK)
                v = _dequantized(
                    _ptr(owner, tl.uint8), _ptr(owner + scale_offset, tl.float32), offs, mask, block_ids, block_mask,
                    USE_PTX,
                )  # fmt: skip
                tl.store(out + offs, _saturated(_nan_unless(ok, v), DTYPE), mask=mask)
    _finish(ctrl, epoch, num_programs)
