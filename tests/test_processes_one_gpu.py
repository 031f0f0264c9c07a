"""The whole ``custom`` backend with N processes sharing one GPU: world, TP sub-groups, simulated nodes.

N ranks on one GPU need CUDA MPS (without it the processes' kernels time-slice and a rank spinning at a
barrier never sees its peers) and Gloo as the host engine (NCCL refuses two ranks on one device):
``CommBackend.create("custom", engine="gloo", device="cuda:0")``.  Start MPS before any CUDA process, run
this file in its own pytest invocation, stop MPS after::

    nvidia-cuda-mps-control -d
    SAGELLM_TEST_MPS=1 python -m pytest -m gpu tests/test_processes_one_gpu.py
    echo quit | nvidia-cuda-mps-control
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from tests.conftest import HAS_CUDA, run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_CUDA or os.environ.get("SAGELLM_TEST_MPS") != "1",
        reason="N processes on one GPU: needs a CUDA GPU with MPS started (SAGELLM_TEST_MPS=1, see the docstring)",
    ),
]

ENV = {"SAGELLM_COMM_HIER_MIN_BYTES": "0"}


def _worker(rank, world_size, port, nodes):
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    pytest.importorskip("cupy")
    if nodes:
        os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank * nodes // world_size}"
    torch.cuda.set_device(0)
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, engine="gloo",
        device="cuda:0", max_bytes=1 << 20, group_max_bytes=1 << 20,
    )  # fmt: skip
    backend = world.backend
    seen = []
    try:
        want_world_kernels = not nodes
        assert (backend.custom is not None) == want_world_kernels, backend.custom_reason
        for i, numel in enumerate((1, 4097, 100_003)):
            x = torch.full((numel,), float(rank + 1 + i), device="cuda", dtype=torch.bfloat16)
            world.all_reduce(x)
            torch.cuda.synchronize()
            seen.append(
                (backend.last_selection.algo, bool(torch.all(x.float() == sum(r + 1 + i for r in range(world_size)))))
            )
        tp = world.split(2)
        assert backend.kernels_for(tp) is not None, backend.kernels_reason(tp)
        for algo in ("one_shot", "two_shot", "lamport"):
            x = torch.full((333,), float(rank + 1), device="cuda")
            backend.all_reduce(x, group=tp, algo=algo)
            torch.cuda.synchronize()
            seen.append((algo, bool(torch.all(x == sum(r + 1 for r in tp.ranks)))))
        xs = torch.full((4, 256), float(rank + 1), device="cuda", dtype=torch.bfloat16)
        _, new_res = all_reduce_residual_rmsnorm(xs, torch.ones_like(xs), torch.ones(256, device="cuda",
                                                 dtype=torch.bfloat16), group=tp)  # fmt: skip
        torch.cuda.synchronize()
        seen.append(("rmsnorm", bool(torch.all(new_res.float() == 1 + sum(r + 1 for r in tp.ranks)))))
    finally:
        sagellm_comm.destroy()
    return seen


@pytest.mark.parametrize("world_size", [2, 4])
def test_custom_backend_in_n_processes_on_one_gpu(world_size):
    for seen in run_ranks(_worker, world_size, 0, env=ENV, timeout=540):
        assert all(ok for _, ok in seen), seen
        assert all(algo in ("one_shot", "two_shot", "lamport", "rmsnorm") for algo, _ in seen), seen


def test_hierarchical_on_two_simulated_nodes_on_one_gpu():
    for seen in run_ranks(_worker, 4, 2, env=ENV, timeout=540):
        assert all(ok for _, ok in seen), seen
        assert [algo for algo, _ in seen[:3]] == ["hierarchical"] * 3, seen


def _hier_graph_worker(rank, world_size, port):
    """2 simulated nodes x 2: capture the world's hierarchical all-reduce, replay with new inputs."""
    import sagellm_comm

    pytest.importorskip("cupy")
    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    torch.cuda.set_device(0)
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              engine="gloo", device="cuda:0", max_bytes=1 << 20, group_max_bytes=1 << 20)  # fmt: skip
    backend = world.backend
    out = {"replays": [], "digest": []}
    try:
        plan = backend._hierarchical[None][1]
        out["cross_kernels"] = plan.cross_kernels is not None
        for numel in (1, 4097, 65_537):  # odd sizes: padded shards
            x = torch.zeros(numel, device="cuda", dtype=torch.bfloat16)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                world.all_reduce(x)  # warm-up outside the capture (compiles, allocates)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                world.all_reduce(x)
            out["algo"] = backend.last_selection.algo
            for step in range(20):
                base = torch.arange(numel, device="cuda", dtype=torch.float32) % 17
                x.copy_(base * (rank + 1) + step)
                graph.replay()
                torch.cuda.synchronize()
                want = base * sum(r + 1 for r in range(world_size)) + step * world_size
                out["replays"].append(bool(torch.equal(x.float(), want.to(torch.bfloat16).float())))
            out["digest"].append(x.float().sum().item())
            del graph
    finally:
        sagellm_comm.destroy()
    return out


def test_hierarchical_all_reduce_captured_in_a_cuda_graph():
    """Stage 2 on the cross groups' kernels (SAGELLM_COMM_HIER_CROSS=kernels): Gloo cannot be captured and
    NCCL refuses two ranks on one GPU; on real nodes stage 2 is NCCL, which captures."""
    env = dict(ENV, SAGELLM_COMM_HIER_CROSS="kernels")
    results = run_ranks(_hier_graph_worker, 4, env=env, timeout=540)
    for out in results:
        assert out["cross_kernels"] and out["algo"] == "hierarchical", out
        assert len(out["replays"]) == 60 and all(out["replays"]), out["replays"]
    assert all(out["digest"] == results[0]["digest"] for out in results)


def _hier_gloo_capture_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import BackendNotSupportedError

    pytest.importorskip("cupy")
    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    torch.cuda.set_device(0)
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              engine="gloo", device="cuda:0", max_bytes=1 << 20, group_max_bytes=1 << 20)  # fmt: skip
    try:
        x = torch.full((4097,), float(rank + 1), device="cuda")
        world.all_reduce(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        message = ""
        try:
            with torch.cuda.graph(graph):
                world.all_reduce(x)
        except BackendNotSupportedError as exc:
            message = str(exc)
        torch.cuda.synchronize()
        x.fill_(float(rank + 1))
        world.all_reduce(x)  # nothing was enqueued by the refused call: the next eager call is exact
        torch.cuda.synchronize()
        return message, bool(torch.all(x == 10.0))
    finally:
        sagellm_comm.destroy()


def test_hierarchical_capture_on_gloo_is_a_typed_error_and_harms_nothing():
    for message, exact in run_ranks(_hier_gloo_capture_worker, 4, env=ENV, timeout=540):
        assert "cannot capture" in message and "gloo" in message, message
        assert exact


def _reset_worker(rank, world_size, port, nodes, marker, calls):
    """A rank late past the kernel timeout latches the TP group and the world's path (its kernels, or its
    node-local groups when the world spans two simulated nodes); reset() on every rank, then ``calls`` exact
    calls of every path."""
    import time

    import sagellm_comm
    from sagellm_comm.errors import CommTimeoutError

    pytest.importorskip("cupy")
    if nodes > 1:
        os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank * nodes // world_size}"
    torch.cuda.set_device(0)
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              engine="gloo", device="cuda:0", max_bytes=1 << 20, group_max_bytes=1 << 20,
                              kernel_timeout=2.0)  # fmt: skip
    backend = world.backend
    tp = world.split(2)
    full = lambda i, n, r=rank: torch.full((n,), float(r + 1 + i), device="cuda")  # noqa: E731
    errors = []
    if rank == world_size - 1:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        tp.all_reduce(full(0, 1000))
        world.all_reduce(full(0, 4096))
        torch.cuda.synchronize()
        for car in (backend.kernels_for(tp), backend.custom):
            if car is not None:
                car.check_errors()
        if nodes > 1:
            backend.kernels_for(backend._hierarchical[None][1].local).check_errors()
    except CommTimeoutError:
        errors.append(rank)
    if rank == world_size - 2:
        open(marker, "w").close()
    world.barrier()
    backend.kernel_timeout = 30.0
    reason = backend.reset()
    wrong = {"world": 0, "tp all_reduce": 0, "tp all_gather": 0, "tp reduce_scatter": 0}
    first = tp.ranks[0]
    algos = set()
    for i in range(calls):
        n = 1 + (i * 7919) % 20_000
        x = full(i, n)
        world.all_reduce(x)
        algos.add(backend.last_selection.algo)
        torch.cuda.synchronize()
        wrong["world"] += int(not torch.all(x == sum(r + 1 + i for r in range(world_size))))
        y = full(i, n)
        backend.all_reduce(y, group=tp, algo=("one_shot", "two_shot", "lamport")[i % 3] if n <= 65536 else "auto")
        gathered = torch.empty(2 * n, device="cuda")
        backend.all_gather(gathered, full(i, n), group=tp)
        shard = torch.empty(n, device="cuda")
        backend.reduce_scatter(shard, torch.cat([full(i, n), full(i + 1, n)]), group=tp)
        torch.cuda.synchronize()
        wrong["tp all_reduce"] += int(not torch.all(y == sum(r + 1 + i for r in tp.ranks)))
        wrong["tp all_gather"] += int(not torch.equal(gathered, torch.cat([full(i, n, first), full(i, n, first + 1)])))
        wrong["tp reduce_scatter"] += int(not torch.all(shard == sum(r + 1 + i + tp.rank for r in tp.ranks)))
    sagellm_comm.destroy()
    return errors, reason, wrong, sorted(algos)


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-simulated-nodes"])
def test_reset_recovers_every_path_for_1000_calls(nodes, tmp_path):
    """The world on one node (its kernels) or on two simulated nodes (hierarchical: node-local kernels, Gloo
    between), and the TP groups of split(2): after a fault and reset() on every rank, 1,000 exact calls each."""
    results = run_ranks(_reset_worker, 4, nodes, str(tmp_path / "m"), 1000, env=ENV, timeout=540)
    assert any(errors for errors, *_ in results), "the fault did not latch anything"
    for _, reason, wrong, algos in results:
        assert not any(wrong.values()), (wrong, reason)
        kernels = {"hierarchical"} if nodes > 1 else {"one_shot", "two_shot", "lamport"}
        assert set(algos) <= kernels, algos  # the custom path served every world call, never the engine alone
        assert "did not answer" not in reason and "failed" not in reason, reason


def _per_rank_setting_worker(rank, world_size, port, name, value):
    """Rank 1 alone sets ``name`` (a per-rank setting, docs/configuration.md): every path stays exact."""
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    pytest.importorskip("cupy")
    if rank == 1:
        os.environ[name] = value
    torch.cuda.set_device(0)
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              engine="gloo", device="cuda:0", max_bytes=4 << 20)  # fmt: skip
    backend = world.backend
    ok = {}
    try:
        for numel in (1000, 300_000, 1 << 20):  # 4 KB .. 4 MB of fp32: small and large tiles
            for algo in ("one_shot", "two_shot", "lamport") if backend.custom is not None else ("auto",):
                if algo == "lamport" and numel > backend.custom.workspace.lamport_capacity:
                    continue
                x = (torch.arange(numel, device="cuda") % 1000).float() + rank
                backend.all_reduce(x, algo=algo)
                torch.cuda.synchronize()
                want = (torch.arange(numel, device="cuda") % 1000).float() * world_size + sum(range(world_size))
                ok[f"{algo} {numel}"] = bool(torch.equal(x, want))
        gathered = torch.empty(world_size * 70_000, device="cuda")
        backend.all_gather(gathered, torch.full((70_000,), float(rank), device="cuda"))
        shard = torch.empty(70_000, device="cuda")
        backend.reduce_scatter(shard, torch.ones(world_size * 70_000, device="cuda") * (rank + 1))
        xs = torch.full((4, 256), float(rank + 1), device="cuda", dtype=torch.bfloat16)
        _, new_res = all_reduce_residual_rmsnorm(xs, torch.ones_like(xs), torch.ones(256, device="cuda",
                                                 dtype=torch.bfloat16))  # fmt: skip
        torch.cuda.synchronize()
        ok["all_gather"] = bool(
            torch.equal(gathered, torch.arange(world_size, device="cuda").float().repeat_interleave(70_000))
        )
        ok["reduce_scatter"] = bool(torch.all(shard == sum(r + 1 for r in range(world_size))))
        ok["fused"] = bool(torch.all(new_res.float() == 1 + sum(r + 1 for r in range(world_size))))
        ok["kernels"] = backend.custom is not None or name == "SAGELLM_COMM_HOSTNAME"
    finally:
        sagellm_comm.destroy()
    return ok


def _per_rank_settings():
    from sagellm_comm.config import SETTINGS

    return [s for s in SETTINGS if not s.agreed]


@pytest.mark.parametrize("setting", _per_rank_settings(), ids=lambda s: s.name)
def test_a_per_rank_setting_on_one_process_keeps_every_path_exact(setting):
    """The GPU side of tests/test_config.py (programmatic dependent launch exists only here)."""
    for ok in run_ranks(_per_rank_setting_worker, 2, setting.name, setting.example, env={}, timeout=300):
        assert all(ok.values()), ok


def _fp8_back_to_back_worker(rank, world_size, port, tokens, calls):
    import sagellm_comm
    from sagellm_comm.fused import (
        all_reduce_residual_rmsnorm,
        last_selection,
        quantize_fp8_reference,
        rmsnorm_reference,
    )

    pytest.importorskip("cupy")
    torch.cuda.set_device(0)
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, engine="gloo",
        device="cuda:0", max_bytes=1 << 22, kernel_timeout=20.0,
    )  # fmt: skip
    hidden = 4096
    out = {}
    try:
        g = torch.Generator(device="cuda").manual_seed(7)  # the same x on every rank: the sum is 4 x exactly
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        res = torch.ones_like(x)
        weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
        scale = torch.tensor([0.05], device="cuda")
        expected_res = ((x.float() * world_size).to(x.dtype).float() + 1).to(x.dtype)
        for mode in (None, "fp8", "fp8_per_token", "fp8_group128"):
            static = scale if mode == "fp8" else None
            for _ in range(calls):  # back to back, no host wait: each launch queued behind the previous one
                got = all_reduce_residual_rmsnorm(x, res, weight, 1e-6, world, mode, static)
            torch.cuda.synchronize()
            ok = bool(torch.equal(got[-1], expected_res))
            if mode is not None:  # within one FP8 step of the documented reference, scales within 2**-7
                q_ref, s_ref = quantize_fp8_reference(rmsnorm_reference(got[-1], weight, 1e-6), mode, static)
                q, q_ref = got[0].float(), q_ref.float()
                ok = ok and bool(((q - q_ref).abs() <= q_ref.abs() / 8 + 2**-9).all())
                ok = ok and bool(torch.allclose(got[1], s_ref, rtol=2**-7, atol=0))
            bits = torch.cat([t.reshape(-1).view(torch.uint8) for t in got]).long()  # every output's bytes
            out[str(mode)] = (last_selection(world).algo, ok, int((bits * torch.arange(1, bits.numel() + 1,
                              device="cuda")).sum()))  # fmt: skip
    finally:
        sagellm_comm.destroy()
    return out


@pytest.mark.parametrize("tokens", [1, 16])
def test_fused_fp8_in_four_processes_on_one_gpu_back_to_back(tokens):
    """Four processes sharing the GPU, every FP8 mode at 1 and 16 tokens of 4096 (at 16, one program a row: the
    static and group-128 binaries fill an SM each, so the four grids need every SM at once), 300 calls each
    queued back to back: ``new_residual`` exact, the FP8 output within one step of the reference, and every
    rank's outputs the same bytes (a position-weighted checksum)."""
    outs = run_ranks(_fp8_back_to_back_worker, 4, tokens, 300, env=ENV, timeout=540)
    for out in outs:
        assert all(ok for _, ok, _ in out.values()), out
    for mode in outs[0]:
        assert len({out[mode][2] for out in outs}) == 1, (mode, [out[mode] for out in outs])


def _copy_engine_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import gemm_all_reduce, group_gemm, last_selection

    torch.cuda.set_device(0)
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, engine="gloo",
        device="cuda:0", max_bytes=4 << 20,
    )  # fmt: skip
    out = {}
    try:
        for dtype in (torch.bfloat16, torch.float16):
            e = torch.finfo(dtype).eps
            # Rank 0's product 1 + 5/8 e, the bias -e/4: 1 where the bias goes into a partial before it is
            # rounded (the sequential path), 1 + e where it is added to the reduced sum.
            a = torch.zeros(2 * world_size, 16, device="cuda")
            if rank == 0:
                a[:, 0], a[:, 1] = 1.0, e / 2 + e / 8
            a, b = a.to(dtype), torch.ones(16, 64, device="cuda", dtype=dtype)
            bias = torch.full((64,), -e / 4, device="cuda", dtype=dtype)
            # Small integers: every partial and sum exact, so every path gives the same bits.
            g = torch.Generator(device="cuda").manual_seed(7 + rank)
            ai = torch.randint(-3, 4, (333, 16), device="cuda", generator=g).to(dtype)
            bi = torch.randint(
                -3, 4, (16, 520), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)
            ).to(dtype)
            bias_i = torch.arange(520, device="cuda").remainder(7).to(dtype)
            for path in ("sequential", "copy_engine"):
                if path == "copy_engine":
                    group_gemm(world).ce_chunks = 1
                y = gemm_all_reduce(a, b, group=world, bias=bias, path=path)
                assert last_selection(world).algo == path, last_selection(world)
                group_gemm(world).ce_chunks = None
                z = gemm_all_reduce(ai, bi, group=world, bias=bias_i, path=path)
                torch.cuda.synchronize()
                bits = hashlib.sha256(z.cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
                out[(path, str(dtype))] = (sorted(set(y.float().flatten().tolist())), bits)
    finally:
        sagellm_comm.destroy()
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_copy_engine_gemm_all_reduce_with_bias_matches_the_sequential_path(world_size):
    """The copy-engine GEMM + all-reduce with a bias, processes sharing the GPU: the bias goes into a partial before
    it is rounded (1, not 1 + eps, on the rounding case), exact inputs give the sequential path's bits, and every
    rank the same bits."""
    outs = run_ranks(_copy_engine_worker, world_size, env=ENV, timeout=240)
    for out in outs:
        for key, (values, _) in out.items():
            assert values == [1.0], (key, values)
        for dtype in ("torch.bfloat16", "torch.float16"):
            assert out[("copy_engine", dtype)][1] == out[("sequential", dtype)][1], dtype
            assert out[("copy_engine", dtype)][1] == outs[0][("copy_engine", dtype)][1], dtype
