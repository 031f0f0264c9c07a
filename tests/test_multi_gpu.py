"""The ``custom`` backend on real GPUs: one process per GPU, CUDA IPC over NVLink/P2P.

Needs at least 2 GPUs (skipped otherwise); world sizes 2, 4 and 8 run where that many GPUs are visible.
Run on a multi-GPU device machine with ``NCCL_NVLS_ENABLE=0 python -m pytest -m gpu tests/test_multi_gpu.py``.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from tests.conftest import rank_order_sum, run_ranks

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLDS = [w for w in (2, 4, 8) if w <= NGPU]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(NGPU < 2, reason="needs 2 GPUs (one process per GPU)"),
]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
MAX_BYTES = 4 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def _custom_backend(**kwargs):
    from sagellm_comm import CommBackend

    backend = CommBackend.create("custom", max_bytes=MAX_BYTES, **kwargs).init(timeout=120)
    assert backend.custom is not None, backend.custom_reason  # the kernels, not the NCCL fallback
    return backend


# ---------------------------------------------------------------------- correctness matrix


def _matrix_worker(rank: int, world_size: int, port: int) -> dict:
    backend = _custom_backend(kernel_timeout=20.0)
    dev = backend.device
    car = backend.custom
    cap = car.workspace.lamport_capacity
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    assert car.workspace.ranks_on_device == 1  # one GPU per rank: every SM (up to 128) runs a program
    assert car.max_programs == min(128, sms), car.max_programs
    wrong, digests, nccl_far = [], [], []
    seed = 0
    try:
        for dtype in DTYPES:
            itemsize = torch.empty((), dtype=dtype).element_size()
            for numel in (1, 7, 1001, 4096, 65_537, cap, 1_000_003 // itemsize, MAX_BYTES // itemsize):
                for algo in ("lamport", "one_shot", "two_shot", "auto"):
                    if algo == "lamport" and numel > cap:
                        continue
                    seed += 1
                    g = torch.Generator(device=dev).manual_seed(seed)  # same stream of numbers on every rank
                    inputs = [torch.randn(numel, device=dev, generator=g).to(dtype) for _ in range(world_size)]
                    x = inputs[rank].clone()
                    backend.all_reduce(x, algo=algo)
                    car.synchronize()
                    what = f"{dtype} n={numel} {algo} ({backend.last_selection.algo})"
                    if not torch.equal(x, rank_order_sum(inputs)):
                        wrong.append(what)
                    digests.append(_digest(x))
                    if algo == "auto":  # NCCL on the same data: close (its own order and precision)
                        y = inputs[rank].clone()
                        backend.all_reduce(y, algo="nccl")
                        tol = 1e-5 if dtype == torch.float32 else 0.1
                        if not torch.allclose(x.float(), y.float(), rtol=tol, atol=tol):
                            nccl_far.append(what)
                # zero-copy: a tensor allocated in the registered region, reduced in place
                if numel <= cap:
                    buf = car.get_buffer(numel, dtype)
                    g = torch.Generator(device=dev).manual_seed(10_000 + seed)
                    inputs = [torch.randn(numel, device=dev, generator=g).to(dtype) for _ in range(world_size)]
                    buf.copy_(inputs[rank])
                    car.all_reduce(buf, algo="one_shot")
                    car.synchronize()
                    if not torch.equal(buf, rank_order_sum(inputs)):
                        wrong.append(f"zero-copy {dtype} n={numel}")
        return {"wrong": wrong, "digests": digests, "nccl_far": nccl_far, "reason": backend.custom_reason}
    finally:
        backend.destroy()


@pytest.mark.parametrize("world_size", WORLDS)
def test_matrix_against_reference_on_real_gpus(world_size):
    results = run_ranks(_matrix_worker, world_size, env=ENV, timeout=400)
    for r, res in enumerate(results):
        assert res["wrong"] == [], f"rank {r} differs from the rank-order fp32 reference: {res['wrong']}"
        assert res["nccl_far"] == [], f"rank {r} far from NCCL: {res['nccl_far']}"
        assert res["digests"] == results[0]["digests"], f"rank {r} is not bit-identical to rank 0"
        assert f"custom kernels on {world_size} ranks" in res["reason"]


# ---------------------------------------------------------------------- back-to-back calls and graphs

STRESS = {"lamport": 4096, "one_shot": 65_537, "two_shot": 300_001}  # bf16 elements per algorithm


def _stress_worker(rank: int, world_size: int, port: int, calls: int, replays: int) -> tuple[int, int, float]:
    backend = _custom_backend(kernel_timeout=20.0)
    dev = backend.device
    car = backend.custom
    try:
        g = torch.Generator(device=dev).manual_seed(7)
        # small integers: every partial and the fp32 sum are exact, so the expected bits are known
        base = {a: torch.randint(-4, 4, (n,), device=dev, generator=g).to(torch.bfloat16) for a, n in STRESS.items()}
        tri = world_size * (world_size + 1) // 2  # sum over ranks of (rank + 1)
        expected = {(a, k): (base[a].float() * k * tri).to(torch.bfloat16) for a in STRESS for k in (1, 2, 3)}
        bufs = {a: torch.empty(n, dtype=torch.bfloat16, device=dev) for a, n in STRESS.items()}
        wrong = torch.zeros((), dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        for i in range(calls):  # back to back, changing data and algorithm, no host sync
            algo = ("lamport", "one_shot", "two_shot")[i % 3]
            k = i % 3 + 1
            x = bufs[algo]
            torch.mul(base[algo], k * (rank + 1), out=x)
            backend.all_reduce(x, algo=algo)
            wrong += (x != expected[(algo, k)]).sum()
        car.synchronize()
        eager_s = time.perf_counter() - t0
        stress_wrong = int(wrong)

        # CUDA graphs: one captured call per algorithm, replayed with new inputs each time
        wrong.zero_()
        graphs = {}
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for algo, x in bufs.items():
                backend.all_reduce(x, algo=algo)  # warm-up on the capture stream
                graphs[algo] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[algo], stream=side):
                    backend.all_reduce(x, algo=algo)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        for j in range(replays):
            for algo, x in bufs.items():
                k = j % 3 + 1
                torch.mul(base[algo], k * (rank + 1), out=x)
                graphs[algo].replay()
                wrong += (x != expected[(algo, k)]).sum()
        car.synchronize()
        return stress_wrong, int(wrong), eager_s
    finally:
        backend.destroy()


def test_ten_thousand_calls_and_graph_replays_on_real_gpus():
    world_size = WORLDS[-1]
    results = run_ranks(_stress_worker, world_size, 10_000, 1000, env=ENV, timeout=500)
    for r, (stress_wrong, graph_wrong, _) in enumerate(results):
        assert stress_wrong == 0, f"rank {r}: {stress_wrong} wrong elements over 10,000 back-to-back calls"
        assert graph_wrong == 0, f"rank {r}: {graph_wrong} wrong elements over 1,000 graph replays per algorithm"


# ---------------------------------------------------------------------- a rank that never arrives


def _missing_rank_worker(rank: int, world_size: int, port: int, algo: str) -> tuple[str, float, int | None]:
    from sagellm_comm.errors import CommTimeoutError

    backend = _custom_backend(kernel_timeout=1.0)
    try:
        message, elapsed, peer = "", 0.0, None
        if rank == 0:  # the other ranks never call
            x = torch.ones(1000, device=backend.device)
            t0 = time.monotonic()
            backend.all_reduce(x, algo=algo)
            try:
                backend.custom.synchronize()
            except CommTimeoutError as exc:
                message, peer = str(exc), exc.details.get("peer")
            elapsed = time.monotonic() - t0
            try:  # poisoned: the next call fails at once
                backend.all_reduce(x, algo=algo)
            except CommTimeoutError:
                message += " | poisoned"
        backend.exchange(None)  # keep every rank's memory mapped until rank 0 is done
        return message, elapsed, peer
    finally:
        backend.destroy()


@pytest.mark.parametrize("algo", ["one_shot", "two_shot", "lamport"])
def test_missing_rank_gives_timeout_naming_the_peer_on_real_gpus(algo):
    message, elapsed, peer = run_ranks(_missing_rank_worker, 2, algo, env=ENV, timeout=240)[0]
    assert "peer rank 1 never arrived" in message, message
    assert message.endswith("| poisoned"), message
    assert peer == 1
    assert elapsed < 15.0


# ---------------------------------------------------------------------- copy-engine GEMM + all-reduce

CE_SHAPES = ((64, 4096), (300, 1000), (1, 8))  # (M, N); K = 16: small-integer partials and sums are exact


def _copy_engine_stress_worker(rank: int, world_size: int, port: int, calls: int, replays: int) -> tuple[int, int]:
    import sagellm_comm
    from sagellm_comm.fused import gemm_all_reduce, last_selection

    sagellm_comm.init(backend="custom", timeout=120)
    dev = torch.device("cuda", torch.cuda.current_device())
    try:
        g = torch.Generator(device=dev).manual_seed(11)
        a = {s: torch.randint(-2, 3, (s[0], 16), device=dev, generator=g).to(torch.bfloat16) for s in CE_SHAPES}
        b = {s: torch.randint(-2, 3, (16, s[1]), device=dev, generator=g).to(torch.bfloat16) for s in CE_SHAPES}
        tri = world_size * (world_size + 1) // 2
        expected = {s: (a[s].float() @ b[s].float() * tri).to(torch.bfloat16) for s in CE_SHAPES}
        wrong = torch.zeros((), dtype=torch.int64, device=dev)
        for i in range(calls):  # back to back, changing shapes, no host sync
            s = CE_SHAPES[i % len(CE_SHAPES)]
            y = gemm_all_reduce(a[s] * (rank + 1), b[s], path="copy_engine")
            wrong += (y != expected[s]).sum()
        assert last_selection().algo == "copy_engine"
        torch.cuda.synchronize(dev)
        eager_wrong = int(wrong)
        wrong.zero_()
        s = CE_SHAPES[0]
        x = torch.empty_like(a[s])
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            gemm_all_reduce(x, b[s], path="copy_engine")  # warm-up on the capture stream
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                y = gemm_all_reduce(x, b[s], path="copy_engine")
        torch.cuda.current_stream(dev).wait_stream(side)
        for j in range(replays):  # new input every replay
            k = j % 3 + 1
            torch.mul(a[s], k * (rank + 1), out=x)
            graph.replay()
            wrong += (y != (expected[s].float() * k).to(torch.bfloat16)).sum()
        torch.cuda.synchronize(dev)
        return eager_wrong, int(wrong)
    finally:
        sagellm_comm.destroy()


def test_copy_engine_gemm_all_reduce_back_to_back_and_graphs_on_real_gpus():
    world_size = WORLDS[-1]
    results = run_ranks(_copy_engine_stress_worker, world_size, 3000, 1000, env=ENV, timeout=400)
    for r, (eager_wrong, graph_wrong) in enumerate(results):
        assert eager_wrong == 0, f"rank {r}: {eager_wrong} wrong elements over 3,000 back-to-back calls"
        assert graph_wrong == 0, f"rank {r}: {graph_wrong} wrong elements over 1,000 graph replays"


def _copy_engine_missing_rank_worker(rank: int, world_size: int, port: int) -> str:
    import sagellm_comm
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.fused import GemmAllReduce, gemm_workspace_bytes
    from sagellm_comm.workspace import SymmetricWorkspace

    world = sagellm_comm.init(backend="custom", timeout=120)
    backend = world.backend
    nbytes = gemm_workspace_bytes(1 << 20)
    ws = SymmetricWorkspace.rendezvous(rank, world_size, nbytes, backend.device, backend.exchange)
    gemm = GemmAllReduce(ws, backend.custom, timeout_s=1.0)
    message = ""
    try:
        if rank == 0:  # the other ranks never call
            ones = torch.ones(64, 64, dtype=torch.bfloat16, device=backend.device)
            t0 = time.monotonic()
            gemm(ones, ones, path="copy_engine")
            torch.cuda.synchronize()
            try:
                gemm.check_errors()
            except CommTimeoutError as exc:
                message = f"{exc} | {time.monotonic() - t0:.1f} s"
        backend.exchange(None)
        return message
    finally:
        ws.close()
        sagellm_comm.destroy()


def test_copy_engine_missing_rank_gives_timeout_naming_the_peer_on_real_gpus():
    message = run_ranks(_copy_engine_missing_rank_worker, 2, env=ENV, timeout=240)[0]
    assert "peer rank 1 never arrived at the copy-engine barrier" in message, message
    assert float(message.rsplit("| ", 1)[1].split()[0]) < 15.0, message


# ---------------------------------------------------------------------- fused operations


def _fused_worker(rank: int, world_size: int, port: int) -> dict:
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, gemm_all_reduce, last_selection, rmsnorm_reference

    world = sagellm_comm.init(backend="custom", timeout=120)
    dev = world.backend.device
    out: dict = {"rmsnorm": [], "gemm": [], "digests": []}
    try:
        assert world.backend.custom is not None, world.backend.custom_reason
        for dtype in (torch.bfloat16, torch.float16):
            for tokens, hidden in ((1, 4096), (7, 8192), (128, 4096), (515, 4096)):
                g = torch.Generator(device=dev).manual_seed(tokens * hidden)
                xs = [torch.randn(tokens, hidden, device=dev, generator=g).to(dtype) for _ in range(world_size)]
                residual = torch.randn(tokens, hidden, device=dev, generator=g).to(dtype)
                weight = torch.rand(hidden, device=dev, generator=g).to(dtype) + 0.5
                normed, new_res = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 1e-6)
                torch.cuda.synchronize(dev)
                ref_res = (rank_order_sum(xs).float() + residual.float()).to(dtype)
                ref_norm = rmsnorm_reference(ref_res, weight, 1e-6)
                ok = torch.allclose(new_res.float(), ref_res.float(), rtol=1e-2, atol=1e-2) and torch.allclose(
                    normed.float(), ref_norm.float(), rtol=2e-2, atol=2e-2
                )
                out["rmsnorm"].append((str(dtype), tokens, hidden, last_selection().algo, ok))
                out["digests"].append(_digest(normed))
            for m, n in ((1, 4096), (16, 8192), (300, 4096), (2048, 4096)):
                k_shard = 14336 // world_size
                g = torch.Generator(device=dev).manual_seed(m * n)
                a_all = [torch.randn(m, k_shard, device=dev, generator=g).to(dtype) * 0.1 for _ in range(world_size)]
                b_all = [torch.randn(k_shard, n, device=dev, generator=g).to(dtype) * 0.1 for _ in range(world_size)]
                bias = torch.randn(n, device=dev, generator=g).to(dtype)
                ref = sum(a.float() @ b.float() for a, b in zip(a_all, b_all, strict=True)) + bias.float()
                for path in ("auto", "fused", "chunked", "copy_engine", "copy_engine_zc", "sequential"):
                    zero_copy = path.endswith("_zc")  # the result as a workspace view: same bits
                    path = path.removesuffix("_zc")
                    y = gemm_all_reduce(a_all[rank], b_all[rank], bias=bias, path=path, zero_copy=zero_copy)
                    torch.cuda.synchronize(dev)
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    out["gemm"].append((str(dtype), m, n, path, last_selection().algo, err))
                    out["digests"].append(_digest(y))
        return out
    finally:
        sagellm_comm.destroy()


def test_fused_ops_on_real_gpus():
    world_size = WORLDS[-1]
    results = run_ranks(_fused_worker, world_size, env=ENV, timeout=400)
    for r, res in enumerate(results):
        bad = [row for row in res["rmsnorm"] if not row[-1]]
        assert bad == [], f"rank {r}: fused AR+RMSNorm off the reference: {bad}"
        forced = [row for row in res["gemm"] if row[3] != "auto" and row[3] != row[4]]
        assert forced == [], f"rank {r}: a forced path did not run: {forced}"
        far = [row for row in res["gemm"] if row[-1] > 2e-2]
        assert far == [], f"rank {r}: GEMM+AR off the fp32 reference: {far}"
        assert res["digests"] == results[0]["digests"], f"rank {r} is not bit-identical to rank 0"
