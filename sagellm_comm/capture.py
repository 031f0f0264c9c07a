"""Whether a CUDA graph is being captured anywhere in this process.

CUDA answers per stream (``cudaStreamIsCapturing``; ``torch.cuda.is_current_stream_capturing`` asks about this
thread's current stream), so a capture that another thread began is invisible to it.  Yet freeing device memory
during a capture in the global mode (``torch.cuda.graph``'s default) invalidates that capture whichever thread
frees: a workspace region whose last reference goes on the watchdog's thread (a handler that closes workspaces),
or in a finaliser on any thread, must wait as surely as one freed on the capturing thread.

So captures are counted process-wide: :func:`track` wraps ``capture_begin`` / ``capture_end`` of
``torch.cuda.CUDAGraph`` (through which ``torch.cuda.graph``, ``make_graphed_callables`` and ``torch.compile``'s
CUDA graphs all capture), once, when the first CUDA IPC memory is made; :func:`underway` is True while a tracked
graph is between the two, or while this thread's current stream captures (a capture begun before tracking, or not
through that class); :func:`on_this_thread` says whether the capture is this thread's own.  A capture begins only
once it is marked, under the lock that :func:`held_off` holds, so a check of :func:`underway` and the free it
allows, made inside :func:`held_off`, cannot straddle a capture's start.  What waited for the captures to end
runs as soon as the last tracked one ends: :func:`after_captures` names it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import undo_after_failure

__all__ = ["after_captures", "held_off", "on_this_thread", "track", "underway"]

log = logging.getLogger("sagellm_comm")

_lock = threading.RLock()  # re-entrant: a finaliser may run, and free, on a thread that holds it
_capturing: dict[int, int] = {}  # id() of every tracked graph between capture_begin and capture_end -> its thread
_tracked: set[type] = set()  # the graph classes whose capture methods are wrapped
_after: list[Callable[[], object]] = []  # after_captures


def track(graph_class: type | None = None) -> None:
    """Count the captures of ``graph_class`` (default ``torch.cuda.CUDAGraph``) from now on (idempotent)."""
    graph_class = torch.cuda.CUDAGraph if graph_class is None else graph_class
    with _lock:
        if graph_class in _tracked:
            return
        graph_class.capture_begin = _marking_begin(graph_class.capture_begin)
        graph_class.capture_end = _unmarking_end(graph_class.capture_end)
        _tracked.add(graph_class)


def _marking_begin(begin: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(begin)
    def capture_begin(graph: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock:  # marked before it begins: a free under held_off() either finished first or sees it
            _capturing[id(graph)] = threading.get_ident()
        try:
            return begin(graph, *args, **kwargs)
        except BaseException:
            with _lock:
                _capturing.pop(id(graph), None)
            raise

    return capture_begin


def _unmarking_end(end: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(end)
    def capture_end(graph: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return end(graph, *args, **kwargs)
        finally:  # an invalidated capture raises here, and is over all the same
            with _lock:
                _capturing.pop(id(graph), None)
                after = [] if _capturing else list(_after)
            # Outside the lock, on this thread, its capture over: what runs may take held_off() and touch the device.
            undo_after_failure(after, log, "sagellm-comm: after the last CUDA graph capture ended")

    return capture_end


def after_captures(callback: Callable[[], object]) -> None:
    """Call ``callback()`` whenever the last tracked capture ends (idempotent): on the thread that ended it, right
    after its ``capture_end`` returned or raised (an invalidated capture is over too), outside :func:`held_off`'s
    lock.  A capture may begin on another thread meanwhile: ``callback`` asks :func:`underway` again, inside
    :func:`held_off`, before it touches the device.  An error it raises is logged as a warning (logger
    ``sagellm_comm``), never raised from ``capture_end``."""
    with _lock:
        if callback not in _after:
            _after.append(callback)


def underway(device: torch.device | None = None) -> bool:
    """Whether a CUDA graph is being captured: a tracked graph on any thread, or this thread's current stream (on
    ``device`` if it is a CUDA device, and on the current device).  No CUDA call without CUDA."""
    if _capturing:
        return True
    return _stream_capturing(device)


def on_this_thread(device: torch.device | None = None) -> bool:
    """Whether this thread is capturing a CUDA graph: a tracked graph whose capture it began, or its current stream
    (as :func:`underway` asks).  No CUDA call without CUDA."""
    with _lock:
        if threading.get_ident() in _capturing.values():
            return True
    return _stream_capturing(device)


def _stream_capturing(device: torch.device | None) -> bool:
    """Whether this thread's current stream captures, on ``device`` if it is a CUDA device, or on the current one."""
    if not torch.cuda.is_available():
        return False
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():
                return True
    return torch.cuda.is_current_stream_capturing()


@contextmanager
def held_off() -> Iterator[None]:
    """Hold off the start of every tracked capture while the block runs (a ``capture_begin`` on another thread
    waits for it), so that a free the block makes after :func:`underway` said False cannot land in a capture."""
    with _lock:
        yield
