"""The ``sagellm-comm`` CLI end to end: Gloo processes it starts itself, the files, the usage errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm_comm import cli
from sagellm_comm.benchmark import report
from sagellm_comm.benchmark.ops import bus_factor

HAS_CUDA = os.environ.get("CUDA_VISIBLE_DEVICES") != "" and __import__("torch").cuda.is_available()
REPO = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = {
    "bytes",
    "latency_ms",
    "bandwidth_gbps",
    "algo_id",
    "backend_kind",
    "topology_source",
    "world_size",
    "op_type",
    "data_type",
    "warmup_iters",
    "benchmark_iters",
    "selection_rule_id",
    "selection_reason",
    "timestamp",
    "algo_bandwidth_gbps",
    "bus_bandwidth_gbps",
    "device_name",
    "package_version",
    "latency_p10_ms",
    "latency_p90_ms",
    "num_wrong",
}


def _run(args: list[str], module: str = "sagellm_comm.cli", timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def _table_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def test_bench_gloo_two_processes_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = _run(
        ["bench", "--backend", "gloo", "--world-size", "2", "--sizes", "1K:16K", "--iters", "4", "--warmup", "1",
         "--output-dir", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert [int(r[0]) for r in rows] == [1024, 2048, 4096, 8192, 16384]
    for row in rows:
        size, count, dtype, redop, root, algo, time_us = row[:7]
        algbw, busbw, wrong = float(row[8]), float(row[9]), row[10]
        assert int(count) == int(size) // 4 and dtype == "float" and redop == "sum" and root == "-1"
        assert algo == "auto>gloo" and wrong == "0"  # the table says what auto resolved to
        # the printed columns agree with each other: algbw = size / time, busbw = algbw * 2(n-1)/n
        assert algbw == pytest.approx(int(size) / float(time_us) / 1e3, rel=0.05, abs=0.006)
        assert busbw == pytest.approx(algbw * bus_factor("all_reduce", 2), abs=0.006)
    assert "Out of bounds values : 0 OK" in proc.stdout
    assert "[5/5]" in proc.stderr  # the progress bar reached the end

    json_path = _only(out, "all_reduce_ws2_*.json")
    csv_path = _only(out, "all_reduce_ws2_*.csv")
    assert json_path.stem == csv_path.stem
    run, results = report.load_results(json_path)
    assert run["backend_kind"] == "gloo" and run["launch_mode"] == "spawn" and run["world_size"] == 2
    assert "--sizes 1K:16K" in run["command"]
    assert len(results) == 5
    for rec in results:
        assert set(rec) >= REQUIRED_FIELDS
        assert rec["backend_kind"] == "gloo" and rec["algo_id"] == "gloo" and rec["algo_requested"] == "auto"
        assert rec["world_size"] == 2 and rec["op_type"] == "all_reduce" and rec["data_type"] == "float32"
        assert rec["warmup_iters"] == 1 and rec["benchmark_iters"] == 4 and rec["num_wrong"] == 0
        assert rec["timing_method"] == "wall_clock"
        assert rec["latency_p10_ms"] <= rec["latency_ms"] <= rec["latency_p90_ms"]
        assert rec["latency_min_ms"] <= rec["latency_p10_ms"] and rec["latency_p90_ms"] <= rec["latency_max_ms"]
        # bandwidth_gbps is the algorithm bandwidth in 10^9 bytes/s
        assert rec["bandwidth_gbps"] == pytest.approx(rec["bytes"] / (rec["latency_ms"] * 1e-3) / 1e9)
        assert rec["algo_bandwidth_gbps"] == rec["bandwidth_gbps"]
        assert rec["bus_bandwidth_gbps"] == pytest.approx(rec["algo_bandwidth_gbps"] * 1.0)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["bytes"]) for r in rows] == [r["bytes"] for r in results]
    assert set(rows[0]) >= REQUIRED_FIELDS


@pytest.mark.parametrize(("op", "redop", "root"), [("all_gather", "none", "-1"), ("reduce_scatter", "sum", "-1"),
                                                    ("broadcast", "none", "0")])  # fmt: skip
def test_bench_other_ops_three_ranks(tmp_path, op, redop, root):
    proc = _run(
        ["bench", "--op", op, "--backend", "gloo", "--world-size", "3", "--message-sizes", "3K,96K",
         "--iters", "3", "--warmup", "1", "--dtype", "bf16", "--output-dir", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert [int(r[0]) for r in rows] == [3072, 98304]
    assert all(r[2] == "bfloat16" and r[3] == redop and r[4] == root and r[10] == "0" for r in rows)
    assert proc.stderr.strip() == ""  # --no-progress
    _, results = report.load_results(_only(tmp_path, f"{op}_ws3_*.json"))
    for rec in results:
        assert rec["op_type"] == op and rec["world_size"] == 3
        assert rec["bus_bandwidth_gbps"] == pytest.approx(rec["algo_bandwidth_gbps"] * bus_factor(op, 3))


def test_custom_backend_compares_algos_and_records_what_ran(tmp_path, monkeypatch):
    """The custom kernels under the Triton interpreter on 2 CPU processes, 4 algos side by side."""
    policy = tmp_path / "policy.json"
    policy.write_text(
        '{"rules": [{"id": "tiny-two-shot", "algo": "two_shot", "max_bytes": 2048, "reason": "test policy"},'
        ' {"id": "rest-one-shot", "algo": "one_shot"}]}'
    )
    out = tmp_path / "out"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    proc = _run(
        ["bench", "--backend", "custom", "--world-size", "2", "--algo", "auto,one_shot", "--algo", "two_shot,nccl",
         "--message-sizes", "1K,4K", "--iters", "2", "--warmup", "1", "--dtype", "bf16",
         "--selector-config", str(policy), "--output-dir", str(out), "--no-progress"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    # auto resolves per the policy file; "nccl" is the custom backend's engine, which is Gloo on the CPU
    assert [(int(r[0]), r[5]) for r in rows] == [
        (1024, "auto>two_shot"), (1024, "one_shot"), (1024, "two_shot"), (1024, "nccl>gloo"),
        (4096, "auto>one_shot"), (4096, "one_shot"), (4096, "two_shot"), (4096, "nccl>gloo"),
    ]  # fmt: skip
    assert all(r[10] == "0" for r in rows)
    header = [line for line in proc.stdout.splitlines() if "#wrong" in line][0]
    assert header.split()[-1] == "ratio"
    for row in rows:  # ratio = time(auto) / time(this algo) at the same size
        first = next(r for r in rows if r[0] == row[0])
        assert float(row[11]) == pytest.approx(float(first[6]) / float(row[6]), rel=0.02)
    run, results = report.load_results(_only(out, "all_reduce_ws2_*.json"))
    assert run["algos_requested"] == ["auto", "one_shot", "two_shot", "nccl"]
    assert run["selector_config"] == str(policy)
    by_key = {(r["bytes"], r["algo_requested"]): r for r in results}
    assert by_key[(1024, "auto")]["selection_rule_id"] == "tiny-two-shot"
    assert by_key[(1024, "auto")]["selection_reason"] == "test policy"
    assert by_key[(4096, "auto")]["selection_rule_id"] == "rest-one-shot"
    assert by_key[(1024, "nccl")]["algo_id"] == "gloo" and by_key[(1024, "nccl")]["backend_kind"] == "custom"
    assert by_key[(1024, "one_shot")]["selection_rule_id"] == "user"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only default")
def test_plain_bench_without_gpu_defaults_to_gloo_two_processes(tmp_path):
    proc = _run(
        ["--sizes", "1K:2K", "--iters", "2", "--warmup", "0", "--output-dir", str(tmp_path),
         "--plot", str(tmp_path / "plot.png")],
        module="sagellm_comm.benchmark.run_bench",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run, results = report.load_results(_only(tmp_path, "all_reduce_ws2_*.json"))
    assert run["backend_requested"] == "auto" and run["backend_kind"] == "gloo" and run["world_size"] == 2
    assert run["command"].startswith("python -m sagellm_comm.benchmark.run_bench")
    assert len(results) == 2
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------- usage errors

BAD_OPTIONS = [
    (["--op", "all_to_all"], "invalid choice"),
    (["--sizes", "1Q"], "bad message size '1Q'"),
    (["--sizes", "1M:1K"], "lower bound"),
    (["--message-sizes", "1K", "x"], "bad message size 'x'"),
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--graph-calls", "0"], "--graph-calls must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--algo", "bogus"], "unknown algo 'bogus'"),
    (["--backend", "gloo", "--algo", "one_shot"], "cannot run it"),
    (["--backend", "gloo", "--algo", "auto,ring"], "needs --backend nccl or custom"),
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--backend", "gloo", "--selector-config", "missing.json"], "no such file"),
    (["--backend", "gloo", "--zero-copy"], "--zero-copy applies to --virtual-ranks"),
    (["--sizes", "1K", "--message-sizes", "2K"], "not allowed with argument"),
]
if not HAS_CUDA:
    BAD_OPTIONS += [
        (["--graph"], "--graph"),
        (["--virtual-ranks", "2"], "--virtual-ranks needs a CUDA GPU"),
        (["--backend", "gloo", "--graph"], "needs a CUDA GPU"),
    ]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors(options, message, capsys, monkeypatch, tmp_path):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", "--output-dir", str(tmp_path), *options])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sagellm-comm bench" in err
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_world_size_disagreeing_with_torchrun_env(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", "--backend", "gloo", "--world-size", "2"])
    assert excinfo.value.code == 2
    assert "disagrees with torchrun's WORLD_SIZE=4" in capsys.readouterr().err


def test_usage_error_exit_code_from_the_real_process():
    proc = _run(["bench", "--sizes", "1Q"])
    assert proc.returncode == 2
    assert "bad message size '1Q'" in proc.stderr and proc.stdout == ""


def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main([])
    assert excinfo.value.code == 2


def test_topo_prints_the_matrix(capsys):
    pytest.importorskip("sagellm_comm.topology")
    from sagellm_comm.topology import Topology

    assert cli.main(["topo"]) == 0
    assert capsys.readouterr().out.strip() == Topology.discover().format_matrix().strip()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", "--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    options = "--op --backend --algo --sizes --message-sizes --dtype --warmup --iters --graph --selector-config"
    for option in (*options.split(), "--output-dir", "--plot", "--world-size", "--virtual-ranks"):
        assert option in text
