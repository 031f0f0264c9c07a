"""How much a cuBLAS GEMM loses when it is cut into row (or column) pieces: one GPU, CUDA-graph replay.

The copy-engine GEMM + all-reduce path (``sagellm_comm/fused/gemm.py``) issues one cuBLAS call per
(chunk, part); this probe times the piece schedules it could use, without any communication, so the
GEMM's own cost of a schedule is known before the pipeline is built around it.

    python bench/gemm_split_probe.py --shapes 8192x8192x7168,16384x4096x7168 --out results.json

A schedule is a list of row counts (``rows:1024,3072,...``), each piece a ``torch.matmul`` (beta = 0)
or, with a ``+`` suffix, a ``torch.addmm`` onto its rows of the output (beta = 1); ``cols:N`` cuts the
output into N column blocks instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.custom_all_reduce_bench import graph_time_us, run_meta  # noqa: E402


def schedule_fn(spec: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, acc: torch.Tensor):
    kind, _, body = spec.partition(":")
    m, n = out.shape
    if kind == "rows":
        pieces = []
        lo = 0
        for item in body.split(","):
            beta = item.endswith("+")
            rows = int(item.rstrip("+"))
            pieces.append((lo, lo + rows, beta))
            lo += rows
        if lo != m:
            raise SystemExit(f"schedule {spec!r} covers {lo} rows, not {m}")

        def run():
            for lo, hi, beta in pieces:
                if beta:
                    torch.addmm(acc[lo:hi], a[lo:hi], b, out=out[lo:hi])
                else:
                    torch.matmul(a[lo:hi], b, out=out[lo:hi])

        return run
    if kind == "cols":
        parts = int(body)
        each = n // parts
        outs = [torch.empty(m, each, dtype=out.dtype, device=out.device) for _ in range(parts)]
        bs = [b[:, i * each : (i + 1) * each] for i in range(parts)]

        def run():
            for bi, oi in zip(bs, outs, strict=True):
                torch.matmul(a, bi, out=oi)

        return run
    raise SystemExit(f"unknown schedule kind {kind!r} in {spec!r}")


DEFAULT_SCHEDULES = {
    8192: [
        "rows:8192",
        "rows:1024,1024,1024,1024,1024,1024,1024,1024",
        "rows:1024,1024+,1024,1024+,1024,1024+,1024,1024+",
        "rows:2048,2048,2048,2048",
        "rows:512,512,512,512,512,512,512,512,512,512,512,512,512,512,512,512",
        "rows:1024,3072,1024+,2048+,1024+",
        "rows:1024,3072,1024+,1024+,1024+,1024+",
        "rows:1024,3072,2048+,2048+",
        "rows:2048,2048,2048+,2048+",
        "rows:1024,3072,1536+,1536+,1024+",
        "cols:2",
        "cols:4",
    ],
    16384: [
        "rows:16384",
        "rows:2048,2048,2048,2048,2048,2048,2048,2048",
        "rows:2048,2048+,2048,2048+,2048,2048+,2048,2048+",
        "rows:4096,4096,4096,4096",
        "rows:2048,6144,2048+,4096+,2048+",
        "rows:2048,6144,2048+,2048+,2048+,2048+",
        "rows:1024,7168,2048+,4096+,2048+",
        "rows:2048,6144,3072+,3072+,2048+",
    ],
    4096: [
        "rows:4096",
        "rows:1024,1024,1024,1024",
        "rows:1024,1024+,1024,1024+",
        "rows:512,512,512,512,512,512,512,512",
        "rows:512,1536,512+,1024+,512+",
        "rows:512,1536,1024+,1024+",
        "rows:1024,1024,1024+,1024+",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x8192x7168,16384x4096x7168,8192x4096x7168,4096x8192x7168")
    ap.add_argument("--schedules", default="", help="';'-separated schedules for every shape (default: built in)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        m, n, k = (int(x) for x in shape.split("x"))
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        acc = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        schedules = args.schedules.split(";") if args.schedules else DEFAULT_SCHEDULES.get(m, [f"rows:{m}"])
        base = None
        for spec in schedules:
            us = graph_time_us(schedule_fn(spec, a, b, out, acc), calls=1, reps=args.reps)
            base = base or us
            rows.append({"M": m, "N": n, "K": k, "schedule": spec, "us": us, "vs_whole": us / base})
            print(f"{m}x{n}x{k} {spec:60s} {us:9.1f} us  {us / base:5.3f}", flush=True)
        del a, b, out, acc
        torch.cuda.empty_cache()
    if args.out:
        meta = run_meta()
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
