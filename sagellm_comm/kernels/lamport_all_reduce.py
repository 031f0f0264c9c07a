"""One-shot all-reduce without a barrier: data-as-flag ("Lamport") buffers for latency-bound sizes.

The flag barrier of ``sagellm_comm/kernels/all_reduce.py`` costs a system-scope release, a spin and a block barrier per
phase.  For small messages this kernel has none: every rank *pushes* its input, in its own dtype, into a
per-source slot of every peer's Lamport buffer, and every rank *polls* its own buffer until no element of
the tile it needs still holds the sentinel bit pattern, then reduces in rank order in fp32.  The data is
the flag.

Layout (this rank's region, after the staging slots; see ``sagellm_comm/workspace.py``)::

    lamport[b][src]  cap * 4 bytes each, b in {0, 1, 2}, src in 0..W-1   (cap = capacity in elements)

A 16-bit payload uses the first ``cap * 2`` bytes of a slot, an fp32 payload all of it.

Per-program state lives in this rank's control words (int64): ``ctrl[LAMPORT_STATE + pid]`` is program
``pid``'s Lamport call counter (64-bit: ``% 3`` never sees a negative or wrapped value) and
``ctrl[LAMPORT_STATE + MAX_BLOCKS + pid]`` the number of 32-bit words per source pushed to this rank at its previous
call.  Each program reads and writes only its own words, so the kernel
ends without a cross-program atomic; this needs every Lamport launch on a workspace to use the same number
of programs (the launcher always launches its ``max_programs``).

Invariants:

1. *Sentinel.*  A cleared element is all one bits (0xFFFF for bf16/fp16, 0xFFFFFFFF for fp32), a NaN.  A
   writer clears the lowest bit of an input element with that pattern before pushing it (a NaN of the same
   sign still), so real data never equals the sentinel; every other element, NaN payloads included, travels
   bit for bit, and the sum sees what one-shot's and two-shot's see.  Reads are volatile (no stale L1 copy),
   and each element is written by one naturally aligned store (single-copy atomic), so an element is either
   the sentinel or the whole value.
2. *Rotation.*  Lamport call ``l`` uses buffer ``l % 3``.  At call ``l + 1`` each rank clears, in its own
   memory, what was pushed to it at call ``l``.  A peer pushes into that buffer again only at call
   ``l + 3``, after it has consumed this rank's pushes of call ``l + 2``, which this rank issued in a kernel
   that started after the clearing kernel of call ``l + 1`` had finished.  Which program clears which part
   does not matter: nobody reads buffer ``l % 3`` of this rank between call ``l`` and call ``l + 3``.
3. *Identical bits.*  Every rank sums the same fp32 values in the same order (rank 0 first).
4. *One round trip when peers are on time.*  A program issues the loads of all ``W`` sources of a tile
   before it looks at any of them, and checks them with one reduction; only a tile that still holds a
   sentinel is polled again (all sources reloaded).
5. *Programmatic dependent launch* (``PDL``, Hopper and later): the launch may start while the previous
   kernel on the stream still runs; the kernel reads only the peer table (written once at set-up) before
   ``griddepcontrol.wait``, which returns once that kernel has finished and its writes are visible.  So
   invariant 2 holds unchanged: every push of call ``l + 2`` is issued after the clearing of call ``l + 1``.
6. *Bounded waits* as in ``sagellm_comm/kernels/all_reduce.py``: on timeout the missing peer is recorded and
   the error latched; every later wait of that rank returns at once.  A failed call's output is NaN: an
   element that never arrived still holds the sentinel, a NaN, and NaN propagates through the sum; on a
   workspace latched before the call (buffers out of step with the peers) every output is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CTRL_LAMPORT,
    CTRL_LATCH,
    CTRL_WORDS,
    MAX_BLOCKS,
    PAD_BYTES,
    PHASE_LAMPORT,
    _bounded_wait,
    _nan_unless,
    _pick,
    _ptr,
    _rank_view,
    _tile_offsets,
)

LAMPORT_STATE = CTRL_LAMPORT  # ctrl[8 : 8 + 2 * MAX_BLOCKS]: per-program call counter, previous words
SENTINEL_BYTE = 0xFF
BUFFERS = 3
assert LAMPORT_STATE.value + 2 * MAX_BLOCKS.value <= CTRL_WORDS.value


def lamport_bytes(world_size: int, cap_elems: int) -> int:
    """Bytes of the Lamport area of one rank's region."""
    return BUFFERS * world_size * cap_elems * 4


@triton.jit
def _buffer_of(count):
    """``count % 3`` (the Lamport buffer of call ``count``, a non-negative int64) in 32-bit arithmetic.

    ``2**32 % 3 == 1``, so the residue is that of the sum of the counter's two 32-bit halves; each half's
    ``% 3`` is a 32-bit multiply-high, where a 64-bit ``%`` is a software division on the critical path
    (between the state load and the first push).
    """
    low = (count & 0xFFFFFFFF).to(tl.uint32)
    high = (count >> 32).to(tl.uint32)
    residue = (low % 3 + high % 3).to(tl.int32)
    return tl.where(residue >= 3, residue - 3, residue)


@triton.jit
def _load_slot(area, slot_stride, buf, p, offs, mask, W: tl.constexpr, WIDE: tl.constexpr):
    """Volatile load of tile ``offs`` of source ``p``'s slot of buffer ``buf``, as raw bits (int32 or int16)."""
    src = area + (buf * W + p) * slot_stride
    if WIDE:
        bits = tl.load(_ptr(src, tl.int32) + offs, mask=mask, other=0, volatile=True)
    else:
        bits = tl.load(_ptr(src, tl.int16) + offs, mask=mask, other=0, volatile=True)
    return bits


@triton.jit
def _gather_tile(area, slot_stride, buf, offs, mask, W: tl.constexpr, WIDE: tl.constexpr, DTYPE: tl.constexpr):
    """Load tile ``offs`` of every source's slot of buffer ``buf`` in ``area`` (all loads issued first).

    Returns the fp32 sum in rank order and the number of elements still holding the sentinel (of any
    source).  The sum is only meaningful when that number is 0.
    """
    acc = tl.zeros(offs.shape, tl.float32)
    pending = tl.zeros(offs.shape, tl.int32)
    for p in tl.static_range(W):
        bits = _load_slot(area, slot_stride, buf, p, offs, mask, W, WIDE)
        if WIDE:
            val = bits.to(tl.float32, bitcast=True)
        else:
            val = bits.to(DTYPE, bitcast=True).to(tl.float32)
        pending += (bits == -1).to(tl.int32)
        acc += val
    return acc, tl.sum(pending, axis=0)


@triton.jit
def _first_missing(area, slot_stride, buf, offs, mask, W: tl.constexpr, WP: tl.constexpr, WIDE: tl.constexpr):
    """The lowest source rank whose slot still holds a sentinel in tile ``offs`` (``WP`` if none)."""
    first = tl.full([], WP, tl.int32)
    for p in tl.static_range(W):
        n = tl.sum((_load_slot(area, slot_stride, buf, p, offs, mask, W, WIDE) == -1).to(tl.int32), axis=0)
        first = tl.where((n > 0) & (first == WP), p, first)
    return first


@triton.jit
def _clear_previous(
    my_area, slot_stride, prev_buf, prev_words, pid, num_programs, W: tl.constexpr, BLOCK: tl.constexpr
):
    """Clear (as 32-bit words) what peers pushed to this rank at the previous Lamport call (invariant 2).

    ``prev_words`` (int32) is rounded up to whole 16-byte vectors: the words past it are sentinels already
    (everything pushed to this buffer was cleared after its call, and nobody pushes into it before call
    ``l + 3``), and a slot holds a multiple of 4 words (``cap`` is a multiple of 128), so the masked
    stores are 16-byte vectors instead of one store per word.
    """
    lane = tl.arange(0, BLOCK)
    clear_words = tl.cdiv(prev_words, 4) * 4
    prev_tiles = tl.cdiv(clear_words, BLOCK)
    for tile in range(pid, prev_tiles, num_programs):
        offs, mask = _tile_offsets(tile, lane, clear_words)
        for p in tl.static_range(W):
            dst = _ptr(my_area + (prev_buf * W + p) * slot_stride, tl.int32)
            tl.store(dst + offs, tl.full([BLOCK], -1, tl.int32), mask=mask)


@triton.jit
def _push_tile(v, bases, peers, slot_in_peer, offs, mask, W: tl.constexpr, DTYPE: tl.constexpr):
    """Store tile ``v`` (``DTYPE``, this rank's input at ``offs``) at ``slot_in_peer`` (bytes) of every rank's region.

    An element whose bits are the sentinel's has its lowest bit cleared first (a NaN of the same sign), so real
    data never equals the sentinel; every other element is stored bit for bit (invariant 1)."""
    BITS: tl.constexpr = tl.int32 if DTYPE.primitive_bitwidth == 32 else tl.int16
    bits = v.to(BITS, bitcast=True)
    v = (bits - (bits == -1).to(BITS)).to(DTYPE, bitcast=True)
    for p in tl.static_range(W):
        dst = _ptr(_pick(bases, peers, p) + slot_in_peer, DTYPE)
        tl.store(dst + offs, v, mask=mask)


@triton.jit
def _poll_tile(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr, WIDE: tl.constexpr,
               DTYPE: tl.constexpr):  # fmt: skip
    """One poll of :func:`_wait_tile` for ``_bounded_wait``: ``args = (area, slot_stride, buf, offs, mask)``,
    ``state = (acc,)``; pending is the number of elements still holding the sentinel."""
    area, slot_stride, buf, offs, mask = args
    acc, pending = _gather_tile(area, slot_stride, buf, offs, mask, W, WIDE, DTYPE)
    return (acc,), pending


@triton.jit
def _first_missing_source(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr,
                          WIDE: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """The lowest source still holding a sentinel (for ``_bounded_wait``'s timeout record)."""
    area, slot_stride, buf, offs, mask = args
    return _first_missing(area, slot_stride, buf, offs, mask, W, WP, WIDE)


@triton.jit
def _wait_tile(
    area,
    slot_stride,
    buf,
    offs,
    mask,
    ctrl,
    table,
    block,
    lepoch,
    latched,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    WIDE: tl.constexpr,
    DTYPE: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """Poll tile ``offs`` of buffer ``buf`` of this rank's ``area`` until no source holds the sentinel: the bounded
    wait of invariant 6 (``_bounded_wait``).  Returns ``(acc, pending, latched)``: the fp32 sum in rank order, the
    elements still holding a sentinel (0 unless the wait failed) and the latch after the wait.

    All sources are loaded at once and checked with one reduction (invariant 4); only a tile that still holds a
    sentinel is polled again.  On expiry the first missing source is recorded (phase ``lamport``, block
    ``block``) and the latch set, so every later wait of this rank returns at once.
    """
    acc, pending = _gather_tile(area, slot_stride, buf, offs, mask, W, WIDE, DTYPE)
    if (pending > 0) & (latched == 0):
        state, pending, latched = _bounded_wait(
            _poll_tile, _first_missing_source, (area, slot_stride, buf, offs, mask), (acc,), pending, latched, ctrl,
            table, PHASE_LAMPORT, block, lepoch + 1, timeout, W, WP, USE_PTX, WIDE, DTYPE, False, 0,
        )  # fmt: skip
        acc = state[0]
    return acc, pending, latched


@triton.jit
def _load_state(ctrl, pid):
    """This program's Lamport state and the error latch: independent loads (one round trip).

    Returns ``(lepoch, buf, prev_buf, prev_words, latched)``: the call counter, this call's buffer
    (``lepoch % 3``), the previous call's (``(lepoch + 2) % 3``), the 32-bit words per source pushed to this
    rank at the previous call (int32: at most ``cap``) and the latch."""
    lepoch = tl.load(ctrl + LAMPORT_STATE + pid, volatile=True)
    prev_words = tl.load(ctrl + LAMPORT_STATE + MAX_BLOCKS + pid, volatile=True).to(tl.int32)
    latched = tl.load(ctrl + CTRL_LATCH, volatile=True)
    buf = _buffer_of(lepoch)
    prev_buf = tl.where(buf == 0, 2, buf - 1)
    return lepoch, buf, prev_buf, prev_words, latched


@triton.jit
def _save_state(ctrl, pid, numel, lepoch, DTYPE: tl.constexpr):
    """This program's state for the next call: plain stores, read only by this program's next launch."""
    words = tl.cdiv(numel * (DTYPE.primitive_bitwidth // 8), 4)
    tl.store(ctrl + LAMPORT_STATE + MAX_BLOCKS + pid, words)
    tl.store(ctrl + LAMPORT_STATE + pid, lepoch + 1)


@triton.jit(do_not_specialize=["rank", "lamport_offset", "cap", "timeout"])
def lamport_all_reduce_kernel(
    inp,
    out,
    table,
    ctrl,
    numel,
    rank,
    lamport_offset,
    cap,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Barrier-free one-shot all-reduce of ``numel`` (<= ``cap``) elements; ``out`` may alias ``inp``.

    ``lamport_offset``: byte offset of the Lamport area in every region; ``cap``: its capacity in elements
    per (buffer, source).  With ``VIRTUAL``, grid axis 1 is the rank and ``inp``/``out`` are ``[W, numel]``.
    Every launch on one workspace must use the same grid (per-program state, see the module docstring).
    With ``PDL`` (launched with programmatic dependent launch, Hopper and later) only the peer table, written
    once at set-up, is read before ``griddepcontrol.wait``; everything the previous kernel on the stream may
    have written (input, call counters, buffers) is touched after it.
    """
    # Peer bases; then (after the PDL wait) this program's first input tile, its state and the error latch:
    # one round trip (the first tile's load does not wait for the state, so the pushes start one round
    # trip earlier than if it were loaded after the buffer index is known).
    rank, table, ctrl, peers, bases = _rank_view(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    WIDE: tl.constexpr = DTYPE.primitive_bitwidth == 32
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if PDL:
        # Launched beside the previous kernel: wait until it has finished and its writes are visible, then
        # let the next kernel be scheduled (its programs wait in this same instruction).
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    lane = tl.arange(0, BLOCK)
    first_offs, first_mask = _tile_offsets(pid, lane, numel)
    first = tl.load(inp + first_offs, mask=first_mask, other=0.0)
    lepoch, buf, prev_buf, prev_words, latched = _load_state(ctrl, pid)
    healthy = latched == 0
    num_tiles = tl.cdiv(numel, BLOCK)
    slot_stride = cap * 4
    my_area = _pick(bases, peers, rank) + lamport_offset

    # 1. Push this rank's tiles into slot ``rank`` of buffer ``buf`` of every peer (a program without a
    #    tile has an all-false mask: it stores nothing).
    slot_in_peer = lamport_offset + (buf * W + rank) * slot_stride
    _push_tile(first, bases, peers, slot_in_peer, first_offs, first_mask, W, DTYPE)
    for tile in range(pid + num_programs, num_tiles, num_programs):
        offs, mask = _tile_offsets(tile, lane, numel)
        _push_tile(tl.load(inp + offs, mask=mask, other=0.0), bases, peers, slot_in_peer, offs, mask, W, DTYPE)

    # 2. Clear what peers pushed to this rank at the previous call, and save this program's state, before
    #    polling: the stores drain while the peers' pushes are still on their way.
    _clear_previous(my_area, slot_stride, prev_buf, prev_words, pid, num_programs, W, BLOCK)
    _save_state(ctrl, pid, numel, lepoch, DTYPE)

    # 3. Poll this rank's buffer: all sources of a tile at once; again only while a sentinel remains.
    for tile in range(pid, num_tiles, num_programs):
        offs, mask = _tile_offsets(tile, lane, numel)
        acc, _, latched = _wait_tile(
            my_area, slot_stride, buf, offs, mask, ctrl, table, pid, lepoch, latched, timeout, W, WP, WIDE, DTYPE,
            USE_PTX,
        )  # fmt: skip
        tl.store(out + offs, _nan_unless(healthy, acc).to(DTYPE), mask=mask)


__all__ = ["PAD_BYTES", "lamport_all_reduce_kernel", "lamport_bytes"]
