"""FP8 output of the fused all-reduce + residual + RMSNorm on the CPU: the kernels under the Triton interpreter
(ranks as processes sharing a file-backed workspace), the Gloo fallback, the reference quantiser, bad input.

The default run takes a few representative combinations (every mode and algorithm at W = 2, odd token counts,
an odd world size); the sweep over W = 2..8 is ``slow``.
"""

from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch

from sagellm_comm.selector import Selection
from tests.conftest import exchange_objects, join_gloo, run_ranks
from tests.fp8_checks import assert_within_one_step, fp8_step

INTERP = {"TRITON_INTERPRET": "1"}
SLOT_BYTES = 32768
MODES = ("fp8", "fp8_per_token", "fp8_group128")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
E4M3 = torch.float8_e4m3fn


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _inputs(case: int, world_size: int, rows: int, hidden: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(104729 * case + 31 * rows + hidden)
    xs = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world_size)]
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    if rows > 1:  # an all-zero row: its dynamic scales are the floor, its q zero
        residual[rows // 2] = 0
        for x in xs:
            x[rows // 2] = 0
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return xs, residual, weight


def _reference(xs, residual, weight, eps, quant, scale):
    """The unfused chain in torch ops, written out here: all-reduce (rank order, fp32, rounded), add, RMSNorm,
    then the documented quantiser."""
    from sagellm_comm.fused import quantize_fp8_reference

    acc = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x in xs:
        acc += x.float()
    new_res = (acc.to(xs[0].dtype).float() + residual.float()).to(xs[0].dtype)
    v = new_res.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(xs[0].dtype)
    q, s = quantize_fp8_reference(y, quant, scale)
    return q, s, new_res


def _check(outs, xs, residual, weight, eps, quant, scale, tag):
    from sagellm_comm.fused import quantize_fp8_reference, rmsnorm_reference

    q, scales, new_res = outs
    q_ref, s_ref, res_ref = _reference(xs, residual, weight, eps, quant, scale)
    rows, hidden = q_ref.shape
    assert q.dtype == E4M3 and q.shape == (rows, hidden), (tag, q.dtype, q.shape)
    if quant == "fp8":
        assert scales is scale, f"{tag}: the static scale is returned as given"
    else:
        want = (rows, 1) if quant == "fp8_per_token" else (rows, hidden // 128)
        assert scales.dtype == torch.float32 and scales.shape == want, (tag, scales.dtype, scales.shape)
    if new_res.dtype == torch.float32:  # no conversion anywhere: the whole chain is the reference's
        assert torch.equal(new_res, res_ref), tag
        assert_within_one_step(q, scales, q_ref, s_ref, tag)
        return
    # 16-bit dtypes: the interpreter truncates fp32 -> bf16 conversions (the GPU rounds: bit-equal there), so
    # the reduced sum can differ by one ulp, which cancellation against the residual makes large.  Check the
    # residual within that rounding, and the quantised output against the reference applied to it.
    torch.testing.assert_close(new_res.float(), res_ref.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{tag}: {m}")
    q_ref, s_ref = quantize_fp8_reference(rmsnorm_reference(new_res, weight, eps), quant, scale)
    if quant != "fp8":
        torch.testing.assert_close(scales, s_ref, rtol=2**-6, atol=0, msg=lambda m: f"{tag}: scales: {m}")
    assert_within_one_step(q, scales, q_ref, s_ref, tag)


def _setup(rank, world_size, port, timeout_s=60.0, slot_bytes=SLOT_BYTES):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.fused import FusedAllReduceRMSNorm
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(rank, world_size, slot_bytes, "cpu", exchange_objects, max_programs=2)
    return CustomAllReduce(ws, timeout_s=timeout_s), FusedAllReduceRMSNorm(ws, timeout_s=timeout_s)


def _kernel_worker(rank, world_size, port, cases):
    car, fused = _setup(rank, world_size, port)
    digests = []
    for i, (algo, quant, rows, hidden, dtype_name) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        xs, residual, weight = _inputs(i, world_size, rows, hidden, dtype)
        scale = torch.tensor([0.02 + 0.01 * i]) if quant == "fp8" else None
        x, res_in = xs[rank].clone(), residual.clone()
        outs = fused(x, res_in, weight, eps=1e-5, algo=algo, quant=quant, scale=scale)
        fused.check_errors()
        assert fused.last_selection.algo == algo
        assert torch.equal(x, xs[rank]) and torch.equal(res_in, residual), "inputs were modified"
        tag = f"{algo} {quant} {rows}x{hidden} {dtype_name}"
        if quant is None:
            from sagellm_comm.fused import rmsnorm_reference

            normed, new_res = outs
            *_, res_ref = _reference(xs, residual, weight, 1e-5, "fp8_per_token", None)
            torch.testing.assert_close(new_res.float(), res_ref.float(), rtol=2e-2, atol=2e-2)
            want = rmsnorm_reference(new_res, weight, 1e-5).float()
            torch.testing.assert_close(normed.float(), want, rtol=2e-2, atol=2e-2, msg=lambda m, tag=tag: f"{tag}: {m}")
        else:
            _check(outs, xs, residual, weight, 1e-5, quant, scale, tag)
        digests.append(_digest(*outs))
    # The plain all-reduces, Lamport included, still work on the shared workspace after the fused calls.
    for algo in ("lamport", "two_shot"):
        y = torch.full((37,), float(rank + 1))
        car.all_reduce(y, algo=algo)
        assert torch.all(y == world_size * (world_size + 1) / 2), algo
    return digests


def _cases(world_size: int) -> list[tuple]:
    """Every mode on every algorithm, odd token counts, all three dtypes across them."""
    cases = []
    for i, (algo, quant) in enumerate((a, q) for a in ("one_shot", "two_shot", "lamport") for q in MODES):
        rows = (1, 3, 5, 2 * world_size + 1)[i % 4]
        hidden = 256 if quant == "fp8_group128" else (200, 64, 256)[i % 3]
        cases.append((algo, quant, rows, hidden, ("bfloat16", "float16", "float32")[i % 3]))
    cases.append(("lamport", None, 3, 72, "bfloat16"))  # the unquantised op on the Lamport kernel too
    return cases


def _run_kernels(world_size: int) -> None:
    cases = _cases(world_size)
    per_rank = run_ranks(_kernel_worker, world_size, cases, env=INTERP, timeout=540)
    for r in range(1, world_size):
        for c, (a, b) in enumerate(zip(per_rank[0], per_rank[r], strict=True)):
            assert a == b, f"rank {r} differs bitwise from rank 0 in {cases[c]}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_mode_and_algorithm_matches_the_reference_and_ranks_agree(world_size):
    _run_kernels(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 5, 6, 7, 8])
def test_every_mode_and_algorithm_at_every_world_size(world_size):
    _run_kernels(world_size)


def _gloo_worker(rank, world_size, port, token_counts):
    import sagellm_comm
    from sagellm_comm.fused import (
        all_reduce_residual_rmsnorm,
        last_selection,
        quantize_fp8_reference,
        rmsnorm_reference,
    )

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    digests = []
    try:
        for i, tokens in enumerate(token_counts):
            for quant in MODES:
                xs, residual, weight = _inputs(i, world_size, tokens, 256, torch.bfloat16)
                scale = torch.tensor(0.03) if quant == "fp8" else None  # shape () is accepted too
                outs = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 1e-6, group=world, quant=quant,
                                                   scale=scale)  # fmt: skip
                sel = last_selection(world)
                assert (sel.algo, sel.rule_id) == ("unfused", "custom-unavailable"), sel
                # The fallback sums in fp32 and rounds once, as the reference does (these bf16 sums are exact in
                # fp32, so the order Gloo adds in does not show): the residual bit-equal, the quantised output
                # within a step of the reference and bit-equal to the reference quantiser of that residual's norm.
                q_ref, s_ref, res_ref = _reference(xs, residual, weight, 1e-6, quant, scale)
                assert torch.equal(outs[2], res_ref), f"gloo {quant} {tokens}: new_residual"
                assert_within_one_step(outs[0], outs[1], q_ref, s_ref, f"gloo {quant} {tokens}")
                q_own, s_own = quantize_fp8_reference(rmsnorm_reference(outs[2], weight, 1e-6), quant, scale)
                assert torch.equal(outs[0].view(torch.uint8), q_own.view(torch.uint8)) and torch.equal(outs[1], s_own)
                digests.append(_digest(*outs))
        return digests
    finally:
        sagellm_comm.destroy()


def test_gloo_fallback_every_mode():
    per_rank = run_ranks(_gloo_worker, 2, (1, 7), timeout=120)
    assert per_rank[0] == per_rank[1]


def _cancelling_sum_worker(rank, world_size, port):
    """Per element, 1 on one rank and 2**-8 on two others (every placement), residual -1: the sum rounded once
    is 1 + 2**-7 in bf16, so new_residual is 2**-7; added in bf16 one addition at a time it can be 1 (0 left)."""
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    hidden = 128
    xs = [torch.zeros(1, hidden) for _ in range(world_size)]
    for element, big in enumerate((0, 1, 2)):
        for r in range(3):
            xs[r][0, element] = 1.0 if r == big else 2.0**-8
    xs[0][0, 3:] = 2.0**-7
    residual = torch.zeros(1, hidden)
    residual[0, :3] = -1.0
    weight = torch.ones(hidden, dtype=torch.bfloat16)
    xs, residual = [x.bfloat16() for x in xs], residual.bfloat16()
    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        normed, new_residual = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 0.0, group=world)
        q, scales, again = all_reduce_residual_rmsnorm(
            xs[rank], residual, weight, 0.0, group=world, quant="fp8_per_token"
        )
        return new_residual.float().tolist(), again.float().tolist(), normed.float().tolist(), q.float().tolist()
    finally:
        sagellm_comm.destroy()


def test_gloo_fallback_sums_16_bit_inputs_rounded_once():
    per_rank = run_ranks(_cancelling_sum_worker, 3, timeout=120)
    assert all(r == per_rank[0] for r in per_rank)
    new_residual, again, normed, q = per_rank[0]
    assert new_residual == again == [[2.0**-7] * 128]
    assert normed == [[1.0] * 128]  # a constant row (eps 0) normalises to the weight
    assert q == [[448.0] * 128]


def _over_max_hidden_worker(rank, world_size, port):
    """The custom backend at hidden MAX_HIDDEN + 128: no fused kernel takes the row, so every mode runs unfused
    (rule ``fused-max-hidden``): our all-reduce, then the fallback's torch ops, the same outputs."""
    import sagellm_comm
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import MAX_HIDDEN, FusedAllReduceRMSNorm, all_reduce_residual_rmsnorm, last_selection
    from sagellm_comm.fused.fp8 import unfused_tail

    hidden = MAX_HIDDEN + 128
    steps = (torch.arange(2 * hidden) % 7 - 3).view(2, hidden) / 4  # every sum exact in bf16
    xs = [(steps * (r + 1)).bfloat16() for r in range(world_size)]
    residual = (steps.flip(1) + 1).bfloat16()
    weight = (1 + torch.arange(hidden) % 5 / 8).bfloat16()
    reduced = sum(x.float() for x in xs).bfloat16()
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, max_bytes=1 << 20)
    try:
        assert world.backend.custom is not None, world.backend.custom_reason
        for quant in (None, *MODES):
            scale = torch.tensor([0.05]) if quant == "fp8" else None
            outs = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 1e-6, group=world, quant=quant, scale=scale)
            sel = last_selection(world)
            assert (sel.algo, sel.rule_id) == ("unfused", "fused-max-hidden"), sel
            assert str(hidden) in sel.reason and str(MAX_HIDDEN) in sel.reason, sel
            want = unfused_tail(reduced, residual, weight, 1e-6, quant, scale)
            for got, expected in zip(outs, want, strict=True):
                assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        car = world.backend.custom  # a fused kernel asked for by name says what to do instead
        op = FusedAllReduceRMSNorm(car.workspace, fallback=car.fallback, all_reduce=car)
        with pytest.raises(InvalidArgumentError, match=f"up to {MAX_HIDDEN}, got {hidden}; use algo='auto'"):
            op(xs[rank], residual, weight, algo="one_shot")
        assert torch.equal(op(xs[rank], residual, weight, algo="unfused")[1], want[-1])
        return True
    finally:
        sagellm_comm.destroy()


def test_a_hidden_over_the_kernels_runs_unfused_on_the_custom_backend():
    assert run_ranks(_over_max_hidden_worker, 2, env=INTERP, timeout=300) == [True, True]


def test_engine_all_reduce_of_the_fallback_rounds_16_bit_sums_once():
    """The fused op's engine path: from 3 ranks on a 16-bit x travels as fp32 (an engine adds in its dtype, a
    rounding per addition); 2 ranks and fp32 travel as they are.  A stand-in engine adds the ranks' tensors in
    the dtype it is given, one addition at a time: 1 and two halves of an ulp of 1 (ties to even: 1 + h = 1)."""
    from sagellm_comm.fused._common import engine_all_reduced

    seen = []

    def engine(parts, world_size):
        def all_reduce(t):
            seen.append(t.dtype)
            acc = parts[0].to(t.dtype)
            for p in parts[1:world_size]:
                acc = acc + p.to(t.dtype)
            t.copy_(acc)
            return t

        return all_reduce

    for dtype in (torch.bfloat16, torch.float16):
        h = torch.finfo(dtype).eps / 2
        parts = [torch.tensor([1.0, h, h]), torch.tensor([h, 1.0, h]), torch.tensor([h, h, 1.0])]
        x = parts[0].to(dtype)
        got = engine_all_reduced(x, engine(parts, 3), 3)
        assert got.dtype == dtype and seen[-1] == torch.float32
        assert torch.equal(got, torch.full((3,), 1 + 2 * h, dtype=dtype)), got
        assert torch.equal(x, parts[0].to(dtype)), "x is not modified"
        alone = engine(parts, 3)(x.clone())  # the engine alone, in the dtype: the first element loses its halves
        assert alone[0] == 1 and not torch.equal(alone, got)
        got = engine_all_reduced(x, engine(parts, 2), 2)
        assert seen[-1] == dtype and torch.equal(got, (parts[0] + parts[1]).to(dtype))
    x = parts[0].clone()
    got = engine_all_reduced(x, engine(parts, 3), 3)
    assert seen[-1] == torch.float32 and got is not x and torch.equal(x, parts[0])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 8])
def test_gloo_fallback_larger_worlds(world_size):
    per_rank = run_ranks(_gloo_worker, world_size, (1, 5, 33), timeout=300)
    assert all(d == per_rank[0] for d in per_rank)


# ---------------------------------------------------------------------------------------------- the reference


def test_reference_quantiser_by_hand():
    from sagellm_comm.fused import FP8_MAX, FP8_SCALE_FLOOR, quantize_fp8_reference

    assert FP8_MAX == 448.0 and FP8_SCALE_FLOOR == 2.0**-117
    assert FP8_SCALE_FLOOR * 2.0**-9 == 2.0**-126  # the smallest non-zero q * s is the smallest normal fp32
    y = torch.tensor([[448.0, -896.0, 1.0, 0.0, 3.0, 1000.0, -0.75, 17.0]], dtype=torch.bfloat16)
    q, s = quantize_fp8_reference(y, "fp8", torch.tensor([2.0]))
    assert q.float().tolist() == [[224.0, -448.0, 0.5, 0.0, 1.5, 448.0, -0.375, 8.0]]  # saturates at 448
    q, s = quantize_fp8_reference(y, "fp8_per_token")
    assert s.shape == (1, 1) and s.item() == pytest.approx(1000.0 / 448.0)
    assert q.float()[0, 5] == 448.0
    assert torch.equal(q.float()[0, :2], torch.tensor([448.0 * 448 / 1000, -448.0 * 896 / 1000]).to(E4M3).float())
    # An all-zero row: the floor, not a division by zero.
    q, s = quantize_fp8_reference(torch.zeros(2, 256), "fp8_group128")
    assert s.shape == (2, 2) and torch.all(s == FP8_SCALE_FLOOR) and torch.all(q.float() == 0)
    # Groups are independent: a large group does not coarsen a small one.
    y = torch.cat([torch.full((128,), 1000.0), torch.linspace(-1e-3, 1e-3, 128)]).view(1, 256)
    q, s = quantize_fp8_reference(y, "fp8_group128")
    assert s[0, 0] == pytest.approx(1000.0 / 448.0) and s[0, 1] == pytest.approx(1e-3 / 448.0)
    assert (q.float()[0, 128:] * s[0, 1] - y[0, 128:]).abs().max() <= 1e-3 / 16


@pytest.mark.parametrize("quant", [None, "none", "fp8_per_tensor"])
def test_reference_quantiser_refuses_a_quant_that_is_no_fp8_mode(quant):
    """Only the FP8 modes quantise: no mode (None) is not quietly one of them."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import quantize_fp8_reference

    for hidden in (256, 200):
        with pytest.raises(InvalidArgumentError, match="quant must be one of"):
            quantize_fp8_reference(torch.randn(2, hidden), quant)


@pytest.mark.parametrize("quant", MODES)
def test_reference_is_within_half_a_step_of_y(quant):
    """Independently: |q * s - y| <= half the FP8 spacing at q (round to nearest), scales as documented."""
    from sagellm_comm.fused import FP8_MAX, quantize_fp8_reference

    g = torch.Generator().manual_seed(3)
    y = (torch.randn(9, 384, generator=g) * torch.logspace(-3, 2, 9).view(9, 1)).to(torch.bfloat16)
    scale = torch.tensor([0.01]) if quant == "fp8" else None
    q, s = quantize_fp8_reference(y, quant, scale)
    per = s.float().reshape(()) if quant == "fp8" else s.repeat_interleave(384 // s.shape[-1], dim=-1)
    if quant != "fp8":
        groups = y.float().abs().view(9, s.shape[-1], -1).amax(-1)
        assert torch.equal(s, groups / FP8_MAX)
    target = (y.float() / per).clamp(-448, 448)
    err = (q.float() - target).abs()
    assert torch.all(err <= fp8_step(q) / 2 + 1e-6), float((err / fp8_step(q)).max())


def _non_finite_worker(rank, world_size, port):
    """Kernels, the unfused chain (engine all-reduce + torch ops) and the reference on a ``y`` holding NaN / inf,
    bit for bit: ``x`` is +-0.5 on every rank, so the reduced row is +-1, its mean square 1 and (eps = 0)
    ``y = weight * sign`` exactly, the non-finite values coming from the weight."""
    import torch.distributed as dist

    from sagellm_comm.fused import quantize_fp8_reference

    _, fused = _setup(rank, world_size, port)
    fused.fallback = lambda t: (dist.all_reduce(t), t)[1]
    g = torch.Generator().manual_seed(17)
    rows, hidden = 3, 256
    sign = torch.where(torch.rand(rows, hidden, generator=g) < 0.5, -1.0, 1.0)
    finite = torch.rand(hidden, generator=g) * 4 - 2
    nan, inf = float("nan"), float("inf")
    cases = {"nan": {5: nan}, "inf": {130: inf}, "-inf": {7: -inf}, "nan and inf": {5: nan, 6: inf}}
    cases["a group of nan"] = dict.fromkeys(range(128), nan)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = (sign / world_size).to(dtype), torch.zeros(rows, hidden, dtype=dtype)
        for name, values in cases.items():
            weight = finite.clone()
            weight[list(values)] = torch.tensor(list(values.values()))
            weight = weight.to(dtype)
            for quant in MODES:
                scale = torch.tensor([0.01]) if quant == "fp8" else None
                q_ref, s_ref = quantize_fp8_reference((weight * sign.to(dtype)).to(dtype), quant, scale)
                want = (q_ref.view(torch.uint8), s_ref.view(torch.int32))
                for algo in ("one_shot", "two_shot", "lamport", "unfused"):
                    q, scales, _ = fused(x, residual, weight, 0.0, algo=algo, quant=quant, scale=scale)
                    fused.check_errors()
                    tag = f"{dtype} {name} {quant} {algo}"
                    assert torch.equal(q.view(torch.uint8), want[0]), tag
                    assert torch.equal(scales.view(torch.int32), want[1]), tag
                    checked += 1
                if quant != "fp8" and name in ("nan", "a group of nan"):
                    # A NaN is NaN in its element of q only; its row's / group's scale is the other elements'.
                    assert torch.equal(q_ref.float().isnan(), weight.isnan().expand(rows, hidden)), name
                    finite_y = (weight.float().nan_to_num(0.0) * sign).to(dtype)
                    assert torch.equal(s_ref, quantize_fp8_reference(finite_y, quant)[1]), name
    return checked


def test_nan_and_inf_in_y_give_the_same_bits_in_kernels_fallback_and_reference():
    assert run_ranks(_non_finite_worker, 2, env=INTERP, timeout=300) == [2 * 5 * 3 * 4] * 2


# ---------------------------------------------------------------------------------------------- bad input


def _bad_input_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError, WorkspaceExhaustedError
    from sagellm_comm.fused import quantize_fp8_reference

    car, fused = _setup(rank, world_size, port)
    x, w = torch.randn(3, 256), torch.ones(256)
    ok_scale = torch.tensor([0.1])
    epoch = car.epoch
    bad = [
        (ShapeMismatchError, "one-element", dict(quant="fp8", scale=torch.ones(2))),
        (InvalidArgumentError, "float32", dict(quant="fp8", scale=torch.ones(1, dtype=torch.float16))),
        (InvalidArgumentError, "scale, a one-element", dict(quant="fp8", scale=None)),
        (InvalidArgumentError, "scale must be None", dict(quant="fp8_per_token", scale=ok_scale)),
        (InvalidArgumentError, "scale must be None", dict(quant="fp8_group128", scale=ok_scale)),
        (InvalidArgumentError, "quant must be None or one of", dict(quant="int8")),
        (InvalidArgumentError, "quant must be None or one of", dict(quant="FP8")),
        (InvalidArgumentError, "only taken with quant='fp8'", dict(scale=ok_scale)),
    ]
    for error, match, kwargs in bad:
        with pytest.raises(error, match=match):
            fused(x, x, w, **kwargs)
    with pytest.raises(ShapeMismatchError, match="divisible by 128"):
        fused(torch.randn(3, 200), torch.randn(3, 200), torch.ones(200), quant="fp8_group128")
    with pytest.raises(InvalidArgumentError, match="takes x in"):
        fused(x.double(), x.double(), w.double(), quant="fp8_per_token")
    with pytest.raises(InvalidArgumentError, match="takes x in"):
        quantize_fp8_reference(x.to(torch.int32), "fp8_per_token")
    for quant in ("fp8_per_token", "fp8_group128"):
        with pytest.raises(ShapeMismatchError, match="0-d"):
            quantize_fp8_reference(torch.tensor(1.0), quant)
        with pytest.raises(ShapeMismatchError, match="0-d"):
            fused(torch.tensor(1.0), torch.tensor(1.0), torch.ones(1), quant=quant)
    with pytest.raises(WorkspaceExhaustedError, match="algo=lamport takes at most"):
        big = torch.ones(SLOT_BYTES // 2 // 64 + 1, 64)  # over the Lamport buffers' SLOT_BYTES // 2 elements
        fused(big, big, torch.ones(64), algo="lamport", quant="fp8_per_token")
    with pytest.raises(InvalidArgumentError, match="algo must be"):
        fused(x, x, w, algo="ring", quant="fp8_per_token")
    assert car.epoch == epoch, "a rejected call must not have run anything"
    # The ranks are still in step: a valid call of every mode works.
    for quant in MODES:
        outs = fused(x * (rank + 1), x, w, quant=quant, scale=ok_scale if quant == "fp8" else None)
        fused.check_errors()
        assert outs[0].dtype == E4M3
    return True


def test_bad_inputs_raise_typed_errors_before_anything_runs():
    run_ranks(_bad_input_worker, 2, env=INTERP, timeout=300)


def _gloo_bad_input_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        x, w = torch.randn(2, 200), torch.ones(200)
        # Only rank 0 passes bad input: it must raise without entering the all-reduce, or rank 1 (which does
        # enter it) would pair its all-reduce with rank 0's next one and get a wrong sum.
        if rank == 0:
            with pytest.raises(ShapeMismatchError, match="divisible by 128"):
                all_reduce_residual_rmsnorm(x, x, w, group=world, quant="fp8_group128")
            with pytest.raises(InvalidArgumentError, match="scale is on meta"):
                all_reduce_residual_rmsnorm(x, x, w, group=world, quant="fp8", scale=torch.ones(1, device="meta"))
        ones = torch.ones(2, 200)
        q, s, res = all_reduce_residual_rmsnorm(ones * (rank + 1), torch.zeros(2, 200), w, 0.0, world, "fp8_per_token")
        assert torch.equal(res, torch.full((2, 200), 3.0))  # 1 + 2: the two ranks' calls paired up
        assert torch.all(q.float() == 448.0) and torch.all(s == 1.0 / 448.0)
        # A static scale's value is data, not checked: 0 is the formula's y / 0, +-448, on the fallback too.
        y = torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0).repeat(2, 1)
        zero = torch.tensor([0.0])
        q, s, res = all_reduce_residual_rmsnorm(y / 2, torch.zeros(2, 200), w, 0.0, world, "fp8", zero)
        assert s is zero and torch.equal(q.float(), 448.0 * y) and torch.equal(res, y)
        return True
    finally:
        sagellm_comm.destroy()


def test_bad_input_on_the_fallback_raises_before_the_all_reduce():
    run_ranks(_gloo_bad_input_worker, 2, timeout=120)


def _invalid_scale_worker(rank, world_size, port):
    """A static scale that is not finite and positive is data like any other, on every device: every algorithm, the
    unfused chain and the reference give the documented formula's bits, ``e4m3(clamp(y / scale, -448, 448))``.
    ``x`` is +-0.5 on both ranks and eps 0, so the reduced row is +-1, its mean square 1 and ``y = weight * sign``
    exactly; zeros in the weight make ``y = +-0`` (``0 / 0`` is NaN)."""
    import torch.distributed as dist

    from sagellm_comm.fused import quantize_fp8_reference

    _, fused = _setup(rank, world_size, port)
    fused.fallback = lambda t: (dist.all_reduce(t), t)[1]
    g = torch.Generator().manual_seed(11)
    rows, hidden = 3, 256
    sign = torch.where(torch.rand(rows, hidden, generator=g) < 0.5, -1.0, 1.0)
    weight = torch.rand(hidden, generator=g) * 4 - 2
    weight[::5] = 0.0
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        x, residual, w = (sign / world_size).to(dtype), torch.zeros(rows, hidden, dtype=dtype), weight.to(dtype)
        y = (w * sign.to(dtype)).float()
        for value in (0.0, -0.0, -0.05, float("inf"), float("-inf"), float("nan")):
            scale = torch.tensor([value])
            want = (y / scale.reshape(())).clamp(-448, 448).to(E4M3).view(torch.uint8)
            assert torch.equal(quantize_fp8_reference(y.to(dtype), "fp8", scale)[0].view(torch.uint8), want), value
            for algo in ("one_shot", "two_shot", "lamport", "unfused"):
                q, scales, new_res = fused(x, residual, w, 0.0, algo=algo, quant="fp8", scale=scale)
                fused.check_errors()
                assert scales is scale and torch.equal(new_res, sign.to(dtype)), (value, algo)
                assert torch.equal(q.view(torch.uint8), want), (dtype, value, algo)
                checked += 1
    return checked


def test_a_static_scale_that_is_not_finite_and_positive_gives_the_formulas_bits_on_every_path():
    assert run_ranks(_invalid_scale_worker, 2, env=INTERP, timeout=300) == [48, 48]


def test_virtual_ranks_refuse_an_x_that_is_not_a_tensor():
    """The virtual-rank path's x check is the typed error of the other paths, raised before the group is touched
    (VirtualFused needs CUDA: made here without its constructor)."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import VirtualFused

    fused = object.__new__(VirtualFused)
    fused.world_size = 2
    with pytest.raises(InvalidArgumentError, match="x must be a torch.Tensor, got list"):
        fused.all_reduce_residual_rmsnorm([[1.0] * 4], torch.zeros(2, 1, 4), torch.ones(4), quant="fp8_per_token")


def test_math_of_the_bounds():
    """The bound the tests use is one FP8 step: adjacent e4m3 values are one step apart."""
    q = torch.tensor([1.0, 1.125, 15.0, 16.0, 2.0**-9, 448.0]).to(E4M3)
    assert fp8_step(q).tolist() == [0.125, 0.125, 1.0, 2.0, 2.0**-9, 32.0]
    assert math.isclose(float(q[1]) - float(q[0]), float(fp8_step(q)[0]))


# ---------------------------------------------------------------------------------------------- the policy


def _policy_worker(rank, world_size, port):
    from sagellm_comm.errors import BackendNotSupportedError
    from sagellm_comm.fused import (
        FusedAllReduceRMSNorm,
        FusionPolicy,
        FusionRule,
        quantize_fp8_reference,
        rmsnorm_reference,
    )

    slot = 1 << 20  # over the Lamport buffers' 128 K elements: messages the Lamport kernel cannot take fit
    car, fused = _setup(rank, world_size, port, slot_bytes=slot)

    def pair(sel):
        return sel.algo, sel.rule_id

    cap = car.workspace.lamport_capacity
    assert cap < slot // 2
    # The default follows the all-reduce policy (Lamport for small messages at 2 ranks), capacities apply.
    assert pair(fused.select(2 * 64 * 8, "fp8_per_token", 8, 64)) == ("lamport", "ws2-lamport")
    assert pair(fused.select(4 << 20, None, 8, 1 << 18)) == ("unfused", "over-workspace")

    def forced(path):
        return FusedAllReduceRMSNorm(car.workspace, policy=FusionPolicy([FusionRule("f", path)]))

    n = cap + 64  # over the Lamport buffers, in the slot
    assert pair(forced("lamport").select(2 * n, "fp8", n // 64, 64)) == ("one_shot", "f+lamport-capacity")
    n = 3 * slot // 8  # bf16 fits (0.75 MB), but two-shot stages 3 bytes an element (1.1 MB)
    assert pair(forced("two_shot").select(2 * n, "fp8_group128", n // 256, 256)) == (
        "one_shot",
        "fused-two-shot-capacity",
    )
    assert pair(forced("two_shot").select(2 * n, None, n // 256, 256)) == ("one_shot", "fused-two-shot-capacity")
    assert pair(forced("two_shot").select(2 * slot // 5, None, slot // 5 // 256, 256)) == ("two_shot", "f")
    policy = FusionPolicy.from_dict(
        {"rules": [
            {"id": "big-unfused", "path": "unfused", "quant": ["fp8_per_token"], "min_tokens": 4},
            {"id": "small-two-shot", "path": "two_shot", "world_sizes": [2], "max_tokens": 3},
            {"id": "rest", "path": "all_reduce_policy"},
        ]}
    )  # fmt: skip
    assert FusionPolicy.from_dict(policy.to_dict()).rules == policy.rules
    mine = FusedAllReduceRMSNorm(car.workspace, fallback=lambda t: car.all_reduce(t, algo="one_shot"), policy=policy)
    assert pair(mine.select(2 * 5 * 256, "fp8_per_token", 5, 256)) == ("unfused", "big-unfused")
    assert pair(mine.select(2 * 5 * 256, "fp8_group128", 5, 256)) == ("lamport", "ws2-lamport")
    assert pair(mine.select(2 * 2 * 256, None, 2, 256)) == ("two_shot", "small-two-shot")
    xs, residual, weight = _inputs(0, world_size, 5, 256, torch.float32)
    epoch = car.epoch
    q, s, new_res = mine(xs[rank], residual, weight, quant="fp8_per_token")
    assert (mine.last_selection.algo, car.epoch) == ("unfused", epoch + 1)  # the all-reduce ran, then torch ops
    q_ref, s_ref = quantize_fp8_reference(rmsnorm_reference(new_res, weight, 1e-6), "fp8_per_token")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    # Unfused by policy without a fallback: a typed error, nothing run.
    bare = FusedAllReduceRMSNorm(car.workspace, policy=policy)
    with pytest.raises(BackendNotSupportedError, match="big-unfused|no fallback"):
        bare(xs[rank], residual, weight, quant="fp8_per_token")
    assert car.epoch == epoch + 1
    return _digest(q, s, new_res)


def test_fusion_policy_rules_and_capacities():
    digests = run_ranks(_policy_worker, 2, env=INTERP, timeout=300)
    assert digests[0] == digests[1]


def _unfused_rule_worker(rank, world_size, port):
    from sagellm_comm.fused import FusedAllReduceRMSNorm, FusionPolicy, FusionRule, rmsnorm_reference

    car, _ = _setup(rank, world_size, port)
    engine_calls = []

    def engine(t):  # Gloo: it rounds after every addition of a 16-bit tensor
        import torch.distributed as dist

        engine_calls.append(t.dtype)
        dist.all_reduce(t)
        return t

    policy = FusionPolicy([FusionRule("off", "unfused", reason="fusion off here")])
    mine = FusedAllReduceRMSNorm(car.workspace, fallback=engine, policy=policy, all_reduce=car)
    # 1 + 2**-8 + 2**-8 is 1 + 2**-7 summed in fp32 and rounded once; residual -1 leaves exactly 2**-7.
    hidden = 256
    x = torch.full((3, hidden), (1.0, 2.0**-8, 2.0**-8)[rank], dtype=torch.bfloat16)
    residual = torch.full((3, hidden), -1.0, dtype=torch.bfloat16)
    weight = torch.ones(hidden, dtype=torch.bfloat16)
    outs = []
    for quant in (None, "fp8_per_token"):
        out = mine(x, residual, weight, quant=quant)
        assert mine.last_selection.algo == "unfused" and mine.last_selection.rule_id == "off"
        assert torch.equal(out[-1], torch.full_like(residual, 2.0**-7)), out[-1].unique()
        outs.extend(out)
    assert torch.equal(outs[0], rmsnorm_reference(outs[1], weight, 1e-6))
    assert engine_calls == []  # the all-reduce's kernels ran the sum, not the engine
    # Without an engine attached the rule still runs: the kernels take the message.
    bare = FusedAllReduceRMSNorm(car.workspace, policy=policy, all_reduce=car)
    assert torch.equal(bare(x, residual, weight)[1], outs[1])
    # A registered input (read in place, and two-shot reduces there) is left as it was.
    from sagellm_comm.selector import AlgoSelector, Rule

    car.selector = AlgoSelector([Rule("all-two-shot", "two_shot")])
    shared = car.get_buffer(x.numel(), x.dtype).view(x.shape)
    shared.copy_(x)
    assert torch.equal(bare(shared, residual, weight)[1], outs[1]) and torch.equal(shared, x)
    car.selector = AlgoSelector()
    # Over the workspace the engine runs, in fp32 from 3 ranks on (still rounded once).
    big = FusedAllReduceRMSNorm(car.workspace, fallback=engine, all_reduce=car)
    rows = car.workspace.slot_bytes // (2 * hidden) + 1
    xb = torch.full((rows, hidden), (1.0, 2.0**-8, 2.0**-8)[rank], dtype=torch.bfloat16)
    new_residual = big(xb, torch.full_like(xb, -1.0), weight)[1]
    assert big.last_selection.rule_id == "over-workspace" and engine_calls == [torch.float32]
    assert torch.equal(new_residual, torch.full_like(xb, 2.0**-7))
    return _digest(*outs)


def test_a_call_the_policy_runs_unfused_sums_on_the_all_reduce_kernels():
    """A fusion rule saying ``unfused`` runs the chain the rules are measured against: our all-reduce's kernels
    (the fp32 sum rounded once, bit-exact at 3 ranks where an engine's 16-bit sum is not), then torch ops."""
    digests = run_ranks(_unfused_rule_worker, 3, env=INTERP, timeout=300)
    assert len(set(digests)) == 1


def test_fusion_policy_refuses_bad_rules():
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy, FusionRule

    with pytest.raises(InvalidArgumentError, match="path must be one of"):
        FusionPolicy([FusionRule("x", "ring")])
    with pytest.raises(InvalidArgumentError, match="quant must name"):
        FusionPolicy([FusionRule("x", "unfused", quant=("int8",))])
    with pytest.raises(InvalidArgumentError, match="unknown keys"):
        FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused", "tokens": 3}]})
    with pytest.raises(InvalidArgumentError, match="must be a non-empty list"):
        FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused", "hidden": 4096}]})
    with pytest.raises(InvalidArgumentError, match=r"fusion policy: unknown keys \['derived_rules'\]"):
        FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused"}], "derived_rules": {}})
    for bad in ({"hidden": ["8192"]}, {"world_sizes": [0]}, {"min_tokens": True}):  # as the selector's rules
        with pytest.raises(InvalidArgumentError, match="must be"):
            FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused", **bad}]})
    with pytest.raises(InvalidArgumentError, match="at least one rule"):
        FusionPolicy.from_dict({"rules": []})
    # A rule no call matches, and an id or reason a Selection could not report as given
    never = ({"min_tokens": 10, "max_tokens": 5}, {"hidden": []}, {"world_sizes": []}, {"quant": []})
    for bad in never:
        with pytest.raises(InvalidArgumentError, match="matches no call|non-empty list"):
            FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused", **bad}]})
    with pytest.raises(InvalidArgumentError, match="matches no call"):
        FusionPolicy([FusionRule("x", "unfused", min_tokens=10, max_tokens=5)])
    with pytest.raises(InvalidArgumentError, match="hidden is empty"):
        FusionPolicy([FusionRule("x", "unfused", hidden=())])
    for bad in ({"id": None}, {"id": 3}, {"id": ""}, {"reason": None}):
        with pytest.raises(InvalidArgumentError, match="must be a (non-empty )?string"):
            FusionPolicy.from_dict({"rules": [{"path": "unfused", **bad}]})
    with pytest.raises(InvalidArgumentError, match="ids \\['x'\\] name more than one rule"):
        FusionPolicy.from_dict({"rules": [{"id": "x", "path": "unfused"}, {"id": "x", "path": "one_shot"}]})
    rules = [{"id": "a", "path": "unfused", "min_tokens": 4, "max_tokens": 4}, {"id": "b", "path": "one_shot"}]
    assert [r.id for r in FusionPolicy.from_dict({"rules": rules}).rules] == ["a", "b"]  # one token count: fine


@pytest.mark.parametrize(
    "rules, shadowed, by",
    [
        # a catch-all first: nothing after it decides
        ([{"id": "all", "path": "unfused"}, {"id": "few", "path": "lamport", "max_tokens": 4}], 1, "'all'"),
        # token ranges of two rules that together hold the third's, at its one world size and hidden
        (
            [
                {"id": "low", "path": "lamport", "world_sizes": [8], "max_tokens": 8},
                {"id": "high", "path": "one_shot", "hidden": [8192], "min_tokens": 9},
                {"id": "w8", "path": "two_shot", "world_sizes": [8], "hidden": [8192], "min_tokens": 4},
            ],
            2,
            "'low', 'high'",
        ),
        # every mode named by a rule before it: a rule for all modes decides nothing
        (
            [
                {"id": "plain", "path": "one_shot", "quant": ["none"]},
                {"id": "fp8", "path": "unfused", "quant": ["fp8", "fp8_per_token", "fp8_group128"]},
                {"id": "rest", "path": "all_reduce_policy"},
            ],
            2,
            "'plain', 'fp8'",
        ),
    ],
)
def test_a_fusion_rule_that_earlier_rules_leave_no_call_is_refused(rules, shadowed, by):
    """First match wins: a rule whose every call an earlier rule matches never decides, so the policy says something
    it never does; refused, naming the rules before it, as the all-reduce policy refuses one."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy, FusionRule

    pattern = rf"fusion rule {shadowed} .* never decides: .* matched first by rule\(s\) {by}"
    with pytest.raises(InvalidArgumentError, match=pattern):
        FusionPolicy.from_dict({"rules": rules})
    with pytest.raises(InvalidArgumentError, match=pattern):
        FusionPolicy([FusionRule.from_dict(d, i) for i, d in enumerate(rules)])


@pytest.mark.parametrize(
    "rules",
    [
        # another hidden than the earlier rule's
        [{"id": "h8192", "path": "unfused", "hidden": [8192]}, {"id": "rest", "path": "one_shot"}],
        # a token count between two earlier ranges
        [
            {"id": "low", "path": "lamport", "max_tokens": 3},
            {"id": "high", "path": "one_shot", "min_tokens": 5},
            {"id": "four", "path": "two_shot", "min_tokens": 4, "max_tokens": 4},
        ],
        # a mode no earlier rule names
        [
            {"id": "fp8", "path": "unfused", "quant": ["fp8", "fp8_per_token", "fp8_group128"]},
            {"id": "rest", "path": "all_reduce_policy"},
        ],
    ],
)
def test_a_fusion_rule_that_decides_some_call_is_taken(rules):
    from sagellm_comm.fused import FusionPolicy

    assert [r.id for r in FusionPolicy.from_dict({"rules": rules}).rules] == [r["id"] for r in rules]


def test_a_fusion_rule_built_in_code_is_checked_as_one_read_from_json():
    """The rule checks its own fields, so a policy built in code fails where it is made, not in a call."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy, FusionRule

    refused = (
        ({"world_sizes": "8"}, "world_sizes must be a non-empty list"),
        ({"world_sizes": (0,)}, r"world_sizes\[0\] must be >= 1"),
        ({"hidden": (8192.0,)}, r"hidden\[0\] must be an int"),
        ({"hidden": (True,)}, r"hidden\[0\] must be an int"),
        ({"quant": "fp8"}, "quant must be a non-empty list"),
        ({"quant": ("int8",)}, "quant must name modes"),
        ({"quant": ()}, "quant is empty: the rule matches no call"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
        ({"min_tokens": None}, "min_tokens must be an int"),
        ({"max_tokens": 4.0}, "max_tokens must be an int"),
        ({"min_tokens": 10, "max_tokens": 5}, "matches no call"),
        ({"reason": None}, "reason must be a string"),
        ({"path": None}, "path must be one of"),
        ({"id": ""}, "id must be a non-empty string"),
        ({"id": 3}, "id must be a non-empty string"),
    )
    for fields, message in refused:
        with pytest.raises(InvalidArgumentError, match=message):
            FusionRule(**{"id": "x", "path": "unfused", **fields})
    with pytest.raises(InvalidArgumentError, match="rule 0 must be a FusionRule"):
        FusionPolicy([{"id": "x", "path": "unfused"}])
    rule = FusionRule("x", "unfused", quant=["fp8"], world_sizes=[8], hidden=(8192,))  # lists kept as tuples
    assert (rule.quant, rule.world_sizes, rule.hidden) == (("fp8",), (8,), (8192,))
    assert rule.matches(16, 8192, 8, "fp8") and not rule.matches(16, 8192, 4, "fp8")
    assert FusionRule.from_dict(rule.to_dict(), 0) == rule


@pytest.mark.parametrize("rule_id", ["fused-max-hidden", "fused-two-shot-capacity", "no-fusion-rule", "over-workspace",
                                     "no-rule", "user", "mine+lamport-capacity"])  # fmt: skip
def test_a_fusion_rule_may_not_take_an_id_the_fused_op_reports_for_its_own_decisions(rule_id):
    """A Selection's rule id says which rule or which check decided: a rule named as a capacity check (or as the
    all-reduce policy's own decisions, which a rule following it reports) would make the two indistinguishable."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy, FusionRule

    with pytest.raises(InvalidArgumentError, match=f"fusion rule: id '{re.escape(rule_id)}' is reserved"):
        FusionRule(rule_id, "one_shot")
    with pytest.raises(InvalidArgumentError, match=f"fusion rule 0: id '{re.escape(rule_id)}' is reserved"):
        FusionPolicy.from_dict({"rules": [{"id": rule_id, "path": "one_shot"}]})


@pytest.mark.parametrize("rules", [None, "rules.json", 3])
def test_fusion_rules_given_in_code_must_be_a_list(rules):
    """``FusionPolicy(rules)`` of something not a list of rules is a typed error naming it, not a TypeError."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy

    with pytest.raises(InvalidArgumentError, match="fusion rules must be a list of FusionRule"):
        FusionPolicy(rules)


def test_a_capacity_that_replaces_a_fusion_rules_kernel_keeps_the_rules_reason(monkeypatch):
    """Two-shot stages its outputs in the slot: where they do not fit one-shot runs, the reason saying which rule
    chose two-shot and what did not fit (the decision alone, on a stand-in workspace: no kernel runs)."""
    import types

    from sagellm_comm.config import CommConfig
    from sagellm_comm.fused import FusedAllReduceRMSNorm, FusionPolicy, FusionRule

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    workspace = types.SimpleNamespace(device=torch.device("cpu"), max_programs=4, world_size=2, slot_bytes=4096,
                                      lamport_capacity=1024, config=CommConfig())  # fmt: skip
    fused = FusedAllReduceRMSNorm(workspace, policy=FusionPolicy([FusionRule("ts", "two_shot", reason="measured")]))
    assert fused.select(2 * 8 * 128, "fp8_per_token", 8, 128) == Selection("two_shot", "ts", "measured")
    sel = fused.select(2 * 12 * 128, "fp8_per_token", 12, 128)
    assert (sel.algo, sel.rule_id) == ("one_shot", "fused-two-shot-capacity")
    assert sel.reason.startswith("measured; but two-shot stages") and "4096-byte workspace" in sel.reason, sel


def test_a_fusion_rule_following_the_all_reduce_policy_follows_the_one_the_all_reduce_runs_by_now(monkeypatch):
    """The group-level op's fusion rule ``all_reduce_policy`` follows its all-reduce's policy: a ``car.selector``
    set after the first fused call is followed, as the unfused chain's all-reduce follows it (decisions only, on
    stand-ins: no kernel runs)."""
    import types

    from sagellm_comm.config import CommConfig
    from sagellm_comm.fused import FusedAllReduceRMSNorm
    from sagellm_comm.selector import AlgoSelector, Rule

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    workspace = types.SimpleNamespace(device=torch.device("cpu"), max_programs=4, world_size=2, slot_bytes=1 << 20,
                                      lamport_capacity=1 << 16, config=CommConfig())  # fmt: skip
    car = types.SimpleNamespace(workspace=workspace, selector=AlgoSelector([Rule("all-one-shot", "one_shot")]))
    fused = FusedAllReduceRMSNorm(workspace, all_reduce=car)
    assert fused.select(2 * 4 * 256, None, 4, 256).rule_id == "all-one-shot"
    car.selector = AlgoSelector([Rule("all-two-shot", "two_shot")])
    assert fused.select(2 * 4 * 256, None, 4, 256) == car.selector.select(2 * 4 * 256, 2, 1 << 20)
    given = FusedAllReduceRMSNorm(workspace, selector=AlgoSelector([Rule("mine", "lamport")]), all_reduce=car)
    assert given.select(2 * 4 * 256, None, 4, 256).rule_id == "mine"  # one given is kept
    assert FusedAllReduceRMSNorm(workspace).select(2 * 4 * 256, None, 4, 256).rule_id == "ws2-lamport"  # defaults


def test_a_fusion_policy_file_or_the_benchmarks_record_is_read_and_named(tmp_path):
    """``FusionPolicy.from_file`` takes a policy file or the record of ``bench/fp8_fused_bench.py`` (its
    ``derived_rules``), says which it read, and refuses what it cannot read as ``AlgoSelector.from_file`` does."""
    import json
    from pathlib import Path

    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy

    record = Path(__file__).resolve().parents[1] / "bench/results/h200/fp8_fused.json"
    policy = FusionPolicy.from_file(record)
    assert policy.source == f"derived_rules of {record}"
    assert policy.rules == FusionPolicy.from_dict(json.loads(record.read_text())["derived_rules"]).rules
    assert policy.digest() == FusionPolicy.from_dict(policy.to_dict()).digest() != FusionPolicy().digest()
    own = tmp_path / "policy.json"
    own.write_text(json.dumps({"rules": [{"id": "off", "path": "unfused"}]}))
    mine = FusionPolicy.from_file(own)
    assert mine.source == str(own) and mine.select(4, 4096, 2, None).rule_id == "off"
    mps_only = Path(__file__).resolve().parents[1] / "bench/results/h100/fp8_fused_mps.json"
    with pytest.raises(InvalidArgumentError, match="record without derived_rules"):
        FusionPolicy.from_file(mps_only)
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "empty.json").write_text('{"rules": []}')
    for path, message in (
        (tmp_path / "missing.json", "does not exist"),
        (tmp_path / "bad.json", "is not valid JSON"),
        (tmp_path, "cannot be read"),
        (tmp_path / "empty.json", "at least one rule"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            FusionPolicy.from_file(path)


def _timeout_worker(rank, world_size, port, algo):
    import torch.distributed as dist

    from sagellm_comm.errors import CommTimeoutError

    _, fused = _setup(rank, world_size, port, timeout_s=0.3)
    if rank == 1:  # never joins
        dist.barrier()
        return None
    q, s, _ = fused(torch.ones(3, 128), torch.ones(3, 128), torch.ones(128), algo=algo, quant="fp8_group128")
    with pytest.raises(CommTimeoutError) as info:
        fused.check_errors()
    assert info.value.details["peer"] == 1, info.value.details
    assert torch.all(q.view(torch.uint8) & 0x7F == 0x7F) and torch.all(s.isnan()), "a failed call's output is NaN"
    dist.barrier()
    return str(info.value)


@pytest.mark.parametrize("algo", ["lamport", "two_shot"])
def test_missing_peer_is_named_and_the_output_is_nan(algo):
    msg = run_ranks(_timeout_worker, 2, algo, env=INTERP, timeout=300)[0]
    assert "peer rank 1 never arrived" in msg


def test_row_split_holds_every_row_at_once_in_whole_groups():
    """The fused Lamport kernel's programs per row: a power of two, at most MAX_SPLIT, the rows' programs within half
    the grid (every row held at once), whole 128-element groups per program (a group's scale never straddles
    programs), segments of at least MIN_SEGMENT."""
    from sagellm_comm.fused.rmsnorm import MAX_SPLIT, MIN_SEGMENT, row_split

    assert row_split(1, 4096, 66) == 8  # 2 ranks on 132 SMs: one token over 8 programs of 512
    assert row_split(1, 8192, 16) == 8  # 8 ranks: 8 of their 16 programs, 1024 elements each
    assert row_split(2, 8192, 16) == 4
    assert row_split(4, 8192, 16) == 2
    assert row_split(5, 8192, 16) == 1  # 10 programs would fill more than half the grid
    assert row_split(8, 4096, 66) == 4
    assert row_split(1, 5120, 132) == 8  # 5120 = 40 groups: 8 programs of 5
    assert row_split(1, 1000, 64) == 1  # not whole groups
    assert row_split(1, 256, 64) == 1  # one segment of MIN_SEGMENT already
    assert row_split(1, 512, 64) == 2
    for rows in range(1, 20):
        for hidden in (128, 384, 1024, 4096, 5120, 7168, 8192, 16384):
            for programs in (1, 7, 16, 33, 66, 128):
                s = row_split(rows, hidden, programs)
                assert s & (s - 1) == 0 and hidden % (128 * s) == 0 and s <= MAX_SPLIT
                assert s == 1 or (rows * s <= programs // 2 and hidden // s >= MIN_SEGMENT)
                if s < MAX_SPLIT and hidden % (256 * s) == 0 and hidden // (2 * s) >= MIN_SEGMENT:
                    assert rows * 2 * s > programs // 2, "the largest split allowed"


def test_a_row_exchange_timeout_says_the_launch_did_not_run_at_once():
    from sagellm_comm.errors import CommTimeoutError
    from sagellm_comm.kernels import all_reduce as k
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 4096, "cpu")
    try:
        record = workspaces[0].error_view
        record[k.ERR_PEER.value] = 0
        record[k.ERR_PHASE.value] = k.PHASE_ROW.value
        record[k.ERR_BLOCK.value] = 3
        record[k.ERR_EPOCH.value] = 2 * 41 + 2  # the amax exchange of call 41
        record[k.ERR_STATUS.value] = k.ERR_TIMEOUT.value
        exc = workspaces[0].failure()
        assert isinstance(exc, CommTimeoutError)
        assert exc.details["phase"] == "row exchange" and exc.details["call"] == 41
        assert "program 3 of fused Lamport call 41" in str(exc) and "did not all run at once" in str(exc)
    finally:
        for ws in workspaces:
            ws.close()


def test_default_fusion_rules_keep_one_shot_where_two_shot_has_two_rows_a_rank():
    from sagellm_comm.fused import FusionPolicy
    from sagellm_comm.selector import FOLLOW_ALL_REDUCE, ONE_SHOT

    policy = FusionPolicy()
    for quant in (None, "fp8", "fp8_per_token", "fp8_group128"):
        sel = policy.select(16, 8192, 8, quant)
        assert (sel.algo, sel.rule_id) == (ONE_SHOT, "w8-h8192-fused-one-shot"), sel
        assert policy.select(9, 8192, 8, quant).algo == ONE_SHOT
    for tokens, hidden, world in ((8, 8192, 8), (17, 8192, 8), (16, 4096, 8), (16, 8192, 4)):
        assert policy.select(tokens, hidden, world, None).algo == FOLLOW_ALL_REDUCE, (tokens, hidden, world)
