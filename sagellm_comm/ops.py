"""Collectives as torch custom ops, so ``torch.compile`` traces them and CUDA graphs capture them.

``torch.compile`` cannot take a :class:`~sagellm_comm.group.CommGroup` as an operator argument, so the
ops take a *group name* (a string, a constant in the traced graph) and look the group up in a small
process-local registry at run time::

    from sagellm_comm import ops

    name = ops.register_group(tp_group, "tp")            # or ops.group_name(tp_group): a generated name
    y = torch.ops.sagellm_comm.all_reduce(x, "tp")       # == ops.all_reduce(x, "tp")

The registry name ``"default"`` always means the group set by :func:`sagellm_comm.init`.

Ops (namespace ``sagellm_comm``; both functional: they return a new tensor and never modify their input):

* ``all_reduce(Tensor tensor, str group_name, str op="sum") -> Tensor``: same shape and dtype as
  ``tensor``, contiguous; every rank of the group gets the reduction.
* ``all_gather(Tensor tensor, str group_name, int world_size) -> Tensor``: every rank's ``tensor``
  stacked rank-major along dim 0: shape ``[world_size * tensor.shape[0], *tensor.shape[1:]]``.
  ``world_size`` is an argument (checked against the group at run time) so the fake implementation
  can compute the output shape without touching the registry.

Both dispatch to the group's backend: the custom Triton kernels where the backend is ``custom`` and
they are active (SUM on the world group), the engine otherwise.  On device engines the result is
enqueued on the current stream and the call returns before completion (stream semantics); on Gloo it
returns once the data is reduced.  Each op has a fake (meta) implementation, so FakeTensor tracing,
AOTAutograd and ``torch.compile(fullgraph=True)`` see shapes without communicating.

The ops are forward-only (inference): no autograd formula is registered, and a backward through
them raises torch's "no autograd" error.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING

import torch

from sagellm_comm.backend import ReduceOp
from sagellm_comm.errors import GroupNotFoundError, InvalidArgumentError, ShapeMismatchError

if TYPE_CHECKING:
    from sagellm_comm.group import CommGroup

__all__ = [
    "DEFAULT_GROUP_NAME",
    "all_gather",
    "all_reduce",
    "group_name",
    "list_groups",
    "register_group",
    "resolve_group",
    "unregister_group",
]

DEFAULT_GROUP_NAME = "default"
"""Registry name that resolves to :func:`sagellm_comm.get_default_group` at call time."""

_GROUPS: dict[str, CommGroup] = {}
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
    """
    from sagellm_comm.group import CommGroup

    if not isinstance(group, CommGroup):
        raise InvalidArgumentError(f"register_group needs a CommGroup, got {type(group).__name__}")
    with _LOCK:
        if name is None:
            for known, value in _GROUPS.items():
                if value is group:
                    return known
            ranks = "-".join(str(r) for r in group.ranks)
            name = f"g{next(_COUNTER)}_ranks{ranks}"
        _check_name(name)
        if name == DEFAULT_GROUP_NAME:
            raise InvalidArgumentError(f"group name {name!r} is reserved for the default group (sagellm_comm.init)")
        bound = _GROUPS.get(name)
        if bound is not None and bound is not group:
            raise InvalidArgumentError(
                f"group name {name!r} is already bound to {bound!r}; call unregister_group({name!r}) first"
            )
        _GROUPS[name] = group
        return name


def unregister_group(name: str) -> None:
    """Forget ``name``; raises :class:`GroupNotFoundError` when it is not registered."""
    with _LOCK:
        if _GROUPS.pop(_check_name(name), None) is None:
            raise GroupNotFoundError(f"no group is registered as {name!r}", details={"name": name})


def list_groups() -> dict[str, CommGroup]:
    """A snapshot of the registry (name -> group), without the implicit ``"default"``."""
    with _LOCK:
        return dict(_GROUPS)


def registered_group(name: str) -> CommGroup | None:
    """The group registered as ``name``; None for ``"default"`` (the default group, resolved by the caller).

    Raises :class:`InvalidArgumentError` for a name that is not a non-empty str and :class:`GroupNotFoundError`
    (code ``comm_group_not_found``) for an unknown one.  Callers resolve through
    :func:`sagellm_comm.group.resolve_group`.
    """
    _check_name(name)
    if name == DEFAULT_GROUP_NAME:
        return None
    with _LOCK:
        group = _GROUPS.get(name)
        known = sorted(_GROUPS)
    if group is None:
        raise GroupNotFoundError(
            f"no group is registered as {name!r} (registered: {known or 'none'}); "
            "call sagellm_comm.ops.register_group(group, name) on every rank first",
            details={"name": name, "registered": known},
        )
    return group


def resolve_group(name: str) -> CommGroup:
    """The group registered as ``name`` (``"default"``: the default group).

    Raises :class:`GroupNotFoundError` (code ``comm_group_not_found``) for an unknown name, and
    ``comm_not_initialized`` for ``"default"`` before :func:`sagellm_comm.init`.  (A name only: the ops
    pass names; :func:`sagellm_comm.group.resolve_group` also takes a group or None.)
    """
    from sagellm_comm.group import resolve_group as resolve

    return resolve(_check_name(name))


def group_name(group: CommGroup | str | None) -> str:
    """The registry name to pass to the ops for ``group``: None -> ``"default"``, a str is checked
    and returned, a :class:`CommGroup` is registered if needed (see :func:`register_group`)."""
    if group is None:
        return DEFAULT_GROUP_NAME
    if isinstance(group, str):
        return _check_name(group)
    return register_group(group)


# ====================================================================== the ops


@torch.library.custom_op("sagellm_comm::all_reduce", mutates_args=())
def _all_reduce_op(tensor: torch.Tensor, group_name: str, op: str = "sum") -> torch.Tensor:
    group = resolve_group(group_name)
    result = tensor.clone(memory_format=torch.contiguous_format)
    group.all_reduce(result, ReduceOp.parse(op))
    return result


@_all_reduce_op.register_fake
def _all_reduce_fake(tensor: torch.Tensor, group_name: str, op: str = "sum") -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


@torch.library.custom_op("sagellm_comm::all_gather", mutates_args=())
def _all_gather_op(tensor: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    group = resolve_group(group_name)
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
    return tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))


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
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
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
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise InvalidArgumentError("all_gather needs a tensor of at least one dimension (gathers along dim 0)")
    name = group_name(group)
    if world_size is None:
        world_size = resolve_group(name).world_size
    return torch.ops.sagellm_comm.all_gather(tensor, name, world_size)
