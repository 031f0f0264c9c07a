"""Run a benchmark: the ranks of a planned run (:mod:`sagellm_comm.benchmark.plan`), then the results.

:func:`run_benchmark` checks the request (:func:`~sagellm_comm.benchmark.plan.plan_launch`, or
:func:`~sagellm_comm.benchmark.plan.plan_in_process` on a backend it is given: both raise
:class:`~sagellm_comm.errors.InvalidArgumentError` before anything runs), runs it in the planned
mode (virtual ranks, this torchrun rank, processes it spawns, or an initialised backend it was given)
and writes the results from the process that owns them.  Interrupted (Ctrl-C), it stops the processes
it started before re-raising ``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.config import (
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    BenchConfig,
    LaunchPlan,
)
from sagellm_comm.benchmark.measure import LoopSettings, measure_distributed, measure_virtual
from sagellm_comm.benchmark.ops import resolve_dtype
from sagellm_comm.benchmark.plan import plan_in_process, plan_launch
from sagellm_comm.benchmark.provenance import git_state
from sagellm_comm.benchmark.results import BenchmarkResult, build_result, finish
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks

__all__ = [  # the defaults are re-exported for callers of the runner
    "DEFAULT_ITERS",
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_WARMUP",
    "BenchConfig",
    "BenchmarkResult",
    "LaunchPlan",
    "plan_launch",
    "run_benchmark",
    "run_rank",
]


# ============================================================================ running


def _settings(config: BenchConfig, plan: LaunchPlan, rank: int) -> LoopSettings:
    return LoopSettings(
        op=config.op,
        dtype=resolve_dtype(config.dtype),
        sizes=list(plan.sizes),
        algos=algo_rules.parse_algos(config.algos),
        warmup=config.warmup,
        iters=config.iters,
        graph=config.graph,
        graph_calls=config.graph_calls,
        progress=config.progress and rank == 0,
    )


def _load_selector(config: BenchConfig) -> Any:
    if config.selector_config is None:
        return None
    from sagellm_comm.selector import AlgoSelector

    return AlgoSelector.from_file(config.selector_config)


def run_virtual(config: BenchConfig, plan: LaunchPlan) -> BenchmarkResult:
    from sagellm_comm.virtual import VirtualRankGroup

    device = torch.device("cuda", torch.cuda.current_device())
    group = VirtualRankGroup(plan.world_size, device=device, max_bytes=max(plan.sizes), selector=_load_selector(config))
    try:
        measurement = measure_virtual(
            group, _settings(config, plan, 0), mode=config.virtual_mode, zero_copy=config.zero_copy
        )
    finally:
        group.close()
    return build_result(config, plan, measurement, "custom", device)


def _create_backend(config: BenchConfig, plan: LaunchPlan) -> Any:
    from sagellm_comm.backend import get_comm_backend

    selector = _load_selector(config)
    if selector is not None:
        return get_comm_backend(plan.backend_kind, selector=selector)
    return get_comm_backend(plan.backend_kind)


def run_rank(
    config: BenchConfig,
    plan: LaunchPlan,
    rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    backend: Any = None,
) -> BenchmarkResult:
    """Run this process's rank (initialising a backend unless one is given); every rank gets the result."""
    owns_backend = backend is None
    if owns_backend:
        algo_rules.apply_nccl_algo_env(algo_rules.parse_algos(config.algos))
        backend = _create_backend(config, plan)
        backend.init(
            rank=rank,
            world_size=plan.world_size,
            master_addr=master_addr,
            master_port=master_port,
            timeout=config.timeout,
        )
    try:
        measurement = measure_distributed(backend, _settings(config, plan, backend.rank), backend.rank)
        return build_result(config, plan, measurement, backend.name, backend.device)
    finally:
        if owns_backend:
            backend.destroy()


def _spawned_rank(index: int, world_size: int, port: int, config: BenchConfig, plan: LaunchPlan) -> BenchmarkResult:
    return run_rank(config, plan, rank=index, master_addr=MASTER_ADDR, master_port=port)


def run_spawn(config: BenchConfig, plan: LaunchPlan) -> BenchmarkResult:
    """Start ``plan.world_size`` ranks on this host (:func:`~sagellm_comm.benchmark.spawn.spawn_ranks`)."""
    return spawn_ranks(_spawned_rank, (config, plan), plan.world_size, timeout=config.timeout)


def run_benchmark(config: BenchConfig, *, print_table: bool = False, backend: Any = None) -> BenchmarkResult | None:
    """Run ``config``; returns the result where it is complete (every mode but non-zero torchrun ranks,
    which return None).  Files, plot and table are produced once, by the process that owns the result.
    """
    if backend is not None:
        plan = replace(plan_in_process(config, backend), git=git_state())  # the tree that runs, not the one after
        result = run_rank(config, plan, backend=backend)
        return finish(result, config, print_table=print_table) if backend.rank == 0 else None
    plan = replace(plan_launch(config), git=git_state())
    if plan.mode == "virtual":
        return finish(run_virtual(config, plan), config, print_table=print_table)
    if plan.mode == "torchrun":
        result = run_rank(config, plan)
        is_rank0 = int(os.environ["RANK"]) == 0
        return finish(result, config, print_table=print_table) if is_rank0 else None
    return finish(run_spawn(config, plan), config, print_table=print_table)
