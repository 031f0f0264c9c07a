"""What a transfer backend implements: the interface between :class:`~sagellm_comm.transfer.TransferAgent` and a
transport (``nixl.py``, ``ipc.py``, or a third-party one registered with ``register_transfer_backend``).

The agent owns everything users see (names, peers, checks, handles, deadlines); a backend only moves bytes.
By the time a backend method runs, every argument has been checked (``descriptors.py``): regions exist, blocks
lie inside them, destinations do not overlap.  A backend:

* registers local regions (:meth:`TransferBackend.register`) and describes them for peers
  (:meth:`TransferBackend.local_metadata`, JSON-able);
* connects to a peer from the peer's metadata (:meth:`TransferBackend.connect`), or raises
  :class:`~sagellm_comm.errors.BackendNotSupportedError` saying why it cannot reach that peer (the agent then
  tries the next backend and records the reason);
* posts a listed transfer (:meth:`TransferBackend.post`) or a transfer of fixed-size blocks by index
  (:meth:`TransferBackend.post_blocks`) and returns a :class:`Request` the agent polls; a request of one block
  comes as Python ints (:meth:`TransferBackend.post_one`, :meth:`TransferBackend.post_one_id`: by default the
  one-row tables of the general calls);
* delivers the notifications peers attached to their transfers (:meth:`TransferBackend.notifications`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from sagellm_comm.transfer.descriptors import BlockLayout, Region, RegionInfo, ids_to_table
from sagellm_comm.transfer.metadata import AgentMetadata


@dataclass
class AgentContext:
    """What a backend knows of the agent that owns it."""

    name: str
    incarnation: str
    identity: AgentMetadata  # this agent's identity (regions and transports empty)
    device: torch.device | None  # the CUDA device of the agent's GPU regions, or None
    timeout_s: float
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific, from TransferAgent(..., options=)


class Request(ABC):
    """One posted transfer, as a backend tracks it."""

    __slots__ = ()  # a subclass may keep its state in slots (one is made per transfer)
    complete = False  # True on a request that finished while it was posted: its handle never polls it

    @abstractmethod
    def poll(self) -> bool:
        """True once every byte arrived; False while in progress.  Raises
        :class:`~sagellm_comm.errors.PeerLostError` or :class:`~sagellm_comm.errors.TransferError` on failure."""

    @abstractmethod
    def abort(self) -> None:
        """Stop tracking a transfer that will not be waited for any more (after a timeout or a failure); releases
        what the backend can.  Never raises."""

    def wait_on_stream(self, stream: torch.cuda.Stream, deadline: float) -> None:
        """Make ``stream`` wait on the device for this transfer; backends whose completion is known on the host only
        raise.  A wait on the host, if any, ends at ``deadline`` (``time.monotonic()``) with
        :class:`~sagellm_comm.errors.CommTimeoutError`."""
        from sagellm_comm.errors import NotImplementedCommError

        raise NotImplementedCommError(f"{type(self).__name__}: completion is known on the host only; use wait()")


@dataclass
class Link:
    """A backend's connection to one peer (what :meth:`TransferBackend.connect` returns, subclassed freely)."""

    peer: AgentMetadata
    removed: bool = False


@dataclass
class Prepared:
    """Backend state for one :class:`~sagellm_comm.transfer.PreparedBlocks` (subclassed freely)."""

    link: Link
    local: Region
    remote: RegionInfo
    layout: BlockLayout


class TransferBackend(ABC):
    """One transport of one agent (see the module docstring)."""

    #: the registry name (an agent sets it on each transport it starts to the name the factory was registered under)
    name: ClassVar[str] = ""

    def __init__(self, context: AgentContext):
        self.context = context

    @abstractmethod
    def register(self, region: Region) -> None:
        """Make ``region`` reachable by peers (raise :class:`BackendNotSupportedError` if this transport cannot)."""

    @abstractmethod
    def deregister(self, region: Region) -> None:
        """Forget ``region``; a request in flight that moves its bytes keeps its memory (the tensor) referenced until
        it finished or was cancelled, so no transport reads or writes freed memory."""

    def cancel_in_flight(self) -> None:
        """The agent is closing: cancel what can be cancelled of the requests in flight, before their regions are
        deregistered (default: nothing; the transport's requests complete on their own)."""
        return None

    @abstractmethod
    def local_metadata(self) -> dict:
        """This transport's part of the agent's metadata (JSON-able; bytes as base64)."""

    def check_peer(self, peer: AgentMetadata) -> None:  # noqa: B027 - optional hook
        """Check this transport's part of ``peer``'s metadata without connecting: an
        :class:`~sagellm_comm.errors.InvalidArgumentError` naming a malformed field (the agent calls it before a
        restarted peer's old incarnation is removed); what makes the peer unreachable is :meth:`connect`'s to say.
        Default: nothing (:meth:`connect` checks it)."""

    @abstractmethod
    def connect(self, peer: AgentMetadata) -> Link:
        """Reach ``peer`` (its metadata carries this transport's part), or raise
        :class:`~sagellm_comm.errors.BackendNotSupportedError` naming why not (``auto`` then tries the next
        transport), or :class:`~sagellm_comm.errors.UnavailableError` naming the peer when this transport reaches
        it but cannot take it now (``add_peer`` raises it: add the peer again later)."""

    @abstractmethod
    def disconnect(self, link: Link) -> None:
        """Forget the peer; requests still in flight to it fail with ``PeerLostError`` when polled."""

    @abstractmethod
    def post(
        self, link: Link, op: str, local: Region, remote: RegionInfo, table: np.ndarray, notify: bytes | None,
        rows: list | None = None,
    ) -> Request:  # fmt: skip
        """Start ``op`` (``"write"``: local -> remote, ``"read"``: remote -> local) of the checked ``table``
        (int64 ``[n, 3]``: local offset, remote offset, bytes); ``notify`` reaches the peer after every byte.
        ``rows``: the same table as Python ints (``table.tolist()``) when the caller has it, for a few blocks
        (``descriptors.SMALL``); None otherwise."""

    def post_one(
        self, link: Link, op: str, local: Region, remote: RegionInfo, local_offset: int, remote_offset: int,
        nbytes: int, notify: bytes | None,
    ) -> Request:  # fmt: skip
        """:meth:`post` of one checked block, given as Python ints (default: its one-row table)."""
        table = np.array([[local_offset, remote_offset, nbytes]], dtype=np.int64)
        return self.post(link, op, local, remote, table, notify)

    def post_rows(
        self, link: Link, op: str, local: Region, remote: RegionInfo, rows: Sequence[Sequence[int]],
        notify: bytes | None,
    ) -> Request:  # fmt: skip
        """:meth:`post` of a few checked blocks given only as Python ints (default: their table)."""
        return self.post(link, op, local, remote, np.array(rows, dtype=np.int64), notify, rows)

    def prepare(self, link: Link, local: Region, remote: RegionInfo, layout: BlockLayout) -> Prepared:
        """State for repeated transfers of fixed-size blocks between these two regions (default: none)."""
        return Prepared(link, local, remote, layout)

    def post_blocks(self, prepared: Prepared, op: str, ids: np.ndarray, notify: bytes | None) -> Request:
        """Start ``op`` of the checked block pairs ``ids`` (int64 ``[n, 2]``: local block, remote block)."""
        table = ids_to_table(ids, prepared.layout.block_bytes)
        return self.post(prepared.link, op, prepared.local, prepared.remote, table, notify)

    def post_one_id(self, prepared: Prepared, op: str, local_block: int, remote_block: int, notify: bytes | None
                    ) -> Request:  # fmt: skip
        """:meth:`post_blocks` of one checked block pair, given as Python ints (default: its one-row table)."""
        return self.post_blocks(prepared, op, np.array([[local_block, remote_block]], dtype=np.int64), notify)

    def release_prepared(self, prepared: Prepared) -> None:  # noqa: B027 - optional hook
        """Free what :meth:`prepare` built (default: nothing)."""

    @abstractmethod
    def notifications(self) -> list[tuple[str, bytes]]:
        """Notifications that arrived since the last call, ``(sender name, message)``, in arrival order."""

    def transport(self, link: Link) -> str | None:
        """What this backend uses underneath to reach the peer, once known (e.g. UCX's transports)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Disconnect every peer and release everything (idempotent)."""
