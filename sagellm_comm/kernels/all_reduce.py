"""Intra-node all-reduce over symmetric peer buffers: one-shot and two-shot Triton kernels.

Memory each rank owns (one allocation per rank, mapped by every peer; see ``sagellm_comm/workspace.py``)::

    base + 0                      signal pad: int64 flags[NUM_SLOTS][MAX_BLOCKS][MAX_WORLD]
    base + PAD_BYTES              registered region (zero-copy inputs), ``slot_bytes`` long
    base + PAD_BYTES + slot_bytes * (1 + s)   staging slot s, s in {0, 1}

The kernel receives one int64 *pointer table* per rank: ``table[0:W]`` the base of every rank's allocation
(peer addresses as mapped in this process; loaded once per program as one vector) and ``table[W]`` this
rank's error record (host-mapped memory the host reads without a device sync; only touched on failure),
and a pointer to this rank's control words (device int64, ``CTRL_*`` below: epoch, programs finished,
error latch, the copy-engine and fingerprint counters, the Lamport kernel's per-program state).  Dependent
loads cost a DRAM round trip each at small sizes, so the prologue issues only independent ones (peer
bases, epoch, latch).

Algorithms (``W`` ranks, ``n`` elements, fp32 accumulation, peers summed in rank order 0..W-1):

* one-shot: each rank copies its input into its staging slot; barrier; every rank reads the whole
  message from every peer and reduces it.  Latency: one barrier; traffic into each GPU: (W-1) * n.
* two-shot: the message is cut into W chunks; rank r reduces chunk r from every peer into its own slot
  (each chunk is reduced exactly once, so all ranks end with identical bits); barrier; every rank
  gathers chunk c from rank c.  Two barriers; traffic 2 (W-1)/W * n.  Only the W-1 chunks peers read are
  staged; the own chunk is reduced straight from the input.  With small tiles a program stages, and
  gathers, tile t of every chunk in one [W, tile] access (one round trip, not one per chunk).

Synchronisation invariants (docs/protocol.md has the long form):

1. *Per-block barriers.*  Work is cut into tiles of ``BLOCK`` elements and tile ``t`` always belongs to
   program ``t % num_programs`` on every rank, so program ``b`` only ever waits for program ``b`` of its
   peers; ``num_programs`` is agreed by the group when the workspace is made.  A barrier of program ``b``:
   all threads finish their stores; the block synchronises; one release (system scope) store of this
   call's flag value into ``flags[slot][b][rank]`` of every rank's pad; then acquire (system scope) loads
   of ``flags[slot][b][peer]`` in its own pad until every peer's value has reached this call's target; the
   block synchronises again before any thread reads peer data.
2. *64-bit epochs live on the device.*  Every program reads ``ctrl[CTRL_EPOCH]`` at start; the last
   program to finish (counted in ``ctrl[CTRL_DONE]``) advances it.  CUDA-graph replays therefore use fresh
   epochs.  Flags only grow and never wrap (int64), so they are never reset and ``>=`` is exact.
3. *Agreement on where data is.*  The start flag is ``2 * (epoch + 1) + zero_copy``: every rank learns
   each peer's choice (staging slot or registered region) for this very call from the flag it waits for,
   so a rank that passed a registered tensor while its peer did not cannot make anyone read the wrong
   place.  Start flags alternate between two slots by epoch parity so that value is not overwritten early.
4. *Buffer reuse.*  Staging slot ``epoch % 2`` is written at call ``epoch``.  A rank writes that slot
   again at ``epoch + 2`` only after passing a barrier of call ``epoch + 1``, which every peer reaches only
   after its kernel for call ``epoch`` has finished reading (stream order).  The registered region is not
   double-buffered, so when any rank is zero-copy every rank ends with a third barrier: nobody returns
   (and lets its caller overwrite its region) while a peer may still read it.
5. *Bounded waits, and a failure is never a result.*  Every wait is one helper, ``_bounded_wait`` (the only
   spin loop of the package: the flag waits here and the Lamport tile waits poll through it), with a deadline
   (``%globaltimer`` nanoseconds on the GPU, the host clock under the interpreter).  On expiry the program
   latches ``ctrl[CTRL_LATCH]`` and records which peer never arrived, in which phase and epoch, in the
   host-mapped error record.  A latched error makes every later wait a no-op, and every
   value a program writes after a failed wait, or on a latched workspace, is NaN: the output of a failed
   call cannot pass for a sum.  The host raises ``CommTimeoutError`` naming the peer.
"""

from __future__ import annotations

import time

import triton
import triton.language as tl

from sagellm_comm.selector import LAMPORT

# Layout constants, usable both from host code (ints) and inside kernels (constexpr).
MAX_WORLD = tl.constexpr(8)
MAX_BLOCKS = tl.constexpr(128)  # programs per launch: one per SM of an H100 (132) for one rank per GPU
# Every counter and flag is int64: at 10k calls a second a 64-bit counter wraps after ~29 million years, so
# flags compare with a plain ``>=`` and buffer indices (``epoch % 2``, ``% 3``) are never negative.
FLAG_BYTES = tl.constexpr(8)
SLOT_WORDS = tl.constexpr(MAX_BLOCKS.value * MAX_WORLD.value)  # one flag slot: int64 [MAX_BLOCKS][MAX_WORLD]
# Flag slots of the signal pad.  The start barrier alternates between two slots by epoch parity: its flag
# also carries the rank's zero-copy bit, which a peer must read for *this* call (see ``_start_barrier``).
SLOT_START_EVEN = tl.constexpr(0)
SLOT_MID = tl.constexpr(1)
SLOT_END = tl.constexpr(2)
SLOT_START_ODD = tl.constexpr(3)
SLOT_COPY_ENGINE = tl.constexpr(4)  # sagellm_comm/kernels/copy_engine.py
SLOT_CHECK = tl.constexpr(5)  # sagellm_comm/kernels/fingerprint.py
NUM_SLOTS = tl.constexpr(6)
PAD_BYTES = tl.constexpr(NUM_SLOTS.value * SLOT_WORDS.value * FLAG_BYTES.value)  # 48 KB; data stays 16-B aligned

# Error-record phases (what the host reports as where a wait timed out).
PHASE_START = tl.constexpr(0)
PHASE_MID = tl.constexpr(1)
PHASE_END = tl.constexpr(2)
PHASE_LAMPORT = tl.constexpr(3)
PHASE_COPY_ENGINE = tl.constexpr(4)
PHASE_CHECK = tl.constexpr(5)
PHASE_TILE = tl.constexpr(6)  # a GEMM tile flag (kernels/gemm_all_reduce.py)
PHASE_GROUP_CHECK = tl.constexpr(7)  # check mode across a whole group through the engine (kernels/fingerprint.py)
PHASE_ROW = tl.constexpr(8)  # the programs sharing one row exchange its sums (kernels/fused_all_reduce_rmsnorm.py)
PHASE_NAMES = ("start", "mid", "end", LAMPORT, "copy-engine", "check", "tile", "group check", "row exchange")


def call_of_target(phase: int, target: int) -> int:
    """The call number (the value of the call's counter) of a timed-out wait whose error record holds flag
    ``target``: a start flag is ``2 * (call + 1)`` (its low bit carries the zero-copy choice), every other
    flag ``call + 1``; a row-exchange flag ``2 * call + 1`` or ``2 * call + 2``."""
    if phase == PHASE_START.value:
        return target // 2 - 1
    if phase == PHASE_ROW.value:
        return (target - 1) // 2  # 2 * call + 1 (the sum of squares) or 2 * call + 2 (the amax)
    return target - 1


# Layout of the host-mapped error record (int64 words).
ERR_STATUS = tl.constexpr(0)  # 0 ok, ERR_TIMEOUT, ERR_MISMATCH
ERR_PEER = tl.constexpr(1)
ERR_PHASE = tl.constexpr(2)
ERR_BLOCK = tl.constexpr(3)
ERR_EPOCH = tl.constexpr(4)
ERR_MINE = tl.constexpr(8)  # [8, 12): this rank's fingerprint (mismatch only)
ERR_THEIRS = tl.constexpr(12)  # [12, 16): the disagreeing peer's fingerprint
ERR_WORDS = tl.constexpr(16)
ERR_TIMEOUT = tl.constexpr(1)
ERR_MISMATCH = tl.constexpr(2)
CHUNK_ALIGN = tl.constexpr(8)  # two-shot chunk granularity in elements: 16 bytes of bf16/fp16
# Two-shot copies every chunk's tile in one [ranks, tile] access up to this many elements (64 per thread at
# 8 warps): the small tiles of latency-bound sizes.  Larger tiles keep one loop per chunk, and so does
# W = 2, where the staging copy and the gather move one chunk each (nothing to batch).
BATCH_ELEMS = tl.constexpr(16384)

# Control words (int64, this rank's device memory).
CTRL_EPOCH = tl.constexpr(0)  # calls of the barrier kernels (one-shot, two-shot, fused RMSNorm, GEMM tiles)
CTRL_DONE = tl.constexpr(1)  # programs finished in the current call
CTRL_LATCH = tl.constexpr(2)  # error latch: non-zero once any wait of this rank failed
CTRL_CE_EPOCH = tl.constexpr(3)  # copy-engine pipeline calls
CTRL_CHECK = tl.constexpr(4)  # fingerprint checks
CTRL_LAMPORT = tl.constexpr(8)  # [8, 8 + 2 * MAX_BLOCKS): the Lamport kernel's per-program state
# [CTRL_ROW, + 3 * MAX_BLOCKS): the fused Lamport kernel's row exchange (kernels/fused_all_reduce_rmsnorm.py): per
# program its count of split-row calls (int64), then 32-bit words [2 values][2 buffers][MAX_BLOCKS], all ones
# when empty (CTRL_ROW_WORDS below, set by the host when it makes the control words).
CTRL_ROW = tl.constexpr(CTRL_LAMPORT.value + 2 * MAX_BLOCKS.value)
CTRL_ROW_WORDS = tl.constexpr(CTRL_ROW.value + MAX_BLOCKS.value)
CTRL_WORDS = tl.constexpr(CTRL_ROW.value + 3 * MAX_BLOCKS.value)
COUNTER_WORDS = (CTRL_EPOCH.value, CTRL_CE_EPOCH.value, CTRL_CHECK.value)  # + the Lamport call counters


def two_shot_chunk(numel: int, world_size: int) -> int:
    """Elements per two-shot chunk (host side of the kernel's own computation)."""
    align = CHUNK_ALIGN.value
    per_rank = (numel + world_size - 1) // world_size
    return (per_rank + align - 1) // align * align


def _host_clock_ns() -> int:
    """The host's monotonic clock, for the interpreter's deadlines (the kernel body runs as Python there)."""
    return time.monotonic_ns()


# Triton's JIT hashes every global a kernel references and refuses plain Python callables; this one is only
# reachable from a branch on a constexpr that compiled (GPU) code never takes.
_host_clock_ns.__triton_builtin__ = True


@triton.jit
def _ticks(USE_PTX: tl.constexpr):
    """Nanoseconds: the GPU's global timer, or the host's monotonic clock under the interpreter (where the
    kernel body runs as Python; the branch is resolved at compile time, so GPU code never sees it)."""
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
        t = tl.full([], _host_clock_ns(), tl.int64)
    return t


@triton.jit
def _load_acquire(ptrs, USE_PTX: tl.constexpr):
    """Acquire (system scope) loads of int64 flags; a plain volatile load under the interpreter.

    No read-modify-write is used to read a flag: under the interpreter an atomic RMW is a separate read
    and write, which could erase a peer's concurrent store.
    """
    if USE_PTX:
        vals = tl.inline_asm_elementwise(
            "ld.acquire.sys.global.b64 $0, [$1];",
            "=l,l",
            [ptrs],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )
    else:
        vals = tl.load(ptrs, volatile=True)
    return vals


@triton.jit
def _sleep(USE_PTX: tl.constexpr):
    """Back off ~100 ns between polls (nothing under the interpreter)."""
    if USE_PTX:
        tl.inline_asm_elementwise(
            "nanosleep.u32 100; mov.u32 $0, 0;", "=r,r", [tl.full([], 0, tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip


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
def _row_ptrs(addr, DTYPE: tl.constexpr):
    """:func:`_ptr` for a ``[rows, 1]`` column of int64 addresses (one region per row), each 16-byte aligned."""
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), [16, 16])


@triton.jit
def _flag_ptrs(base, word):
    """int64 flag pointers at ``word`` (an int64 word index) of the region at ``base``."""
    return (base + word * FLAG_BYTES).to(tl.pointer_type(tl.int64))


@triton.jit
def _fence_sc_sys(USE_PTX: tl.constexpr):
    """A sequentially consistent fence at system scope (the interpreter runs one thread: nothing to order)."""
    if USE_PTX:
        tl.inline_asm_elementwise(
            "fence.sc.sys; mov.u32 $0, 0;", "=r,r", [tl.full([], 0, tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip


@triton.jit
def _record_timeout(ctrl, table, W: tl.constexpr, peer, phase, block, target, USE_PTX: tl.constexpr):
    """Latch the error on this rank; the first program to get here records who never arrived, where and when.

    ``ctrl[CTRL_LATCH]`` is the latch (every later wait of this rank returns at once and every later output
    of a latched workspace is NaN); ``table[W]`` points to the host-mapped error record the host reads
    without a device sync.  The status word is stored last, after a system-scope fence: a host that reads a
    status reads the fields written before it.
    """
    first = tl.atomic_cas(
        ctrl + CTRL_LATCH, tl.full([], 0, tl.int64), tl.full([], 1, tl.int64), sem="acq_rel", scope="gpu"
    )
    if first == 0:
        err_record = tl.load(table + W).to(tl.pointer_type(tl.int64))
        tl.store(err_record + ERR_PEER, peer.to(tl.int64), cache_modifier=".wt")
        tl.store(err_record + ERR_PHASE, tl.full([], 0, tl.int64) + phase, cache_modifier=".wt")
        tl.store(err_record + ERR_BLOCK, block.to(tl.int64), cache_modifier=".wt")
        tl.store(err_record + ERR_EPOCH, target.to(tl.int64), cache_modifier=".wt")
        _fence_sc_sys(USE_PTX)
        tl.store(err_record + ERR_STATUS, tl.full([], ERR_TIMEOUT, tl.int64), cache_modifier=".wt")


@triton.jit
def _deadline_passed(start, elapsed, timeout, USE_PTX: tl.constexpr):
    """``(passed, elapsed)`` of a bounded wait begun at ``start``, in nanoseconds (:func:`_ticks`).  Every
    bounded wait of every kernel measures its deadline with this."""
    elapsed = _ticks(USE_PTX) - start
    return elapsed >= timeout, elapsed


@triton.jit
def _wait_step(start, elapsed, timeout, ctrl, USE_PTX: tl.constexpr):
    """One turn of :func:`_bounded_wait` after a poll: ``(passed, elapsed, latched)``, the deadline
    (:func:`_deadline_passed`) and this rank's error latch.  The wait keeps going only while something is missing,
    ``passed`` is False and ``latched`` is 0."""
    passed, elapsed = _deadline_passed(start, elapsed, timeout, USE_PTX)
    latched = tl.load(ctrl + CTRL_LATCH, volatile=True)
    return passed, elapsed, latched


@triton.jit
def _waiting(pending, passed, latched, LATCH_FIRST: tl.constexpr):
    """Whether :func:`_bounded_wait` polls again: something is pending, the deadline has not passed, the latch is 0.

    ``LATCH_FIRST`` tests the latch before the deadline: the flag waits then share ``pending and not latched``
    with the timeout test after the loop; the Lamport tile wait tests the deadline first.  Either order gives the
    same answer: the order only changes the instructions generated.
    """
    if LATCH_FIRST:
        go = (pending > 0) & (latched == 0) & (passed == 0)
    else:
        go = (pending > 0) & (passed == 0) & (latched == 0)
    return go


@triton.jit
def _bounded_wait(
    POLL: tl.constexpr,
    FIRST_MISSING: tl.constexpr,
    args,
    state,
    pending,
    latched,
    ctrl,
    table,
    phase,
    block,
    target,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
    OPT_A: tl.constexpr,
    OPT_B: tl.constexpr,
    LATCH_FIRST: tl.constexpr,
    QUICK: tl.constexpr,
):
    """The one bounded wait (the only spin loop of the package): poll until nothing is ``pending``, the deadline
    passes or this rank's latch is set.  Returns ``(state, pending, latched)``.

    ``POLL(args, state, W, WP, USE_PTX, OPT_A, OPT_B)`` (a ``@triton.jit`` function) polls once and returns the
    new ``(state, pending)``; ``args`` and ``state`` are tuples the caller and its poll agree on, and ``OPT_A`` /
    ``OPT_B`` are the poll's own compile-time options (constexprs inside a tuple are not constexpr any more).
    The caller has polled once already and found something ``pending`` with ``latched`` 0.  Each turn keeps its
    deadline and latch with :func:`_wait_step`.  On giving up (deadline passed, latch still 0),
    ``FIRST_MISSING(args, state, W, WP, USE_PTX, OPT_A, OPT_B)`` names the peer recorded by
    :func:`_record_timeout` (with ``phase``, ``block`` and ``target``) and ``latched`` is returned as 1.
    ``LATCH_FIRST`` only orders the loop's test (:func:`_waiting`), which changes the code generated, not the result.
    ``QUICK`` > 0: the first ``QUICK`` polls are bare (no clock read, no latch load), for a wait that normally
    ends within a few polls (the row exchange among the programs of one launch); the deadline still bounds it.
    """
    start = _ticks(USE_PTX)
    elapsed = tl.full([], 0, tl.int64)
    passed = elapsed >= timeout
    polls = 0
    while _waiting(pending, passed, latched, LATCH_FIRST):
        state, pending = POLL(args, state, W, WP, USE_PTX, OPT_A, OPT_B)
        if QUICK > 0:
            polls += 1
            if polls >= QUICK:
                passed, elapsed, latched = _wait_step(start, elapsed, timeout, ctrl, USE_PTX)
        else:
            passed, elapsed, latched = _wait_step(start, elapsed, timeout, ctrl, USE_PTX)
    if (pending > 0) & (latched == 0):
        missing = FIRST_MISSING(args, state, W, WP, USE_PTX, OPT_A, OPT_B)
        _record_timeout(ctrl, table, W, missing, phase, block, target, USE_PTX)
        latched = tl.full([], 1, tl.int64)
    return state, pending, latched


@triton.jit
def _poll_flags(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr, RELAXED_POLL: tl.constexpr,
                _UNUSED: tl.constexpr):  # fmt: skip
    """One poll of :func:`_wait_flags` for :func:`_bounded_wait`: ``args = (flag_ptrs, target, peers)``,
    ``state = (seen, missing)``; pending is the number of lanes still missing."""
    flag_ptrs, target, _ = args
    _, missing = state
    if RELAXED_POLL:
        _sleep(USE_PTX)
        seen = tl.load(flag_ptrs, volatile=True)
    else:
        seen = _load_acquire(flag_ptrs, USE_PTX)
    missing = missing & (seen < target)
    return (seen, missing), tl.sum(missing.to(tl.int32), axis=0)


@triton.jit
def _first_missing_flag(args, state, W: tl.constexpr, WP: tl.constexpr, USE_PTX: tl.constexpr,
                        RELAXED_POLL: tl.constexpr, _UNUSED: tl.constexpr):  # fmt: skip
    """The lowest rank whose flag is still missing (for :func:`_bounded_wait`'s timeout record)."""
    _, _, peers = args
    _, missing = state
    return tl.min(tl.where(missing, peers, WP), axis=0)


@triton.jit
def _wait_flags(
    flag_ptrs,
    valid,
    target,
    ctrl,
    table,
    peers,
    phase,
    block,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
    RELAXED_POLL: tl.constexpr,
):
    """Wait until every ``valid`` lane's int64 flag reached ``target`` (:func:`_bounded_wait`).  Returns ``(ok, seen)``.

    ``ok`` is False when a flag did not arrive: the deadline passed (this program latches the error and
    records the first missing peer, phase and block) or the rank's latch was already set (a wait of an
    earlier call or another program failed: return at once).  ``seen`` holds the last value read per lane.
    Flags only grow (64-bit, never wrap), so ``seen >= target`` means "arrived for this call or later".

    Polls are system-scope acquire loads; with ``RELAXED_POLL`` (a consumer that may wait for a whole GEMM
    beside it) they are volatile loads with a short sleep, then one acquire load: flags only grow, so the
    acquire reads a value at least as new and orders every later read after the writer's release.
    """
    if RELAXED_POLL:
        seen = tl.load(flag_ptrs, volatile=True)
    else:
        seen = _load_acquire(flag_ptrs, USE_PTX)
    missing = valid & (seen < target)
    n_missing = tl.sum(missing.to(tl.int32), axis=0)
    if n_missing > 0:
        latched = tl.load(ctrl + CTRL_LATCH, volatile=True)
        state, n_missing, _ = _bounded_wait(
            _poll_flags, _first_missing_flag, (flag_ptrs, target, peers), (seen, missing), n_missing, latched, ctrl,
            table, phase, block, target, timeout, W, WP, USE_PTX, RELAXED_POLL, False, True, 0,
        )  # fmt: skip
        seen = state[0]  # no nested unpacking in kernels: Triton's dependency finder (3.6) cannot hash it
    if RELAXED_POLL:
        seen = _load_acquire(flag_ptrs, USE_PTX)
    # No thread of this program reads peer data before the acquire above.
    tl.debug_barrier()
    return n_missing == 0, seen


@triton.jit
def _barrier_at(
    bases,
    peers,
    ctrl,
    table,
    rank,
    flag_word,
    phase,
    block,
    target,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
    value,
):
    """The barrier on flags ``flag_word + src`` (``src`` < ``W``) of every rank's pad.  Returns ``(ok, seen)``.

    Stores ``value`` (``target`` unless the flag carries more, see ``_start_barrier``) into
    ``flags[flag_word + rank]`` of every rank, then waits (:func:`_wait_flags`) until every rank's flag
    reached ``target``; a timeout is recorded as ``phase`` / ``block``.  ``_barrier``, ``_start_barrier`` and the
    copy-engine pipeline's barrier use it.
    """
    valid = peers < W
    # 1. Everything this program stored before the barrier happens before the release below.
    tl.debug_barrier()
    remote_flags = _flag_ptrs(bases, flag_word + rank)
    tl.atomic_xchg(remote_flags, tl.full([WP], 0, tl.int64) + value, mask=valid, sem="release", scope="sys")
    # 2. Wait until every peer has raised its flag for this epoch (or the deadline passes).
    #    Padding lanes (W not a power of two) read this rank's own first flag, a valid address.
    my_base = _pick(bases, peers, rank)
    my_flags = _flag_ptrs(my_base, flag_word + tl.where(valid, peers, 0))
    return _wait_flags(my_flags, valid, target, ctrl, table, peers, phase, block, timeout, W, WP, USE_PTX, False)


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
    """Per-program barrier ``phase`` (``PHASE_MID`` or ``PHASE_END``) among the ``W`` ranks; returns ok."""
    if phase == PHASE_MID:
        slot = SLOT_MID
    else:
        slot = SLOT_END
    ok, _ = _barrier_at(
        bases, peers, ctrl, table, rank, slot * SLOT_WORDS + block * MAX_WORLD, phase, block, target, timeout,
        W, WP, USE_PTX, target,
    )  # fmt: skip
    return ok


@triton.jit
def _start_barrier(
    bases,
    peers,
    ctrl,
    table,
    rank,
    block,
    epoch,
    zero_copy,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
):
    """The start barrier of call ``epoch``: every rank announces arrival *and* where its input lies.

    Rank ``r`` stores ``2 * (epoch + 1) + zero_copy`` (its input is in its registered region: 1, in its
    staging slot: 0) and waits for every flag to reach ``2 * (epoch + 1)``.  Returns ``(ok, peer_zero_copy)``,
    the per-lane zero-copy bit of every rank for this call, so no rank assumes where a peer's data is.
    The flags alternate between two slots by epoch parity: a fast peer may already store its flag of call
    ``epoch + 1`` while this rank still polls (it passed this barrier), but not of ``epoch + 2`` (that needs
    this rank's flag of ``epoch + 1``), so the value read for call ``epoch`` is never overwritten too early.
    """
    if epoch % 2 == 0:
        slot = SLOT_START_EVEN
    else:
        slot = SLOT_START_ODD
    target = 2 * (epoch + 1)
    ok, seen = _barrier_at(
        bases, peers, ctrl, table, rank, slot * SLOT_WORDS + block * MAX_WORLD, PHASE_START, block, target, timeout,
        W, WP, USE_PTX, target + zero_copy,
    )  # fmt: skip
    return ok, (seen & 1) != 0


@triton.jit
def _finish(ctrl, epoch, num_programs):
    """The last program to finish advances the epoch (invariant 2)."""
    tl.debug_barrier()
    done = tl.atomic_add(ctrl + CTRL_DONE, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        tl.atomic_xchg(ctrl + CTRL_DONE, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl + CTRL_EPOCH, epoch + 1, sem="release", scope="gpu")


@triton.jit
def _sum_sources(srcs, own, rank, offs, mask, DTYPE: tl.constexpr, W: tl.constexpr, OWN: tl.constexpr):
    """Sum ``offs`` at every rank's address ``srcs[p]`` (a tuple of ``W`` int64 addresses), in rank order, fp32.

    With ``OWN`` this rank's term is read from the pointer ``own`` (its input) instead.  All ``W`` loads are
    issued before the first add, so the peers' reads overlap.
    """
    acc = tl.zeros(offs.shape, tl.float32)
    for peer in tl.static_range(W):
        src = _ptr(srcs[peer], DTYPE)
        if OWN:
            src = tl.where(peer == rank, own, src)
        acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _picked(vector, peers, W: tl.constexpr):
    """The first ``W`` lanes of a register vector as a tuple of scalars (one cross-lane pick each)."""
    out = ()
    for p in tl.static_range(W):
        out = out + (_pick(vector, peers, p),)
    return out


@triton.jit
def _reduce_tile(bases, peers, src_offsets, offs, mask, DTYPE: tl.constexpr, W: tl.constexpr):
    """Sum ``offs`` of every rank's region at that rank's ``src_offsets`` (bytes, per lane), in rank order, fp32.

    All ``W`` loads are issued before the first add, so the peers' reads overlap.
    """
    return _sum_sources(_picked(bases + src_offsets, peers, W), None, 0, offs, mask, DTYPE, W, False)


@triton.jit
def _reduce_tile_own(bases, peers, src_offsets, own, rank, offs, mask, DTYPE: tl.constexpr, W: tl.constexpr):
    """:func:`_reduce_tile`, except that this rank's term is read from ``own`` (its input) instead of its region."""
    return _sum_sources(_picked(bases + src_offsets, peers, W), own, rank, offs, mask, DTYPE, W, True)


@triton.jit
def _peer_bases(table, W: tl.constexpr):
    """Every rank's region base as ``W`` scalars (a tuple), loaded from the pointer table with the prologue's
    loads (same round trip): a data loop then needs no cross-lane pick per peer after a barrier."""
    bases = ()
    for p in tl.static_range(W):
        bases = bases + (tl.load(table + p),)
    return bases


@triton.jit
def _zero_copy_bits(peer_zc, peers, W: tl.constexpr):
    """The start flags' zero-copy bits (one per lane) as one int32 mask: bit ``p`` set when rank ``p``'s data is
    in its registered region for this call.  One reduction, where per-peer offsets cost a pick each."""
    return tl.sum(tl.where(peer_zc & (peers < W), 1 << peers, 0), axis=0)


@triton.jit
def _sources(peer_bases, zc_bits, slot_offset, W: tl.constexpr):
    """Where rank ``p``'s data is for this call (a tuple of ``W`` addresses): its registered region when bit ``p``
    of ``zc_bits`` is set, else its staging slot at ``slot_offset``."""
    srcs = ()
    for p in tl.static_range(W):
        srcs = srcs + (peer_bases[p] + tl.where(((zc_bits >> p) & 1) != 0, PAD_BYTES, slot_offset),)
    return srcs


@triton.jit
def _rank_view(table, ctrl, rank, W: tl.constexpr, WP: tl.constexpr, VIRTUAL: tl.constexpr):
    """``(rank, table, ctrl, peers, bases)``: this program's rank, pointer table and control words, the lane
    indices ``0..WP-1`` and every rank's region base (one vector load).  The start of every collective kernel.

    With ``VIRTUAL`` (virtual ranks in one launch) grid axis 1 is the rank, and each rank has its own table row
    and control words: the kernel body after this is the one real ranks run.
    """
    if VIRTUAL:
        rank = tl.program_id(1)
        table += rank * (W + 1)
        ctrl += rank * CTRL_WORDS
    peers = tl.arange(0, WP)
    bases = tl.load(table + peers, mask=peers < W, other=0)
    return rank, table, ctrl, peers, bases


@triton.jit
def _slot_offset(slot_bytes, epoch):
    """Byte offset, in every rank's region, of the staging slot of call ``epoch``: slot ``epoch % 2`` after the
    signal pad and the registered region (the layout in the module docstring; invariant 4)."""
    return PAD_BYTES + slot_bytes * (1 + epoch % 2)


@triton.jit
def _tile_offsets(tile, lane, numel):
    """``(offs, mask)``: the element offsets of tile ``tile`` of a ``numel``-element buffer and which of them exist.
    ``lane`` is ``tl.arange(0, BLOCK)`` (``BLOCK`` elements a tile), made once by the kernel outside its loops.
    The grid-stride tile loops (tile ``t`` belongs to program ``t % num_programs``) cut their tiles with this or
    :func:`_chunk_tile_offsets` (docs/architecture.md names the loops with offsets of their own, and why)."""
    offs = tile * lane.shape[0] + lane
    return offs, offs < numel


@triton.jit
def _chunk_tile_offsets(c, tile, chunk, lane, numel):
    """``(offs, mask)``: :func:`_tile_offsets` of tile ``tile`` of chunk ``c`` (``chunk`` elements from ``c * chunk``;
    the last chunks may be short or empty) of a ``numel``-element buffer."""
    in_chunk = tile * lane.shape[0] + lane
    offs = c * chunk + in_chunk
    return offs, (in_chunk < chunk) & (offs < numel)


@triton.jit
def _prologue(table, ctrl, rank, W: tl.constexpr, WP: tl.constexpr, VIRTUAL: tl.constexpr):
    """:func:`_rank_view`, then this call's epoch and the error latch.

    The three loads are independent (one round trip).  A latched workspace (an earlier wait failed) makes
    every output of the call NaN: its buffers and counters may be out of step with the peers.
    """
    rank, table, ctrl, peers, bases = _rank_view(table, ctrl, rank, W, WP, VIRTUAL)
    epoch = tl.load(ctrl + CTRL_EPOCH, volatile=True)
    healthy = tl.load(ctrl + CTRL_LATCH, volatile=True) == 0
    return rank, table, ctrl, peers, bases, epoch, healthy


@triton.jit
def _nan_unless(ok, acc):
    """``acc`` where the waits before it succeeded, else NaN: a failed call's output never passes for a sum."""
    return tl.where(ok, acc, float("nan"))


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
    slot ``epoch % 2``.  Zero-copy path: ``inp`` is this rank's registered region and is read there.  Which
    one each rank took travels in its start flag, so peers read every rank's data where it really is, and
    the end barrier (which protects registered regions) runs on every rank when any rank is zero-copy.  A
    zero-copy rank stages its sum in its slot and copies it to ``out`` after the end barrier (``out`` may be
    the registered region); a copy-path rank writes ``out`` directly (``out`` may alias ``inp``).
    With ``VIRTUAL``, ``inp``/``out`` are ``[W, numel]`` and row ``r`` belongs to rank ``r``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    peer_bases = _peer_bases(table, W)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    my_slot = _ptr(_pick(bases, peers, rank) + slot_offset, DTYPE)
    num_tiles = tl.cdiv(numel, BLOCK)
    lane = tl.arange(0, BLOCK)

    if not ZERO_COPY:
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
            offs, mask = _tile_offsets(tile, lane, numel)
            tl.store(my_slot + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
    ok, peer_zc = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, ZERO_COPY, timeout, W, WP, USE_PTX)
    ok = ok & healthy
    zc_bits = _zero_copy_bits(peer_zc, peers, W)
    any_zc = zc_bits != 0
    srcs = _sources(peer_bases, zc_bits, slot_offset, W)

    for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
        offs, mask = _tile_offsets(tile, lane, numel)
        acc = _nan_unless(ok, _sum_sources(srcs, None, rank, offs, mask, DTYPE, W, False))
        if ZERO_COPY:
            tl.store(my_slot + offs, acc.to(DTYPE), mask=mask)
        else:
            tl.store(out + offs, acc.to(DTYPE), mask=mask)

    if any_zc:
        _barrier(bases, peers, ctrl, table, rank, PHASE_END, pid, epoch + 1, timeout, W, WP, USE_PTX)
    if ZERO_COPY:
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=STAGES):
            offs, mask = _tile_offsets(tile, lane, numel)
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
    chunk from its owner's source region.  A rank's source region is its staging slot (copy path: only the
    ``W - 1`` chunks peers reduce are staged; its own term of chunk ``r`` is read from ``inp``) or its
    registered region (zero-copy: ``inp`` is that region, reduced in place); each rank's choice travels in
    its start flag, and the end barrier protecting registered regions runs when any rank is zero-copy.  A
    zero-copy rank stages the gathered chunks in slot 0 and copies them to ``out`` after the end barrier.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    peer_bases = _peer_bases(table, W)
    if VIRTUAL:
        inp += rank * numel
        out += rank * numel
    DTYPE: tl.constexpr = inp.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot_offset = _slot_offset(slot_bytes, epoch)
    if ZERO_COPY:
        my_offset = PAD_BYTES
    else:
        my_offset = slot_offset
    my_base = _pick(bases, peers, rank)
    my_src = _ptr(my_base + my_offset, DTYPE)
    # Chunks start at multiples of CHUNK_ALIGN elements so every chunk's accesses stay 16-byte vectors.
    chunk = tl.multiple_of(tl.cdiv(tl.cdiv(numel, W), CHUNK_ALIGN) * CHUNK_ALIGN, CHUNK_ALIGN)
    tiles_per_chunk = tl.cdiv(chunk, BLOCK)
    lane = tl.arange(0, BLOCK)

    # Small tiles and more than two ranks: tile ``t`` of every chunk in one ``[WP, BLOCK]`` access (row ``c`` =
    # chunk ``c``), so the copies of all chunks are one round trip, not one per chunk.  Same tile-to-program
    # map as the per-chunk loops.
    BATCH: tl.constexpr = (WP * BLOCK <= BATCH_ELEMS) & (W > 2)
    rows = tl.arange(0, WP)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    if BATCH:
        # Every rank's base again, as a column (loaded with the prologue's, no layout conversion).
        row_bases = tl.load(table + rows, mask=rows < W, other=0)
    if not ZERO_COPY:
        # Stage the chunks peers will reduce; chunk ``rank`` is only ever read by this rank, from ``inp``.
        if BATCH:
            for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                in_chunk = tile * BLOCK + cols
                offs = rows * chunk + in_chunk
                mask = (rows < W) & (rows != rank) & (in_chunk < chunk) & (offs < numel)
                tl.store(my_src + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
        else:
            for c in tl.static_range(W):
                if c != rank:
                    for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                        offs, mask = _chunk_tile_offsets(c, tile, chunk, lane, numel)
                        tl.store(my_src + offs, tl.load(inp + offs, mask=mask), mask=mask, cache_modifier=".cg")
    ok, peer_zc = _start_barrier(bases, peers, ctrl, table, rank, pid, epoch, ZERO_COPY, timeout, W, WP, USE_PTX)
    ok = ok & healthy
    zc_bits = _zero_copy_bits(peer_zc, peers, W)
    any_zc = zc_bits != 0
    srcs = _sources(peer_bases, zc_bits, slot_offset, W)

    # Reduce-scatter: this rank owns chunk ``rank``; its own term is ``inp`` on both paths.
    for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
        offs, mask = _chunk_tile_offsets(rank, tile, chunk, lane, numel)
        acc = _sum_sources(srcs, inp, rank, offs, mask, DTYPE, W, True)
        reduced = _nan_unless(ok, acc).to(DTYPE)
        tl.store(my_src + offs, reduced, mask=mask, cache_modifier=".cg")
        if not ZERO_COPY:
            tl.store(out + offs, reduced, mask=mask)
    ok = _barrier(bases, peers, ctrl, table, rank, PHASE_MID, pid, epoch + 1, timeout, W, WP, USE_PTX) & ok

    # All-gather: chunk ``c`` comes from rank ``c``'s source region.
    stage = _ptr(my_base + PAD_BYTES + slot_bytes, DTYPE)
    if BATCH:
        # Row ``c``'s source: rank ``c``'s region at the offset its start flag named.
        owners = _row_ptrs(row_bases + tl.where(((zc_bits >> rows) & 1) != 0, PAD_BYTES, slot_offset), DTYPE)
        for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
            in_chunk = tile * BLOCK + cols
            offs = rows * chunk + in_chunk
            mask = (rows < W) & ((rows != rank) | ZERO_COPY) & (in_chunk < chunk) & (offs < numel)
            vals = _nan_unless(ok, tl.load(owners + offs, mask=mask, cache_modifier=".cg"))
            if ZERO_COPY:
                # Stage first: ``out`` may be the registered region that peers still read.
                tl.store(stage + offs, vals, mask=mask)
            else:
                tl.store(out + offs, vals, mask=mask)
    else:
        for c in tl.static_range(W):
            if (c != rank) | ZERO_COPY:
                owner = _ptr(srcs[c], DTYPE)
                for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                    offs, mask = _chunk_tile_offsets(c, tile, chunk, lane, numel)
                    vals = tl.load(owner + offs, mask=mask, cache_modifier=".cg")
                    vals = _nan_unless(ok, vals)
                    if ZERO_COPY:
                        # Stage first: ``out`` may be the registered region that peers still read.
                        tl.store(stage + offs, vals, mask=mask)
                    else:
                        tl.store(out + offs, vals, mask=mask)
    if any_zc:
        _barrier(bases, peers, ctrl, table, rank, PHASE_END, pid, epoch + 1, timeout, W, WP, USE_PTX)
    if ZERO_COPY:
        for c in tl.static_range(W):
            for tile in tl.range(pid, tiles_per_chunk, num_programs, num_stages=STAGES):
                offs, mask = _chunk_tile_offsets(c, tile, chunk, lane, numel)
                tl.store(out + offs, tl.load(stage + offs, mask=mask), mask=mask)
    _finish(ctrl, epoch, num_programs)
