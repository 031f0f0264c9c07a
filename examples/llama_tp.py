"""A tensor-parallel ``transformers`` Llama on sagellm_comm's layers, checked against the unsharded model.

Every rank builds the same small Llama from a fixed seed (random weights, nothing downloaded), keeps one
copy as the reference, and shards a second copy over the tensor-parallel group:

* attention: ``q_proj``, ``k_proj``, ``v_proj`` become :class:`ColumnParallelLinear` (rank ``r`` keeps
  query heads ``r*H/tp .. (r+1)*H/tp - 1`` and key/value heads ``r*KV/tp .. (r+1)*KV/tp - 1``; with the
  heads split in contiguous blocks, every local query head's key/value head is local too), ``o_proj``
  becomes :class:`RowParallelLinear` (the all-reduce of the heads' partial sums);
* MLP: ``gate_proj`` and ``up_proj`` column-parallel, ``down_proj`` row-parallel;
* embeddings, norms and ``lm_head`` stay whole (replicated).

The attention module reshapes by ``head_dim`` with ``-1`` heads, so it runs on the local heads as is; the
rank's config is changed to ``num_attention_heads / tp`` and ``num_key_value_heads / tp`` so anything that
reads head counts from it (caches, attention back-ends) sees the rank's share.

Then a fixed batch runs through both models: a prefill, then two decode steps on a KV cache; the TP model
runs eagerly, under ``torch.compile`` or (GPU) with its decode step replayed from a CUDA graph (``--mode``).
The ``fused*`` modes compile it with :func:`sagellm_comm.compile.compile`, which rewrites each decoder layer's
two all-reduce + residual add + RMSNorm chains into the fused op (the last one feeds the final norm), and
print how many chains were rewritten.
The script prints the largest logit error of each step and exits 1 when one is outside the tolerance of
the dtype (:data:`TOLERANCES`; docs/layers.md says why these values).

Run::

    python examples/llama_tp.py --spawn 2                       # 2 local processes on Gloo (CPU); 1, 2 or 4
    torchrun --nproc-per-node 4 examples/llama_tp.py            # torchrun's rendezvous, TP 4
    torchrun --nproc-per-node 4 examples/llama_tp.py --tp 2     # TP 2 x 2 replicas (world.split(2))
    torchrun --nproc-per-node 2 examples/llama_tp.py --backend custom --dtype bfloat16 --mode cuda-graph
    python examples/llama_tp.py --spawn 2 --dtype bfloat16 --mode fused   # the automatic fusion on Gloo

Needs ``transformers`` (``pip install -e ".[examples]"``).  A request that cannot run (a ``--spawn`` or
``--tp`` that does not divide the model's heads, neither ``--spawn`` nor torchrun's environment, a backend
this machine cannot run, a CUDA-graph ``--mode`` without a CUDA GPU, a ``--batch-size`` or ``--seq-len`` below 1)
is refused in one line with exit status 2 before any process starts.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import sys
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import sagellm_comm
from sagellm_comm import ops
from sagellm_comm.cli_support import OneLineParser, check_positive, check_seed, check_timeout_option, run_reporting
from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.group import resolve_group
from sagellm_comm.layers import ColumnParallelLinear, RowParallelLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Tolerance:
    """The TP model's logits pass when ``|tp - ref| <= atol + rtol * |ref|`` elementwise, ``ref`` being the
    unsharded model of the same dtype on the same device."""

    rtol: float
    atol: float


#: fp32: the all-reduce changes the summation order only (not bit-exact: a few ulps of the logits).
#: bf16/fp16: each row-parallel layer rounds ``tp`` partial sums to the dtype before adding them, where the
#: unsharded matmul rounds its fp32 accumulator once; 4 ulps of a logit of magnitude 1 (bf16: 4 * 2**-8,
#: fp16: 4 * 2**-11).  docs/layers.md gives the measured errors behind these bounds.
TOLERANCES = {
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3),
}


def small_llama_config(**overrides) -> LlamaConfig:
    """A Llama small enough for CI: 2 layers, hidden 128, 8 query heads over 4 key/value heads (GQA),
    head_dim 16, MLP 256, vocabulary 256.  TP sizes 1, 2 and 4 divide every sharded dimension."""
    values = {
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "attn_implementation": "sdpa",
    }
    values.update(overrides)
    return LlamaConfig(**values)


def build_llama(
    config: LlamaConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """The model with random weights from ``seed``: made on the CPU in fp32 (the same numbers on every rank
    and every device), then cast and moved; in eval mode.  The model gets its own copy of ``config``
    (:func:`shard_llama` changes the model's)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(copy.deepcopy(config))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(device=device, dtype=dtype).eval()


def shard_llama(model: LlamaForCausalLM, group: sagellm_comm.CommGroup | str | None) -> LlamaForCausalLM:
    """Replace the attention and MLP projections of ``model`` (in place) by this rank's shards over
    ``group`` (a :class:`CommGroup`, a registered group name, or None for the default group); returns
    ``model``.  The model must already be on the group's device."""
    config = model.config
    tp_size = resolve_group(group).world_size
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, what) % tp_size:
            raise InvalidArgumentError(
                f"{what}={getattr(config, what)} is not divisible by the tensor-parallel size {tp_size}; "
                "pick a TP size that divides the model's head counts and MLP width"
            )
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), group=group))
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group=group, input_is_parallel=True)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, ColumnParallelLinear.from_linear(getattr(mlp, name), group=group))
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group=group, input_is_parallel=True)
        # transformers releases that keep head counts on the module (and not only in the config)
        for attr in ("num_heads", "num_key_value_heads"):
            if hasattr(attn, attr):
                setattr(attn, attr, getattr(attn, attr) // tp_size)
    # the head_dim stays explicit, so it is not re-derived from hidden_size / the local head count
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_attention_heads //= tp_size
    config.num_key_value_heads //= tp_size
    config.intermediate_size //= tp_size
    return model


def make_batch(
    config: LlamaConfig,
    *,
    batch_size: int = 2,
    seq_len: int = 8,
    decode_steps: int = 2,
    seed: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed prompt ``[batch_size, seq_len]`` and the tokens of ``decode_steps`` decode steps
    ``[batch_size, decode_steps]`` (int64)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + decode_steps), generator=generator)
    return tokens[:, :seq_len].to(device), tokens[:, seq_len:].to(device)


#: the name under which ``LlamaForCausalLM.forward`` takes the KV cache (``cache`` from transformers 5.2x,
#: ``past_key_values`` before; the old name is deprecated, not yet removed)
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def run_steps(model, prompt: torch.Tensor, next_tokens: torch.Tensor, cache=None) -> dict[str, torch.Tensor]:
    """Logits of the prompt (``"prefill"``: ``[batch, seq, vocab]``), then of one decode step per column of
    ``next_tokens`` (``"decode1"``, ...: ``[batch, 1, vocab]``), each reading the keys and values cached by
    the steps before it in ``cache`` (a new :class:`DynamicCache` when None).  ``model`` may be compiled."""
    cache = DynamicCache() if cache is None else cache
    steps = [("prefill", prompt)] + [(f"decode{i + 1}", next_tokens[:, i : i + 1]) for i in range(next_tokens.shape[1])]
    logits = {}
    for name, tokens in steps:
        logits[name] = model(input_ids=tokens, use_cache=True, **{CACHE_KWARG: cache}).logits.clone()
    return logits


@torch.no_grad()
def run_steps_cuda_graph(model, prompt: torch.Tensor, next_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """As :func:`run_steps`, but the decode step is captured once in a CUDA graph and replayed per column of
    ``next_tokens``.  The cache is a :class:`StaticCache`: its tensors and its position counter live on the
    device and are updated in place, so each replay appends one token and the next replay sees it."""
    max_cache_len = prompt.shape[1] + next_tokens.shape[1]
    # Warm-up on a throw-away cache, on a side stream: lazy initialisation, kernel compilation and the
    # collectives' first calls happen here, not under capture.
    # The decode steps read the token buffer the graph will read (same layout): a compiled model meets
    # under capture exactly the inputs it was compiled for.
    static_tokens = torch.zeros_like(next_tokens[:, :1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = StaticCache(config=model.config, max_cache_len=max_cache_len)
        model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: warm})
        for step in range(next_tokens.shape[1]):
            static_tokens.copy_(next_tokens[:, step : step + 1])
            model(input_ids=static_tokens, use_cache=True, **{CACHE_KWARG: warm})
    torch.cuda.current_stream().wait_stream(side)

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    logits = {"prefill": model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache}).logits}
    graph = torch.cuda.CUDAGraph()
    # A compiled model must not recompile under capture (the warm-up compiled every step): fail loudly if it would.
    with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph):
        # recorded, not run: the cache is untouched until the first replay
        static_logits = model(input_ids=static_tokens, use_cache=True, **{CACHE_KWARG: cache}).logits
    for step in range(next_tokens.shape[1]):
        static_tokens.copy_(next_tokens[:, step : step + 1])
        graph.replay()
        logits[f"decode{step + 1}"] = static_logits.clone()
    return logits


def logit_error(
    given: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reference_fp32: torch.Tensor | None = None
) -> dict:
    """The largest error of ``given`` (TP logits) against ``expected`` (the unsharded model's, same dtype) and
    whether it passes :data:`TOLERANCES` (``ok``); with ``reference_fp32``, also how far the unsharded
    low-precision model itself is from fp32 (``ref_vs_fp32``: the scale of error that dtype carries anyway)."""
    tol = TOLERANCES[dtype]
    given, expected = given.float(), expected.float()
    error = (given - expected).abs()
    result = {
        "max_error": float(error.max()),
        "scale": float(expected.abs().max()),
        "ok": bool((error <= tol.atol + tol.rtol * expected.abs()).all()),
    }
    if reference_fp32 is not None:
        result["ref_vs_fp32"] = float((expected - reference_fp32.float()).abs().max())
    return result


MODES = ("eager", "compile", "cuda-graph", "fused", "fused-cuda-graph")
#: the modes that compile with sagellm_comm.compile (the fusion pass)
FUSED_MODES = ("fused", "fused-cuda-graph")
#: the modes that need the group on a CUDA device (CUDA graphs)
CUDA_MODES = ("cuda-graph", "fused-cuda-graph")


def check_tp_llama(
    group: sagellm_comm.CommGroup,
    *,
    dtype: torch.dtype = torch.float32,
    mode: str = "eager",
    config: LlamaConfig | None = None,
    seed: int = 0,
    batch_size: int = 2,
    seq_len: int = 8,
    decode_steps: int = 2,
) -> dict[str, dict]:
    """Logits of the TP model over ``group`` against the unsharded model (same seed, the group's device,
    eager), step by step: ``{"prefill": logit_error(...), "decode1": ..., ...}``.

    ``mode``: ``eager``; ``compile`` (the TP model under ``torch.compile(fullgraph=True)``); ``cuda-graph``
    (the TP model's decode step captured in a CUDA graph and replayed, :func:`run_steps_cuda_graph`);
    ``fused`` (:func:`sagellm_comm.compile.compile` with ``fullgraph=True``: the all-reduce + residual + RMSNorm
    fusion); ``fused-cuda-graph`` (that compiled model, its decode step captured and replayed as in
    ``cuda-graph``).  :func:`sagellm_comm.compile.stats` says what the fused modes rewrote.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    device = group.device
    if mode in CUDA_MODES and device.type != "cuda":
        raise InvalidArgumentError(
            f"mode {mode!r} needs the group on a CUDA device, it is on {device}; use a GPU backend (custom, nccl)"
        )
    config = config or small_llama_config()
    reference = build_llama(config, seed=seed, dtype=dtype, device=device)
    tp_model = shard_llama(copy.deepcopy(reference), group)
    prompt, next_tokens = make_batch(
        config, batch_size=batch_size, seq_len=seq_len, decode_steps=decode_steps, seed=seed + 1, device=device
    )
    expected = run_steps(reference, prompt, next_tokens)
    if mode in FUSED_MODES:
        import sagellm_comm.compile as fusion

        tp_model = fusion.compile(tp_model, fullgraph=True)
    if mode in ("cuda-graph", "fused-cuda-graph"):
        given = run_steps_cuda_graph(tp_model, prompt, next_tokens)
    elif mode == "compile":
        given = run_steps(torch.compile(tp_model, fullgraph=True), prompt, next_tokens)
    else:
        given = run_steps(tp_model, prompt, next_tokens)
    exact = {}
    if dtype != torch.float32:
        exact = run_steps(build_llama(config, seed=seed, device=device), prompt, next_tokens)
    return {step: logit_error(given[step], expected[step], dtype, exact.get(step)) for step in expected}


# ============================================================================ script


def _run(rank: int | None, world_size: int | None, port: int | None, args: argparse.Namespace) -> bool:
    """One rank: join the world, check, print (rank 0 prints the table, every rank a failure)."""
    kwargs = {"device": args.device} if args.device else {}
    world = sagellm_comm.init(
        backend=args.backend, rank=rank, world_size=world_size, master_port=port, timeout=args.timeout, **kwargs
    )
    try:
        tp_size = args.tp or world.world_size
        group = world if tp_size == world.world_size else world.split(tp_size)
        ops.register_group(group, f"tp{tp_size}")
        dtype = DTYPES[args.dtype]
        errors = check_tp_llama(
            group, dtype=dtype, mode=args.mode, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len
        )
        tol = TOLERANCES[dtype]
        if world.rank == 0:
            print(
                f"Llama TP {tp_size} of {world.world_size} ranks, backend {world.backend.name} on {group.device}, "
                f"{args.dtype}, {args.mode}; tolerance rtol {tol.rtol:g} atol {tol.atol:g}"
            )
            if args.mode in FUSED_MODES:
                import sagellm_comm.compile as fusion

                done = fusion.stats()
                print(
                    f"fused chains {done.replaced} in {done.graphs} graphs ({done.cache_hits} from Inductor's cache); "
                    f"SUM all-reduces left unfused: {done.all_reduces_left}"
                )
        for step, result in errors.items():
            if world.rank == 0 or not result["ok"]:
                drift = ""
                if "ref_vs_fp32" in result:
                    drift = f"  (unsharded {args.dtype} vs fp32: {result['ref_vs_fp32']:.3e})"
                verdict = "ok" if result["ok"] else "MISMATCH"
                print(
                    f"rank {world.rank} {step:8s} max |tp - ref| {result['max_error']:.3e} "
                    f"(|ref| <= {result['scale']:.3g}){drift}  {verdict}",
                    flush=True,
                )
        return all(result["ok"] for result in errors.values())
    finally:
        sagellm_comm.destroy()


def _spawned(index: int, world_size: int, port: int, args: argparse.Namespace) -> bool:
    torch.set_num_threads(1)
    ok = _run(index, world_size, port, args)
    if index != 0 and not ok:
        sys.exit(1)  # rank 0's verdict is the result; another rank's mismatch ends the run as a failure
    return ok


def tp_sizes(config: LlamaConfig | None = None) -> list[int]:
    """The tensor-parallel sizes the model allows: those dividing its query heads, key/value heads and MLP."""
    config = config or small_llama_config()
    common = math.gcd(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return [size for size in range(1, common + 1) if common % size == 0]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="llama_tp.py",
        description="A small transformers Llama with sagellm_comm's TP layers, checked against the unsharded model.",
    )
    parser.add_argument("--spawn", type=int, metavar="N", help="start N local processes (else: torchrun's env)")
    parser.add_argument("--backend", default="gloo", help="gloo (default), custom, nccl or auto")
    parser.add_argument("--device", help="device of every rank's tensors (default: the backend's choice)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="(default float32)")
    parser.add_argument(
        "--mode", default="eager", choices=MODES, help="how the TP model runs (default eager; graph modes: a GPU)"
    )
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default: the world size)")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokens (default 0)")
    parser.add_argument("--batch-size", type=int, default=2, help="(default 2)")
    parser.add_argument("--seq-len", type=int, default=8, help="prompt tokens (default 8)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds for the rendezvous and collectives (default 120)"
    )
    return parser


def check_request(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line (exit 2), what cannot run, before any process starts."""
    allowed = tp_sizes()
    names = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
    config = small_llama_config()
    model = (
        f"the model's {config.num_attention_heads} heads, {config.num_key_value_heads} key/value heads and "
        f"MLP width {config.intermediate_size}"
    )
    from sagellm_comm.benchmark.plan import (
        MAX_SPAWN_RANKS_PER_CPU,
        available_kind,
        check_run_device,
        max_spawn_world_size,
        torchrun_env,
    )

    try:
        torchrun = torchrun_env()  # (RANK, WORLD_SIZE), refused where they are not integers
    except InvalidArgumentError as exc:
        parser.error(exc.message)
    if args.spawn is None and torchrun is None:
        parser.error(f"give --spawn N to start N local processes ({names}), or start it under torchrun")
    if args.spawn is not None and torchrun is not None:
        parser.error("--spawn starts its own processes; under torchrun leave it out")
    if args.spawn is not None and args.spawn < 1:
        parser.error(f"--spawn must be >= 1 (got {args.spawn}): {names} processes, or a multiple of --tp")
    if args.spawn is not None and args.spawn > max_spawn_world_size():
        parser.error(
            f"--spawn {args.spawn} would start {args.spawn} processes on this host, more than "
            f"{MAX_SPAWN_RANKS_PER_CPU} per CPU core ({max_spawn_world_size()} here); start larger runs under torchrun"
        )
    if torchrun is not None and not 0 <= torchrun[0] < torchrun[1]:
        parser.error(f"RANK={torchrun[0]} is outside WORLD_SIZE={torchrun[1]}")
    world_size = args.spawn if args.spawn is not None else torchrun[1]
    tp = args.tp if args.tp is not None else world_size
    if args.tp is not None and tp not in allowed:
        parser.error(f"--tp {tp} does not divide {model}: use --tp {names}")
    if tp not in allowed:
        where = f"--spawn {world_size}" if args.spawn is not None else f"WORLD_SIZE={world_size}"
        parser.error(
            f"{where}: without --tp the TP size is the world size, and {tp} does not divide {model}: "
            f"use {names} processes, or --tp T with a multiple of T processes"
        )
    if world_size % tp:
        parser.error(f"--tp {tp} does not divide the world size {world_size}: give a multiple of {tp} processes")
    check_seed(parser, args.seed, derived=1, uses="the tokens use seed + 1")
    check_positive(parser, args, "batch_size", "seq_len")
    check_timeout_option(parser, args.timeout)
    if args.mode in CUDA_MODES and not torch.cuda.is_available():
        parser.error(f"--mode {args.mode} captures a CUDA graph and needs a CUDA GPU; none is available here")
    if args.device is not None:
        try:
            check_run_device(args.device)
        except InvalidArgumentError as exc:
            parser.error(exc.message)
    try:
        available_kind(args.backend)
    except InvalidArgumentError as exc:
        parser.error(exc.message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_request(parser, args)

    def run() -> bool:
        if args.spawn is None:
            return _run(None, None, None, args)
        from sagellm_comm.benchmark.spawn import spawn_ranks

        return spawn_ranks(_spawned, (args,), args.spawn, what="Llama TP example", timeout=args.timeout)

    # a rank failed (CollectiveFailedError), a rendezvous timed out, ...: one line, exit 1; Ctrl-C: exit 130
    ok, status = run_reporting(parser, run, usage_errors=())
    if status is not None:
        return status
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
