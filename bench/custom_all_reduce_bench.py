"""Custom all-reduce with N virtual ranks on one GPU: device time against torch and the copy roofline.

For N = 2, 4, 8 and sizes 1 KB .. 256 MB (per rank, bf16):

* ``graph_us``: device time per call under CUDA-graph replay, all ranks in one launch
  (``VirtualRankGroup.all_reduce_stacked``), timed by :func:`sagellm_comm.benchmark.timing.time_graph`
  (median of ``--reps`` replays of a graph of ``--calls`` calls, fewer calls for the largest sizes);
* ``torch_us``: the same reduction by torch (``stacked.float().sum(0)`` broadcast back into every row),
  also under graph replay: the same inputs and outputs, no synchronisation;
* ``traffic_bytes``: HBM traffic the emulation must move (every rank's reads and writes, counted in the
  kernel's own data flow); ``roofline_fraction``: that traffic over the measured copy bandwidth.

Every row is checked against the rank-order fp32 reference.  Needs a CUDA GPU.  Writes one JSON file
(``bench/make_docs_tables.py`` turns it into ``<out>.md`` and the docs' tables)::

    python bench/custom_all_reduce_bench.py --out bench/results/h200/custom_all_reduce_virtual.json
"""

from __future__ import annotations

import argparse

import torch

from sagellm_comm import CommConfig
from sagellm_comm.benchmark.plan import cuda_available
from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.sizes import parse_size_list, parse_size_range
from sagellm_comm.benchmark.timing import median_graph_us


def graph_us(fn, calls: int, reps: int) -> float:
    return median_graph_us(fn, calls=calls, iters=reps)


def copy_roofline_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.randn(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), calls=10, reps=10)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument(
        "--sizes", default="1K:256M", help="per-rank bytes: LO:HI in x2 steps, or a list 8K,128K,16M (default 1K:256M)"
    )
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--algos", default="lamport,one_shot,two_shot")
    ap.add_argument("--out", default="bench/results/h200/custom_all_reduce_virtual.json")
    args = ap.parse_args()
    if not cuda_available():
        raise SystemExit("bench/custom_all_reduce_bench.py: needs a CUDA GPU (the virtual ranks run on one)")
    from sagellm_comm.virtual import VirtualRankGroup

    config = CommConfig.from_env()  # every group of the run uses it; the record states its tile shapes

    dtype = torch.bfloat16
    worlds = [int(w) for w in args.worlds.split(",")]
    sizes = parse_size_range(args.sizes) if ":" in args.sizes else sorted(set(parse_size_list(args.sizes)))
    roof = copy_roofline_gbps()
    print(f"# device {torch.cuda.get_device_name()}  copy roofline {roof:.0f} GB/s (read+write)", flush=True)
    rows = []
    for world in worlds:
        max_bytes = min(sizes[-1], (64 << 30) // (4 * world))
        vg = VirtualRankGroup(world, "cuda:0", max_bytes=max_bytes, config=config)
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
                us = graph_us(
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

            row["torch_us"] = graph_us(torch_ref, args.calls if nbytes < (16 << 20) else calls, args.reps)
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
    meta = provenance(
        torch.cuda.get_device_name(),
        timing="sagellm_comm.benchmark.timing.time_graph: median of --reps replays, per call",
        copy_roofline_gbps=roof,
        large_tile_bytes=config.large_tile_bytes,
        large_num_warps=config.large_num_warps,
        large_stages=config.large_stages,
    )
    write_record(args.out, meta, rows=rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
