"""Collectives as torch custom ops, so ``torch.compile`` traces them and CUDA graphs capture them.

``torch.compile`` cannot take a :class:`~sagellm_comm.group.CommGroup` as an operator argument, so the
ops take a *group name* (a string, a constant in the traced graph) and look the group up in a small
process-local registry at run time::

    from sagellm_comm import ops

    name = ops.register_group(tp_group, "tp")            # or ops.group_name(tp_group): a generated name
    y = torch.ops.sagellm_comm.all_reduce(x, "tp")       # == ops.all_reduce(x, "tp")

The registry name ``"default"`` always means the group set by :func:`sagellm_comm.init`.  Inside
``torch.compile(fullgraph=True)`` the wrappers below also take a group that already has a name (the graph is
guarded on the group's identity: another group recompiles); naming a group takes the registry's lock, which
Dynamo cannot trace.

Ops (namespace ``sagellm_comm``; all functional: they return new tensors and never modify their inputs):

* ``all_reduce(Tensor tensor, str group_name, str op="sum") -> Tensor``: same shape and dtype as
  ``tensor``, contiguous; every rank of the group gets the reduction.
* ``all_gather(Tensor tensor, str group_name, int world_size) -> Tensor``: every rank's ``tensor``
  stacked rank-major along dim 0: shape ``[world_size * tensor.shape[0], *tensor.shape[1:]]``.
  ``world_size`` is an argument (checked against the group at run time) so the fake implementation
  can compute the output shape without touching the registry.
* ``all_reduce_residual_rmsnorm(Tensor x, Tensor residual, Tensor weight, str group_name, float eps,
  str quant="none", Tensor? scale=None) -> (Tensor out, Tensor scales, Tensor new_residual)``:
  :func:`sagellm_comm.fused.all_reduce_residual_rmsnorm` over the group, for ``x`` and ``residual`` of
  any shape ``[..., hidden]`` (the leading dimensions are flattened into tokens).  ``quant="none"``:
  ``out`` is the RMSNorm output in ``x``'s dtype and ``scales`` an empty fp32 tensor; an FP8 mode
  (``"fp8"``, ``"fp8_per_token"``, ``"fp8_group128"``): ``out`` is ``float8_e4m3fn`` and ``scales`` the
  fp32 scales (``"fp8"``: a copy of ``scale``; per token ``[..., 1]``; per group ``[..., hidden // 128]``).
  What :mod:`sagellm_comm.compile` puts in place of an all-reduce, residual add and RMSNorm.
* ``quantize_fp8(Tensor y, str quant, Tensor? scale=None) -> (Tensor q, Tensor scales)``: the FP8
  quantisation of :func:`sagellm_comm.fused.quantize_fp8_reference` (same modes, same scales shapes).  An
  FP8 linear layer that quantises its input with this op lets :mod:`sagellm_comm.compile` fold the
  quantisation into the fused op above when the input comes from an all-reduce + residual + RMSNorm.

The collectives dispatch to the group's backend: the custom Triton kernels where the backend is
``custom`` and they are active (SUM on the world group), the engine otherwise.  On device engines the
result is enqueued on the current stream and the call returns before completion (stream semantics); on
Gloo it returns once the data is reduced.  Each op has a fake (meta) implementation, so FakeTensor
tracing, AOTAutograd and ``torch.compile(fullgraph=True)`` see shapes without communicating.

The ops are forward-only (inference): no autograd formula is registered, and a backward through
them raises torch's "no autograd" error.  ``torch.compile`` traces the backward when it compiles a graph whose op
inputs require grad, so there the error comes at compile time: compile under ``torch.no_grad()`` or
``torch.inference_mode()``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sagellm_comm.arguments import check_dense, check_finite, check_int, check_is_tensor
from sagellm_comm.backend import ReduceOp
from sagellm_comm.errors import (
    BackendNotSupportedError,
    GroupNotFoundError,
    InvalidArgumentError,
    NotInitializedError,
    ShapeMismatchError,
)

if TYPE_CHECKING:
    from sagellm_comm.group import CommGroup

__all__ = [
    "DEFAULT_GROUP_NAME",
    "QUANT_NONE",
    "all_gather",
    "all_reduce",
    "all_reduce_residual_rmsnorm",
    "group_name",
    "list_groups",
    "quantize_fp8",
    "register_group",
    "unregister_group",
]

DEFAULT_GROUP_NAME = "default"
"""Registry name that resolves to :func:`sagellm_comm.get_default_group` at call time."""

_GROUPS: dict[str, CommGroup] = {}
_NAMES: dict[int, str] = {}  # id(group) -> its first name, for _name_of (the groups in _GROUPS are alive)
_GENERATED: set[str] = set()  # the names register_group made up (name=None); dropped when their group is released
_LOCK = threading.Lock()
_COUNTER = itertools.count()


# ====================================================================== group registry


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"group name must be a non-empty str, got {name!r}")
    return name


def register_group(group: CommGroup, name: str | None = None) -> str:
    """Make ``group`` reachable from the ops under ``name``; returns the name.

    ``name=None`` reuses the name ``group`` already has, or generates one (``"g<N>_ranks<r0>-<r1>..."``).
    Registering the same group under the same name again is a no-op; a name already bound to another
    group raises :class:`InvalidArgumentError` (unregister it first).  ``"default"`` is reserved.
    Every rank should register its group under the same name, so compiled graphs agree across ranks.
    A generated name lasts as long as the group: releasing a sub-group (``CommGroup.destroy()``,
    ``CommBackend.release_group``) or destroying its backend unregisters it, so the registry holds no released group
    (nor its process groups' sockets and threads); a name given here stays until :func:`unregister_group`.  A group
    whose backend is not initialised gets none (:class:`NotInitializedError`).
    """
    from sagellm_comm.group import CommGroup

    if not isinstance(group, CommGroup):
        raise InvalidArgumentError(f"register_group needs a CommGroup, got {type(group).__name__}")
    if name is None:
        known = _name_of(group)  # without the lock: torch.compile traces this (it cannot enter a lock)
        if known is not None:
            return known
    with _LOCK:
        if name is None:
            known = _name_of(group)  # again under the lock: another thread may have named it meanwhile
            if known is not None:
                return known
            if not group.backend.is_initialized:  # its destroy has passed: nothing would drop the name
                raise NotInitializedError(
                    f"{group!r}: its backend is not initialised (destroyed?), so it gets no generated name; "
                    "init the backend and make the group again"
                )
            ranks = "-".join(str(r) for r in group.ranks)
            name = f"g{next(_COUNTER)}_ranks{ranks}"
            while name in _GROUPS:  # a name given by the caller can look like a generated one: it is theirs
                name = f"g{next(_COUNTER)}_ranks{ranks}"
            _GENERATED.add(name)
            _GROUPS[name] = group
            _index_names()
            return name
        _check_name(name)
        if name == DEFAULT_GROUP_NAME:
            raise InvalidArgumentError(f"group name {name!r} is reserved for the default group (sagellm_comm.init)")
        bound = _GROUPS.get(name)
        if bound is not None and bound is not group:
            raise InvalidArgumentError(
                f"group name {name!r} is already bound to {bound!r}; call unregister_group({name!r}) first"
            )
        _GROUPS[name] = group
        _index_names()
        return name


def _index_names() -> None:
    """Rebuild ``_NAMES`` from the registry (under ``_LOCK``, after every write): each group's first name.  A new
    dict, bound in one step: a reader without the lock sees the old index or the new one."""
    global _NAMES
    names: dict[int, str] = {}
    for known, value in _GROUPS.items():
        names.setdefault(id(value), known)
    _NAMES = names


def _name_of(group: CommGroup) -> str | None:
    """The name ``group`` is registered under, or None.  Reads the index ``_NAMES`` without the lock (every write
    binds a new one under it; a stale read falls through to the locked path), so that ``torch.compile`` traces a
    wrapper given a group: Dynamo cannot enter a lock, and guards on what it read here, so another group (or
    another binding) recompiles."""
    known = _NAMES.get(id(group))  # id(): Dynamo guards on the group's identity (a comparison with `is` it does not)
    return None if known is None or _GROUPS.get(known) is not group else known


def unregister_group(name: str) -> None:
    """Forget ``name``; raises :class:`GroupNotFoundError` when it is not registered."""
    with _LOCK:
        if _GROUPS.pop(_check_name(name), None) is None:
            raise GroupNotFoundError(f"no group is registered as {name!r}", details={"name": name})
        _GENERATED.discard(name)
        _index_names()


def forget_generated_names(backend: object, handles: Sequence[object] | None = None) -> None:
    """Unregister the generated names of ``backend``'s groups: every one (``handles`` None: the backend is being
    destroyed), or those of the sub-groups ``handles`` (being released); given names stay."""

    def released(group: CommGroup) -> bool:
        return group.backend is backend and (handles is None or any(group.handle is h for h in handles))

    with _LOCK:
        for name in [name for name in _GENERATED if released(_GROUPS[name])]:
            del _GROUPS[name]
            _GENERATED.discard(name)
        _index_names()


def list_groups() -> dict[str, CommGroup]:
    """A snapshot of the registry (name -> group), without the implicit ``"default"``."""
    with _LOCK:
        return dict(_GROUPS)


def bound_group(name: str) -> CommGroup | None:
    """The group registered as ``name`` now, or None (``"default"`` and unknown names included); nothing checked:
    for a hot path's identity test.  :func:`registered_group` otherwise."""
    return _GROUPS.get(name)


def registered_group(name: str) -> CommGroup | None:
    """The group registered as ``name``; None for ``"default"`` (the default group, resolved by the caller).

    Raises :class:`InvalidArgumentError` for a name that is not a non-empty str and :class:`GroupNotFoundError`
    (code ``comm_group_not_found``) for an unknown one.  Callers resolve through
    :func:`sagellm_comm.group.resolve_group`.
    """
    _check_name(name)
    if name == DEFAULT_GROUP_NAME:
        return None
    group = _GROUPS.get(name)  # one dict read, no lock: torch.compile traces this (the all_gather wrapper's lookup)
    if group is None:
        with _LOCK:
            known = sorted(_GROUPS)
        raise GroupNotFoundError(
            f"no group is registered as {name!r} (registered: {known or 'none'}); "
            "call sagellm_comm.ops.register_group(group, name) on every rank first",
            details={"name": name, "registered": known},
        )
    return group


def _group(name: str) -> CommGroup:
    """The group the ops' ``group_name`` names, through :func:`sagellm_comm.group.resolve_group` (the one resolver)."""
    from sagellm_comm.group import resolve_group

    return resolve_group(_check_name(name))


def group_name(group: CommGroup | str | None) -> str:
    """The registry name to pass to the ops for ``group``: None -> ``"default"``, a str is checked
    and returned, a :class:`CommGroup` is registered if needed (see :func:`register_group`)."""
    if group is None:
        return DEFAULT_GROUP_NAME
    if isinstance(group, str):
        return _check_name(group)
    return register_group(group)


# ====================================================================== the ops


def _check_collective_call(tensor: torch.Tensor, group_name: str, what: str) -> None:
    """What the collective ops check before anything else, traced or not: a group name that can name a group (it
    is looked up when the op runs) and a dense tensor (a sparse or MKL-DNN one has no block of memory to copy)."""
    _check_name(group_name)
    check_dense(tensor, f"the tensor of {what}")


def _check_reduce_call(tensor: torch.Tensor, group_name: str, op: str) -> ReduceOp:
    """What the all_reduce op checks before anything else, traced or not (:func:`_check_collective_call`, and a
    reduction defined for the tensor's dtype); returns the reduction."""
    _check_collective_call(tensor, group_name, "all_reduce")
    reduction = ReduceOp.parse(op)
    reduction.check_dtype(tensor.dtype)
    return reduction


@torch.library.custom_op("sagellm_comm::all_reduce", mutates_args=())
def _all_reduce_op(tensor: torch.Tensor, group_name: str, op: str = "sum") -> torch.Tensor:
    reduction = _check_reduce_call(tensor, group_name, op)
    group = _group(group_name)
    result = tensor.clone(memory_format=torch.contiguous_format)
    group.all_reduce(result, reduction)
    return result


@_all_reduce_op.register_fake
def _all_reduce_fake(tensor: torch.Tensor, group_name: str, op: str = "sum") -> torch.Tensor:
    _check_reduce_call(tensor, group_name, op)
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _check_gather_call(tensor: torch.Tensor, group_name: str, world_size: int) -> None:
    """What the all_gather op checks before anything else, traced or not (:func:`_check_collective_call`, a tensor
    of at least one dimension: it gathers along dim 0, and a world size of at least 1)."""
    _check_collective_call(tensor, group_name, "all_gather")
    if tensor.dim() == 0:
        raise InvalidArgumentError("all_gather needs a tensor of at least one dimension (gathers along dim 0)")
    if world_size < 1:  # the schema's SymInt: an int, or a symbolic one under dynamic shapes
        raise InvalidArgumentError(f"world_size must be >= 1, got {world_size}", details={"world_size": world_size})


@torch.library.custom_op("sagellm_comm::all_gather", mutates_args=())
def _all_gather_op(tensor: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    _check_gather_call(tensor, group_name, world_size)
    group = _group(group_name)
    if world_size != group.world_size:
        raise ShapeMismatchError(
            f"all_gather was traced for world_size={world_size}, but group {group_name!r} has {group.world_size} ranks",
            details={"world_size": world_size, "group_size": group.world_size},
        )
    source = tensor.contiguous()
    result = source.new_empty((world_size * source.shape[0], *source.shape[1:]))
    group.all_gather(result, source)
    return result


@_all_gather_op.register_fake
def _all_gather_fake(tensor: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    _check_gather_call(tensor, group_name, world_size)
    return tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))


QUANT_NONE = "none"
"""``quant`` of the fused op for the RMSNorm output in ``x``'s dtype; the FP8 modes are
``sagellm_comm.fused.FP8_QUANT_MODES``."""


def _fp8_reference():
    """``(FP8_QUANT_MODES, quantize_fp8_reference)`` of :mod:`sagellm_comm.fused`, or a typed error."""
    try:
        from sagellm_comm.fused import FP8_QUANT_MODES, quantize_fp8_reference
    except ImportError as exc:
        raise BackendNotSupportedError(
            f"FP8 quantisation needs sagellm_comm.fused.quantize_fp8_reference, which cannot be imported ({exc})"
        ) from exc
    return FP8_QUANT_MODES, quantize_fp8_reference


def _fused_checks():
    """``(check_quant, check_rmsnorm_inputs)`` of :mod:`sagellm_comm.fused`, or a typed error."""
    try:
        from sagellm_comm.fused import check_quant, check_rmsnorm_inputs
    except ImportError as exc:
        raise BackendNotSupportedError(
            f"the fused all-reduce + residual + RMSNorm needs sagellm_comm.fused, which cannot be imported ({exc})"
        ) from exc
    return check_quant, check_rmsnorm_inputs


def _fused_rows(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: str, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the fused op checks before anything runs, traced (its fake) or not: every check of the fused function
    that needs only the inputs' shapes, dtypes, devices and the op's constant arguments, with the same typed errors
    (the group, and the inputs' device against the group's, are checked when it runs).  Returns ``x`` and
    ``residual`` as contiguous ``[tokens, hidden]`` rows and ``weight`` contiguous."""
    for name, tensor in (("x", x), ("residual", residual), ("weight", weight)):
        check_dense(tensor, name)  # before the rows are formed: a sparse tensor cannot be reshaped
    if x.dim() < 1 or tuple(residual.shape) != tuple(x.shape):
        raise ShapeMismatchError(
            f"x and residual must have one shape [..., hidden], got x {tuple(x.shape)}, residual "
            f"{tuple(residual.shape)}",
            details={"x": tuple(x.shape), "residual": tuple(residual.shape)},
        )
    if x.shape[-1] < 1:  # before the rows are formed: reshape(-1, 0) cannot tell how many there are
        raise InvalidArgumentError(f"hidden size must be at least 1, got x {tuple(x.shape)}")
    if quant == QUANT_NONE and scale is not None:
        raise InvalidArgumentError(f"scale is only taken with an FP8 quant mode; quant is {QUANT_NONE!r}")
    check_quant, check_rmsnorm_inputs = _fused_checks()
    check_quant(None if quant == QUANT_NONE else quant, scale, x)
    if not isinstance(eps, torch.SymFloat):  # a symbolic eps (dynamic shapes) has its value when the op runs
        check_finite(eps, "eps", 0.0)
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).contiguous()
    residual_rows = residual.reshape(-1, hidden).contiguous()
    weight = weight.contiguous()
    check_rmsnorm_inputs(rows, residual_rows, weight, x.device, max_hidden=None)
    return rows, residual_rows, weight


@torch.library.custom_op("sagellm_comm::all_reduce_residual_rmsnorm", mutates_args=())
def _all_reduce_residual_rmsnorm_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    eps: float,
    quant: str = QUANT_NONE,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sagellm_comm.fused import all_reduce_residual_rmsnorm as fused

    rows, residual_rows, weight = _fused_rows(x, residual, weight, eps, quant, scale)
    group = _group(group_name)
    if quant == QUANT_NONE:
        normed, new_residual = fused(rows, residual_rows, weight, eps, group=group)
        return normed.view(x.shape), x.new_empty((0,), dtype=torch.float32), new_residual.view(x.shape)
    _fp8_reference()  # a typed error where the FP8 modes are not available
    q, scales, new_residual = fused(rows, residual_rows, weight, eps, group=group, quant=quant, scale=scale)
    if scale is not None and scales.data_ptr() == scale.data_ptr():
        scales = scales.clone()  # static mode returns the caller's scale; an op output must not alias an input
    else:
        scales = scales.reshape(*x.shape[:-1], scales.shape[-1]).contiguous()
    return q.view(x.shape), scales, new_residual.view(x.shape)


@_all_reduce_residual_rmsnorm_op.register_fake
def _all_reduce_residual_rmsnorm_fake(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    eps: float,
    quant: str = QUANT_NONE,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _fused_rows(x, residual, weight, eps, quant, scale)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    if quant == QUANT_NONE:
        normed = torch.empty_like(x, memory_format=torch.contiguous_format)
        return normed, x.new_empty((0,), dtype=torch.float32), new_residual
    q, scales = _quantize_fp8_fake(x, quant, scale)
    return q, scales, new_residual


@torch.library.custom_op("sagellm_comm::quantize_fp8", mutates_args=())
def _quantize_fp8_op(
    y: torch.Tensor, quant: str, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _, reference = _fp8_reference()
    q, scales = reference(y, quant, scale)
    if scales is scale:
        scales = scale.clone()  # static mode returns the caller's scale; an op output must not alias an input
    return q.contiguous(), scales.contiguous()


@_quantize_fp8_op.register_fake
def _quantize_fp8_fake(
    y: torch.Tensor, quant: str, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # The reference itself, run on fake tensors: the same argument checks and the same output shapes.
    _, reference = _fp8_reference()
    q, scales = reference(y, quant, scale)
    return (
        torch.empty(q.shape, dtype=q.dtype, device=y.device),
        torch.empty(scales.shape, dtype=torch.float32, device=y.device),
    )


def _check_quant_types(quant: object, scale: object, none_allowed: bool) -> None:
    """Typed errors for a ``quant`` or ``scale`` of a type the ops' schemas do not take (torch's own refusal is an
    untyped ``RuntimeError``); their values are checked by the ops, as by the fused functions."""
    if not isinstance(quant, str) and not (none_allowed and quant is None):
        expected = "None or a str" if none_allowed else "a str"
        raise InvalidArgumentError(
            f"quant must be {expected} naming an FP8 mode (sagellm_comm.fused.FP8_QUANT_MODES), got {quant!r}"
        )
    if scale is not None and not isinstance(scale, torch.Tensor):
        raise InvalidArgumentError(
            f"scale must be None or a one-element torch.float32 tensor (the static FP8 scale), got "
            f"{type(scale).__name__}; pass torch.tensor([scale], device=...)"
        )


def all_reduce(tensor: torch.Tensor, group: CommGroup | str | None = None, op: ReduceOp | str = "sum") -> torch.Tensor:
    """Functional all-reduce through ``torch.ops.sagellm_comm.all_reduce``.

    Args:
        tensor: any shape and dtype the group's backend takes, on the backend's device; not modified.
        group: a :class:`CommGroup`, a registered name, or None (the default group).
        op: a :class:`ReduceOp` or its name.

    Returns:
        A new contiguous tensor shaped like ``tensor`` holding the reduction over the group (stream
        semantics on device engines: enqueued on the current stream, returns before completion).
    """
    check_is_tensor(tensor, "tensor")
    return torch.ops.sagellm_comm.all_reduce(tensor, group_name(group), ReduceOp.parse(op).value)


def all_gather(tensor: torch.Tensor, group: CommGroup | str | None = None, world_size: int | None = None):
    """Functional all-gather through ``torch.ops.sagellm_comm.all_gather``.

    Args:
        tensor: ``[d0, *rest]`` on the backend's device, at least 1-D; not modified.
        group: a :class:`CommGroup`, a registered name, or None (the default group).
        world_size: the group's size (looked up from the group when None; pass it under tracing to
            avoid the lookup).

    Returns:
        ``[world_size * d0, *rest]``: rank ``r``'s ``tensor`` in rows ``r*d0 .. (r+1)*d0 - 1``.
    """
    check_is_tensor(tensor, "tensor")
    if tensor.dim() == 0:  # before the group is looked up (the op checks it again)
        raise InvalidArgumentError("all_gather needs a tensor of at least one dimension (gathers along dim 0)")
    name = group_name(group)
    # The op's schema takes an int: torch's own refusal of "2" or 2.0 would be an untyped RuntimeError.
    world_size = _group(name).world_size if world_size is None else check_int(world_size, "world_size", low=1)
    return torch.ops.sagellm_comm.all_gather(tensor, name, world_size)


def all_reduce_residual_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group: CommGroup | str | None = None,
    quant: str | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The fused all-reduce + residual + RMSNorm (+ FP8) through its custom op (traced by ``torch.compile``).

    Args:
        x: this rank's partial sums ``[..., hidden]`` (any leading shape); not modified.
        residual: ``[..., hidden]`` like ``x``; not modified.
        weight: the RMSNorm weight ``[hidden]``.
        eps: added to the mean square.
        group: a :class:`CommGroup`, a registered name, or None (the default group).
        quant: None, or an FP8 mode of ``sagellm_comm.fused.FP8_QUANT_MODES``.
        scale: the static FP8 scale (``quant="fp8"``), a one-element fp32 tensor.

    Returns:
        ``(normed, new_residual)`` for ``quant=None``, else ``(q, scales, new_residual)`` (static mode:
        ``scales`` is a copy of ``scale``), the fused function's convention, shaped like ``x``.
    """
    for name, value in (("x", x), ("residual", residual), ("weight", weight)):
        check_is_tensor(value, name)
    _check_quant_types(quant, scale, none_allowed=True)
    if quant == QUANT_NONE:  # the op's own spelling of no quantisation; this function's is None
        raise InvalidArgumentError(f"quant must be None or an FP8 mode, got {quant!r}; pass quant=None")
    mode = QUANT_NONE if quant is None else quant
    out, scales, new_residual = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(
        x, residual, weight, group_name(group), check_finite(eps, "eps", 0.0), mode, scale
    )
    return (out, new_residual) if quant is None else (out, scales, new_residual)


def quantize_fp8(y: torch.Tensor, quant: str, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)`` of ``y`` (``[..., hidden]``) through ``torch.ops.sagellm_comm.quantize_fp8``.

    The quantisation of :func:`sagellm_comm.fused.quantize_fp8_reference`: ``quant`` an FP8 mode (``"fp8"``
    with ``scale``, ``"fp8_per_token"``, ``"fp8_group128"``); ``q`` ``float8_e4m3fn`` shaped like ``y``;
    ``scales`` fp32 (a copy of ``scale``, ``[..., 1]`` or ``[..., hidden // 128]``).  FP8 linear layers that
    quantise their input through this op are what :mod:`sagellm_comm.compile` folds into the fused
    all-reduce + residual + RMSNorm.
    """
    check_is_tensor(y, "y")
    _check_quant_types(quant, scale, none_allowed=False)
    return torch.ops.sagellm_comm.quantize_fp8(y, quant, scale)
