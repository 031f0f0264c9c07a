"""Shared fixtures: a small multi-process spawn helper and the GPU skip markers.

``run_ranks(fn, world_size, *args, timeout=60.0, env=None, torchrun_env=True, **kwargs) -> list``
runs ``fn(rank, world_size, port, *args, **kwargs)`` in ``world_size`` fresh processes (``spawn``
start method) and returns their results in rank order.

* ``fn`` must be a module-level function of a test module (it is pickled by name) and its result
  must be picklable.  ``port`` is a free TCP port on 127.0.0.1 for the rendezvous.
* With ``torchrun_env=True`` each child gets torchrun's variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT=port``); ``env`` adds or overrides
  variables (a value of None removes one).  The parent's environment is not changed.
* If any rank raises, the test fails with every failing rank's traceback.  If the ranks have not
  all finished after ``timeout`` seconds, the survivors are killed and the test fails naming the
  hung ranks, so a hang costs ``timeout`` seconds, never the whole CI job.
* Children run with ``OMP_NUM_THREADS=1`` so several ranks share few cores politely.

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
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, env, results, args, kwargs) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    torch.set_num_threads(1)
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
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world_size):
        child_env: dict[str, str | None] = {"OMP_NUM_THREADS": "1"}
        if torchrun_env:
            child_env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        child_env.update(env or {})
        proc = ctx.Process(
            target=_child, args=(fn, rank, world_size, port, child_env, results, args, kwargs), daemon=True
        )
        proc.start()
        procs.append(proc)

    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    dead_since: dict[int, float] = {}
    while len(outcomes) < world_size and time.monotonic() < deadline:
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
    hung = [rank for rank in range(world_size) if rank not in outcomes]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
    results.close()

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
