"""The ``ipc`` transfer backend: GPU to GPU inside one host, one kernel launch per block list.

Each peer's registered pools are mapped into this process once, at ``add_peer`` (CUDA IPC handles of the
allocations that hold them; shared files under the Triton interpreter, where the same path runs on CPU
tensors).  A write or read of any number of blocks is one launch of ``kernels/block_copy.py`` over the two
mappings, on this agent's transfer stream (which first waits for the caller's current stream, so the copy
sees what the caller's kernels wrote).  A one-block request names its block in the launch's arguments (no
table to read; each link keeps such launches' bound arguments per shape, and a call fills in the block and
calls the compiled binary's launcher); one of at least ``COPY_ENGINE_BYTES`` is a copy-engine copy
(``cudaMemcpyAsync``, faster than any kernel for one long block; a memory copy under the interpreter) followed,
when it notifies, by a one-program launch that only publishes the notification; one of up to
``RESIDENT_MAX_BYTES`` goes to a program that stays on the GPU instead (``ipc_resident.py``; the option
``resident``: on by default on GPUs) when no launch is in flight and the caller's stream is idle.  The last
program publishes the notification into the peer's inbox ring (``notify.py``) after every byte, so the
receiver's host learns of it without a round trip per block; the initiator's handle completes on a CUDA event
recorded after the launch (launches on the one stream complete in order, so the agent retires them from the
oldest and reuses their events and staging buffers).

Whether a peer is reachable is decided by a real copy: at ``add_peer`` the kernel reads the peer's 16-byte
probe token through the mapping and compares it with the token in the peer's metadata.  A peer that exited is
detected by its inbox lock (``shared.py``): a transfer to it is refused before any byte moves, and a handle
whose peer died before the completion was observed fails with ``PeerLostError``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
import weakref
from abc import abstractmethod
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CommTimeoutError,
    InvalidArgumentError,
    P2PFailedError,
    PeerLostError,
    UnavailableError,
    run_every,
    undo_after_failure,
)
from sagellm_comm.kernels import block_copy as _bc
from sagellm_comm.launch import Launcher, interpreting
from sagellm_comm.transfer.base import AgentContext, Link, Prepared, Request, TransferBackend
from sagellm_comm.transfer.descriptors import SMALL, BlockLayout, Region, RegionInfo, split_rows
from sagellm_comm.transfer.ipc_memory import Allocation, CudaEvents, PeerMaps, Staging, device_memory, keep_for_life
from sagellm_comm.transfer.ipc_resident import QueuedUndecidedError, ResidentCopier
from sagellm_comm.transfer.metadata import AgentMetadata, MetadataField, b64, unb64
from sagellm_comm.transfer.notify import Inbox, Outbox
from sagellm_comm.transfer.registry import register_transfer_backend
from sagellm_comm.transfer.shared import shared_cpu_tensor, shared_file_of, transfer_path, transfer_rule

logger = logging.getLogger("sagellm_comm.transfer")
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU builds of torch

PART_BYTES = 64 * 1024  # longest work item: longer blocks are cut (kernels/block_copy.py)
MIN_PART_BYTES = 8 * 1024  # a one-block request is cut into items of 8-64 KB, about one per program
COPY_ENGINE_BYTES = 1 << 20  # a one-block request at least this long goes to the copy engine (on a GPU)
PROBE_BYTES = 256
TOKEN_BYTES = 16
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
MAX_PLANS = 256  # one-block launch plans per link (a few per block size in practice); beyond, start over
MAX_SIZES = 4096  # one-block sizes whose cut into items is kept (IpcBackend._cut); beyond, start over
RESIDENT_MAX_BYTES = 64 * 1024  # a one-block request up to this long may go to the resident copier (one warp copies it)
RESIDENT_IDLE_US = 1000  # the resident copier exits after this long without a request
RESIDENT_LIFE_US = 20000  # ... and once it has run this long (the next request starts it again)
ALIVE_REUSE_S = 1e-3  # a post within this long of a check that found the peer alive skips the next check
# The one-block launch's arguments that change from call to call (the others are the link's, or follow from these).
INLINE_ARGUMENTS = ("table_addr", "src_base", "dst_base", "block_bytes", "parts", "part_bytes")
KEY_BYTES = 16  # an agent's key among this process's live agents (_LIVE), random
IPC_HANDLE_BYTES = 64  # a cudaIpcMemHandle_t
# This process's live ipc agents by key: a peer in this process is found here (IpcBackend.memory_for), so the
# addresses it is used at are those its agent registered, never those its metadata's bytes give.
_LIVE: weakref.WeakValueDictionary[str, IpcBackend] = weakref.WeakValueDictionary()


def ipc_available() -> bool:
    """The copy kernel can run here: under the Triton interpreter (CPU), or on a CUDA GPU with CuPy."""
    if interpreting():
        return True
    if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        raise BackendNotSupportedError("no CUDA GPU here (and not under the Triton interpreter, TRITON_INTERPRET=1)")
    from sagellm_comm.cupy_probe import require_cupy

    require_cupy("the ipc transfer backend")
    return True


@dataclass
class IpcLink(Link):
    addresses: dict[str, int] = field(default_factory=dict)  # peer region -> address in this process
    maps: PeerMaps | None = None
    outbox: Outbox | None = None
    registered: tuple[int, int] | None = None  # host-registered ring pages (CUDA)
    published: torch.Tensor | None = None  # device word: notifications the kernel published to this peer
    published_addr: int = 0  # its address
    # Whether this link releases the notification channel (outbox, published, registered) when removed: a link
    # that replaces a live one to the same peer incarnation takes the channel over instead of claiming a slot.
    owns_channel: bool = True
    alive_until: float = 0.0  # monotonic time until which a post trusts the last check that found the peer alive
    # A peer in this process: its regions (and probe) the link holds as a mapping would, until it is released.
    held: tuple = ()
    # Set when the link is removed: every launch to the peer had completed and the peer was alive after them.
    completed_alive: bool = False
    last: int = 0  # number of this agent's latest launch that touches the peer's memory
    resident_last: int = 0  # number of this agent's latest resident-copier request that touches it
    # ... and of the latest of each that publishes into the notification channel (carried to a link taking it over)
    notify_last: int = 0
    notify_resident_last: int = 0
    # One-block launches: shape (IpcBackend._one_block) -> (direct launch, its arguments, filled per call).
    plans: dict[tuple, tuple] = field(default_factory=dict)


class _LinkRequest(Request):
    """A request to one peer's memory: done once :meth:`_finished` says so and the peer is still there."""

    __slots__ = ("backend", "link")

    @abstractmethod
    def _finished(self) -> bool:
        """Every byte of the request was copied."""

    def poll(self) -> bool:
        name = self.link.peer.name
        if self.link.removed:
            if self.link.completed_alive and self._finished():
                return True  # completed before the removal: not in flight
            raise PeerLostError(
                f"peer {name!r} was removed while the transfer was in flight", details={"peer": name, "op": "ipc"}
            )
        if not self._finished():
            return False
        if not self.link.outbox.liveness.alive():
            raise PeerLostError(
                f"peer {name!r} exited before the transfer was seen complete; treat its blocks as not delivered",
                details={"peer": name},
            )
        self.link.alive_until = time.monotonic() + ALIVE_REUSE_S
        return True


class IpcRequest(_LinkRequest):
    __slots__ = ("number", "event")

    def __init__(self, backend: IpcBackend, link: IpcLink, number: int, event):
        self.backend = backend
        self.link = link
        self.number = number
        self.event = event  # valid while the launch is in flight (then reused)

    def _finished(self) -> bool:
        return self.backend.finished(self.number)

    def abort(self) -> None:
        pass  # a launched kernel cannot be stopped; its event and staging buffer are reused once it completes

    def wait_on_stream(self, stream: torch.cuda.Stream, deadline: float) -> None:
        if not self.backend.finished(self.number):  # in flight: its event is not reused yet
            self.backend.events.wait(stream.cuda_stream, self.event)


class ResidentRequest(_LinkRequest):
    """A one-block request served by the resident copier (``ipc_resident.py``): done once the copier's count of
    served requests reached its number."""

    __slots__ = ("seq",)

    def __init__(self, backend: IpcBackend, link: IpcLink, seq: int):
        self.backend = backend
        self.link = link
        self.seq = seq

    def _finished(self) -> bool:
        return self.backend.copier.completed() >= self.seq

    def abort(self) -> None:
        pass  # the copier serves every request it was given; its mailbox entry is reused after that

    def wait_on_stream(self, stream: torch.cuda.Stream, deadline: float) -> None:
        # Served within microseconds: a host wait up to the handle's deadline, nothing to enqueue.
        self.backend.copier.wait(self.seq, deadline, peer=self.link.peer.name)


class IpcBackend(TransferBackend):
    """See the module docstring."""

    name = "ipc"

    def __init__(self, context: AgentContext):
        super().__init__(context)
        options = dict(context.options.get("ipc", {}))
        programs = options.pop("max_programs", None)  # checked before anything else, available here or not
        self.programs_option = None if programs is None else check_int(programs, "ipc option max_programs", 1, 65535)
        resident = options.pop("resident", None)
        if resident is not None and not isinstance(resident, bool):
            raise InvalidArgumentError(f"ipc option resident must be True or False, got {resident!r}")
        self.resident_option = resident
        self.resident_idle_us = check_int(options.pop("resident_idle_us", RESIDENT_IDLE_US), "ipc option "
                                          "resident_idle_us", 0, 10**6)  # fmt: skip
        self.resident_life_us = check_int(options.pop("resident_life_us", RESIDENT_LIFE_US), "ipc option "
                                          "resident_life_us", 1, 10**7)  # fmt: skip
        if options:
            raise InvalidArgumentError(
                f"unknown ipc options {sorted(options)} (known: max_programs, resident, resident_idle_us, "
                "resident_life_us)"
            )
        ipc_available()
        self.device: torch.device | None = None
        # The probe's memory (a shared file's tensor on the CPU, an Allocation on a GPU), freed with the last
        # reference: this agent's, and those of other agents' links whose test copy from it may still run.
        self._probe_memory: torch.Tensor | Allocation | None = None
        self.inbox = Inbox()
        # Each registered region and its export (what peers map; a peer in this process uses the region itself).
        self.exported: dict[str, tuple[Region, dict]] = {}
        self.links: list[IpcLink] = []
        # Removed links whose launches were still running at the removal's deadline: their inbox slot (while a
        # notifying launch may still publish into it) and mappings are released by later calls (_retry_unreleased).
        self.unreleased: list[IpcLink] = []
        self.copier: ResidentCopier | None = None
        self._closed = False
        # Held by another agent of this process while it reads this agent's memory (lend_to), and by close().
        self.lending = threading.RLock()
        self.key = secrets.token_hex(KEY_BYTES)
        _LIVE[self.key] = self

    # ------------------------------------------------------------------ device state
    def _setup(self, device: torch.device) -> None:
        """Bind to ``device`` (the first GPU region's, or the CPU under the interpreter): probe, counter, stream.
        A bind that fails (a full /dev/shm, no GPU memory for the probe) releases what it made: the next call
        binds afresh."""
        if self.device is not None:
            return
        try:
            self._bind(device)
        except BaseException:  # the bind's own error says what went wrong
            undo_after_failure([self._unbind], logger, f"transfer agent {self.context.name!r}: releasing the ipc "
                               f"transport's device state after a failed bind to {device} raised")  # fmt: skip
            raise

    def _unbind(self) -> None:
        """Release what a failed :meth:`_bind` made and mark the backend unbound (the next call binds afresh),
        every step run when one raises; the first error is raised after them."""
        copier, staging, events = self.copier, getattr(self, "staging", None), getattr(self, "events", None)
        self.copier = self.staging = self.events = self.probe = self._probe_memory = None  # the probe freed
        self.device = None
        steps = []
        if copier is not None:
            steps.append(copier.close)
        if staging is not None:
            steps.append(functools.partial(staging.close, in_use=False))
        if events is not None:
            steps.append(events.close)
        run_every(steps)

    def _bind(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.memory = device_memory(device)
        self.use_ptx = cuda
        self.index = device.index or 0
        self.token = secrets.token_bytes(TOKEN_BYTES)
        if cuda:
            self._probe_memory = Allocation(self.memory, PROBE_BYTES)
            self.probe = self._probe_memory.ptr
            probe = {"handle": b64(self.memory.export(self.probe)), "size": PROBE_BYTES}
        else:
            self._probe_memory = shared_cpu_tensor(PROBE_BYTES, torch.uint8)
            self.probe = self._probe_memory.data_ptr()
            path, offset = shared_file_of(self.probe, PROBE_BYTES)
            probe = {"path": path, "offset": offset, "size": os.path.getsize(path)}
        self.probe_export = {"address": self.probe, "token": self.token.hex(), **probe}
        self._bytes_at(self.probe, TOKEN_BYTES).copy_(torch.frombuffer(bytearray(self.token), dtype=torch.uint8))
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.scratch = torch.zeros(TOKEN_BYTES, dtype=torch.uint8, device=device)
        self.staging = Staging(pinned=cuda)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.raw_stream = self.stream.cuda_stream if cuda else 0
        self.events = CudaEvents(self.raw_stream) if cuda else None
        self.stream_query = self.events.rt.streamQuery if cuda else None  # 0: every kernel of the stream finished
        self.launches = 0  # launches so far, numbered from 1
        self.kept: list[Region] = []  # deregistered regions that copies still running may touch
        self.completed = 0  # every launch up to this number completed
        # ``completed`` (and the resident copier's count) when a drain last timed out; -1: none did
        self._stalled_at = self._resident_stalled_at = -1
        self.in_flight: deque = deque()  # (number, event, staging index or None), oldest first
        self.launcher = Launcher(_bc.block_copy_kernel, cuda, self.index, num_warps=4)
        self.inline_slots = tuple(map(self.launcher.names.index, INLINE_ARGUMENTS))  # where a plan fills them
        self.cuts: dict[int, tuple] = {}  # one block's nbytes -> its cut into items (_cut)
        if cuda:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self.max_programs = self.programs_option or sms * PROGRAMS_PER_SM
            if not self.memory.host_pointer_usable():
                raise BackendNotSupportedError(f"{device} cannot use host pointers of registered host memory")
        else:
            self.max_programs = INTERPRETER_PROGRAMS
        # The resident copier: on GPUs unless turned off (docs/transfer.md: what it saves, what it costs); under
        # the interpreter, which runs a program to its end in the launching thread, only when asked for.
        if self.resident_option or (self.resident_option is None and cuda):
            self.copier = ResidentCopier(device, self.resident_idle_us * 1000, self.resident_life_us * 1000,
                                         self.context.timeout_s)  # fmt: skip

    def _bytes_at(self, ptr: int, nbytes: int) -> torch.Tensor:
        from sagellm_comm.ipc import tensor_at

        return tensor_at(ptr, nbytes, torch.uint8, self.device, owner=self)

    def _default_device(self) -> torch.device:
        if self.context.device is not None:
            return self.context.device
        if interpreting():
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    # ------------------------------------------------------------------ regions and metadata
    def register(self, region: Region) -> None:
        info = region.info
        if interpreting() and info.device != "cpu":
            raise BackendNotSupportedError("under the Triton interpreter the ipc transport moves CPU regions only")
        if not interpreting() and info.device != "cuda":
            raise BackendNotSupportedError(
                "the ipc transport moves GPU memory (CPU regions go through NIXL; the ipc path runs CPU regions "
                "only under the Triton interpreter, TRITON_INTERPRET=1)"
            )
        self._setup(region.tensor.device)
        if info.device == "cuda" and info.device_index != self.index:
            raise BackendNotSupportedError(f"region {info.name!r} is on cuda:{info.device_index}, not {self.device}")
        export = {"address": region.ptr}
        try:
            if info.device == "cuda":  # size: of the allocation the handle maps, for the peer's bounds check
                handle, offset, size = self.memory.export_range(region.ptr)
                export.update(handle=b64(handle), offset=offset, size=size)
            else:
                path, offset = shared_file_of(region.ptr, info.nbytes)
                if transfer_path(path) is None:  # peers map transfer files only
                    raise BackendNotSupportedError(
                        f"region {info.name!r} is a mapping of {path}, which the ipc transport does not share: it "
                        f"maps {transfer_rule()}; allocate the region with TransferAgent.allocate"
                    )
                export.update(path=path, offset=offset, size=os.path.getsize(path))
        except P2PFailedError as exc:
            raise BackendNotSupportedError(exc.message) from None
        self.exported[info.name] = (region, export)

    def deregister(self, region: Region) -> None:
        self.exported.pop(region.name, None)
        # A launch or resident request in flight may still read or write the region: its memory stays referenced
        # until they completed (bounded by the agent's timeout; past it, or when the stream failed, kept for the
        # process's life).
        try:
            drained = self._drain(self.launches) and self._drain_resident(self.copier.posted if self.copier else 0)
        except BaseException:
            self.kept.append(region)
            raise
        if not drained:
            logger.warning(
                "transfer agent %r: copies still running after %g s when region %r was deregistered; its memory "
                "stays referenced", self.context.name, self.context.timeout_s, region.name,
            )  # fmt: skip
            self.kept.append(region)

    def local_metadata(self) -> dict:
        self._setup(self._default_device())
        return {
            "key": self.key,
            "inbox": self.inbox.path,
            "device": self.device.type,
            "probe": dict(self.probe_export),
            "regions": {name: dict(export) for name, (_, export) in self.exported.items()},
        }

    # ------------------------------------------------------------------ peers
    def check_peer(self, peer: AgentMetadata) -> None:
        _peer_section(peer)

    def connect(self, peer: AgentMetadata) -> IpcLink:
        me, blob = self.context.identity, _peer_section(peer)
        if not peer.same_host(me):
            raise BackendNotSupportedError(
                f"peer {peer.name!r} runs on host {peer.host!r} and this agent on {me.host!r}: CUDA IPC maps memory "
                "inside one host"
            )
        if self.unreleased:  # slots of removed links given back before this link claims one
            self._retry_unreleased()
        self._setup(self._default_device())
        if blob["device"] != self.device.type:
            raise BackendNotSupportedError(
                f"peer {peer.name!r} moves {blob['device']} memory, this agent {self.device} memory"
            )
        if blob.get("unreachable"):
            raise BackendNotSupportedError(
                f"peer {peer.name!r} could not share region(s) through ipc: "
                + "; ".join(f"{k}: {v}" for k, v in blob["unreachable"].items())
            )
        link = IpcLink(peer, maps=PeerMaps(self.memory, self.index, []))
        # A live link to the same incarnation (new metadata, or the same again): its notification channel goes on
        # in the new link, in order, instead of a second slot of the peer's inbox (the old one would stay held
        # until the peer read everything sent through it).
        old = next(
            (
                other for other in self.links
                if other.peer.name == peer.name and other.peer.incarnation == peer.incarnation
                and other.owns_channel and other.outbox is not None and other.outbox.peer_path == blob["inbox"]
            ),
            None,
        )  # fmt: skip
        # A peer in this process: its close waits until its probe was read (and, on a failure, until the test copy
        # was waited for again by the release); a copy still running then keeps the probe allocated through the
        # link's hold on it (kept by _release until the copy completed), so it is never freed under the copy.
        borrowed = contextlib.ExitStack()
        try:
            if peer.same_process(me):  # one address space: the regions its live agent registered, held
                live = _LIVE.get(blob["key"]) if blob["key"] else None
                if live is None:
                    raise _no_live_agent(peer, blob["key"])
                link.addresses, link.held = borrowed.enter_context(live.lend_to(peer, blob))
            else:
                for name, export in {**blob["regions"], "\0probe": blob["probe"]}.items():
                    link.addresses[name] = self._open(link.maps, export, peer, name)
            if old is not None:
                link.owns_channel = False  # until it connected: a failure here leaves the channel to the old link
                link.outbox, link.published, link.published_addr = old.outbox, old.published, old.published_addr
                link.registered = old.registered
                link.notify_last, link.notify_resident_last = old.notify_last, old.notify_resident_last
            else:
                link.outbox = Outbox(blob["inbox"], self.context.name, self.inbox.path, self.context.timeout_s,
                                     peer=peer.name)  # fmt: skip
                link.published = torch.zeros(1, dtype=torch.int64, device=self.device)
                link.published_addr = link.published.data_ptr()
                if self.device.type == "cuda":
                    address, nbytes = link.outbox.slot_range
                    self.memory.host_register(address, nbytes)
                    link.registered = (address, nbytes)
            self._probe(link, blob["probe"]["token"])
        except BaseException as exc:  # whatever failed, the slot, handles and mappings taken so far are let go
            self._release(link)
            # No free slot, the claim lock held, or the test copy not done in time (a GPU busy with other work):
            # a condition of now, not a transport that cannot reach the peer: add it again later.
            if isinstance(exc, UnavailableError | CommTimeoutError):
                raise UnavailableError(
                    f"peer {peer.name!r} cannot be added over ipc now: {exc.message}; add the peer again later",
                    details={**exc.details, "peer": peer.name},
                ) from None
            if isinstance(exc, BackendNotSupportedError | InvalidArgumentError) or not isinstance(exc, Exception):
                raise  # InvalidArgumentError: a path of the metadata that is not a transfer file
            # Anything else (a failed mapping, malformed metadata: a missing key, a token that is not hex...).
            raise BackendNotSupportedError(f"cannot map peer {peer.name!r}'s memory: {exc!r}") from None
        finally:
            borrowed.close()
        if old is not None:
            old.owns_channel, link.owns_channel = False, True
        self.links.append(link)
        return link

    def _open(self, maps: PeerMaps, export: dict, peer: AgentMetadata, name: str) -> int:
        """The address of another process's export (region ``name``, or the probe) in this process: where its
        handle or file is mapped, plus its offset (the address in the metadata is the peer's own, never used here).
        A file is mapped only once it is a transfer file; the file or CUDA allocation must hold what the metadata
        claims (``PeerMaps.open``), else ``InvalidArgumentError`` naming the peer and the export."""
        key = export["path"] if "path" in export else export["handle"]
        try:
            base = maps.open(key, export["offset"] + export["nbytes"])
        except InvalidArgumentError as exc:
            what = "the probe" if name == "\0probe" else f"region {name!r}"
            raise InvalidArgumentError(
                f"peer {peer.name!r}'s ipc section: {what}: {exc.message}", details={"peer": peer.name, "field": what}
            ) from None
        return base + export["offset"]

    @contextlib.contextmanager
    def lend_to(self, peer: AgentMetadata, blob: dict) -> Iterator[tuple[dict[str, int], tuple]]:
        """``with`` it around another agent of this process taking and reading this agent's memory (its ``add_peer``:
        the addresses, then the test copy from the probe): yields :meth:`memory_for`'s answer, and this agent's
        :meth:`close` waits until the block ends (bounded by that agent's timeout: its test copy's wait).  The probe
        (on a GPU, memory that nothing else holds) is among the memory yielded to be held: a test copy still running
        when the block ends keeps it allocated, whatever this agent does, until the copy completed.  An agent that
        closed first is refused as :meth:`memory_for` refuses it (``InvalidArgumentError``: no live agent)."""
        with self.lending:
            yield self.memory_for(peer, blob)

    def memory_for(self, peer: AgentMetadata, blob: dict) -> tuple[dict[str, int], tuple]:
        """This agent's memory as described by ``peer`` (this agent's metadata as another agent of this process was
        given it; ``blob``: its ipc section, checked): the addresses of the regions and the probe as this agent
        registered them, and the memory of the regions and the probe (the other agent's link holds it as a mapping
        would).  The metadata must describe them field for field as this agent does now; anything else (forged or
        damaged bytes, a region deregistered since, this agent closed since) is an ``InvalidArgumentError`` naming
        the peer and the field: the addresses in the bytes are never used."""
        if self._closed or self.device is None:
            raise _no_live_agent(peer, blob["key"])
        what, section = f"peer {peer.name!r}'s ipc section", peer.transports["ipc"]
        _same(peer, what, {"inbox": section["inbox"], "device": section["device"]},
              {"inbox": self.inbox.path, "device": self.device.type})  # fmt: skip
        _same(peer, f"{what}: 'probe'", section["probe"], self.probe_export)
        addresses, held = {"\0probe": self.probe}, [self._probe_memory]
        for name in blob["regions"]:
            region, export = self.exported.get(name, (None, None))
            if region is None:
                raise InvalidArgumentError(
                    f"{what}: region {name!r} is not registered with that agent (deregistered since the metadata "
                    "was made); add the peer with its current metadata",
                    details={"peer": peer.name, "field": f"regions.{name}"},
                )
            _same(peer, f"peer {peer.name!r}'s region {name!r}", peer.regions[name].to_json(), region.info.to_json())
            _same(peer, f"{what}: region {name!r}", section["regions"][name], export)
            addresses[name] = region.ptr
            held.append(region)
        return addresses, tuple(h for h in held if h is not None)

    def _probe(self, link: IpcLink, token: bytes) -> None:
        """The real test copy: the kernel reads the peer's token through the mapping (no notification).  Waited for
        up to the agent's timeout (the launch follows the caller's current stream, which may not drain), then read
        back on the transfer stream (not behind the caller's)."""
        self.scratch.zero_()
        request = self._one_block(link, link.addresses["\0probe"], self.scratch.data_ptr(), TOKEN_BYTES, None)
        if isinstance(request, ResidentRequest):
            self.copier.wait(request.seq, peer=link.peer.name)
        elif self.stream is not None and not self._drain(request.number):
            name = link.peer.name
            raise CommTimeoutError(
                f"the peer access test copy from peer {name!r} did not complete within {self.context.timeout_s:g} s "
                "(the transfer stream waits for the caller's current stream, which has not drained)",
                details={"peer": name},
            )
        with torch.cuda.stream(self.stream):
            got = bytes(self.scratch.cpu().numpy())
        if got != token:
            raise BackendNotSupportedError(
                f"peer access test failed: read {got.hex()} from peer {link.peer.name!r}'s probe through the "
                f"mapping, expected {token.hex()}"
            )

    def disconnect(self, link: IpcLink) -> None:
        link.removed = True
        if link in self.links:
            self.links.remove(link)
        self._release(link)
        if self.unreleased:
            self._retry_unreleased()

    def _release(self, link: IpcLink) -> None:
        """Unmap the peer once no launch of this agent may still touch its memory (bounded: a launch stuck
        behind other work past the agent's timeout keeps its mappings, leaked, rather than lose them under it).
        The slot of the peer's inbox is given back once nothing in flight publishes into it, even when a launch
        without a notification (``add_peer``'s test copy) keeps the mappings: a retried ``add_peer`` would
        otherwise hold one more slot of the peer's inbox each time."""
        if not self._drain(link.last) or not self._drain_resident(link.resident_last):
            if self._done(link.notify_last, link.notify_resident_last):
                self._release_channel(link)
            logger.warning(
                "transfer agent %r: launches to peer %r still running after %g s; its mappings stay open (released "
                "by a later call once they completed)", self.context.name, link.peer.name, self.context.timeout_s,
            )  # fmt: skip
            if link not in self.unreleased:
                self.unreleased.append(link)
            return
        self._unmap(link)

    def _unmap(self, link: IpcLink) -> None:
        """Release everything of ``link``: no launch of this agent touches the peer any more."""
        # Requests that completed before this are done, not lost (their handles may be polled after the removal).
        link.completed_alive = link.outbox is not None and link.outbox.liveness.alive()
        self._release_channel(link)
        if link.maps is not None:
            link.maps.close()
        link.held = ()

    def _done(self, last: int, resident_last: int) -> bool:
        """Whether launch ``last`` and resident-copier request ``resident_last`` completed (no wait)."""
        copier = self.copier
        return self.finished(last) and (copier is None or copier.completed() >= resident_last)

    def _retry_unreleased(self) -> None:
        """Release what removed links kept (:meth:`_release`) as far as their launches completed since, without
        waiting: the inbox slot once no notifying launch is in flight, the mappings once no launch is."""
        still = []
        for link in self.unreleased:
            if self._done(link.last, link.resident_last):
                self._unmap(link)
                continue
            if link.outbox is not None and self._done(link.notify_last, link.notify_resident_last):
                self._release_channel(link)
            still.append(link)
        self.unreleased = still

    def _release_channel(self, link: IpcLink) -> None:
        """Give back the link's notification channel (its slot of the peer's inbox and the slot's registration),
        unless a link that replaced this one goes on with it."""
        if link.owns_channel:
            if link.registered is not None:
                self.memory.host_unregister(link.registered[0])
            if link.outbox is not None:
                link.outbox.release()
        link.registered = None
        link.outbox = None

    # ------------------------------------------------------------------ transfers
    def post(self, link, op, local: Region, remote: RegionInfo, table: np.ndarray, notify,
             rows: list | None = None) -> IpcRequest:  # fmt: skip
        if len(table) == 1:
            lo, ro, n = table[0].tolist() if rows is None else rows[0]
            return self.post_one(link, op, local, remote, lo, ro, n, notify)
        self._check_alive(link)
        remote_address = link.addresses[remote.name]
        if len(table) <= SMALL:  # Python ints are cheaper than numpy calls for a few blocks
            listed = table.tolist() if rows is None else rows
            longest, bits = max(r[2] for r in listed), 0
            for r in listed:
                bits |= r[0] | r[1] | r[2]
        else:
            longest, bits = int(table[:, 2].max()), int(np.bitwise_or.reduce(table, axis=None))
        if op == "write":
            src, dst, rows = local.ptr, remote_address, table
        else:
            src, dst, rows = remote_address, local.ptr, table[:, [1, 0, 2]]
        if longest > PART_BYTES:
            rows = split_rows(rows, PART_BYTES)
            bits |= PART_BYTES
        return self._table_launch(link, src, dst, rows, notify, None, bits)

    def post_one(self, link, op, local: Region, remote: RegionInfo, local_offset: int, remote_offset: int,
                 nbytes: int, notify) -> IpcRequest:  # fmt: skip
        """One block, once the peer is known alive (its last check is read in line: most posts trust it), by
        :meth:`_one_block` in its direction."""
        if time.monotonic() >= link.alive_until:
            self._check_alive(link)
        if op == "write":
            return self._one_block(link, local.ptr + local_offset, link.addresses[remote.name] + remote_offset,
                                   nbytes, notify)  # fmt: skip
        return self._one_block(link, link.addresses[remote.name] + remote_offset, local.ptr + local_offset, nbytes,
                               notify)  # fmt: skip

    def prepare(self, link, local: Region, remote: RegionInfo, layout: BlockLayout) -> Prepared:
        return Prepared(link, local, remote, layout)

    def post_blocks(self, prepared: Prepared, op: str, ids: np.ndarray, notify) -> IpcRequest:
        if len(ids) == 1:
            local_block, remote_block = ids[0].tolist()
            return self.post_one_id(prepared, op, local_block, remote_block, notify)
        link = prepared.link
        self._check_alive(link)
        remote_address = link.addresses[prepared.remote.name]
        block_bytes = prepared.layout.block_bytes
        if op == "write":
            src, dst, rows = prepared.local.ptr, remote_address, ids
        else:
            src, dst, rows = remote_address, prepared.local.ptr, ids[:, ::-1]
        return self._table_launch(link, src, dst, np.ascontiguousarray(rows), notify, block_bytes, block_bytes)

    def post_one_id(self, prepared: Prepared, op: str, local_block: int, remote_block: int, notify) -> IpcRequest:
        block_bytes = prepared.layout.block_bytes
        return self.post_one(prepared.link, op, prepared.local, prepared.remote, local_block * block_bytes,
                             remote_block * block_bytes, block_bytes, notify)  # fmt: skip

    @staticmethod
    def _check_alive(link: IpcLink) -> None:
        """Refuse a post to a peer that exited (its inbox lock is free).  A check that found it alive is trusted
        for ``ALIVE_REUSE_S`` (one system call saved per post in a burst): a peer that dies after a check, then
        or a moment later, is reported by the request's handle (``PeerLostError``), as it always could be.
        (:meth:`post_one` tests ``alive_until`` before calling.)"""
        now = time.monotonic()
        if now < link.alive_until:
            return
        if not link.outbox.liveness.alive():
            name = link.peer.name
            raise PeerLostError(
                f"peer {name!r} exited (its inbox lock is free): nothing was sent", details={"peer": name}
            )
        link.alive_until = now + ALIVE_REUSE_S

    def _one_block(self, link, src: int, dst: int, nbytes: int, notify) -> IpcRequest:
        """One block from address ``src`` to ``dst``: the copy engine when long (a plain memory copy under the
        interpreter), else one launch that names the block in its arguments, cut into items of 8-64 KB spread over
        the programs: the link's plan of that shape once a launch compiled it (on a GPU), else the launcher.  A
        block of up to ``RESIDENT_MAX_BYTES`` goes to the resident copier instead when nothing orders it after
        other work: no launch of this agent in flight and the caller's current stream idle."""
        copier = self.copier
        if nbytes <= RESIDENT_MAX_BYTES and copier is not None:
            query = self.stream_query  # no launch in flight and the caller's stream idle (tested in line)
            if (self.launches <= self.completed or self.finished(self.launches)) and (
                query is None or query(_current_raw_stream(self.index)) == 0
            ):
                request = self._resident(copier, link, src, dst, nbytes, notify)
                if request is not None:
                    return request
        self._fork(link)
        if nbytes >= COPY_ENGINE_BYTES:
            self._enqueue(link, notify, False, self.memory.copy_async, dst, src, nbytes, self.raw_stream)
            if notify is not None:
                staged = link.outbox.produced
                try:
                    self._kernel(link, 1, notify, staged=True, table_addr=src, src_base=src, dst_base=dst,
                                 n_items=0, block_bytes=1, parts=1, part_bytes=1, FIXED=True, INLINE=True,
                                 VEC=False)  # fmt: skip
                except BaseException:
                    # The copy is enqueued and cannot be taken back: numbered, so that removing the peer, its
                    # region or the agent waits for it before unmapping; its notification is never published.
                    if link.outbox.produced == staged:  # not taken back by a launch that failed to enqueue
                        link.outbox.unstage()
                    self._finish(link, None)
                    raise
            return self._finish(link, None, notify)
        cut = self.cuts.get(nbytes)
        if cut is None:
            cut = self._cut(nbytes)
        part, parts, programs, sizes = cut
        vec = not ((src | dst | nbytes) % _bc.VEC_BYTES)
        # What decides the binary besides the link's own words: the low four bits and bit length of each integer
        # that changes (launch.py; ``sizes``: those of nbytes, parts and part_bytes), the vector path (TILE
        # follows) and the notification.
        shape = (src & 15, src.bit_length(), dst & 15, dst.bit_length(), sizes, vec, notify is None)
        plan = link.plans.get(shape)
        if plan is None:
            self._first_inline_launch(link, shape, src, dst, nbytes, parts, part, programs, vec, notify)
            return self._finish(link, None, notify)
        fast, values = plan
        at_table, at_src, at_dst, at_nbytes, at_parts, at_part = self.inline_slots
        values[at_table] = values[at_src] = src
        values[at_dst], values[at_nbytes], values[at_parts], values[at_part] = dst, nbytes, parts, part
        self._enqueue(link, notify, False, fast, programs, 1, self.raw_stream, values)
        return self._finish(link, None, notify)

    def _resident(self, copier: ResidentCopier, link, src: int, dst: int, nbytes: int, notify
                  ) -> ResidentRequest | None:  # fmt: skip
        """One block by the resident copier, ``notify`` staged first; None (nothing queued) when its mailbox
        is full or an address does not fit a mailbox field (:meth:`ResidentCopier.post`)."""
        try:
            if notify is None:
                seq = copier.post(src, dst, nbytes, 0, 0, 0)
                if seq is None:
                    return None
            else:
                outbox = link.outbox
                note, ring_entry = outbox.stage_entry(notify)  # refused when the ring is full: nothing was queued
                try:
                    seq = copier.post(src, dst, nbytes, ring_entry, note, link.published_addr)
                except QueuedUndecidedError:
                    raise  # queued: it may still publish this notification, whose ring entry stays its own
                except BaseException:
                    outbox.unstage()
                    raise
                if seq is None:
                    outbox.unstage()
                    return None
        except QueuedUndecidedError as exc:
            # Counted as this peer's, so that removing the peer waits for it before unmapping.
            link.resident_last = exc.seq
            if notify is not None:
                link.notify_resident_last = exc.seq
            name = link.peer.name
            exc.details.update(peer=name, op="ipc")
            exc.message = (f"{exc.message}; peer {name!r}: treat the blocks and the notification as undecided (the "
                           "request is served before any later one once the copier decides)")  # fmt: skip
            raise
        link.resident_last = seq
        if notify is not None:
            link.notify_resident_last = seq
        return ResidentRequest(self, link, seq)

    def _cut(self, nbytes: int) -> tuple:
        """``(part_bytes, parts, programs, sizes)`` of one block of ``nbytes`` under the copy-engine size: items of
        8-64 KB, about one per program; ``sizes``: what of the three integers decides the binary (launch.py)."""
        part = min(PART_BYTES, max(MIN_PART_BYTES, 1 << max(0, (-(-nbytes // self.max_programs) - 1).bit_length())))
        parts = -(-nbytes // part)
        sizes = (nbytes & 15, nbytes.bit_length(), parts & 15, parts.bit_length(), part & 15, part.bit_length())
        if len(self.cuts) >= MAX_SIZES:
            self.cuts.clear()
        cut = self.cuts[nbytes] = (part, parts, min(parts, self.max_programs), sizes)
        return cut

    def _first_inline_launch(self, link, shape: tuple, src: int, dst: int, nbytes: int, parts: int, part: int,
                             programs: int, vec: bool, notify) -> None:  # fmt: skip
        """The one-block launch of a shape not launched over ``link`` yet, through the launcher (which compiles
        it on first use); on a GPU its direct launch and bound arguments become the link's plan of that shape."""
        values = self._kernel(link, programs, notify, table_addr=src, src_base=src, dst_base=dst, n_items=1,
                              block_bytes=nbytes, parts=parts, part_bytes=part, FIXED=True, INLINE=True,
                              VEC=vec)  # fmt: skip
        fast = self.launcher.direct(values)
        if fast is not None:
            if len(link.plans) >= MAX_PLANS:
                link.plans.clear()
            link.plans[shape] = (fast, list(values))

    def _table_launch(self, link, src: int, dst: int, rows: np.ndarray, notify, fixed: int | None, bits: int
                      ) -> IpcRequest:  # fmt: skip
        """One launch over a descriptor table: ``rows`` (listed ``[n, 3]`` or, with ``fixed`` block bytes, block
        ids ``[n, 2]``) from ``src`` to ``dst``, staged in pinned host memory.  ``bits``: every offset and length
        OR-ed together (the vector path needs them all 16-byte aligned)."""
        index, buffer, address = self.staging.acquire(rows.nbytes)
        buffer[: rows.nbytes] = rows.reshape(-1).view(np.uint8)
        vec = not ((bits | src | dst) % _bc.VEC_BYTES)
        if fixed is None:
            items, block_bytes, parts, part_bytes = len(rows), 0, 1, 0
        else:
            part_bytes = min(fixed, PART_BYTES)
            parts = -(-fixed // part_bytes)
            items, block_bytes = len(rows) * parts, fixed
        try:
            self._fork(link)
            self._kernel(link, min(items, self.max_programs), notify, table_addr=address, src_base=src,
                         dst_base=dst, n_items=len(rows), block_bytes=block_bytes, parts=parts, part_bytes=part_bytes,
                         FIXED=fixed is not None, INLINE=False, VEC=vec)  # fmt: skip
        except BaseException:
            self.staging.release(index)
            raise
        return self._finish(link, index, notify)

    def _fork(self, link) -> None:
        """The transfer stream waits for the caller's current stream (what the caller's kernels wrote), and the
        host for the resident copier's requests (a launch never overtakes them: notifications stay in order)."""
        copier = self.copier
        if copier is not None and not copier.idle():
            copier.wait(copier.posted, peer=link.peer.name)
        if self.events is not None:
            self.events.follow(_current_raw_stream(self.index))

    def _kernel(self, link, programs: int, notify, staged: bool = False, **named) -> tuple:
        """Enqueue one block-copy launch on the transfer stream and return its bound arguments; ``notify`` is
        staged in the peer's ring first (unless ``staged``) and published by the launch's last program."""
        args = self.launcher.bind(
            counter_addr=self.counter.data_ptr(), seq_addr=link.published.data_ptr(),
            ring_addr=link.outbox.ring_address, NOTIFY=notify is not None,
            TILE=(2048 if named["VEC"] else 4096) if self.use_ptx else 16384, **named,
        )  # fmt: skip
        stream = self.raw_stream if self.stream is not None else None
        self._enqueue(link, notify, staged, self.launcher, (programs, 1), args, stream)
        return args

    @staticmethod
    def _enqueue(link, notify, staged: bool, enqueue, *args) -> None:
        """``enqueue(*args)`` (a launch or a copy on the transfer stream) with ``notify`` staged in the peer's ring
        first (unless ``staged``: an earlier step of the same request did); if it raises, the notification is taken
        back (nothing will publish it) and the error propagates."""
        if notify is not None and not staged:
            link.outbox.stage(notify)  # refused here when the ring is full: nothing was enqueued
        try:
            enqueue(*args)
        except BaseException:
            if notify is not None:
                link.outbox.unstage()
            raise

    def _finish(self, link, index: int | None, notify: bytes | None = None) -> IpcRequest:
        """Number the launch(es) just enqueued (``notify``: the notification the last one publishes, if any) and
        record their completion."""
        self.launches += 1
        number = link.last = self.launches
        if notify is not None:
            link.notify_last = number
        if self.stream is None:  # the interpreter ran it to completion
            self.completed = number
            if index is not None:
                self.staging.release(index)
            return IpcRequest(self, link, number, None)
        event = self.events.record()
        self.in_flight.append((number, event, index))
        if len(self.in_flight) > 1:
            self._retire()
        return IpcRequest(self, link, number, event)

    def _retire(self) -> None:
        """Retire completed launches, oldest first (one stream: they complete in order)."""
        in_flight, events = self.in_flight, self.events
        while in_flight and events.done(in_flight[0][1]):
            number, event, index = in_flight.popleft()
            self.completed = number
            events.reuse(event)
            if index is not None:
                self.staging.release(index)

    def finished(self, number: int) -> bool:
        """Whether launch ``number`` completed."""
        if number > self.completed:
            self._retire()
        return number <= self.completed

    def _drain(self, number: int) -> bool:
        """Wait (up to the agent's timeout) until launch ``number`` completed; False if it did not.  Once a drain
        timed out, the next ones give up at once while no launch has completed since: the stream is stuck, and
        each step of a ``close`` (every peer, every region) would otherwise wait the whole timeout again."""
        if self.finished(number):
            return True
        if self._stalled_at == self.completed:
            return False
        deadline = time.monotonic() + self.context.timeout_s
        while not self.finished(number):
            if time.monotonic() >= deadline:
                self._stalled_at = self.completed
                return False
            time.sleep(1e-4)
        return True

    def _drain_resident(self, seq: int) -> bool:
        """Wait (up to the agent's timeout) until the resident copier served request ``seq``; False if not (at
        once when an earlier wait timed out and the copier has served nothing since, as :meth:`_drain`)."""
        copier = self.copier
        if copier is None or copier.completed() >= seq:
            return True
        if self._resident_stalled_at == copier.completed() and not copier.resume():
            return False  # still stalled (a program that exited without the requests is started again)
        try:
            copier.wait(seq)
        except CommTimeoutError:
            self._resident_stalled_at = copier.completed()
            return False
        return True

    def notifications(self) -> list[tuple[str, bytes]]:
        if self.unreleased:
            self._retry_unreleased()
        return self.inbox.drain()

    def transport(self, link: Link) -> str:
        resident = ", a resident copier for one block <= 64 KB" if self.copier is not None else ""
        if self.device is not None and self.device.type == "cuda":
            return (f"block-copy kernel on {self.device}{resident}, the copy engine for one block >= 1 MB, over CUDA "
                    "IPC mappings")  # fmt: skip
        return (f"block-copy kernel (Triton interpreter){resident}, a memory copy for one block >= 1 MB, over shared "
                "files")  # fmt: skip

    def close(self) -> None:
        """Disconnect every link, stop the resident copier, close the inbox and release the device state; a step
        that raises does not stop the others, and the first error is raised once every step ran.  Another agent of
        this process that is taking or reading this one's probe (:meth:`lend_to`) finishes first."""
        with self.lending:  # after another agent of this process that is reading the probe (lend_to)
            if self._closed:
                return
            self._closed = True
            _LIVE.pop(self.key, None)
        steps = [functools.partial(self.disconnect, link) for link in list(self.links)]
        if self.copier is not None:
            steps.append(self.copier.close)
        steps.append(self.inbox.close)
        if self.device is not None:
            drained = False  # until the drain says so: a drain that raised leaves the buffers to running launches

            def drain() -> None:
                nonlocal drained
                drained = self._drain(self.launches)

            def close_staging() -> None:
                self.staging.close(in_use=not drained)

            def release_unreleased() -> None:  # every launch completed, and the copier served all it was given
                copier = self.copier
                if drained and (copier is None or not copier.leaked):
                    for link in self.unreleased:
                        self._unmap(link)
                    self.unreleased = []
                else:  # a launch may still touch what they hold (a peer's regions, its probe): kept for good
                    for link in self.unreleased:
                        keep_for_life(link.held)

            def close_events() -> None:
                if drained:
                    self.events.close()

            def forget_probe() -> None:  # freed now unless a test copy of another agent may still read it
                self._probe_memory = None

            steps += [drain, release_unreleased, close_staging]
            if self.device.type == "cuda":
                steps.append(close_events)
            steps.append(forget_probe)
        run_every(steps)


def _peer_section(peer: AgentMetadata) -> dict:
    """The peer's ``ipc`` section, every field checked (``InvalidArgumentError`` naming it), handles decoded, the
    probe token as bytes, each export given its region's size (``nbytes``) and checked to lie inside the memory
    it names (``size``: the file or the CUDA allocation)."""
    top = MetadataField(f"peer {peer.name!r}'s ipc section", peer.transports["ipc"])
    blob = top.mapping()
    unreachable = top.get(blob, "unreachable", {}).mapping()
    for name, why in unreachable.items():
        MetadataField(f"{top.what}: 'unreachable' {name!r}", why).text()
    exports_field = top.item(blob, "regions")
    exports = exports_field.mapping()
    device = top.item(blob, "device").choice("cpu", "cuda")
    section = {
        "key": top.get(blob, "key", "").text(2 * KEY_BYTES),  # (a peer in another process needs none)
        "device": device,
        "inbox": _transfer_file(top.item(blob, "inbox")),
        "unreachable": unreachable,
        "probe": _export(top.item(blob, "probe"), PROBE_BYTES, device),
        "regions": {},
    }
    token = top.item(blob["probe"], "token")
    try:
        section["probe"]["token"] = bytes.fromhex(token.text(2 * TOKEN_BYTES))
    except ValueError:
        section["probe"]["token"] = b""  # not hexadecimal: refused below with a short one
    if len(section["probe"]["token"]) != TOKEN_BYTES:
        raise token.bad(f"{TOKEN_BYTES} bytes in hexadecimal")
    for name, info in peer.regions.items():
        if name in unreachable:
            continue
        if name not in exports:
            raise exports_field.bad(f"an export of every region (region {name!r} has none)")
        export = MetadataField(f"{exports_field.what} {name!r}", exports[name])
        section["regions"][name] = _export(export, info.nbytes, device)
    return section


def _no_live_agent(peer: AgentMetadata, key: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"peer {peer.name!r}'s ipc section: 'key' {key!r} names no live agent of this process, where the metadata "
        "says the peer runs (the agent was closed since, or these bytes are not its TransferAgent.metadata()); add "
        "the peer with its current metadata",
        details={"peer": peer.name, "field": "key"},
    )


def _same(peer: AgentMetadata, what: str, given: dict, registered: dict) -> None:
    """``InvalidArgumentError`` naming the first field where ``peer``'s metadata (``given``) differs from what its
    live agent in this process registered (``registered``)."""
    for key in sorted({*given, *registered}):
        if given.get(key) != registered.get(key):
            shown = repr(given.get(key))
            raise InvalidArgumentError(
                f"{what}: {key!r} is {shown if len(shown) <= 80 else shown[:77] + '...'}, but that agent in this "
                f"process registered {registered.get(key)!r}: the metadata does not describe its memory (forged or "
                "damaged bytes, or made before the region was registered again); add the peer with its current "
                "metadata",
                details={"peer": peer.name, "field": key},
            )


def _export(field: MetadataField, nbytes: int, device: str) -> dict:
    """One export (a region's or the probe's) of a peer's ipc section, checked; ``nbytes``: what must fit; ``device``:
    the section's (a CUDA IPC handle on a GPU, a transfer file on the CPU)."""
    data = field.mapping()
    export = {
        "address": field.item(data, "address").integer(0, (1 << 64) - 1),
        "offset": field.get(data, "offset", 0).integer(0, 1 << 62),
        "size": field.item(data, "size").integer(1, 1 << 62),
        "nbytes": nbytes,
    }
    if device == "cuda":
        handle = field.item(data, "handle")
        try:
            export["handle"] = unb64(handle.text(256))
        except ValueError:
            export["handle"] = b""  # not base64: refused below
        if len(export["handle"]) != IPC_HANDLE_BYTES:  # the runtime reads this many, whatever it is given
            raise handle.bad(f"a CUDA IPC handle of {IPC_HANDLE_BYTES} bytes in base64")
    else:
        export["path"] = _transfer_file(field.item(data, "path"))
    if export["offset"] + nbytes > export["size"]:
        raise field.bad(f"an export holding {nbytes} bytes at its offset (its memory is {export['size']} bytes)")
    return export


def _transfer_file(field: MetadataField) -> str:
    """A path of a peer's ipc section (a region's or the probe's file, the inbox): a transfer file's
    (:func:`~sagellm_comm.transfer.shared.transfer_path`), else refused naming the field; what is opened there
    is checked again when it is opened (a regular file, no symbolic link)."""
    path = field.text()
    if transfer_path(path) is None:
        raise field.bad(transfer_rule())
    return path


register_transfer_backend("ipc", IpcBackend, is_available=ipc_available, priority=100)
