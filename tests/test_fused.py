"""Fused kernels on the CPU: all-reduce + RMSNorm and GEMM + all-reduce under the Triton interpreter.

Ranks are processes whose workspaces are shared files (as in ``test_custom_all_reduce.py``), so flags,
epochs and the tile protocol run as on GPUs.  Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import hashlib
import types

import pytest
import torch

from tests.conftest import exchange_objects, join_gloo, process_resources, resources_back_to, run_ranks

# two programs a launch (the CPU default is 32, interpreted one after another)
INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_MAX_PROGRAMS": "2"}
SLOT_BYTES = 16384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One rounding of the output plus the interpreter's truncating conversions.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2), "float16": (4e-3, 4e-3)}


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _setup(rank, world_size, port, gemm=False, timeout_s=60.0):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.fused import FusedAllReduceRMSNorm, GemmAllReduce, gemm_workspace_bytes
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(rank, world_size, SLOT_BYTES, "cpu", exchange_objects, max_programs=2)
    car = CustomAllReduce(ws, timeout_s=timeout_s)
    fused = FusedAllReduceRMSNorm(ws, timeout_s=timeout_s)
    if not gemm:
        return car, fused, None
    gws = SymmetricWorkspace.rendezvous(rank, world_size, gemm_workspace_bytes(8192), "cpu", exchange_objects)
    return car, fused, GemmAllReduce(gws, car, timeout_s=timeout_s, consumer_programs=2)


def _rms_inputs(case, world_size, rows, hidden, dtype):
    g = torch.Generator().manual_seed(7919 * case + rows * 31 + hidden)
    xs = [(torch.randn(rows, hidden, generator=g)).to(dtype) for _ in range(world_size)]
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return xs, residual, weight


def _rms_reference(xs, residual, weight, eps):
    reduced = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x in xs:  # rank order, fp32: the all-reduce's result
        reduced += x.float()
    new_res = (reduced.to(xs[0].dtype).float() + residual.float()).to(xs[0].dtype)
    v = new_res.float()
    normed = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(xs[0].dtype)
    return normed, new_res


def _rmsnorm_worker(rank, world_size, port, cases):
    car, fused, _ = _setup(rank, world_size, port)
    digests = []
    for i, (algo, rows, hidden, dtype_name) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        xs, residual, weight = _rms_inputs(i, world_size, rows, hidden, dtype)
        x = xs[rank].clone()
        res_in = residual.clone()
        normed, new_res = fused(x, res_in, weight, eps=1e-5, algo=algo)
        fused.check_errors()
        assert torch.equal(x, xs[rank]) and torch.equal(res_in, residual), "inputs were modified"
        ref_normed, ref_res = _rms_reference(xs, residual, weight, 1e-5)
        rtol, atol = TOL[dtype_name]
        tag = f"{algo} rows={rows} hidden={hidden} {dtype_name}"
        for got, want in ((new_res, ref_res), (normed, ref_normed)):
            torch.testing.assert_close(
                got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m, tag=tag: f"{tag}: {m}"
            )
        digests.append(_digest(normed, new_res))
    # The plain all-reduce still works on the shared workspace after the fused calls (same epochs).
    y = torch.full((37,), float(rank + 1))
    car.all_reduce(y, algo="two_shot")
    assert torch.all(y == world_size * (world_size + 1) / 2)
    return digests, int(car.workspace.control[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_rmsnorm_matches_reference_and_ranks_agree(world_size):
    cases = [
        ("one_shot", 1, 8, "float32"),
        ("one_shot", 5, 33, "bfloat16"),
        ("two_shot", 5, 33, "bfloat16"),  # 5 rows over 4 ranks: a rank with no rows
        ("two_shot", world_size * 2 + 1, 64, "float16"),
        ("one_shot", 3, 64, "float16"),
    ]
    per_rank = run_ranks(_rmsnorm_worker, world_size, cases, env=INTERP, timeout=300)
    digests = [d for d, _ in per_rank]
    for r in range(1, world_size):
        assert digests[r] == digests[0], f"rank {r} differs bitwise from rank 0"
    assert {e for _, e in per_rank} == {len(cases) + 1}  # every call advanced the shared epoch once


def _gemm_worker(rank, world_size, port, cases):
    # in the worker: kernels are imported under the interpreter
    from sagellm_comm.kernels.gemm_all_reduce import DATA_OFFSET

    _, _, gemm = _setup(rank, world_size, port, gemm=True)
    digests = []
    for i, (path, m, k, n, dtype_name, with_bias) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        g = torch.Generator().manual_seed(104729 * i + m)
        a_all = [torch.randn(m, k, generator=g).to(dtype) for _ in range(world_size)]
        b_all = [(torch.randn(k, n, generator=g) / k**0.5).to(dtype) for _ in range(world_size)]
        bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
        b = b_all[rank] if i % 2 == 0 else b_all[rank].t().contiguous().t()  # strided b (weight.t()) too
        # 3 chunks of 22, 22, 20 rows at M = 64; 5 chunks of 7 (the last 5) at M = 33; 1 chunk at M = 7; else 2
        gemm.ce_chunks = {64: 3, 33: 5, 7: 1}.get(m)
        zero_copy = path == "copy_engine" and i % 2 == 1  # every other copy-engine case: result in the workspace
        out = gemm(a_all[rank], b, bias=bias, path=path, zero_copy=zero_copy)
        gemm.check_errors()
        if zero_copy:
            assert out.data_ptr() == gemm.workspace.peer_ptrs[rank] + DATA_OFFSET.value
        ref = torch.zeros(m, n)
        for a_r, b_r in zip(a_all, b_all, strict=True):
            ref += (a_r.float() @ b_r.float()).to(dtype).float()  # each rank's partial is rounded once
        if bias is not None:
            ref += bias.float()
        rtol, atol = TOL[dtype_name]
        torch.testing.assert_close(
            out.float(), ref, rtol=rtol, atol=atol * 4, msg=lambda msg, c=(path, m, k, n): f"{c}: {msg}"
        )
        digests.append(_digest(out))
    from sagellm_comm.kernels.copy_engine import CE_EPOCH  # in the worker: kernels are imported under the interpreter

    ctrl = gemm.workspace.control
    return digests, (int(ctrl[0]), int(ctrl[CE_EPOCH.value]))


@pytest.mark.parametrize("world_size", [2, 4])
def test_gemm_all_reduce_paths_match_reference_and_ranks_agree(world_size):
    cases = [
        ("fused", 1, 16, 16, "bfloat16", False),  # decode: one tile (one-shot consumer)
        ("fused", 37, 24, 40, "float16", True),  # ragged tiles, two-shot consumer, bias once
        ("fused", 48, 16, 32, "bfloat16", False),  # back-to-back on the other buffer parity
        ("chunked", 19, 16, 24, "bfloat16", True),
        ("copy_engine", 19, 16, 24, "bfloat16", True),  # 2 chunks of 10 and 9 rows; bias in rank 0's partials
        ("copy_engine", 5, 16, 8, "float16", False),  # zero-copy; a rank with an empty part at W=4
        ("fused", 40, 16, 24, "bfloat16", False),  # the fused path right after the copy engines' ...
        ("copy_engine", 64, 32, 40, "bfloat16", False),  # ... and back: one workspace, both paths
        ("copy_engine", 33, 16, 24, "float16", True),  # 5 chunks: units of one own part and one peers' part
        ("copy_engine", 7, 16, 8, "bfloat16", False),  # 1 chunk (zero-copy)
        ("sequential", 9, 16, 24, "float16", True),
    ]
    per_rank = run_ranks(_gemm_worker, world_size, cases, env=INTERP, timeout=540)
    for r in range(1, world_size):
        assert per_rank[r][0] == per_rank[0][0], f"rank {r} differs bitwise from rank 0"
    assert {e for _, e in per_rank} == {(4, 5)}  # four fused and five copy-engine calls, one epoch each


def _zero_copy_input_worker(rank, world_size, port):
    """A zero_copy result lies in the GEMM workspace, which the next call's fused and copy-engine paths write while
    they read their inputs: given back as an input it is refused, on every path, before anything runs."""
    from sagellm_comm.errors import InvalidArgumentError

    _, _, gemm = _setup(rank, world_size, port, gemm=True)
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(8, 16, generator=g).bfloat16() for _ in range(world_size)]
    b = [(torch.randn(16, 16, generator=g) / 4).bfloat16() for _ in range(world_size)]
    y = gemm(a[rank], b[rank], path="copy_engine", zero_copy=True)
    gemm.check_errors()
    control = gemm.workspace.control.clone()  # the fused path's epoch, the copy engines' barrier epoch
    for path in ("copy_engine", "fused", "chunked", "sequential", "auto"):
        with pytest.raises(InvalidArgumentError, match="a lies in this GEMM"):
            gemm(y, b[rank], path=path)
        with pytest.raises(InvalidArgumentError, match="bias lies in this GEMM"):
            gemm(a[rank], b[rank], bias=y[0], path=path)
    assert torch.equal(gemm.workspace.control, control), "a refused call must not have run anything"
    y = y.clone()
    z = gemm(y, b[rank], path="copy_engine")
    gemm.check_errors()
    ref = sum((y.float() @ b_r.float()).bfloat16().float() for b_r in b)
    torch.testing.assert_close(z.float(), ref, rtol=TOL["bfloat16"][0], atol=TOL["bfloat16"][1] * 4)
    return True


def test_a_zero_copy_result_given_back_as_an_input_is_refused():
    run_ranks(_zero_copy_input_worker, 2, env=INTERP, timeout=300)


def _timeout_worker(rank, world_size, port, kind):
    import torch.distributed as dist

    from sagellm_comm.errors import CommTimeoutError

    _, fused, gemm = _setup(rank, world_size, port, gemm=True, timeout_s=0.3)
    if rank == 1:  # never joins
        dist.barrier()
        return None
    if kind == "rmsnorm":
        fused(torch.ones(2, 8), torch.ones(2, 8), torch.ones(8), algo="one_shot")
        target = fused
    else:
        ones = torch.ones(16, 16, dtype=torch.bfloat16)
        gemm(ones, ones, path="fused" if kind == "gemm" else "copy_engine")
        target = gemm
    with pytest.raises(CommTimeoutError) as info:
        target.check_errors()
    assert info.value.details["peer"] == 1, info.value.details
    dist.barrier()
    return str(info.value)


@pytest.mark.parametrize("kind", ["rmsnorm", "gemm", "copy_engine"])
def test_missing_peer_is_named(kind):
    msg = run_ranks(_timeout_worker, 2, kind, env=INTERP, timeout=300)[0]
    assert "peer rank 1 never arrived" in msg
    if kind == "copy_engine":
        assert "copy-engine barrier" in msg and "(step 0)" in msg, msg


def _pair(sel) -> tuple[str, str]:
    return sel.algo, sel.rule_id


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"path": "warp-speed"}, "path must be one of"),
        ({"min_m": -1}, "min_m must be >= 0"),
        ({"min_m": True}, "min_m must be an int"),
        ({"max_m": float("nan")}, "max_m must be an int"),
        ({"max_m": 64.0}, "max_m must be an int"),
        ({"min_m": 128, "max_m": 64}, "min_m 128 > max_m 64: the rule matches no call"),
        ({"min_bytes": -1}, "min_bytes must be >= 0"),
        ({"min_bytes": None}, "min_bytes must be an int"),
        ({"world_sizes": ()}, "world_sizes must be a non-empty list"),
        ({"world_sizes": 2}, "world_sizes must be a non-empty list"),
        ({"world_sizes": (0,)}, r"world_sizes\[0\] must be >= 1"),
        ({"world_sizes": ("2",)}, r"world_sizes\[0\] must be an int"),
        ({"reason": None}, "reason must be a string"),
        ({"id": ""}, "id must be a non-empty string"),
        ({"id": 3}, "id must be a non-empty string"),
        ({"id": "fused-capacity"}, "id 'fused-capacity' is reserved"),
        ({"id": "no-rule"}, "id 'no-rule' is reserved"),
        ({"id": "big+fast"}, r"id 'big\+fast' is reserved"),
    ],
)
def test_a_gemm_rule_checks_its_fields(fields, needle):
    """A GEMM rule is checked when it is made, as the all-reduce policy's rules are: no decision then names a path no
    call runs, a bound no call can meet (or a NaN, a bool, a string) or an id the selector reports for its own."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmRule

    with pytest.raises(InvalidArgumentError, match=needle):
        GemmRule(**{"id": "x", "path": "sequential", **fields})


@pytest.mark.parametrize(
    "rules, needle",
    [
        ("sequential", "GEMM rules must be a list of GemmRule"),
        ([{"id": "x", "path": "fused"}], "GEMM rules: rule 0 must be a GemmRule, got dict"),
        ([("small", "fused", 1, 64), ("rest", "sequential")], "rule 0 must be a GemmRule, got tuple"),
    ],
)
def test_gemm_rules_must_be_a_list_of_rules(rules, needle):
    """Not an AttributeError when the first call reads ``rule.path``: a typed error when the selector is made."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmPathSelector

    with pytest.raises(InvalidArgumentError, match=needle):
        GemmPathSelector(rules)


@pytest.mark.parametrize(
    "rules, needle",
    [
        # two rules of one id: a Selection could not say which decided
        ([("x", "fused", 1, 64), ("x", "sequential")], r"GEMM rules: ids \['x'\] name more than one rule"),
        # a catch-all first: nothing after it decides
        ([("all", "sequential"), ("small", "fused", 1, 64)], r"GEMM rule 1 \('small', fused\) never decides: .* 'all'"),
        # M ranges that together hold the third's, at every output size it takes
        (
            [("low", "sequential", 1, 1024), ("high", "chunked", 1025), ("w2", "fused", 512, 4096, (2,), "", 1 << 20)],
            r"GEMM rule 2 \('w2', fused\) never decides: .* 'low', 'high'",
        ),
        # an earlier rule for larger outputs only does not hold the smaller ones, but one for any size does
        (
            [
                ("big", "copy_engine", 1, None, None, "", 32 << 20),
                ("rest", "sequential"),
                ("w2", "fused", 1, None, (2,)),
            ],
            r"GEMM rule 2 \('w2', fused\) never decides: .* 'big', 'rest'",
        ),
    ],
)
def test_a_gemm_selector_refuses_rules_that_could_not_report_or_never_decide(rules, needle):
    """First match wins: a rule whose every call an earlier rule matches never decides (the policy says something it
    never does), and two rules of one id would report the same id; refused when the selector is made."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmPathSelector, GemmRule

    with pytest.raises(InvalidArgumentError, match=needle):
        GemmPathSelector([GemmRule(*r) for r in rules])


def test_a_gemm_capacity_override_names_the_rule_it_overrides():
    """The capacity checks replace a rule's choice: the reason says which rule chose what, and why it did not run
    (there may be no GEMM workspace at all, not one too small)."""
    from sagellm_comm.fused import GemmAllReduce, GemmPathSelector, GemmRule

    selector = GemmPathSelector([GemmRule("big-fused", "fused", reason="overlap pays"),
                                 GemmRule("ce", "copy_engine", min_m=0, max_m=0)])  # fmt: skip
    sel = selector.select(9000, 2, fused_fits=False)
    assert _pair(sel) == ("chunked", "fused-capacity")
    assert "rule big-fused picks fused (overlap pays)" in sel.reason and "or there is none" in sel.reason
    engine_only = GemmAllReduce(None, lambda t: t, selector=selector, world_size=2)
    sel = engine_only.select(0, 8)
    assert _pair(sel) == ("sequential", "copy-engine-capacity") and "rule ce picks copy_engine" in sel.reason


def test_a_gemm_call_no_rule_matches_says_every_condition_it_was_matched_on():
    """Rules match on the output's bytes too: a reason naming M and the world size alone would not say why a rule
    for that M and world size did not decide."""
    from sagellm_comm.fused import GemmPathSelector, GemmRule

    sel = GemmPathSelector([GemmRule("big", "copy_engine", world_sizes=(2,), min_bytes=32 << 20)]).select(
        4096, 2, output_bytes=1 << 20
    )
    assert _pair(sel) == ("sequential", "no-rule")
    assert sel.reason == "no rule matches M=4096, world_size=2, 1048576 output bytes; sequential runs"


def test_a_gemm_rule_that_decides_some_call_is_taken():
    from sagellm_comm.fused import GemmPathSelector, GemmRule

    rules = [  # outputs under the first rule's floor, then another world size, then the rest
        GemmRule("big", "copy_engine", min_m=2048, world_sizes=[2], min_bytes=32 << 20),
        GemmRule("w2", "fused", world_sizes=(2,)),
        GemmRule("rest", "sequential"),
    ]
    selector = GemmPathSelector(rules)
    assert selector.rules[1].world_sizes == (2,)
    assert _pair(selector.select(4096, 2, output_bytes=16 << 20)) == ("fused", "w2")
    assert _pair(selector.select(4096, 4, output_bytes=64 << 20)) == ("sequential", "rest")
    assert GemmPathSelector().rules  # the defaults


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: _fused_rmsnorm(policy=[("x", "unfused")]), "fusion_policy must be a FusionPolicy"),
        (lambda: _fused_rmsnorm(policy=3), "fusion_policy must be a FusionPolicy"),
        (lambda: _fused_rmsnorm(selector={"rules": []}), "selector must be an AlgoSelector"),
        (lambda: _gemm(selector=["sequential"]), "selector must be a GemmPathSelector"),
        (lambda: _gemm(selector="rules.json"), "selector must be a GemmPathSelector"),
    ],
)
def test_a_fused_op_refuses_a_policy_of_another_type_when_it_is_made(make, needle):
    """Not an AttributeError in the first call's decision (``'list' object has no attribute 'select'``): a typed
    error before the op touches its workspace (None here)."""
    from sagellm_comm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=needle):
        make()


def _fused_rmsnorm(**kwargs):
    from sagellm_comm.fused import FusedAllReduceRMSNorm

    return FusedAllReduceRMSNorm(None, **kwargs)


def _gemm(**kwargs):
    from sagellm_comm.fused import GemmAllReduce

    return GemmAllReduce(None, lambda t: t, **kwargs)


def _bad_input_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError, WorkspaceExhaustedError
    from sagellm_comm.fused import GemmPathSelector, GemmRule
    from sagellm_comm.selector import Selection

    _, fused, gemm = _setup(rank, world_size, port, gemm=True)
    x, w = torch.ones(2, 8), torch.ones(8)
    with pytest.raises(ShapeMismatchError, match="residual"):
        fused(x, torch.ones(2, 9), w)
    with pytest.raises(ShapeMismatchError, match="weight"):
        fused(x, x, torch.ones(9))
    with pytest.raises(InvalidArgumentError, match="must be one of"):
        fused(x.to(torch.int32), x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        fused(torch.ones(8, 2).t(), x, w)
    with pytest.raises(WorkspaceExhaustedError, match="two_shot stages"):
        fused(torch.ones(SLOT_BYTES // 8 + 8, 1), torch.ones(SLOT_BYTES // 8 + 8, 1), torch.ones(1), algo="two_shot")
    with pytest.raises(InvalidArgumentError, match="algo must be"):
        fused(x, x, w, algo="ring")
    a16, b16 = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(16, 8, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="must be one of"):
        gemm(torch.ones(4, 16), torch.ones(16, 8))  # fp32 is not a fused dtype
    with pytest.raises(ShapeMismatchError, match="do not chain"):
        gemm(a16, torch.ones(15, 8, dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatchError, match="bias"):
        gemm(a16, b16, bias=torch.ones(9, dtype=torch.bfloat16))
    with pytest.raises(WorkspaceExhaustedError, match="GEMM workspace"):
        gemm(torch.ones(128, 16, dtype=torch.bfloat16), torch.ones(16, 64, dtype=torch.bfloat16), path="fused")
    with pytest.raises(InvalidArgumentError, match="path must be"):
        gemm(a16, b16, path="magic")
    with pytest.raises(InvalidArgumentError, match="path must be one of"):
        GemmPathSelector([GemmRule("x", "warp-speed")])
    # Policy: the first matching rule decides; capacity overrides a fused rule; ids and reasons are recorded.
    policy = GemmPathSelector(
        [GemmRule("small", "sequential", max_m=64), GemmRule("mid", "chunked", max_m=256, world_sizes=(4,)),
         GemmRule("big", "fused", reason="overlap")]
    )  # fmt: skip
    assert policy.select(64, 2) == Selection("sequential", "small", "rule small")
    assert policy.select(200, 2) == Selection("fused", "big", "overlap")
    assert policy.select(200, 4).rule_id == "mid"
    assert _pair(policy.select(9000, 2, fused_fits=False)) == ("chunked", "fused-capacity")
    gemm.selector = policy
    assert _pair(gemm.select(512, 64)) == ("chunked", "fused-capacity")  # 64 KB output > this workspace
    assert _pair(gemm.select(16, 16)) == ("sequential", "small")
    assert _pair(GemmPathSelector().select(16384, 8)) == ("sequential", "measured-sequential")
    default = GemmPathSelector()  # copy engines: measured at 2 ranks, M >= 2048, outputs >= 32 MB
    assert _pair(default.select(8192, 2, output_bytes=128 << 20)) == ("copy_engine", "measured-copy-engine-2")
    assert _pair(default.select(2048, 2, output_bytes=32 << 20)) == ("copy_engine", "measured-copy-engine-2")
    assert _pair(default.select(8192, 2, output_bytes=16 << 20)) == ("sequential", "measured-sequential")
    assert _pair(default.select(2048, 2, output_bytes=16 << 20)) == ("sequential", "measured-sequential")
    assert _pair(default.select(1024, 2, output_bytes=128 << 20)) == ("sequential", "measured-sequential")
    assert _pair(default.select(8192, 4, output_bytes=128 << 20)) == ("sequential", "measured-sequential")
    assert _pair(default.select(8192, 2, output_bytes=128 << 20, copy_engine_fits=False)) == (
        "sequential",
        "copy-engine-capacity",
    )
    with pytest.raises(WorkspaceExhaustedError, match="copy_engine path"):
        gemm(torch.ones(128, 16, dtype=torch.bfloat16), torch.ones(16, 64, dtype=torch.bfloat16), path="copy_engine")
    # Nothing is corrupted: a valid call still works on both ranks (rows that differ, so that the norm of the
    # wrong row, or of the input instead of the sum, would not pass).
    x = torch.arange(1.0, 17.0).view(2, 8) * (rank + 1)
    residual, weight = torch.linspace(-1.0, 1.0, 16).view(2, 8), torch.linspace(0.5, 2.0, 8)
    normed, new_res = fused(x, residual, weight, eps=0.0)
    expected = torch.arange(1.0, 17.0).view(2, 8) * 3 + residual
    assert torch.equal(new_res, expected)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(expected, (8,), weight, eps=0.0))
    return True


def test_bad_inputs_raise_typed_errors():
    run_ranks(_bad_input_worker, 2, env=INTERP, timeout=300)


def _group_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import NotInitializedError
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, gemm_all_reduce, group_gemm, last_selection

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port)
    gemm_workspace = None
    try:
        assert world.backend.custom is not None, world.backend.custom_reason
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(3, 16, generator=g) for _ in range(world_size)]
        residual, weight = torch.randn(3, 16, generator=g), torch.rand(16, generator=g) + 0.5
        normed, new_res = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 1e-6, group=world)
        assert last_selection(world).algo == "lamport", last_selection(world)  # the all-reduce policy's, fused
        ref_normed, ref_res = _rms_reference(xs, residual, weight, 1e-6)
        torch.testing.assert_close(new_res, ref_res, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
        a = torch.randn(5, 16, generator=g).to(torch.bfloat16)
        b = torch.randn(16, 16, generator=g).to(torch.bfloat16) * (rank + 1)
        out = gemm_all_reduce(a, b, group=world)
        gemm_workspace = group_gemm(world).workspace
        sel = last_selection(world)
        assert (sel.algo, sel.rule_id) == ("sequential", "measured-sequential"), sel
        b_of = [b.float() / (rank + 1) * (r + 1) for r in range(world_size)]
        ref = sum((a.float() @ b_r).to(torch.bfloat16).float() for b_r in b_of)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        # reset() rebuilds the group's kernels; the GEMM's workspace goes with the old ones and is made again.
        kept_gemm = group_gemm(world)
        world.backend.reset()
        assert gemm_workspace.closed
        with pytest.raises(NotInitializedError, match=r"reset\(\) released and made again") as err:
            kept_gemm(a, b)  # a GEMM kept from before says why it is closed
        assert "destroy" not in str(err.value)
        assert torch.equal(gemm_all_reduce(a, b, group=world), out)
        assert group_gemm(world).workspace is not gemm_workspace
        gemm_workspace = group_gemm(world).workspace
        # fp32 is not a fused GEMM dtype: the group falls back and says why.
        gemm_all_reduce(a.float(), b.float(), group=world)
        assert last_selection(world).rule_id == "custom-unavailable" and "not fused" in last_selection(world).reason
        digest = _digest(normed, new_res, out)
        kept_gemm = group_gemm(world)
    finally:
        sagellm_comm.destroy()
    with pytest.raises(NotInitializedError, match="its backend was destroyed"):
        kept_gemm(a, b)
    # The GEMM's own workspace goes with the backend (each init / destroy cycle would keep one otherwise).
    return digest, gemm_workspace.closed


def test_group_level_functions_use_the_custom_workspace():
    results = run_ranks(_group_worker, 2, env=INTERP, timeout=300)
    assert results[0][0] == results[1][0]
    assert [closed for _, closed in results] == [True, True]


def _released_fused_groups_worker(rank, world_size, port, cycles):
    """Sub-groups made, run through the group-level fused all-reduce + RMSNorm and released, again and again, then
    the backend destroyed: what stays alive and open after a warm-up, after ``cycles`` more, and after the
    destroy."""
    import gc
    import weakref

    from sagellm_comm import CommBackend, CommGroup
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, last_selection

    backend = CommBackend.create("custom", max_bytes=8192, kernel_timeout=60.0)
    backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 16, generator=g) for _ in range(world_size)]
    residual, weight = torch.randn(2, 16, generator=g), torch.rand(16, generator=g) + 0.5
    held = []  # weak references to each released group's handle and kernels

    def cycle(backend) -> str:
        group = CommGroup(backend, backend.new_group([0, 1]))
        kernels = backend.kernels_for(group)
        assert kernels is not None, backend.kernels_reason(group)
        _, new_res = all_reduce_residual_rmsnorm(xs[rank], residual, weight, 1e-6, group=group)
        torch.testing.assert_close(new_res, _rms_reference(xs, residual, weight, 1e-6)[1], rtol=1e-5, atol=1e-5)
        held.extend((weakref.ref(group.handle), weakref.ref(kernels)))
        group.destroy()
        return last_selection(group).algo

    algos = [cycle(backend) for _ in range(2)]
    warm = process_resources()
    algos += [cycle(backend) for _ in range(cycles)]
    after = resources_back_to(warm)
    alive = sum(ref() is not None for ref in held)
    backend.destroy()
    destroyed = weakref.ref(backend)
    del backend
    gc.collect()
    return {"algos": algos, "warm": warm, "after": after, "alive": alive, "backend alive": destroyed() is not None}


def test_a_released_group_leaves_no_fused_state_and_a_destroyed_backend_is_freed():
    """The group-level fused operations' per-group state (the fused operation over the group's kernels) is dropped
    with the group's kernels: it was kept in a module registry per backend, keyed by the group handle's id, until the
    backend object was freed, which it never was (the state's kernels reference the backend).  Each released
    sub-group so kept its kernels, handle and process groups (sockets and threads) alive, and a destroyed backend
    everything it had made."""
    for out in run_ranks(_released_fused_groups_worker, 2, 4, env=INTERP, timeout=300):
        assert all(out["after"][key] <= out["warm"][key] for key in out["warm"]), out
        assert out["alive"] == 0 and not out["backend alive"], out
        assert len(set(out["algos"])) == 1 and out["algos"][0] != "unfused", out


def _fusion_policy_worker(rank, world_size, port, policy_file):
    import sagellm_comm
    from sagellm_comm import ops
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, last_selection

    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, fusion_policy=policy_file
    )
    seen, outs = [], []
    try:
        backend = world.backend
        assert backend.custom is not None, backend.custom_reason
        assert backend.fusion_policy.source == f"derived_rules of {policy_file}"
        tp = world.split(world_size)  # a sub-group: its own workspace, the backend's policy
        assert backend.kernels_for(tp) is not None, backend.kernels_reason(tp)
        g = torch.Generator().manual_seed(11)
        xs = [torch.randn(5, 16, generator=g) for _ in range(world_size)]
        residual, weight = torch.randn(5, 16, generator=g), torch.rand(16, generator=g) + 0.5

        def run(group, rows, fused=all_reduce_residual_rmsnorm):
            normed, new_res = fused(xs[rank][:rows], residual[:rows], weight, 1e-6, group=group)
            ref_normed, ref_res = _rms_reference([x[:rows] for x in xs], residual[:rows], weight, 1e-6)
            torch.testing.assert_close(new_res, ref_res, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
            sel = last_selection(group)
            seen.append((sel.algo, sel.rule_id))
            outs.extend((normed, new_res))

        run(world, 3)
        run(world, 5)  # over the rule's rows: the all-reduce policy's kernel, fused
        run(tp, 3)
        run(None, 3, ops.all_reduce_residual_rmsnorm)  # the custom op of the compile pass and the TP layers
        backend.reset()  # new workspaces, new fused operations: the same policy
        run(world, 3)
        run(tp, 3)
    finally:
        sagellm_comm.destroy()
    return seen, _digest(*outs)


def test_the_custom_backend_runs_the_fusion_policy_it_is_given_on_every_group(tmp_path):
    """``fusion_policy=`` (here the benchmark's record, its ``derived_rules``) decides the group-level fused op of
    the world, of a sub-group, of the custom op, and after ``reset()``, alike on every rank."""
    import json

    rules = [
        {"id": "few-rows-unfused", "path": "unfused", "hidden": [16], "max_tokens": 3, "reason": "measured"},
        {"id": "rest", "path": "all_reduce_policy"},
    ]
    record = tmp_path / "fp8_fused.json"
    record.write_text(json.dumps({"meta": {"device": "test"}, "virtual": [], "derived_rules": {"rules": rules}}))
    results = run_ranks(_fusion_policy_worker, 2, str(record), env=INTERP, timeout=300)
    unfused = ("unfused", "few-rows-unfused")
    for seen, _ in results:
        assert seen == [unfused, ("lamport", "ws2-lamport"), unfused, unfused, unfused, unfused], seen
    assert results[0][1] == results[1][1]


def _first_gemm_refused_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import ShapeMismatchError
    from sagellm_comm.fused import gemm_all_reduce, group_gemm

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port)
    try:
        a, b = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(16, 8, dtype=torch.bfloat16)
        with pytest.raises(ShapeMismatchError, match="do not chain"):
            gemm_all_reduce(a, torch.ones(15, 8, dtype=torch.bfloat16), group=world)
        made = group_gemm(world) is not None
        out = gemm_all_reduce(a, b * (rank + 1), group=world)
        assert torch.equal(out, torch.full((4, 8), 16.0 * 3, dtype=torch.bfloat16)), out
        return made
    finally:
        sagellm_comm.destroy()


def test_a_refused_first_gemm_call_makes_no_gemm_workspace():
    """Bad inputs of the first GEMM + all-reduce on a group with custom kernels raise before the collective set-up
    of its GEMM workspace: nothing is made, and the next valid call sets it up and sums right."""
    assert run_ranks(_first_gemm_refused_worker, 2, env=INTERP, timeout=300) == [False, False]


def _consumer_programs_worker(rank, world_size, port):
    import sagellm_comm
    import sagellm_comm.fused.group as fused_group
    from sagellm_comm.fused import gemm_all_reduce, group_gemm, last_selection

    real = fused_group.GemmAllReduce
    if rank == 1:  # a rank with fewer SMs (a smaller GPU, an MPS share) proposes fewer consumer programs

        def fewer(*args, **kwargs):
            return real(*args, **{**kwargs, "consumer_programs": 1})

        fused_group.GemmAllReduce = fewer
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, max_bytes=16384)
    try:
        rows = torch.arange(64).remainder(5).view(64, 1).float()
        a, b = (rows + rank).expand(64, 16).to(torch.bfloat16), torch.ones(16, 32, dtype=torch.bfloat16)
        out = gemm_all_reduce(a, b, group=world, path="fused")  # 8 tiles of 16 x 16, owned by turns
        assert last_selection(world).algo == "fused", last_selection(world)
        assert torch.equal(out, (16 * (2 * rows + 1)).expand(64, 32).to(torch.bfloat16)), out
        return group_gemm(world).consumer_programs
    finally:
        fused_group.GemmAllReduce = real
        sagellm_comm.destroy()


def test_the_members_of_a_group_launch_the_fused_gemms_smallest_consumer_count():
    """Which rank reduces a tile of the fused path follows from the consumer kernel's program count: members that
    proposed other counts (a quarter of their own SMs) launch the smallest, and every tile is reduced once."""
    assert run_ranks(_consumer_programs_worker, 2, env=INTERP, timeout=300) == [1, 1]


def _gemm_set_up_fails_worker(rank, world_size, port):
    import sagellm_comm
    import sagellm_comm.fused.group as fused_group
    from sagellm_comm.fused import gemm_all_reduce, group_gemm
    from sagellm_comm.workspace import SymmetricWorkspace

    made = []

    class Recording(SymmetricWorkspace):
        @classmethod
        def rendezvous(cls, *args, **kwargs):
            made.append(SymmetricWorkspace.rendezvous(*args, **kwargs))
            return made[-1]

    def refused(*args, **kwargs):
        raise MemoryError("no memory for the side stream")

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port)
    try:
        a, b = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(16, 8, dtype=torch.bfloat16)
        real = fused_group.GemmAllReduce
        fused_group.SymmetricWorkspace, fused_group.GemmAllReduce = Recording, refused
        try:
            with pytest.raises(MemoryError):
                gemm_all_reduce(a, b, group=world)
        finally:
            fused_group.GemmAllReduce = real
        first_closed = made[0].closed
        out = gemm_all_reduce(a, b * (rank + 1), group=world)
        assert torch.equal(out, torch.full((4, 8), 16.0 * 3, dtype=torch.bfloat16)), out
        assert group_gemm(world).workspace is made[1]
        return first_closed
    finally:
        fused_group.SymmetricWorkspace = SymmetricWorkspace
        sagellm_comm.destroy()


def test_a_gemm_set_up_that_fails_after_its_rendezvous_closes_its_workspace():
    """The GEMM + all-reduce's workspace of a group is closed at once when making the GemmAllReduce over it fails
    (not kept until the group is destroyed, one more with every retry); the next call sets up a new one."""
    assert run_ranks(_gemm_set_up_fails_worker, 2, env=INTERP, timeout=300) == [True, True]


def _gloo_group_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, gemm_all_reduce, last_selection

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        x = torch.arange(1.0, 9.0).view(2, 4) * (rank + 1)
        residual, weight = torch.linspace(-1.0, 1.0, 8).view(2, 4), torch.tensor([0.5, 1.0, 1.5, 2.0])
        normed, new_res = all_reduce_residual_rmsnorm(x, residual, weight, 0.0, group=world)
        sel = last_selection(world)
        assert sel.algo == "unfused" and sel.rule_id == "custom-unavailable", sel
        expected = torch.arange(1.0, 9.0).view(2, 4) * 3 + residual
        assert torch.equal(new_res, expected)
        torch.testing.assert_close(normed, torch.nn.functional.rms_norm(expected, (4,), weight, eps=0.0))
        a, b = torch.arange(6.0).view(2, 3) + rank, torch.arange(12.0).view(3, 4)
        out = gemm_all_reduce(a, b, group=world, bias=torch.ones(4))
        assert torch.equal(out, (torch.arange(6.0).view(2, 3) * 2 + 1) @ b + 1)  # bias added once
        return True
    finally:
        sagellm_comm.destroy()


def test_group_level_functions_fall_back_without_custom():
    run_ranks(_gloo_group_worker, 2, timeout=120)


def _cancelling_gemm_inputs(rank, world_size, dtype):
    """``a`` of this rank and ``b`` (the identity): the partial ``a @ b`` is ``a``, exactly, on every GEMM.  Per
    column, 1 on one rank and half an ulp of 1 (``h``) on two others, every placement (row 1 negated): the fp32
    sum 1 + 2h is exact and representable (rounded once, it stays), while 16-bit additions that start from the
    1 lose each h (ties to even).  Returns ``(a, b, expected)``."""
    import itertools

    h = torch.finfo(dtype).eps / 2
    a = torch.zeros(2, 16)
    column = 0
    for big in range(world_size):
        for small in itertools.combinations([r for r in range(world_size) if r != big], 2):
            a[0, column] = 1.0 if rank == big else h if rank in small else 0.0
            expected_column = column
            column += 1
    a[1] = -a[0]
    expected = torch.zeros(2, 16)
    expected[0, : expected_column + 1] = 1 + 2 * h
    expected[1] = -expected[0]
    return a.to(dtype), torch.eye(16, dtype=dtype), expected.to(dtype)


def _gemm_kernel_sums_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import gemm_all_reduce, group_gemm, last_selection

    # 4 KiB messages: the tall output below is over the workspace, and the sequential path's all-reduce runs on
    # the engine (the custom all-reduce's fallback) there.
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, max_bytes=4096)
    try:
        car = world.backend.custom
        assert car is not None, world.backend.custom_reason
        results = {}
        for dtype in (torch.bfloat16, torch.float16):
            a, b, expected = _cancelling_gemm_inputs(rank, world_size, dtype)
            for path in ("fused", "sequential", "chunked"):
                out = gemm_all_reduce(a, b, group=world, path=path)
                assert last_selection(world).algo == path, last_selection(world)
                assert torch.equal(out, expected), (path, dtype, out)
                results[(path, str(dtype))] = out.float().tolist()
            # The copy-engine path, one chunk of 8 rows cut into W parts: every rank owns rows and sums its part.
            group_gemm(world).ce_chunks = 1
            out = gemm_all_reduce(a.repeat(4, 1), b, group=world, path="copy_engine")
            assert last_selection(world).algo == "copy_engine", last_selection(world)
            assert torch.equal(out, expected.repeat(4, 1)), ("copy_engine", dtype, out)
            group_gemm(world).ce_chunks = None
            tall = a.repeat(80, 1)  # 160 x 16 16-bit elements: 5120 bytes
            assert car.resolve_algo("auto", tall.numel(), 2 * tall.numel()) == "nccl"
            out = gemm_all_reduce(tall, b, group=world, path="sequential")
            assert torch.equal(out, expected.repeat(80, 1)), (dtype, out)
        return results
    finally:
        sagellm_comm.destroy()


def _gemm_engine_sums_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import GemmAllReduce, gemm_all_reduce, last_selection

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        results, engine_alone = {}, {}
        for dtype in (torch.bfloat16, torch.float16):
            a, b, expected = _cancelling_gemm_inputs(rank, world_size, dtype)
            out = gemm_all_reduce(a, b, group=world)
            assert last_selection(world).rule_id == "custom-unavailable", last_selection(world)
            results[("group", str(dtype))] = out.float().tolist()
            # GemmAllReduce on an engine's all-reduce (no GEMM workspace): its sequential and chunked paths.
            gemm = GemmAllReduce(None, world.all_reduce, world_size=world_size, num_chunks=2)
            for path in ("sequential", "chunked"):
                results[(path, str(dtype))] = gemm(a, b, path=path).float().tolist()
            plain = a @ b
            world.all_reduce(plain)  # the engine alone, in the dtype: a rounding per addition
            engine_alone[str(dtype)] = not torch.equal(plain, expected)
        return results, engine_alone
    finally:
        sagellm_comm.destroy()


@pytest.mark.parametrize("world_size", [3, 4])
def test_gemm_engine_fallback_sums_16_bit_partials_as_the_kernels_do(world_size):
    """From 3 ranks on the engine (Gloo) adds bf16/fp16 one addition at a time, rounding each; the fallback of
    the GEMM + all-reduce sums in fp32 and rounds once, as the fused, sequential, chunked and copy-engine kernel
    paths do: the same bits, where the engine alone loses the halves of an ulp."""
    kernels = run_ranks(_gemm_kernel_sums_worker, world_size, env=INTERP, timeout=300)
    engine = run_ranks(_gemm_engine_sums_worker, world_size, timeout=120)
    want = kernels[0][("sequential", "torch.bfloat16")]
    assert all(k == kernels[0] for k in kernels)
    for results, engine_alone in engine:
        for (path, dtype), got in results.items():
            assert got == kernels[0][("fused", dtype)] == kernels[0][("sequential", dtype)], (path, dtype)
        assert engine_alone == {"torch.bfloat16": True, "torch.float16": True}  # the inputs show the difference
    assert want[0][0] == 1 + 2.0**-7  # bf16: 1 + eps


def _gemm_kernel_bias_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import gemm_all_reduce, group_gemm, last_selection

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, max_bytes=4096)
    try:
        results = {}
        for dtype in (torch.bfloat16, torch.float16):
            e = torch.finfo(dtype).eps  # the spacing at 1
            # Rank 0's product is 1 + 5/8 e (exact in fp32), the bias -e/4: added to a partial before it is
            # rounded, 1 + 3/8 e rounds to 1; added to the reduced sum (1 + e), 1 + 3/4 e rounds to 1 + e.
            a = torch.zeros(2 * world_size, 16)
            if rank == 0:
                a[:, 0], a[:, 1] = 1.0, e / 2 + e / 8
            a, b = a.to(dtype), torch.ones(16, 16, dtype=dtype)
            bias = torch.full((16,), -e / 4, dtype=dtype)
            for path in ("sequential", "chunked", "copy_engine"):
                if path == "copy_engine":  # (the group's GEMM exists once a call has made it)
                    group_gemm(world).ce_chunks = 1  # one chunk: a part of 2 rows owned by every rank
                out = gemm_all_reduce(a, b, group=world, bias=bias, path=path)
                assert last_selection(world).algo == path, last_selection(world)
                results[(path, str(dtype))] = sorted(set(out.float().flatten().tolist()))
        return results
    finally:
        sagellm_comm.destroy()


@pytest.mark.parametrize("world_size", [2, 3])
def test_gemm_copy_engine_adds_the_bias_to_a_partial_before_rounding(world_size):
    """The copy-engine path adds the bias where the sequential path does, to a partial before it is rounded
    (rank 0's), not to the reduced sum: 1 on every path, where the sum rounded
    twice gives 1 + eps."""
    for results in run_ranks(_gemm_kernel_bias_worker, world_size, env=INTERP, timeout=300):
        for (path, dtype), got in results.items():
            assert got == [1.0], (path, dtype, results)


def _gemm_engine_bias_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.fused import GemmAllReduce, gemm_all_reduce, last_selection

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        results = {}
        for dtype in (torch.bfloat16, torch.float16):
            e = torch.finfo(dtype).eps  # the spacing at 1
            # Rank 0's product is 1 + 5/8 e (exact in fp32), its bias -e/4: added before rounding, 1 + 3/8 e rounds
            # to 1; the product rounded first (1 + e) and the bias added then give 1 + e.  The other ranks add 0.
            a = torch.tensor([[1.0, e / 2 + e / 8]] if rank == 0 else [[0.0, 0.0]], dtype=dtype)
            b, bias = torch.ones(2, 1, dtype=dtype), torch.tensor([-e / 4], dtype=dtype)
            out = gemm_all_reduce(a, b, group=world, bias=bias)
            assert last_selection(world).rule_id == "custom-unavailable", last_selection(world)
            results[("group", str(dtype))] = out.float().tolist()
            gemm = GemmAllReduce(None, world.all_reduce, world_size=world_size, num_chunks=2)
            for path in ("sequential", "chunked"):
                results[(path, str(dtype))] = gemm(a, b, bias, path=path).float().tolist()
        return results
    finally:
        sagellm_comm.destroy()


def test_gemm_engine_fallback_adds_the_bias_before_rounding_as_the_sequential_path_does():
    """The group-level GEMM + all-reduce without kernels (Gloo) gives the sequential path's bits with a bias too:
    rank 0's partial is its product plus the bias rounded once (addmm), not the rounded product plus the bias."""
    for results in run_ranks(_gemm_engine_bias_worker, 2, timeout=120):
        for (path, _), got in results.items():
            assert got == [[1.0]], (path, results)


def test_virtual_ranks_sequential_gemm_adds_the_bias_before_rounding():
    """The virtual ranks' sequential GEMM + all-reduce (on a stand-in group that sums the stacked ranks in fp32 and
    rounds once, as their all-reduce kernels do) gives one rank's sequential bits with a bias: rank 0's partial is
    its product plus the bias rounded once (addmm), not the rounded product plus the bias."""
    from types import SimpleNamespace

    from sagellm_comm.fused import GemmAllReduce, VirtualFused

    def all_reduce_stacked(t):
        return t.copy_(t.float().sum(0, keepdim=True).expand_as(t).to(t.dtype))

    for world_size in (2, 3):
        fused = object.__new__(VirtualFused)  # VirtualFused needs CUDA: made here without its constructor
        open_ws = SimpleNamespace(closed=False, raise_if_failed=lambda: None)
        fused.group = SimpleNamespace(workspaces=[open_ws], all_reduce_stacked=all_reduce_stacked)
        fused.gemm_workspaces, fused.world_size, fused.device = [open_ws], world_size, torch.device("cpu")
        fused.gemm = GemmAllReduce(None, lambda t: t, world_size=world_size)
        for dtype in (torch.bfloat16, torch.float16):
            e = torch.finfo(dtype).eps  # rank 0: 1 + 5/8 e, bias -e/4, as in the engine fallback's test above
            a = torch.zeros(world_size, 1, 2, dtype=dtype)
            a[0, 0] = torch.tensor([1.0, e / 2 + e / 8])
            b = torch.ones(world_size, 2, 1, dtype=dtype)
            out = fused.gemm_all_reduce(a, b, torch.tensor([-e / 4], dtype=dtype), path="sequential")
            assert out.float().tolist() == [[[1.0]]] * world_size, (world_size, dtype, out)


def _gloo_bad_input_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, gemm_all_reduce

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port)
    try:
        x = torch.arange(1.0, 9.0).view(2, 4).to(torch.bfloat16)
        residual, weight = torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
        ints = torch.ones(2, 4, dtype=torch.int32)
        bad = [  # (error, message, args, kwargs): the kernel path's errors and messages
            (ShapeMismatchError, "must match x", (x, residual.float(), weight), {}),
            (ShapeMismatchError, "must match x", (x, residual, weight.float()), {"quant": "fp8_per_token"}),
            (ShapeMismatchError, "must match x", (x, residual[:1], weight), {}),
            (ShapeMismatchError, r"contiguous \[4\] tensor", (x, residual, torch.ones(5, dtype=torch.bfloat16)), {}),
            (InvalidArgumentError, "x must be one of", (ints, ints, torch.ones(4, dtype=torch.int32)), {}),
            (InvalidArgumentError, "x must be one of", (x.double(), residual.double(), weight.double()), {}),
            (InvalidArgumentError, "contiguous 2-d", (x[0], residual[0], weight), {}),
            (InvalidArgumentError, "contiguous 2-d", (x.t(), residual.t(), torch.ones(2, dtype=torch.bfloat16)), {}),
            # The message names the tensor at fault: a transposed residual beside a good x.
            (
                InvalidArgumentError,
                r"residual must be a contiguous 2-d tensor, got shape \(2, 4\) with strides \(1, 2\)",
                (x, torch.zeros(4, 2, dtype=torch.bfloat16).t(), weight),
                {},
            ),
            (
                InvalidArgumentError,
                r"x must be a contiguous 2-d tensor, got shape \(2, 4\) with strides \(1, 2\)",
                (x.t().contiguous().t(), residual, weight),
                {"quant": "fp8_per_token"},
            ),
            (InvalidArgumentError, "must be a torch.Tensor, got list", ([1.0] * 4, residual, weight), {}),
            (InvalidArgumentError, "residual is on meta", (x, residual.to("meta"), weight), {}),
            (InvalidArgumentError, "hidden size must be at least 1", (x[:, :0], residual[:, :0], weight[:0]), {}),
        ]
        for error, match, args, kwargs in bad:
            # Rejected on every rank; then on rank 0 alone, which must enter no all-reduce (rank 1's next call
            # would pair with it and the ranks would fall out of step).
            for callers in (range(world_size), (0,)):
                if rank in callers:
                    with pytest.raises(error, match=match):
                        all_reduce_residual_rmsnorm(*args, 1e-6, group=world, **kwargs)
            _, new_res = all_reduce_residual_rmsnorm(x * (rank + 1), residual, weight, 1e-6, group=world)
            assert torch.equal(new_res, x * 3), (match, new_res)
        a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4)
        bad_gemm = [  # (error, message, args, kwargs): the GEMM kernel path's errors and messages
            (ShapeMismatchError, r"bias must be a contiguous \[4\]", (a, b), {"bias": torch.ones(9)}),
            (ShapeMismatchError, r"bias must be a contiguous \[4\]", (a, b), {"bias": torch.ones(1)}),
            (ShapeMismatchError, r"bias must be a contiguous \[4\]", (a, b), {"bias": torch.ones(4).double()}),
            (ShapeMismatchError, "of one dtype", (a, b.double()), {}),
            (ShapeMismatchError, "do not chain", (a, torch.ones(5, 4)), {}),
            (ShapeMismatchError, "2-d tensors", (a[0], b), {}),
            (InvalidArgumentError, "a must be one of", (a.long(), b.long()), {}),
            (InvalidArgumentError, "b is on meta", (a, b.to("meta")), {}),
            (InvalidArgumentError, "must be a torch.Tensor, got list", ([[1.0] * 3] * 2, b), {}),
            (InvalidArgumentError, "empty GEMM", (a[:0], b), {}),
        ]
        for error, match, args, kwargs in bad_gemm:
            for callers in (range(world_size), (0,)):  # on every rank, then on rank 0 alone (no all-reduce entered)
                if rank in callers:
                    with pytest.raises(error, match=match):
                        gemm_all_reduce(*args, group=world, **kwargs)
            out = gemm_all_reduce(a * (rank + 1), b, group=world, bias=torch.ones(4))
            assert torch.equal(out, a * 3 @ b + 1), (match, out)
        return True
    finally:
        sagellm_comm.destroy()


def test_fallback_rejects_bad_inputs_before_the_all_reduce():
    """Without custom kernels (Gloo), bad inputs of the fused all-reduce + RMSNorm and of the GEMM + all-reduce raise
    the kernel path's typed errors on every rank, and a rank whose call is rejected enters no all-reduce: the next
    valid call still pairs up and sums right."""
    run_ranks(_gloo_bad_input_worker, 2, timeout=120)


@pytest.mark.parametrize("count", range(1, 9))
def test_copy_engine_units_order_the_pulls(count):
    """Every chunk's peers' parts run once, before its own part; each pull has a unit of GEMMs to hide under."""
    from sagellm_comm.fused.gemm import copy_engine_units

    units = copy_engine_units(count)
    peers_at = {c: i for i, (peers_of, _) in enumerate(units) for c in peers_of}
    own_at = {c: i for i, (_, own_of) in enumerate(units) for c in own_of}
    assert sorted(peers_at) == sorted(own_at) == list(range(count))
    assert sum(len(p) for p, _ in units) == sum(len(o) for _, o in units) == count  # each exactly once
    assert all(p or o for p, o in units)  # no empty unit (a barrier with nothing before it)
    gap = 1 if count == 1 else 2  # one chunk: nothing to hide the pull under
    assert all(own_at[c] - peers_at[c] >= gap for c in range(count))
    assert units[-1] == ([], [count - 1])  # the last unit: the last own part, then only the gather is left
    assert len(units) == (2 if count == 1 else count + 2)


def test_copy_engine_chunking_and_arguments():
    """Host-side plan of the copy-engine path: equal row chunks, the measured default count, typed errors."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmAllReduce

    g = GemmAllReduce(None, lambda t: t, world_size=2)
    assert g.copy_engine_chunks(4096) == [(0, 2048), (2048, 2048)]  # default: 2 chunks up to M = 4096
    assert g.copy_engine_chunks(8192) == [(i * 2048, 2048) for i in range(4)]  # 4 above
    assert g.copy_engine_chunks(1) == [(0, 1)]
    g.ce_chunks = 3
    assert g.copy_engine_chunks(10) == [(0, 4), (4, 4), (8, 2)]
    assert not g.copy_engine_fits(64, 64, 2)  # no GEMM workspace, no copy-engine path
    for bad in (0, 64):
        with pytest.raises(InvalidArgumentError, match="ce_chunks"):
            GemmAllReduce(None, lambda t: t, world_size=2, ce_chunks=bad)
    with pytest.raises(InvalidArgumentError, match="num_chunks"):
        GemmAllReduce(None, lambda t: t, world_size=2, num_chunks=0)


def test_gemm_sizes_and_world_size_are_ints_not_truncated():
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmAllReduce, gemm_workspace_bytes

    for bad in (8192.5, -1, "8192"):
        with pytest.raises(InvalidArgumentError, match="max_output_bytes must be"):
            gemm_workspace_bytes(bad)
    for bad in (2.5, 0, "2"):
        with pytest.raises(InvalidArgumentError, match="world_size must be"):
            GemmAllReduce(None, lambda t: t, world_size=bad)
    assert GemmAllReduce(None, lambda t: t, world_size=2).world_size == 2


_GEMM_KNOBS = [
    *(("consumer_programs", bad) for bad in (2.0, "2", True, 0, -1)),
    *(("num_chunks", bad) for bad in (4.0, "4", None, False, 0)),
    *(("reduce_programs", bad) for bad in (2.5, "2", True, 0, -3)),
    *(("ce_chunks", bad) for bad in (2.0, "2", True, 0, 64)),
]


@pytest.mark.parametrize("knob, bad", _GEMM_KNOBS)
def test_gemm_knobs_are_ints_in_range_refused_before_anything_is_made(monkeypatch, knob, bad):
    """The GEMM + all-reduce's program and chunk counts are ints of at least 1 (``ce_chunks``: at most what the
    copy-engine barriers have steps for); anything else is an InvalidArgumentError naming the knob, raised before
    a launcher, a stream or the virtual ranks' GEMM workspaces are made.  A float was used as a grid size or
    range step deep inside a call, ``reduce_programs=0`` meant the default, and a string failed in a comparison."""
    import sagellm_comm.fused.gemm as gemm_module
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmAllReduce, VirtualFused

    def made(*args, **kwargs):
        raise AssertionError("something was made before the knobs were checked")

    monkeypatch.setattr(gemm_module, "_Launcher", made)
    with pytest.raises(InvalidArgumentError, match=f"{knob} must be") as info:
        GemmAllReduce(None, lambda t: t, world_size=2, **{knob: bad})
    assert knob in info.value.details
    if knob in ("consumer_programs", "num_chunks"):  # the virtual ranks' knobs, checked before their workspaces
        group = types.SimpleNamespace(world_size=2, device=torch.device("cuda", 0))  # no workspaces, no CUDA
        with pytest.raises(InvalidArgumentError, match=f"{knob} must be"):
            VirtualFused(group, **{knob: bad})


def test_a_gemms_copy_engine_chunk_count_set_later_is_checked_too():
    """``group_gemm(group).ce_chunks = n`` retunes the copy-engine path for the next calls: the same check."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import GemmAllReduce

    g = GemmAllReduce(None, lambda t: t, world_size=2)
    for bad in (2.0, "2", 0, 64):
        with pytest.raises(InvalidArgumentError, match="ce_chunks must be"):
            g.ce_chunks = bad
    assert g.ce_chunks is None
    g.ce_chunks = 3
    assert g.ce_chunks == 3 and len(g.copy_engine_chunks(10)) == 3


def test_chunk_pipeline_produces_each_chunk_before_reducing_it():
    """The chunked path's schedule (shared by GemmAllReduce and VirtualFused): chunks of ceil(M / num_chunks)
    rows, the last one short; on one stream (no CUDA) each chunk is produced, then reduced, in order."""
    from sagellm_comm.fused import GemmAllReduce

    g = GemmAllReduce(None, lambda t: t, world_size=2, num_chunks=3)
    events: list[tuple[str, int, int, int]] = []
    m = 7
    g.chunk_pipeline(
        m,
        lambda i, rows: events.append(("produce", i, rows.start, min(rows.stop, m))),
        lambda i, rows: events.append(("reduce", i, rows.start, min(rows.stop, m))),
    )
    chunks = [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    assert events == [(what, *c) for c in chunks for what in ("produce", "reduce")]

    # And the chunked path's result over those chunks: every row reduced once (here: doubled once).
    g = GemmAllReduce(None, lambda t: t.mul_(2), world_size=2, num_chunks=3)
    a, b = torch.randn(m, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    out = torch.empty(m, 4, dtype=torch.float64)
    g._chunked(a, b, None, out, m)
    torch.testing.assert_close(out, 2 * (a @ b))


class _ClosingRank:
    """A stand-in rank's workspace or all-reduce: ``close()`` records its rank in ``closed``, then raises
    ``P2PFailedError`` if it is rank ``fail``."""

    def __init__(self, rank: int, closed: list[int], fail: int | None):
        self.rank, self.closed, self.fail = rank, closed, fail

    def close(self, reason=None, timeout=None) -> None:
        from sagellm_comm.errors import P2PFailedError

        self.closed.append(self.rank)
        if self.rank == self.fail:
            raise P2PFailedError(f"rank {self.rank}: unmapping a peer's region failed")


def _closing_ranks(world_size: int, closed: list[int], fail: int | None = None) -> list[_ClosingRank]:
    return [_ClosingRank(rank, closed, fail) for rank in range(world_size)]


def _virtual_owner(owner: str, ranks: list[_ClosingRank]):
    """A ``VirtualFused`` (its GEMM workspaces) or ``VirtualRankGroup`` (its all-reduces) over ``ranks`` on a
    CUDA device, made without its constructor (which needs CUDA)."""
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    if owner == "VirtualFused":
        import types

        virtual = object.__new__(VirtualFused)
        virtual.gemm_workspaces = ranks
        virtual.group = types.SimpleNamespace(ranks=[types.SimpleNamespace(host_timeout_s=60.0)])
    else:
        virtual = object.__new__(VirtualRankGroup)
        virtual.ranks = ranks
    virtual.device = torch.device("cuda", 0)
    return virtual


@pytest.mark.parametrize("close_fails", [False, True])
def test_virtual_fused_closes_its_gemm_workspaces_when_its_gemm_cannot_be_made(monkeypatch, caplog, close_fails):
    """``VirtualFused`` makes the fused GEMM's workspaces, then the GEMM; a GEMM that cannot be made (no memory for
    its side stream, say) leaves no workspace open: every one is closed and the GEMM's error raised, a failing close
    logged beside it.  (It needs CUDA: the group, its device and the parts are stand-ins here.)"""
    import logging
    import types

    from sagellm_comm.fused import virtual as virtual_module

    closed: list[int] = []

    def no_gemm(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (the GEMM's side stream)")

    monkeypatch.setattr(virtual_module, "FusedAllReduceRMSNorm", lambda *args, **kwargs: object())
    fail = 1 if close_fails else None
    monkeypatch.setattr(virtual_module, "local_workspaces", lambda w, *a, **k: _closing_ranks(w, closed, fail))
    monkeypatch.setattr(virtual_module, "GemmAllReduce", no_gemm)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))  # fmt: skip
    group = types.SimpleNamespace(
        world_size=3, device=torch.device("cuda", 0), workspaces=[None], max_programs=8, timeout_s=1.0, config=None,
        ranks=[types.SimpleNamespace(selector=None)] * 3,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="out of memory"):
        virtual_module.VirtualFused(group)
    assert closed == [0, 1, 2]
    assert ("rank 1: unmapping" in caplog.text) == close_fails


@pytest.mark.parametrize("failing", [0, 2])
def test_virtual_rank_group_closes_its_workspaces_when_a_ranks_all_reduce_cannot_be_made(monkeypatch, failing):
    """``VirtualRankGroup`` makes every rank's workspace, then every rank's all-reduce; one that cannot be made
    leaves no workspace open (the workspaces of the ranks before it and after it are closed), its error raised.
    (It needs CUDA: the device check, the workspaces and the all-reduces are stand-ins here.)"""
    from sagellm_comm import virtual as virtual_module

    closed: list[int] = []
    made: list[int] = []

    def all_reduce(ws, **kwargs):
        if ws.rank == failing:
            raise RuntimeError(f"CUDA error: out of memory (rank {ws.rank}'s launch arguments)")
        made.append(ws.rank)
        return object()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def workspaces(world_size, *args, **kwargs):
        stand_ins = _closing_ranks(world_size, closed)
        for ws in stand_ins:
            ws.config = None
        return stand_ins

    monkeypatch.setattr(virtual_module, "local_workspaces", workspaces)
    monkeypatch.setattr(virtual_module, "CustomAllReduce", all_reduce)
    with pytest.raises(RuntimeError, match=f"rank {failing}'s launch arguments"):
        virtual_module.VirtualRankGroup(3, "cuda:0")
    assert made == list(range(failing))
    assert closed == [0, 1, 2]


def _virtual_fused_stand_ins(monkeypatch) -> tuple[types.SimpleNamespace, dict]:
    """The parts VirtualFused makes, stood in for (they need CUDA); returns a group and what the AR + RMSNorm got."""
    from sagellm_comm.fused import virtual as virtual_module

    made: dict = {}

    def rmsnorm(*args, **kwargs):
        made.update(kwargs)
        return object()

    monkeypatch.setattr(virtual_module, "FusedAllReduceRMSNorm", rmsnorm)
    monkeypatch.setattr(virtual_module, "local_workspaces", lambda w, *a, **k: [object() for _ in range(w)])
    monkeypatch.setattr(virtual_module, "GemmAllReduce", lambda *args, **kwargs: object())
    monkeypatch.setattr(virtual_module, "stacked_rows", lambda workspaces: (None, None))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))  # fmt: skip
    from sagellm_comm.selector import AlgoSelector, Rule

    group = types.SimpleNamespace(
        world_size=2, device=torch.device("cuda", 0), workspaces=[None], max_programs=8, timeout_s=1.0, config=None
    )
    # The group's all-reduce policy (VirtualRankGroup(selector=...)): every rank's all-reduce has it.
    selector = AlgoSelector([Rule("all-two-shot", "two_shot")])
    group.ranks = [types.SimpleNamespace(selector=selector) for _ in range(group.world_size)]
    return group, made


def test_virtual_fused_takes_a_fusion_policy_as_the_custom_backend_does(monkeypatch, tmp_path):
    """``fusion_policy=``: a FusionPolicy, a policy file or None (the default rules), as the custom backend's; the
    virtual ranks' AR + RMSNorm runs by it.  Anything else is refused before a workspace is made."""
    import json

    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.fused import FusionPolicy, VirtualFused

    group, made = _virtual_fused_stand_ins(monkeypatch)
    policy = FusionPolicy.from_dict({"rules": [{"id": "off", "path": "unfused"}]}, source="in code")
    VirtualFused(group, fusion_policy=policy)
    assert made["policy"] is policy
    path = tmp_path / "off.json"
    path.write_text(json.dumps({"rules": [{"id": "off", "path": "unfused"}]}))
    VirtualFused(group, fusion_policy=path)
    assert made["policy"].source == str(path) and made["policy"].digest() == policy.digest()
    VirtualFused(group)
    assert made["policy"].source == "default"
    made.clear()
    with pytest.raises(InvalidArgumentError, match="fusion_policy must be a FusionPolicy, a policy file"):
        VirtualFused(group, fusion_policy={"rules": []})
    assert made == {}


def test_virtual_fused_follows_the_groups_all_reduce_policy_as_it_is_at_each_call(monkeypatch):
    """A fusion rule ``all_reduce_policy`` runs the fused form of the kernel the all-reduce's policy picks: on virtual
    ranks, the group's (``VirtualRankGroup(selector=...)``), which its unfused chain and plain all-reduces run by,
    and a selector set later on the ranks' all-reduces (which ``group.select`` reads) from the next call (decisions
    only, on stand-ins: no kernel runs)."""
    from sagellm_comm.config import CommConfig
    from sagellm_comm.fused import FusedAllReduceRMSNorm, VirtualFused
    from sagellm_comm.fused import virtual as virtual_module
    from sagellm_comm.selector import AlgoSelector, Rule

    group, _ = _virtual_fused_stand_ins(monkeypatch)
    monkeypatch.setattr(virtual_module, "FusedAllReduceRMSNorm", FusedAllReduceRMSNorm)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the op over a CPU stand-in of rank 0's workspace
    workspaces = [types.SimpleNamespace(device=torch.device("cpu"), max_programs=8, world_size=2, slot_bytes=1 << 20,
                                        lamport_capacity=1 << 16, config=CommConfig()) for _ in range(2)]  # fmt: skip
    group.workspaces = workspaces
    for car, workspace in zip(group.ranks, workspaces, strict=True):
        car.workspace = workspace
    fused = VirtualFused(group)
    assert fused.rmsnorm.select(2 * 4 * 256, None, 4, 256).rule_id == "all-two-shot"
    for car in group.ranks:
        car.selector = AlgoSelector([Rule("all-one-shot", "one_shot")])
    assert fused.rmsnorm.select(2 * 4 * 256, None, 4, 256).rule_id == "all-one-shot"


@pytest.mark.parametrize("owner", ["VirtualFused", "VirtualRankGroup"])
def test_virtual_ranks_close_during_a_capture_leaves_the_device_alone(monkeypatch, owner):
    """Synchronising the device during a CUDA graph capture invalidates the capture: close() closes the workspaces
    (or all-reduces) at once, each releasing its memory once the capture ends, without synchronising."""
    from sagellm_comm import capture

    closed: list[int] = []

    def synchronize(device=None) -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(capture, "underway", lambda device=None: True)
    _virtual_owner(owner, _closing_ranks(3, closed)).close()
    assert closed == [0, 1, 2]


@pytest.mark.parametrize("owner", ["VirtualFused", "VirtualRankGroup"])
def test_virtual_ranks_close_every_rank_when_a_step_raises(monkeypatch, owner):
    """Closing the virtual ranks' fused workspaces (``VirtualFused``) or all-reduces (``VirtualRankGroup``) runs
    every rank's close even when one rank's close raises; the first error is raised once every step ran.  Each
    close waits, bounded, for its own calls' work: the device is never synchronised as a whole (a wait with no
    deadline, on every stream of every library).  (Both need CUDA: made here without their constructors, ranks and
    device faked.)"""

    closed: list[int] = []

    def synchronize(device=None) -> None:
        raise AssertionError("a device-wide synchronisation: it has no deadline")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    virtual = _virtual_owner(owner, _closing_ranks(3, closed, 0))
    with pytest.raises(RuntimeError, match="rank 0: unmapping"):
        virtual.close()
    assert closed == [0, 1, 2]
