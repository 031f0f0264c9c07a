"""Row-parallel GEMM fused with its all-reduce at tile level: ``out = sum over ranks of a_r @ b_r (+ bias)``.

Two kernels run concurrently on every rank (the producer on the caller's stream, the consumer on a side
stream launched first, so its few programs are resident before the GEMM fills the GPU):

* ``gemm_publish_kernel`` (producer, one program per output tile, never waits): computes tile ``t`` of
  ``a_r @ b_r`` in fp32, stores it (rounded to the dtype) into this rank's tile buffer, then, after a block
  barrier, one release store (system scope) of ``epoch + 1`` into ``produced[t]`` of its *own* flag area.
  Peers read the flag remotely with acquire loads: one store per tile instead of ``W`` remote ones.
* ``tile_all_reduce_kernel`` (consumer, ``C`` programs, C * W small enough to leave the producer SMs):
  program ``p`` walks tiles ``p, p + C, ...`` in launch order, so it meets early tiles first.  Tile ``t``
  (step ``j`` of program ``p``) is owned by rank ``(p + j) % W``.  The owner waits until every rank's
  ``produced[t]`` reached ``epoch + 1`` (acquire), sums the ``W`` partial tiles in rank order in fp32, adds
  the bias once, writes the result to its output and over its own partial tile (nobody else reads its
  partial of a tile it owns), then raises ``reduced[t]``; the other ranks wait for the owner's
  ``reduced[t]`` and copy the tile (a step behind, so the owner has time).  Each tile is reduced exactly
  once, so every rank gets identical bits.  ``ONE_SHOT``: every rank reduces every tile itself (no second
  flag; ``W - 1`` times the traffic, one flag round trip fewer, for small outputs).

Region of each rank (a dedicated :class:`SymmetricWorkspace`, so all-reduce staging never touches the
tile flags)::

    base + 0                         signal pad (PAD_BYTES; end barrier; slot 3: sagellm_comm/kernels/copy_engine.py)
    base + PAD_BYTES                 produced: int64[MAX_TILES]
    base + PAD_BYTES + 8 MAX_TILES   reduced:  int64[MAX_TILES]
    base + DATA_OFFSET + parity * buffer_bytes   the [M, N] tile buffer of calls with epoch % 2 == parity

Invariants:

1. *Flags carry epochs, never reset.*  ``produced[t]``/``reduced[t]`` hold ``epoch + 1`` of the last call
   that published tile ``t``; a waiter of call ``epoch`` accepts any value ``>= epoch + 1`` (64-bit, never
   wraps).  Shapes may change between calls: a tile index only ever grows in epoch.
2. *Buffer reuse.*  Call ``epoch`` writes buffer ``epoch % 2``.  The last consumer program of every rank
   to finish ends with a barrier among the ranks (``PHASE_END``): a rank's consumer completes only after
   every peer's consumer has finished all its reads of call ``epoch``.  Anything ordered after it on this
   rank (the next call, on any path of this workspace, e.g. ``sagellm_comm/kernels/copy_engine.py``) may overwrite
   either buffer.
3. *Epochs on the device.*  Both kernels read ``ctrl[0]``; the consumer's last program advances it; the
   host joins the side stream before the next call, so the next producer sees the new epoch.
4. *Bounded waits* as in ``sagellm_comm/kernels/all_reduce.py``: on expiry the error latch and the host-mapped error
   record name the missing peer (phase ``start``: a partial tile, ``mid``: a reduced tile, ``end``: the end
   barrier), and later waits return at once; a tile whose wait failed, or any tile of a latched workspace,
   is written as NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import (
    CTRL_DONE,
    CTRL_EPOCH,
    CTRL_WORDS,
    FLAG_BYTES,
    PAD_BYTES,
    PHASE_END,
    PHASE_MID,
    PHASE_TILE,
    _barrier,
    _flag_ptrs,
    _nan_unless,
    _pick,
    _prologue,
    _ptr,
    _wait_flags,
)

MAX_TILES = tl.constexpr(32768)
PRODUCED_WORD = tl.constexpr(PAD_BYTES.value // FLAG_BYTES.value)  # int64 word index of produced[0]
REDUCED_WORD = tl.constexpr(PRODUCED_WORD.value + MAX_TILES.value)
DATA_OFFSET = tl.constexpr(PAD_BYTES.value + 2 * FLAG_BYTES.value * MAX_TILES.value)


@triton.jit
def _tile_coords(t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index (launch order) -> (tile row, tile column), grouped for L2 reuse of ``b``."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = t // per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (t % per_group) % group_m
    tile_n = (t % per_group) // group_m
    return tile_m, tile_n


@triton.jit(do_not_specialize=["rank", "buffer_bytes"])
def gemm_publish_kernel(
    a,
    b,
    table,
    ctrl,
    M,
    N,
    K,
    stride_aw,
    stride_am,
    stride_ak,
    stride_bw,
    stride_bk,
    stride_bn,
    rank,
    buffer_bytes,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Producer: tile ``t`` of ``a @ b`` ([M, K] @ [K, N]) into this rank's buffer, then its flag.

    ``t = program_id(0)``.  With ``VIRTUAL`` the grid is one axis of ``tiles * W`` programs, program ``i``
    being tile ``i // W`` of rank ``i % W`` (rank ``r`` uses ``a + r * stride_aw``, ``b + r * stride_bw`` and
    row ``r`` of the stacked table and control words): the GPU dispatches programs in index order, so
    every rank's tile ``t`` is finished at about the same time, as on N GPUs, and consumers can start early.
    """
    if VIRTUAL:
        t = tl.program_id(0) // W
        rank = tl.program_id(0) % W
        table += rank * (W + 1)
        ctrl += rank * CTRL_WORDS
        a += rank * stride_aw
        b += rank * stride_bw
    else:
        t = tl.program_id(0)
    rank, table, ctrl, peers, bases, epoch, _ = _prologue(table, ctrl, rank, W, WP, False)
    DTYPE: tl.constexpr = a.dtype.element_ty
    tile_m, tile_n = _tile_coords(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_tile = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] + k0 < K), other=0.0)
        b_tile = tl.load(b_ptrs, mask=(ks[:, None] + k0 < K) & (cols[None, :] < N), other=0.0)
        if not USE_PTX:
            # The interpreter's dot multiplies bf16 operands as integers; fp32 operands are exact copies.
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(a_tile, b_tile, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    my_base = _pick(bases, peers, rank)
    buf = _ptr(my_base + DATA_OFFSET + (epoch % 2) * buffer_bytes, DTYPE)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(buf + rows[:, None] * N + cols[None, :], acc.to(DTYPE), mask=mask)
    # Every thread's stores happen before the one release store of the flag (FIELD pitfall 1).
    tl.debug_barrier()
    tl.atomic_xchg(_flag_ptrs(my_base, PRODUCED_WORD + t), epoch + 1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["rank", "buffer_bytes", "timeout"])
def tile_all_reduce_kernel(
    out,
    bias,
    table,
    ctrl,
    M,
    N,
    rank,
    buffer_bytes,
    timeout,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUB_M: tl.constexpr,
    ONE_SHOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PTX: tl.constexpr,
    VIRTUAL: tl.constexpr,
):
    """Consumer: reduce (or gather) every tile as soon as its flags say so; ``out`` is ``[M, N]``.

    ``bias``: ``[N]`` (read only when ``HAS_BIAS``), added once, by the tile's reducer.  With ``VIRTUAL``
    ``out`` is ``[W, M, N]`` and rank ``program_id(1)`` writes block ``rank``.
    """
    rank, table, ctrl, peers, bases, epoch, healthy = _prologue(table, ctrl, rank, W, WP, VIRTUAL)
    if VIRTUAL:
        out += rank * M * N
    DTYPE: tl.constexpr = out.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(num_tiles - pid, num_programs)
    data_offset = DATA_OFFSET + (epoch % 2) * buffer_bytes
    target = epoch + 1
    valid = peers < W
    my_base = _pick(bases, peers, rank)
    my_buf = _ptr(my_base + data_offset, DTYPE)
    # Padding lanes (W not a power of two) poll this rank's own flag: a valid address, never awaited.
    flag_bases = tl.where(valid, bases, my_base)

    for j in range(0, steps + 1):
        if ONE_SHOT:
            reduce_here = j < steps
        else:
            reduce_here = (j < steps) & ((pid + j) % W == rank)
        if reduce_here:
            t = pid + j * num_programs
            # Reduce tile t: wait for every rank's partial, sum in rank order.
            produced = _flag_ptrs(flag_bases, PRODUCED_WORD + t)
            ok, _ = _wait_flags(
                produced, valid, target, ctrl, table, peers, PHASE_TILE, pid, timeout, W, WP, USE_PTX, True
            )
            ok = ok & healthy
            tile_m, tile_n = _tile_coords(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if HAS_BIAS:
                bias_f32 = tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)
            for sub in tl.static_range(BLOCK_M // SUB_M):
                rows = tile_m * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
                mask = (rows[:, None] < M) & (cols[None, :] < N)
                offs = rows[:, None] * N + cols[None, :]
                acc = tl.zeros((SUB_M, BLOCK_N), dtype=tl.float32)
                for peer in tl.static_range(W):
                    src = _ptr(_pick(bases, peers, peer) + data_offset, DTYPE)
                    acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                if HAS_BIAS:
                    acc += bias_f32[None, :]
                result = _nan_unless(ok, acc).to(DTYPE)
                tl.store(out + offs, result, mask=mask)
                if not ONE_SHOT:
                    tl.store(my_buf + offs, result, mask=mask, cache_modifier=".cg")
            if not ONE_SHOT:
                tl.debug_barrier()
                tl.atomic_xchg(_flag_ptrs(my_base, REDUCED_WORD + t), target, sem="release", scope="sys")
        if not ONE_SHOT:  # noqa: SIM102 (a constexpr branch, resolved at compile time)
            if j >= 1:
                t = pid + (j - 1) * num_programs
                owner = (pid + j - 1) % W
                if owner != rank:
                    # Gather tile t (a step behind) from its owner once the owner's flag says it is reduced.
                    reduced = _flag_ptrs(flag_bases, REDUCED_WORD + t)
                    owner_lane = peers == owner
                    got, _ = _wait_flags(
                        reduced, owner_lane, target, ctrl, table, peers, PHASE_MID, pid, timeout, W, WP, USE_PTX, True
                    )
                    got = got & healthy
                    tile_m, tile_n = _tile_coords(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
                    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    src = _ptr(_pick(bases, peers, owner) + data_offset, DTYPE)
                    for sub in tl.static_range(BLOCK_M // SUB_M):
                        rows = tile_m * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
                        mask = (rows[:, None] < M) & (cols[None, :] < N)
                        offs = rows[:, None] * N + cols[None, :]
                        tile = tl.load(src + offs, mask=mask, cache_modifier=".cg")
                        tl.store(out + offs, _nan_unless(got, tile), mask=mask)
    # Invariant 2: the last program of this rank to finish meets the peers' last programs, so when a
    # rank's consumer has completed, no peer reads its buffers any more.
    tl.debug_barrier()
    done = tl.atomic_add(ctrl + CTRL_DONE, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        _barrier(bases, peers, ctrl, table, rank, PHASE_END, pid * 0, target, timeout, W, WP, USE_PTX)
        tl.atomic_xchg(ctrl + CTRL_DONE, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ctrl + CTRL_EPOCH, epoch + 1, sem="release", scope="gpu")
