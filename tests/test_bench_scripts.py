"""bench/: the docs agree with the records, every record has provenance, every script runs or refuses in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))
GPU_SCRIPTS = (
    "custom_all_reduce_bench", "fp8_fused_bench", "fp8_payload_error", "fused_bench", "fused_multi_gpu_bench",
    "group_bench", "protocol_cost", "soak", "transfer_latency",
)  # fmt: skip
HAS_CUDA = __import__("torch").cuda.is_available()


def _tables(repo: Path = REPO):
    """bench/make_docs_tables.py loaded as a module, pointed at ``repo``."""
    spec = importlib.util.spec_from_file_location("make_docs_tables", BENCH / "make_docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.REPO, module.RESULTS = repo, repo / "bench" / "results"
    return module


def test_docs_and_index_are_in_sync_with_the_records(capsys):
    assert _tables().main(["--check"]) == 0, capsys.readouterr().err


def copy_tree(target_root: Path) -> Path:
    """README.md, docs/ and bench/results/ copied under ``target_root`` (what make_docs_tables reads and writes)."""
    for rel in ("README.md", "docs", "bench/results"):
        source, target = REPO / rel, target_root / rel
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    return target_root


@pytest.fixture
def copy_of_the_tree(tmp_path):
    return copy_tree(tmp_path)


def test_a_figure_edited_in_the_docs_alone_is_caught(copy_of_the_tree, capsys):
    tables = _tables(copy_of_the_tree)
    readme = copy_of_the_tree / "README.md"
    text = readme.read_text()
    assert "(CUDA graphs, bf16): 3.3 us at 8 KB" in text
    readme.write_text(text.replace("(CUDA graphs, bf16): 3.3 us at 8 KB", "(CUDA graphs, bf16): 2.9 us at 8 KB"))
    assert tables.main(["--check"]) == 1
    assert "README.md" in capsys.readouterr().err
    assert tables.main([]) == 0  # regenerating restores the recorded figure
    assert readme.read_text() == text


def test_a_record_changed_without_its_docs_is_caught(copy_of_the_tree, capsys):
    tables = _tables(copy_of_the_tree)
    record = copy_of_the_tree / "bench/results/2xh100/fused_repeats/run1.json"
    data = json.loads(record.read_text())
    row = next(r for r in data["gemm"] if (r["M"], r["N"]) == (8192, 4096))
    row["auto_us"] *= 1.05  # this run's ratio goes from 1.144 to 1.201
    record.write_text(json.dumps(data))
    assert tables.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/fused.md" in err and "README.md" in err


def test_the_1_15_statement_is_what_the_nine_runs_give():
    ratios = _tables().repeat_ratios()[(8192, 4096)]
    assert len(ratios) == 9
    assert sorted(ratios)[4] == pytest.approx(1.1465, abs=5e-4)  # the median
    assert sum(r > 1.15 for r in ratios) == 3
    assert "3 of the 9 runs above 1.15" in (REPO / "docs/fused.md").read_text()


def test_the_1_15_statement_says_not_met_where_a_median_run_is_above_it(copy_of_the_tree):
    """The generated claims follow the runs: with every repeat of 8192 x 4096 made 10% slower (its median run then
    above 1.15x), neither docs/fused.md nor the README may still say the median run is within 1.15x at every shape."""
    tables = _tables(copy_of_the_tree)
    for rel in tables.REPEATS:
        record = copy_of_the_tree / "bench/results" / rel
        data = json.loads(record.read_text())
        for row in data["gemm"]:
            if (row["M"], row["N"]) == (8192, 4096):
                row["auto_us"] *= 1.1
        record.write_text(json.dumps(data))
    ratios = tables.repeat_ratios()
    assert statistics.median(ratios[(8192, 4096)]) > tables.RATIO_TARGET
    claim, readme = tables.target_claim(ratios), tables.readme_fused()
    assert "the median run is within" not in claim and "NOT within 1.15x" in claim and "8192 x 4096" in claim
    assert "is within" not in readme and "NOT within 1.15x" in readme


def test_the_1_15_statement_when_every_run_is_within_it():
    ratios = {(8192, 4096): [1.10, 1.12, 1.11], (16384, 8192): [1.01, 1.03, 1.02]}
    claim = _tables().target_claim(ratios)
    assert "the median run is within 1.15x" in claim and "none is above 1.15" in claim
    assert "Not every run" not in claim


def test_the_h200_transfer_targets_say_met_or_not_met(copy_of_the_tree):
    """Each target line of the H200 transfer table says whether the records meet it, from their figures: the
    notification against 15 us (every placement and pacing of the notification records; without them, the
    transfer record's median with the initiator asleep), the throughputs against their ratios."""
    tables = _tables(copy_of_the_tree)

    def targets() -> str:
        return next(x for x in tables.transfer_h200().split("\n\n") if x.startswith("Targets: "))

    results = copy_of_the_tree / "bench/results/h200"
    pinned = results / tables.TRANSFER_NOTIFY_PINNED_NAME
    pinned_data = json.loads(pinned.read_text())
    pinned_data["setup"]["pinned"] = [3, 11]
    for busy, verdict in (
        (14.9, "met where pinned: CPUs 3 and 11, initiator spinning; NOT met otherwise)."),
        (15.1, "NOT met)."),
    ):
        pinned_data["notify"]["ipc"]["busy"]["median_us"] = busy
        pinned.write_text(json.dumps(pinned_data))
        line = targets()
        assert f"{busy:.1f} us (pinned: CPUs 3 and 11, initiator spinning)" in line, line
        assert "(left to the OS, initiator asleep)" in line and line.endswith(f"(target <= 15 us: {verdict}"), line
    pinned.unlink()
    (results / tables.TRANSFER_NOTIFY_NAME).unlink()
    record = copy_of_the_tree / "bench/results" / tables.TRANSFER_H200
    data = json.loads(record.read_text())
    notify = data["notify"]["ipc"]
    for median, verdict in ((14.9, "met)"), (15.1, "NOT met)")):
        notify["median_us"] = median
        record.write_text(json.dumps(data))
        assert targets().split("notification: ")[1].endswith(f"asleep: {verdict}.")
    for row in data["results"]:  # ipc as slow as torch at 1000 x 16 KB: 1.0x, below its 3x target
        if (row["backend"], row["block_bytes"], row["count"], row["op"]) == ("torch", 16384, 1000, "write"):
            torch_us = row["latency_us"]
    for row in data["results"]:
        if (row["backend"], row["block_bytes"], row["count"], row["op"]) == ("ipc", 16384, 1000, "write"):
            row["latency_us"] = torch_us
    record.write_text(json.dumps(data))
    line = next(x for x in tables.transfer_h200().split("\n\n") if x.startswith("Targets: "))
    assert "1.00x (target >= 3.0x: NOT met)" in line and "(target >= 0.9x: met)" in line


def test_transfer_latency_percentiles_are_the_linear_ones_of_every_other_record():
    """The p10 and p90 of a latency path are those of ``summarize`` (numpy's linear percentiles), not the sample at
    an index: over ten samples 1..10 the 90th percentile is 9.1, not the largest sample."""
    from bench.transfer_latency import path_stats

    seen = [float(v) for v in (7, 3, 10, 1, 5, 9, 2, 8, 6, 4)]
    one = path_stats([2.0, 1.0, 3.0], seen)
    assert one == {"host_us": 2.0, "seen_us": 5.5, "seen_p10_us": pytest.approx(1.9), "seen_p90_us": pytest.approx(9.1),
                   "samples": 10}  # fmt: skip


def test_every_record_has_device_date_command_commit_and_dirty_flag():
    records = sorted(RESULTS.rglob("*.json"))
    assert 0 < len(list(RESULTS.rglob("*.*"))) <= 39  # a record per benchmark, not a notebook
    for path in records:
        data = json.loads(path.read_text())
        block = data.get("meta") or data["run"]
        keys = (
            ("device", "date", "command", "commit", "dirty")
            if "meta" in data
            else ("device_name", "timestamp", "command", "git_commit", "git_dirty", "commit_source")
        )
        assert all(block.get(k) not in (None, "") for k in keys), (path, keys)
        assert not re.search(r"_[0-9a-f]{7}\b", path.stem), path  # no commit hashes in names
    assert sorted(p.name for p in RESULTS.rglob("README.md")) == ["README.md"]  # one index, no nested notes


#: ``bench/...`` in prose; ``<commit>:bench/...`` (a git object, what ``git show`` prints) names history instead
_BENCH_PATH = re.compile(r"(?<![0-9a-f]:)\bbench/[\w./-]*\w")
_DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("rel", _DOCS)
def test_every_bench_path_in_the_docs_exists(rel):
    """README.md and docs/*.md cite only files in the tree (a record of the past is named as a git object)."""
    text = (REPO / rel).read_text()
    missing = sorted({path for path in _BENCH_PATH.findall(text) if not (REPO / path).exists()})
    assert not missing, f"{rel} cites files that are not in the tree: {missing}"


def test_every_generated_block_cites_an_existing_record_or_says_none_yet():
    tables = _tables()
    for rel in tables.DOCS:
        for match in tables.BLOCK_RE.finditer((REPO / rel).read_text()):
            body = match.group("body")
            records = re.findall(r"bench/results/([\w./-]+\.json)", body)
            name = match.group("name")
            assert records or re.search(r"No \w+ record yet", body), f"{rel}: block {name} cites no record"
            for record in records:
                assert (RESULTS / record).is_file(), f"{rel}: block {name} cites {record}"


def test_one_gpu_records_prefer_h200_and_fall_back_to_h100(tmp_path):
    tables = _tables(copy_tree(tmp_path))
    h200 = tables.RESULTS / "h200" / tables.VIRTUAL_AR
    h100 = tables.RESULTS / "h100" / tables.VIRTUAL_AR
    h100.parent.mkdir(exist_ok=True)
    shutil.move(h200, h100)  # only the H100 record: it is the one cited
    assert tables.current(tables.VIRTUAL_AR) == f"h100/{tables.VIRTUAL_AR}"
    shutil.copy(h100, h200)  # both: the H200 record wins
    assert tables.current(tables.VIRTUAL_AR) == f"h200/{tables.VIRTUAL_AR}"
    h100.unlink()  # the replaced record deleted: the docs still render, from h200/
    assert f"bench/results/h200/{tables.VIRTUAL_AR}" in tables.virtual_all_reduce()


def test_remeasure_script_writes_every_one_gpu_record_under_h200():
    script = (BENCH / "remeasure_h200.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert subprocess.run(["bash", "-n", str(BENCH / "remeasure_h200.sh")], timeout=30).returncode == 0
    tables = _tables()
    names = [tables.VIRTUAL_AR, tables.VR2_CLI, tables.VR8_CLI, tables.VIRTUAL_FUSED, tables.VIRTUAL_RMSNORM]
    for name in names:
        stem = name.removesuffix(".json")
        assert stem in script, f"bench/remeasure_h200.sh does not write h200/{name}"
    for name in (
        "protocol_cost.json",
        "fp8_fused.json",
        "fp8_payload.json",
        "transfer",
        "transfer_latency.json",
        "transfer_soak.json",
    ):
        assert f'"$OUT/{name}' in script, name
    assert 'cp "$SCRATCH/transfer_notify.json" "$OUT/"' in script
    assert 'cp "$SCRATCH/transfer_notify_pinned.json" "$OUT/"' in script and '--cpus "$PIN_CPUS"' in script


def test_every_bench_path_in_the_package_exists_or_is_dated():
    """Comments and selector reasons cite records that exist (or say where git keeps them)."""
    for source in sorted((REPO / "sagellm_comm").rglob("*.py")):
        rel = source.relative_to(REPO).as_posix()
        lines = source.read_text().splitlines()
        stale = [
            (i + 1, path)
            for i, line in enumerate(lines)
            for path in re.findall(r"bench/[\w./-]*\w", line)
            if not (REPO / path).exists() and "in git at" not in line and "git show" not in line
        ]
        assert not stale, (rel, stale)


def test_a_rewrite_that_cannot_finish_leaves_the_generated_file_as_it_was(tmp_path):
    """make_docs_tables writes each stale file's new text beside it and swaps it in once complete: a write that
    fails part-way (here the process's file size limit, as a full disk would) leaves the file whole and no
    temporary file behind.  It truncated the file first, then wrote as much as it could."""
    import errno
    import textwrap

    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("old figures\n" * 1000)
    script = textwrap.dedent("""
        import importlib.util, resource, signal, sys
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("make_docs_tables", sys.argv[1])
        tables = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tables)
        doc = Path(sys.argv[2])
        tables.REPO = doc.parent.parent
        tables.expected_files = lambda: {doc: "new figures\\n" * 1000}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            tables.main([])
        except OSError as exc:
            print(exc.errno)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script, str(BENCH / "make_docs_tables.py"), str(doc)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == str(errno.EFBIG), proc.stderr[-3000:]
    assert doc.read_text() == "old figures\n" * 1000
    assert [p.name for p in doc.parent.iterdir()] == ["benchmarks.md"]


def test_bench_readme_lists_every_script_with_its_command():
    readme = (BENCH / "README.md").read_text()
    for script in SCRIPTS:
        assert f"python -m bench.{script}" in readme, script


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_use_the_benchmark_package_not_private_paths(script):
    source = (BENCH / f"{script}.py").read_text()
    assert "sys.path" not in source and "tests.conftest" not in source
    assert not re.search(r"^\s*(from|import) bench\b", source, re.MULTILINE)  # no script imports another
    private = re.findall(r"^\s*from sagellm_comm[\w.]* import .*\b_\w+", source, re.MULTILINE)
    assert not private, f"{script} imports private names: {private}"
    if script != "make_docs_tables":
        assert "sagellm_comm.benchmark" in source


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run(f"bench.{script}", "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_refuse_in_one_line_without_a_gpu(script, tmp_path):
    proc = _run(f"bench.{script}", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "needs" in proc.stderr and "GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_transfer_host_cost_times_every_variant_and_writes_its_record(tmp_path):
    from sagellm_comm.transfer.nixl import nixl_available

    if not nixl_available():
        pytest.skip("needs NIXL (pip install -e '.[transfer]'; the test extra has it)")
    out = tmp_path / "host_cost.json"
    proc = _run("bench.transfer_host_cost", "--counts", "1,17", "--rounds", "2", "--calls", "200", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["meta"]["commit"] and "cpu" in record["meta"]["device"]
    assert [row["count"] for row in record["results"]] == [1, 17]
    for row in record["results"]:
        times = [row["ours_array_us"], row["ours_list_us"], row["raw_us"]]
        assert all(0 < t < 10_000 for t in times), row
        assert row["added_us"] == pytest.approx(row["ours_array_us"] - row["raw_us"])
    refused = _run("bench.transfer_host_cost", "--counts", "0", "--out", str(tmp_path / "x.json"))
    assert refused.returncode == 2 and "counts must be" in refused.stderr and not (tmp_path / "x.json").exists()


def test_transfer_soak_checks_every_byte_through_rejoins_and_restarts(tmp_path):
    from sagellm_comm.transfer.nixl import nixl_available

    if not nixl_available():
        pytest.skip("needs NIXL (pip install -e '.[transfer]'; the test extra has it)")
    out = tmp_path / "soak.json"
    proc = _run("bench.transfer_soak", "--device", "cpu", "--backend", "nixl", "--seconds", "3", "--rejoin-every",
                "5", "--timeout", "60", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    counts = record["counts"]
    assert record["transport"] == "nixl" and record["errors"] == {"initiator": [], "peer": []}, record
    assert counts["requests"] >= 25 and counts["rejoins"] >= 5 and counts["restarts"] >= 1, counts
    assert counts["reads"] >= 8 and counts["wrong_bytes"] == counts["read_wrong_bytes"] == 0, counts


def test_transfer_soak_counts_a_wrong_byte_a_byte_outside_the_blocks_and_keeps_destinations_apart():
    import torch

    from bench.transfer_soak import AREA_BYTES, plan, wrong_bytes

    source = torch.arange(4096, dtype=torch.int64).to(torch.uint8)
    blocks = [(10, 100, 50), (0, 400, 7)]
    area = torch.zeros(1024, dtype=torch.uint8)
    for lo, at, n in blocks:
        area[at : at + n] = source[lo : lo + n]
    assert wrong_bytes(area, blocks, source) == 0
    area[149] ^= 1  # the first block's last byte
    area[1000] = 3  # a byte no block covers
    assert wrong_bytes(area, blocks, source) == 2
    area[400:407] = 0  # the second block never landed
    assert wrong_bytes(area, blocks, source) == 2 + int((source[:7] != 0).sum())
    for k in range(300):
        spans = sorted((at, at + n) for _, at, n in plan(1, k, "cpu", k % 2))
        assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), k  # disjoint
        assert spans[-1][1] <= AREA_BYTES["cpu"], k


def test_protocol_cost_baseline_is_the_old_tree_alone(tmp_path):
    """The baseline tree imports itself, never this checkout's modules (an absolute import left unrenamed
    would measure the current code under the old name)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs this checkout's git history")
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('protocol_cost', {str(BENCH / 'protocol_cost.py')!r}); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        f"package = module.baseline_tree('HEAD', __import__('pathlib').Path({str(tmp_path)!r})); "
        "ours = lambda: {m for m in sys.modules if m.startswith('sagellm_comm')}; before = ours(); "
        "importlib.import_module(package + '.virtual'); importlib.import_module(package + '.custom_all_reduce'); "
        "print(package, sorted(ours() - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    package, loaded = out.stdout.split(" ", 1)
    assert loaded.strip() == "[]"  # importing the old tree loads none of this checkout's modules
    sources = list((tmp_path / package).rglob("*.py"))
    assert len(sources) > 20 and not (tmp_path / "sagellm_comm").exists()
    assert not [s for s in sources if re.search(r"\bsagellm_comm\b", s.read_text())]
    spec = importlib.util.spec_from_file_location("protocol_cost", BENCH / "protocol_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="no-such-commit"):
        module.baseline_tree("no-such-commit", tmp_path / "x")
