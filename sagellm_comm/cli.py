"""The ``sagellm-comm`` console script.

Subcommands:

* ``sagellm-comm bench [options]``: the collective microbenchmark (same options as
  ``python -m sagellm_comm.benchmark.run_bench``; see docs/benchmark.md).
* ``sagellm-comm topo``: the GPU interconnect matrix of this host (``Topology.discover()``).
"""

from __future__ import annotations

import argparse
import sys

from sagellm_comm.benchmark.run_bench import DESCRIPTION as BENCH_DESCRIPTION
from sagellm_comm.benchmark.run_bench import add_bench_arguments, run_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagellm-comm", description="sagellm-comm command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser(
        "bench", help="time collectives (nccl-tests-style table, JSON/CSV, plot)", description=BENCH_DESCRIPTION
    )
    add_bench_arguments(bench)
    bench.set_defaults(subparser=bench)  # usage errors then name "sagellm-comm bench"
    sub.add_parser(
        "topo",
        help="print the GPU interconnect matrix and where it came from",
        description="Print Topology.discover().format_matrix() for this host.",
    )
    return parser


def _topo() -> int:
    from sagellm_comm.topology import Topology

    print(Topology.discover().format_matrix())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "topo":
        return _topo()
    program = "python -m sagellm_comm.cli" if sys.argv[0].endswith("cli.py") else "sagellm-comm"
    full = [program, *(sys.argv[1:] if argv is None else argv)]
    return run_from_args(args.subparser, args, full)


if __name__ == "__main__":
    sys.exit(main())
