"""One-shot all-reduce without a barrier: data-as-flag ("Lamport") buffers for latency-bound sizes.

The flag barrier of ``kernels/all_reduce.py`` costs a system-scope release, a spin and a block barrier per
phase.  For small messages this kernel has none: every rank *pushes* its input, converted to fp32, into
a per-source slot of every peer's Lamport buffer, and every rank *polls* its own buffer until no element of
the tile it needs still holds the sentinel bit pattern, then reduces in rank order.  The data is the flag.

Layout (this rank's region, after the staging slots; see ``sagellm_comm/workspace.py``)::

    lamport[b][src][i]  float32, b in {0, 1, 2}, src in 0..W-1, i < cap   (cap = lamport capacity, elements)

Invariants:

1. *Sentinel.*  A cleared element is the bit pattern 0xFFFFFFFF (a NaN payload no arithmetic produces).
   Writers canonicalise every NaN to 0x7FC00000 before pushing, so real data never equals the sentinel.
   Reads are volatile (no stale L1 copy), and each 4-byte element is written by a single store, so an
   element is either the sentinel or the whole value.
2. *Rotation.*  Lamport call ``l`` (its own counter ``ctrl[LAMPORT_EPOCH]``, independent of the flag
   kernels) uses buffer ``l % 3``.  At call ``l + 1`` each rank clears, in its own memory, what was pushed
   to it at call ``l`` (``ctrl[LAMPORT_PREV]`` remembers how many elements).  A peer pushes into that
   buffer again only at call ``l + 3``, after it has consumed this rank's pushes of call ``l + 2``, which
   this rank issued in a kernel that started after the clearing kernel of call ``l + 1`` had finished.
3. *Identical bits.*  Every rank sums the same fp32 values in the same order.
4. *Bounded waits* as in ``kernels/all_reduce.py``: on timeout the missing peer is recorded and the error
   latched; every later wait of that rank returns at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.all_reduce import (
    CTRL_WORDS,
    PAD_BYTES,
    _pick,
    _record_timeout,
    _ticks,
)

LAMPORT_EPOCH = tl.constexpr(3)
LAMPORT_PREV = tl.constexpr(4)
LAMPORT_DONE = tl.constexpr(5)
PHASE_LAMPORT = tl.constexpr(3)
SENTINEL = tl.constexpr(-1)  # int32 view of 0xFFFFFFFF
SENTINEL_BYTE = 0xFF
BUFFERS = 3


def lamport_bytes(world_size: int, cap_elems: int) -> int:
    """Bytes of the Lamport area of one rank's region."""
    return BUFFERS * world_size * cap_elems * 4


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
):
    """Barrier-free one-shot all-reduce of ``numel`` (<= ``cap``) elements; ``out`` may alias ``inp``.

    ``lamport_offset``: byte offset of the Lamport area in every region; ``cap``: its capacity in elements
    per (buffer, source).  With ``VIRTUAL``, grid axis 1 is the rank and ``inp``/``out`` are ``[W, numel]``.
    """
    if VIRTUAL:
        rank = tl.program_id(1)
        table += rank * (W + 1)
        ctrl += rank * CTRL_WORDS
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    peers = tl.arange(0, WP)
    bases = tl.load(table + peers, mask=peers < W, other=0)
    lepoch = tl.load(ctrl + LAMPORT_EPOCH, volatile=True)
    prev_numel = tl.load(ctrl + LAMPORT_PREV, volatile=True)
    latched = tl.load(ctrl + 2, volatile=True)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    buf = lepoch % 3
    prev_buf = (lepoch + 2) % 3
    lane = tl.arange(0, BLOCK)
    num_tiles = tl.cdiv(numel, BLOCK)
    my_area = _pick(bases, peers, rank) + lamport_offset

    # 1. Push this rank's tiles into slot ``rank`` of buffer ``buf`` of every peer.
    slot_in_peer = ((buf * W + rank) * cap) * 4
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * BLOCK + lane
        mask = offs < numel
        v = tl.load(inp + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(v != v, float("nan"), v)  # canonical NaN: never the sentinel
        for p in tl.static_range(W):
            dst = (_pick(bases, peers, p) + lamport_offset + slot_in_peer).to(tl.pointer_type(tl.float32))
            tl.store(dst + offs, v, mask=mask)

    # 2. Poll this rank's buffer: each source's tile is complete when no element is the sentinel.
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * BLOCK + lane
        mask = offs < numel
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(W):
            src = (my_area + ((buf * W + p) * cap) * 4).to(tl.pointer_type(tl.int32))
            bits = tl.load(src + offs, mask=mask, other=0, volatile=True)
            pending = tl.sum((mask & (bits == SENTINEL)).to(tl.int32), axis=0)
            if (pending > 0) & (latched == 0):
                start = _ticks(USE_PTX)
                elapsed = tl.full([], 0, tl.int64)
                while (pending > 0) & (elapsed < timeout) & (latched == 0):
                    bits = tl.load(src + offs, mask=mask, other=0, volatile=True)
                    pending = tl.sum((mask & (bits == SENTINEL)).to(tl.int32), axis=0)
                    if USE_PTX:
                        elapsed = _ticks(USE_PTX) - start
                    else:
                        elapsed += 1
                    latched = tl.load(ctrl + 2, volatile=True)
                if (pending > 0) & (latched == 0):
                    _record_timeout(ctrl, table, W, tl.full([], p, tl.int32), PHASE_LAMPORT, pid, lepoch + 1)
                    latched = tl.full([], 1, tl.int32)
            acc += bits.to(tl.float32, bitcast=True)
        tl.store(out + offs, acc.to(DTYPE), mask=mask)

    # 3. Clear what peers pushed to this rank at the previous Lamport call (invariant 2).
    prev_tiles = tl.cdiv(prev_numel, BLOCK)
    for tile in range(pid, prev_tiles, num_programs):
        offs = tile * BLOCK + lane
        mask = offs < prev_numel
        for p in tl.static_range(W):
            dst = (my_area + ((prev_buf * W + p) * cap) * 4).to(tl.pointer_type(tl.int32))
            tl.store(dst + offs, tl.full([BLOCK], SENTINEL, tl.int32), mask=mask)

    # 4. The last program to finish advances the Lamport epoch and remembers this call's size.
    tl.debug_barrier()
    done = tl.atomic_add(ctrl + LAMPORT_DONE, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        tl.atomic_xchg(ctrl + LAMPORT_DONE, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl + LAMPORT_PREV, numel, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl + LAMPORT_EPOCH, lepoch + 1, sem="release", scope="gpu")


__all__ = ["PAD_BYTES", "lamport_all_reduce_kernel", "lamport_bytes"]
