"""All-gather and reduce-scatter on the custom all-reduce's workspace (host side of
``sagellm_comm/kernels/gather_scatter.py``).

``all_gather(car, tensor, out)`` and ``reduce_scatter(car, tensor, out)`` run on the workspace of a
:class:`~sagellm_comm.custom_all_reduce.CustomAllReduce` and share its epoch, check mode and error state,
so they can be mixed in any order with its all-reduce calls (every rank making the same sequence of calls
with the same sizes).  Both are enqueued on the current stream and return before completion, like
``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor``.  ``all_gather_stacked`` and
``reduce_scatter_stacked`` run every virtual rank of a :class:`~sagellm_comm.virtual.VirtualRankGroup` in
one launch.

Arguments are checked before anything is enqueued: a wrong dtype, layout, device or shape raises
``InvalidArgumentError``, a message whose staged bytes exceed the workspace's ``slot_bytes``
``WorkspaceExhaustedError`` (:func:`max_numel` says what fits), a workspace whose earlier call failed
``CommTimeoutError`` / ``CollectiveMismatchError``.
"""

from __future__ import annotations

import torch
import triton

from .arguments import check_int, check_is_tensor, is_dense_contiguous, share_bytes
from .custom_all_reduce import SUPPORTED_DTYPES, check_kernel_elements, tile_shape
from .errors import InvalidArgumentError, NotInitializedError, WorkspaceExhaustedError
from .kernels import gather_scatter as _k
from .launch import Launcher

__all__ = [
    "OPS",
    "all_gather",
    "all_gather_stacked",
    "max_numel",
    "reduce_scatter",
    "reduce_scatter_stacked",
    "staged_bytes",
]

OPS = ("all_gather", "reduce_scatter")
_KERNELS = {"all_gather": _k.all_gather_kernel, "reduce_scatter": _k.reduce_scatter_kernel}
# One launcher per (op, device, warps), shared by every workspace: a compiled binary does not depend on it.
_LAUNCHERS: dict[tuple, Launcher] = {}


def staged_bytes(op: str, numel: int, world_size: int, itemsize: int) -> int:
    """Bytes ``op`` stages in a staging slot for ``numel`` elements per rank's block (all-gather: the
    input) or per chunk (reduce-scatter: the output); must not exceed the workspace's ``slot_bytes``.

    Raises :class:`InvalidArgumentError` for a ``numel`` that is not an int >= 0, or a ``world_size`` or ``itemsize``
    that is not an int >= 1 (a bool is not an int)."""
    numel = check_int(numel, "numel", low=0)
    world_size = check_int(world_size, "world_size", low=1)
    itemsize = check_int(itemsize, "itemsize", low=1)
    if op == "all_gather":
        return numel * itemsize
    if op == "reduce_scatter":
        return (world_size - 1) * _k.reduce_scatter_stride(numel) * itemsize
    raise InvalidArgumentError(f"op must be one of {OPS}, got {op!r}")


def max_numel(op: str, world_size: int, slot_bytes: int, itemsize: int) -> int:
    """The largest per-rank block (all-gather input) or chunk (reduce-scatter output) that fits ``slot_bytes``.

    Raises :class:`InvalidArgumentError` for a ``world_size`` or ``itemsize`` below 1, a negative ``slot_bytes``,
    and a reduce-scatter of one rank, which stages nothing (every size fits: there is no largest)."""
    world_size = check_int(world_size, "world_size", low=1)
    slot_bytes = check_int(slot_bytes, "slot_bytes", low=0)
    itemsize = check_int(itemsize, "itemsize", low=1)
    if op == "reduce_scatter" and world_size == 1:
        raise InvalidArgumentError(
            "reduce_scatter of world_size=1 stages nothing in the workspace, so every chunk size fits and there is "
            "no largest; check the world size before asking for a capacity",
            details={"op": op, "world_size": world_size},
        )
    if op == "all_gather":
        return slot_bytes // itemsize
    if op == "reduce_scatter":
        align = _k.CHUNK_ALIGN.value
        return slot_bytes // ((world_size - 1) * itemsize) // align * align
    raise InvalidArgumentError(f"op must be one of {OPS}, got {op!r}")


def _launcher(op: str, use_ptx: bool, device_index: int, num_warps: int) -> Launcher:
    key = (op, use_ptx, device_index, num_warps)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = Launcher(_KERNELS[op], use_ptx, device_index, num_warps=num_warps)
    return launcher


def _on_device(tensor: torch.Tensor, use_ptx: bool, device_index: int) -> bool:
    if use_ptx:
        return tensor.is_cuda and tensor.get_device() == device_index
    return tensor.device.type == "cpu"


def _validate(op: str, tensor: torch.Tensor, out: torch.Tensor, world_size: int, rows: int, slot_bytes: int, where):
    """Check dtype, layout, device, shapes and capacity of one call of ``op`` (``rows`` ranks stacked in each
    tensor, 1 for a real rank); return ``(numel, itemsize)``, ``numel`` the per-rank block (all-gather) or
    chunk (reduce-scatter).  ``where``: ``(use_ptx, device_index, device)`` of the workspace."""
    use_ptx, device_index, device = where
    itemsize = SUPPORTED_DTYPES.get(tensor.dtype)
    if itemsize is None:
        raise InvalidArgumentError(f"custom {op} supports bfloat16, float16 and float32, got {tensor.dtype}")
    for name, t in (("tensor", tensor), ("out", out)):
        if not is_dense_contiguous(t):
            raise InvalidArgumentError(f"custom {op} needs a contiguous {name} (call .contiguous())")
        if not _on_device(t, use_ptx, device_index):
            raise InvalidArgumentError(f"{name} is on {t.device}, this rank's workspace is on {device}")
    if out.dtype != tensor.dtype:
        raise InvalidArgumentError(f"out must have the input's dtype {tensor.dtype}, got {out.dtype}")
    per_rank_in, per_rank_out = tensor.numel() // rows, out.numel() // rows
    if op == "all_gather":
        numel = per_rank_in
        agree = per_rank_out == world_size * per_rank_in
        rule = "out must hold world_size * tensor.numel() elements"
    else:
        numel = per_rank_out
        agree = per_rank_in == world_size * per_rank_out
        rule = "tensor must hold world_size * out.numel() elements"
    if not agree or out.numel() % rows or tensor.numel() % rows:
        raise InvalidArgumentError(
            f"{op}: {rule} (world_size={world_size}), got tensor of {tuple(tensor.shape)} and out of {tuple(out.shape)}"
        )
    need = staged_bytes(op, numel, world_size, itemsize)
    if need > slot_bytes:
        fits = max_numel(op, world_size, slot_bytes, itemsize)
        what = "input" if op == "all_gather" else "output chunk"
        raise WorkspaceExhaustedError(
            f"{op} of {numel} elements per rank's {what} ({tensor.dtype}) stages {need} bytes, over the "
            f"workspace's {slot_bytes}-byte slot; at most {fits} elements fit: split the call or make the "
            "workspace larger"
        )
    check_kernel_elements(numel, f"{op}'s per-rank {'input' if op == 'all_gather' else 'output chunk'}")
    return numel, itemsize


def _check_aliasing(op: str, tensor: torch.Tensor, out: torch.Tensor, rank: int, numel: int) -> None:
    """The kernels allow ``inp`` = this rank's block of ``out`` (all-gather) or ``out`` = this rank's
    chunk of ``inp`` (reduce-scatter), and no other overlap."""
    if not share_bytes(tensor, out):
        return
    whole, part = (out, tensor) if op == "all_gather" else (tensor, out)
    if part.data_ptr() != whole.data_ptr() + rank * numel * whole.element_size():
        allowed = "tensor = out" if op == "all_gather" else "out = tensor"
        allowed += "[rank * n:(rank + 1) * n]"
        raise InvalidArgumentError(f"{op}: tensor and out overlap; the only overlap allowed is {allowed} (in place)")


def _launch(op, car, tensor, out, numel, itemsize, table, ctrl, rank, ranks, virtual, fingerprint=None) -> None:
    """Enqueue the check (check mode: ``fingerprint``, default this op and the input's count per rank) and the
    kernel on the current stream; ``ranks`` > 1: virtual ranks."""
    ws = car.workspace
    world_size = car.world_size
    block, num_warps, stages = tile_shape(world_size * numel * itemsize, itemsize, ws.config)
    programs = min(triton.cdiv(numel, block), ws.max_programs)
    if car.check:
        what = fingerprint or (op, tensor.numel() // ranks)
        car.launch_check(*what, tensor.dtype, table, ctrl, grid_y=ranks)
    _launcher(op, car.use_ptx, car.device_index, num_warps).launch(
        (programs, ranks), inp=tensor, out=out, table=table, ctrl=ctrl, numel=numel, rank=rank,
        slot_bytes=ws.slot_bytes, timeout=car.timeout_ticks, W=world_size, WP=triton.next_power_of_2(world_size),
        BLOCK=block, USE_PTX=car.use_ptx, VIRTUAL=virtual, STAGES=stages,
    )  # fmt: skip


def _collective(op: str, car, tensor: torch.Tensor, out: torch.Tensor, fingerprint=None) -> torch.Tensor:
    check_is_tensor(tensor, "tensor")
    check_is_tensor(out, "out")
    ws = car.workspace
    if ws.error_view[0]:
        ws.raise_if_failed()
    if ws.closed:
        raise car.closed_error(op)
    numel, itemsize = _validate(
        op, tensor, out, car.world_size, 1, ws.slot_bytes, (car.use_ptx, car.device_index, ws.device)
    )
    _check_aliasing(op, tensor, out, car.rank, numel)
    if numel == 0 and not car.check:
        return out
    if car.use_ptx:
        ws.enter_stream(torch._C._cuda_getCurrentRawStream(car.device_index))
    if numel == 0:  # check mode compares an empty call too: a peer that passed elements must not wait in vain
        car.launch_check(*(fingerprint or (op, tensor.numel())), tensor.dtype, ws.table, ws.control)
        return out
    _launch(op, car, tensor, out, numel, itemsize, ws.table, ws.control, car.rank, 1, False, fingerprint)
    return out


def all_gather(
    car, tensor: torch.Tensor, out: torch.Tensor, *, fingerprint: tuple[str, int] | None = None
) -> torch.Tensor:
    """Gather every rank's ``tensor`` into ``out`` in rank order: ``out[r * n:(r + 1) * n]`` is rank ``r``'s.

    Args:
        car: this rank's ``CustomAllReduce`` (its workspace, rank and timeout are used).
        tensor: ``n`` elements, contiguous bf16/fp16/fp32 on the workspace's device, ``n * itemsize`` at
            most ``slot_bytes``.  May be this rank's block of ``out`` (in place).
        out: ``world_size * n`` contiguous elements of the same dtype and device (any shape).

    Returns ``out``.  Enqueued on the current stream; returns before completion.  Every rank's ``out`` has
    the same bits.  Every rank must make the same sequence of calls on the workspace with the same ``n``.
    ``fingerprint``: what check mode compares, ``(operation, element count)`` (default ``("all_gather", n)``;
    a stage of a larger operation passes that operation's).
    """
    return _collective("all_gather", car, tensor, out, fingerprint)


def reduce_scatter(
    car, tensor: torch.Tensor, out: torch.Tensor, *, fingerprint: tuple[str, int] | None = None
) -> torch.Tensor:
    """Sum chunk ``rank`` of every rank's ``tensor`` into ``out``: ``out = sum_q tensor_q[rank * n:(rank + 1) * n]``.

    Args:
        car: this rank's ``CustomAllReduce``.
        tensor: ``world_size * n`` contiguous bf16/fp16/fp32 elements on the workspace's device (any shape).
        out: ``n`` contiguous elements of the same dtype and device; may be this rank's chunk of ``tensor``.
            ``(world_size - 1) * n`` elements (``n`` rounded up to 8) are staged: see :func:`max_numel`.

    Returns ``out``: the ranks' chunks summed in rank order in fp32 and rounded once to the dtype (the
    same bits as chunk ``rank`` of a two-shot all-reduce).  Enqueued on the current stream; returns before
    completion.  Every rank must make the same sequence of calls with the same ``n``.  ``fingerprint``: as for
    :func:`all_gather` (default ``("reduce_scatter", world_size * n)``).
    """
    return _collective("reduce_scatter", car, tensor, out, fingerprint)


def _stacked(op: str, vg, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    check_is_tensor(x, "x")
    if out is not None:
        check_is_tensor(out, "out")
    world_size = vg.world_size
    if x.dim() != 2 or x.shape[0] != world_size:
        raise InvalidArgumentError(
            f"{op}_stacked: x must have shape [world_size={world_size}, numel], got {tuple(x.shape)}"
        )
    if op == "all_gather":
        shape = (world_size, world_size * x.shape[1])
    else:
        if x.shape[1] % world_size:
            raise InvalidArgumentError(
                f"reduce_scatter_stacked: each rank's row must hold world_size={world_size} equal chunks, got "
                f"{x.shape[1]} elements"
            )
        shape = (world_size, x.shape[1] // world_size)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape:
        raise InvalidArgumentError(f"{op}_stacked: out must have shape {shape}, got {tuple(out.shape)}")
    car = vg.ranks[0]
    if any(c.workspace.error_view[0] for c in vg.ranks):
        vg.check_errors()
    if car.workspace.closed:
        raise NotInitializedError(f"custom {op}: the virtual ranks' workspaces were closed")
    numel, itemsize = _validate(
        op, x, out, world_size, world_size, car.workspace.slot_bytes, (True, vg.device.index, vg.device)
    )
    if share_bytes(x, out):
        raise InvalidArgumentError(f"{op}_stacked: x and out overlap")
    if numel:
        raw = torch._C._cuda_getCurrentRawStream(vg.device.index)
        for ws in vg.workspaces:
            ws.enter_stream(raw)
        _launch(op, car, x, out, numel, itemsize, vg.stacked_table, vg.stacked_control, 0, world_size, True)
    return out


def all_gather_stacked(vg, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """All-gather for the virtual ranks of ``vg`` (a ``VirtualRankGroup``) in one launch.

    ``x``: ``[world_size, n]``, row ``r`` is rank ``r``'s input.  Returns ``out`` ``[world_size,
    world_size * n]`` (new unless given), every row the rows of ``x`` concatenated.  Enqueued on the current
    stream (graph-capturable); returns before completion.
    """
    return _stacked("all_gather", vg, x, out)


def reduce_scatter_stacked(vg, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce-scatter for the virtual ranks of ``vg`` in one launch.

    ``x``: ``[world_size, world_size * n]``, row ``q`` is rank ``q``'s input.  Returns ``out``
    ``[world_size, n]`` (new unless given): row ``r`` is ``sum_q x[q, r * n:(r + 1) * n]`` (rank order, fp32,
    rounded once).  Enqueued on the current stream (graph-capturable); returns before completion.
    """
    return _stacked("reduce_scatter", vg, x, out)
