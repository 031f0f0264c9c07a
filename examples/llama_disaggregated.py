"""Prefill/decode disaggregation of a ``transformers`` Llama: the KV cache moves between processes as blocks.

Process *prefill* runs the prompt through the model (the small random-weight Llama of ``examples/llama_tp.py``),
copies every layer's keys and values into its paged KV pool (blocks of ``--block-tokens`` tokens, at scattered
block ids from its own allocator) and, as a reference, keeps decoding on its own cache.  Process *decode* has its
own pool and allocator; it receives the request's blocks with a :class:`~sagellm_comm.transfer.TransferAgent`,
rebuilds the cache from its pool and runs the same decode steps.  Its logits must equal the prefill side's bit for
bit when both sides run the same torch on the same kind of device (always so under ``--spawn``): they are computed
from the same bytes, so a single flipped bit of KV fails the check.  Two sides on different devices or torch
versions (``--role`` on two hosts) may pick different kernels; there the dtype's tolerance of
``examples/llama_tp.py`` applies, and decode says which check it made.

Two requests show both directions, each with a notification the other side sees only after every byte:

* ``req-0``, pull: decode reads the blocks (``PreparedBlocks.read`` by block ids, as vLLM's NIXL connector
  does) and notifies prefill, which may then free them;
* ``req-1``, push: decode tells prefill where to put the blocks, prefill writes them (listed byte blocks) with
  a notification, decode waits for it (as Mooncake's transfer engine does).

Pool layout: ``[num_blocks, layers, 2 (key, value), kv_heads, block_tokens, head_dim]`` of the model's dtype; one
block holds ``block_tokens`` tokens of one sequence for every layer.  Metadata, block ids and the reference logits
go through a ``TCPStore`` (the engine's control plane in a real deployment).

Run::

    python examples/llama_disaggregated.py --spawn 2                      # CPU: two processes, NIXL (auto)
    python examples/llama_disaggregated.py --spawn 2 --device cuda        # two processes on one GPU: ipc (auto)
    python examples/llama_disaggregated.py --role decode  --store HOST:PORT --device cuda:0   # two commands,
    python examples/llama_disaggregated.py --role prefill --store HOST:PORT --device cuda:1   # e.g. two hosts

With ``--role``, the two sides first compare their model and request settings (``--seed``, ``--dtype``,
``--block-tokens``, ``--batch-size``, ``--seq-len``, ``--decode-steps``) and both refuse in one line when they
differ; a side whose peer does not come fails in one line at ``--timeout``.

Needs ``transformers`` (``pip install -e ".[examples]"``) and, for NIXL, ``pip install -e ".[transfer]"``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import timedelta

import numpy as np
import torch

try:
    from examples import llama_tp  # imported from the repository root (tests)
except ImportError:  # run as a script: examples/ is on sys.path
    import llama_tp

from transformers import DynamicCache

from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.cli_support import OneLineParser, check_positive, check_seed, check_timeout_option, run_reporting
from sagellm_comm.errors import CommError, CommTimeoutError, InvalidArgumentError

ROLES = ("decode", "prefill")  # decode (index 0) reports, and hosts the store under --role
POOL_BLOCKS = 64


def block_shape(config, block_tokens: int) -> tuple[int, ...]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, 2, config.num_key_value_heads, block_tokens, head_dim)


def blocks_per_sequence(seq_len: int, block_tokens: int) -> int:
    return -(-seq_len // block_tokens)


def store_blocks(cache: DynamicCache, pool: torch.Tensor, ids: list[list[int]], block_tokens: int) -> None:
    """Copy every layer's keys and values of sequence ``b`` into pool blocks ``ids[b]`` (token-major blocks)."""
    for layer, entry in enumerate(cache.layers):
        for kind, states in enumerate((entry.keys, entry.values)):  # [batch, kv_heads, seq, head_dim]
            for b, seq_ids in enumerate(ids):
                for i, block in enumerate(seq_ids):
                    chunk = states[b, :, i * block_tokens : (i + 1) * block_tokens]
                    pool[block, layer, kind, :, : chunk.shape[1]].copy_(chunk)


def load_cache(pool: torch.Tensor, ids: list[list[int]], seq_len: int) -> DynamicCache:
    """A cache of ``seq_len`` tokens per sequence, read back from pool blocks ``ids[b]``."""
    cache = DynamicCache()
    layers = pool.shape[1]
    for layer in range(layers):
        per_kind = []
        for kind in (0, 1):
            seqs = [torch.cat([pool[block, layer, kind] for block in seq_ids], dim=1)[:, :seq_len] for seq_ids in ids]
            per_kind.append(torch.stack(seqs).contiguous())
        cache.update(per_kind[0], per_kind[1], layer)
    return cache


def _to_bytes(tensors: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data))


def device_kind(device: torch.device) -> str:
    """What besides the inputs decides the logits' bits: the device's model and torch's version."""
    from sagellm_comm.benchmark.results import device_name

    return f"{device_name(device)}, torch {torch.__version__}"


def logits_match(given: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, exact: bool) -> bool:
    """Decode's check of one step's logits: bit for bit when ``exact`` (both sides on the same kind of device and
    torch), else within the dtype's tolerance (``llama_tp.TOLERANCES``)."""
    return torch.equal(given, expected) if exact else llama_tp.logit_error(given, expected, dtype)["ok"]


def _decode_steps(model, tokens: torch.Tensor, cache) -> dict[str, torch.Tensor]:
    logits = {}
    kwarg = llama_tp.CACHE_KWARG
    for step in range(tokens.shape[1]):
        out = model(input_ids=tokens[:, step : step + 1], use_cache=True, **{kwarg: cache})
        logits[f"decode{step + 1}"] = out.logits
    return logits


def _wait_note(agent, message: bytes, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sender, note in agent.notifications():
            if note == message:
                return sender
        time.sleep(1e-4)
    raise CommTimeoutError(f"no notification {message!r} from the other side within {timeout:g} s")


def _get(store, key: str, timeout: float) -> bytes:
    """``store.get(key)``; the other side not setting it within ``timeout`` (the store's own deadline) is a
    ``CommTimeoutError`` naming the key."""
    try:
        return store.get(key)
    except torch.distributed.DistStoreError:
        raise CommTimeoutError(f"the other side did not set {key!r} within {timeout:g} s (is it running?)") from None


SETTINGS = ("seed", "dtype", "block_tokens", "batch_size", "seq_len", "decode_steps")  # both sides must agree


def _agree(role: str, store, args: argparse.Namespace) -> None:
    """Publish this side's settings and compare the other side's: different ones (another seed builds other
    weights) raise ``InvalidArgumentError`` naming them on both sides, before any block moves."""
    other = "prefill" if role == "decode" else "decode"
    mine = {name: getattr(args, name) for name in SETTINGS}
    store.set(f"settings/{role}", json.dumps(mine))
    theirs = json.loads(_get(store, f"settings/{other}", args.timeout))
    differ = [f"--{k.replace('_', '-')} {mine[k]} here, {theirs.get(k)} on {other}" for k in SETTINGS
              if theirs.get(k) != mine[k]]  # fmt: skip
    if differ:
        raise InvalidArgumentError(f"{role} and {other} must run with the same settings: {'; '.join(differ)}")


@torch.no_grad()
def run_role(role: str, store, args: argparse.Namespace) -> bool:
    """One side; the decode side returns whether every step matched."""
    from sagellm_comm.transfer import TransferAgent

    _agree(role, store, args)
    device = torch.device(args.device)
    dtype = llama_tp.DTYPES[args.dtype]
    config = llama_tp.small_llama_config()
    model = llama_tp.build_llama(config, seed=args.seed, dtype=dtype, device=device)
    shape = block_shape(config, args.block_tokens)
    agent = TransferAgent(role, args.backend, device=device if device.type == "cuda" else None, timeout=args.timeout)
    pool = agent.allocate("kv", (POOL_BLOCKS, *shape), dtype, device)
    block_bytes = pool[0].numel() * pool.element_size()
    store.set(f"meta/{role}", agent.metadata())
    peer = agent.add_peer(_get(store, f"meta/{'prefill' if role == 'decode' else 'decode'}", args.timeout))
    per_seq = blocks_per_sequence(args.seq_len, args.block_tokens)
    free = np.random.default_rng(11 if role == "prefill" else 23).permutation(POOL_BLOCKS).tolist()  # scattered

    def allocate() -> list[list[int]]:
        return [[free.pop() for _ in range(per_seq)] for _ in range(args.batch_size)]

    ok = True
    try:
        if role == "prefill":
            store.set("prefill/device", device_kind(device))
            for request, seed in (("req-0", args.seed + 1), ("req-1", args.seed + 2)):
                prompt, next_tokens = llama_tp.make_batch(
                    config, batch_size=args.batch_size, seq_len=args.seq_len, decode_steps=args.decode_steps,
                    seed=seed, device=device,
                )  # fmt: skip
                cache = DynamicCache()
                model(input_ids=prompt, use_cache=True, **{llama_tp.CACHE_KWARG: cache})
                ids = allocate()
                store_blocks(cache, pool, ids, args.block_tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                reference = _decode_steps(model, next_tokens, cache)  # decoding here: the reference
                store.set(f"{request}/prefill", json.dumps({"ids": ids}))
                store.set(f"{request}/reference", _to_bytes({"next_tokens": next_tokens, **reference}))
                if request == "req-0":  # pulled by decode, which tells us when our blocks are free again
                    sender = _wait_note(agent, b"req-0:read", args.timeout)
                    print(f"prefill: {sender} read req-0's blocks; they may be reused", flush=True)
                else:  # pushed to the blocks decode allocated
                    target = json.loads(_get(store, "req-1/decode", args.timeout))["ids"]
                    blocks = [(a * block_bytes, b * block_bytes, block_bytes)
                              for a_seq, b_seq in zip(ids, target, strict=True)
                              for a, b in zip(a_seq, b_seq, strict=True)]  # fmt: skip
                    agent.write(peer, "kv", "kv", blocks, notify=b"req-1").wait()
                free.extend(b for seq in ids for b in seq)
            try:
                store.wait(["done"], timedelta(seconds=args.timeout))
            except torch.distributed.DistStoreError:
                raise CommTimeoutError(f"decode did not finish within {args.timeout:g} s") from None
            return True
        prepared = agent.prepare(peer, "kv", "kv", block_bytes)
        tolerance = llama_tp.TOLERANCES[dtype]
        theirs, mine = _get(store, "prefill/device", args.timeout).decode(), device_kind(device)
        exact = theirs == mine  # the same kernels on the same bytes: nothing but bit-exact logits passes
        print(f"decode: peer {peer!r} via {agent.peer_backend(peer)} ({agent.backend_reason(peer)}); "
              f"{args.batch_size} sequences x {args.seq_len} tokens = {args.batch_size * per_seq} blocks of "
              f"{block_bytes} B per request; {args.dtype} on {device}", flush=True)  # fmt: skip
        check = (
            "bit-exact (prefill on the same kind of device)"
            if exact
            else f"within rtol {tolerance.rtol:g}, atol {tolerance.atol:g} (prefill on {theirs}, decode on {mine})"
        )
        print(f"decode: logits must be {check}", flush=True)
        for request in ("req-0", "req-1"):
            ids = allocate()
            if request == "req-0":
                source = json.loads(_get(store, "req-0/prefill", args.timeout))["ids"]
                local = [b for seq in ids for b in seq]
                remote = [a for seq in source for a in seq]
                prepared.read(local, remote, notify=b"req-0:read").wait()
                how = "pulled (prepared read)"
            else:
                store.set("req-1/decode", json.dumps({"ids": ids}))
                _wait_note(agent, b"req-1", args.timeout)
                how = "pushed (write + notification)"
            reference = _from_bytes(_get(store, f"{request}/reference", args.timeout))
            cache = load_cache(pool, ids, args.seq_len)
            given = _decode_steps(model, reference.pop("next_tokens").to(device), cache)
            for step, logits in given.items():
                expected = reference[step].to(device)
                error = llama_tp.logit_error(logits, expected, dtype)
                equal = torch.equal(logits, expected)
                passed = logits_match(logits, expected, dtype, exact)
                ok &= passed
                verdict = "ok" if passed else "MISMATCH"
                print(f"decode: {request} {how}: {step} max |decode - prefill| {error['max_error']:.3e} "
                      f"({'bit-exact' if equal else 'not bit-exact'}) {verdict}", flush=True)  # fmt: skip
            free.extend(b for seq in ids for b in seq)
        print(f"decode: transport {agent.peer_transport(peer)}", flush=True)
        store.set("done", b"1")
        return ok
    finally:
        agent.close()


def _store(role: str, host: str, port: int, timeout: float):
    """The store both sides meet on: under ``--spawn`` the one ``spawn_ranks`` hosts (both sides are clients);
    with ``--role``, decode hosts it at ``--store`` and prefill joins (each wait bounded by ``timeout``)."""
    from sagellm_comm.backends.torch_distributed.rendezvous import create_store

    return create_store(ROLES.index(role), len(ROLES), (host, port), timeout)


def _spawned(index: int, world_size: int, port: int, args: argparse.Namespace) -> bool:
    role = ROLES[index]
    ok = run_role(role, _store(role, MASTER_ADDR, port, args.timeout), args)
    return ok if index == 0 else True


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="llama_disaggregated.py", description="Prefill in one process, decode in another: "
                           "KV-cache blocks moved with sagellm_comm.transfer, logits compared.")  # fmt: skip
    parser.add_argument("--spawn", type=int, metavar="2", help="start the prefill and the decode process here")
    parser.add_argument("--role", choices=ROLES, help="run one side (with --store; decode hosts the store)")
    parser.add_argument("--store", metavar="HOST:PORT", help="the TCPStore both sides meet on (with --role)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; both processes use it")
    parser.add_argument("--backend", default="auto", help="transfer backend: auto (default), ipc or nixl")
    parser.add_argument("--dtype", default="float32", choices=sorted(llama_tp.DTYPES), help="(default float32)")
    parser.add_argument("--block-tokens", type=int, default=4, help="tokens per KV block (default 4)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per request (default 2)")
    parser.add_argument("--seq-len", type=int, default=10, help="prompt tokens (default 10: a partial last block)")
    parser.add_argument("--decode-steps", type=int, default=3, help="decode steps compared (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for every wait (default 120)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad request in one line (exit 2) before any process starts."""
    from sagellm_comm.benchmark.plan import check_run_device
    from sagellm_comm.transfer.registry import resolve

    if (args.spawn is None) == (args.role is None):
        parser.error("give either --spawn 2 or --role (with --store)")
    if args.spawn is not None and args.spawn != 2:
        parser.error(f"--spawn must be 2 (a prefill and a decode process), got {args.spawn}")
    if args.role is not None and not args.store:
        parser.error("--role needs --store HOST:PORT")
    if args.spawn is not None and args.store:
        parser.error("--store is for --role (under --spawn the processes meet on a store of their own)")
    if args.store:
        host, _, port = args.store.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--store must be HOST:PORT, got {args.store!r}")
        if not 1 <= int(port) <= 65535:  # 0 would host the store on a port the other side cannot know
            parser.error(f"--store's port must be in 1..65535, got {int(port)}")
    check_seed(parser, args.seed, derived=2, uses="the prompts use seed + 2")
    check_positive(parser, args, "block_tokens", "batch_size", "seq_len", "decode_steps")
    if args.batch_size * blocks_per_sequence(args.seq_len, args.block_tokens) * 2 > POOL_BLOCKS:
        parser.error(f"two requests of {args.batch_size} sequences x {args.seq_len} tokens need more than the pool's "
                     f"{POOL_BLOCKS} blocks: raise --block-tokens or lower --batch-size / --seq-len")  # fmt: skip
    check_timeout_option(parser, args.timeout)
    try:
        check_run_device(args.device)
    except InvalidArgumentError as exc:
        parser.error(exc.message)
    try:
        resolve(args.backend)
    except CommError as exc:
        parser.error(f"--backend {args.backend}: {exc.message}")


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every decode step matched, 1 a mismatch or a failed run, 2 a refused request, 130
    interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    def run() -> bool:
        if args.role is None:
            return spawn_ranks(_spawned, (args,), 2, what="disaggregated Llama", timeout=args.timeout)
        host, _, port = args.store.rpartition(":")
        return run_role(args.role, _store(args.role, host, int(port), args.timeout), args)

    ok, status = run_reporting(parser, run, usage_errors=())  # a failed run: one line, exit 1; Ctrl-C: 130
    if status is not None:
        return status
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
