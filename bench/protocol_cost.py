"""What the protocol costs at latency-bound sizes: 8 KB all-reduce under CUDA-graph replay and eager host time.

Measures whichever ``sagellm_comm`` is first on ``sys.path``, so one device call can run it on two trees
(``PYTHONPATH=<tree> python bench/protocol_cost.py --label before``) and compare them side by side:

* ``graph_us[W][algo]``: device time per call, virtual ranks ``W`` on one GPU, every rank in one launch
  (``all_reduce_stacked``), ``--calls`` calls captured in one CUDA graph; median over ``--reps`` replays
  timed with CUDA events, divided by the calls per graph.
* ``eager_host_us[algo]``: host time of one ``CustomAllReduce.all_reduce`` call (8 KB bf16, W = 2, each rank
  on its own stream, nothing synchronised inside the loop), median of ``--host-reps`` calls.
* ``check_graph_us`` (trees that have check mode): the same graph figure with ``SAGELLM_COMM_CHECK=1``.

    PYTHONPATH=. python bench/protocol_cost.py --label after --out $OUT/after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

NBYTES = 8 << 10
ALGOS = ("lamport", "one_shot", "two_shot")


def _graph_us(vg, algo: str, calls: int, reps: int) -> float:
    numel = NBYTES // 2
    x = torch.randn(vg.world_size, numel, device=vg.device).to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            vg.all_reduce_stacked(x, algo=algo)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            vg.all_reduce_stacked(x, algo=algo)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    vg.check_errors()
    return statistics.median(times)


def _eager_host_us(vg, algo: str, reps: int) -> float:
    numel = NBYTES // 2
    xs = [torch.randn(numel, device=vg.device).to(torch.bfloat16) for _ in range(vg.world_size)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--label", required=True, help="what tree this is (e.g. before / after)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=100, help="all-reduces per captured graph")
    parser.add_argument("--reps", type=int, default=25, help="graph replays timed")
    parser.add_argument("--host-reps", type=int, default=3000, help="eager calls timed")
    parser.add_argument("--worlds", default="2,8")
    args = parser.parse_args()

    import sagellm_comm
    from sagellm_comm.virtual import VirtualRankGroup

    result = {
        "label": args.label,
        "tree": os.path.dirname(os.path.abspath(sagellm_comm.__file__)),
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "nbytes": NBYTES,
        "graph_us": {},
        "eager_host_us": {},
    }
    for world in (int(w) for w in args.worlds.split(",")):
        with VirtualRankGroup(world, max_bytes=1 << 20) as vg:
            result["graph_us"][world] = {a: _graph_us(vg, a, args.calls, args.reps) for a in ALGOS}
            if world == 2:
                result["eager_host_us"] = {a: _eager_host_us(vg, a, args.host_reps) for a in ALGOS}
    try:
        from sagellm_comm.workspace import check_mode_from_env  # noqa: F401  (trees with check mode)
    except ImportError:
        pass
    else:
        os.environ["SAGELLM_COMM_CHECK"] = "1"
        result["check_graph_us"] = {}
        for world in (int(w) for w in args.worlds.split(",")):
            with VirtualRankGroup(world, max_bytes=1 << 20) as vg:
                assert vg.workspaces[0].check
                result["check_graph_us"][world] = {a: _graph_us(vg, a, args.calls, args.reps) for a in ALGOS}
        del os.environ["SAGELLM_COMM_CHECK"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
