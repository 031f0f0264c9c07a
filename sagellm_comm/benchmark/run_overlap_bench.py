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
import os
import sys
from typing import Any

import torch

from sagellm_comm.benchmark.ops import resolve_dtype
from sagellm_comm.benchmark.overlap_measure import _VirtualWorld, measure_overlap
from sagellm_comm.benchmark.overlap_results import (
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_WARMUP,
    GPU_DEFAULTS,
    OVERLAP_FIELDS,
    OverlapConfig,
    OverlapRecord,
    OverlapResult,
    derive,
    format_overlap_table,
    write_overlap_results,
)
from sagellm_comm.benchmark.run_bench import OneLineParser, run_reporting
from sagellm_comm.benchmark.sizes import parse_size, parse_size_list
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
from sagellm_comm.errors import InvalidArgumentError


def _run_rank(config: OverlapConfig, rank: int | None, world_size: int | None, port: int | None) -> OverlapResult:
    from sagellm_comm.backend import get_comm_backend

    backend = get_comm_backend(config.backend)
    backend.init(rank=rank, world_size=world_size, master_addr=MASTER_ADDR if port else None, master_port=port,
                 timeout=config.timeout)  # fmt: skip
    try:
        return measure_overlap(backend, config)
    finally:
        backend.destroy()


def _spawned_rank(index: int, world_size: int, port: int, config: OverlapConfig) -> OverlapResult:
    return _run_rank(config, index, world_size, port)


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
    return spawn_ranks(_spawned_rank, (config,), config.world_size or 2, what="overlap benchmark")


# ============================================================================ CLI


def build_parser(prog: str = "python -m sagellm_comm.benchmark.run_overlap_bench") -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    result, status = run_reporting(
        parser,
        lambda: run_overlap_benchmark(
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
        ),
    )
    if status is not None:
        return status
    if result is not None and result.json_path is not None:
        print(f"# wrote {result.json_path} and {result.csv_path}")
    return 0 if result is None or all(r.num_wrong == 0 for r in result.records) else 1


__all__ = [
    "OVERLAP_FIELDS",
    "OverlapConfig",
    "OverlapRecord",
    "OverlapResult",
    "build_parser",
    "derive",
    "format_overlap_table",
    "main",
    "measure_overlap",
    "run_overlap_benchmark",
    "write_overlap_results",
]


if __name__ == "__main__":
    sys.exit(main())
