"""Intra-node all-reduce over symmetric peer buffers: one-shot and two-shot Triton kernels.

Memory each rank owns (one allocation per rank, mapped by every peer; see ``sagellm_comm/workspace.py``)::

    base + 0                      signal pad: int32 flags[NUM_PHASES][MAX_BLOCKS][MAX_WORLD]
    base + PAD_BYTES              registered region (zero-copy inputs), ``slot_bytes`` long
    base + PAD_BYTES + slot_bytes * (1 + s)   staging slot s, s in {0, 1}

The kernel receives one int64 *pointer table* per rank: ``table[0:W]`` the base of every rank's allocation
(peer addresses as mapped in this process; loaded once per program as one vector) and ``table[W]`` this
rank's error record (host-mapped memory the host reads without a device sync; only touched on timeout),
and a pointer to this rank's control words (device int32: ``ctrl[0]`` epoch, ``ctrl[1]`` programs
finished, ``ctrl[2]`` error latch; ``ctrl[8:]`` belongs to the Lamport kernel).  Dependent loads cost a
DRAM round trip each at small sizes, so the prologue issues exactly two independent ones (peer bases, epoch).

Algorithms (``W`` ranks, ``n`` elements, fp32 accumulation, peers summed in rank order 0..W-1):

* one-shot: each rank copies its input into its staging slot; barrier; every rank reads the whole
  message from every peer and reduces it.  Latency: one barrier; traffic into each GPU: (W-1) * n.
* two-shot: the message is cut into W chunks; rank r reduces chunk r from every peer into its own slot
  (each chunk is reduced exactly once, so all ranks end with identical bits); barrier; every rank
  gathers chunk c from rank c.  Two barriers; traffic 2 (W-1)/W * n.  Only the W-1 chunks peers read are
  staged; the own chunk is reduced straight from the input.

Synchronisation invariants (docs/protocol.md has the long form):

1. *Per-block barriers.*  Work is cut into tiles of ``BLOCK`` elements and tile ``t`` always belongs to
   program ``t % num_programs`` on every rank, so program ``b`` only ever waits for program ``b`` of its
   peers.  A barrier of program ``b`` in phase ``p``: all threads finish their stores; the block
   synchronises; one release (system scope) store of ``epoch + 1`` into
   ``flags[p][b][rank]`` of every peer's pad; then acquire (system scope) loads of ``flags[p][b][peer]`` in
   its own pad until every peer's value has reached ``epoch + 1``; the block synchronises again before
   any thread reads peer data.
2. *Epochs live on the device.*  Every program reads ``ctrl[0]`` at start; the last program to finish
   (counted in ``ctrl[1]``) advances it.  CUDA-graph replays therefore use fresh epochs.  Flags only
   grow (compared in wrap-around arithmetic), so they are never reset.
3. *Buffer reuse.*  Staging slot ``epoch % 2`` is written at call ``epoch``.  A rank writes that slot
   again at ``epoch + 2`` only after passing a barrier of call ``epoch + 1``, which every peer reaches only
   after its kernel for call ``epoch`` has finished reading (stream order).  The registered region is not
   double-buffered, so the zero-copy path ends with a third barrier: nobody returns (and lets the caller
   overwrite its region) while a peer may still read it.
4. *Bounded waits.*  Every spin has a deadline (``%globaltimer`` nanoseconds on the GPU, spin counts
   under the interpreter).  On expiry the program latches ``ctrl[2]`` and records which peer never
   arrived, in which phase and epoch, in the host-mapped error record, then stops waiting.  A latched
   error makes every later wait a no-op, so a dead peer costs one timeout, not one per call; the host
   raises ``CommTimeoutError`` naming the peer.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Layout constants, usable both from host code (ints) and inside kernels (constexpr).
MAX_WORLD = tl.constexpr(8)
MAX_BLOCKS = tl.constexpr(128)  # programs per launch: one per SM of an H100 (132) for one rank per GPU
NUM_PHASES = tl.constexpr(3)
PAD_BYTES = tl.constexpr(16384)  # >= NUM_PHASES * MAX_BLOCKS * MAX_WORLD * 4; keeps data 16-byte aligned
assert NUM_PHASES.value * MAX_BLOCKS.value * MAX_WORLD.value * 4 <= PAD_BYTES.value

PHASE_START = tl.constexpr(0)
PHASE_MID = tl.constexpr(1)
PHASE_END = tl.constexpr(2)

# Layout of the host-mapped error record (int64 words).
ERR_STATUS = tl.constexpr(0)  # 0 ok, 1 timeout
ERR_PEER = tl.constexpr(1)
ERR_PHASE = tl.constexpr(2)
ERR_BLOCK = tl.constexpr(3)
ERR_EPOCH = tl.constexpr(4)
ERR_WORDS = tl.constexpr(8)
CHUNK_ALIGN = tl.constexpr(8)  # two-shot chunk granularity in elements: 16 bytes of bf16/fp16
CTRL_WORDS = tl.constexpr(264)  # [0] epoch [1] finished programs [2] error latch [8..264) Lamport per-program state


def two_shot_chunk(numel: int, world_size: int) -> int:
    """Elements per two-shot chunk (host side of the kernel's own computation)."""
    align = CHUNK_ALIGN.value
    per_rank = (numel + world_size - 1) // world_size
    return (per_rank + align - 1) // align * align


@triton.jit
def _ticks(USE_PTX: tl.constexpr):
    """Nanoseconds from the GPU's global timer (0 under the interpreter, which counts spins instead)."""
    if USE_PTX:
        t = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;",
            "=l,r",
            [tl.full([], 0, tl.int32)],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )
    else:
        t = tl.full([], 0, tl.int64)
    return t


@triton.jit
def _load_acquire(ptrs, USE_PTX: tl.constexpr):
    """Acquire (system scope) loads of int32 flags; a plain volatile load under the interpreter.

    No read-modify-write is used to read a flag: under the interpreter an atomic RMW is a separate read
    and write, which could erase a peer's concurrent store.
    """
    if USE_PTX:
        vals = tl.inline_asm_elementwise(
            "ld.acquire.sys.global.b32 $0, [$1];",
            "=r,l",
            [ptrs],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        vals = tl.load(ptrs, volatile=True)
    return vals


@triton.jit
def _pick(bases, peers, r):
    """Element ``r`` of the register vector ``bases`` (no memory access)."""
    return tl.sum(tl.where(peers == r, bases, 0), axis=0)


@triton.jit
def _ptr(addr, DTYPE: tl.constexpr):
    """The int64 address ``addr`` as a ``DTYPE`` pointer, declared 16-byte aligned.

    Every address built from the pointer table is: region bases are allocation starts and every offset
    into a region is a multiple of 16 bytes.  Without the hint Triton cannot see the alignment of an
    address loaded from memory and emits one 2-byte access per bf16 element; over NVLink that capped
    peer reads at ~40 GB/s on H100 (16-byte vector accesses are what the link needs).
    """
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _record_timeout(ctrl, table, W: tl.constexpr, peer, phase, block, target):
    """Latch the error on this rank; the first program to get here records who never arrived, where and when.

    ``ctrl[2]`` is the latch (every later wait of this rank returns at once); ``table[W]`` points to the
    host-mapped error record the host reads without a device sync.
    """
    first = tl.atomic_cas(ctrl + 2, 0, 1, sem="acq_rel", scope="gpu")
    if first == 0:
        err_record = tl.load(table + W).to(tl.pointer_type(tl.int64))
        tl.store(err_record + ERR_PEER, peer.to(tl.int64), cache_modifier=".wt")
        tl.store(err_record + ERR_PHASE, tl.full([], 0, tl.int64) + phase, cache_modifier=".wt")
        tl.store(err_record + ERR_BLOCK, block.to(tl.int64), cache_modifier=".wt")
        tl.store(err_record + ERR_EPOCH, target.to(tl.int64), cache_modifier=".wt")
        tl.store(err_record + ERR_STATUS, tl.full([], 1, tl.int64), cache_modifier=".wt")


@triton.jit
def _barrier(
    bases,
    peers,
    ctrl,
    table,
    rank,
    phase,
    block,
    target,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """Per-program barrier ``phase`` among the ``W`` ranks (invariant 1 of the module docstring)."""
    flag_index = (phase * MAX_BLOCKS + block) * MAX_WORLD
    _barrier_at(bases, peers, ctrl, table, rank, flag_index, phase, block, target, timeout, W, WP, USE_PTX)


@triton.jit
def _barrier_at(
    bases,
    peers,
    ctrl,
    table,
    rank,
    flag_index,
    phase,
    block,
    target,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """The barrier on flags ``flag_index + src`` (``src`` < ``W``) of every rank's pad; a timeout is recorded
    as ``phase`` / ``block``.  ``_barrier`` and the copy-engine pipeline's barrier (its own pad slot) use it."""
    valid = peers < W
    # 1. Everything this program stored before the barrier happens before the release below.
    tl.debug_barrier()
    remote_flags = (bases + (flag_index + rank) * 4).to(tl.pointer_type(tl.int32))
    tl.atomic_xchg(remote_flags, tl.full([WP], 0, tl.int32) + target, mask=valid, sem="release", scope="sys")
    # 2. Wait until every peer has raised its flag for this epoch (or the deadline passes).
    #    Padding lanes (W not a power of two) read this rank's own first flag, a valid address.
    my_base = _pick(bases, peers, rank)
    my_flags = (my_base + (flag_index + tl.where(valid, peers, 0)) * 4).to(tl.pointer_type(tl.int32))
    seen = _load_acquire(my_flags, USE_PTX)
    missing = valid & ((seen - target) < 0)
    n_missing = tl.sum(missing.to(tl.int32), axis=0)
    if n_missing > 0:
        latched = tl.load(ctrl + 2, volatile=True)
        start = _ticks(USE_PTX)
        elapsed = tl.full([], 0, tl.int64)
        while (n_missing > 0) & (elapsed < timeout) & (latched == 0):
            seen = _load_acquire(my_flags, USE_PTX)
            missing = missing & ((seen - target) < 0)
            n_missing = tl.sum(missing.to(tl.int32), axis=0)
            if USE_PTX:
                elapsed = _ticks(USE_PTX) - start
            else:
                elapsed += 1
            latched = tl.load(ctrl + 2, volatile=True)
        if (n_missing > 0) & (latched == 0):
            # 3. Timed out: the first program to get here records the missing peer for the host.
            _record_timeout(ctrl, table, W, tl.min(tl.where(missing, peers, WP), axis=0), phase, block, target)
    # 4. No thread of this program reads peer data before the acquire above.
    tl.debug_barrier()


@triton.jit
def _finish(ctrl, epoch, num_programs):
    """The last program to finish advances the epoch (invariant 2)."""
    tl.debug_barrier()
    done = tl.atomic_add(ctrl + 1, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        tl.atomic_xchg(ctrl + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl + 0, epoch + 1, sem="release", scope="gpu")


@triton.jit
def _reduce_tile(bases, peers, src_offset_bytes, offs, mask, DTYPE: tl.constexpr, W: tl.constexpr):
    """Sum ``offs`` of the region at ``src_offset_bytes`` over every rank, in rank order, in fp32.

    All ``W`` loads are issued before the first add, so the peers' reads overlap.
    """
    acc = tl.zeros(offs.shape, tl.float32)
    for peer in tl.static_range(W):
        src = _ptr(_pick(bases, peers, peer) + src_offset_bytes, DTYPE)
        acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _reduce_tile_own(bases, peers, src_offset_bytes, own, rank, offs, mask, DTYPE: tl.constexpr, W: tl.constexpr):
    """:func:`_reduce_tile`, except that this rank's term is read from ``own`` (its input) instead of its region."""
    acc = tl.zeros(offs.shape, tl.float32)
    for peer in tl.static_range(W):
        src = _ptr(_pick(bases, peers, peer) + src_offset_bytes, DTYPE)
        src = tl.where(peer == rank, own, src)
        acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _prologue(table, ctrl, rank, W: tl.constexpr, WP: tl.constexpr, VIRTUAL: tl.constexpr):
    """Rank, control words, peer bases (one vector load) and this call's epoch."""
    if VIRTUAL:
        # Virtual ranks in one launch: grid axis 1 is the rank; each rank has its own table row and
        # control words.  The kernel body after this is the one real ranks run.
        rank = tl.program_id(1)
        table += rank * (W + 1)
        ctrl += rank * CTRL_WORDS
    peers = tl.arange(0, WP)
    bases = tl.load(table + peers, mask=peers < W, other=0)
    epoch = tl.load(ctrl, volatile=True)
    return rank, table, ctrl, peers, bases, epoch


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def one_shot_all_reduce_kernel(
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
    ZERO_COPY: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One-shot all-reduce of ``numel`` elements.

    Copy path (``ZERO_COPY=False``): ``inp`` is any device buffer of this rank; it is copied into staging
    slot ``epoch % 2``, peers read the slots, the sum goes to ``out`` (may alias ``inp``).
    Zero-copy path: ``inp`` is this rank's registered region; peers read it directly; the sum is staged in
    this rank's slot and copied to ``out`` after the end barrier (``out`` may be the registered region).
    With ``VIRTUAL``, ``inp``/``out`` are ``[W, numel]`` and row ``r`` belongs to rank ``r``.
    """
    rank, table, ctrl, peers, bases, epoch = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = PAD_BYTES + slot_bytes * (1 + epoch % 2)
    my_slot = _ptr(_pick(bases, peers, rank) + slot_offset, DTYPE)
    num_tiles = tl.cdiv(numel, BLOCK)
    lane = tl.arange(0, BLOCK)

    if ZERO_COPY:
        src_offset = PAD_BYTES
    else:
        src_offset = slot_offset
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
            offs = tile * BLOCK + lane
            mask = offs < numel
            tl.store(my_slot + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
    _barrier(bases, peers, ctrl, table, rank, PHASE_START, pid, epoch + 1, timeout, W, WP, USE_PTX)

    for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
        offs = tile * BLOCK + lane
        mask = offs < numel
        acc = _reduce_tile(bases, peers, src_offset, offs, mask, DTYPE, W)
        if ZERO_COPY:
            tl.store(my_slot + offs, acc.to(DTYPE), mask=mask)
        else:
            tl.store(out + offs, acc.to(DTYPE), mask=mask)

    if ZERO_COPY:
        _barrier(bases, peers, ctrl, table, rank, PHASE_END, pid, epoch + 1, timeout, W, WP, USE_PTX)
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
            offs = tile * BLOCK + lane
            mask = offs < numel
            tl.store(out + offs, tl.load(my_slot + offs, mask=mask), mask=mask)
    _finish(ctrl, epoch, num_programs)


@triton.jit(do_not_specialize=["rank", "slot_bytes", "timeout"])
def two_shot_all_reduce_kernel(
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
    ZERO_COPY: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Two-shot all-reduce (reduce-scatter of W chunks, then all-gather) of ``numel`` elements.

    Chunk ``c`` is ``[c * chunk, min((c + 1) * chunk, numel))`` with ``chunk = cdiv(numel, W)`` rounded up to a
    multiple of ``CHUNK_ALIGN`` elements (trailing chunks may be short or empty); tile ``t`` of
    every chunk belongs to program ``t % num_programs``.  Rank ``r`` reduces chunk ``r`` into its own source
    region (nobody else reads chunk ``r`` of rank ``r``'s region in that phase), then every rank gathers each
    chunk from its owner.  Copy path: only the ``W - 1`` chunks peers reduce are staged; this rank's term of
    chunk ``r`` is read straight from ``inp`` (read before ``out``, which may alias it, is written).
    Zero-copy: the source region is the registered one, reduced in place, and an
    end barrier protects it; the gathered chunks are staged in slot 0 until then.
    """
    rank, table, ctrl, peers, bases, epoch = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if ZERO_COPY:
        src_offset = PAD_BYTES
    else:
        src_offset = PAD_BYTES + slot_bytes * (1 + epoch % 2)
    my_base = _pick(bases, peers, rank)
    my_src = _ptr(my_base + src_offset, DTYPE)
    # Chunks start at multiples of CHUNK_ALIGN elements so every chunk's accesses stay 16-byte vectors.
    chunk = tl.multiple_of(tl.cdiv(tl.cdiv(numel, W), CHUNK_ALIGN) * CHUNK_ALIGN, CHUNK_ALIGN)
    tiles_per_chunk = tl.cdiv(chunk, BLOCK)
    lane = tl.arange(0, BLOCK)

    if not ZERO_COPY:
        # Stage the chunks peers will reduce; chunk ``rank`` is only ever read by this rank, from ``inp``.
        for c in tl.static_range(W):
            if c != rank:
                for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                    in_chunk = tile * BLOCK + lane
                    offs = c * chunk + in_chunk
                    mask = (in_chunk < chunk) & (offs < numel)
                    tl.store(my_src + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
    _barrier(bases, peers, ctrl, table, rank, PHASE_START, pid, epoch + 1, timeout, W, WP, USE_PTX)

    # Reduce-scatter: this rank owns chunk ``rank``.
    for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
        in_chunk = tile * BLOCK + lane
        offs = rank * chunk + in_chunk
        mask = (in_chunk < chunk) & (offs < numel)
        if ZERO_COPY:
            reduced = _reduce_tile(bases, peers, src_offset, offs, mask, DTYPE, W).to(DTYPE)
        else:
            reduced = _reduce_tile_own(bases, peers, src_offset, inp, rank, offs, mask, DTYPE, W).to(DTYPE)
        tl.store(my_src + offs, reduced, mask=mask, cache_modifier=".cg")
        if not ZERO_COPY:
            tl.store(out + offs, reduced, mask=mask)
    _barrier(bases, peers, ctrl, table, rank, PHASE_MID, pid, epoch + 1, timeout, W, WP, USE_PTX)

    # All-gather: chunk ``c`` comes from rank ``c``.
    stage = _ptr(my_base + PAD_BYTES + slot_bytes, DTYPE)
    for c in tl.static_range(W):
        if (c != rank) | ZERO_COPY:
            owner = _ptr(_pick(bases, peers, c) + src_offset, DTYPE)
            for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                in_chunk = tile * BLOCK + lane
                offs = c * chunk + in_chunk
                mask = (in_chunk < chunk) & (offs < numel)
                if ZERO_COPY:
                    # Stage first: ``out`` may be the registered region that peers still read.
                    tl.store(stage + offs, tl.load(owner + offs, mask=mask, cache_modifier=".cg"), mask=mask)
                else:
                    tl.store(out + offs, tl.load(owner + offs, mask=mask, cache_modifier=".cg"), mask=mask)
    if ZERO_COPY:
        _barrier(bases, peers, ctrl, table, rank, PHASE_END, pid, epoch + 1, timeout, W, WP, USE_PTX)
        for c in tl.static_range(W):
            for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                in_chunk = tile * BLOCK + lane
                offs = c * chunk + in_chunk
                mask = (in_chunk < chunk) & (offs < numel)
                tl.store(out + offs, tl.load(stage + offs, mask=mask), mask=mask)
    _finish(ctrl, epoch, num_programs)
