"""Where the time of one small GPU transfer goes: our ``ipc`` write against the mechanisms under it, one GPU.

One process, two ``ipc`` agents on one GPU (the same kernel, mappings and notification ring as between two
processes), one 16 KB block.  Each *path* is timed request by request from the initiator's call to the moment
the same thread sees the transfer finished, with a 0.2 ms spin between requests (the ``busy`` pacing of
``sagellm-comm transfer``); the paths are interleaved over ``--rounds`` rounds and each figure is the median
over all of them:

* ``ipc_notify``: ``agent.write(..., notify=...)`` between agents with the resident copier (the default on a GPU,
  named here: ``options={"ipc": {"resident": True}}``), then polling the receiving agent's ``notifications()``
  (the caller's stream is idle: the block goes to the resident copier);
* ``ipc_done``: the same without a notification, then polling the handle's ``done()``;
* ``ipc_launch_notify``: ``ipc_notify`` between agents made with ``options={"ipc": {"resident": False}}``: one
  kernel launch per request;
* ``torch_copy``: ``dst.copy_(src)`` and a CUDA event, then polling the event (a torch op per request);
* ``raw_launch``: a CUDA kernel launched through CuPy that copies the block and stores a flag in pinned host
  memory, then polling the flag (a launch per request with nothing around it);
* ``resident``: a kernel already running polls a doorbell word in pinned host memory; the host writes the
  doorbell and polls the flag (no launch per request: the floor of a design with a resident kernel).

``host_us`` is how long the call that starts the request took (the doorbell store for ``resident``).  Then the
parts of our ``write()``, each called alone ``--calls`` times (median): a whole ``write()`` with and without a
notification on either path, the peer's liveness check, staging the notification in the ring, and, of the
launch path, the stream fork (event record + stream wait), the compiled kernel's direct launch, the completion
event's record, an event query, and an empty ``notifications()``::

    python -m bench.transfer_latency --out bench/results/h200/transfer_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.results import device_name
from sagellm_comm.benchmark.timing import summarize

BLOCK = 16384
PAUSE_S = 2e-4
IDLE_NS = 2_000_000_000  # the resident kernel exits after this long without a request (or when told to stop)
STOP = 2**64 - 1

_KERNELS = r"""
__device__ unsigned long long now_ns() {
    unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

extern "C" __global__ void copy_then_flag(const int4* src, int4* dst, int n16, volatile unsigned long long* flag,
                                          unsigned long long value) {
    for (int i = threadIdx.x + blockIdx.x * blockDim.x; i < n16; i += blockDim.x * gridDim.x) dst[i] = src[i];
    __syncthreads();
    if (threadIdx.x == 0) { __threadfence_system(); *flag = value; }
}

extern "C" __global__ void resident_copy(const int4* src, int4* dst, int n16, volatile unsigned long long* bell,
                                         volatile unsigned long long* flag, unsigned long long idle_ns) {
    __shared__ unsigned long long request;
    if (threadIdx.x == 0) request = *bell;  // requests up to this one are old
    __syncthreads();
    unsigned long long seen = request, last = now_ns();
    __syncthreads();
    while (true) {
        if (threadIdx.x == 0) {
            unsigned long long b;
            do { b = *bell; } while (b == seen && now_ns() - last < idle_ns);
            request = b;
        }
        __syncthreads();
        unsigned long long r = request;
        __syncthreads();
        if (r == seen || r == ~0ull) break;
        for (int i = threadIdx.x; i < n16; i += blockDim.x) dst[i] = src[i];
        __syncthreads();
        if (threadIdx.x == 0) { __threadfence_system(); *flag = r; }
        seen = r; last = now_ns();
    }
}
"""


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Paths:
    """Every path of the module docstring, set up once: ``run(name)`` times one request, ``(host_us, seen_us)``."""

    def __init__(self):
        import cupy

        from sagellm_comm.transfer import TransferAgent

        copier = {"ipc": {"resident": True}}
        self.a = TransferAgent("latency-a", "ipc", options=copier)
        self.b = TransferAgent("latency-b", "ipc", options=copier)
        self.pool_a = self.a.allocate("kv", 64 * BLOCK, torch.uint8, "cuda")
        self.pool_b = self.b.allocate("kv", 64 * BLOCK, torch.uint8, "cuda")
        self.peer = self.a.add_peer(self.b.metadata())
        self.b.add_peer(self.a.metadata())
        launches = {"ipc": {"resident": False}}
        self.c = TransferAgent("latency-c", "ipc", options=launches)
        self.d = TransferAgent("latency-d", "ipc", options=launches)
        self.c.allocate("kv", 64 * BLOCK, torch.uint8, "cuda")
        self.d.allocate("kv", 64 * BLOCK, torch.uint8, "cuda")
        self.launch_peer = self.c.add_peer(self.d.metadata())
        self.d.add_peer(self.c.metadata())
        self.blocks = [(3 * BLOCK, 5 * BLOCK, BLOCK)]
        self.src, self.dst = self.pool_a[:BLOCK], self.pool_b[:BLOCK]
        generator = torch.Generator(device="cuda").manual_seed(7)
        self.pool_a.copy_(torch.randint(0, 256, self.pool_a.shape, generator=generator, dtype=torch.uint8,
                                        device="cuda"))  # fmt: skip
        self.event = torch.cuda.Event()
        module = cupy.RawModule(code=_KERNELS)
        self.copy_then_flag = module.get_function("copy_then_flag")
        self.resident_copy = module.get_function("resident_copy")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.host = cupy.cuda.alloc_pinned_memory(4096)
        self.words = np.frombuffer(self.host, dtype=np.uint64, count=512)
        self.words[:] = 0
        self.bell_addr, self.flag_addr = self.host.ptr, self.host.ptr + 64 * 8  # apart: two cache lines
        self.request = 0
        self.cp_src = cupy.asarray(self.src)
        self.cp_dst = cupy.asarray(self.dst)
        self.resident_running = False

    def run(self, name: str) -> tuple[float, float]:
        return getattr(self, name)()

    def ipc_notify(self):
        return self._notified(self.a, self.b, self.peer)

    def ipc_launch_notify(self):
        return self._notified(self.c, self.d, self.launch_peer)

    def _notified(self, sender, receiver, peer):
        """One notifying ``write()`` from ``sender``: its host time and when ``receiver`` saw it (us)."""
        t0 = time.perf_counter_ns()
        sender.write(peer, "kv", "kv", self.blocks, notify=b"latency")
        t1 = time.perf_counter_ns()
        while not receiver.notifications():
            pass
        return (t1 - t0) / 1e3, (time.perf_counter_ns() - t0) / 1e3

    def ipc_done(self):
        t0 = time.perf_counter_ns()
        handle = self.a.write(self.peer, "kv", "kv", self.blocks)
        t1 = time.perf_counter_ns()
        while not handle.done():
            pass
        return (t1 - t0) / 1e3, (time.perf_counter_ns() - t0) / 1e3

    def torch_copy(self):
        t0 = time.perf_counter_ns()
        self.dst.copy_(self.src)
        self.event.record()
        t1 = time.perf_counter_ns()
        while not self.event.query():
            pass
        return (t1 - t0) / 1e3, (time.perf_counter_ns() - t0) / 1e3

    def raw_launch(self):
        self.request += 1
        value, flag = self.request, self.words[64:65]
        t0 = time.perf_counter_ns()
        self.copy_then_flag((2,), (256,), (self.cp_src, self.cp_dst, np.int32(BLOCK // 16), np.uint64(self.flag_addr),
                                           np.uint64(value)), stream=self.stream)  # fmt: skip
        t1 = time.perf_counter_ns()
        while flag[0] != value:
            pass
        return (t1 - t0) / 1e3, (time.perf_counter_ns() - t0) / 1e3

    def resident(self):
        if not self.resident_running:
            self.words[0] = self.words[64] = self.request  # the kernel starts from the doorbell's value
            args = (self.cp_src, self.cp_dst, np.int32(BLOCK // 16), np.uint64(self.bell_addr),
                    np.uint64(self.flag_addr), np.uint64(IDLE_NS))  # fmt: skip
            self.resident_copy((1,), (256,), args, stream=self.stream)
            self.resident_running = True
            time.sleep(0.01)
        self.request += 1
        value, bell, flag = self.request, self.words[0:1], self.words[64:65]
        t0 = time.perf_counter_ns()
        bell[0] = value
        t1 = time.perf_counter_ns()
        while flag[0] != value:
            pass
        return (t1 - t0) / 1e3, (time.perf_counter_ns() - t0) / 1e3

    def stop_resident(self):
        if self.resident_running:
            self.words[0] = STOP
            self.stream.synchronize()
            self.resident_running = False

    def parts(self, calls: int) -> dict:
        """The parts of one ``write()`` with a notification, each called alone (median microseconds)."""
        self.c.write(self.launch_peer, "kv", "kv", self.blocks).wait(30)  # the launch plan without a notification
        entry = self.c._peers[self.launch_peer]
        backend, link = entry.backend, entry.link
        rt, events = backend.events.rt, backend.events
        caller = torch._C._cuda_getCurrentRawStream(backend.index)
        fast, values = next(plan for shape, plan in link.plans.items() if shape[-1])  # a plan without notification
        programs = backend.cuts[BLOCK][2]

        def stage():
            link.outbox.stage(b"latency")
            link.outbox.unstage()

        def record():
            events.reuse(events.record())

        parts = {
            "write_no_notify": lambda: self.a.write(self.peer, "kv", "kv", self.blocks),
            "launch_write_no_notify": lambda: self.c.write(self.launch_peer, "kv", "kv", self.blocks),
            "liveness_check": lambda: backend._check_alive(link),
            "ring_stage": stage,
            "stream_fork": lambda: events.follow(caller),
            "direct_launch": lambda: fast(programs, 1, backend.raw_stream, values),
            "event_record": record,
            "event_query": lambda: rt.eventQuery(events.fork),
            "notifications_empty": self.b.notifications,
        }
        written = [0]

        def notifying(agent, peer, receiver):
            def write_notify():  # every 32 calls the last one is waited for and the receiver drains: the ring holds 64
                handle = agent.write(peer, "kv", "kv", self.blocks, notify=b"latency")
                written[0] += 1
                if written[0] % 32 == 0:
                    handle.wait(30)
                    receiver.notifications()

            return write_notify

        parts["write_notify"] = notifying(self.a, self.peer, self.b)
        parts["launch_write_notify"] = notifying(self.c, self.launch_peer, self.d)
        out = {}
        for name, call in parts.items():
            for _ in range(100):
                call()
            samples = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                call()
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            torch.cuda.synchronize()
            self.b.notifications()
            self.d.notifications()
            out[name] = statistics.median(samples)
        return out

    def close(self):
        self.stop_resident()
        torch.cuda.synchronize()
        for agent in (self.a, self.b, self.c, self.d):
            agent.close()


PATHS = ("ipc_notify", "ipc_done", "ipc_launch_notify", "torch_copy", "raw_launch", "resident")


def path_stats(host: list[float], seen: list[float]) -> dict:
    """One path's figures from its per-request samples (microseconds): the medians of the host call and of the time
    to seeing it finished, and the 10th and 90th percentiles of the latter, as every other record's (linear,
    :func:`sagellm_comm.benchmark.timing.summarize`)."""
    stats = summarize(seen)
    return {"host_us": summarize(host).median_us, "seen_us": stats.median_us, "seen_p10_us": stats.p10_us,
            "seen_p90_us": stats.p90_us, "samples": stats.samples}  # fmt: skip


def measure(requests: int, rounds: int, calls: int) -> dict:
    paths = _Paths()
    try:
        for name in PATHS:  # compile and warm every path
            for _ in range(50):
                paths.run(name)
                _spin(PAUSE_S)
            if name == "resident":
                paths.stop_resident()
        samples = {name: ([], []) for name in PATHS}
        for _ in range(rounds):
            for name in PATHS:
                host, seen = samples[name]
                for _ in range(requests):
                    h, s = paths.run(name)
                    host.append(h)
                    seen.append(s)
                    _spin(PAUSE_S)
                if name == "resident":
                    paths.stop_resident()
        ok = bool(torch.equal(paths.dst, paths.src))
        result = {}
        for name, (host, seen) in samples.items():
            result[name] = one = path_stats(host, seen)
            print(f"{name:11s} host {one['host_us']:6.2f} us, seen {one['seen_us']:6.2f} us "
                  f"(p10 {one['seen_p10_us']:.2f}, p90 {one['seen_p90_us']:.2f})", flush=True)  # fmt: skip
        parts = paths.parts(calls)
        for name, value in parts.items():
            print(f"  {name:20s} {value:6.2f} us", flush=True)
        return {"paths": result, "write_parts_us": parts, "copied_bytes_match": ok}
    finally:
        paths.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    parser.add_argument("--requests", type=int, default=100, help="requests per path and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the paths interleaved")
    parser.add_argument("--calls", type=int, default=2000, help="calls per part of write()")
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.calls) < 1:
        parser.error("requests, rounds and calls must be at least 1")
    if not torch.cuda.is_available():
        print("bench/transfer_latency.py: needs a CUDA GPU (the ipc transport and the raw kernels run on one)",
              file=sys.stderr)  # fmt: skip
        return 1
    results = measure(args.requests, args.rounds, args.calls)
    meta = provenance(f"{device_name(torch.device('cuda'))} (one process)", block_bytes=BLOCK, pause_s=PAUSE_S,
                      timing="per request, initiator's clock from the call to seeing it finished; median")  # fmt: skip
    print(f"wrote {write_record(args.out, meta, **results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
