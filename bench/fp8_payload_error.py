"""The two-shot all-reduce with an FP8 payload: its error against fp32, the bytes it moves, its kernel time.

For W = 2, 4, 8 virtual ranks on one GPU (every rank in one launch, ``VirtualRankGroup.all_reduce_stacked``), over
the activations of :mod:`sagellm_comm.benchmark.payload_error` (``normal``, heavy-tailed ``student_t``,
``outliers``: outlier channels and per-token scales), bf16 inputs of ``[tokens, hidden]``:

* ``fp8``: relative L2 and max error of the FP8-payload result against the fp32 sum of the inputs; ``bf16``: the
  same for the 16-bit two-shot (its only error is the final rounding), for scale;
* ``identical_ranks``: every rank's result bit for bit the same;
* ``bytes_fp8`` / ``bytes_bf16``: what one rank reads from its peers (``payload_error.bytes_moved``);
* ``fp8_us`` / ``bf16_us``: the kernels' time under CUDA-graph replay (``time_graph``; all ranks share one GPU, so
  this is the kernels' cost on one chip, not a link-bound figure: the payload's gain is over real links).

The same error computation runs on the CPU under the Triton interpreter in ``tests/test_fp8_payload.py``, with the
bound derived there.  Needs a CUDA GPU; about 30 seconds on one H200::

    python -m bench.fp8_payload_error --out bench/results/h200/fp8_payload.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sagellm_comm.benchmark.payload_error import DISTRIBUTIONS, activations, bytes_moved, error_stats
from sagellm_comm.benchmark.plan import cuda_available
from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.timing import summarize, time_graph


def _us(fn, calls: int, reps: int) -> float:
    device = torch.device("cuda", torch.cuda.current_device())
    return round(summarize(time_graph(fn, device=device, calls=calls, iters=reps)).median_us, 3)


def measure(vg, kind: str, tokens: int, hidden: int, calls: int, reps: int, seed: int) -> dict:
    w = vg.world_size
    inputs = [t.to(torch.bfloat16) for t in activations(kind, w, tokens, hidden, seed=seed, device="cuda")]
    row = {"world_size": w, "distribution": kind, "tokens": tokens, "hidden": hidden}
    numel = tokens * hidden
    for name, payload in (("fp8", "fp8"), ("bf16", None)):
        stacked = torch.stack(inputs).view(w, numel).contiguous()
        vg.all_reduce_stacked(stacked, algo="two_shot", payload=payload)
        torch.cuda.synchronize()
        vg.check_errors()
        stats = error_stats(stacked[0].view(tokens, hidden), inputs)
        row.update({f"{name}_{k}": round(v, 7) for k, v in stats.items()})
        row[f"{name}_identical_ranks"] = all(torch.equal(stacked[r], stacked[0]) for r in range(1, w))
        row[f"bytes_{name}"] = bytes_moved(numel, w, 2, payload)
        work = torch.zeros(w, numel, device="cuda", dtype=torch.bfloat16)  # zeros: repeated sums stay finite
        row[f"{name}_us"] = _us(lambda work=work, payload=payload: vg.all_reduce_stacked(
            work, algo="two_shot", payload=payload), calls, reps)  # fmt: skip
    row["bytes_ratio"] = round(row["bytes_fp8"] / row["bytes_bf16"], 4)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="record to write (JSON)")
    p.add_argument("--world-sizes", default="2,4,8")
    p.add_argument("--shapes", default="16x8192,512x8192,4096x8192", help="tokens x hidden, comma-separated")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if not cuda_available():
        print("bench/fp8_payload_error.py: needs a CUDA GPU (the virtual ranks run on one)", file=sys.stderr)
        return 1
    from sagellm_comm.virtual import VirtualRankGroup

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.time()
    rows = []
    for w in (int(v) for v in args.world_sizes.split(",")):
        vg = VirtualRankGroup(w, max_bytes=max(t * h for t, h in shapes) * 2, timeout_s=20.0)
        for seed, (kind, (tokens, hidden)) in enumerate((k, s) for k in DISTRIBUTIONS for s in shapes):
            rows.append(measure(vg, kind, tokens, hidden, args.calls, args.reps, seed))
            print(json.dumps(rows[-1]), flush=True)
        vg.close()
        torch.cuda.empty_cache()
    meta = provenance(
        torch.cuda.get_device_name(),
        seconds=round(time.time() - t0, 1),
        timing=f"time_graph: median of {args.reps} CUDA-graph replays of {args.calls} calls, per call",
        dtype="bfloat16",
        reference="the fp32 sum of the bf16 inputs in rank order",
    )
    write_record(args.out, meta, rows=rows)
    print(f"# wrote {args.out}")
    return 0 if all(r["fp8_identical_ranks"] and r["bf16_identical_ranks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
