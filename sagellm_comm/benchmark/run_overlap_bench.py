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
from sagellm_comm.benchmark.timing import _cycles_per_us, percentile, time_iterations
from sagellm_comm.errors import CollectiveFailedError, CommError, InvalidArgumentError

DEFAULT_OUTPUT_DIR = ".benchmarks/overlap"
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 10
GPU_DEFAULTS = {"comm_sizes": "1M,16M,64M", "compute_duration_ms": 2.0, "gemm_size": 4096, "dtype": "bfloat16"}
CPU_DEFAULTS = {"comm_sizes": "64K,1M", "compute_duration_ms": 20.0, "gemm_size": 128, "dtype": "float32"}
MAX_HOLD_US = 50_000.0
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
        self.group = CommGroup(backend)
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

    def calibrate(self, target_ms: float) -> None:
        """Same GEMM count on every rank: from the slowest rank's time of one GEMM."""
        self.gemm_iters = 1
        one_us = _median(time_iterations(self.compute, iters=5, warmup=2, device=self.device, barrier=self.barrier))
        (slowest_us,) = _max_over_ranks(self.backend, [one_us])
        self.gemm_iters = max(1, round(target_ms * 1e3 / max(slowest_us, 1e-3)))

    def measure(self, nbytes: int, warmup: int, iters: int) -> list[float]:
        from sagellm_comm.overlap import all_reduce_async

        numel = max(1, nbytes // self.dtype.itemsize)
        comm = torch.empty(numel, device=self.device, dtype=self.dtype)
        rank, world_size = self.backend.rank, self.backend.world_size
        expected = float(world_size * (world_size + 1) // 2)
        fill = lambda: comm.fill_(float(rank + 1))  # noqa: E731 - a one-line reset

        compute_us = time_iterations(self.compute, iters=iters, warmup=warmup, device=self.device, barrier=self.barrier)
        comm_us = time_iterations(
            lambda: all_reduce_async(comm, self.group).wait(),
            iters=iters,
            warmup=warmup,
            device=self.device,
            reset=fill,
            barrier=self.barrier,
        )

        host_us = []
        for _ in range(max(1, warmup)):  # warm-up of the overlapped pattern; sizes the device hold
            fill()
            self.barrier()
            begin = time.perf_counter_ns()
            handle = all_reduce_async(comm, self.group)
            self.compute()
            handle.wait()
            host_us.append((time.perf_counter_ns() - begin) / 1e3)
        if self.cuda:
            hold_us = min(MAX_HOLD_US, 100.0 + 2.0 * _median(host_us))
            hold_cycles = int(hold_us * _cycles_per_us(self.device))
            marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
        submit, compute, wait, total, wrong = [], [], [], [], 0
        for i in range(iters):
            fill()
            self.barrier()
            if self.cuda:
                torch.cuda._sleep(hold_cycles)  # the host queues the iteration while the device spins
                marks[i][0].record()
                t0 = time.perf_counter_ns()
                handle = all_reduce_async(comm, self.group)
                submit.append((time.perf_counter_ns() - t0) / 1e6)
                self.compute()
                marks[i][1].record()
                handle.wait()
                marks[i][2].record()
            else:
                t0 = time.perf_counter_ns()
                handle = all_reduce_async(comm, self.group)
                t1 = time.perf_counter_ns()
                self.compute()
                t2 = time.perf_counter_ns()
                handle.wait()
                t3 = time.perf_counter_ns()
                submit.append((t1 - t0) / 1e6)
                compute.append((t2 - t1) / 1e6)
                wait.append((t3 - t2) / 1e6)
                total.append((t3 - t0) / 1e6)
            self.sync()
            wrong = max(wrong, int((comm != expected).sum()))
        if self.cuda:
            compute = [m[0].elapsed_time(m[1]) for m in marks]
            wait = [m[1].elapsed_time(m[2]) for m in marks]
            total = [m[0].elapsed_time(m[2]) for m in marks]
        medians = [
            _median(compute_us) / 1e3,
            _median(comm_us) / 1e3,
            _median(submit),
            _median(wait),
            _median(compute),
            _median(total),
            float(wrong),
        ]
        return _max_over_ranks(self.backend, medians)


def _device_name(device: torch.device) -> str:
    from sagellm_comm.benchmark.runner import device_name

    return device_name(device)


def measure_overlap(backend: Any, config: OverlapConfig) -> OverlapResult:
    """Run the benchmark on this rank of an initialised ``backend`` (every rank calls it)."""
    cuda = backend.device.type == "cuda"
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    sizes = config.comm_sizes or parse_size_list(defaults["comm_sizes"])
    target = float(config.compute_duration_ms or defaults["compute_duration_ms"])
    bench = _RankBench(backend, config, defaults)
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
                world_size=backend.world_size,
                timing_method=timing,
                device_name=_device_name(backend.device),
                warmup_iters=config.warmup,
                benchmark_iters=config.iters,
                timestamp=stamp,
                **derive(compute_alone, comm_alone, total),
            )
        )
    run = {"backend_kind": backend.name, "world_size": backend.world_size, "timing_method": timing}
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
    from sagellm_comm.benchmark.report import output_stem
    from sagellm_comm.benchmark.runner import git_commit, package_version

    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = output_stem("overlap", int(result.run.get("world_size", 0)), stamp)
    suffix = 1
    while (directory / f"{stem}.json").exists():
        suffix += 1
        stem = f"{output_stem('overlap', int(result.run.get('world_size', 0)), stamp)}_{suffix}"
    result.run.update(package_version=package_version(), git_commit=git_commit(), torch_version=torch.__version__)
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
    )
    _check(config)
    if not isinstance(backend, str):
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
