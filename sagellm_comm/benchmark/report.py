"""Benchmark results: records, the nccl-tests-shaped table, JSON/CSV files, plots.

Units: times in microseconds in the table and milliseconds in the files (``latency_ms``);
bandwidths in GB/s = 10**9 bytes per second (not GiB/s).  ``bandwidth_gbps`` is the *algorithm*
bandwidth (``bytes / time``), the same value as ``algo_bandwidth_gbps``; ``bus_bandwidth_gbps`` applies
the nccl-tests factor of the op (see :mod:`sagellm_comm.benchmark.ops`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from sagellm_comm.errors import InvalidArgumentError, UnavailableError
from sagellm_comm.files import write_file, write_text


@dataclass
class BenchmarkRecord:
    """One (size, algo) point, after the reduction across ranks (the slowest rank's statistics).

    ``algo_id`` and ``backend_kind`` are what actually ran (an ``auto`` request is recorded with the
    algorithm the selector picked, and ``selection_rule_id``/``selection_reason`` say why).
    """

    bytes: int
    count: int
    op_type: str
    data_type: str
    redop: str
    root: int
    algo_id: str
    algo_requested: str
    backend_kind: str
    world_size: int
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    latency_min_ms: float
    latency_max_ms: float
    latency_mean_ms: float
    bandwidth_gbps: float | None  # None where the median time is not positive (ops.rate_gbps)
    algo_bandwidth_gbps: float | None
    bus_bandwidth_gbps: float | None
    num_wrong: int
    ratio_vs_first: float | None
    selection_rule_id: str
    selection_reason: str
    topology_source: str
    timing_method: str
    launch_mode: str
    warmup_iters: int
    benchmark_iters: int
    device_name: str
    package_version: str
    timestamp: str

    def to_dict(self) -> dict:
        return asdict(self)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BenchmarkRecord))


@dataclass
class RunInfo:
    """What describes a whole run (written once at the top of the JSON file)."""

    command: str
    op_type: str
    data_type: str
    backend_requested: str
    backend_kind: str
    world_size: int
    launch_mode: str
    timing_method: str
    graph: bool
    algos_requested: list[str]
    warmup_iters: int
    benchmark_iters: int
    topology_source: str
    device_name: str
    package_version: str
    torch_version: str
    git_commit: str
    hostname: str
    timestamp: str
    selector_config: str | None = None
    git_dirty: bool | None = None  # tracked files modified at run time; None: unknown (see commit_source)
    commit_source: str = "git"
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def fill_ratios(records: Sequence[BenchmarkRecord], first_algo: str) -> None:
    """Set ``ratio_vs_first = time(first algo) / time(this algo)`` at each size (> 1: faster than first).

    Records whose size has no point of the first algo, or whose time or the first algo's is not positive (shorter
    than the timer resolves), get ``None``.
    """
    reference = {r.bytes: r.latency_ms for r in records if r.algo_requested == first_algo}
    for record in records:
        base = reference.get(record.bytes)
        if base is None or not base > 0 or not record.latency_ms > 0:
            record.ratio_vs_first = None
        else:
            record.ratio_vs_first = base / record.latency_ms


def _fmt_time_us(ms: float) -> str:
    us = ms * 1e3
    return f"{us:.1f}" if us < 1e5 else f"{us:.0f}"


def commit_label(info: RunInfo) -> str:
    """The run's commit as the table prints it (:func:`~sagellm_comm.benchmark.provenance.commit_label`)."""
    from sagellm_comm.benchmark.provenance import commit_label as label

    return label(info.git_commit, info.git_dirty)


def format_table(records: Sequence[BenchmarkRecord], info: RunInfo) -> str:
    """The nccl-tests-shaped table (one row per size and algo), with a ratio column for several algos."""
    with_ratio = len(info.algos_requested) > 1
    first = info.algos_requested[0] if info.algos_requested else ""
    lines = [
        f"# sagellm-comm bench: {info.op_type}, {info.data_type}, world size {info.world_size}, "
        f"backend {info.backend_kind} (requested {info.backend_requested}), launch {info.launch_mode}",
        f"# device {info.device_name}, topology source {info.topology_source}, "
        f"sagellm-comm {info.package_version}, torch {info.torch_version}, commit {commit_label(info)}",
        f"# timing {info.timing_method}: {info.warmup_iters} warm-up + {info.benchmark_iters} timed "
        "iterations; time = median (slowest rank), spread = p10-p90",
        "# algbw = size / time, busbw = algbw * bus factor; GB/s = 10^9 bytes/s",
    ]
    if with_ratio:
        lines.append(f"# ratio = time({first}) / time(algo): > 1 means faster than {first}")
    for skip in info.skipped:
        where = f" at {skip['bytes']} B" if "bytes" in skip else ""
        lines.append(f"# skipped {skip.get('algo')}{where}: {skip.get('reason')}")
    header = (
        f"#{'size':>11} {'count':>12} {'type':>9} {'redop':>6} {'root':>5} {'algo':>14} {'time':>10} "
        f"{'p10-p90':>17} {'algbw':>8} {'busbw':>8} {'#wrong':>7}"
    )
    units = (
        f"#{'(B)':>11} {'(elements)':>12} {'':>9} {'':>6} {'':>5} {'':>14} {'(us)':>10} "
        f"{'(us)':>17} {'(GB/s)':>8} {'(GB/s)':>8} {'':>7}"
    )
    if with_ratio:
        header += f" {'ratio':>7}"
        units += f" {'':>7}"
    lines += [header, units.rstrip()]
    for r in records:
        spread = f"{_fmt_time_us(r.latency_p10_ms)}-{_fmt_time_us(r.latency_p90_ms)}"
        row = (
            f" {r.bytes:>11} {r.count:>12} {_short(r.data_type):>9} "
            f"{r.redop:>6} {r.root:>5} {_algo_cell(r):>14} {_fmt_time_us(r.latency_ms):>10} {spread:>17} "
            f"{format_gbps(r.algo_bandwidth_gbps):>8} {format_gbps(r.bus_bandwidth_gbps):>8} {r.num_wrong:>7}"
        )
        if with_ratio:
            row += f" {r.ratio_vs_first:>7.2f}" if r.ratio_vs_first is not None else f" {'-':>7}"
        lines.append(row)
    total_wrong = sum(r.num_wrong for r in records)
    lines.append(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}")
    busbws = [r.bus_bandwidth_gbps for r in records if r.bus_bandwidth_gbps is not None]
    if busbws:
        lines.append(f"# Avg bus bandwidth    : {sum(busbws) / len(busbws):.3f} GB/s")
    return "\n".join(lines)


def format_gbps(value: float | None) -> str:
    """A bandwidth cell: two decimals, ``-`` where the point has none."""
    return "-" if value is None else f"{value:.2f}"


def _algo_cell(record: BenchmarkRecord) -> str:
    """``one_shot``, or ``auto>one_shot`` when the request resolved to another algorithm."""
    if record.algo_requested == record.algo_id:
        return record.algo_id
    return f"{record.algo_requested}>{record.algo_id}"


_SHORT_TYPES = {"float32": "float", "float16": "half", "float64": "double"}


def _short(data_type: str) -> str:
    return _SHORT_TYPES.get(data_type, data_type)


def output_stem(op: str, world_size: int, timestamp: str) -> str:
    """``<op>_ws<N>_<timestamp>`` (timestamp as ``YYYYmmdd-HHMMSS``)."""
    return f"{op}_ws{world_size}_{timestamp}"


def file_stamp() -> str:
    """Now in UTC as ``YYYYmmdd-HHMMSS``, the timestamp of result file names."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def unique_stem(output_dir: Path, stem: str) -> str:
    """``stem``, else ``stem_2``, ``stem_3``, ...: the first with no ``.json`` or ``.csv`` in ``output_dir``."""
    candidate, suffix = stem, 1
    while (output_dir / f"{candidate}.json").exists() or (output_dir / f"{candidate}.csv").exists():
        suffix += 1
        candidate = f"{stem}_{suffix}"
    return candidate


def write_results(
    records: Sequence[BenchmarkRecord], info: RunInfo, output_dir: str | Path, file_timestamp: str
) -> tuple[Path, Path]:
    """Write ``<op>_ws<N>_<timestamp>.json`` and ``.csv`` under ``output_dir`` (a suffix added rather than replace a
    file: :func:`write_new_results`); return both paths.

    The JSON file holds ``{"run": RunInfo, "results": [record, ...]}``; the CSV file one row per record
    with the columns of :data:`RECORD_FIELDS`.
    """
    payload = {"run": info.to_dict(), "results": [r.to_dict() for r in records]}
    text = json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n"

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(RECORD_FIELDS))
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})

    return write_new_results(output_dir, output_stem(info.op_type, info.world_size, file_timestamp), text, write_csv)


def write_new_results(
    output_dir: str | Path, stem: str, json_text: str, write_csv: Callable[[IO[str]], object]
) -> tuple[Path, Path]:
    """Write ``json_text`` to ``<name>.json`` and ``write_csv(handle)`` to ``<name>.csv`` under ``output_dir``
    (made if missing), ``<name>`` the first free of ``stem``, ``stem_2``, ... (:func:`unique_stem`); return both paths.

    Neither file ever replaces one: where another run writes a file under the name between its choice and the writes,
    what this call wrote under it is removed and the next free name is taken."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        name = unique_stem(directory, stem)
        json_path = directory / f"{name}.json"
        csv_path = directory / f"{name}.csv"
        try:
            write_text(json_path, json_text, exclusive=True)
        except FileExistsError:
            continue
        try:
            write_file(csv_path, write_csv, exclusive=True)
        except FileExistsError:
            json_path.unlink()
            continue
        return json_path, csv_path


def _json_default(value: object) -> object:
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_results(path: str | Path) -> tuple[dict, list[dict]]:
    """Read a JSON file written by :func:`write_results`: ``(run_info_dict, [record_dict, ...])``."""
    payload = json.loads(Path(path).read_text())
    return payload["run"], payload["results"]


def plot_results(records: Sequence[BenchmarkRecord], info: RunInfo, path: str | Path) -> Path:
    """Latency (median with p10-p90 band) and bus bandwidth against size, one line per algo, log axes.

    A point with no positive value (a latency under the timer's resolution, a bandwidth that is None or 0, as the
    bus bandwidth of one rank) is left out of its panel: a log axis has no place for it, and 0 is no measurement.
    Needs matplotlib (``pip install -e '.[plot]'``); raises a clear error without it.
    """
    plt = pyplot()
    if not records:
        raise InvalidArgumentError("nothing to plot: the run produced no results")
    fig, (ax_lat, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    for algo in info.algos_requested:
        points = sorted((r for r in records if r.algo_requested == algo), key=lambda r: r.bytes)
        if not points:
            continue
        ran = sorted({r.algo_id for r in points})
        label = algo if ran == [algo] else f"{algo} ({', '.join(ran)})"
        timed = [r for r in points if r.latency_ms > 0]
        (line,) = ax_lat.plot(
            [r.bytes for r in timed], [r.latency_ms * 1e3 for r in timed], marker="o", markersize=3, label=label
        )
        band = [r for r in timed if r.latency_p10_ms > 0]
        ax_lat.fill_between(
            [r.bytes for r in band],
            [r.latency_p10_ms * 1e3 for r in band],
            [r.latency_p90_ms * 1e3 for r in band],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
        rated = [r for r in points if r.bus_bandwidth_gbps is not None and r.bus_bandwidth_gbps > 0]
        ax_bw.plot(
            [r.bytes for r in rated], [r.bus_bandwidth_gbps for r in rated], marker="o", markersize=3, label=label
        )
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    from sagellm_comm.benchmark.sizes import format_size

    for ax, ylabel in ((ax_lat, "latency, median (us)"), (ax_bw, "bus bandwidth (GB/s = 1e9 B/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_size(int(round(x))) if x >= 1 else ""))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{info.op_type} {info.data_type}, world size {info.world_size}, backend {info.backend_kind}, "
        f"{info.timing_method}, {info.device_name}",
        fontsize=10,
    )
    return save_figure(fig, path)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only); a clear error where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidArgumentError(
            "--plot needs matplotlib, which is not installed: pip install -e '.[plot]' in this checkout "
            "(or pip install matplotlib)"
        ) from exc
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (parents made; the format from the suffix), close it."""
    plt = pyplot()
    fig.tight_layout()
    out = Path(path)
    image_format = out.suffix[1:] or plt.rcParams["savefig.format"]
    if not out.suffix:  # as savefig names it
        out = out.with_name(f"{out.name}.{image_format}")
    try:
        write_file(out, lambda handle: fig.savefig(handle, format=image_format, dpi=120), binary=True)
    finally:
        plt.close(fig)
    return out


def print_report(table: str, *paths: Path | None) -> None:
    """The table on stdout, then ``# wrote`` and the files written (those not None), flushed."""
    print(table)
    written = [str(p) for p in paths if p is not None]
    if written:
        print("# wrote " + ", ".join(written))
    sys.stdout.flush()


#: one write of a finished run: what it writes (the error names it), and the call that writes it
WriteStep = tuple[str, Callable[[], object]]


def write_and_report(result: Any, files: WriteStep | None, plot: WriteStep | None, *, print_table: bool) -> None:
    """Finish a run: its results' ``files``, then its ``plot`` (each where given), then, with ``print_table``, its
    table on stdout and the paths written.  ``result`` has the ``table``, and the ``json_path``, ``csv_path`` and
    ``plot_path`` the steps set.

    A file a step cannot write (``OSError``: a full disk, a directory made read-only during the run) is an
    :class:`~sagellm_comm.errors.UnavailableError` naming that step's ``what``, raised once the table is printed
    (with ``print_table``; the results' paths only where their step completed): the measurements are not lost with
    their files."""
    steps = [step for step in (files, plot) if step is not None]
    done = 0
    try:
        for _, write in steps:
            write()
            done += 1
    except OSError as exc:
        if print_table:
            print_report(result.table, *((result.json_path, result.csv_path) if files is not None and done else ()))
        shown = "; the table above holds the measurements" if print_table else ""
        raise UnavailableError(
            f"the run finished but {steps[done][0]} could not be written ({exc.strerror or exc}){shown}"
        ) from exc
    if print_table:
        print_report(result.table, result.json_path, result.csv_path, result.plot_path)
