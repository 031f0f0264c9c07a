"""Run a benchmark: check the request, pick the launch mode, run the ranks, write the results.

Launch modes (:func:`plan_launch`):

* ``virtual``: ``--virtual-ranks N``: N ranks of the custom all-reduce on one GPU, one process.
* ``torchrun``: ``RANK`` and ``WORLD_SIZE`` are in the environment: this process is one rank; the
  backend reads the rendezvous from the environment; rank 0 writes the results.
* ``spawn``: otherwise the benchmark starts ``world_size`` processes itself on this host (Gloo on CPU
  by default, so it works on a laptop; one process per GPU for device backends).
* ``in_process``: the Python API was given an initialised :class:`~sagellm_comm.backend.CommBackend`.

Every request problem is an :class:`~sagellm_comm.errors.InvalidArgumentError` raised before any
process starts (the CLI turns it into a usage error).
"""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.config import (
    DEFAULT_CPU_SIZES,
    DEFAULT_GPU_SIZES,
    DEFAULT_ITERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SPAWN_WORLD_SIZE,
    DEFAULT_WARMUP,
    VIRTUAL_DTYPES,
    VIRTUAL_MODES,
    BenchConfig,
    LaunchPlan,
)
from sagellm_comm.benchmark.measure import LoopSettings, measure_distributed, measure_virtual
from sagellm_comm.benchmark.ops import OPS, resolve_dtype
from sagellm_comm.benchmark.results import BenchmarkResult, build_result, finish
from sagellm_comm.benchmark.sizes import parse_size_range
from sagellm_comm.errors import BackendNotSupportedError, CollectiveFailedError, InvalidArgumentError

__all__ = [  # the defaults are re-exported for callers of the runner
    "DEFAULT_ITERS",
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_WARMUP",
    "BenchConfig",
    "BenchmarkResult",
    "LaunchPlan",
    "plan_launch",
    "run_benchmark",
    "run_rank",
]


# ============================================================================ planning


def _cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _torchrun_env() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as exc:
            raise InvalidArgumentError(
                f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not integers"
            ) from exc
    return None


def _resolve_backend_kind(name: str) -> str:
    from sagellm_comm.backend import resolve_kind

    try:
        return resolve_kind(name)
    except BackendNotSupportedError as exc:
        raise InvalidArgumentError(f"--backend {name}: {exc.message}") from exc


def plan_launch(config: BenchConfig) -> LaunchPlan:
    """Check ``config`` and decide how to run it; raises InvalidArgumentError naming the problem."""
    if config.op not in OPS:
        raise InvalidArgumentError(f"unknown op {config.op!r}; choose one of: {', '.join(OPS)}")
    dtype = resolve_dtype(config.dtype)
    if config.warmup < 0:
        raise InvalidArgumentError(f"--warmup must be >= 0, got {config.warmup}")
    if config.iters < 1:
        raise InvalidArgumentError(f"--iters must be >= 1, got {config.iters}")
    if config.graph_calls < 1:
        raise InvalidArgumentError(f"--graph-calls must be >= 1, got {config.graph_calls}")
    if config.timeout <= 0:
        raise InvalidArgumentError(f"--timeout must be positive, got {config.timeout}")
    if config.world_size is not None and config.world_size < 1:
        raise InvalidArgumentError(f"--world-size must be >= 1, got {config.world_size}")
    algos = algo_rules.parse_algos(config.algos)
    cuda = _cuda_available()
    if config.selector_config is not None and not Path(config.selector_config).is_file():
        raise InvalidArgumentError(f"--selector-config {config.selector_config}: no such file")
    if config.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise InvalidArgumentError(
                "--plot needs matplotlib, which is not installed: pip install 'isagellm-comm[plot]'"
            ) from exc
    if config.zero_copy and config.virtual_ranks is None:
        raise InvalidArgumentError("--zero-copy applies to --virtual-ranks runs only")
    if config.virtual_mode not in VIRTUAL_MODES:
        raise InvalidArgumentError(
            f"--virtual-mode must be one of {', '.join(VIRTUAL_MODES)}, got {config.virtual_mode!r}"
        )
    if config.zero_copy and config.virtual_mode != "streams":
        raise InvalidArgumentError("--zero-copy needs --virtual-mode streams (stacked mode reduces one stacked tensor)")

    if config.virtual_ranks is not None:
        if config.virtual_ranks < 1:
            raise InvalidArgumentError(f"--virtual-ranks must be >= 1, got {config.virtual_ranks}")
        if not cuda:
            raise InvalidArgumentError("--virtual-ranks needs a CUDA GPU, and none is available here")
        if config.world_size is not None:
            raise InvalidArgumentError("give either --virtual-ranks or --world-size, not both")
        if _torchrun_env() is not None:
            raise InvalidArgumentError("--virtual-ranks runs in one process; do not start it under torchrun")
        if config.backend not in ("auto", "custom"):
            raise InvalidArgumentError(f"--virtual-ranks runs the custom kernels; --backend {config.backend} cannot")
        if dtype not in VIRTUAL_DTYPES:
            raise InvalidArgumentError(f"the custom all-reduce runs float32, float16 and bfloat16, not {config.dtype}")
        algo_rules.check_algos(algos, "custom", config.op, virtual=True)
        sizes = tuple(config.sizes or parse_size_range(DEFAULT_GPU_SIZES))
        return LaunchPlan("virtual", config.virtual_ranks, "custom", sizes, True)

    kind = _resolve_backend_kind(config.backend)
    uses_cuda = kind not in ("gloo",) and cuda
    if config.graph and not cuda:
        raise InvalidArgumentError("--graph times CUDA-graph replays and needs a CUDA GPU; none is available here")
    if config.graph and not uses_cuda:
        raise InvalidArgumentError(f"--graph times CUDA-graph replays; backend {kind!r} runs on the CPU")
    if config.selector_config is not None and kind != "custom":
        raise InvalidArgumentError(
            f"--selector-config is the custom all-reduce's policy; backend {kind!r} does not use it"
        )
    algo_rules.check_algos(algos, kind, config.op)
    wanted, existing = algo_rules.nccl_algo_env(algos), os.environ.get("NCCL_ALGO", "").strip()
    if wanted and existing and existing.lower() != wanted.lower():
        raise InvalidArgumentError(
            f"NCCL_ALGO={existing} is set in the environment but --algo asks for {wanted}; unset one of them"
        )
    sizes = tuple(config.sizes or parse_size_range(DEFAULT_GPU_SIZES if uses_cuda else DEFAULT_CPU_SIZES))
    env = _torchrun_env()
    if env is not None:
        rank, world_size = env
        if config.world_size is not None and config.world_size != world_size:
            raise InvalidArgumentError(
                f"--world-size {config.world_size} disagrees with torchrun's WORLD_SIZE={world_size}"
            )
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        return LaunchPlan("torchrun", world_size, kind, sizes, uses_cuda)
    if config.world_size is not None:
        world_size = config.world_size
    elif uses_cuda:
        world_size = torch.cuda.device_count()
    else:
        world_size = DEFAULT_SPAWN_WORLD_SIZE
    if uses_cuda and world_size > torch.cuda.device_count():
        raise InvalidArgumentError(
            f"backend {kind!r} needs one GPU per rank: world size {world_size} > {torch.cuda.device_count()} "
            "GPU(s); use --virtual-ranks N to emulate N ranks on one GPU, or --backend gloo"
        )
    return LaunchPlan("spawn", world_size, kind, sizes, uses_cuda)


# ============================================================================ run description


# ============================================================================ running


def _settings(config: BenchConfig, plan: LaunchPlan, rank: int) -> LoopSettings:
    return LoopSettings(
        op=config.op,
        dtype=resolve_dtype(config.dtype),
        sizes=list(plan.sizes),
        algos=algo_rules.parse_algos(config.algos),
        warmup=config.warmup,
        iters=config.iters,
        graph=config.graph,
        graph_calls=config.graph_calls,
        progress=config.progress and rank == 0,
    )


def _load_selector(config: BenchConfig) -> Any:
    if config.selector_config is None:
        return None
    from sagellm_comm.selector import AlgoSelector

    return AlgoSelector.from_file(config.selector_config)


def run_virtual(config: BenchConfig, plan: LaunchPlan) -> BenchmarkResult:
    from sagellm_comm.virtual import VirtualRankGroup

    device = torch.device("cuda", torch.cuda.current_device())
    group = VirtualRankGroup(plan.world_size, device=device, max_bytes=max(plan.sizes), selector=_load_selector(config))
    try:
        measurement = measure_virtual(
            group, _settings(config, plan, 0), mode=config.virtual_mode, zero_copy=config.zero_copy
        )
    finally:
        group.close()
    return build_result(config, plan, measurement, "custom", device)


def _create_backend(config: BenchConfig, plan: LaunchPlan) -> Any:
    from sagellm_comm.backend import get_comm_backend

    selector = _load_selector(config)
    if selector is not None:
        return get_comm_backend(plan.backend_kind, selector=selector)
    return get_comm_backend(plan.backend_kind)


def run_rank(
    config: BenchConfig,
    plan: LaunchPlan,
    rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    backend: Any = None,
) -> BenchmarkResult:
    """Run this process's rank (initialising a backend unless one is given); every rank gets the result."""
    owns_backend = backend is None
    if owns_backend:
        algo_rules.apply_nccl_algo_env(algo_rules.parse_algos(config.algos))
        backend = _create_backend(config, plan)
        backend.init(
            rank=rank,
            world_size=plan.world_size,
            master_addr=master_addr,
            master_port=master_port,
            timeout=config.timeout,
        )
    try:
        measurement = measure_distributed(backend, _settings(config, plan, backend.rank), backend.rank)
        return build_result(config, plan, measurement, backend.name, backend.device)
    finally:
        if owns_backend:
            backend.destroy()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_entry(index: int, config: BenchConfig, plan: LaunchPlan, port: int, result_path: str) -> None:
    """One spawned rank (runs in a fresh interpreter)."""
    os.environ["LOCAL_RANK"] = str(index)
    os.environ["LOCAL_WORLD_SIZE"] = str(plan.world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.world_size))
    result = run_rank(config, plan, rank=index, master_addr="127.0.0.1", master_port=port)
    if index == 0:
        with open(result_path, "wb") as handle:
            pickle.dump(result, handle)


def run_spawn(config: BenchConfig, plan: LaunchPlan) -> BenchmarkResult:
    import torch.multiprocessing as mp

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-") as tmp:
        result_path = os.path.join(tmp, "rank0.pkl")
        try:
            mp.start_processes(
                _spawn_entry,
                args=(config, plan, port, result_path),
                nprocs=plan.world_size,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as exc:
            raise CollectiveFailedError(f"a benchmark rank failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            raise CollectiveFailedError(f"a benchmark rank died: {exc}") from None
        with open(result_path, "rb") as handle:
            return pickle.load(handle)


def run_benchmark(config: BenchConfig, *, print_table: bool = False, backend: Any = None) -> BenchmarkResult | None:
    """Run ``config``; returns the result where it is complete (every mode but non-zero torchrun ranks,
    which return None).  Files, plot and table are produced once, by the process that owns the result.
    """
    if backend is not None:
        if not backend.is_initialized:
            raise InvalidArgumentError("run_benchmark(backend=...) needs an initialised CommBackend (call init)")
        algos = algo_rules.parse_algos(config.algos)
        algo_rules.check_algos(algos, backend.name, config.op)
        if algo_rules.nccl_algo_env(algos) is not None:
            raise InvalidArgumentError("ring/tree set NCCL_ALGO before init; pass a backend kind, not an instance")
        cuda = backend.device.type == "cuda"
        if config.graph and not cuda:
            raise InvalidArgumentError("--graph needs a backend on a CUDA device")
        sizes = tuple(config.sizes or parse_size_range(DEFAULT_GPU_SIZES if cuda else DEFAULT_CPU_SIZES))
        plan = LaunchPlan("in_process", backend.world_size, backend.name, sizes, cuda)
        result = run_rank(config, plan, backend=backend)
        return finish(result, config, print_table=print_table) if backend.rank == 0 else None
    plan = plan_launch(config)
    if plan.mode == "virtual":
        return finish(run_virtual(config, plan), config, print_table=print_table)
    if plan.mode == "torchrun":
        result = run_rank(config, plan)
        is_rank0 = int(os.environ["RANK"]) == 0
        return finish(result, config, print_table=print_table) if is_rank0 else None
    return finish(run_spawn(config, plan), config, print_table=print_table)


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (program name and arguments), shell-quoted, for the results' metadata."""
    args = sys.argv if argv is None else argv
    return " ".join([args[0], shlex.join(args[1:])]) if args else ""
