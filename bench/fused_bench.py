"""Fused TP operations with N virtual ranks on one GPU: device time under CUDA graphs.

GEMM + all-reduce (row-parallel linear, a: [M, K_shard], b: [K_shard, N], K_shard = 14336 / N_ranks), bf16:

* ``gemm_us``: cuBLAS GEMM alone (``torch.bmm`` over the ranks' shards, the way N GPUs run it at once);
  ``triton_gemm_us``: the fused path's Triton GEMM alone (its producer kernel, flags into a scratch workspace);
* ``ar_us``: our all-reduce of the [M, N] output alone (best of one-shot/two-shot);
* ``seq_us``: GEMM then our all-reduce (policy's algo); ``seq_best_us``: GEMM then the best all-reduce algo;
* ``chunked_us``: the chunked pipeline; ``fused_us``: tile-level fused kernel (two-shot consumer);
  ``fused1_us``: one-shot consumer (small M only); ``auto_us``: what the policy runs (``auto`` column);
* ``ratio`` = fused_us / max(gemm_us, ar_us) (target <= 1.15 at large M).

AR + residual + RMSNorm, [tokens, hidden]: ``fused_us`` (one kernel) vs ``unfused_us`` (our all-reduce, torch
add, ``torch.nn.functional.rms_norm``).

Every figure is the median over ``--reps`` replays of a CUDA graph holding ``--calls`` calls, divided by
``--calls`` (:func:`sagellm_comm.benchmark.timing.time_graph`).  All ranks share one GPU, so compute and
memory traffic are N times one rank's; compare the columns with each other, not with multi-GPU figures.
Needs a CUDA GPU.  Writes ``<out>.json``; the two records ``bench/make_docs_tables.py`` makes the tables from are
written one part each::

    python -m bench.fused_bench --skip-rmsnorm --out bench/results/h200/fused_gemm_all_reduce_virtual
    python -m bench.fused_bench --skip-gemm --out bench/results/h200/fused_rmsnorm_virtual
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sagellm_comm.benchmark.plan import cuda_available
from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.timing import median_graph_us


def graph_us(fn, calls: int, reps: int) -> float:
    return median_graph_us(fn, calls=calls, iters=reps)


_SCRATCH: dict = {}  # VirtualFused id -> (workspaces, peer table) the producer GEMM writes into


def _triton_gemm_only(vf, a, b, m: int, n: int) -> None:
    """The fused path's producer GEMM alone, on scratch workspaces (its flags are never consumed there)."""
    import triton

    from sagellm_comm.fused import gemm_tile_config
    from sagellm_comm.kernels import gemm_all_reduce as gemm_kernels
    from sagellm_comm.virtual import stacked_rows
    from sagellm_comm.workspace import local_workspaces

    w = vf.world_size
    if id(vf) not in _SCRATCH:
        scratch = local_workspaces(w, vf.gemm_workspaces[0].slot_bytes, vf.device)
        _SCRATCH[id(vf)] = (scratch, stacked_rows(scratch)[0])
    scratch, table = _SCRATCH[id(vf)]
    cfg = dict(gemm_tile_config(m, True))
    bm, bn, bk, gm = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    gemm_kernels.gemm_publish_kernel[(tiles * w, 1)](
        a, b, table, scratch[0].control, m, n, a.shape[-1], a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2), 0, vf.gemm.buffer_bytes, w, triton.next_power_of_2(w), bm, bn, bk, gm,
        True, True, **cfg,
    )  # fmt: skip


def bench_gemm(vf, m: int, n: int, calls: int, reps: int) -> dict:
    w = vf.world_size
    k = 14336 // w
    a = torch.randn(w, m, k, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(w, k, n, device="cuda") / k**0.5).to(torch.bfloat16)
    prod = torch.empty(w, m, n, device="cuda", dtype=torch.bfloat16)
    vg = vf.group
    calls = max(1, min(calls, int(2e9 // max(1, w * m * n * k))))  # keep one graph under ~1 s of work
    row = {"world_size": w, "M": m, "N": n, "K_shard": k}
    row["gemm_us"] = graph_us(lambda: torch.bmm(a, b, out=prod), calls, reps)
    row["triton_gemm_us"] = graph_us(lambda: _triton_gemm_only(vf, a, b, m, n), calls, reps)
    flat = prod.view(w, -1)
    ar = {algo: graph_us(lambda algo=algo: vg.all_reduce_stacked(flat, algo=algo), calls, reps)
          for algo in ("one_shot", "two_shot")}  # fmt: skip
    row["ar_us"] = min(ar.values())
    row["ar_algo"] = min(ar, key=ar.get)

    def seq(algo="auto"):
        torch.bmm(a, b, out=prod)
        vg.all_reduce_stacked(flat, algo=algo)

    row["seq_us"] = graph_us(seq, calls, reps)
    row["seq_best_us"] = graph_us(lambda: seq(row["ar_algo"]), calls, reps)
    row["chunked_us"] = graph_us(lambda: vf.gemm_all_reduce(a, b, path="chunked"), calls, reps)
    row["fused_us"] = graph_us(lambda: vf.gemm_all_reduce(a, b, path="fused", one_shot=False), calls, reps)
    if m <= 256:
        row["fused1_us"] = graph_us(lambda: vf.gemm_all_reduce(a, b, path="fused", one_shot=True), calls, reps)
    row["auto_us"] = graph_us(lambda: vf.gemm_all_reduce(a, b), calls, reps)
    sel = vf.gemm.last_selection  # what ran: virtual ranks run sequential where the rule says copy engine
    row["auto"] = f"{sel.algo} ({sel.rule_id})"
    row["ratio"] = row["fused_us"] / max(row["gemm_us"], row["ar_us"])
    # correctness spot check of the fused output against the sequential one
    fused_out = vf.gemm_all_reduce(a, b, path="fused")
    seq()
    torch.cuda.synchronize()
    row["fused_max_abs_err"] = float((fused_out[0].float() - prod[0].float()).abs().max())
    return row


def bench_rmsnorm(vf, tokens: int, hidden: int, calls: int, reps: int) -> dict:
    w = vf.world_size
    x = torch.randn(w, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16).expand(w, -1, -1).contiguous()
    weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    # All-reduced in place call after call without the copy of x: zeros stay zeros (a nonzero input grows W-fold a
    # call and reaches inf); the kernels' time does not depend on the values.
    work = torch.zeros_like(x)
    row = {"world_size": w, "tokens": tokens, "hidden": hidden}

    def unfused():
        work.copy_(x)  # our all-reduce is in place; the fused kernel does not modify x (its copy-in is inside)
        vf.group.all_reduce_stacked(work.view(w, -1))
        new_res = work + res
        return F.rms_norm(new_res, (hidden,), weight, 1e-6), new_res

    def unfused_no_copy():
        vf.group.all_reduce_stacked(work.view(w, -1))
        new_res = work + res
        return F.rms_norm(new_res, (hidden,), weight, 1e-6), new_res

    row["fused_us"] = graph_us(lambda: vf.all_reduce_residual_rmsnorm(x, res, weight), calls, reps)
    sel = vf.rmsnorm.last_selection  # what ran, chosen by size, rows and hidden
    row["unfused_us"] = graph_us(unfused_no_copy, calls, reps)
    row["unfused_with_copy_us"] = graph_us(unfused, calls, reps)
    row["algo"] = f"{sel.algo} ({sel.rule_id})"
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/h200/fused_virtual")
    p.add_argument("--world-sizes", default="2,4,8")
    p.add_argument("--m", default="1,16,128,512,2048,8192,16384")
    p.add_argument("--n", default="4096,8192")
    p.add_argument("--tokens", default="1,16,128,1024,4096")
    p.add_argument("--hidden", default="4096,8192")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--skip-rmsnorm", action="store_true")
    args = p.parse_args()
    if not cuda_available():
        raise SystemExit("bench/fused_bench.py: needs a CUDA GPU (the virtual ranks run on one)")
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    ms = [int(v) for v in args.m.split(",")]
    ns = [int(v) for v in args.n.split(",")]
    gemm_rows, rms_rows = [], []
    t0 = time.time()
    for w in (int(v) for v in args.world_sizes.split(",")):
        max_out = max(ms) * max(ns) * 2
        vg = VirtualRankGroup(w, max_bytes=max(max_out, 64 << 20), timeout_s=20.0)
        vf = VirtualFused(vg, gemm_max_output_bytes=max_out)
        if not args.skip_rmsnorm:
            for hidden in (int(v) for v in args.hidden.split(",")):
                for tokens in (int(v) for v in args.tokens.split(",")):
                    rms_rows.append(bench_rmsnorm(vf, tokens, hidden, args.calls, args.reps))
                    print(json.dumps(rms_rows[-1]), flush=True)
        if not args.skip_gemm:
            for n in ns:
                for m in ms:
                    gemm_rows.append(bench_gemm(vf, m, n, args.calls, args.reps))
                    print(json.dumps(gemm_rows[-1]), flush=True)
        vg.check_errors()
        vf.gemm.check_errors()
        vf.close()
        vg.close()
        torch.cuda.empty_cache()
    meta = provenance(
        torch.cuda.get_device_name(),
        seconds=round(time.time() - t0, 1),
        timing=f"time_graph: median of {args.reps} CUDA-graph replays of {args.calls} calls (fewer for the "
        "largest GEMMs), per call",
    )
    write_record(args.out + ".json", meta, gemm_all_reduce=gemm_rows, all_reduce_rmsnorm=rms_rows)
    print(f"# wrote {args.out}.json")


if __name__ == "__main__":
    main()
