"""TP-group kernels vs the engine for the same group, and the hierarchical path on simulated nodes.

``--world`` processes share one GPU under MPS: the ``custom`` backend with Gloo as its engine (NCCL
refuses two ranks on one device), as in docs/custom_all_reduce.md ("N processes on one GPU").

* **groups**: the world is split into TP groups of each ``--tp`` size (the world itself when it equals
  ``--world``) and every group all-reduces at the same time.  For each message size: the result is checked
  (exact, small integers, and the same bits on every member), then timed three ways: the group's kernels
  under CUDA-graph replay (device time per call), the kernels eagerly and the engine eagerly (host wall time
  of the call plus ``torch.cuda.synchronize``).  A figure is the slowest rank's median.
* **hierarchical**: the ranks report ``--nodes`` host names (``SAGELLM_COMM_HOSTNAME``), so the world
  spans simulated nodes and ``all_reduce`` runs ``hierarchical``.  Checked over odd sizes and three dtypes
  (exact, identical bits on every rank), timed eagerly against the flat engine; with stage 2 on the cross
  groups' kernels (``SAGELLM_COMM_HIER_CROSS=kernels``, simulated nodes only) also under CUDA graphs.

What these figures are: every rank shares one GPU's SMs and memory, so the kernels' times are not NVLink
times, and the engine is Gloo (host copies and loopback TCP), not NCCL.  They show the TP groups' kernels
run, exact, all groups at once, and what a group gains over its engine in this mode.

    nvidia-cuda-mps-control -d
    python -m bench.group_bench --out bench/results/h200/groups_mps.json
    echo quit | nvidia-cuda-mps-control
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.sizes import parse_size
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.benchmark.timing import summarize, time_graph, time_iterations

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHECK_NUMELS = (1, 4097, 65_537)  # odd sizes, on top of the timed ones


def _init(rank: int, world_size: int, port: int, capacity: int, hostname: str | None):
    import sagellm_comm

    if hostname is not None:
        os.environ["SAGELLM_COMM_HOSTNAME"] = hostname
    torch.cuda.set_device(0)
    return sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_addr=MASTER_ADDR, master_port=port,
        timeout=300, engine="gloo", device="cuda:0", max_bytes=capacity, group_max_bytes=capacity,
    )  # fmt: skip


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _pattern(numel: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integers that differ by rank and element: every partial sum is exact in every dtype."""
    return ((torch.arange(numel, device="cuda") % 13) - 6 + rank).to(dtype)


def _check(backend, group, ranks, numel: int, dtype: torch.dtype, algo: str = "auto") -> tuple[bool, str, str]:
    """One all-reduce of the pattern: (exact, digest of the result, algorithm that ran)."""
    x = _pattern(numel, ranks.index(backend.rank), dtype)
    want = sum(_pattern(numel, i, torch.float32) for i in range(len(ranks)))
    backend.all_reduce(x, group=group, algo=algo)
    torch.cuda.synchronize()
    return bool(torch.equal(x.float(), want)), _digest(x), backend.last_selection.algo


def _wall(fn, iters: int, warmup: int, barrier) -> float:
    """Median host wall time (us) of ``fn(); torch.cuda.synchronize()``."""

    def call():
        fn()
        torch.cuda.synchronize()

    return summarize(time_iterations(call, iters=iters, warmup=warmup, device=None, barrier=barrier)).median_us


def _graph(fn, iters: int, barrier) -> float:
    """Median device time (us) per call of 10 back-to-back calls captured in one graph."""
    device = torch.device("cuda", 0)
    return summarize(time_graph(fn, device=device, calls=10, iters=iters, warmup=2, barrier=barrier)).median_us


def _gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _groups_rank(rank: int, world_size: int, port: int, cfg: dict) -> dict:
    import sagellm_comm

    world = _init(rank, world_size, port, max(cfg["sizes"]), None)
    backend = world.backend
    barrier = backend.barrier
    dtype = DTYPES[cfg["dtype"]]
    rows = []
    try:
        for tp in cfg["tp"]:
            group = world if tp == world_size else world.split(tp)
            ranks = list(group.ranks)
            handle = None if tp == world_size else group
            kernels = backend.kernels_for(handle) is not None
            checks = [_check(backend, handle, ranks, n, dtype) for n in CHECK_NUMELS]
            for nbytes in cfg["sizes"]:
                numel = nbytes // dtype.itemsize
                exact, digest, algo = _check(backend, handle, ranks, numel, dtype)
                z = torch.zeros(numel, dtype=dtype, device="cuda")  # zeros: repeated in-place sums stay zero

                def kernel_call(z=z, handle=handle):
                    backend.all_reduce(z, group=handle)

                def engine_call(z=z, handle=handle):
                    backend.all_reduce(z, group=handle, algo="nccl")  # "nccl": the engine (Gloo here)

                row = {
                    "tp": tp, "groups": world_size // tp, "bytes": nbytes, "rank": rank, "group_ranks": ranks,
                    "kernels": kernels, "algo": algo, "exact": exact and all(c[0] for c in checks),
                    "digest": [digest, *(c[1] for c in checks)],
                    "kernel_graph_us": _graph(kernel_call, cfg["iters"], barrier),
                    "kernel_eager_us": _wall(kernel_call, cfg["iters"], 5, barrier),
                    "engine_eager_us": _wall(engine_call, cfg["engine_iters"], 2, barrier),
                }  # fmt: skip
                rows.append(row)
        return _gather(rows)  # every rank's rows (spawn_ranks keeps rank 0's copy)
    finally:
        sagellm_comm.destroy()


def _hier_rank(rank: int, world_size: int, port: int, cfg: dict) -> dict:
    import sagellm_comm

    per_node = world_size // cfg["nodes"]
    os.environ["SAGELLM_COMM_HIER_MIN_BYTES"] = "0"
    os.environ["SAGELLM_COMM_HIER_CROSS"] = cfg["cross"]
    world = _init(rank, world_size, port, 4 * max(cfg["sizes"]), f"node{rank // per_node}")
    backend = world.backend
    ranks = list(range(world_size))
    checks, rows = [], []
    try:
        for name, dtype in DTYPES.items():
            for numel in (*CHECK_NUMELS, *(n // dtype.itemsize + 1 for n in cfg["sizes"])):
                exact, digest, algo = _check(backend, None, ranks, numel, dtype)
                checks.append({"dtype": name, "numel": numel, "exact": exact, "digest": digest, "algo": algo})
        dtype = DTYPES[cfg["dtype"]]
        for nbytes in cfg["sizes"]:
            z = torch.zeros(nbytes // dtype.itemsize, dtype=dtype, device="cuda")

            def hier_call(z=z):
                world.all_reduce(z)

            def flat_call(z=z):
                backend.all_reduce(z, algo="nccl")  # the flat engine over every rank

            row = {"bytes": nbytes, "rank": rank,
                   "hier_eager_us": _wall(hier_call, cfg["iters"], 3, backend.barrier),
                   "flat_engine_eager_us": _wall(flat_call, cfg["engine_iters"], 2, backend.barrier)}  # fmt: skip
            if cfg["cross"] == "kernels":
                row["hier_graph_us"] = _graph(hier_call, cfg["iters"], backend.barrier)
            rows.append(row)
        return _gather({"checks": checks, "rows": rows})
    finally:
        sagellm_comm.destroy()


def _slowest(rows: list[dict], key_fields: tuple[str, ...], time_fields: tuple[str, ...]) -> list[dict]:
    """One row per key: the slowest rank's median of each time field, and whether every rank agreed."""
    table: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[f] for f in key_fields)
        out = table.setdefault(key, {f: row[f] for f in key_fields} | {t: 0.0 for t in time_fields})
        for t in time_fields:
            out[t] = round(max(out[t], row[t]), 2)
    return list(table.values())


def run_groups(cfg: dict) -> dict:
    per_rank = [r for rows in spawn_ranks(_groups_rank, (cfg,), cfg["world"], "group benchmark") for r in rows]
    times = ("kernel_graph_us", "kernel_eager_us", "engine_eager_us")
    table = _slowest(per_rank, ("tp", "groups", "bytes"), times)
    for row in table:
        mine = [r for r in per_rank if (r["tp"], r["bytes"]) == (row["tp"], row["bytes"])]
        by_group: dict[tuple, set] = {}
        for r in mine:
            by_group.setdefault(tuple(r["group_ranks"]), set()).add(tuple(r["digest"]))
        row["exact_on_every_rank"] = all(r["exact"] for r in mine)
        row["same_bits_in_each_group"] = all(len(d) == 1 for d in by_group.values())
        row["kernels_on_every_rank"] = all(r["kernels"] for r in mine)
        row["algo"] = sorted({r["algo"] for r in mine})
        row["engine_over_kernel_eager"] = round(row["engine_eager_us"] / row["kernel_eager_us"], 2)
    return {"table": table}


def run_hierarchical(cfg: dict, cross: str) -> dict:
    per_rank = spawn_ranks(_hier_rank, (dict(cfg, cross=cross),), cfg["world"], "hierarchical benchmark")
    checks = [c for out in per_rank for c in out["checks"]]
    by_case: dict[tuple, set] = {}
    for c in checks:
        by_case.setdefault((c["dtype"], c["numel"]), set()).add(c["digest"])
    times = ("hier_eager_us", "flat_engine_eager_us") + (("hier_graph_us",) if cross == "kernels" else ())
    table = _slowest([r for out in per_rank for r in out["rows"]], ("bytes",), times)
    for row in table:
        row["flat_over_hier_eager"] = round(row["flat_engine_eager_us"] / row["hier_eager_us"], 2)
    return {
        "stage2": "the cross groups' kernels (simulated nodes)" if cross == "kernels" else "the engine (Gloo)",
        "cases_checked": len(by_case),
        "exact_on_every_rank": all(c["exact"] for c in checks),
        "same_bits_on_every_rank": all(len(d) == 1 for d in by_case.values()),
        "algos": sorted({c["algo"] for c in checks}),
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--world", type=int, default=8, help="processes on the GPU")
    parser.add_argument("--tp", default="2,4,8", help="TP group sizes (each divides --world)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes of the hierarchical part (0: skip)")
    parser.add_argument("--sizes", default="8K,64K,1M", help="message sizes timed")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--engine-iters", type=int, default=10)
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/group_bench.py: needs a CUDA GPU (and MPS started: see the docstring)", file=sys.stderr)
        return 1
    cfg = {
        "world": args.world, "tp": [int(t) for t in args.tp.split(",")], "nodes": args.nodes,
        "sizes": [parse_size(s) for s in args.sizes.split(",")], "dtype": args.dtype, "iters": args.iters,
        "engine_iters": args.engine_iters,
    }  # fmt: skip
    bad = [t for t in cfg["tp"] if t < 2 or args.world % t]
    if bad or (args.nodes and (args.nodes < 2 or args.world % args.nodes or args.world // args.nodes < 2)):
        print(f"bench/group_bench.py: --tp {bad} / --nodes {args.nodes} do not divide --world {args.world}",
              file=sys.stderr)  # fmt: skip
        return 2
    record = {"config": cfg, "groups": run_groups(cfg)}
    print(json.dumps(record["groups"]), flush=True)
    if args.nodes:
        for cross in ("engine", "kernels"):
            record[f"hierarchical_{cross}"] = run_hierarchical(cfg, cross)
            print(json.dumps(record[f"hierarchical_{cross}"]), flush=True)
    meta = provenance(torch.cuda.get_device_name(0), mode=f"{args.world} processes on one GPU under MPS, Gloo engine")
    write_record(args.out, meta, **record)
    ok = all(r["exact_on_every_rank"] and r["same_bits_in_each_group"] for r in record["groups"]["table"])
    ok = ok and all(
        record[k]["exact_on_every_rank"] and record[k]["same_bits_on_every_rank"] for k in record if k[:4] == "hier"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
