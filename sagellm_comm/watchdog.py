"""A watchdog thread that reports device-side failures of the custom kernels without being asked.

A kernel that times out (or, in check mode, finds ranks disagreeing) latches the error on the device and
writes it into a host-mapped error record; every later call on that workspace raises at once, and
``Work.wait`` / ``synchronize`` raise too.  A program that only replays CUDA graphs never makes such a
call, so, like NCCL's watchdog, this thread polls the error records of every live workspace every
``SAGELLM_COMM_WATCHDOG_MS`` milliseconds (``CommConfig.watchdog_ms``: default 200; 0 turns it off; the
thread polls at the shortest period any live watched workspace asked for, and ends once none is left: the
next watched workspace starts a new one).  The first time it sees a
workspace's error it logs it (logger ``sagellm_comm``, level ERROR), stores it as
``workspace.async_error`` and calls every handler registered with :func:`add_error_handler`.  Reading the
record is a host memory read: no device synchronisation, no CUDA call; a record that cannot be read (a fault
in the reading code) is logged once for its workspace and the thread goes on watching the others.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sagellm_comm")

_lock = threading.Lock()
_changed = threading.Condition(_lock)  # notified when the watched set changes: the thread re-reads its period
_workspaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # workspace -> its polling period (s)
_handlers: list[Callable[[Any, BaseException], None]] = []
_thread: threading.Thread | None = None
_unreadable: weakref.WeakSet = weakref.WeakSet()  # workspaces whose error record could not be read (logged once)


def add_error_handler(handler: Callable[[Any, BaseException], None]) -> None:
    """Call ``handler(workspace, error)`` (from the watchdog thread) when a workspace first reports a failure."""
    with _lock:
        _handlers.append(handler)


def remove_error_handler(handler: Callable[[Any, BaseException], None]) -> None:
    with _lock:
        if handler in _handlers:
            _handlers.remove(handler)


def watch(workspace: Any, period_ms: float) -> None:
    """Poll ``workspace`` (it must have ``failure()`` and ``async_error``) every ``period_ms`` milliseconds (or
    more often, if another workspace asked for that) until :func:`unwatch` or its end; 0: never."""
    global _thread
    if period_ms <= 0:
        return
    with _lock:
        _workspaces[workspace] = period_ms / 1000.0
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="sagellm-comm-watchdog", daemon=True)
            _thread.start()
        else:  # asleep for a longer period, maybe: it polls at this one from now on
            _changed.notify_all()


def unwatch(workspace: Any) -> None:
    with _lock:
        _workspaces.pop(workspace, None)
        _changed.notify_all()


def poll_once() -> list[tuple[Any, BaseException]]:
    """One pass over the live workspaces; returns the failures reported for the first time."""
    with _lock:
        live = list(_workspaces)
        handlers = list(_handlers)
    found = []
    for ws in live:
        with _lock:  # closed since the pass began (by a handler, say): not reported
            if ws.async_error is not None or ws not in _workspaces:
                continue
        try:
            exc = ws.failure()
        except Exception as read_error:  # noqa: BLE001 - a record it cannot read must not end the watchdog
            if ws not in _unreadable:  # logged once per workspace, the other workspaces still watched
                _unreadable.add(ws)
                log.exception("sagellm-comm watchdog: reading the error record of %r failed: %r", ws, read_error)
            continue
        if exc is None:
            continue
        ws.async_error = exc
        found.append((ws, exc))
        log.error("sagellm-comm watchdog: %s", exc)
        for handler in handlers:
            try:
                handler(ws, exc)
            except Exception:  # a handler's bug must not stop the watchdog
                log.exception("sagellm-comm watchdog: error handler %r failed", handler)
    return found


def _run() -> None:
    """Poll every shortest live period after the last poll; a watch() or unwatch() meanwhile wakes the thread to
    read the period again (a workspace watched with a shorter period is polled at it, not after the longer sleep
    under way), and the thread ends once nothing is watched."""
    global _thread
    last = time.monotonic()
    while True:
        with _lock:
            while True:
                if not _workspaces:  # nothing left to watch: end (watch() starts a new thread)
                    if _thread is threading.current_thread():
                        _thread = None
                    return
                wait_s = last + min(_workspaces.values()) - time.monotonic()
                if wait_s <= 0:
                    break
                _changed.wait(wait_s)
        last = time.monotonic()
        poll_once()
