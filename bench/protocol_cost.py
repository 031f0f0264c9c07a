"""What the protocol costs at latency-bound sizes: 8 KB all-reduce under CUDA-graph replay and eager host time.

Measures this checkout's ``sagellm_comm`` and, with ``--baseline COMMIT``, the library as it was at that
commit of this checkout's git history, interleaved in the same process (same GPU state, same timer), so a
change's cost is read side by side.  The baseline tree is extracted with ``git archive`` into a temporary
directory and imported as ``base_comm``: its package and every import of it are renamed, so no module of this
checkout runs in its place.  Figures, each the median over ``--rounds`` interleaved rounds:

* ``graph_us``: device time per call, virtual ranks ``W`` on one GPU, every rank in one launch
  (``all_reduce_stacked``), ``--calls`` calls captured in one graph, timed by
  ``sagellm_comm.benchmark.timing.time_graph``;
* ``eager_host_us``: host time of one ``CustomAllReduce.all_reduce`` call (8 KB bf16, W = 2, each rank on
  its own stream, nothing synchronised inside the loop), median of ``--host-reps`` calls;
* ``check_graph_us`` (this checkout only): ``graph_us`` with check mode on (``SAGELLM_COMM_CHECK=1``);
* ``large_graph_us``: the same timer at ``--large-bytes`` (256 MB bf16 per rank, W = 8, ``auto``).

    python -m bench.protocol_cost --baseline <commit> --out bench/results/h200/protocol_cost.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.timing import time_graph

NBYTES = 8 << 10
ALGOS = ("lamport", "one_shot", "two_shot")
BASELINE_PACKAGE = "base_comm"


def baseline_tree(commit: str, root: Path) -> str:
    """Extract ``sagellm_comm`` at ``commit`` (of the git checkout holding this script) under ``root`` as the
    package ``base_comm``, with every absolute import of the package renamed, and load it (its modules import as
    ``base_comm.*``); returns the package name.  Raises ``SystemExit`` naming the commit when git cannot."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "sagellm_comm"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"bench/protocol_cost.py: cannot read commit {commit!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    package = root / BASELINE_PACKAGE
    (root / "sagellm_comm").rename(package)
    name = re.compile(r"\bsagellm_comm\b")
    for source in package.rglob("*.py"):
        source.write_text(name.sub(BASELINE_PACKAGE, source.read_text()))
    spec = importlib.util.spec_from_file_location(
        BASELINE_PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_PACKAGE] = module
    spec.loader.exec_module(module)
    return BASELINE_PACKAGE


def _graph_us(vg, algo: str, calls: int, iters: int) -> float:
    x = torch.randn(vg.world_size, NBYTES // 2, device=vg.device).to(torch.bfloat16)
    samples = time_graph(lambda: vg.all_reduce_stacked(x, algo=algo), device=vg.device, calls=calls, iters=iters)
    vg.check_errors()
    return statistics.median(samples)


def _large_graph_us(package: str, nbytes: int) -> float:
    virtual = importlib.import_module(f"{package}.virtual")
    with virtual.VirtualRankGroup(8, max_bytes=nbytes) as vg:
        x = torch.randn(8, nbytes // 2, device=vg.device).to(torch.bfloat16)
        samples = time_graph(lambda: vg.all_reduce_stacked(x, algo="auto"), device=vg.device, calls=2, iters=5)
        vg.check_errors()
    torch.cuda.empty_cache()
    return statistics.median(samples)


def _eager_host_us(vg, algo: str, reps: int) -> float:
    xs = [torch.randn(NBYTES // 2, device=vg.device).to(torch.bfloat16) for _ in range(vg.world_size)]
    streams = [torch.cuda.Stream() for _ in range(vg.world_size)]
    times = []
    for i in range(reps + 50):
        for r, car in enumerate(vg.ranks):
            with torch.cuda.stream(streams[r]):
                t0 = time.perf_counter_ns()
                car.all_reduce(xs[r], algo=algo)
                elapsed = time.perf_counter_ns() - t0
            if i >= 50 and r == 0:
                times.append(elapsed / 1000.0)
        if i % 64 == 0:
            torch.cuda.synchronize()  # keep the launch queue from filling (a full queue blocks the host)
    torch.cuda.synchronize()
    vg.check_errors()
    return statistics.median(times)


def _measure(package: str, worlds: list[int], args, check: bool = False) -> dict:
    virtual = importlib.import_module(f"{package}.virtual")
    os.environ["SAGELLM_COMM_CHECK"] = "1" if check else "0"
    try:
        out = {"graph_us": {}, "eager_host_us": {}}
        for world in worlds:
            with virtual.VirtualRankGroup(world, max_bytes=1 << 20) as vg:
                out["graph_us"][str(world)] = {a: _graph_us(vg, a, args.calls, args.iters) for a in ALGOS}
                if world == 2 and not check:
                    out["eager_host_us"] = {a: _eager_host_us(vg, a, args.host_reps) for a in ALGOS}
        return out
    finally:
        os.environ.pop("SAGELLM_COMM_CHECK", None)


def _median_of(rounds: list[dict]) -> dict:
    """Element-wise median of nested dicts of floats."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: _median_of([r[k] for r in rounds]) for k in first}
    return round(statistics.median(rounds), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    parser.add_argument("--baseline", metavar="COMMIT", help="a commit of this checkout to measure beside it")
    parser.add_argument("--worlds", default="2,8")
    parser.add_argument("--calls", type=int, default=100, help="all-reduces per captured graph")
    parser.add_argument("--iters", type=int, default=20, help="graph replays timed per round")
    parser.add_argument("--host-reps", type=int, default=2000, help="eager calls timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (baseline, current, ...)")
    parser.add_argument("--large-bytes", type=int, default=256 << 20, help="the large size (0: skip it)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/protocol_cost.py: needs a CUDA GPU (the virtual ranks run on one)", file=sys.stderr)
        sys.exit(1)
    worlds = [int(w) for w in args.worlds.split(",")]
    scratch = tempfile.TemporaryDirectory(prefix="protocol_cost-")
    package = None
    if args.baseline:
        package = baseline_tree(args.baseline, Path(scratch.name))
    current, baseline, check = [], [], []
    for _ in range(args.rounds):
        if package:
            baseline.append(_measure(package, worlds, args))
        current.append(_measure("sagellm_comm", worlds, args))
        check.append(_measure("sagellm_comm", worlds, args, check=True)["graph_us"])
    result = {"nbytes": NBYTES, "rounds": args.rounds, "current": _median_of(current)}
    result["current"]["check_graph_us"] = _median_of(check)
    if args.baseline:
        result["baseline"] = {"commit": args.baseline, **_median_of(baseline)}
    if args.large_bytes:
        result["large_bytes"] = args.large_bytes
        for name, tree in (("baseline", package), ("current", "sagellm_comm")):
            if tree:
                result[name]["large_graph_us"] = round(_large_graph_us(tree, args.large_bytes), 1)
    meta = provenance(torch.cuda.get_device_name(0), timing="sagellm_comm.benchmark.timing.time_graph")
    write_record(args.out, meta, **result)
    print(result)


if __name__ == "__main__":
    main()
