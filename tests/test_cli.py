"""The ``sagellm-comm`` CLI end to end: Gloo processes it starts itself, the files, the usage errors."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
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


def _main_here(args: list[str], capfd, monkeypatch) -> tuple[int, str, str]:
    """The CLI in this process, its ranks still processes it starts, in ``_run``'s environment: (exit status,
    stdout, stderr), the ranks' output included.  The real process's own start is tested by ``_run``'s tests."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    capfd.readouterr()
    status = cli.main(args)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.mark.parametrize(("op", "redop", "root"), [("all_gather", "none", "-1"), ("reduce_scatter", "sum", "-1"),
                                                    ("broadcast", "none", "0")])  # fmt: skip
def test_bench_other_ops_three_ranks(tmp_path, op, redop, root, capfd, monkeypatch):
    status, out, err = _main_here(
        ["bench", "--op", op, "--backend", "gloo", "--world-size", "3", "--message-sizes", "3K,96K",
         "--iters", "3", "--warmup", "1", "--dtype", "bf16", "--output-dir", str(tmp_path), "--no-progress"],
        capfd, monkeypatch,
    )  # fmt: skip
    assert status == 0, err
    rows = _table_rows(out)
    assert [int(r[0]) for r in rows] == [3072, 98304]
    assert all(r[2] == "bfloat16" and r[3] == redop and r[4] == root and r[10] == "0" for r in rows)
    assert err.strip() == ""  # --no-progress
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
    # two programs a launch (the CPU default is 32, interpreted one after another)
    monkeypatch.setenv("SAGELLM_COMM_MAX_PROGRAMS", "2")
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


def _custom_on_one_cpu_rank(monkeypatch, algos: str) -> subprocess.CompletedProcess:
    """The custom backend under the Triton interpreter on one CPU rank: its kernels are off (a group of one), which
    the backend finds at ``init``, after the process started."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _run(["bench", "--backend", "custom", "--world-size", "1", "--algo", algos, "--message-sizes", "1K",
                 "--iters", "1", "--warmup", "0", "--no-save", "--no-progress"])  # fmt: skip


def test_a_run_whose_every_algorithm_was_skipped_says_why_and_exits_1(monkeypatch):
    """Was exit 0 with an empty table: a script took it for a measurement."""
    proc = _custom_on_one_cpu_rank(monkeypatch, "one_shot,two_shot")
    assert proc.returncode == 1, proc.stderr
    assert _table_rows(proc.stdout) == []
    line = _one_line_refusal(proc.stderr)
    assert "nothing was measured: one_shot: the custom kernels are off on this world" in line
    assert "; two_shot: the custom kernels are off" in line and "group size 1 is outside 2..8" in line


@pytest.mark.skipif(HAS_CUDA, reason="checks the custom backend's Gloo engine, on a machine without GPUs")
@pytest.mark.parametrize("algos", ["ring", "auto,tree"])
def test_ring_or_tree_on_the_custom_backends_gloo_engine_is_refused_before_any_process_starts(
    algos, capsys, monkeypatch
):
    """Was a run that skipped them after start, measured nothing and exited 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _no_process_may_start(monkeypatch)
    line = _refused(["bench", "--backend", "custom", "--algo", algos, "--no-save"], capsys)
    algo = algos.split(",")[-1]
    assert f"{algo} sets NCCL_ALGO, but the custom backend's engine here is gloo" in line


def test_a_run_where_another_algorithm_was_measured_prints_the_skip_and_exits_0(monkeypatch):
    proc = _custom_on_one_cpu_rank(monkeypatch, "one_shot,auto")
    assert proc.returncode == 0, proc.stderr
    assert [r[5] for r in _table_rows(proc.stdout)] == ["auto>gloo"]
    assert "# skipped one_shot: the custom kernels are off on this world (rank 0: group size 1" in proc.stdout


# ------------------------------------------------------------------------------------- usage errors

BAD_OPTIONS = [
    (["--op", "all_to_all"], "invalid choice"),
    (["--sizes", "1Q"], "bad message size '1Q'"),
    (["--sizes", "-1K"], "bad message size '-1K': sizes are positive"),
    (["--message-sizes", "-1K"], "bad message size '-1K': sizes are positive"),
    (["--message-sizes", "3", "6"], "message size 3 B is not a whole number of float32 elements (4 bytes each)"),
    (["--sizes", "6:12", "--dtype", "fp64"], "message size 6 B is not a whole number of float64 elements"),
    (["--message-sizes", "1K", "1025", "--dtype", "bf16"], "1025 B is not a whole number of bfloat16"),
    (["--message-sizes", "4", "4", "4"], "message size 4 B is given twice: give each size once"),  # was run 3 times
    (["--message-sizes", "1K,1024"], "message size 1024 B is given twice"),
    # a whole fp32 element per rank at least: 4, 8 and 12 B were all measured as 12 B at 3 ranks
    (
        ["--op", "all_gather", "--backend", "gloo", "--world-size", "3", "--message-sizes", "4", "8", "12"],
        "message sizes 4 B and 8 B are both measured as 12 B by all_gather on 3 ranks",
    ),
    (
        ["--op", "reduce_scatter", "--backend", "gloo", "--world-size", "2", "--message-sizes", "8", "12"],
        "message sizes 8 B and 12 B are both measured as 8 B by reduce_scatter on 2 ranks",
    ),
    (["--output-dir", "/proc/x"], "--output-dir /proc/x: cannot create /proc/x"),
    (["--sizes", "1M:1K"], "lower bound"),
    (["--message-sizes", "1K", "x"], "bad message size 'x'"),
    (["--world-size", "0"], "--world-size must be >= 1"),
    # as overlap refuses them: the custom kernels run 2..8 ranks (were accepted, and failed on the GPU)
    (["--virtual-ranks", "9"], "--virtual-ranks must be in 2..8, got 9"),
    (["--virtual-ranks", "1"], "--virtual-ranks must be in 2..8, got 1"),
    # were processes started until memory ran out, and a traceback from every rank
    (["--backend", "gloo", "--world-size", "100000"], "--world-size 100000 would start 100000 processes"),
    (["--backend", "gloo", "--sizes", "99999999999999999999G"], "cannot fit: 2 ranks x "),
    (["--backend", "gloo", "--message-sizes", "1K", "1048576G"], "message size 1048576G (1125899906842624 B) cannot"),
    (["--iters", "0"], "--iters must be in 1..10000000"),
    (["--graph-calls", "0"], "--graph-calls must be >= 1"),
    (["--warmup", "-1"], "--warmup must be in 0..10000000"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--algo", "bogus"], "unknown algo 'bogus'"),
    (["--backend", "gloo", "--algo", "one_shot"], "cannot run it"),
    (["--backend", "gloo", "--algo", "auto,ring"], "needs --backend nccl or custom"),
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--backend", "gloo", "--selector-config", "missing.json"], "no such file"),
    (["--backend", "gloo", "--zero-copy"], "--zero-copy applies to --virtual-ranks"),
    # were ignored: the run went ahead without what they ask for, or with the default sizes
    (["--backend", "gloo", "--virtual-mode", "streams"], "--virtual-mode streams applies to --virtual-ranks"),
    (["--backend", "gloo", "--graph-calls", "5"], "--graph-calls 5 applies to --graph runs only"),
    (["--backend", "gloo", "--sizes", ""], "bad message size ''"),
    (["--backend", ""], "backend kind must be a non-empty string"),
    (["--virtual-ranks", "2", "--virtual-mode", "streams", "--graph"], "--graph needs --virtual-mode stacked"),
    (["--sizes", "1K", "--message-sizes", "2K"], "not allowed with argument"),
    (["--timeout", "inf"], "--timeout must be positive and finite"),  # was a traceback from a rank
    (["--timeout", "nan"], "--timeout must be positive and finite"),
    # paths the system cannot look up: were a traceback (OSError: File name too long)
    (["--output-dir", "d" * 300], "File name too long"),
    (["--output-dir", "/tmp/" + "d" * 300 + "/sub"], "File name too long"),
    (["--backend", "gloo", "--selector-config", "s" * 300], "File name too long"),
]
if importlib.util.find_spec("matplotlib") is not None:
    BAD_OPTIONS += [(["--backend", "gloo", "--plot", "p" * 300 + ".png"], "File name too long")]
if not HAS_CUDA:
    BAD_OPTIONS += [
        (["--graph"], "--graph"),
        (["--virtual-ranks", "2"], "--virtual-ranks needs a CUDA GPU"),
        (["--backend", "gloo", "--graph"], "needs a CUDA GPU"),
    ]


def _one_line_refusal(err: str, prog: str = "sagellm-comm bench") -> str:
    """The single stderr line of a refusal (asserts there is exactly one, and no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err
    return lines[0]


def _refused(argv: list[str], capsys) -> str:
    """The refusal of ``sagellm-comm ARGV``: exit status 2, nothing on stdout, one line on stderr (returned)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    command = argv[0] if argv and not argv[0].startswith("-") else None
    return _one_line_refusal(captured.err, prog="sagellm-comm" if command is None else f"sagellm-comm {command}")


def _no_process_may_start(monkeypatch) -> None:
    import torch.multiprocessing as mp

    def no_spawn(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(mp, "start_processes", no_spawn)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors(options, message, capsys, monkeypatch, tmp_path):
    _no_process_may_start(monkeypatch)
    assert message in _refused(["bench", "--output-dir", str(tmp_path), *options], capsys)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


OVERLAP_BAD_OPTIONS = [
    (["--iters", "0"], "--iters must be in 1..10000000"),
    (["--warmup", "-1"], "--warmup must be in 0..10000000"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--dtype", "int32"], "the GEMM needs a floating-point dtype"),
    (["--message-sizes", "12Q"], "bad message size '12Q'"),
    (["--sizes", "-1K"], "bad message size '-1K': sizes are positive"),
    (["--message-sizes", "3", "6"], "message size 3 B is not a whole number of float32 elements (4 bytes each)"),
    (["--message-sizes", "64K", "64K"], "message size 65536 B is given twice"),
    (["--compute-ms", "-1"], "--compute-ms must be > 0"),
    (["--compute-ms", "inf"], "--compute-ms must be > 0 and finite"),  # was an OverflowError from a rank
    (["--compute-ms", "1e300"], "--compute-ms 1e+300 is not below --timeout (120 s)"),  # ran for ever
    (["--compute-ms", "5000", "--timeout", "5"], "--compute-ms 5000 is not below --timeout (5 s)"),
    (["--timeout", "inf"], "--timeout must be positive and finite"),
    (["--gemm-size", "0"], "--gemm-size must be >= 1"),
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--backend", "gloo", "--world-size", "100000"], "--world-size 100000 would start 100000 processes"),
    (["--backend", "gloo", "--message-sizes", "1048576G"], "cannot fit: 2 ranks x 1048576G"),
    (["--backend", "gloo", "--gemm-size", "100000000"], "--gemm-size 100000000 cannot fit: 2 ranks x 3 matrices"),
    (["--virtual-ranks", "9"], "--virtual-ranks must be in 2..8"),
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--output-dir", "/proc/x"], "--output-dir /proc/x: cannot create /proc/x"),
    (["--sizes", "1K", "--message-sizes", "2K"], "not allowed with argument"),
]
if not HAS_CUDA:
    OVERLAP_BAD_OPTIONS += [
        (["--backend", "nccl"], "--backend nccl: nccl needs a CUDA build of torch"),
        (["--backend", "custom"], "--backend custom: "),
        (["--virtual-ranks", "2"], "--virtual-ranks needs a CUDA GPU"),
    ]


def test_overlap_virtual_ranks_refuse_a_dtype_the_kernels_do_not_run_before_anything_starts(capsys, monkeypatch):
    """float64 passed the plan and failed at the first all-reduce, after the GPU's ranks were set up and the GEMM
    loop calibrated; ``bench --virtual-ranks`` refuses it before anything starts, and so does ``overlap`` now."""
    from sagellm_comm.benchmark import overlap_plan

    _no_process_may_start(monkeypatch)
    monkeypatch.setattr(overlap_plan, "cuda_available", lambda: True)  # the check comes before any GPU is used
    line = _refused(["overlap", "--virtual-ranks", "2", "--dtype", "float64", "--no-save"], capsys)
    assert "the custom all-reduce runs float32, float16 and bfloat16, not float64" in line


def test_overlap_on_a_given_backend_refuses_a_gemm_that_cannot_fit_before_anything_is_measured():
    """Each rank allocated its three [g, g] matrices first: a size past memory failed there, after the start."""
    import types

    import torch

    from sagellm_comm.benchmark.overlap_plan import plan_overlap_in_process
    from sagellm_comm.benchmark.overlap_results import OverlapConfig
    from sagellm_comm.errors import InvalidArgumentError

    backend = types.SimpleNamespace(is_initialized=True, world_size=1, rank=0, name="gloo", device=torch.device("cpu"))
    config = OverlapConfig(backend="instance", gemm_size=10**8, output_dir=None)
    with pytest.raises(InvalidArgumentError, match="--gemm-size 100000000 cannot fit: 3 matrices of"):
        plan_overlap_in_process(config, backend)
    assert plan_overlap_in_process(OverlapConfig(backend="instance", gemm_size=8, output_dir=None), backend)


@pytest.mark.parametrize(("options", "message"), OVERLAP_BAD_OPTIONS, ids=[" ".join(o) for o, _ in OVERLAP_BAD_OPTIONS])
def test_overlap_refusals_are_one_line_before_any_process_starts(options, message, capsys, monkeypatch, tmp_path):
    _no_process_may_start(monkeypatch)
    assert message in _refused(["overlap", "--output-dir", str(tmp_path), *options], capsys)
    assert not list(tmp_path.iterdir())


TRANSFER_BAD_OPTIONS = [
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--backend", "ipc"], "Triton interpreter"),
    (["--backend", "copy-engine"], "CUDA device"),
    (["--block-sizes", "17"], "multiple of 16"),
    (["--block-sizes", "4X"], "bad message size '4X'"),
    (["--block-sizes", "-4K"], "bad message size '-4K': sizes are positive"),
    (["--block-counts", "0"], "--block-counts must be >= 1"),
    (["--block-counts", "1,two"], "--block-counts must be integers"),
    (["--ops", "send"], "unknown op 'send'"),
    (["--iters", "0"], "--iters must be in 1..10000000"),
    (["--warmup", "-1"], "--warmup must be in 0..10000000"),
    (["--notify-iters", "-1"], "--notify-iters must be in 0..10000000"),
    (["--rounds", "0"], "--rounds must be in 1..1000"),
    (["--cpus", "0"], "--cpus takes two CPU numbers (the initiator's, then the peer's)"),
    (["--cpus", "0,1,2"], "--cpus takes two CPU numbers"),
    (["--cpus", "0,one"], "--cpus must be integers"),
    (["--cpus", "0,65536"], "--cpus: the peer's CPU 65536 is not one this process may run on"),
    (["--cpus", "-1,0"], "--cpus: the initiator's CPU -1 is not one this process may run on"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--timeout", "inf"], "--timeout must be positive and finite"),  # was an OverflowError from a process
    (["--ops", "write,write"], "--ops names 'write' twice"),
    (["--backend", "nixl,torch,nixl"], "--backend names 'nixl' twice"),
    (["--device", "tpu"], "cpu or cuda"),
    (["--device", "cpu:1"], "cpu or cuda"),  # NIXL took 1 as a device id and failed after the processes started
    (["--device", ""], "--device names no device"),  # was taken for the option left out
    (["--block-sizes", "16K,16K"], "--block-sizes names 16384 twice"),
    (["--block-counts", "4,1,4"], "--block-counts names 4 twice"),
    (["--max-bytes", "1K", "--block-sizes", "4K"], "more than --max-bytes"),
    (["--output-dir", "/proc/x"], "--output-dir /proc/x: cannot create /proc/x"),
    (["--output-dir", str(REPO / "pyproject.toml")], "not a directory"),
    (["--out", "/proc/x/transfer"], "--out's directory /proc/x: cannot create /proc/x"),
    (["--out", "/tmp/t", "--no-save"], "--out and --no-save contradict"),
    (["--out", "/tmp/t", "--output-dir", "/tmp"], "--output-dir is not used with --out"),
    (["--iters", "99999999999"], "--iters must be in 1..10000000"),
    (["--cpus", "a,b"], "--cpus must be integers, e.g. 0,1"),
    (["--backend", ","], "--backend names no backend; choose from: ipc, "),
    (["--block-sizes", ""], "--block-sizes names no size"),  # an empty value is refused, not the default
    (["--block-sizes", " , "], "--block-sizes names no size"),
    (["--block-counts", ""], "--block-counts names no number"),
    (["--max-bytes", ""], "--max-bytes names no size"),
    (["--max-bytes", "4X"], "--max-bytes: bad message size '4X'"),
    (
        ["--device", "cpu", "--block-sizes", "1G", "--block-counts", "1024", "--max-bytes", "1024G"],
        "the two processes' pools need 4096G of shared memory in ",
    ),
]
if not HAS_CUDA:
    TRANSFER_BAD_OPTIONS += [(["--device", "cuda"], "no CUDA GPU")]


@pytest.mark.parametrize(
    ("options", "message"), TRANSFER_BAD_OPTIONS, ids=[" ".join(o) for o, _ in TRANSFER_BAD_OPTIONS]
)
def test_transfer_refusals_are_one_line_before_any_process_starts(options, message, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _no_process_may_start(monkeypatch)
    where = [] if "--out" in options else ["--output-dir", str(tmp_path)]  # --out names its own files
    assert message in _refused(["transfer", *where, *options], capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("stem", "message"),
    [
        ("results.json", "--out {tmp}/results: {tmp}/results.json is a directory"),
        ("results.csv", "--out {tmp}/results: {tmp}/results.csv is a directory"),
        ("", "--out {tmp}/: names a directory; --out takes a file stem"),
    ],
)
def test_transfer_out_whose_files_cannot_be_written_is_refused_before_any_process_starts(
    stem, message, capsys, monkeypatch, tmp_path
):
    """The files --out names (STEM.json, STEM.csv) are checked before the run: a directory in the place of one, or
    --out naming a directory (where a file stem is meant), is refused and nothing is written."""
    _no_process_may_start(monkeypatch)
    if stem:
        (tmp_path / stem).mkdir()
    out = f"{tmp_path}/results" if stem else f"{tmp_path}/"
    assert message.format(tmp=tmp_path) in _refused(["transfer", "--out", out], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([stem] if stem else [])


def test_transfer_pools_larger_than_the_gpus_free_memory_are_refused_before_any_process_starts(
    capsys, monkeypatch, tmp_path
):
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    import torch

    from sagellm_comm.benchmark import plan, transfer_config

    _no_process_may_start(monkeypatch)
    free = {"cuda": 0}
    monkeypatch.setattr(transfer_config, "cuda_available", lambda: True)
    monkeypatch.setattr(plan, "cuda_available", lambda: True)  # the --device check's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["cuda"], 80 << 30))
    sweep = ["--device", "cuda", "--backend", "nixl", "--block-sizes", "1G", "--block-counts", "4", "--max-bytes", "4G"]
    free["cuda"] = (12 << 30) + (1 << 29)  # two pools of twice the largest request: 16G
    refusal = _refused(["transfer", "--output-dir", str(tmp_path), *sweep], capsys)
    assert "pools need 16G of GPU memory on cuda (2 x 8G: twice the largest request), 12.5G is free" in refusal
    free["cuda"] = 16 << 30
    config = transfer_config.TransferBenchConfig(
        backends=["nixl"],
        device="cuda",
        block_sizes=[1 << 30],
        block_counts=[4],
        max_bytes=4 << 30,
        output_dir=str(tmp_path),
    )
    assert transfer_config.plan_transfer(config).pool_bytes == 8 << 30


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without GPUs")
def test_overlap_nccl_without_gpu_from_the_real_process():
    proc = _run(["overlap", "--backend", "nccl"])
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_line_refusal(proc.stderr, prog="sagellm-comm overlap")
    assert "nccl needs a CUDA build of torch" in line and "use --backend gloo" in line


def test_overlap_subcommand_end_to_end(tmp_path):
    """The bench's conventions: table on stdout, progress on stderr, JSON/CSV with provenance, a plot."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = _run(
        ["overlap", "--backend", "gloo", "--world-size", "2", "--message-sizes", "4K", "64K", "--compute-ms", "2",
         "--gemm-size", "32", "--iters", "2", "--warmup", "1", "--output-dir", str(out),
         "--plot", str(tmp_path / "overlap.png")]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "# sagellm-comm overlap bench: backend gloo, world size 2" in proc.stdout
    assert "commit " in proc.stdout and "# wrote " in proc.stdout
    rows = _table_rows(proc.stdout)
    assert [r[0] for r in rows] == ["4K", "64K"] and all(r[-1] == "0" for r in rows)
    assert "[2/2]" in proc.stderr  # the progress bar reached the end
    payload = __import__("json").loads(_only(out, "overlap_ws2_*.json").read_text())
    run = payload["run"]
    assert run["command"].startswith("python -m sagellm_comm.cli overlap --backend gloo")
    assert run["git_commit"] and "git_dirty" in run and run["commit_source"]
    assert [r["comm_bytes"] for r in payload["results"]] == [4096, 65536]
    with _only(out, "overlap_ws2_*.csv").open() as handle:
        assert [int(r["comm_bytes"]) for r in csv.DictReader(handle)] == [4096, 65536]
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"


def test_version_is_the_installed_distributions(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code == 0
    try:
        expected = metadata.version("isagellm-comm")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        expected = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["version"] + "+source"
    assert capsys.readouterr().out.strip() == f"sagellm-comm {expected}"


def test_every_registered_subcommand_is_listed_and_documented(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    names = [command.name for command in cli.SUBCOMMANDS]
    assert {"bench", "overlap", "topo", "transfer"} <= set(names) and len(names) == len(set(names))
    readme = (REPO / "README.md").read_text()
    for command in cli.SUBCOMMANDS:
        assert command.name in text and command.help in text
        assert f"\nsagellm-comm {command.name}" in readme, f"README's command list lacks sagellm-comm {command.name}"
        assert f"``sagellm-comm {command.name}" in cli.__doc__, f"cli.py's docstring lacks {command.name}"
        with pytest.raises(SystemExit) as excinfo:
            cli.main([command.name, "--help"])
        assert excinfo.value.code == 0
        assert f"usage: sagellm-comm {command.name}" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("kind", ["nccl", "custom"])
def test_gpu_backend_without_gpu_is_refused_before_any_process_starts(kind, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _no_process_may_start(monkeypatch)
    line = _refused(["bench", "--backend", kind, "--no-save"], capsys)
    assert f"--backend {kind}: " in line and "needs a CUDA" in line and "use --backend gloo" in line


def test_gpu_backend_refusal_from_the_real_process():
    if HAS_CUDA:
        pytest.skip("checks the refusal on a machine without GPUs")
    proc = _run(["bench", "--backend", "nccl", "--no-save"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert "nccl needs a CUDA build of torch" in _one_line_refusal(proc.stderr)


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = _refused(["bench", "--backend", "gloo", "--output-dir", str(a_file)], capsys)
    assert f"--output-dir {a_file}: exists and is not a directory" in line
    line = _refused(["bench", "--backend", "gloo", "--output-dir", str(a_file / "sub")], capsys)
    assert f"cannot be created, {a_file} is not a directory" in line
    assert a_file.read_text() == "x" and sorted(tmp_path.iterdir()) == [a_file]


#: a request of each plotting subcommand that would run here but for its --plot
PLOT_REQUESTS = {"bench": ["--backend", "gloo"], "overlap": ["--backend", "gloo"], "transfer": []}


@pytest.mark.parametrize("command", sorted(PLOT_REQUESTS))
@pytest.mark.parametrize(("name", "message"), [("plot.foo", "'.foo' is not a format"), ("plot", "no extension")])
def test_plot_with_an_unknown_extension_is_refused(tmp_path, capsys, monkeypatch, command, name, message):
    pytest.importorskip("matplotlib")
    _no_process_may_start(monkeypatch)
    line = _refused([command, *PLOT_REQUESTS[command], "--no-save", "--plot", str(tmp_path / name)], capsys)
    assert message in line and "png" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", sorted(PLOT_REQUESTS))
def test_plot_without_matplotlib_names_the_extra_of_this_checkout(tmp_path, capsys, monkeypatch, command):
    """The package is installed from its checkout (README): the hint is the extra of that checkout, not a
    distribution fetched from a registry, which would replace it."""
    _no_process_may_start(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    line = _refused([command, *PLOT_REQUESTS[command], "--no-save", "--plot", str(tmp_path / "plot.png")], capsys)
    assert "--plot needs matplotlib" in line and "pip install -e '.[plot]'" in line, line
    assert "pip install matplotlib" in line and "isagellm-comm[" not in line, line


@pytest.mark.parametrize("value", ["[1]", '{"num_gpus": "two"}', "{not json"])
def test_malformed_topology_variable_is_one_line_and_exit_2(value, capsys, monkeypatch):
    monkeypatch.setenv("SAGELLM_COMM_TOPOLOGY", value)
    line = _refused(["bench", "--backend", "gloo", "--no-save"], capsys)
    assert line.count("SAGELLM_COMM_TOPOLOGY") >= 1
    assert cli.main(["topo"]) == 2
    assert "SAGELLM_COMM_TOPOLOGY" in _one_line_refusal(capsys.readouterr().err, prog="sagellm-comm topo")


@pytest.mark.parametrize(
    ("name", "value"), [("SAGELLM_COMM_WATCHDOG_MS", "junk"), ("SAGELLM_COMM_TOPOLOGY", "{not json")]
)
def test_transfer_refuses_a_malformed_setting_before_any_process_starts(name, value, capsys, monkeypatch, tmp_path):
    """Each process's agent reads the settings as it starts: a bad one left NIXL unmeasured and the run exited 0."""
    _no_process_may_start(monkeypatch)
    monkeypatch.setenv(name, value)
    assert name in _refused(["transfer", "--output-dir", str(tmp_path)], capsys)


@pytest.mark.parametrize(
    ("command", "no_save"),
    [("bench", "--no-save"), ("overlap", "--no-save"), ("overlap", "--no-output"), ("transfer", "--no-save")],
)
def test_no_save_with_an_output_dir_is_refused_as_a_contradiction(command, no_save, capsys, monkeypatch, tmp_path):
    """``--no-save`` silently dropped the ``--output-dir`` given with it, as ``--out`` with ``--no-save`` is not."""
    _no_process_may_start(monkeypatch)
    line = _refused([command, *PLOT_REQUESTS[command], no_save, "--output-dir", str(tmp_path / "out")], capsys)
    assert "--output-dir and --no-save contradict each other" in line


def _live_members(pgid: int) -> list[str]:
    """``pid state`` of the processes of group ``pgid`` that are not zombies (already dead)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{stat.parent.name} {fields[0]}")
    return alive


def _sigint_as_in_a_terminal() -> None:
    """The CLI's SIGINT at its default, as a terminal starts it: a test suite run as a background job of a
    shell without job control inherits SIGINT ignored, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("target", ["terminal", "parent", "sigkill"])
def test_ctrl_c_is_one_line_exit_130_and_stops_the_ranks(target):
    """Ctrl-C in a terminal (SIGINT to the whole process group) or to the CLI process alone; and the CLI
    killed outright (SIGKILL: it cannot clean up, its ranks die with it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagellm_comm.cli", "bench", "--backend", "gloo", "--world-size", "2",
         "--sizes", "1K:1M", "--iters", "2000", "--warmup", "1", "--no-save"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    try:
        first = proc.stderr.readline()  # the progress bar's first point: both ranks are running
        assert first.startswith("[1/11]"), first
        if target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGKILL if target == "sigkill" else signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 20
        while _live_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _live_members(proc.pid) == []  # the ranks it started were stopped
    finally:
        if proc.poll() is None or _live_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Out of bounds" not in out  # no table: the run did not finish
    if target == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
        assert err.splitlines() == ["sagellm-comm bench: interrupted"], err


def test_world_size_disagreeing_with_torchrun_env(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "disagrees with torchrun's WORLD_SIZE=4" in _refused(
        ["bench", "--backend", "gloo", "--world-size", "2"], capsys
    )


def test_usage_error_exit_code_from_the_real_process():
    proc = _run(["bench", "--sizes", "1Q"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert "bad message size '1Q'" in _one_line_refusal(proc.stderr)


def test_cli_needs_a_subcommand(capsys):
    assert "required: COMMAND" in _refused([], capsys)


def test_topo_prints_the_matrix(capsys):
    pytest.importorskip("sagellm_comm.topology")
    from sagellm_comm.topology import Topology

    assert cli.main(["topo"]) == 0
    out = capsys.readouterr().out
    topo = Topology.discover()
    assert out.strip() == topo.format_matrix().strip()
    # What the matrix must say, independently of format_matrix: a CPU-only host says so; otherwise every
    # GPU has a row.
    if topo.num_gpus == 0:
        assert "no GPU visible: CPU-only" in out
    else:
        assert all(f"GPU{i}" in out for i in range(topo.num_gpus))


def test_config_markdown_and_update_together_are_refused(tmp_path, capsys):
    """``--update`` rewrites a file, ``--markdown`` prints the table: one run does one, and asking for both is a
    usage error rather than a file rewritten and nothing printed."""
    doc = tmp_path / "configuration.md"
    doc.write_text("no markers here\n")
    line = _refused(["config", "--markdown", "--update", str(doc)], capsys)
    assert "--update" in line and "--markdown" in line and "not allowed with" in line
    assert doc.read_text() == "no markers here\n"


@pytest.mark.parametrize("path", ["", " "])
def test_config_update_without_a_file_is_refused_not_taken_for_a_plain_config(path, capsys):
    """An empty ``--update`` printed the settings and exited 0, as if the option had been left out."""
    assert "--update names no file" in _refused(["config", "--update", path], capsys)


@pytest.mark.parametrize(
    ("command", "doc"),
    [
        ("bench", "docs/benchmark.md"),
        ("overlap", "docs/layers.md"),
        ("transfer", "docs/transfer.md"),
        ("examples/llama_tp.py", "docs/layers.md"),
        ("examples/llama_disaggregated.py", "docs/transfer.md"),
    ],
)
def test_every_option_of_a_command_is_described_in_its_document(command, doc, capsys):
    """docs/transfer.md named most of ``transfer``'s options, and of the disaggregated example's, only inside example
    command lines."""
    import re

    if command.startswith("examples/"):
        pytest.importorskip("transformers", reason='needs transformers: pip install -e ".[examples]"')
        module = importlib.import_module(command.removesuffix(".py").replace("/", "."))
        with pytest.raises(SystemExit):
            module.main(["--help"])
    else:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    usage = re.sub(r"-\n\s*", "-", capsys.readouterr().out)  # argparse wraps "--graph-calls" after its hyphen
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", usage)) - {"--help"}
    text = (REPO / doc).read_text()
    described = {option for option in options if re.search(f"`{option}[` =]", text)}
    assert options - described == set(), f"{doc} does not describe them"


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench", "--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    options = "--op --backend --algo --sizes --message-sizes --dtype --warmup --iters --graph --selector-config"
    for option in (*options.split(), "--output-dir", "--plot", "--world-size", "--virtual-ranks"):
        assert option in text


def test_overlap_dtype_help_names_what_overlap_accepts(capsys):
    """The GEMM takes any floating-point dtype (float64 was accepted but not listed; the integer dtypes that bench
    takes are refused), and --virtual-ranks only the kernels' three."""
    from sagellm_comm.benchmark.config import VIRTUAL_DTYPES
    from sagellm_comm.benchmark.ops import DTYPE_ALIASES, DTYPES
    from sagellm_comm.benchmark.overlap_plan import resolve_payload
    from sagellm_comm.benchmark.overlap_results import OverlapConfig
    from sagellm_comm.errors import InvalidArgumentError

    with pytest.raises(SystemExit) as excinfo:
        cli.main(["overlap", "--help"])
    assert excinfo.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    listed = text.split("--dtype DTYPE")[-1].split(" --compute-ms", 1)[0]  # the option's line, not the usage
    assert "float64" in listed and "int32" not in listed and "int64" not in listed
    assert "--virtual-ranks: bfloat16, float16, float32" in listed
    for name in (*DTYPES, *DTYPE_ALIASES):
        accepted = True
        try:
            resolve_payload(OverlapConfig(dtype=name, comm_sizes=[1024]), uses_cuda=False)
        except InvalidArgumentError:
            accepted = False
        assert (name in listed) == accepted, name
    for dtype in VIRTUAL_DTYPES:
        assert str(dtype).removeprefix("torch.") in listed


def test_overlap_module_refusals_are_one_line_too(capsys):
    from sagellm_comm.benchmark import run_overlap_bench

    with pytest.raises(SystemExit) as excinfo:
        run_overlap_bench.main(["--warmup", "-1", "--no-output"])
    assert excinfo.value.code == 2
    line = _one_line_refusal(capsys.readouterr().err, prog="python -m sagellm_comm.benchmark.run_overlap_bench")
    assert "--warmup must be in 0..10000000" in line
