"""``sagellm-comm bench`` / ``python -m sagellm_comm.benchmark.run_bench``: the collective microbenchmark.

Examples::

    sagellm-comm bench                                        # Gloo, 2 CPU processes, 1K..1M (no GPU)
    sagellm-comm bench --backend gloo --world-size 2 --sizes 1K:1M
    sagellm-comm bench --virtual-ranks 8 --algo one_shot,two_shot --sizes 1K:64M --graph --plot ar.png
    torchrun --nproc-per-node 8 -m sagellm_comm.benchmark.run_bench --backend custom --algo auto,nccl

See docs/benchmark.md for the columns, the files and how the timing is done.
"""

from __future__ import annotations

import argparse
import sys

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.config import (
    DEFAULT_CPU_SIZES,
    DEFAULT_GPU_SIZES,
    DEFAULT_GRAPH_CALLS,
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    VIRTUAL_MODES,
    BenchConfig,
)
from sagellm_comm.benchmark.ops import DTYPE_ALIASES, DTYPES, OPS
from sagellm_comm.benchmark.plan import plan_launch
from sagellm_comm.benchmark.provenance import command_line
from sagellm_comm.benchmark.runner import run_benchmark
from sagellm_comm.cli_support import (
    OneLineParser,
    add_output_options,
    check_then_run,
    output_dir_from_args,
    sizes_from_args,
)

DESCRIPTION = "Time a collective over message sizes and print an nccl-tests-style table; write JSON/CSV."


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (shared by ``run_bench`` and ``sagellm-comm bench``)."""
    what = parser.add_argument_group("what to time")
    what.add_argument("--op", choices=OPS, default="all_reduce", help="collective (default: all_reduce)")
    what.add_argument(
        "--backend",
        default="auto",
        help="backend kind: auto, custom, nccl, rccl, hccl, gloo or a registered one (default: auto, "
        "the best available; Gloo on CPU-only machines)",
    )
    what.add_argument(
        "--algo",
        action="append",
        metavar="ALGO[,ALGO...]",
        help=f"algorithm(s), comma-separated or repeated, compared side by side with a ratio column "
        f"against the first: {', '.join(algo_rules.ALGOS)} (default: auto)",
    )
    sizes = what.add_mutually_exclusive_group()
    sizes.add_argument(
        "--sizes",
        metavar="LO:HI[:FACTOR]",
        help=f"size range in bytes, x2 steps by default, binary units (default: {DEFAULT_GPU_SIZES} on GPUs, "
        f"{DEFAULT_CPU_SIZES} on CPU)",
    )
    sizes.add_argument(
        "--message-sizes", nargs="+", metavar="SIZE", help="explicit sizes, e.g. --message-sizes 1K 64K 1M"
    )
    dtypes = sorted(set(DTYPES) | set(DTYPE_ALIASES))
    what.add_argument("--dtype", default="float32", help=f"element type: {', '.join(dtypes)} (default: float32)")

    how = parser.add_argument_group("how to time")
    how.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed calls (default: {DEFAULT_WARMUP})")
    how.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"timed calls (default: {DEFAULT_ITERS})")
    how.add_argument("--graph", action="store_true", help="time CUDA-graph replays (device time; see --graph-calls)")
    how.add_argument(
        "--graph-calls",
        type=int,
        default=DEFAULT_GRAPH_CALLS,
        metavar="K",
        help=f"--graph: calls captured back to back in the timed graph; a sample is one replay / K "
        f"(default: {DEFAULT_GRAPH_CALLS}; 1 = one call per replay)",
    )
    how.add_argument("--selector-config", metavar="FILE", help="JSON policy for the custom all-reduce's auto choice")
    how.add_argument("--timeout", type=float, default=120.0, help="rendezvous/collective timeout in s (default 120)")

    where = parser.add_argument_group("where to run")
    where.add_argument(
        "--world-size",
        type=int,
        help="processes to start on this host when not under torchrun (default: 2 on CPU, one per GPU)",
    )
    where.add_argument("--virtual-ranks", type=int, metavar="N", help="N ranks of the custom kernels on one GPU (2..8)")
    where.add_argument(
        "--virtual-mode",
        choices=VIRTUAL_MODES,
        default="stacked",
        help="virtual ranks: 'stacked' = one launch for all ranks (device time, as N GPUs launching at once; "
        "default), 'streams' = one launch per rank on its own stream (eager only: --graph needs stacked)",
    )
    where.add_argument(
        "--zero-copy",
        action="store_true",
        help="virtual ranks, streams mode: reduce the workspace's own buffers (no copy-in)",
    )

    add_output_options(parser, DEFAULT_OUTPUT_DIR, "latency and bus bandwidth vs size")
    return parser


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> BenchConfig:
    """Build a :class:`BenchConfig` from parsed options; raises InvalidArgumentError on a bad value."""
    sizes = sizes_from_args(args)
    return BenchConfig(
        op=args.op,
        backend=args.backend,
        algos=algo_rules.parse_algos(args.algo),
        sizes=sizes,
        dtype=args.dtype,
        warmup=args.warmup,
        iters=args.iters,
        graph=args.graph,
        graph_calls=args.graph_calls,
        selector_config=args.selector_config,
        output_dir=output_dir_from_args(args, DEFAULT_OUTPUT_DIR),
        plot=args.plot,
        world_size=args.world_size,
        virtual_ranks=args.virtual_ranks,
        virtual_mode=args.virtual_mode,
        zero_copy=args.zero_copy,
        progress=not args.no_progress,
        timeout=args.timeout,
        command=command_line(argv),
    )


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Validate, run and report.

    Exit status: 0 when every point ran and every result was correct (an algorithm skipped as a whole while
    another was measured is a ``# skipped`` line of the table); 1 when a point failed, a result was wrong, or
    nothing was measured because every requested algorithm was skipped once the ranks had started (one line on
    stderr with each reason); 2 (through ``parser.error``, one line on stderr) for a request or environment
    problem, found before any process starts; 130 when interrupted (Ctrl-C), after the ranks it started were
    stopped.
    """

    def planned():
        config = config_from_args(args, argv)
        plan_launch(config)  # every request problem surfaces here, before any process starts
        return config

    result, status = check_then_run(parser, planned, lambda config: run_benchmark(config, print_table=True))
    if status is not None:
        return status
    if result is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    if result.unmeasured:
        print(f"{parser.prog}: error: nothing was measured: {'; '.join(result.unmeasured)}", file=sys.stderr)
    return 0 if result.ok else 1


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION)
    return add_bench_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m sagellm_comm.benchmark.run_bench")
    args = parser.parse_args(argv)
    program = "python -m sagellm_comm.benchmark.run_bench" if sys.argv[0].endswith("run_bench.py") else sys.argv[0]
    full = [program, *(sys.argv[1:] if argv is None else argv)]
    return run_from_args(parser, args, full)


if __name__ == "__main__":
    sys.exit(main())
