"""Custom all-reduce on a GPU: virtual ranks (streams and one launch) and real processes over CUDA IPC.

Run on the device machine: ``python -m pytest -m gpu tests/test_custom_all_reduce_gpu.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from tests.conftest import HAS_CUDA, NAN_BITS, exchange_objects, join_gloo, rank_order_sum, run_ranks

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BYTES = 1 << 20


def _check(outs: list[torch.Tensor], inputs: list[torch.Tensor], what: str) -> None:
    ref = rank_order_sum(inputs)
    for r, out in enumerate(outs):
        assert torch.equal(out, outs[0]), f"{what}: rank {r} differs bitwise from rank 0"
    torch.testing.assert_close(outs[0].float(), ref.float(), rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def groups():
    from sagellm_comm.virtual import VirtualRankGroup

    made = {w: VirtualRankGroup(w, "cuda:0", max_bytes=MAX_BYTES, timeout_s=20.0) for w in (2, 4, 8)}
    yield made
    for g in made.values():
        g.close()


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("algo", ["one_shot", "two_shot", "lamport"])
def test_virtual_matrix(groups, world_size, algo):
    vg = groups[world_size]
    cap = vg.workspaces[0].lamport_capacity
    for dtype in DTYPES:
        itemsize = torch.empty((), dtype=dtype).element_size()
        for numel in (1, 7, 1001, 4096, 65_537, cap, MAX_BYTES // itemsize):
            if algo == "lamport" and numel > cap:
                continue
            inputs = [torch.randn(numel, device="cuda").to(dtype) for _ in range(world_size)]
            # streams mode: one kernel per rank on its own stream
            outs = [t.clone() for t in inputs]
            vg.all_reduce(outs, algo=algo)
            torch.cuda.synchronize()
            vg.check_errors()
            _check(outs, inputs, f"streams W={world_size} {algo} {dtype} n={numel}")
            # one launch for all ranks
            stacked = torch.stack(inputs)
            vg.all_reduce_stacked(stacked, algo=algo)
            torch.cuda.synchronize()
            vg.check_errors()
            _check(list(stacked), inputs, f"stacked W={world_size} {algo} {dtype} n={numel}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_zero_copy_and_out_of_place(groups, world_size):
    vg = groups[world_size]
    for algo in ("one_shot", "two_shot"):
        for numel in (3, 4097, MAX_BYTES // 2):
            inputs = [torch.randn(numel, device="cuda", dtype=torch.bfloat16) for _ in range(world_size)]
            bufs = vg.get_buffers(numel, torch.bfloat16)
            for b, x in zip(bufs, inputs, strict=True):
                b.copy_(x)
            outs = vg.all_reduce(bufs, algo=algo)
            torch.cuda.synchronize()
            vg.check_errors()
            assert all(o.data_ptr() == b.data_ptr() for o, b in zip(outs, bufs, strict=True))
            _check(outs, inputs, f"zero-copy {algo} n={numel}")
            targets = [torch.full_like(x, float("nan")) for x in inputs]
            srcs = [x.clone() for x in inputs]
            vg.all_reduce(srcs, algo=algo, outs=targets)
            torch.cuda.synchronize()
            _check(targets, inputs, f"out-of-place {algo} n={numel}")
            for s, x in zip(srcs, inputs, strict=True):
                assert torch.equal(s, x), "out-of-place call modified its input"


def test_ten_thousand_back_to_back_calls(groups):
    """Changing data, alternating algorithms and sizes, checked on the device after every call."""
    vg = groups[4]
    world = 4
    sizes = (17, 4096, 70_001, MAX_BYTES // 4)
    bases = {n: torch.randint(-8, 8, (world, n), device="cuda").float() for n in sizes}
    stacked = {n: torch.empty(world, n, device="cuda") for n in sizes}
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    for i in range(10_000):
        n = sizes[i % len(sizes)]
        scale = float(i % 7 + 1)
        x = stacked[n]
        x.copy_(bases[n]).mul_(scale)
        algo = ("one_shot", "two_shot", "lamport")[(i // 4) % 3]
        if algo == "lamport" and n > vg.workspaces[0].lamport_capacity:
            algo = "one_shot"
        vg.all_reduce_stacked(x, algo=algo)
        wrong += (x != bases[n].sum(0) * scale).sum()
    torch.cuda.synchronize()
    vg.check_errors()
    assert int(wrong) == 0
    # streams mode, too (one kernel per rank, concurrent streams)
    xs = [torch.empty(4099, device="cuda") for _ in range(world)]
    for i in range(1000):
        for r in range(world):
            xs[r].fill_(float(i + r))
        vg.all_reduce(xs, algo=("one_shot", "two_shot", "lamport")[i % 3])
        wrong += sum((x != float(world * i + 6)).sum() for x in xs)
    torch.cuda.synchronize()
    vg.check_errors()
    assert int(wrong) == 0


def _nan_stack(world_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[world_size, 3 * patterns + 1]``: per NaN pattern ``p`` three elements, ``p`` on rank 0 only, on the last
    rank only, and ``p`` on rank 0 with a NaN of the opposite sign on every other rank; then one finite element.
    Rank ``r``'s other elements are ``r + 1``."""
    bits_dtype, patterns = NAN_BITS[dtype]
    width = torch.iinfo(bits_dtype).bits
    stacked = torch.arange(1, world_size + 1, dtype=torch.float32)[:, None].repeat(1, 3 * len(patterns) + 1)
    stacked = stacked.to(dtype)
    view = stacked.view(bits_dtype)

    def put(rank: int, col: int, bits: int) -> None:
        view[rank, col] = bits - (1 << width) if bits >= 1 << (width - 1) else bits

    for i, pattern in enumerate(patterns):
        other = patterns[1] if pattern >> (width - 1) == 0 else patterns[0]
        put(0, 3 * i, pattern)
        put(world_size - 1, 3 * i + 1, pattern)
        put(0, 3 * i + 2, pattern)
        for r in range(1, world_size):
            put(r, 3 * i + 2, other)
    return stacked


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_nan_inputs_give_the_same_nan_bits_on_every_rank_with_every_algorithm(groups, world_size):
    """On the GPU the adds return one canonical NaN whatever the operands' payloads, so a NaN in any rank's input
    gives the same bits on every rank with one-shot, two-shot and Lamport alike, the sentinel pattern (all ones)
    included (docs/protocol.md)."""
    vg = groups[world_size]
    for dtype, (bits_dtype, _) in NAN_BITS.items():
        got = {}
        for algo in ("one_shot", "two_shot", "lamport"):
            stacked = _nan_stack(world_size, dtype).cuda()
            vg.all_reduce_stacked(stacked, algo=algo)
            torch.cuda.synchronize()
            vg.check_errors()
            for r in range(world_size):
                assert torch.equal(stacked[r].view(bits_dtype), stacked[0].view(bits_dtype)), (dtype, algo, r)
            out = stacked[0].float().cpu()
            assert bool(torch.all(torch.isnan(out[:-1]))), (dtype, algo, out)
            assert out[-1].item() == world_size * (world_size + 1) / 2, (dtype, algo, out)
            got[algo] = stacked[0].view(bits_dtype).cpu()
        assert torch.equal(got["two_shot"], got["one_shot"]), (dtype, got)
        assert torch.equal(got["lamport"], got["one_shot"]), (dtype, got)


@pytest.mark.parametrize("world_size", [2, 8])
def test_cuda_graph_replays_with_new_inputs(groups, world_size):
    # Every rank in one launch (stacked mode): the ranks' programs are co-resident by construction.  Streams
    # mode (one kernel per rank and stream) needs CUDA to run W kernels of W streams at once, which it does
    # not promise (streams share CUDA_DEVICE_MAX_CONNECTIONS hardware queues): a graph test built on it
    # depends on scheduling, not on the protocol.
    vg = groups[world_size]
    numel = 4096  # the TP decode case: small, latency-bound
    src = torch.empty(world_size, numel, device="cuda", dtype=torch.bfloat16)
    stacked = torch.empty_like(src)
    second = torch.empty_like(src)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles) outside capture
        for algo in ("one_shot", "two_shot", "lamport"):
            vg.all_reduce_stacked(stacked, algo=algo)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stacked.copy_(src)
        vg.all_reduce_stacked(stacked, algo="lamport")
        vg.all_reduce_stacked(stacked, algo="two_shot")  # sum of sums: W * sum
        second.copy_(src)
        vg.all_reduce_stacked(second, algo="one_shot")
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    for i in range(1000):
        src.copy_(torch.randint(-4, 4, (world_size, numel), device="cuda").to(torch.bfloat16) * (i % 3 + 1))
        graph.replay()
        expected = src.float().sum(0)
        wrong += (stacked.float() != expected * world_size).sum()
        wrong += (second.float() != expected).sum()
    torch.cuda.synchronize()
    vg.check_errors()
    assert int(wrong) == 0


@pytest.mark.parametrize("algo", ["two_shot", "lamport"])
def test_missing_rank_times_out_naming_the_peer(algo):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda:0")
    rank0 = CustomAllReduce(workspaces[0], timeout_s=0.2)
    x = torch.ones(1000, device="cuda")
    t0 = time.monotonic()
    rank0.all_reduce(x, algo=algo)  # rank 1 never calls
    with pytest.raises(CommTimeoutError) as info:
        rank0.synchronize()
    elapsed = time.monotonic() - t0
    assert "peer rank 1 never arrived at the" in str(info.value)
    assert info.value.details["peer"] == 1
    assert elapsed < 10.0
    with pytest.raises(CommTimeoutError):  # poisoned: fails fast afterwards
        rank0.all_reduce(x)
    for ws in workspaces:
        ws.close()


def test_workspace_limits_are_typed_errors(groups):
    from sagellm_comm.errors import InvalidArgumentError, WorkspaceExhaustedError

    car = groups[2].ranks[0]
    with pytest.raises(WorkspaceExhaustedError):
        car.all_reduce(torch.ones(MAX_BYTES // 4 + 1, device="cuda"), algo="one_shot")
    with pytest.raises(InvalidArgumentError, match="is on cpu"):
        car.all_reduce(torch.ones(8))
    with pytest.raises(InvalidArgumentError, match="supports bfloat16"):
        car.all_reduce(torch.ones(8, device="cuda", dtype=torch.float64))
    assert car.select(8 << 10).algo in ("lamport", "one_shot")  # latency-bound: a one-barrier-or-less kernel
    assert car.select(MAX_BYTES + 2).rule_id == "over-workspace"  # one bf16 element over


# ---------------------------------------------------------------------- real processes over CUDA IPC


@pytest.fixture(scope="module")
def mps():
    """CUDA MPS lets the ranks' kernels run concurrently on the one GPU (else they time-slice)."""
    control = shutil.which("nvidia-cuda-mps-control")
    started = False
    # Opt-in: an MPS server cannot serve a GPU that already has non-MPS contexts (this pytest process
    # has one as soon as another GPU test ran), so run these tests in their own pytest invocation.
    if control and os.geteuid() == 0 and os.environ.get("SAGELLM_TEST_MPS") == "1":
        started = subprocess.run([control, "-d"], capture_output=True).returncode == 0
        time.sleep(1.0)
    yield started
    if started:
        subprocess.run([control], input=b"quit\n", capture_output=True)
        time.sleep(1.0)


def _ipc_worker(rank, world_size, port, calls, cycles):
    import torch.distributed as dist

    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.ipc import CudaIpcMemory
    from sagellm_comm.workspace import SymmetricWorkspace

    torch.cuda.set_device(0)
    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(
        rank, world_size, 1 << 20, "cuda:0", exchange_objects, CudaIpcMemory("cuda:0"), max_programs=8
    )
    car = CustomAllReduce(ws, timeout_s=30.0)
    digests = []
    for i in range(calls):
        algo = ("one_shot", "two_shot", "lamport")[i % 3]
        numel = (1, 333, 4096, 100_003, (1 << 20) // 2)[i % 5]
        if algo == "lamport" and numel > ws.lamport_capacity:
            algo = "one_shot"
        g = torch.Generator(device="cuda").manual_seed(i)
        inputs = [torch.randn(numel, device="cuda", generator=g).to(torch.bfloat16) for _ in range(world_size)]
        x = inputs[rank].clone()
        car.all_reduce(x, algo=algo)
        car.synchronize()
        assert torch.equal(x, rank_order_sum(inputs)), f"call {i} ({algo}, n={numel}) wrong on rank {rank}"
        digests.append(float(x.float().sum()))
    car.close()
    # create/destroy cycles: IPC handles closed and memory freed every time
    torch.cuda.synchronize()
    dist.barrier()  # free memory is device-wide: measure when no rank is mid-cycle
    free_before = torch.cuda.mem_get_info(0)[0]
    for _ in range(cycles):
        w = SymmetricWorkspace.rendezvous(
            rank, world_size, 1 << 20, "cuda:0", exchange_objects, CudaIpcMemory("cuda:0")
        )
        w.close()
    torch.cuda.synchronize()
    dist.barrier()
    leaked = free_before - torch.cuda.mem_get_info(0)[0]
    dist.barrier()
    return digests, leaked


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("world_size", [2, 4])
def test_ipc_processes_on_one_gpu(mps, world_size):
    pytest.importorskip("cupy")
    cycles = 1000 if world_size == 2 else 20
    results = run_ranks(_ipc_worker, world_size, 40, cycles, timeout=540)
    for r, (digests, leaked) in enumerate(results):
        assert digests == results[0][0], f"rank {r} got different results"
        assert leaked <= 2 << 20, f"rank {r}: {leaked} bytes of device memory not returned after {cycles} cycles"


def test_virtual_ranks_raise_not_initialised_once_closed():
    """The stacked pointer table still holds the closed workspaces' addresses (memory the caching allocator hands
    out again): a call after close() raises instead of writing there."""
    from sagellm_comm.errors import NotInitializedError
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    vg = VirtualRankGroup(2, "cuda:0", max_bytes=MAX_BYTES, timeout_s=20.0)
    vf = VirtualFused(vg, gemm_max_output_bytes=1 << 20)
    x = torch.ones(2, 1024, device="cuda")
    vg.all_reduce_stacked(x)
    torch.cuda.synchronize()
    vf.close()
    a, b = (
        torch.ones(2, 8, 16, device="cuda", dtype=torch.bfloat16),
        torch.ones(2, 16, 32, device="cuda", dtype=torch.bfloat16),
    )
    with pytest.raises(NotInitializedError, match="closed"):
        vf.gemm_all_reduce(a, b)
    vg.close()
    with pytest.raises(NotInitializedError, match="closed"):
        vg.all_reduce_stacked(torch.ones(2, 1024, device="cuda"))
    with pytest.raises(NotInitializedError):
        vg.all_reduce([torch.ones(1024, device="cuda") for _ in range(2)])
