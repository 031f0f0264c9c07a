"""Symmetric workspace: one region per rank, mapped by every peer, plus this rank's control words.

Region layout (``kernels/all_reduce.py`` and ``kernels/lamport_all_reduce.py`` in this package are the
authority)::

    [ signal pad (PAD_BYTES) | registered region (slot_bytes) | staging slot 0 | staging slot 1 |
      Lamport buffers: 3 x world_size x capacity fp32, initialised to the sentinel 0xFF bytes ]

The kernels get an int64 *pointer table* on the device, built once here: ``table[0:W]`` every rank's
region base as mapped in this process, ``table[W]`` this rank's error record (int64[ERR_WORDS] in pinned
host memory, read by the host without a device sync); and this rank's control words (device
int64[CTRL_WORDS]: epoch, finished programs, error latch, the copy-engine and check counters, the Lamport
kernel's per-program state).

What shapes what peers read or wait for is settled here, for the whole group, when the workspace is made:
every member's agreed settings (``docs/configuration.md``: tile shapes, check mode, initial epoch, ...) must be
equal (:func:`~sagellm_comm.config.check_agreement`), and the program count of every launch is the smallest
proposal of any rank.  The workspace keeps the :class:`~sagellm_comm.config.CommConfig` it was made with
(``workspace.config``); the kernels' launchers read their tile shapes from it.  Its ``initial_epoch`` starts
every call counter of a new workspace (a test hook: counters are 64-bit and never wrap in practice).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from sagellm_comm.kernels import all_reduce as _k
from sagellm_comm.kernels import fingerprint as _fp
from sagellm_comm.kernels import lamport_all_reduce as _lk
from sagellm_comm.selector import LAMPORT

from . import capture
from .arguments import check_device, check_flag, check_int, check_timeout
from .backend import DEFAULT_TIMEOUT_S, poll_until
from .config import CommConfig, check_agreement
from .errors import (
    CollectiveMismatchError,
    CommError,
    CommTimeoutError,
    InvalidArgumentError,
    NotInitializedError,
    P2PFailedError,
    UnavailableError,
    WorkspaceExhaustedError,
    run_every,
)
from .ipc import CudaIpcMemory, PeerMemory, SharedFileMemory
from .ipc import tensor_at as _tensor_at

ALIGN_BYTES = 256
DEFAULT_SLOT_BYTES = 64 * 1024 * 1024


LAMPORT_MAX_ELEMS = 128 * 1024  # latency-bound messages only: 256 KB of bf16, 512 KB of fp32


def lamport_capacity(slot_bytes: int) -> int:
    """Elements per (buffer, source) of the Lamport area (never more than the slot holds in bf16)."""
    return min(slot_bytes // 2, LAMPORT_MAX_ELEMS)


def lamport_offset(slot_bytes: int) -> int:
    """Byte offset of the Lamport area in a region (after the signal pad, registered region, 2 slots)."""
    return _k.PAD_BYTES.value + 3 * slot_bytes


def region_bytes(slot_bytes: int, world_size: int) -> int:
    """Bytes of one rank's region for ``slot_bytes`` of message capacity and ``world_size`` ranks."""
    return lamport_offset(slot_bytes) + _lk.lamport_bytes(world_size, lamport_capacity(slot_bytes))


DEFAULT_MAX_PROGRAMS = 32  # CPU / interpreter; on a GPU see default_max_programs


def default_max_programs(device: torch.device, ranks_on_device: int = 1, override: int | None = None) -> int:
    """This rank's proposal for the programs per launch: one per SM and rank sharing the GPU, at most
    ``MAX_BLOCKS``.  The group takes the smallest proposal (see :meth:`SymmetricWorkspace.rendezvous`).

    All programs of a launch must be resident at once (they wait for each other at barriers), so ranks
    sharing one GPU (virtual ranks, MPS) divide its SMs.  ``override`` (``CommConfig.max_programs``,
    ``SAGELLM_COMM_MAX_PROGRAMS``) replaces the rule.
    """
    if override is not None:
        return check_int(override, "max_programs", 1, _k.MAX_BLOCKS.value)
    if device.type != "cuda":
        return DEFAULT_MAX_PROGRAMS
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_k.MAX_BLOCKS.value, sms // max(1, ranks_on_device)))


def _new_control(shape: tuple[int, ...], device: torch.device, initial_epoch: int) -> torch.Tensor:
    """Control words (int64) with every call counter at ``initial_epoch``."""
    control = torch.zeros(*shape, _k.CTRL_WORDS.value, dtype=torch.int64, device=device)
    counters = [*_k.COUNTER_WORDS, *range(_k.CTRL_LAMPORT.value, _k.CTRL_LAMPORT.value + _k.MAX_BLOCKS.value)]
    control[..., counters] = initial_epoch
    control[..., _k.CTRL_ROW_WORDS.value : _k.CTRL_WORDS.value] = -1  # the row exchange's words start empty
    return control


def node_name(config: CommConfig) -> str:
    """This process's node, for deciding which ranks share one: ``config.hostname``
    (``SAGELLM_COMM_HOSTNAME``; tests simulate several nodes on one machine with it), else the host name."""
    return config.hostname or socket.gethostname()


def device_identity(device: torch.device) -> str:
    """What makes two ranks' devices the same chip: the GPU's UUID (robust to per-process
    ``CUDA_VISIBLE_DEVICES``), else the device string."""
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            return str(uuid)
    return str(device)


def _configuration(config: CommConfig | None, check: Any) -> CommConfig:
    """The workspace's configuration: ``config`` (default: the environment's) with ``check`` (a bool, or None to
    keep the configuration's) as its check mode."""
    if config is None:
        config = CommConfig.from_env()
    if check is not None and check_flag(check, "check") != config.check:
        config = config.replace(check=bool(check))
    return config


def _round_slot(slot_bytes: int) -> int:
    """``slot_bytes`` (a positive int: a float or a bool is refused, not truncated) rounded up to whole
    ``ALIGN_BYTES``."""
    slot_bytes = check_int(slot_bytes, "workspace size (slot_bytes)", 1)
    return -(-slot_bytes // ALIGN_BYTES) * ALIGN_BYTES


def _undo(steps: Sequence[Callable[[], object]]) -> None:
    """Run every step that undoes a failed set-up, even when one raises; the caller then raises the set-up's own
    error, the one that says what went wrong (an unmap that fails as well does not replace it)."""
    with contextlib.suppress(Exception):
        run_every(steps)


def _never() -> bool:
    return False


class _Failed(NamedTuple):
    """What a member sends in a rendezvous round whose own part failed (see :func:`_round`)."""

    error: str


def _round(exchange: Callable[[Any], list[Any]], ranks: Sequence[int], what: str, work: Callable[[], Any]) -> list:
    """One round of the workspace rendezvous: this rank's ``work()``, then every member's answer in rank order.

    A member whose ``work`` fails (no memory for its region, a peer's region it cannot map) still takes part in
    the round, sending the failure, so that every member leaves the rendezvous in the same round with a typed
    error: its own error where it failed (a :class:`P2PFailedError` wrapping one that is not a
    :class:`CommError`), on the others a :class:`P2PFailedError` naming the members that failed and why.
    """
    try:
        mine, failure = work(), None
    except Exception as exc:
        mine, failure = _Failed(f"{type(exc).__name__}: {exc}"), exc
    answers = exchange(mine)
    if failure is not None:
        if isinstance(failure, CommError):
            raise failure
        raise P2PFailedError(f"the workspace rendezvous failed on this rank ({what}): {mine.error}") from failure
    failed = [(ranks[r] if r < len(ranks) else r, a.error) for r, a in enumerate(answers) if isinstance(a, _Failed)]
    if failed:
        raise P2PFailedError(
            "the workspace rendezvous failed on " + "; ".join(f"rank {r} ({what}): {error}" for r, error in failed),
            details={"failed_ranks": [r for r, _ in failed]},
        )
    return answers


class SymmetricWorkspace:
    """One rank's view of the symmetric workspace.

    Build it with :meth:`rendezvous` (one process per rank) or :func:`local_workspaces` (virtual ranks
    in one process).  ``peer_ptrs[r]`` is rank ``r``'s region as mapped in this process.

    Args:
        rank, world_size: this rank and the number of ranks (2..8).
        slot_bytes: message capacity in bytes (the largest all-reduce the custom kernels take).
        peer_ptrs: base address of every rank's region in this process.
        device: where the data lives (``cuda:i``, or ``cpu`` under the Triton interpreter).
        release: called by :meth:`close` to unmap peers and free the local region (unless ``region`` owns it).
        region: the owner of this rank's region where :meth:`close` does not free it itself: tensors from
            :meth:`registered_tensor` hold it, and the workspace drops its reference at :meth:`close`.
        ranks_on_device: how many ranks of the group share this rank's device (virtual ranks, MPS): the
            kernels' programs of all of them must be resident at once, so they divide its SMs.
        max_programs: programs of every launch on this workspace, the same on every rank (agreed by
            :meth:`rendezvous`); default: :func:`default_max_programs`.
        check: check mode (a per-call fingerprint compared on the device), the same on every rank; default
            ``config.check``.
        config: the configuration the group agreed on (default: read from the environment); its tile shapes,
            initial epoch and watchdog period apply to this workspace.
        capturing: whether :meth:`close` would now break a CUDA-graph capture in progress (synchronising the
            device, unmapping, freeing); :meth:`rendezvous` passes its memory's ``capturing``.  Default: on a CUDA
            device, a capture anywhere in the process (:func:`sagellm_comm.capture.underway`).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        slot_bytes: int,
        peer_ptrs: Sequence[int],
        device: torch.device,
        release: Callable[[], None] | None = None,
        local_region: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        error_record: torch.Tensor | None = None,
        ranks_on_device: int = 1,
        max_programs: int | None = None,
        check: bool | None = None,
        config: CommConfig | None = None,
        region: Any = None,
        capturing: Callable[[], bool] | None = None,
    ):
        config = _configuration(config, check)
        if not 2 <= world_size <= _k.MAX_WORLD.value:
            raise InvalidArgumentError(
                f"the custom all-reduce supports 2..{_k.MAX_WORLD.value} ranks, got world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is out of range for world_size={world_size}")
        if len(peer_ptrs) != world_size:
            raise InvalidArgumentError(f"expected {world_size} peer pointers, got {len(peer_ptrs)}")
        self.rank = rank
        self.world_size = world_size
        self.ranks_on_device = check_int(ranks_on_device, "ranks_on_device", 1)
        self.slot_bytes = slot_bytes
        self.device = torch.device(device)
        self.peer_ptrs = [int(p) for p in peer_ptrs]
        self._release = release
        self._local_region = local_region
        self._region = region
        on_cuda = self.device.type == "cuda"
        if capturing is None:
            capturing = functools.partial(capture.underway, self.device) if on_cuda else _never
        self._capture_underway = capturing
        if max_programs is None:
            max_programs = default_max_programs(self.device, self.ranks_on_device, config.max_programs)
        self.max_programs = check_int(max_programs, "max_programs", 1, _k.MAX_BLOCKS.value)
        self.config = config
        self.check = config.check
        self.initial_epoch = config.initial_epoch
        if control is None:
            control = _new_control((), self.device, config.initial_epoch)
        if error_record is None:
            error_record = torch.zeros(_k.ERR_WORDS.value, dtype=torch.int64, pin_memory=on_cuda)
        self.control = control
        self.error_record = error_record
        self.error_view = self.error_record.numpy()  # host view: reading it never syncs the device
        table = self.peer_ptrs + [self.error_record.data_ptr()]
        self.table = torch.tensor(table, dtype=torch.int64, device=self.device)
        # The registered (zero-copy) region of this rank, as a flat byte tensor.
        self._registered_ptr = self.peer_ptrs[rank] + _k.PAD_BYTES.value
        self.lamport_offset = lamport_offset(slot_bytes)
        self.lamport_capacity = lamport_capacity(slot_bytes)
        self.closed = False
        self.closed_reason: str | None = None  # set by close(): what a later call's error says
        # One workspace, one stream at a time: the raw stream of the last launch, and its Stream object.
        self._last_raw_stream: int | None = None
        self._last_stream: Any = None
        self.async_error: BaseException | None = None  # set by the watchdog (sagellm_comm/watchdog.py)
        # The members' global ranks, where the workspace serves a sub-group (messages name those).
        self.global_ranks: tuple[int, ...] | None = None
        from .watchdog import watch

        watch(self, config.watchdog_ms)

    # ------------------------------------------------------------------ construction
    @classmethod
    def rendezvous(
        cls,
        rank: int,
        world_size: int,
        slot_bytes: int,
        device: torch.device | str,
        exchange: Callable[[Any], list[Any]],
        memory: PeerMemory | None = None,
        max_programs: int | None = None,
        check: bool | None = None,
        processes_on_device: int = 1,
        config: CommConfig | None = None,
        ranks: Sequence[int] | None = None,
    ) -> SymmetricWorkspace:
        """Collective: allocate this rank's region, exchange handles with ``exchange``, open the peers.

        ``exchange(obj)`` must return the list of every rank's ``obj`` in rank order (e.g. an
        ``all_gather_object`` over the group's CPU side).  Every rank must call this with the same
        ``world_size`` and ``slot_bytes``.  The members must agree on every agreed setting of ``config``
        (default: read from the environment; ``check`` replaces its check mode), else
        :class:`~sagellm_comm.errors.ConfigMismatchError` names the setting and the ranks (``ranks``: the
        members' global ranks, for messages; default their group ranks).  The group launches the smallest
        of every rank's ``max_programs`` (default :func:`default_max_programs`).

        ``processes_on_device``: how many processes of the whole job share this rank's GPU (N processes
        under MPS).  Each may run a collective of *another* group at the same moment, and every program of
        every one of those launches must be resident at once, so the default proposal divides the SMs by
        this count when it exceeds the group's own members on the device.

        What may fail on one rank alone (its memory, its region, a peer's region it cannot map) is done inside one of
        the two rounds of exchanges: a member whose part fails still takes part in the round, and every member then
        raises a typed error in that round (the failed member its own, or ``P2PFailedError`` wrapping an untyped one;
        the others :class:`~sagellm_comm.errors.P2PFailedError` naming it).  A failure after the last round (making
        this rank's workspace object) is raised on this rank alone; a caller that exchanges again afterwards sends it
        there (the custom backend's group set-up does).
        """
        config = _configuration(config, check)
        world_size = check_int(world_size, "world_size", 1)
        if max_programs is not None:
            max_programs = check_int(max_programs, "max_programs", 1, _k.MAX_BLOCKS.value)
        processes_on_device = check_int(processes_on_device, "processes_on_device", 1)
        ranks = tuple(range(world_size)) if ranks is None else tuple(ranks)
        device = check_device(device)
        slot_bytes = _round_slot(slot_bytes)
        nbytes = region_bytes(slot_bytes, world_size)
        where: tuple[str, str] = ("", "")
        local: int | None = None
        opened: list[int] = []
        ptrs: list[int] = []

        def release() -> None:  # every peer's mapping, even when one unmap fails
            run_every(lambda ptr=ptr: memory.close(ptr) for ptr in opened)

        def free_local() -> None:
            if local is not None:
                memory.free(local)

        def publish() -> tuple:  # what may fail on this rank alone is done in a round (see _round)
            nonlocal local, memory, where
            if memory is None:
                memory = CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
            where = (node_name(config), device_identity(device))
            free_deferred_regions()  # what waited for a graph capture to end goes before the new region comes
            local = memory.allocate(nbytes)
            # Before any peer can push: the Lamport area starts as all sentinels.
            memory.fill(local + lamport_offset(slot_bytes), nbytes - lamport_offset(slot_bytes), _lk.SENTINEL_BYTE)
            return (memory.export(local), slot_bytes, where, config.agreement())

        def map_peers() -> int:
            for r, (handle, *_) in enumerate(handles):
                if r == rank:
                    ptrs.append(local)
                else:
                    ptr = memory.open(handle, nbytes)
                    opened.append(ptr)
                    ptrs.append(ptr)
            if max_programs is not None:
                return max_programs
            return default_max_programs(device, max(sharing, processes_on_device), config.max_programs)

        try:
            handles = _round(exchange, ranks, "allocating its region", publish)
            if len(handles) == world_size:
                check_agreement([h[3] for h in handles], ranks, "the workspace rendezvous")
            sizes = {h[1] for h in handles}
            if len(handles) != world_size or sizes != {slot_bytes}:
                raise InvalidArgumentError(
                    f"workspace rendezvous mismatch: {len(handles)} ranks answered (expected {world_size}), "
                    f"slot sizes {sorted(sizes)} (every rank must ask for the same size)"
                )
            sharing = sum(1 for _, _, other, _ in handles if other == where)
            # Every rank has mapped every region (shared files can go from the file system now); the group's
            # program count is agreed in the same round.
            proposals = _round(exchange, ranks, "mapping its peers' regions", map_peers)
            if isinstance(memory, SharedFileMemory):
                memory.unlink(local)
            agreed_programs = min(proposals)
        except BaseException:
            _undo([release, free_local])
            raise

        region = _OwnedRegion(memory, local)
        try:
            return cls(
                rank, world_size, slot_bytes, ptrs, device, release, ranks_on_device=sharing,
                max_programs=agreed_programs, config=config, region=region, capturing=memory.capturing,
            )  # fmt: skip
        except BaseException:  # refused (a world of one) or out of memory: the regions are not kept
            _undo([release, region.free])
            raise

    # ------------------------------------------------------------------ use
    def registered_tensor(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``numel`` elements aliasing this rank's registered region (zero-copy input)."""
        self._check_open()
        numel = check_int(numel, "numel", 0)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.slot_bytes:
            raise WorkspaceExhaustedError(
                f"{numel} x {dtype} is {nbytes} bytes, over the workspace's {self.slot_bytes} bytes"
            )
        if self._local_region is not None:
            start = _k.PAD_BYTES.value
            return self._local_region[start : start + nbytes].view(dtype)
        return _tensor_at(self._registered_ptr, numel, dtype, self.device, owner=self._region or self)

    def is_registered(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` starts at this rank's registered region."""
        return tensor.data_ptr() == self._registered_ptr

    def error(self) -> dict | None:
        """The first device-side error recorded by a kernel, or None (no device sync).

        ``kind`` is ``timeout`` (a peer never arrived) or ``mismatch`` (check mode: a peer's fingerprint
        differs; ``mine``/``theirs`` hold both as ``(algo, numel, dtype, call)``, and ``shape`` ``(rows, cols)``
        for the fused RMSNorm and GEMM).  ``call`` is the call number
        (the value of that kernel family's call counter, which starts at the workspace's initial epoch);
        ``flag_target`` the flag value the wait expected.  ``peer`` is a rank of this workspace's group, except
        in phase ``group check`` (a hierarchical all-reduce compared through the engine), where it is global.
        """
        v = self.error_view
        status = int(v[_k.ERR_STATUS.value])
        if status == 0:
            return None
        phase = int(v[_k.ERR_PHASE.value])
        recorded = int(v[_k.ERR_EPOCH.value])
        mismatch = status == _k.ERR_MISMATCH.value
        err = {
            "kind": "mismatch" if mismatch else "timeout",
            "peer": int(v[_k.ERR_PEER.value]),
            "phase": _k.PHASE_NAMES[phase],
            "block": int(v[_k.ERR_BLOCK.value]),
            "call": recorded if mismatch else _k.call_of_target(phase, recorded),
            "initial_epoch": self.initial_epoch,
        }
        if not mismatch:
            err["flag_target"] = recorded
        if phase == _k.PHASE_GROUP_CHECK.value:
            err["global_peer"] = err["peer"]
        elif self.global_ranks is not None:
            err["global_peer"] = self.global_ranks[err["peer"]]
        if mismatch:
            err["mine"] = _decode_fingerprint(v[_k.ERR_MINE.value : _k.ERR_MINE.value + 4])
            err["theirs"] = _decode_fingerprint(v[_k.ERR_THEIRS.value : _k.ERR_THEIRS.value + 4])
        return err

    def failure(self) -> CommTimeoutError | CollectiveMismatchError | None:
        """The typed error for :meth:`error` (not raised), or None."""
        err = self.error()
        if err is None:
            return None
        me = self._name(self.rank)
        peer = str(err["peer"]) if err["phase"] == "group check" else self._name(err["peer"])
        counted = f" (counted from {self.initial_epoch}, the initial epoch)" if self.initial_epoch else ""
        if err["kind"] == "mismatch":
            across = " (compared across the whole group through the engine)" if err["phase"] == "group check" else ""
            return CollectiveMismatchError(
                f"rank {me} and rank {peer} disagree on checked call {err['call']}{counted} of this "
                f"workspace{across}: rank {me} ran {_describe(err['mine'])}, rank {peer} ran "
                f"{_describe(err['theirs'])}; every rank must make the same calls with the same algorithm, "
                "size and dtype.  Outputs of this and later calls are NaN; call reset() on every rank (or "
                "recreate the backend) after fixing the call sites",
                details={"rank": self.rank, **err},
            )
        if err["phase"] == "row exchange":
            return CommTimeoutError(
                f"custom all-reduce on rank {me}: program {err['block']} of fused Lamport call {err['call']}{counted} "
                "waited in vain for the other programs of its row on this rank: the launch's programs did not all "
                f"run at once ({self.max_programs} per launch; lower SAGELLM_COMM_MAX_PROGRAMS if other work holds "
                "the GPU's SMs); the output of that call and of every later call on this workspace is NaN: call "
                "reset() on every rank, or destroy the backend and create it again",
                details={"rank": self.rank, **err},
            )
        where = ("step " if err["phase"] == "copy-engine" else "program ") + str(err["block"])
        family = _CALL_FAMILIES.get(err["phase"], "barrier-kernel")
        return CommTimeoutError(
            f"custom all-reduce on rank {me}: peer rank {peer} never arrived at the {err['phase']} barrier of "
            f"{family} call {err['call']}{counted} ({where}); the output of that call and of every later call on "
            "this workspace is NaN: call reset() on every rank, or destroy the backend and create it again",
            details={"rank": self.rank, **err},
        )

    def _name(self, rank: int) -> str:
        """``rank`` (an index in this workspace's group) as messages name it: the global rank where known."""
        if self.global_ranks is None:
            return str(rank)
        return f"{self.global_ranks[rank]} (rank {rank} of the group {list(self.global_ranks)})"

    def raise_if_failed(self) -> None:
        """Raise :class:`CommTimeoutError` naming the peer that never arrived (or, in check mode,
        :class:`CollectiveMismatchError` naming the disagreeing rank), if a kernel recorded a failure."""
        exc = self.failure()
        if exc is not None:
            raise exc

    # ------------------------------------------------------------------ streams and counters
    def enter_stream(self, raw_stream: int) -> None:
        """Order this launch after the previous one on this workspace when it came from another stream.

        Every protocol assumes a workspace's calls run one after another in issue order (the same order on
        every rank).  Calls on one stream are; a call on another stream (an async side stream, a user stream)
        is made to wait for the previous stream's work with an event.  ``raw_stream`` is the current stream's
        handle (``torch._C._cuda_getCurrentRawStream``); the common case (same stream) costs one comparison.
        """
        if raw_stream == self._last_raw_stream:
            return
        current = torch.cuda.current_stream(self.device)
        last = self._last_stream
        if last is not None:
            with torch.cuda.stream(last):
                last_capturing = torch.cuda.is_current_stream_capturing()
            if last_capturing == torch.cuda.is_current_stream_capturing():
                event = torch.cuda.Event()
                event.record(last)
                current.wait_event(event)
            # Else one side is inside a graph capture and the other is not: events cannot cross that line.
            # torch.cuda.graph synchronizes the device before capture begins, so eager work is done by then.
        self._last_raw_stream = raw_stream
        self._last_stream = current

    def drain(self, timeout: float, what: str, each: Callable[[], None] | None = None) -> None:
        """Wait, at most ``timeout`` seconds, for the work this workspace's calls enqueued; past it raise
        :class:`CommTimeoutError` saying ``what`` was waited for and on which stream.  ``each()`` runs at every poll
        that finds work left (a check of the error record, to report a kernel's failure at once).

        A host wait on CUDA events (:func:`~sagellm_comm.backend.poll_until`), one recorded on each stream that can
        hold that work: the stream of the last call (every call waits for the one before it, :meth:`enter_stream`,
        and joins its side streams back into its own), and the caller's current stream (where a CUDA graph that calls
        on this workspace is replayed, usually).  Work on the device's other streams is not waited for (a graph
        replayed on another stream must be finished by the caller).  No CUDA call on a CPU workspace; not to be
        called while a CUDA graph is captured (recording would join the capture)."""
        if self.device.type != "cuda":
            return
        streams = {torch.cuda.current_stream(self.device): "the caller's current stream"}
        if self._last_stream is not None and self._last_stream not in streams:
            streams[self._last_stream] = "the stream of its last call"
        events = []
        for stream, label in streams.items():
            event = torch.cuda.Event()
            event.record(stream)
            events.append((event, f"{label} ({stream.cuda_stream:#x})"))

        def timed_out() -> CommTimeoutError:
            left = [label for event, label in events if not event.query()]
            return CommTimeoutError(
                f"{what} on {self.device} (rank {self._name(self.rank)}) did not complete within {timeout:g}s: work "
                f"is still running on {' and '.join(left)}",
                details={"rank": self.rank, "device": str(self.device), "timeout_s": timeout, "streams": left},
            )

        poll_until(lambda: all(event.query() for event, _ in events), timeout, timed_out, each)

    def counter(self, word: int, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Control word ``word`` (a call counter, see ``kernels/all_reduce.py``), read from the device once the work
        of this workspace's calls is done (:meth:`drain`, at most ``timeout`` seconds)."""
        self._check_open()
        self.drain(timeout, f"reading control word {word} of the symmetric workspace: the work of its calls")
        return int(self.control[word].item())

    def _check_open(self) -> None:
        if self.closed:
            raise self.closed_error()

    def closed_error(self, what: str = "the symmetric workspace") -> NotInitializedError:
        """The error of a call made once this workspace was closed: ``what`` (the object called, which uses this
        workspace) of this workspace's ranks was closed, and why (the ``reason`` given to :meth:`close`)."""
        reason = self.closed_reason or "close() was called"
        return NotInitializedError(
            f"{what} of ranks {list(self.global_ranks or range(self.world_size))} was closed: {reason}",
            details={"rank": self.rank, "reason": reason},
        )

    def close(self, reason: str | None = None, timeout: float | None = None) -> None:
        """Unmap peers and free this rank's region (idempotent), once the work of this workspace's calls is done
        (:meth:`drain`, at most ``timeout`` seconds, default ``DEFAULT_TIMEOUT_S``).  No other thread may be in a
        call on this workspace (calls check ``closed`` once, on entry: one launching while this runs would enqueue
        kernels on unmapped regions).  Work still running at the deadline raises :class:`CommTimeoutError` naming
        its stream, and then the peers stay mapped and the region allocated (a kernel may still use them, and an
        unmap under it would fault the device) until the process exits.  The unmaps and the free that follow are
        CUDA's, and ``cudaFree`` synchronises the device implicitly (work on other streams included).

        A tensor from :meth:`registered_tensor` (``get_buffer``) still held keeps this rank's region allocated
        until it is gone: it stays valid memory, no longer shared with the peers.  Last, regions whose free waited
        for a CUDA-graph capture to end are freed (:func:`free_deferred_regions`).

        ``reason``: why, with what to use instead, for the error of every later call (:meth:`closed_error`; default:
        close() was called).

        While a CUDA graph is being captured on any thread of the process, synchronising the device, unmapping or
        freeing would invalidate that capture: the workspace is closed at once (no new call uses it) and the rest
        waits for the capture to end (:func:`free_deferred_regions` runs it).  Closed on the thread that captures,
        it raises :class:`~sagellm_comm.errors.UnavailableError` once that is arranged: a graph captured with calls
        on this workspace would replay them on released memory."""
        if self.closed:
            return
        self.closed = True
        self.closed_reason = reason or "close() was called"
        self._close_timeout_s = DEFAULT_TIMEOUT_S if timeout is None else check_timeout(timeout)
        from .watchdog import unwatch

        unwatch(self)
        waiting: list[bool] = []

        def release() -> None:
            if not _release_outside_capture(_Waiting(self._capture_underway, self._release_device)):
                waiting.append(True)

        run_every([release, free_deferred_regions])
        if waiting and capture.on_this_thread(self.device):
            raise UnavailableError(
                f"the symmetric workspace of rank {self._name(self.rank)} was closed inside a CUDA graph capture on "
                "this thread: it is closed now, and its peers are unmapped and its memory released when the capture "
                "ends, so the graph being captured must not be replayed if it calls on this workspace; close "
                "workspaces (destroy(), reset()) outside a capture"
            )

    def _release_device(self) -> None:
        """What :meth:`close` does on the device: wait for its calls' work (:meth:`drain`), unmap the peers, drop
        this rank's region.  Work still running at the deadline keeps all of them (the error says so)."""

        def drop_region() -> None:
            if self._region is not None:
                self._region.close()
                self._region = None  # freed here unless a registered tensor holds it

        steps: list[Callable[[], object]] = []
        try:
            self.drain(self._close_timeout_s, "closing the symmetric workspace: the work of its calls")
        except CommTimeoutError as exc:
            raise CommTimeoutError(
                f"{exc.message}; its peers stay mapped and its region allocated (that work may still use them) until "
                "this process exits",
                details=exc.details,
            ) from None
        except Exception as exc:  # a failed wait (a dead context) still releases the mappings and the region
            failure = exc
            steps.append(lambda: _raise(failure))
        if self._release is not None:
            steps.append(self._release)
        try:
            run_every([*steps, drop_region])
        finally:
            self.table = self.control = self._local_region = None  # type: ignore[assignment]


def _raise(error: Exception) -> None:
    raise error


class _OwnedRegion:
    """This rank's region from ``memory.allocate``, freed once the workspace is closed and the last reference goes:
    the workspace's (dropped at close()) or a registered tensor's.  A workspace never closed keeps it (a free at
    garbage collection could land inside a CUDA-graph capture).  A last reference that goes, on any thread, while a
    graph is captured anywhere in the process (``memory.capturing()``) queues the free for
    :func:`free_deferred_regions`.  ``free()`` frees it
    at once (a rendezvous that made no workspace)."""

    def __init__(self, memory: PeerMemory, ptr: int):
        self._closed = [False]
        self._finalizer = weakref.finalize(self, _free_closed, memory, ptr, self._closed)
        self._finalizer.atexit = False  # the process's memory goes with it

    def close(self) -> None:
        """From now on the region is freed with the last reference to this object."""
        self._closed[0] = True

    def free(self) -> None:
        self._closed[0] = True
        self._finalizer()


def _free_closed(memory: PeerMemory, ptr: int, closed: list[bool]) -> None:
    if closed[0]:  # cudaFree during a capture would invalidate it: later, at a safe point
        _release_outside_capture(_Waiting(memory.capturing, lambda: memory.free(ptr)))


class _Waiting(NamedTuple):
    """A release that must not run while a CUDA graph is captured: a region's free, a closed workspace's unmaps."""

    capturing: Callable[[], bool]  # whether running it now would break a capture in progress
    release: Callable[[], object]


def _release_outside_capture(waiting: _Waiting) -> bool:
    """Run ``waiting.release`` unless it would break a capture in progress, with the start of a new capture held off
    meanwhile; else queue it for :func:`free_deferred_regions`.  Whether it ran."""
    with capture.held_off():
        if waiting.capturing():
            _WAITING.append(waiting)
            return False
        waiting.release()
        return True


# Releases that waited for a CUDA-graph capture to end, run by free_deferred_regions.  Guarded by capture.held_off()'s
# re-entrant lock: a finaliser that frees a region may run on any thread, inside any other release.
_WAITING: list[_Waiting] = []


def free_deferred_regions() -> int:
    """Finish the releases that waited for a CUDA graph capture to end, where they would have invalidated it:
    the free of a workspace region whose last reference (a ``get_buffer`` tensor kept past ``close()``) went then,
    and the synchronisation, unmaps and free of a workspace closed then; return how many ran.  One whose memory
    still captures stays queued.  Every one is tried; the first error is raised after them.

    Runs on its own when the last tracked capture ends (:func:`sagellm_comm.capture.after_captures`: on the thread
    that ended it, an error logged), and at :meth:`SymmetricWorkspace.rendezvous` and :meth:`SymmetricWorkspace.close`;
    call it after a capture that was not tracked (one begun through no ``torch.cuda.CUDAGraph``, or before the first
    CUDA IPC workspace) to give the memory back sooner.  Safe from any thread: a capture on any thread of the process
    (:mod:`sagellm_comm.capture`) keeps them queued."""
    if not _WAITING:  # the common case, at every capture's end: nothing waits
        return 0
    with capture.held_off():
        pending = list(_WAITING)
        _WAITING.clear()
    ran: list[_Waiting] = []

    def retry(waiting: _Waiting) -> None:
        if _release_outside_capture(waiting):
            ran.append(waiting)

    run_every(lambda w=waiting: retry(w) for waiting in pending)
    return len(ran)


capture.after_captures(free_deferred_regions)


#: which call counter a phase's call number belongs to (the others: the barrier kernels' epoch)
_CALL_FAMILIES = {LAMPORT: "Lamport", "copy-engine": "copy-engine", "check": "checked", "tile": "GEMM"}
_DTYPE_NAMES = {code: name for name, code in _fp.DTYPE_CODES.items()}
_ALGO_NAMES = {code: name for name, code in _fp.ALGO_CODES.items()}


def _decode_fingerprint(words) -> dict:
    algo, size, dtype, call = (int(w) for w in words)
    name = _ALGO_NAMES.get(algo, f"algo#{algo}")
    numel, shape = _fp.decode_size(name, size)
    decoded = {"algo": name, "numel": numel, "dtype": _DTYPE_NAMES.get(dtype, f"dtype#{dtype}"), "call": call}
    if shape is not None:
        decoded["shape"] = shape
    return decoded


def _describe(fp: dict) -> str:
    size = " x ".join(map(str, fp["shape"])) if "shape" in fp else str(fp["numel"])
    if fp["algo"] == _fp.REFUSED:
        return f"nothing: it refused its input of {size} x {fp['dtype']} and raised (check call {fp['call']})"
    return f"{fp['algo']} of {size} x {fp['dtype']} (check call {fp['call']})"


def local_workspaces(
    world_size: int,
    slot_bytes: int,
    device: torch.device | str,
    max_programs: int | None = None,
    check: bool | None = None,
    config: CommConfig | None = None,
) -> list[SymmetricWorkspace]:
    """Virtual ranks: ``world_size`` workspaces in this process, regions allocated on one device.

    Every rank gets the same configuration (default: read from the environment; ``check`` replaces its
    check mode) and program count (default :func:`default_max_programs` with the device's SMs divided among
    the ranks).  The regions are freed when the last of the returned workspaces is closed.

    Per-rank objects over these workspaces, called one rank after another from one thread: a GPU module is
    loaded on a kernel's first launch, and a load may wait for the device to go idle, so it stalls behind a
    rank's kernel that spins for a peer this thread has not launched yet (until that wait's deadline).  Our
    collectives load their kernels before anything of the call can spin; the kernels of other libraries
    (cuBLAS on the GEMM's copy-engine path) and a specialisation only some ranks run (ranks that disagree, in
    check mode) must have been loaded by an earlier call.  Stacked calls (``VirtualRankGroup``) and processes do not
    have this constraint.
    """
    world_size = check_int(world_size, "world_size", 1)
    device = check_device(device)
    config = _configuration(config, check)
    if device.type == "cuda":
        capture.track()  # a close on one thread while another captures waits for the capture, as over CUDA IPC
    if max_programs is None:
        max_programs = default_max_programs(device, world_size, config.max_programs)
    slot_bytes = _round_slot(slot_bytes)
    nbytes = region_bytes(slot_bytes, world_size)
    regions = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(world_size)]
    for region in regions:
        region[lamport_offset(slot_bytes) :].fill_(_lk.SENTINEL_BYTE)
    ptrs = [r.data_ptr() for r in regions]
    # Control words and error records of all ranks in one allocation each: the one-launch mode of
    # virtual ranks finds rank r's at row r.
    control = _new_control((world_size,), device, config.initial_epoch)
    errors = torch.zeros(world_size, _k.ERR_WORDS.value, dtype=torch.int64, pin_memory=device.type == "cuda")
    open_count = [world_size]

    def release() -> None:
        open_count[0] -= 1
        if open_count[0] == 0:
            regions.clear()

    return [
        SymmetricWorkspace(
            r,
            world_size,
            slot_bytes,
            ptrs,
            device,
            release,
            regions[r],
            control=control[r],
            error_record=errors[r],
            ranks_on_device=world_size,
            max_programs=max_programs,
            config=config,
        )
        for r in range(world_size)
    ]
