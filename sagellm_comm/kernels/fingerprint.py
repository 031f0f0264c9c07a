"""Per-call fingerprint check: the ranks compare what they are about to run before they run it.

Every protocol of this package assumes that all ranks make the same sequence of calls with the same
algorithm, element count and dtype.  A user mistake (one rank with another size or algorithm) would make
peers read the wrong place or wait on the wrong flag: a wrong sum, or a hang.  In check mode
(``SAGELLM_COMM_CHECK=1``, agreed by the group when the workspace is made) the host launches this
one-program kernel on the same stream right before each collective kernel:

1. Rank ``r`` reads its check counter ``call = ctrl[CTRL_CHECK]`` and writes its fingerprint
   ``(algo, numel, dtype, call)`` into ``prints[call % 2][r]`` of every rank's signal pad (slot
   ``SLOT_CHECK``).
2. Barrier on ``flags[src]`` of the same slot (the all-reduce's ``_barrier_at``: block barrier, one release
   store of ``call + 1`` per rank, bounded acquire polls): every peer's fingerprint of this call is visible.
3. It compares every peer's fingerprint with its own.  At the first disagreeing peer it latches the error
   (``ctrl[CTRL_LATCH]``) and writes status ``ERR_MISMATCH``, the peer, and both fingerprints into the
   host-mapped error record: the collective kernel that follows sees the latch and writes NaN instead of
   computing anything, and the host raises ``CollectiveMismatchError`` naming the rank and both fingerprints.
4. It advances the check counter.

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
    CTRL_WORDS,
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
    SLOT_CHECK,
    SLOT_WORDS,
    _barrier_at,
    _flag_ptrs,
    _pick,
)

FP_WORDS = tl.constexpr(4)  # algo, numel, dtype, call
CHECK_FLAG_WORD = tl.constexpr(SLOT_CHECK.value * SLOT_WORDS.value)  # flags[src]
CHECK_PRINT_WORD = tl.constexpr(CHECK_FLAG_WORD.value + MAX_WORLD.value)  # prints[parity][src][FP_WORDS]
assert CHECK_PRINT_WORD.value + 2 * MAX_WORLD.value * FP_WORDS.value <= (SLOT_CHECK.value + 1) * SLOT_WORDS.value

# Stable codes of what a fingerprint names (the host decodes them in error messages).
ALGO_CODES = {
    "one_shot": 1,
    "two_shot": 2,
    "lamport": 3,
    "rmsnorm_one_shot": 4,
    "rmsnorm_two_shot": 5,
    "gemm_fused": 6,
    "gemm_fused_one_shot": 7,
    "gemm_copy_engine": 8,
    "all_gather": 9,
    "reduce_scatter": 10,
    "rmsnorm_lamport": 11,
    "two_shot_fp8": 12,  # the all-reduce with an FP8 payload
}
# The fused RMSNorm with an FP8 output: ``rmsnorm_<algo>_<mode>`` (the mode changes what every rank stages).
ALGO_CODES.update(
    {
        f"rmsnorm_{algo}_{mode}": 16 + 4 * i + j
        for i, algo in enumerate(("one_shot", "two_shot", "lamport"))
        for j, mode in enumerate(("fp8", "fp8_per_token", "fp8_group128"))
    }
)
DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3}


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
    if VIRTUAL:
        rank = tl.program_id(1)
        table += rank * (W + 1)
        ctrl += rank * CTRL_WORDS
    peers = tl.arange(0, WP)
    valid = peers < W
    bases = tl.load(table + peers, mask=valid, other=0)
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
            was = tl.atomic_cas(
                ctrl + CTRL_LATCH, tl.full([], 0, tl.int64), tl.full([], 1, tl.int64), sem="acq_rel", scope="gpu"
            )
            if was == 0:
                err = tl.load(table + W).to(tl.pointer_type(tl.int64))
                their_print = tl.sum(tl.where(peers[:, None] == first, theirs, 0), axis=0)
                tl.store(err + ERR_MINE + words, mine, cache_modifier=".wt")
                tl.store(err + ERR_THEIRS + words, their_print, cache_modifier=".wt")
                tl.store(err + ERR_PEER, first.to(tl.int64), cache_modifier=".wt")
                tl.store(err + ERR_PHASE, tl.full([], PHASE_CHECK, tl.int64), cache_modifier=".wt")
                tl.store(err + ERR_BLOCK, tl.full([], 0, tl.int64), cache_modifier=".wt")
                tl.store(err + ERR_EPOCH, call, cache_modifier=".wt")
                tl.store(err + ERR_STATUS, tl.full([], ERR_MISMATCH, tl.int64), cache_modifier=".wt")
    # 4. Only this rank's next check reads the counter, in stream order after this kernel.
    tl.store(ctrl + CTRL_CHECK, call + 1)
