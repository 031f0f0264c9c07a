"""Quick device smoke: correctness + rough timings of the custom all-reduce with virtual ranks."""

import sys
import time

import torch
import triton

sys.path.insert(0, ".")
from sagellm_comm.virtual import VirtualRankGroup  # noqa: E402

dev = torch.device("cuda:0")
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(dev))
for W in (2, 4, 8):
    vg = VirtualRankGroup(W, dev, max_bytes=64 << 20, timeout_s=60)
    for algo in ("one_shot", "two_shot"):
        for n in (1, 7, 4096, 100_003, 1 << 20, 8 << 20):
            for dt in (torch.bfloat16, torch.float32):
                if n * W * 4 > (1 << 31):
                    continue
                ins = [torch.randn(n, device=dev).to(dt) for _ in range(W)]
                ref = torch.stack([i.float() for i in ins]).sum(0)
                xs = [i.clone() for i in ins]
                vg.all_reduce(xs, algo=algo)
                torch.cuda.synchronize()
                vg.check_errors()
                err = (xs[0].float() - ref).abs().max().item()
                same = all(torch.equal(xs[0], x) for x in xs[1:])
                tol = 1e-5 * W if dt == torch.float32 else 0.02 * ref.abs().max().item() / 4 + 0.05
                status = "ok" if (err <= max(tol, 1e-4) and same) else "FAIL"
                print(f"W={W} {algo} n={n} {dt} maxerr={err:.3g} identical={same} {status}")
    # timing: eager host time per call at 8KB, and graph replay device time
    n = 4096
    xs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(W)]
    for algo in ("one_shot", "two_shot"):
        for _ in range(20):
            vg.all_reduce(xs, algo=algo)
        torch.cuda.synchronize()
        host = 0.0
        cur = torch.cuda.current_stream()
        for _ in range(100):
            for r in range(W):
                vg.streams[r].wait_stream(cur)
                with torch.cuda.stream(vg.streams[r]):
                    t0 = time.perf_counter()
                    vg.ranks[r].all_reduce(xs[r], algo=algo)
                    host += time.perf_counter() - t0
            for r in range(W):
                cur.wait_stream(vg.streams[r])
        torch.cuda.synchronize()
        print(f"W={W} {algo} 8KB eager host time per rank call: {host / (100 * W) * 1e6:.2f} us")
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            vg.all_reduce(xs, algo=algo)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(50):
                vg.all_reduce(xs, algo=algo)
        g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        vg.check_errors()
        print(f"W={W} {algo} 8KB graph device time per call: {e0.elapsed_time(e1) * 1000 / 1000:.2f} us")
        t0 = time.perf_counter()
        for _ in range(100):
            vg.all_reduce(xs, algo=algo)
        torch.cuda.synchronize()
        print(f"W={W} {algo} 8KB eager wall per group call: {(time.perf_counter() - t0) * 1e4:.1f} us")
    vg.close()
