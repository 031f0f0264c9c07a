"""All-reduce + residual + RMSNorm + FP8 quantisation: the fused kernels against the unfused chain, side by side.

For every world size W, hidden size and token count (bf16 in), microseconds per call under CUDA-graph replay
(:func:`sagellm_comm.benchmark.timing.time_graph`: the median of ``--reps`` replays of a graph of ``--calls``
calls, per call):

* ``ar_us``: our plain all-reduce of ``x`` (the policy's algorithm);
* ``fused_us``: our fused op without quantisation (``quant=None``, the policy's path);
* per mode ``m`` of ``fp8``, ``fp8_per_token``, ``fp8_group128``: ``fused_<m>_us`` (the policy's path, what a
  call runs), ``<m>_<algo>_us`` (each fused kernel forced: ``one_shot``, ``two_shot``, and ``lamport`` where the
  message fits its buffers), ``unfused_<m>_us`` (our all-reduce, torch add + ``F.rms_norm``, the torch
  quantisation ``quantize_fp8_reference``), ``speedup_<m>`` (unfused over fused) and ``over_ar_<m>_us`` (fused
  minus the plain all-reduce).

Two settings: **virtual ranks** (default): W ranks on one GPU, every rank in one launch (``VirtualFused``), as in
``bench/fused_bench.py``; **processes under MPS** (``--mps``): W processes on one GPU, the ``custom`` backend with
Gloo as its engine, the group-level ``all_reduce_residual_rmsnorm`` (each figure the slowest rank's median; the
policy's paths only).  All ranks share one GPU's SMs and HBM: compare the columns with each other, not with
NVLink figures.

The record also holds ``targets`` (fused within 0.5 us of the plain all-reduce at <= 64 KB; >= 1.3x the unfused
chain at 1-128 tokens; never slower than it) as measured, and ``derived_rules``: the fusion policy these
figures give (:class:`sagellm_comm.fused.FusionPolicy` JSON: per W, hidden and mode, the fastest kernel for each
token range, ``unfused`` where the chain wins; ``FusionPolicy.from_dict(record["derived_rules"])``).  Needs a
CUDA GPU.  Most of its time is compiling kernels (every quantisation mode, path and row split is a binary):
with a cold Triton cache ``--quick`` takes about 5 minutes a world size on one H200.  The record is rewritten
after every world size, so a run stopped by a time limit keeps the ones it finished (``meta.complete``,
``meta.not_measured``); ``--mps --no-virtual`` measures the processes alone::

    python -m bench.fp8_fused_bench --out bench/results/h200/fp8_fused.json
    nvidia-cuda-mps-control -d; python -m bench.fp8_fused_bench --mps --out bench/results/h200/fp8_fused.json; \\
        echo quit | nvidia-cuda-mps-control

``--merge-into RECORD`` writes ``RECORD``'s rows with this run's in place of the shapes it measured (targets and
rules recomputed over all of them, the run added to ``meta.runs``, ``meta.not_measured`` the shapes of the full
grid still missing); with ``--only-missing`` it measures just those shapes, so that runs stopped by time limits
complete one record::

    python -m bench.fp8_fused_bench --quick --mps --merge-into bench/results/h200/fp8_fused.json --only-missing \\
        --out bench/results/h200/fp8_fused.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sagellm_comm.benchmark.plan import cuda_available
from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.benchmark.timing import summarize, time_graph
from sagellm_comm.fused import DEFAULT_FUSION_RULES
from sagellm_comm.fused import FP8_QUANT_MODES as MODES
from sagellm_comm.selector import KERNEL_ALGOS as ALGOS
from sagellm_comm.selector import UNFUSED_PATH

EPS = 1e-6
STATIC_SCALE = 0.05
AR_TARGET_BYTES = 64 << 10
AR_TARGET_US = 0.5
SPEEDUP_TARGET = 1.3
SPEEDUP_TOKENS = 128
WORLD_SIZES = (2, 4, 8)
HIDDEN = (4096, 8192)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MPS_TOKENS = (1, 16, 64, 128, 512)
PART_LABEL = {"virtual": "virtual ranks", "mps": "processes under MPS"}
#: what a run's entry of a merged record's ``meta.runs`` keeps of its provenance (its rows' timing included)
PROVENANCE_KEYS = ("command", "commit", "dirty", "commit_source", "date", "seconds", "device", "torch", "triton",
                   "timing")  # fmt: skip


def _us(fn, calls: int, reps: int, barrier=None) -> float:
    device = torch.device("cuda", torch.cuda.current_device())
    return round(summarize(time_graph(fn, device=device, calls=calls, iters=reps, barrier=barrier)).median_us, 3)


def _quantize(y: torch.Tensor, mode: str, scale: torch.Tensor):
    from sagellm_comm.fused import quantize_fp8_reference

    return quantize_fp8_reference(y, mode, scale if mode == "fp8" else None)


# ---------------------------------------------------------------------------------------------- virtual ranks


def bench_virtual(vf, tokens: int, hidden: int, algos: tuple[str, ...], calls: int, reps: int) -> dict:
    w = vf.world_size
    x = torch.randn(w, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16).expand(w, -1, -1).contiguous()
    weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    scale = torch.tensor([STATIC_SCALE], device="cuda")
    # The unfused chain's in-place all-reduce input: zeros stay zeros call after call (a nonzero input grows
    # W-fold a call and reaches inf); the kernels' time does not depend on the values.
    work = torch.zeros_like(x)
    flat = work.view(w, -1)
    nbytes = tokens * hidden * 2
    row = {"world_size": w, "hidden": hidden, "tokens": tokens, "bytes": nbytes}
    row["ar_algo"] = vf.group.select(nbytes).algo
    row["ar_us"] = _us(lambda: vf.group.all_reduce_stacked(flat), calls, reps)
    row["fused_us"] = _us(lambda: vf.all_reduce_residual_rmsnorm(x, res, weight, EPS), calls, reps)
    lamport_fits = tokens * hidden <= vf.group.workspaces[0].lamport_capacity
    for mode in MODES:
        sel = vf.rmsnorm.select(nbytes, mode, tokens, hidden)
        row[f"path_{mode}"] = f"{sel.algo} ({sel.rule_id})"

        static = scale if mode == "fp8" else None  # the dynamic modes compute their scales

        def fused(mode=mode, algo="auto", static=static):
            vf.all_reduce_residual_rmsnorm(x, res, weight, EPS, algo=algo, quant=mode, scale=static)

        def unfused(mode=mode):
            vf.group.all_reduce_stacked(flat)  # in place on `work`: the fused op leaves x as it is
            new_res = work + res
            _quantize(F.rms_norm(new_res, (hidden,), weight, EPS), mode, scale)

        row[f"fused_{mode}_us"] = _us(fused, calls, reps)
        for algo in algos:
            if algo != "lamport" or lamport_fits:
                row[f"{mode}_{algo}_us"] = _us(lambda mode=mode, algo=algo: fused(mode, algo), calls, reps)
        row[f"unfused_{mode}_us"] = _us(unfused, calls, reps)
        row[f"speedup_{mode}"] = round(row[f"unfused_{mode}_us"] / row[f"fused_{mode}_us"], 3)
        row[f"over_ar_{mode}_us"] = round(row[f"fused_{mode}_us"] - row["ar_us"], 3)
    return row


def run_virtual(args, rows: list[dict], after_world=lambda: None) -> list[dict]:
    """Append the virtual-rank rows of every world size to ``rows``, calling ``after_world()`` after each."""
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    algos = () if args.quick else ALGOS
    for w in args.world_sizes:
        shapes = [(h, t) for h in args.hidden for t in args.tokens if (w, h, t) not in args.skip["virtual"]]
        if not shapes:
            after_world()
            continue
        vg = VirtualRankGroup(w, max_bytes=max(args.tokens) * max(args.hidden) * 4, timeout_s=20.0)
        vf = VirtualFused(vg, gemm_max_output_bytes=1 << 20)
        for hidden, tokens in shapes:
            rows.append(bench_virtual(vf, tokens, hidden, algos, args.calls, args.reps))
            print(json.dumps(rows[-1]), flush=True)
        vg.check_errors()
        vf.close()
        vg.close()
        torch.cuda.empty_cache()
        after_world()
    return rows


# ---------------------------------------------------------------------------------------------- MPS processes


def _mps_row(world, rank: int, tokens: int, hidden: int, cfg: dict) -> dict:
    """One shape on this rank: every figure of the row (the group-level calls, timed with a barrier)."""
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, last_selection

    backend = world.backend
    g = torch.Generator(device="cuda").manual_seed(tokens * hidden + rank)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.ones(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor([STATIC_SCALE], device="cuda")
    work = torch.zeros_like(x)  # all-reduced in place call after call: zeros stay finite (see bench_virtual)

    def timed(fn) -> float:
        return _us(fn, cfg["calls"], cfg["reps"], backend.barrier)

    row = {"world_size": world.world_size, "hidden": hidden, "tokens": tokens, "bytes": tokens * hidden * 2}
    row["ar_us"] = timed(lambda: backend.all_reduce(work))
    row["fused_us"] = timed(lambda: all_reduce_residual_rmsnorm(x, res, weight, EPS, world))
    for mode in MODES:
        static = scale if mode == "fp8" else None

        def unfused(mode=mode):
            backend.all_reduce(work)
            _quantize(F.rms_norm(work + res, (hidden,), weight, EPS), mode, scale)

        row[f"fused_{mode}_us"] = timed(
            lambda mode=mode, static=static: all_reduce_residual_rmsnorm(x, res, weight, EPS, world, mode, static)
        )
        sel = last_selection(world)
        row[f"path_{mode}"] = f"{sel.algo} ({sel.rule_id})"
        row[f"unfused_{mode}_us"] = timed(unfused)
    return row


def _mps_rank(rank: int, world_size: int, port: int, cfg: dict) -> list[list[dict]]:
    import torch.distributed as dist

    import sagellm_comm

    torch.cuda.set_device(0)
    capacity = max(cfg["tokens"]) * max(cfg["hidden"]) * 4
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_addr=MASTER_ADDR, master_port=port, timeout=300,
        engine="gloo", device="cuda:0", max_bytes=capacity,
    )  # fmt: skip
    try:
        rows = [_mps_row(world, rank, t, h, cfg) for h, t in cfg["shapes"]]
        out = [None] * world_size
        dist.all_gather_object(out, rows, group=world.backend.cpu_group)
        return out
    finally:
        sagellm_comm.destroy()


def run_mps(args, table: list[dict], after_world=lambda: None) -> list[dict]:
    """Append the slowest rank's rows of every MPS world size to ``table``, calling ``after_world()`` after each."""
    for w in args.mps_world_sizes:
        shapes = [(h, t) for h in args.hidden for t in args.mps_tokens if (w, h, t) not in args.skip["mps"]]
        if not shapes:
            after_world()
            continue
        cfg = {"hidden": args.hidden, "tokens": args.mps_tokens, "shapes": shapes, "calls": args.calls,
               "reps": args.reps}  # fmt: skip
        per_rank = spawn_ranks(_mps_rank, (cfg,), w, "FP8 fused benchmark (MPS)")
        for i, row in enumerate(per_rank[0]):
            slowest = dict(row)
            for key in row:
                if key.endswith("_us"):
                    slowest[key] = max(ranks[i][key] for ranks in per_rank)
            for mode in MODES:
                slowest[f"speedup_{mode}"] = round(slowest[f"unfused_{mode}_us"] / slowest[f"fused_{mode}_us"], 3)
                slowest[f"over_ar_{mode}_us"] = round(slowest[f"fused_{mode}_us"] - slowest["ar_us"], 3)
            table.append(slowest)
            print(json.dumps(slowest), flush=True)
        after_world()
    return table


# ---------------------------------------------------------------------------------------------- what it says


def targets(rows: list[dict]) -> dict:
    """The three speed targets, per mode, as these rows measure them."""
    out = {}
    for mode in MODES:
        small = [r for r in rows if r["bytes"] <= AR_TARGET_BYTES]
        few = [r for r in rows if r["tokens"] <= SPEEDUP_TOKENS]
        worst_over = max((r[f"over_ar_{mode}_us"] for r in small), default=None)
        worst_speedup = min((r[f"speedup_{mode}"] for r in few), default=None)
        # From the times, not the rounded speedup: 10.004 us against 10.0 rounds to 1.0 and is still slower.
        slower = [_key(r) for r in rows if r[f"fused_{mode}_us"] > r[f"unfused_{mode}_us"]]
        out[mode] = {
            f"max_over_ar_us_at_most_{AR_TARGET_BYTES >> 10}KB": worst_over,
            f"within_{AR_TARGET_US}us_of_ar": worst_over is not None and worst_over <= AR_TARGET_US,
            f"min_speedup_at_most_{SPEEDUP_TOKENS}_tokens": worst_speedup,
            f"at_least_{SPEEDUP_TARGET}x": worst_speedup is not None and worst_speedup >= SPEEDUP_TARGET,
            "slower_than_unfused_at (W, hidden, tokens)": slower,
        }
    return out


def derive_rules(rows: list[dict]) -> dict:
    """The :class:`~sagellm_comm.fused.FusionPolicy` these rows give: per (W, hidden, mode), token ranges of the
    fastest fused kernel, ``unfused`` where the chain beats every kernel; then the library's default rules (for
    other shapes and the unquantised op, which this benchmark does not time against its unfused chain)."""
    rules = []
    keys = sorted({(r["world_size"], r["hidden"]) for r in rows})
    for w, hidden in keys:
        mine = sorted((r for r in rows if (r["world_size"], r["hidden"]) == (w, hidden)), key=lambda r: r["tokens"])
        for mode in MODES:
            decisions = []  # (max_tokens, path, why)
            for r in mine:
                kernels = {a: r[f"{mode}_{a}_us"] for a in ALGOS if f"{mode}_{a}_us" in r}
                if not kernels:
                    kernels = {r[f"path_{mode}"].split()[0]: r[f"fused_{mode}_us"]}
                best = min(kernels, key=kernels.get)
                if kernels[best] >= r[f"unfused_{mode}_us"]:
                    path, why = UNFUSED_PATH, f"unfused {r[f'unfused_{mode}_us']} us <= fused {kernels[best]} us"
                else:
                    path, why = best, f"{best} {kernels[best]} us vs unfused {r[f'unfused_{mode}_us']} us"
                decisions.append((r["tokens"], path, why))
            low = 1
            for i, (tokens, path, why) in enumerate(decisions):
                if i + 1 < len(decisions) and decisions[i + 1][1] == path:
                    continue  # merge with the next measured token count
                rules.append({
                    "id": f"w{w}-h{hidden}-{mode}-{low}-{tokens}", "path": path, "quant": [mode], "world_sizes": [w],
                    "hidden": [hidden], "min_tokens": low, "max_tokens": tokens,
                    "reason": f"measured at {tokens} tokens: {why}",
                })  # fmt: skip
                low = tokens + 1
    rules.extend(rule.to_dict() for rule in DEFAULT_FUSION_RULES)  # a bare default dropped their hand-made rules
    return {"rules": rules}


def _key(row: dict) -> tuple[int, int, int]:
    return row["world_size"], row["hidden"], row["tokens"]


def _token_ranges(gap: list[int], grid: tuple[int, ...]) -> str:
    """``[4, 8, 16, 512]`` of the grid 1, 2, 4, ... 512 -> ``"4-16, 512"`` (runs of consecutive grid points)."""
    runs: list[list[int]] = []
    for t in gap:
        if runs and grid.index(t) == grid.index(runs[-1][-1]) + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def missing_shapes(record: dict, parts: tuple[str, ...] = ("virtual", "mps")) -> str:
    """The shapes of the full grid (W 2, 4, 8; hidden 4096, 8192; the default token counts of each part in
    ``parts``) that ``record`` holds no row for, one phrase per (part, W, hidden); empty when it is whole."""
    phrases = []
    for part, tokens in (("virtual", TOKENS), ("mps", MPS_TOKENS)):
        if part not in parts:
            continue
        have = {_key(r) for r in record.get(part, [])}
        for w in WORLD_SIZES:
            for hidden in HIDDEN:
                gap = [t for t in tokens if (w, hidden, t) not in have]
                if gap:
                    phrases.append(f"{PART_LABEL[part]} W = {w} hidden {hidden} at {_token_ranges(gap, tokens)} tokens")
    return "; ".join(phrases)


def measured_shapes(sections: dict) -> str:
    """What a run measured, per part and (W, hidden): ``"virtual ranks: W = 4 hidden 8192 at 4-512 tokens"``."""
    phrases = []
    for part, grid in (("virtual", TOKENS), ("mps", MPS_TOKENS)):
        rows = sections.get(part) or []
        for w, hidden in sorted({(r["world_size"], r["hidden"]) for r in rows}):
            got = sorted(r["tokens"] for r in rows if (r["world_size"], r["hidden"]) == (w, hidden))
            on_grid = all(t in grid for t in got)
            spread = _token_ranges(got, grid) if on_grid else ", ".join(map(str, got))
            phrases.append(f"{PART_LABEL[part]} W = {w} hidden {hidden} at {spread} tokens")
    return "; ".join(phrases)


def merge_record(base: dict, sections: dict, run: dict) -> dict:
    """``base`` with ``sections``' rows in place of the shapes they measured: targets and rules recomputed over
    all rows, ``run`` (this run's provenance) added to ``meta.runs``, ``meta.not_measured`` / ``meta.complete``
    said of the full grid.  Where this run replaced every row of ``base``, the record's provenance (commit, dirty
    flag, date, command, versions, timing) is this run's alone."""
    meta = dict(base["meta"])
    runs = list(meta.get("runs") or [{k: meta[k] for k in ("command", "commit", "dirty", "date", "device")
                                       if k in meta}])  # fmt: skip
    kept = [r for part in ("virtual", "mps") for r in base.get(part, [])
            if _key(r) not in {_key(n) for n in sections.get(part) or []}]  # fmt: skip
    replaced = bool(run.get("rows")) and not kept
    if replaced:  # every row is this run's: the record has its provenance, not that of the runs it replaced
        meta = {k: v for k, v in meta.items() if k not in ("runs", *PROVENANCE_KEYS)}
        meta.update({k: run[k] for k in PROVENANCE_KEYS if k in run})
        runs = [run]
    meta["runs"] = runs
    if run.get("rows") and not replaced:  # a run that measured nothing (nothing was missing) leaves it as it was
        runs.append(run)
        meta["command"] = f"{meta['command']}; {run['command']} ({run['rows']}, at commit {str(run['commit'])[:7]})"
        flags = [r.get("dirty") for r in runs]  # the record's flag covers every run: dirty if any tree was
        meta["dirty"] = True if True in flags else None if None in flags else False
    merged: dict = {}
    for part in ("virtual", "mps"):
        new = sections.get(part) or []
        keys = {_key(r) for r in new}
        rows = sorted([r for r in base.get(part, []) if _key(r) not in keys] + new, key=_key)
        if rows:
            merged[part] = rows
    # The parts the record is of (a processes-only record stays one) and those this run measured.
    parts = tuple(p for p in ("virtual", "mps") if base.get(p) or sections.get(p))
    merged = _record(merged.get("virtual", []), merged.get("mps", []))
    gap = missing_shapes(merged, parts)
    meta["complete"] = not gap
    meta.pop("not_measured", None)
    if gap:
        meta["not_measured"] = gap
    return {"meta": meta, **merged}


def _record(virtual: list[dict], mps: list[dict]) -> dict:
    """The record's sections for the rows measured (a part with no rows has no section)."""
    record: dict = {}
    if virtual:
        record.update(virtual=virtual, targets_virtual=targets(virtual), derived_rules=derive_rules(virtual))
    if mps:
        record.update(mps=mps, targets_mps=targets(mps))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="record to write (JSON)")
    p.add_argument("--world-sizes", default="2,4,8")
    p.add_argument("--hidden", default="4096,8192")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="timed replays per figure")
    p.add_argument("--quick", action="store_true", help="the policy's paths only (no forced kernels): fewer compiles")
    p.add_argument("--mps", action="store_true", help="also W processes on the GPU (start MPS first)")
    p.add_argument("--no-virtual", action="store_true", help="with --mps: the processes only, no virtual ranks")
    p.add_argument("--mps-world-sizes", default="2,4,8")
    p.add_argument("--mps-tokens", default="1,16,64,128,512")
    merge_help = "write RECORD's rows with this run's in place of the shapes it measures to --out"
    p.add_argument("--merge-into", metavar="RECORD", help=merge_help)
    p.add_argument("--only-missing", action="store_true", help="with --merge-into: the shapes RECORD has no row for")
    args = p.parse_args(argv)
    if args.no_virtual and not args.mps:
        p.error("--no-virtual leaves nothing to measure without --mps")
    if args.only_missing and not args.merge_into:
        p.error("--only-missing needs --merge-into RECORD (the record whose missing shapes to measure)")
    base = None
    if args.merge_into:
        try:
            base = json.loads(Path(args.merge_into).read_text())
            base["meta"]["command"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--merge-into {args.merge_into}: not a record of this benchmark ({exc})")
    if not cuda_available():
        print("bench/fp8_fused_bench.py: needs a CUDA GPU (the ranks run on one)", file=sys.stderr)
        return 1
    if base is not None and base["meta"].get("device") != torch.cuda.get_device_name():
        print(f"bench/fp8_fused_bench.py: --merge-into {args.merge_into} holds {base['meta'].get('device')} rows, "
              f"this is {torch.cuda.get_device_name()}: one record, one device", file=sys.stderr)  # fmt: skip
        return 2
    args.world_sizes = [] if args.no_virtual else [int(v) for v in args.world_sizes.split(",")]
    args.hidden = [int(v) for v in args.hidden.split(",")]
    args.tokens = [int(v) for v in args.tokens.split(",")]
    args.mps_world_sizes = [int(v) for v in args.mps_world_sizes.split(",")] if args.mps else []
    args.mps_tokens = [int(v) for v in args.mps_tokens.split(",")]
    have = {part: {_key(r) for r in base.get(part, [])} for part in ("virtual", "mps")} if base else {}
    args.skip = have if args.only_missing else {"virtual": set(), "mps": set()}
    t0 = time.time()
    virtual: list[dict] = []
    mps: list[dict] = []
    parts = [("virtual", w) for w in args.world_sizes] + [("mps", w) for w in args.mps_world_sizes]
    done: list[tuple[str, int]] = []

    def save() -> dict:
        """The record of what is measured so far (written after every world size, so that a run stopped by a time
        limit leaves a record of the world sizes it finished; ``meta.complete`` says whether it is whole)."""
        record = _record(virtual, mps)
        left = [part for part in parts if part not in done]
        meta = provenance(
            torch.cuda.get_device_name(),
            seconds=round(time.time() - t0, 1),
            timing=f"time_graph: median of {args.reps} CUDA-graph replays of {args.calls} calls, per call; MPS rows: "
            "the slowest rank",
            dtype="bfloat16",
            static_scale=STATIC_SCALE,
            complete=not left,
        )
        if left:
            meta["not_measured"] = ", ".join(f"{PART_LABEL[kind]} W = {w}" for kind, w in left)
        if base is not None:
            run = {k: meta[k] for k in (*PROVENANCE_KEYS, "complete") if k in meta}
            run["rows"] = measured_shapes(record)
            merged = merge_record(base, record, run)
            write_record(args.out, merged.pop("meta"), **merged)
            return record
        write_record(args.out, meta, **record)
        return record

    def finished() -> None:
        done.append(parts[len(done)])  # the parts run in order: virtual world sizes, then MPS ones
        save()

    run_virtual(args, virtual, finished)
    run_mps(args, mps, finished)
    record = _record(virtual, mps)  # written whole after the last world size
    print(json.dumps({k: v for k, v in record.items() if k.startswith("targets")}))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
