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

import datetime as _dt
import os
import pickle
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.measure import LoopSettings, Measurement, measure_distributed, measure_virtual
from sagellm_comm.benchmark.ops import OPS, bandwidths_gbps, dtype_name, resolve_dtype
from sagellm_comm.benchmark.report import (
    BenchmarkRecord,
    RunInfo,
    fill_ratios,
    format_table,
    plot_results,
    write_results,
)
from sagellm_comm.benchmark.sizes import parse_size_range
from sagellm_comm.errors import BackendNotSupportedError, CollectiveFailedError, InvalidArgumentError

DEFAULT_OUTPUT_DIR = ".benchmarks/collective"
DEFAULT_GPU_SIZES = "1K:256M"
DEFAULT_CPU_SIZES = "1K:1M"
DEFAULT_WARMUP = 5
DEFAULT_ITERS = 20
DEFAULT_SPAWN_WORLD_SIZE = 2
VIRTUAL_MODES = ("stacked", "streams")
VIRTUAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDOPS = {"all_reduce": "sum", "reduce_scatter": "sum", "all_gather": "none", "broadcast": "none"}


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI fills it from its options (same names)."""

    op: str = "all_reduce"
    backend: str = "auto"
    algos: list[str] = field(default_factory=lambda: ["auto"])
    sizes: list[int] | None = None  # None: DEFAULT_GPU_SIZES on GPUs, DEFAULT_CPU_SIZES on CPU
    dtype: str = "float32"
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    graph: bool = False
    selector_config: str | None = None
    output_dir: str | None = DEFAULT_OUTPUT_DIR  # None: write no files
    plot: str | None = None
    world_size: int | None = None
    virtual_ranks: int | None = None
    virtual_mode: str = "stacked"  # stacked: one launch for all ranks; streams: one launch per rank
    zero_copy: bool = False
    progress: bool = True
    timeout: float = 120.0
    command: str = ""


@dataclass(frozen=True)
class LaunchPlan:
    mode: str  # virtual | torchrun | spawn | in_process
    world_size: int
    backend_kind: str  # the kind the registry resolves to before init ("custom" for virtual ranks)
    sizes: tuple[int, ...]
    uses_cuda: bool


@dataclass
class BenchmarkResult:
    """A finished run: its description, one record per (size, algo), and the files written."""

    info: RunInfo
    records: list[BenchmarkRecord]
    json_path: Path | None = None
    csv_path: Path | None = None
    plot_path: Path | None = None

    @property
    def table(self) -> str:
        return format_table(self.records, self.info)

    @property
    def ok(self) -> bool:
        """No wrong element and no point that failed to run."""
        return all(r.num_wrong == 0 for r in self.records) and not any("bytes" in s for s in self.info.skipped)


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


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("isagellm-comm")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
    except (ImportError, OSError, KeyError, ValueError):
        return "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


def topology_source() -> str:
    """``Topology.discover().source`` (nvml / cuda / env / cpu), or why it is unknown."""
    try:
        from sagellm_comm.topology import Topology

        topo = Topology.discover()
    except Exception as exc:  # topology is informative here; never fail a benchmark on it
        return f"unavailable ({type(exc).__name__})"
    return str(getattr(topo, "source", "unknown"))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _timing_method(graph: bool, cuda: bool) -> str:
    if graph:
        return "cuda_graph_replay+cuda_events"
    return "cuda_events" if cuda else "wall_clock"


def build_result(
    config: BenchConfig, plan: LaunchPlan, measurement: Measurement, backend_kind: str, device: torch.device
) -> BenchmarkResult:
    """Turn the (already cross-rank reduced) points into records and a :class:`RunInfo`."""
    now = _now()
    stamp = now.isoformat(timespec="seconds")
    algos = algo_rules.parse_algos(config.algos)
    dtype = resolve_dtype(config.dtype)
    cuda = device.type == "cuda"
    launch_mode = f"virtual_{config.virtual_mode}" if plan.mode == "virtual" else plan.mode
    info = RunInfo(
        command=config.command,
        op_type=config.op,
        data_type=dtype_name(dtype),
        backend_requested=config.backend,
        backend_kind=backend_kind,
        world_size=plan.world_size,
        launch_mode=launch_mode,
        timing_method=_timing_method(config.graph, cuda),
        graph=config.graph,
        algos_requested=algos,
        warmup_iters=config.warmup,
        benchmark_iters=config.iters,
        topology_source=topology_source(),
        device_name=device_name(device),
        package_version=package_version(),
        torch_version=torch.__version__,
        git_commit=git_commit(),
        hostname=socket.gethostname(),
        timestamp=stamp,
        selector_config=config.selector_config,
        skipped=measurement.skipped,
    )
    records = []
    for point in measurement.points:
        algbw, busbw = bandwidths_gbps(point.nbytes, point.stats.median_us, config.op, plan.world_size)
        records.append(
            BenchmarkRecord(
                bytes=point.nbytes,
                count=point.count,
                op_type=config.op,
                data_type=info.data_type,
                redop=REDOPS[config.op],
                root=0 if config.op == "broadcast" else -1,
                algo_id=point.algo_id,
                algo_requested=point.algo_requested,
                backend_kind=backend_kind,
                world_size=plan.world_size,
                latency_ms=point.stats.median_us / 1e3,
                latency_p10_ms=point.stats.p10_us / 1e3,
                latency_p90_ms=point.stats.p90_us / 1e3,
                latency_min_ms=point.stats.min_us / 1e3,
                latency_max_ms=point.stats.max_us / 1e3,
                latency_mean_ms=point.stats.mean_us / 1e3,
                bandwidth_gbps=algbw,
                algo_bandwidth_gbps=algbw,
                bus_bandwidth_gbps=busbw,
                num_wrong=point.num_wrong,
                ratio_vs_first=None,
                selection_rule_id=point.rule_id,
                selection_reason=point.reason,
                topology_source=info.topology_source,
                timing_method=info.timing_method,
                launch_mode=launch_mode,
                warmup_iters=config.warmup,
                benchmark_iters=config.iters,
                device_name=info.device_name,
                package_version=info.package_version,
                timestamp=stamp,
            )
        )
    if len(algos) > 1:
        fill_ratios(records, algos[0])
    return BenchmarkResult(info, records)


def finish(result: BenchmarkResult, config: BenchConfig, *, print_table: bool) -> BenchmarkResult:
    """Write the JSON/CSV files and the plot (as configured) and print the table to stdout."""
    if config.output_dir is not None:
        file_stamp = _dt.datetime.fromisoformat(result.info.timestamp).strftime("%Y%m%d-%H%M%S")
        result.json_path, result.csv_path = write_results(result.records, result.info, config.output_dir, file_stamp)
    if config.plot is not None:
        result.plot_path = plot_results(result.records, result.info, config.plot)
    if print_table:
        print(result.table)
        written = [p for p in (result.json_path, result.csv_path, result.plot_path) if p is not None]
        if written:
            print("# wrote " + ", ".join(str(p) for p in written))
        sys.stdout.flush()
    return result


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
