"""A process that ends right after a collective made inside one of our custom ops, then ``destroy()``, exits
cleanly: the engine's thread releasing that collective's tensors is given the GIL before the interpreter
finalizes (``TorchDistributedBackend.destroy``).  Without it a few processes in a hundred aborted ("terminate
called without an active exception"), and this test failed.  Slow: many process pairs, each a short-lived Gloo world."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAIRS = 60

SCRIPT = """
import torch
import sagellm_comm
from sagellm_comm import ops

world = sagellm_comm.init(backend="gloo")
y = ops.all_reduce(torch.ones(64))
assert bool((y == 2).all())
sagellm_comm.destroy()
"""


@pytest.mark.slow
def test_processes_exit_cleanly_right_after_a_collective_in_a_custom_op(tmp_path):
    from sagellm_comm.backends.torch_distributed.rendezvous import client_env, host_store

    script = tmp_path / "exit_after.py"
    script.write_text(SCRIPT)
    failures = []
    for pair in range(PAIRS):
        store = host_store("127.0.0.1", timeout=60.0)
        try:
            procs = []
            for rank in range(2):
                env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
                env.update(client_env("127.0.0.1", store.port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
                env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
                env["OMP_NUM_THREADS"] = "1"
                procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
            for rank, proc in enumerate(procs):
                _, err = proc.communicate(timeout=60)
                if proc.returncode != 0:
                    failures.append((pair, rank, proc.returncode, err.strip().splitlines()[-1:]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            del store
    assert not failures, failures
