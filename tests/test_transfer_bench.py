"""``sagellm-comm transfer``: a short real run on the CPU (NIXL, raw NIXL and the torch reference; the ipc path
under the interpreter) and its files.  Its refusals (one line, exit status 2, before any process starts) are
tested with the other subcommands' in tests/test_cli.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sagellm_comm.cli", "transfer", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_a_short_cpu_run_prints_the_table_and_writes_json_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    stem = tmp_path / "transfer"
    plot = str(tmp_path / "t.png")
    proc = _cli("--block-sizes", "4K,64K", "--block-counts", "1,5", "--iters", "3", "--warmup", "1", "--rounds", "2",
                "--notify-iters", "4", "--out", str(stem), "--plot", plot, "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "backends nixl, nixl-raw, torch" in table and "Wrong bytes: 0, failed points: 0: OK" in table
    assert "UCX RMA:" in table and "notification latency, nixl" in table
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["meta"]["commit"] and "2 processes" in record["meta"]["device"] and "command" in record["meta"]
    assert record["setup"]["backends"] == ["nixl", "nixl-raw", "torch"] and record["setup"]["rounds"] == 2
    assert record["setup"]["pinned"] is None and "# pinned" not in table  # no --cpus: placed by the system
    assert set(record["setup"]["cpus"]) == {"initiator", "peer"}
    results = record["results"]
    assert len(results) == 2 * 2 * 2 * 3  # sizes x counts x ops x backends
    assert {r["backend"] for r in results} == {"nixl", "nixl-raw", "torch"}
    assert all(r["num_wrong"] == 0 and r["gbps"] > 0 and r["timing"] == "wall" for r in results)
    notify = record["notify"]["nixl"]
    assert notify["samples"] == notify["idle"]["samples"] == notify["busy"]["samples"] == 8  # both pacings, 2 rounds
    assert notify["median_us"] == notify["idle"]["median_us"]  # the headline figure is the idle pacing's
    assert 0 < notify["idle"]["host_median_us"] < notify["idle"]["max_us"]  # write()'s host part of the latency
    assert "initiator asleep between requests" in table and "initiator busy between requests" in table
    loops = record["setup"]["python_loop_us"]  # each process's Python speed, timed at every notification phase
    assert set(loops) == {"initiator", "peer"} and all(0 < us < 1e5 for us in loops.values())
    assert f"# host speed: a fixed Python loop of 1000 iterations took {loops['initiator']:.1f} us in the " in table
    assert all(r["samples"] == 3 * 2 for r in results)  # --iters x --rounds, pooled
    assert "1 warm-up + 3 timed requests x 2 rounds (pooled)" in table
    with stem.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results) and all(row["samples"] == "6" for row in rows)
    provenance = {(row["commit"], row["dirty"], row["date"], row["device_name"], row["iters"], row["rounds"])
                  for row in rows}  # fmt: skip
    meta = record["meta"]
    assert provenance == {(meta["commit"], str(meta["dirty"]), meta["date"], record["setup"]["device_name"], "3", "2")}
    assert (tmp_path / "t.png").stat().st_size > 0


def test_nixl_agents_without_their_progress_thread_are_timed_with_the_passive_process_calling_them(tmp_path):
    """Without the progress thread a target must call into NIXL for transfers to it to complete: the passive
    process does so between commands, and every point and notification completes with exact bytes."""
    stem = tmp_path / "quiet"
    proc = _cli("--backend", "nixl,nixl-raw", "--block-sizes", "4K", "--block-counts", "1,5", "--iters", "3",
                "--warmup", "1", "--notify-iters", "3", "--nixl-progress-thread", "off", "--out", str(stem),
                "--no-progress", timeout=120.0)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["setup"]["nixl_progress_thread"] is False
    assert len(record["results"]) == 2 * 2 * 2 and all(r["num_wrong"] == 0 for r in record["results"])
    notify = record["notify"]["nixl"]
    assert notify["idle"]["samples"] == notify["busy"]["samples"] == 3  # both pacings


def test_cpus_pins_the_initiator_and_the_peer_and_the_record_says_where_they_ran(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    initiator, peer = allowed[-1], allowed[0]  # two different CPUs where there are two: the order is checked
    stem = tmp_path / "pinned"
    proc = _cli("--backend", "torch", "--block-sizes", "4K", "--block-counts", "1", "--iters", "2", "--warmup", "1",
                "--notify-iters", "0", "--cpus", f"{initiator},{peer}", "--out", str(stem), "--no-progress",
                timeout=120.0)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["setup"]["cpus"] == {"initiator": [initiator], "peer": [peer]}
    assert record["setup"]["pinned"] == [initiator, peer]
    assert f"# pinned: the initiator on CPU {initiator}, the peer on CPU {peer}" in proc.stdout
    assert record["setup"]["python_loop_us"] is None and "# host speed" not in proc.stdout  # no notification timed
    assert all(r["num_wrong"] == 0 for r in record["results"])


def test_the_ipc_path_under_the_interpreter_moves_exact_bytes_and_notifies():
    proc = _cli("--backend", "ipc,nixl", "--block-sizes", "4K", "--block-counts", "1,3", "--iters", "2",
                "--warmup", "1", "--notify-iters", "3", "--prepared", "--no-save", "--no-progress",
                env={"TRITON_INTERPRET": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ipc: block-copy kernel (Triton interpreter)" in proc.stdout
    assert "notification latency, ipc" in proc.stdout and "(prepared block ids)" in proc.stdout


def test_a_pool_smaller_than_the_notification_block_is_grown_to_hold_it(tmp_path):
    # 4K x 1 made an 8K pool: the notification latency (one 16K block) then died in numpy's choice()
    from sagellm_comm.benchmark.transfer_config import NOTIFY_BLOCK, TransferBenchConfig, plan_transfer

    small = {"backends": ["torch"], "block_sizes": [4096], "block_counts": [1], "device": "cpu"}
    plan = plan_transfer(TransferBenchConfig(**small, output_dir=str(tmp_path)))
    assert plan.pool_bytes == NOTIFY_BLOCK
    plan = plan_transfer(TransferBenchConfig(**small, notify_iters=0, output_dir=str(tmp_path)))
    assert plan.pool_bytes == 2 * 4096


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"block_sizes": []}, "--block-sizes names no value"),
        ({"block_counts": []}, "--block-counts names no value"),
        ({"max_bytes": 0}, "--max-bytes must be at least 1 byte, got 0"),
        ({"block_sizes": [0]}, "block size 0 is not a positive multiple of 16 bytes"),
    ],
)
def test_empty_or_zero_sizes_of_a_config_are_refused_not_replaced_by_the_defaults(given, words, tmp_path):
    from sagellm_comm.benchmark.transfer_config import TransferBenchConfig, plan_transfer
    from sagellm_comm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=words):
        plan_transfer(TransferBenchConfig(**given, output_dir=str(tmp_path)))


def test_ratios_are_against_the_first_backend_asked_for_and_absent_where_it_failed():
    from sagellm_comm.benchmark.timing import summarize
    from sagellm_comm.benchmark.transfer_results import build_result, format_table

    def entry(backend, count, samples=None, error=None):
        point = {"backend": backend, "op": "write", "block": 4096, "count": count, "num_wrong": 0, "timing": "wall"}
        return {**point, "error": error} if error else {**point, "stats": summarize(samples)}

    measured = {
        "points": [entry("nixl", 10, error="write did not complete within 120 s"), entry("torch", 10, [10.0]),
                   entry("nixl-raw", 10, [20.0]), entry("nixl", 1, [4.0]), entry("torch", 1, [2.0])],
        "notify": {}, "failed": {}, "transports": {},
    }  # fmt: skip
    run = {"device": "cpu", "device_name": "cpu", "backends": ["nixl", "torch", "nixl-raw"], "prepared": False,
           "commit": "0" * 40, "torch": "x", "warmup": 1, "iters": 1}  # fmt: skip
    result = build_result(measured, run, False)
    ratios = {(r.backend, r.count): r.ratio_vs_first for r in result.records}
    assert ratios == {("nixl", 10): None, ("torch", 10): None, ("nixl-raw", 10): None, ("nixl", 1): 1.0,
                      ("torch", 1): 2.0}  # fmt: skip
    table = format_table(result)
    assert "failed: write did not complete" in table and "     -" in table


@pytest.mark.parametrize("memory", ["cpu", "cuda"])
def test_our_agent_is_timed_on_the_device_only_when_its_pools_are_gpu_memory(memory, monkeypatch):
    """On a host with a GPU, a CPU run (``--device cpu``, the ipc path under the interpreter) is timed by the wall
    clock like everything else on the CPU, and its record says so; only GPU pools are timed with CUDA events."""
    import torch

    from sagellm_comm.benchmark.transfer_movers import AgentMover
    from sagellm_comm.transfer.descriptors import RegionInfo

    class Agent:
        def peer_backend(self, peer):
            return "ipc"

        def peer_regions(self, peer):
            return {"pool": RegionInfo("pool", 1 << 20, "uint8", 1, memory)}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert AgentMover(Agent(), "peer-ipc", False, 5.0).device_timed == (memory == "cuda")
