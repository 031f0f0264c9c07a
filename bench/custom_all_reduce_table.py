"""Markdown table from custom_all_reduce_bench.py JSON files (ours vs torch vs copy roofline).

    python bench/custom_all_reduce_table.py bench/results/custom_all_reduce_h100.json \
        bench/results/launch_cost_h100*.json > bench/results/custom_all_reduce_h100.md

Files from ``bench/launch_cost.py`` (they hold ``us_per_call``) become the eager host-time table.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sagellm_comm.selector import AlgoSelector  # noqa: E402

ALGOS = ("lamport", "one_shot", "two_shot")


EAGER_ROWS = (
    ("all_reduce_one_shot_no_stream_waits", "our all_reduce, one_shot, each rank on its own stream"),
    ("all_reduce_lamport_no_stream_waits", "our all_reduce, lamport, each rank on its own stream"),
    ("all_reduce_one_shot", "our all_reduce, one_shot, after a cross-stream wait per call"),
    ("all_reduce_auto", "our all_reduce, algo=auto, after a cross-stream wait per call"),
    ("all_reduce_lamport_pdl_interleaved", "our all_reduce, lamport with PDL, blocks interleaved with the next row"),
    ("all_reduce_lamport_no_pdl_interleaved", "our all_reduce, lamport without PDL (SAGELLM_COMM_PDL=0)"),
    ("python_side", "of which Python (C launcher stubbed)"),
    ("triton_direct", "trivial Triton kernel through the same cached C launcher"),
    ("cuLaunchKernel_ctypes", "trivial kernel, cuLaunchKernel through ctypes"),
    ("torch_add", "torch op (`add_`)"),
    ("triton_plain", "trivial Triton kernel, `kernel[grid](...)`"),
    ("graph_replay", "`CUDAGraph.replay()` of one kernel"),
)


def main(paths: list[str]) -> None:
    loaded = [(p, json.load(open(p))) for p in paths]  # noqa: SIM115
    eager = [(p, d) for p, d in loaded if "us_per_call" in d]
    paths = [p for p, d in loaded if "us_per_call" not in d]
    runs = [d for p, d in loaded if "us_per_call" not in d]
    print("# Custom all-reduce, virtual ranks on one GPU (bf16, CUDA-graph replay, all ranks in one launch)\n")
    for path, run in zip(paths, runs, strict=True):
        m = run["meta"]
        print(
            f"- `{path}`: {m['device']}, {m['date']}, commit {m['commit']}, torch {m['torch']}, "
            f"triton {m['triton']}, copy roofline {m['copy_roofline_gbps']:.0f} GB/s; command `{m['command']}`"
        )
    print(
        "\nTimes in us per call (device time). `roof` = the emulated traffic of the best kernel (every rank's "
        "reads and writes as if each went to HBM) over the measured copy bandwidth. Above 100% it is no longer "
        "an HBM fraction: the W virtual ranks read each staged buffer at about the same time, so L2 serves "
        "all but the first read. Real GPUs read peers over NVLink instead; see "
        "`bench/results/2xh100/` for two H100s against NCCL. `vs torch` = torch time / best kernel time (>1: "
        "ours faster). `auto picks`: what the current default policy (sagellm_comm/selector.py) selects.\n"
    )
    print("| W | bytes | lamport | one_shot | two_shot | torch ref | best | vs torch | roof | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    policy = AlgoSelector()
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (r["world_size"], r["bytes"]))
    for r in rows:
        cells = [f"{r[a]['graph_us']:.2f}" if a in r else "-" for a in ALGOS]
        best = min((a for a in ALGOS if a in r), key=lambda a: r[a]["graph_us"])
        print(
            f"| {r['world_size']} | {r['bytes']} | " + " | ".join(cells) + f" | {r['torch_us']:.2f} | {best} | "
            f"{r['torch_us'] / r[best]['graph_us']:.2f} | {r[best]['roofline_fraction'] * 100:.0f}% | "
            f"{policy.select(r['bytes'], r['world_size']).algo} |"
        )
    hosts = [h for run in runs for h in run.get("host", [])]
    if hosts:
        print("\n## Eager host time per call (8 KB, one rank's `CustomAllReduce.all_reduce`, launch cached)\n")
        print("| W | custom all_reduce | of which Python | torch op (`add_`) | plain Triton launch |")
        print("|---|---|---|---|---|")
        for h in hosts:
            print(
                f"| {h['world_size']} | {h['custom_all_reduce_us']:.2f} | {h['custom_python_side_us']:.2f} | "
                f"{h['torch_op_us']:.2f} | {h['triton_plain_launch_us']:.2f} |"
            )
    if eager:
        print("\n## Eager host time per call (8 KB bf16, host clock around the call, median)\n")
        for path, d in eager:
            m = d["meta"]
            print(f"- `{path}`: {m['device']}, {m['date']}, commit {m['commit']}; command `{m['command']}`")
        print("\n| what | " + " | ".join(f"run {i + 1} (us)" for i in range(len(eager))) + " |")
        print("|---|" + "---|" * len(eager))
        for key, label in EAGER_ROWS:
            cells = [f"{d['us_per_call'][key]:.2f}" if key in d["us_per_call"] else "-" for _, d in eager]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
