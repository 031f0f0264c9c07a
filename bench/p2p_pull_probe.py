"""Peer-to-peer pull bandwidth between two GPUs, both pulling from each other at once (real GPUs, one process).

What moves the copy-engine path's last exchange fastest once the GEMMs are done: ``k`` concurrent
``cudaMemcpyAsync`` transfers on ``k`` streams (``ce xk``: the copy engines) or one Triton kernel of ``g``
programs loading the peer's memory over NVLink (``sm gG``: the SMs).  Each figure is the median over
``--reps`` rounds of the slower GPU's time for its pull (CUDA events, queued behind a spin so the host's
issue cost stays out), and every round's result is checked bit for bit.  Writes ``<out>``::

    python bench/p2p_pull_probe.py --out bench/results/2xh100/ce_tail/p2p_pull_probe.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.custom_all_reduce_bench import run_meta, write_json  # noqa: E402


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _round(src, dst, mains, streams, mode: str, k: int) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    """Queue one round: every GPU ``i`` pulls ``src[1 - i]`` into ``dst[i]``; returns its events."""
    n = dst[0].numel()
    events = []
    for i, main in enumerate(mains):
        with torch.cuda.device(main.device), torch.cuda.stream(main):
            torch.cuda._sleep(200_000)  # the host queues the round while the GPU spins
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(main)
            peer = src[1 - i]
            if mode == "ce":
                per = triton.cdiv(n, k)
                for j in range(k):
                    s = streams[i][j]
                    s.wait_stream(main)
                    with torch.cuda.stream(s):
                        dst[i][j * per : (j + 1) * per].copy_(peer[j * per : (j + 1) * per])
                    main.wait_stream(s)
            else:
                _copy_kernel[(k,)](peer, dst[i], n, BLOCK=4096, num_warps=8)
            end.record(main)
            events.append((start, end))
    return events


def probe(mb: int, mode: str, k: int, reps: int) -> tuple[float, bool]:
    devs = [torch.device("cuda", 0), torch.device("cuda", 1)]
    n = mb * 2**20 // 2
    src = [torch.randn(n, device=d).to(torch.bfloat16) for d in devs]
    dst = [torch.empty(n, device=d, dtype=torch.bfloat16) for d in devs]
    dst[0].copy_(src[1])  # torch enables peer access on the first copy
    dst[1].copy_(src[0])
    mains = [torch.cuda.Stream(d) for d in devs]
    streams = [[torch.cuda.Stream(d) for _ in range(k if mode == "ce" else 0)] for d in devs]
    times: list[list[float]] = [[], []]
    for _ in range(reps):
        events = _round(src, dst, mains, streams, mode, k)
        for i, (start, end) in enumerate(events):
            torch.cuda.synchronize(devs[i])
            times[i].append(start.elapsed_time(end) * 1000.0)
    ok = torch.equal(dst[0].cpu(), src[1].cpu()) and torch.equal(dst[1].cpu(), src[0].cpu())
    return max(statistics.median(t) for t in times), ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/2xh100/ce_tail/p2p_pull_probe.json")
    p.add_argument("--mb", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--programs", type=lambda s: [int(x) for x in s.split(",")], default=[66, 132, 264, 528])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("p2p_pull_probe needs two GPUs")
    us: dict[str, float] = {}
    for mb in args.mb:
        for mode, counts in (("ce", args.streams), ("sm", args.programs)):
            for k in counts:
                t, ok = probe(mb, mode, k, args.reps)
                if not ok:
                    raise SystemExit(f"{mb} MB {mode} {k}: the pulled data differ from the source")
                label = f"{mb}MB {mode} {'x' if mode == 'ce' else 'g'}{k}"
                us[label] = t
                print(f"{label:>16}: {t:7.1f} us  {mb * 2**20 / t / 1e3:6.1f} GB/s", flush=True)
    write_json(args.out, {"meta": run_meta(), "us": us})


if __name__ == "__main__":
    main()
