"""Sweep the large-message knobs of the custom all-reduce (tile bytes, warps, pipeline stages) on one GPU.

For each world size and algorithm, every (tile, warps, stages) configuration is compiled and timed under
CUDA-graph replay with N virtual ranks in one launch, and checked bitwise against the rank-order fp32
reference.  Prints one line per configuration and the best per (world size, algorithm); writes JSON.
The winners become the defaults in ``sagellm_comm/custom_all_reduce.py``.

    python bench/tune_all_reduce.py --size 32M --worlds 2,4,8 --out bench/results/tune_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.custom_all_reduce_bench import (  # noqa: E402
    copy_roofline_gbps,
    graph_time_us,
    parse_size,
    run_meta,
    traffic_bytes,
    write_json,
)
from sagellm_comm import custom_all_reduce as car_mod  # noqa: E402
from sagellm_comm.virtual import VirtualRankGroup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="32M", help="bytes per rank (bf16)")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--algos", default="one_shot,two_shot")
    ap.add_argument("--tiles", default="16384,32768,65536", help="tile bytes")
    ap.add_argument("--warps", default="8,16,32")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--configs", default="", help="explicit tile:warps:stages list (overrides the product)")
    ap.add_argument("--pick-env", default="", help="write shell exports of the best configuration to this file")
    ap.add_argument("--out", default="bench/results/tune.json")
    args = ap.parse_args()
    nbytes = parse_size(args.size)
    numel = nbytes // 2
    roof = copy_roofline_gbps()
    print(f"# {torch.cuda.get_device_name()}  copy roofline {roof:.0f} GB/s  size {nbytes} B/rank", flush=True)
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        base = torch.randn(world, numel, device="cuda", dtype=torch.bfloat16)
        ref = base[0].float().clone()
        for r in range(1, world):
            ref += base[r].float()
        ref = ref.to(torch.bfloat16)
        stacked = torch.empty_like(base)
        for algo in args.algos.split(","):
            if args.configs:
                configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
            else:
                configs = itertools.product(
                    (int(t) for t in args.tiles.split(",")),
                    (int(w) for w in args.warps.split(",")),
                    (int(s) for s in args.stages.split(",")),
                )
            for tile, warps, stages in configs:
                car_mod.LARGE_TILE_BYTES, car_mod.LARGE_NUM_WARPS, car_mod.LARGE_STAGES = tile, warps, stages
                row = {"world_size": world, "algo": algo, "tile_bytes": tile, "num_warps": warps, "stages": stages}
                try:
                    vg = VirtualRankGroup(world, "cuda:0", max_bytes=nbytes)
                    stacked.copy_(base)
                    vg.all_reduce_stacked(stacked, algo=algo)
                    torch.cuda.synchronize()
                    vg.check_errors()
                    row["wrong_rows"] = int((stacked != ref).any(dim=1).sum().item())
                    fn = lambda g=vg, a=algo, x=stacked: g.all_reduce_stacked(x, algo=a)
                    us = graph_time_us(fn, args.calls, args.reps)
                    vg.check_errors()
                    moved = traffic_bytes(algo, world, nbytes)
                    row.update(us=us, gbps=moved / (us * 1e3), roofline_fraction=moved / (us * 1e3) / roof)
                    vg.close()
                except Exception as exc:  # a configuration that does not compile or fit is reported, not fatal
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    torch.cuda.synchronize()
                rows.append(row)
                if "us" in row:
                    print(
                        f"W={world} {algo:8s} tile={tile:6d} warps={warps:2d} stages={stages}  {row['us']:9.1f} us "
                        f"{row['roofline_fraction'] * 100:5.1f}% roof  wrong={row['wrong_rows']}",
                        flush=True,
                    )
                else:
                    print(f"W={world} {algo} tile={tile} warps={warps} stages={stages}  {row['error']}", flush=True)
        del base, ref, stacked
        torch.cuda.empty_cache()
    print("# best per (world, algo)")
    for world, algo in sorted({(r["world_size"], r["algo"]) for r in rows}):
        ok = [r for r in rows if r["world_size"] == world and r["algo"] == algo and "us" in r and r["wrong_rows"] == 0]
        if ok:
            b = min(ok, key=lambda r: r["us"])
            print(
                f"W={world} {algo:8s} tile={b['tile_bytes']} warps={b['num_warps']} stages={b['stages']} "
                f"{b['us']:.1f} us {b['roofline_fraction'] * 100:.1f}% roof"
            )
    if args.pick_env:
        # The configuration whose time, relative to the best of each (world, algo), has the lowest geometric
        # mean over every (world, algo) case where it ran correctly.
        import math

        cases = sorted({(r["world_size"], r["algo"]) for r in rows})
        best = {c: min((r["us"] for r in rows if (r["world_size"], r["algo"]) == c and "us" in r), default=None)
                for c in cases}  # fmt: skip
        scores = {}
        for cfg in sorted({(r["tile_bytes"], r["num_warps"], r["stages"]) for r in rows}):
            mine = [r for r in rows if (r["tile_bytes"], r["num_warps"], r["stages"]) == cfg]
            if len(mine) != len(cases) or any("us" not in r or r["wrong_rows"] for r in mine):
                continue
            c_of = lambda r: (r["world_size"], r["algo"])  # noqa: E731
            scores[cfg] = math.exp(sum(math.log(r["us"] / best[c_of(r)]) for r in mine) / len(mine))
        tile, warps, stages = min(scores, key=scores.get)
        print(f"# picked tile={tile} warps={warps} stages={stages} (geomean {scores[(tile, warps, stages)]:.3f})")
        with open(args.pick_env, "w") as f:
            f.write(
                f"export SAGELLM_COMM_LARGE_TILE_BYTES={tile} SAGELLM_COMM_LARGE_NUM_WARPS={warps} "
                f"SAGELLM_COMM_LARGE_STAGES={stages}\n"
            )
    write_json(args.out, {"meta": run_meta(copy_roofline_gbps=roof), "rows": rows})


if __name__ == "__main__":
    main()
