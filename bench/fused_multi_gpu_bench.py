"""Fused TP operations on real GPUs, one process per GPU (the ``custom`` backend over CUDA IPC).

GEMM + all-reduce (row-parallel linear, a: [M, K_shard], b: [K_shard, N], K_shard = 14336 / W), bf16:

* ``gemm_us``: cuBLAS GEMM alone; ``ar_us``: our all-reduce of the [M, N] output alone (policy's algo);
  ``nccl_ar_us``: NCCL's all-reduce of it;
* ``seq_us``: cuBLAS GEMM then our all-reduce (``gemm_all_reduce(path="sequential")``);
  ``seq_nccl_us``: cuBLAS GEMM then NCCL (what a plain TP layer runs);
* ``chunked_us``, ``copy_engine_us``, ``fused_us``: the overlapped paths; ``auto_us``: what the policy runs;
  ``copy_engine_zc_us``: the copy-engine path with ``zero_copy=True`` (result left in the workspace);
  ``ce<C>_us``: the copy-engine path with ``C`` row chunks (``--ce-chunks``; ``copy_engine_us``: the default
  count, ``ce_chunks``);
* ``ratio`` = best overlapped path / max(gemm_us, ar_us) (target <= 1.15 at large M); ``auto_ratio`` =
  ``auto_us`` / max(gemm_us, ar_us): the default call's.

AR + residual + RMSNorm, [tokens, hidden]: ``fused_us`` (one kernel) vs ``unfused_us`` (our all-reduce,
torch add, ``torch.nn.functional.rms_norm``) and ``unfused_nccl_us`` (NCCL instead of ours).

Every figure is the median over ``--reps`` replays of a CUDA graph holding ``calls`` calls, divided by
``calls`` (:func:`sagellm_comm.benchmark.timing.time_graph`, ranks aligned by a barrier before each
batch), of the slowest rank: ``calls`` is ``--calls``, capped so that one graph holds at most
``--graph-gflop`` GFLOP of GEMM (default 400: one call per graph from 8192 x 4096 up, so a collective's
first barrier also absorbs the ranks' replay skew; a larger cap measures back-to-back calls, as consecutive
layers run).  Needs 2+ CUDA GPUs (one process each).  Writes ``<out>.json`` (``bench/make_docs_tables.py``
makes ``<out>.md`` and the docs' tables)::

    python -m bench.fused_multi_gpu_bench --out bench/results/2xh100/fused
"""

from __future__ import annotations

import argparse
import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sagellm_comm.benchmark.plan import cuda_available
from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.benchmark.timing import summarize, time_graph


def graph_us(fn, calls: int, reps: int, barrier) -> float:
    """Median device time of one ``fn()`` on this rank under graph replay; ``barrier`` aligns the ranks."""
    device = torch.device("cuda", torch.cuda.current_device())
    return summarize(time_graph(fn, device=device, calls=calls, iters=reps, barrier=barrier)).median_us


def _timed(row: dict, key: str, fn, calls: int, reps: int, barrier) -> None:
    try:
        row[key] = graph_us(fn, calls, reps, barrier)
    except Exception as exc:  # a path the shape does not fit: recorded, the others still run
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()


def bench_gemm(backend, m: int, n: int, calls: int, reps: int, barrier, ce_chunks=(), graph_gflop=400.0) -> dict:
    from sagellm_comm.fused import gemm_all_reduce, group_gemm, last_selection

    w = backend.world_size
    k = 14336 // w
    g = torch.Generator(device=backend.device).manual_seed(backend.rank)
    a = torch.randn(m, k, device=backend.device, generator=g).to(torch.bfloat16)
    b = (torch.randn(k, n, device=backend.device, generator=g) / k**0.5).to(torch.bfloat16)
    prod = torch.empty(m, n, device=backend.device, dtype=torch.bfloat16)
    calls = max(1, min(calls, int(graph_gflop * 1e9 // max(1, 2 * m * n * k))))
    row = {"world_size": w, "M": m, "N": n, "K_shard": k, "calls": calls}
    _timed(row, "gemm_us", lambda: torch.matmul(a, b, out=prod), calls, reps, barrier)
    _timed(row, "ar_us", lambda: backend.all_reduce(prod), calls, reps, barrier)
    row["ar_algo"] = backend.last_selection.algo
    _timed(row, "nccl_ar_us", lambda: backend.all_reduce(prod, algo="nccl"), calls, reps, barrier)

    def seq_nccl():
        torch.matmul(a, b, out=prod)
        backend.all_reduce(prod, algo="nccl")

    _timed(row, "seq_nccl_us", seq_nccl, calls, reps, barrier)
    for path in ("sequential", "chunked", "copy_engine", "fused", "auto"):
        key = "seq_us" if path == "sequential" else f"{path}_us"
        _timed(row, key, lambda path=path: gemm_all_reduce(a, b, path=path), calls, reps, barrier)
        if path == "auto" and row[key] is not None:
            row["auto"] = last_selection().algo
    gemm = group_gemm()  # the group's GemmAllReduce, built by the calls above
    _timed(row, "copy_engine_zc_us", lambda: gemm_all_reduce(a, b, path="copy_engine", zero_copy=True), calls, reps,
           barrier)  # fmt: skip
    row["ce_chunks"] = len(gemm.copy_engine_chunks(m))
    for chunks in ce_chunks:
        gemm.ce_chunks = chunks
        _timed(row, f"ce{chunks}_us", lambda: gemm_all_reduce(a, b, path="copy_engine"), calls, reps, barrier)
    gemm.ce_chunks = None
    row["ratio"] = _ratio(row)
    row["auto_ratio"] = _auto_ratio(row)
    return row


def _over_alone(row: dict, value: float | None) -> float | None:
    """``value`` over max(GEMM alone, all-reduce alone); None where a figure is missing."""
    if not value or not row.get("gemm_us") or not row.get("ar_us"):
        return None
    return value / max(row["gemm_us"], row["ar_us"])


def _ratio(row: dict) -> float | None:
    """Best overlapped path over max(GEMM alone, all-reduce alone); None where a figure is missing."""
    paths = ("chunked_us", "copy_engine_us", "copy_engine_zc_us", "fused_us")
    overlapped = [v for k, v in row.items() if (k in paths or re.fullmatch(r"ce\d+_us", k)) and v is not None]
    return _over_alone(row, min(overlapped, default=None))


def bench_rmsnorm(backend, tokens: int, hidden: int, calls: int, reps: int, barrier) -> dict:
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    dev = backend.device
    x = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    residual = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    weight = torch.ones(hidden, device=dev, dtype=torch.bfloat16)
    work = torch.empty_like(x)
    row = {"world_size": backend.world_size, "tokens": tokens, "hidden": hidden}
    _timed(row, "fused_us", lambda: all_reduce_residual_rmsnorm(x, residual, weight, 1e-6), calls, reps, barrier)

    def unfused(algo="auto"):
        work.copy_(x)
        backend.all_reduce(work, algo=algo)
        new_res = work + residual
        return F.rms_norm(new_res, (hidden,), weight, 1e-6), new_res

    _timed(row, "unfused_us", unfused, calls, reps, barrier)
    _timed(row, "unfused_nccl_us", lambda: unfused("nccl"), calls, reps, barrier)
    return row


def init_rank(rank: int, world_size: int, port: int):
    """In a spawned rank: join the group on the ``custom`` backend; returns (backend, barrier)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port))
    import sagellm_comm

    backend = sagellm_comm.init(backend="custom", timeout=300).backend
    if backend.custom is None:
        raise RuntimeError(f"the custom kernels are off on this world: {backend.custom_reason}")
    return backend, lambda: dist.barrier(group=backend.cpu_group)  # CPU group: does not touch the streams


def rank_main(rank: int, world_size: int, port: int, args) -> list:
    """One rank's rows; rank 0 returns every rank's ``(gemm_rows, norm_rows)``."""
    import sagellm_comm

    backend, barrier = init_rank(rank, world_size, port)
    gemm_rows, norm_rows = [], []
    for n in args.n:
        for m in args.m:
            gemm_rows.append(
                bench_gemm(backend, m, n, args.calls, args.reps, barrier, args.ce_chunks, args.graph_gflop)
            )
    for hidden in args.hidden:
        for tokens in args.tokens:
            norm_rows.append(bench_rmsnorm(backend, tokens, hidden, args.calls, args.reps, barrier))
    every: list = [None] * world_size
    dist.all_gather_object(every, (gemm_rows, norm_rows), group=backend.cpu_group)
    sagellm_comm.destroy()
    return every


def _slowest(rank_rows: list[list[dict]]) -> list[dict]:
    """Row-wise: every ``*_us`` figure is the slowest rank's."""
    merged = []
    for rows in zip(*rank_rows, strict=True):
        row = dict(rows[0])
        for key, value in row.items():
            if key.endswith("_us") and value is not None:
                values = [r[key] for r in rows if r.get(key) is not None]
                row[key] = max(values)
        if "ratio" in row:
            row["ratio"] = _ratio(row)
            row["auto_ratio"] = _auto_ratio(row)
        merged.append(row)
    return merged


def _auto_ratio(row: dict) -> float | None:
    """The default call (``auto``) over max(GEMM alone, all-reduce alone)."""
    return _over_alone(row, row.get("auto_us"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/2xh100/fused")
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count() if cuda_available() else 0)
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 128, 512, 2048, 8192])
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 128, 1024, 4096])
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--ce-chunks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--graph-gflop", type=float, default=400.0, help="GEMM GFLOP one graph may hold (caps --calls)")
    args = p.parse_args()
    visible = torch.cuda.device_count() if cuda_available() else 0
    if args.world_size < 2 or args.world_size > visible:
        raise SystemExit(
            f"bench/fused_multi_gpu_bench.py: needs 2+ CUDA GPUs, one process each (--world-size {args.world_size}, "
            f"{visible} visible)"
        )
    payload = spawn_ranks(rank_main, (args,), args.world_size, what="fused benchmark")
    gemm = _slowest([rows[0] for rows in payload])
    norm = _slowest([rows[1] for rows in payload])
    meta = provenance(
        torch.cuda.get_device_name(),
        world_size=args.world_size,
        timing="time_graph per rank, slowest rank's median, per call",
    )
    write_record(args.out + ".json", meta, gemm=gemm, rmsnorm=norm)
    print(f"# wrote {args.out}.json")


if __name__ == "__main__":
    main()
