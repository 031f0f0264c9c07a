"""The two-shot all-reduce with an FP8 payload on the CPU: the kernel under the Triton interpreter, ranks as
processes, against the fp32 sum of the inputs, over the activations of ``sagellm_comm.benchmark.payload_error``
(the harness of ``bench/fp8_payload_error.py``).

The bounds, from the format (e4m3: 3 mantissa bits, round to nearest):

* *per element*: every quantised term (a peer's value, and the reduced sum) is off by at most half its FP8
  spacing, ``2**-4`` of its magnitude (normal range), or ``2**-10 * s`` in the subnormal range (``s`` the
  block's scale, ``amax / 448``); the result is then rounded to the input dtype (``2**-8``, ``2**-7`` where the
  interpreter truncates).  So ``|out - ref| <= 2**-4 * (sum_p |x_p| + |ref|) + 2**-10 * (sum_p s_p + s_ref) +
  2**-7 * |ref|``, with 10% for the second-order terms (the sum quantised is ``ref`` plus the peers' errors).
* *relative L2*: a rounding error is uniform within +-half a spacing, and the spacing is ``2**-3 / m`` of a value
  with mantissa ``m`` in [1, 2): rms ``sqrt(2**-6 / 12 * E[1/m**2]) = 0.0265`` for log-uniform ``m``.  ``W - 1``
  independent peer terms (``(W - 1) / W`` of the sum's energy) and the quantised sum give
  ``0.0265 * sqrt(2 - 1 / W) <= 0.037`` at W <= 8; the test allows 0.05.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.conftest import exchange_objects, join_gloo, run_ranks
from tests.fp8_checks import payload_bound

INTERP = {"TRITON_INTERPRET": "1"}
SLOT_BYTES = 65536
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REL_L2_BOUND = 0.05


def _setup(rank, world_size, port, slot_bytes=SLOT_BYTES, fallback=None):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(rank, world_size, slot_bytes, "cpu", exchange_objects, max_programs=3)
    return CustomAllReduce(ws, timeout_s=60.0, fallback=fallback)


def _payload_worker(rank, world_size, port, cases):
    from sagellm_comm.benchmark.payload_error import activations, error_stats, fp32_reference

    car = _setup(rank, world_size, port)
    out = []
    for i, (kind, rows, hidden, dtype_name, in_place) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        inputs = [x.to(dtype) for x in activations(kind, world_size, rows, hidden, seed=i)]
        x = inputs[rank].clone()
        result = car.all_reduce(x, algo="two_shot" if i % 2 else "auto", payload="fp8", **(
            {} if in_place else {"out": torch.full_like(x, float("nan"))}))  # fmt: skip
        car.check_errors()
        assert result.dtype == dtype and result.shape == x.shape
        assert (result.data_ptr() == x.data_ptr()) == in_place
        if not in_place:
            assert torch.equal(x, inputs[rank]), "the input was modified"
        ref = fp32_reference(inputs)
        excess = (result.float() - ref).abs() / payload_bound(inputs, ref, world_size)
        assert float(excess.max()) <= 1.0, f"{kind} {dtype_name}: {float(excess.max()):.3f} of the per-element bound"
        stats = error_stats(result, inputs)
        assert stats["rel_l2"] <= REL_L2_BOUND, (kind, dtype_name, stats)
        assert stats["rel_l2"] > 1e-3, "the payload is lossy: an error this small means it did not travel as FP8"
        out.append((hashlib.sha256(result.view(torch.uint8).numpy().tobytes()).hexdigest(), stats["rel_l2"]))
    # The same workspace then serves the 16-bit kernels, in step.
    for algo in ("two_shot", "one_shot", "lamport"):
        y = torch.full((1001,), float(rank + 1))
        car.all_reduce(y, algo=algo)
        assert torch.all(y == world_size * (world_size + 1) / 2), algo
    return out


def _cases(world_size):
    return [
        ("normal", 3, 1000, "bfloat16", True),  # 3000 elements: chunks and blocks with a ragged end
        ("student_t", 1, 4096, "bfloat16", False),
        ("outliers", 5, 640, "float16", True),
        ("normal", 1, 129 * world_size, "float32", False),
    ]


def _run(world_size):
    per_rank = run_ranks(_payload_worker, world_size, _cases(world_size), env=INTERP, timeout=540)
    for r in range(1, world_size):
        assert [d for d, _ in per_rank[r]] == [d for d, _ in per_rank[0]], f"rank {r} differs bitwise from rank 0"


@pytest.mark.parametrize("world_size", [2, 3])
def test_fp8_payload_error_is_bounded_and_ranks_agree(world_size):
    _run(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 5, 6, 7, 8])
def test_fp8_payload_at_every_world_size(world_size):
    _run(world_size)


def _args_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError, WorkspaceExhaustedError

    doubled = []
    car = _setup(rank, world_size, port, slot_bytes=16384, fallback=lambda t: doubled.append(1) or t.mul_(2))
    x = torch.ones(64, dtype=torch.bfloat16)
    epoch = car.epoch
    with pytest.raises(InvalidArgumentError, match="payload must be None or one of"):
        car.all_reduce(x, payload="int4")
    with pytest.raises(InvalidArgumentError, match="two_shot only"):
        car.all_reduce(x, algo="one_shot", payload="fp8")
    with pytest.raises(InvalidArgumentError, match="supports bfloat16"):
        car.all_reduce(torch.ones(64, dtype=torch.float64), payload="fp8")
    big = torch.ones(16384, dtype=torch.bfloat16)  # 32 KB: its FP8 staging (16.5 KB) is over the 16 KB slot
    with pytest.raises(WorkspaceExhaustedError, match="stages"):
        car.all_reduce(big, algo="two_shot", payload="fp8")
    assert car.epoch == epoch, "a refused call must not have run anything"
    car.all_reduce(big, payload="fp8")  # auto: the engine, at full precision
    assert doubled and torch.all(big == 2)
    # With out=, the engine's call leaves the input as it was, as the kernels do (payload or not).
    for kwargs in ({"payload": "fp8"}, {"algo": "nccl"}):
        src = torch.ones(16384, dtype=torch.bfloat16)
        dst = car.all_reduce(src, out=torch.zeros_like(src), **kwargs)
        assert torch.all(src == 1) and torch.all(dst == 2), kwargs
    car.all_reduce(x, payload="fp8")
    assert torch.all(x == world_size) and car.epoch == epoch + 1
    # An infinite input is NaN in its own element only (in a chunk its rank reduces and in one a peer reduces); a
    # sum of finite terms over the fp32 range (3e38 on every rank, beside 1e38s) saturates at the dtype's largest
    # value; the rest of each 128-element block stays finite.
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.full((512,), 0.25 * (rank + 1), dtype=dtype)  # chunks of 256: [0, 256) is rank 0's to reduce
        expected = torch.full((512,), 0.25 * world_size * (world_size + 1) / 2)
        if rank == 1:
            y[5], y[300] = float("inf"), float("-inf")
        y[128:256], expected[128:256] = 1e38, 1e38 * world_size
        y[130], expected[130] = 3e38, torch.finfo(dtype).max
        expected[[5, 300]] = float("nan")
        car.all_reduce(y, algo="two_shot", payload="fp8")
        car.check_errors()
        nan = expected.isnan()
        assert bool(y[nan].isnan().all()) and bool(y[~nan].isfinite().all()), y
        assert float(y[130]) == torch.finfo(dtype).max, y[128:132]
        assert bool(((y[~nan].float() - expected[~nan]).abs() <= expected[~nan] / 8).all()), y
    # fp16 saturates: a peer's term rounded up by its FP8 step (rank 1's 33952 in a block of amax 65504 arrives as
    # 35091) carries a sum that fits (65408) past 65504, and a sum over the range (2 x 40000) is 65504, not inf.
    z = torch.zeros(256, dtype=torch.float16)  # chunks of 128, one block each: rank 0 reduces elements 0-127
    if rank == 1:
        z[0], z[1] = 33952.0, 65504.0
    else:
        z[0] = 65408.0 - 33952.0
    z[130] = 40000.0  # in rank 1's block
    car.all_reduce(z, algo="two_shot", payload="fp8")
    car.check_errors()
    assert 65408.0 * 7 / 8 <= float(z[0]) <= 65504.0 and float(z[1]) == 65504.0, z[:2]  # fits: not inf
    assert bool(z.isfinite().all()) and float(z[130]) == 65504.0, z[128:132]  # past the range: saturated
    return True


def test_fp8_payload_arguments_and_capacity():
    run_ranks(_args_worker, 2, env=INTERP, timeout=300)


def _extremes_worker(rank, world_size, port):
    from sagellm_comm.benchmark.payload_error import fp32_reference

    car = _setup(rank, world_size, port, slot_bytes=16384)
    big = torch.finfo(torch.float32).max
    s = torch.tensor(big) / 448  # the scale of a block whose largest magnitude is FLT_MAX
    inputs = [torch.zeros(512) for _ in range(world_size)]  # chunks of 256: rank 0 reduces [0, 256)
    for mine, theirs, at in ((0, 1, 0), (1, 0, 256)):
        # The reducing rank's own term at full precision, the peer's 63 s (travelling as 64 s, one FP8 step up,
        # in a block whose largest magnitude is FLT_MAX): the sum fits fp32 (FLT_MAX - s / 2), the rounded one not.
        inputs[theirs][at], inputs[theirs][at + 1] = 63 * s, big
        inputs[mine][at] = big - 63.5 * s
    inputs[0][[400, 401]] = torch.tensor([float("nan"), 1.0])  # a NaN in a block of ones: only it is NaN
    inputs[1][[400, 401]] = 1.0
    # [128, 256) and [384, 512) (but 400 and 401) are zero blocks on every rank: exactly zero.
    ref = fp32_reference(inputs)
    assert bool(ref[[0, 1, 256, 257]].isfinite().all())
    y = inputs[rank].clone()
    car.all_reduce(y, algo="two_shot", payload="fp8")
    car.check_errors()
    finite = ref.isfinite()
    assert bool(y[~finite].isnan().all()) and bool(y[finite].isfinite().all()), y[[0, 1, 256, 257, 400, 401]]
    err = (y[finite].double() - ref[finite].double()).abs()
    assert bool((err <= ref[finite].double().abs() / 16).all()), y[[0, 1, 256, 257, 400, 401]]
    zero = torch.ones(512, dtype=torch.bool)
    zero[[0, 1, 256, 257, 400, 401]] = False
    assert bool((y[zero] == 0).all())
    return y.view(torch.int32).tolist()


def test_fp8_payload_near_the_fp32_range_zero_blocks_and_nan():
    """fp32 inputs near FLT_MAX: a sum that fits fp32 is finite even when a peer's term, rounded up by its FP8
    step, would carry it past FLT_MAX; all-zero blocks are exactly zero; a NaN is NaN in its element only."""
    per_rank = run_ranks(_extremes_worker, 2, env=INTERP, timeout=300)
    assert per_rank[0] == per_rank[1]


def test_bytes_moved_and_activations():
    from sagellm_comm.benchmark.payload_error import DISTRIBUTIONS, activations, bytes_moved

    assert bytes_moved(8192, 8, 2) == 2 * 7 * 1024 * 2
    assert bytes_moved(8192, 8, 2, "fp8") == 2 * 7 * (1024 + 32)  # 1 byte an element, 4 per 128
    assert bytes_moved(1000, 4, 2, "fp8") == 2 * 3 * (256 + 8)  # chunks rounded up to whole blocks
    for kind in DISTRIBUTIONS:
        a, b = activations(kind, 2, 4, 1024, seed=1), activations(kind, 2, 4, 1024, seed=1)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[0].dtype == torch.float32
    t = torch.cat(activations("student_t", 4, 64, 1024))
    assert float(t.abs().max()) > 10 * float(t.abs().median())  # heavy tails
    o = activations("outliers", 1, 64, 1000)[0]
    assert (o.abs().amax(0) > 20).sum() >= 5  # the outlier channels


def _backend_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import InvalidArgumentError

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port)
    backend = world.backend
    try:
        x = torch.full((3000,), float(rank + 1), dtype=torch.bfloat16)
        backend.all_reduce(x, payload="fp8")
        sel = backend.last_selection
        assert (sel.algo, sel.rule_id) == ("two_shot", "fp8-payload"), sel
        assert torch.all(x == 3.0)  # 1 and 2 are exact in FP8, and so is their sum
        y = torch.full((7,), float(rank + 1), dtype=torch.float64)  # not a kernel dtype: the engine, full precision
        backend.all_reduce(y, payload="fp8")
        assert backend.last_selection.algo == "gloo" and "full precision" in backend.last_selection.reason
        assert torch.all(y == 3.0)
        with pytest.raises(InvalidArgumentError, match="two_shot only"):
            backend.all_reduce(x, algo="lamport", payload="fp8")
        z = torch.full((5,), float(rank + 1))
        backend.all_reduce(z)  # never on by default
        assert backend.last_selection.rule_id != "fp8-payload" and torch.all(z == 3.0)
        return True
    finally:
        sagellm_comm.destroy()


def test_backend_all_reduce_takes_the_payload_option():
    run_ranks(_backend_worker, 2, env=INTERP, timeout=300)
