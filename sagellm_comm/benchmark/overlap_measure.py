"""One rank of the overlap benchmark: compute alone, communication alone, both overlapped.

The timing method is described in ``run_overlap_bench``'s docstring."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.benchmark.measure import reduce_across_ranks
from sagellm_comm.benchmark.ops import count_wrong, dtype_name, rank_pattern, reference_output, resolve_dtype
from sagellm_comm.benchmark.overlap_results import (
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    OverlapConfig,
    OverlapRecord,
    OverlapResult,
    derive,
)
from sagellm_comm.benchmark.progress import ProgressBar
from sagellm_comm.benchmark.sizes import format_size, parse_size_list
from sagellm_comm.benchmark.timing import Marks, hold, percentile
from sagellm_comm.errors import InvalidArgumentError

MAX_HOLD_US = 50_000.0
MAX_MARKS = 4
CALIBRATION_GEMMS = 8


def _median(values: list[float]) -> float:
    return percentile(sorted(values), 50.0)


class _RankBench:
    """The measurement on one rank (every rank runs the same calls in the same order)."""

    def __init__(self, backend: Any, config: OverlapConfig, defaults: dict):
        from sagellm_comm.group import CommGroup

        self.backend = backend
        self.virtual = getattr(backend, "virtual_group", None)
        self.group = CommGroup(backend) if self.virtual is None else None
        self.device = backend.device
        self.cuda = self.device.type == "cuda"
        self.config = config
        self.dtype = resolve_dtype(config.dtype or defaults["dtype"])
        if not self.dtype.is_floating_point:
            raise InvalidArgumentError(f"the GEMM needs a floating-point dtype, got {self.dtype}")
        size = config.gemm_size or defaults["gemm_size"]
        generator = torch.Generator(device="cpu").manual_seed(1234 + backend.rank)
        self.a = torch.randn(size, size, generator=generator).to(self.device, self.dtype)
        self.b = torch.randn(size, size, generator=generator).to(self.device, self.dtype) / size**0.5
        self.c = torch.empty(size, size, device=self.device, dtype=self.dtype)
        self.gemm_shape = f"{size}x{size}x{size}"
        self.gemm_iters = 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.sync()
        self.backend.barrier()

    def compute(self) -> None:
        for _ in range(self.gemm_iters):
            torch.matmul(self.a, self.b, out=self.c)

    def _iterations(self, body, iters: int, warmup: int, reset=None) -> list[list[float]]:
        """Run ``body(mark)`` ``warmup`` + ``iters`` times; return each timed run's intervals (ms).

        ``body`` calls ``mark()`` at its timing points; interval ``j`` is mark ``j`` -> mark ``j + 1``
        (:class:`~sagellm_comm.benchmark.timing.Marks`: CUDA events on the current stream, else the host
        clock).  Every iteration starts with ``reset`` and a barrier, so rank skew from the previous
        iteration is not timed; on CUDA a device-side spin (sized from the warm-up's host time) is queued
        first so the host's submission is off the device timeline.  Nothing is allocated between the marks
        by this loop.
        """
        marks = Marks(self.device if self.cuda else None, MAX_MARKS)
        host_us, samples = [], []
        for i in range(warmup + iters):
            if reset is not None:
                reset()
            self.barrier()
            if self.cuda and i >= warmup:
                hold(min(MAX_HOLD_US, 100.0 + 2.0 * (_median(host_us) if host_us else 1000.0)), self.device)
            marks.start()
            begin = time.perf_counter_ns()
            body(marks.mark)
            host_us.append((time.perf_counter_ns() - begin) / 1e3)
            self.sync()
            if i >= warmup:
                samples.append(marks.intervals_ms())
        return samples

    def calibrate(self, target_ms: float) -> None:
        """Same GEMM count on every rank: from the slowest rank's time per GEMM in a loop of
        ``CALIBRATION_GEMMS`` (a single GEMM is dominated by launch and cache effects)."""
        self.gemm_iters = CALIBRATION_GEMMS
        loop_ms = _median([s[0] for s in self._iterations(self._timed_compute, iters=5, warmup=2)])
        (slowest_ms,) = reduce_across_ranks(self.backend, [loop_ms / CALIBRATION_GEMMS], dist.ReduceOp.MAX)
        self.gemm_iters = max(1, round(target_ms / max(slowest_ms, 1e-6)))

    def _timed_compute(self, mark) -> None:
        mark()
        self.compute()
        mark()

    def _submit(self, buffers: list[torch.Tensor]) -> Any:
        """Start the all-reduce of ``buffers`` (one per rank of this process) on the side stream."""
        from sagellm_comm.overlap import all_reduce_async, comm_stream, start_on_side_stream

        if self.virtual is None:
            return all_reduce_async(buffers[0], self.group)
        # As all_reduce_async does, for the N ranks of this process; the group forks to the rank streams and
        # joins back into the side stream.
        return start_on_side_stream(lambda: self.virtual.all_reduce(buffers), buffers, comm_stream(self.device))

    def measure(self, nbytes: int, warmup: int, iters: int) -> list[float]:
        """Medians (then maxima over ranks, the slowest rank's) of: compute alone, comm alone, submit, wait, compute
        overlapped, total; then the number of wrong elements after the overlapped all-reduce, summed over ranks
        (as ``sagellm-comm bench`` counts them)."""
        numel = max(1, nbytes // self.dtype.itemsize)
        if self.virtual is None:  # this process's rank
            ranks, own = self.backend.world_size, [self.backend.rank]
        else:  # every virtual rank's buffer lives in this process
            ranks = self.virtual.world_size
            own = list(range(ranks))
        # bench's inputs: every element of every rank differs, so a sum landed at another index is counted wrong
        sources = [rank_pattern(numel, r, self.dtype, self.device) for r in own]
        buffers = [source.clone() for source in sources]
        expected = reference_output("all_reduce", numel, own[0], ranks, self.dtype, self.device)

        def fill() -> None:
            for buffer, source in zip(buffers, sources, strict=True):
                buffer.copy_(source)

        def comm_alone(mark) -> None:
            mark()
            self._submit(buffers).wait()
            mark()

        submit_ms: list[float] = []
        wrong = 0

        def overlapped(mark) -> None:
            nonlocal wrong
            mark()
            begin = time.perf_counter_ns()
            handle = self._submit(buffers)
            submit_ms.append((time.perf_counter_ns() - begin) / 1e6)
            mark()
            self.compute()
            mark()
            handle.wait()
            mark()

        compute_alone = self._iterations(self._timed_compute, iters, warmup)
        comm_only = self._iterations(comm_alone, iters, warmup, reset=fill)
        both = self._iterations(overlapped, iters, warmup, reset=fill)
        self.sync()
        wrong = sum(count_wrong(b, expected) for b in buffers)  # the last overlapped iteration's result
        medians = [
            _median([s[0] for s in compute_alone]),
            _median([s[0] for s in comm_only]),
            _median(submit_ms[warmup:]),
            _median([s[2] for s in both]),  # wait: compute done -> all-reduce joined
            _median([s[1] for s in both]),  # compute while the all-reduce runs
            _median([sum(s) for s in both]),  # submit + compute + wait (device: submit ~ 0)
        ]
        slowest = reduce_across_ranks(self.backend, medians, dist.ReduceOp.MAX)
        (total_wrong,) = reduce_across_ranks(self.backend, [float(wrong)], dist.ReduceOp.SUM)
        return [*slowest, total_wrong]


class _VirtualWorld:
    """N virtual ranks (the custom kernels, one stream per rank, one GPU) seen as the benchmark's backend.

    One process holds every rank, so there is nothing to reduce across processes and no host barrier;
    ``virtual_group`` is the :class:`~sagellm_comm.virtual.VirtualRankGroup` that runs the all-reduce.
    """

    rank = 0
    world_size = 1  # processes
    is_initialized = True

    def __init__(self, virtual_ranks: int, max_bytes: int):
        from sagellm_comm.virtual import VirtualRankGroup

        self.virtual_group = VirtualRankGroup(virtual_ranks, max_bytes=max_bytes)
        self.virtual_ranks = virtual_ranks
        self.device = self.virtual_group.device
        self.name = f"custom ({virtual_ranks} virtual ranks on one GPU)"

    def barrier(self) -> None:
        return None

    def destroy(self) -> None:
        self.virtual_group.close()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{device.type}: {platform.processor() or platform.machine()}"


def measure_overlap(backend: Any, config: OverlapConfig) -> OverlapResult:
    """Run the benchmark on this rank of an initialised ``backend`` (every rank calls it)."""
    cuda = backend.device.type == "cuda"
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    sizes = config.comm_sizes or parse_size_list(defaults["comm_sizes"])
    target = float(config.compute_duration_ms or defaults["compute_duration_ms"])
    bench = _RankBench(backend, config, defaults)
    ranks = getattr(backend, "virtual_ranks", backend.world_size)
    bench.calibrate(target)
    timing = (
        "cuda_events (GEMM loop on the current stream, all-reduce on a side stream)"
        if cuda
        else f"wall_clock + real matmul on CPU ({backend.name} all-reduce on its engine thread)"
    )
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    records = []
    bar = ProgressBar(len(sizes), enabled=config.progress and backend.rank == 0)
    for nbytes in sizes:
        compute_alone, comm_alone, submit, wait, compute, total, wrong = bench.measure(
            nbytes, config.warmup, config.iters
        )
        bar.step(format_size(nbytes))
        records.append(
            OverlapRecord(
                comm_bytes=nbytes,
                data_type=dtype_name(bench.dtype),
                gemm_shape=bench.gemm_shape,
                gemm_iters=bench.gemm_iters,
                compute_target_ms=target,
                compute_duration_ms=compute_alone,
                comm_duration_ms=comm_alone,
                comm_submit_ms=submit,
                comm_wait_ms=wait,
                compute_ms=compute,
                total_ms=total,
                num_wrong=int(wrong),
                backend_kind=backend.name,
                world_size=ranks,
                timing_method=timing,
                device_name=_device_name(backend.device),
                warmup_iters=config.warmup,
                benchmark_iters=config.iters,
                timestamp=stamp,
                **derive(compute_alone, comm_alone, total),
            )
        )
    bar.close()
    run = {"backend_kind": backend.name, "world_size": ranks, "timing_method": timing}
    return OverlapResult(records, run)
