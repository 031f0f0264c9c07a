"""TransferAgent: one engine instance's end of one-sided block transfers (see docs/transfer.md).

Lifecycle::

    agent = TransferAgent("decode-0")                 # backend="auto": every transport that can run here
    agent.register("kv", kv_pool)                     # contiguous CPU or CUDA tensor, once per pool
    meta = agent.metadata()                           # bytes for the peers, handed over out of band
    peer = agent.add_peer(other_meta)                 # per peer, the best transport that reaches it
    h = agent.write(peer, "kv", "kv", [(local_offset, remote_offset, nbytes), ...], notify=b"req-17")
    h.wait(timeout=5.0)
    agent.notifications()                             # on the receiving side: [(sender, b"req-17"), ...]
    agent.remove_peer(peer); agent.close()

Every argument is checked before a byte moves (``descriptors.py``); peers join and leave at any time (a peer
re-added with new metadata, e.g. after a restart, replaces the old one).  The agent serialises its own calls
with a lock, so it may be shared between threads, and runs them on its GPU whatever device is current in the
calling thread (one agent per GPU in a process works from any thread).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sagellm_comm.arguments import check_device, check_timeout
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CommError,
    InvalidArgumentError,
    NotInitializedError,
    run_every,
    undo_after_failure,
)
from sagellm_comm.kernels.block_copy import MAX_MESSAGE_BYTES
from sagellm_comm.transfer import registry
from sagellm_comm.transfer.base import AgentContext, Link, Request, TransferBackend
from sagellm_comm.transfer.descriptors import (
    OPS,
    SMALL,
    Region,
    block_ids,
    block_table,
    check_block_ids,
    check_blocks,
    check_region_name,
    check_rows,
    ids_fit,
    make_layout,
    make_region,
    one_block,
    one_block_fits,
    one_id,
    python_rows,
    same_kind,
    uniform_rows_total,
)
from sagellm_comm.transfer.handle import PreparedBlocks, TransferHandle
from sagellm_comm.transfer.metadata import AgentMetadata, local_identity
from sagellm_comm.transfer.notify import MAX_NAME as MAX_NAME_BYTES

logger = logging.getLogger("sagellm_comm.transfer")

DEFAULT_TIMEOUT_S = 30.0
MAX_NAME_CHARS = 128  # an agent's name: at most this many characters, and MAX_NAME_BYTES in UTF-8
# The calling thread's CUDA device without torch.cuda.current_device()'s Python layer (it initialises CUDA
# itself); absent from CPU builds of torch, where no agent has a CUDA device.
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class _AgentCall:
    """``with`` it around an agent call: the agent's lock held, and the agent's CUDA device (once it has one)
    current in the calling thread, the thread's own restored after."""

    __slots__ = ("lock", "device_index", "_restore")

    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self.device_index: int | None = None
        self._restore: list[int | None] = []  # per nested entry of the thread holding the lock

    def __enter__(self) -> None:
        self.lock.acquire()
        index = self.device_index
        try:
            current = None if index is None else _current_device()
            if current is not None and current != index:
                torch.cuda.set_device(index)
                self._restore.append(current)
            else:
                self._restore.append(None)
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            previous = self._restore.pop()
            if previous is not None:
                torch.cuda.set_device(previous)
        finally:
            self.lock.release()


@dataclass
class _Peer:
    meta: AgentMetadata
    backend: TransferBackend
    link: Link
    reason: str
    prepared: list[PreparedBlocks] = field(default_factory=list)


class TransferAgent:
    """One named endpoint of block transfers (see the module docstring and docs/transfer.md).

    Args:
        name: unique among the agents that will peer with this one (NIXL identifies agents by name).
        backend: ``"auto"`` (every transport that can run here; per peer the best that reaches it: ``ipc``
            between GPUs of one host, ``nixl`` otherwise) or one registered name (``"nixl"``, ``"ipc"``).
        device: the CUDA device of this agent's GPU regions (default: the first CUDA region's device).
        timeout: the default deadline of :meth:`TransferHandle.wait`, in seconds.
        options: transport options, e.g. ``{"nixl": {"num_threads": 2}}`` (docs/transfer.md lists them).

    Attributes:
        skipped: ``{backend: why}`` for the transports ``auto`` could not start in this process.
    """

    def __init__(
        self,
        name: str,
        backend: str = "auto",
        *,
        device: torch.device | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        options: dict[str, dict] | None = None,
    ):
        if (
            not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable()
            or len(name.encode()) > MAX_NAME_BYTES
        ):  # fmt: skip
            raise InvalidArgumentError(
                f"agent name must be a printable string of 1..{MAX_NAME_CHARS} characters and at most "
                f"{MAX_NAME_BYTES} bytes in UTF-8 (a peer's notification ring holds it), got {name!r}"
            )
        self.timeout = check_timeout(timeout)
        device = None if device is None else _usable_device(device, "device")
        options = _check_options(options)
        self.name = name
        self.incarnation = uuid.uuid4().hex
        self.requested_backend = backend
        self.lock = threading.RLock()
        self._call = _AgentCall(self.lock)
        if device is not None and device.type == "cuda":
            self._call.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self._closed = False
        self._aborts: collections.deque[Request] = collections.deque()  # abort_later: aborted at the next call
        self._regions: dict[str, Region] = {}
        self._peers: dict[str, _Peer] = {}
        entries, self.skipped = registry.resolve(backend)
        context = AgentContext(
            name, self.incarnation, local_identity(name, self.incarnation),
            device, self.timeout, options,
        )  # fmt: skip
        self._backends: dict[str, TransferBackend] = {}
        for entry in entries:
            try:
                backend_object = entry.factory(context)
                if not isinstance(backend_object, TransferBackend):
                    raise InvalidArgumentError(
                        f"the factory of transfer backend {entry.name!r} must return a TransferBackend, got "
                        f"{type(backend_object).__name__}"
                    )
                backend_object.name = entry.name  # known by its registry name, whatever its class says
                self._backends[entry.name] = backend_object
            except BackendNotSupportedError as exc:
                if len(entries) == 1:
                    raise
                self.skipped[entry.name] = exc.message
            except BaseException:  # a bad option: the transports already started are closed again, every one
                for started in self._backends.values():  # (one that fails to close is logged), the fault raised
                    undo_after_failure([started.close], logger, f"transfer agent {name!r}: closing transport "
                                       f"{started.name!r} after transport {entry.name!r} failed to start")  # fmt: skip
                raise
        if not self._backends:
            why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
            raise BackendNotSupportedError(f"no transfer backend could start here ({why})")
        # Per backend, the regions it could not make reachable and why (auto keeps going without them).
        self._unreachable: dict[str, dict[str, str]] = {name: {} for name in self._backends}
        # (transport name, its drain), best first
        self._drains = tuple((name, backend.notifications) for name, backend in self._backends.items())
        self._undelivered: list[tuple[str, bytes]] = []  # drained by a call that was interrupted: the next returns them
        self._drain_error: Exception | None = None  # a transport's, held back by a call that delivered the others'

    # ------------------------------------------------------------------ regions
    @property
    def backends(self) -> list[str]:
        """The transports this agent runs, best first."""
        return list(self._backends)

    @property
    def regions(self) -> list[str]:
        return list(self._regions)

    def register(self, name: str, tensor: torch.Tensor) -> None:
        """Register ``tensor`` (contiguous, CPU or CUDA) as region ``name``; the agent keeps it alive.

        Register every region before :meth:`metadata`: peers see the regions of the metadata they were given.
        The memory must stay valid until every peer has removed this agent (one-sided transfers write into it
        at any time): a tensor moved to other memory (``share_memory_()``, ``resize_()``, ``set_()``) is refused
        at this agent's posts, but peers would still write into the old memory.
        """
        with self._call:
            self._check_new_region(name)
            region = make_region(name, tensor)
            agent_gpu = self._call.device_index  # from device=, else the first GPU region's
            if region.info.device == "cuda" and agent_gpu is not None and agent_gpu != region.info.device_index:
                raise InvalidArgumentError(
                    f"region {name!r} is on cuda:{region.info.device_index} but this agent's GPU regions are on "
                    f"cuda:{agent_gpu}: use one agent per GPU"
                )
            done: list[TransferBackend] = []
            on_gpu = region.info.device == "cuda"
            # On the region's GPU, the agent's (current in every call after this one).
            with torch.cuda.device(region.info.device_index) if on_gpu else contextlib.nullcontext():
                try:
                    for backend in self._backends.values():
                        try:
                            backend.register(region)
                        except BackendNotSupportedError as exc:
                            if len(self._backends) == 1:
                                raise
                            self._unreachable[backend.name][name] = exc.message
                            continue
                        done.append(backend)
                    if not done:
                        why = "; ".join(f"{b}: {r[name]}" for b, r in self._unreachable.items())
                        raise BackendNotSupportedError(
                            f"region {name!r} cannot be registered with any transport: {why}"
                        )
                except BaseException:
                    # Every transport that took the region lets it go; a release that raises as well is logged,
                    # and the error raised is the one that says why the region could not be registered.
                    def forget_reasons() -> None:
                        for reasons in self._unreachable.values():
                            reasons.pop(name, None)

                    undo_after_failure(
                        [*(functools.partial(backend.deregister, region) for backend in done), forget_reasons],
                        logger, f"transfer agent {self.name!r}: letting go of region {name!r} after a failed register",
                    )  # fmt: skip
                    raise
            self._regions[name] = region
            if on_gpu and self._call.device_index is None:
                self._call.device_index = region.info.device_index  # the agent's GPU from now on

    def allocate(
        self, name: str, shape: int | tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A new zeroed tensor registered as region ``name``: on CUDA, device memory; on the CPU, a shared
        memory file mapping, which the ``ipc`` transport can map into peers (a private CPU tensor moves
        through NIXL only)."""
        from sagellm_comm.transfer.shared import check_shape, shared_cpu_tensor

        device = _usable_device(device, f"region {name!r}: device")
        shape = check_shape(shape, dtype, f"region {name!r}")
        with self._call:  # what register would refuse, refused before the memory is made (register checks again)
            self._check_new_region(name)
        if device.type == "cpu":
            tensor = shared_cpu_tensor(shape, dtype)
        else:
            tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.register(name, tensor)
        return tensor

    def deregister(self, name: str) -> None:
        """Forget region ``name`` (peers that still hold old metadata must not use it any more); the prepared
        pools over it are released.  A step that raises (a pool's release, a transport's deregister) does not stop
        the others: the region is forgotten all the same (a transport that could not let go of its memory keeps
        it referenced) and the first error is raised."""
        with self._call:
            self._check_open()
            region = self._region(name, in_place=False)  # a region whose tensor moved is let go of as well
            pools = [p for entry in self._peers.values() for p in entry.prepared if p.backend_prepared.local is region]

            def forget(backend: TransferBackend) -> None:
                try:
                    if name not in self._unreachable[backend.name]:
                        backend.deregister(region)
                finally:
                    self._unreachable[backend.name].pop(name, None)

            try:
                run_every([
                    *(functools.partial(self.release_prepared, prepared) for prepared in pools),
                    *(functools.partial(forget, backend) for backend in self._backends.values()),
                ])  # fmt: skip
            finally:
                del self._regions[name]

    def metadata(self) -> bytes:
        """This agent's description for peers: opaque bytes to hand over as they are (a versioned header line, then
        JSON: identity, regions, each transport's part)."""
        with self._call:
            self._check_open()
            meta = local_identity(self.name, self.incarnation)
            meta.regions = {name: region.info for name, region in self._regions.items()}
            for name, backend in self._backends.items():
                part = backend.local_metadata()
                part["unreachable"] = dict(self._unreachable[name])
                meta.transports[name] = part
            return meta.encode()

    # ------------------------------------------------------------------ peers
    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def add_peer(self, metadata: bytes) -> str:
        """Connect to the agent described by ``metadata``; returns its name.

        Each transport this agent runs is tried, best first, and the first that reaches the peer is used for every
        transfer with it; :meth:`peer_backend` and :meth:`backend_reason` say which and why.  A transport that reaches
        the peer but cannot take it now (``ipc``: the peer's inbox has no free slot, its claim lock is held past the
        agent's timeout, or the test copy through the mapping did not complete within it) raises ``UnavailableError``
        naming the peer, and no worse transport is tried in its place: add the peer again later.  A peer of that name
        already known is replaced: a restarted one (another incarnation) is removed first; the same agent (new regions)
        once the new metadata connected, so that metadata refused leaves the peer as it was.  The replaced peer is
        removed as by :meth:`remove_peer`; its prepared pools are released.  If a step of that removal raises, every
        other step still runs, no peer of that name is left (a new link already connected is let go too) and the step's
        error is raised: add the peer again.
        """
        meta = AgentMetadata.decode(metadata)
        with self._call:
            self._check_open()
            if meta.name == self.name:
                raise InvalidArgumentError(
                    f"the metadata is of an agent named {meta.name!r}, this agent's own name: names must be unique"
                )
            old = self._peers.get(meta.name)
            if old is not None and old.meta.incarnation != meta.incarnation:
                for name, backend in self._backends.items():  # malformed metadata leaves the known peer as it was
                    if name in meta.transports:
                        backend.check_peer(meta)
                self.remove_peer(meta.name)  # a restarted peer: the process the old link reached is gone
                old = None
            failures: dict[str, str] = {}
            for name, backend in self._backends.items():
                if name not in meta.transports:
                    failures[name] = f"peer {meta.name!r} does not run it"
                    continue
                try:
                    link = backend.connect(meta)
                except BackendNotSupportedError as exc:
                    failures[name] = exc.message
                    continue
                entry = _Peer(meta, backend, link, self._reason(name, failures))
                if old is not None:
                    try:
                        self._drop(old)
                    except Exception:
                        # The old peer is gone (every step of its teardown ran); the new link goes too, so that
                        # an add_peer that raised leaves no peer of that name, and the old one's error is raised.
                        del self._peers[meta.name]
                        undo_after_failure([functools.partial(self._drop, entry)], logger,
                                           f"transfer agent {self.name!r}: letting go of the new link to peer "
                                           f"{meta.name!r}")  # fmt: skip
                        raise
                self._peers[meta.name] = entry
                same_gpu_host = meta.same_host(local_identity(self.name, self.incarnation)) and any(
                    r.device == "cuda" for r in meta.regions.values()
                )
                level = logging.WARNING if failures and same_gpu_host else logging.INFO
                logger.log(level, "transfer agent %r: peer %r (%s) via %s", self.name, meta.name, meta.host,
                           entry.reason)  # fmt: skip
                return meta.name
            why = "; ".join(f"{k}: {v}" for k, v in {**failures, **self.skipped}.items())
            raise BackendNotSupportedError(
                f"no transfer backend of agent {self.name!r} reaches peer {meta.name!r} ({why})",
                details={"peer": meta.name, "failures": failures},
            )

    def _reason(self, chosen: str, failures: dict[str, str]) -> str:
        rank = registry.list_transfer_backends()  # only transports ranked above the chosen one are "better"
        above = set(rank[: rank.index(chosen)]) if chosen in rank else set(self.skipped)
        skipped = {**failures, **{k: v for k, v in self.skipped.items() if k not in self._backends and k in above}}
        if not skipped:
            return f"{chosen}, the best transport available"
        return f"{chosen}; better transports skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())

    def remove_peer(self, peer: str) -> None:
        """Forget ``peer``; its prepared pools are released.  Transfers still in flight to it: ``ipc`` first waits
        for its launches to the peer (up to the agent's timeout: they report done if the peer was alive once they
        completed, else ``PeerLostError``); NIXL's go on and report what NIXL does with them (done,
        ``PeerLostError``, or the handle's deadline).  Unknown peers raise ``InvalidArgumentError``."""
        with self._call:
            self._check_open()
            entry = self._peer(peer)
            try:
                self._drop(entry)
            finally:  # forgotten even if its transport's disconnect raised (the error still reaches the caller)
                del self._peers[peer]

    def _drop(self, entry: _Peer) -> None:
        """Release ``entry``'s prepared pools and disconnect its link (the caller holds the lock).  A step that
        raises does not stop the others; the first error is raised once every step ran."""

        def disconnect() -> None:
            entry.link.removed = True
            entry.backend.disconnect(entry.link)

        run_every([*(functools.partial(self.release_prepared, prepared) for prepared in list(entry.prepared)),
                   disconnect])  # fmt: skip

    def peer_backend(self, peer: str) -> str:
        """The transport moving this agent's transfers with ``peer``."""
        return self._peer(peer).backend.name

    def backend_reason(self, peer: str) -> str:
        """Why :meth:`peer_backend` is what it is (which better transports could not reach the peer, and why)."""
        return self._peer(peer).reason

    def peer_transport(self, peer: str) -> str | None:
        """What the backend uses underneath for ``peer`` once known (UCX's transports after the first transfer)."""
        entry = self._peer(peer)
        with self._call:
            return entry.backend.transport(entry.link)

    def peer_regions(self, peer: str) -> dict[str, Any]:
        """The regions ``peer`` registered (as its metadata describes them)."""
        return dict(self._peer(peer).meta.regions)

    # ------------------------------------------------------------------ transfers
    def write(self, peer: str, local_region: str, remote_region: str, blocks: Any, notify: bytes | None = None
              ) -> TransferHandle:  # fmt: skip
        """Copy local bytes ``[lo, lo + n)`` of ``local_region`` to ``[ro, ro + n)`` of the peer's ``remote_region``
        for every block ``(lo, ro, n)``; returns at once.  ``notify`` (up to 496 bytes) reaches the peer's
        :meth:`notifications` after every byte is visible there."""
        handle = self._post_one(peer, "write", local_region, remote_region, blocks, notify)
        return handle if handle is not None else self._post(peer, "write", local_region, remote_region, blocks, notify)

    def read(self, peer: str, local_region: str, remote_region: str, blocks: Any, notify: bytes | None = None
             ) -> TransferHandle:  # fmt: skip
        """Copy the peer's ``[ro, ro + n)`` of ``remote_region`` into ``[lo, lo + n)`` of ``local_region`` for every
        block ``(lo, ro, n)``; ``notify`` tells the peer its blocks were read (it may reuse them)."""
        handle = self._post_one(peer, "read", local_region, remote_region, blocks, notify)
        return handle if handle is not None else self._post(peer, "read", local_region, remote_region, blocks, notify)

    def _post(self, peer: str, op: str, local_region: str, remote_region: str, blocks: Any, notify: bytes | None):
        """:meth:`write` or :meth:`read` of blocks that :meth:`_post_one` did not take."""
        rows = python_rows(blocks)
        if rows is not None:
            handle = self._post_rows(peer, op, local_region, remote_region, rows, notify)
            if handle is not None:
                return handle
        table = block_table(blocks)
        rows = None
        if len(table) <= SMALL:  # a few blocks: checked and posted as Python ints
            rows = table.tolist()
            handle = self._post_rows(peer, op, local_region, remote_region, rows, notify, table)
            if handle is not None:
                return handle
        with self._call:
            self._check_open()
            entry = self._peer(peer)
            local, remote = self._region(local_region), self._remote_region(entry, remote_region)
            message = _message(notify)
            if rows is None:
                nbytes = check_blocks(table, local.info, remote, op, f"peer {peer!r}")
            else:
                nbytes = check_rows(rows, local.info, remote, op, f"peer {peer!r}")
            request = entry.backend.post(entry.link, op, local, remote, table, message, rows)
        return TransferHandle(self, peer, op, entry.backend.name, request, nbytes, len(table))

    def _post_one(self, peer: Any, op: str, local_region: Any, remote_region: Any, blocks: Any, notify: Any
                  ) -> TransferHandle | None:  # fmt: skip
        """:meth:`_post` of one block of Python ints (:func:`one_block`), checked with int comparisons.  None,
        having done nothing, when it is another form, or the agent, the peer, a region or the block is wrong, or
        the calling thread's CUDA device is not the agent's: the general path then refuses the request with its
        own error (or switches the device), so every outcome is the same whatever form the blocks came in.

        The common request, so the agent's lock is taken in line rather than by :class:`_AgentCall` (each call
        layer costs the host a fraction of a microsecond, and this path is a few microseconds long)."""
        if blocks.__class__ is list and len(blocks) == 1 and blocks[0].__class__ is tuple and len(blocks[0]) == 3:
            row = blocks[0]  # the documented form, tested in line; one_block takes every other
        else:
            row = one_block(blocks)
            if row is None:
                return None
        lo, ro, n = row
        if not (lo.__class__ is ro.__class__ is n.__class__ is int):
            return None
        lock = self.lock
        lock.acquire()
        try:
            index = self._call.device_index
            if index is not None and _current_device() != index:
                return None
            known = self._known(peer, local_region, remote_region)
            if known is None:
                return None
            entry, local, remote = known
            if not one_block_fits(local.info, remote, lo, ro, n):
                return None
            if notify.__class__ is not bytes or not 0 < len(notify) <= MAX_MESSAGE_BYTES:
                notify = _message(notify)  # converted, or refused with its error
            backend = entry.backend
            request = backend.post_one(entry.link, op, local, remote, lo, ro, n, notify)
        finally:
            lock.release()
        return TransferHandle(self, peer, op, backend.name, request, n, 1)

    def _post_rows(self, peer: str, op: str, local_region: str, remote_region: str, rows, notify: Any,
                   table: np.ndarray | None = None) -> TransferHandle | None:  # fmt: skip
        """:meth:`_post` of a few blocks of one length given as Python ints (``rows``; ``table``: the same blocks
        as an array when the caller gave one), checked without numpy (:func:`uniform_rows_total`).  None, having
        done nothing, when anything is wrong or the lengths differ: the general path then decides, so every
        refusal is the same whatever form the blocks came in."""
        with self._call:
            known = self._known(peer, local_region, remote_region)
            if known is None:
                return None
            entry, local, remote = known
            if not same_kind(local.info, remote):
                return None
            nbytes = uniform_rows_total(rows, local.info, remote, op == "write")
            if nbytes is None:
                return None
            message = _message(notify)
            if table is None:
                request = entry.backend.post_rows(entry.link, op, local, remote, rows, message)
            else:
                request = entry.backend.post(entry.link, op, local, remote, table, message, rows)
        return TransferHandle(self, peer, op, entry.backend.name, request, nbytes, len(rows))

    def _known(self, peer: Any, local_region: Any, remote_region: Any) -> tuple[_Peer, Region, Any] | None:
        """``(peer entry, local region, peer's region)`` for the short paths when the agent is open and knows all
        three names (the caller holds the lock); None otherwise, which is no verdict: the general path names what
        is wrong.  Requests whose handles timed out while another call held the agent are aborted first, as by
        every other call (:meth:`abort_later`)."""
        if self._aborts:
            self._abort_deferred()
        if self._closed or not (peer.__class__ is local_region.__class__ is remote_region.__class__ is str):
            return None
        entry = self._peers.get(peer)
        local = self._regions.get(local_region)
        if entry is None or local is None or local.moved():  # moved: _region says so
            return None
        remote = entry.meta.regions.get(remote_region)
        return None if remote is None else (entry, local, remote)

    def prepare(self, peer: str, local_region: str, remote_region: str, block_bytes: int) -> PreparedBlocks:
        """``local_region`` and the peer's ``remote_region`` as pools of ``block_bytes``-long blocks, for repeated
        transfers named by block index (:class:`PreparedBlocks`); the transport's descriptors are built once."""
        with self._call:
            self._check_open()
            entry = self._peer(peer)
            local, remote = self._region(local_region), self._remote_region(entry, remote_region)
            layout = make_layout(local.info, remote, block_bytes, f"peer {peer!r}")
            prepared = PreparedBlocks(
                self, peer, entry.backend.name, entry.backend.prepare(entry.link, local, remote, layout)
            )
            entry.prepared.append(prepared)
            return prepared

    def post_blocks(self, prepared: PreparedBlocks, op: str, local_blocks: Any, remote_blocks: Any,
                     notify: bytes | None) -> TransferHandle:  # fmt: skip
        """Post a transfer of block ids over ``prepared`` (what ``PreparedBlocks.write`` / ``read`` call)."""
        local_block, remote_block = one_id(local_blocks), one_id(remote_blocks)
        if local_block is not None and remote_block is not None:
            handle = self._post_one_id(prepared, op, local_block, remote_block, notify)
            if handle is not None:
                return handle
        ids = block_ids(local_blocks, remote_blocks)
        with self._call:
            self._check_open()
            if prepared.released:
                raise InvalidArgumentError(
                    f"{prepared!r} was released (remove_peer, deregister of its region, close or release())"
                )
            entry = self._peer(prepared.peer)
            prepared.backend_prepared.local.check_in_place()
            message = _message(notify)
            check_block_ids(ids, prepared.layout, op)
            request = entry.backend.post_blocks(prepared.backend_prepared, op, ids, message)
        nbytes = len(ids) * prepared.layout.block_bytes
        return TransferHandle(self, prepared.peer, op, entry.backend.name, request, nbytes, len(ids))

    def _post_one_id(self, prepared: PreparedBlocks, op: str, local_block: int, remote_block: int, notify: Any
                     ) -> TransferHandle | None:  # fmt: skip
        """:meth:`post_blocks` of one pair of Python int ids, checked with int comparisons; None, having done
        nothing, when anything is wrong (the general path then refuses it with its own error)."""
        with self._call:
            if self._aborts:
                self._abort_deferred()
            if self._closed or prepared.released:
                return None
            entry = self._peers.get(prepared.peer)
            moved = prepared.backend_prepared.local.moved()  # the general path says so
            if entry is None or moved or not ids_fit(prepared.layout, local_block, remote_block):
                return None
            message = _message(notify)
            request = entry.backend.post_one_id(prepared.backend_prepared, op, local_block, remote_block, message)
        return TransferHandle(self, prepared.peer, op, entry.backend.name, request, prepared.layout.block_bytes, 1)

    def release_prepared(self, prepared: PreparedBlocks) -> None:
        """Release ``prepared``'s transport resources (what ``PreparedBlocks.release`` calls); idempotent."""
        with self._call:
            if prepared.released:
                return
            prepared.released = True
            entry = self._peers.get(prepared.peer)
            if entry is not None and prepared in entry.prepared:
                entry.prepared.remove(prepared)
            self._backends[prepared.backend].release_prepared(prepared.backend_prepared)

    def notifications(self) -> list[tuple[str, bytes]]:
        """Notifications that arrived since the last call: ``(sender name, message)``, oldest first per sender.
        A message arrives only after every byte of its transfer is visible here; a sender's messages arrive in
        the order it posted their transfers over ``ipc``, in the order they completed over NIXL.

        With several transports, one whose read fails does not hold back the others': every transport is read,
        and what the others delivered is returned.  The failure (``details["transport"]`` names the transport)
        is raised by this call when it has nothing else to return, else by the next call, before that call reads
        anything (so nothing is taken from a ring and held).  A transport that fails on every read makes calls
        alternate between the others' notifications and its error; none is lost or kept past the next call."""
        # The common poll (one transport, nothing held back, the thread on the agent's device) with the agent's
        # lock taken in line: engines call this in a loop, and :class:`_AgentCall` costs a call layer each way.
        lock = self.lock
        lock.acquire()
        try:
            index = self._call.device_index
            if (
                len(self._drains) == 1
                and not (self._closed or self._aborts or self._undelivered or self._drain_error is not None)
                and (index is None or _current_device() == index)
            ):
                read = self._drains[0][1]
                return read()
        finally:
            lock.release()
        with self._call:
            if self._closed:
                self._check_open()
            if self._aborts:
                self._abort_deferred()
            drains = self._drains
            if len(drains) == 1 and not self._undelivered and self._drain_error is None:  # its list as it is
                read = drains[0][1]
                return read()
            held, self._drain_error = self._drain_error, None
            if held is not None:
                raise held  # the last call returned the other transports' notifications instead
            out, self._undelivered = self._undelivered, []
            error: Exception | None = None
            try:
                for name, drain in drains:
                    try:
                        out += drain()
                    except Exception as exc:  # the other transports are still read
                        if isinstance(exc, CommError):
                            exc.details.setdefault("transport", name)
                        if error is None:
                            error = exc
                        else:
                            logger.warning("transfer agent %r: reading %s's notifications failed too: %r",
                                           self.name, name, exc)  # fmt: skip
            except BaseException:
                self._undelivered = out  # taken from their rings already: kept for the next call, not lost
                raise
            if error is not None:
                if not out:
                    raise error
                self._drain_error = error
            return out

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Remove every peer, deregister every region, stop every transport (idempotent).  A step that raises
        does not stop the others: the agent is closed and everything else released, then the first error is
        raised."""
        with self._call:
            if self._closed:
                return
            backends = list(self._backends.values())

            def mark_closed() -> None:
                self._closed = True

            run_every(
                [
                    self._abort_deferred,
                    *(backend.cancel_in_flight for backend in backends),  # before the regions they move go
                    *(functools.partial(self.remove_peer, peer) for peer in list(self._peers)),
                    *(functools.partial(self.deregister, name) for name in list(self._regions)),
                    mark_closed,
                    *(backend.close for backend in backends),
                ]
            )

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferAgent({self.name!r}, backends {self.backends}, {len(self._peers)} peer(s))"

    def abort_later(self, request: Request) -> None:
        """Abort ``request`` (a handle's, whose wait timed out while another thread's call held the agent) at the
        agent's next call; safe without the lock."""
        self._aborts.append(request)

    def _abort_deferred(self) -> None:
        while self._aborts:
            self._aborts.popleft().abort()

    # ------------------------------------------------------------------ lookups
    def _check_new_region(self, name: Any) -> None:
        """The agent is open and ``name`` is a region name not registered yet (the caller holds the lock)."""
        self._check_open()
        check_region_name(name)
        if name in self._regions:
            raise InvalidArgumentError(f"region {name!r} is already registered; deregister it first")

    def _check_open(self) -> None:
        if self._aborts:
            self._abort_deferred()
        self._refuse_closed()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise NotInitializedError(f"transfer agent {self.name!r} was closed")

    def _peer(self, peer: str) -> _Peer:
        self._refuse_closed()  # the lookups call it without the lock: no deferred aborts run here
        _check_name(peer, "peer")
        entry = self._peers.get(peer)
        if entry is None:
            raise InvalidArgumentError(
                f"unknown peer {peer!r} of agent {self.name!r}; known peers: {sorted(self._peers) or 'none'} "
                "(add_peer(metadata) first)",
                details={"peer": peer},
            )
        return entry

    def _region(self, name: str, in_place: bool = True) -> Region:
        """Local region ``name``; unless ``in_place`` is False (what ``deregister`` takes), one whose tensor moved
        since it was registered is refused (:meth:`Region.check_in_place`)."""
        _check_name(name, "local region")
        region = self._regions.get(name)
        if region is None:
            raise InvalidArgumentError(
                f"unknown local region {name!r} of agent {self.name!r}; registered: {sorted(self._regions) or 'none'}"
            )
        if in_place:
            region.check_in_place()
        return region

    @staticmethod
    def _remote_region(entry: _Peer, name: str):
        _check_name(name, "peer region")
        info = entry.meta.regions.get(name)
        if info is None:
            raise InvalidArgumentError(
                f"peer {entry.meta.name!r} has no region {name!r} in the metadata it was added with; its regions: "
                f"{sorted(entry.meta.regions) or 'none'} (a region registered later needs add_peer(new metadata))",
                details={"peer": entry.meta.name},
            )
        return info


def _check_name(name: Any, what: str) -> None:
    """Peers and regions are named by strings: anything else (a list, bytes, None) is refused by name."""
    if not isinstance(name, str):
        raise InvalidArgumentError(f"{what} must be a name (str), got {type(name).__name__} {name!r}")


def _usable_device(device: Any, what: str) -> torch.device:
    """``device`` as a ``torch.device`` (:func:`check_device`) of the CPU or a CUDA GPU of this process; any other
    device, or a CUDA device this process has no GPU for, is refused here, rather than by torch (an AssertionError,
    RuntimeError or NotImplementedError) at the agent's first call or when ``allocate`` makes the memory."""
    device = check_device(device, what)
    if device.type not in ("cpu", "cuda"):  # torch reads "meta", "mps", "xpu"...; no transport moves their memory
        raise InvalidArgumentError(
            f"{what} {str(device)!r} is neither the CPU nor a CUDA GPU: transfer regions live in CPU or CUDA memory",
            details={"device": str(device)},
        )
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise InvalidArgumentError(
                f"{what} {str(device)!r} is not a GPU of this process ({count} CUDA GPU(s) visible)",
                details={"device": str(device)},
            )
    return device


def _check_options(options: Any) -> dict[str, dict]:
    """``options`` (None, or a dict of option dicts keyed by transport name) as a new dict; each transport checks
    its own keys when it starts."""
    if options is None:
        return {}
    known = registry.list_transfer_backends()
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"options must be a dict keyed by transport ({known}), got {options!r}")
    for name, value in options.items():
        if name not in known:
            raise InvalidArgumentError(f"options names transport {name!r}; transports: {known}")
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"options[{name!r}] must be a dict of that transport's options, got {value!r}")
    return {name: dict(value) for name, value in options.items()}


def _message(notify: Any) -> bytes | None:
    if notify is None:
        return None
    if notify.__class__ is not bytes:
        if isinstance(notify, str):
            try:
                notify = notify.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8
                raise InvalidArgumentError(f"notify as a str must be encodable as UTF-8: {exc}") from None
        if not isinstance(notify, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"notify must be bytes (or str), got {type(notify).__name__}")
        notify = bytes(notify)
    if not 0 < len(notify) <= MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(f"notify must be 1..{MAX_MESSAGE_BYTES} bytes, got {len(notify)}")
    return notify


__all__ = ["OPS", "TransferAgent"]
