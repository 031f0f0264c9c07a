"""The one communication interface of sagellm-comm, and the registry that picks its engine.

Every engine (Gloo, NCCL, RCCL, HCCL over ``torch.distributed``, the intra-node custom kernels, or a
third party's) is a :class:`CommBackend`.  Code above this layer never names an engine: it asks the
registry for a kind (``CommBackend.create("nccl")``, ``get_comm_backend()`` for the best one here)
and calls the operations below, whose names and semantics are torch.distributed's.

The registry (kind -> factory, the ``auto`` choice, lazy import of the built-in adapters) is
:mod:`sagellm_comm.registry`; its public functions are re-exported here.

A third-party backend is one file::

    from sagellm_comm import CommBackend, register_comm_backend

    class MyBackend(CommBackend): ...

    register_comm_backend("mine", MyBackend, is_available=lambda: True, priority=10)
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_comm.arguments import check_timeout
from sagellm_comm.errors import InvalidArgumentError, NotImplementedCommError

# The registry (its own module, which needs nothing from this one at import) is re-exported here.
from sagellm_comm.registry import (
    AUTO,
    get_comm_backend,
    is_comm_backend_available,
    list_comm_backends,
    register_comm_backend,
    resolve_kind,
    unregister_comm_backend,
)

if TYPE_CHECKING:  # torch is heavy; annotations only
    import torch

    from sagellm_comm.registry import AutoChoice

__all__ = [
    "AUTO",
    "CommBackend",
    "CommOp",
    "CompletedWork",
    "GroupHandle",
    "ReduceOp",
    "Work",
    "get_comm_backend",
    "is_comm_backend_available",
    "list_comm_backends",
    "poll_until",
    "register_comm_backend",
    "resolve_kind",
    "unregister_comm_backend",
]

DEFAULT_TIMEOUT_S = 30.0


class ReduceOp(str, enum.Enum):
    """Reduction applied by ``all_reduce`` / ``reduce_scatter``.

    String values are the protocol's (``"sum"``, ``"prod"``, ...), so ``ReduceOp("avg")`` and
    ``ReduceOp.parse("AVG")`` both work.  ``AVG`` needs a floating-point dtype; the bitwise ops
    (``BAND``, ``BOR``, ``BXOR``) need an integer or bool dtype and are not offered by every engine.
    """

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    PRODUCT = "prod"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"
    PROD = "prod"  # alias of PRODUCT (torch spells it PRODUCT, the protocol "prod")

    @classmethod
    def parse(cls, op: ReduceOp | str | Any) -> ReduceOp:
        """Return the :class:`ReduceOp` named by ``op``; never guesses.

        Accepts a ``ReduceOp``, its value or name in any ASCII case (``"sum"``, ``"PRODUCT"``), or a
        ``torch.distributed.ReduceOp``.  Anything else raises :class:`InvalidArgumentError` (an
        unknown op is never silently turned into SUM).
        """
        if isinstance(op, cls):
            return op
        text = op if isinstance(op, str) else None
        if text is None:
            # torch.distributed.ReduceOp.SUM is a RedOpType: it prints as "RedOpType.SUM" / has .name on newer torch;
            # an instance of torch.distributed.ReduceOp (``ReduceOp(ReduceOp.MAX)``) holds its RedOpType as .op
            if type(op).__name__ == "ReduceOp" and hasattr(op, "op"):
                op = op.op
            text = getattr(op, "name", None) or str(op).rsplit(".", 1)[-1]
        key = str(text).strip()
        # ASCII only: Unicode case mapping would take "ſum" for SUM ("ſ".upper() == "S") and "mın" for MIN
        for member in cls if key.isascii() else ():
            if key.lower() == member.value or key.upper() == member.name:
                return member
        valid = ", ".join(m.name for m in cls if m.name != "PROD")
        raise InvalidArgumentError(f"unsupported reduce op {op!r}; expected one of {valid}", details={"op": repr(op)})

    @property
    def is_bitwise(self) -> bool:
        return self in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise :class:`InvalidArgumentError` where this reduction is not defined for ``dtype`` on any backend:
        ``AVG`` on an integer or bool dtype, a bitwise op on a floating-point or complex one."""
        floating = dtype.is_floating_point or dtype.is_complex
        if self is ReduceOp.AVG and not floating:
            raise InvalidArgumentError(f"ReduceOp.AVG needs a floating-point dtype, got {dtype}")
        if self.is_bitwise and floating:
            raise InvalidArgumentError(f"ReduceOp.{self.name} needs an integer or bool dtype, got {dtype}")


CommOp = ReduceOp
"""Alias kept for users of the seed package, whose enum was called ``CommOp``."""


EVENT_SPIN_S = 2e-3  # poll_until polls without a pause for this long: a kernel ends in microseconds
EVENT_POLL_S = 2e-4  # then it sleeps this long between polls


def poll_until(done: Callable[[], bool], limit: float, timed_out: Callable[[], Exception],
               each: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Return once ``done()`` is true (a CUDA event's ``query``), polling without a pause for ``EVENT_SPIN_S``, then
    every ``EVENT_POLL_S``; ``each()`` runs at every poll that found it not done (to report a failure at once);
    raise ``timed_out()`` once ``limit`` seconds have passed.  The host wait of a :class:`Work` with a deadline."""
    start = time.monotonic()
    while not done():
        if each is not None:
            each()
        now = time.monotonic()
        if now - start > limit:
            raise timed_out()
        if now - start > EVENT_SPIN_S:
            time.sleep(EVENT_POLL_S)


class Work(ABC):
    """Handle of an operation started with ``async_op=True``.

    ``wait()`` returns once the operation's result may be used by the caller: on Gloo (CPU) the data
    is in place; on device engines (NCCL/RCCL/HCCL) the caller's current stream is ordered after the
    collective, as with torch.distributed.  ``wait`` raises :class:`~sagellm_comm.errors.CommTimeoutError`
    (code ``comm_timeout``) when the operation does not finish within ``timeout`` seconds (the
    backend's timeout when ``None``) and the engine's failure as a typed :class:`CommError`.
    """

    @abstractmethod
    def wait(self, timeout: float | None = None) -> Any:
        """Block until done (see class doc); returns the operation's result (tensor, list or None)."""

    @abstractmethod
    def is_completed(self) -> bool:
        """Non-blocking: True once the operation finished (successfully or not); after a success its result may
        be used as after :meth:`wait`."""


class CompletedWork(Work):
    """A :class:`Work` that is already done (an operation that needed no communication)."""

    def __init__(self, result: Any = None):
        self._result = result

    def wait(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            check_timeout(timeout)  # refused as every Work's wait refuses it
        return self._result

    def is_completed(self) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class GroupHandle:
    """A sub-group made by :meth:`CommBackend.new_group`.

    Attributes:
        ranks: global ranks of the members, in group-rank order (``ranks[i]`` has group rank ``i``).
        rank: this process's rank inside the group, or -1 when it is not a member.
        engine_group: the engine's own group object (a ``torch.distributed.ProcessGroup`` for the
            torch adapter), or None on non-members.
        cpu_group: a Gloo group over the same ranks for host-side exchanges (None on non-members).
    """

    ranks: tuple[int, ...]
    rank: int
    engine_group: Any = field(default=None, repr=False)
    cpu_group: Any = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_member(self) -> bool:
        return self.rank >= 0


class CommBackend(ABC):
    """One communication engine: collectives and point-to-point transfers on torch tensors.

    Lifecycle: make one with :meth:`create` (or :func:`get_comm_backend`), call :meth:`init` (or
    :meth:`init_process_group`) on every rank, run operations, then :meth:`destroy` (or use the
    backend as a context manager).  Arguments left out of ``init`` come from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``); the environment is
    read, never written.

    Semantics are torch.distributed's: tensors are contiguous and live on :attr:`device`;
    ``all_reduce``/``broadcast``/``recv`` work in place and return the tensor they wrote;
    ``async_op=True`` returns a :class:`Work` instead.  ``group`` is a :class:`GroupHandle` from
    :meth:`new_group` (None: the whole world); ``src``/``dst`` are ranks *inside* ``group`` (equal
    to global ranks when ``group`` is None).  Every argument is checked before the engine is called,
    so a rejected call leaves tensors and groups untouched.  Every blocking call is bounded by the
    backend's ``timeout`` and fails with ``comm_timeout`` instead of hanging.
    """

    #: the registry name this class answers to (set by subclasses)
    kind: str = ""
    #: set by ``create("auto")``: the kind chosen and why better ones were skipped (None otherwise)
    auto_choice: AutoChoice | None = None

    # ------------------------------------------------------------------ registry entry points
    @classmethod
    def create(cls, kind: str = AUTO, **kwargs: Any) -> CommBackend:
        """Build an *uninitialised* backend of ``kind`` (``"auto"``: the best one available here).

        Raises :class:`~sagellm_comm.errors.BackendNotSupportedError` (code ``comm_backend_not_supported``)
        when the kind is unknown or cannot run on this machine; the message says what is missing.  With
        ``"auto"``, :attr:`auto_choice` records why better kinds were skipped (also logged once).
        """
        from sagellm_comm.registry import create_backend

        return create_backend(kind, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    @abstractmethod
    def init(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> CommBackend:
        """Join the world (blocking rendezvous bounded by ``timeout`` seconds); returns ``self``."""

    def init_process_group(
        self,
        world_size: int | None = None,
        rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> CommBackend:
        """Same as :meth:`init`, with torch.distributed's argument order."""
        return self.init(
            rank=rank,
            world_size=world_size,
            master_addr=master_addr,
            master_port=master_port,
            timeout=timeout,
            **kwargs,
        )

    @abstractmethod
    def destroy(self) -> None:
        """Release every group this backend created (idempotent). A world group the caller created
        before :meth:`init` is left alone."""

    def __enter__(self) -> CommBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ properties
    @property
    @abstractmethod
    def name(self) -> str:
        """The kind that really runs (``"gloo"``, ``"nccl"``, ...; never ``"auto"``)."""

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device every tensor passed to this backend must live on."""

    @property
    @abstractmethod
    def is_initialized(self) -> bool: ...

    @property
    @abstractmethod
    def cpu_group(self) -> Any:
        """A Gloo process group over the world for host-side exchanges (hostnames, IPC handles)."""

    # ------------------------------------------------------------------ groups
    @abstractmethod
    def new_group(self, ranks: Sequence[int]) -> GroupHandle:
        """Make a sub-group of the given global ranks. Collective: every rank of the world calls it
        with the same ``ranks``, members or not."""

    def release_group(self, group: GroupHandle) -> None:
        """Release a sub-group made by :meth:`new_group` (its :class:`GroupHandle`, or a ``CommGroup`` over it) on
        this rank: its engine's process groups and whatever else the backend made for it.  A later call on it
        raises :class:`~sagellm_comm.errors.GroupNotFoundError`.  Every rank of the world releases the group, as
        every rank made it (a non-member's handle holds nothing but its place in the backend's records), once no
        call on it is in flight.  A group released already (by this call or :meth:`destroy`) is left as it is; a
        group of another backend raises ``GroupNotFoundError``, the world ``InvalidArgumentError`` (:meth:`destroy`
        releases it).

        This default raises :class:`~sagellm_comm.errors.NotImplementedCommError`: a backend that does not override
        it releases its groups at :meth:`destroy` only."""
        raise NotImplementedCommError(
            f"backend {self.name!r} cannot release one group; destroy() releases all of them",
            details={"backend": self.name},
        )

    # ------------------------------------------------------------------ operations
    @abstractmethod
    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        group: GroupHandle | None = None,
        async_op: bool = False,
    ) -> torch.Tensor | Work:
        """Reduce ``tensor`` across the group, in place; every rank ends with the same values."""

    @abstractmethod
    def all_gather(
        self,
        output: list[torch.Tensor] | torch.Tensor,
        tensor: torch.Tensor,
        group: GroupHandle | None = None,
        async_op: bool = False,
    ) -> list[torch.Tensor] | torch.Tensor | Work:
        """Gather ``tensor`` from every rank into ``output``: a list of ``world_size`` tensors shaped
        like ``tensor``, or one tensor of ``world_size * tensor.numel()`` elements (rank-major)."""

    @abstractmethod
    def reduce_scatter(
        self,
        output: torch.Tensor,
        input: list[torch.Tensor] | torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        group: GroupHandle | None = None,
        async_op: bool = False,
    ) -> torch.Tensor | Work:
        """Reduce ``input`` across ranks and leave chunk ``group.rank`` in ``output``. ``input`` is a
        list of ``world_size`` tensors shaped like ``output`` or one tensor of
        ``world_size * output.numel()`` elements."""

    @abstractmethod
    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, group: GroupHandle | None = None, async_op: bool = False
    ) -> torch.Tensor | Work:
        """Copy ``tensor`` of rank ``src`` into ``tensor`` on every rank, in place."""

    @abstractmethod
    def send(
        self, tensor: torch.Tensor, dst: int, group: GroupHandle | None = None, async_op: bool = False
    ) -> None | Work:
        """Send ``tensor`` to rank ``dst``; the matching ``recv`` must be posted there."""

    @abstractmethod
    def recv(
        self, tensor: torch.Tensor, src: int, group: GroupHandle | None = None, async_op: bool = False
    ) -> torch.Tensor | Work:
        """Receive into ``tensor`` (shape and dtype must match the sender's) from rank ``src``."""

    @abstractmethod
    def barrier(self, group: GroupHandle | None = None, timeout: float | None = None) -> None:
        """Block until every rank of the group reached the barrier (or raise ``comm_timeout``)."""

    @abstractmethod
    def all_to_all(
        self,
        output: list[torch.Tensor] | torch.Tensor,
        input: list[torch.Tensor] | torch.Tensor,
        group: GroupHandle | None = None,
        async_op: bool = False,
    ) -> list[torch.Tensor] | torch.Tensor | Work:
        """Rank ``i`` sends ``input[j]`` to rank ``j``, which stores it in ``output[i]``. Lists of
        ``world_size`` tensors, or single tensors split evenly along dim 0."""

    def transfer_agent(
        self,
        name: str | None = None,
        regions: Mapping[str, torch.Tensor] | None = None,
        *,
        backend: str = "auto",
        group: GroupHandle | None = None,
        timeout: float = 30.0,
        options: dict[str, dict] | None = None,
    ) -> Any:
        """Collective: this rank's :class:`~sagellm_comm.transfer.TransferAgent` (one-sided block transfers, e.g.
        KV-cache blocks), with ``regions`` registered and every other rank of ``group`` (default: the world)
        already added as a peer; metadata is exchanged over :attr:`cpu_group`.  ``backend`` is the transfer
        backend (``"auto"``, ``"ipc"``, ``"nixl"``); see ``sagellm_comm/transfer/world.py`` and docs/transfer.md.
        """
        from sagellm_comm.transfer.world import connect_world

        return connect_world(self, regions, name=name, transfer_backend=backend, group=group, timeout=timeout,
                             options=options)  # fmt: skip

    def __repr__(self) -> str:
        state = f"rank={self.rank}/{self.world_size}" if self.is_initialized else "uninitialised"
        return f"{type(self).__name__}(name={self.name!r}, {state})"
