"""The ``sagellm-comm`` console script: one registration per subcommand.

* ``sagellm-comm bench [options]``: the collective microbenchmark (docs/benchmark.md).
* ``sagellm-comm overlap [options]``: a GEMM loop against an all-reduce, alone and overlapped (docs/layers.md).
* ``sagellm-comm topo``: the GPU interconnect matrix of this host (``Topology.discover()``).
* ``sagellm-comm transfer [options]``: one-sided block transfers between two processes (docs/transfer.md).
* ``sagellm-comm config``: every ``SAGELLM_COMM_*`` setting's value here (``--markdown``: the documentation's
  table; ``--update PATH``: rewrite that table in PATH).
* ``sagellm-comm --version``: the installed package's version.

A subcommand is a :class:`Subcommand` in :data:`SUBCOMMANDS`: its name, a help line, a description, a
function that adds its options to its parser, and one that runs it from the parsed options and returns the
exit status.  Usage errors are one line on stderr and exit 2 (:class:`~sagellm_comm.cli_support.OneLineParser`,
:func:`~sagellm_comm.cli_support.run_reporting`), as are refusals found before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sagellm_comm.benchmark import run_bench, run_overlap_bench, run_transfer_bench
from sagellm_comm.benchmark.provenance import package_version
from sagellm_comm.cli_support import INTERRUPTED_EXIT, OneLineParser, one_line
from sagellm_comm.errors import CommError

PROG = "sagellm-comm"


@dataclass(frozen=True)
class Subcommand:
    """One ``sagellm-comm`` subcommand.

    ``add_arguments(parser)`` adds its options; ``run(parser, args, argv)`` runs it and returns the exit
    status (``parser`` is the subcommand's, for one-line errors; ``argv`` the full command line, for the
    records' provenance).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.ArgumentParser, argparse.Namespace, list[str]], int]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def _topo(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from sagellm_comm.topology import Topology

    try:
        text = Topology.discover().format_matrix()
    except CommError as exc:  # e.g. a malformed SAGELLM_COMM_TOPOLOGY
        print(f"{parser.prog}: error: {one_line(exc.message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(text)
    return 0


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()  # one output per run: the table printed, or a file rewritten
    what.add_argument("--markdown", action="store_true", help="print the settings table of docs/configuration.md")
    what.add_argument("--update", metavar="PATH", help="rewrite the settings table between the markers of PATH")


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from sagellm_comm import config

    if args.update is not None and not args.update.strip():
        parser.error("--update names no file; give the Markdown file whose settings table to rewrite")
    try:
        if args.update is not None:  # an empty PATH is refused, not taken for the option left out
            changed = config.update_document(args.update)
            print(f"{args.update}: {'updated' if changed else 'up to date'}")
        elif args.markdown:
            print(config.settings_table())
        else:
            print(config.describe(config.CommConfig.from_env()))
    except CommError as exc:  # a refused value, a file without the markers
        print(f"{parser.prog}: error: {one_line(exc.message)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: error: {args.update}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "bench",
        "time collectives (nccl-tests-style table, JSON/CSV, plot)",
        run_bench.DESCRIPTION,
        run_bench.add_bench_arguments,
        run_bench.run_from_args,
    ),
    Subcommand(
        "overlap",
        "time a GEMM loop against an all-reduce, alone and overlapped (table, JSON/CSV, plot)",
        run_overlap_bench.DESCRIPTION,
        run_overlap_bench.add_overlap_arguments,
        run_overlap_bench.run_from_args,
    ),
    Subcommand(
        "transfer",
        "time one-sided block transfers between two processes (ipc, NIXL, torch references)",
        run_transfer_bench.DESCRIPTION,
        run_transfer_bench.add_transfer_arguments,
        run_transfer_bench.run_from_args,
    ),
    Subcommand(
        "topo",
        "print the GPU interconnect matrix and where it came from",
        "Print Topology.discover().format_matrix() for this host.",
        _no_arguments,
        _topo,
    ),
    Subcommand(
        "config",
        "print every SAGELLM_COMM_* setting's value here, and whether ranks must agree on it",
        "Print the value of every SAGELLM_COMM_* setting in this environment (docs/configuration.md); a refused "
        "value is one line and exit 2.",
        _config_arguments,
        _config,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``sagellm-comm``; its usage errors (and its subcommands') are one line, exit 2."""
    parser = OneLineParser(prog=PROG, description="sagellm-comm command-line tools")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for command in SUBCOMMANDS:
        subparser = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(subparser)
        subparser.set_defaults(subcommand=command, subparser=subparser)  # errors then name "sagellm-comm NAME"
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit status 0 ok, 1 failed run, 2 usage/environment error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    program = "python -m sagellm_comm.cli" if sys.argv[0].endswith("cli.py") else PROG
    full = [program, *(sys.argv[1:] if argv is None else argv)]
    return args.subcommand.run(args.subparser, args, full)


if __name__ == "__main__":
    sys.exit(main())
