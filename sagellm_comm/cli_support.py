"""What every command-line entry point shares: one-line usage errors (exit 2) and the exit statuses.

Exit statuses: 0 done, 1 a run that failed or gave a wrong result, 2 a request or environment problem
(one line on stderr, found before any work starts), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from sagellm_comm.arguments import MAX_TIMEOUT_S
from sagellm_comm.benchmark.spawn import INTERRUPTED_EXIT
from sagellm_comm.errors import CommError, InvalidArgumentError

__all__ = [
    "INTERRUPTED_EXIT",
    "OneLineParser",
    "add_output_options",
    "check_then_run",
    "one_line",
    "output_dir_from_args",
    "run_reporting",
    "sizes_from_args",
]

#: ``-1K``, ``-5``: a (bad) value, never one of our options (they all start with two dashes and a letter)
_NEGATIVE_VALUE = re.compile(r"^-\d")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, ``PROG: error: ...``, exit 2.

    A value that starts with a dash and a digit (``--sizes -1K``) is taken as the option's value, so the
    option's own check refuses it by name, instead of argparse's "expected one argument".
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _parse_optional(self, arg_string: str) -> Any:
        if _NEGATIVE_VALUE.match(arg_string):
            return None  # a value: argparse's rule for negative numbers, extended to sizes such as -1K
        return super()._parse_optional(arg_string)


#: the seeds torch takes (``torch.manual_seed``, ``torch.Generator.manual_seed``): any 64-bit integer, signed or not
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


def check_seed(parser: argparse.ArgumentParser, seed: int, derived: int = 0, uses: str = "") -> None:
    """Refuse, in one line (exit 2), a ``--seed`` torch cannot take, counting the seeds a script derives from it
    (``seed + 1`` .. ``seed + derived``; ``uses`` says which, for the message), before any process starts."""
    high = MAX_SEED - derived
    if not MIN_SEED <= seed <= high:
        why = f"torch's 64-bit seeds; {uses}" if uses else "torch's 64-bit seeds"
        parser.error(f"--seed must be in {MIN_SEED}..{high} ({why}), got {seed}")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse, in one line (exit 2), each option of ``names`` (attribute names) below 1, before any process starts."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def check_timeout_option(parser: argparse.ArgumentParser, timeout: float) -> None:
    """Refuse, in one line (exit 2), a ``--timeout`` that is not positive and finite (NaN, inf and 0 would fail in
    every rank after the spawn; inf or 1e300 overflow a thread join), before any process starts."""
    if not 0 < timeout <= MAX_TIMEOUT_S:
        parser.error(f"--timeout must be positive and finite (at most {MAX_TIMEOUT_S:g}), got {timeout}")


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of blanks folded into single spaces."""
    return " ".join(message.split())


def run_reporting(
    parser: argparse.ArgumentParser, fn: Callable[[], Any], usage_errors: tuple = (InvalidArgumentError,)
) -> tuple[Any, int | None]:
    """``(fn(), None)`` for a command-line entry point, or ``(None, exit status)`` after one line on stderr.

    ``usage_errors`` (a request or environment problem) go through ``parser.error``: one line, exit 2.
    Another :class:`CommError` is one line and status 1; Ctrl-C is one line and status 130.
    """
    try:
        return fn(), None
    except usage_errors as exc:
        parser.error(exc.message)
    except CommError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)  # a failed run: a rank's traceback may follow
        return None, 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return None, INTERRUPTED_EXIT


def check_then_run(
    parser: argparse.ArgumentParser, check: Callable[[], Any], run: Callable[[Any], Any]
) -> tuple[Any, int | None]:
    """A benchmark command's two steps: ``config = check()``, where any :class:`CommError` is a refused request
    (one line, exit 2, before any process starts), then ``run(config)`` under :func:`run_reporting`'s rules
    (a failed run: exit 1; Ctrl-C: 130).  Returns ``(run's value, None)`` or ``(None, exit status)``."""
    config, status = run_reporting(parser, check, usage_errors=(CommError,))
    if status is not None:
        return None, status
    return run_reporting(parser, lambda: run(config))


def add_output_options(
    parser: argparse.ArgumentParser, default_dir: str, plot_help: str, *, stem: bool = False, aliases: tuple = ()
) -> Any:
    """The ``output`` options every benchmark command has: ``--output-dir`` (default ``default_dir``),
    ``--out STEM`` where ``stem``, ``--no-save`` (and ``aliases``), ``--plot FILE.png`` (``plot_help``, which
    says what is plotted) and ``--no-progress``."""
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=default_dir, help=f"where the JSON/CSV go (default: {default_dir}/)")
    if stem:
        out.add_argument("--out", metavar="STEM", help="write STEM.json and STEM.csv (e.g. --out /tmp/transfer)")
    out.add_argument("--no-save", *aliases, action="store_true", help="write no JSON/CSV files")
    out.add_argument("--plot", metavar="FILE.png", help=f"plot {plot_help} (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return out


def output_dir_from_args(args: argparse.Namespace, default_dir: str) -> str | None:
    """The ``--output-dir`` of :func:`add_output_options`' options, None under ``--no-save``; an ``--output-dir``
    other than ``default_dir`` given with ``--no-save`` is an :class:`InvalidArgumentError` (the two contradict)."""
    if not args.no_save:
        return args.output_dir
    if args.output_dir != default_dir:
        raise InvalidArgumentError("--output-dir and --no-save contradict each other: give one")
    return None


def sizes_from_args(args: argparse.Namespace) -> list[int] | None:
    """The sizes of ``--message-sizes`` (a list) or ``--sizes`` (a range), or None for the default; a bad size
    is an :class:`InvalidArgumentError`."""
    from sagellm_comm.benchmark.sizes import parse_size_list, parse_size_range

    if args.message_sizes is not None:
        return parse_size_list(args.message_sizes)
    if args.sizes is not None:  # an empty --sizes is refused, not taken for the default
        return parse_size_range(args.sizes)
    return None
