"""The four benchmarked collectives: their size convention, bus-bandwidth factor, inputs and reference.

Size convention (nccl-tests'): the *size* of a point is

* ``all_reduce``, ``broadcast``: the bytes of the buffer every rank holds;
* ``all_gather``: the bytes of the gathered output (each rank contributes ``size / n``);
* ``reduce_scatter``: the bytes of each rank's full input (each rank receives ``size / n``).

``algbw = size / time`` and ``busbw = algbw * factor`` with the nccl-tests factors: ``2(n-1)/n`` for
all-reduce, ``(n-1)/n`` for all-gather and reduce-scatter, ``1`` for broadcast.  The bus bandwidth is
the per-rank link traffic of a bandwidth-optimal algorithm, so it can be compared across world sizes.

Inputs are small integers (``-5..5``) that depend on the rank and the element index, so every sum is
exact in bf16/fp16 for up to 25 ranks, and the reference is computed independently on each rank from
the other ranks' formulas (no communication, no use of the library under test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm_comm.errors import InvalidArgumentError

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
}

# Short names in the table, as nccl-tests prints them.
DTYPE_SHORT = {
    torch.float32: "float",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
    torch.float64: "double",
    torch.int32: "int32",
    torch.int64: "int64",
}

BROADCAST_ROOT = 0


def resolve_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"`` -> ``torch.bfloat16`` etc.; a clear error for anything else."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        choices = ", ".join(list(DTYPES) + list(DTYPE_ALIASES))
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose one of: {choices}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' bus-bandwidth factor of ``op`` for ``world_size`` ranks."""
    if world_size < 1:
        raise InvalidArgumentError(f"world size must be >= 1, got {world_size}")
    n = world_size
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    raise InvalidArgumentError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")


def rate_gbps(nbytes: int, time_us: float) -> float | None:
    """``nbytes / time`` in GB/s (10**9 bytes per second); None where ``time_us`` is not positive (a point shorter
    than the timer's resolution, or not a time): it has no bandwidth, as a ratio without a reference has none."""
    if not time_us > 0:  # also NaN
        return None
    return nbytes / (time_us * 1e-6) / 1e9


def bandwidths_gbps(nbytes: int, time_us: float, op: str, world_size: int) -> tuple[float | None, float | None]:
    """``(algbw, busbw)`` in GB/s (10**9 bytes per second) for ``nbytes`` moved in ``time_us``; ``(None, None)``
    where the time is not positive (:func:`rate_gbps`)."""
    factor = bus_factor(op, world_size)
    algbw = rate_gbps(nbytes, time_us)
    return (None, None) if algbw is None else (algbw, algbw * factor)


def element_count(op: str, nbytes: int, dtype: torch.dtype, world_size: int) -> int:
    """Total element count of a point of ``nbytes`` (rounded down, as nccl-tests does).

    For all-gather and reduce-scatter the count is a multiple of ``world_size`` (each rank's share is
    whole), and at least ``world_size``; for the others it is at least 1.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = nbytes // itemsize
    if op in ("all_gather", "reduce_scatter"):
        return max(world_size, count - count % world_size)
    return max(1, count)


def rank_pattern(count: int, rank: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The input of ``rank``: ``((7 * i + 13 * rank) % 11) - 5`` for element ``i``, as ``dtype``."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    return ((index * 7 + 13 * rank) % 11 - 5).to(dtype)


@dataclass
class OpBuffers:
    """Pre-allocated tensors of one rank for one (op, size) point.

    ``source`` holds this rank's pattern and is never written by a collective; ``work`` is the tensor
    the collective reads (and, for in-place ops, writes); ``output`` is where the result lands (the same
    tensor as ``work`` for in-place all-reduce and broadcast).  :meth:`reset` copies ``source`` back into
    ``work``; it is called outside the timed interval.
    """

    op: str
    rank: int
    world_size: int
    count: int
    source: torch.Tensor
    work: torch.Tensor
    output: torch.Tensor

    @property
    def nbytes(self) -> int:
        """The nccl-tests size of the point (see the module docstring)."""
        return self.count * self.source.element_size()

    @property
    def in_place(self) -> bool:
        return self.output is self.work

    def reset(self) -> None:
        if self.in_place:
            self.work.copy_(self.source)

    def prepare_check(self) -> None:
        """Restore the inputs and poison an out-of-place output, so a stale result cannot pass."""
        if self.in_place:
            self.work.copy_(self.source)
        elif self.output.is_floating_point():
            self.output.fill_(float("nan"))
        else:
            self.output.fill_(torch.iinfo(self.output.dtype).min)

    def expected(self) -> torch.Tensor:
        """The correct ``output`` of this rank, computed locally from every rank's pattern."""
        return reference_output(self.op, self.count, self.rank, self.world_size, self.source.dtype, self.source.device)

    def num_wrong(self) -> int:
        """Elements of ``output`` that differ from :meth:`expected` (beyond rounding of the dtype)."""
        return count_wrong(self.output, self.expected())


def make_buffers(
    op: str, nbytes: int, dtype: torch.dtype, rank: int, world_size: int, device: torch.device | str
) -> OpBuffers:
    """Allocate one rank's tensors for ``op`` at ``nbytes`` (see :func:`element_count`)."""
    count = element_count(op, nbytes, dtype, world_size)
    if op in ("all_reduce", "broadcast"):
        source = rank_pattern(count, rank, dtype, device)
        work = source.clone()
        return OpBuffers(op, rank, world_size, count, source, work, work)
    shard = count // world_size
    if op == "all_gather":
        source = rank_pattern(shard, rank, dtype, device)
        output = torch.empty(count, dtype=dtype, device=device)
        return OpBuffers(op, rank, world_size, count, source, source, output)
    if op == "reduce_scatter":
        source = rank_pattern(count, rank, dtype, device)
        output = torch.empty(shard, dtype=dtype, device=device)
        return OpBuffers(op, rank, world_size, count, source, source, output)
    raise InvalidArgumentError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")


def reference_output(
    op: str, count: int, rank: int, world_size: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """What ``rank`` must hold after ``op``, computed with plain torch ops in float64."""
    if op == "broadcast":
        return rank_pattern(count, BROADCAST_ROOT, torch.float64, device)
    if op == "all_gather":
        shard = count // world_size
        return torch.cat([rank_pattern(shard, r, torch.float64, device) for r in range(world_size)])
    total = torch.zeros(count, dtype=torch.float64, device=device)
    for r in range(world_size):
        total += rank_pattern(count, r, torch.float64, device)
    if op == "all_reduce":
        return total
    if op == "reduce_scatter":
        shard = count // world_size
        return total[rank * shard : (rank + 1) * shard]
    raise InvalidArgumentError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")


def count_wrong(output: torch.Tensor, expected: torch.Tensor) -> int:
    """Number of elements where ``output`` differs from ``expected`` (NaN and inf count as wrong).

    Inputs are small integers, so sums are exact in every dtype; the tolerance only allows a half-ulp
    of the output dtype, never an arithmetic slip.
    """
    if output.shape != expected.shape:
        return max(output.numel(), expected.numel())
    got = output.to(torch.float64)
    want = expected.to(torch.float64)
    if output.dtype in (torch.float16, torch.bfloat16):
        # half the spacing of the output dtype at ``want`` (|want| = m * 2**e, m in [0.5, 1): spacing eps * 2**(e-1)),
        # so a result one ulp off is wrong, and zero is exact
        _, exponent = torch.frexp(want)
        tol = torch.where(
            want == 0, 0.0, torch.ldexp(torch.full_like(want, torch.finfo(output.dtype).eps / 4), exponent)
        )
    else:
        tol = torch.zeros_like(want)
    ok = (got - want).abs() <= tol
    return int((~ok).sum().item())
