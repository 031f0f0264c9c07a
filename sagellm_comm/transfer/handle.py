"""Handles of posted transfers (:class:`TransferHandle`) and prepared block pools (:class:`PreparedBlocks`).

A handle's :meth:`~TransferHandle.wait` never blocks past its deadline: a transport can stay "in progress"
forever (a peer that stopped answering), so every wait is bounded by our own clock, and on expiry the
transport's request is aborted (released) and :class:`~sagellm_comm.errors.CommTimeoutError` names the peer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from sagellm_comm.arguments import check_timeout
from sagellm_comm.errors import CommError, CommTimeoutError, InvalidArgumentError, NotImplementedCommError
from sagellm_comm.transfer.base import Prepared, Request

if TYPE_CHECKING:
    from sagellm_comm.transfer.agent import TransferAgent

SPIN_S = 2e-3  # poll without sleeping for the first 2 ms of a wait
FIRST_SLEEP_S = 2e-5  # then sleep between polls, doubling up to MAX_SLEEP_S (completion seen within ~0.2 ms)
MAX_SLEEP_S = 2e-4


class TransferHandle:
    """One posted write or read.  ``done()`` polls, ``wait(timeout)`` blocks up to a deadline.

    Attributes: ``peer``, ``op`` (``"write"`` / ``"read"``), ``backend`` (the transport that moves it),
    ``nbytes`` and ``nblocks`` (what the request asked for), ``state`` (``"pending"``, ``"done"``, ``"failed"``)
    and ``error`` (the typed error once failed).
    """

    def __init__(self, agent: TransferAgent, peer: str, op: str, backend: str, request: Request, nbytes: int,
                 nblocks: int):  # fmt: skip
        self._agent = agent
        self._request = request
        self.peer = peer
        self.op = op
        self.backend = backend
        self.nbytes = nbytes
        self.nblocks = nblocks
        self.state = "done" if request.complete else "pending"
        self.error: CommError | None = None

    def __repr__(self) -> str:
        return (
            f"TransferHandle({self.op} {self.nblocks} blocks / {self.nbytes} B, peer {self.peer!r}, "
            f"{self.backend}, {self.state})"
        )

    def done(self) -> bool:
        """True once every byte arrived (polls the transport once); raises the typed error if it failed."""
        return self._poll(-1)

    def _poll(self, lock_timeout: float) -> bool:
        """:meth:`done`, waiting at most ``lock_timeout`` seconds (-1: as long as it takes) for the agent's lock,
        which another thread's call may hold (an ``add_peer`` waiting for a peer); False if not taken."""
        if self.state == "done":
            return True
        if self.state == "failed":
            raise self.error
        lock = self._agent.lock
        if not lock.acquire(timeout=lock_timeout):
            return False
        if self.state != "pending":  # another thread's call ended it (and aborted a failed request) meanwhile
            lock.release()
            return self._poll(0)
        try:
            finished = self._request.poll()
        except CommError as exc:
            self._fail(exc)
            raise
        finally:
            lock.release()
        if finished:
            self.state = "done"
        return finished

    def wait(self, timeout: float | None = None) -> None:
        """Block until the transfer completed, for at most ``timeout`` seconds (default: the agent's).

        Raises :class:`CommTimeoutError` (the request is aborted: its destination blocks hold undefined data,
        blocks outside it are untouched), :class:`~sagellm_comm.errors.PeerLostError` (the peer exited,
        restarted or was removed) or :class:`~sagellm_comm.errors.TransferError`, each naming the peer.
        """
        limit = self._agent.timeout if timeout is None else check_timeout(timeout)
        if self.state == "done":
            return
        start = time.monotonic()
        deadline = start + limit
        sleep = FIRST_SLEEP_S
        while not self._poll(max(0.0, deadline - time.monotonic())):  # the agent's lock: until the deadline at most
            now = time.monotonic()
            if now >= deadline:
                self._timed_out(limit)
            if now - start > SPIN_S:
                time.sleep(min(sleep, max(0.0, deadline - now)))
                sleep = min(sleep * 2, MAX_SLEEP_S)

    def wait_on_stream(self, stream: torch.cuda.Stream | None = None, timeout: float | None = None) -> None:
        """Make ``stream`` (default: the current one) wait for this transfer on the device, without blocking the
        host: kernels queued there afterwards see every byte.  ``ipc`` transfers only (their completion is a
        CUDA event); other transports, and a process without CUDA, raise ``NotImplementedCommError``: use
        :meth:`wait`.  A ``stream`` that is not a ``torch.cuda.Stream`` is an ``InvalidArgumentError``.

        The host waits at most ``timeout`` seconds (default: the agent's), for the agent's lock (another thread's
        call may hold it) and for a resident-copier request to be served; past it, :class:`CommTimeoutError` as
        from :meth:`wait` (the request is aborted), unless the handle is done: then nothing is left to wait for."""
        limit = self._agent.timeout if timeout is None else check_timeout(timeout)
        stream = _cuda_stream(stream)
        if self.state == "failed":
            raise self.error
        deadline = time.monotonic() + limit
        lock = self._agent.lock
        if not lock.acquire(timeout=limit):
            if self.state == "done":  # seen complete on the host: work queued from now on sees every byte
                return
            self._timed_out(limit)
        if self.state == "failed":  # another thread's wait timed out (the request aborted) while this one waited
            lock.release()
            raise self.error
        try:
            self._request.wait_on_stream(stream, deadline)
        except CommTimeoutError:
            timed_out = True
        else:
            timed_out = False
        finally:
            lock.release()
        if timed_out:
            self._timed_out(limit)

    def _fail(self, exc: CommError) -> None:
        self.state, self.error = "failed", exc
        lock = self._agent.lock
        if lock.acquire(blocking=False):  # held already when a poll failed
            try:
                self._request.abort()
            finally:
                lock.release()
        else:  # another call holds the agent: the agent aborts the request when it is next called
            self._agent.abort_later(self._request)

    def _timed_out(self, limit: float) -> None:
        direction = "to" if self.op == "write" else "from"
        self._fail(
            CommTimeoutError(
                f"{self.op} of {self.nblocks} block(s), {self.nbytes} bytes, {direction} peer {self.peer!r} over "
                f"{self.backend} did not complete within {limit:g} s and was aborted: its destination blocks hold "
                "undefined data (blocks outside the request are untouched); check that the peer is alive and "
                "progressing, or wait longer",
                details={"peer": self.peer, "op": self.op, "backend": self.backend, "timeout_s": limit},
            )
        )
        raise self.error


def _cuda_stream(stream: Any) -> torch.cuda.Stream:
    """``stream``, or the current CUDA stream for None; a stream that is none of torch's (it has no integer
    ``cuda_stream``) is an ``InvalidArgumentError``, and a process without CUDA has no stream to make wait: a
    ``NotImplementedCommError`` saying to use ``wait()``."""
    if stream is None:
        try:
            return torch.cuda.current_stream()
        except (AssertionError, RuntimeError) as exc:  # torch built without CUDA, or no GPU or driver here
            raise NotImplementedCommError(
                f"wait_on_stream makes a CUDA stream wait for the transfer, and this process has no CUDA ({exc}); "
                "use wait()"
            ) from None
    handle = getattr(stream, "cuda_stream", None)
    if handle.__class__ is not int:
        raise InvalidArgumentError(
            f"stream must be a torch.cuda.Stream (or None: the current stream), got {type(stream).__name__}"
        )
    return stream


class PreparedBlocks:
    """Two regions seen as pools of fixed-size blocks, prepared once for repeated transfers with one peer.

    ``prepared.write(local_blocks, remote_blocks, notify=...)`` / ``read(...)`` take block indices (two
    equal-length integer sequences or arrays) instead of byte triples; the transport's descriptors were
    built once (NIXL's prepared descriptor lists).  Made by :meth:`TransferAgent.prepare`; released by
    :meth:`release`, by ``remove_peer``, by ``deregister`` of its local region and by ``close``.
    """

    def __init__(self, agent: TransferAgent, peer: str, backend: str, state: Prepared):
        self._agent = agent
        self.backend_prepared = state
        self.peer = peer
        self.backend = backend
        self.layout = state.layout
        self.released = False

    def __repr__(self) -> str:
        return (
            f"PreparedBlocks(peer {self.peer!r}, {self.backend_prepared.local.name!r} <-> "
            f"{self.backend_prepared.remote.name!r}, "
            f"{self.layout.block_bytes} B blocks, {self.backend})"
        )

    def write(self, local_blocks: Any, remote_blocks: Any, notify: bytes | None = None) -> TransferHandle:
        """Copy local block ``local_blocks[i]`` into the peer's block ``remote_blocks[i]`` for every ``i``."""
        return self._agent.post_blocks(self, "write", local_blocks, remote_blocks, notify)

    def read(self, local_blocks: Any, remote_blocks: Any, notify: bytes | None = None) -> TransferHandle:
        """Copy the peer's block ``remote_blocks[i]`` into local block ``local_blocks[i]`` for every ``i``."""
        return self._agent.post_blocks(self, "read", local_blocks, remote_blocks, notify)

    def release(self) -> None:
        """Free the transport's prepared descriptors (idempotent)."""
        self._agent.release_prepared(self)
