"""Per-call fingerprint check: the ranks compare what they are about to run before they run it.

Every protocol of this package assumes that all ranks make the same sequence of calls with the same
algorithm, element count and dtype.  A user mistake (one rank with another size or algorithm) would make
peers read the wrong place or wait on the wrong flag: a wrong sum, or a hang.  In check mode
(``SAGELLM_COMM_CHECK=1``, agreed by the group when the workspace is made) the host launches this
one-program kernel on the same stream right before each collective kernel:

1. Rank ``r`` reads its check counter ``call = ctrl[CTRL_CHECK]`` and writes its fingerprint
   ``(algo, numel, dtype, call)`` (for the fused RMSNorm and GEMM the shape ``rows x cols`` in place of
   ``numel``: :func:`size_word`) into ``prints[call % 2][r]`` of every rank's signal pad (slot
   ``SLOT_CHECK``).
2. Barrier on ``flags[src]`` of the same slot (the all-reduce's ``_barrier_at``: block barrier, one release
   store of ``call + 1`` per rank, bounded acquire polls): every peer's fingerprint of this call is visible.
3. It compares every peer's fingerprint with its own.  At the first disagreeing peer it latches the error
   (``ctrl[CTRL_LATCH]``) and writes status ``ERR_MISMATCH``, the peer, and both fingerprints into the
   host-mapped error record: the collective kernel that follows sees the latch and writes NaN instead of
   computing anything, and the host raises ``CollectiveMismatchError`` naming the rank and both fingerprints.
4. It advances the check counter.

**Across a whole group, through the engine** (``group_fingerprint_check_kernel``).  A hierarchical all-reduce
spans nodes: its node-local and cross groups each compare only their own members, so two nodes whose ranks
agree among themselves but not with each other would pass both.  In check mode its host first all-gathers every
member's fingerprint ``(algo, numel, dtype, global rank)`` through the engine (a complete exchange, stream-ordered
like the rest); this one-program kernel then compares every row with its own and, at the first differing one,
latches the node-local workspace and records the mismatch like step 3 (phase ``PHASE_GROUP_CHECK``, the peer as a
global rank).  Every member sees every row, so every member latches: nobody waits for a rank that stopped.

Why the parity slots: a peer that passed the barrier may already write its fingerprint of ``call + 1``
while this rank still compares, but not of ``call + 2`` (that needs this rank's flag of ``call + 1``), so
``prints[call % 2]`` holds call ``call``'s fingerprints while they are read.  The counter is 64-bit and
only advances, so flags compare with ``>=`` (see ``kernels/all_reduce.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CTRL_CHECK,
    CTRL_LATCH,
    ERR_BLOCK,
    ERR_EPOCH,
    ERR_MINE,
    ERR_MISMATCH,
    ERR_PEER,
    ERR_PHASE,
    ERR_STATUS,
    ERR_THEIRS,
    MAX_WORLD,
    PHASE_CHECK,
    PHASE_GROUP_CHECK,
    SLOT_CHECK,
    SLOT_WORDS,
    _barrier_at,
    _fence_sc_sys,
    _flag_ptrs,
    _pick,
    _rank_view,
)
from sagellm_comm.selector import HIERARCHICAL_ALGO, LAMPORT, ONE_SHOT, TWO_SHOT

FP_WORDS = tl.constexpr(4)  # algo, numel, dtype, call
CHECK_FLAG_WORD = tl.constexpr(SLOT_CHECK.value * SLOT_WORDS.value)  # flags[src]
CHECK_PRINT_WORD = tl.constexpr(CHECK_FLAG_WORD.value + MAX_WORLD.value)  # prints[parity][src][FP_WORDS]
assert CHECK_PRINT_WORD.value + 2 * MAX_WORLD.value * FP_WORDS.value <= (SLOT_CHECK.value + 1) * SLOT_WORDS.value

# Stable codes of what a fingerprint names (the host decodes them in error messages).
ALGO_CODES = {
    ONE_SHOT: 1,
    TWO_SHOT: 2,
    LAMPORT: 3,
    "rmsnorm_one_shot": 4,
    "rmsnorm_two_shot": 5,
    "gemm_fused": 6,
    "gemm_fused_one_shot": 7,
    "gemm_copy_engine": 8,
    "all_gather": 9,
    "reduce_scatter": 10,
    "rmsnorm_lamport": 11,
    "two_shot_fp8": 12,  # the all-reduce with an FP8 payload
    HIERARCHICAL_ALGO: 13,  # an all-reduce over nodes: kernels in each node, the engine (or kernels) between
    "refused": 14,  # REFUSED: a member that refused its input (the group check; it raises, the others latch)
}
#: What a member of a hierarchical all-reduce that refused its input puts in the group check in place of the call
#: (check mode): every other member then latches and raises, instead of waiting for a call that never comes.
REFUSED = "refused"
# The fused RMSNorm with an FP8 output: ``rmsnorm_<algo>_<mode>`` (the mode changes what every rank stages).
ALGO_CODES.update(
    {
        f"rmsnorm_{algo}_{mode}": 16 + 4 * i + j
        for i, algo in enumerate((ONE_SHOT, TWO_SHOT, LAMPORT))
        for j, mode in enumerate(("fp8", "fp8_per_token", "fp8_group128"))
    }
)
DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3}
#: The 2-D families compare their shape, not only its element count: the fused RMSNorm's ``rows x hidden`` and the
#: fused GEMM's ``m x n``.  Ranks with [2, 256] and [4, 128] would normalise, or reduce, different layouts.
SHAPED_PREFIXES = ("rmsnorm_", "gemm_")


def size_word(size: int | tuple[int, int]) -> int:
    """The fingerprint's size word: an element count, or a shape ``(rows, cols)`` packed as ``rows << 32 | cols``
    (a shape too large to pack is compared by its element count)."""
    if isinstance(size, tuple):
        rows, cols = size
        if rows < 1 << 31 and cols < 1 << 32:
            return rows << 32 | cols
        return rows * cols
    return size


def decode_size(operation: str, word: int) -> tuple[int, tuple[int, int] | None]:
    """``(numel, shape or None)`` of a size word written for ``operation`` (:func:`size_word`)."""
    if operation.startswith(SHAPED_PREFIXES) and word >= 1 << 32:
        rows, cols = word >> 32, word & 0xFFFFFFFF
        return rows * cols, (rows, cols)
    return word, None


@triton.jit
def _record_mismatch(
    ctrl, table, W: tl.constexpr, peer, words, mine, theirs, call, PHASE: tl.constexpr, USE_PTX: tl.constexpr
):
    """Latch this rank's workspace; the first to latch records the mismatch: ``peer``, both fingerprints
    ``(algo, numel, dtype, call)`` (``words`` indexes them), the check call, ``PHASE``.  The status word is
    stored last, after a system-scope fence (as :func:`_record_timeout` does)."""
    was = tl.atomic_cas(
        ctrl + CTRL_LATCH, tl.full([], 0, tl.int64), tl.full([], 1, tl.int64), sem="acq_rel", scope="gpu"
    )
    if was == 0:
        err = tl.load(table + W).to(tl.pointer_type(tl.int64))
        tl.store(err + ERR_MINE + words, mine, cache_modifier=".wt")
        tl.store(err + ERR_THEIRS + words, theirs, cache_modifier=".wt")
        tl.store(err + ERR_PEER, peer, cache_modifier=".wt")
        tl.store(err + ERR_PHASE, tl.full([], PHASE, tl.int64), cache_modifier=".wt")
        tl.store(err + ERR_BLOCK, tl.full([], 0, tl.int64), cache_modifier=".wt")
        tl.store(err + ERR_EPOCH, call, cache_modifier=".wt")
        tl.debug_barrier()  # every lane's stores of the fingerprint words precede the fence (it is cumulative)
        _fence_sc_sys(USE_PTX)
        tl.store(err + ERR_STATUS, tl.full([], ERR_MISMATCH, tl.int64), cache_modifier=".wt")


@triton.jit(do_not_specialize=["rank", "algo", "numel", "dtype_code", "timeout"])
def fingerprint_check_kernel(
    table,
    ctrl,
    rank,
    algo,
    numel,
    dtype_code,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Compare ``(algo, numel, dtype_code, call)`` with every peer's (module docstring); grid ``(1, 1)``.

    With ``VIRTUAL`` the grid is ``(1, W)`` and axis 1 is the rank (its own table row and control words).
    """
    rank, table, ctrl, peers, bases = _rank_view(table, ctrl, rank, W, WP, VIRTUAL)
    valid = peers < W
    call = tl.load(ctrl + CTRL_CHECK, volatile=True)
    parity = call % 2
    words = tl.arange(0, FP_WORDS)
    zero = tl.zeros([FP_WORDS], tl.int64)
    mine = tl.where(words == 0, zero + algo, zero + call)
    mine = tl.where(words == 1, zero + numel, mine)
    mine = tl.where(words == 2, zero + dtype_code, mine)

    # 1. This rank's fingerprint into every rank's pad.
    own_row = CHECK_PRINT_WORD + (parity * MAX_WORLD + rank) * FP_WORDS
    dst = _flag_ptrs(bases[:, None], own_row + words[None, :])
    tl.store(dst, tl.broadcast_to(mine[None, :], [WP, FP_WORDS]), mask=valid[:, None])
    # 2. Every peer's fingerprint of this call is visible after the barrier.
    ok, _ = _barrier_at(
        bases, peers, ctrl, table, rank, CHECK_FLAG_WORD, PHASE_CHECK, call * 0, call + 1, timeout, W, WP, USE_PTX,
        call + 1,
    )  # fmt: skip
    if ok:
        # 3. Compare.
        my_base = _pick(bases, peers, rank)
        rows = CHECK_PRINT_WORD + (parity * MAX_WORLD + tl.where(valid, peers, 0)) * FP_WORDS
        theirs = tl.load(
            _flag_ptrs(my_base, rows[:, None] + words[None, :]), mask=valid[:, None], other=0, volatile=True
        )
        differs = tl.sum(((theirs != mine[None, :]) & valid[:, None]).to(tl.int32), axis=1) > 0
        first = tl.min(tl.where(differs, peers, WP), axis=0)
        if first < W:
            their_print = tl.sum(tl.where(peers[:, None] == first, theirs, 0), axis=0)
            _record_mismatch(ctrl, table, W, first.to(tl.int64), words, mine, their_print, call, PHASE_CHECK, USE_PTX)
    # 4. Only this rank's next check reads the counter, in stream order after this kernel.
    tl.store(ctrl + CTRL_CHECK, call + 1)


@triton.jit(do_not_specialize=["me", "n"])
def group_fingerprint_check_kernel(
    table, ctrl, prints, me, n, W: tl.constexpr, NP: tl.constexpr, USE_PTX: tl.constexpr
):
    """Compare row ``me`` of ``prints`` (int64 ``[n, FP_WORDS]``: ``algo, numel, dtype, global rank`` of every
    member of a group, as the engine all-gathered them) with every row; at the first that differs in
    ``algo, numel, dtype``, latch this rank's workspace (``table``, ``ctrl``: ``W`` ranks) and record the
    mismatch, the peer as its global rank (module docstring).  Grid ``(1, 1)``; waits for nothing.
    """
    rows = tl.arange(0, NP)
    valid = rows < n
    words = tl.arange(0, FP_WORDS)
    everyone = tl.load(prints + rows[:, None] * FP_WORDS + words[None, :], mask=valid[:, None], other=0)
    own = tl.load(prints + me * FP_WORDS + words)
    compared = (words < 3)[None, :] & valid[:, None]  # word 3 is the global rank
    differs = tl.sum(((everyone != own[None, :]) & compared).to(tl.int32), axis=1) > 0
    first = tl.min(tl.where(differs, rows, NP), axis=0)
    if first < n:
        call = tl.load(ctrl + CTRL_CHECK, volatile=True)
        theirs = tl.sum(tl.where(rows[:, None] == first, everyone, 0), axis=0)
        peer = tl.sum(tl.where(words == 3, theirs, 0), axis=0)
        mine = tl.where(words == 3, call, own)
        theirs = tl.where(words == 3, call, theirs)
        _record_mismatch(ctrl, table, W, peer, words, mine, theirs, call, PHASE_GROUP_CHECK, USE_PTX)
