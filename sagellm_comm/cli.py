"""The ``sagellm-comm`` console script.

Subcommands:

* ``sagellm-comm bench [options]``: the collective microbenchmark (same options as
  ``python -m sagellm_comm.benchmark.run_bench``; see docs/benchmark.md).
* ``sagellm-comm topo``: the GPU interconnect matrix of this host (``Topology.discover()``).
* ``sagellm-comm transfer [options]``: one-sided block transfers between two processes (same options as
  ``python -m sagellm_comm.benchmark.run_transfer_bench``; see docs/transfer.md).
"""

from __future__ import annotations

import argparse
import sys

from sagellm_comm.benchmark.run_bench import DESCRIPTION as BENCH_DESCRIPTION
from sagellm_comm.benchmark.run_bench import (
    INTERRUPTED_EXIT,
    OneLineParser,
    add_bench_arguments,
    one_line,
    run_from_args,
)
from sagellm_comm.errors import CommError


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``sagellm-comm``; its usage errors (and its subcommands') are one line, exit 2."""
    parser = OneLineParser(prog="sagellm-comm", description="sagellm-comm command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser(
        "bench", help="time collectives (nccl-tests-style table, JSON/CSV, plot)", description=BENCH_DESCRIPTION
    )
    add_bench_arguments(bench)
    bench.set_defaults(subparser=bench)  # usage errors then name "sagellm-comm bench"
    # transfer: block transfers between two processes (sagellm_comm/benchmark/run_transfer_bench.py)
    from sagellm_comm.benchmark import run_transfer_bench

    transfer = sub.add_parser("transfer", help="time block transfers (ipc, NIXL, torch references) between two "
                              "processes", description=run_transfer_bench.DESCRIPTION)  # fmt: skip
    run_transfer_bench.add_transfer_arguments(transfer)
    transfer.set_defaults(subparser=transfer, run=run_transfer_bench.run_from_args)
    sub.add_parser(
        "topo",
        help="print the GPU interconnect matrix and where it came from",
        description="Print Topology.discover().format_matrix() for this host.",
    )
    return parser


def _topo() -> int:
    from sagellm_comm.topology import Topology

    try:
        text = Topology.discover().format_matrix()
    except CommError as exc:  # e.g. a malformed SAGELLM_COMM_TOPOLOGY
        print(f"sagellm-comm topo: error: {one_line(exc.message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sagellm-comm topo: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit status 0 ok, 1 failed run, 2 usage/environment error, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "topo":
        return _topo()
    program = "python -m sagellm_comm.cli" if sys.argv[0].endswith("cli.py") else "sagellm-comm"
    full = [program, *(sys.argv[1:] if argv is None else argv)]
    return getattr(args, "run", run_from_args)(args.subparser, args, full)


if __name__ == "__main__":
    sys.exit(main())
