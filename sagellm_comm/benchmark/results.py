"""A finished run: the records and run description built from measured points, files, plot, table."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.config import BenchConfig, LaunchPlan
from sagellm_comm.benchmark.measure import Measurement
from sagellm_comm.benchmark.ops import bandwidths_gbps, dtype_name, resolve_dtype
from sagellm_comm.benchmark.provenance import git_state, package_version
from sagellm_comm.benchmark.report import (
    BenchmarkRecord,
    RunInfo,
    fill_ratios,
    format_table,
    plot_results,
    write_and_report,
    write_results,
)

REDOPS = {"all_reduce": "sum", "reduce_scatter": "sum", "all_gather": "none", "broadcast": "none"}


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
        """At least one point measured, no wrong element and no point that failed to run (an algorithm asked past
        its capacity, refused before it ran, is skipped and reported, not failed)."""
        return (
            bool(self.records)
            and all(r.num_wrong == 0 for r in self.records)
            and not any("bytes" in s and not s.get("over_capacity") for s in self.info.skipped)
        )

    @property
    def unmeasured(self) -> list[str]:
        """``"algo: reason"`` for each requested algorithm skipped as a whole (it cannot run on this backend or
        world, found after ``init``), when no point was measured at all; empty otherwise."""
        if self.records:
            return []
        return [f"{s.get('algo')}: {s.get('reason')}" for s in self.info.skipped if "bytes" not in s]


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


def _timing_method(graph: bool, cuda: bool, graph_calls: int = 1) -> str:
    if graph:
        return "cuda_graph_replay+cuda_events" + (f" ({graph_calls} calls per graph)" if graph_calls > 1 else "")
    return "cuda_events" if cuda else "wall_clock"


def build_result(
    config: BenchConfig, plan: LaunchPlan, measurement: Measurement, backend_kind: str, device: torch.device
) -> BenchmarkResult:
    """Turn the (already cross-rank reduced) points into records and a :class:`RunInfo`."""
    now = _now()
    state = plan.git if plan.git is not None else git_state()  # read as the run started, where it was
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
        timing_method=_timing_method(config.graph, cuda, config.graph_calls),
        graph=config.graph,
        algos_requested=algos,
        warmup_iters=config.warmup,
        benchmark_iters=config.iters,
        topology_source=topology_source(),
        device_name=device_name(device),
        package_version=package_version(),
        torch_version=torch.__version__,
        git_commit=state.commit,
        git_dirty=state.dirty,
        commit_source=state.source,
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
    """Write the JSON/CSV files and the plot (as configured; no plot where no point ran) and print the table to
    stdout.

    A file that cannot be written after the run (a full disk, a directory made read-only during the run) is an
    :class:`~sagellm_comm.errors.UnavailableError`, raised once the table is printed: the measurements are not lost.
    """

    def write_files() -> None:
        file_stamp = _dt.datetime.fromisoformat(result.info.timestamp).strftime("%Y%m%d-%H%M%S")
        result.json_path, result.csv_path = write_results(result.records, result.info, config.output_dir, file_stamp)

    def write_plot() -> None:
        result.plot_path = plot_results(result.records, result.info, config.plot)

    files = None if config.output_dir is None else (f"the results in --output-dir {config.output_dir}", write_files)
    # no point ran (each failed or was skipped): nothing to draw
    plot = None if config.plot is None or not result.records else (f"--plot {config.plot}", write_plot)
    write_and_report(result, files, plot, print_table=print_table)
    if print_table and config.plot is not None and result.plot_path is None:
        print(f"# no plot written to {config.plot}: no point ran", flush=True)
    return result
