"""Custom all-reduce with N virtual ranks on one GPU: device time, host time, roofline, torch reference.

For N = 2, 4, 8 and sizes 1 KB .. 256 MB (per rank, bf16):
* ``graph_us``: device time per call under CUDA-graph replay, all ranks in one launch
  (``VirtualRankGroup.all_reduce_stacked``), median of repeated replays of a graph of ``--calls`` calls;
* ``torch_us``: the same reduction by torch (``stacked.float().sum(0)`` broadcast back into every row),
  also under graph replay: the same inputs and outputs, no synchronisation;
* ``bytes``: HBM traffic the emulation must move (every rank's reads and writes, counted in the kernel's
  own data flow), ``roofline``: that traffic over the measured device-to-device copy bandwidth;
* host time per eager call of one rank (``--host``): ``CustomAllReduce.all_reduce`` with the launch
  cached, against a bare torch op and a plain ``kernel[grid](...)`` Triton launch.

Writes a Markdown table and a JSON file.  Run on the device machine:
    python bench/custom_all_reduce_bench.py --out bench/results/custom_all_reduce_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sagellm_comm import custom_all_reduce as car_mod  # noqa: E402
from sagellm_comm.benchmark.results import git_commit  # noqa: E402
from sagellm_comm.virtual import VirtualRankGroup  # noqa: E402


def run_meta(**extra) -> dict:
    """What every result file of these scripts records: device, date, commit, command, versions, ``extra``."""
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),  # SAGELLM_COMMIT if set, else git
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "triton": triton.__version__,
        **extra,
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def graph_time_us(fn, calls: int, reps: int) -> float:
    """Median device time of one ``fn()`` call, from replays of a graph holding ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Keep the GPU busy while the host submits the replay, so the events bracket device time only.
        torch.cuda._sleep(1_000_000)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0 / calls)
    del g
    return statistics.median(times)


def copy_roofline_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.randn(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us(lambda: dst.copy_(src), calls=10, reps=10)
    return 2 * nbytes / (us * 1e3)


def traffic_bytes(algo: str, world: int, nbytes: int) -> int:
    """HBM bytes all virtual ranks move together for one call (reads + writes)."""
    if algo == "lamport":  # read input, push W copies (input dtype), poll W tiles, write output, clear W
        return world * (nbytes + 3 * world * nbytes + nbytes)
    if algo == "one_shot":  # read input, write slot, read W slots, write output
        return world * (3 + world) * nbytes
    # stage W-1 chunks (read + write), read W chunks (own from the input), write own chunk twice,
    # read W-1 chunks, write them
    chunk = nbytes // world
    return world * (2 * (world - 1) * chunk + nbytes + 2 * chunk + 2 * (world - 1) * chunk)


def host_overhead(world: int, reps: int = 2000) -> dict:
    """Eager host time per call of one rank (launch cached), a torch op and a plain Triton launch."""
    from sagellm_comm.kernels.all_reduce import one_shot_all_reduce_kernel  # noqa: F401

    vg = VirtualRankGroup(world, "cuda:0", max_bytes=1 << 20)
    xs = [torch.randn(4096, device="cuda", dtype=torch.bfloat16) for _ in range(world)]
    cur = torch.cuda.current_stream()
    for _ in range(10):
        vg.all_reduce(xs, algo="one_shot")
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps // world):
        for r in range(world):
            vg.streams[r].wait_stream(cur)
            with torch.cuda.stream(vg.streams[r]):
                t0 = time.perf_counter_ns()
                vg.ranks[r].all_reduce(xs[r], algo="one_shot")
                per_call.append(time.perf_counter_ns() - t0)
        for r in range(world):
            cur.wait_stream(vg.streams[r])
    torch.cuda.synchronize()
    vg.check_errors()
    # The Python side alone (validation, policy, argument packing) with the driver launch stubbed out.
    launcher = vg.ranks[0]._launcher
    real_launch = launcher.launch
    launcher.launch = lambda *a, **k: None
    python_only = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        vg.ranks[0].all_reduce(xs[0], algo="one_shot")
        python_only.append(time.perf_counter_ns() - t0)
    launcher.launch = real_launch
    vg.close()
    a = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    torch_op = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        a.add_(1.0)
        torch_op.append(time.perf_counter_ns() - t0)
    torch.cuda.synchronize()
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(x, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + offs, tl.load(x + offs, mask=offs < n) * 1.0, mask=offs < n)

    plain = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        _scale[(4,)](a, 4096, BLOCK=1024)
        plain.append(time.perf_counter_ns() - t0)
    torch.cuda.synchronize()
    return {
        "world_size": world,
        "custom_all_reduce_us": statistics.median(per_call) / 1e3,
        "custom_python_side_us": statistics.median(python_only) / 1e3,
        "torch_op_us": statistics.median(torch_op) / 1e3,
        "triton_plain_launch_us": statistics.median(plain) / 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--min-size", default="1K")
    ap.add_argument("--max-size", default="256M")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--algos", default="lamport,one_shot,two_shot")
    ap.add_argument("--out", default="bench/results/custom_all_reduce.json")
    ap.add_argument("--no-host", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16
    worlds = [int(w) for w in args.worlds.split(",")]
    sizes = []
    s = parse_size(args.min_size)
    while s <= parse_size(args.max_size):
        sizes.append(s)
        s *= 2
    roof = copy_roofline_gbps()
    print(f"# device {torch.cuda.get_device_name()}  copy roofline {roof:.0f} GB/s (read+write)", flush=True)
    rows = []
    for world in worlds:
        max_bytes = min(sizes[-1], (64 << 30) // (4 * world))
        vg = VirtualRankGroup(world, "cuda:0", max_bytes=max_bytes)
        for nbytes in sizes:
            numel = nbytes // 2
            if nbytes > vg.max_bytes:
                continue
            base = torch.randn(world, numel, device="cuda", dtype=dtype)
            ref = base[0].float()  # rank order, fp32, rounded once: what every rank computes
            for r in range(1, world):
                ref += base[r].float()
            ref = ref.to(dtype)
            stacked = base.clone()
            calls = max(2, min(args.calls, int(2e9 // max(1, traffic_bytes("one_shot", world, nbytes)))))
            row = {"world_size": world, "bytes": nbytes, "numel": numel, "dtype": "bfloat16"}
            for algo in args.algos.split(","):
                if algo == "lamport" and numel > vg.workspaces[0].lamport_capacity:
                    continue
                stacked.copy_(base)
                vg.all_reduce_stacked(stacked, algo=algo)
                torch.cuda.synchronize()
                vg.check_errors()
                wrong = int((stacked != ref).any(dim=1).sum().item())
                err = (stacked.float() - ref.float()).abs().max().item()
                identical = bool((stacked == stacked[0]).all().item())
                us = graph_time_us(
                    lambda a=algo, g=vg, x=stacked: g.all_reduce_stacked(x, algo=a),
                    args.calls if nbytes < (16 << 20) else calls,
                    args.reps,
                )
                vg.check_errors()
                moved = traffic_bytes(algo, world, nbytes)
                row[algo] = {
                    "graph_us": us,
                    "traffic_bytes": moved,
                    "gbps": moved / (us * 1e3),
                    "roofline_fraction": moved / (us * 1e3) / roof,
                    "max_abs_err_vs_torch": err,
                    "ranks_identical": identical,
                    "rows_differing_from_reference": wrong,
                }
            out_t = stacked

            def torch_ref(out_t=out_t):
                out_t.copy_(out_t.float().sum(0).to(dtype).expand_as(out_t))

            row["torch_us"] = graph_time_us(torch_ref, args.calls if nbytes < (16 << 20) else calls, args.reps)
            row["selected"] = vg.select(nbytes).algo
            rows.append(row)
            print(
                f"W={world} {nbytes:>11d} B  "
                + "  ".join(
                    f"{a}: {row[a]['graph_us']:9.2f} us {row[a]['roofline_fraction'] * 100:5.1f}%roof"
                    for a in args.algos.split(",")
                    if a in row
                )
                + f"  torch: {row['torch_us']:9.2f} us  auto={row['selected']}",
                flush=True,
            )
            del base, ref, out_t
        vg.close()
        torch.cuda.empty_cache()
    host = [] if args.no_host else [host_overhead(w) for w in worlds]
    for h in host:
        print(
            f"# host W={h['world_size']}: custom all_reduce {h['custom_all_reduce_us']:.2f} us/call "
            f"(python side {h['custom_python_side_us']:.2f} us), torch op "
            f"{h['torch_op_us']:.2f} us, plain triton launch {h['triton_plain_launch_us']:.2f} us"
        )
    meta = run_meta(
        copy_roofline_gbps=roof,
        large_tile_bytes=car_mod.LARGE_TILE_BYTES,
        large_num_warps=car_mod.LARGE_NUM_WARPS,
        large_stages=car_mod.LARGE_STAGES,
    )
    write_json(args.out, {"meta": meta, "rows": rows, "host": host})
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
