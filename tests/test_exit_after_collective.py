"""A process that ends right after a collective made inside one of our custom ops, then ``destroy()``, exits
cleanly: the engine's thread releasing that collective's tensors is given the GIL before the interpreter
finalizes (``TorchDistributedBackend.destroy``).  Without that a few processes in a hundred abort ("terminate
called without an active exception"), which this test catches.  Slow: many pairs of short-lived Gloo worlds."""

from __future__ import annotations

import pytest

from tests.script_processes import run_script_ranks

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
    script = tmp_path / "exit_after.py"
    script.write_text(SCRIPT)
    failures = []
    for pair in range(PAIRS):
        for rank, (status, _, err) in enumerate(run_script_ranks(script, 2, timeout=60.0)):
            if status != 0:
                failures.append((pair, rank, status, err.strip().splitlines()[-1:]))
    assert not failures, failures
