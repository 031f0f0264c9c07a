"""Host shared memory for transfers: the files every same-host peer can map.

* :func:`shared_cpu_tensor`: a zeroed CPU tensor backed by a file in ``/dev/shm`` mapped shared (what
  ``TransferAgent.allocate`` returns on the CPU), held by an owner lock (``sagellm_comm/shm.py``) and removed by
  the stale-file sweep if its process dies.  The ``ipc`` transport maps such regions into its peers; a
  process-private CPU tensor moves through NIXL only.  :func:`shared_file_of` finds the file behind any CPU
  address (``/proc/self/maps``).
* :func:`new_path` names a transfer file (``sagellm-xfer-<pid>-<random>[-suffix]`` in ``/dev/shm``).
* :func:`transfer_path` and :func:`open_transfer_file`: a path a peer's metadata names (a region, the probe, an
  inbox) is opened and mapped only when it is a transfer file: resolved (every symbolic link followed), it lies
  directly inside the shared directory, its name starts with the transfer prefix, and what is opened there is a
  regular file (never through a symbolic link put in its place after the check).  Anything else (a file of the
  user's elsewhere, a link out of the directory, a FIFO) is refused before it is opened or mapped.
"""

from __future__ import annotations

import errno
import numbers
import os
import stat
import uuid
import weakref
from typing import Any

import torch

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError
from sagellm_comm.shm import TRANSFER_PREFIX, OwnedFd, OwnerLock, remove_owned, reserve, shared_dir


def new_path(suffix: str = "") -> str:
    return os.path.join(shared_dir(), f"{TRANSFER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}{suffix}")


def transfer_path(path: str) -> str | None:
    """``path`` resolved (``os.path.realpath``: every symbolic link followed) when that lies directly inside the
    shared directory and its name starts with the transfer prefix (what :func:`new_path` makes); else None.  The
    name only: whether a regular file is there is :func:`open_transfer_file`'s to check."""
    if not isinstance(path, str) or not path or "\0" in path:
        return None
    resolved = os.path.realpath(path)
    folder, name = os.path.split(resolved)
    if folder != os.path.realpath(shared_dir()) or not name.startswith(TRANSFER_PREFIX):
        return None
    return resolved


def transfer_rule() -> str:
    """What :func:`transfer_path` accepts, in words (for the errors that refuse a path)."""
    return f"a file directly inside {shared_dir()} named {TRANSFER_PREFIX}* (no symbolic link out of it)"


def open_transfer_file(path: str, flags: int, what: str) -> OwnedFd:
    """Open the transfer file at ``path`` (``flags``: ``os.O_RDONLY`` or ``os.O_RDWR``) once it passed
    :func:`transfer_path`: the resolved path is opened without following a symbolic link and without blocking,
    and only a regular file is kept.  ``InvalidArgumentError`` naming ``what`` when ``path`` is not a transfer
    file; the ``OSError`` of the open when nothing is there (its owner removed it)."""
    resolved = transfer_path(path)
    if resolved is None:
        raise InvalidArgumentError(f"{what} {path!r} is not a transfer file: it must be {transfer_rule()}")
    try:
        owned = OwnedFd(os.open(resolved, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link put there after the name was resolved
            raise InvalidArgumentError(f"{what} {path!r} is a symbolic link, not a transfer file") from None
        raise
    if not stat.S_ISREG(os.fstat(owned.fd).st_mode):
        owned.close()
        raise InvalidArgumentError(f"{what} {path!r} is not a regular file, so not a transfer file")
    return owned


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
