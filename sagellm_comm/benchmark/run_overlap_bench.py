"""The compute/communication overlap benchmark: a real GEMM loop against a real all-reduce.

``sagellm-comm overlap`` (``python -m sagellm_comm.benchmark.run_overlap_bench``) or
:func:`run_overlap_benchmark`.  For each message size, on every rank:

1. **compute alone**: a loop of ``gemm_iters`` matmuls ``[g, g] @ [g, g]`` (``g = gemm_size``; the
   count is calibrated once so the loop takes about ``compute_duration_ms``, the same count on every
   rank) -> ``compute_duration_ms``.
2. **communication alone**: :func:`sagellm_comm.overlap.all_reduce_async` of ``comm_bytes`` then
   ``wait()`` -> ``comm_duration_ms``.
3. **overlapped**: submit the async all-reduce, run the GEMM loop, ``wait()`` -> ``comm_submit_ms``,
   ``compute_ms``, ``comm_wait_ms``, ``total_ms``; the reduced tensor is checked (``num_wrong``: wrong
   elements summed over ranks, as ``sagellm-comm bench`` counts them).

Timing: on CUDA, events on the current stream (the GEMMs run there, the all-reduce on the side
stream); a device-side spin is queued before each overlapped iteration so the host's submission is
off the device timeline.  On CPU (Gloo), the wall clock around real ``torch.matmul`` calls while Gloo
reduces on its own thread.  Every phase has warm-up, a barrier before each timed batch (and before each
overlapped iteration), and per-iteration samples; a field is the median over iterations, then the
maximum over ranks.  Field definitions: docs/layers.md.

The command follows ``sagellm-comm bench``'s conventions: the same launch modes and options where they
mean the same (``--sizes`` / ``--message-sizes``, ``--world-size``, ``--virtual-ranks``, ``--output-dir``,
``--no-save``, ``--plot``, ``--no-progress``, ``--timeout``), the request checked before any process
starts (:func:`~sagellm_comm.benchmark.overlap_plan.plan_overlap`: one line on stderr, exit 2), a table
on stdout, JSON/CSV with the run's provenance, a progress bar on stderr; exit 1 when a result was wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any

from sagellm_comm.benchmark.config import VIRTUAL_DTYPES
from sagellm_comm.benchmark.ops import DTYPE_ALIASES, DTYPES, dtype_name
from sagellm_comm.benchmark.overlap_measure import _VirtualWorld, measure_overlap
from sagellm_comm.benchmark.overlap_plan import OverlapPlan, plan_overlap, plan_overlap_in_process
from sagellm_comm.benchmark.overlap_results import (
    CPU_DEFAULTS,
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    GPU_DEFAULTS,
    OVERLAP_FIELDS,
    OverlapConfig,
    OverlapRecord,
    OverlapResult,
    derive,
    describe_run,
    format_overlap_table,
    plot_overlap,
    write_overlap_results,
)
from sagellm_comm.benchmark.provenance import command_line
from sagellm_comm.benchmark.report import write_and_report
from sagellm_comm.benchmark.sizes import parse_size, parse_size_list
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.cli_support import (
    OneLineParser,
    add_output_options,
    check_then_run,
    output_dir_from_args,
    sizes_from_args,
)

DESCRIPTION = (
    "Time a GEMM loop against an all-reduce, alone and overlapped; print a table, write JSON/CSV "
    "(fields: docs/layers.md)."
)


# ============================================================================ running


def _run_rank(config: OverlapConfig, plan: OverlapPlan, rank: int | None, world_size: int | None,
              port: int | None) -> OverlapResult:  # fmt: skip
    from sagellm_comm.backend import get_comm_backend

    backend = get_comm_backend(plan.backend_kind)
    backend.init(rank=rank, world_size=world_size, master_addr=MASTER_ADDR if port else None, master_port=port,
                 timeout=config.timeout)  # fmt: skip
    try:
        return measure_overlap(backend, config)
    finally:
        backend.destroy()


def _spawned_rank(index: int, world_size: int, port: int, config: OverlapConfig, plan: OverlapPlan) -> OverlapResult:
    return _run_rank(config, plan, index, world_size, port)


def run_overlap(config: OverlapConfig, *, print_table: bool = False, backend: Any = None) -> OverlapResult | None:
    """Check ``config`` (:func:`plan_overlap`, before any process starts), run it in the planned mode (virtual
    ranks, this torchrun rank, processes it spawns, or the initialised ``backend`` given) and finish it on the
    process that owns the result (:func:`finish_overlap`); None on the other ranks."""
    if backend is not None:
        plan = plan_overlap_in_process(config, backend)
        resolved = replace(config, comm_sizes=list(plan.sizes), dtype=dtype_name(plan.dtype))
        result = measure_overlap(backend, resolved)
        return finish_overlap(result, resolved, print_table=print_table) if backend.rank == 0 else None
    plan = plan_overlap(config)
    resolved = replace(config, comm_sizes=list(plan.sizes), dtype=dtype_name(plan.dtype))
    if plan.mode == "virtual":
        world = _VirtualWorld(plan.world_size, max(plan.sizes))
        try:
            result = measure_overlap(world, resolved)
        finally:
            world.destroy()
    elif plan.mode == "torchrun":
        result = _run_rank(resolved, plan, None, None, None)
        if int(os.environ["RANK"]) != 0:
            return None
    else:
        result = spawn_ranks(_spawned_rank, (resolved, plan), plan.world_size, what="overlap benchmark",
                             timeout=resolved.timeout)  # fmt: skip
    return finish_overlap(result, resolved, print_table=print_table)


def finish_overlap(result: OverlapResult, config: OverlapConfig, *, print_table: bool) -> OverlapResult:
    """Provenance, then the JSON/CSV files and the plot (as configured), then the table on stdout (first, where a
    file cannot be written: :func:`~sagellm_comm.benchmark.report.write_and_report`)."""
    describe_run(result, config)

    def write_plot() -> None:
        result.plot_path = plot_overlap(result, config.plot)

    files = None
    if config.output_dir is not None:
        files = (f"the results in --output-dir {config.output_dir}",
                 lambda: write_overlap_results(result, config.output_dir))  # fmt: skip
    plot = None if config.plot is None else (f"--plot {config.plot}", write_plot)
    write_and_report(result, files, plot, print_table=print_table)
    return result


def run_overlap_benchmark(
    backend: Any = "auto",
    comm_sizes: list[int | str] | str | None = None,
    compute_duration_ms: float | None = None,
    gemm_size: int | None = None,
    *,
    dtype: str | None = None,
    world_size: int | None = None,
    virtual_ranks: int | None = None,
    warmup_iters: int = DEFAULT_WARMUP,
    benchmark_iters: int = DEFAULT_ITERS,
    output_dir: str | None = DEFAULT_OUTPUT_DIR,
    plot: str | None = None,
    progress: bool = False,
    timeout: float = 120.0,
    print_table: bool = False,
) -> OverlapResult | None:
    """Time a GEMM loop against an all-reduce, alone and overlapped (see the module docstring).

    Args:
        backend: a kind (spawns ``world_size`` processes, default 2 on CPU and one per GPU, or joins
            torchrun's world), or an initialised :class:`~sagellm_comm.backend.CommBackend` (every rank
            calls; rank 0 gets the result).
        comm_sizes: all-reduce sizes in bytes (ints, ``"1M"``, or ``"64K,1M"``), whole elements of ``dtype``.
        compute_duration_ms: target duration of the GEMM loop alone (calibrated once).
        gemm_size: ``g`` of the ``[g, g] @ [g, g]`` GEMMs.
        world_size: processes to start for a backend kind; with an initialised backend, if given, its world size.
        virtual_ranks: run the all-reduce on N virtual ranks of the custom kernels on this process's
            GPU (``backend`` is then a kind, ``auto`` or ``custom``): a real multi-rank collective with one GPU.
        dtype: of the GEMM and the message (default bfloat16 on GPUs, float32 on CPU).
        output_dir: where ``overlap_ws<N>_<timestamp>.json/.csv`` go; None writes nothing.
        plot: a PNG (or any format matplotlib writes) of the times against the size.

    Returns:
        The :class:`OverlapResult` (None on the ranks that are not rank 0).
    Raises:
        InvalidArgumentError: a request that cannot run here (the message says why), before any process starts.
    """
    if isinstance(comm_sizes, str):
        sizes = parse_size_list(comm_sizes)
    elif comm_sizes is not None:
        sizes = [parse_size(s) if isinstance(s, str) else s for s in comm_sizes]  # checked by the plan
    else:
        sizes = None
    config = OverlapConfig(
        backend=backend if isinstance(backend, str) else "instance",
        world_size=world_size,
        comm_sizes=sizes,
        compute_duration_ms=compute_duration_ms,
        gemm_size=gemm_size,
        dtype=dtype,
        warmup=warmup_iters,
        iters=benchmark_iters,
        output_dir=output_dir,
        timeout=timeout,
        virtual_ranks=virtual_ranks,
        plot=plot,
        progress=progress,
        command="run_overlap_benchmark(...)",
    )
    return run_overlap(config, print_table=print_table, backend=None if isinstance(backend, str) else backend)


# ============================================================================ CLI


def add_overlap_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the overlap benchmark's options to ``parser`` (``sagellm-comm overlap`` and this module's CLI)."""
    what = parser.add_argument_group("what to time")
    what.add_argument("--backend", default="auto", help="backend kind (default: auto; Gloo without a GPU)")
    sizes = what.add_mutually_exclusive_group()
    sizes.add_argument("--sizes", metavar="LO:HI[:FACTOR]", help="all-reduce size range in bytes, x2 steps")
    sizes.add_argument(
        "--message-sizes",
        "--comm-sizes",
        nargs="+",
        metavar="SIZE",
        help=f"explicit all-reduce sizes, e.g. --message-sizes 1M 16M (default: {GPU_DEFAULTS['comm_sizes']} GPU; "
        f"{CPU_DEFAULTS['comm_sizes']} CPU)",
    )
    floating = [name for name, dtype in DTYPES.items() if dtype.is_floating_point]  # the GEMM's
    aliases = [alias for alias, name in DTYPE_ALIASES.items() if name in floating]
    virtual = [dtype_name(dtype) for dtype in VIRTUAL_DTYPES]
    what.add_argument(
        "--dtype",
        help=f"floating-point element type: {', '.join(sorted(floating))} (or {', '.join(sorted(aliases))}); "
        f"--virtual-ranks: {', '.join(sorted(virtual))} (default: {GPU_DEFAULTS['dtype']} on GPUs, "
        f"{CPU_DEFAULTS['dtype']} on CPU)",
    )
    what.add_argument(
        "--compute-ms",
        type=float,
        dest="compute_duration_ms",
        help=f"target GEMM loop time in ms (default {GPU_DEFAULTS['compute_duration_ms']:g} GPU, "
        f"{CPU_DEFAULTS['compute_duration_ms']:g} CPU)",
    )
    what.add_argument(
        "--gemm-size",
        type=int,
        help=f"g of the [g,g]@[g,g] GEMMs (default {GPU_DEFAULTS['gemm_size']} GPU, {CPU_DEFAULTS['gemm_size']} CPU)",
    )

    how = parser.add_argument_group("how to time")
    how.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed iterations (default {DEFAULT_WARMUP})"
    )
    how.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"timed iterations (default {DEFAULT_ITERS})")
    how.add_argument("--timeout", type=float, default=120.0, help="rendezvous/collective timeout in s (default 120)")

    where = parser.add_argument_group("where to run")
    where.add_argument(
        "--world-size", type=int, help="processes to start when not under torchrun (default: 2 on CPU, one per GPU)"
    )
    where.add_argument("--virtual-ranks", type=int, metavar="N", help="N ranks of the custom kernels on one GPU (2..8)")

    add_output_options(parser, DEFAULT_OUTPUT_DIR, "the times against the size", aliases=("--no-output",))
    return parser


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> OverlapConfig:
    """Build an :class:`OverlapConfig` from parsed options; raises InvalidArgumentError on a bad value."""
    sizes = sizes_from_args(args)
    return OverlapConfig(
        backend=args.backend,
        world_size=args.world_size,
        comm_sizes=sizes,
        compute_duration_ms=args.compute_duration_ms,
        gemm_size=args.gemm_size,
        dtype=args.dtype,
        warmup=args.warmup,
        iters=args.iters,
        output_dir=output_dir_from_args(args, DEFAULT_OUTPUT_DIR),
        timeout=args.timeout,
        virtual_ranks=args.virtual_ranks,
        plot=args.plot,
        progress=not args.no_progress,
        command=command_line(argv),
    )


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Check, run and report; exit status as ``sagellm-comm bench``'s (0 ok, 1 a wrong result or a failed run,
    2 a request or environment problem found before any process starts, 130 interrupted)."""

    def planned() -> OverlapConfig:
        config = config_from_args(args, argv)
        plan_overlap(config)  # every request problem surfaces here, before any process starts
        return config

    result, status = check_then_run(parser, planned, lambda config: run_overlap(config, print_table=True))
    if status is not None:
        return status
    return 0 if result is None or all(r.num_wrong == 0 for r in result.records) else 1


def build_parser(prog: str = "python -m sagellm_comm.benchmark.run_overlap_bench") -> argparse.ArgumentParser:
    return add_overlap_arguments(OneLineParser(prog=prog, description=DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    program = "python -m sagellm_comm.benchmark.run_overlap_bench"
    return run_from_args(parser, args, [program, *(sys.argv[1:] if argv is None else argv)])


__all__ = [
    "DESCRIPTION",
    "OVERLAP_FIELDS",
    "OverlapConfig",
    "OverlapRecord",
    "OverlapResult",
    "add_overlap_arguments",
    "build_parser",
    "derive",
    "format_overlap_table",
    "main",
    "measure_overlap",
    "run_from_args",
    "run_overlap",
    "run_overlap_benchmark",
    "write_overlap_results",
]


if __name__ == "__main__":
    sys.exit(main())
