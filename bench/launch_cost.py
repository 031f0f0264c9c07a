"""Where the eager host time of one all-reduce call goes, on this machine.

Times, per call (median of ``--reps``, host clock around the call; nothing synchronises inside the loop):

* ``all_reduce_<algo>``: ``CustomAllReduce.all_reduce`` of 8 KB bf16, one rank of a virtual group (every
  rank's kernel is launched, rank after rank, so no kernel waits forever), each call on a rank stream that
  was just made to wait for the main stream (``wait_stream``: an event record and wait per call);
* ``all_reduce_<algo>_no_stream_waits``: the same, each rank issuing on its own stream with no cross-stream
  waits (what a real rank does on its current stream);
* ``all_reduce_stacked_<algo>``: ``VirtualRankGroup.all_reduce_stacked`` (all ranks, one launch);
* ``all_reduce_lamport_[no_]pdl_interleaved``: the Lamport call with and without programmatic dependent
  launch (Hopper), in alternating blocks, median of the block medians;
* ``python_side``: ``all_reduce`` with the cached C launcher replaced by a no-op (validation, policy lookup,
  argument packing);
* ``triton_direct``: our cached launcher (Triton's generated C launcher) on a trivial Triton kernel;
* ``triton_plain``: ``kernel[grid](...)`` on the same trivial kernel (Triton's Python launch path);
* ``cuLaunchKernel_ctypes``: the CUDA driver's ``cuLaunchKernel`` called through ctypes with pre-built
  arguments on a trivial NVRTC kernel (the driver floor plus ~0.3 us of ctypes);
* ``cupy_rawkernel``: the same kernel through CuPy's ``RawKernel.__call__``;
* ``torch_add``: ``a.add_(1.0)`` on 8 KB;
* ``graph_replay``: ``CUDAGraph.replay()`` of a graph holding one trivial kernel.

    python bench/launch_cost.py --out bench/results/launch_cost_h100.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.custom_all_reduce_bench import run_meta, write_json  # noqa: E402
from sagellm_comm.custom_all_reduce import _direct_launch  # noqa: E402
from sagellm_comm.virtual import VirtualRankGroup  # noqa: E402


@triton.jit
def _touch(x, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x + offs, tl.load(x + offs, mask=offs < n) + 1.0, mask=offs < n)


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
        if len(times) % 256 == 0:
            torch.cuda.synchronize()  # keep the launch queue from filling (a full queue blocks the host)
    torch.cuda.synchronize()
    return statistics.median(times) / 1e3


def _per_rank_us(vg: VirtualRankGroup, xs: list, algo: str, reps: int, cross_wait: bool) -> float:
    """Median host time of one rank's ``all_reduce`` call, every rank calling in turn on its own stream.

    ``cross_wait``: each rank's stream first waits for the main stream (an event record and wait per call)
    and the main stream joins all ranks after each round; otherwise each rank just issues on its stream.
    """
    cur = torch.cuda.current_stream()
    times = []
    for i in range(reps // vg.world_size):
        for r in range(vg.world_size):
            if cross_wait:
                vg.streams[r].wait_stream(cur)
            with torch.cuda.stream(vg.streams[r]):
                t0 = time.perf_counter_ns()
                vg.ranks[r].all_reduce(xs[r], algo=algo)
                times.append(time.perf_counter_ns() - t0)
        if cross_wait:
            for r in range(vg.world_size):
                cur.wait_stream(vg.streams[r])
        if i % 128 == 0:
            torch.cuda.synchronize()  # keep the launch queue from filling
    torch.cuda.synchronize()
    vg.check_errors()
    return statistics.median(times) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--algos", default="one_shot,lamport")
    ap.add_argument("--out", default="bench/results/launch_cost.json")
    args = ap.parse_args()
    res: dict[str, float] = {}
    numel = 4096  # 8 KB of bf16

    vg = VirtualRankGroup(args.world, "cuda:0", max_bytes=1 << 20)
    xs = [torch.randn(numel, device="cuda", dtype=torch.bfloat16) for _ in range(args.world)]
    for algo in args.algos.split(","):
        for _ in range(10):
            vg.all_reduce(xs, algo=algo)
        torch.cuda.synchronize()
        res[f"all_reduce_{algo}"] = _per_rank_us(vg, xs, algo, args.reps, cross_wait=True)
        # Each rank issues a batch on its own stream with no cross-stream waits (as a real rank does on its
        # current stream); call i of every rank pairs up on the GPU.
        res[f"all_reduce_{algo}_no_stream_waits"] = _per_rank_us(vg, xs, algo, args.reps, cross_wait=False)
        stacked = torch.stack(xs)
        call = lambda a=algo, x=stacked: vg.all_reduce_stacked(x, algo=a)  # noqa: E731
        res[f"all_reduce_stacked_{algo}"] = _median_us(call, args.reps)
        vg.check_errors()
    res["all_reduce_auto"] = _per_rank_us(vg, xs, "auto", args.reps, cross_wait=True)
    if any(r._launcher.pdl for r in vg.ranks):
        # The Lamport call with and without programmatic dependent launch, interleaved in blocks so that
        # both see the same host noise (each launcher keeps one plan cache per setting).
        on = [dict(r._launcher.cache) for r in vg.ranks]
        off = [{} for _ in vg.ranks]
        pairs = {True: [], False: []}
        for _ in range(10):
            for pdl in (True, False):
                for r, rank in enumerate(vg.ranks):
                    rank._launcher.pdl = pdl
                    rank._launcher.cache = on[r] if pdl else off[r]
                pairs[pdl].append(_per_rank_us(vg, xs, "lamport", max(vg.world_size, args.reps // 10), True))
        for r, rank in enumerate(vg.ranks):
            rank._launcher.pdl, rank._launcher.cache = True, on[r]
        res["all_reduce_lamport_pdl_interleaved"] = statistics.median(pairs[True])
        res["all_reduce_lamport_no_pdl_interleaved"] = statistics.median(pairs[False])
    # Python alone: the cached plans' C launcher replaced by a no-op.
    cache = vg.ranks[0]._launcher.cache
    saved = dict(cache)
    for key, (_, programs, tail) in saved.items():
        cache[key] = (lambda *a: None, programs, tail)
    res["python_side"] = _median_us(lambda: vg.ranks[0].all_reduce(xs[0], algo="one_shot"), args.reps)
    res["python_side_auto"] = _median_us(lambda: vg.ranks[0].all_reduce(xs[0]), args.reps)
    cache.update(saved)
    vg.close()

    a = torch.randn(numel, device="cuda", dtype=torch.float32)
    compiled = _touch[(4,)](a, numel, BLOCK=1024)
    fast = _direct_launch(compiled)
    stream = torch._C._cuda_getCurrentRawStream(0)
    ptr = a.data_ptr()
    res["triton_direct"] = _median_us(lambda: fast(4, 1, stream, (ptr, numel, 1024)), args.reps)
    res["triton_plain"] = _median_us(lambda: _touch[(4,)](a, numel, BLOCK=1024), args.reps)
    res["torch_add"] = _median_us(lambda: a.add_(1.0), args.reps)

    try:
        import cupy

        kern = cupy.RawKernel(
            r'extern "C" __global__ void touch(float* x, int n) {'
            r" int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] += 1.0f; }",
            "touch",
        )
        xc = cupy.asarray(a)  # shares memory through __cuda_array_interface__
        n32 = cupy.int32(numel)
        with cupy.cuda.ExternalStream(stream):
            kern((4,), (1024,), (xc, n32))
            res["cupy_rawkernel"] = _median_us(lambda: kern((4,), (1024,), (xc, n32)), args.reps)
        libcuda = ctypes.CDLL("libcuda.so.1")
        launch = libcuda.cuLaunchKernel
        launch.restype = ctypes.c_int
        launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        p = ctypes.c_void_p(ptr)
        n = ctypes.c_int(numel)
        params = (ctypes.c_void_p * 2)(
            ctypes.cast(ctypes.byref(p), ctypes.c_void_p), ctypes.cast(ctypes.byref(n), ctypes.c_void_p)
        )
        fn = ctypes.c_void_p(kern.kernel.ptr)
        st = ctypes.c_void_p(stream)
        rc = launch(fn, 4, 1, 1, 1024, 1, 1, 0, st, params, None)
        assert rc == 0, f"cuLaunchKernel returned {rc}"
        res["cuLaunchKernel_ctypes"] = _median_us(
            lambda: launch(fn, 4, 1, 1, 1024, 1, 1, 0, st, params, None), args.reps
        )
        nop = ctypes.CDLL(None).getpid  # the ctypes call overhead alone
        nop.restype = ctypes.c_int
        res["ctypes_call_overhead"] = _median_us(nop, args.reps)
    except Exception as exc:  # CuPy or libcuda missing: report, keep the rest
        res["cupy_error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]

    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _touch[(4,)](a, numel, BLOCK=1024)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        _touch[(4,)](a, numel, BLOCK=1024)
    res["graph_replay"] = _median_us(g.replay, args.reps)
    torch.cuda.synchronize()

    for k, v in res.items():
        print(f"{k:24s} {v:8.2f} us" if isinstance(v, float) else f"{k:24s} {v}")
    write_json(args.out, {"meta": run_meta(world_size=args.world, bytes=numel * 2), "us_per_call": res})


if __name__ == "__main__":
    main()
