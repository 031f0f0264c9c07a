"""Files in host shared memory that other processes of the host map, each held by its owner for its lifetime.

* :func:`shared_dir`: the one directory of every file here (``/dev/shm`` where it exists and this process may
  write there, else the temporary directory): the files of this package are made, swept and found by peers there.
* :class:`OwnerLock`: an exclusive ``flock`` held on a file for the owner's lifetime.  The kernel drops it
  when the process exits, however it exits, so :func:`owner_alive` / :class:`LivenessProbe` (a non-blocking
  shared-lock attempt) tell a live owner from a dead one, also for two owners in one process (``flock`` locks
  belong to open files).
* :func:`sweep_stale`: files of this package's prefixes left by processes that died are removed (their owner
  lock is free and they are older than a minute): the transfer files (``sagellm_comm/transfer/shared.py``,
  ``sagellm-xfer-<pid>-<random>[-suffix]``) and the workspace files of :class:`sagellm_comm.ipc.SharedFileMemory`
  (CPU processes under the Triton interpreter, ``sagellm-comm-<pid>-<random>``).  A *companion* file (a transfer
  inbox's claim file, ``<owner>-claim``) holds no lock of its own: it goes once the owner of the file it
  accompanies is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
import time
import weakref
from functools import lru_cache

from sagellm_comm.errors import InvalidArgumentError, UnavailableError

TRANSFER_PREFIX = "sagellm-xfer-"  # sagellm_comm/transfer/shared.py's files
WORKSPACE_PREFIX = "sagellm-comm-"  # SharedFileMemory's files (sagellm_comm/ipc.py)
STALE_AFTER_S = 60.0
SHM_DIR = "/dev/shm"  # host shared memory, the first choice of shared_dir()


@lru_cache(maxsize=1)
def shared_dir() -> str:
    """The directory of this package's shared files, decided once per process and used for all of them: the
    workspace files of :class:`sagellm_comm.ipc.SharedFileMemory`, the transfer files (made there, and a peer's
    accepted only there) and the stale-file sweep.  :data:`SHM_DIR` (``/dev/shm``, which every process of the host
    sees) where it is a directory this process may write in, else the temporary directory."""
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        return SHM_DIR
    import tempfile

    return tempfile.gettempdir()


#: the roles of companion files (:func:`companion_path`): ``claim``, the lock file of an inbox's slot claims
COMPANION_ROLES = ("claim",)


def reserve(fd: int, nbytes: int, path: str) -> None:
    """Give the file ``fd`` (at ``path``) ``nbytes`` of zeros, with the memory behind them reserved now: a file
    only truncated to its size is sparse, and a store into a page that ``/dev/shm`` cannot supply later kills the
    process that makes it (SIGBUS, whichever process or kernel copy it is).  A full ``/dev/shm`` is an
    :class:`UnavailableError` here instead."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and nbytes > 0:  # a file system that cannot: sparse
            os.ftruncate(fd, nbytes)
            return
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            folder = os.path.dirname(path)
            free = os.statvfs(folder)
            raise UnavailableError(
                f"cannot reserve {nbytes} bytes of shared memory in {folder} ({os.strerror(exc.errno)}; "
                f"{free.f_bavail * free.f_frsize} bytes free there): free some, or enlarge it (docker: --shm-size)"
            ) from None
        raise


def companion_path(owner: str, role: str) -> str:
    """The path of the file playing ``role`` (one of :data:`COMPANION_ROLES`) beside ``owner``, a file an
    :class:`OwnerLock` holds: it has no lock of its own and lives as long as ``owner``'s owner."""
    if role not in COMPANION_ROLES:
        raise InvalidArgumentError(f"companion role must be one of {COMPANION_ROLES}, got {role!r}")
    return f"{owner}-{role}"


def _owner_file(path: str) -> str:
    """The file whose owner lock tells whether ``path`` is in use: ``path`` itself, or the file it accompanies."""
    for role in COMPANION_ROLES:
        if path.endswith(f"-{role}"):
            return path[: -len(role) - 1]
    return path


class OwnedFd:
    """A file descriptor this object owns: closed once, by :meth:`close` or when the object is freed (an owner
    dropped without its ``close``, such as an agent nobody closed, releases its descriptors and locks)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


class OwnerLock:
    """An exclusive ``flock`` on ``path`` for as long as this object (or the process) lives: released by
    :meth:`release`, or when the object is freed.

    A ``flock`` belongs to the open file, which a forked child shares: the lock would stay held while any child
    forked after it lives, so an owner that exited (or released it) would still look alive.  A forked child
    closes its copy at once (:func:`_drop_inherited_locks`), leaving the lock to the process that took it."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()  # the owner: a forked child holds no lock and removes nothing
        with _FORKING:  # no fork between the open and the registration a child's hook closes it by
            self._owned = OwnedFd(os.open(path, os.O_RDWR))
            self.fd = self._owned.fd
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _HELD.add(self)

    def release(self) -> None:
        self.fd = -1
        self._owned.close()  # drops the lock


_HELD: weakref.WeakSet[OwnerLock] = weakref.WeakSet()
_FORKING = threading.Lock()  # held across a fork, and while a lock is taken and registered


def _drop_inherited_locks() -> None:
    """In a forked child: close the inherited descriptors of every :class:`OwnerLock` (the parent's lock stays,
    held by the parent's descriptor; the child never owned it)."""
    _FORKING.release()
    for lock in list(_HELD):
        lock.release()
    _HELD.clear()


os.register_at_fork(before=_FORKING.acquire, after_in_parent=_FORKING.release, after_in_child=_drop_inherited_locks)

SHARED_NOW = fcntl.LOCK_SH | fcntl.LOCK_NB


@lru_cache(maxsize=1)
def libc_flock():
    """libc's ``flock(fd, operation)``, which returns -1 and sets errno on a refused lock: ``fcntl.flock`` raises
    there, and the exception costs more than the system call on a live owner's path.  Both arguments are small
    ints, which ctypes passes as C ints without declared argument types (declaring them costs more than the
    call).  None where libc cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True).flock
    except (OSError, AttributeError):
        return None


class LivenessProbe:
    """Whether the owner of ``path`` (an :class:`OwnerLock` holder) is still alive: a non-blocking shared
    ``flock``, refused while the owner holds its exclusive one; one system call per check of a live owner."""

    def __init__(self, path: str):
        self.path = path
        self._flock = libc_flock()
        try:
            # a FIFO at the path must not block; a symbolic link there is no owner's file
            self._owned = OwnedFd(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW))
        except OSError:
            self._owned = OwnedFd(-1)  # the owner already removed it: gone
        self.fd = self._owned.fd

    def alive(self) -> bool:
        if self.fd < 0:
            return False
        if self._flock is None:
            try:
                fcntl.flock(self.fd, SHARED_NOW)
            except BlockingIOError:
                return True  # the owner holds its exclusive lock
        elif self._flock(self.fd, SHARED_NOW):
            code = ctypes.get_errno()
            if code == errno.EWOULDBLOCK:
                return True  # the owner holds its exclusive lock
            raise OSError(code, os.strerror(code))  # a non-blocking request is never interrupted
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # got it: the owner is gone
        return False

    def close(self) -> None:
        self.fd = -1
        self._owned.close()


def owner_alive(path: str) -> bool:
    probe = LivenessProbe(path)
    try:
        return probe.alive()
    finally:
        probe.close()


def sweep_stale() -> int:
    """Remove files of this package whose owner died (lock free, older than a minute; a companion file's owner
    is that of the file it accompanies); returns how many."""
    return _remove_unowned((TRANSFER_PREFIX, WORKSPACE_PREFIX), STALE_AFTER_S)


def remove_files_of(pids: list[int]) -> int:
    """Remove the files of this package named after processes ``pids`` (gone: killed before their clean-up ran)
    that no live process owns, whatever their age; returns how many."""
    return _remove_unowned(tuple(f"{prefix}{pid}-" for pid in pids for prefix in (TRANSFER_PREFIX, WORKSPACE_PREFIX)))


def _remove_unowned(prefixes: tuple[str, ...], min_age_s: float = 0.0) -> int:
    """Remove the files of the shared directory named with one of ``prefixes``, at least ``min_age_s`` old, whose
    owner's lock is free; returns how many."""
    directory, removed = shared_dir(), 0
    now = time.time()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefixes)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            if (min_age_s and now - os.stat(path).st_mtime < min_age_s) or owner_alive(_owner_file(path)):
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            continue
    return removed


def remove_owned(path: str, lock: OwnerLock | None) -> None:
    """Remove a file this process owns, then drop its owner lock (``lock`` None: never taken); in a forked child of
    the owner (a finalizer inherited with the object) the file stays, its owner's."""
    if lock is not None and lock.pid != os.getpid():
        lock.release()
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    if lock is not None:
        lock.release()
