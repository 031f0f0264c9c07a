"""Checks of the plain values the public API takes: timeouts, counts, flags, devices; and whether two tensor
arguments share memory.

Every public entry point that takes one of these checks it here, before anything runs, so a bad value is
refused the same way everywhere: an :class:`~sagellm_comm.errors.InvalidArgumentError` naming the argument,
the value given and what is accepted.  Nothing is rounded, parsed or coerced: ``1.5`` is not an int, ``True``
is not a number, ``"false"`` is not a flag, NaN and infinity are not timeouts.  NumPy's scalars are what they
hold (``np.int64(4)`` is an int, ``np.float32(0.5)`` a number, ``np.bool_(True)`` a flag); the values returned
are Python's.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from sagellm_comm.errors import InvalidArgumentError

#: the longest timeout taken, in seconds (about 31 years): every wait has a deadline that the host clock,
#: ``datetime.timedelta`` and the kernels' int64 nanosecond deadlines can all represent
MAX_TIMEOUT_S = 1e9


def _is_bool(value: Any) -> bool:
    return value.__class__ is bool or isinstance(value, bool | np.bool_)


def _is_int(value: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return value.__class__ is int or (isinstance(value, numbers.Integral) and not _is_bool(value))


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool: what a rank or a count may be."""
    return _is_int(value)


def _is_number(value: Any) -> bool:
    """A real number (Python's or NumPy's int or float), not a bool."""
    cls = value.__class__
    return cls is float or cls is int or (isinstance(value, numbers.Real) and not _is_bool(value))


def check_timeout(timeout: Any, what: str = "timeout") -> float:
    """``timeout`` as float seconds: a positive finite int or float up to :data:`MAX_TIMEOUT_S`."""
    if not _is_number(timeout) or not (0 < timeout <= MAX_TIMEOUT_S):  # False for NaN
        raise InvalidArgumentError(
            f"{what} must be a positive number of seconds (at most {MAX_TIMEOUT_S:g}), got {timeout!r}",
            details={what: repr(timeout)},
        )
    return float(timeout)


def check_int(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int if it is an integer (not a bool, not a float, even ``4.0``) in ``[low, high]``."""
    if not _is_int(value):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}", details={what: repr(value)})
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in {low}..{high}"
        raise InvalidArgumentError(f"{what} must be {bounds}, got {value}", details={what: value})
    return value


def check_flag(value: Any, what: str) -> bool:
    """``value`` if it is a bool; ``"false"``, ``None`` or ``0`` are refused rather than read as truth values.
    A hot path (every collective's ``async_op``) calls it only when ``value.__class__ is not bool``."""
    if not _is_bool(value):
        raise InvalidArgumentError(f"{what} must be True or False, got {value!r}", details={what: repr(value)})
    return bool(value)


def check_device(device: Any, what: str = "device") -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cpu"`` or ``"cuda:1"``, or an accelerator index as
    torch reads it) as a ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, str | int):
        raise InvalidArgumentError(
            f"{what} must be a torch.device, a string such as 'cpu' or 'cuda:0', or a device index, got {device!r}",
            details={what: repr(device)},
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{what} {device!r} is not a device here ({exc}); expected a string such as 'cpu', 'cuda' or 'cuda:0'",
            details={what: device},
        ) from None


def check_finite(value: Any, what: str, low: float | None = None) -> float:
    """``value`` as a float: an int or float (not a bool), finite, and ``>= low`` when given."""
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}", details={what: repr(value)})
    if low is not None and value < low:
        raise InvalidArgumentError(f"{what} must be >= {low}, got {value!r}", details={what: value})
    return float(value)


def check_is_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` if it is a ``torch.Tensor`` (a subclass too); anything else is refused by the name ``what``."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_values_in_memory(tensor: torch.Tensor, what: str) -> None:
    """Refuse a lazily conjugated or negated view (``z.conj()``, ``x._neg_view()``): its memory holds the values
    before the conjugation or negation, so whatever copies or reduces its bytes would not see what it shows."""
    if tensor.is_conj() or tensor.is_neg():
        raise InvalidArgumentError(
            f"{what} is a lazily conjugated (or negated) view, whose memory does not hold its values; resolve it "
            "first with .resolve_conj() (or .resolve_neg()): a new tensor, which does not alias this one",
            details={"conj": tensor.is_conj(), "neg": tensor.is_neg()},
        )


def check_dense(tensor: torch.Tensor, what: str) -> None:
    """Refuse a tensor of another layout than ``torch.strided`` (sparse, MKL-DNN): it has no dense block of its values
    to read, copy or reshape."""
    if tensor.layout is not torch.strided:
        raise InvalidArgumentError(
            f"{what} is a {tensor.layout} tensor; this call takes dense ones (torch.strided): .to_dense() first",
            details={"layout": str(tensor.layout)},
        )


def is_dense_contiguous(tensor: torch.Tensor) -> bool:
    """A strided tensor whose elements lie contiguously (``is_contiguous`` raises for sparse CSR tensors, and
    MKL-DNN ones say True without a block of memory a kernel could read)."""
    return tensor.layout is torch.strided and tensor.is_contiguous()


def share_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory of contiguous tensors ``a`` and ``b`` has a byte in common (an empty tensor has none).

    Every op that reads one tensor while it writes another asks this before it runs: an output that overlaps its
    input would be read after part of it was overwritten."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


__all__ = [
    "MAX_TIMEOUT_S", "check_device", "check_finite", "check_flag", "check_int", "check_is_tensor", "check_timeout",
    "check_values_in_memory", "is_dense_contiguous", "is_int", "share_bytes",
]  # fmt: skip
