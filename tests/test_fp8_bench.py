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
