"""The overlap benchmark's request, records, table, output files and plot (fields: docs/layers.md).

The files follow ``sagellm-comm bench``'s: ``overlap_ws<N>_<timestamp>.json`` (``{"run": ..., "results":
[...]}``, the run with its provenance: command, commit and dirty flag read from git, versions, host, date)
and a ``.csv`` of the records.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from sagellm_comm.benchmark.sizes import format_size

DEFAULT_OUTPUT_DIR = ".benchmarks/overlap"
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 10
GPU_DEFAULTS = {"comm_sizes": "1M,16M,64M", "compute_duration_ms": 2.0, "gemm_size": 4096, "dtype": "bfloat16"}
CPU_DEFAULTS = {"comm_sizes": "64K,1M", "compute_duration_ms": 20.0, "gemm_size": 128, "dtype": "float32"}
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
    plot: str | None = None
    progress: bool = False
    command: str = ""


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
    num_wrong: int  # wrong elements of the last overlapped result, summed over ranks (as bench's #wrong)
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
    plot_path: Path | None = None

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


def describe_run(result: OverlapResult, config: OverlapConfig) -> None:
    """Add the run's provenance to ``result.run``: the command, commit and dirty flag (from git), versions,
    host and date."""
    import socket

    from sagellm_comm.benchmark.provenance import git_state, now_utc, package_version

    state = git_state()
    result.run.update(
        command=config.command,
        package_version=package_version(),
        torch_version=torch.__version__,
        git_commit=state.commit,
        git_dirty=state.dirty,
        commit_source=state.source,
        hostname=socket.gethostname(),
        timestamp=now_utc(),
    )


def format_overlap_table(records: list[OverlapRecord], run: dict) -> str:
    from sagellm_comm.benchmark.provenance import commit_label

    lines = [f"# sagellm-comm overlap bench: backend {run.get('backend_kind')}, world size {run.get('world_size')}"]
    if "git_commit" in run:
        lines.append(
            f"# sagellm-comm {run.get('package_version')}, torch {run.get('torch_version')}, "
            f"commit {commit_label(run['git_commit'], run.get('git_dirty'))}"
        )
    lines += [
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
    """``overlap_ws<N>_<timestamp>.json`` (``{"run": ..., "results": [...]}``) and ``.csv`` under ``output_dir``, a
    suffix added rather than replace a file, also one another run writes meanwhile (as bench's:
    :func:`~sagellm_comm.benchmark.report.write_new_results`)."""
    from sagellm_comm.benchmark.report import file_stamp, output_stem, write_new_results

    payload = {"run": result.run, "results": [r.to_dict() for r in result.records]}

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(OverlapRecord)])
        writer.writeheader()
        for r in result.records:
            writer.writerow(r.to_dict())

    stem = output_stem("overlap", int(result.run.get("world_size", 0)), file_stamp())
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    result.json_path, result.csv_path = write_new_results(output_dir, stem, text, write_csv)


def plot_overlap(result: OverlapResult, path: str | Path) -> Path:
    """Per message size: the GEMM loop alone, the all-reduce alone, both overlapped, and the ideal (the
    longer of the two) and sequential (their sum) bounds; log-2 size axis.  Needs matplotlib."""
    from sagellm_comm.benchmark.report import pyplot, save_figure

    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    records = sorted(result.records, key=lambda r: r.comm_bytes)
    sizes = [r.comm_bytes for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label, style in (
        ("compute_duration_ms", "compute alone", "o-"),
        ("comm_duration_ms", "all-reduce alone", "s-"),
        ("total_ms", "overlapped (total)", "D-"),
        ("theoretical_overlap_ms", "ideal: max of the two", ":"),
        ("theoretical_sequential_ms", "sequential: their sum", "--"),
    ):
        ax.plot(sizes, [getattr(r, name) for r in records], style, markersize=4, label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_size(int(round(x))) if x >= 1 else ""))
    ax.set_xlabel("all-reduce message size (bytes)")
    ax.set_ylabel("time, median of the slowest rank (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    run = result.run
    ax.set_title(
        f"overlap: backend {run.get('backend_kind')}, world size {run.get('world_size')}, {records[0].gemm_shape} GEMMs"
        if records
        else "overlap",
        fontsize=10,
    )
    return save_figure(fig, path)
