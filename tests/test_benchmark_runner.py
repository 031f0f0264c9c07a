"""The benchmark's runner: algo rules, launch planning, cross-rank reduction, the Python API."""

from __future__ import annotations

import re
import time

import pytest
import torch
from conftest import HAS_CUDA, run_ranks

from sagellm_comm.benchmark import BenchConfig, run_all_reduce_benchmark, run_benchmark
from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.ops import rank_pattern
from sagellm_comm.benchmark.runner import LaunchPlan, plan_launch, run_rank
from sagellm_comm.errors import InvalidArgumentError

# ------------------------------------------------------------------------------------------ algo rules


def test_parse_algos():
    assert algo_rules.parse_algos(None) == ["auto"]
    assert algo_rules.parse_algos(["one_shot,two_shot", "nccl", "one_shot"]) == ["one_shot", "two_shot", "nccl"]
    with pytest.raises(InvalidArgumentError, match="unknown algo 'fast'"):
        algo_rules.parse_algos("fast")


@pytest.mark.parametrize(
    ("algos", "kind", "op", "virtual"),
    [
        (["auto"], "gloo", "all_reduce", False),
        (["auto", "one_shot", "two_shot", "nccl"], "custom", "all_reduce", False),
        (["one_shot", "two_shot", "ring"], "custom", "all_reduce", False),
        (["tree"], "nccl", "all_reduce", False),
        (["ring"], "nccl", "all_gather", False),
        (["auto", "one_shot", "two_shot"], "custom", "all_reduce", True),
    ],
)
def test_check_algos_accepts(algos, kind, op, virtual):
    algo_rules.check_algos(algos, kind, op, virtual)


@pytest.mark.parametrize(
    ("algos", "kind", "op", "virtual", "message"),
    [
        (["one_shot"], "gloo", "all_reduce", False, "custom-kernel algorithm"),
        (["nccl"], "gloo", "all_reduce", False, "runs its own algorithm"),
        (["one_shot"], "nccl", "all_reduce", False, "use --backend custom"),
        (["tree"], "nccl", "reduce_scatter", False, "Tree for all_reduce only"),
        (["one_shot"], "custom", "all_gather", False, "has no custom kernel"),
        (["ring", "tree"], "nccl", "all_reduce", False, "NCCL_ALGO once per communicator"),
        (["auto", "ring"], "nccl", "all_reduce", False, "NCCL_ALGO once per communicator"),
        (["nccl", "tree"], "custom", "all_reduce", False, "NCCL_ALGO once per communicator"),
        (["nccl"], "custom", "all_reduce", True, "needs NCCL"),
        (["auto"], "custom", "broadcast", True, "custom all-reduce only"),
    ],
)
def test_check_algos_rejects(algos, kind, op, virtual, message):
    with pytest.raises(InvalidArgumentError, match=message):
        algo_rules.check_algos(algos, kind, op, virtual)


def test_nccl_algo_env_is_set_and_never_silently_overridden(monkeypatch):
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    assert algo_rules.nccl_run_label()[0] == "nccl"
    algo_rules.apply_nccl_algo_env(["one_shot", "tree"])
    assert algo_rules.nccl_run_label() == (
        "tree",
        "nccl-algo-env",
        "NCCL_ALGO=Tree set before the communicator was created",
    )
    with pytest.raises(InvalidArgumentError, match="NCCL_ALGO=Tree is set"):
        algo_rules.apply_nccl_algo_env(["ring"])
    monkeypatch.setenv("NCCL_ALGO", "Ring,Tree")  # a user's own setting is recorded as it is
    assert algo_rules.nccl_run_label()[0] == "nccl"
    assert "Ring,Tree" in algo_rules.nccl_run_label()[2]


# ------------------------------------------------------------------------------------------ planning


def test_plan_spawn_defaults_without_gpu(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    plan = plan_launch(BenchConfig(backend="gloo"))
    assert plan.mode == "spawn" and plan.world_size == 2 and plan.backend_kind == "gloo"
    assert plan.sizes[0] == 1024 and plan.sizes[-1] == 1 << 20


def test_plan_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    plan = plan_launch(BenchConfig(backend="gloo", sizes=[64]))
    assert (plan.mode, plan.world_size, plan.sizes) == ("torchrun", 3, (64,))
    with pytest.raises(InvalidArgumentError, match="--virtual-ranks"):
        plan_launch(BenchConfig(virtual_ranks=2))


def test_plan_torchrun_on_cpu_counts_every_rank_of_the_host_against_its_memory(monkeypatch):
    """The ranks torchrun starts on one host share its memory, as spawned ones do (a torchrun run was checked as if
    it had one rank); the overlap benchmark's plan counts them the same way."""
    from sagellm_comm.benchmark import plan
    from sagellm_comm.benchmark.overlap_plan import plan_overlap
    from sagellm_comm.benchmark.overlap_results import OverlapConfig

    monkeypatch.setattr(plan, "memory_bytes", lambda uses_cuda: 3 << 20)  # a host of 3 MiB
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(InvalidArgumentError, match=r"cannot fit: 4 ranks x 1M is more than this host's"):
        plan_launch(BenchConfig(backend="gloo", sizes=[1 << 20], output_dir=None))
    with pytest.raises(InvalidArgumentError, match=r"cannot fit: 4 ranks x 1M is more than this host's"):
        plan_overlap(OverlapConfig(backend="gloo", comm_sizes=[1 << 20], output_dir=None))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts of two ranks: 2 MiB each
    assert plan_launch(BenchConfig(backend="gloo", sizes=[1 << 20], output_dir=None)).mode == "torchrun"
    assert plan_overlap(OverlapConfig(backend="gloo", comm_sizes=[1 << 20], output_dir=None)).mode == "torchrun"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # not torchrun's: every rank may be on this host
    with pytest.raises(InvalidArgumentError, match=r"4 ranks x 1M"):
        plan_launch(BenchConfig(backend="gloo", sizes=[1 << 20], output_dir=None))


def test_plan_on_a_given_cpu_backend_under_torchrun_counts_the_hosts_ranks_against_its_memory(monkeypatch):
    """``run_benchmark(backend=...)`` and ``run_overlap_benchmark(backend=...)`` on a CPU backend under torchrun: every
    rank of the host calls and holds its buffers in the host's memory, as on the launch paths (checked as one rank,
    a size the host's ranks cannot hold together passed, and the run ran out of memory).  Without torchrun's
    ``LOCAL_WORLD_SIZE`` nothing says where the other ranks run: one rank is counted, as before."""
    from sagellm_comm.benchmark import plan
    from sagellm_comm.benchmark.overlap_plan import plan_overlap_in_process
    from sagellm_comm.benchmark.overlap_results import OverlapConfig

    class _GivenBackend:
        name, is_initialized, rank, world_size, device = "gloo", True, 1, 4, torch.device("cpu")

    backend = _GivenBackend()
    monkeypatch.setattr(plan, "memory_bytes", lambda uses_cuda: 3 << 20)  # a host of 3 MiB
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    bench = BenchConfig(backend="instance", sizes=[1 << 20], output_dir=None)
    overlap = OverlapConfig(backend="instance", comm_sizes=[1 << 20], output_dir=None)
    with pytest.raises(InvalidArgumentError, match=r"cannot fit: 4 ranks x 1M is more than this host's"):
        plan.plan_in_process(bench, backend)
    with pytest.raises(InvalidArgumentError, match=r"cannot fit: 4 ranks x 1M is more than this host's"):
        plan_overlap_in_process(overlap, backend)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts of two ranks: 2 MiB each
    assert plan.plan_in_process(bench, backend).mode == "in_process"
    assert plan_overlap_in_process(overlap, backend).mode == "in_process"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key)
    assert plan.plan_in_process(bench, backend).mode == "in_process"
    assert plan_overlap_in_process(overlap, backend).mode == "in_process"


@pytest.mark.skipif(HAS_CUDA, reason="checks CPU-only refusals")
def test_plan_refuses_gpu_only_requests_without_gpu(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(InvalidArgumentError, match="--graph"):
        plan_launch(BenchConfig(graph=True))
    with pytest.raises(InvalidArgumentError, match="needs a CUDA GPU"):
        plan_launch(BenchConfig(virtual_ranks=2))


# ------------------------------------------------------------------------------- cross-rank reduction


class _SlowBrokenBackend:
    """A real Gloo backend whose all_reduce does nothing and costs rank 1 an extra 20 ms.

    The call never communicates, so rank 1's delay cannot leak into rank 0's samples: only the
    cross-rank MAX can make rank 0 report it.  The data stay unreduced, so every element whose peer
    contribution is non-zero must be counted wrong.
    """

    def __init__(self, backend, delay_s):
        self._backend = backend
        self._delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def all_reduce(self, tensor, *args, **kwargs):
        if self._backend.rank == 1:
            time.sleep(self._delay_s)
        return tensor


def _slow_rank_child(rank, world_size, port):
    from sagellm_comm.backend import get_comm_backend

    backend = get_comm_backend("gloo").init()  # torchrun's environment from the spawn helper
    try:
        wrapped = _SlowBrokenBackend(backend, 0.02)
        config = BenchConfig(backend="gloo", sizes=[4096], warmup=1, iters=3, progress=False, output_dir=None)
        plan = LaunchPlan("in_process", world_size, "gloo", (4096,), False)
        result = run_rank(config, plan, backend=wrapped)
        rec = result.records[0]
        return rec.latency_ms, rec.latency_min_ms, rec.num_wrong, rec.algo_id, rec.backend_kind
    finally:
        backend.destroy()


def test_slowest_rank_and_wrong_elements_are_reduced_across_ranks():
    results = run_ranks(_slow_rank_child, 2, timeout=90)
    assert results[0] == results[1]  # every rank reports the same reduced point
    median_ms, min_ms, wrong, algo_id, kind = results[0]
    assert median_ms >= 20.0 and min_ms >= 20.0  # rank 1's 20 ms, though rank 0 itself was fast
    count = 4096 // 4
    # rank r keeps its own pattern; an element is right only where the other rank contributes 0
    expected_wrong = sum(int((rank_pattern(count, 1 - r, torch.float64, "cpu") != 0).sum()) for r in range(2))
    assert wrong == expected_wrong > 0
    assert (algo_id, kind) == ("gloo", "gloo")


def _torchrun_child(rank, world_size, port, output_dir):
    config = BenchConfig(
        backend="gloo", op="reduce_scatter", sizes=[96, 3072], warmup=1, iters=2, progress=False, output_dir=output_dir
    )
    result = run_benchmark(config)
    return None if result is None else [(r.bytes, r.num_wrong, r.launch_mode, r.world_size) for r in result.records]


def test_torchrun_mode_rank0_reports(tmp_path):
    results = run_ranks(_torchrun_child, 3, str(tmp_path), timeout=90)
    assert results[1] is None and results[2] is None
    assert results[0] == [(96, 0, "torchrun", 3), (3072, 0, "torchrun", 3)]
    assert len(list(tmp_path.glob("reduce_scatter_ws3_*.json"))) == 1


# ------------------------------------------------------------------------------------------ Python API


def test_run_all_reduce_benchmark_with_an_initialised_backend(tmp_path, monkeypatch):
    from sagellm_comm.backend import get_comm_backend

    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    backend = get_comm_backend("gloo").init(rank=0, world_size=1)
    try:
        result = run_all_reduce_benchmark(
            backend=backend, message_sizes=["1K", 4096], output_dir=str(tmp_path), warmup_iters=1, benchmark_iters=3
        )
        # the sizes are checked as on the launch paths (were measured twice, or rounded to whole elements)
        for sizes, words in (
            (["1K", 1024], "message size 1024 B is given twice"),
            ([6], "not a whole number"),
            ([1024.7], r"message size must be an int, got 1024\.7"),  # not rounded to 1024
            ([], "the message size list is empty"),  # was taken for the default sizes
        ):
            with pytest.raises(InvalidArgumentError, match=words):
                run_all_reduce_benchmark(backend=backend, message_sizes=sizes, output_dir=str(tmp_path))
    finally:
        backend.destroy()
    assert result is not None and result.ok
    assert [r.bytes for r in result.records] == [1024, 4096]
    assert all(r.world_size == 1 and r.bus_bandwidth_gbps == 0.0 and r.num_wrong == 0 for r in result.records)
    assert result.json_path.name.startswith("all_reduce_ws1_") and result.json_path.exists()
    assert result.info.launch_mode == "in_process"


def test_an_empty_size_list_is_refused_on_the_launch_paths(monkeypatch):
    """message_sizes=[] from Python ran the default sizes; None asks for them."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(InvalidArgumentError, match="the message size list is empty"):
        run_all_reduce_benchmark(backend="gloo", message_sizes=[], output_dir=None, world_size=2)
    with pytest.raises(InvalidArgumentError, match="the message size list is empty"):
        plan_launch(BenchConfig(backend="gloo", sizes=[], output_dir=None))
    assert plan_launch(BenchConfig(backend="gloo", sizes=None, output_dir=None)).sizes[0] == 1024


class _FailingBackend:
    """A real Gloo backend whose all_reduce fails every call (a link that went down)."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def all_reduce(self, tensor, *args, **kwargs):
        raise RuntimeError("connection reset by peer")


def test_a_run_where_no_point_ran_reports_its_failures_and_draws_no_plot(tmp_path, monkeypatch, capsys):
    """Was InvalidArgumentError('nothing to plot') after the files were written: the CLI's exit 2 (a usage
    error) for a run that failed, and no table saying why."""
    from sagellm_comm.backend import get_comm_backend

    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    backend = get_comm_backend("gloo").init(rank=0, world_size=1)
    try:
        result = run_all_reduce_benchmark(
            backend=_FailingBackend(backend),
            message_sizes=[1024],
            output_dir=str(tmp_path / "out"),
            warmup_iters=0,
            benchmark_iters=1,
            plot=str(tmp_path / "plot.png"),
            print_table=True,
        )
    finally:
        backend.destroy()
    assert result is not None and not result.ok and result.records == []
    assert [(s["bytes"], "connection reset by peer" in s["reason"]) for s in result.info.skipped] == [(1024, True)]
    assert result.plot_path is None and not (tmp_path / "plot.png").exists() and result.json_path.exists()
    out = capsys.readouterr().out
    assert "# skipped auto at 1024 B: RuntimeError: connection reset by peer" in out
    assert f"# no plot written to {tmp_path / 'plot.png'}: no point ran" in out


class _CountingBackend:
    """A real Gloo backend that counts its all_reduce calls (``calls``)."""

    def __init__(self, backend):
        self._backend = backend
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def all_reduce(self, tensor, *args, **kwargs):
        self.calls += 1
        return self._backend.all_reduce(tensor, *args, **kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"iters": 0}, r"--iters must be in 1\.\.10000000, got 0"),
        ({"warmup": -1}, r"--warmup must be in 0\.\.10000000, got -1"),
        ({"timeout": -1.0}, "--timeout must be positive and finite"),
        ({"graph_calls": 0}, "--graph-calls must be >= 1, got 0"),
        ({"graph_calls": 3}, "--graph-calls 3 applies to --graph runs only"),
        ({"world_size": 0}, "--world-size must be >= 1, got 0"),
        ({"op": "all_to_all"}, "unknown op 'all_to_all'"),
        ({"dtype": "complex64"}, "complex64"),
        ({"zero_copy": True}, "--zero-copy applies to --virtual-ranks runs only"),
        ({"virtual_mode": "streams"}, "--virtual-mode streams applies to --virtual-ranks runs only"),
        ({"selector_config": "/nonexistent/policy.json"}, "--selector-config /nonexistent/policy.json: no such file"),
        ({"output_dir": "/proc/sagellm-comm-results"}, "--output-dir /proc/sagellm-comm-results: cannot create"),
        ({"plot": "results.nope"}, "--plot results.nope: '.nope' is not a format matplotlib writes"),
        ({"sizes": [0]}, "message size must be >= 1, got 0"),
        ({"sizes": [1024, -4]}, "message size must be >= 1, got -4"),
        ({"sizes": [1024.0]}, r"message size must be an int, got 1024\.0"),
        ({"iters": 2.5}, r"--iters must be an int, got 2\.5"),
        ({"warmup": True}, "--warmup must be an int, got True"),
        ({"graph_calls": 2.5}, r"--graph-calls must be an int, got 2\.5"),
        ({"world_size": 1.5}, r"--world-size must be an int, got 1\.5"),
    ],
)
def test_a_run_on_a_given_backend_is_checked_as_a_launched_run_is(monkeypatch, change, message):
    """run_benchmark(backend=...) refuses what plan_launch refuses, with the same message, before measuring."""
    if "plot" in change:
        pytest.importorskip("matplotlib")
    config = _request_outside_a_launch(monkeypatch, change)
    with pytest.raises(InvalidArgumentError, match=message):
        plan_launch(config)
    _refused_on_a_given_backend(config, message)


def _request_outside_a_launch(monkeypatch, change: dict) -> BenchConfig:
    """A one-rank Gloo request with ``change`` applied, in a process no launcher started."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    request = {"backend": "gloo", "sizes": [1024], "warmup": 1, "iters": 2, "progress": False, "output_dir": None}
    return BenchConfig(**{**request, **change})


def _refused_on_a_given_backend(config: BenchConfig, message: str) -> None:
    """run_benchmark(config, backend=...) raises ``message`` before any collective call."""
    from sagellm_comm.backend import get_comm_backend

    backend = _CountingBackend(get_comm_backend("gloo").init(rank=0, world_size=1))
    try:
        with pytest.raises(InvalidArgumentError, match=message):
            run_benchmark(config, backend=backend)
    finally:
        backend.destroy()
    assert backend.calls == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"world_size": 2}, "world_size 2 disagrees with the given backend's world of 1 rank"),
        ({"virtual_ranks": 2}, "virtual_ranks runs ranks of its own; it does not take a backend"),
        ({"selector_config": __file__}, "--selector-config applies to a backend the benchmark makes"),
    ],
)
def test_a_given_backend_refuses_what_does_not_apply_to_it(monkeypatch, change, message):
    _refused_on_a_given_backend(_request_outside_a_launch(monkeypatch, change), message)


def test_the_commit_recorded_is_the_one_the_run_started_from(monkeypatch):
    """A commit made while the ranks measure (a long sweep) is not the code that ran: the record names the tree the
    run started from, and its dirty flag then."""
    from sagellm_comm.backend import get_comm_backend
    from sagellm_comm.benchmark import provenance

    before, after = "a" * 40, "b" * 40
    head = [before]

    def git(*args, cwd):
        if args == ("rev-parse", "--show-toplevel"):
            return f"{provenance.SOURCE_TREE}\n"
        if args == ("rev-parse", "HEAD"):
            return head[0] + "\n"
        return "" if head[0] == before else " M sagellm_comm/ops.py\n"  # git status

    class CommitDuringTheRun(_CountingBackend):
        def all_reduce(self, tensor, *args, **kwargs):
            head[0] = after
            return super().all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(provenance, "_git", git)
    config = _request_outside_a_launch(monkeypatch, {})
    backend = CommitDuringTheRun(get_comm_backend("gloo").init(rank=0, world_size=1))
    try:
        result = run_benchmark(config, backend=backend)
    finally:
        backend.destroy()
    assert backend.calls > 0 and head[0] == after
    assert (result.info.git_commit, result.info.git_dirty) == (before, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"rules": []}', "at least one rule"),
        ('{"rules": [{"id": "r", "algo": "fastest"}]}', "algo must be one of"),
    ],
)
def test_a_malformed_selector_file_is_refused_before_any_process_starts(tmp_path, monkeypatch, text, message):
    """The custom backend's policy file is read in every rank: one it cannot read fails there (a traceback of each
    rank, exit 1), so the plan reads it first."""
    from sagellm_comm.benchmark import plan as planning

    policy = tmp_path / "policy.json"
    policy.write_text(text)
    monkeypatch.setattr(planning, "available_kind", lambda name: "custom")  # a machine that runs the custom backend
    config = _request_outside_a_launch(monkeypatch, {"backend": "custom", "selector_config": str(policy)})
    with pytest.raises(InvalidArgumentError, match=f"--selector-config {re.escape(str(policy))}:? .*{message}"):
        plan_launch(config)


def test_run_all_reduce_benchmark_spawns_gloo(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    result = run_all_reduce_benchmark(
        backend="gloo", message_sizes="1K:4K", output_dir=None, warmup_iters=1, benchmark_iters=2, world_size=2
    )
    assert result.json_path is None and result.ok
    assert [(r.bytes, r.backend_kind, r.world_size) for r in result.records] == [
        (1024, "gloo", 2),
        (2048, "gloo", 2),
        (4096, "gloo", 2),
    ]
    assert "Out of bounds values : 0 OK" in result.table


def _rank1_never_ends(rank, world_size, port, pid_dir):
    """Rank 0 returns at once; rank 1 writes its pid, then never returns (a rank hung outside any collective, which
    no collective timeout bounds: in its backend's destroy, say)."""
    import os
    from pathlib import Path

    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    while rank == 1:
        time.sleep(0.1)
    return "rank 0's result"


def test_a_rank_that_never_ends_once_another_has_is_stopped_and_fails_the_run(tmp_path):
    import os

    from sagellm_comm.benchmark.spawn import spawn_ranks
    from sagellm_comm.errors import CollectiveFailedError

    start = time.monotonic()
    with pytest.raises(CollectiveFailedError, match=r"rank 1 of the benchmark did not end within 2s") as caught:
        spawn_ranks(_rank1_never_ends, (str(tmp_path),), 2, timeout=2)
    assert time.monotonic() - start < 120  # was: waited for it forever
    assert "\n" not in str(caught.value)
    for path in tmp_path.glob("*.pid"):  # no rank outlives the call
        pid = int(path.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class _Unkillable:
    """A rank that survives SIGKILL (stuck in an uninterruptible call): alive whatever is sent to it."""

    pid = 4242
    exitcode = None

    def __init__(self):
        self.joins = []

    def is_alive(self):
        return True

    def terminate(self):
        pass

    def kill(self):
        pass

    def join(self, timeout=None):
        assert timeout is not None, "an unbounded join of a rank that never exits"
        self.joins.append(timeout)


def test_stopping_a_rank_that_survives_sigkill_is_bounded_and_names_it():
    from sagellm_comm.benchmark.spawn import stop
    from sagellm_comm.errors import CollectiveFailedError

    process = _Unkillable()
    with pytest.raises(CollectiveFailedError, match=r"rank 0 \(pid 4242\) did not exit within 5s of SIGKILL"):
        stop([process], grace_s=0.25)
    assert process.joins == [0.25, 5.0]


def test_the_overlap_and_transfer_benchmarks_bound_their_ranks_ends_by_the_runs_timeout(monkeypatch):
    """Both start their ranks with the run's ``--timeout`` as the bound on a rank that outlives another."""
    from sagellm_comm.benchmark import run_overlap_bench, run_transfer_bench, spawn
    from sagellm_comm.benchmark.transfer_config import TransferBenchConfig

    seen = []

    class Stop(Exception):
        pass

    def fake_spawn(fn, args, world_size, what="benchmark", *, timeout=None):
        seen.append((what, timeout))
        raise Stop

    monkeypatch.setattr(run_overlap_bench, "spawn_ranks", fake_spawn)
    monkeypatch.setattr(spawn, "spawn_ranks", fake_spawn)
    with pytest.raises(Stop):
        run_overlap_bench.run_overlap_benchmark("gloo", "4K", world_size=2, timeout=17.0, output_dir=None)
    with pytest.raises(Stop):
        run_transfer_bench.run_transfer_benchmark(
            TransferBenchConfig(backends=["nixl"], device="cpu", block_sizes=[4096], block_counts=[1], timeout=19.0)
        )
    assert seen == [("overlap benchmark", 17.0), ("transfer benchmark", 19.0)]


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_virtual_ranks_graph_plot(tmp_path):
    """Virtual ranks on one GPU, timed under CUDA-graph replay, two algos side by side, with a plot."""
    from sagellm_comm.benchmark.config import DEFAULT_GRAPH_CALLS

    for mode in ("stacked",):  # streams + --graph is refused (test_cli: the rank streams' kernels can serialise)
        plot = tmp_path / f"virtual_{mode}.png"
        result = run_all_reduce_benchmark(
            message_sizes="1K:256K",
            output_dir=str(tmp_path / mode),
            warmup_iters=3,
            benchmark_iters=10,
            algos=("one_shot", "two_shot", "auto"),
            dtype="bfloat16",
            virtual_ranks=2,
            virtual_mode=mode,
            graph=True,
            plot=str(plot),
        )
        assert result.ok, result.info.skipped
        calls = DEFAULT_GRAPH_CALLS  # the timed graph holds this many back-to-back calls (the record says so)
        assert result.info.timing_method == "cuda_graph_replay+cuda_events" + (
            f" ({calls} calls per graph)" if calls > 1 else ""
        )
        assert result.info.launch_mode == f"virtual_{mode}"
        assert {r.algo_requested for r in result.records} == {"one_shot", "two_shot", "auto"}
        # auto resolves to what ran (the default policy picks lamport for small messages on 2 ranks)
        assert all(r.algo_id in ("one_shot", "two_shot", "lamport") for r in result.records)
        assert all(r.algo_id == r.algo_requested for r in result.records if r.algo_requested != "auto")
        assert any(r.algo_requested == "auto" and r.algo_id == "lamport" for r in result.records)
        assert all(r.ratio_vs_first is not None and r.latency_ms > 0 for r in result.records)
        assert plot.read_bytes()[:4] == b"\x89PNG"
