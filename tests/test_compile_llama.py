"""The automatic fusion on the ``transformers`` Llama of ``examples/llama_tp.py``, sharded over the TP layers.

``sagellm_comm.compile.compile`` (the ``fused*`` modes of the example) must rewrite two chains per decoder
layer in every compiled graph (the attention output's all-reduce + residual + post-attention norm; the MLP
output's all-reduce + residual + the next layer's input norm, or the final model norm after the last layer),
leave no SUM all-reduce unfused, and give logits equal to the unsharded, uncompiled model within the dtype's
tolerance (``llama_tp.TOLERANCES``), prefill and decode steps on a KV cache.

CPU: 2 Gloo processes, TP 2 (the fused op's engine fallback: Gloo all-reduce, then torch ops), a prefill and one
decode step, bf16; fp32 is ``slow`` (Inductor compiles C++ for each graph: 1-2 minutes per configuration on
2 cores).

GPU (``-m gpu``, N processes on ``cuda:0`` under MPS, the ``custom`` backend): TP 2 and 4, bf16, the compiled
model's decode step captured in a CUDA graph and replayed (``fused-cuda-graph``).  The fused kernels must have
run (``sagellm_comm.fused.last_selection``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

from tests.conftest import HAS_CUDA, checked_values, no_compile_caches, run_checks, run_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs transformers: pip install -e ".[examples]"'
)

LAYERS = 2  # examples/llama_tp.small_llama_config
FUSIONS_PER_GRAPH = 2 * LAYERS


def _check(group, mode: str, dtype: str, decode_steps: int) -> dict:
    """One configuration on ``group``: the example's logit errors, the fusion stats, what the fused op ran and
    how many times Inductor skipped its CUDA graphs."""
    from torch._dynamo.utils import counters

    import sagellm_comm.compile as fusion
    from examples import llama_tp
    from sagellm_comm.fused import last_selection

    fusion.reset_stats()
    skips_before = counters["inductor"]["cudagraph_skips"]
    with no_compile_caches():
        errors = llama_tp.check_tp_llama(group, dtype=getattr(torch, dtype), mode=mode, decode_steps=decode_steps)
    selection = last_selection(group)
    return {
        "errors": errors,
        "stats": fusion.stats(),
        "algo": None if selection is None else selection.algo,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
    }


def _worker(rank: int, world_size: int, port: int, cases: list[tuple[str, str, int]], gpu: bool) -> dict:
    import sagellm_comm

    if gpu:
        from tests.test_llama_tp import _init_custom_on_one_gpu

        world = _init_custom_on_one_gpu(rank, world_size, port)
    else:
        world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=120)
    try:
        return run_checks({case: functools.partial(_check, world, *case) for case in cases})
    finally:
        sagellm_comm.destroy()


def _assert_fused_and_right(result: dict, rank: int, decode_steps: int) -> None:
    stats, errors = result["stats"], result["errors"]
    assert stats.graphs >= 2, f"rank {rank}: a prefill and a decode graph expected, {stats}"  # cache empty, then not
    assert stats.replaced == {"rmsnorm": FUSIONS_PER_GRAPH * stats.graphs}, f"rank {rank}: {stats}"
    assert stats.all_reduces_left == 0 and stats.cache_hits == 0, f"rank {rank}: {stats}"
    assert set(errors) == {"prefill"} | {f"decode{i + 1}" for i in range(decode_steps)}
    failures = {step: e for step, e in errors.items() if not e["ok"]}
    assert not failures, f"rank {rank}: {failures}"


# ---------------------------------------------------------------------------------------------- CPU

CPU_CASES = [("fused", "bfloat16", 1), pytest.param(("fused", "float32", 1), marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}-decode{c[2]}")
def test_fused_llama_on_gloo_tp2(case) -> None:
    outcomes = run_ranks(_worker, 2, [case], False, timeout=540.0)
    for rank, result in enumerate(checked_values(outcomes, case)):
        _assert_fused_and_right(result, rank, case[2])
        assert result["algo"] == "unfused"  # Gloo: the engine's all-reduce, then torch ops


# ---------------------------------------------------------------------------------------------- GPU

GPU_CASES = [(2, "fused-cuda-graph", "bfloat16", 2), (4, "fused-cuda-graph", "bfloat16", 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("SAGELLM_TEST_MPS") != "1", reason="N processes on one GPU need MPS started")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"tp{c[0]}-{c[1]}")
def test_fused_llama_custom_backend_on_one_gpu(case) -> None:
    from sagellm_comm.selector import KERNEL_ALGOS

    tp_size, config = case[0], case[1:]
    outcomes = run_ranks(_worker, tp_size, [config], True, timeout=540.0)
    for rank, result in enumerate(checked_values(outcomes, config)):
        _assert_fused_and_right(result, rank, config[2])
        assert result["algo"] in KERNEL_ALGOS, f"rank {rank} {case}: the fused op ran {result['algo']!r}"
        assert result["cudagraph_skips"] == 0, f"rank {rank} {case}: Inductor skipped its CUDA graphs"
