"""Notification rings of the ``ipc`` transport: how a receiver learns, without a host round trip per block,
that a transfer into (or out of) its memory finished.

Every agent owns an *inbox*: a file in shared host memory (``/dev/shm``) holding ``SLOTS`` single-producer,
single-consumer rings.  A sender that adds the agent as a peer claims one slot (:class:`Outbox`) and becomes
its only producer; the inbox's owner is its only consumer (:meth:`Inbox.drain`, called by
``TransferAgent.notifications``).  On a GPU the sender registers its slot's pages with
``cudaHostRegister`` (mapped), so the block-copy kernel itself writes the record after the data
(``sagellm_comm/kernels/block_copy.py``); under the interpreter the kernel writes it through the same mapping.
The sender's host writes a record's length and message into the entry before the launch; the kernel writes
only its sequence number.

Layout (int64 words unless said otherwise)::

    file header (4 KB): MAGIC, VERSION, SLOTS, ENTRIES, RECORD_BYTES, CLAIMS (how many claims were made)
    slot s at 4 KB + s * SLOT_BYTES:
        header (4 KB): token (0: free), consumed, released, produced_final, name length, path length,
                       claim number, sender name (bytes 64..), sender's inbox path (bytes 512..)
        ENTRIES records of RECORD_BYTES: seq | nbytes | message

Protocol:

1. *Claim* (sender, once per peer): under an exclusive ``flock`` of the inbox's ``-claim`` file, pick a slot
   that is free, released by its sender and fully consumed, or whose sender died with nothing left visible (a
   sender is told alive by its inbox's lock; a sender path that is no transfer file is never opened: dead);
   zero its records, write ``consumed = 0``, the sender's name and path, its claim number (``CLAIMS + 1``),
   then (after a fence) a fresh random ``token``, then (after a fence) add 1 to the file's ``CLAIMS``.  The
   token is written after the rest and ``CLAIMS`` after the token: a reader that sees the new count sees the
   token and the rest.
2. *Produce*: the sender numbers its notifications 1, 2, ... (``seq``); record ``seq`` lives in entry
   ``(seq - 1) % ENTRIES``.  It may produce ``seq`` only while ``seq - consumed <= ENTRIES`` (else the ring is
   full: the receiver is not reading, and the transfer is refused before any byte moves).  The sender's host
   writes the record's ``nbytes`` and message (:meth:`Outbox.stage`), then launches the copy whose last
   program writes ``seq`` with a system-scope release; the receiver does not read an entry whose word is not
   its ``seq``, so the body may be written while the entry still holds ``seq - ENTRIES`` (already consumed).
3. *Consume* (receiver): read ``CLAIMS``; when it changed since the last drain, (fence) read every slot's
   ``token``, and start a slot whose token changed again at ``seq = consumed + 1`` with the new sender's
   name (one word per drain while no sender comes or goes).  Claimed slots are read in the order of their
   claim numbers, so a sender that gave one slot back and claimed another (``add_peer`` again) has its
   older slot's records delivered first.  Per claimed slot: while entry ``seq``'s word
   equals ``seq``: fence, read the message, advance.  (Fence.)  Read ``token`` again: if it changed meanwhile
   (the slot was claimed by a new sender), discard this pass.  Then publish ``consumed``.
4. *Release* (sender's ``remove_peer`` / ``close``): ``produced_final = last seq``, (fence) ``released = 1``,
   without the claim lock (a frozen claimer cannot stall it); the slot is reused only once a claimer read
   ``released`` and ``consumed`` reached ``produced_final``.

Host-side fences are an uncontended lock acquire/release (a full barrier in C), so the order holds on weakly
ordered CPUs too.  Where the CPU keeps loads in order with loads and stores in order with stores (x86-64's
total store order: ``ORDERED``), only a store followed by a load needs one, and the hot paths (the drain's
reads, the resident copier's request) leave the others out.  Sequence numbers and counters are int64 and never
wrap.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import multiprocessing.util
import os
import platform
import secrets
import threading
import time

import numpy as np

from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError, UnavailableError
from sagellm_comm.kernels.block_copy import MAX_MESSAGE_BYTES
from sagellm_comm.kernels.block_copy import RECORD_BYTES as _RECORD_BYTES
from sagellm_comm.kernels.block_copy import RING_ENTRIES as _RING_ENTRIES
from sagellm_comm.shm import LivenessProbe, OwnedFd, OwnerLock, companion_path, reserve, sweep_stale
from sagellm_comm.transfer.shared import new_path, open_transfer_file, transfer_path, transfer_rule

MAGIC = 0x5341474C58464552  # "SAGLXFER"
VERSION = 3
SLOTS = 32
ENTRIES = _RING_ENTRIES.value
RECORD_BYTES = _RECORD_BYTES.value
PAGE = 4096
SLOT_BYTES = PAGE + ENTRIES * RECORD_BYTES
FILE_BYTES = PAGE + SLOTS * SLOT_BYTES
CLAIMS = 5  # file header word: how many slots were claimed (a sender bumps it after writing a token)
# slot header words
TOKEN, CONSUMED, RELEASED, PRODUCED_FINAL, NAME_LEN, PATH_LEN, CLAIM_NUMBER = range(7)
NAME_AT, PATH_AT, MAX_NAME, MAX_PATH = 64, 512, 256, 1024

_FENCE = threading.Lock()
# fence() as its two calls, for a caller that writes them in line (a Python call layer less on a hot path).
FENCE_ACQUIRE, FENCE_RELEASE = _FENCE.acquire, _FENCE.release
# The CPU keeps loads in order with loads and stores with stores (x86-64's total store order): a fence is
# needed only between a store and a later load.
ORDERED = platform.machine().lower() in ("x86_64", "amd64", "x64")


def claim_path(inbox_path: str) -> str:
    """The file whose exclusive ``flock`` serialises claims and releases of the slots of the inbox at
    ``inbox_path`` (a companion of the inbox: it lives as long as the inbox's owner)."""
    return companion_path(inbox_path, "claim")


def fence() -> None:
    """A full memory barrier on the host (an uncontended lock round trip)."""
    _FENCE.acquire()
    _FENCE.release()


class _Mapped:
    """A mapping of an inbox file with int64 and byte views."""

    def __init__(self, path: str, create: bool):
        self.path = path
        # closed by close(), or when this mapping is freed (its owner dropped without closing it); a peer's inbox
        # only where it is a transfer file (shared.open_transfer_file)
        if create:
            self._owned = OwnedFd(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            self._owned = open_transfer_file(path, os.O_RDWR, "the peer's notification inbox")
        self.fd = self._owned.fd
        if create:
            try:
                reserve(self.fd, FILE_BYTES, path)  # a sender's store never meets a page /dev/shm cannot give
            except BaseException:
                self._owned.close()
                os.unlink(path)
                raise
        elif os.fstat(self.fd).st_size != FILE_BYTES:
            self._owned.close()
            raise BackendNotSupportedError(f"{path} is not an inbox of this version ({FILE_BYTES} bytes expected)")
        self.map = mmap.mmap(self.fd, FILE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.words = self.bytes.view(np.int64)
        self.ints = memoryview(self.map).cast("q")  # the same words; one read gives a Python int, no numpy call
        self.address = self.bytes.ctypes.data

    @staticmethod
    def slot_word(slot: int, word: int) -> int:
        return (PAGE + slot * SLOT_BYTES) // 8 + word

    @staticmethod
    def record_offset(slot: int, seq: int) -> int:
        return PAGE + slot * SLOT_BYTES + PAGE + ((seq - 1) % ENTRIES) * RECORD_BYTES

    def text(self, slot: int, at: int, length: int, limit: int) -> str:
        """The string of ``length`` bytes at ``at`` of the slot's header, cut to its field's ``limit`` bytes (the
        length is the sender's to write: a wrong one never reads the next field)."""
        start = PAGE + slot * SLOT_BYTES + at
        return bytes(self.bytes[start : start + max(0, min(length, limit))]).decode(errors="replace")

    def close(self) -> None:
        self.ints.release()
        self.bytes = self.words = self.ints = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):  # a view still exported: the mapping goes with it
            self.map.close()
        self.fd = -1
        self._owned.close()


def _remove_files_of(owner_pid: int, paths: tuple[str, ...]) -> None:
    """Remove ``paths`` if this is the process that made them (a forked child inherits the finalizer)."""
    if os.getpid() != owner_pid:
        return
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


class Inbox:
    """This agent's inbox (the consumer side; see the module docstring).  Its files and its owner lock go at
    :meth:`close`, or when the inbox is freed or the interpreter exits without it (only a killed process leaves
    the files, for the sweep): a peer then sees it gone."""

    def __init__(self):
        sweep_stale()
        self.path = new_path("-inbox")
        self.claim_path = claim_path(self.path)
        self._mapped = _Mapped(self.path, create=True)
        try:
            open(self.claim_path, "wb").close()
            self._lock = OwnerLock(self.path)  # liveness: held until close() or exit
        except BaseException:
            _remove_files_of(os.getpid(), (self.path, self.claim_path))
            self._mapped.close()
            raise
        # Also at exit, the exit of a multiprocessing child (os._exit, after its finalizers) included.
        self._remove_at_exit = multiprocessing.util.Finalize(
            self, _remove_files_of, args=(os.getpid(), (self.path, self.claim_path)), exitpriority=0
        )
        words = self._mapped.words
        words[1:5] = (VERSION, SLOTS, ENTRIES, RECORD_BYTES)
        fence()
        words[0] = MAGIC
        # What the last drain saw: the claim count; per slot its token, the next sequence number and the word
        # that will hold it, the sender's name and its claim number; ``_claimed``: the slots whose token was not
        # 0, in the order they were claimed.
        self._claims = 0
        self._tokens = [0] * SLOTS
        self._next = [1] * SLOTS
        self._next_word = [0] * SLOTS
        self._names = [""] * SLOTS
        self._claim_numbers = [0] * SLOTS
        self._claimed: list[int] = []
        self._ints, self._map = self._mapped.ints, self._mapped.map  # the drain's views
        first = _Mapped.slot_word(0, TOKEN)
        stride = SLOT_BYTES // 8
        self._token_view = self._mapped.ints[first : first + SLOTS * stride : stride]  # every slot's token word

    def drain(self) -> list[tuple[str, bytes]]:
        """Every record published since the last drain, ``(sender name, message)``, oldest first per sender."""
        ints = self._ints
        out: list[tuple[str, bytes]] = []
        if ints[CLAIMS] != self._claims:
            self._follow()
        expected, words = self._next, self._next_word
        for slot in self._claimed:
            if ints[words[slot]] == expected[slot]:  # the slot's next record was published
                self._read(slot, out)
        return out

    def _follow(self) -> None:
        """Take in slots whose token changed since the last drain: a freed slot is left alone, a newly claimed
        one is read from ``consumed + 1`` with its new sender's name."""
        m = self._mapped
        words = m.words
        self._claims = self._ints[CLAIMS]  # read before the tokens: a claim after this read is seen next time
        fence()
        tokens = self._token_view.tolist()
        for slot, token in enumerate(tokens):
            if token == self._tokens[slot]:
                continue
            self._tokens[slot] = token
            if token == 0:
                continue
            fence()
            base = m.slot_word(slot, 0)
            self._advance(slot, int(words[base + CONSUMED]) + 1)
            self._names[slot] = m.text(slot, NAME_AT, int(words[base + NAME_LEN]), MAX_NAME)
            self._claim_numbers[slot] = int(words[base + CLAIM_NUMBER])
        claimed = [slot for slot, token in enumerate(tokens) if token]
        self._claimed = sorted(claimed, key=self._claim_numbers.__getitem__)

    def _advance(self, slot: int, seq: int) -> None:
        self._next[slot] = seq
        self._next_word[slot] = _Mapped.record_offset(slot, seq) // 8

    def _read(self, slot: int, out: list[tuple[str, bytes]]) -> None:
        """Append the slot's records published from its next sequence number on (the token seen at the start of
        this drain still holding) and mark them consumed.  (The offsets of :meth:`_Mapped.record_offset` and
        :meth:`_Mapped.slot_word`, computed in line: this runs once per notification received.)"""
        ints, data = self._ints, self._map
        ring = PAGE + slot * SLOT_BYTES + PAGE  # the slot's entry 0
        seq, found = self._next[slot], []
        at = ring + (seq - 1) % ENTRIES * RECORD_BYTES
        while ints[at >> 3] == seq:
            if not ORDERED:
                fence()  # the number before the record
            # A length past the record reads to its end; a negative one reads nothing.
            found.append(data[at + 16 : at + 16 + max(0, min(ints[(at >> 3) + 1], MAX_MESSAGE_BYTES))])
            seq += 1
            at = ring + (seq - 1) % ENTRIES * RECORD_BYTES
        if not found:
            return
        base = (PAGE + slot * SLOT_BYTES) >> 3
        if not ORDERED:
            fence()  # the records before the token's second read
        if ints[base + TOKEN] != self._tokens[slot]:
            return  # claimed by a new sender meanwhile: its records are read with its name next time
        name = self._names[slot]
        for message in found:
            out.append((name, message))
        self._next[slot] = seq
        self._next_word[slot] = at >> 3
        ints[base + CONSUMED] = seq - 1

    def close(self) -> None:
        self._remove_at_exit()  # the files, once
        self._lock.release()
        self._token_view.release()
        self._mapped.close()


class Outbox:
    """One slot of a peer's inbox, claimed by this agent (the producer side; see the module docstring)."""

    def __init__(self, inbox_path: str, sender_name: str, sender_inbox: str, timeout_s: float, peer: str = ""):
        self.peer_path = inbox_path
        self.peer = peer  # the inbox's owner, named in the errors of this slot's notifications
        # Every file of the peer's inbox is opened at the path resolved once, and only as a transfer file.
        resolved = transfer_path(inbox_path)
        if resolved is None:
            raise InvalidArgumentError(
                f"the peer's notification inbox {inbox_path!r} is not a transfer file: it must be {transfer_rule()}"
            )
        try:
            self._mapped = _Mapped(resolved, create=False)
        except OSError as exc:
            raise BackendNotSupportedError(f"cannot open the peer's notification inbox {inbox_path}: {exc}") from None
        self.liveness = LivenessProbe(resolved)
        words = self._mapped.words
        geometry = tuple(int(w) for w in words[:5])
        try:
            if geometry != (MAGIC, VERSION, SLOTS, ENTRIES, RECORD_BYTES):
                raise BackendNotSupportedError(f"the peer's inbox {inbox_path} has another layout: {geometry}")
            self.slot = self._claim(claim_path(resolved), sender_name.encode(), sender_inbox.encode(), timeout_s)
        except BaseException:  # no slot (full inbox, claim lock not taken in time...): the files are let go
            self._close_files()
            raise
        self.produced = 0
        self._consumed_word = _Mapped.slot_word(self.slot, CONSUMED)
        # The receiver's count of records consumed, as last read: it only grows while this sender holds the
        # slot, so a stale value can only make the ring look fuller than it is (then it is read again).
        self._consumed_seen = self._mapped.ints[self._consumed_word]
        self._ring_at = _Mapped.record_offset(self.slot, 1)  # entry 0's offset in the mapping
        self.ring_address = self._mapped.address + self._ring_at
        self.slot_range = (self._mapped.address + PAGE + self.slot * SLOT_BYTES, SLOT_BYTES)

    def _claim(self, lock_path: str, name: bytes, path: bytes, timeout_s: float) -> int:
        m = self._mapped
        if len(name) > MAX_NAME or len(path) > MAX_PATH:
            raise BackendNotSupportedError(f"agent name or inbox path too long for the ring ({len(name)}, {len(path)})")
        claim = open_transfer_file(lock_path, os.O_RDWR, "the peer's inbox claim file")
        fd = claim.fd
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:  # another sender claims or gives back a slot: try again later
                        raise UnavailableError(
                            f"could not take the claim lock of the peer's notification inbox ({lock_path}) within "
                            f"{timeout_s:g} s: another sender holds it"
                        ) from None
                    time.sleep(1e-3)
            slot = next((s for s in range(SLOTS) if self._reclaimable(s)), None)
            if slot is None:
                words = m.words
                unread = sum(int(words[m.slot_word(s, RELEASED)]) == 1 for s in range(SLOTS))
                raise UnavailableError(
                    f"the peer's notification inbox has no free slot: of its {SLOTS}, {unread} were given back by "
                    f"senders whose notifications the peer has not read yet, the others are held by senders (a slot "
                    "frees once the peer has read its notifications or another sender removed it)"
                )
            base = m.slot_word(slot, 0)
            words = m.words
            words[base + TOKEN] = 0
            fence()
            start = m.record_offset(slot, 1)
            m.words[start // 8 : (start + ENTRIES * RECORD_BYTES) // 8 : RECORD_BYTES // 8] = 0
            words[base + CONSUMED] = 0
            words[base + RELEASED] = 0
            words[base + PRODUCED_FINAL] = 0
            words[base + NAME_LEN], words[base + PATH_LEN] = len(name), len(path)
            words[base + CLAIM_NUMBER] = int(words[CLAIMS]) + 1
            at = PAGE + slot * SLOT_BYTES
            m.bytes[at + NAME_AT : at + NAME_AT + len(name)] = np.frombuffer(name, dtype=np.uint8)
            m.bytes[at + PATH_AT : at + PATH_AT + len(path)] = np.frombuffer(path, dtype=np.uint8)
            fence()
            words[base + TOKEN] = secrets.randbits(62) + 1
            fence()
            words[CLAIMS] += 1  # under the claim lock: one writer at a time
            return slot
        finally:
            claim.close()  # drops the claim lock

    def _reclaimable(self, slot: int) -> bool:
        m = self._mapped
        words, base = m.words, m.slot_word(slot, 0)
        if int(words[base + TOKEN]) == 0:
            return True
        consumed = int(words[base + CONSUMED])
        if int(words[base + RELEASED]) == 1:
            return consumed >= int(words[base + PRODUCED_FINAL])
        # A sender path that is no transfer file is no live agent's (and is never opened).
        sender = transfer_path(m.text(slot, PATH_AT, int(words[base + PATH_LEN]), MAX_PATH))
        alive = False
        if sender is not None:
            probe = LivenessProbe(sender)
            try:
                alive = probe.alive()
            finally:
                probe.close()
        # A dead sender's slot is reused once nothing it published is left unread.
        return not alive and int(words[m.record_offset(slot, consumed + 1) // 8]) != consumed + 1

    def stage(self, message: bytes) -> int:
        """Write the next notification's length and message into its ring entry (the kernel publishes its
        sequence number after the transfer's bytes) and return that number; ``UnavailableError`` when the ring
        is full (the receiver has ``ENTRIES`` unread notifications from this agent)."""
        return self.stage_entry(message)[0]

    def stage_entry(self, message: bytes) -> tuple[int, int]:
        """:meth:`stage`, returning ``(number, address of its ring entry)`` (:meth:`entry_address`)."""
        seq = self.produced + 1
        mapped = self._mapped
        consumed = self._consumed_seen
        if seq - consumed > ENTRIES:  # full by the count last read: read it again (a line the receiver writes)
            consumed = self._consumed_seen = mapped.ints[self._consumed_word]
        if seq - consumed > ENTRIES:
            peer = self.peer
            raise UnavailableError(
                f"{f'peer {peer!r}' if peer else 'the peer'} has {seq - 1 - consumed} unread notifications from this "
                f"agent (ring of {ENTRIES}): it must call notifications() before more can be sent; nothing was sent",
                details={"peer": peer} if peer else None,
            )
        at = self._ring_at + ((seq - 1) % ENTRIES) * RECORD_BYTES  # _Mapped.record_offset(self.slot, seq)
        mapped.map[at + 8 : at + 16 + len(message)] = len(message).to_bytes(8, "little") + message
        self.produced = seq
        return seq, mapped.address + at

    def entry_address(self, seq: int) -> int:
        """The address of notification ``seq``'s ring entry (its word 0 takes the published number)."""
        return self._mapped.address + _Mapped.record_offset(self.slot, seq)

    def unstage(self) -> None:
        """Take back the last :meth:`stage` (its transfer was never enqueued; nothing will publish it)."""
        self.produced -= 1

    def release(self) -> None:
        """Give the slot back (the receiver still drains what was published).  Two stores and no lock, so it
        never waits: a claimer reuses the slot only once it reads ``released`` (written last) and its
        ``consumed`` reached ``produced_final``; until then the slot is this live sender's and untouched."""
        m = self._mapped
        base = m.slot_word(self.slot, 0)
        m.words[base + PRODUCED_FINAL] = self.produced
        fence()
        m.words[base + RELEASED] = 1
        self._close_files()

    def _close_files(self) -> None:
        self.liveness.close()
        self._mapped.close()


__all__ = [
    "Inbox",
    "Outbox",
    "claim_path",
    "fence",
    "FENCE_ACQUIRE",
    "FENCE_RELEASE",
    "ENTRIES",
    "SLOTS",
    "RECORD_BYTES",
    "FILE_BYTES",
]
