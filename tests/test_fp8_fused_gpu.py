"""FP8 on a GPU with virtual ranks (N ranks on one device, one launch for all): the fused all-reduce + residual
+ RMSNorm + FP8 of every mode on every algorithm against the reference, CUDA graphs, ``torch._scaled_mm`` on its
outputs, and the FP8-payload all-reduce.

Run on the device machine: ``python3 -m pytest -m gpu tests/test_fp8_fused_gpu.py``.  Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.fp8_checks import assert_within_one_step, expand_scales, payload_bound

pytestmark = pytest.mark.gpu

MODES = ("fp8", "fp8_per_token", "fp8_group128")
ALGOS = ("one_shot", "two_shot", "lamport", "auto")
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda w: f"W{w}")
def fused(request):
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    vg = VirtualRankGroup(request.param, max_bytes=64 << 20, timeout_s=20.0)
    vf = VirtualFused(vg, gemm_max_output_bytes=1 << 20)
    yield vf
    vf.close()
    vg.close()


def _inputs(w, rows, hidden, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(w, rows, hidden, device="cuda", dtype=dtype, generator=g)
    residual = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=g).expand(w, -1, -1).contiguous()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
    if rows > 2:  # an all-zero row: floor scales, zero q
        x[:, 1] = 0
        residual[:, 1] = 0
    return x, residual, weight


def _reference(x, residual, weight, eps, quant, scale):
    """The unfused chain in torch ops (rank-order fp32 all-reduce, add, RMSNorm), then the reference quantiser."""
    from sagellm_comm.fused import quantize_fp8_reference

    acc = x[0].float()
    for r in range(1, x.shape[0]):
        acc = acc + x[r].float()
    new_res = (acc.to(x.dtype).float() + residual[0].float()).to(x.dtype)
    v = new_res.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    q, s = quantize_fp8_reference(y, quant, scale)
    return q, s, new_res


def _fits_lamport(fused, rows, hidden):
    return rows * hidden <= fused.group.workspaces[0].lamport_capacity


@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 8192), (33, 4096), (300, 8192)])
@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_mode_and_algorithm_against_the_reference(fused, algo, quant, rows, hidden):
    _check_against_reference(fused, algo, quant, rows, hidden, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("quant", MODES)
def test_other_input_dtypes(fused, quant, dtype):
    _check_against_reference(fused, "auto", quant, 9, 4096, dtype)


def _check_against_reference(fused, algo, quant, rows, hidden, dtype):
    if algo == "lamport" and not _fits_lamport(fused, rows, hidden):
        pytest.skip("over the Lamport buffers")
    w = fused.world_size
    x, residual, weight = _inputs(w, rows, hidden, dtype, seed=rows * hidden + len(quant))
    scale = torch.tensor([0.02], device="cuda") if quant == "fp8" else None
    q, scales, new_res = fused.all_reduce_residual_rmsnorm(x, residual, weight, 1e-6, algo=algo, quant=quant,
                                                           scale=scale)  # fmt: skip
    torch.cuda.synchronize()
    fused.group.check_errors()
    q_ref, s_ref, res_ref = _reference(x, residual, weight, 1e-6, quant, scale)
    assert torch.equal(new_res[0], res_ref), "new_residual must equal all-reduce then add, bit for bit"
    if quant == "fp8":
        assert scales is scale
    else:
        assert scales.shape == (w, *s_ref.shape) and scales.dtype == torch.float32
        torch.testing.assert_close(scales[0], s_ref, rtol=2**-7, atol=0)
        if rows > 2:
            assert torch.all(scales[:, 1] == 2.0**-117) and torch.all(q[:, 1].float() == 0)
    assert_within_one_step(q[0], scales if quant == "fp8" else scales[0], q_ref, s_ref, f"{algo} {quant}")
    # Where y is the reference's (all but the rows whose norm sums round differently), q is its bits.
    same = (q[0].view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same >= 0.99, f"only {same:.4f} of q equals the reference bit for bit"
    for r in range(1, w):
        assert torch.equal(q[r].view(torch.uint8), q[0].view(torch.uint8)), f"rank {r}: q differs"
        assert torch.equal(new_res[r], new_res[0]), f"rank {r}: new_residual differs"
        if quant != "fp8":
            assert torch.equal(scales[r], scales[0]), f"rank {r}: scales differ"


def test_unquantised_lamport_and_interleaving(fused):
    """The unquantised op on the Lamport kernel, and every fused form interleaved with the plain all-reduces on the
    same workspace: epochs, Lamport counters and buffer rotation stay in step."""
    w = fused.world_size
    x, residual, weight = _inputs(w, 5, 4096, torch.bfloat16, seed=11)
    q_ref, s_ref, res_ref = _reference(x, residual, weight, 1e-6, "fp8_per_token", None)
    for i in range(30):
        algo = ("lamport", "one_shot", "two_shot")[i % 3]
        quant = (None, *MODES)[i % 4]
        scale = torch.tensor([0.05], device="cuda") if quant == "fp8" else None
        outs = fused.all_reduce_residual_rmsnorm(x, residual, weight, algo=algo, quant=quant, scale=scale)
        stacked = torch.full((w, 3000), float(i), device="cuda", dtype=torch.bfloat16)
        fused.group.all_reduce_stacked(stacked, algo=("lamport", "one_shot", "two_shot")[(i + 1) % 3])
        torch.cuda.synchronize()
        assert torch.equal(outs[-1][0], res_ref), (i, algo, quant)
        assert torch.all(stacked == float(i * w)), (i, algo, quant)
        if quant == "fp8_per_token":
            assert_within_one_step(outs[0][0], outs[1][0], q_ref, s_ref)
    fused.group.check_errors()


def test_cuda_graph_replays_every_mode(fused):
    w = fused.world_size
    x, residual, weight = _inputs(w, 16, 4096, torch.bfloat16, seed=5)
    scale = torch.tensor([0.05], device="cuda")

    def block():
        outs = []
        for algo, quant in (("lamport", "fp8"), ("two_shot", "fp8_per_token"), ("one_shot", "fp8_group128")):
            static = scale if quant == "fp8" else None  # the dynamic modes compute their own scales
            outs += fused.all_reduce_residual_rmsnorm(x, residual, weight, algo=algo, quant=quant, scale=static)
        return [t for t in outs if t is not scale]

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
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "a replay differs from eager"
    x.mul_(-0.5)
    scale.fill_(0.1)  # the static scale is read on the device: a replay sees the new value
    graph.replay()
    torch.cuda.synchronize()
    fresh = block()
    torch.cuda.synchronize()
    for got, want in zip(captured, fresh, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    fused.group.check_errors()


@pytest.mark.parametrize("hidden", [4096, 5120, 7168, 8192])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("quant", (None, *MODES), ids=str)
def test_lamport_rows_split_over_programs(fused, quant, rows, hidden):
    """A few rows on the Lamport kernel, each row split over programs that exchange its sum of squares (and, per
    token, its amax): the reference's values, every rank's bits identical."""
    from sagellm_comm.fused.rmsnorm import row_split

    split = row_split(rows, hidden, fused.rmsnorm.max_programs)
    if rows * 2 <= fused.rmsnorm.max_programs // 2:
        assert split > 1, "a few rows must be split over programs"
    if quant is not None:
        _check_against_reference(fused, "lamport", quant, rows, hidden, torch.bfloat16)
        return
    w = fused.world_size
    x, residual, weight = _inputs(w, rows, hidden, torch.bfloat16, seed=rows + hidden)
    normed, new_res = fused.all_reduce_residual_rmsnorm(x, residual, weight, 1e-6, algo="lamport")
    torch.cuda.synchronize()
    fused.group.check_errors()
    acc = x[0].float()
    for r in range(1, w):
        acc = acc + x[r].float()
    res_ref = (acc.to(x.dtype).float() + residual[0].float()).to(x.dtype)
    v = res_ref.float()
    y_ref = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()).to(x.dtype)
    assert torch.equal(new_res[0], res_ref)
    torch.testing.assert_close(normed[0].float(), y_ref.float(), rtol=2**-7, atol=2**-7)
    for r in range(1, w):
        assert torch.equal(normed[r], normed[0]) and torch.equal(new_res[r], new_res[0]), f"rank {r} differs"


def test_split_rows_one_call_at_a_time_finish_in_time(fused):
    """Split-row calls of 3-4 rows at hidden 5120-8192, every mode, each waited for on its own: every call ends
    within a second (a stall of the row exchange would hold the device for the kernel's whole timeout), its bits
    equal the first call's, and no error is recorded.  The fused kernels take the group's timeout."""
    import time

    from sagellm_comm.launch import timeout_ticks

    assert fused.rmsnorm._timeout == timeout_ticks(fused.group.timeout_s, True)
    w = fused.world_size
    scale = torch.tensor([0.05], device="cuda")
    for hidden in (5120, 7168, 8192):
        for rows in (3, 4):
            x, residual, weight = _inputs(w, rows, hidden, torch.bfloat16, seed=rows * hidden)
            for quant in (None, *MODES):
                static = scale if quant == "fp8" else None
                first = None
                for call in range(60):
                    start = time.monotonic()
                    outs = fused.all_reduce_residual_rmsnorm(x, residual, weight, algo="lamport", quant=quant,
                                                             scale=static)  # fmt: skip
                    torch.cuda.synchronize()
                    took = time.monotonic() - start
                    fused.group.check_errors()
                    bits = [t.view(torch.uint8).clone() for t in outs if t is not scale]
                    if first is None:
                        first = bits
                        continue
                    same = all(torch.equal(a, b) for a, b in zip(bits, first, strict=True))
                    assert same, f"hidden {hidden}, {rows} rows, {quant}: call {call} differs from the first"
                    assert took < 1.0, f"hidden {hidden}, {rows} rows, {quant}: call {call} took {took:.1f} s"


def test_split_rows_back_to_back_and_in_a_graph(fused):
    """Thousands of split-row calls back to back (every mode, 1-4 rows, the plain all-reduces between them on the
    same workspace), then the same calls captured in a CUDA graph and replayed: row flags, Lamport counters and
    buffers stay in step, and every result is exact (new_residual) or equal to the first call's bits."""
    w = fused.world_size
    hidden = 4096
    cases = []
    for rows in (1, 2, 3, 4):
        x, residual, weight = _inputs(w, rows, hidden, torch.bfloat16, seed=100 + rows)
        acc = x.float().sum(0)
        res_ref = (acc.to(x.dtype).float() + residual[0].float()).to(x.dtype)
        cases.append((x, residual, weight, res_ref))
    scale = torch.tensor([0.05], device="cuda")
    modes = (None, *MODES)
    first = {}
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")

    def step(i):
        x, residual, weight, res_ref = cases[i % 4]
        quant = modes[(i // 4) % 4]
        outs = fused.all_reduce_residual_rmsnorm(x, residual, weight, algo="lamport", quant=quant,
                                                 scale=scale if quant == "fp8" else None)  # fmt: skip
        key = (i % 4, quant)
        if key not in first:
            first[key] = [t.clone() for t in outs if t is not scale]
        got = [t for t in outs if t is not scale]
        for a, b in zip(got, first[key], strict=True):
            wrong.add_((a.view(torch.uint8) != b.view(torch.uint8)).sum())
        wrong.add_((outs[-1][0] != res_ref).sum())
        plain = torch.full((w, 2000), float(i % 7), device="cuda", dtype=torch.bfloat16)
        fused.group.all_reduce_stacked(plain, algo="lamport")
        wrong.add_((plain != float((i % 7) * w)).sum())

    for i in range(3000):
        step(i)
    torch.cuda.synchronize()
    fused.group.check_errors()
    assert int(wrong) == 0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(16):
            step(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(16):
            step(i)
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    fused.group.check_errors()
    assert int(wrong) == 0


def test_a_missing_rank_on_split_rows_names_the_rank_and_gives_nan():
    """Rank 1 never calls: rank 0's split-row Lamport call times out naming rank 1 in the Lamport phase (not the
    row exchange of its own programs), and every output, scales included, is NaN."""
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.fused.rmsnorm import FusedAllReduceRMSNorm, row_split
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 20, "cuda:0")
    try:
        rank0 = FusedAllReduceRMSNorm(workspaces[0], timeout_s=0.2)
        rows, hidden = 2, 4096
        assert row_split(rows, hidden, rank0.max_programs) > 1
        x = torch.ones(rows, hidden, device="cuda", dtype=torch.bfloat16)
        q, scales, new_res = rank0(x, torch.ones_like(x), torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                                   algo="lamport", quant="fp8_per_token")  # fmt: skip
        torch.cuda.synchronize()
        with pytest.raises(CommTimeoutError) as info:
            rank0.check_errors()
        assert info.value.details["peer"] == 1 and info.value.details["phase"] == "lamport", info.value.details
        assert bool(torch.isnan(new_res).all()) and bool(torch.isnan(scales).all())
        assert bool(torch.all(q.view(torch.uint8) & 0x7F == 0x7F)), "q must be FP8 NaN"
    finally:
        for ws in workspaces:
            ws.close()


def _weights_fp8(n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    wt = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    return wt


def test_scaled_mm_takes_the_outputs(fused):
    """``q`` with its per-tensor scale and with per-row scales feeds ``torch._scaled_mm`` as is."""
    w = fused.world_size
    m, k, n = 32, 4096, 1024
    x, residual, weight = _inputs(w, m, k, torch.bfloat16, seed=7)
    wt = _weights_fp8(n, k, seed=8)
    # Per tensor: one scale each side.
    scale_a = torch.tensor([0.02], device="cuda")
    q, _, _ = fused.all_reduce_residual_rmsnorm(x, residual, weight, quant="fp8", scale=scale_a)
    scale_b = (wt.abs().amax() / 448.0).reshape(())
    wq = (wt / scale_b).to(E4M3)
    out = torch._scaled_mm(q[0], wq.t(), scale_a=scale_a.reshape(()), scale_b=scale_b, out_dtype=torch.bfloat16)
    want = (q[0].float() * scale_a) @ (wq.float() * scale_b).t()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    # Per row: scale_a [M, 1] from the kernel, scale_b [1, N].
    q, scales, _ = fused.all_reduce_residual_rmsnorm(x, residual, weight, quant="fp8_per_token")
    row_b = (wt.abs().amax(1, keepdim=True) / 448.0).float()  # [N, 1]
    wq = (wt / row_b).to(E4M3)
    out = torch._scaled_mm(q[0], wq.t(), scale_a=scales[0], scale_b=row_b.t().contiguous(), out_dtype=torch.bfloat16)
    want = (q[0].float() * scales[0]) @ (wq.float() * row_b).t()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    # Per 128-group: the dequantised product (every torch build has it).
    q, scales, _ = fused.all_reduce_residual_rmsnorm(x, residual, weight, quant="fp8_group128")
    deq = q[0].float() * expand_scales(scales[0], q[0])
    _, new_res = fused.all_reduce_residual_rmsnorm(x, residual, weight)  # unquantised: (normed, new_residual)
    y = torch.nn.functional.rms_norm(new_res[0].float(), (k,), weight.float(), 1e-6)
    torch.testing.assert_close(deq @ wt.t(), y @ wt.t(), rtol=0.1, atol=0.1 * float((y @ wt.t()).abs().max()))


def test_scaled_mm_blockwise_takes_group128(fused):
    """Where this torch's ``_scaled_mm`` has 1x128 x 128x128 block scaling (Hopper), the group scales feed it."""
    w = fused.world_size
    m, k, n = 128, 4096, 1024
    x, residual, weight = _inputs(w, m, k, torch.bfloat16, seed=9)
    q, scales, _ = fused.all_reduce_residual_rmsnorm(x, residual, weight, quant="fp8_group128")
    wt = _weights_fp8(n, k, seed=10)
    blocks = wt.view(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448.0  # [N/128, K/128]
    wq = (wt / blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(E4M3)
    scale_a = scales[0].t().contiguous().t()  # [M, K/128], outer-dim major as the kernels require
    try:
        out = torch._scaled_mm(q[0], wq.t(), scale_a=scale_a, scale_b=blocks.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch's _scaled_mm has no 1x128 block scaling here: {exc}")
    want = (q[0].float() * expand_scales(scales[0], q[0])) @ (
        wq.float() * blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
    ).t()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["normal", "student_t", "outliers"])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (64, 8192), (1000, 8192)])
def test_fp8_payload_error_and_identical_ranks(fused, kind, rows, hidden):
    from sagellm_comm.benchmark.payload_error import activations, error_stats, fp32_reference

    w = fused.world_size
    inputs = [t.to(torch.bfloat16) for t in activations(kind, w, rows, hidden, seed=rows, device="cuda")]
    stacked = torch.stack(inputs).view(w, -1).contiguous()
    fused.group.all_reduce_stacked(stacked, payload="fp8")
    torch.cuda.synchronize()
    fused.group.check_errors()
    ref = fp32_reference(inputs).view(-1)
    assert float(((stacked[0].float() - ref).abs() / payload_bound([t.view(-1) for t in inputs], ref, w)).max()) <= 1
    stats = error_stats(stacked[0].view(rows, hidden), inputs)
    assert 1e-3 < stats["rel_l2"] <= 0.05, stats
    for r in range(1, w):
        assert torch.equal(stacked[r], stacked[0]), f"rank {r} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_payload_non_finite_values_stay_in_their_element(fused, dtype):
    """An inf in one rank's input is NaN in that element, a sum of finite values beyond the fp32 range saturates at
    the dtype's largest value; its block's other elements stay finite."""
    w = fused.world_size
    n = 128 * 4 * w
    x = torch.full((w, n), 0.25, device="cuda", dtype=dtype)
    expected = torch.full((n,), 0.25 * w, device="cuda")
    x[w - 1, 5], x[0, n - 3] = float("inf"), float("-inf")  # in the first and the last chunk
    x[:, 128:256], expected[128:256] = 1e37, 1e37 * w
    x[:, 130], expected[130] = 3e38, torch.finfo(dtype).max
    expected[[5, n - 3]] = float("nan")
    fused.group.all_reduce_stacked(x, payload="fp8")
    torch.cuda.synchronize()
    fused.group.check_errors()
    nan = expected.isnan()
    bits = x.view(torch.int32 if dtype == torch.float32 else torch.int16)
    assert all(torch.equal(bits[r], bits[0]) for r in range(w)), "ranks differ"
    assert bool(x[0][nan].isnan().all()) and bool(x[0][~nan].isfinite().all())
    assert float(x[0][130]) == torch.finfo(dtype).max
    assert bool(((x[0][~nan].float() - expected[~nan]).abs() <= expected[~nan] / 8).all())


def test_fp8_payload_under_a_cuda_graph(fused):
    w = fused.world_size
    x = torch.randn(w, 8192 * 16, device="cuda", dtype=torch.bfloat16)
    work = x.clone()

    def call():
        work.copy_(x)
        fused.group.all_reduce_stacked(work, payload="fp8")

    call()
    torch.cuda.synchronize()
    eager = work.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(work, eager)
    fused.group.check_errors()
