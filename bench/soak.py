"""Soak: a million all-reduces of random sizes, algorithms and dtypes on virtual ranks, every result checked.

Each call takes a random world (of the groups made: ``--worlds``), algorithm (``auto``, one-shot, two-shot,
Lamport), dtype (bf16, fp16, fp32) and size (1 element to ``--max-bytes``, log-uniform, odd sizes included),
all-reduces a fresh copy of a pre-generated input (small integers: every sum is exact in every dtype, so
"right" means bit-equal to the reference) on all ranks in one launch, and compares every element of every
rank with the reference on the device (a running count of wrong elements; the host reads it every
``--sync-every`` calls).  Counters start at ``SAGELLM_COMM_INITIAL_EPOCH`` (default here 2^31 - 50000, so
the run crosses 2^31).  Writes a JSON record (device, date, command, commit, calls, wrong elements, seconds).

    python -m bench.soak --calls 1000000 --out bench/results/h200/soak.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

from sagellm_comm.benchmark.provenance import provenance, write_record

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALGOS = ("auto", "one_shot", "two_shot", "lamport")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    parser.add_argument("--pool", type=int, default=16, help="pre-generated inputs per (world, dtype)")
    parser.add_argument("--sync-every", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/soak.py: needs a CUDA GPU (the virtual ranks run on one)", file=sys.stderr)
        sys.exit(1)
    os.environ.setdefault("SAGELLM_COMM_INITIAL_EPOCH", str(2**31 - 50_000))

    from sagellm_comm.virtual import VirtualRankGroup

    rng = random.Random(args.seed)
    worlds = [int(w) for w in args.worlds.split(",")]
    groups = {w: VirtualRankGroup(w, max_bytes=args.max_bytes, timeout_s=30.0) for w in worlds}
    # Inputs: [W, max_elems] small integers per (world, dtype); a call uses a prefix of a random one.
    pool, refs = {}, {}
    for w in worlds:
        for dtype in DTYPES:
            n = args.max_bytes // torch.empty((), dtype=dtype).element_size()
            ins = [torch.randint(-8, 9, (w, n), device="cuda").to(dtype) for _ in range(args.pool)]
            pool[w, dtype] = ins
            refs[w, dtype] = [x.float().sum(0).to(dtype) for x in ins]
    work = {key: torch.empty(ins[0].numel(), dtype=key[1], device="cuda") for key, ins in pool.items()}
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    counts: dict[str, int] = {}
    start = time.monotonic()
    wrong_at_sync = []
    for i in range(args.calls):
        w = rng.choice(worlds)
        dtype = rng.choice(DTYPES)
        algo = rng.choice(ALGOS)
        itemsize = torch.empty((), dtype=dtype).element_size()
        max_elems = args.max_bytes // itemsize
        numel = max(1, min(max_elems, int(math.exp(rng.uniform(0, math.log(max_elems))))))
        vg = groups[w]
        if algo == "lamport" and numel > vg.workspaces[0].lamport_capacity:
            algo = "one_shot"
        k = rng.randrange(args.pool)
        x = work[w, dtype][: w * numel].view(w, numel)  # contiguous [W, numel]
        x.copy_(pool[w, dtype][k][:, :numel])
        vg.all_reduce_stacked(x, algo=algo)
        wrong += (x != refs[w, dtype][k][:numel]).sum()
        counts[algo] = counts.get(algo, 0) + 1
        if (i + 1) % args.sync_every == 0:
            torch.cuda.synchronize()
            for g in groups.values():
                g.check_errors()
            wrong_at_sync.append(int(wrong))
            print(f"{i + 1} calls, {int(wrong)} wrong elements, {time.monotonic() - start:.0f} s", flush=True)
    torch.cuda.synchronize()
    for g in groups.values():
        g.check_errors()
    record = {
        "initial_epoch": int(os.environ["SAGELLM_COMM_INITIAL_EPOCH"]),
        "final_epoch_w2": groups[worlds[0]].ranks[0].epoch,
        "calls": args.calls,
        "calls_by_algo": counts,
        "wrong_elements": int(wrong),
        "seconds": round(time.monotonic() - start, 1),
    }
    for g in groups.values():
        g.close()
    write_record(args.out, provenance(torch.cuda.get_device_name(0)), soak=record)
    print(json.dumps(record))
    if record["wrong_elements"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
