"""Fault injection on the CPU: the custom kernels under the Triton interpreter, ranks as processes.

Every case a long-running server meets must end in the exact result or a typed error, never a wrong sum:
counters across 2^31 and 2^32 (every kernel family), a zero-copy input on one rank only, ranks that disagree
on size / algorithm / dtype (check mode), a rank late by less than the timeout, a rank killed mid-call,
a timeout (NaN output, every later call raises, the watchdog reports it, ``reset()`` recovers), Lamport
payloads that look like its sentinel, and world sizes that are not powers of two.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from sagellm_comm.config import MAX_INITIAL_EPOCH
from tests.conftest import exchange_objects, join_gloo, run_ranks

# Workspaces the test does not size get two programs a launch (the CPU default is 32, interpreted one by one).
INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_INITIAL_EPOCH": None, "SAGELLM_COMM_CHECK": None,
          "SAGELLM_COMM_MAX_PROGRAMS": "2"}  # fmt: skip
SLOT_BYTES = 16384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _setup(rank, world_size, port, timeout_s=60.0, check=None, gemm=False):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.fused import FusedAllReduceRMSNorm, GemmAllReduce, gemm_workspace_bytes
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)
    ws = SymmetricWorkspace.rendezvous(
        rank, world_size, SLOT_BYTES, "cpu", exchange_objects, max_programs=2, check=check
    )
    car = CustomAllReduce(ws, timeout_s=timeout_s)
    if not gemm:
        return car, None, None
    fused = FusedAllReduceRMSNorm(ws, timeout_s=timeout_s)
    gws = SymmetricWorkspace.rendezvous(
        rank, world_size, gemm_workspace_bytes(8192), "cpu", exchange_objects, check=check
    )
    return car, fused, GemmAllReduce(gws, car, timeout_s=timeout_s, consumer_programs=2)


def _full(rank: int, i: int, numel: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((numel,), float(rank + 1 + i), dtype=dtype)


def _expected(world_size: int, i: int) -> float:
    return float(sum(r + 1 + i for r in range(world_size)))


# ---------------------------------------------------------------------------------------------- counter wrap
def _wrap_worker(rank, world_size, port, start):
    from sagellm_comm.fused import rmsnorm_reference

    os.environ["SAGELLM_COMM_INITIAL_EPOCH"] = str(start)
    car, fused, gemm = _setup(rank, world_size, port, gemm=True)
    gemm.ce_chunks = 2
    assert car.epoch == start and car.lamport_epoch == start, (car.epoch, car.lamport_epoch)
    # A registered tensor the copy path must never touch.
    guard = car.get_buffer(64, torch.float32)
    guard.fill_(12345.0)
    barrier_calls = lamport_calls = 0
    g = torch.Generator().manual_seed(5)
    a_all = [torch.randint(-2, 3, (12, 8), generator=g).to(torch.bfloat16) for _ in range(world_size)]
    b_all = [torch.randint(-2, 3, (8, 16), generator=g).to(torch.bfloat16) for _ in range(world_size)]
    gemm_ref = sum(a.float() @ b.float() for a, b in zip(a_all, b_all, strict=True))
    for i in range(5):  # 5 calls of every family: each counter crosses start + 3
        for algo in ("one_shot", "two_shot", "lamport"):
            x = _full(rank, i, 37 + i)
            car.all_reduce(x, algo=algo)
            assert torch.all(x == _expected(world_size, i)), f"{algo} call {i} after {start}: {x[:4]}"
            if algo == "lamport":
                lamport_calls += 1
            else:
                barrier_calls += 1
        x = torch.full((3, 8), float(rank + 1 + i))
        residual = torch.ones(3, 8)
        weight = torch.ones(8)
        normed, new_res = fused(x, residual, weight, algo=("one_shot", "two_shot")[i % 2])
        want_res = torch.full((3, 8), _expected(world_size, i) + 1)
        assert torch.equal(new_res, want_res), f"rmsnorm call {i}: {new_res[0]}"
        torch.testing.assert_close(normed, rmsnorm_reference(want_res, weight, 1e-6), rtol=1e-6, atol=1e-6)
        barrier_calls += 1
        q, scales, new_res = fused(x, residual, weight, algo="lamport", quant="fp8_per_token")  # the Lamport form
        assert torch.equal(new_res, want_res) and torch.all(q.float() * scales == 1.0), f"fused lamport call {i}"
        lamport_calls += 1
        for path in ("fused", "copy_engine"):
            out = gemm(a_all[rank], b_all[rank], path=path)
            assert torch.equal(out.float(), gemm_ref), f"gemm {path} call {i} after {start}"
        assert torch.all(guard == 12345.0), "a copy-path call overwrote the registered region"
    car.check_errors()
    gemm.check_errors()
    # Zero-copy across the wrap too (the registered region is the input now).
    for algo in ("one_shot", "two_shot"):
        buf = car.get_buffer(29, torch.float32)
        buf.copy_(_full(rank, 7, 29))
        car.all_reduce(buf, algo=algo)
        assert torch.all(buf == _expected(world_size, 7)), f"zero-copy {algo}"
        barrier_calls += 1
    from sagellm_comm.kernels.all_reduce import CTRL_CE_EPOCH, CTRL_EPOCH

    return (
        car.epoch - start,
        car.lamport_epoch - start,
        gemm.workspace.counter(CTRL_EPOCH.value) - start,
        gemm.workspace.counter(CTRL_CE_EPOCH.value) - start,
        barrier_calls,
        lamport_calls,
    )


@pytest.mark.parametrize("start", [2**31 - 3, 2**32 - 3], ids=["2^31", "2^32"])
def test_every_family_is_exact_across_counter_wrap(start):
    per_rank = run_ranks(_wrap_worker, 2, start, env=INTERP, timeout=540)
    for epoch, lamport_epoch, gemm_epoch, ce_epoch, barrier_calls, lamport_calls in per_rank:
        assert (epoch, lamport_epoch) == (barrier_calls, lamport_calls)
        assert (gemm_epoch, ce_epoch) == (5, 5)


COUNTERS = [0, 1, 2, 3, 4, 5, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5, 3 * 2**32 + 2,
            2**40 + 11, 2**62 + 7, 2**63 - 2, 2**63 - 1, 12345678901234567, 9 * 10**18]  # fmt: skip


lamport_kernels = None  # the kernel module, imported by _buffer_index_worker once the interpreter is on


def _buffer_index_worker(rank, world_size, port, counters):
    import triton
    import triton.language as tl

    from sagellm_comm.kernels import lamport_all_reduce

    # The interpreter resolves a kernel's names in its module's globals.
    global lamport_kernels
    lamport_kernels = lamport_all_reduce

    @triton.jit
    def buffer_kernel(counts, out, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out + offs, lamport_kernels._buffer_of(tl.load(counts + offs)))

    n = triton.next_power_of_2(len(counters))
    counts = torch.tensor(counters + [0] * (n - len(counters)), dtype=torch.int64)
    out = torch.full((n,), -1, dtype=torch.int32)
    buffer_kernel[(1,)](counts, out, N=n)
    return out[: len(counters)].tolist()


def test_lamport_buffer_index_is_the_counter_mod_3_at_every_magnitude():
    # The kernel derives ``count % 3`` from the counter's 32-bit halves; a wrong carry between them shows at
    # 2^32 and beyond.
    (got,) = run_ranks(_buffer_index_worker, 1, COUNTERS, env=INTERP, timeout=120)
    assert got == [c % 3 for c in COUNTERS]


def _epoch_limit_worker(rank, world_size, port, start, marker):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError

    os.environ["SAGELLM_COMM_INITIAL_EPOCH"] = str(start)
    car, _, _ = _setup(rank, world_size, port)
    for i, algo in enumerate(("one_shot", "two_shot", "lamport") * 2):
        x = _full(rank, i, 19 + i)
        car.all_reduce(x, algo=algo)
        assert torch.all(x == _expected(world_size, i)), f"{algo} call {i} from {start}: {x[:4]}"
    car.check_errors()
    if rank == 1:  # makes no further call: its peer times out in barrier call start + 4
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    late = CustomAllReduce(car.workspace, timeout_s=2.0)  # the same workspace, a short wait
    late.all_reduce(_full(rank, 0, 8), algo="one_shot")
    with pytest.raises(CommTimeoutError) as info:
        late.check_errors()
    open(marker, "w").close()
    return str(info.value), info.value.details


def test_the_largest_initial_epoch_is_exact_and_timeouts_name_the_call(tmp_path):
    """From the largest accepted initial epoch (2^40 calls before any flag could overflow) every family is exact;
    a timeout names the call number (4 barrier calls made: the fifth is number start + 4), not the flag value it
    waited for (2 * (start + 5))."""
    start = MAX_INITIAL_EPOCH
    message, details = run_ranks(_epoch_limit_worker, 2, start, str(tmp_path / "m"), env=INTERP, timeout=300)[0]
    assert details["call"] == start + 4 and details["flag_target"] == 2 * (start + 5), details
    assert f"start barrier of barrier-kernel call {start + 4} (counted from {start}" in message, message


# ---------------------------------------------------------------------------------- per-rank choices
def _one_rank_zero_copy_worker(rank, world_size, port):
    car, _, _ = _setup(rank, world_size, port)
    results = []
    for i, (algo, zero_copy_rank) in enumerate(
        [("one_shot", 0), ("two_shot", 0), ("one_shot", 1), ("two_shot", 1), ("one_shot", None)]
    ):
        numel = 41 + 8 * i
        if rank == zero_copy_rank:
            x = car.get_buffer(numel, torch.float32)
            x.copy_(_full(rank, i, numel))
        else:
            x = _full(rank, i, numel)
        car.all_reduce(x, algo=algo)
        car.check_errors()
        results.append(bool(torch.all(x == _expected(world_size, i))))
    return results


@pytest.mark.parametrize("world_size", [2, 3])  # 3: two-shot copies all chunks' tiles in one access
def test_zero_copy_on_one_rank_only_gives_the_exact_sum(world_size):
    for per_rank in run_ranks(_one_rank_zero_copy_worker, world_size, env=INTERP, timeout=300):
        assert all(per_rank), per_rank


def _mismatch_worker(rank, world_size, port, what):
    from sagellm_comm.errors import CollectiveMismatchError

    car, _, _ = _setup(rank, world_size, port, timeout_s=30.0, check=True)
    # Agreeing calls run exactly in check mode.
    x = _full(rank, 0, 50)
    car.all_reduce(x, algo="one_shot")
    assert torch.all(x == _expected(world_size, 0))
    numel, algo, dtype = 64, "one_shot", torch.float32
    if rank == 1:
        numel, algo, dtype = {
            "size": (65, algo, dtype),
            "algo": (numel, "lamport", dtype),
            "dtype": (numel, algo, torch.bfloat16),
            "empty": (0, algo, dtype),
        }[what]
    x = _full(rank, 1, numel, dtype)
    car.all_reduce(x, algo=algo)
    with pytest.raises(CollectiveMismatchError) as info:
        car.check_errors()
    assert torch.all(torch.isnan(x)), "a mismatched call's output must not pass for a sum"
    with pytest.raises(CollectiveMismatchError):  # later calls refuse at once
        car.all_reduce(_full(rank, 2, 8))
    return str(info.value), info.value.details


@pytest.mark.parametrize("what", ["size", "algo", "dtype", "empty"])
def test_check_mode_names_the_disagreeing_rank_and_both_fingerprints(what):
    """... also where one rank passes no element at all: its empty call is compared too (it returned without a
    check, and its peer waited for it until the timeout)."""
    per_rank = run_ranks(_mismatch_worker, 2, what, env=INTERP, timeout=300)
    for rank, (message, details) in enumerate(per_rank):
        other = 1 - rank
        assert details["peer"] == other and details["kind"] == "mismatch", details
        assert f"rank {other} ran" in message, message
        mine, theirs = details["mine"], details["theirs"]
        assert mine["call"] == theirs["call"] == 1
        key, r0, r1 = {
            "size": ("numel", 64, 65),
            "algo": ("algo", "one_shot", "lamport"),
            "dtype": ("dtype", "float32", "bfloat16"),
            "empty": ("numel", 64, 0),
        }[what]
        assert (mine[key], theirs[key]) == ((r0, r1) if rank == 0 else (r1, r0)), details


def _shape_mismatch_worker(rank, world_size, port, family):
    from sagellm_comm.errors import CollectiveMismatchError

    car, fused, gemm = _setup(rank, world_size, port, timeout_s=30.0, check=True, gemm=True)
    rows, cols = (2, 256) if rank == 0 else (4, 128)  # the same element count, another layout
    if family == "rmsnorm":
        x = torch.ones(rows, cols)
        call = lambda: fused(x, torch.zeros_like(x), torch.ones(cols), algo="one_shot")  # noqa: E731
    else:
        a, b = torch.ones(rows, 8, dtype=torch.bfloat16), torch.ones(8, cols, dtype=torch.bfloat16)
        path = "copy_engine" if family == "gemm copy engine" else "fused"
        call = lambda: gemm(a, b, path=path)  # noqa: E731
    call()
    with pytest.raises(CollectiveMismatchError) as info:
        (fused if family == "rmsnorm" else gemm).check_errors()
    return str(info.value), info.value.details


@pytest.mark.parametrize("family", ["rmsnorm", "gemm", "gemm copy engine"])
def test_check_mode_compares_the_shape_of_the_2d_families_not_only_their_size(family):
    """[2, 256] on one rank and [4, 128] on another hold as many elements: the fused RMSNorm would normalise rows
    of another length, the fused GEMM reduce another layout, and check mode let it pass."""
    for rank, (message, details) in enumerate(run_ranks(_shape_mismatch_worker, 2, family, env=INTERP, timeout=300)):
        mine, theirs = ((2, 256), (4, 128)) if rank == 0 else ((4, 128), (2, 256))
        assert details["mine"]["shape"] == mine and details["theirs"]["shape"] == theirs, details
        assert details["mine"]["numel"] == details["theirs"]["numel"] == 512, details
        dtype = "float32" if family == "rmsnorm" else "bfloat16"
        assert details["mine"]["algo"].endswith("copy_engine") == (family == "gemm copy engine"), details
        assert f"ran {details['mine']['algo']} of {mine[0]} x {mine[1]} x {dtype}" in message, message


def _check_mode_agreement_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)
    with pytest.raises(InvalidArgumentError, match=r"SAGELLM_COMM_CHECK \(check mode\) differs: 1 on ranks \[0\]"):
        SymmetricWorkspace.rendezvous(rank, world_size, 4096, "cpu", exchange_objects, check=rank == 0)
    ws = SymmetricWorkspace.rendezvous(rank, world_size, 4096, "cpu", exchange_objects, max_programs=5 + rank)
    programs = ws.max_programs
    ws.close()
    return programs


def test_program_count_and_check_mode_are_agreed_at_set_up():
    assert run_ranks(_check_mode_agreement_worker, 2, env=INTERP, timeout=300) == [5, 5]


# ------------------------------------------------------------------------------------- late and dead ranks
def _late_worker(rank, world_size, port):
    car, _, _ = _setup(rank, world_size, port, timeout_s=30.0)
    results = []
    for i, algo in enumerate(("one_shot", "two_shot", "lamport")):
        if rank == world_size - 1:
            time.sleep(1.5)
        x = _full(rank, i, 33)
        car.all_reduce(x, algo=algo)
        car.check_errors()
        results.append(bool(torch.all(x == _expected(world_size, i))))
    return results


def test_a_rank_late_by_less_than_the_timeout_gives_the_exact_sum():
    for per_rank in run_ranks(_late_worker, 3, env=INTERP, timeout=300):
        assert all(per_rank)


def _killed_worker(rank, world_size, port, algo):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError

    # 10 s: the first call must not time out on a loaded machine
    car, _, _ = _setup(rank, world_size, port, timeout_s=10.0)
    x = _full(rank, 0, 40)
    car.all_reduce(x, algo=algo)  # one good call
    assert torch.all(x == _expected(world_size, 0))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies between calls, with its peers already waiting
    # The survivors left the good call together: the same workspace with a 3 s wait for the one that times out.
    late = CustomAllReduce(car.workspace, timeout_s=3.0)
    t0 = time.monotonic()
    x = _full(rank, 1, 40)
    late.all_reduce(x, algo=algo)
    with pytest.raises(CommTimeoutError) as info:
        late.check_errors()
    assert torch.all(torch.isnan(x)), f"a timed-out call's output passed for a sum: {x[:4]}"
    return time.monotonic() - t0, info.value.details["peer"]


@pytest.mark.parametrize("algo", ["one_shot", "lamport"])
def test_a_killed_rank_is_named_by_the_survivors_without_a_hang(algo):
    results = run_ranks(_killed_worker, 3, algo, env=INTERP, timeout=300, expect_dead={1})
    for rank in (0, 2):
        elapsed, peer = results[rank]
        assert peer == 1 and elapsed < 60, results[rank]


# ------------------------------------------------------------------ timeouts: NaN, latch, watchdog, reset
def _timeout_recovery_worker(rank, world_size, port, calls, marker):
    from sagellm_comm import CommBackend, watchdog
    from sagellm_comm.errors import CommTimeoutError

    seen = []
    watchdog.add_error_handler(lambda ws, exc: seen.append(type(exc).__name__))
    # The kernel timeout must hold through the set-up's self-test on a loaded machine (5 s: with two programs a
    # launch it held with both cores busy elsewhere), and rank 0 then waits it out once; the calls after reset()
    # get a generous one, so only the late rank ever times out.
    backend = CommBackend.create("custom", max_bytes=8192, kernel_timeout=5.0).init(
        rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=60
    )
    assert backend.custom is not None, backend.custom_reason
    x = _full(rank, 0, 16)
    if rank == 1:  # late past the kernel timeout: arrives once rank 0 has timed out waiting for it
        deadline = time.monotonic() + 240
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    backend.all_reduce(x, algo="one_shot")
    failed = False
    try:
        backend.custom.check_errors()
    except CommTimeoutError:
        failed = True
    if rank == 0:
        open(marker, "w").close()
        assert failed and torch.all(torch.isnan(x)), x
        with pytest.raises(CommTimeoutError):  # every later call raises at once
            backend.all_reduce(_full(rank, 1, 16), algo="one_shot")
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:  # the watchdog reports without being asked
            time.sleep(0.05)
        assert seen == ["CommTimeoutError"], seen
    backend.kernel_timeout = 60.0  # the workspace reset() builds waits this long
    reason = backend.reset()
    assert backend.custom is not None, reason
    wrong = 0
    for i in range(calls):
        algo = ("one_shot", "two_shot", "lamport")[i % 3]
        y = _full(rank, i, 5 + i % 7)
        backend.all_reduce(y, algo=algo)
        wrong += int(not torch.all(y == _expected(world_size, i)))
    backend.custom.check_errors()
    backend.destroy()
    return wrong


def test_timeout_gives_nan_latches_reports_and_reset_recovers(tmp_path):
    marker = str(tmp_path / "rank0-timed-out")
    # 60 calls after the reset: 20 of each algorithm, odd sizes, every Lamport buffer parity many times
    assert run_ranks(_timeout_recovery_worker, 2, 60, marker, env=INTERP, timeout=300) == [0, 0]


def _watchdog_lifetime_worker(rank, world_size, port):
    import threading

    from sagellm_comm.config import CommConfig
    from sagellm_comm.workspace import SymmetricWorkspace

    def workspace(period_ms):
        config = CommConfig.from_env().replace(watchdog_ms=period_ms)
        return SymmetricWorkspace(0, 2, 4096, [0, 0], "cpu", config=config)

    def watchdogs():
        return [t for t in threading.enumerate() if t.name == "sagellm-comm-watchdog"]

    fast, slow = workspace(1), workspace(200)
    polls = []
    failure = slow.failure
    slow.failure = lambda: polls.append(1) or failure()
    fast.close()
    time.sleep(0.5)  # the poll under way when it closed has ended
    polls.clear()
    time.sleep(1.0)
    slow_polls = len(polls)
    slow.close()
    time.sleep(0.6)
    after_close = len(watchdogs())
    again = workspace(1)
    restarted = len(watchdogs())
    again.close()
    return slow_polls, after_close, restarted


def test_the_watchdog_polls_only_for_live_workspaces_and_ends_with_the_last():
    """Closing a workspace gives its polling back: the period is the shortest of the workspaces still open (not
    of every one ever watched: a closed 1 ms workspace left the thread waking every millisecond for the life of the
    process), the thread ends when the last one closes, and the next workspace starts it again."""
    ((slow_polls, after_close, restarted),) = run_ranks(_watchdog_lifetime_worker, 1, env=INTERP, timeout=60)
    assert slow_polls <= 8 and after_close == 0 and restarted == 1, (slow_polls, after_close, restarted)


def _watchdog_closed_worker(rank, world_size, port):
    from sagellm_comm import watchdog
    from sagellm_comm.config import CommConfig
    from sagellm_comm.workspace import SymmetricWorkspace

    config = CommConfig.from_env().replace(watchdog_ms=3_600_000)  # the thread sleeps: this test polls
    first, second = (SymmetricWorkspace(0, 2, 4096, [0, 0], "cpu", config=config) for _ in range(2))
    for ws in (first, second):
        ws.error_view[:4] = [1, 1, 0, 0]  # both latched: a timeout waiting for rank 1 at the start barrier

    def close_both(ws, exc):  # a handler that tears everything down on the first failure
        first.close()
        second.close()

    watchdog.add_error_handler(close_both)
    try:
        reported = [ws is first for ws, _ in watchdog.poll_once()]
    finally:
        watchdog.remove_error_handler(close_both)
    return reported, second.async_error is None


def test_the_watchdog_does_not_report_a_workspace_closed_during_its_pass():
    """A workspace closed while the watchdog's pass is under way (by an error handler, or another thread) is not
    reported: no log, no async_error and no handler call for a workspace that is gone."""
    assert run_ranks(_watchdog_closed_worker, 1, env=INTERP, timeout=60) == [([True], True)]


def test_the_watchdog_goes_on_when_a_workspace_record_cannot_be_read(caplog):
    """A fault while reading one workspace's error record does not end the watchdog's pass (nor its thread): it
    is logged once for that workspace, and the other workspaces' failures are still reported."""
    import logging

    from sagellm_comm import watchdog
    from sagellm_comm.errors import CommTimeoutError

    class _Workspace:
        def __init__(self, failure):
            self.async_error, self._failure = None, failure

        def failure(self):
            return self._failure()

        def __repr__(self) -> str:
            return "workspace"

    def unreadable():
        raise KeyError("phase")

    broken = _Workspace(unreadable)
    timed_out = _Workspace(lambda: CommTimeoutError("rank 1 never arrived"))
    for ws in (broken, timed_out):
        watchdog.watch(ws, 3_600_000)  # the thread sleeps: this test polls
    try:
        with caplog.at_level(logging.ERROR, logger="sagellm_comm"):
            first = watchdog.poll_once()
            second = watchdog.poll_once()
        assert [(ws, str(exc)) for ws, exc in first] == [(timed_out, "[comm_timeout] rank 1 never arrived")]
        assert second == [] and broken.async_error is None
        assert caplog.text.count("reading the error record of workspace failed: KeyError('phase')") == 1
    finally:
        for ws in (broken, timed_out):
            watchdog.unwatch(ws)


def test_a_workspace_watched_while_the_thread_sleeps_a_longer_period_is_polled_at_its_own():
    """A workspace watched with a short period while the thread sleeps out a longer one (a workspace made with a
    long period first) is polled within its own period: the thread polls at the shortest period of the live
    workspaces, not at the one it had when it went to sleep."""
    from sagellm_comm import watchdog
    from sagellm_comm.errors import CommTimeoutError

    class _Workspace:
        def __init__(self, failure):
            self.async_error, self._failure = None, failure

        def failure(self):
            return self._failure()

    slow = _Workspace(lambda: None)
    fast = _Workspace(lambda: CommTimeoutError("rank 1 never arrived"))
    try:
        watchdog.watch(slow, 3_600_000)
        time.sleep(0.2)  # the thread is asleep for the hour
        watchdog.watch(fast, 20)
        deadline = time.monotonic() + 5.0
        while fast.async_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(fast.async_error, CommTimeoutError)
    finally:
        for ws in (slow, fast):
            watchdog.unwatch(ws)


def _gemm_after_close_worker(rank, world_size, port):
    from sagellm_comm.errors import NotInitializedError

    _, _, gemm = _setup(rank, world_size, port, timeout_s=10.0, gemm=True)
    a, b = torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(8, 16, dtype=torch.bfloat16)
    raised = []
    for path in ("copy_engine", "fused", "auto"):
        gemm(a, b, path=path)
    gemm.workspace.close()  # as destroy() and reset() do with the group's kernels
    for path in ("copy_engine", "fused", "auto"):
        with pytest.raises(NotInitializedError, match="closed"):
            gemm(a, b, path=path)
        raised.append(path)
    return raised


def test_a_gemm_all_reduce_whose_workspace_was_closed_raises_not_initialised():
    """The GEMM + all-reduce held after its workspace was closed (``group_gemm(g)`` kept across ``destroy()`` or
    ``reset()``) raises NotInitializedError; its copy-engine path copied from the unmapped peer regions (SIGSEGV)."""
    assert run_ranks(_gemm_after_close_worker, 2, env=INTERP, timeout=120) == [["copy_engine", "fused", "auto"]] * 2


def _reset_every_path_worker(rank, world_size, port, marker, calls):
    """2 simulated nodes x 2 ranks: the world runs hierarchically, split(2) gives one TP group per node."""
    import sagellm_comm
    from sagellm_comm.errors import CommTimeoutError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    os.environ["SAGELLM_COMM_HIER_MIN_BYTES"] = "0"
    # 5 s: the set-up's self-tests (two programs a launch) hold on a loaded machine; the fault below waits it out
    # on rank 2 twice, then on rank 3 once
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              max_bytes=16384, kernel_timeout=5.0)  # fmt: skip
    backend = world.backend
    tp = world.split(2)
    plan = backend._hierarchical[None][1]
    paths = {"tp": lambda: backend.kernels_for(tp), "node-local": lambda: backend.kernels_for(plan.local)}
    errors = []
    # The fault: rank 3 is late past the kernel timeout for a TP call and a hierarchical call.
    if rank == 3:
        deadline = time.monotonic() + 240
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        tp.all_reduce(_full(rank, 0, 16))
        world.all_reduce(_full(rank, 0, 64))
        for path in paths.values():
            path().check_errors()
    except CommTimeoutError as exc:
        errors.append(type(exc).__name__)
    if rank == 2:
        open(marker, "w").close()
    world.barrier()
    backend.kernel_timeout = 60.0  # the rebuilt workspaces wait this long: only the fault above times out
    before = {name: path().workspace for name, path in paths.items()}
    reason = backend.reset()
    rebuilt = {name: path() is not None and path().workspace is not before[name] for name, path in paths.items()}
    wrong = 0
    for i in range(calls):
        n = 5 + i % 13
        x = _full(rank, i, n)
        world.all_reduce(x)  # hierarchical: node-local kernels, Gloo between nodes
        wrong += int(backend.last_selection.algo != "hierarchical" or not torch.all(x == _expected(world_size, i)))
        y = _full(rank, i, n)
        backend.all_reduce(y, group=tp, algo=("one_shot", "two_shot", "lamport")[i % 3])
        wrong += int(not torch.all(y == _expected(2, i + 2 * (rank // 2))))
        gathered = torch.empty(2 * n)
        backend.all_gather(gathered, _full(rank, i, n), group=tp)
        first = 2 * (rank // 2)
        wrong += int(not torch.equal(gathered, torch.cat([_full(first, i, n), _full(first + 1, i, n)])))
    for path in paths.values():
        path().check_errors()
    sagellm_comm.destroy()
    return errors, reason, rebuilt, wrong


def test_reset_recovers_the_hierarchical_and_sub_group_paths(tmp_path):
    """After a late rank latched node 1's workspaces, reset() on every rank rebuilds every path it serves (the
    world's node-local groups, the TP groups) and every later call is exact (1,000 calls of each path: the GPU
    test in test_hardening_gpu.py)."""
    per_rank = run_ranks(_reset_every_path_worker, 4, str(tmp_path / "m"), 8, env=INTERP, timeout=540)
    assert per_rank[2][0] == ["CommTimeoutError"] and per_rank[3][0] == ["CommTimeoutError"], per_rank
    for rank, (_, reason, rebuilt, wrong) in enumerate(per_rank):
        assert wrong == 0 and all(rebuilt.values()), (rank, rebuilt, wrong)
        node = [0, 1] if rank < 2 else [2, 3]
        assert f"node-local group {node} of the hierarchical all-reduce of the world: custom kernels" in reason, reason
        assert f"group {node}: custom kernels on 2 ranks" in reason, reason


def _reset_with_a_rank_gone_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import CommError

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=30,
                              max_bytes=8192, kernel_timeout=10.0)  # fmt: skip
    backend = world.backend
    pair = world.new_subgroup([0, 1])
    x = _full(rank, 0, 16)
    world.all_reduce(x)
    assert torch.all(x == _expected(world_size, 0))
    world.barrier()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # gone for good
    time.sleep(1.0)  # its connections are closed by now
    reason = backend.reset()
    y = _full(rank, 1, 16)
    pair.all_reduce(y)  # the group without the dead rank recovered
    pair_ok = bool(torch.all(y == _expected(2, 1))) and backend.kernels_for(pair) is not None
    try:
        world.all_reduce(_full(rank, 2, 16))
        world_call = "no error"
    except CommError as exc:
        world_call = type(exc).__name__
    return reason, pair_ok, world_call, backend.custom is None


def test_reset_with_a_rank_gone_says_what_will_not_work():
    results = run_ranks(_reset_with_a_rank_gone_worker, 3, env=INTERP, timeout=300, expect_dead={2})
    for rank in (0, 1):
        reason, pair_ok, world_call, world_on_engine = results[rank]
        assert pair_ok and world_on_engine and world_call != "no error", results[rank]
        world_reason = reason.split("; group")[0]
        assert "did not answer" in world_reason and "will fail with a typed error" in world_reason, reason
        assert "group [0, 1]: custom kernels on 2 ranks" in reason, reason


# ------------------------------------------------------------------------ payloads and world sizes
def _payload_worker(rank, world_size, port):
    car, _, _ = _setup(rank, world_size, port)
    specials = torch.tensor([-0.0, float("nan"), float("inf"), float("-inf"), 1.5, -0.0, 0.0, float("inf")])
    per_rank = [specials.roll(r) for r in range(world_size)]
    out = {}
    for name, dtype in DTYPES.items():
        x = per_rank[rank].to(dtype).clone()
        car.all_reduce(x, algo="lamport")
        car.check_errors()
        acc = torch.zeros(len(specials))
        for t in per_rank:
            acc += t.to(dtype).float()
        out[name] = (x.float().tolist(), acc.to(dtype).float().tolist())
    return out


def test_lamport_special_payloads_in_every_dtype():
    for per_rank in run_ranks(_payload_worker, 2, env=INTERP, timeout=300):
        for name, (got, want) in per_rank.items():
            torch.testing.assert_close(
                torch.tensor(got), torch.tensor(want), equal_nan=True, msg=f"{name}: {got} vs {want}"
            )
            assert [str(v) for v in got] == [str(v) for v in want], (name, got, want)  # -0.0 vs 0.0 too


def _odd_world_worker(rank, world_size, port):
    car, _, _ = _setup(rank, world_size, port)
    ok = []
    for i, algo in enumerate(("one_shot", "two_shot", "lamport")):
        for numel in (1, 13, 3 * world_size + 1):
            x = _full(rank, i, numel, torch.bfloat16)
            car.all_reduce(x, algo=algo)
            ok.append(bool(torch.all(x.float() == _expected(world_size, i))))
    car.check_errors()
    return ok


@pytest.mark.parametrize("world_size", [3, *(pytest.param(n, marks=pytest.mark.slow) for n in (5, 6, 7))])
def test_world_sizes_that_are_not_powers_of_two(world_size):
    for per_rank in run_ranks(_odd_world_worker, world_size, env=INTERP, timeout=540):
        assert all(per_rank)
