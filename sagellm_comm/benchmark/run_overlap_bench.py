"""The compute/communication overlap benchmark: a real GEMM loop against a real all-reduce.

``python -m sagellm_comm.benchmark.run_overlap_bench`` or :func:`run_overlap_benchmark`.  For each
message size, on every rank:

1. **compute alone**: a loop of ``gemm_iters`` matmuls ``[g, g] @ [g, g]`` (``g = gemm_size``; the
   count is calibrated once so the loop takes about ``compute_duration_ms``, the same count on every
   rank) -> ``compute_duration_ms``.
2. **communication alone**: :func:`sagellm_comm.overlap.all_reduce_async` of ``comm_bytes`` then
   ``wait()`` -> ``comm_duration_ms``.
3. **overlapped**: submit the async all-reduce, run the GEMM loop, ``wait()`` -> ``comm_submit_ms``,
   ``compute_ms``, ``comm_wait_ms``, ``total_ms``; the reduced tensor is checked (``num_wrong``).

Timing: on CUDA, events on the current stream (the GEMMs run there, the all-reduce on the side
stream); a device-side spin is queued before each overlapped iteration so the host's submission is
off the device timeline.  On CPU (Gloo), the wall clock around real ``torch.matmul`` calls while Gloo
reduces on its own thread.  Every phase has warm-up, a barrier before each timed batch (and before each
overlapped iteration), and per-iteration samples; a field is the median over iterations, then the
maximum over ranks.  Field definitions: docs/layers.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sagellm_comm.benchmark.ops import dtype_name, resolve_dtype
from sagellm_comm.benchmark.sizes import format_size, parse_size, parse_size_list
from sagellm_comm.benchmark.timing import _cycles_per_us, percentile
from sagellm_comm.errors import CollectiveFailedError, CommError, InvalidArgumentError

DEFAULT_OUTPUT_DIR = ".benchmarks/overlap"
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 10
GPU_DEFAULTS = {"comm_sizes": "1M,16M,64M", "compute_duration_ms": 2.0, "gemm_size": 4096, "dtype": "bfloat16"}
CPU_DEFAULTS = {"comm_sizes": "64K,1M", "compute_duration_ms": 20.0, "gemm_size": 128, "dtype": "float32"}
MAX_HOLD_US = 50_000.0
MAX_MARKS = 4
CALIBRATION_GEMMS = 8
OVERLAP_FIELDS = (
    "comm_bytes",
    "compute_duration_ms",
    "comm_duration_ms",
    "comm_submit_ms",
    "comm_wait_ms",
    "compute_ms",
    "total_ms",
    "overlap_ratio",
    "overlap_efficiency",
    "theoretical_sequential_ms",
    "theoretical_overlap_ms",
)


@dataclass
class OverlapConfig:
    """A run's request (the CLI's options, same names)."""

    backend: str = "auto"
    world_size: int | None = None
    comm_sizes: list[int] | None = None  # None: GPU_DEFAULTS / CPU_DEFAULTS
    compute_duration_ms: float | None = None  # target of the GEMM loop alone
    gemm_size: int | None = None
    dtype: str | None = None
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    output_dir: str | None = DEFAULT_OUTPUT_DIR
    timeout: float = 120.0
    virtual_ranks: int | None = None  # N ranks of the custom kernels on one GPU, one process


@dataclass
class OverlapRecord:
    """One message size (definitions in docs/layers.md; times in milliseconds)."""

    comm_bytes: int
    data_type: str
    gemm_shape: str
    gemm_iters: int
    compute_target_ms: float
    compute_duration_ms: float
    comm_duration_ms: float
    comm_submit_ms: float
    comm_wait_ms: float
    compute_ms: float
    total_ms: float
    overlap_ratio: float
    overlap_efficiency: float
    theoretical_sequential_ms: float
    theoretical_overlap_ms: float
    num_wrong: int
    backend_kind: str
    world_size: int
    timing_method: str
    device_name: str
    warmup_iters: int
    benchmark_iters: int
    timestamp: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OverlapResult:
    records: list[OverlapRecord]
    run: dict = field(default_factory=dict)
    json_path: Path | None = None
    csv_path: Path | None = None

    @property
    def table(self) -> str:
        return format_overlap_table(self.records, self.run)


def derive(compute_duration_ms: float, comm_duration_ms: float, total_ms: float) -> dict[str, float]:
    """The derived fields from the measured ones (see docs/layers.md)."""
    sequential = compute_duration_ms + comm_duration_ms
    ideal = max(compute_duration_ms, comm_duration_ms)
    hideable = min(compute_duration_ms, comm_duration_ms)
    ratio = (sequential - total_ms) / hideable if hideable > 0 else 0.0
    return {
        "theoretical_sequential_ms": sequential,
        "theoretical_overlap_ms": ideal,
        "overlap_ratio": min(1.0, max(0.0, ratio)),
        "overlap_efficiency": ideal / total_ms if total_ms > 0 else 0.0,
    }


# ============================================================================ one rank


def _median(values: list[float]) -> float:
    return percentile(sorted(values), 50.0)


def _max_over_ranks(backend: Any, values: list[float]) -> list[float]:
    if backend.world_size == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=backend.cpu_group)
    return tensor.tolist()


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
        (CUDA: events on the current stream; CPU: wall clock).  Every iteration starts with ``reset``
        and a barrier, so rank skew from the previous iteration is not timed; on CUDA a device-side
        spin (sized from the warm-up's host time) is queued first so the host's submission is off the
        device timeline.  Nothing is allocated between the marks by this loop.
        """
        events = [torch.cuda.Event(enable_timing=True) for _ in range(MAX_MARKS)] if self.cuda else []
        stamps = [0] * MAX_MARKS
        count = 0

        def mark() -> None:
            nonlocal count
            if self.cuda:
                events[count].record()
            else:
                stamps[count] = time.perf_counter_ns()
            count += 1

        host_us, samples = [], []
        for i in range(warmup + iters):
            if reset is not None:
                reset()
            self.barrier()
            if self.cuda and i >= warmup:
                hold_us = min(MAX_HOLD_US, 100.0 + 2.0 * (_median(host_us) if host_us else 1000.0))
                torch.cuda._sleep(int(hold_us * _cycles_per_us(self.device)))
            count = 0
            begin = time.perf_counter_ns()
            body(mark)
            host_us.append((time.perf_counter_ns() - begin) / 1e3)
            self.sync()
            if i >= warmup:
                if self.cuda:
                    samples.append([events[j].elapsed_time(events[j + 1]) for j in range(count - 1)])
                else:
                    samples.append([(stamps[j + 1] - stamps[j]) / 1e6 for j in range(count - 1)])
        return samples

    def calibrate(self, target_ms: float) -> None:
        """Same GEMM count on every rank: from the slowest rank's time per GEMM in a loop of
        ``CALIBRATION_GEMMS`` (a single GEMM is dominated by launch and cache effects)."""
        self.gemm_iters = CALIBRATION_GEMMS
        loop_ms = _median([s[0] for s in self._iterations(self._timed_compute, iters=5, warmup=2)])
        (slowest_ms,) = _max_over_ranks(self.backend, [loop_ms / CALIBRATION_GEMMS])
        self.gemm_iters = max(1, round(target_ms / max(slowest_ms, 1e-6)))

    def _timed_compute(self, mark) -> None:
        mark()
        self.compute()
        mark()

    def _submit(self, buffers: list[torch.Tensor]) -> Any:
        """Start the all-reduce of ``buffers`` (one per rank of this process) on the side stream."""
        from sagellm_comm.overlap import AsyncAllReduce, all_reduce_async, comm_stream

        if self.virtual is None:
            return all_reduce_async(buffers[0], self.group)
        side = comm_stream(self.device)  # as all_reduce_async does, for the N ranks of this process
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.virtual.all_reduce(buffers)  # forks to the rank streams and joins back into `side`
            event = torch.cuda.Event()
            event.record(side)
        for buffer in buffers:
            buffer.record_stream(side)
        return AsyncAllReduce(buffers[0], event=event, stream=side)

    def measure(self, nbytes: int, warmup: int, iters: int) -> list[float]:
        """Medians (then maxima over ranks) of: compute alone, comm alone, submit, wait, compute
        overlapped, total, and the number of wrong elements after the overlapped all-reduce."""
        numel = max(1, nbytes // self.dtype.itemsize)
        if self.virtual is None:  # this process's rank
            buffers, values = [torch.empty(numel, device=self.device, dtype=self.dtype)], [self.backend.rank + 1]
            ranks = self.backend.world_size
        else:  # every virtual rank's buffer lives in this process
            ranks = self.virtual.world_size
            buffers = [torch.empty(numel, device=self.device, dtype=self.dtype) for _ in range(ranks)]
            values = list(range(1, ranks + 1))
        expected = float(ranks * (ranks + 1) // 2)

        def fill() -> None:
            for buffer, value in zip(buffers, values, strict=True):
                buffer.fill_(float(value))

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
        wrong = sum(int((b != expected).sum()) for b in buffers)  # the last overlapped iteration's result
        medians = [
            _median([s[0] for s in compute_alone]),
            _median([s[0] for s in comm_only]),
            _median(submit_ms[warmup:]),
            _median([s[2] for s in both]),  # wait: compute done -> all-reduce joined
            _median([s[1] for s in both]),  # compute while the all-reduce runs
            _median([sum(s) for s in both]),  # submit + compute + wait (device: submit ~ 0)
            float(wrong),
        ]
        return _max_over_ranks(self.backend, medians)


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
    for nbytes in sizes:
        compute_alone, comm_alone, submit, wait, compute, total, wrong = bench.measure(
            nbytes, config.warmup, config.iters
        )
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
    run = {"backend_kind": backend.name, "world_size": ranks, "timing_method": timing}
    return OverlapResult(records, run)


# ============================================================================ output


def format_overlap_table(records: list[OverlapRecord], run: dict) -> str:
    lines = [
        f"# sagellm-comm overlap bench: backend {run.get('backend_kind')}, world size {run.get('world_size')}",
        f"# timing: {run.get('timing_method')}; median over iterations, slowest rank; times in ms",
        "# seq = compute alone + comm alone; ideal = max of the two; ratio = hidden / min of the two; "
        "eff = ideal / total",
        f"#{'size':>8} {'gemm':>14} {'n':>5} {'compute':>9} {'comm':>9} {'submit':>8} {'comp|ovl':>9} "
        f"{'wait':>8} {'total':>9} {'seq':>9} {'ideal':>9} {'ratio':>6} {'eff':>6} {'#wrong':>7}",
    ]
    for r in records:
        lines.append(
            f" {format_size(r.comm_bytes):>8} {r.gemm_shape:>14} {r.gemm_iters:>5} {r.compute_duration_ms:>9.3f} "
            f"{r.comm_duration_ms:>9.3f} {r.comm_submit_ms:>8.3f} {r.compute_ms:>9.3f} {r.comm_wait_ms:>8.3f} "
            f"{r.total_ms:>9.3f} {r.theoretical_sequential_ms:>9.3f} {r.theoretical_overlap_ms:>9.3f} "
            f"{r.overlap_ratio:>6.2f} {r.overlap_efficiency:>6.2f} {r.num_wrong:>7}"
        )
    return "\n".join(lines)


def write_overlap_results(result: OverlapResult, output_dir: str | Path) -> None:
    """``overlap_ws<N>_<timestamp>.json`` (``{"run": ..., "results": [...]}``) and ``.csv``."""
    from sagellm_comm import __version__
    from sagellm_comm.benchmark.report import output_stem

    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = output_stem("overlap", int(result.run.get("world_size", 0)), stamp)
    suffix = 1
    while (directory / f"{stem}.json").exists():
        suffix += 1
        stem = f"{output_stem('overlap', int(result.run.get('world_size', 0)), stamp)}_{suffix}"
    result.run.update(package_version=__version__, torch_version=torch.__version__)
    result.json_path, result.csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    payload = {"run": result.run, "results": [r.to_dict() for r in result.records]}
    result.json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    with result.csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(OverlapRecord)])
        writer.writeheader()
        for r in result.records:
            writer.writerow(r.to_dict())


# ============================================================================ launch


def _run_rank(config: OverlapConfig, rank: int | None, world_size: int | None, port: int | None) -> OverlapResult:
    from sagellm_comm.backend import get_comm_backend

    backend = get_comm_backend(config.backend)
    backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1" if port else None, master_port=port,
                 timeout=config.timeout)  # fmt: skip
    try:
        return measure_overlap(backend, config)
    finally:
        backend.destroy()


def _spawn_entry(index: int, config: OverlapConfig, world_size: int, port: int, path: str) -> None:
    os.environ["LOCAL_RANK"] = str(index)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    result = _run_rank(config, index, world_size, port)
    if index == 0:
        with open(path, "wb") as handle:
            pickle.dump(result, handle)


def _check(config: OverlapConfig) -> None:
    if config.warmup < 0 or config.iters < 1:
        raise InvalidArgumentError(f"need warmup >= 0 and iters >= 1, got {config.warmup} and {config.iters}")
    if config.compute_duration_ms is not None and not config.compute_duration_ms > 0:
        raise InvalidArgumentError(f"compute_duration_ms must be > 0, got {config.compute_duration_ms}")
    if config.gemm_size is not None and config.gemm_size < 1:
        raise InvalidArgumentError(f"gemm_size must be >= 1, got {config.gemm_size}")
    if config.virtual_ranks is not None and not 2 <= config.virtual_ranks <= 8:
        raise InvalidArgumentError(f"virtual_ranks must be in 2..8, got {config.virtual_ranks}")
    if config.world_size is not None and config.world_size < 1:
        raise InvalidArgumentError(f"world_size must be >= 1, got {config.world_size}")
    if config.dtype is not None:
        resolve_dtype(config.dtype)


def run_overlap_benchmark(
    backend: Any = "auto",
    comm_sizes: list[int | str] | str | None = None,
    compute_duration_ms: float | None = None,
    gemm_size: int | None = None,
    *,
    dtype: str | None = None,
    world_size: int | None = None,
    virtual_ranks: int | None = None,
    warmup_iters: int = DEFAULT_WARMUP,
    benchmark_iters: int = DEFAULT_ITERS,
    output_dir: str | None = DEFAULT_OUTPUT_DIR,
    print_table: bool = False,
) -> OverlapResult | None:
    """Time a GEMM loop against an all-reduce, alone and overlapped (see the module docstring).

    Args:
        backend: a kind (spawns ``world_size`` processes, default 2, or joins torchrun's world), or
            an initialised :class:`~sagellm_comm.backend.CommBackend` (every rank calls; all get the result).
        comm_sizes: all-reduce sizes in bytes (ints, ``"1M"``, or ``"64K,1M"``).
        compute_duration_ms: target duration of the GEMM loop alone (calibrated once).
        gemm_size: ``g`` of the ``[g, g] @ [g, g]`` GEMMs.
        virtual_ranks: run the all-reduce on N virtual ranks of the custom kernels on this process's
            GPU (``backend`` is then ignored): a real multi-rank collective with one GPU.
        dtype: of the GEMM and the message (default bfloat16 on GPUs, float32 on CPU).
        output_dir: where rank 0 writes ``overlap_ws<N>_<timestamp>.json/.csv``; None writes nothing.

    Returns:
        The :class:`OverlapResult` (None on non-zero torchrun ranks).
    """
    if isinstance(comm_sizes, str):
        sizes = parse_size_list(comm_sizes)
    elif comm_sizes is not None:
        sizes = [parse_size(s) if isinstance(s, str) else int(s) for s in comm_sizes]
    else:
        sizes = None
    config = OverlapConfig(
        backend=backend if isinstance(backend, str) else "instance",
        world_size=world_size,
        comm_sizes=sizes,
        compute_duration_ms=compute_duration_ms,
        gemm_size=gemm_size,
        dtype=dtype,
        warmup=warmup_iters,
        iters=benchmark_iters,
        output_dir=output_dir,
        virtual_ranks=virtual_ranks,
    )
    _check(config)
    if config.virtual_ranks is not None:
        if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
            raise InvalidArgumentError("--virtual-ranks needs a CUDA GPU (the custom kernels run on it)")
        world = _VirtualWorld(
            config.virtual_ranks, max(config.comm_sizes or parse_size_list(GPU_DEFAULTS["comm_sizes"]))
        )
        try:
            result, is_rank0 = measure_overlap(world, config), True
        finally:
            world.destroy()
    elif not isinstance(backend, str):
        if not getattr(backend, "is_initialized", False):
            raise InvalidArgumentError("run_overlap_benchmark(backend=...) needs an initialised CommBackend")
        result, is_rank0 = measure_overlap(backend, config), backend.rank == 0
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        result, is_rank0 = _run_rank(config, None, None, None), int(os.environ["RANK"]) == 0
        if not is_rank0:
            return None
    else:
        result, is_rank0 = _spawn(config), True
    if is_rank0 and output_dir is not None:
        write_overlap_results(result, output_dir)
    if is_rank0 and print_table:
        print(result.table)
    return result


def _spawn(config: OverlapConfig) -> OverlapResult:
    import socket

    import torch.multiprocessing as mp

    world_size = config.world_size or 2
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sagellm-overlap-") as tmp:
        path = os.path.join(tmp, "rank0.pkl")
        try:
            mp.start_processes(
                _spawn_entry, args=(config, world_size, port, path), nprocs=world_size, start_method="spawn"
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise CollectiveFailedError(f"an overlap benchmark rank failed:\n{exc}") from None
        with open(path, "rb") as handle:
            return pickle.load(handle)


# ============================================================================ CLI


def build_parser(prog: str = "python -m sagellm_comm.benchmark.run_overlap_bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Time a GEMM loop against an all-reduce, alone and overlapped (docs/layers.md)."
    )
    parser.add_argument("--backend", default="auto", help="backend kind (default: auto; Gloo without a GPU)")
    parser.add_argument("--world-size", type=int, help="processes to spawn when not under torchrun (default 2)")
    parser.add_argument(
        "--comm-sizes", metavar="SIZE[,SIZE...]", help="all-reduce sizes (default: 1M,16M,64M GPU; 64K,1M CPU)"
    )
    parser.add_argument("--virtual-ranks", type=int, help="N ranks of the custom kernels on one GPU (2..8)")
    parser.add_argument("--compute-ms", type=float, dest="compute_duration_ms", help="target GEMM loop time")
    parser.add_argument("--gemm-size", type=int, help="g of the [g,g]@[g,g] GEMMs (default 4096 GPU, 128 CPU)")
    parser.add_argument("--dtype", help="bfloat16/float16/float32 (default bfloat16 GPU, float32 CPU)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default {DEFAULT_OUTPUT_DIR}")
    parser.add_argument("--no-output", action="store_true", help="write no JSON/CSV files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_overlap_benchmark(
            args.backend,
            args.comm_sizes,
            args.compute_duration_ms,
            args.gemm_size,
            dtype=args.dtype,
            world_size=args.world_size,
            virtual_ranks=args.virtual_ranks,
            warmup_iters=args.warmup,
            benchmark_iters=args.iters,
            output_dir=None if args.no_output else args.output_dir,
            print_table=True,
        )
    except InvalidArgumentError as exc:
        parser.error(exc.message)
    except CommError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None and result.json_path is not None:
        print(f"# wrote {result.json_path} and {result.csv_path}")
    return 0 if result is None or all(r.num_wrong == 0 for r in result.records) else 1


if __name__ == "__main__":
    sys.exit(main())
