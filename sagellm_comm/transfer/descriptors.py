"""Regions and block lists: what a transfer names, and every check made before a byte moves.

A *region* is a contiguous tensor registered under a name; peers know it by its :class:`RegionInfo` (size,
dtype, device kind) from the agent's metadata.  A transfer is a list of *blocks* ``(local_offset,
remote_offset, nbytes)``, byte offsets into one local and one remote region, held as an int64 ``[n, 3]``
array (:func:`block_table`).  :func:`check_blocks` refuses, naming the first bad block, anything that could
touch memory outside the two regions or make the result depend on the order blocks are copied in:

* a block that is empty, negative, or runs past the end of either region;
* destination blocks that overlap (the remote side of a write, the local side of a read);
* offsets or lengths that are not multiples of the element size, regions of different dtypes, or regions on
  different kinds of device (CPU memory and GPU memory).

Fixed-size blocks (a KV cache's layout, :class:`BlockLayout`) are named by index instead, in pairs
``(local_block, remote_block)``; :func:`check_block_ids` is their check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from sagellm_comm.arguments import check_values_in_memory
from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError

OPS = ("write", "read")


@dataclass(frozen=True)
class RegionInfo:
    """A registered region as every agent sees it (local or from a peer's metadata).

    Attributes:
        name: the name it was registered under.
        nbytes: its length in bytes.
        dtype: the tensor's dtype name (``"bfloat16"``).
        itemsize: bytes per element.
        device: ``"cpu"`` or ``"cuda"`` (the kind of memory).
        device_index: the CUDA ordinal in the owner's process (0 on the CPU).
    """

    name: str
    nbytes: int
    dtype: str
    itemsize: int
    device: str
    device_index: int = 0

    def to_json(self) -> dict:
        return {"nbytes": self.nbytes, "dtype": self.dtype, "itemsize": self.itemsize, "device": self.device,
                "device_index": self.device_index}  # fmt: skip

    @classmethod
    def from_json(cls, name: str, data: dict) -> RegionInfo:
        """The region ``name`` of a peer's metadata, each field checked (``InvalidArgumentError`` naming it): a
        positive size, a torch dtype and its element size, ``cpu`` or ``cuda``, a device ordinal."""
        from sagellm_comm.transfer.metadata import MetadataField

        check = MetadataField(f"region {name!r}", data)
        data = check.mapping()
        dtype = check.item(data, "dtype").text(32)
        torch_dtype = vars(torch).get(dtype)  # not getattr: torch imports some submodules when first named
        if not isinstance(torch_dtype, torch.dtype):
            raise MetadataField(f"region {name!r}: 'dtype'", dtype).bad("a torch dtype name")
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        info = cls(
            name, check.item(data, "nbytes").integer(1, 1 << 62), dtype,
            check.item(data, "itemsize").integer(itemsize, itemsize), check.item(data, "device").choice("cpu", "cuda"),
            check.get(data, "device_index", 0).integer(0, 1 << 16),
        )  # fmt: skip
        if info.nbytes % itemsize:
            raise MetadataField(f"region {name!r}: 'nbytes'", info.nbytes).bad(f"a multiple of {itemsize}")
        return info


@dataclass(frozen=True)
class Region:
    """A local registered region: the tensor (kept alive by the agent), its address and its :class:`RegionInfo`.
    ``ptr`` is the tensor's address when it was registered, the memory every transport registered and exported
    (read once: posts use it without a call into torch)."""

    info: RegionInfo
    tensor: torch.Tensor
    ptr: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ptr", self.tensor.data_ptr())  # frozen: set once, here

    @property
    def name(self) -> str:
        return self.info.name

    def moved(self) -> bool:
        """The tensor no longer lies in the memory it was registered with: a ``share_memory_()`` (which
        ``torch.multiprocessing`` does to a tensor it sends), ``resize_()`` or ``set_()`` since moved it, and the
        memory the transports registered may be freed or hold another tensor."""
        return self.tensor.data_ptr() != self.ptr

    def check_in_place(self) -> None:
        """``InvalidArgumentError`` naming the region when it :meth:`moved`."""
        if self.moved():
            raise InvalidArgumentError(
                f"region {self.name!r}: its tensor moved to other memory after it was registered (share_memory_(), "
                "resize_() or set_() on it, or torch.multiprocessing sending it): the memory the transports "
                "registered is no longer the tensor's; deregister the region, then register the tensor again "
                "(peers need the new metadata)",
                details={"region": self.name},
            )

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


def check_region_name(name: Any) -> None:
    """A region name is what a peer's metadata check accepts (MetadataField.name): any other name would make every
    peer refuse this agent's metadata at add_peer."""
    if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
        raise InvalidArgumentError(f"a region name must be a printable string of 1..128 characters, got {name!r}")


def make_region(name: str, tensor: Any) -> Region:
    """Check ``tensor`` can be registered as region ``name`` and describe it."""
    check_region_name(name)
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"region {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout is not torch.strided and not tensor.is_nested:  # sparse, MKL-DNN: no block of its values
        raise InvalidArgumentError(
            f"region {name!r}: a {tensor.layout} tensor cannot be registered, only a dense one (torch.strided); "
            "register a dense pool (of a sparse or MKL-DNN tensor, .to_dense() makes one)"
        )
    if not tensor.is_contiguous():
        raise InvalidArgumentError(
            f"region {name!r}: the tensor is not contiguous (shape {tuple(tensor.shape)}, strides "
            f"{tuple(tensor.stride())}); register the contiguous pool it is a view of, or .contiguous() a copy once"
        )
    if tensor.numel() == 0:
        raise InvalidArgumentError(f"region {name!r}: the tensor is empty")
    if tensor.device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"region {name!r}: tensors on {tensor.device} cannot be registered (cpu or cuda)")
    check_values_in_memory(tensor, f"region {name!r}")  # peers would read and write the memory, not the values
    if not _has_memory(tensor):
        raise InvalidArgumentError(
            f"region {name!r}: the tensor ({type(tensor).__name__}) has no memory of its own (a FakeTensor, or a "
            "wrapper subclass over other tensors such as a DTensor); register the tensor that holds the memory"
        )
    itemsize = tensor.element_size()
    info = RegionInfo(
        name, tensor.numel() * itemsize, str(tensor.dtype).removeprefix("torch."), itemsize, tensor.device.type,
        tensor.device.index or 0,
    )  # fmt: skip
    return Region(info, tensor)


def _has_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds memory of its own: not a FakeTensor (whose data pointer torch warns about, and is
    0) and a data pointer that is not 0 (a wrapper subclass's; one without storage raises)."""
    if is_fake(tensor):
        return False
    try:
        return tensor.data_ptr() != 0
    except RuntimeError:
        return False


def int64_array(values: Any, what: str) -> np.ndarray:
    """``values`` (a sequence, numpy array or CPU tensor of integers) as an int64 array.  Anything else is refused,
    never rounded or parsed: floats (a fractional offset would be truncated), booleans, strings, ragged rows,
    values beyond int64."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise InvalidArgumentError(f"{what} must be on the CPU, got a tensor on {values.device}")
        try:  # a dtype or layout numpy cannot hold (bfloat16, sparse) is no table of integers either
            values = values.detach().numpy()
        except (TypeError, RuntimeError) as exc:
            raise InvalidArgumentError(
                f"{what} must be integers, got a {values.dtype} tensor numpy cannot read ({exc})"
            ) from None
    try:
        array = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"{what} must be integers: {exc}") from None
    kind = array.dtype.kind
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.int64)  # the caller names what is missing
    if kind not in "iu":
        if isinstance(values, np.ndarray):
            got = f"an array of {array.dtype}"
        else:  # Python values: numpy reads floats, and integers past int64 mixed with others, as float or object
            got = f"values numpy reads as {array.dtype} (a float, a bool, a string, or an integer beyond int64)"
        raise InvalidArgumentError(f"{what} must be integers within int64, got {got}")
    if kind == "u" and array.dtype.itemsize == 8 and array.size and int(array.max()) >= 1 << 63:
        raise InvalidArgumentError(f"{what} must be integers within int64, got {int(array.max())}")
    if not isinstance(values, np.ndarray):
        _refuse_booleans(values, array, what)
    out = np.ascontiguousarray(array, dtype=np.int64)
    if out is array and not isinstance(values, (list, tuple)):
        out = out.copy()  # the caller's own memory (an array, a CPU tensor): see block_table
    return out


def _refuse_booleans(values: Any, array: np.ndarray, what: str) -> None:
    """Refuse a ``bool`` among Python values that numpy read as integers (``True`` beside ints becomes 1).  Only
    the elements numpy read as 0 or 1 are looked at, so a long table costs a few vector operations."""
    hits = np.flatnonzero(array.reshape(-1) <= 1)  # negatives too: refused later, and never booleans
    if not hits.size:
        return
    if array.ndim == 0:
        if isinstance(values, (bool, np.bool_)):
            raise InvalidArgumentError(f"{what} must be integers, got the boolean {values!r}")
        return
    for index in zip(*(axis.tolist() for axis in np.unravel_index(hits, array.shape)), strict=True):
        value = values
        for i in index:
            value = value[i]
        if isinstance(value, (bool, np.bool_)):
            position = ", ".join(map(str, index))
            raise InvalidArgumentError(f"{what} must be integers, got the boolean {value!r} at [{position}]")


def block_table(blocks: Any) -> np.ndarray:
    """``blocks`` as a C-contiguous int64 ``[n, 3]`` array of ``(local_offset, remote_offset, nbytes)``.

    Accepts a sequence of 3-tuples, an ``[n, 3]`` integer numpy array or an ``[n, 3]`` integer CPU tensor (the
    last two copied, so that what is checked is what is posted whatever the caller's other threads do with
    them); values must be integers (:func:`int64_array`).
    """
    if (
        blocks.__class__ is np.ndarray
        and blocks.dtype == np.int64
        and blocks.ndim == 2
        and blocks.shape[0]
        and blocks.shape[1] == 3
        and blocks.flags.c_contiguous
    ):
        # The common table form: copied (about 1 us for 1000 rows) so that what is checked is what is posted, even
        # while another thread of the caller's changes its array.
        return blocks.copy()
    if not isinstance(blocks, (torch.Tensor, np.ndarray)) and (
        not isinstance(blocks, Sequence) or isinstance(blocks, (str, bytes))
    ):
        raise InvalidArgumentError(
            f"blocks must be a list of (local_offset, remote_offset, nbytes) or an [n, 3] array, got "
            f"{type(blocks).__name__}"
        )
    table = int64_array(blocks, "blocks (local_offset, remote_offset, nbytes)")
    if table.ndim >= 1 and table.shape[0] == 0:
        raise InvalidArgumentError("blocks is empty: a transfer moves at least one block")
    if table.ndim != 2 or table.shape[1] != 3:
        raise InvalidArgumentError(
            f"blocks must be (local_offset, remote_offset, nbytes) triples: got an array of shape {table.shape}"
        )
    return table


def one_block(blocks: Any) -> Sequence[int] | None:
    """The only block of ``blocks`` when it is a list or tuple holding one ``(local_offset, remote_offset,
    nbytes)`` list or tuple of Python ints, or a ``[1, 3]`` integer numpy array (the common request, checked
    without numpy: :func:`one_block_fits`); None for every other form (:func:`block_table` takes it)."""
    if (blocks.__class__ is list or blocks.__class__ is tuple) and len(blocks) == 1:
        row = blocks[0]
        if (row.__class__ is tuple or row.__class__ is list) and len(row) == 3:
            local_offset, remote_offset, nbytes = row
            if local_offset.__class__ is int and remote_offset.__class__ is int and nbytes.__class__ is int:
                return row
    elif blocks.__class__ is np.ndarray and blocks.shape == (1, 3) and blocks.dtype.kind in "iu":
        return blocks[0].tolist()
    return None


def python_rows(blocks: Any) -> list[tuple[int, int, int]] | None:
    """A copy of ``blocks`` as ``(local_offset, remote_offset, nbytes)`` tuples when it is a list or tuple of 2 to
    :data:`SMALL` such lists or tuples of Python ints (the form the interface documents, then checked without
    numpy: :func:`uniform_rows_total`); None for every other form (:func:`block_table` takes it).  A copy, so that
    what is checked is what is posted even if the caller's lists change meanwhile."""
    if (blocks.__class__ is not list and blocks.__class__ is not tuple) or not 1 < len(blocks) <= SMALL:
        return None
    rows = []
    keep = rows.append
    for row in blocks:
        if (row.__class__ is not tuple and row.__class__ is not list) or len(row) != 3:
            return None
        local_offset, remote_offset, nbytes = row
        if local_offset.__class__ is not int or remote_offset.__class__ is not int or nbytes.__class__ is not int:
            return None
        keep((local_offset, remote_offset, nbytes))
    return rows


def same_kind(local: RegionInfo, remote: RegionInfo) -> bool:
    """Whether :func:`check_pair` accepts the two regions."""
    return local.dtype == remote.dtype and local.device == remote.device


def check_pair(local: RegionInfo, remote: RegionInfo, peer: str) -> None:
    """The two regions of one transfer hold the same dtype on the same kind of device."""
    if local.dtype != remote.dtype:
        raise ShapeMismatchError(
            f"local region {local.name!r} holds {local.dtype} and {peer}'s region {remote.name!r} holds "
            f"{remote.dtype}: a transfer copies bytes between regions of one dtype"
        )
    if local.device != remote.device:
        raise ShapeMismatchError(
            f"local region {local.name!r} is {local.device} memory and {peer}'s region {remote.name!r} is "
            f"{remote.device} memory: both sides of a transfer must be on the same kind of device"
        )


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


SMALL = 16  # up to this many blocks, checks run on Python ints (numpy's per-call cost dominates below)


def fits(local: RegionInfo, remote: RegionInfo, lo: int, ro: int, n: int) -> bool:
    """Whether block ``(lo, ro, n)`` (Python ints) lies inside both regions in whole elements: the per-block check
    of :func:`check_blocks`."""
    inside = n > 0 and lo >= 0 and ro >= 0 and lo + n <= local.nbytes and ro + n <= remote.nbytes
    return inside and not (lo | ro | n) % local.itemsize


def one_block_fits(local: RegionInfo, remote: RegionInfo, lo: int, ro: int, n: int) -> bool:
    """Whether :func:`check_blocks` accepts the one block ``(lo, ro, n)`` (Python ints) between these regions (one
    block overlaps nothing); a block it does not accept is refused by :func:`check_blocks`, with its error.
    (:func:`same_kind` and :func:`fits` in one expression: this check runs on every one-block request.)"""
    return (
        local.dtype == remote.dtype
        and local.device == remote.device
        and n > 0
        and lo >= 0
        and ro >= 0
        and lo + n <= local.nbytes
        and ro + n <= remote.nbytes
        and not (lo | ro | n) % local.itemsize
    )


def _refuse_block(i: int, row, local: RegionInfo, remote: RegionInfo) -> None:
    """Raise the error of the first failed check of block ``i`` (``row``: its three ints)."""
    lo, ro, n = (int(v) for v in row)
    if n <= 0:
        raise InvalidArgumentError(f"block {i} {(lo, ro, n)}: nbytes must be positive")
    for offset, info, side in ((lo, local, "local"), (ro, remote, "remote")):
        if offset < 0 or offset + n > info.nbytes:
            raise InvalidArgumentError(
                f"block {i} {(lo, ro, n)} runs outside the {side} region {info.name!r} ({info.nbytes} bytes): its "
                f"{side} bytes [{offset}, {offset + n}) must lie inside [0, nbytes)"
            )
    raise InvalidArgumentError(
        f"block {i} {(lo, ro, n)}: offsets and lengths must be multiples of the element size of {local.dtype} "
        f"({local.itemsize} bytes)"
    )


def _refuse_overlap(a: int, b: int, table: np.ndarray | list, op: str) -> None:
    a, b = sorted((a, b))
    side = "remote" if op == "write" else "local"
    row_a, row_b = (tuple(np.asarray(table[k]).tolist()) for k in (a, b))
    raise InvalidArgumentError(
        f"blocks {a} {row_a} and {b} {row_b} overlap in the destination "
        f"({side} region of a {op}): the result would depend on the copy order"
    )


def check_rows(rows: list, local: RegionInfo, remote: RegionInfo, op: str, peer: str) -> int:
    """:func:`check_blocks` of a few blocks given as Python ints (``rows``: ``[lo, ro, n]`` lists, as
    ``table.tolist()`` gives them): the same checks and the same error for the same table.  Returns the total
    bytes."""
    check_pair(local, remote, peer)
    total = uniform_rows_total(rows, local, remote, op == "write")
    return _rows_total(rows, local, remote, op) if total is None else total


def uniform_rows_total(rows: Sequence[Sequence[int]], local: RegionInfo, remote: RegionInfo, write: bool) -> int | None:
    """The total bytes of ``rows`` when its blocks all have one length and pass every check (one pass over the
    rows, then the sorted destination offsets); None otherwise, which is no verdict: :func:`_rows_total` decides
    and names the first bad block.  Blocks of a KV pool all have one length, so this is the common case."""
    local_bytes, remote_bytes = local.nbytes, remote.nbytes
    size = rows[0][2]
    bits = 0
    starts = []
    keep = starts.append
    for lo, ro, n in rows:
        if n != size or lo < 0 or ro < 0 or lo + n > local_bytes or ro + n > remote_bytes:
            return None
        bits |= lo | ro
        keep(ro if write else lo)
    if size <= 0 or (bits | size) % local.itemsize:
        return None
    starts.sort()
    previous = starts[0]
    for start in starts[1:]:
        if start - previous < size:  # one length: two blocks overlap exactly when their starts are this close
            return None
        previous = start
    return size * len(rows)


def _rows_total(rows: list, local: RegionInfo, remote: RegionInfo, op: str) -> int:
    """The checks of :func:`check_rows` for any block lengths: refuses the first bad block or overlapping pair."""
    local_bytes, remote_bytes, write = local.nbytes, remote.nbytes, op == "write"
    total = bits = 0
    spans = []
    for i, (lo, ro, n) in enumerate(rows):
        if n <= 0 or lo < 0 or ro < 0 or lo + n > local_bytes or ro + n > remote_bytes:
            bits = -1  # out of bounds: the scan below names the first bad block, as the table check does
            break
        bits |= lo | ro | n
        total += n
        spans.append((ro, ro + n, i) if write else (lo, lo + n, i))
    if bits < 0 or bits % local.itemsize:
        for i, (lo, ro, n) in enumerate(rows):
            if not fits(local, remote, lo, ro, n):
                _refuse_block(i, rows[i], local, remote)
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:], strict=False):
        if start < end:
            _refuse_overlap(i, j, rows, op)
    return total


def check_blocks(table: np.ndarray, local: RegionInfo, remote: RegionInfo, op: str, peer: str) -> int:
    """Refuse ``table`` (from :func:`block_table`) unless every block lies inside both regions, offsets and
    lengths are whole elements, and no two destination blocks overlap (module docstring).  Returns the total
    bytes."""
    if len(table) <= SMALL:
        return check_rows(table.tolist(), local, remote, op, peer)
    check_pair(local, remote, peer)
    column = 1 if op == "write" else 0
    total = _uniform_table_total(table, local, remote, column)
    return _table_total(table, local, remote, op, column) if total is None else total


def _uniform_table_total(table: np.ndarray, local: RegionInfo, remote: RegionInfo, column: int) -> int | None:
    """:func:`uniform_rows_total` of a table in a few whole-array numpy calls: the bounds from each column's
    extremes, the overlap from the sorted destination offsets.  None is no verdict (:func:`_table_total`
    decides)."""
    columns = table.T.copy()  # [3, n]: each column contiguous, so its reductions are
    low, high = columns.min(axis=1).tolist(), columns.max(axis=1).tolist()
    size = low[2]
    if size != high[2] or size <= 0 or low[0] < 0 or low[1] < 0:
        return None
    if high[0] + size > local.nbytes or high[1] + size > remote.nbytes:
        return None
    if local.itemsize > 1 and int(np.bitwise_or.reduce(columns, axis=None)) % local.itemsize:
        return None
    starts = np.sort(columns[column])
    if int((starts[1:] - starts[:-1]).min()) < size:
        return None
    return size * len(table)


def _table_total(table: np.ndarray, local: RegionInfo, remote: RegionInfo, op: str, column: int) -> int:
    """The checks of :func:`check_blocks` for any block lengths: refuses the first bad block or overlapping pair."""
    itemsize = local.itemsize
    local_offset, remote_offset, nbytes = table[:, 0], table[:, 1], table[:, 2]
    # Whole-table reductions first (a few numpy calls); the per-block masks only to name a failure.  Bounds are
    # compared as offset <= size - nbytes, never offset + nbytes, which wraps in int64 for offsets near 2**63.
    inside = min(int(local_offset.min()), int(remote_offset.min())) >= 0 and int(nbytes.min()) > 0
    inside = inside and not ((local_offset > local.nbytes - nbytes) | (remote_offset > remote.nbytes - nbytes)).any()
    if not inside or (itemsize > 1 and int(np.bitwise_or.reduce(table, axis=None)) % itemsize):
        bad = (nbytes <= 0) | (local_offset < 0) | (remote_offset < 0)
        bad |= (local_offset > local.nbytes - nbytes) | (remote_offset > remote.nbytes - nbytes)
        bad |= ((local_offset | remote_offset | nbytes) % itemsize) != 0
        i = _first(bad)
        _refuse_block(i, table[i].tolist(), local, remote)
    destination = table[:, column]
    ends = destination + nbytes
    if not (destination[1:] >= ends[:-1]).all():  # not ascending without overlap: sort, then look
        order = np.argsort(destination, kind="stable")
        overlap = destination[order][1:] < ends[order][:-1]
        if overlap.any():
            j = _first(overlap)
            _refuse_overlap(int(order[j]), int(order[j + 1]), table, op)
    return int(nbytes.sum())


@dataclass(frozen=True)
class BlockLayout:
    """Two regions seen as pools of ``block_bytes``-long blocks: ``local_blocks`` and ``remote_blocks`` of them."""

    block_bytes: int
    local_blocks: int
    remote_blocks: int


def make_layout(local: RegionInfo, remote: RegionInfo, block_bytes: int, peer: str) -> BlockLayout:
    check_pair(local, remote, peer)
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, (int, np.integer)) or block_bytes <= 0:
        raise InvalidArgumentError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    block_bytes = int(block_bytes)
    if block_bytes % local.itemsize:
        raise InvalidArgumentError(
            f"block_bytes {block_bytes} is not a multiple of the element size of {local.dtype} ({local.itemsize})"
        )
    if block_bytes >= 1 << 31:
        raise InvalidArgumentError(f"block_bytes must be below 2 GiB, got {block_bytes}")
    layout = BlockLayout(block_bytes, local.nbytes // block_bytes, remote.nbytes // block_bytes)
    if layout.local_blocks == 0 or layout.remote_blocks == 0:
        raise InvalidArgumentError(
            f"block_bytes {block_bytes} is larger than region {local.name!r} ({local.nbytes} bytes) or {peer}'s "
            f"region {remote.name!r} ({remote.nbytes} bytes)"
        )
    return layout


def block_ids(local_blocks: Any, remote_blocks: Any) -> np.ndarray:
    """``(local_blocks, remote_blocks)`` (two equal-length integer sequences or arrays) as an int64 ``[n, 2]``;
    values must be integers (:func:`int64_array`)."""
    small = isinstance(local_blocks, list) and isinstance(remote_blocks, list) and 0 < len(local_blocks) <= SMALL
    if small and len(local_blocks) == len(remote_blocks):
        try:
            pair = np.array([local_blocks, remote_blocks])
        except (TypeError, ValueError, OverflowError):
            pair = None  # the general path names the problem
        if pair is not None and pair.dtype == np.int64 and pair.ndim == 2:
            _refuse_booleans(local_blocks, pair[0], "local block ids")
            _refuse_booleans(remote_blocks, pair[1], "remote block ids")
            return pair.T.copy()
    local = int64_array(local_blocks, "local block ids").reshape(-1)
    remote = int64_array(remote_blocks, "remote block ids").reshape(-1)
    if local.shape != remote.shape:
        raise InvalidArgumentError(
            f"{local.shape[0]} local block ids but {remote.shape[0]} remote block ids: give one of each per block"
        )
    if local.shape[0] == 0:
        raise InvalidArgumentError("no block ids: a transfer moves at least one block")
    ids = np.empty((local.shape[0], 2), dtype=np.int64)
    ids[:, 0], ids[:, 1] = local, remote
    return ids


def one_id(blocks: Any) -> int | None:
    """The only block id of ``blocks`` when it is a Python int, a list or tuple holding one, a numpy integer or a
    one-element integer numpy array (the common request, checked without numpy: :func:`ids_fit`); None for every
    other form (:func:`block_ids` takes it)."""
    if blocks.__class__ is int:
        return blocks
    if (blocks.__class__ is list or blocks.__class__ is tuple) and len(blocks) == 1 and blocks[0].__class__ is int:
        return blocks[0]
    if isinstance(blocks, (np.ndarray, np.integer)) and blocks.size == 1 and blocks.dtype.kind in "iu":
        return int(blocks.item())
    return None


def ids_fit(layout: BlockLayout, local_block: int, remote_block: int) -> bool:
    """Whether both ids (Python ints) lie inside their pools: the per-pair check of :func:`check_block_ids` (which
    writes the same comparisons out over its rows)."""
    return 0 <= local_block < layout.local_blocks and 0 <= remote_block < layout.remote_blocks


def check_block_ids(ids: np.ndarray, layout: BlockLayout, op: str) -> None:
    """Every id inside its pool; no destination block named twice."""
    if len(ids) <= SMALL:
        rows = ids.tolist()
        local_blocks, remote_blocks = layout.local_blocks, layout.remote_blocks
        inside = all(0 <= a < local_blocks and 0 <= b < remote_blocks for a, b in rows)
        destinations = {row[1 if op == "write" else 0] for row in rows}
        if inside and len(destinations) == len(rows):
            return
    for column, count, side in ((0, layout.local_blocks, "local"), (1, layout.remote_blocks, "remote")):
        bad = (ids[:, column] < 0) | (ids[:, column] >= count)
        if bad.any():
            i = _first(bad)
            raise InvalidArgumentError(
                f"block pair {i} {tuple(ids[i].tolist())}: {side} block id {int(ids[i, column])} is outside the "
                f"{side} pool of {count} blocks of {layout.block_bytes} bytes"
            )
    destination = ids[:, 1] if op == "write" else ids[:, 0]
    if len(destination) > 1:
        ordered = np.sort(destination)
        dup = ordered[1:] == ordered[:-1]
        if dup.any():
            block = int(ordered[1:][dup][0])
            side = "remote" if op == "write" else "local"
            raise InvalidArgumentError(
                f"{side} block {block} is named twice as a destination of one {op}: the result would depend on "
                "the copy order"
            )


def ids_to_table(ids: np.ndarray, block_bytes: int) -> np.ndarray:
    """Block ids ``[n, 2]`` as the byte-offset table of :func:`block_table`."""
    table = np.empty((ids.shape[0], 3), dtype=np.int64)
    np.multiply(ids, block_bytes, out=table[:, :2])
    table[:, 2] = block_bytes
    return table


def split_rows(table: np.ndarray, part_bytes: int) -> np.ndarray:
    """``(src, dst, nbytes)`` rows with every block longer than ``part_bytes`` cut into pieces of at most
    ``part_bytes`` (the listed form of the block-copy kernel)."""
    nbytes = table[:, 2]
    if int(nbytes.max()) <= part_bytes:
        return table
    pieces = (nbytes + part_bytes - 1) // part_bytes
    rows = np.repeat(np.arange(table.shape[0]), pieces)
    first = np.cumsum(pieces) - pieces
    within = np.arange(rows.shape[0]) - np.repeat(first, pieces)
    start = within * part_bytes
    out = np.empty((rows.shape[0], 3), dtype=np.int64)
    out[:, 0] = table[rows, 0] + start
    out[:, 1] = table[rows, 1] + start
    out[:, 2] = np.minimum(nbytes[rows] - start, part_bytes)
    return out
