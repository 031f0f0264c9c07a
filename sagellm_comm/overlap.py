"""Compute/communication overlap: an all-reduce started now, waited for later.

::

    handle = all_reduce_async(partial, group=tp)   # the all-reduce starts on a side stream
    y = mlp(x)                                      # runs on the current stream meanwhile
    reduced = handle.wait()                         # the current stream waits for the all-reduce

Semantics by device:

* **CUDA** (NCCL, custom kernels): :func:`all_reduce_async` makes a side stream (one per device,
  shared by all calls, or ``stream=``) wait for the work already queued on the current stream (so the
  all-reduce sees the finished ``tensor``), enqueues the in-place all-reduce on the side stream and
  records an event there.  It returns as soon as the work is enqueued.  ``wait()`` makes the stream
  that is current *at the time of the call* wait for that event; the host does not block
  (``synchronize()`` blocks it, bounded by the backend's timeout).  The tensor
  is marked with ``record_stream(side)``, so the caching allocator does not hand its memory to another
  tensor before the side stream is done with it, even if the caller drops it early.  The fork (side
  waits for current) and the join (current waits for the event) are both stream operations, so the
  pattern can be captured in a CUDA graph, as long as ``wait()`` is called inside the capture.
* **CPU** (Gloo): the engine runs the all-reduce on its own thread (``async_op=True``); ``wait()``
  blocks the host until the data is reduced, bounded by ``timeout`` (the backend's by default).

Until ``wait()`` returns, neither read nor write ``tensor``: it is being reduced in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sagellm_comm.arguments import check_device, check_is_tensor, check_timeout, is_int
from sagellm_comm.backend import DEFAULT_TIMEOUT_S, ReduceOp, Work, poll_until
from sagellm_comm.errors import BackendNotSupportedError, CommTimeoutError, InvalidArgumentError
from sagellm_comm.group import resolve_group

if TYPE_CHECKING:
    from sagellm_comm.group import CommGroup

__all__ = ["AsyncAllReduce", "all_reduce_async", "comm_stream", "start_on_side_stream"]

_STREAMS: dict[int, torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def comm_stream(device: torch.device | str | int | None = None) -> torch.cuda.Stream:
    """The side stream :func:`all_reduce_async` uses on ``device`` (created once per device): a CUDA device, its
    index, or None for the current one.  Another device, a bool or an index past the last GPU raises
    :class:`InvalidArgumentError`; a process without CUDA :class:`BackendNotSupportedError`."""
    if device.__class__ is torch.device and device.index is not None:  # every all_reduce_async: the made one first
        stream = _STREAMS.get(device.index) if device.type == "cuda" else None
        if stream is not None:
            return stream
    if device is not None and not is_int(device):
        device = check_device(device)
        if device.type != "cuda":
            raise InvalidArgumentError(f"comm_stream is a CUDA stream; got device {str(device)!r}")
    if not torch.cuda.is_available():
        raise BackendNotSupportedError("comm_stream needs CUDA, and this process has no CUDA device")
    index = torch.cuda._utils._get_device_index(device, optional=True)
    if not 0 <= index < torch.cuda.device_count():
        raise InvalidArgumentError(
            f"comm_stream: no CUDA device {index} here ({torch.cuda.device_count()} visible)", details={"device": index}
        )
    with _STREAMS_LOCK:
        stream = _STREAMS.get(index)
        if stream is None:
            stream = _STREAMS[index] = torch.cuda.Stream(device=index)
        return stream


class AsyncAllReduce(Work):
    """Handle of :func:`all_reduce_async` (see the module docstring for the stream semantics).

    Attributes:
        tensor: the tensor being reduced in place (valid once :meth:`wait` returned).
        stream: the side stream the all-reduce was enqueued on (None on CPU).
        timeout: seconds that bound a :meth:`synchronize` given none on CUDA (the group's backend's timeout).
    """

    def __init__(
        self,
        tensor: torch.Tensor,
        *,
        event: torch.cuda.Event | None = None,
        stream: torch.cuda.Stream | None = None,
        work: Work | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        self.tensor = tensor
        self.stream = stream
        self.timeout = timeout
        self._event = event
        self._work = work
        self._waited = False

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """CUDA: order the current stream after the all-reduce (no host block; ``timeout`` unused).
        CPU: block until reduced, at most ``timeout`` seconds (``comm_timeout`` past it).
        Returns :attr:`tensor`.  Calling it again is allowed (and orders the then-current stream)."""
        if timeout is not None:
            timeout = check_timeout(timeout)
        if self._event is not None:
            torch.cuda.current_stream(self.tensor.device).wait_event(self._event)
        elif self._work is not None and not self._waited:
            self._work.wait(timeout)
        self._waited = True
        return self.tensor

    def is_completed(self) -> bool:
        """Non-blocking: True once the all-reduce finished on the device (CUDA) or the host (CPU)."""
        if self._event is not None:
            return bool(self._event.query())
        return self._waited or self._work is None or bool(self._work.is_completed())

    def synchronize(self, timeout: float | None = None) -> torch.Tensor:
        """Block the host until the all-reduce is done, at most ``timeout`` seconds (default :attr:`timeout` on
        CUDA, the backend's on CPU); ``comm_timeout`` past it (CUDA: a side stream that never reaches the event, a
        stalled GPU; CPU: as :meth:`wait`).  Returns :attr:`tensor`."""
        if self._event is None:
            return self.wait(timeout)
        limit = self.timeout if timeout is None else check_timeout(timeout)
        poll_until(
            self._event.query,
            limit,
            lambda: CommTimeoutError(
                f"the all-reduce on the side stream of {self.tensor.device} did not complete within {limit:g}s",
                details={"device": str(self.tensor.device), "timeout_s": limit},
            ),
        )
        return self.tensor


def all_reduce_async(
    tensor: torch.Tensor,
    group: CommGroup | str | None = None,
    op: ReduceOp | str = ReduceOp.SUM,
    *,
    stream: torch.cuda.Stream | None = None,
) -> AsyncAllReduce:
    """Start an in-place all-reduce of ``tensor`` over ``group`` and return its handle at once.

    Args:
        tensor: contiguous, on the group's device; any dtype its backend reduces.  Reduced in place.
        group: a :class:`CommGroup`, a name registered with :mod:`sagellm_comm.ops`, or None (the
            default group).
        op: the reduction.
        stream: CUDA only: the side stream to run on, on the tensor's device (default :func:`comm_stream` of the
            device).

    Returns:
        An :class:`AsyncAllReduce`; call ``wait()`` before using ``tensor``.
    """
    check_is_tensor(tensor, "tensor")
    comm_group = resolve_group(group)
    reduce_op = ReduceOp.parse(op)
    if tensor.device.type != "cuda":
        if stream is not None:
            raise InvalidArgumentError(f"stream= is for CUDA tensors; this tensor is on {tensor.device}")
        work: Any = comm_group.all_reduce(tensor, reduce_op, async_op=True)
        return AsyncAllReduce(tensor, work=work)
    if stream is not None and not isinstance(getattr(stream, "device", None), torch.device):
        raise InvalidArgumentError(f"stream= must be a torch.cuda.Stream (or None), got {type(stream).__name__}")
    if stream is not None and stream.device != tensor.device:
        # The all-reduce would run on the streams of the tensor's device, which the fork (on the stream's device)
        # does not order and the event does not follow: nothing overlapped, and is_completed() / synchronize()
        # would not track the all-reduce.
        raise InvalidArgumentError(
            f"stream= is on {stream.device}, the tensor on {tensor.device}; pass a stream of {tensor.device} "
            "(or none: comm_stream of the tensor's device)"
        )
    side = stream if stream is not None else comm_stream(tensor.device)
    current = torch.cuda.current_stream(tensor.device)
    if side == current:
        raise InvalidArgumentError("stream= must differ from the current stream, or nothing can overlap")
    timeout = getattr(comm_group.backend, "timeout", DEFAULT_TIMEOUT_S)
    return start_on_side_stream(lambda: comm_group.all_reduce(tensor, reduce_op), [tensor], side, timeout)


def start_on_side_stream(
    reduce: Callable[[], object],
    tensors: Sequence[torch.Tensor],
    side: torch.cuda.Stream,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> AsyncAllReduce:
    """The fork of :func:`all_reduce_async`: ``side`` waits for what the current stream has queued, ``reduce()``
    is enqueued on ``side`` and an event recorded after it; every tensor of ``tensors`` (reduced in place by
    ``reduce``) is marked ``record_stream(side)``.  Returns the handle on ``tensors[0]``, whose ``wait()`` joins
    (``timeout``: its :attr:`AsyncAllReduce.timeout`).

    For callers that reduce several tensors of this process at once (virtual ranks: one per rank)."""
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)  # the producers of `tensors` have finished before the reduce reads them
    with torch.cuda.stream(side):
        reduce()
        event = torch.cuda.Event()
        event.record(side)
    for tensor in tensors:
        tensor.record_stream(side)  # its memory stays reserved until the side stream's work is done
    return AsyncAllReduce(tensors[0], event=event, stream=side, timeout=timeout)
