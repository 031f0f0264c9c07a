"""Markdown table of a real multi-GPU ``sagellm-comm bench --backend custom`` run: our kernels vs NCCL.

    python bench/multi_gpu_table.py bench/results/2xh100/all_reduce_2xh100_graph_*.json > table.md

The run must hold ``--algo auto`` and ``--algo nccl`` (and any of lamport/one_shot/two_shot).  Columns:
times in us (median of the slowest rank), ``auto`` = what the policy ran, ``NCCL / auto`` (>1: ours faster)
and the bus bandwidth of both.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sagellm_comm.benchmark.sizes import format_size  # noqa: E402

KERNELS = ("lamport", "one_shot", "two_shot")


def main(paths: list[str]) -> None:
    for path in paths:
        data = json.load(open(path))  # noqa: SIM115
        run = data["run"]
        points: dict[int, dict[str, dict]] = {}
        for rec in data["results"]:
            points.setdefault(rec["bytes"], {})[rec["algo_requested"]] = rec
        print(
            f"- `{path}`: {run['world_size']} x {run['device_name']}, {run['data_type']}, {run['timestamp']}, "
            f"commit {run['git_commit']}, torch {run['torch_version']}, timing {run['timing_method']}; "
            f"command `{run['command']}`\n"
        )
        kernels = [a for a in KERNELS if any(a in p for p in points.values())]
        head = ["size", *kernels, "auto (picked)", "NCCL", "NCCL / auto", "busbw auto", "busbw NCCL"]
        print("| " + " | ".join(head) + " |")
        print("|---|" + "---|" * (len(kernels) + 5))
        for nbytes in sorted(points):
            p = points[nbytes]
            auto, nccl = p.get("auto"), p.get("nccl")
            cells = [f"{p[a]['latency_ms'] * 1e3:.1f}" if a in p else "-" for a in kernels]
            if auto is None or nccl is None:
                continue
            a_us, n_us = auto["latency_ms"] * 1e3, nccl["latency_ms"] * 1e3
            row = [format_size(nbytes), *cells, f"{a_us:.1f} ({auto['algo_id']})", f"{n_us:.1f}", f"{n_us / a_us:.2f}"]
            row += [f"{auto['bus_bandwidth_gbps']:.0f}", f"{nccl['bus_bandwidth_gbps']:.0f}"]
            print("| " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
