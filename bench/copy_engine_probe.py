"""Copy-engine facts on real GPUs, one process per GPU (what the copy-engine GEMM + all-reduce path rests on).

Every rank maps its peers' workspace regions over CUDA IPC (the ``custom`` backend's workspace) and measures,
device time by CUDA events, slowest rank:

* ``pull``: ``local.copy_(peer_view)`` of S bytes (a DMA copy-engine transfer over NVLink), all ranks at once;
* ``pull_2streams``: the same bytes as two halves on two streams (do two engines add up?);
* ``sm_pull``: the same bytes pulled by an SM kernel (``torch`` elementwise copy from the peer view);
* ``gemm``: cuBLAS ``[M, K] @ [K, N]`` alone; ``gemm_with_pulls``: the GEMM on one stream while the pulls of
  the ``[M, N]`` output's peer half run on another (how much the copy engines slow the GEMM, and whether the
  copies finish under it).

    python bench/copy_engine_probe.py --out bench/results/2xh100/copy_engine_probe
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.custom_all_reduce_bench import run_meta, write_json  # noqa: E402
from tests.conftest import run_ranks  # noqa: E402


@triton.jit
def _spin_kernel(ns):
    start = tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,r", [tl.full([], 0, tl.int32)], dtype=tl.int64, is_pure=False, pack=1
    )
    now = start
    while now - start < ns:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [tl.full([], 0, tl.int32)], dtype=tl.int64, is_pure=False, pack=1
        )


def _time_us(fn, reps: int, barrier) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        barrier()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1000.0)
    return statistics.median(samples)


def _worker(rank: int, world_size: int, port: int, sizes_mb, m: int, n: int, reps: int) -> list[dict]:
    import torch.distributed as dist

    from sagellm_comm import CommBackend
    from sagellm_comm.kernels.all_reduce import PAD_BYTES
    from sagellm_comm.workspace import _tensor_at

    max_bytes = max(max(sizes_mb) << 20, m * n * 2)
    backend = CommBackend.create("custom", max_bytes=max_bytes).init(timeout=120)
    ws = backend.custom.workspace
    dev = backend.device
    peer = (rank + 1) % world_size

    def barrier():
        torch.cuda.synchronize()
        dist.barrier()

    def slowest(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    side = torch.cuda.Stream(dev)

    def size_row(mb: int) -> dict:
        numel = (mb << 20) // 2
        src = _tensor_at(ws.peer_ptrs[peer] + PAD_BYTES.value, numel, torch.bfloat16, dev, owner=ws)
        dst = torch.empty(numel, dtype=torch.bfloat16, device=dev)
        half = numel // 2

        def two():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            dst[:half].copy_(src[:half])
            with torch.cuda.stream(side):
                dst[half:].copy_(src[half:])
            cur.wait_stream(side)

        row = {"MB": mb}
        row["pull_us"] = slowest(_time_us(lambda: dst.copy_(src), reps, barrier))
        row["pull_2streams_us"] = slowest(_time_us(two, reps, barrier))
        row["sm_pull_us"] = slowest(_time_us(lambda: torch.add(src, 0, out=dst), reps, barrier))
        for key in ("pull", "pull_2streams", "sm_pull"):
            row[key + "_GBps"] = (mb << 20) / row[key + "_us"] / 1e3
        return row

    rows = [size_row(mb) for mb in sizes_mb]
    k = 14336 // world_size
    a = torch.randn(m, k, device=dev).to(torch.bfloat16)
    b = torch.randn(k, n, device=dev).to(torch.bfloat16)
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    numel = m * n // world_size
    src = _tensor_at(ws.peer_ptrs[peer] + PAD_BYTES.value, numel, torch.bfloat16, dev, owner=ws)
    dst = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    gemm = slowest(_time_us(lambda: torch.matmul(a, b, out=out), reps, barrier))
    pulls = slowest(_time_us(lambda: dst.copy_(src), reps, barrier))

    def together():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for c in range(4):  # the pipeline's 2 x (W-1)/W of the output, in 4 chunks
                q = numel // 4
                dst[c * q : (c + 1) * q].copy_(src[c * q : (c + 1) * q])
                dst[c * q : (c + 1) * q].copy_(src[c * q : (c + 1) * q])
        torch.matmul(a, b, out=out)
        cur.wait_stream(side)

    both = slowest(_time_us(together, reps, barrier))
    local_src = torch.empty_like(dst)

    def beside(copy):
        def fn():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            torch.matmul(a, b, out=out)  # enqueued first: the copies start while it runs
            with torch.cuda.stream(side):
                copy()
            cur.wait_stream(side)

        return fn

    after = slowest(_time_us(beside(lambda: dst.copy_(src)), reps, barrier))
    local = slowest(_time_us(beside(lambda: dst.copy_(local_src)), reps, barrier))
    sm = slowest(_time_us(beside(lambda: torch.add(src, 0, out=dst)), reps, barrier))

    # Chunked GEMM, each chunk's peer partial pulled by the copy engines once it is done (the pipeline's
    # data movement with no SM work on the side stream).
    chunks = 8
    rows_c = m // chunks

    def chunked(pull: bool):
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        for c in range(chunks):
            torch.matmul(a[c * rows_c : (c + 1) * rows_c], b, out=out[c * rows_c : (c + 1) * rows_c])
            if pull:
                ev = torch.cuda.Event()
                ev.record(cur)
                side.wait_event(ev)
                q = 2 * numel // chunks
                with torch.cuda.stream(side):
                    big_dst[c * q : (c + 1) * q].copy_(big_src[c * q : (c + 1) * q])
        cur.wait_stream(side)

    big_src = _tensor_at(ws.peer_ptrs[peer] + PAD_BYTES.value, 2 * numel, torch.bfloat16, dev, owner=ws)
    big_dst = torch.empty(2 * numel, dtype=torch.bfloat16, device=dev)
    gemm_chunks = slowest(_time_us(lambda: chunked(False), reps, barrier))
    gemm_chunks_pull = slowest(_time_us(lambda: chunked(True), reps, barrier))

    # Do the copies need SMs?  Fill every SM with spinning programs for ~2 ms, pull 16 MB beside them.
    spin_ns = 2_000_000
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    small = 8 << 20
    e0, e_pull, e_spin = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    _spin_kernel[(sms * 16,)](spin_ns, num_warps=4)  # compile outside the timing
    torch.cuda.synchronize()
    cur = torch.cuda.current_stream()
    e0.record(cur)
    side.wait_stream(cur)
    _spin_kernel[(sms * 16,)](spin_ns, num_warps=4)
    with torch.cuda.stream(side):
        dst[:small].copy_(src[:small])
        e_pull.record(side)
    e_spin.record(cur)
    cur.wait_stream(side)
    torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.matmul(a, b, out=out)
        dst.copy_(src)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    rows.append(
        {
            "M": m,
            "N": n,
            "K_shard": k,
            "gemm_us": gemm,
            "pull_out_share_us": pulls,
            "gemm_with_2x_pulls_us": both,
            "gemm_slowdown": both / gemm,
            "gemm_then_pull_beside_us": after,
            "gemm_then_local_copy_beside_us": local,
            "gemm_then_sm_pull_beside_us": sm,
            "gemm_8_chunks_us": gemm_chunks,
            "gemm_8_chunks_with_pulls_us": gemm_chunks_pull,
            "pull_16MB_during_spin_done_at_us": e0.elapsed_time(e_pull) * 1000.0,
            "spin_done_at_us": e0.elapsed_time(e_spin) * 1000.0,
            "cuda_kernels": names,
        }
    )
    backend.destroy()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", default="1,4,16,64,128")
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    results = run_ranks(_worker, args.world_size, sizes, args.m, args.n, args.reps, timeout=600, env=env)
    meta = run_meta()
    write_json(args.out + ".json", {"meta": meta, "rows": results[0]})
    for row in results[0]:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
