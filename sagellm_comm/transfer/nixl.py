"""The ``nixl`` transfer backend: NIXL (UCX inside) for peers on other hosts and for CPU memory.

One NIXL agent per :class:`~sagellm_comm.transfer.TransferAgent`, of the same name.  Regions are registered
with NIXL once; their addresses travel in our metadata beside NIXL's own.  A listed transfer is
``initialize_xfer`` + ``transfer`` over descriptor lists built from the block table; a prepared pool
(``TransferAgent.prepare``) is two ``prep_xfer_dlist`` handles built once, and each transfer is
``make_prepped_xfer`` with block indices.  Completion is polled with ``check_xfer_state``; the agent's handle puts
its own deadline around that, since a request to a peer that stopped answering stays "in progress" forever.  A
peer that disconnects surfaces as ``nixlRemoteDisconnectError`` and becomes ``PeerLostError`` naming it.

Which transports UCX chose (``ucx_log.py``) is logged once per peer after its first completed transfer, and is
``TransferAgent.peer_transport(peer)``.  NIXL's own Python INFO lines are quieted unless ``NIXL_LOG_LEVEL`` is set.

Install: ``pip install 'isagellm-comm[transfer]'`` (``nixl-cu13``, pinned; ``[transfer-cu12]`` for CUDA 12).
Never the ``nixl`` meta-package, which pulls both CUDA builds and an unpinned torch.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType

import numpy as np

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import BackendNotSupportedError, CommError, InvalidArgumentError, PeerLostError, TransferError
from sagellm_comm.transfer import ucx_log
from sagellm_comm.transfer.base import AgentContext, Link, Prepared, Request, TransferBackend
from sagellm_comm.transfer.descriptors import SMALL, BlockLayout, Region, RegionInfo
from sagellm_comm.transfer.metadata import MAX_METADATA_BYTES, AgentMetadata, MetadataField, b64, unb64
from sagellm_comm.transfer.registry import register_transfer_backend

logger = logging.getLogger("sagellm_comm.transfer")

NIXL_MODULES = ("nixl_cu13", "nixl_cu12")
NIXL_INSTALL_HINT = "pip install 'isagellm-comm[transfer]' (nixl-cu13==1.5.1; '[transfer-cu12]' for CUDA 12)"
_MEM = {"cpu": "DRAM", "cuda": "VRAM"}
_OPS = {"write": "WRITE", "read": "READ"}
RETRY_RELEASES_FROM = 16  # kept unreleased handles at which NixlBackend.keep_unreleased first retries them
REAP_FROM = 64  # requests in flight at which NixlBackend.reap first sweeps them
PROGRESS_PER_POST = 2  # oldest requests in flight each post checks (NixlBackend.progress)
# Removed peers whose NIXL remote agent stays loaded (NixlBackend.disconnect says why), the oldest unloaded beyond.
PARKED_PEERS = 64


@lru_cache(maxsize=1)
def nixl_api() -> ModuleType:
    """The installed NIXL Python package (``nixl_cu13`` or ``nixl_cu12``)."""
    failures = []
    for name in NIXL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if "NIXL_LOG_LEVEL" not in os.environ:
            logging.getLogger("nixl").setLevel(logging.WARNING)
        return module
    raise BackendNotSupportedError(f"NIXL is not installed: {NIXL_INSTALL_HINT} ({'; '.join(failures)})")


def nixl_available() -> bool:
    nixl_api()
    return True


def _is_nixl_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(NIXL_MODULES)


def _translate(exc: BaseException, peer: str, what: str) -> CommError:
    kind = type(exc).__name__
    details = {"peer": peer, "nixl_error": kind}
    if kind == "nixlRemoteDisconnectError":
        return PeerLostError(f"peer {peer!r} disconnected while NIXL tried to {what} ({kind})", details=details)
    return TransferError(f"NIXL failed to {what} with peer {peer!r}: {kind}: {exc}", details=details)


@dataclass
class NixlLink(Link):
    nixl_name: str = ""
    regions: dict = field(default_factory=dict)  # peer region -> (address, nbytes, device index)
    transport: str | None = None


@dataclass
class NixlPrepared(Prepared):
    local_side: object = None
    remote_side: object = None


class NixlRequest(Request):
    """One NIXL transfer handle.  The backend holds every request in flight (:attr:`NixlBackend.pending`), so a
    transfer whose :class:`~sagellm_comm.transfer.TransferHandle` the caller dropped still completes (NIXL cancels
    a transfer whose handle is freed) and is released once seen finished.  NIXL sends a transfer's notification
    from the state check that finds its data arrived: the handle's polls do that, and for a handle nobody polls,
    each later post and ``notifications()`` call checks the oldest requests in flight
    (:meth:`NixlBackend.progress`).  Removing the peer does not stop its requests: each reports what NIXL does with
    it (done, failed, or our deadline), as a removal cannot cancel a transfer without racing its notification
    (NIXL's release sends it when the data has just arrived)."""

    def __init__(self, backend: NixlBackend, link: NixlLink, handle, status: str, local: Region):
        self.backend, self.link, self.handle = backend, link, handle
        self.local = local  # the memory NIXL moves from or into: referenced until the handle is released
        self.finished = status == "DONE"
        self.error: CommError | None = None  # what a poll raises: set where the backend decided the request
        self.posted_at = time.monotonic()
        if status == "ERR":
            name = link.peer.name
            self._fail(TransferError(f"NIXL refused the transfer to peer {name!r} (status ERR)",
                                     details={"peer": name}))  # fmt: skip
        if self.finished:  # small transfers complete inside the post: released now, the handle is born done
            self.abort()
            backend.note_transport(link)
            self.complete = True
        else:
            backend.pending[self] = None

    def _state(self) -> str:
        """NIXL's state of the transfer (``DONE``, ``PROC`` or ``ERR``); a NIXL error is raised translated."""
        try:
            return self.backend.agent.check_xfer_state(self.handle)
        except Exception as exc:
            if not _is_nixl_error(exc):
                raise
            error = _translate(exc, self.link.peer.name, "complete a transfer")
            if self.link.removed and not isinstance(error, PeerLostError):  # its remote agent unloaded under it
                name = self.link.peer.name
                error = PeerLostError(f"peer {name!r} was removed and NIXL no longer knows it ({type(exc).__name__})"
                                      "; the transfer was in flight", details=dict(error.details))  # fmt: skip
            self._fail(error)

    def poll(self) -> bool:
        if not self.finished:
            if self.error is not None:
                raise self.error
            status = self._state()
            if status == "ERR":
                self._fail(self._failed())
            self.finished = status == "DONE"
        if self.finished:
            self.abort()  # released: the handle is done
            if not self.link.removed:
                self.backend.note_transport(self.link)
        return self.finished

    def _failed(self) -> CommError:
        """The error of a transfer NIXL reports failed: its peer lost if it was removed."""
        name = self.link.peer.name
        error = PeerLostError if self.link.removed else TransferError
        return error(f"NIXL reports the transfer to peer {name!r} failed (ERR)", details={"peer": name})

    def reap(self, now: float) -> None:
        """Seen by the backend's sweep (:meth:`NixlBackend.reap`): released if NIXL finished or failed it, and
        cancelled if its peer was removed more than the agent's timeout after it was posted (NIXL can keep such a
        request "in progress" forever); a later poll reports which."""
        if self.finished or self.error is not None or self.handle is None:
            self.backend.pending.pop(self, None)
            return
        try:
            status = self._state()
        except CommError as exc:  # translated, the request aborted (_fail)
            self.error = exc
            return
        if status == "DONE":
            self.finished = True
            self.abort()
        elif status == "ERR":
            self.cancel(self._failed())
        elif self.link.removed and now - self.posted_at > self.backend.context.timeout_s:
            name = self.link.peer.name
            self.cancel(PeerLostError(
                f"peer {name!r} was removed and the transfer was still in flight {self.backend.context.timeout_s:g} s "
                "after its post: cancelled (its destination blocks hold undefined data)",
                details={"peer": name},
            ))  # fmt: skip

    def cancel_at_close(self) -> None:
        """The agent is closing with this request in flight: cancelled (its handle released now, or with the
        handles NIXL releases at close); a later poll raises ``PeerLostError``."""
        name = self.link.peer.name
        self.cancel(PeerLostError(
            f"the agent was closed while the transfer to peer {name!r} was in flight: cancelled (its destination "
            "blocks hold undefined data; a notification already on its way may still arrive)",
            details={"peer": name},
        ))  # fmt: skip

    def cancel(self, error: CommError) -> None:
        """Decided by the backend: released (cancelled if still in flight), and ``error`` is what a poll raises."""
        self.error = error
        self.abort()

    def _fail(self, exc: CommError) -> None:
        self.abort()
        raise exc

    def abort(self) -> None:
        """Release the handle: done, or cancelled.  NIXL's cancel does not stop bytes already on the wire (UCX
        completes an RMA in flight, seconds later from a stalled peer), so the local memory of a request cancelled
        before it finished stays referenced and registered (:meth:`NixlBackend.note_unsettled`)."""
        self.backend.pending.pop(self, None)
        if self.handle is None:
            return
        if not self.finished:
            self.backend.note_unsettled(self.local)
        handle, self.handle = self.handle, None
        local, self.local = self.local, None  # the backend keeps it where it must; a handle kept done holds nothing
        try:
            handle.release()  # cancels it if still active
        except Exception as exc:  # NIXL could not cancel it: retried later (keep_unreleased)
            logger.debug("NIXL could not release a transfer handle yet: %r", exc)
            self.backend.keep_unreleased(handle, local)


def nixl_options(options: dict) -> tuple[list[str], int, bool]:
    """``(backends, num_threads, progress_thread)`` of the ``"nixl"`` options: a non-empty list of NIXL backend
    names (default ``["UCX"]``), a thread count >= 0 (default 0) and whether NIXL runs its progress thread (a bool,
    default True); an unknown key or a bad value is an InvalidArgumentError."""
    options = dict(options)
    backends = options.pop("backends", ["UCX"])
    if (
        isinstance(backends, str)
        or not isinstance(backends, list | tuple)
        or not backends
        or not all(isinstance(name, str) and name for name in backends)
    ):
        raise InvalidArgumentError(f"nixl option backends must be a non-empty list of names, got {backends!r}")
    num_threads = check_int(options.pop("num_threads", 0), "nixl option num_threads", 0, 1024)
    progress_thread = options.pop("progress_thread", True)
    if not isinstance(progress_thread, bool):
        raise InvalidArgumentError(f"nixl option progress_thread must be True or False, got {progress_thread!r}")
    if options:
        raise InvalidArgumentError(
            f"unknown nixl options {sorted(options)} (known: backends, num_threads, progress_thread)"
        )
    return list(backends), num_threads, progress_thread


class NixlBackend(TransferBackend):
    """See the module docstring."""

    name = "nixl"

    def __init__(self, context: AgentContext):
        super().__init__(context)
        # checked whether NIXL runs here or not
        backends, num_threads, progress_thread = nixl_options(context.options.get("nixl", {}))
        api = nixl_api()
        # UCX's TCP transport connects with a blocking connect() by default, inside NIXL's loading of the peer's
        # metadata (add_peer, under the agent's lock): to an address that drops packets that waited for the
        # kernel's SYN retries (134 s measured), whatever the agent's timeout.  Non-blocking, the connection is
        # made in the background and a peer it cannot reach fails its first transfer under our deadline.
        os.environ.setdefault("UCX_TCP_CONN_NB", "y")
        self.ucx = ucx_log.install()
        self.ucx.watch(context.name)
        try:
            config = api.nixl_agent_config(
                enable_prog_thread=progress_thread, backends=backends, num_threads=num_threads
            )
            self.agent = api.nixl_agent(context.name, config)
        except Exception as exc:
            self.ucx.unwatch(context.name)
            raise BackendNotSupportedError(f"NIXL could not create agent {context.name!r}: {exc!r}") from None
        missing = [name for name in backends if name not in getattr(self.agent, "backends", {})]
        if missing:  # NIXL skips a backend it has no plugin for with a warning: an agent that registers nothing
            plugins = sorted(getattr(self.agent, "plugin_list", []))
            self.ucx.unwatch(context.name)
            self.agent = None
            raise InvalidArgumentError(
                f"nixl option backends names {missing}, which NIXL has no plugin for here (its plugins: {plugins})"
            )
        self.registered: dict[str, object] = {}  # region -> NIXL's registration descriptors
        self.addresses: dict[str, list[int]] = {}  # region -> [address, nbytes, device index]
        self.links: list[NixlLink] = []
        self.leaked: list = []  # (transfer handle, local region) NIXL could not release yet (keep_unreleased)
        self.kept: list = []  # (region, registration) deregistered while NIXL held a transfer over it
        self.unsettled: list[Region] = []  # local regions of transfers cancelled before they finished
        self.closing = False
        # Requests in flight, oldest first, whether or not their caller kept a handle (an ordered set).
        self.pending: dict[NixlRequest, None] = {}
        self._reap_at = REAP_FROM
        # NIXL name -> incarnation of removed peers whose remote agent is still loaded, oldest first (disconnect).
        self.parked: OrderedDict[str, str] = OrderedDict()
        self._retry_at = RETRY_RELEASES_FROM

    def keep_unreleased(self, handle, region: Region) -> None:
        """Keep ``handle``, which NIXL could not release (a transfer it could not cancel yet), with ``region``, the
        local memory it moves (not deregistered while it is kept), to release it later.

        Each time the kept handles have doubled since the last retry, every one is released again and those
        NIXL lets go are dropped: the list holds about twice the handles NIXL cannot release at once, at an
        amortised cost of a few releases per handle, and :meth:`close` retries what is left."""
        self.leaked.append((handle, region))
        if len(self.leaked) < self._retry_at:
            return
        self.leaked = self._release_leaked()
        self._retry_at = max(RETRY_RELEASES_FROM, 2 * len(self.leaked))

    def note_unsettled(self, region: Region | None) -> None:
        """A transfer over ``region`` was cancelled before it finished: its bytes may still land there, so the
        region is never handed back while the agent lives (:meth:`deregister` keeps it)."""
        if region is not None and not any(r is region for r in self.unsettled):
            self.unsettled.append(region)

    def register(self, region: Region) -> None:
        try:
            self.registered[region.name] = self.agent.register_memory(region.tensor)
        except Exception as exc:
            raise BackendNotSupportedError(f"NIXL cannot register region {region.name!r}: {exc!r}") from None
        self.addresses[region.name] = [region.ptr, region.nbytes, region.info.device_index]

    def _release_leaked(self) -> list:
        """Release the kept handles again; returns those NIXL still holds."""
        still = []
        for handle, region in self.leaked:
            try:
                handle.release()
            except Exception:
                still.append((handle, region))
        return still

    def deregister(self, region: Region) -> None:
        """Forget ``region``.  Requests in flight that move its bytes are given the agent's timeout to finish, and
        cancelled past it (their handles raise ``TransferError``).  Where a transfer over it was cancelled before
        it finished (here, at a handle's deadline, or at a removed peer's sweep), its bytes may still land: the
        region's memory and registration are kept (registered until :meth:`close`, referenced while the agent
        lives), so UCX never writes into memory handed back.  So is a region NIXL refuses to deregister
        (``TransferError`` naming it); :meth:`close` deregisters it again."""
        descs = self.registered.pop(region.name, None)
        self.addresses.pop(region.name, None)
        if not self._settle(region):
            logger.log(
                logging.DEBUG if self.closing else logging.WARNING,
                "transfer agent %r: a NIXL transfer over region %r was cancelled before it finished and may still "
                "write it: the region stays registered and referenced until the agent closes", self.context.name,
                region.name,
            )  # fmt: skip
            self.kept.append((region, descs))
            return
        if descs is None:
            return
        try:
            self.agent.deregister_memory(descs)
        except Exception as exc:
            self.kept.append((region, descs))  # still registered: referenced, and deregistered again at close
            if not _is_nixl_error(exc):
                raise
            kind = type(exc).__name__
            raise TransferError(
                f"NIXL failed to deregister region {region.name!r}: {kind}: {exc}; it stays registered and "
                "referenced until the agent closes",
                details={"region": region.name, "nixl_error": kind},
            ) from None

    def _settle(self, region: Region) -> bool:
        """Let the requests in flight over ``region`` finish, for up to the agent's timeout, then cancel the rest;
        True when no transfer over it can still move bytes (none in flight, none cancelled unfinished)."""
        users = [request for request in self.pending if request.local is region]
        deadline = time.monotonic() + self.context.timeout_s
        pause = 20e-6
        while users:
            now = time.monotonic()
            for request in users:
                request.reap(now)  # released once finished or failed: out of pending
            users = [request for request in users if request in self.pending]
            if not users or now >= deadline:
                break
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        for request in users:
            name = request.link.peer.name
            request.cancel(TransferError(
                f"region {region.name!r} was deregistered while a transfer with peer {name!r} over it was still in "
                f"flight {self.context.timeout_s:g} s later: cancelled (its destination blocks hold undefined data)",
                details={"peer": name, "region": region.name},
            ))  # fmt: skip
        return not any(kept is region for _, kept in self.leaked) and not any(r is region for r in self.unsettled)

    def local_metadata(self) -> dict:
        return {"agent": b64(self.agent.get_agent_metadata()), "regions": dict(self.addresses)}

    def check_peer(self, peer: AgentMetadata) -> None:
        with contextlib.suppress(BackendNotSupportedError):  # regions not registered with NIXL: connect says so
            _peer_section(peer)

    def connect(self, peer: AgentMetadata) -> NixlLink:
        agent_metadata, regions = _peer_section(peer)
        parked = self.parked.pop(peer.name, None)
        if parked is not None and parked != peer.incarnation:  # a restarted peer: NIXL loads it anew only
            self._give_up_on(peer.name, f"peer {peer.name!r} restarted (a new incarnation joined)")
            self._unload(peer.name)
            parked = None
        # Loaded already (parked, or a live link to the same agent that this metadata is to replace): NIXL
        # updates it in place, and a failure below must leave it loaded and tracked, not unload it under the link.
        loaded = parked is not None or any(link.nixl_name == peer.name for link in self.links)
        connected = False
        try:
            try:
                name = self.agent.add_remote_agent(agent_metadata)  # a parked one is updated in place
            except Exception as exc:
                if not _is_nixl_error(exc):
                    raise
                raise BackendNotSupportedError(f"NIXL cannot load peer {peer.name!r}'s metadata: {exc!r}") from None
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != peer.name:  # another agent's section: its transfers and notifications would go there
                loaded_before = name in self.parked or any(k.nixl_name == name for k in self.links)
                if not loaded_before and name != self.context.name:
                    self._unload(name)  # loaded by this call only
                raise InvalidArgumentError(
                    f"peer {peer.name!r}'s metadata carries the NIXL section of agent {name!r}: metadata of one "
                    "agent, unchanged, is what add_peer takes"
                )
            try:
                self.agent.make_connection(name)  # connection set-up now, not in the first transfer
            except Exception as exc:
                if not loaded:
                    self._unload(name)
                if not _is_nixl_error(exc):
                    raise
                raise BackendNotSupportedError(f"NIXL cannot connect to peer {peer.name!r}: {exc!r}") from None
            connected = True
        finally:
            if parked is not None and not connected:
                self.parked[peer.name] = parked  # still loaded: unloaded at close or when pushed out
        link = NixlLink(peer, nixl_name=name, regions=regions)
        self.links.append(link)
        return link

    def disconnect(self, link: NixlLink) -> None:
        """Forget the peer; its NIXL remote agent stays loaded (*parked*).  Unloading the remote agent of a live
        NIXL agent and loading it again leaves UCX's endpoints to it open, two sockets each time, so a peer that
        is added again (new regions, a rejoin) would leak them; a parked agent is updated in place instead.  A
        restarted peer (another incarnation) is unloaded before its new metadata loads; beyond
        :data:`PARKED_PEERS` parked peers the oldest are unloaded."""
        link.removed = True  # its requests in flight go on (NixlRequest)
        if link in self.links:
            self.links.remove(link)
        if any(other.nixl_name == link.nixl_name for other in self.links):
            return  # replaced by a link to the same agent with new metadata: the remote agent is that link's
        self.parked[link.nixl_name] = link.peer.incarnation
        self.parked.move_to_end(link.nixl_name)
        self._trim_parked()

    def _trim_parked(self) -> None:
        """Unload the oldest parked peers beyond :data:`PARKED_PEERS`, skipping those with requests in flight
        (unloading a remote agent fails its transfers, notifications included): they go once those finished."""
        if len(self.parked) <= PARKED_PEERS:
            return
        busy = {request.link.nixl_name for request in self.pending}
        for name in [n for n in self.parked if n not in busy][: len(self.parked) - PARKED_PEERS]:
            del self.parked[name]
            self._unload(name)

    def _give_up_on(self, nixl_name: str, why: str) -> None:
        """Cancel the requests in flight to removed links of ``nixl_name`` (``PeerLostError``), before its remote
        agent is unloaded."""
        for request in [r for r in self.pending if r.link.nixl_name == nixl_name and r.link.removed]:
            request.cancel(PeerLostError(f"{why} while a transfer to it was in flight: cancelled",
                                         details={"peer": request.link.peer.name}))  # fmt: skip

    def _unload(self, nixl_name: str) -> None:
        try:
            self.agent.remove_remote_agent(nixl_name)
        except Exception as exc:
            if not _is_nixl_error(exc):
                raise
            logger.debug("NIXL remove_remote_agent(%r): %r", nixl_name, exc)

    @staticmethod
    def _descs(address: int, device_index: int, offsets: np.ndarray, nbytes: np.ndarray | int):
        """NIXL descriptors ``(address, bytes, device)`` as an ``[n, 3]`` uint64 array (a few blocks are posted as
        lists of tuples instead: :meth:`post_rows`)."""
        descs = np.empty((len(offsets), 3), dtype=np.uint64)
        descs[:, 0] = offsets  # checked offsets, >= 0
        descs[:, 0] += np.uint64(address)  # in uint64: an address past int64's range too
        descs[:, 1] = nbytes
        descs[:, 2] = device_index
        return descs

    def post(self, link: NixlLink, op, local: Region, remote: RegionInfo, table: np.ndarray, notify,
             rows: list | None = None) -> NixlRequest:  # fmt: skip
        if len(table) <= SMALL:
            return self.post_rows(link, op, local, remote, table.tolist() if rows is None else rows, notify)
        address, _, device_index = link.regions[remote.name]
        local_descs = self._descs(local.ptr, local.info.device_index, table[:, 0], table[:, 2])
        remote_descs = self._descs(address, device_index, table[:, 1], table[:, 2])
        return self._post_descs(link, op, local, remote, local_descs, remote_descs, notify)

    def post_rows(self, link: NixlLink, op, local: Region, remote: RegionInfo, rows, notify) -> NixlRequest:
        address, _, device_index = link.regions[remote.name]
        base, local_index = local.ptr, local.info.device_index
        local_descs = [(base + lo, n, local_index) for lo, _, n in rows]
        remote_descs = [(address + ro, n, device_index) for _, ro, n in rows]
        return self._post_descs(link, op, local, remote, local_descs, remote_descs, notify)

    def _post_descs(self, link: NixlLink, op, local: Region, remote: RegionInfo, local_descs, remote_descs, notify
                    ) -> NixlRequest:  # fmt: skip
        try:
            handle = self.agent.initialize_xfer(
                _OPS[op],
                self.agent.get_xfer_descs(local_descs, _MEM[local.info.device]),
                self.agent.get_xfer_descs(remote_descs, _MEM[remote.device]),
                link.nixl_name,
                notify or b"",
            )
        except Exception as exc:
            if not _is_nixl_error(exc):
                raise
            raise _translate(exc, link.peer.name, f"create a {op}") from None
        return self._start(link, handle, op, local)

    def _start(self, link: NixlLink, handle, op: str, local: Region) -> NixlRequest:
        try:
            status = self.agent.transfer(handle)
        except Exception as exc:
            try:
                handle.release()
            except Exception:  # the transfer's own error is the one to report; the handle is released later
                self.keep_unreleased(handle, local)
            if not _is_nixl_error(exc):
                raise
            raise _translate(exc, link.peer.name, f"post a {op}") from None
        request = NixlRequest(self, link, handle, status, local)
        if len(self.pending) >= self._reap_at:
            self.reap()
        elif len(self.pending) > 1:
            self.progress()
        return request

    def progress(self, count: int = PROGRESS_PER_POST) -> None:
        """Check the ``count`` oldest requests in flight (:meth:`NixlRequest.reap`): NIXL sends a notification from
        the check that finds the data arrived, so a transfer whose handle nobody polls gets its notification out by
        the next posts.  A request still in flight goes to the back of the queue."""
        now = time.monotonic()
        for request in list(itertools.islice(self.pending, count)):
            request.reap(now)
            if request in self.pending:
                del self.pending[request]
                self.pending[request] = None

    def reap(self) -> None:
        """Sweep the requests in flight (:meth:`NixlRequest.reap`): those finished, failed or given up are released,
        so requests whose handles were dropped do not pile up.  Run each time the requests in flight have doubled
        since the last sweep: a few state checks per request, amortised."""
        now = time.monotonic()
        for request in list(self.pending):
            request.reap(now)
        self._reap_at = max(REAP_FROM, 2 * len(self.pending))
        self._trim_parked()  # parked peers kept for their requests in flight

    def prepare(self, link: NixlLink, local: Region, remote: RegionInfo, layout: BlockLayout) -> NixlPrepared:
        address, _, device_index = link.regions[remote.name]
        size = layout.block_bytes

        def side(base: int, dev: int, count: int) -> np.ndarray:
            return self._descs(base, dev, np.arange(count, dtype=np.int64) * size, size)

        local_side = None
        try:
            local_descs = side(local.ptr, local.info.device_index, layout.local_blocks)
            local_side = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_descs, _MEM[local.info.device])
            remote_side = self.agent.prep_xfer_dlist(
                link.nixl_name, side(address, device_index, layout.remote_blocks), _MEM[remote.device]
            )
        except Exception as exc:
            if local_side is not None:  # the remote side failed: the local list made for it goes too
                try:
                    local_side.release()
                except Exception as release_exc:  # the failure to report is the prepare's
                    logger.debug("NIXL could not release a local descriptor list: %r", release_exc)
            if not _is_nixl_error(exc):
                raise
            raise _translate(exc, link.peer.name, "prepare descriptor lists") from None
        return NixlPrepared(link, local, remote, layout, local_side, remote_side)

    def post_blocks(self, prepared: NixlPrepared, op: str, ids: np.ndarray, notify) -> NixlRequest:
        link = prepared.link
        try:
            handle = self.agent.make_prepped_xfer(
                _OPS[op], prepared.local_side, ids[:, 0].astype(np.int32), prepared.remote_side,
                ids[:, 1].astype(np.int32), notify or b"",
            )  # fmt: skip
        except Exception as exc:
            if not _is_nixl_error(exc):
                raise
            raise _translate(exc, link.peer.name, f"create a prepared {op}") from None
        return self._start(link, handle, op, prepared.local)

    def release_prepared(self, prepared: NixlPrepared) -> None:
        for side in (prepared.local_side, prepared.remote_side):
            if side is not None:
                side.release()
        prepared.local_side = prepared.remote_side = None

    def notifications(self) -> list[tuple[str, bytes]]:
        if self.pending:
            self.progress()  # this agent's own transfers nobody polls send their notifications too
        try:
            arrived = self.agent.get_new_notifs()
        except Exception as exc:
            if not _is_nixl_error(exc):
                raise
            kind = type(exc).__name__
            raise TransferError(
                f"NIXL failed to read notifications: {kind}: {exc}", details={"nixl_error": kind}
            ) from None
        out = []
        for sender, messages in arrived.items():
            # A name from the wire: bytes that are not UTF-8 are replaced, as an ipc ring's are (notify.py).
            name = sender.decode(errors="replace") if isinstance(sender, bytes) else str(sender)
            out.extend((name, bytes(message)) for message in messages)
        return out

    def note_transport(self, link: NixlLink) -> None:
        """After the first completed transfer with ``link``'s peer: log the transports UCX chose, once."""
        if link.transport is not None:
            return
        locality = "intra-node" if link.peer.same_host(self.context.identity) else "inter-node"
        link.transport = self.ucx.describe(self.context.name, locality)
        rma = self.ucx.transports(self.context.name, locality).get("rma", [])
        gpu = any(info.device == "cuda" for info in link.peer.regions.values())
        slow = gpu and rma and all(t.startswith("tcp") for t in rma)
        level = logging.WARNING if slow else logging.INFO
        logger.log(level, "transfer agent %r: peer %r over NIXL: %s", self.context.name, link.peer.name, link.transport)

    def transport(self, link: NixlLink) -> str | None:
        return link.transport

    def cancel_in_flight(self) -> None:
        self.closing = True
        for request in list(self.pending):  # cancelled before their memory is deregistered
            request.cancel_at_close()

    def close(self) -> None:
        self.cancel_in_flight()
        for link in list(self.links):
            self.disconnect(link)
        while self.parked:
            self._unload(self.parked.popitem()[0])
        for name in list(self.registered):
            descs = self.registered.pop(name)
            try:
                self.agent.deregister_memory(descs)
            except Exception as exc:
                logger.debug("NIXL deregister_memory(%r): %r", name, exc)
        self.leaked = self._release_leaked()
        if self.leaked:
            logger.debug("NIXL could not release %d transfer handles at close", len(self.leaked))
        held = [region for _, region in self.leaked]
        kept = []
        for region, descs in self.kept:  # deregistered while a transfer was held or unsettled
            if descs is not None and not any(r is region for r in held):
                try:
                    self.agent.deregister_memory(descs)
                except Exception as exc:
                    logger.debug("NIXL deregister_memory(%r): %r", region.name, exc)
                descs = None
            kept.append((region, descs))  # the memory stays referenced while this backend lives
        self.kept = kept
        if self.agent is not None:
            self.ucx.unwatch(self.context.name)
        self.agent = None


def _peer_section(peer: AgentMetadata) -> tuple[bytes, dict[str, tuple[int, int, int]]]:
    """``(NIXL agent metadata, region -> (address, nbytes, device index))`` of the peer's ``nixl`` section, every
    field checked (``InvalidArgumentError`` naming it) before NIXL reads any of it; every region of the peer's
    metadata must be registered with NIXL, at least as large as the metadata says."""
    top = MetadataField(f"peer {peer.name!r}'s nixl section", peer.transports["nixl"])
    blob = top.mapping()
    encoded = top.item(blob, "agent")
    try:
        agent_metadata = unb64(encoded.text(MAX_METADATA_BYTES))
    except ValueError:
        raise encoded.bad("NIXL agent metadata in base64") from None
    listed_field = top.item(blob, "regions")
    listed = listed_field.mapping()
    missing = sorted(set(peer.regions) - set(listed))
    if missing:
        raise BackendNotSupportedError(f"peer {peer.name!r} did not register {missing} with NIXL")
    regions = {}
    for name, info in peer.regions.items():
        field = MetadataField(f"{listed_field.what} {name!r}", listed[name])
        entry = field.value
        if not isinstance(entry, list) or len(entry) != 3:
            raise field.bad("[address, nbytes, device index]")
        address, nbytes, device = (
            MetadataField(field.what, value).integer(0, (1 << 64) - 1) for value in entry
        )  # fmt: skip
        if nbytes < info.nbytes:
            raise field.bad(f"a registration of at least the region's {info.nbytes} bytes")
        if address + nbytes > 1 << 64:
            raise field.bad("a registration that ends inside the 64-bit address space")
        regions[name] = (address, nbytes, device)
    return agent_metadata, regions


register_transfer_backend("nixl", NixlBackend, is_available=nixl_available, priority=50)
