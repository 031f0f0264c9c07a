"""Fault injection on a GPU: virtual ranks on one device, and processes sharing it (CUDA IPC).

The CPU twin is ``tests/test_hardening.py``; this file checks the same promises with the real memory
model: counters across 2^31 and 2^32, two streams on one workspace (eager and captured), check mode,
a timeout's NaN output and the watchdog, a rank killed mid-call.  Run on the device machine:
``python -m pytest -m gpu tests/test_hardening_gpu.py``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.conftest import HAS_CUDA, exchange_objects, join_gloo, run_ranks

pytestmark = pytest.mark.gpu


def _ints(shape, seed, dtype=torch.bfloat16, hi=8):
    """Small integers: every sum below is exact in bf16 (|values| stay under 256)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(-hi, hi + 1, shape, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.parametrize("start", [2**31 - 3, 2**32 - 3], ids=["2^31", "2^32"])
def test_counter_wrap_every_family_virtual_ranks(monkeypatch, world_size, start):
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.kernels.all_reduce import CTRL_EPOCH
    from sagellm_comm.virtual import VirtualRankGroup

    monkeypatch.setenv("SAGELLM_COMM_INITIAL_EPOCH", str(start))
    vg = VirtualRankGroup(world_size, max_bytes=1 << 20, timeout_s=20.0)
    vf = VirtualFused(vg, gemm_max_output_bytes=1 << 20)
    try:
        guard = vg.get_buffers(256, torch.float32)
        for g in guard:
            g.fill_(12345.0)
        wrong = {k: torch.zeros((), dtype=torch.int64, device="cuda") for k in ("one_shot", "two_shot", "lamport",
                 "rmsnorm", "gemm")}  # fmt: skip
        for i in range(6):
            for algo in ("one_shot", "two_shot", "lamport"):
                x = _ints((world_size, 4099 + i), i)
                want = x.float().sum(0)
                vg.all_reduce_stacked(x, algo=algo)
                wrong[algo] += (x.float() != want).sum()
            xs = _ints((world_size, 3, 512), 100 + i)
            # one residual on every rank, as in tensor parallelism (two-shot takes each row's from its owner)
            residual = _ints((3, 512), 200 + i).expand(world_size, 3, 512).contiguous()
            weight = torch.ones(512, device="cuda", dtype=torch.bfloat16)
            _, new_res = vf.all_reduce_residual_rmsnorm(xs, residual, weight, algo=("one_shot", "two_shot")[i % 2])
            want_res = (xs.float().sum(0)[None] + residual.float()).to(torch.bfloat16)
            wrong["rmsnorm"] += (new_res != want_res).sum()
            a = _ints((world_size, 64, 16), 300 + i, hi=1)
            b = _ints((world_size, 16, 128), 400 + i, hi=1)
            out = vf.gemm_all_reduce(a, b, path="fused")
            wrong["gemm"] += (out.float() != torch.bmm(a.float(), b.float()).sum(0)).sum()
        torch.cuda.synchronize()
        vg.check_errors()
        assert {k: int(v) for k, v in wrong.items()} == dict.fromkeys(wrong, 0)
        assert all(bool(torch.all(g == 12345.0)) for g in guard), "a copy-path call wrote the registered region"
        assert vg.ranks[0].epoch == start + 6 * 3  # one-shot, two-shot, RMSNorm
        assert vg.ranks[0].lamport_epoch == start + 6
        assert vf.gemm_workspaces[0].counter(CTRL_EPOCH.value) == start + 6
    finally:
        vf.close()
        vg.close()


@pytest.mark.parametrize("capture", [False, True], ids=["eager", "graph"])
def test_two_streams_on_one_workspace_are_ordered(capture):
    """Calls on two streams with no user ordering between them: the library orders them per workspace."""
    from sagellm_comm.virtual import VirtualRankGroup

    world = 4
    with VirtualRankGroup(world, max_bytes=1 << 20, timeout_s=20.0) as vg:
        side = torch.cuda.Stream()
        main = torch.cuda.Stream()
        srcs = [_ints((world, n), n) for n in (1000, 70_000)]
        wants = [s.float().sum(0) for s in srcs]
        bufs = [torch.empty_like(s) for s in srcs]
        wrong = torch.zeros(2, dtype=torch.int64, device="cuda")

        def step():
            for k, (stream, algo) in enumerate(((side, "lamport"), (main, "two_shot"))):
                with torch.cuda.stream(stream):
                    bufs[k].copy_(srcs[k])
                    vg.all_reduce_stacked(bufs[k], algo=algo)
                    wrong[k : k + 1] += (bufs[k].float() != wants[k]).sum()

        current = torch.cuda.current_stream()
        for stream in (side, main):
            stream.wait_stream(current)
        step()  # warm-up: compiles
        torch.cuda.synchronize()
        wrong.zero_()
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for stream in (side, main):
                    stream.wait_stream(torch.cuda.current_stream())
                for _ in range(4):
                    step()
                for stream in (side, main):
                    torch.cuda.current_stream().wait_stream(stream)
            for _ in range(250):
                graph.replay()
        else:
            for _ in range(1000):
                step()
        torch.cuda.synchronize()
        vg.check_errors()
        assert wrong.tolist() == [0, 0]


@pytest.mark.parametrize("algo", ["one_shot", "two_shot", "lamport"])
def test_timeout_gives_nan_latches_and_the_watchdog_reports(algo):
    from sagellm_comm import watchdog
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.workspace import local_workspaces

    seen = []
    handler = lambda ws, exc: seen.append(exc)  # noqa: E731
    watchdog.add_error_handler(handler)
    workspaces = local_workspaces(2, 1 << 16, "cuda:0")
    try:
        rank0 = CustomAllReduce(workspaces[0], timeout_s=0.2)
        x = torch.ones(1000, device="cuda")
        rank0.all_reduce(x, algo=algo)  # rank 1 never calls
        deadline = time.monotonic() + 5.0
        while not seen and time.monotonic() < deadline:  # nobody polls: the watchdog must report
            time.sleep(0.05)
        assert seen and isinstance(seen[0], CommTimeoutError), seen
        torch.cuda.synchronize()
        assert bool(torch.isnan(x).all()), f"{algo}: a timed-out call's output passed for a sum"
        with pytest.raises(CommTimeoutError):
            rank0.all_reduce(x)
    finally:
        watchdog.remove_error_handler(handler)
        for ws in workspaces:
            ws.close()


def test_check_mode_mismatch_on_the_gpu():
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CollectiveMismatchError
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda:0", max_programs=4, check=True)
    ranks = [CustomAllReduce(ws, timeout_s=10.0) for ws in workspaces]
    streams = [torch.cuda.Stream() for _ in ranks]
    xs = [torch.ones(100 + r, device="cuda") for r in range(2)]  # rank 1 passes one element more
    for car, stream, x in zip(ranks, streams, xs, strict=True):
        with torch.cuda.stream(stream):
            car.all_reduce(x, algo="one_shot")
    torch.cuda.synchronize()
    for r, car in enumerate(ranks):
        with pytest.raises(CollectiveMismatchError) as info:
            car.check_errors()
        assert info.value.details["peer"] == 1 - r
        assert {info.value.details["mine"]["numel"], info.value.details["theirs"]["numel"]} == {100, 101}
        assert bool(torch.isnan(xs[r]).all())
    for ws in workspaces:
        ws.close()


def test_check_mode_compares_the_fused_rmsnorm_shape_on_the_gpu():
    """Agreeing shapes run exactly in check mode; [2, 256] against [4, 128] (as many elements) is a mismatch."""
    from sagellm_comm.errors import CollectiveMismatchError
    from sagellm_comm.fused import FusedAllReduceRMSNorm
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda:0", max_programs=4, check=True)
    ranks = [FusedAllReduceRMSNorm(ws, timeout_s=10.0) for ws in workspaces]
    streams = [torch.cuda.Stream() for _ in ranks]

    def call(shapes):
        outs = []
        for fused, stream, (rows, cols) in zip(ranks, streams, shapes, strict=True):
            with torch.cuda.stream(stream):
                x = torch.full((rows, cols), 3.0, device="cuda")
                outs.append(fused(x, torch.zeros_like(x), torch.full((cols,), 0.5, device="cuda"), algo="one_shot"))
        torch.cuda.synchronize()
        return outs

    for shape in ((2, 256), (4, 128)):  # both shapes' kernels are loaded before the mismatch (local_workspaces)
        for normed, new_residual in call([shape, shape]):
            torch.testing.assert_close(normed, torch.full_like(normed, 0.5))  # rows of 6: RMSNorm leaves the weight
            assert torch.equal(new_residual, torch.full_like(new_residual, 6.0))
    call([(2, 256), (4, 128)])
    for r, fused in enumerate(ranks):
        with pytest.raises(CollectiveMismatchError) as info:
            fused.check_errors()
        assert info.value.details["peer"] == 1 - r
        assert {info.value.details["mine"]["shape"], info.value.details["theirs"]["shape"]} == {(2, 256), (4, 128)}
    for ws in workspaces:
        ws.close()


def test_check_mode_runs_the_fused_gemm_of_ranks_driven_from_one_thread():
    """Each rank's GEMM + all-reduce loads its kernels before its check spins for the peer (a module load may wait
    for the device to go idle, and the peer's check comes later from this thread): the agreeing calls are exact,
    [2, 256] against [4, 128] is a mismatch.  The kernels of a shape only one rank runs are loaded before by calls
    that agree (see ``local_workspaces``).  The copy-engine path is not driven this way: its cuBLAS GEMMs between
    its barriers load their kernels on first use (its check mode runs in tests/test_hardening.py's processes)."""
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CollectiveMismatchError
    from sagellm_comm.fused import GemmAllReduce, gemm_workspace_bytes
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda:0", max_programs=4, check=True)
    gemm_workspaces = local_workspaces(2, gemm_workspace_bytes(1 << 20), "cuda:0", check=True)
    cars = [CustomAllReduce(ws, timeout_s=10.0) for ws in workspaces]
    ranks = [GemmAllReduce(g, car, timeout_s=10.0) for g, car in zip(gemm_workspaces, cars, strict=True)]
    streams = [torch.cuda.Stream() for _ in ranks]

    def call(shapes, seed):
        ins = [(_ints((rows, 64), seed + r, hi=2), _ints((64, cols), seed + 10 + r, hi=1))
               for r, (rows, cols) in enumerate(shapes)]  # fmt: skip
        torch.cuda.synchronize()
        outs = []
        for gemm, stream, (a, b) in zip(ranks, streams, ins, strict=True):
            with torch.cuda.stream(stream):
                outs.append(gemm(a, b, path="fused"))
        torch.cuda.synchronize()
        return ins, outs

    for seed, shape in enumerate(((32, 256), (2, 256), (4, 128))):
        ins, outs = call([shape, shape], seed)
        want = sum(a.float() @ b.float() for a, b in ins)  # |entries| <= 2 * 64 * 2: integers exact in bf16
        for out in outs:
            assert torch.equal(out.float(), want), shape
    call([(2, 256), (4, 128)], 9)
    for r, gemm in enumerate(ranks):
        with pytest.raises(CollectiveMismatchError) as info:
            gemm.check_errors()
        assert info.value.details["peer"] == 1 - r
        assert {info.value.details["mine"]["shape"], info.value.details["theirs"]["shape"]} == {(2, 256), (4, 128)}
    for ws in workspaces + gemm_workspaces:
        ws.close()


def _killed_gpu_worker(rank, world_size, port):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.ipc import CudaIpcMemory
    from sagellm_comm.workspace import SymmetricWorkspace

    torch.cuda.set_device(0)
    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(rank, world_size, 1 << 20, "cuda:0", exchange_objects, CudaIpcMemory("cuda:0"),
                                       max_programs=8)  # fmt: skip
    car = CustomAllReduce(ws, timeout_s=2.0)
    x = torch.full((4096,), float(rank + 1), device="cuda")
    car.all_reduce(x, algo="one_shot")
    car.synchronize()
    assert bool(torch.all(x == world_size * (world_size + 1) / 2))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    car.all_reduce(x, algo="one_shot")
    with pytest.raises(CommTimeoutError) as info:
        car.synchronize()
    assert bool(torch.isnan(x).all())
    return time.monotonic() - t0, info.value.details["peer"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_killed_process_is_named_by_the_survivors():
    pytest.importorskip("cupy")
    results = run_ranks(_killed_gpu_worker, 3, timeout=300, expect_dead={1})
    for rank in (0, 2):
        elapsed, peer = results[rank]
        assert peer == 1 and elapsed < 30, results[rank]
