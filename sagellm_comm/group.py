"""Groups of ranks and the module-level collective entry points.

A :class:`CommGroup` is a backend plus a set of ranks: the whole world (``CommGroup.create``) or a
sub-group of it (``world.new_subgroup([0, 1])``, or ``world.split(tp_size)`` for tensor-parallel
groups).  :class:`CollectiveOps` (and the functions of the same names here) run an operation on a
group, or on the default group set by :func:`init` when ``group`` is None::

    world = sagellm_comm.init(backend="gloo")            # torchrun env, or rank=/world_size=/...
    tp = world.split(2)                                   # ranks {0,1}, {2,3}, ...
    CollectiveOps.all_reduce(x, group=tp)                 # in place over this rank's TP group
    sagellm_comm.destroy()

Ranks passed to a group (``src``, ``dst``, ``new_subgroup`` members) are ranks *of that group*:
``tp.ranks[i]`` is the global rank of group rank ``i``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from sagellm_comm.agreement import agree
from sagellm_comm.arguments import check_int, check_timeout, is_int
from sagellm_comm.backend import (
    AUTO,
    DEFAULT_TIMEOUT_S,
    CommBackend,
    GroupHandle,
    ReduceOp,
    Work,
    get_comm_backend,
)
from sagellm_comm.errors import (
    GroupInvalidError,
    InvalidArgumentError,
    NotInitializedError,
    RankMismatchError,
    run_every,
    undo_after_failure,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CollectiveOps",
    "CommGroup",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "destroy",
    "get_default_backend",
    "get_default_group",
    "init",
    "recv",
    "reduce_scatter",
    "resolve_group",
    "send",
]

log = logging.getLogger("sagellm_comm")


class CommGroup:
    """A set of ranks served by one :class:`CommBackend`.

    Attributes:
        backend: the backend that runs this group's operations.
        handle: the backend's :class:`GroupHandle`, or None for the whole world.

    ``released_with``: other sub-groups of ``backend`` that :meth:`destroy` releases with this one (:meth:`split`
    passes the blocks it made on this rank besides the one it returns).
    """

    def __init__(
        self,
        backend: CommBackend,
        handle: GroupHandle | None = None,
        *,
        owns_backend: bool = False,
        released_with: Sequence[GroupHandle] = (),
    ):
        if not isinstance(backend, CommBackend):
            raise InvalidArgumentError(f"backend must be a CommBackend, got {type(backend).__name__}")
        self.backend = backend
        self.handle = handle
        self._owns_backend = owns_backend
        self._released_with = tuple(released_with)

    @classmethod
    def create(
        cls,
        world_size: int | None = None,
        rank: int | None = None,
        backend: str | CommBackend = AUTO,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> CommGroup:
        """Initialise ``backend`` (a kind, ``"auto"``, or an uninitialised instance) and return the
        world group; :meth:`destroy` then releases the backend too. Blocking rendezvous, bounded by
        ``timeout`` seconds; omitted arguments come from torchrun's environment.  ``kwargs`` are the backend's
        constructor options, for a kind; an instance was constructed already, and options given with one raise
        :class:`InvalidArgumentError` naming them.  An instance already initialised is its initialiser's to
        destroy, so it is refused (:class:`InvalidArgumentError`): ``CommGroup(backend)`` is its world group,
        which leaves it alone."""
        if isinstance(backend, CommBackend):
            if backend.is_initialized:  # the group would destroy a backend its caller initialised and still uses
                raise InvalidArgumentError(
                    f"the {backend.name!r} backend instance is already initialised, and a group made here would "
                    "destroy it with itself; pass an uninitialised instance or a kind, or take its world group "
                    "with CommGroup(backend), which leaves the backend to whoever initialised it",
                    details={"backend": backend.name},
                )
            if kwargs:
                raise InvalidArgumentError(
                    f"backend options {sorted(kwargs)} were given with a {backend.name!r} backend instance, which "
                    "was constructed already; pass them to CommBackend.create(...) or pass the backend's kind "
                    "as a string",
                    details={"options": sorted(kwargs), "backend": backend.name},
                )
            engine = backend
        else:
            engine = get_comm_backend(backend, **kwargs)
        engine.init(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port, timeout=timeout)
        return cls(engine, None, owns_backend=True)

    # ------------------------------------------------------------------ membership
    @property
    def ranks(self) -> tuple[int, ...]:
        """Global ranks of the members; group rank ``i`` is ``ranks[i]``."""
        if self.handle is None:
            return tuple(range(self.backend.world_size))
        return self.handle.ranks

    @property
    def rank(self) -> int:
        """This process's rank in the group (-1 if it is not a member)."""
        return self.backend.rank if self.handle is None else self.handle.rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_member(self) -> bool:
        return self.rank >= 0

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank``."""
        if not is_int(group_rank):
            raise InvalidArgumentError(f"group rank must be an int, got {group_rank!r}")
        group_rank = int(group_rank)  # NumPy's integers as Python's
        if not 0 <= group_rank < self.world_size:
            raise GroupInvalidError(f"group rank {group_rank} is outside [0, {self.world_size - 1}]")
        return self.ranks[group_rank]

    # ------------------------------------------------------------------ sub-groups
    def new_subgroup(self, ranks: Sequence[int]) -> CommGroup:
        """Sub-group of this group's ``ranks`` (group ranks, not global ones).

        Collective over the backend's whole world: every rank of the world calls it with the same
        ``ranks``; non-members get a group with ``is_member == False``.
        """
        try:
            members = None if isinstance(ranks, str) else list(ranks)
        except TypeError:  # an int, a float, None
            members = None
        if not members:
            raise GroupInvalidError(f"sub-group ranks must be a non-empty list of ints, got {ranks!r}")
        global_ranks = [self.global_rank(r) for r in members]  # each an int of this group, or a typed error
        if len(set(global_ranks)) != len(global_ranks):
            raise GroupInvalidError(f"sub-group ranks {members} contain duplicates")
        return CommGroup(self.backend, self.backend.new_group(global_ranks))

    def split(self, group_size: int) -> CommGroup:
        """Cut this group into consecutive blocks of ``group_size`` ranks (tensor-parallel groups) and return the
        block holding this rank (a rank outside this group gets the last block, with ``is_member == False``).
        Collective: every rank of the world calls it.

        Every block is made on every rank, in order, and after each one the ranks of the world agree on whether
        its set-up succeeded everywhere (:func:`sagellm_comm.agreement.agree`: one all-reduce of ``world_size``
        integers over the world).  One agreement per block, not one at the end: a block's set-up is collective over
        the world, so a rank whose set-up failed could neither skip ahead to a final agreement (it would meet the
        others' next set-up) nor safely go on with the next blocks (its failure may leave the block's other members
        waiting in the set-up until the timeout, or its torch.distributed group count apart from theirs).  When a
        set-up failed on any rank, every rank releases the blocks it made (:meth:`CommBackend.release_group`) and
        raises the same typed error, naming the block, its ranks and the failed ranks with their error codes and
        messages (``details``: ``block``, ``block_ranks``, ``failed_ranks``, ``messages``); a failed rank raises it
        from its own error.  Every wait is bounded by the backend's timeout."""
        if not is_int(group_size) or group_size < 1:
            raise GroupInvalidError(f"group_size must be a positive int, got {group_size!r}")
        group_size = int(group_size)  # NumPy's integers as Python's
        if self.world_size % group_size:
            raise GroupInvalidError(f"group of {self.world_size} ranks cannot be split into blocks of {group_size}")
        made: list[CommGroup] = []
        for index, start in enumerate(range(0, self.world_size, group_size)):
            block_ranks = list(self.ranks[start : start + group_size])
            what = f"split({group_size}): the set-up of block {index} (ranks {block_ranks})"
            try:
                failure = None
                try:
                    made.append(self.new_subgroup(range(start, start + group_size)))
                except Exception as exc:  # every rank hears of it from agree(), and raises the same error
                    failure = exc
                agree(self.backend, failure, what, {"block": index, "block_ranks": block_ranks})
            except BaseException:  # the block's failure or the agreement's is the error: a failed release is logged
                releases = [partial(self.backend.release_group, block.handle) for block in reversed(made)]
                undo_after_failure(releases, log, f"sagellm-comm {what}: releasing the blocks made so far")
                raise
        mine = next((block for block in made if block.is_member), made[-1])
        # The other blocks' handles here hold nothing but their place in the backend's records: released with this one.
        return CommGroup(self.backend, mine.handle, released_with=[block.handle for block in made if block is not mine])

    # ------------------------------------------------------------------ operations (see CommBackend)
    def all_reduce(self, tensor, op=ReduceOp.SUM, async_op=False):
        return self.backend.all_reduce(tensor, op, self, async_op)

    def all_gather(self, output, tensor, async_op=False):
        return self.backend.all_gather(output, tensor, self, async_op)

    def reduce_scatter(self, output, input, op=ReduceOp.SUM, async_op=False):
        return self.backend.reduce_scatter(output, input, op, self, async_op)

    def broadcast(self, tensor, src=0, async_op=False):
        return self.backend.broadcast(tensor, src, self, async_op)

    def send(self, tensor, dst, async_op=False):
        return self.backend.send(tensor, dst, self, async_op)

    def recv(self, tensor, src, async_op=False):
        return self.backend.recv(tensor, src, self, async_op)

    def barrier(self, timeout: float | None = None) -> None:
        self.backend.barrier(self, timeout)

    def all_to_all(self, output, input, async_op=False):
        return self.backend.all_to_all(output, input, self, async_op)

    # ------------------------------------------------------------------ lifecycle
    def destroy(self) -> None:
        """Release what this group holds on this rank (idempotent): the backend if this group created it
        (``CommGroup.create``); a sub-group (``new_subgroup``, ``split``) through
        :meth:`CommBackend.release_group`, its process groups and whatever else the backend made for it (every rank
        of the world destroys it, as every rank made it; later calls on it raise ``GroupNotFoundError``), and a block
        of :meth:`split` the other blocks that split made on this rank; nothing for a world group over a backend its
        caller initialised.  A sub-group outlives neither its backend nor ``sagellm_comm.destroy()``, which release
        it too.  Every release runs when one raises; the first error is raised after them."""
        if self._owns_backend:
            self.backend.destroy()
        elif self.handle is not None and self.backend.is_initialized:
            run_every([partial(self.backend.release_group, handle) for handle in (self.handle, *self._released_with)])

    def __enter__(self) -> CommGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        if not self.backend.is_initialized:
            return f"CommGroup(backend={self.backend.name!r}, destroyed)"
        return f"CommGroup(backend={self.backend.name!r}, ranks={list(self.ranks)}, rank={self.rank})"


# ====================================================================== default group

_DEFAULT: CommGroup | None = None
_DEFAULT_KIND: str | None = None  # the backend kind init was asked for when it made _DEFAULT
_DEFAULT_TIMEOUT: float | None = None  # the timeout init made _DEFAULT with
_DEFAULT_OPTIONS: dict[str, Any] = {}  # the backend options init made _DEFAULT with
_DEFAULT_LOCK = threading.Lock()


def current_default_group() -> CommGroup | None:
    """The default group :func:`init` made, or None; nothing checked (not even that its backend is still
    initialised): for a hot path's identity test.  :func:`get_default_group` otherwise."""
    return _DEFAULT


def init(
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    backend: str | CommBackend = AUTO,
    timeout: float | None = None,
    **kwargs: Any,
) -> CommGroup:
    """Initialise the process-wide default group (what ``group=None`` means in :class:`CollectiveOps`).

    ``timeout``: seconds that bound the rendezvous and every blocking operation of the group (None:
    ``DEFAULT_TIMEOUT_S``, 30 s).  Returns the world :class:`CommGroup`. Calling it again while initialised
    returns the same group when the arguments agree (an argument left out agrees with anything):
    ``comm_rank_mismatch`` when rank or world size differ, ``invalid_argument`` when ``backend`` names another
    backend (``"auto"`` names the one running), ``timeout`` differs from the one the group was made with, or a
    backend option (``**kwargs``) differs from the one it was made with or was not given then.  A group's timeout
    and options are fixed when it is made (the engine's process groups keep them), so new ones take
    :func:`destroy` first.  ``master_addr`` and ``master_port`` serve the rendezvous that makes the group: a call
    that finds the group made does not read them.
    """
    global _DEFAULT, _DEFAULT_KIND, _DEFAULT_TIMEOUT, _DEFAULT_OPTIONS
    if timeout is not None:
        timeout = check_timeout(timeout)
    if rank is not None:
        rank = check_int(rank, "rank")  # its range is the backend's check (comm_rank_mismatch)
    if world_size is not None:
        world_size = check_int(world_size, "world_size")
    with _DEFAULT_LOCK:
        if _DEFAULT is not None and _DEFAULT.backend.is_initialized:
            have = (_DEFAULT.backend.rank, _DEFAULT.backend.world_size)
            if (rank is not None and rank != have[0]) or (world_size is not None and world_size != have[1]):
                raise RankMismatchError(
                    f"default group already initialised as rank {have[0]}/{have[1]}, asked for "
                    f"{rank}/{world_size}; call sagellm_comm.destroy() first"
                )
            _check_same_backend(backend, _DEFAULT.backend, _DEFAULT_KIND)
            if timeout is not None and timeout != _DEFAULT_TIMEOUT:
                raise InvalidArgumentError(
                    f"default group already initialised with timeout {_DEFAULT_TIMEOUT:g}s, asked for {timeout:g}s; "
                    "call sagellm_comm.destroy() first to change the timeout",
                    details={"running": _DEFAULT_TIMEOUT, "requested": timeout},
                )
            differ = sorted(
                k for k, v in kwargs.items() if k not in _DEFAULT_OPTIONS or not _same(v, _DEFAULT_OPTIONS[k])
            )
            if differ:
                made = ", ".join(f"{k}={_DEFAULT_OPTIONS[k]!r}" if k in _DEFAULT_OPTIONS else f"{k} not given"
                                 for k in differ)  # fmt: skip
                asked = ", ".join(f"{k}={kwargs[k]!r}" for k in differ)
                raise InvalidArgumentError(
                    f"default group already initialised with {made}, asked for {asked}; call sagellm_comm.destroy() "
                    "first to change the backend's options",
                    details={"options": differ},
                )
            return _DEFAULT
        made_with = DEFAULT_TIMEOUT_S if timeout is None else timeout
        _DEFAULT = CommGroup.create(
            world_size=world_size,
            rank=rank,
            backend=backend,
            master_addr=master_addr,
            master_port=master_port,
            timeout=made_with,
            **kwargs,
        )
        _DEFAULT_KIND, _DEFAULT_TIMEOUT, _DEFAULT_OPTIONS = _kind_key(backend), made_with, dict(kwargs)
        return _DEFAULT


def _same(asked: Any, made: Any) -> bool:
    """Whether a backend option asked for again is the one the default group was made with: the same object, or
    an equal value of the same type (a comparison that raises or gives no single truth value is a difference)."""
    if asked is made:
        return True
    if type(asked) is not type(made):
        return False
    try:
        return bool(asked == made)
    except Exception:  # noqa: BLE001 - e.g. a tensor's elementwise ==: not provably the same option
        return False


def _kind_key(backend: str | CommBackend | None) -> str | None:
    """A backend kind as the registry spells it (``None`` for an instance or a name that is not a string)."""
    if backend is None:
        return AUTO
    return backend.strip().lower() if isinstance(backend, str) else None


def _check_same_backend(requested: str | CommBackend | None, running: CommBackend, kind: str | None) -> None:
    """``requested`` (init's ``backend``) names ``running``, the default group's backend, which init made when
    asked for ``kind``: the same instance, ``"auto"``, its name or ``kind``.  Otherwise the caller would get a
    group on a backend it did not ask for."""
    if requested is running:
        return
    if isinstance(requested, CommBackend):
        name, asked = requested.name, f"another {requested.name!r} backend instance"
    else:
        key = _kind_key(requested)
        if key is not None and key in (AUTO, running.name, kind):
            return
        name = key if key is not None else repr(requested)
        asked = repr(name)
    raise InvalidArgumentError(
        f"default group already initialised on backend {running.name!r}, asked for {asked}; call "
        "sagellm_comm.destroy() first to change backends",
        details={"running": running.name, "requested": name},
    )


def get_default_group() -> CommGroup:
    """The group set by :func:`init`; raises ``comm_not_initialized`` before it."""
    if _DEFAULT is None or not _DEFAULT.backend.is_initialized:
        raise NotInitializedError("no default group: call sagellm_comm.init(...) first")
    return _DEFAULT


def get_default_backend() -> CommBackend:
    """The backend of the default group; raises ``comm_not_initialized`` before :func:`init`."""
    return get_default_group().backend


def destroy() -> None:
    """Release the default group and its backend (idempotent)."""
    global _DEFAULT, _DEFAULT_KIND, _DEFAULT_TIMEOUT, _DEFAULT_OPTIONS
    with _DEFAULT_LOCK:
        group, _DEFAULT, _DEFAULT_KIND, _DEFAULT_TIMEOUT, _DEFAULT_OPTIONS = _DEFAULT, None, None, None, {}
    if group is not None:
        group.destroy()


def resolve_group(group: CommGroup | str | None = None, member: bool = False) -> CommGroup:
    """The one place that turns a ``group`` argument into a :class:`CommGroup`.

    ``None``: the default group (:func:`init`; ``comm_not_initialized`` before it); a :class:`CommGroup`:
    itself; a ``str``: the group registered under that name with :func:`sagellm_comm.ops.register_group`
    (``"default"``: the default group; :class:`GroupNotFoundError` for an unknown name).  Anything else raises
    :class:`InvalidArgumentError`.  ``member``: this rank must be one of the group's ranks
    (:class:`InvalidArgumentError` otherwise), as everything built on the group's members only requires.
    """
    if group is None:
        resolved = get_default_group()
    elif isinstance(group, CommGroup):
        resolved = group
    elif isinstance(group, str):
        from sagellm_comm.ops import registered_group

        found = registered_group(group)
        resolved = get_default_group() if found is None else found
    else:
        raise InvalidArgumentError(f"group must be a CommGroup, a registered name or None, got {type(group).__name__}")
    if member and not resolved.is_member:
        raise InvalidArgumentError(
            f"this rank is not a member of group {group!r} (ranks {list(resolved.ranks)}); build it on the group's "
            "members only"
        )
    return resolved


# ====================================================================== entry points


def all_reduce(tensor, op=ReduceOp.SUM, group: CommGroup | None = None, async_op: bool = False):
    """In place over ``group`` (default group if None); returns ``tensor`` or a :class:`Work`."""
    return resolve_group(group).all_reduce(tensor, op, async_op)


def all_gather(output, tensor, group: CommGroup | None = None, async_op: bool = False):
    """``output``: list of ``world_size`` tensors like ``tensor``, or one flat tensor (rank-major)."""
    return resolve_group(group).all_gather(output, tensor, async_op)


def reduce_scatter(output, input, op=ReduceOp.SUM, group: CommGroup | None = None, async_op: bool = False):
    """``output`` receives chunk ``group.rank`` of the reduction of every rank's ``input``."""
    return resolve_group(group).reduce_scatter(output, input, op, async_op)


def broadcast(tensor, src: int = 0, group: CommGroup | None = None, async_op: bool = False):
    """Copy group rank ``src``'s ``tensor`` to every rank, in place."""
    return resolve_group(group).broadcast(tensor, src, async_op)


def send(tensor, dst: int, group: CommGroup | None = None, async_op: bool = False) -> None | Work:
    """Send ``tensor`` to group rank ``dst``."""
    return resolve_group(group).send(tensor, dst, async_op)


def recv(tensor, src: int, group: CommGroup | None = None, async_op: bool = False):
    """Receive into ``tensor`` from group rank ``src``."""
    return resolve_group(group).recv(tensor, src, async_op)


def barrier(group: CommGroup | None = None, timeout: float | None = None) -> None:
    """Block until every rank of ``group`` arrives; ``comm_timeout`` names the ranks that did not."""
    resolve_group(group).barrier(timeout)


def all_to_all(output, input, group: CommGroup | None = None, async_op: bool = False):
    """Rank i's ``input[j]`` lands in rank j's ``output[i]`` (lists, or tensors split on dim 0)."""
    return resolve_group(group).all_to_all(output, input, async_op)


class CollectiveOps:
    """Namespace of the entry points above: ``CollectiveOps.all_reduce(t, op=..., group=g)``."""

    all_reduce = staticmethod(all_reduce)
    all_gather = staticmethod(all_gather)
    reduce_scatter = staticmethod(reduce_scatter)
    broadcast = staticmethod(broadcast)
    send = staticmethod(send)
    recv = staticmethod(recv)
    barrier = staticmethod(barrier)
    all_to_all = staticmethod(all_to_all)
