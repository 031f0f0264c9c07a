"""The ``ipc`` transport's resident copier: small one-block requests served by a kernel that is already running.

A kernel launch costs the host several microseconds (4-10 us per launch on the virtual machines of the records,
more than the copy of a 16 KB block takes on the GPU).  The resident copier (``block_copy_server_kernel`` in
``sagellm_comm/kernels/block_copy.py``, whose docstring gives the protocol) is one program that polls a mailbox
in pinned host memory: posting a request is a few stores, and its completion is a word the host reads.  The
program exits after ``idle_ns`` without a request or, at a moment it finds no request waiting, after ``max_ns``
of life; the next request launches it again.

While it runs it holds part of one SM, and a device-wide synchronisation (``torch.cuda.synchronize()``, the
start of a CUDA-graph capture) waits for it to exit: at most the idle window after the last request.  Its life
bounds a program that sees gaps between requests; a host that posts faster than it copies keeps it running
until the posts pause (an exit with requests waiting would leave them to a relaunch nobody makes).
"""

from __future__ import annotations

import time

import torch

from sagellm_comm.errors import BackendNotSupportedError, CommTimeoutError, TransferError
from sagellm_comm.kernels import block_copy as _bc
from sagellm_comm.launch import Launcher
from sagellm_comm.transfer.notify import FENCE_ACQUIRE, FENCE_RELEASE, ORDERED, fence

STATE, STOP, DONE, RING = _bc.SERVER_STATE.value, _bc.SERVER_STOP.value, _bc.SERVER_DONE.value, _bc.SERVER_RING.value
ENTRIES, ENTRY_WORDS = _bc.SERVER_ENTRIES.value, _bc.SERVER_ENTRY_WORDS.value
TAG_SHIFT, TAG_MASK = _bc.SERVER_TAG_SHIFT.value, _bc.SERVER_TAG_MASK.value
FIELD_LIMIT = 1 << TAG_SHIFT  # every field of a request is below this (its top bits carry the tag)
IDLE, SERVING, EXITING = _bc.STATE_IDLE.value, _bc.STATE_SERVING.value, _bc.STATE_EXITING.value
TILE_VEC = 2048  # int32 elements: 8 KB tiles, 16 vector loads in flight per lane (one warp, no spills)
TILE_BYTES = 1024


class QueuedUndecidedError(TransferError):
    """:meth:`ResidentCopier.post` wrote request ``seq`` into the mailbox, then could not tell whether a program
    will serve it: the request stays queued (it may still be served, its notification published after its
    bytes), so the caller keeps what it staged for it and counts it as posted.  It is served before any later
    request of the copier: by the program that was deciding, or by one the next post or wait starts once that
    program exited without it (:meth:`ResidentCopier.resume`)."""

    def __init__(self, message: str, seq: int):
        super().__init__(message)
        self.seq = seq


# A wait on the copier spins this long (a request is served within microseconds), then sleeps between reads.
SPIN_S = 50e-6


class ResidentCopier:
    """The host side of one agent's resident copier (module docstring): :meth:`post` a request, read
    :meth:`completed`, :meth:`wait` for one, :meth:`close`."""

    def __init__(self, device: torch.device, idle_ns: int, max_ns: int, timeout_s: float):
        cuda = device.type == "cuda"
        self.box = torch.zeros(_bc.SERVER_WORDS, dtype=torch.int64, pin_memory=cuda)
        self.ints = memoryview(self.box.numpy()).cast("B").cast("q")  # one read gives a Python int
        self.timeout_s = timeout_s
        self.posted = 0  # number of the last request posted
        # The served count as last read by post(): the program writes that word after every request, so the
        # host's read of it misses its caches; post() reads it only when the mailbox looks full by this (lower)
        # count.
        self.done_seen = 0
        index = device.index or 0
        self.launcher = Launcher(_bc.block_copy_server_kernel, cuda, index, num_warps=1)
        self.values = self.launcher.bind(
            box_addr=self.box.data_ptr(), idle_ns=idle_ns, max_ns=max_ns, USE_PTX=cuda,
            TILE_VEC=TILE_VEC if cuda else 16384, TILE_BYTES=TILE_BYTES if cuda else 16384,
        )  # fmt: skip
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.raw_stream = self.stream.cuda_stream if cuda else None
        self.leaked = False
        # Compile and load the kernel now (a launch told to stop at once), not in the first request.
        self.ints[STOP] = 1
        self.ints[STATE] = SERVING  # its last store makes it IDLE
        self._launch()
        if not self._stopped(time.monotonic() + max(timeout_s, 120.0)):
            self.leaked = True
            _LEAKED.append(self.box)
            raise BackendNotSupportedError(
                "the resident copier's first program did not stop in time: the GPU is not making progress"
            )
        self.ints[STOP] = 0

    def completed(self) -> int:
        """The number of the last request served (every earlier one was served too)."""
        return self.ints[DONE]

    def idle(self) -> bool:
        """No request is waiting or being served."""
        return self.ints[DONE] == self.posted

    def post(self, src: int, dst: int, nbytes: int, ring_entry: int, note: int, count_addr: int) -> int | None:
        """Queue a copy of ``nbytes`` from address ``src`` to ``dst``, then, when ``ring_entry`` is not 0, the
        publication of notification ``note`` (the link's count at ``count_addr`` set to it, then its number into
        word 0 of the ring entry the host staged at ``ring_entry``); returns the request's number, or None when
        the mailbox is full or a field does not fit its tag (nothing was queued)."""
        ints = self.ints
        seq = self.posted + 1
        if seq - self.done_seen > ENTRIES:  # full by the count last read: read it again (it only grows)
            self.done_seen = ints[DONE]
        if seq - self.done_seen > ENTRIES or (src | dst | nbytes | ring_entry | note | count_addr) >= FIELD_LIMIT:
            return None
        at = RING + ((seq - 1) & (ENTRIES - 1)) * ENTRY_WORDS
        tag = (seq & TAG_MASK) << TAG_SHIFT
        ints[at + 1] = src | tag
        ints[at + 2] = dst | tag
        ints[at + 3] = nbytes | tag
        ints[at + 4] = ring_entry | tag
        ints[at + 5] = note | tag
        ints[at + 6] = count_addr | tag
        if not ORDERED:
            fence()  # the fields before the number
        ints[at] = seq
        self.posted = seq
        FENCE_ACQUIRE()  # fence() in line: the number before reading the state (the program does the mirror image)
        FENCE_RELEASE()
        state = ints[STATE]
        if state == EXITING:
            deadline = time.monotonic() + self.timeout_s
            while (state := ints[STATE]) == EXITING:
                if time.monotonic() > deadline:
                    raise QueuedUndecidedError(
                        f"the resident copier did not decide whether to exit within {self.timeout_s:g} s (request "
                        f"{seq} may or may not be served): the GPU is not making progress",
                        seq,
                    )
        if state == SERVING:
            return seq
        try:
            self._start()
        except BaseException:
            ints[at] = 0
            self.posted = seq - 1
            raise
        return seq

    def _start(self) -> None:
        """Start a program (no program serves the mailbox: it stored ``IDLE`` last); it begins at ``done + 1``."""
        self.ints[STATE] = SERVING
        try:
            self._launch()
        except BaseException:
            self.ints[STATE] = IDLE
            raise

    def resume(self) -> bool:
        """Start a program when requests are queued and none will serve them, which happens only after a post
        raised :class:`QueuedUndecidedError` and the program it could not wait for exited without seeing that
        request; True if one was started.  Every wait calls it, so such a request (and its notification) is
        served, before the requests after it, as soon as the exit is decided."""
        if self.ints[STATE] != IDLE or self.ints[DONE] >= self.posted:
            return False
        self._start()
        return True

    def _launch(self) -> None:
        self.launcher((1, 1), self.values, self.raw_stream)

    def wait(self, seq: int, deadline: float | None = None, peer: str | None = None) -> None:
        """Block until request ``seq`` was served; ``CommTimeoutError`` at ``deadline`` (default: the timeout),
        naming ``peer`` when given.  Spins for ``SPIN_S``, then sleeps between reads.  A request queued with no
        program left to serve it (:meth:`resume`) gets one; while a program stays undecided on its exit, the
        wait ends at the deadline."""
        ints = self.ints
        if ints[DONE] >= seq:
            return
        now = time.monotonic()
        if deadline is None:
            deadline = now + self.timeout_s
        spin_until = now + SPIN_S
        while ints[DONE] < seq:
            self.resume()
            now = time.monotonic()
            if now > deadline:
                to = "" if peer is None else f" (a transfer to or from peer {peer!r} waits behind it)"
                raise CommTimeoutError(
                    f"the resident copier did not serve request {seq} in time (served up to {ints[DONE]}){to}",
                    details={} if peer is None else {"peer": peer},
                )
            if now > spin_until:
                time.sleep(1e-5)

    def _stopped(self, deadline: float) -> bool:
        """Wait until no program runs (its last store said so and its launch completed); False at ``deadline``."""
        while self.ints[STATE] != IDLE:
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-5)
        if self.stream is not None:
            while not self.stream.query():
                if time.monotonic() > deadline:
                    return False
                time.sleep(1e-5)
        return True

    def close(self) -> None:
        """Stop the program once every request was served; if it does not stop within the timeout its mailbox
        is kept for the life of the process (leaked rather than freed under a running kernel)."""
        deadline = time.monotonic() + self.timeout_s
        self.ints[STOP] = 1
        if not self._stopped(deadline):
            self.leaked = True
            _LEAKED.append(self.box)


_LEAKED: list[torch.Tensor] = []
