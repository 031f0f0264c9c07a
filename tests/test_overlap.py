"""Async all-reduce handles and the overlap benchmark (Gloo on CPU; CUDA parts marked gpu)."""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
import torch

from sagellm_comm.benchmark.run_overlap_bench import OVERLAP_FIELDS, derive, main, run_overlap_benchmark
from sagellm_comm.errors import InvalidArgumentError
from tests.conftest import HAS_CUDA, run_ranks

# ---------------------------------------------------------------------------------------------- handles


def _handle_worker(rank: int, world_size: int, port: int, submitted_path: str, computed_path: str) -> dict:
    import sagellm_comm
    from sagellm_comm import ops
    from sagellm_comm.errors import GroupNotFoundError, InvalidArgumentError
    from sagellm_comm.overlap import AsyncAllReduce, all_reduce_async

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    seen: dict = {}
    try:
        # The handle comes back before the peer has even started: rank 1 joins once rank 0 has looked at it.
        x = torch.full((1000,), float(rank + 1))
        if rank == 1:
            _wait_for(submitted_path)
        handle = all_reduce_async(x, world)
        assert isinstance(handle, AsyncAllReduce) and handle.stream is None
        seen["pending_after_submit"] = not handle.is_completed()
        if rank == 0:
            open(submitted_path, "w").close()
        assert handle.wait() is x
        assert handle.is_completed() and handle.wait() is x  # waiting twice is fine
        torch.testing.assert_close(x, torch.full((1000,), 3.0))

        # Work overlapped with the pending all-reduce: rank 1 submits only once rank 0 has computed, so
        # rank 0's matmul surely runs while the all-reduce is pending; it matches a float64 reference.
        y = torch.arange(4096, dtype=torch.float32) * (rank + 1)
        ops.register_group(world, "w")
        a = torch.randn(64, 64, generator=torch.Generator().manual_seed(rank))
        expected = (a.double() @ a.double()).float()
        if rank == 1:
            _wait_for(computed_path)
        handle = all_reduce_async(y, "w", op="max")
        product = a @ a
        seen["pending_during_compute"] = not handle.is_completed()
        if rank == 0:
            open(computed_path, "w").close()
        torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(handle.wait(), torch.arange(4096, dtype=torch.float32) * 2)
        z = torch.ones(3)
        sagellm_comm.overlap.all_reduce_async(z).wait()  # group=None: the default group
        torch.testing.assert_close(z, torch.full((3,), 2.0))

        with pytest.raises(InvalidArgumentError, match="must be a torch.Tensor"):
            all_reduce_async([1.0], world)
        with pytest.raises(InvalidArgumentError, match="stream= is for CUDA tensors"):
            all_reduce_async(torch.ones(2), world, stream=object())
        with pytest.raises(GroupNotFoundError, match="no group is registered as 'nope'"):
            all_reduce_async(torch.ones(2), "nope")
        with pytest.raises(InvalidArgumentError, match="group must be a CommGroup"):
            all_reduce_async(torch.ones(2), 3)
        return seen
    finally:
        sagellm_comm.destroy()


def _wait_for(path: str, limit_s: float = 60.0) -> None:
    """Until the peer creates ``path``; bounded (the peer's own checks then fail the test)."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_async_all_reduce_handle_on_gloo(tmp_path) -> None:
    seen = run_ranks(_handle_worker, 2, str(tmp_path / "submitted"), str(tmp_path / "computed"), timeout=150.0)
    assert seen[0]["pending_after_submit"]  # rank 0 submitted while rank 1 was still asleep
    assert seen[0]["pending_during_compute"]  # rank 0's matmul overlapped the all-reduce rank 1 had not joined


def _timeout_worker(rank: int, world_size: int, port: int, done_path: str) -> str:
    import sagellm_comm
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.overlap import all_reduce_async

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    if rank == 1:  # never joins; stays alive (a closed connection would be another error) until rank 0 is done
        _wait_for(done_path)
        return "absent"
    handle = all_reduce_async(torch.ones(4), world)
    try:
        with pytest.raises(CommTimeoutError) as info:
            handle.wait(timeout=0.3)
    finally:
        open(done_path, "w").close()
    return info.value.code.value  # no destroy: the group is undefined after a timeout (the helper exits)


def test_async_wait_is_bounded_by_timeout(tmp_path) -> None:
    assert run_ranks(_timeout_worker, 2, str(tmp_path / "rank0-done"), timeout=60.0)[0] == "comm_timeout"


class _StalledEvent:
    """A CUDA event its stream never reaches (a stalled GPU)."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        raise AssertionError("the host waited for the device with no deadline")


@pytest.mark.parametrize("given", [None, 0.1])
def test_synchronize_on_cuda_is_bounded_by_a_timeout(given) -> None:
    """``synchronize()`` of a CUDA handle polls its event until a deadline (the handle's timeout, the backend's, when
    none is given) and raises ``comm_timeout`` past it, instead of blocking the host for good."""
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.overlap import AsyncAllReduce

    handle = AsyncAllReduce(torch.zeros(4), event=_StalledEvent(), timeout=0.2)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match=f"did not complete within {0.2 if given is None else given:g}s"):
        handle.synchronize(given)
    assert time.monotonic() - start < 5


class _EventDoneAfter:
    """A CUDA event the device reaches after ``n`` queries."""

    def __init__(self, n: int):
        self.left = n

    def query(self) -> bool:
        self.left -= 1
        return self.left <= 0


def test_synchronize_polls_without_sleeping_while_the_all_reduce_ends_in_microseconds(monkeypatch) -> None:
    """An all-reduce that ends within the first milliseconds is seen at once: the host polls without a pause
    first (a 0.2 ms sleep per poll would add up to 0.2 ms to each synchronize), and sleeps between polls after."""
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.overlap import AsyncAllReduce

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert AsyncAllReduce(torch.zeros(4), event=_EventDoneAfter(50), timeout=5.0).synchronize() is not None
    assert slept == []
    monkeypatch.undo()
    handle = AsyncAllReduce(torch.zeros(4), event=_StalledEvent(), timeout=0.05)
    monkeypatch.setattr(time, "sleep", slept.append)
    with pytest.raises(CommTimeoutError):
        handle.synchronize()
    assert slept and set(slept) == {0.0002}  # past the first 2 ms: a pause between polls


class _ReportsCuda0(torch.Tensor):
    """A CPU tensor that says it is on cuda:0: what all_reduce_async checks before it touches a stream."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def test_async_all_reduce_refuses_a_stream_of_another_device() -> None:
    # The side stream forked from (and recorded its event on) its own device, while the all-reduce ran on the
    # tensor's: nothing overlapped and synchronize() returned without waiting for the all-reduce.
    from types import SimpleNamespace

    import sagellm_comm
    from sagellm_comm.overlap import all_reduce_async

    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo")
    try:
        tensor = torch.ones(4).as_subclass(_ReportsCuda0)
        assert tensor.device == torch.device("cuda", 0)
        stream = SimpleNamespace(device=torch.device("cuda", 1))  # a stream made while cuda:1 was current
        with pytest.raises(InvalidArgumentError, match=r"stream= is on cuda:1, the tensor on cuda:0"):
            all_reduce_async(tensor, world, stream=stream)
        for not_a_stream in (0, True, "cuda:0"):  # an AttributeError ('int' object has no attribute 'device')
            with pytest.raises(InvalidArgumentError, match="stream= must be a torch.cuda.Stream"):
                all_reduce_async(tensor, world, stream=not_a_stream)
    finally:
        sagellm_comm.destroy()


def test_comm_stream_refuses_what_is_not_a_cuda_device() -> None:
    """torch's untyped errors leaked: ValueError for "cpu", RuntimeError ("requires CUDA support") without CUDA,
    and True was read as device 1."""
    from sagellm_comm.errors import BackendNotSupportedError, CommError
    from sagellm_comm.overlap import comm_stream

    for device, match in (("cpu", "a CUDA stream; got device 'cpu'"), (True, "must be a torch.device")):
        with pytest.raises(InvalidArgumentError, match=match):
            comm_stream(device)
    with pytest.raises(CommError):  # no such GPU (InvalidArgumentError), or no CUDA at all
        comm_stream("cuda:99")
    if not HAS_CUDA:
        for device in (None, 0, "cuda"):
            with pytest.raises(BackendNotSupportedError, match="no CUDA device"):
                comm_stream(device)


# ---------------------------------------------------------------------------------------------- benchmark


def test_derived_fields_arithmetic() -> None:
    got = derive(compute_duration_ms=10.0, comm_duration_ms=4.0, total_ms=11.0)
    assert got["theoretical_sequential_ms"] == 14.0 and got["theoretical_overlap_ms"] == 10.0
    assert got["overlap_ratio"] == pytest.approx(0.75)  # 3 of the 4 hideable ms hidden
    assert got["overlap_efficiency"] == pytest.approx(10.0 / 11.0)
    assert derive(10.0, 4.0, 14.5)["overlap_ratio"] == 0.0  # slower than sequential: nothing hidden
    assert derive(10.0, 4.0, 9.5)["overlap_ratio"] == 1.0  # below the ideal (noise): clamped
    assert derive(2.0, 8.0, 8.0)["overlap_ratio"] == 1.0 and derive(2.0, 8.0, 8.0)["overlap_efficiency"] == 1.0


def test_overlap_benchmark_end_to_end_on_gloo(tmp_path) -> None:
    result = run_overlap_benchmark(
        "gloo",
        "4K,256K",
        compute_duration_ms=5.0,
        gemm_size=48,
        world_size=2,
        warmup_iters=1,
        benchmark_iters=4,
        output_dir=str(tmp_path),
    )
    assert [r.comm_bytes for r in result.records] == [4096, 262144]
    for r in result.records:
        assert r.backend_kind == "gloo" and r.world_size == 2 and r.data_type == "float32"
        assert r.timing_method.startswith("wall_clock + real matmul on CPU")
        assert r.num_wrong == 0 and r.gemm_iters >= 1 and r.gemm_shape == "48x48x48"
        assert r.benchmark_iters == 4 and r.compute_target_ms == 5.0
        assert r.compute_duration_ms > 0 and r.comm_duration_ms > 0 and r.comm_submit_ms >= 0
        # per iteration total >= compute and >= wait, so their medians (and rank maxima) keep the order
        assert r.total_ms >= r.compute_ms and r.total_ms >= r.comm_wait_ms
        expected = derive(r.compute_duration_ms, r.comm_duration_ms, r.total_ms)
        for name, value in expected.items():
            assert getattr(r, name) == pytest.approx(value), name
    payload = json.loads(result.json_path.read_text())
    assert payload["run"]["backend_kind"] == "gloo" and payload["run"]["world_size"] == 2
    for key in ("command", "package_version", "torch_version", "git_commit", "git_dirty", "commit_source",
                "hostname", "timestamp"):  # fmt: skip
        assert key in payload["run"], key
    assert payload["run"]["git_commit"] != "" and payload["run"]["command"] == "run_overlap_benchmark(...)"
    assert result.json_path.name.startswith("overlap_ws2_")
    assert set(OVERLAP_FIELDS) <= set(payload["results"][0])
    with result.csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and set(OVERLAP_FIELDS) <= set(rows[0])
    assert float(rows[1]["total_ms"]) == pytest.approx(result.records[1].total_ms)
    assert "comp|ovl" in result.table and "wall_clock + real matmul" in result.table


def _damaged_results_worker(rank: int, world_size: int, port: int, damage: str) -> list[int]:
    """The overlap measurement where every overlapped all-reduce's result is damaged after its wait: ``"wrong"``,
    rank r's first r + 1 elements overwritten; ``"misplaced"``, the sums reversed (each landed at another index)."""
    from sagellm_comm.backend import get_comm_backend
    from sagellm_comm.benchmark import overlap_measure
    from sagellm_comm.benchmark.overlap_results import OverlapConfig

    submit = overlap_measure._RankBench._submit

    def damaging_submit(self, buffers):
        handle = submit(self, buffers)
        wait = handle.wait

        def wait_then_damage():
            result = wait()
            if damage == "wrong":
                buffers[0][: rank + 1] = -1.0
            else:
                buffers[0].copy_(buffers[0].flip(0))
            return result

        handle.wait = wait_then_damage
        return handle

    overlap_measure._RankBench._submit = damaging_submit
    backend = get_comm_backend("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=30)
    try:
        config = OverlapConfig(backend="gloo", comm_sizes=[1024], compute_duration_ms=0.2, gemm_size=8, warmup=0,
                               iters=1, output_dir=None, progress=False)  # fmt: skip
        result = overlap_measure.measure_overlap(backend, config)
        return [r.num_wrong for r in result.records]
    finally:
        backend.destroy()


def test_overlap_num_wrong_is_summed_over_ranks() -> None:
    """num_wrong counts every rank's wrong elements, as bench's #wrong does (was the largest rank's count)."""
    assert run_ranks(_damaged_results_worker, 2, "wrong", timeout=90.0) == [[3], [3]]


def test_overlap_num_wrong_sees_sums_at_the_wrong_index() -> None:
    """Every element of every rank's input differs (bench's pattern), so a sum landed at another index is wrong."""
    first, second = run_ranks(_damaged_results_worker, 2, "misplaced", timeout=90.0)
    assert first == second and first[0] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"comm_sizes": [1024.5]}, r"message size must be an int, got 1024\.5"),
        ({"comm_sizes": [0]}, "message size must be >= 1, got 0"),
        ({"comm_sizes": []}, "the message size list is empty"),  # was taken for the default sizes
        ({"gemm_size": 2.5}, r"--gemm-size must be an int, got 2\.5"),
        ({"world_size": 1.5}, r"--world-size must be an int, got 1\.5"),
        ({"benchmark_iters": 2.5}, r"--iters must be an int, got 2\.5"),
    ],
)
def test_counts_and_sizes_are_ints_refused_before_any_process_starts(change, message) -> None:
    request = {"compute_duration_ms": 1.0, "gemm_size": 8, "world_size": 2, "warmup_iters": 0, "benchmark_iters": 1,
               "output_dir": None, "comm_sizes": [1024]}  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=message):
        run_overlap_benchmark("gloo", **{**request, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"world_size": 2}, "world_size 2 disagrees with the given backend's world of 1 rank"),
        ({"virtual_ranks": 2}, "virtual_ranks runs ranks of its own; it does not take a backend"),
        ({"benchmark_iters": 0}, r"--iters must be in 1\.\.10000000, got 0"),
    ],
)
def test_a_given_backend_refuses_what_does_not_apply_to_it(monkeypatch, change, message) -> None:
    """run_overlap_benchmark(backend=<instance>) checks the request against the backend as run_all_reduce_benchmark
    does, before anything is measured: a world size that is not the backend's, or virtual ranks (ranks the
    benchmark makes), were ignored and the run went on over the backend's world."""
    from sagellm_comm.backend import get_comm_backend
    from sagellm_comm.benchmark import run_overlap_bench

    def measured(*args, **kwargs):
        raise AssertionError("measured before the request was checked")

    monkeypatch.setattr(run_overlap_bench, "measure_overlap", measured)
    request = {"compute_duration_ms": 1.0, "gemm_size": 8, "warmup_iters": 0, "benchmark_iters": 1,
               "output_dir": None, "comm_sizes": [1024]}  # fmt: skip
    backend = get_comm_backend("gloo").init(rank=0, world_size=1)
    try:
        with pytest.raises(InvalidArgumentError, match=message):
            run_overlap_benchmark(backend, **{**request, **change})
        with pytest.raises(AssertionError, match="measured"):  # the backend's own world size: on to measuring
            run_overlap_benchmark(backend, **request, world_size=1)
    finally:
        backend.destroy()


def test_overlap_module_cli_prints_table(capsys) -> None:
    """``python -m sagellm_comm.benchmark.run_overlap_bench`` keeps its older option spellings."""
    code = main(
        ["--backend", "gloo", "--comm-sizes", "8K", "--compute-ms", "2", "--gemm-size", "32", "--iters", "2"]
        + ["--warmup", "1", "--no-output", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "overlap bench: backend gloo, world size 2" in out and "8K" in out


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def nccl_world():
    import sagellm_comm

    world = sagellm_comm.CommGroup.create(world_size=1, rank=0, backend="nccl")
    yield world
    world.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_async_all_reduce_orders_streams_on_cuda(nccl_world) -> None:
    from sagellm_comm.overlap import all_reduce_async, comm_stream

    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(50_000_000)  # the producer is slow: the side stream must wait for it
    x.fill_(3.0)
    handle = all_reduce_async(x, nccl_world)
    assert handle.stream == comm_stream(x.device) and handle.stream != torch.cuda.current_stream()
    a = torch.randn(1024, 1024, device="cuda")
    reference = (a.double() @ a.double()).float()  # an independent float64 reference
    b = a @ a  # overlapped work on the current stream
    out = handle.wait()
    total = out.sum()  # ordered after the all-reduce by wait()
    torch.cuda.synchronize()
    assert handle.is_completed() and float(total) == 3.0 * (1 << 20)
    torch.testing.assert_close(b, reference, rtol=1e-4, atol=1e-3)  # fp32 accumulation vs float64

    # fork/join is capturable: the side stream joins the capture and is waited inside it
    y = torch.ones(4096, device="cuda")
    graph = torch.cuda.CUDAGraph()
    # torch hands out streams round-robin from a pool: two made in a row differ, while a stream made inside the
    # capture can be the capture stream itself (which all_reduce_async refuses as a side stream)
    capture_stream, side = torch.cuda.Stream(), torch.cuda.Stream()
    assert side != capture_stream
    with torch.cuda.graph(graph, stream=capture_stream):
        captured = all_reduce_async(y, nccl_world, stream=side).wait() * 2
    y.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, torch.full((4096,), 10.0, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_side_stream_fork_waits_for_the_producer_of_a_real_collective() -> None:
    """The fork of all_reduce_async (start_on_side_stream) on a real 2-rank all-reduce: virtual ranks on one GPU.

    A slow producer on the current stream fills the inputs; the sums are right only if the side stream waited
    for it before the kernels read them.  (The one-rank NCCL world above cannot show this: its all-reduce
    leaves the tensor as it is, whenever it runs.)
    """
    from sagellm_comm.overlap import comm_stream, start_on_side_stream
    from sagellm_comm.virtual import VirtualRankGroup

    numel = 1 << 16
    with VirtualRankGroup(2, max_bytes=1 << 20) as group:
        xs = [torch.zeros(numel, device=group.device) for _ in range(2)]
        torch.cuda._sleep(50_000_000)  # the producer is slow: the side stream must wait for it
        for r, x in enumerate(xs):
            x.fill_(float(r + 1))
        handle = start_on_side_stream(lambda: group.all_reduce(xs), xs, comm_stream(group.device))
        assert handle.stream != torch.cuda.current_stream(group.device)
        assert handle.wait() is xs[0]
        totals = [x.sum() for x in xs]  # ordered after the all-reduce by wait()
        torch.cuda.synchronize()
        group.check_errors()
        assert [float(t) for t in totals] == [3.0 * numel] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_overlap_benchmark_on_cuda(nccl_world, tmp_path) -> None:
    result = run_overlap_benchmark(
        nccl_world.backend, "1M,16M", compute_duration_ms=1.0, gemm_size=2048, output_dir=str(tmp_path)
    )
    for r in result.records:
        assert r.timing_method.startswith("cuda_events") and r.num_wrong == 0 and r.data_type == "bfloat16"
        assert r.total_ms >= r.compute_ms > 0
        assert 0.0 <= r.overlap_ratio <= 1.0
    print(result.table)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_overlap_benchmark_virtual_ranks_on_one_gpu(tmp_path) -> None:
    """A real 2-rank collective (the custom kernels) against the GEMM loop on one GPU."""
    result = run_overlap_benchmark(
        virtual_ranks=2, comm_sizes="1M,16M", compute_duration_ms=1.0, gemm_size=2048, output_dir=str(tmp_path)
    )
    for r in result.records:
        assert r.world_size == 2 and r.backend_kind.startswith("custom (2 virtual ranks")
        assert r.num_wrong == 0 and r.comm_duration_ms > 0.005  # a real collective, not a 1-rank no-op
        assert r.total_ms >= r.compute_ms > 0
    print(result.table)
