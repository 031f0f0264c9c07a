"""Shared fixtures: a small multi-process spawn helper and the GPU skip markers.

``run_ranks(fn, world_size, *args, timeout=60.0, env=None, torchrun_env=True, **kwargs) -> list``
runs ``fn(rank, world_size, port, *args, **kwargs)`` in ``world_size`` processes and returns their
results in rank order.  The processes are forks of a ``forkserver`` that has imported torch and nothing else
(no triton, no sagellm_comm, no CUDA), so each rank starts without paying for a torch import of its own and still
sets its environment (``env``, ``TRITON_INTERPRET`` included) before it imports the rest.

* ``fn`` must be a module-level function of a test module (it is pickled by name) and its result
  must be picklable.
* The rendezvous: this process hosts a ``TCPStore`` on a port the operating system picks (port 0) for
  the whole call, and ``port`` is where it listens.  Every child gets ``MASTER_ADDR=127.0.0.1``,
  ``MASTER_PORT=port`` and ``TORCHELASTIC_USE_AGENT_STORE=True``, so every rank (rank 0 included)
  joins that store as a client, as under torchrun's agent: ``sagellm_comm.init(..., master_port=port)``,
  ``backend.init()`` and ``dist.init_process_group(init_method=f"tcp://127.0.0.1:{port}")`` all work,
  and no port is ever picked, released and raced for.
* With ``torchrun_env=True`` each child also gets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``env``
  adds or overrides variables (a value of None removes one).  The parent's environment is not changed.
* If any rank raises, the test fails with every failing rank's traceback.  If the ranks have not
  all finished after ``timeout`` seconds, the test fails naming the hung ranks, so a hang costs
  ``timeout`` seconds, never the whole CI job.  ``timeout`` must stay below pytest's own timeout
  (``timeout`` in pyproject) by :data:`CLEANUP_S`, so the helper, not pytest, reports a hang.
* The ranks never outlive the call: whatever ends it (a result, a failure, pytest's timeout, Ctrl-C)
  kills the survivors, and a child dies with this process if it is killed outright (a thread of the
  child waits on this process's pidfd).
* Children run with ``OMP_NUM_THREADS=1`` so several ranks share few cores politely.

``join_gloo(rank, world_size, port)`` makes a rank's default Gloo group at that store, and ``exchange_objects`` is
the side channel over it that ``SymmetricWorkspace.rendezvous`` takes.

``requires_cuda`` is a skip marker for tests that need a CUDA GPU; tests marked ``gpu`` are skipped
cleanly when no GPU is visible (run them with ``pytest -m gpu`` on a GPU machine).

``no_compile_caches()`` turns Inductor's FX-graph and AOTAutograd caches off for a block, so that every graph
``torch.compile`` makes there is compiled (and its post-grad passes run) rather than loaded from disk.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sagellm_comm.backends.torch_distributed.rendezvous import client_env, host_store
from sagellm_comm.benchmark.spawn import die_with_parent
from sagellm_comm.ipc import SharedFileMemory

#: seconds between a run_ranks timeout and pytest's own: killing and reaping the ranks, reporting
CLEANUP_S = 30.0
_pytest_timeout_s: float | None = None  # set in the copy pytest loads (see _session_timeout)

HAS_CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config: pytest.Config) -> None:
    global _pytest_timeout_s
    try:  # pytest-timeout's --timeout, else its ini value (pyproject)
        value = config.getoption("timeout", None) or config.getini("timeout")
    except ValueError:  # pytest-timeout is not installed
        value = None
    _pytest_timeout_s = float(value) if value else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA GPU visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def no_compile_caches():
    """Inductor's FX-graph cache and AOTAutograd's cache off inside the block (see the module docstring)."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _session_timeout() -> float | None:
    """pytest's per-test timeout in seconds, or None.  Tests import this file as ``conftest`` and as
    ``tests.conftest`` (two module objects); only the one pytest loaded, ``conftest``, saw the config."""
    loaded = sys.modules.get("conftest")
    return getattr(loaded, "_pytest_timeout_s", None)


_CONTEXT: Any = None


def _context() -> Any:
    """The ``forkserver`` start method, with torch imported once in the server: each rank is a fork of a process
    that has torch, not a fresh interpreter that imports it again (about 2 s of CPU a rank).  Only torch is
    preloaded: triton reads ``TRITON_INTERPRET`` when a kernel is defined, and the ranks set their environment
    (``env``) before they import anything else."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        _CONTEXT = ctx
    return _CONTEXT


def _end_with(pid: int) -> None:
    """SIGKILL this process as soon as process ``pid`` ends, from a daemon thread.  A rank is the fork server's
    child, not the launcher's, so ``PR_SET_PDEATHSIG`` cannot watch the launcher; and the fork server outlives
    a killed launcher while ranks hold its pipe open (multiprocessing hands every child the pipe's write end)."""
    try:
        handle: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux), or pid already gone: poll
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has ended
        else:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True).start()


def share_interpreter_patches() -> None:
    """Have the Triton interpreter patch ``triton.language`` once per kernel launch, not once per device function.

    The interpreter swaps the language's builtins for interpreted ones when a launch starts and puts them back
    when it ends; every call of a ``@triton.jit`` helper inside the launch patches the same modules again
    (``inspect.getmembers`` over each), about half of the CPU time of a small interpreted call here.  After this,
    a helper whose language modules the launch of its own thread has patched patches nothing; one reaching
    another module, and every launch, patch as before.  The kernels run the same code either way.  A Triton
    whose interpreter lacks ``_patch_lang`` is left as it is."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "shared_per_launch", False):
        return
    launches = threading.local()  # per thread: the language modules each launch under way has patched

    class Unchanged:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        stack = launches.__dict__.setdefault("stack", [])
        if stack and langs <= stack[-1]:
            return Unchanged()  # a helper inside a launch that already patched its modules
        scope = original(fn)
        if stack:  # a helper reaching a module its launch did not patch: patched now, restored as before
            stack[-1] |= langs
            return scope
        stack.append(langs)
        restore = scope.restore

        def restore_and_end() -> None:
            try:
                restore()
            finally:
                stack.pop()

        scope.restore = restore_and_end
        return scope

    patch_lang.shared_per_launch = True
    interpreter._patch_lang = patch_lang


def _child(fn, rank, world_size, port, env, results, args, kwargs, parent_pid) -> None:
    die_with_parent(os.getppid())  # the fork server
    _end_with(parent_pid)  # the launcher
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        share_interpreter_patches()
    try:
        outcome = (rank, True, fn(rank, world_size, port, *args, **kwargs))
    except BaseException:  # report everything, including pytest.fail/skip, to the parent
        outcome = (rank, False, traceback.format_exc())
    results.put(outcome)
    results.close()
    results.join_thread()
    # skip interpreter teardown: a process group left behind (or an engine thread stuck on a missing
    # peer) must not hang the exit
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    env: dict[str, str | None] | None = None,
    torchrun_env: bool = True,
    expect_dead: frozenset[int] | set[int] = frozenset(),
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, port, *args, **kwargs)`` on ``world_size`` processes (see module doc).

    ``expect_dead``: ranks that are meant to die without reporting (fault injection, e.g. SIGKILL); their
    result is None, and the test fails if one of them reports instead."""
    limit = _session_timeout()
    if limit is not None and timeout + CLEANUP_S > limit:
        pytest.fail(
            f"run_ranks(timeout={timeout:g}) leaves less than {CLEANUP_S:g}s before pytest's timeout of "
            f"{limit:g}s: give at most {limit - CLEANUP_S:g}s",
            pytrace=False,
        )
    ctx = _context()
    store = host_store("127.0.0.1", timeout=timeout)  # the ranks' rendezvous, until they are all gone
    port = store.port
    results = ctx.Queue()
    procs: list[Any] = []
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        for rank in range(world_size):
            child_env: dict[str, str | None] = {"OMP_NUM_THREADS": "1", **client_env("127.0.0.1", port)}
            if torchrun_env:
                child_env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
            child_env.update(env or {})
            proc = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, port, child_env, results, args, kwargs, os.getpid()),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        _collect(procs, results, outcomes, timeout, expect_dead)
    finally:  # on every exit, pytest's timeout and Ctrl-C included: no rank outlives the call
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=5)
        results.close()
        del store
    hung = [rank for rank in range(world_size) if rank not in outcomes]

    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    failures += [
        f"--- rank {r} ---\nexpected to die, but reported {outcomes[r][1]!r}"
        for r in expect_dead
        if r in outcomes and outcomes[r][1] is not None
    ]
    orphans = [r for r, proc in enumerate(procs) if proc.is_alive()]
    if orphans:
        failures.append(f"ranks {orphans} survived kill() (orphans)")
    if hung:
        failures.insert(0, f"ranks {hung} did not finish within {timeout:g}s and were killed")
    if failures:
        pytest.fail(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(failures), pytrace=False)
    return [outcomes[r][1] for r in range(world_size)]


def _collect(procs, results, outcomes: dict, timeout: float, expect_dead) -> None:
    """Fill ``outcomes`` (rank -> (ok, value)) until every rank has reported or died, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    dead_since: dict[int, float] = {}
    while len(outcomes) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.05)
            outcomes[rank] = (ok, value)
            continue
        except queue.Empty:
            pass
        for rank, proc in enumerate(procs):  # a child that died without reporting (segfault, kill)
            if rank not in outcomes and proc.exitcode is not None:
                first = dead_since.setdefault(rank, time.monotonic())
                if rank in expect_dead:
                    outcomes[rank] = (True, None)
                elif time.monotonic() - first > 2.0:
                    outcomes[rank] = (False, f"rank {rank} died with exit code {proc.exitcode} and no report")


def join_gloo(rank: int, world_size: int, port: int) -> None:
    """Make torch.distributed's default group over Gloo, at the store :func:`run_ranks` hosts on ``port``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")


def exchange_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, gathered over torch.distributed's default group (:func:`join_gloo`): the
    side channel (``exchange``) ``SymmetricWorkspace.rendezvous`` takes.  Blocks until every rank calls."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_checks(checks: dict[Any, Callable[[], Any]]) -> dict[Any, tuple[str, Any]]:
    """A rank's ``checks`` run in order: each name's ``("ok", value)``, or ``("raised", traceback)`` for the first
    that raises and nothing after it (the ranks may then disagree on the next collective).  The parent reads them
    with :func:`checked_values`."""
    outcomes: dict[Any, tuple[str, Any]] = {}
    for name, check in checks.items():
        try:
            outcomes[name] = ("ok", check())
        except Exception:  # recorded, with its traceback, for the parent to report
            outcomes[name] = ("raised", traceback.format_exc())
            break
    return outcomes


def checked_values(outcomes: list[dict], name: Any) -> list[Any]:
    """Every rank's value of check ``name`` in rank order, from each rank's :func:`run_checks` outcomes (or a dict of
    that form); fails naming a rank that did not reach the check (an earlier one raised) or whose check raised, with
    its traceback."""
    values = []
    for rank, result in enumerate(outcomes):
        assert name in result, f"rank {rank} did not reach {name!r} (an earlier check raised)"
        status, value = result[name]
        assert status == "ok", f"rank {rank}:\n{value}"
        values.append(value)
    return values


def pg_alive(pg) -> bool:
    """Whether torch.distributed still holds the process group ``pg`` (a released group's is gone)."""
    import torch.distributed as dist

    try:
        dist.get_backend(pg)
    except (RuntimeError, ValueError):
        return False
    return True


def process_resources() -> dict[str, int]:
    """This process's open file descriptors and threads (native ones included: ``/proc/self/task``), after a
    garbage collection: for tests that repeat a cycle and check that nothing it made stays behind."""
    import gc

    gc.collect()
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}


def resources_back_to(level: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
    """:func:`process_resources` once no count is above ``level`` (threads a released object ends may take a
    moment), or as they are at ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = process_resources()
        if all(now[key] <= level[key] for key in level) or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


class RecordingFileMemory(SharedFileMemory):
    """Shared files (the interpreter's peer memory) that record what is unmapped and freed."""

    def __init__(self):
        super().__init__()
        self.unmapped: list[int] = []
        self.freed: list[int] = []

    def close(self, ptr: int) -> None:
        self.unmapped.append(ptr)
        super().close(ptr)

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)
        super().free(ptr)


# NaN bit patterns per dtype (as the integer type of its width): quiet and signalling, either sign, a payload, and
# all ones (the Lamport sentinel)
NAN_BITS = {
    torch.float32: (torch.int32, [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FC12345, 0xFFFFFFFF]),
    torch.bfloat16: (torch.int16, [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FD3, 0xFFFF]),
    torch.float16: (torch.int16, [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7E55, 0xFFFF]),
}


def rank_order_sum(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The custom kernels' all-reduce result: the ranks' inputs summed in rank order in fp32, then cast."""
    acc = torch.zeros_like(inputs[0], dtype=torch.float32)
    for t in inputs:
        acc += t.float()
    return acc.to(inputs[0].dtype)


@pytest.fixture
def spawn() -> Callable[..., list[Any]]:
    """Fixture form of :func:`run_ranks`."""
    return run_ranks
