"""Block copy: a whole list of byte blocks moved between two regions in one launch, then one notification.

This is the device side of the ``ipc`` transfer path (``sagellm_comm/transfer/ipc.py``): the initiator maps a
peer's registered pools once through CUDA IPC (a shared file under the Triton interpreter), and a write or read
of any number of blocks is this one kernel over the two mappings.  Gather and scatter are the same thing here:
every block names its own source and destination offset.

Descriptor table (int64, read once per work item; pinned host memory for a one-off request, device memory
when prepared), three forms chosen by ``FIXED`` and ``INLINE``:

* listed (``FIXED=False``): ``n_items`` rows ``(src_offset, dst_offset, nbytes)``, byte offsets into the
  source and destination regions.  The host cuts every block longer than ``part_bytes`` into pieces of at
  most ``part_bytes``, so that one long block is spread over many programs like many short ones.
* fixed-size blocks (``FIXED=True``): ``n_items`` rows ``(src_block, dst_block)``, block indices into pools
  of ``block_bytes``-long blocks (a KV cache's layout); block ``i`` is ``parts`` work items of
  ``part_bytes`` (the last one shorter).
* one block (``FIXED=True, INLINE=True``): no table; ``src_base`` and ``dst_base`` are the block's own
  addresses and ``block_bytes`` its length, cut into ``parts`` items.  A one-block request reads nothing from
  host memory before it copies.  With ``n_items = 0`` nothing is copied: the launch only publishes a
  notification (after a copy-engine copy on the same stream).

Work: item ``w`` belongs to program ``w % num_programs`` (a grid-stride loop); programs never wait for each
other, so the grid can be as large as the work (no co-residency assumption).  An item is copied in tiles of
``TILE`` elements: full tiles unmasked, then one masked tail.  With ``VEC`` every address and length is a
multiple of 16 bytes (the host checks) and elements are int32 under a 16-byte alignment hint, so each thread
moves 16-byte vectors (``ld.global.cg.v4`` / ``st.global.v4``: what NVLink and HBM need); without it,
elements are bytes and any offset or length works.

Completion and the notification (the invariant the receiver relies on: it learns of a transfer only after
every byte of it is visible).  Without ``NOTIFY`` the launch ends after its copies (the initiator learns of
completion from a CUDA event).  With it:

1. Every program stores its tiles, then the block synchronises (all its threads' stores precede step 2).
2. One thread adds 1 to ``counter`` with an acquire-release atomic at *system* scope: the release makes this
   program's stores visible (to the host and to peer GPUs too) before the count, the acquire makes the
   stores of every program counted before it visible to this one.
3. The program that brings the count to ``num_programs`` (the last) resets the counter to 0 for the next
   launch (launches sharing a counter run on one stream, so they never overlap), takes the link's next
   sequence number from ``seq_addr`` (a device word counting this link's notifications; the host counts the
   same launches) and publishes it with one release store (system scope) into word 0 of ring entry
   ``(seq - 1) % RING_ENTRIES`` at ``ring_addr``.  The host wrote the entry's length and message before
   the launch (``sagellm_comm/transfer/notify.py``), so they are visible before the launch starts; release
   is cumulative, so every program's data (acquired in step 2) is visible before the sequence number is.
   The receiver's host reads the sequence number first, then the record.

The sequence number lives in device memory, not in a launch argument: an integer argument is compiled as
int32 or int64 by its value, and a counter must not change the kernel's signature as it grows.  Every
address argument is a real address (never 0), so it is always int64.

Resident copier (``block_copy_server_kernel``): one program (one warp) that stays on the GPU while requests
keep coming, so a small request costs the host a few stores into pinned memory instead of a launch.  Its
*mailbox* is pinned host memory (int64 words, ``SERVER_*`` below): a state word, a stop word, the number of the
last request it completed, and a ring of ``SERVER_ENTRIES`` requests of eight words ``(seq, src, dst, nbytes,
ring_entry, note, count_addr, 0)``.  Requests are numbered 1, 2, ...; the host writes an entry's fields, each
tagged in its top bits with the low bits of the request's number (``SERVER_TAG_*``: every field is below
``2**SERVER_TAG_SHIFT``, the host checks), then its ``seq``.  The program reads the whole entry (and the stop
word) with one load instruction of the warp: one round trip over PCIe per poll.  The entry is ready when its
``seq`` is the next number and every field carries that number's tag; a field from the entry's previous use
carries another tag, so a read that saw some words before the host rewrote them is never taken for a request,
and a request needs no second read.  Every decision is taken on a value reduced over the warp's lanes, so all
lanes take the same branch even while the host is writing.  The program copies the block (``_copy_bytes``,
loads through L2 so nothing cached by an earlier request is read), synchronises, and then one lane stores the
notification's number ``note`` into the link's count at ``count_addr`` (device memory, read by the next
launch's ``_publish``), fences (acquire-release, system scope: the fence also orders the entry's read, and so
the notification record the host staged before it, before what follows), stores ``note`` into word 0 of the
receiver's ring entry ``ring_entry`` (when not 0) and the request's number into ``done``: two plain stores,
so the host that reads either sees every byte.

Exit: after ``idle_ns`` without a request, after ``max_ns`` of life (both checked when no request is waiting),
or when asked to stop, the program
stores ``STATE_EXITING``, synchronises, fences in every lane (sequentially consistent, system scope) and
reads the next entry's number once more: if a request arrived it stores ``STATE_SERVING`` and goes on, else it
stores ``STATE_IDLE`` and returns.  The host, after writing a request's ``seq``, fences and reads the state
(Dekker's pattern): ``SERVING``, the program will see the request; ``EXITING``, it waits for the program's
decision; ``IDLE``, it stores ``SERVING`` and launches a new program, which starts at ``done + 1``.  So a
request is never left without a program, and two programs never serve at once (a new one is launched only
after the old one stored ``IDLE``, its last store, on the same stream).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sagellm_comm.kernels.all_reduce import _fence_sc_sys, _load_acquire, _pick, _ptr, _ticks

RECORD_BYTES = tl.constexpr(512)  # one notification: int64 seq | int64 nbytes | message (up to 496 bytes)
RECORD_HEADER_BYTES = tl.constexpr(16)
RING_ENTRIES = tl.constexpr(64)  # records in one sender's ring of a receiver's inbox
MAX_MESSAGE_BYTES = RECORD_BYTES.value - RECORD_HEADER_BYTES.value
VEC_BYTES = 16  # the alignment of every address and length on the vector path
VEC_ALIGN = tl.constexpr(VEC_BYTES)
# Resident copier's mailbox (int64 words; each group on its own 128-byte line).
SERVER_STATE = tl.constexpr(0)
SERVER_STOP = tl.constexpr(16)
SERVER_DONE = tl.constexpr(32)
SERVER_RING = tl.constexpr(64)
SERVER_ENTRIES = tl.constexpr(64)  # a power of two
SERVER_ENTRY_WORDS = tl.constexpr(8)  # seq, src, dst, nbytes, ring_entry, note, count_addr, 0
SERVER_WORDS = SERVER_RING.value + SERVER_ENTRIES.value * SERVER_ENTRY_WORDS.value
SERVER_TAG_SHIFT = tl.constexpr(48)  # a field's tag: bits 48-62 (every field is below 2**48)
SERVER_TAG_MASK = tl.constexpr(0x7FFF)  # the tag: the request's number modulo 2**15
SERVER_FIELD_MASK = tl.constexpr((1 << 48) - 1)
STATE_IDLE = tl.constexpr(0)
STATE_SERVING = tl.constexpr(1)
STATE_EXITING = tl.constexpr(2)
SERVER_THREADS = tl.constexpr(32)  # num_warps=1: a reduction over the lanes is a few shuffles


@triton.jit
def _copy_bytes(src_addr, dst_addr, nbytes, VEC: tl.constexpr, TILE: tl.constexpr):
    """Copy ``nbytes`` from address ``src_addr`` to ``dst_addr``: full tiles unmasked, one masked tail."""
    offs = tl.arange(0, TILE)
    if VEC:
        src = _ptr(src_addr, tl.int32)
        dst = _ptr(dst_addr, tl.int32)
        nelem = tl.multiple_of(nbytes // 4, 4)
    else:
        src = src_addr.to(tl.pointer_type(tl.uint8))
        dst = dst_addr.to(tl.pointer_type(tl.uint8))
        nelem = nbytes
    full = nelem // TILE * TILE
    for start in tl.range(0, full, TILE):
        at = tl.multiple_of(start, TILE)
        vals = tl.load(src + at + offs, cache_modifier=".cg")
        tl.store(dst + at + offs, vals)
    if full < nelem:
        mask = full + offs < nelem
        vals = tl.load(src + full + offs, mask=mask, cache_modifier=".cg")
        tl.store(dst + full + offs, vals, mask=mask)


@triton.jit
def _publish(seq_addr, ring_addr):
    """Take the link's next sequence number and release-store it into its ring entry (step 3 above)."""
    seq = tl.atomic_add(seq_addr.to(tl.pointer_type(tl.int64)), 1, sem="relaxed", scope="gpu") + 1
    entry = ring_addr + ((seq - 1) & (RING_ENTRIES - 1)) * RECORD_BYTES  # RING_ENTRIES: a power of two
    tl.atomic_xchg(entry.to(tl.pointer_type(tl.int64)), seq, sem="release", scope="sys")


@triton.jit
def block_copy_kernel(
    table_addr,
    src_base,
    dst_base,
    n_items,
    block_bytes,
    parts,
    part_bytes,
    counter_addr,
    seq_addr,
    ring_addr,
    FIXED: tl.constexpr,
    INLINE: tl.constexpr,
    VEC: tl.constexpr,
    NOTIFY: tl.constexpr,
    TILE: tl.constexpr,
):
    """Copy every block of the table from the source region to the destination region; with ``NOTIFY`` the
    last program publishes the notification (see the module docstring).

    ``table_addr``, ``src_base``, ``dst_base``, ``counter_addr`` (int64, this launch's stream's counter),
    ``seq_addr`` (the link's notification count, device memory) and ``ring_addr`` (entry 0 of the link's ring
    in the receiver's inbox) are addresses as mapped in this process (the last three ignored without
    ``NOTIFY``; ``table_addr`` with ``INLINE``).  Listed form: ``n_items`` rows of 3; fixed form: ``n_items``
    rows of 2, each block ``block_bytes`` long and cut into ``parts`` items of ``part_bytes``; one block
    (``INLINE``): ``n_items`` is 1 (or 0: publish only).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    table = table_addr.to(tl.pointer_type(tl.int64))
    if FIXED:
        for w in tl.range(pid, n_items * parts, num_programs):
            start = (w % parts).to(tl.int64) * part_bytes
            nbytes = tl.minimum(block_bytes - start, part_bytes)
            if INLINE:
                _copy_bytes(src_base + start, dst_base + start, nbytes, VEC, TILE)
            else:
                row = w // parts
                src_block = tl.load(table + 2 * row)
                dst_block = tl.load(table + 2 * row + 1)
                _copy_bytes(
                    src_base + src_block * block_bytes + start, dst_base + dst_block * block_bytes + start,
                    nbytes, VEC, TILE,
                )  # fmt: skip
    else:
        for row in tl.range(pid, n_items, num_programs):
            src_offset = tl.load(table + 3 * row)
            dst_offset = tl.load(table + 3 * row + 1)
            nbytes = tl.load(table + 3 * row + 2)
            _copy_bytes(src_base + src_offset, dst_base + dst_offset, nbytes, VEC, TILE)
    if NOTIFY:
        # Steps 1-2: this program's stores, then its count (release + acquire, system scope).
        tl.debug_barrier()
        counter = counter_addr.to(tl.pointer_type(tl.int64))
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="sys")
        if done == num_programs - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            _publish(seq_addr, ring_addr)


@triton.jit
def _uniform_min(ptr, USE_PTX: tl.constexpr):
    """The int64 word at ``ptr`` as every thread of the program agrees on it: each thread reads it (acquire,
    system scope) and the smallest value read wins."""
    lanes = tl.zeros([SERVER_THREADS], dtype=tl.int64)
    return tl.min(_load_acquire(ptr + lanes, USE_PTX), axis=0)


@triton.jit
def _uniform_clock(USE_PTX: tl.constexpr):
    """The GPU's global timer (the host clock under the interpreter), the same value in every thread."""
    return tl.max(tl.zeros([SERVER_THREADS], dtype=tl.int64) + _ticks(USE_PTX), axis=0)


@triton.jit
def _finish_request(lane, done_ptr, seq, ring_entry, note, count_addr, USE_PTX: tl.constexpr):
    """One lane: the link's count, a release fence (system scope), the notification's number (when
    ``ring_entry`` is not 0) and the request's number (module docstring)."""
    if USE_PTX:
        tl.inline_asm_elementwise(
            """{
            .reg .pred first, notify;
            setp.eq.s32 first, $1, 0;
            setp.ne.s64 notify, $3, 0;
            and.pred notify, notify, first;
            @notify st.relaxed.gpu.global.b64 [$5], $4;
            @first fence.acq_rel.sys;
            @notify st.relaxed.sys.global.b64 [$3], $4;
            @first st.relaxed.sys.global.b64 [$2], $6;
            mov.u32 $0, 0;
            }""",
            "=r,r,l,l,l,l,l", [lane, done_ptr.to(tl.int64, bitcast=True), ring_entry, note, count_addr, seq],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:  # the interpreter runs the program as one thread, in order
        if ring_entry != 0:
            tl.store(count_addr.to(tl.pointer_type(tl.int64)), note)
            tl.store(ring_entry.to(tl.pointer_type(tl.int64)), note)
        tl.store(done_ptr, seq)


@triton.jit
def block_copy_server_kernel(box_addr, idle_ns, max_ns, USE_PTX: tl.constexpr, TILE_VEC: tl.constexpr,
                             TILE_BYTES: tl.constexpr):  # fmt: skip
    """The resident copier (module docstring): serve the mailbox at ``box_addr`` from request ``done + 1`` on,
    until ``idle_ns`` without a request, ``max_ns`` of life or the stop word, and no request waiting."""
    box = box_addr.to(tl.pointer_type(tl.int64))
    lane = tl.arange(0, SERVER_THREADS)
    next_seq = tl.load(box + SERVER_DONE, volatile=True) + 1
    born = _uniform_clock(USE_PTX)
    last = born
    serving = 1
    while serving == 1:
        at = SERVER_RING + ((next_seq - 1) & (SERVER_ENTRIES - 1)) * SERVER_ENTRY_WORDS
        # One load: lanes 0-7 the entry's words, lane 8 the stop word.
        words = tl.load(box + tl.where(lane < SERVER_ENTRY_WORDS, at + lane, SERVER_STOP),
                        mask=lane <= SERVER_ENTRY_WORDS, other=0, volatile=True)  # fmt: skip
        tag = next_seq & SERVER_TAG_MASK
        stale = tl.where(lane == 0, words != next_seq, (words >> SERVER_TAG_SHIFT) != tag)
        if tl.max(tl.where(lane < SERVER_ENTRY_WORDS - 1, stale, False).to(tl.int32), axis=0) == 0:
            fields = words & SERVER_FIELD_MASK  # lane k holds field k, tag removed
            src = _pick(fields, lane, 1)
            dst = _pick(fields, lane, 2)
            nbytes = _pick(fields, lane, 3)
            if ((src | dst | nbytes) & (VEC_ALIGN - 1)) == 0:
                _copy_bytes(src, dst, nbytes, True, TILE_VEC)
            else:
                _copy_bytes(src, dst, nbytes, False, TILE_BYTES)
            tl.debug_barrier()  # every lane's stores precede the fence (which is cumulative)
            _finish_request(lane, box + SERVER_DONE, next_seq, _pick(fields, lane, 4), _pick(fields, lane, 5),
                            _pick(fields, lane, 6), USE_PTX)  # fmt: skip
            next_seq += 1
            last = _uniform_clock(USE_PTX)
        else:
            now = _uniform_clock(USE_PTX)
            stop = tl.max(tl.where(lane == SERVER_ENTRY_WORDS, words, 0), axis=0)
            if (stop != 0) | (now - last > idle_ns) | (now - born > max_ns):
                tl.atomic_xchg(box + SERVER_STATE, STATE_EXITING, sem="relaxed", scope="sys")
                tl.debug_barrier()  # the store precedes every lane's fence: each re-read below is ordered after it
                _fence_sc_sys(USE_PTX)
                if _uniform_min(box + at, USE_PTX) == next_seq:
                    tl.atomic_xchg(box + SERVER_STATE, STATE_SERVING, sem="relaxed", scope="sys")
                else:
                    tl.atomic_xchg(box + SERVER_STATE, STATE_IDLE, sem="release", scope="sys")
                    serving = 0
