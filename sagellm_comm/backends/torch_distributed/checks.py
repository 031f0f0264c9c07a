"""Argument checks of the torch.distributed adapter, run before torch is called.

Every function raises a typed error that says what was expected and what was given, so a rejected call
leaves tensors and groups untouched.  :func:`int_arg` also reads torchrun's variables (``RANK``,
``WORLD_SIZE``, ``MASTER_PORT``, ``LOCAL_RANK``) for arguments the caller left out.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from sagellm_comm.arguments import check_dense, check_is_tensor, check_values_in_memory, is_int, share_bytes
from sagellm_comm.backend import GroupHandle, ReduceOp
from sagellm_comm.errors import (
    GroupInvalidError,
    InvalidArgumentError,
    RankMismatchError,
    ShapeMismatchError,
)

#: the shortest timeout torch.distributed keeps (:func:`seconds`)
MIN_TIMEOUT = datetime.timedelta(milliseconds=1)


def seconds(timeout: float) -> datetime.timedelta:
    """``timeout`` seconds as the ``timedelta`` torch.distributed takes, at least 1 ms.

    torch counts timeouts in whole milliseconds (truncated): a timeout under 1 ms became 0 ms, which
    ``Work.wait`` reads as "no timeout" and Gloo's monitored barrier as "wait the group's timeout", so both
    waited for the process group's timeout (30 s by default) instead of raising at once."""
    return max(datetime.timedelta(seconds=timeout), MIN_TIMEOUT)


def int_arg(value: Any, env: str, what: str, default: int | None = None) -> int:
    """``value`` if given, else the integer in ``$env``, else ``default``; typed error otherwise."""
    if value is None:
        text = os.environ.get(env)
        if text is None:
            if default is not None:
                return default
            raise InvalidArgumentError(f"{what} not given and ${env} is not set (run under torchrun or pass {what}=)")
        try:
            return int(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"${env}={text!r} is not an integer") from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{what} must be an int, got {value!r}")
    return value


def check_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments or ``$RANK``/``$WORLD_SIZE``, with ``0 <= rank < world_size``."""
    rank = int_arg(rank, "RANK", "rank")
    world_size = int_arg(world_size, "WORLD_SIZE", "world_size")
    if world_size < 1:
        raise GroupInvalidError(f"world_size must be >= 1, got {world_size}", details={"world_size": world_size})
    if not 0 <= rank < world_size:
        raise RankMismatchError(
            f"rank must be in [0, {world_size - 1}] for world_size={world_size}, got {rank}",
            details={"rank": rank, "world_size": world_size},
        )
    return rank, world_size


def check_group_ranks(ranks: Any, world_size: int) -> tuple[int, ...]:
    """The sorted members of a new group: non-empty, ints, no repeats, inside the world."""
    try:
        members = list(ranks)
    except TypeError as exc:
        raise GroupInvalidError(f"group ranks must be a list of ints, got {ranks!r}") from exc
    if not members:
        raise GroupInvalidError("group ranks are empty; a group needs at least one rank")
    bad = [r for r in members if not is_int(r)]
    if bad:
        raise GroupInvalidError(f"group ranks must be ints, got {bad}")
    members = [int(r) for r in members]  # NumPy's integers as Python's
    dups = sorted({r for r in members if members.count(r) > 1})
    if dups:
        raise GroupInvalidError(f"group ranks {members} repeat {dups}", details={"duplicates": dups})
    outside = [r for r in members if not 0 <= r < world_size]
    if outside:
        raise GroupInvalidError(
            f"group ranks {outside} are outside the world [0, {world_size - 1}]",
            details={"out_of_range": outside},
        )
    return tuple(sorted(members))


def check_peer(peer: Any, g: GroupHandle, what: str, allow_self: bool = False) -> int:
    """A rank inside group ``g`` (``src``/``dst``); not this rank unless ``allow_self``."""
    if not is_int(peer):
        raise InvalidArgumentError(f"{what} must be an int rank, got {peer!r}")
    peer = int(peer)  # NumPy's integers as Python's
    if not 0 <= peer < g.world_size:
        raise RankMismatchError(
            f"invalid {what} rank {peer}: the group has {g.world_size} ranks (valid 0..{g.world_size - 1})",
            details={what: peer, "group_size": g.world_size},
        )
    if peer == g.rank and not allow_self:
        raise RankMismatchError(f"invalid {what} rank {peer}: it is this rank; send/recv need another rank")
    return peer


def check_tensor(tensor: Any, what: str, device: torch.device, kind: str) -> None:
    """A dense contiguous tensor on ``device`` (the backend ``kind``'s) whose memory holds its values (not a lazy
    conjugate or negative view)."""
    check_is_tensor(tensor, what)
    if tensor.device.type != device.type or (
        device.index is not None and tensor.device.index not in (device.index, None)
    ):
        raise InvalidArgumentError(
            f"{what} is on {tensor.device}, but backend {kind!r} needs tensors on {device}; "
            f"move it with .to({str(device)!r})",
            details={"given": str(tensor.device), "expected": str(device)},
        )
    check_dense(tensor, what)  # sparse (CSR's is_contiguous raises), MKL-DNN: no dense block to move
    if not tensor.is_contiguous():
        raise InvalidArgumentError(f"{what} must be a dense contiguous tensor; call .contiguous() first")
    check_values_in_memory(tensor, what)


def check_list(
    tensors: Any, what: str, n: int, like: torch.Tensor | None, device: torch.device, kind: str
) -> list[torch.Tensor]:
    """``n`` tensors (one per rank), each valid and, if ``like`` is given, of its shape and dtype."""
    tensors = list(tensors)
    if len(tensors) != n:
        raise InvalidArgumentError(f"{what} must hold {n} tensors (one per rank), got {len(tensors)}")
    for i, t in enumerate(tensors):
        check_tensor(t, f"{what}[{i}]", device, kind)
        if like is not None and (t.shape != like.shape or t.dtype != like.dtype):
            raise ShapeMismatchError(
                f"{what}[{i}] is {tuple(t.shape)} {t.dtype}, expected {tuple(like.shape)} {like.dtype}",
                details={"index": i, "shape": tuple(t.shape), "expected": tuple(like.shape)},
            )
    return tensors


def check_outputs_disjoint(outputs: list[torch.Tensor], what: str) -> None:
    """No two of ``outputs`` (contiguous) share a byte: each receives another rank's block, and blocks written
    to shared memory would overwrite one another."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i) for i, t in enumerate(outputs) if t.numel()
    )
    for (_, end, i), (start, _, j) in zip(spans, spans[1:], strict=False):
        if start < end:
            first, second = sorted((i, j))
            raise InvalidArgumentError(
                f"{what}: output[{first}] and output[{second}] overlap in memory; each output receives another "
                "rank's block: pass tensors that share no memory",
                details={"outputs": [first, second]},
            )


def check_flat(tensor: Any, what: str, like: torch.Tensor, numel: int, device: torch.device, kind: str) -> None:
    """A valid tensor of ``numel`` elements of ``like``'s dtype (the flat form of a list argument)."""
    check_tensor(tensor, what, device, kind)
    if tensor.dtype != like.dtype or tensor.numel() != numel:
        raise ShapeMismatchError(
            f"{what} is {tuple(tensor.shape)} {tensor.dtype}; expected {numel} elements of {like.dtype}",
            details={"numel": tensor.numel(), "expected_numel": numel},
        )


def check_disjoint(output: torch.Tensor, input: torch.Tensor, what: str) -> None:
    """``output`` and ``input`` (contiguous) share no byte: ``what`` reads its input while it writes its output, so
    an overlap would hand peers data already overwritten (torch and the engines do not check it)."""
    if share_bytes(output, input):
        raise InvalidArgumentError(
            f"{what}: output and input overlap in memory; {what} cannot run in place: pass a separate output tensor",
            details={"output_ptr": output.data_ptr(), "input_ptr": input.data_ptr()},
        )


def check_in_place_or_disjoint(whole: torch.Tensor, block: torch.Tensor, rank: int, what: str) -> None:
    """``block`` (all_gather's input, reduce_scatter's output) is block ``rank`` of ``whole`` (the other side, of
    the same dtype), the one in-place form the engines define (NCCL: ``recvbuff == sendbuff + rank * count``) and
    the custom kernels take, or shares no byte with it; any other overlap is refused, as the kernels refuse it."""
    if not share_bytes(whole, block):
        return
    if block.data_ptr() == whole.data_ptr() + rank * block.numel() * block.element_size():
        return
    side = "input" if what == "all_gather" else "output"
    raise InvalidArgumentError(
        f"{what}: output and input overlap in memory; the only overlap allowed is the {side} being this rank's "
        f"block [rank * n:(rank + 1) * n] (rank {rank}) of the other (in place)",
        details={"rank": rank, "block_offset_bytes": block.data_ptr() - whole.data_ptr()},
    )


def check_list_in_place_or_disjoint(blocks: list[torch.Tensor], single: torch.Tensor, rank: int, what: str) -> None:
    """The list form of :func:`check_in_place_or_disjoint`: ``single`` (all_gather's input, reduce_scatter's
    output) is ``blocks[rank]`` itself (same memory, same size: in place) or shares no byte with any block.  Gloo
    reads other ranks' blocks after writing ``single``, so any other overlap would hand peers (or this rank) data
    already overwritten."""
    for index, block in enumerate(blocks):
        if not share_bytes(block, single):
            continue
        if index == rank and block.data_ptr() == single.data_ptr() and block.numel() == single.numel():
            continue
        side = "input" if what == "all_gather" else "output"
        raise InvalidArgumentError(
            f"{what}: output and input overlap in memory (block {index}); the only overlap allowed is the {side} "
            f"being this rank's block (rank {rank}) of the list (in place)",
            details={"rank": rank, "block": index},
        )


def check_dtype(dtype: torch.dtype, what: str, kind: str, dtypes: frozenset[torch.dtype] | None) -> None:
    """``dtype`` is one that collective ``what`` of backend ``kind`` takes (``dtypes``; None: any)."""
    if dtypes is None or dtype in dtypes:
        return
    takes = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    raise InvalidArgumentError(
        f"{what} on {kind} does not take dtype {dtype}; {kind}'s collectives take {takes}: cast the tensor "
        "(and the result back), or use a backend that takes it",
        details={"op": what, "dtype": str(dtype), "backend": kind},
    )


def check_op(op: Any, dtype: torch.dtype, kind: str, bitwise_ops: bool) -> ReduceOp:
    """The :class:`ReduceOp` named by ``op``, if it is defined for ``dtype`` and offered by ``kind``."""
    rop = ReduceOp.parse(op)
    rop.check_dtype(dtype)
    if rop.is_bitwise and not bitwise_ops:
        raise InvalidArgumentError(f"ReduceOp.{rop.name} is not supported by {kind}")
    if rop in (ReduceOp.MAX, ReduceOp.MIN) and dtype.is_complex:
        raise InvalidArgumentError(f"ReduceOp.{rop.name} is undefined for complex dtype {dtype}")
    if rop is ReduceOp.PRODUCT and dtype.is_complex:  # torch reduces a complex tensor as pairs of reals
        raise InvalidArgumentError(f"ReduceOp.PRODUCT is not supported for complex dtype {dtype} by torch.distributed")
    return rop


def check_all_to_all_lists(outputs: Any, inputs: Any, n: int, device: torch.device, kind: str) -> list[torch.Tensor]:
    """The list form of all_to_all: ``n`` valid inputs and ``n`` valid outputs, all of one dtype (shapes may
    differ per peer).  Returns the outputs as a list."""
    if len(inputs) != n:
        raise InvalidArgumentError(f"input must hold {n} tensors (one per rank), got {len(inputs)}")
    for i, chunk in enumerate(inputs):
        check_tensor(chunk, f"input[{i}]", device, kind)
    outs = check_list(outputs, "output", n, None, device, kind)
    check_outputs_disjoint(outs, "all_to_all")
    dtype = inputs[0].dtype
    for i, t in enumerate([*inputs, *outs]):
        if t.dtype != dtype:
            where = f"input[{i}]" if i < n else f"output[{i - n}]"
            raise ShapeMismatchError(f"{where} has dtype {t.dtype}; all_to_all needs one dtype ({dtype})")
    return outs
