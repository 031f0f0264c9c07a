"""``examples/llama_disaggregated.py``: a Llama's prefill in one process, its KV-cache blocks moved to another
with a transfer agent, and the decode steps there compared with decoding in the first.

CPU: the example itself in two processes over NIXL (loopback); under the Triton interpreter over the ipc path
(slow); the block layout helpers with a negative control (blocks of the wrong sequence give different logits);
every bad argument refused in one line.  GPU (``-m gpu``): two processes on one GPU, ``auto`` choosing ipc, and
NIXL over VRAM.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs transformers: pip install -e ".[examples]"'
)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "llama_disaggregated.py"


def _run(*args: str, env: dict | None = None, timeout: float = 600.0) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # NIXL may sit on the path
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _check_output(proc: subprocess.CompletedProcess, backend: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    steps = [line for line in proc.stdout.splitlines() if " max |decode - prefill| " in line]
    assert len(steps) == 6 and all(line.endswith("ok") for line in steps), out
    assert f"via {backend}" in proc.stdout and "decode read req-0's blocks" in proc.stdout


def test_prefill_and_decode_in_two_processes_over_nixl_give_the_same_logits():
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    proc = _run("--spawn", "2")
    _check_output(proc, "nixl")
    assert "decode: logits must be bit-exact (prefill on the same kind of device)" in proc.stdout
    steps = [line for line in proc.stdout.splitlines() if " max |decode - prefill| " in line]
    assert all(line.endswith("(bit-exact) ok") for line in steps), proc.stdout


@pytest.mark.slow
def test_prefill_and_decode_over_the_ipc_path_under_the_interpreter():
    proc = _run("--spawn", "2", "--backend", "ipc", env={"TRITON_INTERPRET": "1"})
    _check_output(proc, "ipc")


def _prefilled():
    """A small Llama after the prefill of two 7-token prompts: ``(config, model, next_tokens, cache)``."""
    from examples import llama_disaggregated as ex
    from examples import llama_tp

    config = llama_tp.small_llama_config()
    model = llama_tp.build_llama(config)
    prompt, next_tokens = llama_tp.make_batch(config, batch_size=2, seq_len=7, decode_steps=2, seed=5)
    cache = ex.DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{llama_tp.CACHE_KWARG: cache})
    return config, model, next_tokens, cache


def test_blocks_round_trip_and_the_wrong_blocks_give_different_logits():
    from examples import llama_disaggregated as ex
    from examples import llama_tp

    config, model, next_tokens, cache = _prefilled()
    pool = torch.zeros(16, *ex.block_shape(config, 3))
    ids = [[9, 2, 14], [0, 7, 5]]  # 3 blocks of 3 tokens per sequence, the last one partial
    ex.store_blocks(cache, pool, ids, 3)
    rebuilt = ex.load_cache(pool, ids, 7)
    for layer, entry in enumerate(cache.layers):
        assert torch.equal(rebuilt.layers[layer].keys, entry.keys)
        assert torch.equal(rebuilt.layers[layer].values, entry.values)
    with torch.no_grad():
        expected = ex._decode_steps(model, next_tokens, cache)
        swapped = ex._decode_steps(model, next_tokens, ex.load_cache(pool, ids[::-1], 7))
    for step in expected:
        assert not llama_tp.logit_error(swapped[step], expected[step], torch.float32)["ok"]


def test_kv_wrong_in_its_lowest_mantissa_bits_fails_the_bit_exact_check():
    """The tolerance of differing kernels would let KV corrupted in its low bits pass; the check made when both
    sides run the same device and torch does not."""
    from examples import llama_disaggregated as ex

    config, model, next_tokens, cache = _prefilled()
    with torch.no_grad():
        expected = ex._decode_steps(model, next_tokens, cache)
    ids = [[9, 2, 14], [0, 7, 5]]
    pool = torch.zeros(16, *ex.block_shape(config, 3))
    ex.store_blocks(cache, pool, ids, 3)
    with torch.no_grad():
        intact = ex._decode_steps(model, next_tokens, ex.load_cache(pool, ids, 7))
        pool.view(torch.int32).bitwise_xor_(255)  # the 8 lowest mantissa bits of every float32, as a bad copy might
        corrupted = ex._decode_steps(model, next_tokens, ex.load_cache(pool, ids, 7))
    for step in expected:
        assert ex.logits_match(intact[step], expected[step], torch.float32, exact=True)
        assert not ex.logits_match(corrupted[step], expected[step], torch.float32, exact=True)
        assert ex.logits_match(corrupted[step], expected[step], torch.float32, exact=False)  # what tolerance misses


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "either --spawn 2 or --role"),
        (["--spawn", "3"], "--spawn must be 2"),
        (["--spawn", "2", "--role", "decode"], "either --spawn 2 or --role"),
        (["--role", "decode"], "--role needs --store"),
        (["--role", "decode", "--store", "nowhere"], "HOST:PORT"),
        (["--spawn", "2", "--block-tokens", "0"], "--block-tokens must be >= 1"),
        (["--spawn", "2", "--seq-len", "300"], "pool's 64 blocks"),
        (["--spawn", "2", "--device", "tpu"], "cpu or cuda"),
        (["--spawn", "2", "--backend", "carrier-pigeon"], "unknown transfer backend"),
        (["--spawn", "2", "--timeout", "0"], "--timeout must be positive"),
        (["--spawn", "2", "--timeout", "inf"], "--timeout must be positive and finite"),  # an OverflowError later
        (["--spawn", "2", "--dtype", "int8"], "invalid choice"),
        (["--spawn", "2", "--store", "127.0.0.1:5"], "--store is for --role"),
        (["--spawn", "2", "--device", "cpu:1"], "cpu or cuda"),
        (["--role", "decode", "--store", "127.0.0.1:70000"], "--store's port must be in 1..65535, got 70000"),
        (["--role", "prefill", "--store", "127.0.0.1:0"], "--store's port must be in 1..65535, got 0"),
        (["--spawn", "2", "--seed", str(2**64 - 2)], "--seed must be in -9223372036854775808..18446744073709551613"),
        (["--spawn", "2", "--seed", str(-(2**63) - 1)], "--seed must be in -9223372036854775808.."),
    ],
)
def test_bad_arguments_are_refused_in_one_line_with_exit_2(args, words, capsys):
    from examples import llama_disaggregated as ex

    with pytest.raises(SystemExit) as info:
        ex.main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and words in err, err


def test_the_spawned_processes_are_bounded_by_the_timeout(monkeypatch):
    """Once one process has ended, the other gets --timeout seconds (as sagellm-comm bench's ranks); the launcher
    waited for it without a deadline."""
    from examples import llama_disaggregated as ex

    calls = []
    monkeypatch.setattr(ex, "spawn_ranks", lambda *args, **kwargs: calls.append(kwargs) or True)
    assert ex.main(["--spawn", "2", "--timeout", "7"]) == 0
    assert [call.get("timeout") for call in calls] == [7.0]


def _hosted_store():
    """A store this process hosts on a port the system picks, and the environment that makes both sides join it
    as clients (no port is picked and released)."""
    from sagellm_comm.backends.torch_distributed.rendezvous import client_env, host_store

    store = host_store(timeout=120.0)
    return store, f"127.0.0.1:{store.port}", client_env("127.0.0.1", store.port)


def _one_line_failure(proc: subprocess.CompletedProcess, words: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[W")]  # torch's C++ warnings
    assert proc.returncode == 1 and lines == [lines[-1]] and words in lines[-1], proc.stdout + proc.stderr


def test_a_side_whose_peer_never_comes_fails_in_one_line_at_its_timeout():
    store, address, env = _hosted_store()
    proc = _run("--role", "decode", "--store", address, "--timeout", "1", env=env, timeout=120)
    _one_line_failure(proc, "[comm_timeout] the other side did not set 'settings/prefill' within 1 s")


def test_sides_run_with_different_settings_both_refuse_before_a_block_moves():
    store, address, env = _hosted_store()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    decode = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--role", "decode", "--store", address, "--timeout", "60", "--seed", "1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": path, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        prefill = _run("--role", "prefill", "--store", address, "--timeout", "60", "--block-tokens", "5", env=env,
                       timeout=120)  # fmt: skip
        out, err = decode.communicate(timeout=120)
    finally:
        decode.kill()
    _one_line_failure(prefill, "--seed 0 here, 1 on decode; --block-tokens 5 here, 4 on decode")
    _one_line_failure(subprocess.CompletedProcess(decode.args, decode.returncode, out, err),
                      "--seed 1 here, 0 on prefill; --block-tokens 4 here, 5 on prefill")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_on_one_gpu_pick_ipc_and_match(dtype):
    proc = _run("--spawn", "2", "--device", "cuda", "--dtype", dtype)
    _check_output(proc, "ipc")
    assert "CUDA IPC" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_two_processes_on_one_gpu_over_nixl_vram():
    pytest.importorskip("nixl_cu13", reason="needs NIXL")
    proc = _run("--spawn", "2", "--device", "cuda", "--backend", "nixl")
    _check_output(proc, "nixl")
