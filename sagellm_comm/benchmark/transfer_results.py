"""The transfer benchmark's records, table (nccl-tests-shaped), JSON/CSV files with provenance, and plot.

Units: times in microseconds, bandwidth in GB/s = 10**9 bytes per second of the request's total bytes
(``count * block``) over its median time.  ``ratio`` is time(first backend) / time(this backend) at the same
point and op (> 1: faster than the first backend).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sagellm_comm.benchmark.sizes import format_size
from sagellm_comm.files import write_file, write_text


@dataclass
class TransferRecord:
    backend: str
    op: str
    block_bytes: int
    count: int
    total_bytes: int
    prepared: bool
    timing: str  # "device" (CUDA events, device held) or "wall"
    latency_us: float | None
    latency_p10_us: float | None
    latency_p90_us: float | None
    latency_min_us: float | None
    samples: int | None  # timed requests behind the statistics: iters x rounds, pooled
    gbps: float | None
    host_us: float | None  # ipc on a GPU: median host time of write()/read() (submission)
    e2e_us: float | None  # ipc on a GPU: median wall time of a request and its wait()
    num_wrong: int | None
    ratio_vs_first: float | None
    error: str | None

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = tuple(f.name for f in fields(TransferRecord))


@dataclass
class TransferBenchResult:
    run: dict
    records: list[TransferRecord]
    notify: dict  # backend -> latency statistics (microseconds)
    json_path: Path | None = None
    csv_path: Path | None = None
    plot_path: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.error is None and not r.num_wrong for r in self.records)

    @property
    def table(self) -> str:
        return format_table(self)


def build_result(measured: dict, run: dict, prepared: bool) -> TransferBenchResult:
    from sagellm_comm.benchmark.ops import rate_gbps

    records = []
    for entry in measured["points"]:
        stats = entry.get("stats")
        total = entry["block"] * entry["count"]
        record = TransferRecord(
            backend=entry["backend"], op=entry["op"], block_bytes=entry["block"], count=entry["count"],
            total_bytes=total, prepared=prepared, timing=entry.get("timing", ""),
            latency_us=stats.median_us if stats else None, latency_p10_us=stats.p10_us if stats else None,
            latency_p90_us=stats.p90_us if stats else None, latency_min_us=stats.min_us if stats else None,
            samples=stats.samples if stats else None, gbps=rate_gbps(total, stats.median_us) if stats else None,
            host_us=entry.get("host_us"), e2e_us=entry.get("e2e_us"), num_wrong=entry.get("num_wrong"),
            ratio_vs_first=None, error=entry.get("error"),
        )  # fmt: skip
        records.append(record)
    # The reference is the first backend asked for; where it has no time (it failed) a point has no ratio.
    first = run["backends"][0] if run.get("backends") else None
    reference = {(r.op, r.block_bytes, r.count): r.latency_us for r in records if r.backend == first and r.latency_us}
    for record in records:
        base = reference.get((record.op, record.block_bytes, record.count))
        if base and record.latency_us:
            record.ratio_vs_first = base / record.latency_us
    notify = {backend: _notify_stats(by_pacing) for backend, by_pacing in measured["notify"].items()}
    run = {**run, "transports": measured["transports"], "failed_backends": measured["failed"]}
    return TransferBenchResult(run, records, notify)


def _notify_stats(by_pacing: dict) -> dict:
    """One backend's notification record: the ``idle`` pacing's statistics at the top level (the headline figure),
    each pacing's under its name, with the median host time of ``write()`` as ``host_median_us``."""
    from sagellm_comm.benchmark.timing import summarize

    out: dict = {"block_bytes": 16 * 1024}
    for pacing, samples in by_pacing.items():
        if samples["seen"]:
            stats = {**summarize(samples["seen"]).to_dict(), "host_median_us": summarize(samples["host"]).median_us}
        else:
            stats = {"samples": 0, "error": "no notification arrived"}
        out[pacing] = stats
    out.update(out.get("idle", {}))
    return out


def notify_summary(stats: dict) -> str:
    """The notification latencies of one backend (its entry in a record's ``notify``), each pacing's, in one line."""
    parts = []
    for pacing, what in (("idle", "initiator asleep between requests"), ("busy", "initiator busy between requests")):
        one = stats.get(pacing)
        if one is None and pacing == "idle" and stats.get("samples"):
            one = stats  # a record with one pacing: the idle one at the top level
        if not one:
            continue
        if not one.get("samples"):
            parts.append(f"{what}: {one.get('error')}")
            continue
        host = f", write() host {one['host_median_us']:.1f} us" if one.get("host_median_us") is not None else ""
        parts.append(
            f"{what}: median {one['median_us']:.1f} us (p10-p90 {one['p10_us']:.1f}-{one['p90_us']:.1f}{host})"
        )
    return "; ".join(parts) if parts else stats.get("error", "not measured")


def python_loop_summary(loops: dict) -> str:
    """A record's ``setup.python_loop_us`` (the median time of a fixed Python loop in each process) in words."""
    from sagellm_comm.benchmark.timing import PYTHON_LOOP_ITERATIONS

    where = ", ".join(f"{loops[side]:.1f} us in the {side}" for side in ("initiator", "peer") if side in loops)
    return (
        f"a fixed Python loop of {PYTHON_LOOP_ITERATIONS} iterations took {where} (medians; host-bound figures "
        "such as the notification latency vary with it)"
    )


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 1e5 else f"{value:.0f}"


def format_table(result: TransferBenchResult) -> str:
    from sagellm_comm.benchmark.provenance import commit_label
    from sagellm_comm.benchmark.report import format_gbps

    run = result.run
    lines = [
        f"# sagellm-comm transfer: 2 processes on {run['device']} ({run['device_name']}), backends "
        f"{', '.join(run['backends'])}{' (prepared block ids)' if run['prepared'] else ''}",
        f"# commit {commit_label(run['commit'], run.get('dirty'))}, torch {run['torch']}; "
        f"{run['warmup']} warm-up + {run['iters']} timed requests"
        f"{f' x {rounds} rounds (pooled)' if (rounds := run.get('rounds', 1)) > 1 else ''}, time = median, "
        "spread = p10-p90",
        "# timing: device = CUDA events with the device held (what the copies take on the GPU); wall = the host "
        "clock around request + completion",
        "# GB/s = total bytes / time (10^9 B/s); ratio = time(first backend) / time(backend)",
    ]
    if run.get("pinned"):
        lines.append(f"# pinned: the initiator on CPU {run['pinned'][0]}, the peer on CPU {run['pinned'][1]}")
    for backend, transport in run.get("transports", {}).items():
        lines.append(f"# {backend}: {transport}")
    for backend, why in run.get("failed_backends", {}).items():
        lines.append(f"# {backend}: not measured: {why}")
    for why in run.get("skipped", []):
        lines.append(f"# skipped {why}")
    lines.append(
        f"#{'block':>8} {'count':>6} {'total':>8} {'op':>6} {'backend':>12} {'timing':>7} {'time(us)':>10} "
        f"{'p10-p90':>17} {'GB/s':>8} {'host(us)':>9} {'e2e(us)':>9} {'#wrong':>7} {'ratio':>6}"
    )
    for r in result.records:
        if r.error is not None:
            lines.append(f" {format_size(r.block_bytes):>8} {r.count:>6} {format_size(r.total_bytes):>8} {r.op:>6} "
                         f"{r.backend:>12} failed: {r.error}")  # fmt: skip
            continue
        spread = f"{_us(r.latency_p10_us)}-{_us(r.latency_p90_us)}"
        lines.append(
            f" {format_size(r.block_bytes):>8} {r.count:>6} {format_size(r.total_bytes):>8} {r.op:>6} {r.backend:>12} "
            f"{r.timing:>7} {_us(r.latency_us):>10} {spread:>17} {format_gbps(r.gbps):>8} {_us(r.host_us):>9} "
            f"{_us(r.e2e_us):>9} {r.num_wrong:>7} "
            + (f"{r.ratio_vs_first:>6.2f}" if r.ratio_vs_first is not None else f"{'-':>6}")
        )
    for backend, stats in result.notify.items():
        lines.append(
            f"# notification latency, {backend} (one 16K block, write() call to the peer's notifications() returning "
            f"it): {notify_summary(stats)}"
        )
    loops = result.run.get("python_loop_us")
    if loops:
        lines.append(f"# host speed: {python_loop_summary(loops)}")
    wrong = sum(r.num_wrong or 0 for r in result.records)
    failed = sum(r.error is not None for r in result.records)
    lines.append(f"# Wrong bytes: {wrong}, failed points: {failed}: {'OK' if result.ok else 'FAILED'}")
    return "\n".join(lines)


def out_paths(stem: str | Path) -> tuple[Path, Path]:
    """``STEM.json`` and ``STEM.csv`` of ``--out STEM`` (a ``.json`` or ``.csv`` suffix of ``stem`` is dropped)."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".csv") else stem
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")


def write_files(result: TransferBenchResult, output_dir: str | None, out: str | None) -> None:
    """``STEM.json`` (``{"meta", "setup", "results", "notify"}``; ``meta`` is the provenance block every record
    under bench/results has) and ``STEM.csv``: ``out`` as the stem (files there replaced), else
    ``output_dir/transfer_<timestamp>`` with a suffix added rather than replace a file, also one another run writes
    meanwhile (as bench's: :func:`~sagellm_comm.benchmark.report.write_new_results`)."""
    from sagellm_comm.benchmark.provenance import record_text
    from sagellm_comm.benchmark.report import file_stamp, write_new_results

    meta = {k: result.run[k] for k in ("date", "command", "commit", "dirty", "commit_source", "torch", "triton")
            if k in result.run}  # fmt: skip
    meta["device"] = f"{result.run['device_name']} ({result.run['device']}, 2 processes)"
    text = record_text(meta, setup=result.run, results=[r.to_dict() for r in result.records], notify=result.notify)
    columns, rows = csv_rows(result)

    def write_csv(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    if out is None:
        result.json_path, result.csv_path = write_new_results(output_dir, f"transfer_{file_stamp()}", text, write_csv)
        return
    json_path, csv_path = out_paths(out)
    result.json_path = write_text(json_path, text)
    result.csv_path = write_file(csv_path, write_csv)


def csv_rows(result: TransferBenchResult) -> tuple[list[str], list[dict]]:
    """``(columns, rows)`` of the CSV: one row per record, carrying what the JSON holds about it: every field of
    the run's ``setup`` (which holds the provenance block's fields: date, command, commit, dirty flag, its source,
    versions; the block's device line is ``device_name`` and ``device``), the record's fields, and ``notify``, the
    notification latency of the record's backend.  A list or an object is a cell of JSON text, None an empty
    cell."""
    columns = list(dict.fromkeys([*result.run, *FIELDS, "notify"]))
    rows = []
    for record in result.records:
        values = {**result.run, **record.to_dict(), "notify": result.notify.get(record.backend)}
        rows.append({column: _cell(values.get(column)) for column in columns})
    return columns, rows


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return value


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def plot(result: TransferBenchResult, path: str) -> Path:
    """GB/s against block size, one panel per op, one line per backend and block count."""
    from sagellm_comm.benchmark.report import pyplot, save_figure

    plt = pyplot()

    ops = sorted({r.op for r in result.records})
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        lines = sorted({(r.backend, r.count) for r in result.records if r.op == op})
        for backend, count in lines:
            points = sorted((r for r in result.records if (r.op, r.backend, r.count) == (op, backend, count)
                             and r.gbps), key=lambda r: r.block_bytes)  # fmt: skip
            if points:
                ax.plot([r.block_bytes for r in points], [r.gbps for r in points], marker="o", markersize=3,
                        label=f"{backend}, {count} block(s)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size (bytes)")
        ax.set_ylabel("GB/s (1e9 B/s)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sagellm-comm transfer, {result.run['device_name']}", fontsize=10)
    return save_figure(fig, path)
