"""Bad argument values at the public entry points: each is refused with a typed error naming the argument, before
anything runs, never rounded, parsed or read as a truth value (``sagellm_comm/arguments.py`` and the checks that
use it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sagellm_comm.arguments import (
    MAX_TIMEOUT_S,
    check_device,
    check_finite,
    check_flag,
    check_int,
    check_timeout,
    share_bytes,
)
from sagellm_comm.errors import InvalidArgumentError, ShapeMismatchError

BAD_TIMEOUTS = [  # the last two are refused by some checks only (None is the default of a wait)
    math.nan, math.inf, -math.inf, 0, -1, True, "30", np.bool_(True), np.float32("nan"), None, MAX_TIMEOUT_S * 2,
]  # fmt: skip


# ============================================================================ the shared checks
def test_share_bytes_is_true_exactly_when_two_views_have_a_byte_in_common():
    buf = torch.zeros(64, dtype=torch.uint8)
    f32 = buf.view(torch.float32)  # 16 elements over the same 64 bytes
    assert share_bytes(buf[0:8], buf[0:8]) and share_bytes(buf[0:8], buf[7:9])  # the same; one byte in common
    assert not share_bytes(buf[0:8], buf[8:16]) and not share_bytes(buf[8:16], buf[0:8])  # adjacent, either order
    assert share_bytes(f32[1:2], buf[7:8]) and not share_bytes(f32[1:2], buf[8:9])  # element sizes differ
    assert share_bytes(f32[0:4], buf[3:4]) and not share_bytes(f32[0:4], buf[16:20])
    assert not share_bytes(buf[4:4], buf[0:8]) and not share_bytes(buf[0:8], f32[1:1])  # empty: no byte
    assert not share_bytes(buf[0:8], torch.zeros(8, dtype=torch.uint8))  # separate memory


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_check_timeout_refuses_what_is_not_a_finite_positive_number(timeout):
    with pytest.raises(InvalidArgumentError, match="kernel_timeout must be a positive number of seconds"):
        check_timeout(timeout, "kernel_timeout")


def test_check_timeout_takes_ints_and_floats_unchanged():
    assert check_timeout(3) == 3.0 and check_timeout(0.25) == 0.25 and check_timeout(MAX_TIMEOUT_S) == MAX_TIMEOUT_S
    for value in (np.float32(0.5), np.int64(3)):  # NumPy's scalars are the numbers they hold
        assert check_timeout(value) == float(value) and type(check_timeout(value)) is float


def test_numpy_scalars_are_what_they_hold():
    assert check_int(np.int64(4), "n") == 4 and type(check_int(np.uint8(4), "n")) is int
    assert check_flag(np.bool_(True), "bias") is True and check_flag(np.bool_(False), "bias") is False
    assert check_finite(np.float32(1e-6), "eps", 0.0) == float(np.float32(1e-6))


@pytest.mark.parametrize("value", [4.0, 4.5, True, "4", None, np.float64(4.0), np.bool_(True)])
def test_check_int_refuses_floats_bools_and_strings(value):
    with pytest.raises(InvalidArgumentError, match="world_size must be an int"):
        check_int(value, "world_size", 1)


def test_check_int_bounds():
    assert check_int(3, "n", 1, 3) == 3
    with pytest.raises(InvalidArgumentError, match=r"n must be in 1\.\.3, got 4"):
        check_int(4, "n", 1, 3)
    with pytest.raises(InvalidArgumentError, match="n must be >= 1, got 0"):
        check_int(0, "n", 1)


@pytest.mark.parametrize("value", ["False", "false", 0, 1, None, 1.0, np.int64(1)])
def test_check_flag_refuses_truthy_stand_ins(value):
    with pytest.raises(InvalidArgumentError, match="bias must be True or False"):
        check_flag(value, "bias")


@pytest.mark.parametrize("device", ["cdua", "", -1, True, 1.0, None])
def test_check_device_refuses_what_torch_cannot_read(device):
    with pytest.raises(InvalidArgumentError, match="device"):
        check_device(device)


def test_check_device_takes_strings_and_devices():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("cuda:1") == torch.device("cuda", 1)
    assert check_device(torch.device("cpu")) == torch.device("cpu")


# ============================================================================ transfer agent
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "cdua"}, "device 'cdua' is not a device"),
        ({"device": 1.0}, "device must be a torch.device, a string"),
        ({"timeout": math.nan}, "timeout must be a positive number"),
        ({"timeout": math.inf}, "timeout must be a positive number"),
        ({"options": [("ipc", {})]}, "options must be a dict keyed by transport"),
        ({"options": {"ipcc": {}}}, "options names transport 'ipcc'"),
        ({"options": {"ipc": 8}}, r"options\['ipc'\] must be a dict"),
        ({"options": {"ipc": {"max_programs": 2.7}}}, "ipc option max_programs must be an int, got 2.7"),
        ({"options": {"ipc": {"max_programs": "8"}}}, "ipc option max_programs must be an int"),
        ({"options": {"ipc": {"max_programs": 0}}}, "ipc option max_programs must be in 1..65535"),
        ({"options": {"ipc": {"max_program": 8}}}, r"unknown ipc options \['max_program'\]"),
        ({"options": {"nixl": {"num_threads": 1.5}}}, "nixl option num_threads must be an int, got 1.5"),
        ({"options": {"nixl": {"num_thread": 4}}}, r"unknown nixl options \['num_thread'\]"),
        ({"options": {"nixl": {"backends": "UCX"}}}, "nixl option backends must be a non-empty list"),
        ({"options": {"nixl": {"progress_thread": 0}}}, "nixl option progress_thread must be True or False, got 0"),
        ({"options": {"nixl": {"progress_thread": "off"}}}, "nixl option progress_thread must be True or False"),
    ],
)
def test_transfer_agent_refuses_bad_constructor_values(kwargs, match, monkeypatch):
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # ipc runs on the CPU: auto starts it and it reads its options

    with pytest.raises(InvalidArgumentError, match=match):
        TransferAgent("probe", **kwargs)


def test_transfer_agent_refuses_a_nixl_backend_that_nixl_has_no_plugin_for():
    """NIXL skips a backend it has no plugin for with a warning: the agent was made, registered nothing, and its
    metadata() raised NIXL's own nixlInvalidParamError."""
    from sagellm_comm.transfer import TransferAgent, transfer_backend_unavailable

    why = transfer_backend_unavailable("nixl")
    if why is not None:
        pytest.skip(why)
    for backend in ("nixl", "auto"):  # auto does not skip NIXL for it either: the option is wrong
        with pytest.raises(InvalidArgumentError, match=r"nixl option backends names \['NOPE'\], which NIXL has no"):
            TransferAgent("probe", backend, options={"nixl": {"backends": ["UCX", "NOPE"]}})


def test_transfer_agent_allocate_refuses_a_device_that_is_not_one():
    from sagellm_comm.transfer import TransferAgent

    with pytest.raises(InvalidArgumentError, match="device 'cdua' is not a device"):
        TransferAgent.allocate(object.__new__(TransferAgent), "kv", 16, torch.float32, device="cdua")


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS[:-2])
def test_transfer_handle_wait_refuses_bad_timeouts(timeout):
    from sagellm_comm.transfer.handle import TransferHandle

    handle = object.__new__(TransferHandle)
    handle._agent = type("Agent", (), {"timeout": 5.0})()
    with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
        handle.wait(timeout)


# ============================================================================ kernels' timeouts, the custom backend
@pytest.mark.parametrize("timeout", BAD_TIMEOUTS[:-2] + [1e300])
def test_kernel_deadlines_refuse_what_is_not_a_finite_positive_number(timeout):
    from sagellm_comm.launch import timeout_ticks

    # NaN and inf raised a raw ValueError / OverflowError, True was one second, "30" a TypeError
    with pytest.raises(InvalidArgumentError, match="timeout_s must be a positive number of seconds"):
        timeout_ticks(timeout, use_ptx=False)
    assert timeout_ticks(0.5, use_ptx=False) == 500_000_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_timeout": math.nan}, "kernel_timeout must be a positive number"),
        ({"kernel_timeout": True}, "kernel_timeout must be a positive number"),
        ({"kernel_timeout": "30"}, "kernel_timeout must be a positive number"),
        ({"selector": 5}, "selector must be an AlgoSelector"),
        ({"config": {"custom_max_bytes": 4096}}, "config must be a CommConfig"),
        ({"device": "cdua"}, "device 'cdua' is not a device"),
    ],
)
def test_custom_backend_refuses_bad_constructor_values(kwargs, match, monkeypatch):
    from sagellm_comm.backends.custom import CustomBackend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InvalidArgumentError, match=match):
        CustomBackend(engine="gloo", **kwargs)


def test_torch_distributed_backend_refuses_a_device_that_is_not_one():
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend

    with pytest.raises(InvalidArgumentError, match="device 'cdua' is not a device"):
        TorchDistributedBackend("gloo", device="cdua")


@pytest.mark.parametrize("timeout", [math.nan, -1, True])
def test_work_handles_refuse_bad_timeouts(timeout):
    from sagellm_comm.backend import CompletedWork
    from sagellm_comm.backends.custom import _EventWork

    with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
        CompletedWork(1).wait(timeout)
    # the custom kernels' handle: a NaN deadline was never passed (an endless wait on the GPU)
    work = _EventWork.__new__(_EventWork)
    with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
        work.wait(timeout)


# ============================================================================ a world of one rank (Gloo, here)
@pytest.fixture
def world():
    import sagellm_comm

    group = sagellm_comm.init(rank=0, world_size=1, backend="gloo")
    yield group
    sagellm_comm.destroy()


@pytest.mark.parametrize(
    ("layer", "kwargs", "match"),
    [
        ("ColumnParallelLinear", {"bias": "False"}, "bias must be True or False, got 'False'"),  # was a bias
        ("ColumnParallelLinear", {"gather_output": "no"}, "gather_output must be True or False"),
        ("ColumnParallelLinear", {"skip_bias_add": 1}, "skip_bias_add must be True or False"),
        ("ColumnParallelLinear", {"return_bias": None}, "return_bias must be True or False"),
        ("RowParallelLinear", {"input_is_parallel": "False"}, "input_is_parallel must be True or False"),
        ("RowParallelLinear", {"reduce_results": None, "bias": False}, "reduce_results must be True or False"),
        ("RowParallelLinear", {"use_fused_gemm": "0"}, "use_fused_gemm must be True or False"),
        ("ColumnParallelLinear", {"params_dtype": "float16"}, "params_dtype must be one of"),  # a raw TypeError
        ("ColumnParallelLinear", {"params_dtype": float}, "params_dtype must be one of"),  # was float32
        ("RowParallelLinear", {"params_dtype": torch.int32}, "params_dtype must be one of"),  # NotImplementedError
        ("ColumnParallelLinear", {"device": "cdua"}, "device 'cdua' is not a device"),  # a raw RuntimeError
    ],
)
def test_parallel_linear_refuses_values_it_would_coerce(world, layer, kwargs, match):
    from sagellm_comm import layers

    with pytest.raises(InvalidArgumentError, match=match):
        getattr(layers, layer)(8, 4, **kwargs)


def test_parallel_linear_takes_its_documented_values(world):
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    col = ColumnParallelLinear(8, 4, bias=False, gather_output=True, params_dtype=torch.bfloat16, device="cpu")
    row = RowParallelLinear(8, 4, reduce_results=False, skip_bias_add=True, return_bias=True)
    assert col.bias is None and col.weight.dtype == torch.bfloat16 and col.gather_output is True
    assert row.reduce_results is False and row.return_bias is True


def test_parallel_linear_takes_numpy_integer_sizes(world):
    # sizes read from a config with NumPy were refused as "must be a positive int, got np.int64(8)"
    from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

    col = ColumnParallelLinear(np.int64(8), np.int32(4), params_dtype=torch.float32)
    row = RowParallelLinear(np.int64(8), np.int64(4), params_dtype=torch.float32)
    for layer in (col, row):
        assert layer.weight.shape == (4, 8) and type(layer.input_size) is int and type(layer.output_size) is int
    assert type(col.output_size_per_partition) is int and type(row.input_size_per_partition) is int
    with pytest.raises(InvalidArgumentError, match="input_size must be a positive int"):
        RowParallelLinear(np.int64(0), 4)
    with pytest.raises(InvalidArgumentError, match="output_size must be a positive int"):
        ColumnParallelLinear(8, np.bool_(True))


@pytest.mark.parametrize("layer", ["ColumnParallelLinear", "RowParallelLinear"])
def test_load_weight_refused_for_its_bias_leaves_the_layer_as_it_was(world, layer):
    # the weight was copied before the bias was looked at: an error left a new weight beside the old bias
    from sagellm_comm import layers
    from sagellm_comm.errors import ShapeMismatchError

    with_bias = getattr(layers, layer)(8, 4, params_dtype=torch.float32)
    no_bias = getattr(layers, layer)(8, 4, bias=False, params_dtype=torch.float32)
    weight, bias = with_bias.weight.detach().clone(), with_bias.bias.detach().clone()
    with pytest.raises(ShapeMismatchError):
        with_bias.load_weight(torch.ones(4, 8), torch.ones(5))
    assert torch.equal(with_bias.weight, weight) and torch.equal(with_bias.bias, bias)
    before = no_bias.weight.detach().clone()
    with pytest.raises(InvalidArgumentError, match="bias=False"):
        no_bias.load_weight(torch.ones(4, 8), torch.ones(4))
    assert torch.equal(no_bias.weight, before)
    with_bias.load_weight(torch.ones(4, 8), torch.full((4,), 2.0))  # both, once both are right
    assert torch.equal(with_bias.weight, torch.ones(4, 8)) and torch.equal(with_bias.bias, torch.full((4,), 2.0))
    with_bias.weight_loader(with_bias.bias, torch.full((4,), 3.0))
    assert torch.equal(with_bias.bias, torch.full((4,), 3.0))


# ============================================================================ the fused all-reduce + RMSNorm: eps
BAD_EPS = [math.nan, math.inf, -1e-6, True, "1e-6", None]


@pytest.mark.parametrize("eps", BAD_EPS)
def test_fused_rmsnorm_refuses_an_eps_that_is_not_a_finite_non_negative_number(world, eps):
    # NaN / inf / negative eps gave NaN or inf rows without a word; "1e-6" was parsed by float() on the op path
    from sagellm_comm import fused, ops

    x, residual, weight = torch.ones(2, 8), torch.ones(2, 8), torch.ones(8)
    with pytest.raises(InvalidArgumentError, match="eps must be"):
        fused.all_reduce_residual_rmsnorm(x, residual, weight, eps)
    with pytest.raises(InvalidArgumentError, match="eps must be"):
        ops.all_reduce_residual_rmsnorm(x, residual, weight, eps)


def test_fused_rmsnorm_takes_eps_zero_and_ints(world):
    from sagellm_comm import fused

    x, residual, weight = torch.ones(2, 8), torch.ones(2, 8), torch.ones(8)
    normed, _ = fused.all_reduce_residual_rmsnorm(x, residual, weight, 0)
    torch.testing.assert_close(normed, fused.rmsnorm_reference(residual + x, weight, 0.0))


def test_a_hidden_size_of_zero_is_a_typed_error_on_every_entry(world):
    # the op path failed in reshape(-1, 0) (RuntimeError), the per-token quantiser in amax (IndexError)
    from sagellm_comm import fused, ops

    x, weight = torch.empty(4, 0), torch.empty(0)
    for call in (fused.all_reduce_residual_rmsnorm, ops.all_reduce_residual_rmsnorm):
        with pytest.raises(InvalidArgumentError, match="hidden size must be at least 1"):
            call(x, x, weight)
    for quant in ("fp8_per_token", "fp8_group128"):
        for quantize in (fused.quantize_fp8_reference, ops.quantize_fp8):
            with pytest.raises(ShapeMismatchError, match="needs hidden >= 1"):
                quantize(x, quant)
        for call in (fused.all_reduce_residual_rmsnorm, ops.all_reduce_residual_rmsnorm):
            with pytest.raises(InvalidArgumentError, match="hidden"):
                call(x, x, weight, quant=quant)


def test_a_weight_that_is_not_contiguous_is_a_layout_error_as_for_x_and_residual(world):
    # check_rmsnorm_inputs documents a wrong layout as InvalidArgumentError; a strided weight was ShapeMismatchError
    from sagellm_comm import fused

    x, weight = torch.ones(2, 128), torch.ones(256)[::2]
    layout = r"weight must be a contiguous \[128\] tensor, got strides \(2,\)"
    for quant in (None, "fp8_per_token"):
        with pytest.raises(InvalidArgumentError, match=layout):
            fused.all_reduce_residual_rmsnorm(x, x, weight, quant=quant)
    with pytest.raises(ShapeMismatchError, match=r"weight must be a contiguous \[128\] tensor, got \(64,\)"):
        fused.all_reduce_residual_rmsnorm(x, x, weight[:64].contiguous())


@pytest.mark.parametrize(
    ("quant", "scale", "match"),
    [
        ("fp8", 0.02, "scale, a one-element torch.float32 tensor|scale must be None or a one-element"),
        ("fp8_per_token", 0.5, "scale must be None"),
        (8, None, "quant must be"),
        (["fp8"], None, "quant must be"),
        ("none", None, "quant must be"),  # the ops' internal spelling of no quantisation is not a mode
    ],
)
def test_fp8_arguments_of_a_type_the_ops_do_not_take_are_typed_errors_on_every_entry(world, quant, scale, match):
    # the op wrappers passed them to the ops, whose schemas refused them with an untyped RuntimeError
    from sagellm_comm import fused, ops

    x, weight = torch.ones(2, 128), torch.ones(128)
    for call in (fused.all_reduce_residual_rmsnorm, ops.all_reduce_residual_rmsnorm):
        with pytest.raises(InvalidArgumentError, match=match):
            call(x, x, weight, quant=quant, scale=scale)
    for quantize in (fused.quantize_fp8_reference, ops.quantize_fp8):
        with pytest.raises(InvalidArgumentError, match=match):
            quantize(x, quant, scale)
    with pytest.raises(InvalidArgumentError, match="quant must be"):
        ops.quantize_fp8(x, None)


def test_the_fp8_payload_names_a_strided_tensor_as_the_fault_not_its_device(monkeypatch):
    # the payload path said "tensor must be contiguous on cpu, got cpu" for a transposed CPU tensor
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    workspaces = local_workspaces(2, 4096, "cpu")
    try:
        car = CustomAllReduce(workspaces[0])
        strided = torch.ones(64, 2, dtype=torch.bfloat16).t()
        with pytest.raises(InvalidArgumentError, match=r"needs a contiguous tensor, got shape \(2, 64\) with strides"):
            car.all_reduce(strided, payload="fp8")
        with pytest.raises(InvalidArgumentError, match="tensor is on meta, this rank's workspace is on cpu"):
            car.all_reduce(torch.ones(64, device="meta"), payload="fp8")
        assert car.epoch == 0, "a refused call must not have run anything"
    finally:
        for workspace in workspaces:
            workspace.close()


@pytest.mark.parametrize("eps", [math.nan, -1.0, "1e-6"])
def test_fused_rmsnorm_kernel_object_refuses_bad_eps_before_launching(eps, monkeypatch):
    from sagellm_comm.fused import FusedAllReduceRMSNorm
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    workspaces = local_workspaces(2, 4096, "cpu")
    try:
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        with pytest.raises(InvalidArgumentError, match="eps must be"):
            FusedAllReduceRMSNorm(workspaces[0])(x, x.clone(), torch.ones(8, dtype=torch.bfloat16), eps)
    finally:
        for workspace in workspaces:
            workspace.close()


# ============================================================================ groups and collectives
@pytest.mark.parametrize("ranks", [1.0, None, 0, "0"])
def test_new_subgroup_refuses_what_is_not_a_list_of_ranks(world, ranks):
    from sagellm_comm.errors import GroupInvalidError

    with pytest.raises(GroupInvalidError, match="sub-group ranks must be a non-empty list of ints"):
        world.new_subgroup(ranks)  # 1.0 and None raised a raw TypeError


def test_split_takes_a_numpy_integer_group_size(world):
    # refused as "group_size must be a positive int, got np.int64(1)", where new_subgroup takes NumPy ranks
    from sagellm_comm.errors import GroupInvalidError

    block = world.split(np.int64(1))
    assert block.ranks == (0,) and block.rank == 0
    for bad in (np.bool_(True), np.float64(1.0), 0):
        with pytest.raises(GroupInvalidError, match="group_size must be a positive int"):
            world.split(bad)


@pytest.mark.parametrize("async_op", ["no", None, 0, 1])
@pytest.mark.parametrize("op", ["all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"])
def test_collectives_refuse_an_async_op_that_is_not_a_bool(world, op, async_op):
    # "no" was truthy: the call returned a Work instead of the result; None ran it synchronously
    x = torch.ones(4)
    calls = {
        "all_reduce": lambda: world.all_reduce(x, async_op=async_op),
        "broadcast": lambda: world.broadcast(x, 0, async_op=async_op),
        "all_gather": lambda: world.all_gather(torch.empty(4), x, async_op=async_op),
        "reduce_scatter": lambda: world.reduce_scatter(torch.empty(4), x, async_op=async_op),
        "all_to_all": lambda: world.all_to_all(torch.empty(4), x, async_op=async_op),
    }
    with pytest.raises(InvalidArgumentError, match="async_op must be True or False"):
        calls[op]()
    assert torch.equal(x, torch.ones(4))


def test_init_refuses_a_master_addr_that_is_not_a_string():
    import sagellm_comm

    # an int reached the rendezvous and came back as UnavailableError("... str, bytes or bytearray expected")
    with pytest.raises(InvalidArgumentError, match="master_addr must be a host name or address"):
        sagellm_comm.init(rank=0, world_size=1, backend="gloo", master_addr=123, master_port=29513, timeout=5)


# ============================================================================ workspaces
@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((2, 4096.0), {}, r"slot_bytes\) must be an int, got 4096.0"),
        ((2, 1e6), {}, r"slot_bytes\) must be an int, got 1000000.0"),  # was 1000192 bytes
        ((2, True), {}, r"slot_bytes\) must be an int, got True"),  # was 256 bytes
        ((2.0, 4096), {}, "world_size must be an int, got 2.0"),  # a raw TypeError
        ((0, 4096), {}, "world_size must be >= 1, got 0"),  # a raw IndexError
        ((2, 4096), {"max_programs": 2.5}, "max_programs must be an int, got 2.5"),  # was 2 programs
        ((2, 4096), {"max_programs": True}, "max_programs must be an int, got True"),  # was 1 program
        ((2, 4096), {"check": "no"}, "check must be True or False"),  # was check mode on
    ],
)
def test_local_workspaces_refuse_values_they_would_round(args, kwargs, match):
    from sagellm_comm.workspace import local_workspaces

    with pytest.raises(InvalidArgumentError, match=match):
        local_workspaces(*args, "cpu", **kwargs)


def test_local_workspaces_still_round_an_int_size_up_to_the_alignment():
    from sagellm_comm.workspace import ALIGN_BYTES, local_workspaces

    workspaces = local_workspaces(np.int64(2), np.int64(1000), "cpu", max_programs=np.int32(3), check=np.bool_(False))
    try:  # NumPy's integers are ints: the workspace holds Python ints
        assert workspaces[0].slot_bytes == ALIGN_BYTES * 4 and workspaces[0].max_programs == 3
        assert type(workspaces[0].slot_bytes) is int and type(workspaces[0].max_programs) is int
        assert len(workspaces) == 2 and workspaces[0].check is False
    finally:
        for workspace in workspaces:
            workspace.close()


# ============================================================================ the environment
def test_a_misspelt_setting_is_refused_naming_the_setting_it_resembles():
    from sagellm_comm.config import CommConfig

    # Names that are not settings are built here, so that the tree names only settings (test_config.py checks).
    misspelt, unknown = "SAGELLM_COMM_CUSTOM_MAX_BYTES"[:-1], "SAGELLM_COMM_" + "NO_SUCH_THING"
    # was ignored: the run used the default capacity without a word
    with pytest.raises(InvalidArgumentError, match="did you mean SAGELLM_COMM_CUSTOM_MAX_BYTES") as info:
        CommConfig.from_env({misspelt: "16384"})
    assert info.value.details["variable"] == misspelt
    with pytest.raises(InvalidArgumentError, match=f"{unknown} is not a setting; "):
        CommConfig.from_env({unknown: "1"})
    assert CommConfig.from_env({"SAGELLM_COMM_CHECK": "1", "OTHER_VARIABLE": "x"}).check is True


@pytest.mark.parametrize("text", ["1.5", "1e6", "garbage", "true"])
def test_settings_refuse_text_they_would_have_to_round_or_guess(text):
    from sagellm_comm.config import CommConfig

    with pytest.raises(InvalidArgumentError, match="SAGELLM_COMM_MAX_PROGRAMS must be an integer"):
        CommConfig.from_env({"SAGELLM_COMM_MAX_PROGRAMS": text})
    assert CommConfig.from_env({"SAGELLM_COMM_MAX_PROGRAMS": ""}).max_programs is None  # empty: the default


# ============================================================================ the fused GEMM + all-reduce, the selector
@pytest.mark.parametrize(("kwargs", "match"), [({"zero_copy": "no"}, "zero_copy must be True or False"),
                                               ({"path": "fussed"}, "path must be auto or one of")])  # fmt: skip
def test_gemm_all_reduce_refuses_a_bad_flag_or_path_even_where_it_runs_unfused(world, kwargs, match):
    # zero_copy="no" was truthy (a workspace view the next call overwrites); a bad path was ignored unfused
    from sagellm_comm import fused

    with pytest.raises(InvalidArgumentError, match=match):
        fused.gemm_all_reduce(torch.ones(2, 4), torch.ones(4, 3), **kwargs)


@pytest.mark.parametrize("rule", [{"algo": "one_shot", "max_bytes": True}, {"algo": "one_shot", "min_bytes": 1.5},
                                  {"algo": "one_shot", "world_sizes": [True]}])  # fmt: skip
def test_selector_rules_refuse_bools_and_floats_as_byte_counts(rule):
    from sagellm_comm.selector import AlgoSelector

    with pytest.raises(InvalidArgumentError, match="selector rule 0"):
        AlgoSelector.from_dict({"rules": [rule]})


# ============================================================================ topology
@pytest.mark.parametrize(("kwargs", "match"), [({"config": "x"}, "config must be a CommConfig"),
                                               ({"group": 5}, "group must be a CommGroup, a CommBackend")])  # fmt: skip
def test_topology_discover_refuses_arguments_of_the_wrong_type(kwargs, match):
    from sagellm_comm.topology import Topology

    with pytest.raises(InvalidArgumentError, match=match):  # were AttributeErrors from inside
        Topology.discover(**kwargs)


@pytest.mark.parametrize(("shape", "dtype", "match"), [((2.5, 4), torch.float32, "each size of shape must be an int"),
                                                       (2.0, torch.float32, "shape must be an int or a tuple"),
                                                       ((True,), torch.float32, "each size of shape must be an int"),
                                                       (8, "float32", "dtype must be a torch.dtype")])  # fmt: skip
def test_transfer_agent_allocate_refuses_shapes_it_would_truncate(shape, dtype, match):
    # (2.5, 4) allocated a [2, 4] region; a float or string failed deep in torch
    from sagellm_comm.transfer import TransferAgent

    with pytest.raises(InvalidArgumentError, match=match):
        TransferAgent.allocate(object.__new__(TransferAgent), "kv", shape, dtype)


def test_connect_world_refuses_what_is_not_a_backend_or_a_group_handle(world):
    from sagellm_comm.transfer.world import connect_world

    with pytest.raises(InvalidArgumentError, match="backend must be an initialised CommBackend"):
        connect_world(world)  # a CommGroup, not its backend: was an AttributeError
    with pytest.raises(InvalidArgumentError, match="group must be a GroupHandle"):
        connect_world(world.backend, group=world)


def test_virtual_rank_group_refuses_a_device_that_is_not_one():
    from sagellm_comm.virtual import VirtualRankGroup

    with pytest.raises(InvalidArgumentError, match="device 'cdua' is not a device"):
        VirtualRankGroup(2, device="cdua")  # a raw RuntimeError from torch
