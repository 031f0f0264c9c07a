"""Unit tests of the benchmark's arithmetic: sizes, statistics, bus bandwidth, inputs, table, files."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

from sagellm_comm.benchmark import ops, overlap_results, provenance, report, sizes, timing, transfer_results
from sagellm_comm.errors import InvalidArgumentError

# ---------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1", 1),
        ("512", 512),
        ("1K", 1024),
        ("1k", 1024),
        ("4KB", 4096),
        ("256M", 256 << 20),
        ("2GiB", 2 << 30),
    ],
)
def test_parse_size(text, nbytes):
    assert sizes.parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["1Q", "", "K", "-1K", "1.5M", "0", "1KK"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidArgumentError):
        sizes.parse_size(text)


def test_parse_size_range_doubles_inclusive():
    got = sizes.parse_size_range("1K:1M")
    assert got[0] == 1024 and got[-1] == 1 << 20
    assert len(got) == 11
    assert all(b == 2 * a for a, b in zip(got, got[1:], strict=False))


def test_parse_size_range_factor_and_single():
    assert sizes.parse_size_range("1K:64K:4") == [1024, 4096, 16384, 65536]
    assert sizes.parse_size_range("8K") == [8192]
    # an upper bound that is not on the grid is not exceeded
    assert sizes.parse_size_range("3:20") == [3, 6, 12]


@pytest.mark.parametrize("text", ["1M:1K", "1K:1M:1", "1K:1M:x", "1K:2Q", "1:2:3:4"])
def test_parse_size_range_rejects(text):
    with pytest.raises(InvalidArgumentError):
        sizes.parse_size_range(text)


def test_parse_size_list_and_format():
    assert sizes.parse_size_list(["1K,4K", "1M"]) == [1024, 4096, 1 << 20]
    assert [sizes.format_size(n) for n in (1000, 1024, 3 << 20, 1 << 30)] == ["1000", "1K", "3M", "1G"]


# ---------------------------------------------------------------------------------------- statistics


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    values = sorted([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0])
    for q in (0, 10, 25, 50, 90, 100):
        assert timing.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize():
    stats = timing.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats.median_us == 3.0
    assert stats.min_us == 1.0 and stats.max_us == 100.0
    assert stats.mean_us == pytest.approx(22.0)
    assert stats.p10_us == pytest.approx(1.4)
    assert stats.p90_us == pytest.approx(61.6)
    assert stats.samples == 5
    assert timing.TimingStats.from_list(stats.as_list(), 5) == stats
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_iterations_cpu_resets_outside_interval_and_barriers_once():
    calls = []
    timed = timing.time_iterations(
        lambda: calls.append("op"),
        iters=4,
        warmup=2,
        device="cpu",
        reset=lambda: calls.append("reset"),
        barrier=lambda: calls.append("barrier"),
    )
    assert len(timed) == 4 and all(t >= 0 for t in timed)
    assert calls == ["reset", "op"] * 2 + ["barrier"] + ["reset", "op"] * 4
    with pytest.raises(ValueError):
        timing.time_iterations(lambda: None, iters=0, warmup=0, device="cpu")


def test_time_iterations_measures_the_call():
    samples = timing.time_iterations(lambda: time.sleep(0.002), iters=3, warmup=0, device="cpu")
    assert min(samples) >= 2000.0


# ---------------------------------------------------------------------------------------- bandwidth


@pytest.mark.parametrize(
    ("op", "n", "factor"),
    [
        ("all_reduce", 1, 0.0),
        ("all_reduce", 2, 1.0),
        ("all_reduce", 8, 1.75),
        ("all_gather", 4, 0.75),
        ("reduce_scatter", 8, 0.875),
        ("broadcast", 8, 1.0),
    ],
)
def test_bus_factor(op, n, factor):
    assert ops.bus_factor(op, n) == pytest.approx(factor)


def test_bandwidths_are_decimal_gigabytes():
    # 1e9 bytes in 1 second: 1 GB/s algbw; all-reduce on 4 ranks: busbw = 1.5 GB/s
    algbw, busbw = ops.bandwidths_gbps(10**9, 1e6, "all_reduce", 4)
    assert algbw == pytest.approx(1.0)
    assert busbw == pytest.approx(1.5)
    # 1 MiB in 10 us
    algbw, busbw = ops.bandwidths_gbps(1 << 20, 10.0, "all_gather", 2)
    assert algbw == pytest.approx(104.8576)
    assert busbw == pytest.approx(52.4288)


@pytest.mark.parametrize("time_us", [0.0, -1.0, math.nan])
def test_a_time_with_no_bandwidth_has_none(time_us):
    """A median of 0 (a point shorter than the timer's resolution) or a time that is not one has no bandwidth:
    None, as a ratio without a reference is, never inf or a division by zero."""
    assert ops.bandwidths_gbps(1 << 20, time_us, "all_reduce", 2) == (None, None)
    assert ops.rate_gbps(1 << 20, time_us) is None


def test_a_point_timed_at_zero_is_written_and_shown_without_bandwidth(tmp_path):
    records = [_record(1024, "gloo", 0.0), _record(2048, "gloo", 0.002)]
    assert records[0].bus_bandwidth_gbps is None and records[0].algo_bandwidth_gbps is None
    json_path, csv_path = report.write_results(records, _info(["gloo"]), tmp_path, "t")
    _, results = report.load_results(json_path)
    assert [r["bus_bandwidth_gbps"] for r in results] == [None, pytest.approx(1.024)]
    with csv_path.open() as handle:
        assert next(csv.DictReader(handle))["bus_bandwidth_gbps"] == ""
    table = report.format_table(records, _info(["gloo"]))
    zero_row = [line for line in table.splitlines() if line.startswith(" ") and line.split()[0] == "1024"][0]
    assert zero_row.split()[8:10] == ["-", "-"]
    assert "# Avg bus bandwidth    : 1.024 GB/s" in table  # the points that have one


def test_a_script_run_as_a_module_records_the_module_command(monkeypatch):
    """``python -m bench.soak --calls 5`` is recorded as that command, not as the path of the module's file (which,
    run as a script, would import another ``sagellm_comm`` than the checkout's)."""
    import importlib.machinery
    import sys
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("bench.soak", None, origin="/repo/bench/soak.py")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/repo/bench/soak.py", "--calls", "5", "--out", "a b.json"])
    assert provenance.provenance("cpu")["command"].endswith(" -m bench.soak --calls 5 --out 'a b.json'")
    main.__spec__ = None  # python bench/soak.py: the script's path as given
    assert provenance.provenance("cpu")["command"].endswith(" /repo/bench/soak.py --calls 5 --out 'a b.json'")


def test_a_transfer_point_timed_at_zero_has_no_bandwidth():
    measured = {
        "points": [{"backend": "torch", "op": "write", "block": 4096, "count": 1, "num_wrong": 0, "timing": "wall",
                    "stats": timing.summarize([0.0, 0.0])}],
        "notify": {}, "failed": {}, "transports": {},
    }  # fmt: skip
    run = {"device": "cpu", "device_name": "cpu", "backends": ["torch"], "prepared": False, "commit": "0" * 40,
           "torch": "x", "warmup": 1, "iters": 1}  # fmt: skip
    result = transfer_results.build_result(measured, run, False)
    assert result.records[0].gbps is None
    row = [line for line in result.table.splitlines() if not line.startswith("#")][0]
    assert row.split()[8] == "-"


def test_the_transfer_csv_carries_every_field_the_json_holds_about_each_point(tmp_path):
    """Each CSV row holds the JSON's setup (with the provenance block's fields), its record and its backend's
    notification latency, value for value: a list or an object as JSON text, None as an empty cell."""
    measured = {
        "points": [{"backend": backend, "op": "write", "block": 4096, "count": 2, "num_wrong": 0, "timing": "wall",
                    "stats": timing.summarize([1.0, 3.0])} for backend in ("nixl", "torch")]
                  + [{"backend": "torch", "op": "read", "block": 4096, "count": 2, "error": "refused"}],
        "notify": {"nixl": {"idle": {"seen": [4.0, 5.0], "host": [1.0, 1.5]}}},
        "failed": {"ipc": "no GPU"}, "transports": {"nixl": "UCX RMA: cma/memory"},
    }  # fmt: skip
    run = {**provenance.provenance("cpu"), "command": "sagellm-comm transfer --out x", "device_name": "cpu: test",
           "hostname": "vm", "backends": ["nixl", "torch"], "ops": ["write", "read"], "prepared": False,
           "warmup": 1, "iters": 2, "rounds": 1, "pinned": [0, 1], "cpus": {"initiator": [0], "peer": [1]},
           "skipped": [], "interpreter": False}  # fmt: skip
    result = transfer_results.build_result(measured, run, False)
    transfer_results.write_files(result, None, str(tmp_path / "transfer"))
    record = json.loads((tmp_path / "transfer.json").read_text())
    with (tmp_path / "transfer.csv").open() as handle:
        rows = list(csv.DictReader(handle))

    def cell(value) -> str:  # what csv makes of a JSON value
        if value is None:
            return ""
        return json.dumps(value) if isinstance(value, dict | list) else str(value)

    meta, setup = record["meta"], record["setup"]
    assert len(rows) == len(record["results"]) == 3
    for row, point in zip(rows, record["results"], strict=True):
        assert set(row) == {*setup, *point, "notify"}, set(row) ^ {*setup, *point, "notify"}
        for key, value in {**setup, **point}.items():
            assert row[key] == cell(value), (key, row[key], value)
        for key, value in meta.items():
            if key == "device":  # the block's device line, made of the setup's two device fields
                assert value == f"{row['device_name']} ({row['device']}, 2 processes)"
            else:
                assert row[key] == cell(value), key
        assert row["notify"] == cell(record["notify"].get(point["backend"]))
    assert json.loads(rows[0]["notify"])["idle"]["samples"] == 2 and rows[1]["notify"] == ""


def test_bus_factor_rejects():
    with pytest.raises(InvalidArgumentError):
        ops.bus_factor("all_to_all", 2)
    with pytest.raises(InvalidArgumentError):
        ops.bus_factor("all_reduce", 0)


# ---------------------------------------------------------------------------------------- inputs


def test_element_count_rounding():
    assert ops.element_count("all_reduce", 1024, torch.float32, 3) == 256
    assert ops.element_count("all_reduce", 2, torch.float32, 3) == 1
    assert ops.element_count("all_gather", 1024, torch.float32, 3) == 255
    assert ops.element_count("reduce_scatter", 4, torch.float32, 4) == 4


def test_resolve_dtype():
    assert ops.resolve_dtype("bf16") is torch.bfloat16
    assert ops.resolve_dtype("float32") is torch.float32
    with pytest.raises(InvalidArgumentError):
        ops.resolve_dtype("float8")


def _simulate(op, world_size, dtype):
    """Run ``op`` by hand over every rank's buffers with plain torch (the collective's definition)."""
    bufs = [ops.make_buffers(op, 1000, dtype, r, world_size, "cpu") for r in range(world_size)]
    for b in bufs:
        b.prepare_check()
    if op == "all_reduce":
        total = sum(b.work.double() for b in bufs)
        for b in bufs:
            b.output.copy_(total)
    elif op == "broadcast":
        for b in bufs:
            b.output.copy_(bufs[ops.BROADCAST_ROOT].work)
    elif op == "all_gather":
        gathered = torch.cat([b.work for b in bufs])
        for b in bufs:
            b.output.copy_(gathered)
    elif op == "reduce_scatter":
        total = sum(b.work.double() for b in bufs)
        shard = bufs[0].output.numel()
        for b in bufs:
            b.output.copy_(total[b.rank * shard : (b.rank + 1) * shard])
    return bufs


@pytest.mark.parametrize("op", ops.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_reference_agrees_with_a_hand_run_collective(op, dtype, world_size):
    for b in _simulate(op, world_size, dtype):
        assert b.num_wrong() == 0


@pytest.mark.parametrize("op", ops.OPS)
def test_check_counts_wrong_elements(op):
    bufs = _simulate(op, 4, torch.float16)
    b = bufs[1]
    b.output[3] += 1
    b.output[-1] = float("nan")
    assert b.num_wrong() == 2


@pytest.mark.parametrize(
    ("dtype", "expected", "got"),
    [
        (torch.bfloat16, 100.0, 100.5),  # one ulp above (ulp 0.5 in [64, 128))
        (torch.bfloat16, 125.0, 124.5),  # one ulp below
        (torch.bfloat16, 40.0, 40.25),
        (torch.bfloat16, -64.0, -64.5),
        (torch.float16, 100.0, 100.0625),
        (torch.float16, 5.0, 5.00390625),
    ],
)
def test_a_value_one_ulp_off_is_wrong(dtype, expected, got):
    """The references are small integers, exact in every dtype: a result one ulp away from one is a wrong value,
    whatever the size of the reference."""
    want = torch.tensor([expected, 3.0], dtype=torch.float64)
    output = torch.tensor([got, 3.0], dtype=dtype)
    assert output[0].item() == got  # representable: one ulp, not rounded back
    assert ops.count_wrong(output, want) == 1
    assert ops.count_wrong(want.to(dtype), want) == 0


def test_out_of_place_output_is_poisoned_before_check():
    b = ops.make_buffers("all_gather", 64, torch.float32, 0, 2, "cpu")
    b.output.copy_(b.expected().float())
    assert b.num_wrong() == 0
    b.prepare_check()  # a stale correct result must not pass
    assert b.num_wrong() == b.output.numel()


def test_in_place_reset_restores_source():
    b = ops.make_buffers("all_reduce", 64, torch.float32, 1, 2, "cpu")
    assert b.in_place and b.nbytes == 64
    b.work.mul_(3)
    b.reset()
    assert torch.equal(b.work, b.source)
    assert b.work.data_ptr() != b.source.data_ptr()


# ---------------------------------------------------------------------------------------- report


def _record(nbytes, algo, latency_ms, **kw):
    algbw, busbw = ops.bandwidths_gbps(nbytes, latency_ms * 1e3, "all_reduce", 2)
    base = dict(
        bytes=nbytes,
        count=nbytes // 4,
        op_type="all_reduce",
        data_type="float32",
        redop="sum",
        root=-1,
        algo_id=algo,
        algo_requested=algo,
        backend_kind="gloo",
        world_size=2,
        latency_ms=latency_ms,
        latency_p10_ms=latency_ms * 0.9,
        latency_p90_ms=latency_ms * 1.2,
        latency_min_ms=latency_ms * 0.8,
        latency_max_ms=latency_ms * 1.5,
        latency_mean_ms=latency_ms,
        bandwidth_gbps=algbw,
        algo_bandwidth_gbps=algbw,
        bus_bandwidth_gbps=busbw,
        num_wrong=0,
        ratio_vs_first=None,
        selection_rule_id="",
        selection_reason="",
        topology_source="cpu",
        timing_method="wall_clock",
        launch_mode="spawn",
        warmup_iters=1,
        benchmark_iters=3,
        device_name="cpu",
        package_version="0.1.0",
        timestamp="2025-01-01T00:00:00+00:00",
    )
    base.update(kw)
    return report.BenchmarkRecord(**base)


def _info(algos):
    return report.RunInfo(
        command="sagellm-comm bench",
        op_type="all_reduce",
        data_type="float32",
        backend_requested="auto",
        backend_kind="gloo",
        world_size=2,
        launch_mode="spawn",
        timing_method="wall_clock",
        graph=False,
        algos_requested=list(algos),
        warmup_iters=1,
        benchmark_iters=3,
        topology_source="cpu",
        device_name="cpu",
        package_version="0.1.0",
        torch_version=torch.__version__,
        git_commit="unknown",
        hostname="host",
        timestamp="2025-01-01T00:00:00+00:00",
    )


def test_ratio_column():
    records = [_record(1024, "a", 0.010), _record(1024, "b", 0.005), _record(2048, "b", 0.004)]
    report.fill_ratios(records, "a")
    assert records[0].ratio_vs_first == pytest.approx(1.0)
    assert records[1].ratio_vs_first == pytest.approx(2.0)  # b is twice as fast as a
    assert records[2].ratio_vs_first is None  # no point of a at 2048
    table = report.format_table(records, _info(["a", "b"]))
    assert header_line(table).split()[-1] == "ratio"
    row = [line for line in table.splitlines() if line.startswith(" ") and " b " in line][0]
    assert row.split()[-1] == "2.00"


def test_a_first_algo_timed_at_zero_gives_no_ratio():
    """A reference shorter than the timer resolves has no ratio to offer (as it has no bandwidth), not 0.00."""
    records = [_record(1024, "a", 0.0), _record(1024, "b", 0.005)]
    report.fill_ratios(records, "a")
    assert [r.ratio_vs_first for r in records] == [None, None]
    row = [line for line in report.format_table(records, _info(["a", "b"])).splitlines() if " b " in line][0]
    assert row.split()[-1] == "-"


def header_line(table):
    return [line for line in table.splitlines() if "#wrong" in line][0]


def test_table_columns_and_arithmetic():
    rec = _record(1 << 20, "gloo", 0.5)  # 1 MiB in 500 us on 2 ranks
    table = report.format_table([rec], _info(["gloo"]))
    assert " ratio" not in header_line(table)
    header = [line for line in table.splitlines() if "#wrong" in line][0]
    for column in ("size", "count", "type", "redop", "root", "algo", "time", "algbw", "busbw", "#wrong"):
        assert column in header
    row = [line for line in table.splitlines() if not line.startswith("#")][0].split()
    assert row[:6] == ["1048576", "262144", "float", "sum", "-1", "gloo"]
    assert float(row[6]) == pytest.approx(500.0)
    assert float(row[8]) == pytest.approx(2.10, abs=0.01)  # 2**20 / 500e-6 / 1e9
    assert float(row[9]) == pytest.approx(2.10, abs=0.01)  # x 2(n-1)/n = 1 for n = 2
    assert row[10] == "0"
    assert "Out of bounds values : 0 OK" in table


def test_write_results_json_csv(tmp_path):
    records = [_record(1024, "gloo", 0.01), _record(2048, "gloo", 0.02)]
    info = _info(["gloo"])
    json_path, csv_path = report.write_results(records, info, tmp_path / "out", "20250101-000000")
    assert json_path.name == "all_reduce_ws2_20250101-000000.json"
    assert csv_path.name == "all_reduce_ws2_20250101-000000.csv"
    run, results = report.load_results(json_path)
    assert run["backend_kind"] == "gloo" and run["command"] == "sagellm-comm bench"
    assert [r["bytes"] for r in results] == [1024, 2048]
    assert set(report.RECORD_FIELDS) <= set(results[0])
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["bytes"]) for r in rows] == [1024, 2048]
    assert float(rows[1]["latency_ms"]) == pytest.approx(0.02)
    assert rows[0]["ratio_vs_first"] == ""
    # a second run in the same second does not overwrite the first
    again, _ = report.write_results(records, info, tmp_path / "out", "20250101-000000")
    assert again != json_path and json.loads(again.read_text())["results"]


def _another_run_writes_the_chosen_name_first(monkeypatch):
    """``report.unique_stem`` that, the first time, lets another run write ``STEM.json`` and ``STEM.csv`` under the
    name it chose before this run writes; returns the list of the names the other run took."""
    chosen = report.unique_stem
    raced = []

    def another_run_writes_first(directory, stem):
        name = chosen(directory, stem)
        if not raced:  # the other run's files land between this run's choice of a name and its writes
            raced.append(name)
            (directory / f"{name}.json").write_text("the other run's JSON\n")
            (directory / f"{name}.csv").write_text("the other run's CSV\n")
        return name

    monkeypatch.setattr(report, "unique_stem", another_run_writes_first)
    return raced


def test_results_never_replace_the_files_another_run_wrote_under_the_same_name(tmp_path, monkeypatch):
    """Two runs finishing in the same second: the one whose files land second takes the next name, even where the
    other's appeared after it had chosen its own (no file of the first is replaced)."""
    _another_run_writes_the_chosen_name_first(monkeypatch)
    json_path, csv_path = report.write_results(
        [_record(1024, "gloo", 0.01)], _info(["gloo"]), tmp_path, "20250101-000000"
    )
    assert (tmp_path / "all_reduce_ws2_20250101-000000.json").read_text() == "the other run's JSON\n"
    assert (tmp_path / "all_reduce_ws2_20250101-000000.csv").read_text() == "the other run's CSV\n"
    assert (json_path.name, csv_path.name) == (
        "all_reduce_ws2_20250101-000000_2.json",
        "all_reduce_ws2_20250101-000000_2.csv",
    )
    assert json.loads(json_path.read_text())["results"][0]["bytes"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"all_reduce_ws2_20250101-000000{suffix}" for suffix in (".json", ".csv", "_2.json", "_2.csv")
    )


def _write_overlap(directory):
    result = _overlap_result()
    overlap_results.write_overlap_results(result, directory)
    return result


def _write_transfer(directory):  # the timestamped names of --output-dir
    result = _transfer_result()
    transfer_results.write_files(result, str(directory), None)
    return result


@pytest.mark.parametrize("write, prefix", [(_write_overlap, "overlap_ws2_"), (_write_transfer, "transfer_")])
def test_overlap_and_transfer_results_never_replace_the_files_another_run_wrote_under_the_same_name(
    tmp_path, monkeypatch, write, prefix
):
    """As bench's: two runs finishing in the same second, the second to write takes the next name even where the
    other's files appeared after it had chosen its own."""
    raced = _another_run_writes_the_chosen_name_first(monkeypatch)
    result = write(tmp_path)
    (taken,) = raced
    assert taken.startswith(prefix)
    assert (tmp_path / f"{taken}.json").read_text() == "the other run's JSON\n"
    assert (tmp_path / f"{taken}.csv").read_text() == "the other run's CSV\n"
    assert (result.json_path.name, result.csv_path.name) == (f"{taken}_2.json", f"{taken}_2.csv")
    assert len(json.loads(result.json_path.read_text())["results"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{taken}{suffix}" for suffix in (".json", ".csv", "_2.json", "_2.csv")
    )


def test_transfer_out_stem_replaces_its_files(tmp_path):
    """``--out STEM`` names the files: a second run with the same stem writes them again (no suffix)."""
    for _ in range(2):
        result = _transfer_result()
        transfer_results.write_files(result, None, str(tmp_path / "transfer"))
        assert (result.json_path, result.csv_path) == (tmp_path / "transfer.json", tmp_path / "transfer.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transfer.csv", "transfer.json"]


def test_write_results_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        report.write_results([_record(1024, "gloo", math.nan)], _info(["gloo"]), tmp_path, "t")


def test_results_that_cannot_be_written_after_the_run_still_print_the_table(tmp_path, monkeypatch, capsys):
    """A full disk at the end of a sweep: the table is printed, then one typed error (exit 1), not a traceback that
    loses the measurements."""
    from sagellm_comm.benchmark import results
    from sagellm_comm.benchmark.config import BenchConfig
    from sagellm_comm.errors import UnavailableError

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_results", full_disk)
    finished = results.BenchmarkResult(_info(["gloo"]), [_record(1024, "gloo", 0.01)])
    config = BenchConfig(output_dir=str(tmp_path))
    with pytest.raises(UnavailableError, match=f"--output-dir {tmp_path} could not be written .No space left"):
        results.finish(finished, config, print_table=True)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert rows and rows[0][:2] == ["1024", "256"]


@pytest.mark.parametrize("command", ["overlap", "transfer"])
def test_overlap_and_transfer_results_that_cannot_be_written_still_print_the_table(
    tmp_path, monkeypatch, capsys, command
):
    """As for bench: the table is printed without the paths of files that were not written, then one typed error
    names what was not written."""
    from sagellm_comm.benchmark import run_overlap_bench, run_transfer_bench
    from sagellm_comm.benchmark.transfer_config import TransferBenchConfig
    from sagellm_comm.errors import UnavailableError

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    if command == "overlap":
        monkeypatch.setattr(run_overlap_bench, "write_overlap_results", full_disk)
        finish = run_overlap_bench.finish_overlap
        result, config = _overlap_result(), overlap_results.OverlapConfig(output_dir=str(tmp_path))
        where = f"--output-dir {tmp_path}"
    else:
        monkeypatch.setattr(transfer_results, "write_files", full_disk)
        finish = run_transfer_bench.finish_transfer
        result, config = _transfer_result(), TransferBenchConfig(out=str(tmp_path / "t"))
        where = f"--out {tmp_path / 't'}"
    with pytest.raises(UnavailableError, match=f"the results in {where} could not be written .No space left"):
        finish(result, config, print_table=True)
    printed = capsys.readouterr().out
    assert result.table.splitlines()[-1] in printed and str(tmp_path) not in printed, printed


def test_a_plot_that_cannot_be_written_still_prints_the_table_with_the_files_written(tmp_path, capsys):
    """The results' files were written, the plot was not: the table names the files, then one typed error names the
    plot (the same end for bench, overlap and transfer: report.write_and_report)."""
    from sagellm_comm.errors import UnavailableError

    result = _overlap_result()

    def write_files() -> None:
        result.json_path, result.csv_path = tmp_path / "r.json", tmp_path / "r.csv"

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(UnavailableError, match="--plot p.png could not be written .No space left.*table above"):
        report.write_and_report(result, ("the results", write_files), ("--plot p.png", full_disk), print_table=True)
    printed = capsys.readouterr().out
    assert result.table.splitlines()[-1] in printed
    assert f"# wrote {tmp_path / 'r.json'}, {tmp_path / 'r.csv'}" in printed and "p.png" not in printed


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    records = [_record(n, algo, n * 1e-6 + t) for n in (1024, 4096) for algo, t in (("a", 0.01), ("b", 0.02))]
    path = report.plot_results(records, _info(["a", "b"]), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_leaves_out_points_with_no_positive_value(tmp_path, monkeypatch):
    """A latency of 0 (under the timer's resolution) or a bandwidth of 0 or None has no place on a log axis and is
    no measurement: it is left out of its panel, not drawn at the axis' edge."""
    pytest.importorskip("matplotlib")
    drawn = {}

    def keep(fig, path):
        ax_lat, ax_bw = fig.axes
        drawn["latency"] = [(x, y) for x, y in zip(*ax_lat.lines[0].get_data(), strict=True)]
        drawn["busbw"] = [(x, y) for x, y in zip(*ax_bw.lines[0].get_data(), strict=True)]
        return Path(path)

    monkeypatch.setattr(report, "save_figure", keep)
    records = [_record(1024, "a", 0.0), _record(2048, "a", 0.004), _record(4096, "a", 0.008)]
    records[1].bus_bandwidth_gbps = 0.0  # one rank's bus bandwidth
    report.plot_results(records, _info(["a"]), tmp_path / "p.png")
    assert drawn["latency"] == [(2048, pytest.approx(4.0)), (4096, pytest.approx(8.0))]
    assert drawn["busbw"] == [(4096, pytest.approx(records[2].bus_bandwidth_gbps))]


def test_graph_replays_eager_is_the_call_itself():
    from sagellm_comm.benchmark.measure import LoopSettings, graph_replays

    settings = LoopSettings("all_reduce", torch.float32, [64], ["auto"], 1, 1, graph=False, progress=False)
    calls = []

    def fn():
        calls.append(1)

    timed, check, per_sample = graph_replays(fn, settings, torch.device("cpu"), reset=lambda: None)
    assert timed is fn and check is fn and per_sample == 1
    assert calls == []  # nothing runs before the timed loop


# ------------------------------------------------------------------------------------- provenance


def _git_repo(path, *files):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)

    git("init", "-q")
    for name in files:
        (path / name).write_text("v1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_git_state_reads_commit_and_dirty_flag_from_git(tmp_path, monkeypatch):
    from sagellm_comm.benchmark.provenance import git_state

    monkeypatch.setenv("SAGELLM_COMMIT", "from-the-environment")  # git wins where it can answer
    head = _git_repo(tmp_path, "a.py")
    assert git_state(tmp_path) == git_state(tmp_path).__class__(head, False, "git")
    (tmp_path / "untracked.json").write_text("{}")  # a result file written by a run: still clean
    assert git_state(tmp_path).dirty is False
    (tmp_path / "a.py").write_text("v2\n")
    state = git_state(tmp_path)
    assert state.commit == head and len(head) == 40 and state.dirty is True


def test_git_state_falls_back_to_the_environment_and_says_so(tmp_path, monkeypatch):
    from sagellm_comm.benchmark.provenance import git_state

    monkeypatch.setenv("SAGELLM_COMMIT", "abc1234")
    state = git_state(tmp_path)  # not a repository: git cannot answer
    assert state.commit == "abc1234" and state.dirty is None and "SAGELLM_COMMIT" in state.source
    monkeypatch.delenv("SAGELLM_COMMIT")
    state = git_state(tmp_path)
    assert state.commit == "unknown" and state.dirty is None and "unset" in state.source


def test_git_state_ignores_a_repository_that_merely_encloses_the_tree(tmp_path, monkeypatch):
    """An installed package inside some other project's checkout must not record that project's commit."""
    from sagellm_comm.benchmark.provenance import git_state

    monkeypatch.delenv("SAGELLM_COMMIT", raising=False)
    _git_repo(tmp_path, "a.py")
    (tmp_path / "site-packages").mkdir()
    state = git_state(tmp_path / "site-packages")
    assert state.commit == "unknown" and state.dirty is None


def test_git_state_reads_the_trees_own_repository_whatever_git_variables_are_set(tmp_path, monkeypatch):
    """GIT_DIR / GIT_INDEX_FILE in the environment (a git hook, a dotfiles alias) name another repository: the
    record must still carry the commit and dirty flag of the tree the package came from."""
    from sagellm_comm.benchmark.provenance import git_state

    (tmp_path / "tree").mkdir()
    (tmp_path / "other").mkdir()
    head = _git_repo(tmp_path / "tree", "a.py")
    other = _git_repo(tmp_path / "other", "b.py")
    (tmp_path / "tree" / "a.py").write_text("v2\n")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "other" / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(tmp_path / "other"))
    state = git_state(tmp_path / "tree")
    assert other != head and (state.commit, state.dirty, state.source) == (head, True, "git")
    monkeypatch.delenv("GIT_WORK_TREE")
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "other" / ".git" / "index"))
    state = git_state(tmp_path / "tree")
    assert (state.commit, state.dirty, state.source) == (head, True, "git")


def test_table_header_names_the_commit_and_dirty_flag():
    info = _info(["a"])
    info.git_commit, info.git_dirty = "0123456789abcdef0123", True
    assert "commit 0123456789ab + dirty" in report.format_table([], info)
    info.git_dirty = None
    assert "commit 0123456789ab (dirty unknown)" in report.format_table([], info)


@pytest.mark.parametrize(("dirty", "label"), [(False, "0123456789ab,"), (True, "0123456789ab + dirty,"),
                                              (None, "0123456789ab (dirty unknown),")])  # fmt: skip
def test_the_transfer_table_names_the_commit_and_dirty_flag_as_the_bench_table_does(dirty, label):
    """Without git (the commit from SAGELLM_COMMIT) the dirty flag is unknown, which is not clean."""
    measured = {"points": [], "notify": {}, "failed": {}, "transports": {}}
    run = {"device": "cpu", "device_name": "cpu", "backends": ["torch"], "prepared": False,
           "commit": "0123456789abcdef0123", "dirty": dirty, "torch": "x", "warmup": 1, "iters": 1}  # fmt: skip
    table = transfer_results.build_result(measured, run, False).table
    assert f"# commit {label} torch x;" in table


def test_time_graph_needs_a_cuda_device_and_a_positive_call_count():
    with pytest.raises(ValueError, match="calls must be >= 1"):
        timing.time_graph(lambda: None, device="cpu", calls=0, iters=1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        timing.time_graph(lambda: None, device="cpu", iters=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu test: no CUDA GPU visible")
def test_time_graph_divides_by_the_calls_per_graph():
    x = torch.zeros(1 << 24, device="cuda")
    one = timing.summarize(timing.time_graph(lambda: x.add_(1), device="cuda", calls=1, iters=10)).median_us
    ten = timing.summarize(timing.time_graph(lambda: x.add_(1), device="cuda", calls=10, iters=10)).median_us
    assert ten == pytest.approx(one, rel=0.3)  # per call, not per replay


# ---------------------------------------------------------------------------------------- files written whole


class _Killed(BaseException):
    """Stands for the signal that ends a run while it writes a file."""


def _kill_mid_write(monkeypatch, directory, name_part):
    """Every file under ``directory`` whose name holds ``name_part`` and is opened for writing gets half of its
    first write, then the run is killed."""
    import builtins
    import io
    import os

    real_open = io.open

    class Interrupted:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            raise _Killed

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._handle.close()

        def __getattr__(self, name):
            return getattr(self._handle, name)

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{handle.fileno()}")
        if any(m in mode for m in "wax+") and path.startswith(str(directory)) and name_part in os.path.basename(path):
            return Interrupted(handle)
        return handle

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)


def _is_complete(path) -> bool:
    """A whole file of the benchmark's kinds: JSON that parses, CSV rows of the header's width, a PNG trailer."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError:
            return False
        return True
    if path.suffix == ".csv":
        text = path.read_text()
        rows = list(csv.reader(text.splitlines()))
        return text.endswith("\n") and len(rows) > 1 and all(len(r) == len(rows[0]) for r in rows)
    if path.suffix == ".png":
        return path.read_bytes().endswith(b"IEND\xaeB`\x82")
    return False  # anything else (a temporary file left behind) is not a result


def _overlap_result():
    from dataclasses import fields

    record = overlap_results.OverlapRecord(**{f.name: 1 for f in fields(overlap_results.OverlapRecord)})
    return overlap_results.OverlapResult([record, record], run={"world_size": 2})


def _transfer_result():
    point = {"backend": "torch", "op": "write", "block": 4096, "num_wrong": 0, "timing": "wall"}
    measured = {
        "points": [{**point, "count": n, "stats": timing.summarize([1.0, 2.0])} for n in (1, 10)],
        "notify": {}, "failed": {}, "transports": {},
    }  # fmt: skip
    run = {"device": "cpu", "device_name": "cpu", "backends": ["torch"], "prepared": False, "commit": "0" * 40,
           "torch": "x", "warmup": 1, "iters": 1}  # fmt: skip
    return transfer_results.build_result(measured, run, False)


def _figure():
    plt = report.pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    return fig


WRITERS = {
    "bench": lambda d: report.write_results([_record(1024, "gloo", 0.01)] * 3, _info(["gloo"]), d, "t"),
    "record": lambda d: provenance.write_record(
        d / "r.json", {"device": "cpu"}, rows=[{"bytes": n} for n in range(99)]
    ),
    "transfer": lambda d: transfer_results.write_files(_transfer_result(), None, str(d / "transfer")),
    "overlap": lambda d: overlap_results.write_overlap_results(_overlap_result(), d),
    "plot": lambda d: report.save_figure(_figure(), d / "p.png"),
}
KILLED = [("bench", ".json"), ("bench", ".csv"), ("record", ".json"), ("transfer", ".json"), ("transfer", ".csv"),
          ("overlap", ".json"), ("overlap", ".csv"), ("plot", ".png")]  # fmt: skip


@pytest.mark.parametrize(("writer", "killed"), KILLED)
def test_a_run_killed_while_writing_leaves_no_truncated_file(tmp_path, monkeypatch, writer, killed):
    """A file of the benchmark appears whole or not at all; one it replaces stays whole until then."""
    if writer == "plot":
        pytest.importorskip("matplotlib")
    before = '{"meta": {"device": "before"}}\n'
    (tmp_path / "r.json").write_text(before)
    _kill_mid_write(monkeypatch, tmp_path, killed)
    with pytest.raises(_Killed):
        WRITERS[writer](tmp_path)
    monkeypatch.undo()
    left = sorted(tmp_path.iterdir())
    assert [p.name for p in left if not _is_complete(p)] == [], [p.name for p in left]
    assert (tmp_path / "r.json").read_text() == before
    WRITERS[writer](tmp_path)  # the same call, not killed: every file it writes is whole
    assert all(_is_complete(p) for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- output checks


def test_checking_a_missing_output_dir_never_touches_the_path_other_ranks_check(tmp_path, monkeypatch):
    """Every rank of a torchrun job checks the same missing --output-dir at once: one rank made the directory
    between another's look and its mkdir (that mkdir failed: 'cannot create'), or removed it while another wrote
    its probe file there.  The check makes the missing directories inside a probe directory of its own, so what
    another rank does at the path cannot refuse it, and it leaves nothing behind."""
    from sagellm_comm.benchmark import plan

    target = tmp_path / "results" / "run"
    other_rank = {"made": False}
    mkdir, mkstemp = Path.mkdir, plan.tempfile.mkstemp

    def mkdir_after_another_rank(self, *args, **kwargs):
        if not other_rank["made"]:  # another rank made the directories since this one looked
            other_rank["made"] = True
            mkdir(target, parents=True)
        return mkdir(self, *args, **kwargs)

    def mkstemp_after_another_rank(*args, **kwargs):
        if target.exists():  # ... and removed them again, its check done
            target.rmdir()
            target.parent.rmdir()
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_after_another_rank)
    monkeypatch.setattr(plan.tempfile, "mkstemp", mkstemp_after_another_rank)
    plan.check_writable_dir(target, "--output-dir")
    monkeypatch.undo()
    assert other_rank["made"] and sorted(tmp_path.iterdir()) == []


def test_concurrent_checks_of_one_missing_output_dir_all_pass(tmp_path):
    """Threads standing for a job's ranks check one missing directory at once, many times: each passes."""
    import threading

    from sagellm_comm.benchmark.plan import check_writable_dir

    target = tmp_path / "results" / "run"
    refusals: list[Exception] = []
    start = threading.Barrier(4)

    def rank() -> None:
        start.wait()
        for _ in range(50):
            try:
                check_writable_dir(target, "--output-dir")
            except InvalidArgumentError as exc:
                refusals.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refusals == [] and sorted(tmp_path.iterdir()) == []


def test_an_output_dir_that_is_a_dangling_symbolic_link_is_refused_up_front(tmp_path):
    """A symbolic link to a missing target does not exist as a path, but its name is taken: the results could
    never be written there (``mkdir`` fails on the link), so the check refuses it before anything runs, as it
    refuses a missing directory whose parent is a dangling link."""
    from sagellm_comm.benchmark.plan import check_writable_dir
    from sagellm_comm.benchmark.report import write_new_results

    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(FileExistsError):  # what writing the results (bench, overlap, transfer) would meet after the run
        write_new_results(link, "t", "{}\n", lambda handle: None)
    for target in (link, link / "run"):
        with pytest.raises(InvalidArgumentError, match="symbolic link"):
            check_writable_dir(target, "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


class _HeldDevice:
    """A device for :func:`timing.time_iterations` on the CPU: ``hold(us)`` holds it for ``us`` of the host's
    clock, an event recorded after the hold has completed once that time passed, and every interval is 1 us."""

    def __init__(self, monkeypatch):
        self.holds, self.until = [], 0.0
        device = self

        class Event:
            def __init__(self, enable_timing: bool = False):
                self.at = None

            def record(self):
                self.at = device.until

            def query(self):
                return time.perf_counter() >= self.at

            def elapsed_time(self, other):
                return 1e-3

        def hold(us, _device):
            self.holds.append(us)
            self.until = time.perf_counter() + us / 1e6

        monkeypatch.setattr(timing, "_is_cuda", lambda _device: True)
        monkeypatch.setattr(timing, "hold", hold)
        monkeypatch.setattr(timing.torch.cuda, "Event", Event)
        monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda _device=None: None)


def _slower_when_timed(calls: list, warm_s: float, timed_s: float, warmup: int):
    """A call that takes ``warm_s`` in warm-up and ``timed_s`` after it (a path that changes behind a hold)."""

    def fn():
        calls.append(1)
        time.sleep(warm_s if len(calls) <= warmup else timed_s)

    return fn


def test_a_batch_that_outruns_its_hold_is_queued_again_behind_a_longer_one(monkeypatch):
    device = _HeldDevice(monkeypatch)
    calls = []
    samples = timing.time_iterations(_slower_when_timed(calls, 1e-4, 5e-3, 2), iters=4, warmup=2, device="cuda",
                                     hold_device=True)  # fmt: skip
    # Warm-up said ~100 us a call: the first hold (~1 ms) ended while 4 x 5 ms were queued; the second is sized
    # from that batch (more than 2 x 4 x 5 ms) and outlasts the queuing, so no third batch.
    assert len(device.holds) == 2, device.holds
    assert device.holds[0] < 4 * 5000.0 < 2 * 4 * 5000.0 < device.holds[1]
    assert len(calls) == 2 + 2 * 4 and samples == pytest.approx([1.0] * 4)


def test_a_held_batch_is_queued_once_when_its_hold_outlasts_it_or_ranks_share_it(monkeypatch):
    device = _HeldDevice(monkeypatch)
    calls = []
    timing.time_iterations(_slower_when_timed(calls, 2e-3, 1e-4, 2), iters=4, warmup=2, device="cuda",
                           hold_device=True)  # fmt: skip
    assert len(device.holds) == 1 and len(calls) == 6
    # With a barrier the batch is every rank's: never queued again by one of them alone, however it went.
    device.holds.clear()
    calls.clear()
    barriers = []
    timing.time_iterations(_slower_when_timed(calls, 1e-4, 2e-3, 2), iters=4, warmup=2, device="cuda",
                           hold_device=True, barrier=lambda: barriers.append(1))  # fmt: skip
    assert len(device.holds) == 1 and len(calls) == 6 and barriers == [1]


def test_a_batch_that_never_fits_its_hold_stops_after_hold_tries(monkeypatch):
    device = _HeldDevice(monkeypatch)
    monkeypatch.setattr(timing, "MAX_HOLD_US", 500.0)  # the cap keeps every hold shorter than the batch
    calls = []
    timing.time_iterations(_slower_when_timed(calls, 1e-4, 1e-3, 1), iters=3, warmup=1, device="cuda",
                           hold_device=True)  # fmt: skip
    assert device.holds == [500.0] * timing.HOLD_TRIES
    assert len(calls) == 1 + 3 * timing.HOLD_TRIES
