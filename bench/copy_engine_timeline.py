"""Per-rank GPU timeline of one copy-engine GEMM + all-reduce call (torch.profiler / CUPTI), real GPUs.

Shows where the path's time goes beside the GEMM: every kernel, copy-engine transfer and memset of one
call, with its stream, start and duration relative to the call's first activity, and per stream the busy
time and the idle gaps.  Replays of a CUDA graph of one call (``--eager``: eager calls, which add the
host's launch gaps), after warm-up; the last of ``--calls`` profiled calls is printed.

    python bench/copy_engine_timeline.py --m 8192 --n 8192 --out timeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.custom_all_reduce_bench import run_meta  # noqa: E402
from bench.fused_multi_gpu_bench import init_rank, run_workers  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _short(name: str) -> str:
    for key, short in (("nvjet", "gemm"), ("Memcpy PtoP", "ce-pull(PtoP)"), ("Memcpy DtoD", "ce-copy(DtoD)"),
                       ("ce_barrier", "barrier"), ("ce_sum", "sum"), ("Memset", "memset")):  # fmt: skip
        if key in name:
            return short
    return name[:40]


def timeline(trace_path: str, calls: int) -> dict:
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    events.sort(key=lambda e: e["ts"])
    # Calls are separated by the host synchronisation after each: split at the largest gaps.
    gaps = sorted(range(1, len(events)), key=lambda i: events[i]["ts"] - (events[i - 1]["ts"] + events[i - 1]["dur"]))
    cuts = sorted(gaps[-(calls - 1) :]) if calls > 1 else []
    last = events[cuts[-1] :] if cuts else events
    t0 = last[0]["ts"]
    rows = [
        {"start_us": round(e["ts"] - t0, 1), "dur_us": round(e["dur"], 1), "stream": e["args"].get("stream"),
         "what": _short(e["name"])}
        for e in last
    ]  # fmt: skip
    span = max(e["ts"] + e["dur"] for e in last) - t0
    streams = {}
    for s in sorted({r["stream"] for r in rows}):
        mine = [r for r in rows if r["stream"] == s]
        busy = sum(r["dur_us"] for r in mine)
        idle = []
        for a, b in zip(mine, mine[1:], strict=False):
            gap = b["start_us"] - (a["start_us"] + a["dur_us"])
            if gap > 2:
                idle.append((round(a["start_us"] + a["dur_us"], 1), round(gap, 1), f"{a['what']} -> {b['what']}"))
        streams[str(s)] = {"busy_us": round(busy, 1), "idle_gaps": idle}
    return {"span_us": round(span, 1), "streams": streams, "events": rows}


def worker(rank: int, world_size: int, port: int, args, out_queue) -> None:
    import sagellm_comm
    from sagellm_comm.benchmark.timing import capture_graph
    from sagellm_comm.fused import gemm_all_reduce
    from sagellm_comm.fused.group import _group_state

    try:
        backend, barrier = init_rank(rank, world_size, port)
        w = backend.world_size
        k = 14336 // w
        g = torch.Generator(device=backend.device).manual_seed(rank)
        a = torch.randn(args.m, k, device=backend.device, generator=g).to(torch.bfloat16)
        b = (torch.randn(k, args.n, device=backend.device, generator=g) / k**0.5).to(torch.bfloat16)
        out = torch.empty(args.m, args.n, device=backend.device, dtype=torch.bfloat16)
        result = {}
        for label, fn in (
            ("gemm", lambda: torch.matmul(a, b, out=out)),
            ("copy_engine", lambda: gemm_all_reduce(a, b, path="copy_engine")),
        ):
            if label == "copy_engine" and args.ce_chunks:
                fn()
                _group_state(None)[2].gemm.ce_chunks = args.ce_chunks
            graph = capture_graph(fn, device=backend.device, warmup=3) if args.graph else None
            run = graph.replay if graph is not None else fn
            run()
            torch.cuda.synchronize()
            barrier()
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    barrier()
                    run()
                    torch.cuda.synchronize()
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            prof.export_chrome_trace(path)
            result[label] = timeline(path, args.calls)
            os.unlink(path)
        every = backend._exchange(result)
        sagellm_comm.destroy()
        if rank == 0:
            out_queue.put(("ok", every))
    except Exception:
        out_queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--ce-chunks", type=int, default=0, help="0: the path's default")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--eager", dest="graph", action="store_false", help="eager calls instead of CUDA-graph replays")
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    p.add_argument("--out", required=True)
    args = p.parse_args()
    payload = run_workers(worker, args.world_size, args, timeout_s=900)
    for rank, result in enumerate(payload):
        for label, tl_ in result.items():
            print(f"== rank {rank} {label}: span {tl_['span_us']} us")
            for s, info in tl_["streams"].items():
                print(f"   stream {s}: busy {info['busy_us']} us, gaps {info['idle_gaps']}")
            if label != "gemm":
                for e in tl_["events"]:
                    print(f"   {e['start_us']:9.1f} +{e['dur_us']:8.1f}  s{e['stream']}  {e['what']}")
    meta = run_meta()
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "ranks": payload}, f, indent=1)


if __name__ == "__main__":
    main()
