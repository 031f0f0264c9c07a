"""Collective microbenchmarks: timing, nccl-tests-style tables, JSON/CSV, plots, the ``bench`` and ``overlap``
commands.

Python entry point::

    from sagellm_comm.benchmark import run_all_reduce_benchmark

    result = run_all_reduce_benchmark(backend="gloo", message_sizes=[1024, 1 << 20], world_size=2)
    print(result.table)

Command line: ``sagellm-comm bench`` or ``python -m sagellm_comm.benchmark.run_bench`` (docs/benchmark.md);
``sagellm-comm overlap`` or ``python -m sagellm_comm.benchmark.run_overlap_bench`` (docs/layers.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm_comm.benchmark.report import BenchmarkRecord, RunInfo
from sagellm_comm.benchmark.runner import (
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    BenchConfig,
    BenchmarkResult,
    run_benchmark,
)
from sagellm_comm.benchmark.sizes import parse_size, parse_size_range

__all__ = [
    "BenchConfig",
    "BenchmarkRecord",
    "BenchmarkResult",
    "RunInfo",
    "parse_size",
    "parse_size_range",
    "run_all_reduce_benchmark",
    "run_benchmark",
    "run_overlap_benchmark",
]


def run_all_reduce_benchmark(
    backend: Any = "auto",
    message_sizes: Sequence[int | str] | str | None = None,
    output_dir: str | None = DEFAULT_OUTPUT_DIR,
    warmup_iters: int = DEFAULT_WARMUP,
    benchmark_iters: int = DEFAULT_ITERS,
    *,
    algos: Sequence[str] | str = ("auto",),
    op: str = "all_reduce",
    dtype: str = "float32",
    world_size: int | None = None,
    virtual_ranks: int | None = None,
    virtual_mode: str = "stacked",
    graph: bool = False,
    selector_config: str | None = None,
    plot: str | None = None,
    progress: bool = False,
    print_table: bool = False,
) -> BenchmarkResult | None:
    """Benchmark all-reduce (or ``op``) over ``message_sizes`` and write ``<op>_ws<N>_<time>.json/.csv``.

    Args:
        backend: a kind (``"auto"``, ``"gloo"``, ``"nccl"``, ``"custom"``...), launched as the CLI does
            (spawned processes, torchrun's environment, or ``virtual_ranks``), or an initialised
            :class:`~sagellm_comm.backend.CommBackend` to run on this process's rank (every rank calls).
        message_sizes: bytes (ints or strings like ``"64K"``), or a range string ``"1K:1M"``.
        output_dir: where the files go; None writes none.
        warmup_iters, benchmark_iters: untimed and timed calls per point.
        algos: algorithms to compare (see :mod:`sagellm_comm.benchmark.algos`).
        virtual_ranks, virtual_mode: N ranks on one GPU, ``"stacked"`` (one launch) or ``"streams"``.

    Returns:
        The :class:`BenchmarkResult` (records, run info, file paths); None on non-zero ranks.
    Raises:
        InvalidArgumentError: a request that cannot run here (the message says why).
    """
    if isinstance(message_sizes, str):
        sizes: list[int] | None = parse_size_range(message_sizes)
    elif message_sizes is None:
        sizes = None
    else:
        sizes = [parse_size(s) if isinstance(s, str) else s for s in message_sizes]  # checked by the plan
    config = BenchConfig(
        op=op,
        backend=backend if isinstance(backend, str) else "instance",
        algos=[algos] if isinstance(algos, str) else list(algos),
        sizes=sizes,
        dtype=dtype,
        warmup=warmup_iters,
        iters=benchmark_iters,
        graph=graph,
        selector_config=selector_config,
        output_dir=output_dir,
        plot=plot,
        world_size=world_size,
        virtual_ranks=virtual_ranks,
        virtual_mode=virtual_mode,
        progress=progress,
        command="run_all_reduce_benchmark(...)",
    )
    return run_benchmark(config, print_table=print_table, backend=None if isinstance(backend, str) else backend)


def run_overlap_benchmark(*args: Any, **kwargs: Any) -> Any:
    """:func:`sagellm_comm.benchmark.run_overlap_bench.run_overlap_benchmark` (imported on first call,
    so ``python -m sagellm_comm.benchmark.run_overlap_bench`` does not find its module pre-imported)."""
    from sagellm_comm.benchmark.run_overlap_bench import run_overlap_benchmark as run

    return run(*args, **kwargs)
