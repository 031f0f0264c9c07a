"""The torch.distributed adapter: one :class:`CommBackend` for Gloo, NCCL, RCCL and HCCL.

What differs between the four kinds is data (:mod:`.engines`).  The adapter's own concerns live beside it:
argument checks and torchrun's variables (:mod:`.checks`), the rendezvous store (:mod:`.rendezvous`),
torch's exceptions as typed errors (:mod:`.translate`), and AVG / list all_to_all on engines that lack
them plus the work handle (:mod:`.emulation`).

Every argument is checked on this rank *before* torch is called, so a rejected call raises a typed error and
leaves tensors and groups untouched (torch does not compare shapes across ranks: see docs/backends.md).
Every blocking step is bounded by the backend's ``timeout``: the rendezvous on every rank, each process
group, and on Gloo each operation (started async, then ``work.wait(timeout)``); device engines enqueue on
the current stream and torch's watchdog applies the same bound.  After ``comm_timeout`` destroy the backend.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.arguments import check_device, check_flag, check_timeout
from sagellm_comm.backend import (
    DEFAULT_TIMEOUT_S,
    CommBackend,
    GroupHandle,
    ReduceOp,
)
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CommError,
    ConfigMismatchError,
    GroupInvalidError,
    GroupNotFoundError,
    InvalidArgumentError,
    NotInitializedError,
    RankMismatchError,
    ShapeMismatchError,
    run_every,
    undo_after_failure,
)
from sagellm_comm.registry import register_builtin_backend

from .checks import (
    check_all_to_all_lists,
    check_disjoint,
    check_dtype,
    check_flat,
    check_group_ranks,
    check_in_place_or_disjoint,
    check_list,
    check_list_in_place_or_disjoint,
    check_op,
    check_outputs_disjoint,
    check_peer,
    check_tensor,
    check_world,
    int_arg,
    seconds,
)
from .emulation import Reduction, TorchWork, packed_all_to_all, reduction
from .engines import ALL_GATHER_FLAT, ENGINES, REDUCE_SCATTER_FLAT, capturing, pick_device
from .rendezvous import init_world, store_calls
from .translate import translate

__all__ = ["TorchDistributedBackend"]

log = logging.getLogger("sagellm_comm")


ENGINE_RELEASE_S = 0.01  # destroy(): time the engine's threads get to release a finished collective's tensors


def _ranks_by_value(values: list[Any], key: Callable[[Any], Any]) -> dict[Any, list[int]]:
    """What each rank gave (``values[rank]``, made hashable by ``key``) -> the ranks that gave it, in rank order:
    one entry when every rank agrees."""
    ranks: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        ranks.setdefault(key(value), []).append(rank)
    return ranks


class TorchDistributedBackend(CommBackend):
    """:class:`CommBackend` on torch.distributed for the kinds in :data:`ENGINES`.

    Args:
        kind: ``"gloo"``, ``"nccl"``, ``"rccl"`` or ``"hccl"``.
        device: override the device tensors must live on (default: CPU for Gloo, else
            ``<type>:<LOCAL_RANK % device_count>``, made current at init; a negative ``LOCAL_RANK`` is refused).
    """

    def __init__(self, kind: str = "gloo", *, device: str | torch.device | None = None):
        if kind not in ENGINES:
            raise BackendNotSupportedError(
                f"TorchDistributedBackend runs {', '.join(ENGINES)}, not {kind!r}", details={"kind": kind}
            )
        self.engine = ENGINES[kind]
        self.engine.require()
        self.kind = kind
        self._device_override = check_device(device) if device is not None else None
        # Every group released so far (release_group, destroy): releasing one again leaves it as it is.
        self._released_handles: weakref.WeakSet[GroupHandle] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._destroyed = getattr(self, "_initialized", False) or getattr(self, "_destroyed", False)
        self._initialized = False
        self._rank = self._world_size = -1
        self._device: torch.device | None = None
        self._world: GroupHandle | None = None
        self._groups: list[GroupHandle] = []
        self._owns_world = False
        self._store: Any = None
        self._store_address: tuple[str, int] | None = None  # None: a local store, or a world made by the caller
        self.timeout = DEFAULT_TIMEOUT_S

    # ------------------------------------------------------------------ lifecycle
    def init(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        local_rank: int | None = None,
    ) -> TorchDistributedBackend:
        """Join the world; missing arguments come from torchrun's env (read, never written).

        If torch.distributed's default group already exists (the caller made it), it is adopted
        after checking rank and world size, and :meth:`destroy` leaves it alone.  A world of one
        needs no address.  Raises ``comm_timeout`` when not every rank joins within ``timeout``.
        """
        timeout = check_timeout(timeout)
        rank, world_size = check_world(rank, world_size)
        local_rank = int_arg(local_rank, "LOCAL_RANK", "local_rank", default=rank)
        if local_rank < 0:  # the device index would wrap to another rank's device (-1: the last one)
            raise InvalidArgumentError(
                f"local_rank (or $LOCAL_RANK) must be >= 0, got {local_rank}", details={"local_rank": local_rank}
            )
        if self._initialized:
            if (rank, world_size) != (self._rank, self._world_size):
                raise RankMismatchError(
                    f"backend already initialised as rank {self._rank}/{self._world_size}, "
                    f"asked for {rank}/{world_size}; destroy() it first"
                )
            return self
        self.timeout = timeout
        if dist.is_initialized():
            self._adopt_world(rank, world_size)
        else:
            self._create_world(rank, world_size, master_addr, master_port)
        self._rank, self._world_size = rank, world_size
        try:  # past this point the world exists: undo it if the rest fails
            self._device = self._device_override
            if self._device is None:
                self._device = pick_device(self.engine, local_rank)
            cpu = dist.group.WORLD if self.engine.host_blocking else self._gloo_group(range(world_size))
            self._check_same_kind(cpu, world_size)
        except Exception as exc:
            error = self._translate(exc, "init (device, cpu group, backend kinds)", timeout)
            # init's own failure is the one to report
            undo_after_failure([self._teardown, self._reset], log, "sagellm-comm init: releasing the half-made world")
            raise error from exc
        self._world = GroupHandle(tuple(range(world_size)), rank, dist.group.WORLD, cpu)
        self._initialized, self._destroyed = True, False
        return self

    def _check_same_kind(self, cpu_group: Any, world_size: int) -> None:
        """Every rank of the world runs this kind (``"auto"`` is resolved on each rank, by what each can run).

        Ranks of two kinds would pair one kind's set-up exchanges or collectives with the other's: a wait until the
        timeout, or wrong results.  One exchange over the world's CPU side finds it first, and every rank raises
        :class:`ConfigMismatchError` naming each rank's kind."""
        if world_size == 1:
            return
        kinds: list[Any] = [None] * world_size
        dist.all_gather_object(kinds, self.name, group=cpu_group)
        sides = _ranks_by_value(kinds, str)
        if len(sides) == 1:
            return
        said = "; ".join(f"{kind} on ranks {ranks}" for kind, ranks in sides.items())
        raise ConfigMismatchError(
            f"init: the ranks of the world run different backend kinds ({said}); every rank must run the same kind "
            "(a kind that 'auto' chose on one rank may not run on another: name the kind on every rank)",
            details={"settings": {"the backend kind": sides}, "ranks": list(range(world_size)), "where": "init"},
        )

    def _adopt_world(self, rank: int, world_size: int) -> None:
        have = (dist.get_rank(), dist.get_world_size())
        if have != (rank, world_size):
            raise RankMismatchError(
                f"torch.distributed is already initialised as rank {have[0]}/{have[1]}, "
                f"but init was asked for rank {rank}/{world_size}",
                details={"existing": have, "requested": (rank, world_size)},
            )
        running = str(dist.get_backend())
        if self.engine.torch_backend not in running:
            raise BackendNotSupportedError(
                f"the existing default process group runs {running!r}; backend {self.kind!r} "
                f"needs {self.engine.torch_backend!r}"
            )
        self._owns_world = False

    def _create_world(self, rank: int, world_size: int, addr: str | None, port: int | None) -> None:
        self._store, self._store_address = init_world(self.engine.torch_backend, rank, world_size, addr, port,
                                                      self.timeout, self._translate)  # fmt: skip
        self._owns_world = True

    def _gloo_group(self, ranks: Sequence[int]) -> Any:
        with store_calls(self._store_address, f"new_group({list(ranks)}) (its Gloo side)", self.timeout):
            return dist.new_group(list(ranks), timeout=seconds(self.timeout), backend="gloo")

    def destroy(self) -> None:
        """As :meth:`CommBackend.destroy`.  Every step runs even when one raises (each group's release, the reset
        of this object, forgetting the op registry's generated names); the backend is destroyed all the same and
        the first failure is then raised as a typed error."""
        if not self._initialized:
            return
        timeout = self.timeout
        try:
            run_every([self._teardown, self._reset, self._let_engine_threads_release, self._forget_generated_names])
        except Exception as exc:
            raise self._translate(exc, "destroy", timeout) from exc

    @staticmethod
    def _let_engine_threads_release() -> None:
        # An engine thread that finished a collective may still hold its tensors; when the caller has already
        # dropped them in Python (a custom op returns its result that way), releasing them takes the GIL.  Give
        # such a thread the GIL now: a thread still waiting for it when the interpreter finalizes is ended by
        # Python, and the C++ runtime aborts the process ("terminate called without an active exception").
        time.sleep(ENGINE_RELEASE_S)

    def _forget_generated_names(self, handles: Sequence[GroupHandle] | None = None) -> None:
        """Unregister the op registry's generated names of this backend's groups (``handles``: of those sub-groups
        only): the registry would otherwise keep each group, and with it its process groups' sockets and threads."""
        ops = sys.modules.get("sagellm_comm.ops")  # the op registry's names exist only once it is imported
        if ops is not None:
            ops.forget_generated_names(self, handles)

    def _teardown(self) -> None:
        """Release the process groups this backend made: every one, whichever raises (the first error is raised)."""
        releases: list = []
        if self._owns_world:
            if dist.is_initialized():
                releases.append(lambda: dist.destroy_process_group())  # also frees every sub-group made on it
        else:
            for handle in reversed(self._groups):
                for pg in {id(p): p for p in (handle.engine_group, handle.cpu_group) if p is not None}.values():
                    releases.append(functools.partial(_destroy_if_live, pg))
            world_cpu = self._world.cpu_group if self._world is not None else None
            if world_cpu is not dist.group.WORLD:
                releases.append(functools.partial(_destroy_if_live, world_cpu))
        releases.append(functools.partial(self._released_handles.update, self._groups))
        releases.append(self._groups.clear)
        run_every(releases)

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.kind

    @property
    def rank(self) -> int:
        self._check_ready()
        return self._rank

    @property
    def world_size(self) -> int:
        self._check_ready()
        return self._world_size

    @property
    def device(self) -> torch.device:
        self._check_ready()
        return self._device

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def cpu_group(self) -> Any:
        self._check_ready()
        return self._world.cpu_group

    @property
    def world(self) -> GroupHandle:
        """The handle of the whole world (what ``group=None`` means)."""
        self._check_ready()
        return self._world

    # ------------------------------------------------------------------ groups
    def new_group(self, ranks: Sequence[int]) -> GroupHandle:
        """Sub-group of global ``ranks`` (sorted: group rank i is the i-th smallest). Every rank of
        the world must call it with the same ranks; non-members get a handle with ``rank == -1``."""
        self._group(None)  # initialised, and its world not released
        members = check_group_ranks(ranks, self._world_size)
        self._check_same_members(members)
        what = f"new_group({list(members)})"
        try:
            with store_calls(self._store_address, what, self.timeout):
                engine_pg = dist.new_group(list(members), timeout=seconds(self.timeout))
        except Exception as exc:
            raise self._translate(exc, what, self.timeout) from exc
        try:
            cpu_pg = engine_pg if self.engine.host_blocking else self._gloo_group(members)
        except Exception as exc:  # the engine's group is made: release it, or it stays held for the process's life
            error = self._translate(exc, f"{what}: its Gloo side", self.timeout)
            undo_after_failure(
                [functools.partial(_destroy_if_live, engine_pg)],
                log,
                f"sagellm-comm {what}: releasing the engine group",
            )
            raise error from exc
        is_member = self._rank in members
        handle = GroupHandle(
            members,
            members.index(self._rank) if is_member else -1,
            engine_pg if is_member else None,
            cpu_pg if is_member else None,
        )
        self._groups.append(handle)
        return handle

    @property
    def groups(self) -> tuple[GroupHandle, ...]:
        """The sub-groups this backend made and has not released (members' and non-members' handles), in the
        order they were made: :meth:`new_group` adds one, :meth:`release_group` and :meth:`destroy` remove them."""
        return tuple(self._groups)

    def release_group(self, group: Any) -> None:
        """As :meth:`CommBackend.release_group`: destroys the group's process groups (the engine's and its Gloo
        side) with ``torch.distributed.destroy_process_group`` and forgets the handle."""
        handle = self._releasable(group)
        if handle is None:
            return
        what = f"release_group({list(handle.ranks)})"
        try:
            self._release_groups([handle])
        except Exception as exc:
            raise self._translate(exc, what, self.timeout) from exc

    def _releasable(self, group: Any) -> GroupHandle | None:
        """The handle ``group`` names when it is one of this backend's live sub-groups; None when it was released
        already (by :meth:`release_group` or :meth:`destroy`, whose world is gone); a typed error otherwise."""
        handle = getattr(group, "handle", group)  # a CommGroup carries its GroupHandle
        if handle is None or (self._initialized and handle is self._world):
            raise InvalidArgumentError(
                "release_group: the world is not a sub-group; destroy() the backend to release it",
                details={"backend": self.name},
            )
        if not isinstance(handle, GroupHandle):
            raise InvalidArgumentError(f"release_group takes a group from new_group(), got {type(group).__name__}")
        if handle in self._released_handles or not self._initialized:
            return None
        if not any(handle is h for h in self._groups):
            raise GroupNotFoundError(
                f"release_group: the group over ranks {list(handle.ranks)} was not made by this backend",
                details={"group_ranks": list(handle.ranks), "backend": self.name},
            )
        return handle

    def _groups_since(self, first: GroupHandle) -> list[GroupHandle]:
        """``first`` and every group this backend made after it, in the order they were made."""
        index = next(i for i, handle in enumerate(self._groups) if handle is first)
        return self._groups[index:]

    def _release_groups(self, handles: Sequence[GroupHandle]) -> None:
        """Destroy the process groups of ``handles`` (latest first) and forget them: a call on one then raises
        ``GroupNotFoundError``.  For :meth:`release_group`, and a sub-group whose set-up failed after torch made it;
        every release runs whatever another raised, and the first error is raised then."""
        released = {id(handle) for handle in handles}
        self._groups[:] = [handle for handle in self._groups if id(handle) not in released]
        self._released_handles.update(handles)
        releases = [functools.partial(self._forget_generated_names, handles)]
        for handle in reversed(handles):
            for pg in {id(p): p for p in (handle.engine_group, handle.cpu_group) if p is not None}.values():
                releases.append(functools.partial(_destroy_if_live, pg))
        run_every(releases)

    def _check_same_members(self, members: tuple[int, ...]) -> None:
        """Every rank of the world asked for the same group, before torch makes one.

        torch names a new group by how many groups this process made before it, so ranks that ask for different
        members (or make their groups in different orders) would share one group's rendezvous keys: the groups
        then connect the wrong ranks, fail later or wait out the timeout.  One exchange over the world's Gloo
        side (bounded by the backend's timeout) finds it first, and every rank raises."""
        if self._world_size == 1:
            return
        asked: list[Any] = [None] * self._world_size
        try:
            dist.all_gather_object(asked, list(members), group=self._world.cpu_group)
        except Exception as exc:
            what = f"new_group({list(members)}): comparing the members every rank asked for"
            raise self._translate(exc, what, self.timeout) from exc
        by_members = _ranks_by_value(asked, tuple)
        if len(by_members) > 1:
            said = "; ".join(f"{list(m)} on ranks {r}" for m, r in by_members.items())
            raise GroupInvalidError(
                f"new_group: the ranks of the world asked for different groups ({said}); every rank must make the "
                "same groups in the same order (non-members too)",
                details={"asked": {rank: a for rank, a in enumerate(asked)}},
            )

    # ------------------------------------------------------------------ operations
    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(tensor, "tensor")
        self._check_dtype(tensor.dtype, "all_reduce")
        rop = self._check_op(op, tensor.dtype)
        red = self._reduction(rop, g, [tensor], [])
        start = lambda: dist.all_reduce(red.outputs[0], red.torch_op, g.engine_group, True)
        return self._run("all_reduce", g, async_op, tensor, red.post, start)

    def all_gather(self, output, tensor, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(tensor, "tensor")
        self._check_dtype(tensor.dtype, "all_gather")
        if isinstance(output, list | tuple):
            out = self._check_list(output, "output", g.world_size, tensor)
            check_outputs_disjoint(out, "all_gather")
            check_list_in_place_or_disjoint(out, tensor, g.rank, "all_gather")
            start = lambda: dist.all_gather(out, tensor, g.engine_group, True)
        else:
            self._check_flat(output, "output", tensor, g.world_size * tensor.numel())
            check_in_place_or_disjoint(output, tensor, g.rank, "all_gather")
            flat_out, flat_in = output.view(-1), tensor.view(-1)
            start = lambda: ALL_GATHER_FLAT(flat_out, flat_in, g.engine_group, True)
        return self._run("all_gather", g, async_op, output, None, start)

    def reduce_scatter(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(output, "output")
        self._check_dtype(output.dtype, "reduce_scatter")
        rop = self._check_op(op, output.dtype)
        if isinstance(input, list | tuple):
            chunks = self._check_list(input, "input", g.world_size, output)
            check_list_in_place_or_disjoint(chunks, output, g.rank, "reduce_scatter")
            red = self._reduction(rop, g, [output], chunks)
            start = lambda: dist.reduce_scatter(red.outputs[0], red.inputs, red.torch_op, g.engine_group, True)
        else:
            self._check_flat(input, "input", output, g.world_size * output.numel())
            check_in_place_or_disjoint(input, output, g.rank, "reduce_scatter")
            red = self._reduction(rop, g, [output], [input])
            flat_out, flat_in = red.outputs[0].view(-1), red.inputs[0].view(-1)
            start = lambda: REDUCE_SCATTER_FLAT(flat_out, flat_in, red.torch_op, g.engine_group, True)
        return self._run("reduce_scatter", g, async_op, output, red.post, start)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(tensor, "tensor")
        self._check_dtype(tensor.dtype, "broadcast")
        root = g.ranks[check_peer(src, g, "src", allow_self=True)]
        return self._run(
            "broadcast", g, async_op, tensor, None, lambda: dist.broadcast(tensor, root, g.engine_group, True)
        )

    def send(self, tensor, dst, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(tensor, "tensor")
        peer = g.ranks[check_peer(dst, g, "dst")]
        work = self._run("send", g, True, None, None, lambda: dist.isend(tensor, peer, g.engine_group))
        return work if async_op else work.wait()

    def recv(self, tensor, src, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        self._check_tensor(tensor, "tensor")
        peer = g.ranks[check_peer(src, g, "src")]
        work = self._run("recv", g, True, tensor, None, lambda: dist.irecv(tensor, peer, g.engine_group))
        return work if async_op else work.wait()

    def barrier(self, group=None, timeout=None):
        g = self._group(group)
        limit = self.timeout if timeout is None else check_timeout(timeout)
        try:  # Gloo's monitored barrier names the ranks that did not arrive
            dist.monitored_barrier(g.cpu_group, timeout=seconds(limit), wait_all_ranks=True)
        except Exception as exc:
            raise self._translate(exc, f"barrier over ranks {list(g.ranks)}", limit) from exc

    def all_to_all(self, output, input, group=None, async_op=False):
        g = self._group(group)
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        n = g.world_size
        if isinstance(input, list | tuple) or isinstance(output, list | tuple):
            if not (isinstance(input, list | tuple) and isinstance(output, list | tuple)):
                raise InvalidArgumentError("all_to_all takes two lists or two tensors, not one of each")
            outs = check_all_to_all_lists(output, input, n, self._device, self.kind)
            self._check_dtype(input[0].dtype, "all_to_all")
            start, unpack = packed_all_to_all(outs, input, g.engine_group)
            return self._run("all_to_all", g, async_op, output, unpack, start)
        else:
            self._check_tensor(input, "input")
            self._check_dtype(input.dtype, "all_to_all")
            self._check_flat(output, "output", input, input.numel())
            if input.dim() == 0 or input.shape[0] % n:
                raise ShapeMismatchError(
                    f"input dim 0 ({tuple(input.shape)}) must split evenly into {n} ranks",
                    details={"shape": tuple(input.shape), "world_size": n},
                )
            check_disjoint(output, input, "all_to_all")
            start = lambda: dist.all_to_all_single(output, input, group=g.engine_group, async_op=True)
        return self._run("all_to_all", g, async_op, output, None, start)

    # ------------------------------------------------------------------ machinery
    def check_capturable(self, what: str, instead: str = "capture with a device engine (nccl)") -> None:
        """Raise :class:`BackendNotSupportedError` if the current stream is capturing a CUDA graph and this
        engine completes on the host (Gloo): before anything is enqueued, so nothing is half-captured."""
        if self.engine.host_blocking and capturing():
            raise BackendNotSupportedError(
                f"a CUDA graph cannot capture {what} on {self.kind} ({self.kind} completes on the host); "
                f"run it eagerly, or {instead}",
                details={"kind": self.kind, "op": what},
            )

    def _run(self, what: str, g: GroupHandle, async_op: bool, result: Any, post, start) -> Any:
        self.check_capturable(what)
        try:
            work = start()
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{what} rejected by {self.kind}: {exc}") from exc
        except Exception as exc:
            raise self._translate(exc, what, self.timeout) from exc
        handle = TorchWork(
            work,
            f"{what} over ranks {list(g.ranks)}",
            result,
            post,
            host_blocking=self.engine.host_blocking,
            timeout=self.timeout,
            translate=self._translate,
        )
        return handle if async_op else handle.wait()

    def _translate(self, exc: BaseException, what: str, timeout: float) -> CommError:
        return translate(exc, what, timeout, self.kind)

    def _check_ready(self) -> None:
        if not self._initialized:
            state = "was destroyed" if self._destroyed else "is not initialised"
            raise NotInitializedError(
                f"backend {self.name!r} {state}: call init(rank=, world_size=, master_addr=, master_port=) first"
            )

    def _group(self, group: Any) -> GroupHandle:
        """The handle ``group`` names (None, or a CommGroup over the whole world: the world), checked: this
        backend's, this rank a member, and not released by torch.distributed behind the backend's back."""
        self._check_ready()
        handle = None if group is None else getattr(group, "handle", group)  # a CommGroup carries its GroupHandle
        if handle is None:
            handle = self._world
        elif not isinstance(handle, GroupHandle):
            raise InvalidArgumentError(f"group must come from new_group(), got {type(group).__name__}")
        elif handle is not self._world and not any(handle is h for h in self._groups):
            raise GroupNotFoundError(
                f"group over ranks {list(handle.ranks)} does not belong to this backend (or was destroyed)"
            )
        elif not handle.is_member:
            raise RankMismatchError(
                f"rank {self._rank} is not a member of the group over ranks {list(handle.ranks)}",
                details={"rank": self._rank, "group_ranks": list(handle.ranks)},
            )
        if not _is_live(handle.engine_group):
            raise self._released(handle)
        return handle

    def _released(self, handle: GroupHandle) -> NotInitializedError:
        """The error of a call on a group torch.distributed released behind this backend's back (its
        ``destroy_process_group``, of the group or of the whole world, called by someone else)."""
        which = "the world" if handle is self._world else f"the group over ranks {list(handle.ranks)}"
        return NotInitializedError(
            f"{which} of backend {self.name!r} was released by torch.distributed.destroy_process_group outside this "
            "backend; destroy() the backend and init() it again (or make the group again)",
            details={"group_ranks": list(handle.ranks)},
        )

    def _check_tensor(self, tensor: Any, what: str) -> None:
        check_tensor(tensor, what, self._device, self.kind)

    def _check_list(self, tensors: Any, what: str, n: int, like: torch.Tensor | None) -> list[torch.Tensor]:
        return check_list(tensors, what, n, like, self._device, self.kind)

    def _check_flat(self, tensor: Any, what: str, like: torch.Tensor, numel: int) -> None:
        check_flat(tensor, what, like, numel, self._device, self.kind)

    def _check_dtype(self, dtype: torch.dtype, what: str) -> None:
        check_dtype(dtype, what, self.kind, self.engine.collective_dtypes)

    def _check_op(self, op: Any, dtype: torch.dtype) -> ReduceOp:
        return check_op(op, dtype, self.kind, self.engine.bitwise_ops)

    def _reduction(
        self, rop: ReduceOp, g: GroupHandle, outputs: list[torch.Tensor], inputs: list[torch.Tensor]
    ) -> Reduction:
        """What the engine runs for ``rop`` (AVG as SUM then divide where the engine lacks it): :func:`reduction`."""
        return reduction(rop, self.engine, g.world_size, outputs, inputs)


def _destroy_if_live(pg: Any) -> None:
    if _is_live(pg):
        dist.destroy_process_group(pg)


def _is_live(pg: Any) -> bool:
    """True while ``pg`` is still registered with torch.distributed (not yet destroyed).  ``get_backend`` looks the
    group up in torch's registry (``get_world_size`` asks the group object itself, which outlives its release)."""
    if pg is None or not dist.is_initialized():
        return False
    try:
        dist.get_backend(pg)
    except (RuntimeError, ValueError):
        return False
    return True


def _available(kind: str) -> bool:
    ENGINES[kind].require()  # raises BackendNotSupportedError naming what is missing
    return True


for _kind, _engine in ENGINES.items():
    register_builtin_backend(
        _kind,
        functools.partial(TorchDistributedBackend, _kind),
        is_available=functools.partial(_available, _kind),
        priority=_engine.priority,
    )
