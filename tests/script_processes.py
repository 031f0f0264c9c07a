"""Python scripts run as real processes, alone or as the ranks of a world (torchrun's variables and a store hosted
here), each ending as a user's script ends: through the interpreter's own exit (not ``os._exit``, as
``multiprocessing`` children do), so whatever runs at finalization runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sagellm_comm.benchmark.spawn import die_with_parent

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def script_env(script: Path) -> dict[str, str]:
    """A script's environment: no launcher variables, this checkout first on the path, one OpenMP thread, and an
    Inductor cache of the script's own (a compile then runs its cold path, as on a first run)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(script.parent / "inductor-cache")
    return env


def start_script(script: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``script`` as a process in its own directory, output captured, killed if this process dies."""
    parent = os.getpid()
    return subprocess.Popen(
        [sys.executable, str(script), *args], cwd=script.parent, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: die_with_parent(parent),
    )  # fmt: skip


def run_script_ranks(script: Path, count: int, timeout: float) -> list[tuple[int, str, str]]:
    """``count`` processes of ``script`` meeting on a store hosted here, each given its rank as its argument;
    ``(status, stdout, stderr)`` of each.  A failure or a timeout leaves no process behind."""
    from sagellm_comm.backends.torch_distributed.rendezvous import client_env, host_store

    store = host_store("127.0.0.1", timeout=timeout)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(count):
            env = {**script_env(script), **client_env("127.0.0.1", store.port)}
            env.update(RANK=str(rank), WORLD_SIZE=str(count), LOCAL_RANK=str(rank))
            procs.append(start_script(script, [str(rank)], env))
        deadline = time.monotonic() + timeout
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outcomes.append((proc.returncode, out, err))
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store
