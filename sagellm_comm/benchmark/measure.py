"""The measurement loops: one rank of a distributed run, and a virtual-rank run on one GPU.

Both loops follow the same order: for every size, allocate that size's inputs once (every algorithm of
the run reads the same inputs), then for every algorithm: warm up, barrier, time a batch of iterations
(:func:`~sagellm_comm.benchmark.timing.time_iterations`), then run one more, untimed call on freshly
reset inputs and count wrong elements against the independent reference.  The statistics of a
distributed run are reduced across ranks on the backend's CPU (Gloo) group: the maximum of every
statistic (the slowest rank is the collective's time) and the sum of wrong elements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.ops import BROADCAST_ROOT, OpBuffers, count_wrong, make_buffers
from sagellm_comm.benchmark.progress import ProgressBar
from sagellm_comm.benchmark.timing import TimingStats, capture_graph, summarize, time_iterations
from sagellm_comm.errors import CommError, WorkspaceExhaustedError


@dataclass
class Point:
    """One measured (size, algo) point, before it becomes a report record."""

    nbytes: int
    count: int
    algo_requested: str
    algo_id: str
    rule_id: str
    reason: str
    stats: TimingStats
    num_wrong: int


@dataclass
class Measurement:
    """What a loop returns: its points and the (size, algo) points it could not run, with why."""

    points: list[Point] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: bool = False


@dataclass(frozen=True)
class LoopSettings:
    op: str
    dtype: torch.dtype
    sizes: list[int]
    algos: list[str]
    warmup: int
    iters: int
    graph: bool
    progress: bool
    graph_calls: int = 1


# ============================================================================ distributed ranks


CUSTOM_OPS = ("all_gather", "reduce_scatter")  # ops the custom backend also runs on its kernels


def _op_call(backend: Any, bufs: OpBuffers) -> Callable[[], object]:
    """The plain backend call of ``bufs.op`` (the engine's own algorithm)."""
    if bufs.op == "all_reduce":
        return lambda: backend.all_reduce(bufs.work)
    if bufs.op == "all_gather":
        return lambda: backend.all_gather(bufs.output, bufs.work)
    if bufs.op == "reduce_scatter":
        return lambda: backend.reduce_scatter(bufs.output, bufs.work)
    return lambda: backend.broadcast(bufs.work, src=BROADCAST_ROOT)


class DistributedAlgo:
    """How one requested algorithm runs on an initialised backend, and what to record for it.

    On the ``custom`` backend, all-reduce goes through ``backend.all_reduce(tensor, algo=...)`` and what
    ran is read back from ``backend.last_selection`` after the call (kernel, or engine with the rule
    that sent it there); ``ring``/``tree`` are its engine (NCCL) under ``NCCL_ALGO``.
    """

    def __init__(self, requested: str, backend: Any, op: str):
        self.requested = requested
        self.backend = backend
        self.op = op
        self.kind = backend.name
        self.engine_kind = getattr(backend, "engine_kind", self.kind)
        self.custom_all_reduce = self.kind == algo_rules.CUSTOM_KIND and op == "all_reduce"
        # all-gather / reduce-scatter on the custom backend: the kernels when they can, read back per call
        self.custom_labelled = self.kind == algo_rules.CUSTOM_KIND and op in (
            "all_reduce",
            "all_gather",
            "reduce_scatter",
        )
        self.skip_reason = algo_rules.unsupported_reason(requested, self.kind, op)
        if self.skip_reason is None and self.kind == algo_rules.CUSTOM_KIND:
            if requested in algo_rules.KERNEL_ALGOS and getattr(backend, "custom", None) is None:
                why = getattr(backend, "custom_reason", "unknown reason")
                self.skip_reason = f"the custom kernels are off on this world ({why}), so {requested} cannot run"
            else:
                self.skip_reason = algo_rules.engine_reason(requested, self.engine_kind)

    def call(self, bufs: OpBuffers) -> Callable[[], object]:
        if self.custom_all_reduce:
            algo = self.requested if self.requested in ("auto", *algo_rules.KERNEL_ALGOS) else algo_rules.ENGINE_ALGO
            backend, work = self.backend, bufs.work
            return lambda: backend.all_reduce(work, algo=algo)
        return _op_call(self.backend, bufs)

    def _engine_label(self, rule_id: str | None = None, reason: str | None = None) -> tuple[str, str, str]:
        if self.engine_kind in algo_rules.NCCL_KINDS:
            algo_id, nccl_rule, nccl_reason = algo_rules.nccl_run_label()
            return algo_id, rule_id or nccl_rule, f"{reason}; {nccl_reason}" if reason else nccl_reason
        own = f"{self.engine_kind}'s own {self.op} through torch.distributed"
        return self.engine_kind, rule_id or "backend-default", f"{reason}; {own}" if reason else own

    def label(self) -> tuple[str, str, str]:
        """``(algo_id, rule_id, reason)`` of the call that just ran (call it after one untimed call)."""
        if self.custom_labelled:
            selection = getattr(self.backend, "last_selection", None)
            if selection is None:
                return self._engine_label("unknown", "the custom backend did not record its choice")
            if selection.algo in (*algo_rules.KERNEL_ALGOS, *algo_rules.CUSTOM_PATHS):
                return selection.algo, selection.rule_id, selection.reason
            return self._engine_label(selection.rule_id, selection.reason)
        return self._engine_label()


def reduce_across_ranks(backend: Any, values: list[float], op: Any) -> list[float]:
    """``values`` reduced element-wise with ``op`` (a ``torch.distributed.ReduceOp``) over the ranks of ``backend``'s
    world, on its CPU group; every rank calls it and gets the result.  One rank: ``values`` themselves."""
    if backend.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=backend.cpu_group)
    return tensor.tolist()


def graph_replays(
    fn: Callable[[], object], settings: LoopSettings, device: torch.device, reset: Callable[[], object]
) -> tuple[Callable[[], object], Callable[[], object], int]:
    """``(timed, check, calls_per_sample)`` for one point.

    Eager: ``fn`` itself, one call a sample.  ``--graph``: ``timed`` replays a graph of ``graph_calls``
    back-to-back calls (a sample is divided by that count: ranks that start a replay a little apart pay
    the skew once per replay, not once per call, and the launch queue holds fewer entries), ``check``
    replays a graph of one call (its result is what the correctness check compares).
    """
    if not settings.graph:
        return fn, fn, 1
    reset()
    check = capture_graph(fn, device=device).replay
    if settings.graph_calls <= 1:
        return check, check, 1
    return capture_graph(fn, device=device, calls=settings.graph_calls).replay, check, settings.graph_calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_distributed(backend: Any, settings: LoopSettings, rank: int) -> Measurement:
    """Run every (size, algo) point on this rank; every rank returns the same, cross-rank reduced points."""
    device = backend.device
    world_size = backend.world_size
    result = Measurement()
    plans = [DistributedAlgo(a, backend, settings.op) for a in settings.algos]
    for plan in plans:
        if plan.skip_reason is not None:
            result.skipped.append({"algo": plan.requested, "reason": plan.skip_reason})
    runnable = [p for p in plans if p.skip_reason is None]
    bar = ProgressBar(len(settings.sizes) * len(runnable), enabled=settings.progress and rank == 0)
    for nbytes in settings.sizes:
        bufs = make_buffers(settings.op, nbytes, settings.dtype, rank, world_size, device)
        for plan in runnable:
            fn = plan.call(bufs)
            algo_id = rule_id = reason = ""
            error = None
            stats_list = [0.0] * 6
            wrong = 0
            try:
                timed, check, per_sample = graph_replays(fn, settings, device, bufs.reset)
                samples = time_iterations(
                    timed,
                    iters=settings.iters,
                    warmup=settings.warmup,
                    device=device,
                    reset=bufs.reset if bufs.in_place else None,
                    barrier=backend.barrier,
                    hold_device=settings.graph,
                )
                stats_list = summarize([s / per_sample for s in samples]).as_list()
                bufs.prepare_check()
                check()  # the last host-side call (eager, or the capture) recorded what runs
                _sync(device)
                wrong = bufs.num_wrong()
                algo_id, rule_id, reason = plan.label()
            except (CommError, RuntimeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            failed_anywhere = reduce_across_ranks(backend, [1.0 if error else 0.0], dist.ReduceOp.MAX)[0]
            if failed_anywhere:
                result.failed = True
                result.skipped.append(
                    {
                        "algo": plan.requested,
                        "bytes": bufs.nbytes,
                        "reason": error or "failed on another rank (see its stderr)",
                    }
                )
                bar.step(f"{bufs.nbytes} B {plan.requested} FAILED")
                continue
            worst = reduce_across_ranks(backend, stats_list, dist.ReduceOp.MAX)
            total_wrong = int(reduce_across_ranks(backend, [float(wrong)], dist.ReduceOp.SUM)[0])
            result.points.append(
                Point(
                    bufs.nbytes,
                    bufs.count,
                    plan.requested,
                    algo_id,
                    rule_id,
                    reason,
                    TimingStats.from_list(worst, settings.iters),
                    total_wrong,
                )
            )
            bar.step(f"{bufs.nbytes} B {algo_id}")
        del bufs
    bar.close()
    return result


# ============================================================================ virtual ranks


def measure_virtual(group: Any, settings: LoopSettings, mode: str = "stacked", zero_copy: bool = False) -> Measurement:
    """Every (size, algo) point on a :class:`~sagellm_comm.virtual.VirtualRankGroup` (all-reduce only).

    Each virtual rank has its own input (the pattern of its rank); the timed call reduces all of them
    in place; one sample is the time of the whole group's call on the current stream.

    ``mode="stacked"``: one launch for all ranks (``group.all_reduce_stacked``, rows of one
    ``[world_size, numel]`` tensor), the way N GPUs launch at the same moment: device time.
    ``mode="streams"``: one launch per rank on its own stream (``group.all_reduce``), the per-rank host
    path; ``zero_copy`` then reduces the workspace's registered buffers instead of copying inputs in.
    """
    device = group.device
    world_size = group.world_size
    result = Measurement()
    bar = ProgressBar(len(settings.sizes) * len(settings.algos), enabled=settings.progress)
    for nbytes in settings.sizes:
        per_rank = [
            make_buffers("all_reduce", nbytes, settings.dtype, r, world_size, device) for r in range(world_size)
        ]
        count, point_bytes = per_rank[0].count, per_rank[0].nbytes
        expected = per_rank[0].expected()
        if mode == "stacked":
            source = torch.stack([b.source for b in per_rank])
            work = source.clone()
            works = list(work.unbind(0))

            def reset(work=work, source=source) -> None:
                work.copy_(source)

        else:
            sources = [b.source for b in per_rank]
            works = group.get_buffers(count, settings.dtype) if zero_copy else [b.work for b in per_rank]

            def reset(works=works, sources=sources) -> None:
                for work, source in zip(works, sources, strict=True):
                    work.copy_(source)

        del per_rank
        for algo in settings.algos:
            if algo == "auto":
                selection = group.select(point_bytes, point_bytes // max(count, 1))
                algo_id, rule_id, reason = selection.algo, selection.rule_id, selection.reason
            else:
                algo_id, rule_id, reason = algo, "user", f"algo={algo} requested"

            if mode == "stacked":

                def call(work=work, algo=algo) -> object:
                    return group.all_reduce_stacked(work, algo=algo)

            else:

                def call(works=works, algo=algo) -> object:
                    return group.all_reduce(works, algo=algo)

            try:
                timed, check, per_sample = graph_replays(call, settings, device, reset)
                samples = time_iterations(
                    timed,
                    iters=settings.iters,
                    warmup=settings.warmup,
                    device=device,
                    reset=reset,
                    hold_device=settings.graph,
                )
                group.check_errors()
                reset()
                check()
                torch.cuda.synchronize(device)
                group.check_errors()
                wrong = sum(count_wrong(w, expected) for w in works)
            except (CommError, RuntimeError) as exc:
                skip = {"algo": algo, "bytes": point_bytes, "reason": f"{type(exc).__name__}: {exc}"}
                if isinstance(exc, WorkspaceExhaustedError):  # past the algorithm's capacity: refused before it ran
                    skip["over_capacity"] = True
                else:
                    result.failed = True
                result.skipped.append(skip)
                bar.step(f"{point_bytes} B {algo} {'skipped' if 'over_capacity' in skip else 'FAILED'}")
                continue
            stats = summarize([s / per_sample for s in samples])
            result.points.append(Point(point_bytes, count, algo, algo_id, rule_id, reason, stats, wrong))
            bar.step(f"{point_bytes} B {algo_id}")
        del works, expected, reset
    bar.close()
    return result
