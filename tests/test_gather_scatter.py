"""Custom all-gather and reduce-scatter on the CPU: the Triton kernels under the interpreter, ranks as processes.

They run on the all-reduce's workspace (shared files mapped by every rank stand in for CUDA IPC) and share
its epoch, so every worker mixes them with all-reduce calls.  References are torch ops: ``torch.cat`` for
the gather, the rank-order fp32 sum (``rank_order_sum``) for the reduction.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from tests.conftest import exchange_objects, join_gloo, rank_order_sum, run_ranks

INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_INITIAL_EPOCH": None, "SAGELLM_COMM_CHECK": None}
SLOT_BYTES = 16384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AR_ALGOS = ("one_shot", "two_shot", "lamport")


def _setup(rank, world_size, port, timeout_s=60.0, check=None):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(
        rank, world_size, SLOT_BYTES, "cpu", exchange_objects, max_programs=2, check=check
    )
    return CustomAllReduce(ws, timeout_s=timeout_s)


def _inputs(seed: int, world_size: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's input (each rank makes all of them, from the same seed)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(numel, generator=g) * 4).to(dtype) for _ in range(world_size)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Exact, except bf16 within one unit in the last place: the interpreter truncates fp32 -> bf16 where
    torch rounds to nearest (fp16 and fp32 conversions agree exactly)."""
    if got.dtype == torch.bfloat16:
        return torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    return torch.equal(got, want)


def _max(op: str, world_size: int, dtype: torch.dtype) -> int:
    from sagellm_comm.gather_scatter import max_numel

    return max_numel(op, world_size, SLOT_BYTES, dtype.itemsize)


def _cases(world_size: int, sizes: tuple, dtypes: tuple) -> list[tuple[str, int | str, str]]:
    """``(op, numel, dtype)``: every size with the dtypes in turn, both ops; ``"max"`` is the most that fits."""
    cases = []
    for i, numel in enumerate(sizes):
        for j, op in enumerate(("all_gather", "reduce_scatter")):
            cases.append((op, numel, dtypes[(i + j) % len(dtypes)]))
    return cases


# ------------------------------------------------------------------------------------- reference matrix
def _matrix_worker(rank, world_size, port, cases, start):
    from sagellm_comm import gather_scatter as gs

    car = _setup(rank, world_size, port)
    assert car.epoch == start, (car.epoch, start)
    calls = 0
    report = []
    for i, (op, numel, dtype_name) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        numel = _max(op, world_size, dtype) if numel == "max" else numel
        ins = _inputs(i, world_size, numel * (world_size if op == "reduce_scatter" else 1), dtype)
        if op == "all_gather":
            out = torch.full((world_size * numel,), float("nan"), dtype=dtype)
            gs.all_gather(car, ins[rank], out)
            want = torch.cat(ins)
        else:
            out = torch.full((numel,), float("nan"), dtype=dtype)
            gs.reduce_scatter(car, ins[rank], out)
            want = rank_order_sum([x[rank * numel : (rank + 1) * numel] for x in ins])
        # An all-reduce on the same workspace between any two calls, its algorithm in turn.
        algo = AR_ALGOS[i % len(AR_ALGOS)]
        y = _inputs(100 + i, world_size, 29, dtype)
        reduced = car.all_reduce(y[rank].clone(), algo=algo)
        calls += 1 + (algo != "lamport")
        exact = torch.equal(out, want) if op == "all_gather" else _same(out, want)
        report.append((op, numel, dtype_name, exact, _digest(out), _same(reduced, rank_order_sum(y)), car.epoch))
    car.check_errors()
    return report, calls, car.epoch - start


def _check_matrix(per_rank, world_size):
    reports = [report for report, _, _ in per_rank]
    for report, calls, advanced in per_rank:
        assert advanced == calls, f"the epoch advanced {advanced} times over {calls} barrier calls"
        for op, numel, dtype, exact, _, ar_exact, _ in report:
            assert exact, f"{op} of {numel} x {dtype} on {world_size} ranks differs from the torch reference"
            assert ar_exact, f"the all-reduce after {op} of {numel} x {dtype} is wrong"
    for case in zip(*reports, strict=True):
        assert len({epoch for *_, epoch in case}) == 1, f"ranks disagree on the epoch: {case}"
        if case[0][0] == "all_gather":
            assert len({digest for _, _, _, _, digest, _, _ in case}) == 1, f"ranks' all-gathers differ: {case}"


@pytest.mark.parametrize(
    "world_size, sizes, start",
    [
        # Two ranks start below 2^31 and cross it: counters are 64-bit, slot parity stays right.
        (2, (1, 37, 1024, "max"), 2**31 - 3),
        (3, (1, 1001, "max"), 0),
        (4, (7, 256, "max"), 0),
    ],
    ids=["w2-from-2^31-3", "w3", "w4"],
)
def test_matches_torch_reference_mixed_with_all_reduce(world_size, sizes, start):
    cases = _cases(world_size, sizes, tuple(DTYPES))
    env = {**INTERP, "SAGELLM_COMM_INITIAL_EPOCH": str(start)}
    _check_matrix(run_ranks(_matrix_worker, world_size, cases, start, env=env, timeout=540), world_size)


@pytest.mark.slow
def test_eight_ranks():
    cases = [("all_gather", 5, "bfloat16"), ("reduce_scatter", 3, "float32")]
    _check_matrix(run_ranks(_matrix_worker, 8, cases, 0, env=INTERP, timeout=540), 8)


# ------------------------------------------------------------------- composition: the hierarchical path
def _compose_worker(rank, world_size, port):
    from sagellm_comm import gather_scatter as gs

    car = _setup(rank, world_size, port)
    n = 203  # a chunk that is not a multiple of 8: the staged chunks' stride is padded
    x = _inputs(7, world_size, world_size * n, torch.bfloat16)[rank]
    chunk = torch.empty(n, dtype=torch.bfloat16)
    gathered = torch.empty(world_size * n, dtype=torch.bfloat16)
    gs.all_gather(car, gs.reduce_scatter(car, x, chunk), gathered)
    in_place = x.clone()  # reduce-scatter into this rank's own chunk, all-gather from it: both in place
    own = in_place[rank * n : (rank + 1) * n]
    gs.all_gather(car, gs.reduce_scatter(car, in_place, own), in_place)
    reduced = x.clone()
    car.all_reduce(reduced, algo="two_shot")
    car.check_errors()
    return torch.equal(gathered, reduced), torch.equal(in_place, reduced)


def test_reduce_scatter_then_all_gather_is_the_all_reduce_bit_for_bit():
    for out_of_place, in_place in run_ranks(_compose_worker, 3, env=INTERP, timeout=540):
        assert out_of_place and in_place


# ------------------------------------------------------------------------------------- failures
def _faults_worker(rank, world_size, port, op, marker):
    """A missing rank (named, NaN, later calls refuse), then a check-mode size mismatch on a new workspace."""
    import os

    from sagellm_comm import gather_scatter as gs
    from sagellm_comm.errors import CollectiveMismatchError, CommTimeoutError

    run = gs.all_gather if op == "all_gather" else gs.reduce_scatter
    numel = 40
    car = _setup(rank, world_size, port, timeout_s=1.0)
    result = {}
    if rank == 0:  # rank 1 never makes this call
        x = torch.ones(numel)
        out = torch.zeros(numel * world_size if op == "all_gather" else numel // world_size)
        t0 = time.monotonic()
        run(car, x, out)
        with pytest.raises(CommTimeoutError) as info:
            car.check_errors()
        result["timeout"] = (info.value.details["peer"], info.value.details["phase"], time.monotonic() - t0)
        result["nan"] = bool(torch.all(torch.isnan(out)))
        with pytest.raises(CommTimeoutError):
            run(car, x, out)
        open(marker, "w").close()
    else:
        deadline = time.monotonic() + 240  # stay away until rank 0 has timed out (bounded: the test fails then)
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)

    # Check mode: rank 1 passes another size; both ranks name each other and write NaN.
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    ws = SymmetricWorkspace.rendezvous(
        rank, world_size, SLOT_BYTES, "cpu", exchange_objects, max_programs=2, check=True
    )
    car = CustomAllReduce(ws, timeout_s=30.0)
    numel = 32 + 8 * rank
    x = torch.ones(numel)
    out = torch.zeros(numel * world_size if op == "all_gather" else numel // world_size)
    run(car, x, out)
    with pytest.raises(CollectiveMismatchError) as info:
        car.check_errors()
    result["mismatch"] = (info.value.details["peer"], info.value.details["mine"], info.value.details["theirs"])
    result["mismatch_nan"] = bool(torch.all(torch.isnan(out)))
    return result


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_missing_rank_and_check_mode_mismatch(tmp_path, op):
    marker = str(tmp_path / "rank0-timed-out")
    per_rank = run_ranks(_faults_worker, 2, op, marker, env=INTERP, timeout=300)
    peer, phase, elapsed = per_rank[0]["timeout"]
    assert (peer, phase) == (1, "start") and elapsed < 30, per_rank[0]
    assert per_rank[0]["nan"], "a timed-out call's output passed for a result"
    for rank, result in enumerate(per_rank):
        peer, mine, theirs = result["mismatch"]
        assert peer == 1 - rank and mine["algo"] == theirs["algo"] == op, result
        assert (mine["numel"], theirs["numel"]) == ((32, 40) if rank == 0 else (40, 32)), result
        assert result["mismatch_nan"], "a mismatched call's output passed for a result"


def _empty_call_worker(rank, world_size, port, op):
    from sagellm_comm import gather_scatter as gs
    from sagellm_comm.errors import CollectiveMismatchError

    car = _setup(rank, world_size, port, timeout_s=30.0, check=True)
    run = gs.all_gather if op == "all_gather" else gs.reduce_scatter

    def call(numel):  # numel: this rank's input
        out = torch.zeros(numel * world_size if op == "all_gather" else numel // world_size)
        return run(car, torch.ones(numel), out)

    call(0)  # every rank empty: nothing to compare against, and the ranks stay in step
    out = call(16)
    car.synchronize()
    exact = bool(torch.all(out == (1 if op == "all_gather" else world_size)))
    out = call(0 if rank == 1 else 16)  # rank 1 passes nothing
    with pytest.raises(CollectiveMismatchError) as info:
        car.synchronize()
    return exact, info.value.details["mine"]["numel"], info.value.details["theirs"]["numel"]


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_check_mode_compares_an_empty_call_with_its_peers(op):
    """A rank passing no element while its peer passes some is a mismatch on both ranks (the empty call returned
    without its check, and the peer waited for it until the timeout)."""
    assert run_ranks(_empty_call_worker, 2, op, env=INTERP, timeout=300) == [(True, 16, 0), (True, 0, 16)]


# ------------------------------------------------------------------------------------- bad arguments
@pytest.fixture
def car(monkeypatch):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the constructor's check; nothing here launches a kernel
    workspaces = local_workspaces(4, SLOT_BYTES, "cpu", max_programs=2)
    yield CustomAllReduce(workspaces[1])
    for ws in workspaces:
        ws.close()


def test_bad_arguments_are_typed_errors_raised_before_any_launch(car):
    from sagellm_comm import gather_scatter as gs
    from sagellm_comm.errors import InvalidArgumentError, NotInitializedError, WorkspaceExhaustedError

    x = torch.ones(16)
    cases = [
        (gs.all_gather, x.to(torch.int32), torch.zeros(64, dtype=torch.int32), InvalidArgumentError, "supports"),
        (gs.all_gather, x, torch.zeros(64, dtype=torch.float16), InvalidArgumentError, "dtype"),
        (gs.all_gather, torch.ones(16, 2)[:, 0], torch.zeros(64), InvalidArgumentError, "contiguous"),
        (gs.all_gather, x, torch.zeros(63), InvalidArgumentError, "out must hold world_size \\* tensor.numel"),
        (gs.all_gather, x, torch.zeros(64, device="meta"), InvalidArgumentError, "meta"),
        (gs.reduce_scatter, x, torch.zeros(5), InvalidArgumentError, "world_size \\* out.numel"),
        (gs.reduce_scatter, torch.ones(66), torch.zeros(16), InvalidArgumentError, "world_size"),
        (gs.all_gather, torch.ones(4097), torch.zeros(4 * 4097), WorkspaceExhaustedError, "at most 4096"),
        (gs.reduce_scatter, torch.ones(4 * 1368), torch.zeros(1368), WorkspaceExhaustedError, "at most 1360"),
    ]
    out = torch.zeros(64)
    cases += [
        (gs.all_gather, out[:16], out, InvalidArgumentError, "overlap"),  # rank 1's block is out[16:32]
        (gs.reduce_scatter, out, out[:16], InvalidArgumentError, "overlap"),
    ]
    for fn, tensor, target, error, match in cases:
        with pytest.raises(error, match=match):
            fn(car, tensor, target)
    assert car.workspace.counter(0) == 0, "a refused call advanced the epoch"
    car.workspace.close()
    with pytest.raises(NotInitializedError):
        gs.all_gather(car, x, torch.zeros(64))


def test_capacity_helpers_agree_with_the_staged_bytes():
    from sagellm_comm.gather_scatter import max_numel, staged_bytes

    for op in ("all_gather", "reduce_scatter"):
        for world_size in (2, 3, 8):
            for itemsize in (2, 4):
                most = max_numel(op, world_size, SLOT_BYTES, itemsize)
                assert staged_bytes(op, most, world_size, itemsize) <= SLOT_BYTES
                assert staged_bytes(op, most + 1, world_size, itemsize) > SLOT_BYTES


def test_capacity_of_a_reduce_scatter_of_one_rank_is_a_typed_error():
    """One rank stages nothing for a reduce-scatter (every size fits): no largest size, a typed error saying so,
    not a division by zero; arguments below their minimum are refused by name."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.gather_scatter import max_numel, staged_bytes

    assert staged_bytes("reduce_scatter", 1 << 30, 1, 4) == 0
    with pytest.raises(InvalidArgumentError, match="world_size=1 stages nothing"):
        max_numel("reduce_scatter", 1, SLOT_BYTES, 4)
    assert max_numel("all_gather", 1, SLOT_BYTES, 4) == SLOT_BYTES // 4
    for op in ("all_gather", "reduce_scatter"):
        with pytest.raises(InvalidArgumentError, match="itemsize must be >= 1, got 0"):
            max_numel(op, 2, SLOT_BYTES, 0)
        with pytest.raises(InvalidArgumentError, match="world_size must be >= 1, got 0"):
            max_numel(op, 0, SLOT_BYTES, 4)
        # staged_bytes took anything: a negative count or a world of 0 gave negative bytes, True counted as 1
        for args, match in [
            ((-3, 2, 4), "numel must be >= 0, got -3"),
            ((True, 2, 4), "numel must be an int, got True"),
            ((8.5, 2, 4), "numel must be an int, got 8.5"),
            ((8, 0, 4), "world_size must be >= 1, got 0"),
            ((8, 2, 0), "itemsize must be >= 1, got 0"),
        ]:
            with pytest.raises(InvalidArgumentError, match=match):
                staged_bytes(op, *args)
