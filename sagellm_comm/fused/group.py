"""Group-level fused operations: the group's custom kernels when it has them, else the engine.

Every group with custom kernels (the world, or a sub-group from ``split`` / ``new_subgroup`` on one node)
runs the fused kernels on its own workspace; the GEMM path's dedicated workspace is made collectively by
the group's members on their first ``gemm_all_reduce``.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch

from sagellm_comm.selector import AUTO, GEMM_PATHS, SEQUENTIAL_PATH

from ..arguments import check_finite, check_flag
from ..errors import InvalidArgumentError, undo_after_failure
from ..group import resolve_group
from ..selector import UNFUSED_PATH, Selection
from ..workspace import SymmetricWorkspace
from ._common import FUSED_DTYPES, GEMM_ENGINE_DTYPES, check_gemm_inputs, check_rmsnorm_inputs, engine_all_reduced
from .fp8 import check_quant, unfused_tail
from .gemm import GemmAllReduce, gemm_workspace_bytes
from .rmsnorm import FusedAllReduceRMSNorm

log = logging.getLogger("sagellm_comm")


class _GroupState:
    """What the group-level fused operations keep for one group: the fused operations over its kernels (dropped
    when those kernels are closed: :meth:`forget_kernels`) and the last call's selection."""

    def __init__(self):
        self.rmsnorm: FusedAllReduceRMSNorm | None = None
        self.gemm: GemmAllReduce | None = None
        self.last: Selection | None = None

    def forget_kernels(self) -> None:
        """The group's kernels were closed (its release, the backend's destroy or reset): the fused operations over
        them go too.  They reference the kernels, and through them the group's handle and the backend, which this
        registry must not keep alive."""
        self.rmsnorm = self.gemm = None


# backend -> {id(group handle): (weak reference to the handle, None for the world; the group's state)}.  A group's
# entry goes with its handle, and a backend's with the backend: neither is kept alive from here once the group's
# kernels are closed.
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forget_group(per_backend: dict, key: int, ref: weakref.ref) -> None:
    """The handle of ``per_backend[key]`` was freed: its entry goes (unless a newer handle took the key since)."""
    entry = per_backend.get(key)
    if entry is not None and entry[0] is ref:
        del per_backend[key]


def _kept_state(per_backend: dict | None, handle) -> _GroupState | None:
    """The state ``per_backend`` keeps for ``handle`` (None: the world's), or None: none kept, or the entry under
    its id is a freed handle's whose id was reused."""
    entry = None if per_backend is None else per_backend.get(id(handle))
    if entry is None:
        return None
    ref, state = entry
    return state if handle is None or ref() is handle else None


def _state_of(g) -> _GroupState:
    per_backend = _STATE.get(g.backend)
    if per_backend is None:
        per_backend = _STATE[g.backend] = {}
    handle = g.handle  # the world's CommGroup has handle None
    state = _kept_state(per_backend, handle)
    if state is not None:
        return state
    key = id(handle)
    ref = None if handle is None else weakref.ref(handle, functools.partial(_forget_group, per_backend, key))
    state = _GroupState()
    per_backend[key] = (ref, state)
    return state


def _known_state(group) -> _GroupState | None:
    """The state of ``group`` (None: the default group) if a group-level fused call made one, else None."""
    g = resolve_group(group)
    return _kept_state(_STATE.get(g.backend), g.handle)


def _group_state(group):
    g = resolve_group(group)
    backend = g.backend
    state = _state_of(g)
    kernels_for = getattr(backend, "kernels_for", None)
    if kernels_for is None:
        return g, backend, state, None, f"backend {backend.name!r} has no custom kernels"
    car = kernels_for(g.handle)
    if car is None:
        return g, backend, state, None, backend.kernels_reason(g.handle)
    if state.rmsnorm is not None and state.rmsnorm.workspace is not car.workspace:  # rebuilt by reset()
        state.rmsnorm = None
    if state.gemm is not None and state.gemm.all_reduce is not car:
        state.gemm.workspace.close(timeout=state.gemm.all_reduce.host_timeout_s)
        state.gemm = None
    return g, backend, state, car, ""


def last_selection(group=None) -> Selection | None:
    """What the last group-level fused call on ``group`` ran (path, rule id, reason)."""
    state = _known_state(group)
    return None if state is None else state.last


def group_gemm(group=None) -> GemmAllReduce | None:
    """The :class:`GemmAllReduce` that :func:`gemm_all_reduce` runs on ``group`` (default group if None), or None
    before the group's first call with custom kernels (or where the group has none).

    For benchmarks and tuning: its ``copy_engine_chunks(m)`` says how a call of M rows is pipelined, and setting
    ``ce_chunks`` (None: by M) changes it for the next calls of every rank -- set it alike on all of them, as its
    ``selector`` (a :class:`GemmPathSelector`: the custom backend's ``gemm_policy=``, which the group's set-up
    compared among its members): nothing compares a change made here, and ranks that pick different paths for one
    call wait for each other until the kernels' timeout.
    """
    state = _known_state(group)
    return None if state is None else state.gemm


def all_reduce_residual_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group=None,
    quant: str | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``new_residual = residual + all_reduce(x)``, ``normed = rmsnorm(new_residual) * weight`` over ``group``
    (default group if None), optionally quantised to FP8.

    ``x``, ``residual``: contiguous ``[tokens, hidden]``; ``weight``: ``[hidden]``; one dtype (bf16, fp16, fp32),
    on the group's device.  Returns:

    * ``quant=None``: ``(normed, new_residual)``;
    * ``quant="fp8"``: ``(q, scale, new_residual)``, ``scale`` the caller's one-element fp32 tensor (static);
    * ``quant="fp8_per_token"``: ``(q, scales [tokens, 1] fp32, new_residual)``;
    * ``quant="fp8_group128"``: ``(q, scales [tokens, hidden // 128] fp32, new_residual)``;

    ``q`` is ``torch.float8_e4m3fn`` ``[tokens, hidden]`` (numerics: ``sagellm_comm/fused/fp8.py``,
    :func:`quantize_fp8_reference`).  With the group's custom kernels, one fused kernel
    (:class:`FusedAllReduceRMSNorm`; the fusion policy, the backend's ``fusion_policy`` given when it was made, may
    run the chain unfused); otherwise the group's
    all-reduce then torch ops computing the same outputs, the reason recorded in :func:`last_selection`.  Bad
    arguments raise the same typed errors on both paths (:func:`check_rmsnorm_inputs`, :func:`check_quant`) before
    anything runs, so no rank enters the all-reduce.  Only the kernels bound ``hidden`` (``MAX_HIDDEN``): with the
    group's custom kernels a larger hidden runs unfused (rule ``fused-max-hidden``), the same outputs as the
    fallback.  Enqueued on the current stream; inputs are not modified.
    """
    check_quant(quant, scale, x)
    eps = check_finite(eps, "eps", 0.0)
    g, backend, state, car, why = _group_state(group)
    if car is not None:  # the kernel path checks its inputs (check_rmsnorm_inputs) before it runs anything
        if state.rmsnorm is None:
            state.rmsnorm = FusedAllReduceRMSNorm(
                car.workspace,  # the all-reduce policy a fusion rule follows: car's, as it is at each call
                timeout_s=car.timeout_s,
                max_programs=car.max_programs,
                fallback=car.fallback,
                all_reduce=car,
                policy=getattr(backend, "fusion_policy", None),  # the custom backend's fusion_policy=
            )
            car.close_with(state.forget_kernels)  # dropped with the group's kernels (release, destroy, reset)
        out = state.rmsnorm(x, residual, weight, eps, quant=quant, scale=scale)
        state.last = state.rmsnorm.last_selection
        return out
    # The kernel path's checks, before the all-reduce is entered; torch ops take any hidden size.
    check_rmsnorm_inputs(x, residual, weight, g.device, max_hidden=None)
    reduced = engine_all_reduced(x, g.all_reduce, g.world_size)
    state.last = Selection(UNFUSED_PATH, "custom-unavailable", f"{why}; all-reduce then torch add + RMSNorm")
    return unfused_tail(reduced, residual, weight, eps, quant, scale)


def gemm_all_reduce(
    a: torch.Tensor,
    b: torch.Tensor,
    group=None,
    bias: torch.Tensor | None = None,
    path: str = "auto",
    zero_copy: bool = False,
) -> torch.Tensor:
    """Row-parallel linear over ``group``: ``sum over ranks of a @ b`` (+ ``bias`` once), ``[M, N]``.

    ``a``: ``[M, K_shard]``, ``b``: ``[K_shard, N]`` of this rank.  With the group's custom kernels,
    :class:`GemmAllReduce` (its dedicated GEMM workspace is set up collectively on the first
    call); otherwise ``torch.matmul`` then the group's all-reduce (reason in :func:`last_selection`), which from
    3 ranks on sums a 16-bit output in fp32 and rounds once, as the kernels do (:func:`engine_all_reduced`).
    ``zero_copy``: see :meth:`GemmAllReduce.__call__` (a workspace view, valid until the next call or the group's
    ``destroy()`` / ``reset()``).  Bad arguments raise the same typed errors on both paths
    (:func:`check_gemm_inputs`; the engine also takes fp32 and fp64) before anything runs, so no rank enters the
    all-reduce.
    """
    check_flag(zero_copy, "zero_copy")
    if path != AUTO and path not in GEMM_PATHS:  # refused here too when no kernels run the call
        raise InvalidArgumentError(f"path must be auto or one of {GEMM_PATHS}, got {path!r}")
    g, backend, state, car, why = _group_state(group)
    if car is not None and isinstance(a, torch.Tensor) and a.dtype in FUSED_DTYPES:
        if state.gemm is None:
            # Before the collective set-up: a refused first call makes nothing, and enters nothing its peers join.
            check_gemm_inputs(a, b, bias, g.device, FUSED_DTYPES)
            capacity = backend.max_bytes if g.handle is None else backend.group_max_bytes
            ws = SymmetricWorkspace.rendezvous(
                g.rank,
                g.world_size,
                gemm_workspace_bytes(capacity),
                backend.device,
                lambda obj: backend.exchange(obj, g.handle, "the fused GEMM + all-reduce's workspace rendezvous"),
                config=car.config,
                ranks=g.ranks,
            )
            try:
                gemm = GemmAllReduce(
                    ws, car, selector=getattr(backend, "gemm_policy", None),  # compared at the group's set-up
                    timeout_s=car.timeout_s, consumer_programs=2 if ws.device.type == "cpu" else None,
                )  # fmt: skip
                # The fused path's tile owners follow from the consumer's program count, by default a quarter of
                # the SMs each rank's device reports (GPU models differ): the members launch the smallest
                # proposed, as a workspace's launches do.
                what = "the fused GEMM + all-reduce's consumer programs"
                gemm.consumer_programs = min(backend.exchange(gemm.consumer_programs, g.handle, what))
            except BaseException:  # not kept until the group's kernels go, nor one more with every retry
                undo_after_failure([ws.close], log, "closing the fused GEMM's workspace after its set-up failed")
                raise
            # Released with the group's kernels (destroy, reset), a later call on it saying which.
            car.close_with(lambda: ws.close(car.closed_reason, car.host_timeout_s))
            car.close_with(state.forget_kernels)
            state.gemm = gemm
        out = state.gemm(a, b, bias, path=path, zero_copy=zero_copy)
        state.last = state.gemm.last_selection
        return out
    if car is not None:
        why = f"dtype {a.dtype} is not fused"
    # The kernel path's checks, before the all-reduce is entered (a rank that refuses must enter none: its peers'
    # all-reduce would pair with its next one); the engine also takes fp32 and fp64.
    check_gemm_inputs(a, b, bias, g.device, GEMM_ENGINE_DTYPES)
    # Rank 0's partial carries the bias, rounded once as the sequential path's addmm rounds it (a matmul then an
    # add would round the product first: another partial, other bits than the kernel paths' where the sum is exact).
    out = torch.addmm(bias, a, b) if bias is not None and g.rank == 0 else torch.matmul(a, b)
    engine_all_reduced(out, g.all_reduce, g.world_size, in_place=True)  # 16-bit: fp32 from 3 ranks, as the kernels
    state.last = Selection(SEQUENTIAL_PATH, "custom-unavailable", f"{why}; matmul then all-reduce")
    return out
