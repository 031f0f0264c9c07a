"""Start the ranks of a benchmark as processes on this host, collect rank 0's result, stop them cleanly.

Used by everything that launches its own ranks (``sagellm-comm bench`` and ``overlap``, the Llama
example).  Ranks are fresh interpreters (``spawn``).  This process hosts their rendezvous store on a port
the operating system picks (:func:`~sagellm_comm.backends.torch_distributed.rendezvous.host_store`) and
every rank joins it as a client, so no port is picked, released and raced for.  Rank 0 hands its result
back through a pickle file.  A rank that raises stops the others and surfaces as
:class:`~sagellm_comm.errors.CollectiveFailedError`, and so does one that has not ended ``timeout`` seconds after
another did (hung where no collective timeout bounds it); ``KeyboardInterrupt`` (Ctrl-C) in the parent stops
every rank (SIGTERM, then SIGKILL) before it propagates, and a rank dies with this process whatever ends
it (:func:`die_with_parent`: SIGKILL and timeouts included).  Stopping is bounded too: a rank still running
seconds after its SIGKILL is named by :class:`~sagellm_comm.errors.CollectiveFailedError` (:func:`stop`).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sagellm_comm import shm
from sagellm_comm.errors import CollectiveFailedError

MASTER_ADDR = "127.0.0.1"
INTERRUPTED_EXIT = 130  # a rank stopped by Ctrl-C exits with this status (128 + SIGINT)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process as soon as ``parent_pid``, the process that started it, ends.

    Call it first thing in a child.  A launcher stops its children on every exit it survives (an
    exception, Ctrl-C, a test timeout); this covers the exits it does not (SIGKILL, a crash).  If the
    parent is already gone, the child exits at once.  Elsewhere than Linux it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not permitted here: the launcher's own clean-up still applies
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def _rank_entry(
    index: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int, path: str, env: dict[str, str],
    parent_pid: int,
) -> None:  # fmt: skip
    """One spawned rank: ``fn(index, world_size, port, *args)``; rank 0 pickles the return value to ``path``."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started ignoring Ctrl-C; from here it stops quietly
    os.environ.update(env)
    import torch

    os.environ["LOCAL_RANK"] = str(index)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        result = fn(index, world_size, port, *args)
    except KeyboardInterrupt:
        raise SystemExit(INTERRUPTED_EXIT) from None  # the parent reads this status as an interruption
    if index == 0:
        with open(path, "wb") as handle:
            pickle.dump(result, handle)


@contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT, so a Ctrl-C while they import torch prints no
    traceback of theirs; each rank restores it once its code runs (:func:`_rank_entry`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop(processes: list[Any], grace_s: float = 5.0, kill_s: float = 5.0) -> None:
    """Terminate the ranks still running (SIGTERM, then SIGKILL after ``grace_s``) and reap them all; the
    shared-memory files of those killed by a signal (their finalizers never ran) are removed.  ``processes[i]`` is
    rank ``i``.  A rank still running ``kill_s`` seconds after its SIGKILL (stuck in an uninterruptible call, a
    driver's say) is left running, and once the others are reaped :class:`CollectiveFailedError` names it."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    unkillable = []
    for rank, process in enumerate(processes):
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join(kill_s)
            if process.is_alive():
                unkillable.append(f"rank {rank} (pid {process.pid})")
    killed = [p.pid for p in processes if p.exitcode is not None and p.exitcode < 0]  # torch's join SIGTERMs too
    if killed:
        shm.remove_files_of(killed)
    if unkillable:
        raise CollectiveFailedError(
            f"{', '.join(unkillable)} did not exit within {kill_s:g}s of SIGKILL (stuck in an uninterruptible call, "
            "a driver's say); left running, it may still hold its device and memory",
            details={"pids": [p.pid for p in processes if p.is_alive()]},
        )


def _join(context: Any, what: str, timeout: float | None) -> None:
    """Wait for every process of ``context`` (``ProcessContext.join``: a failed one raises); once one has ended, the
    rest get ``timeout`` seconds (None: forever), past which :class:`CollectiveFailedError` names them."""
    if timeout is None:
        while not context.join():
            pass
        return
    deadline, first = None, None
    while True:
        wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        if context.join(timeout=wait):
            return
        running = [index for index, process in enumerate(context.processes) if process.is_alive()]
        if deadline is None:
            if len(running) < len(context.processes):
                deadline = time.monotonic() + timeout
                first = next(index for index in range(len(context.processes)) if index not in running)
        elif time.monotonic() >= deadline:
            ranks = ", ".join(map(str, running))
            raise CollectiveFailedError(
                f"rank{'s' if len(running) > 1 else ''} {ranks} of the {what} did not end within {timeout:g}s of "
                f"rank {first} (hung); stopped"
            )


def spawn_ranks(
    fn: Callable[..., Any], args: tuple, world_size: int, what: str = "benchmark", *, timeout: float | None = None
) -> Any:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` new processes; return rank 0's value.

    ``fn`` must be a module-level function (it is pickled) that initialises its backend with
    ``master_addr=MASTER_ADDR, master_port=port`` (or with no address: ``MASTER_ADDR``/``MASTER_PORT``
    are set); ``port`` is where this process hosts the store, and every rank joins it as a client.
    ``what`` names the run in error messages.  ``timeout`` (seconds; the run's collective timeout): once a rank
    has ended, the others get that long to end too; one that has not (hung outside any collective, where no
    collective timeout bounds it) is stopped and the run fails with :class:`CollectiveFailedError`.  None: no such
    deadline.
    """
    import torch.multiprocessing as mp

    from sagellm_comm.backends.torch_distributed.rendezvous import client_env, host_store

    store = host_store(MASTER_ADDR)  # lives until the ranks are stopped
    port = store.port
    env = client_env(MASTER_ADDR, port)
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-") as tmp:
        path = os.path.join(tmp, "rank0.pkl")
        with _children_ignore_ctrl_c():
            context = mp.start_processes(
                _rank_entry, args=(fn, args, world_size, port, path, env, os.getpid()), nprocs=world_size,
                join=False, start_method="spawn",
            )  # fmt: skip
        try:
            _join(context, what, timeout)
        except mp.ProcessRaisedException as exc:
            raise CollectiveFailedError(f"a rank of the {what} failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            if exc.exit_code in (INTERRUPTED_EXIT, -signal.SIGINT):
                raise KeyboardInterrupt from None  # Ctrl-C reached a rank before (or instead of) this process
            raise CollectiveFailedError(f"a rank of the {what} died: {exc}") from None
        finally:
            stop(context.processes)
        if not os.path.exists(path):  # a rank stopped by SIGINT exits 0 without a result
            raise CollectiveFailedError(f"the {what} ranks ended without a result (a rank was interrupted)")
        with open(path, "rb") as handle:
            return pickle.load(handle)
