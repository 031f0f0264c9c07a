"""``sagellm-comm transfer`` / ``python -m sagellm_comm.benchmark.run_transfer_bench``: block transfers between
two processes it starts itself, per backend, block size, block count and op (docs/transfer.md, "Benchmark").

Examples::

    sagellm-comm transfer                                       # CPU: nixl, nixl-raw, torch; 4K..256K x 1,10,100
    sagellm-comm transfer --backend ipc,torch,copy-engine,nixl  # one GPU, two processes
    sagellm-comm transfer --block-sizes 16K --block-counts 1000 --ops write --prepared --out /tmp/transfer
"""

from __future__ import annotations

import argparse
import socket
import sys

import torch

from sagellm_comm.benchmark.sizes import parse_count_list, parse_size, parse_size_list
from sagellm_comm.benchmark.transfer_config import (
    BACKENDS,
    DEFAULT_ITERS,
    DEFAULT_NOTIFY_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    OPS,
    TransferBenchConfig,
    plan_transfer,
)
from sagellm_comm.cli_support import OneLineParser, add_output_options, check_then_run, output_dir_from_args
from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.launch import interpreting

DESCRIPTION = "Time one-sided block transfers between two processes (ours, NIXL, torch and copy-engine references)."


def add_transfer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    what = parser.add_argument_group("what to time")
    what.add_argument("--backend", metavar="B[,B...]",
                      help=f"backends side by side, the first is the ratio's reference: {', '.join(BACKENDS)} "
                      "(default: ipc,torch,copy-engine,nixl on a GPU; nixl,nixl-raw,torch on the CPU)")  # fmt: skip
    what.add_argument("--ops", default="write,read", help=f"{', '.join(OPS)} (default: both)")
    what.add_argument("--block-sizes", metavar="SIZE[,SIZE...]", help="block sizes (default 4K,16K,64K,256K,1M GPU; "
                      "4K..256K CPU); multiples of 16 bytes")  # fmt: skip
    what.add_argument("--block-counts", metavar="N[,N...]", help="blocks per request (default 1,100,1000 GPU; "
                      "1,10,100 CPU)")  # fmt: skip
    what.add_argument("--max-bytes", metavar="SIZE", help="skip points moving more per request (default 1G / 64M CPU)")
    what.add_argument("--prepared", action="store_true", help="prepared form: block ids (NIXL: prepped lists)")
    what.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available); both processes use it")
    what.add_argument("--nixl-progress-thread", choices=("on", "off"), default="on",
                      help="NIXL agents (nixl, nixl-raw) with or without NIXL's progress thread; off: the passive "
                      "process calls into NIXL between commands instead (default on)")  # fmt: skip
    how = parser.add_argument_group("how to time")
    how.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed requests (default {DEFAULT_WARMUP})")
    how.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"timed requests (default {DEFAULT_ITERS})")
    how.add_argument(
        "--notify-iters",
        type=int,
        default=DEFAULT_NOTIFY_ITERS,
        help=f"notification latency samples per backend, 0: none (default {DEFAULT_NOTIFY_ITERS})",
    )
    how.add_argument("--rounds", type=int, default=1,
                     help="measure the backends in turn this many times and pool each point's samples, so that "
                     "the machine's drift falls on every backend alike (default 1)")  # fmt: skip
    how.add_argument("--cpus", metavar="A,B",
                     help="pin the initiating process to CPU A and the passive peer to CPU B (default: where the "
                     "system puts them); the notification latency depends on it")  # fmt: skip
    how.add_argument("--timeout", type=float, default=120.0, help="seconds for any wait (default 120)")
    add_output_options(parser, DEFAULT_OUTPUT_DIR, "GB/s against block size", stem=True)
    return parser


def _option_sizes(text: str | None, option: str, parse):
    """``parse(text)`` (:func:`parse_size` or :func:`parse_size_list`) of an option's value, None where the option
    is not given; an empty value is refused (it is not the option left out), and a refusal names the option."""
    if text is None:
        return None
    if not text.replace(",", "").strip():
        raise InvalidArgumentError(f"{option} names no size; give e.g. 16K or leave the option out")
    try:
        return parse(text)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{option}: {exc.message}") from None


def config_from_args(args: argparse.Namespace, command: str) -> TransferBenchConfig:
    def names(text: str | None) -> list[str] | None:
        return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

    if args.out is not None and args.no_save:
        raise InvalidArgumentError("--out and --no-save contradict each other: give one")
    if args.out is not None and args.output_dir != DEFAULT_OUTPUT_DIR:
        raise InvalidArgumentError("--output-dir is not used with --out (STEM.json and STEM.csv): give one")
    return TransferBenchConfig(
        backends=names(args.backend),
        ops=names(args.ops) or [],
        block_sizes=_option_sizes(args.block_sizes, "--block-sizes", parse_size_list),
        block_counts=None if args.block_counts is None else parse_count_list(args.block_counts, "--block-counts"),
        max_bytes=_option_sizes(args.max_bytes, "--max-bytes", parse_size),
        device=args.device,
        prepared=args.prepared,
        nixl_progress_thread=args.nixl_progress_thread == "on",
        warmup=args.warmup,
        iters=args.iters,
        notify_iters=args.notify_iters,
        rounds=args.rounds,
        cpus=None if args.cpus is None else tuple(parse_count_list(args.cpus, "--cpus", "0,1")),
        timeout=args.timeout,
        output_dir=output_dir_from_args(args, DEFAULT_OUTPUT_DIR),
        out=None if args.no_save else args.out,
        plot=args.plot,
        progress=not args.no_progress,
        command=command,
    )


def run_transfer_benchmark(config: TransferBenchConfig, *, print_table: bool = False):
    """Plan (refusing bad requests), spawn the two processes, build, write and print the result."""
    from sagellm_comm.benchmark.provenance import provenance
    from sagellm_comm.benchmark.results import device_name
    from sagellm_comm.benchmark.spawn import spawn_ranks
    from sagellm_comm.benchmark.transfer_measure import transfer_rank
    from sagellm_comm.benchmark.transfer_results import build_result

    plan = plan_transfer(config)
    measured = spawn_ranks(transfer_rank, (config, plan), 2, what="transfer benchmark", timeout=config.timeout)
    meta = provenance(str(plan.device))
    if config.command:
        meta["command"] = config.command
    run = {
        **meta,
        "device_name": device_name(plan.device),
        "hostname": socket.gethostname(),
        "backends": list(plan.backends),
        "ops": list(config.ops),
        "prepared": config.prepared,
        "nixl_progress_thread": config.nixl_progress_thread,
        "warmup": config.warmup,
        "iters": config.iters,
        "notify_iters": config.notify_iters,
        "rounds": config.rounds,
        "pinned": None if config.cpus is None else list(config.cpus),  # --cpus: the initiator's, the peer's
        "cpus": measured["cpus"],  # the CPUs each process could run on
        # median time of a fixed Python loop per process (timing.python_loop_us), when notifications were timed
        "python_loop_us": measured.get("python_loop_us"),
        "pool_bytes": plan.pool_bytes,
        "skipped": list(plan.skipped),
        "interpreter": interpreting(),
    }
    return finish_transfer(build_result(measured, run, config.prepared), config, print_table=print_table)


def finish_transfer(result, config: TransferBenchConfig, *, print_table: bool):
    """The JSON/CSV files and the plot (as configured), then the table on stdout (first, where a file cannot be
    written: :func:`~sagellm_comm.benchmark.report.write_and_report`)."""
    from sagellm_comm.benchmark.report import write_and_report
    from sagellm_comm.benchmark.transfer_results import plot, write_files

    def write_plot() -> None:
        result.plot_path = plot(result, config.plot)

    files = None
    if config.output_dir is not None or config.out is not None:
        where = f"--out {config.out}" if config.out is not None else f"--output-dir {config.output_dir}"
        files = (f"the results in {where}", lambda: write_files(result, config.output_dir, config.out))
    plot_step = None if config.plot is None else (f"--plot {config.plot}", write_plot)
    write_and_report(result, files, plot_step, print_table=print_table)
    return result


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Exit status: 0 all points ran and every byte was right, 1 otherwise, 2 a refused request, 130 Ctrl-C."""
    from sagellm_comm.benchmark.provenance import command_line

    def planned():
        config = config_from_args(args, command_line(argv))
        plan_transfer(config)
        return config

    result, status = check_then_run(parser, planned, lambda config: run_transfer_benchmark(config, print_table=True))
    if status is not None:
        return status
    return 0 if result.ok else 1


def build_parser(prog: str = "python -m sagellm_comm.benchmark.run_transfer_bench") -> argparse.ArgumentParser:
    return add_transfer_arguments(OneLineParser(prog=prog, description=DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    full = [parser.prog, *(sys.argv[1:] if argv is None else argv)]
    return run_from_args(parser, args, full)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
