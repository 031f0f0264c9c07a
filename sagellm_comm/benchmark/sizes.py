"""Message sizes: parsing ``1K``/``256M``/``1K:256M`` and printing them back.

Units are binary (``1K`` = 1024 bytes, ``1M`` = 2**20, ``1G`` = 2**30), as nccl-tests' ``-b``/``-e``
options are.  A range ``LO:HI`` steps by a factor of 2 from ``LO`` up to and including ``HI``; an
optional third field changes the factor (``1K:1M:4``).
"""

from __future__ import annotations

import re

from sagellm_comm.errors import InvalidArgumentError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse one size such as ``"4096"``, ``"1K"``, ``"256M"``, ``"1GiB"`` into bytes (> 0)."""
    if text.strip().startswith("-"):
        raise InvalidArgumentError(f"bad message size {text!r}: sizes are positive byte counts, e.g. 512, 1K, 256M")
    match = _SIZE_RE.match(text)
    if match is None:
        raise InvalidArgumentError(
            f"bad message size {text!r}: expected an integer with an optional K, M or G suffix "
            "(binary units), e.g. 512, 1K, 256M"
        )
    nbytes = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if nbytes <= 0:
        raise InvalidArgumentError(f"bad message size {text!r}: must be at least 1 byte")
    return nbytes


def parse_size_range(text: str) -> list[int]:
    """Parse ``LO:HI`` (x2 steps) or ``LO:HI:FACTOR`` into the list of sizes in bytes.

    A single size without a colon gives a one-element list.
    """
    parts = text.split(":")
    if len(parts) == 1:
        return [parse_size(parts[0])]
    if len(parts) not in (2, 3):
        raise InvalidArgumentError(f"bad size range {text!r}: expected LO:HI or LO:HI:FACTOR, e.g. 1K:256M")
    low, high = parse_size(parts[0]), parse_size(parts[1])
    factor = 2
    if len(parts) == 3:
        try:
            factor = int(parts[2])
        except ValueError:
            factor = 0
        if factor < 2:
            raise InvalidArgumentError(
                f"bad size range {text!r}: the step factor must be an integer >= 2, got {parts[2]!r}"
            )
    if low > high:
        raise InvalidArgumentError(f"bad size range {text!r}: the lower bound is above the upper bound")
    sizes = []
    nbytes = low
    while nbytes <= high:
        sizes.append(nbytes)
        nbytes *= factor
    return sizes


def parse_size_list(items: list[str] | str) -> list[int]:
    """Parse a list of sizes; each item may itself be comma-separated (``["1K,4K", "1M"]``)."""
    if isinstance(items, str):
        items = [items]
    sizes = [parse_size(tok) for item in items for tok in item.split(",") if tok.strip()]
    if not sizes:
        raise InvalidArgumentError("empty message size list")
    return sizes


def parse_count_list(text: str, what: str, example: str = "1,10,100") -> list[int]:
    """Parse comma-separated integers (``"1,10,100"``) given for option ``what``; the range is the caller's;
    ``example`` is what the refusal of a non-integer shows."""
    tokens = [tok.strip() for tok in text.split(",") if tok.strip()]
    try:
        counts = [int(tok) for tok in tokens]
    except ValueError:
        raise InvalidArgumentError(f"{what} must be integers, e.g. {example}, got {text!r}") from None
    if not counts:
        raise InvalidArgumentError(f"{what} names no number")
    return counts


def format_size(nbytes: int) -> str:
    """Short binary form: ``1024 -> "1K"``, ``3 * 2**20 -> "3M"``, ``1000 -> "1000"``."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)
