"""Tensor-parallel layers on 2 Gloo ranks against an unsharded ``nn.Linear``; torch.compile of a TP block.

Every check runs inside one pair of spawned ranks (spawning costs seconds on a small CI machine); the
module fixture collects each check's outcome and the tests below assert them one by one.
"""

from __future__ import annotations

import hashlib
import traceback

import pytest
import torch
from torch import nn

from tests.conftest import HAS_CUDA, run_ranks

WORLD_SIZE = 2


def _reference(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, seed: int) -> nn.Linear:
    torch.manual_seed(seed)  # the same full layer on every rank
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    if bias:
        nn.init.uniform_(linear.bias, 0.5, 1.5)  # a bias counted twice would be obvious
    return linear


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


# ---------------------------------------------------------------------------------------------- checks


def check_row_parallel(rank: int, world) -> None:
    from sagellm_comm.layers import RowParallelLinear

    cases = [  # (in, out, bias, input_is_parallel, dtype, input shape without the feature dim)
        (16, 12, True, True, torch.float64, (3, 5)),
        (16, 12, True, False, torch.float64, (7,)),
        (6, 1, False, True, torch.float32, (1,)),
        (64, 33, True, False, torch.float32, (2, 3, 4)),
        (16, 12, True, True, torch.float64, ()),  # a single vector
    ]
    for seed, (fin, fout, bias, parallel, dtype, lead) in enumerate(cases):
        ref = _reference(fin, fout, bias, dtype, seed)
        layer = RowParallelLinear.from_linear(ref, group=world, input_is_parallel=parallel)
        assert layer.weight.shape == (fout, fin // 2) and layer.weight.dtype == dtype
        x = _input((*lead, fin), dtype, 100 + seed)
        given = x.narrow(-1, rank * fin // 2, fin // 2) if parallel else x
        out = layer(given)
        assert isinstance(out, torch.Tensor) and out.shape == (*lead, fout) and out.dtype == dtype
        torch.testing.assert_close(out, ref(x).detach(), **_tol(dtype))


def check_row_bias_once(rank: int, world) -> None:
    from sagellm_comm.layers import RowParallelLinear

    ref = _reference(8, 4, True, torch.float64, 7)
    x = _input((5, 8), torch.float64, 8)
    x_local = x[:, rank * 4 : rank * 4 + 4]
    plain = RowParallelLinear.from_linear(ref, group=world)
    expected = ref(x).detach()
    torch.testing.assert_close(plain(x_local), expected, **_tol(torch.float64))
    torch.testing.assert_close(plain.bias.detach(), ref.bias.detach())  # the full bias on every rank

    skipped = RowParallelLinear.from_linear(ref, group=world, skip_bias_add=True)
    out, bias = skipped(x_local)
    torch.testing.assert_close(out, expected - ref.bias.detach(), **_tol(torch.float64))
    assert bias is skipped.bias
    torch.testing.assert_close(out + bias, expected, **_tol(torch.float64))

    returned = RowParallelLinear.from_linear(ref, group=world, return_bias=True)
    out, bias = returned(x_local)
    assert bias is None
    torch.testing.assert_close(out, expected, **_tol(torch.float64))

    partial = RowParallelLinear.from_linear(ref, group=world, reduce_results=False, skip_bias_add=True)
    out, _ = partial(x_local)  # this rank's partial product only
    torch.testing.assert_close(out, x_local @ ref.weight.detach()[:, rank * 4 : rank * 4 + 4].T, **_tol(torch.float64))


def check_row_bias_under_autocast(rank: int, world) -> None:
    """Under torch.autocast the row-parallel output has nn.Linear's dtype, with a bias as without one (adding the
    parameter's dtype bias to the autocast result would promote it back to the parameters' dtype)."""
    from sagellm_comm.layers import RowParallelLinear

    for bias in (True, False):
        ref = _reference(8, 6, bias, torch.float32, 9)
        layer = RowParallelLinear.from_linear(ref, group=world)
        x = _input((3, 8), torch.float32, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = ref(x).detach()
            out = layer(x[:, rank * 4 : rank * 4 + 4])
        assert expected.dtype == torch.bfloat16
        assert out.dtype == expected.dtype, f"bias={bias}: {out.dtype}"
        torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


def check_column_parallel(rank: int, world) -> None:
    from sagellm_comm.layers import ColumnParallelLinear

    cases = [  # (in, out, bias, gather, dtype, lead)
        (8, 12, True, False, torch.float64, (3, 5)),
        (8, 12, True, True, torch.float64, (3, 5)),
        (5, 2, False, True, torch.float32, (1,)),
        (16, 34, True, True, torch.float32, ()),
        (16, 34, False, False, torch.float32, (9,)),
    ]
    for seed, (fin, fout, bias, gather, dtype, lead) in enumerate(cases):
        ref = _reference(fin, fout, bias, dtype, 20 + seed)
        layer = ColumnParallelLinear.from_linear(ref, group=world, gather_output=gather)
        per_rank = fout // 2
        assert layer.weight.shape == (per_rank, fin)
        x = _input((*lead, fin), dtype, 200 + seed)
        out = layer(x)
        expected = ref(x).detach()
        if gather:
            assert out.shape == (*lead, fout)
            torch.testing.assert_close(out, expected, **_tol(dtype))
        else:
            assert out.shape == (*lead, per_rank)
            torch.testing.assert_close(out, expected[..., rank * per_rank : (rank + 1) * per_rank], **_tol(dtype))

    ref = _reference(8, 6, True, torch.float64, 30)
    skipped = ColumnParallelLinear.from_linear(ref, group=world, skip_bias_add=True)
    x = _input((2, 8), torch.float64, 31)
    out, bias = skipped(x)
    torch.testing.assert_close(bias.detach(), ref.bias.detach()[rank * 3 : rank * 3 + 3])
    torch.testing.assert_close(out + bias, ref(x).detach()[:, rank * 3 : rank * 3 + 3], **_tol(torch.float64))


def check_mlp_block(rank: int, world) -> None:
    """Column (sharded output) -> activation -> row (parallel input) == the unsharded MLP."""
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    up = _reference(16, 32, True, torch.float64, 40)
    down = _reference(32, 16, True, torch.float64, 41)
    col = ColumnParallelLinear.from_linear(up, group=world)
    row = RowParallelLinear.from_linear(down, group=world)
    x = _input((4, 3, 16), torch.float64, 42)
    torch.testing.assert_close(row(torch.relu(col(x))), down(torch.relu(up(x))).detach(), **_tol(torch.float64))


def check_subgroup_by_name(rank: int, world) -> None:
    """A layer on a registered sub-group name; the op reaches that group through the registry."""
    from sagellm_comm import ops
    from sagellm_comm.layers import RowParallelLinear

    tp = world.new_subgroup([0, 1])
    assert ops.register_group(tp, "tp") == "tp" and ops.register_group(tp, "tp") == "tp"
    ref = _reference(8, 4, True, torch.float32, 50)
    layer = RowParallelLinear(8, 4, group="tp", params_dtype=torch.float32)
    layer.load_weight(ref.weight.detach(), ref.bias.detach())
    assert layer.group_name == "tp" and layer.tp_size == 2 and layer.tp_rank == rank
    x = _input((3, 8), torch.float32, 51)
    torch.testing.assert_close(layer(x[:, rank * 4 : rank * 4 + 4]), ref(x).detach(), **_tol(torch.float32))


def check_default_group(rank: int, world) -> None:
    """group=None means the default group of sagellm_comm.init (the ops' name "default")."""
    from sagellm_comm.layers import ColumnParallelLinear

    ref = _reference(4, 6, True, torch.float32, 60)
    layer = ColumnParallelLinear.from_linear(ref, gather_output=True)
    assert layer.group_name == "default"
    x = _input((2, 4), torch.float32, 61)
    torch.testing.assert_close(layer(x), ref(x).detach(), **_tol(torch.float32))


def check_fused_gemm_option(rank: int, world) -> str | None:
    """use_fused_gemm=True: sagellm_comm.fused.gemm_all_reduce (its engine path on Gloo) == nn.Linear."""
    from sagellm_comm.layers import RowParallelLinear

    try:
        import sagellm_comm.fused  # noqa: F401
    except ImportError as exc:
        return f"skip: sagellm_comm.fused is not importable ({exc})"
    ref = _reference(8, 6, True, torch.float32, 70)
    layer = RowParallelLinear.from_linear(ref, group=world, use_fused_gemm=True)
    x = _input((2, 3, 8), torch.float32, 71)
    torch.testing.assert_close(layer(x[..., rank * 4 : rank * 4 + 4]), ref(x).detach(), **_tol(torch.float32))
    return None


def check_fused_gemm_option_takes_inputs_as_the_plain_layer(rank: int, world) -> str | None:
    """use_fused_gemm=True refuses an input of another dtype with the plain layer's error (before any collective),
    and under torch.autocast gives the plain layer's result (autocast casts F.linear's operands)."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.layers import RowParallelLinear

    try:
        import sagellm_comm.fused  # noqa: F401
    except ImportError as exc:
        return f"skip: sagellm_comm.fused is not importable ({exc})"
    ref = _reference(8, 6, True, torch.float32, 72)
    fused = RowParallelLinear.from_linear(ref, group=world, use_fused_gemm=True)
    plain = RowParallelLinear.from_linear(ref, group=world)
    x = _input((3, 4), torch.float32, 73 + rank)
    with pytest.raises(InvalidArgumentError, match=r"RowParallelLinear input is torch.float64"):
        fused(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x.bfloat16())
        got = fused(x.bfloat16())
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return None


def check_bad_input(rank: int, world) -> None:
    from sagellm_comm import ops
    from sagellm_comm.errors import (
        BackendNotSupportedError,
        GroupNotFoundError,
        InvalidArgumentError,
        ShapeMismatchError,
    )
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    def raises(cls, fn, match):
        with pytest.raises(cls, match=match):
            fn()

    raises(InvalidArgumentError, lambda: ColumnParallelLinear(8, 7, group=world), "output_size=7 is not divisible")
    raises(InvalidArgumentError, lambda: RowParallelLinear(7, 8, group=world), "input_size=7 is not divisible")
    raises(InvalidArgumentError, lambda: RowParallelLinear(0, 8, group=world), "input_size must be a positive int")
    raises(GroupNotFoundError, lambda: RowParallelLinear(8, 8, group="no-such-group"), "no group is registered")
    raises(InvalidArgumentError, lambda: RowParallelLinear(8, 8, reduce_results=False, group=world), "skip_bias_add")
    row = RowParallelLinear(8, 4, group=world)
    raises(ShapeMismatchError, lambda: row(torch.zeros(3, 8)), r"expects input \[..., 4\]")
    raises(InvalidArgumentError, lambda: row([1.0] * 4), "must be a torch.Tensor")
    raises(InvalidArgumentError, lambda: row(torch.zeros(3, 4, dtype=torch.float64)), "input is torch.float64")
    raises(InvalidArgumentError, lambda: row(torch.zeros(3, 4, dtype=torch.int64)), "input is torch.int64")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the matmul's operands itself
        assert row(torch.zeros(3, 4, dtype=torch.bfloat16)).shape == (3, 4)
    raises(ShapeMismatchError, lambda: row.weight_loader(row.weight, torch.tensor(1.0)), "at least one dimension")
    raises(InvalidArgumentError, lambda: row.load_weight([[0.0] * 8] * 4), "must be a torch.Tensor, got list")
    raises(ShapeMismatchError, lambda: row.load_weight(torch.zeros(4, 6)), r"full weight must be \[4, 8\]")
    col = ColumnParallelLinear(8, 4, bias=False, group=world)
    raises(ShapeMismatchError, lambda: col.load_weight(torch.zeros(4, 9)), r"full weight must be \[4, 8\]")
    raises(InvalidArgumentError, lambda: col.load_weight(torch.zeros(4, 8), torch.zeros(4)), "bias=False")
    raises(InvalidArgumentError, lambda: col(torch.zeros(2, 8, dtype=torch.float64)), "input is torch.float64")
    raises(ShapeMismatchError, lambda: col.weight_loader(col.weight, torch.tensor(1.0)), "at least one dimension")
    raises(InvalidArgumentError, lambda: col.weight_loader(col.weight, 1.0), "must be a torch.Tensor, got float")
    linear = torch.nn.Linear(8, 4)
    raises(InvalidArgumentError, lambda: ColumnParallelLinear.from_linear(linear, group=world, bias=False), "come from")
    raises(InvalidArgumentError, lambda: RowParallelLinear.from_linear(torch.zeros(4, 8), group=world), "nn.Linear")
    # another layer's parameter of the same shape is refused, not overwritten with this layer's shard
    twin = ColumnParallelLinear(8, 4, bias=False, group=world)
    kept = twin.weight.detach().clone()
    raises(InvalidArgumentError, lambda: col.weight_loader(twin.weight, torch.ones(4, 8)), "not a parameter of")
    raises(InvalidArgumentError, lambda: row.weight_loader(twin.weight, torch.ones(4, 8)), "not a parameter of")
    assert torch.equal(twin.weight, kept)
    raises(InvalidArgumentError, lambda: ops.register_group(world, "default"), "reserved")
    name = ops.register_group(world, "w")
    other = world.new_subgroup([0, 1])
    raises(InvalidArgumentError, lambda: ops.register_group(other, "w"), "already bound")
    ops.unregister_group(name)
    raises(GroupNotFoundError, lambda: ops.unregister_group(name), "no group is registered")
    raises(GroupNotFoundError, lambda: ops.all_reduce(torch.ones(2), "w"), "no group is registered as 'w'")
    raises(ShapeMismatchError, lambda: ops.all_gather(torch.ones(2), world, world_size=3), "traced for world_size=3")
    try:
        import sagellm_comm.fused  # noqa: F401
    except ImportError:
        raises(BackendNotSupportedError, lambda: RowParallelLinear(8, 4, group=world, use_fused_gemm=True), "fused")


def check_a_refused_load_leaves_the_parameters_as_they_were(rank: int, world) -> None:
    """A loaded tensor torch cannot copy from (meta, sparse, quantized) is an InvalidArgumentError raised before any
    parameter is written: a bias that failed while being copied left the weight already overwritten."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    for cls in (RowParallelLinear, ColumnParallelLinear):
        layer = cls.from_linear(_reference(8, 4, True, torch.float32, 95), group=world)
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        bad_biases = {
            "meta device": torch.zeros(4, device="meta"),
            "dense tensor": torch.ones(4).to_sparse(),
            "cannot be converted": torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.quint8),
        }
        for match, bad in bad_biases.items():
            with pytest.raises(InvalidArgumentError, match=match):
                layer.load_weight(torch.full((4, 8), 7.0), bad)
            with pytest.raises(InvalidArgumentError, match=match):
                layer.weight_loader(layer.bias, bad)
            assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias), (cls.__name__, match)
        with pytest.raises(InvalidArgumentError, match="meta device"):
            layer.weight_loader(layer.weight, torch.zeros(4, 8, device="meta"))
        layer.load_weight(torch.full((4, 8), 7.0), torch.full((4,), 2.0))  # a valid load after the refused ones
        assert bool((layer.weight == 7.0).all()) and bool((layer.bias == 2.0).all())


def check_failed_construction_registers_nothing(rank: int, world) -> None:
    """A constructor that raises leaves no generated group name behind (a non-member, a size the group does not
    divide, a bad argument); one that succeeds registers its group once."""
    from sagellm_comm import ops
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    only_rank0 = world.new_subgroup([0])  # collective: every rank makes it
    pair = world.new_subgroup([0, 1])
    before = ops.list_groups()
    if rank == 1:
        with pytest.raises(InvalidArgumentError, match="not a member"):
            ColumnParallelLinear(8, 4, group=only_rank0)
    with pytest.raises(InvalidArgumentError, match="output_size=7 is not divisible"):
        ColumnParallelLinear(8, 7, group=pair)
    with pytest.raises(InvalidArgumentError, match="input_size=7 is not divisible"):
        RowParallelLinear(7, 8, group=pair)
    with pytest.raises(InvalidArgumentError, match="skip_bias_add"):
        RowParallelLinear(8, 8, reduce_results=False, group=pair)
    with pytest.raises(InvalidArgumentError, match="params_dtype"):
        ColumnParallelLinear(8, 4, params_dtype=torch.int32, group=pair)
    # a device torch reads but this process cannot use: typed, not torch's AssertionError / NotImplementedError
    for device in ["cuda:99", "hpu"] + ([] if torch.backends.mps.is_available() else ["mps"]):
        with pytest.raises(InvalidArgumentError, match=f"device '{device}' cannot hold"):
            RowParallelLinear(8, 4, group=pair, device=device)
    assert ops.list_groups() == before
    layer = ColumnParallelLinear(8, 4, group=pair)
    assert ops.list_groups() == {**before, layer.group_name: pair}
    ops.unregister_group(layer.group_name)


def check_functional_ops(rank: int, world) -> None:
    from sagellm_comm import ops

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    before = x.clone()
    y = ops.all_reduce(x, world)
    assert y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(x, before)  # functional: the input is untouched
    torch.testing.assert_close(y, 2 * torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10)
    torch.testing.assert_close(ops.all_reduce(x, world, op="max"), before - 10 * rank + 10)
    transposed = before.t()  # a non-contiguous input gives a contiguous result
    assert ops.all_reduce(transposed, world).is_contiguous()
    g = ops.all_gather(torch.full((2, 3), float(rank)), world)
    torch.testing.assert_close(g, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
    torch.library.opcheck(
        torch.ops.sagellm_comm.all_reduce.default,
        (x, ops.group_name(world), "sum"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.sagellm_comm.all_gather.default,
        (x, ops.group_name(world), 2),
        test_utils=("test_schema", "test_faketensor"),
    )


CHECKS = {
    name: fn
    for name, fn in globals().items()
    if name.startswith("check_") and callable(fn)  # every check_* above, run in this order
}


def _layers_worker(rank: int, world_size: int, port: int) -> dict[str, str | None]:
    import sagellm_comm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    outcomes: dict[str, str | None] = {}
    try:
        for name, check in CHECKS.items():
            try:
                outcomes[name] = check(rank, world)  # None: passed; "skip: why": not applicable here
            except Exception:  # recorded per check; a failing check must not hide the others
                outcomes[name] = traceback.format_exc()
                break  # the ranks may now disagree on the next collective: stop here
    finally:
        sagellm_comm.destroy()
    return outcomes


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, str | None]]:
    return run_ranks(_layers_worker, WORLD_SIZE, timeout=120.0)


@pytest.mark.parametrize("check", list(CHECKS))
def test_layers_on_two_gloo_ranks(outcomes, check: str) -> None:
    for rank, result in enumerate(outcomes):
        assert check in result, f"rank {rank} did not reach {check} (an earlier check failed)"
        if isinstance(result[check], str) and result[check].startswith("skip: "):
            pytest.skip(result[check][len("skip: ") :])
        assert result[check] is None, f"rank {rank}:\n{result[check]}"


# ---------------------------------------------------------------------------------------------- compile


class _Block(nn.Module):
    """One TP MLP block: column (sharded) -> GELU -> row (all-reduce) -> residual."""

    def __init__(self, hidden: int, ffn: int, group) -> None:
        super().__init__()
        from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

        self.up = ColumnParallelLinear(hidden, ffn, group=group)
        self.down = RowParallelLinear(ffn, hidden, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _compile_worker(rank: int, world_size: int, port: int) -> tuple[int, int]:
    import torch._dynamo

    import sagellm_comm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=60)
    try:
        torch.manual_seed(0)
        block = _Block(16, 32, world)
        x = torch.randn(4, 16)
        eager = block(x)
        explained = torch._dynamo.explain(block)(x)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager)
        torch.testing.assert_close(compiled(x + 1), block(x + 1))
        # the collective is in the graph as our op (not a break, not inlined Python)
        targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
        ops_in_graph = sum("sagellm_comm.all_reduce" in t for t in targets)
        return explained.graph_break_count, ops_in_graph
    finally:
        sagellm_comm.destroy()


def test_compile_tp_block_fullgraph_on_cpu() -> None:
    for breaks, ops_in_graph in run_ranks(_compile_worker, WORLD_SIZE, timeout=150.0):
        assert breaks == 0
        assert ops_in_graph == 1


def _reinit_worker(rank: int, world_size: int, port: int) -> list[str]:
    import sagellm_comm
    from sagellm_comm.errors import GroupInvalidError
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    ref = _reference(8, 4, True, torch.float32, 90)
    row = RowParallelLinear.from_linear(ref)  # on the default group, by its name "default"
    col = ColumnParallelLinear.from_linear(ref, gather_output=True)
    local = RowParallelLinear.from_linear(ref, reduce_results=False, skip_bias_add=True)
    x = _input((3, 8), torch.float32, 91)
    torch.testing.assert_close(row(x[:, rank * 4 : rank * 4 + 4]), ref(x).detach(), **_tol(torch.float32))
    sagellm_comm.destroy()
    seen = []
    if rank == 0:  # a world of one now: "default" names another group than the one the shards were cut for
        sagellm_comm.init(backend="gloo", rank=0, world_size=1)
        try:
            for layer, given in ((row, x[:, :4]), (col, x)):
                with pytest.raises(GroupInvalidError, match="built for rank 0 of 2 in group 'default'"):
                    layer(given)
                seen.append(type(layer).__name__)
            out, _ = local(x[:, :4])  # no collective: this rank's partial product, as before
            torch.testing.assert_close(out, x[:, :4] @ ref.weight.detach()[:, :4].T, **_tol(torch.float32))
        finally:
            sagellm_comm.destroy()
    return seen


def test_layer_refuses_a_default_group_of_another_size_after_reinit() -> None:
    """destroy() then init() of another world size: a layer built on the default group raises instead of summing
    its shard over the new group (the row-parallel layer returned this rank's partial product as the result)."""
    seen = run_ranks(_reinit_worker, WORLD_SIZE, timeout=90.0)
    assert seen == [["RowParallelLinear", "ColumnParallelLinear"], []]


def _fused_gemm_custom_worker(rank: int, world_size: int, port: int) -> str:
    import sagellm_comm
    from sagellm_comm.fused import last_selection
    from sagellm_comm.layers import RowParallelLinear

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=60)
    try:
        assert world.backend.custom is not None, world.backend.custom_reason  # the fused GEMM's kernel path
        ref = _reference(16, 8, True, torch.bfloat16, 80)
        layer = RowParallelLinear.from_linear(ref, group=world, use_fused_gemm=True)
        x = _input((3, 16), torch.bfloat16, 81)
        out = layer(x[:, rank * 8 : rank * 8 + 8])
        assert last_selection(world) is not None and last_selection(world).rule_id != "custom-unavailable"
        torch.testing.assert_close(out.float(), ref(x).detach().float(), atol=3e-2, rtol=3e-2)
        # zero tokens: an empty result, as without use_fused_gemm (the fused GEMM itself refuses M = 0)
        empty = layer(torch.zeros(0, 8, dtype=torch.bfloat16))
        assert empty.shape == (0, 8) and empty.dtype == torch.bfloat16
        empty = layer(torch.zeros(2, 0, 8, dtype=torch.bfloat16))
        assert empty.shape == (2, 0, 8)
        again = layer(x[:, rank * 8 : rank * 8 + 8])  # the ranks are still in step
        assert torch.equal(again, out)
        return hashlib.sha256(out.view(torch.uint8).numpy().tobytes()).hexdigest()
    finally:
        sagellm_comm.destroy()


def test_fused_gemm_layer_on_the_custom_backend_takes_zero_tokens() -> None:
    """use_fused_gemm=True where the kernels run (interpreter ranks): the result of nn.Linear, the same bits on
    every rank, and a zero-token input gives an empty output like the layer without the option."""
    # two programs a launch (the CPU default is 32, interpreted one after another)
    env = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_MAX_PROGRAMS": "2"}
    digests = run_ranks(_fused_gemm_custom_worker, WORLD_SIZE, env=env, timeout=150.0)
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def nccl_world_of_one():
    import sagellm_comm

    world = sagellm_comm.CommGroup.create(world_size=1, rank=0, backend="nccl")
    yield world
    world.destroy()


def _unsharded_reference(block: _Block, x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """The block's output computed without communication, in fp32.  Every rank seeds alike, so every rank holds
    the same shards: the all-reduce of the row-parallel layer sums ``tp_size`` equal partials."""
    up, down = block.up, block.down
    hidden = torch.nn.functional.gelu(x.float() @ up.weight.float().t() + up.bias.float())
    return x.float() + tp_size * (hidden @ down.weight.float().t()) + down.bias.float()


def _cuda_graph_block(world) -> tuple[float, float, float]:
    """Capture a TP block (with the custom op) in a CUDA graph; replay on new input; compare to eager, and eager
    to a reference without communication (a wrong all-reduce gives the same wrong result eager and replayed).

    Returns (replay vs eager, largest |eager|, eager vs the reference)."""
    torch.manual_seed(0)
    block = _Block(256, 512, world).to(torch.bfloat16)
    static_x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            block(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = block(static_x)
    new_x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    expected = block(new_x)
    reference = _unsharded_reference(block, new_x, world.world_size)
    return (
        float((static_out.float() - expected.float()).abs().max()),
        float(expected.float().abs().max()),
        float((expected.float() - reference).abs().max()),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_tp_block_nccl_world_of_one(nccl_world_of_one) -> None:
    """NCCL world of one: the op path (clone + engine all-reduce) captured and replayed."""
    from sagellm_comm import ops

    world = nccl_world_of_one
    name = ops.register_group(world, "gpu-world-of-one")
    # a group of one skips communication in the layers; call the op directly inside the capture too
    x = torch.randn(64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.sagellm_comm.all_reduce(x, name, "sum")
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        y = torch.ops.sagellm_comm.all_reduce(x, name, "sum")
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, x)
    diff, scale, off = _cuda_graph_block(world)
    assert diff <= 1e-2 * max(scale, 1.0)
    assert off <= 2e-2 * max(scale, 1.0), off  # bf16 layers against the fp32 reference
    ops.unregister_group(name)


def _custom_graph_worker(rank: int, world_size: int, port: int) -> tuple[str, float, float, float]:
    import sagellm_comm

    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=60)
    try:
        assert world.backend.custom is not None, world.backend.custom_reason  # the kernels, not NCCL
        return (world.backend.custom_reason, *_cuda_graph_block(world))
    finally:
        sagellm_comm.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_an_input_on_another_device_is_a_typed_error(nccl_world_of_one) -> None:
    """A CPU input to a layer whose parameters are on the GPU: InvalidArgumentError naming both devices."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    for layer in (RowParallelLinear(8, 4, group=nccl_world_of_one, device="cuda"),
                  ColumnParallelLinear(8, 4, group=nccl_world_of_one, device="cuda")):  # fmt: skip
        with pytest.raises(InvalidArgumentError, match="input is on cpu, its parameters on cuda:0"):
            layer(torch.zeros(3, 8))
        assert layer(torch.zeros(3, 8, device="cuda")).shape == (3, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_compiled_op_under_inductor_and_cuda_graphs(nccl_world_of_one) -> None:
    """torch.compile (inductor, fullgraph, mode="reduce-overhead": CUDA graphs) of a function with the op."""
    from sagellm_comm import ops

    name = ops.register_group(nccl_world_of_one, "compiled-world-of-one")
    try:
        fn = torch.compile(
            lambda x: torch.ops.sagellm_comm.all_reduce(x * 2, name, "sum") + 1, fullgraph=True, mode="reduce-overhead"
        )
        for value in (1.0, 3.0, 5.0):  # replays of the recorded graph see new inputs
            x = torch.full((2048,), value, device="cuda")
            torch.testing.assert_close(fn(x), x * 2 + 1)
    finally:
        ops.unregister_group(name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (two processes spinning on one GPU time-slice)")
def test_cuda_graph_capture_of_tp_block_custom_backend() -> None:
    """Two ranks of the custom backend, one GPU each: capture the TP block, replay, compare with eager."""
    results = run_ranks(_custom_graph_worker, 2, timeout=240.0)
    for reason, diff, scale, off in results:
        assert diff <= 1e-2 * max(scale, 1.0), reason
        assert off <= 2e-2 * max(scale, 1.0), (off, reason)  # a missing partial would be off by the MLP's output


def _compiled_reinit_worker(rank: int, world_size: int, port: int) -> list[str]:
    """As :func:`_reinit_worker`, with the layers compiled before ``destroy()``: the graph holds the name "default",
    and its cached code ran the all-reduce of whatever group that named then (rank 0 returned its partial product).
    Now the group's identity is guarded: the call traces again and is refused, with the typed error where the frame
    may run eagerly, with Dynamo's (an exception it cannot trace) under ``fullgraph=True``."""
    import torch._dynamo.exc

    import sagellm_comm
    from sagellm_comm.errors import GroupInvalidError
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    ref = _reference(8, 4, True, torch.float32, 92)
    row = RowParallelLinear.from_linear(ref)
    col = ColumnParallelLinear.from_linear(ref, gather_output=True)
    x = _input((3, 8), torch.float32, 93)
    shard = x[:, rank * 4 : rank * 4 + 4]
    compiled = {  # fullgraph first: a frame that raised may run eagerly from then on, for either wrapper
        "row fullgraph": (torch.compile(row, backend="aot_eager", fullgraph=True), shard, x[:, :4]),
        "row": (torch.compile(row, backend="aot_eager"), shard, x[:, :4]),
        "col": (torch.compile(col, backend="aot_eager"), x, x),
    }
    for layer, given, _ in compiled.values():
        torch.testing.assert_close(layer(given), ref(x).detach(), **_tol(torch.float32))
    sagellm_comm.destroy()
    seen = []
    if rank == 0:
        sagellm_comm.init(backend="gloo", rank=0, world_size=1)
        try:
            for name, (layer, _, given) in compiled.items():
                if name.endswith("fullgraph"):
                    with pytest.raises((torch._dynamo.exc.Unsupported, GroupInvalidError)):
                        layer(given)
                else:
                    with pytest.raises(GroupInvalidError, match="built for rank 0 of 2 in group 'default'"):
                        layer(given)
                seen.append(name)
        finally:
            sagellm_comm.destroy()
    return seen


def test_compiled_layer_refuses_a_default_group_of_another_size_after_reinit() -> None:
    seen = run_ranks(_compiled_reinit_worker, WORLD_SIZE, timeout=120.0)
    assert seen == [["row fullgraph", "row", "col"], []]
