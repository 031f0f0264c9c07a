"""What a ``sagellm-comm transfer`` run is asked to do (:class:`TransferBenchConfig`) and its checks
(:func:`plan_transfer`), made before any process starts; every problem is one
:class:`~sagellm_comm.errors.InvalidArgumentError` naming it (the CLI prints one line and exits 2).

Backends measured side by side (each over the same two processes and pools):

* ``ipc``: ``TransferAgent(backend="ipc")`` with its defaults: one block-copy kernel launch per request over CUDA
  IPC mappings, one block of up to 64 KB served by the resident copier on a GPU (under the Triton interpreter on
  the CPU: correctness, not speed).
* ``ipc-launch``: the same agent with the resident copier off (``options={"ipc": {"resident": False}}``): one
  launch for every request.
* ``nixl``: ``TransferAgent(backend="nixl")``: our agent over NIXL.
* ``nixl-raw``: NIXL's own API with the same descriptors (the reference for our agent's overhead).
* ``torch``: torch ops over a mapping of the peer's pool: ``index_select`` + ``index_copy_`` for scattered
  blocks, ``copy_`` for one block (the CUDA IPC mapping on GPUs, the shared file on the CPU).
* ``copy-engine``: one ``cudaMemcpyAsync`` per block over the same CUDA IPC mapping (DMA copy engines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sagellm_comm.benchmark.plan import (
    MAX_REPETITIONS,
    check_outputs,
    check_repetitions,
    check_run_device,
    check_settings,
    check_writable_dir,
    cuda_available,
)
from sagellm_comm.benchmark.sizes import format_size, parse_count_list, parse_size_list
from sagellm_comm.errors import InvalidArgumentError

BACKENDS = ("ipc", "ipc-launch", "nixl", "nixl-raw", "torch", "copy-engine")
OPS = ("write", "read")
DEFAULT_GPU_BACKENDS = ("ipc", "torch", "copy-engine", "nixl")
DEFAULT_CPU_BACKENDS = ("nixl", "nixl-raw", "torch")
DEFAULT_GPU_SIZES = "4K,16K,64K,256K,1M"
DEFAULT_CPU_SIZES = "4K,16K,64K,256K"
DEFAULT_COUNTS = "1,100,1000"
DEFAULT_CPU_COUNTS = "1,10,100"
DEFAULT_GPU_MAX_BYTES = 1 << 30
DEFAULT_CPU_MAX_BYTES = 64 << 20
MAX_ROUNDS = 1000
DEFAULT_OUTPUT_DIR = ".benchmarks/transfer"
DEFAULT_WARMUP = 5
DEFAULT_ITERS = 20
DEFAULT_NOTIFY_ITERS = 50
NOTIFY_BLOCK = 16 * 1024  # the notification latency is measured with one block of this size


@dataclass
class TransferBenchConfig:
    """A run's request (the CLI's options, same names)."""

    backends: list[str] | None = None  # None: DEFAULT_GPU_BACKENDS / DEFAULT_CPU_BACKENDS (those available)
    ops: list[str] = field(default_factory=lambda: list(OPS))
    block_sizes: list[int] | None = None
    block_counts: list[int] | None = None
    max_bytes: int | None = None  # points moving more than this per request are skipped
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: cuda when available
    prepared: bool = False  # our agent's prepared form (block ids) instead of byte triples
    nixl_progress_thread: bool = True  # False: NIXL agents (ours and raw) without their progress thread
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    notify_iters: int = DEFAULT_NOTIFY_ITERS  # 0: no notification latency
    rounds: int = 1  # the backends measured in turn this many times, samples pooled (drift hits each alike)
    cpus: tuple[int, int] | None = None  # the initiator's and the passive peer's CPU; None: the OS places them
    timeout: float = 120.0
    output_dir: str | None = DEFAULT_OUTPUT_DIR
    out: str | None = None  # a file stem: STEM.json / STEM.csv instead of a timestamped name in output_dir
    plot: str | None = None
    progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class TransferPlan:
    device: torch.device
    backends: tuple[str, ...]
    points: tuple[tuple[int, int], ...]  # (block bytes, block count)
    skipped: tuple[str, ...]  # why some requested points or default backends are left out
    pool_bytes: int


def _available(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` here, else why not."""
    from sagellm_comm.launch import interpreting
    from sagellm_comm.transfer.registry import transfer_backend_unavailable

    if backend in ("nixl", "nixl-raw"):
        return transfer_backend_unavailable("nixl")
    if backend in ("ipc", "ipc-launch"):
        if device.type == "cpu" and not interpreting():
            return "ipc runs CPU memory only under the Triton interpreter (TRITON_INTERPRET=1): a correctness path"
        return transfer_backend_unavailable("ipc")
    if backend == "copy-engine":
        if device.type != "cuda":
            return "copy-engine copies need a CUDA device"
        from sagellm_comm.cupy_probe import cupy_present

        return None if cupy_present() else "copy-engine copies need CuPy for the IPC mapping"
    if backend == "torch" and device.type == "cuda":
        from sagellm_comm.cupy_probe import cupy_present

        return None if cupy_present() else "the torch reference needs CuPy for the IPC mapping"
    return None


def check_cpus(cpus) -> None:
    """Refuse a ``--cpus`` that is not two CPUs this process may run on (or a system that cannot pin)."""
    if cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise InvalidArgumentError("--cpus needs os.sched_setaffinity, which this system does not have")
    if len(cpus) != 2 or any(isinstance(c, bool) or not isinstance(c, int) for c in cpus):
        raise InvalidArgumentError(f"--cpus takes two CPU numbers (the initiator's, then the peer's), got {cpus!r}")
    allowed = os.sched_getaffinity(0)
    for who, cpu in zip(("initiator", "peer"), cpus, strict=True):
        if cpu not in allowed:
            raise InvalidArgumentError(
                f"--cpus: the {who}'s CPU {cpu} is not one this process may run on ({_cpu_list(allowed)})"
            )


def _cpu_list(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def check_out(out: str) -> None:
    """Refuse an ``--out`` that names a directory, or whose ``STEM.json`` or ``STEM.csv`` cannot be a file in a
    writable directory (found before the run, not when its results are written)."""
    from sagellm_comm.benchmark.transfer_results import out_paths

    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        raise InvalidArgumentError(
            f"--out {out}: names a directory; --out takes a file stem (it writes STEM.json and STEM.csv), "
            "--output-dir a directory"
        )
    check_writable_dir(Path(out).absolute().parent, "--out's directory")
    for path in out_paths(out):
        if path.is_dir():
            raise InvalidArgumentError(f"--out {out}: {path} is a directory; give another stem or remove it")


def plan_transfer(config: TransferBenchConfig) -> TransferPlan:
    """Check ``config`` and decide the device, backends and points (see the module docstring)."""
    check_repetitions(config.warmup, config.iters, config.timeout)
    if not 0 <= config.notify_iters <= MAX_REPETITIONS:
        raise InvalidArgumentError(f"--notify-iters must be in 0..{MAX_REPETITIONS}, got {config.notify_iters}")
    if not 1 <= config.rounds <= MAX_ROUNDS:
        raise InvalidArgumentError(f"--rounds must be in 1..{MAX_ROUNDS}, got {config.rounds}")
    check_cpus(config.cpus)
    check_settings()  # a malformed SAGELLM_COMM_* setting: refused here, not by each process's agent
    check_outputs(config.output_dir if config.out is None else None, config.plot)
    if config.out is not None:
        check_out(config.out)
    for op in config.ops:
        if config.ops.count(op) > 1:
            raise InvalidArgumentError(f"--ops names {op!r} twice")
        if op not in OPS:
            raise InvalidArgumentError(f"unknown op {op!r}; choose from: {', '.join(OPS)}")
    if not config.ops:
        raise InvalidArgumentError("--ops names no operation")
    device = check_run_device(config.device if config.device is not None else "cuda" if cuda_available() else "cpu")
    gpu = device.type == "cuda"
    skipped: list[str] = []
    if config.backends is None:
        backends = []
        for name in DEFAULT_GPU_BACKENDS if gpu else DEFAULT_CPU_BACKENDS:
            reason = _available(name, device)
            if reason is None:
                backends.append(name)
            else:
                skipped.append(f"backend {name}: {reason}")
        if not backends:
            raise InvalidArgumentError("no transfer backend can run here: " + "; ".join(skipped))
    else:
        backends = list(config.backends)
        twice = [name for index, name in enumerate(backends) if name in backends[:index]]
        if twice:  # as --ops: a list names each once
            raise InvalidArgumentError(f"--backend names {twice[0]!r} twice")
        if not backends:
            raise InvalidArgumentError(f"--backend names no backend; choose from: {', '.join(BACKENDS)}")
        for name in backends:
            if name not in BACKENDS:
                raise InvalidArgumentError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")
            reason = _available(name, device)
            if reason is not None:
                raise InvalidArgumentError(f"--backend {name}: {reason}")
    sizes = config.block_sizes
    if sizes is None:
        sizes = parse_size_list(DEFAULT_GPU_SIZES if gpu else DEFAULT_CPU_SIZES)
    counts = config.block_counts
    if counts is None:
        counts = parse_count_list(DEFAULT_COUNTS if gpu else DEFAULT_CPU_COUNTS, "--block-counts")
    if not sizes or not counts:  # an empty list is refused, not taken for the default
        raise InvalidArgumentError(f"{'--block-sizes' if not sizes else '--block-counts'} names no value")
    if any(c < 1 for c in counts):
        raise InvalidArgumentError(f"--block-counts must be >= 1, got {counts}")
    for option, values in (("--block-sizes", sizes), ("--block-counts", counts)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise InvalidArgumentError(f"{option} names {twice[0]} twice")
    cap = config.max_bytes
    if cap is None:
        cap = DEFAULT_GPU_MAX_BYTES if gpu else DEFAULT_CPU_MAX_BYTES
    if cap < 1:
        raise InvalidArgumentError(f"--max-bytes must be at least 1 byte, got {cap}")
    points = []
    for size in sizes:
        if size < 1 or size % 16:
            raise InvalidArgumentError(f"block size {size} is not a positive multiple of 16 bytes")
        for count in counts:
            if size * count > cap:
                skipped.append(f"{count} x {format_size(size)}: over --max-bytes {format_size(cap)}")
            else:
                points.append((size, count))
    if not points:
        raise InvalidArgumentError(f"every point moves more than --max-bytes {format_size(cap)} per request")
    pool_bytes = 2 * max(size * count for size, count in points)  # scattered: half the pool's blocks are used
    if config.notify_iters:
        pool_bytes = max(pool_bytes, NOTIFY_BLOCK)  # the notification latency's block fits too
    check_pools_fit(device, pool_bytes)
    return TransferPlan(device, tuple(backends), tuple(points), tuple(skipped), pool_bytes)


def check_pools_fit(device: torch.device, pool_bytes: int) -> None:
    """Refuse a sweep whose two pools of ``pool_bytes`` (one per process) do not fit what is free now: shared
    memory (:func:`sagellm_comm.shm.shared_dir`, where CPU pools live) or the GPU's memory (both processes share
    it).  Only the pools are counted, so a sweep that passes may still run out near the limit."""
    need = 2 * pool_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"GPU memory on {device}"
    else:
        from sagellm_comm.shm import shared_dir

        folder = shared_dir()
        stat = os.statvfs(folder)
        free, where = stat.f_bavail * stat.f_frsize, f"shared memory in {folder}"
    if need > free:
        raise InvalidArgumentError(
            f"the two processes' pools need {_amount(need)} of {where} (2 x {_amount(pool_bytes)}: twice the "
            f"largest request), {_amount(free)} is free: lower --block-sizes, --block-counts or --max-bytes"
        )


def _amount(nbytes: int) -> str:
    """``format_size`` where it is exact in its largest unit, else one decimal of that unit: ``"23.5G"``."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit:
            return format_size(nbytes) if nbytes % unit == 0 else f"{nbytes / unit:.1f}{suffix}"
    return format_size(nbytes)


def pool_blocks(pool, block: int):
    """``pool`` (1-d bytes) as rows of ``block`` bytes: every whole block it holds (the pool's size need not be a
    multiple of every block size of a sweep)."""
    return pool[: pool.numel() // block * block].view(-1, block)
