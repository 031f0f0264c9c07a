"""Host shared memory for transfers: the files every same-host peer can map.

* :func:`shared_cpu_tensor`: a zeroed CPU tensor backed by a file in ``/dev/shm`` mapped shared (what
  ``TransferAgent.allocate`` returns on the CPU), held by an owner lock (``sagellm_comm/shm.py``) and removed by
  the stale-file sweep if its process dies.  The ``ipc`` transport maps such regions into its peers; a
  process-private CPU tensor moves through NIXL only.  :func:`shared_file_of` finds the file behind any CPU
  address (``/proc/self/maps``), so tensors mapped from files by other means work too.
* :func:`new_path` names a transfer file (``sagellm-xfer-<pid>-<random>[-suffix]`` in ``/dev/shm``).
"""

from __future__ import annotations

import numbers
import os
import uuid
import weakref
from typing import Any

import torch

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError
from sagellm_comm.shm import TRANSFER_PREFIX, OwnerLock, remove_owned, reserve, shared_dir


def new_path(suffix: str = "") -> str:
    return os.path.join(shared_dir(), f"{TRANSFER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}{suffix}")


MAX_REGION_BYTES = 1 << 62  # the largest region a peer's metadata may describe (RegionInfo.from_json)


def check_shape(shape: Any, dtype: Any, what: str) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints, NumPy's included) as a tuple of Python ints, once it and ``dtype``
    (a ``torch.dtype``) describe a tensor a region may be: sizes are integers >= 0 (never rounded or parsed) and
    its bytes at most :data:`MAX_REGION_BYTES`; anything else is an :class:`InvalidArgumentError` naming ``what``."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):  # np.int64(16) is an int too
        shape = (shape,)
    if not isinstance(shape, tuple | list):
        raise InvalidArgumentError(f"{what}: shape must be an int or a tuple of ints, got {shape!r}")
    shape = tuple(check_int(size, f"{what}: each size of shape", 0) for size in shape)  # 2.5 refused
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"{what}: dtype must be a torch.dtype, got {dtype!r}")
    nbytes = torch.empty((), dtype=dtype).element_size()
    for size in shape:
        nbytes *= size
    if nbytes > MAX_REGION_BYTES:  # no file, mapping or allocation takes it (nor a peer's metadata check)
        raise InvalidArgumentError(
            f"{what}: shape {shape} of {dtype} is {nbytes} bytes, more than a region may hold ({MAX_REGION_BYTES})"
        )
    return shape


def shared_cpu_tensor(shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor of ``shape`` and ``dtype`` in a shared ``/dev/shm`` file (see the module docstring).

    The file is locked by this process and removed when the returned tensor object is freed (keep it, not only
    views of it, while peers may still map it: a registered tensor is kept by its agent); mappings stay valid.
    ``shape`` and ``dtype`` are checked as :func:`check_shape` does.
    """
    shape = check_shape(shape, dtype, "shared_cpu_tensor")
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel <= 0:
        raise InvalidArgumentError(f"a shared tensor needs at least one element, got shape {shape}")
    path = new_path()
    lock = None
    try:
        open(path, "wb").close()
        lock = OwnerLock(path)  # owned before its pages are reserved (a sweep must not take it for a dead one's)
        reserve(lock.fd, numel * itemsize, path)  # zeros, their memory reserved
        tensor = torch.from_file(path, shared=True, size=numel * itemsize, dtype=torch.uint8).view(dtype).view(shape)
    except BaseException:  # not mapped (no memory, too large...): neither the file nor its lock stays
        remove_owned(path, lock)
        raise
    weakref.finalize(tensor, remove_owned, path, lock)
    return tensor


def shared_file_of(ptr: int, nbytes: int) -> tuple[str, int]:
    """``(path, offset)``: the shared file mapping that holds CPU bytes ``[ptr, ptr + nbytes)`` and where they
    start in it; :class:`BackendNotSupportedError` when the memory is process-private."""
    try:
        with open("/proc/self/maps") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise BackendNotSupportedError(f"cannot read /proc/self/maps to find shared CPU memory: {exc}") from None
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if not start <= ptr < end:
            continue
        path = fields[5].strip() if len(fields) > 5 else ""
        if fields[1][3] != "s" or not path.startswith("/") or path.endswith("(deleted)"):
            break
        if ptr + nbytes > end:
            raise BackendNotSupportedError(f"CPU bytes [{ptr:#x}, +{nbytes}) span more than one mapping of {path}")
        return path, int(fields[2], 16) + (ptr - start)
    raise BackendNotSupportedError(
        "the CPU tensor is process-private memory, which the ipc transport cannot map into a peer; allocate it "
        "with TransferAgent.allocate (a shared /dev/shm mapping), or let NIXL move it (backend 'nixl' or 'auto')"
    )
