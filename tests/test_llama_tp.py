"""A ``transformers`` Llama on the TP layers (``examples/llama_tp.py``) against the unsharded model.

CPU: one set of 4 Gloo processes runs every check (importing transformers costs each process seconds, so
spawning once matters on a 2-core CI machine): TP 4 over the world and TP 2 over ``world.split(2)`` (two
replicas side by side), fp32 and bf16, the logits of a prefill and of two decode steps on a KV cache, each
within the example's ``TOLERANCES``.  A negative control (one ``o_proj`` that skips its all-reduce) shows
the comparison catches a wrong model.

GPU (``-m gpu``): the same model on the ``custom`` backend with N processes sharing ``cuda:0``, eager,
under ``torch.compile`` and with the decode step captured in a CUDA graph; the all-reduces must run the
kernels (``backend.last_selection``), not the engine.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch

from tests.conftest import HAS_CUDA, checked_values, run_checks, run_ranks

# A guard for environments without the extra (CI installs it through [dev]).  find_spec, not
# importorskip: importing transformers costs the pytest process seconds it does not need (the ranks import it).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs transformers: pip install -e ".[examples]"'
)

CPU_WORLD_SIZE = 4
CASES = [(tp, dtype) for tp in (4, 2) for dtype in ("float32", "bfloat16")]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _failures(errors: dict[str, dict]) -> list[str]:
    return [
        f"{step}: max error {e['max_error']:.3e} (|ref| <= {e['scale']:.3g})"
        for step, e in errors.items()
        if not e["ok"]
    ]


# ---------------------------------------------------------------------------------------------- checks


def check_shards(llama_tp, groups: dict) -> dict:
    """Per-rank parameter shapes and config of the sharded model, for TP 4 and TP 2."""
    config = llama_tp.small_llama_config()
    shapes = {}
    for tp_size, group in groups.items():
        model = llama_tp.shard_llama(llama_tp.build_llama(config), group)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        shapes[tp_size] = {
            name: tuple(module.weight.shape)
            for name, module in {
                "q_proj": attn.q_proj,
                "k_proj": attn.k_proj,
                "v_proj": attn.v_proj,
                "o_proj": attn.o_proj,
                "gate_proj": mlp.gate_proj,
                "up_proj": mlp.up_proj,
                "down_proj": mlp.down_proj,
            }.items()
        }
        shapes[tp_size]["config"] = (
            model.config.num_attention_heads,
            model.config.num_key_value_heads,
            model.config.head_dim,
            model.config.intermediate_size,
        )
    return shapes


def check_missing_all_reduce_is_caught(llama_tp, groups: dict) -> dict:
    """Negative control: layer 0's ``o_proj`` returns its partial sum (``reduce_results=False``); bf16."""
    from sagellm_comm.layers import RowParallelLinear

    world = groups[4]
    config = llama_tp.small_llama_config()
    reference = llama_tp.build_llama(config, dtype=torch.bfloat16)
    broken = llama_tp.shard_llama(copy.deepcopy(reference), world)
    attn = broken.model.layers[0].self_attn
    full_o_proj = reference.model.layers[0].self_attn.o_proj
    attn.o_proj = RowParallelLinear.from_linear(full_o_proj, group=world, reduce_results=False)
    prompt, next_tokens = llama_tp.make_batch(config)
    expected = llama_tp.run_steps(reference, prompt, next_tokens)
    given = llama_tp.run_steps(broken, prompt, next_tokens)
    return {step: llama_tp.logit_error(given[step], expected[step], torch.bfloat16) for step in expected}


def check_indivisible_tp_size(llama_tp, groups: dict) -> str:
    """2 key/value heads cannot be split over 4 ranks: the typed error, before any layer is replaced."""
    from sagellm_comm.errors import InvalidArgumentError

    model = llama_tp.build_llama(llama_tp.small_llama_config(num_key_value_heads=2))
    try:
        llama_tp.shard_llama(model, groups[4])
    except InvalidArgumentError as exc:
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # untouched
        return str(exc)
    raise AssertionError("shard_llama accepted num_key_value_heads=2 at TP 4")


def _cpu_worker(rank: int, world_size: int, port: int) -> dict:
    import sagellm_comm
    from examples import llama_tp

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=60)
    try:
        groups = {4: world, 2: world.split(2)}  # TP 4, and TP 2 x 2 replicas
        checks = {
            case: functools.partial(llama_tp.check_tp_llama, groups[case[0]], dtype=_dtype(case[1])) for case in CASES
        }
        for name, check in (
            ("shards", check_shards),
            ("missing_all_reduce", check_missing_all_reduce_is_caught),
            ("indivisible", check_indivisible_tp_size),
        ):
            checks[name] = functools.partial(check, llama_tp, groups)
        return run_checks(checks)
    finally:
        sagellm_comm.destroy()


@pytest.fixture(scope="module")
def cpu_outcomes() -> list[dict]:
    return run_ranks(_cpu_worker, CPU_WORLD_SIZE, timeout=300.0)


@pytest.mark.parametrize("case", CASES, ids=[f"tp{tp}-{dtype}" for tp, dtype in CASES])
def test_logits_match_unsharded_model_on_gloo(cpu_outcomes, case) -> None:
    for rank, errors in enumerate(checked_values(cpu_outcomes, case)):
        assert set(errors) == {"prefill", "decode1", "decode2"}
        assert not _failures(errors), f"rank {rank}: {_failures(errors)}"


def test_each_rank_holds_its_share_of_heads_and_mlp(cpu_outcomes) -> None:
    hidden, head_dim = 128, 16  # small_llama_config: 8 query heads, 4 key/value heads, MLP 256
    for shapes in checked_values(cpu_outcomes, "shards"):
        for tp_size in (4, 2):
            heads, kv_heads, mlp = 8 // tp_size, 4 // tp_size, 256 // tp_size
            assert shapes[tp_size] == {
                "q_proj": (heads * head_dim, hidden),
                "k_proj": (kv_heads * head_dim, hidden),
                "v_proj": (kv_heads * head_dim, hidden),
                "o_proj": (hidden, heads * head_dim),
                "gate_proj": (mlp, hidden),
                "up_proj": (mlp, hidden),
                "down_proj": (hidden, mlp),
                "config": (heads, kv_heads, head_dim, mlp),
            }


def test_a_missing_all_reduce_fails_the_comparison(cpu_outcomes) -> None:
    for rank, errors in enumerate(checked_values(cpu_outcomes, "missing_all_reduce")):
        assert len(_failures(errors)) == len(errors), f"rank {rank}: the broken model passed some step: {errors}"


def test_tp_size_must_divide_the_key_value_heads(cpu_outcomes) -> None:
    for message in checked_values(cpu_outcomes, "indivisible"):
        assert "num_key_value_heads=2 is not divisible by the tensor-parallel size 4" in message


# ---------------------------------------------------------------------------------------------- the script


REFUSALS = [
    (["--spawn", "0"], "--spawn must be >= 1 (got 0): 1, 2 or 4 processes"),
    (["--spawn", "3"], "--spawn 3: without --tp the TP size is the world size, and 3 does not divide"),
    (["--spawn", "-2"], "--spawn must be >= 1 (got -2)"),
    ([], "give --spawn N to start N local processes (1, 2 or 4), or start it under torchrun"),
    (["--spawn", "4", "--tp", "3"], "--tp 3 does not divide the model's 8 heads, 4 key/value heads"),
    (["--spawn", "3", "--tp", "2"], "--tp 2 does not divide the world size 3"),
    (["--spawn", "2", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--spawn", "2", "--seed", str(2**64 - 1)], "--seed must be in -9223372036854775808..18446744073709551614"),
    (["--spawn", "2", "--seed", str(-(2**63) - 1)], "--seed must be in -9223372036854775808.."),
    (["--spawn", "2", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--spawn", "2", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--spawn", "2", "--seq-len", "-3"], "--seq-len must be >= 1, got -3"),
    (["--spawn", "2", "--timeout", "0"], "--timeout must be positive and finite"),
    (["--spawn", "2", "--timeout", "nan"], "--timeout must be positive and finite"),
    (["--spawn", "2", "--timeout", "inf"], "--timeout must be positive and finite"),
    (["--spawn", "100000", "--tp", "1"], "--spawn 100000 would start 100000 processes on this host"),
    (["--spawn", "2", "--device", "junk"], "--device must be cpu or cuda[:N], got 'junk'"),
    (["--spawn", "2", "--device", "meta"], "--device must be cpu or cuda[:N], got 'meta'"),
    (["--spawn", "2", "--device", "cpu:3"], "--device must be cpu or cuda[:N], got 'cpu:3'"),
]
if not torch.cuda.is_available():
    REFUSALS += [
        (["--spawn", "2", "--mode", mode], f"--mode {mode} captures a CUDA graph and needs a CUDA GPU")
        for mode in ("cuda-graph", "fused-cuda-graph")
    ]


@pytest.mark.parametrize(("argv", "message"), REFUSALS, ids=[" ".join(a) or "no-spawn" for a, _ in REFUSALS])
def test_the_script_refuses_bad_requests_in_one_line(argv, message, capsys, monkeypatch) -> None:
    import torch.multiprocessing as mp

    from examples import llama_tp

    def no_spawn(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(mp, "start_processes", no_spawn)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as info:
        llama_tp.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama_tp.py: error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_the_spawned_ranks_are_bounded_by_the_timeout(monkeypatch) -> None:
    """Once one rank has ended, the others get --timeout seconds (as sagellm-comm bench's ranks); the launcher
    waited for them without a deadline."""
    from examples import llama_tp
    from sagellm_comm.benchmark import spawn

    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(spawn, "spawn_ranks", lambda *args, **kwargs: calls.append(kwargs) or True)
    assert llama_tp.main(["--spawn", "2", "--timeout", "7"]) == 0
    assert [call.get("timeout") for call in calls] == [7.0]


TORCHRUN_REFUSALS = [
    ({"RANK": "0", "WORLD_SIZE": "x"}, "RANK='0' / WORLD_SIZE='x' are not integers"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' / WORLD_SIZE='2' are not integers"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 is outside WORLD_SIZE=2"),
]


@pytest.mark.parametrize(("env", "message"), TORCHRUN_REFUSALS, ids=[str(env) for env, _ in TORCHRUN_REFUSALS])
def test_the_script_refuses_a_malformed_torchrun_environment_in_one_line(env, message, capsys, monkeypatch) -> None:
    from examples import llama_tp

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        llama_tp.main([])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama_tp.py: error: ") and message in lines[0], captured.err


def test_the_script_as_documented_spawns_two_processes() -> None:
    """``python examples/llama_tp.py --spawn 2``, the command README.md and docs/layers.md give."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "examples/llama_tp.py", "--spawn", "2"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Llama TP 2 of 2 ranks, backend gloo on cpu, float32, eager")
    assert [line.split()[2] for line in lines[1:]] == ["prefill", "decode1", "decode2"]
    assert all(line.endswith("ok") for line in lines[1:]), proc.stdout


# ---------------------------------------------------------------------------------------------- GPU


def _init_custom_on_one_gpu(rank: int, world_size: int, port: int):
    """The ``custom`` backend with every rank's tensors on ``cuda:0`` (N processes sharing one GPU).
    The one place these tests start a backend: an option that mode needs goes here."""
    import sagellm_comm

    torch.cuda.set_device(0)
    return sagellm_comm.init(
        backend="custom",
        rank=rank,
        world_size=world_size,
        master_port=port,
        device="cuda:0",
        timeout=120,
        engine="gloo",  # NCCL refuses two ranks on one GPU; the kernels need MPS (see test_processes_one_gpu.py)
    )


def _gpu_worker(rank: int, world_size: int, port: int, mode: str, dtype: str) -> tuple[dict, str | None, str]:
    import sagellm_comm
    from examples import llama_tp

    world = _init_custom_on_one_gpu(rank, world_size, port)
    try:
        errors = llama_tp.check_tp_llama(world, dtype=_dtype(dtype), mode=mode)
        selection = getattr(world.backend, "last_selection", None)  # the TP model's last all-reduce
        return errors, None if selection is None else selection.algo, str(world.backend.custom_reason)
    finally:
        sagellm_comm.destroy()


GPU_CASES = [("eager", "float32"), ("eager", "bfloat16"), ("compile", "bfloat16"), ("cuda-graph", "bfloat16")]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("SAGELLM_TEST_MPS") != "1", reason="N processes on one GPU need MPS started")
@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("mode,dtype", GPU_CASES, ids=[f"{m}-{d}" for m, d in GPU_CASES])
def test_logits_match_unsharded_model_custom_backend_on_one_gpu(tp_size: int, mode: str, dtype: str) -> None:
    from sagellm_comm.selector import KERNEL_ALGOS

    results = run_ranks(_gpu_worker, tp_size, mode, dtype, timeout=420.0)
    for rank, (errors, algo, reason) in enumerate(results):
        assert algo in KERNEL_ALGOS, f"rank {rank}: the last all-reduce ran {algo!r}, not the kernels ({reason})"
        assert set(errors) == {"prefill", "decode1", "decode2"}
        assert not _failures(errors), f"rank {rank} ({mode}, {dtype}): {_failures(errors)}"
