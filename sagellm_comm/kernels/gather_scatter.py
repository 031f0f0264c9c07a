"""Intra-node all-gather and reduce-scatter over the all-reduce's symmetric workspace: one barrier each.

Memory, flags and counters are the all-reduce's (``sagellm_comm/kernels/all_reduce.py``; the long form is
docs/protocol.md): the same regions, staging slots, signal pad, control words, error record and epoch.
A call of either kernel is one *barrier call*: it reads ``ctrl[CTRL_EPOCH]``, stages into slot
``epoch % 2``, raises the start flag of ``epoch``'s parity and advances the epoch once, exactly like a
one-shot all-reduce on the copy path.  So all-reduce, all-gather and reduce-scatter calls can be mixed in
any order on one workspace (every rank making the same sequence of calls), and they share check mode, the
error latch and the error record.

Algorithms (``W`` ranks; ``n`` elements per rank's block or chunk):

* all-gather: ``inp`` holds ``n`` elements, ``out`` ``W * n`` in rank order.  Each rank copies ``inp`` into
  its staging slot; start barrier; every rank reads block ``p`` from rank ``p``'s slot into
  ``out[p * n:(p + 1) * n]`` (its own block from ``inp``).  Staged: ``n`` elements.  Traffic into each GPU:
  ``(W - 1) * n``.  Every rank writes the same bits (a copy).
* reduce-scatter: ``inp`` holds ``W * n`` elements (chunk ``c`` is ``inp[c * n:(c + 1) * n]``), ``out`` ``n``.
  Each rank stages the ``W - 1`` chunks its peers own; start barrier; rank ``r`` sums chunk ``r`` of every
  rank in rank order 0..W-1 in fp32, rounded once (its own term read from ``inp``).  Each chunk is reduced
  once, by its owner.  The slot holds the staged chunks packed in chunk order without the own one (chunk
  ``c`` of rank ``q`` at index ``c - (c > q)``), each ``stride`` elements apart, ``stride`` = ``n`` rounded
  up to ``CHUNK_ALIGN`` elements: peers' reads stay 16-byte vectors whatever ``n``.  Staged:
  ``(W - 1) * stride`` elements.  Traffic into each GPU: ``(W - 1) * n``.

Synchronisation invariants (the all-reduce's, numbered as there):

1. *Per-block barriers.*  Tile ``t`` of a block (all-gather) or of a chunk (reduce-scatter) belongs to
   program ``t % num_programs`` on every rank, for staging and for reading alike, and ``num_programs`` and
   ``BLOCK`` depend only on ``n``, the dtype and the group's ``max_programs``.  So the tiles program ``b``
   reads from a peer's slot were staged by program ``b`` of that peer, before that program's release store
   of its start flag, which program ``b`` here acquired.
2. *64-bit epochs live on the device.*  Every program reads ``ctrl[CTRL_EPOCH]`` at start and the last one
   to finish advances it (``_finish``): one epoch per call, whichever kernel family made it.
3. *The start flag is ``2 * (epoch + 1)``.*  These kernels never read a registered region, so they announce
   the copy path (zero-copy bit 0) and ignore the peers' bits; in the parity slot of ``epoch``.
4. *Buffer reuse without an end barrier.*  Peers only ever read a rank's staging slot, never its ``inp`` or
   ``out``, so a rank may return as soon as its own reads are done.  Slot ``epoch % 2`` is written again at
   call ``epoch + 2`` only after this rank passed the start barrier of call ``epoch + 1``, which needs
   every peer's flag of ``epoch + 1``, which a peer raises only inside its next barrier call, after its
   kernel of call ``epoch`` (all its reads of this slot) finished (stream order).  Same argument as the
   one-shot all-reduce's copy path; it holds across kernel families because every one of them advances the
   same epoch and starts with this barrier.
5. *Bounded waits; a failure is never a result.*  The start barrier's wait has the all-reduce's deadline;
   on a failed wait, or on a latched workspace (``healthy`` is false: an earlier wait or a check-mode
   comparison failed), every element these kernels write to ``out`` is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CHUNK_ALIGN,
    _finish,
    _nan_unless,
    _pick,
    _prologue,
    _ptr,
    _reduce_tile_own,
    _slot_offset,
    _start_barrier,
    _tile_offsets,
)


def reduce_scatter_stride(numel: int) -> int:
    """Elements between two staged chunks of a reduce-scatter of ``numel`` elements per chunk (host side)."""
    align = CHUNK_ALIGN.value
    return (numel + align - 1) // align * align


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def all_gather_kernel(
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
    STAGES: tl.constexpr,
):
    """All-gather ``numel`` elements of every rank: ``out[p * numel + i] = inp_p[i]``.

    ``inp`` may be this rank's block of ``out`` (in place); it may not overlap another block.  With
    ``VIRTUAL``, ``inp`` is ``[W, numel]``, ``out`` ``[W, W * numel]``, and row ``r`` belongs to rank ``r``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    wide = tl.cast(numel, tl.int64)  # block offsets: up to W * W * numel elements in VIRTUAL mode
    if VIRTUAL:
        inp += rank * wide
        out += rank * (W * wide)
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    my_slot = _ptr(_pick(bases, peers, rank) + slot_offset, DTYPE)
    num_tiles = tl.cdiv(numel, BLOCK)
    lane = tl.arange(0, BLOCK)

    for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
        offs, mask = _tile_offsets(tile, lane, numel)
        tl.store(my_slot + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
    ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
    ok = ok & healthy

    # Block ``p`` from rank ``p``'s slot; this rank's own block from ``inp`` (same bits, no peer read).
    for p in tl.static_range(W):
        src = tl.where(p == rank, inp, _ptr(_pick(bases, peers, p) + slot_offset, DTYPE))
        dst = out + p * wide
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
            offs, mask = _tile_offsets(tile, lane, numel)
            vals = tl.load(src + offs, mask=mask, cache_modifier=".cg")
            tl.store(dst + offs, _nan_unless(ok, vals), mask=mask)
    _finish(ctrl, epoch, num_programs)


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def reduce_scatter_kernel(
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
    STAGES: tl.constexpr,
):
    """Reduce-scatter: ``out[i] = sum over ranks q (in rank order, fp32) of inp_q[rank * numel + i]``.

    ``numel`` is the chunk (``out``) size; ``inp`` holds ``W * numel``.  ``out`` may be this rank's chunk of
    ``inp`` (in place); it may not overlap another chunk.  With ``VIRTUAL``, ``inp`` is ``[W, W * numel]``,
    ``out`` ``[W, numel]``, and row ``r`` belongs to rank ``r``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    wide = tl.cast(numel, tl.int64)  # chunk offsets: up to W * W * numel elements in VIRTUAL mode
    if VIRTUAL:
        inp += rank * (W * wide)
        out += rank * wide
    DTYPE: tl.constexpr = inp.dtype.element_ty
    ITEMSIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    my_slot = _ptr(_pick(bases, peers, rank) + slot_offset, DTYPE)
    # Staged chunks start at multiples of CHUNK_ALIGN elements: 16-byte vectors for the peers' reads.
    stride = tl.multiple_of(tl.cdiv(wide, CHUNK_ALIGN) * CHUNK_ALIGN, CHUNK_ALIGN)
    num_tiles = tl.cdiv(numel, BLOCK)
    lane = tl.arange(0, BLOCK)

    # Stage the chunks the peers own, packed: chunk ``c`` at index ``c - (c > rank)``.
    for c in tl.static_range(W):
        if c != rank:
            dst = my_slot + tl.where(c > rank, c - 1, c) * stride
            src = inp + c * wide
            for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
                offs, mask = _tile_offsets(tile, lane, numel)
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask, cache_modifier=".cg")
    ok, _ = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, 0, timeout, W, WP, USE_PTX)
    ok = ok & healthy

    # Chunk ``rank`` of peer ``q`` is at index ``rank - (rank > q)`` of ``q``'s slot (bytes, per lane).
    src_offsets = slot_offset + tl.where(peers < rank, rank - 1, rank) * (stride * ITEMSIZE)
    own = inp + rank * wide
    for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
        offs, mask = _tile_offsets(tile, lane, numel)
        acc = _reduce_tile_own(bases, peers, src_offsets, own, rank, offs, mask, DTYPE, W)
        tl.store(out + offs, _nan_unless(ok, acc).to(DTYPE), mask=mask)
    _finish(ctrl, epoch, num_programs)
