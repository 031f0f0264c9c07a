"""The collective custom ops: fake implementations, the group registry, dispatch to the custom kernels."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sagellm_comm import ops
from sagellm_comm.errors import GroupNotFoundError, InvalidArgumentError, NotInitializedError
from tests.conftest import process_resources, resources_back_to, run_ranks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 4, 8)])
def test_all_reduce_fake_keeps_shape_and_dtype(shape, dtype) -> None:
    with FakeTensorMode():
        x = torch.empty(shape, dtype=dtype)
        y = torch.ops.sagellm_comm.all_reduce(x, "never-registered", "sum")  # fake: no lookup, no traffic
        assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()


def test_all_reduce_fake_of_a_transposed_input_is_contiguous() -> None:
    with FakeTensorMode():
        x = torch.empty(4, 6).t()
        y = torch.ops.sagellm_comm.all_reduce(x, "g", "sum")
        assert y.shape == (6, 4) and y.is_contiguous()


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1,), (5, 3), (2, 3, 4)])
def test_all_gather_fake_stacks_rank_major_on_dim0(shape, world_size) -> None:
    with FakeTensorMode():
        x = torch.empty(shape, dtype=torch.bfloat16)
        y = torch.ops.sagellm_comm.all_gather(x, "g", world_size)
        assert y.shape == (world_size * shape[0], *shape[1:]) and y.dtype == torch.bfloat16


def test_all_gather_op_refuses_a_0d_tensor_or_a_world_size_under_1_typed_traced_or_not() -> None:
    """The op itself (``torch.ops.sagellm_comm.all_gather``, not only its Python wrapper) and its fake."""
    with pytest.raises(InvalidArgumentError, match="at least one dimension"):
        torch.ops.sagellm_comm.all_gather(torch.tensor(1.0), "never-registered", 2)
    with FakeTensorMode():
        with pytest.raises(InvalidArgumentError, match="at least one dimension"):
            torch.ops.sagellm_comm.all_gather(torch.empty(()), "g", 2)
        for bad in (0, -1):
            with pytest.raises(InvalidArgumentError, match="world_size must be"):
                torch.ops.sagellm_comm.all_gather(torch.empty(3), "g", bad)


def _collective_refusals():
    """Calls the collective ops refuse before they look the group up: ``(case, op, args)``."""
    sc = torch.ops.sagellm_comm
    name = "never-registered"
    yield "all_reduce unknown op", sc.all_reduce.default, (torch.ones(3), name, "median")
    yield "all_reduce empty op", sc.all_reduce.default, (torch.ones(3), name, "")
    yield "all_reduce avg of int64", sc.all_reduce.default, (torch.arange(3), name, "avg")
    yield "all_reduce avg of bool", sc.all_reduce.default, (torch.ones(3, dtype=torch.bool), name, "avg")
    yield "all_reduce band of float32", sc.all_reduce.default, (torch.ones(3), name, "band")
    yield "all_reduce empty group name", sc.all_reduce.default, (torch.ones(3), "", "sum")
    yield "all_gather empty group name", sc.all_gather.default, (torch.ones(3), "", 1)
    yield "all_reduce sparse", sc.all_reduce.default, (torch.eye(3).to_sparse(), name, "sum")
    yield "all_gather sparse", sc.all_gather.default, (torch.eye(3).to_sparse(), name, 1)


@pytest.mark.parametrize("case", list(_collective_refusals()), ids=lambda case: case[0])
def test_collective_ops_and_their_fakes_refuse_the_same_calls_alike(case) -> None:
    """A reduction undefined for the dtype, an unknown op, an empty group name, a sparse tensor: the real op refuses
    them with a typed error before the group is looked up, and its fake with the same one (a compiled call fails
    while it compiles)."""
    _, op, args = case
    with pytest.raises(InvalidArgumentError) as real:
        op(*args)
    assert not isinstance(real.value, GroupNotFoundError), real.value
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(InvalidArgumentError) as fake:
            op(*fake_args)
    assert type(fake.value) is type(real.value) and str(fake.value) == str(real.value)


_HIDDEN = 128


def _fused_refusals():
    """Inputs the fused op refuses from their metadata alone: ``(case, x, residual, weight, eps, quant, scale)``."""
    h = _HIDDEN
    x = torch.randn(3, h)
    for quant in ("none", "fp8_per_token", "fp8"):
        scale = torch.tensor([0.02]) if quant == "fp8" else None
        yield f"{quant} float64", x.double(), x.double(), torch.ones(h).double(), 1e-6, quant, scale
        yield f"{quant} int32", x.int(), x.int(), torch.ones(h).int(), 1e-6, quant, scale
        yield f"{quant} bf16 residual", x, x.bfloat16(), torch.ones(h), 1e-6, quant, scale
        yield f"{quant} bf16 weight", x, x, torch.ones(h).bfloat16(), 1e-6, quant, scale
        for weight in (torch.ones(h + 1), torch.ones(1, h), torch.tensor(1.0)):
            yield f"{quant} weight {tuple(weight.shape)}", x, x, weight, 1e-6, quant, scale
        for eps in (-1.0, float("nan"), float("inf")):
            yield f"{quant} eps={eps}", x, x, torch.ones(h), eps, quant, scale
    yield "unknown quant", x, x, torch.ones(h), 1e-6, "fp4", None
    yield "sparse x", x.to_sparse(), x, torch.ones(h), 1e-6, "none", None
    yield "sparse residual", x, x.to_sparse(), torch.ones(h), 1e-6, "fp8_per_token", None
    yield "sparse weight", x, x, torch.ones(h).to_sparse(), 1e-6, "none", None


@pytest.mark.parametrize("case", list(_fused_refusals()), ids=lambda case: case[0])
def test_fused_op_and_its_fake_refuse_the_same_metadata_alike(case) -> None:
    """Every refusal that needs only shapes, dtypes and constant arguments comes from the fake too, with the real
    op's typed error and message, so ``torch.compile`` fails at compile time rather than the compiled model at run
    time; the real op refuses before it looks the group up."""
    _, x, residual, weight, eps, quant, scale = case
    args = (x, residual, weight, "never-registered", eps, quant, scale)
    with pytest.raises(InvalidArgumentError) as real:
        torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(*args)
    assert not isinstance(real.value, GroupNotFoundError), real.value
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(InvalidArgumentError) as fake:
            torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(*fake_args)
    assert type(fake.value) is type(real.value) and str(fake.value) == str(real.value)


@pytest.mark.parametrize("sparse", ["y", "scale"])
def test_quantize_fp8_and_its_fake_refuse_a_sparse_tensor_typed(sparse) -> None:
    """As the fused function's checks do (``check_quant``, ``check_rmsnorm_inputs``): a sparse tensor has no dense
    values to quantise or reshape (torch's own refusal was a NotImplementedError or a RuntimeError)."""
    from sagellm_comm.fused import check_rmsnorm_inputs

    y, scale = torch.randn(3, _HIDDEN), torch.tensor([0.02])
    args = (y.to_sparse(), "fp8_per_token", None) if sparse == "y" else (y, "fp8", scale.to_sparse())
    with pytest.raises(InvalidArgumentError, match="sparse_coo tensor") as real:
        torch.ops.sagellm_comm.quantize_fp8(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(InvalidArgumentError) as fake:
            torch.ops.sagellm_comm.quantize_fp8(*fake_args)
    assert str(fake.value) == str(real.value)
    with pytest.raises(InvalidArgumentError, match="x is a torch.sparse_coo tensor"):
        check_rmsnorm_inputs(y.to_sparse(), y, torch.ones(_HIDDEN), y.device)


def test_a_compiled_call_of_the_fused_op_on_refused_inputs_fails_at_compile_time() -> None:
    def block(x, residual, weight):
        return torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(x, residual, weight, "never-registered", 1e-6)

    torch._dynamo.reset()
    x = torch.randn(2, _HIDDEN, dtype=torch.float64)
    with pytest.raises(Exception) as info:  # noqa: B017 -- Dynamo wraps the fake's error: the chain is checked
        torch.compile(block, backend="aot_eager", fullgraph=True)(x, x, torch.ones(_HIDDEN, dtype=torch.float64))
    cause = info.value
    while cause is not None and not isinstance(cause, InvalidArgumentError):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, InvalidArgumentError) and "torch.float64" in str(cause), info.value


def test_ops_have_schemas_of_functional_ops() -> None:
    reduce_schema = torch.ops.sagellm_comm.all_reduce.default._schema
    gather_schema = torch.ops.sagellm_comm.all_gather.default._schema
    assert not reduce_schema.is_mutable and not gather_schema.is_mutable
    assert [a.name for a in reduce_schema.arguments] == ["tensor", "group_name", "op"]
    assert [a.name for a in gather_schema.arguments] == ["tensor", "group_name", "world_size"]


def test_registry_errors_are_typed() -> None:
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend
    from sagellm_comm.group import CommGroup, resolve_group

    with pytest.raises(GroupNotFoundError, match="no group is registered as 'missing'") as info:
        resolve_group("missing")
    assert info.value.code.value == "comm_group_not_found"
    with pytest.raises(GroupNotFoundError):
        torch.ops.sagellm_comm.all_reduce(torch.ones(2), "missing", "sum")
    with pytest.raises(InvalidArgumentError, match="non-empty str"):
        resolve_group("")
    with pytest.raises(InvalidArgumentError, match="needs a CommGroup"):
        ops.register_group(object(), "x")  # type: ignore[arg-type]
    with pytest.raises(NotInitializedError):
        resolve_group("default")  # before sagellm_comm.init
    with pytest.raises(InvalidArgumentError, match="must be a torch.Tensor"):
        ops.all_reduce([1.0], "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="at least one dimension"):
        ops.all_gather(torch.tensor(1.0), "x", world_size=2)
    for bad in ("2", 2.0, True, 0):
        with pytest.raises(InvalidArgumentError, match="world_size must be"):
            ops.all_gather(torch.ones(2), "x", world_size=bad)

    group = CommGroup(TorchDistributedBackend("gloo"))  # never initialised: registering needs no traffic
    assert ops.register_group(group, "unit") == "unit"
    assert resolve_group("unit") is group and ops.list_groups()["unit"] is group
    assert ops.group_name("unit") == "unit" and ops.group_name(None) == "default"
    ops.unregister_group("unit")
    assert "unit" not in ops.list_groups()


def test_resolve_group_takes_a_group_a_name_or_none() -> None:
    """The one resolver (sagellm_comm.group.resolve_group) behind the ops, the overlap and the fused functions."""
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend
    from sagellm_comm.group import CommGroup, resolve_group

    group = CommGroup(TorchDistributedBackend("gloo"))
    assert resolve_group(group) is group
    ops.register_group(group, "unit-resolve")
    try:
        assert resolve_group("unit-resolve") is group
    finally:
        ops.unregister_group("unit-resolve")
    with pytest.raises(GroupNotFoundError, match="'unit-resolve'"):
        resolve_group("unit-resolve")
    for default in (None, "default"):
        with pytest.raises(NotInitializedError):
            resolve_group(default)
    with pytest.raises(InvalidArgumentError, match="a registered name or None, got int"):
        resolve_group(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="non-empty str"):
        resolve_group("")


def test_there_is_one_group_resolver() -> None:
    """``sagellm_comm.group.resolve_group`` is the only function of the package that resolves a group argument."""
    import ast
    from pathlib import Path

    import sagellm_comm

    root = Path(sagellm_comm.__file__).parent
    resolvers = [
        f"{path.relative_to(root.parent)}:{node.name}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and "resolve_group" in node.name
    ]
    assert resolvers == ["sagellm_comm/group.py:resolve_group"], resolvers
    assert not hasattr(ops, "resolve_group")


def test_resolve_group_can_require_membership(monkeypatch) -> None:
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend
    from sagellm_comm.group import CommGroup, resolve_group

    group = CommGroup(TorchDistributedBackend("gloo"))
    monkeypatch.setattr(CommGroup, "is_member", property(lambda self: False))  # a sub-group this rank is not in
    monkeypatch.setattr(CommGroup, "ranks", property(lambda self: (1,)))
    assert resolve_group(group) is group
    with pytest.raises(InvalidArgumentError, match="not a member of group"):
        resolve_group(group, member=True)


def test_unknown_reduce_op_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="unsupported reduce op"):
        ops.all_reduce(torch.ones(2), "x", op="median")


# ---------------------------------------------------------------------------------------------- dispatch


def _custom_kernels_worker(rank: int, world_size: int, port: int) -> dict:
    """Under the Triton interpreter: the op on a ``custom`` backend runs our kernels, not the engine."""
    import sagellm_comm
    from sagellm_comm.layers import RowParallelLinear
    from sagellm_comm.selector import KERNEL_ALGOS

    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, max_bytes=8192, kernel_timeout=60.0
    )
    try:
        backend = world.backend
        assert backend.custom is not None, backend.custom_reason
        x = torch.full((3, 5), float(rank + 1))
        y = ops.all_reduce(x, world)
        kernel_algo = backend.last_selection.algo
        torch.testing.assert_close(y, torch.full((3, 5), 3.0))
        torch.testing.assert_close(x, torch.full((3, 5), float(rank + 1)))

        torch.manual_seed(0)
        full = torch.nn.Linear(8, 6)
        layer = RowParallelLinear.from_linear(full, group=world)
        inp = torch.randn(2, 8)
        out = layer(inp[:, rank * 4 : rank * 4 + 4])
        torch.testing.assert_close(out, full(inp).detach(), atol=1e-5, rtol=1e-5)
        layer_algo = backend.last_selection.algo
        assert kernel_algo in KERNEL_ALGOS and layer_algo in KERNEL_ALGOS, (kernel_algo, layer_algo)
        return {"op": kernel_algo, "layer": layer_algo}
    finally:
        sagellm_comm.destroy()


def test_op_dispatches_to_custom_kernels_under_interpreter() -> None:
    results = run_ranks(
        _custom_kernels_worker, 2, timeout=180.0, env={"TRITON_INTERPRET": "1", "SAGELLM_COMM_MAX_PROGRAMS": "2"}
    )
    assert results[0] == results[1]


def _init_destroy_cycles_worker(rank: int, world_size: int, port: int, cycles: int) -> dict:
    """Init / destroy of the default group, repeated: each cycle's ops register its groups under generated names."""
    import sagellm_comm

    held = []
    for cycle in range(cycles):
        world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
        if cycle == 0:
            ops.register_group(world, "given")  # a name given by the caller: the caller unregisters it
        pair = world.new_subgroup([0, 1])
        out = ops.all_reduce(torch.full((3,), float(rank + cycle)), world)
        torch.testing.assert_close(out, torch.full((3,), float(2 * cycle + 1)))
        ops.all_reduce(torch.ones(2), pair)
        held.append(sorted(ops.list_groups()))
        sagellm_comm.destroy()
    return {"held": held, "after": sorted(ops.list_groups())}


def _name_like_a_generated_one_worker(rank: int, world_size: int, port: int) -> dict:
    """Names given by the caller in the generated names' pattern: a generated name goes around them, and destroying
    the backend leaves them registered."""
    import sagellm_comm

    given = [f"g{i}_ranks0-1" for i in range(100)]
    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    try:
        for name in given:
            ops.register_group(world, name)
        pair = world.new_subgroup([0, 1])
        generated = ops.group_name(pair)  # the next generated name is taken: another one, not an error
        assert generated not in given and ops.list_groups()[generated] is pair
    finally:
        sagellm_comm.destroy()
    left = sorted(ops.list_groups())
    for name in left:
        ops.unregister_group(name)
    return {"left": left}


def test_a_generated_name_never_takes_or_drops_a_given_one() -> None:
    for out in run_ranks(_name_like_a_generated_one_worker, 2, timeout=60.0):
        assert out["left"] == sorted(f"g{i}_ranks0-1" for i in range(100)), out["left"]


def test_destroy_unregisters_the_generated_names_of_its_groups_and_keeps_given_ones() -> None:
    for out in run_ranks(_init_destroy_cycles_worker, 2, 12, timeout=120.0):
        # cycle 0: the world group is "given" (a registered group keeps its name) and the pair's; then given +
        # this cycle's two generated names, none of an earlier cycle's
        assert [len(names) for names in out["held"]] == [2] + [3] * 11, out["held"]
        assert out["after"] == ["given"], out["after"]


def _released_subgroups_worker(rank: int, world_size: int, port: int, cycles: int) -> dict:
    """Sub-groups made, used through the ops (a generated name each) and released, again and again, under one
    backend: what the registry and the process hold after a warm-up and after ``cycles`` more."""
    import sagellm_comm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    try:

        def cycle() -> None:
            pair = world.new_subgroup([0, 1])
            out = ops.all_reduce(torch.full((2,), float(rank + 1)), pair)
            torch.testing.assert_close(out, torch.full((2,), 3.0))
            pair.destroy()

        for _ in range(2):
            cycle()
        warm = process_resources()
        for _ in range(cycles):
            cycle()
        return {"names": sorted(ops.list_groups()), "warm": warm, "after": resources_back_to(warm)}
    finally:
        sagellm_comm.destroy()


def test_a_released_sub_group_drops_its_generated_name_and_holds_no_sockets_or_threads() -> None:
    """A sub-group's generated name lasts as long as the group: releasing it (``destroy()``, ``release_group``)
    unregisters it.  The registry held every released sub-group until the backend was destroyed, and with it the
    group's Gloo process groups, whose sockets and threads stay open while anything references them (5 descriptors
    and 3 threads per sub-group here)."""
    for out in run_ranks(_released_subgroups_worker, 2, 8, timeout=120.0):
        assert all(out["after"][key] <= out["warm"][key] for key in out["warm"]), out
        assert out["names"] == [], out["names"]


def _generated_name_after_destroy_worker(rank: int, world_size: int, port: int) -> dict:
    """A group whose backend was destroyed gets no generated name: nothing would ever drop it."""
    import sagellm_comm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=30)
    pair = world.new_subgroup([0, 1])
    sagellm_comm.destroy()
    try:
        name = ops.group_name(pair)
    except NotInitializedError:
        return {"refused": True, "left": sorted(ops.list_groups())}
    return {"refused": False, "left": sorted(ops.list_groups()), "name": name}


def test_a_group_of_a_destroyed_backend_gets_no_generated_name() -> None:
    for out in run_ranks(_generated_name_after_destroy_worker, 2, timeout=60.0):
        assert out == {"refused": True, "left": []}, out


def _compiled_wrappers_worker(rank: int, world_size: int, port: int) -> dict:
    """The op wrappers given a CommGroup (not a name) inside ``torch.compile(fullgraph=True)``: one graph, and each
    call on the group it was given (a second group recompiles; it does not run on the first one's name)."""
    import sagellm_comm

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=60)
    try:
        alone = [world.new_subgroup([r]) for r in range(world_size)][rank]  # collective: every rank makes both
        ops.group_name(world)  # registered before the compilation (the generated names are made in eager code)
        ops.group_name(alone)
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank

        def reduce(t, group):
            return ops.all_reduce(t, group) * 2

        def gather(t, group):
            return ops.all_gather(t, group) + 1  # world_size looked up from the group

        def fused(t, group):
            return ops.all_reduce_residual_rmsnorm(t, t, torch.ones(3), 1e-6, group)[1]

        got = {}
        for name, fn in (("reduce", reduce), ("gather", gather), ("fused", fused)):
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
            for which, group in (("world", world), ("alone", alone), ("world again", world)):
                got[f"{name} {which}"] = torch.equal(compiled(x, group), fn(x, group))
        torch._dynamo.reset()
        compiled = torch.compile(reduce, backend="aot_eager", fullgraph=True)
        got["default"] = torch.equal(compiled(x, None), reduce(x, None))
        return got
    finally:
        sagellm_comm.destroy()


def test_op_wrappers_given_a_group_compile_as_one_graph_on_that_group() -> None:
    for got in run_ranks(_compiled_wrappers_worker, 2, timeout=240.0):
        assert got and all(got.values()), got


def _opcheck_worker(rank: int, world_size: int, port: int) -> dict:
    """``torch.library.opcheck`` of every op on a group of one Gloo rank (the engine path), over inputs of odd
    layouts, then one ``torch.compile`` (Inductor) of all four against eager: the outputs and the inputs after."""
    import sagellm_comm
    from sagellm_comm.fused import FP8_QUANT_MODES

    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=60)
    failures = {}

    def check(what, op, args):
        try:
            torch.library.opcheck(op, args, test_utils=utils)
        except Exception as exc:  # every failing case reported, not only the first
            failures[what] = f"{type(exc).__name__}: {exc}"

    try:
        ops.register_group(world, "solo")
        sc = torch.ops.sagellm_comm
        hidden = 128
        tensors = {
            "1-d": torch.randn(7),
            "0 rows": torch.randn(0, 5),
            "transposed": torch.randn(5, 3).t(),
            "strided 3-d": torch.randn(3, 5, 7)[:, ::2, 1:],
            "bf16": torch.randn(4, 6).bfloat16(),
            "int64": torch.arange(12).reshape(3, 4),
        }
        for name, t in tensors.items():
            check(f"all_reduce {name}", sc.all_reduce.default, (t, "solo", "sum"))
            check(f"all_gather {name}", sc.all_gather.default, (t, "solo", 1))
        modes = [("none", None)] + [(m, torch.tensor([0.02]) if m == "fp8" else None) for m in FP8_QUANT_MODES]
        for shape in [(3, hidden), (2, 1, hidden), (hidden,), (0, hidden)]:
            x, residual, weight = torch.randn(shape), torch.randn(shape), torch.randn(hidden)
            for mode, scale in modes:
                args = (x, residual, weight, "solo", 1e-6, mode, scale)
                check(f"fused {mode} {shape}", sc.all_reduce_residual_rmsnorm.default, args)
                if mode != "none":
                    check(f"quantize_fp8 {mode} {shape}", sc.quantize_fp8.default, (x, mode, scale))
        x, residual = torch.randn(hidden, 3).t(), torch.randn(3, 2 * hidden)[:, ::2]
        check("fused transposed x, strided residual", sc.all_reduce_residual_rmsnorm.default,
              (x, residual, torch.randn(hidden), "solo", 1e-6, "none", None))  # fmt: skip
        check("quantize_fp8 static scale (1, 1, 1)", sc.quantize_fp8.default,
              (torch.randn(3, hidden), "fp8", torch.full((1, 1, 1), 0.02)))  # fmt: skip

        def chain(x, residual, weight, scale):
            y = sc.all_reduce(x[:, 1:], "solo", "sum")  # a view in, the input used again below
            g = sc.all_gather(x, "solo", 1)
            g.add_(1)  # an output mutated
            out, scales, new_residual = sc.all_reduce_residual_rmsnorm(g, residual, weight, "solo", 1e-6, "fp8", scale)
            scales.mul_(2)  # the copy of the caller's scale, not the scale
            q, s = sc.quantize_fp8(new_residual, "fp8_per_token")
            x.mul_(3)  # the op's input mutated after it
            return y + x[:, 1:], out.float(), scales, new_residual, q.float(), s

        inputs = [torch.randn(3, hidden), torch.randn(3, hidden), torch.randn(hidden), torch.tensor([0.02])]
        eager_in = [t.clone() for t in inputs]
        compiled_in = [t.clone() for t in inputs]
        eager = list(chain(*eager_in)) + eager_in
        compiled = list(torch.compile(chain, backend="inductor", fullgraph=True)(*compiled_in)) + compiled_in
        for i, (e, c) in enumerate(zip(eager, compiled, strict=True)):
            if not (e.dtype == c.dtype and e.shape == c.shape and e.stride() == c.stride() and torch.equal(e, c)):
                failures[f"compiled chain: tensor {i}"] = f"{e.dtype} {tuple(e.shape)} vs {c.dtype} {tuple(c.shape)}"
    finally:
        sagellm_comm.destroy()
    return failures


def test_every_op_passes_opcheck_and_compiles_to_the_eager_bits() -> None:
    """Schema (no undeclared mutation or aliasing: the static FP8 scale comes back as a copy), fake against real
    (shapes, strides, dtypes: 1-d, 0 rows, non-contiguous), AOTAutograd with dynamic shapes, and Inductor."""
    (failures,) = run_ranks(_opcheck_worker, 1, timeout=240.0)
    assert failures == {}, failures
