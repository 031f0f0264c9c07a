"""Python cost of ``CommBackend.all_reduce`` on the custom backend's kernel path, the kernel call stubbed.

Runs anywhere: two CPU processes, Gloo, the kernels' launcher replaced by a no-op, so what is timed is the
backend's own dispatch (checks, policy lookup, bookkeeping) on top of ``CustomAllReduce.all_reduce``::

    python bench/backend_wrapper_cost.py            # prints us per call of each rank
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from tests.conftest import run_ranks  # noqa: E402


def _worker(rank: int, world_size: int, port: int, calls: int) -> float:
    from sagellm_comm import CommBackend

    backend = CommBackend.create("custom", max_bytes=1 << 20)
    backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port)
    try:
        backend.custom.all_reduce = lambda t, out=None, algo="auto": t  # stub: the wrapper alone
        x = torch.ones(4096, dtype=torch.bfloat16)  # 8 KB
        for _ in range(1000):
            backend.all_reduce(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            backend.all_reduce(x)
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        backend.destroy()


if __name__ == "__main__":
    per_rank = run_ranks(_worker, 2, 20_000, timeout=300, env={"TRITON_INTERPRET": "1"})
    print("CommBackend.all_reduce wrapper, us per call (8 KB bf16, kernel stubbed):", [f"{v:.2f}" for v in per_rank])
