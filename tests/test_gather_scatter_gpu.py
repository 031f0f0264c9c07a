"""Custom all-gather and reduce-scatter on a GPU: virtual ranks, every rank in one launch (stacked mode).

The CPU twin is ``tests/test_gather_scatter.py``.  Run on the device machine:
``python -m pytest -m gpu tests/test_gather_scatter_gpu.py``.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import rank_order_sum

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def groups():
    from sagellm_comm.virtual import VirtualRankGroup

    made = {w: VirtualRankGroup(w, "cuda:0", max_bytes=MAX_BYTES, timeout_s=20.0) for w in (2, 4, 8)}
    yield made
    for g in made.values():
        g.close()


def _gather_ref(x: torch.Tensor) -> torch.Tensor:
    """``[W, n]`` -> ``[W, W * n]``: every rank's row is every input in rank order."""
    return x.reshape(1, -1).expand(x.shape[0], -1)


def _scatter_ref(x: torch.Tensor) -> torch.Tensor:
    """``[W, W * n]`` -> ``[W, n]``: row ``r`` is chunk ``r`` summed over ranks in rank order (fp32, rounded once)."""
    w = x.shape[0]
    chunks = x.view(w, w, -1)  # [rank q, chunk c, n]
    return torch.stack([rank_order_sum(list(chunks[:, r])) for r in range(w)])


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_stacked_matches_torch_reference(groups, world_size):
    from sagellm_comm import gather_scatter as gs

    vg = groups[world_size]
    for dtype in DTYPES:
        itemsize = dtype.itemsize
        for op in gs.OPS:
            most = gs.max_numel(op, world_size, vg.max_bytes, itemsize)
            for numel in (1, 7, 1001, 4096, most):
                if op == "all_gather":
                    x = torch.randn(world_size, numel, device="cuda").to(dtype)
                    got, want = gs.all_gather_stacked(vg, x), _gather_ref(x)
                else:
                    x = torch.randn(world_size, world_size * numel, device="cuda").to(dtype)
                    got, want = gs.reduce_scatter_stacked(vg, x), _scatter_ref(x)
                torch.cuda.synchronize()
                vg.check_errors()
                assert torch.equal(got, want), f"{op} W={world_size} {dtype} n={numel}"


def test_thousand_back_to_back_mixed_calls(groups):
    """All-gather, reduce-scatter and all-reduce in turn on one workspace, changing data and sizes."""
    from sagellm_comm import gather_scatter as gs

    world = 4
    vg = groups[world]
    epoch0 = vg.ranks[0].epoch
    sizes = (17, 4096, gs.max_numel("reduce_scatter", world, vg.max_bytes, 4))
    bases = {n: torch.randint(-8, 8, (world, world * n), device="cuda").float() for n in sizes}
    lamport_cap = vg.workspaces[0].lamport_capacity
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    barrier_calls = 0
    for i in range(1000):
        n = sizes[i % len(sizes)]
        x = bases[n] * float(i % 7 + 1)
        block = x[:, :n].contiguous()
        kind = i % 3
        if kind == 0:
            wrong += (gs.all_gather_stacked(vg, block) != _gather_ref(block)).sum()
        elif kind == 1:
            wrong += (gs.reduce_scatter_stacked(vg, x) != _scatter_ref(x)).sum()
        else:
            algo = ("one_shot", "two_shot", "lamport")[(i // 3) % 3]
            if algo == "lamport" and n > lamport_cap:
                algo = "one_shot"
            want = block.sum(0)
            vg.all_reduce_stacked(block, algo=algo)
            wrong += (block != want).sum()
        barrier_calls += kind != 2 or algo != "lamport"  # Lamport calls keep their own counters
    torch.cuda.synchronize()
    vg.check_errors()
    assert int(wrong) == 0
    assert vg.ranks[0].epoch == epoch0 + barrier_calls


@pytest.mark.parametrize("world_size", [2, 8])
def test_cuda_graph_capture_and_replay(groups, world_size):
    """Reduce-scatter then all-gather (the hierarchical path's two kernel stages) and an all-reduce, captured
    once and replayed with new inputs: the epochs live on the device."""
    from sagellm_comm import gather_scatter as gs

    vg = groups[world_size]
    n = 512
    src = torch.empty(world_size, world_size * n, device="cuda", dtype=torch.bfloat16)
    chunks = torch.empty(world_size, n, device="cuda", dtype=torch.bfloat16)
    gathered = torch.empty(world_size, world_size * n, device="cuda", dtype=torch.bfloat16)
    reduced = torch.empty_like(src)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles) outside capture
        gs.reduce_scatter_stacked(vg, src, chunks)
        gs.all_gather_stacked(vg, chunks, gathered)
        vg.all_reduce_stacked(reduced, algo="two_shot")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gs.reduce_scatter_stacked(vg, src, chunks)
        gs.all_gather_stacked(vg, chunks, gathered)
        reduced.copy_(src)
        vg.all_reduce_stacked(reduced, algo="two_shot")
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    for i in range(1000):
        src.copy_(torch.randint(-4, 4, src.shape, device="cuda").to(torch.bfloat16) * (i % 3 + 1))
        graph.replay()
        want = src.float().sum(0).to(torch.bfloat16)
        wrong += (gathered != want).sum() + (reduced != want).sum()
    torch.cuda.synchronize()
    vg.check_errors()
    assert int(wrong) == 0


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_missing_rank_times_out_naming_the_peer(op):
    from sagellm_comm import gather_scatter as gs
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda:0")
    rank0 = CustomAllReduce(workspaces[0], timeout_s=0.2)
    x = torch.ones(1000, device="cuda")
    out = torch.zeros(2000 if op == "all_gather" else 500, device="cuda")
    run = gs.all_gather if op == "all_gather" else gs.reduce_scatter
    t0 = time.monotonic()
    run(rank0, x, out)  # rank 1 never calls
    with pytest.raises(CommTimeoutError) as info:
        rank0.synchronize()
    assert info.value.details["peer"] == 1 and time.monotonic() - t0 < 10.0
    assert bool(torch.all(torch.isnan(out))), "a timed-out call's output passed for a result"
    with pytest.raises(CommTimeoutError):  # poisoned: fails fast afterwards
        run(rank0, x, out)
    for ws in workspaces:
        ws.close()
