"""The FP8 benchmarks' analysis on the CPU: the rules derived from a record feed the fusion policy, the targets
are read as measured, and the docs tables render from (synthetic) records."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.test_bench_scripts import _tables, copy_tree

MODES = ("fp8", "fp8_per_token", "fp8_group128")


def _row(w, hidden, tokens, fused, unfused, ar=5.0, lamport=None):
    row = {"world_size": w, "hidden": hidden, "tokens": tokens, "bytes": tokens * hidden * 2, "ar_us": ar,
           "fused_us": fused - 0.5}  # fmt: skip
    for m in MODES:
        row[f"fused_{m}_us"] = fused
        row["one_shot_us"] = fused
        row[f"{m}_one_shot_us"] = fused
        row[f"{m}_two_shot_us"] = fused * 1.2
        if lamport is not None:
            row[f"{m}_lamport_us"] = lamport
        row[f"unfused_{m}_us"] = unfused
        row[f"path_{m}"] = "one_shot (small-one-shot)"
        row[f"speedup_{m}"] = round(unfused / fused, 3)
        row[f"over_ar_{m}_us"] = round(fused - ar, 3)
    return row


ROWS = [
    _row(2, 4096, 1, fused=6.0, unfused=12.0, lamport=4.0),
    _row(2, 4096, 16, fused=6.0, unfused=13.0, lamport=5.0),
    _row(2, 4096, 128, fused=9.0, unfused=14.0),
    _row(2, 4096, 512, fused=30.0, unfused=25.0),  # the chain wins here
]


def test_derived_rules_feed_the_fusion_policy():
    from sagellm_comm.fused import FusionPolicy

    bench = importlib.import_module("bench.fp8_fused_bench")
    derived = bench.derive_rules(ROWS)
    policy = FusionPolicy.from_dict(json.loads(json.dumps(derived)), source="record")
    pick = {t: policy.select(t, 4096, 2, "fp8_per_token") for t in (1, 16, 17, 128, 200, 512, 4096)}
    assert pick[1].algo == "lamport" and pick[16].algo == "lamport"  # merged into one range 1-16
    assert pick[1].rule_id == pick[16].rule_id == "w2-h4096-fp8_per_token-1-16"
    assert pick[17].algo == "one_shot" and pick[128].algo == "one_shot"
    assert pick[200].algo == "unfused" and pick[512].algo == "unfused" and "unfused 25.0 us" in pick[512].reason
    assert pick[4096].algo == "all_reduce_policy"  # beyond the measured shapes: the default
    assert policy.select(16, 4096, 4, "fp8").algo == "all_reduce_policy"  # another world size: not measured
    assert policy.select(16, 8192, 2, "fp8").algo == "all_reduce_policy"
    # The library's default rules follow (a bare default dropped them): the unquantised op at 8 ranks, 16 tokens
    # of 8192 keeps one-shot, where the all-reduce policy's two-shot measured slower than the unfused chain.
    assert policy.select(16, 8192, 8, None).rule_id == "w8-h8192-fused-one-shot"
    assert policy.select(16, 8192, 8, None).algo == "one_shot"


def test_targets_are_read_as_measured():
    bench = importlib.import_module("bench.fp8_fused_bench")
    t = bench.targets(ROWS)["fp8"]
    assert t["max_over_ar_us_at_most_64KB"] == pytest.approx(1.0)  # 16 tokens x 4096 x 2 B = 128 KB is out
    assert t["within_0.5us_of_ar"] is False
    assert t["min_speedup_at_most_128_tokens"] == pytest.approx(14.0 / 9.0, abs=1e-3)
    assert t["at_least_1.3x"] is True
    assert t["slower_than_unfused_at (W, hidden, tokens)"] == [(2, 4096, 512)]


def test_docs_tables_render_from_the_records(tmp_path):
    tables = _tables(copy_tree(tmp_path))
    for name in ("fp8_fused.json", "fp8_payload.json"):  # before the records exist
        (tmp_path / "bench/results/h200" / name).unlink(missing_ok=True)
    assert "No H200 record yet" in tables.fp8_fused() and "No H200 record yet" in tables.fp8_payload()
    bench = importlib.import_module("bench.fp8_fused_bench")
    meta = {"device": "NVIDIA H200", "date": "2026-12-20T00:00:00+00:00", "command": "python -m bench.x",
            "commit": "abc", "dirty": False}  # fmt: skip
    (tmp_path / "bench/results/h200").mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "virtual": ROWS, "targets_virtual": bench.targets(ROWS)}
    (tmp_path / "bench/results/h200/fp8_fused.json").write_text(json.dumps(record))
    text = tables.fp8_fused()
    assert "| 2 | 4096 | 128 | 5.0 | 8.5 | 9.0 | 9.0 | 9.0 | 14.0 | 1.56/1.56/1.56 | one_shot |" in text
    assert "slower than it at 1 shapes: (2, 4096, 512)" in text and "NOT met" in text
    (tmp_path / "bench/results/h100/fp8_fused_mps.json").unlink(missing_ok=True)
    assert "No H100 record yet" in tables.fp8_fused_mps_h100()
    (tmp_path / "bench/results/h100").mkdir(parents=True, exist_ok=True)
    mps = {"meta": {**meta, "device": "NVIDIA H100 80GB HBM3"}, "mps": ROWS, "targets_mps": bench.targets(ROWS)}
    (tmp_path / "bench/results/h100/fp8_fused_mps.json").write_text(json.dumps(mps))
    text = tables.fp8_fused_mps_h100()
    assert "Processes under MPS" in text and "Virtual ranks" not in text
    assert "| 2 | 4096 | 128 | 5.0 | 8.5 | 9.0 | 9.0 | 9.0 | 14.0 | 1.56/1.56/1.56 | one_shot |" in text
    row = {"world_size": 8, "distribution": "student_t", "tokens": 16, "hidden": 8192, "fp8_rel_l2": 0.0345,
           "fp8_max_rel_to_amax": 0.051, "bf16_rel_l2": 0.0011, "fp8_identical_ranks": True, "bytes_ratio": 0.5156,
           "fp8_us": 12.5, "bf16_us": 10.0}  # fmt: skip
    (tmp_path / "bench/results/h200/fp8_payload.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    assert (
        "| 8 | student_t | 16 x 8192 | 0.0345 | 0.0510 | 0.00110 | yes | 0.516 | 12.5 | 10.0 |" in tables.fp8_payload()
    )
    assert tables.main([]) == 0 and tables.main(["--check"]) == 0  # the docs and the index take the new records


def test_the_record_is_written_after_every_world_size_and_says_what_is_missing(tmp_path, monkeypatch):
    """A run stopped by a time limit keeps the world sizes it finished; the last write is whole."""
    bench = importlib.import_module("bench.fp8_fused_bench")
    out = tmp_path / "fp8.json"
    seen = []

    def fake_part(kind):
        def run(args, rows, after_world):
            for w in args.world_sizes if kind == "virtual" else args.mps_world_sizes:
                rows.append(_row(w, 4096, 1, fused=6.0, unfused=12.0))
                after_world()
                record = json.loads(out.read_text())
                seen.append((kind, w, record["meta"]["complete"], record["meta"].get("not_measured"), sorted(record)))
            return rows

        return run

    monkeypatch.setattr(bench, "cuda_available", lambda: True)
    monkeypatch.setattr(bench, "run_virtual", fake_part("virtual"))
    monkeypatch.setattr(bench, "run_mps", fake_part("mps"))
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert bench.main(["--out", str(out), "--world-sizes", "2,8", "--mps", "--mps-world-sizes", "4"]) == 0
    assert seen[0][:4] == ("virtual", 2, False, "virtual ranks W = 8, processes under MPS W = 4")
    assert seen[1][:4] == ("virtual", 8, False, "processes under MPS W = 4") and "mps" not in seen[1][4]
    assert seen[2][:4] == ("mps", 4, True, None) and {"mps", "targets_mps", "virtual"} <= set(seen[2][4])
    final = json.loads(out.read_text())
    assert final["meta"]["complete"] and len(final["virtual"]) == 2 and len(final["mps"]) == 1
    seen.clear()
    assert bench.main(["--out", str(out), "--mps", "--no-virtual", "--mps-world-sizes", "2"]) == 0
    assert [s[:3] for s in seen] == [("mps", 2, True)] and "virtual" not in json.loads(out.read_text())
    with pytest.raises(SystemExit) as info:
        bench.main(["--out", str(out), "--no-virtual"])
    assert info.value.code == 2


def test_a_run_merges_into_a_record_and_measures_only_what_it_lacks(tmp_path, monkeypatch):
    """--merge-into keeps the record's other rows and replaces the shapes measured again; --only-missing measures
    just the shapes the record has no row for; the record says which of the full grid are still missing."""
    import sagellm_comm.fused
    import sagellm_comm.virtual

    bench = importlib.import_module("bench.fp8_fused_bench")
    base_meta = {"device": "NVIDIA H200", "date": "2026-12-20", "command": "python -m bench.fp8_fused_bench",
                 "commit": "abc1234def", "dirty": False}  # fmt: skip
    base = {"meta": base_meta, "virtual": [_row(2, 4096, 1, 6.0, 12.0), _row(2, 4096, 16, 6.0, 13.0)],
            "mps": [_row(2, 4096, 1, 7.0, 12.0)]}  # fmt: skip
    record = tmp_path / "fp8.json"
    record.write_text(json.dumps(base))
    measured = []

    class Fake:
        def __init__(self, *args, **kwargs):
            self.world_size = args[0] if args and isinstance(args[0], int) else 0

        check_errors = close = lambda self: None

    def bench_virtual(vf, tokens, hidden, algos, calls, reps):
        measured.append(("virtual", hidden, tokens))
        return _row(2, hidden, tokens, fused=5.0, unfused=15.0)

    def spawn_ranks(fn, args, w, what):
        measured.extend(("mps", h, t) for h, t in args[0]["shapes"])
        rows = [_row(w, h, t, fused=5.0, unfused=15.0) for h, t in args[0]["shapes"]]
        return [rows for _ in range(w)]

    monkeypatch.setattr(bench, "cuda_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(sagellm_comm.virtual, "VirtualRankGroup", Fake)
    monkeypatch.setattr(sagellm_comm.fused, "VirtualFused", Fake)
    monkeypatch.setattr(bench, "bench_virtual", bench_virtual)
    monkeypatch.setattr(bench, "spawn_ranks", spawn_ranks)
    shape = ["--world-sizes", "2", "--hidden", "4096", "--tokens", "1,16,128", "--mps", "--mps-world-sizes", "2",
             "--mps-tokens", "1,64"]  # fmt: skip

    out = tmp_path / "merged.json"
    assert bench.main(["--out", str(out), "--merge-into", str(record), "--only-missing", *shape]) == 0
    assert measured == [("virtual", 4096, 128), ("mps", 4096, 64)]
    merged = json.loads(out.read_text())
    assert [(r["tokens"], r["fused_fp8_us"]) for r in merged["virtual"]] == [(1, 6.0), (16, 6.0), (128, 5.0)]
    assert [(r["tokens"], r["fused_fp8_us"]) for r in merged["mps"]] == [(1, 7.0), (64, 5.0)]
    runs = merged["meta"]["runs"]
    assert [r["commit"] for r in runs[:1]] == ["abc1234def"] and len(runs) == 2
    assert (
        runs[1]["rows"]
        == "virtual ranks W = 2 hidden 4096 at 128 tokens; processes under MPS W = 2 hidden 4096 at 64 tokens"
    )
    assert merged["meta"]["commit"] == "abc1234def" and "at 128 tokens" in merged["meta"]["command"]
    missing = merged["meta"]["not_measured"]
    assert missing.startswith("virtual ranks W = 2 hidden 4096 at 2-8, 32-64, 256-512 tokens; ")
    assert "virtual ranks W = 8 hidden 8192 at 1-512 tokens" in missing and merged["meta"]["complete"] is False
    assert merged["targets_virtual"] == bench.targets(merged["virtual"])
    assert merged["meta"]["dirty"] == runs[1]["dirty"]  # the first run's tree was clean: this run's flag counts
    assert merged["derived_rules"] == bench.derive_rules(merged["virtual"])

    measured.clear()  # nothing missing: nothing measured, the record unchanged but for what it says is missing
    assert bench.main(["--out", str(out), "--merge-into", str(out), "--only-missing", *shape]) == 0
    assert measured == [] and json.loads(out.read_text())["meta"]["runs"] == runs

    measured.clear()  # without --only-missing every shape is measured again and replaces the record's
    assert bench.main(["--out", str(out), "--merge-into", str(record), *shape]) == 0
    assert len(measured) == 5
    assert {r["fused_fp8_us"] for r in json.loads(out.read_text())["virtual"]} == {5.0}

    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert bench.main(["--out", str(out), "--merge-into", str(record), *shape]) == 2  # one record, one device
    for bad in (["--only-missing"], ["--merge-into", str(tmp_path / "none.json")]):
        with pytest.raises(SystemExit) as info:
            bench.main(["--out", str(out), *bad])
        assert info.value.code == 2


def test_docs_table_of_a_record_with_processes_only_says_what_it_lacks(tmp_path):
    tables = _tables(copy_tree(tmp_path))
    bench = importlib.import_module("bench.fp8_fused_bench")
    meta = {"device": "NVIDIA H200", "date": "2026-12-20T00:00:00+00:00", "command": "python -m bench.x",
            "commit": "abc", "dirty": False, "not_measured": "virtual ranks W = 8"}  # fmt: skip
    record = {"meta": meta, "mps": ROWS, "targets_mps": bench.targets(ROWS)}
    (tmp_path / "bench/results/h200").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bench/results/h200/fp8_fused.json").write_text(json.dumps(record))
    text = tables.fp8_fused()
    assert "Virtual ranks" not in text and "Processes under MPS" in text and "Targets, processes" in text
    assert "Not in this record: virtual ranks W = 8." in text


def test_a_merged_record_is_dirty_if_a_run_was_and_a_processes_only_one_stays_whole():
    """The record's top-level flag (what the docs cite) covers every run merged into it; merging into a record
    of processes only does not call it incomplete for lacking virtual ranks it never held."""
    bench = importlib.import_module("bench.fp8_fused_bench")
    meta = {"device": "NVIDIA H200", "date": "2026-12-20T00:00:00+00:00", "command": "python -m bench.x",
            "commit": "abc", "dirty": False, "complete": True}  # fmt: skip
    mps = [_row(w, h, t, fused=5.0, unfused=15.0) for w in (2, 4, 8) for h in (4096, 8192) for t in bench.MPS_TOKENS]
    base = {"meta": meta, "mps": mps, "targets_mps": bench.targets(mps)}
    run = {"command": "python -m bench.y", "commit": "def", "dirty": True, "date": "2026-12-21T00:00:00+00:00",
           "rows": "processes under MPS W = 2 hidden 4096 at 1 tokens"}  # fmt: skip
    merged = bench.merge_record(base, {"mps": [_row(2, 4096, 1, fused=4.0, unfused=15.0)]}, run)
    assert merged["meta"]["dirty"] is True and merged["meta"]["complete"] is True and "virtual" not in merged
    assert "not_measured" not in merged["meta"]
    unknown = bench.merge_record(merged, {"mps": mps[:1]}, {**run, "dirty": None})
    assert unknown["meta"]["dirty"] is True  # dirty wins over unknown
    clean = bench.merge_record(base, {"mps": mps[:1]}, {**run, "dirty": None})
    assert clean["meta"]["dirty"] is None


def test_docs_say_a_target_no_shape_measured_is_not_measured(tmp_path):
    tables = _tables(copy_tree(tmp_path))
    bench = importlib.import_module("bench.fp8_fused_bench")
    rows = [_row(2, 8192, 16, fused=6.0, unfused=13.0), _row(2, 8192, 64, fused=9.0, unfused=14.0)]  # 256 KB, 1 MB
    meta = {"device": "NVIDIA H200", "date": "2026-12-20T00:00:00+00:00", "command": "python -m bench.x",
            "commit": "abc", "dirty": False}  # fmt: skip
    (tmp_path / "bench/results/h200").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bench/results/h200/fp8_fused.json").write_text(
        json.dumps({"meta": meta, "mps": rows, "targets_mps": bench.targets(rows)})
    )
    text = tables.fp8_fused()
    assert "over the plain all-reduce at <= 64 KB: not measured (no such shape)" in text
    assert "at least 1.56x the unfused chain at <= 128 tokens (met: target 1.3)" in text


def test_a_fused_call_slower_by_less_than_the_speedups_rounding_is_listed_slower():
    """The 'never slower than the unfused chain' check reads the times: a speedup that rounds to 1.000 from below
    (10.004 us fused against 10.0 unfused) is a slower shape."""
    bench = importlib.import_module("bench.fp8_fused_bench")
    rows = [_row(2, 4096, 1, fused=10.004, unfused=10.0), _row(2, 4096, 2, fused=10.0, unfused=10.0)]
    assert rows[0]["speedup_fp8"] == 1.0
    for mode in MODES:
        assert bench.targets(rows)[mode]["slower_than_unfused_at (W, hidden, tokens)"] == [(2, 4096, 1)]


def test_a_run_that_replaces_every_row_of_the_record_gives_it_its_own_provenance():
    """Merged into a record whose every shape it measured again, a run leaves no row of the earlier runs: the
    record cites this run's commit, dirty flag, date, command and timing, not the replaced run's."""
    bench = importlib.import_module("bench.fp8_fused_bench")
    meta = {"device": "NVIDIA H200", "date": "2026-12-20T00:00:00+00:00", "command": "python -m bench.old",
            "commit": "abc", "dirty": True, "timing": "time_graph: median of 3 CUDA-graph replays of 5 calls",
            "torch": "2.10"}  # fmt: skip
    rows = [_row(2, 4096, 1, fused=6.0, unfused=12.0), _row(2, 4096, 16, fused=6.0, unfused=13.0)]
    base = {"meta": meta, "virtual": rows}
    run = {"command": "python -m bench.new", "commit": "def", "dirty": False, "date": "2026-12-21T00:00:00+00:00",
           "device": "NVIDIA H200", "timing": "time_graph: median of 10 CUDA-graph replays of 20 calls",
           "torch": "2.11", "rows": "virtual ranks W = 2 hidden 4096 at 1-16 tokens"}  # fmt: skip
    new = [_row(2, 4096, 1, fused=5.0, unfused=12.0), _row(2, 4096, 16, fused=5.0, unfused=13.0)]
    merged = bench.merge_record(base, {"virtual": new}, run)["meta"]
    assert (merged["commit"], merged["dirty"], merged["date"], merged["command"]) == (
        "def",
        False,
        "2026-12-21T00:00:00+00:00",
        "python -m bench.new",
    )
    assert merged["timing"] == run["timing"] and merged["torch"] == "2.11" and merged["runs"] == [run]
    partly = bench.merge_record(base, {"virtual": new[:1]}, run)["meta"]  # a row of the first run stays
    assert partly["commit"] == "abc" and partly["dirty"] is True and len(partly["runs"]) == 2
