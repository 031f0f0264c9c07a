"""The multi-process helper itself: its store, and ranks that never outlive it.

``run_ranks`` (conftest) must leave no rank behind however the call ends: a test interrupted while its
ranks spin (pytest's timeout raises in the test, as Ctrl-C does), or the pytest process killed outright
(the ranks die with it).  A port is never picked and released: ranks meet on the store the helper hosts.
"""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import run_ranks

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_pids(pid_dir: Path, count: int, limit_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = [int(p.read_text()) for p in pid_dir.glob("*.pid") if p.read_text().strip()]
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the ranks did not start within {limit_s:g}s: {sorted(pid_dir.iterdir())}")


def _wait_until_gone(pids: list[int], limit_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + limit_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _spin(rank: int, world_size: int, port: int, pid_dir: str) -> None:
    """Write this rank's pid, then never return (a hung rank)."""
    path = Path(pid_dir) / f"{rank}.pid"
    path.with_suffix(".tmp").write_text(str(os.getpid()))
    path.with_suffix(".tmp").rename(path)
    while True:
        time.sleep(0.1)


def _store_and_env(rank: int, world_size: int, port: int) -> tuple:
    import torch.distributed as dist

    from sagellm_comm import CommBackend

    env = (os.environ["MASTER_PORT"], os.environ["TORCHELASTIC_USE_AGENT_STORE"], os.environ["RANK"])
    with CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=60) as backend:
        hosting = dist.get_world_size() == world_size and backend.all_reduce(__import__("torch").ones(1)).item()
    return env, hosting


def test_ranks_meet_on_the_store_the_helper_hosts() -> None:
    results = run_ranks(_store_and_env, 3, timeout=120)
    ports = {env[0] for env, _ in results}
    assert len(ports) == 1 and all(env[1] == "True" for env, _ in results)
    assert [env[2] for env, _ in results] == ["0", "1", "2"]
    assert all(total == 3.0 for _, total in results)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_an_interrupted_call_kills_its_ranks(tmp_path) -> None:
    """pytest's timeout (signal method) and Ctrl-C both raise in the test while run_ranks waits."""
    started: list[int] = []

    def interrupt_once_running() -> None:
        started.extend(_wait_for_pids(tmp_path, 2))
        _thread.interrupt_main()

    # Ctrl-C as in a terminal: a suite run as a background job of a shell without job control inherits SIGINT
    # ignored, and interrupt_main() then does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher = threading.Thread(target=interrupt_once_running, daemon=True)
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            run_ranks(_spin, 2, str(tmp_path), timeout=300)
        watcher.join(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(started) == 2
    assert _wait_until_gone(started) == []


_LAUNCHER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from conftest import run_ranks
    from test_run_ranks import _spin

    if __name__ == "__main__":
        run_ranks(_spin, 2, sys.argv[2], timeout=300)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_killed_launcher(tmp_path) -> None:
    """SIGKILL gives the helper no chance to clean up: the ranks must die on their own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(TESTS), str(tmp_path)], env=env, cwd=REPO)
    pids: list[int] = []
    try:
        pids = _wait_for_pids(tmp_path, 2)
        assert all(_alive(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(30)
        assert _wait_until_gone(pids) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in filter(_alive, pids):  # a failed check leaves no spinning rank behind
            os.kill(pid, signal.SIGKILL)


def test_a_timeout_that_pytest_would_cut_short_is_refused() -> None:
    from conftest import CLEANUP_S, _session_timeout

    limit = _session_timeout()
    if limit is None:
        pytest.skip("pytest-timeout is not installed")
    with pytest.raises(pytest.fail.Exception, match="leaves less than"):
        run_ranks(_spin, 1, "/nonexistent", timeout=limit - CLEANUP_S + 1)


#: files allowed to bind a socket themselves: each holds it for as long as it names the port
_HOLDS_ITS_SOCKET = {"tests/test_errors.py"}


def test_no_port_is_picked_and_released() -> None:
    """Ranks meet on a store their launcher hosts on port 0 (rendezvous.host_store); nothing else binds a
    socket to learn a free port and close it again (the port could be taken before the ranks bind it)."""
    offenders = []
    for folder in ("sagellm_comm", "tests", "examples", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text()
            if rel in _HOLDS_ITS_SOCKET or path == Path(__file__).resolve():  # this test names them to forbid them
                continue
            if "getsockname" in text or "free_port" in text:
                offenders.append(rel)
    assert offenders == [], f"pick-and-release port helpers in {offenders}: host a store instead (host_store)"
