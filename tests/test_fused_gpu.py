"""Fused kernels on a GPU with virtual ranks (N ranks on one device, one launch per kernel for all ranks).

Run on the device machine: ``python3 -m pytest -m gpu tests/test_fused_gpu.py``.  Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm_comm.errors import BackendNotSupportedError

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda w: f"W{w}")
def fused(request):
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    vg = VirtualRankGroup(request.param, max_bytes=256 << 20, timeout_s=20.0)
    vf = VirtualFused(vg, gemm_max_output_bytes=256 << 20)
    yield vf
    vf.close()
    vg.close()


def _rms_ref(x, residual, weight, eps):
    acc = x[0].float()
    for r in range(1, x.shape[0]):  # the all-reduce: fp32 in rank order (torch's sum(0) may reorder), rounded once
        acc = acc + x[r].float()
    reduced = acc.to(x.dtype)
    new_res = (reduced.float() + residual[0].float()).to(x.dtype)
    v = new_res.float()
    normed = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return normed, new_res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 8192), (128, 4096), (2048, 8192), (5, 1000)])
@pytest.mark.parametrize("algo", ["one_shot", "two_shot", "auto"])
def test_all_reduce_rmsnorm_every_shape(fused, dtype, rows, hidden, algo):
    w = fused.world_size
    g = torch.Generator(device="cuda").manual_seed(rows * hidden)
    x = torch.randn(w, rows, hidden, device="cuda", dtype=dtype, generator=g)
    residual = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g).expand(w, -1, -1).contiguous()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
    normed, new_res = fused.all_reduce_residual_rmsnorm(x, residual, weight, 1e-6, algo=algo)
    torch.cuda.synchronize()
    fused.group.check_errors()
    ref_normed, ref_res = _rms_ref(x, residual, weight, 1e-6)
    assert torch.equal(new_res[0], ref_res), "new_residual must equal all-reduce then add, bit for bit"
    torch.testing.assert_close(normed[0], ref_normed, rtol=1.6e-2, atol=1e-2)
    for r in range(1, w):
        assert torch.equal(normed[r], normed[0]) and torch.equal(new_res[r], new_res[0]), f"rank {r} differs"


def _gemm_ref(a, b, bias):
    partials = torch.bmm(a.float(), b.float()).to(a.dtype).float()  # each rank's output, rounded once
    ref = partials.sum(0)
    if bias is not None:
        ref += bias.float()
    return ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16, 100, 4096])
@pytest.mark.parametrize("n", [4096, 8192])
@pytest.mark.parametrize("path", ["fused", "chunked", "sequential"])
def test_gemm_all_reduce_every_shape_class(fused, dtype, m, n, path):
    w = fused.world_size
    k = 14336 // w
    g = torch.Generator(device="cuda").manual_seed(m + n)
    a = torch.randn(w, m, k, device="cuda", dtype=dtype, generator=g)
    weight = (torch.randn(w, n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = weight.transpose(1, 2)  # [W, K, N] view of an nn.Linear-style [N, K] weight
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=g) if m % 2 == 0 else None
    out = fused.gemm_all_reduce(a, b, bias=bias, path=path)
    torch.cuda.synchronize()
    fused.gemm.check_errors()
    torch.testing.assert_close(out[0].float(), _gemm_ref(a, b, bias), rtol=2e-2, atol=5e-2)
    for r in range(1, w):
        assert torch.equal(out[r], out[0]), f"rank {r} differs"


def test_gemm_all_reduce_largest_m(fused):
    w, m, n = fused.world_size, 16384, 4096
    k = 14336 // w
    a = torch.randn(w, m, k, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(w, k, n, device="cuda") / k**0.5).to(torch.bfloat16)
    out = fused.gemm_all_reduce(a, b)
    sel = fused.gemm.last_selection  # what ran (the stacked layout turns a copy-engine choice into sequential)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[0].float(), _gemm_ref(a, b, None), rtol=2e-2, atol=5e-2)
    assert sel.algo in ("fused", "chunked", "sequential") and sel.rule_id
    if w == 2:
        assert sel.rule_id == "virtual-no-copy-engine", sel
    with pytest.raises(BackendNotSupportedError, match="copy_engine"):
        fused.gemm_all_reduce(a[:, :64], b, path="copy_engine")


def test_one_shot_consumer_and_back_to_back_calls(fused):
    """Alternating kernels and shapes on both workspaces: epochs, parities and flags stay consistent."""
    w = fused.world_size
    k = 2048 // w
    x = torch.randn(w, 64, 4096, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16).expand(w, -1, -1).contiguous()
    weight = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    ref_normed, ref_res = _rms_ref(x, res, weight, 1e-6)
    outs = []
    for i in range(40):
        m = (1, 33, 256, 512)[i % 4]
        a = torch.full((w, m, k), 0.5, device="cuda", dtype=torch.bfloat16)
        b = torch.full((w, k, 256), float(i % 3 + 1) / k, device="cuda", dtype=torch.bfloat16)
        outs.append((fused.gemm_all_reduce(a, b, path="fused", one_shot=(i % 5 == 0)), 0.5 * (i % 3 + 1) * w))
        normed, new_res = fused.all_reduce_residual_rmsnorm(x, res, weight, algo=("one_shot", "two_shot")[i % 2])
        outs.append((new_res, None))
        stacked = torch.full((w, 1000), float(i), device="cuda")
        fused.group.all_reduce_stacked(stacked)
        outs.append((stacked, float(i * w)))
    torch.cuda.synchronize()
    fused.group.check_errors()
    fused.gemm.check_errors()
    for t, want in outs:
        if want is None:
            assert torch.equal(t[0], ref_res)
        else:
            assert torch.allclose(t.float(), torch.full_like(t.float(), want), rtol=1e-2), (t.flatten()[:4], want)


def test_cuda_graph_of_a_tp_block(fused):
    """attention-out GEMM+AR -> AR+RMSNorm -> MLP-down GEMM+AR -> AR+RMSNorm, captured once, replayed."""
    w, hidden, tokens = fused.world_size, 4096, 256
    k = 14336 // w
    dt = torch.bfloat16
    x = torch.randn(w, tokens, k, device="cuda", dtype=dt)
    w_o = (torch.randn(w, k, hidden, device="cuda") / k**0.5).to(dt)
    w_down = (torch.randn(w, hidden, hidden, device="cuda") / hidden**0.5).to(dt)
    residual = torch.randn(tokens, hidden, device="cuda", dtype=dt).expand(w, -1, -1).contiguous()
    gamma = torch.ones(hidden, device="cuda", dtype=dt)

    def block():
        h = fused.gemm_all_reduce(x, w_o, path="fused")
        normed, res = fused.all_reduce_residual_rmsnorm(h, residual, gamma)  # h already reduced: W * h
        out = fused.gemm_all_reduce(normed, w_down, path="fused")
        return fused.all_reduce_residual_rmsnorm(out, res, gamma)

    eager = [t.clone() for t in block()]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        block()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, eager, strict=True):
            assert torch.equal(got, want), "a replay differs from the eager block"
    x.mul_(-1)  # replays read the captured addresses: new contents, new result
    graph.replay()
    torch.cuda.synchronize()
    ref = [t.clone() for t in block()]
    torch.cuda.synchronize()
    for got, want in zip(captured, ref, strict=True):
        assert torch.equal(got, want)
    fused.group.check_errors()
    fused.gemm.check_errors()


def test_fused_rmsnorm_matches_torch_rms_norm(fused):
    """Against torch's own rms_norm on the all-reduced sum (tolerance: different reduction order)."""
    w = fused.world_size
    x = torch.randn(w, 33, 8192, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(33, 8192, device="cuda", dtype=torch.bfloat16).expand(w, -1, -1).contiguous()
    weight = torch.rand(8192, device="cuda", dtype=torch.bfloat16) + 0.5
    normed, new_res = fused.all_reduce_residual_rmsnorm(x, res, weight, 1e-5)
    ref = F.rms_norm(new_res[0].float(), (8192,), weight.float(), 1e-5).to(torch.bfloat16)
    torch.testing.assert_close(normed[0], ref, rtol=1.6e-2, atol=1e-2)
