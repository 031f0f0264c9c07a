"""The UCX protocol-table reader (sagellm_comm/transfer/ucx_log.py): incremental, across UCX's log rotation, and
bounded on disk.

The first tests write UCX's table format into a file by hand, the way UCX writes and rotates it (rename to
``<file>.1``, the oldest one removed, a new file opened); the last one runs NIXL over loopback with many peers
joining and leaving while UCX rotates a small log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from sagellm_comm.transfer import ucx_log
from sagellm_comm.transfer.ucx_log import UcxLog
from tests.conftest import run_ranks


def _prefix(pid: int | None = None) -> str:
    """UCX's line prefix: ``[<time>] [<host>:<pid>:<thread>]`` (the pid padded to 5), this process's by default."""
    return f"[1796430453.664399] [vm:{os.getpid() if pid is None else pid:<5}:0]   "


def _table(agent: str, locality: str, config: int, operation: str, transport: str, pid: int | None = None) -> str:
    prefix = _prefix(pid)
    lines = [f"| {agent} {locality} cfg#{config}      |", f"| {operation} from host memory to host |",
             "+--------+-------------+-------------+", "| Range  | Description |   Config    |",
             "+--------+-------------+-------------+", f"| 0..inf | zero-copy   | {transport:<11} |",
             "+--------+-------------+-------------+"]  # fmt: skip
    return "".join(prefix + line + "\n" for line in lines)


def _rma(agent, config, transport, locality="intra-node", pid=None):
    return _table(agent, locality, config, "remote memory write by ucp_put*", transport, pid)


def _am(agent, config, transport, locality="intra-node"):
    return _table(agent, locality, config, "active message by ucp_am_send*", transport)


def _append(path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def _append_bytes(path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def _rotate(path, keep: int = 1) -> None:
    """What UCX does when the next message would not fit: shift ``path.N`` up, drop the oldest, open a new one."""
    if os.path.exists(f"{path}.{keep}"):
        os.unlink(f"{path}.{keep}")
    for index in range(keep - 1, 0, -1):
        if os.path.exists(f"{path}.{index}"):
            os.rename(f"{path}.{index}", f"{path}.{index + 1}")
    os.rename(path, f"{path}.1")
    open(path, "w").close()


def test_bytes_already_read_are_not_read_again_and_a_partial_line_waits_for_its_end(tmp_path):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    log.watch("a")  # before the worker of that name prints anything, as a NIXL agent does
    path.write_text(_rma("a", 1, "cma/memory") + _am("a", 1, "tcp/lo"))
    assert log.transports("a", "intra-node") == {"rma": ["cma/memory"], "am": ["tcp/lo"]}
    # Overwrite what was read (same file, same size): a reader that starts over would lose the tables.
    size = path.stat().st_size
    with open(path, "r+") as handle:
        handle.write("x" * (size - 1) + "\n")
    assert log.describe("a", "intra-node") == "UCX RMA: cma/memory; notify: tcp/lo"
    # A newer configuration arrives in pieces cut mid-line, as UCX's buffered writes reach the file.
    text = _rma("a", 2, "cuda_ipc/cuda")
    cut = text.index("cuda_ipc") + 4
    _append(path, text[:cut])
    assert log.transports("a", "intra-node") == {}  # cfg#2 is the newest; its row is not complete yet
    _append(path, text[cut:])
    assert log.transports("a", "intra-node") == {"rma": ["cuda_ipc/cuda"]}
    _append(path, _rma("a", 1, "tcp/lo"))  # an older configuration's table does not replace the newest
    assert log.transports("a", "intra-node") == {"rma": ["cuda_ipc/cuda"]}


@pytest.mark.parametrize("step", [1000, 1 << 20], ids=["small-writes", "large-writes"])
def test_a_line_longer_than_the_cap_is_dropped_up_to_its_newline_and_never_kept_whole(tmp_path, step):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    log.watch("a")
    # 4 MiB of one line whose end looks like a header: it is dropped, not parsed and not kept in memory
    overlong = b"x" * (4 << 20) + _rma("a", 9, "tcp/wrong").splitlines()[0].encode()
    for start in range(0, len(overlong), step):
        _append_bytes(path, overlong[start : start + step])
        assert log.transports("a", "intra-node") == {}
        assert len(log._partial) <= ucx_log.LINE_MAX
    _append_bytes(path, b"\n| remote memory write by ucp_put* |\n| 0..inf | zero-copy | tcp/wrong |\n")
    _append_bytes(path, _rma("a", 1, "cma/memory").encode())
    assert log.transports("a", "intra-node") == {"rma": ["cma/memory"]}
    # a line just within the cap is still read whole, across writes
    header = _rma("a", 2, "posix/memory").splitlines(keepends=True)
    padded = header[0].replace("|", " " * (ucx_log.LINE_MAX + 1 - len(header[0])) + "|", 1)
    assert len(padded.rstrip("\n")) == ucx_log.LINE_MAX
    _append_bytes(path, padded[: len(padded) // 2].encode())
    assert log.transports("a", "intra-node") == {"rma": ["cma/memory"]}
    _append_bytes(path, (padded[len(padded) // 2 :] + "".join(header[1:])).encode())
    assert log.transports("a", "intra-node") == {"rma": ["posix/memory"]}


@pytest.mark.parametrize("keep", [0, 1, 2], ids=["removed", "rotate1", "rotate2"])
def test_tables_survive_rotation_and_every_file_written_after_the_one_read_is_read(tmp_path, keep):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    log.watch("a")
    log.watch("b")
    path.write_text(_rma("a", 1, "cma/memory"))
    assert log.transports("a", "intra-node") == {"rma": ["cma/memory"]}
    _append(path, _am("a", 1, "tcp/lo"))  # the rest of the file read last, written before it was rotated away
    if keep:
        _rotate(path, keep)
        _append(path, _rma("b", 3, "posix/memory", "inter-node"))
        _rotate(path, keep)  # twice between two reads: the middle file is read too where UCX kept it
    else:  # UCX_LOG_FILE_ROTATE=0: UCX removes the full file and opens a new one
        os.unlink(path)
        open(path, "w").close()
    _append(path, _rma("b", 4, "tcp/eth0", "inter-node"))
    # a's tables were printed once, in a file rotated away or removed since: still described
    assert log.describe("a", "intra-node") == "UCX RMA: cma/memory; notify: tcp/lo"
    assert log.transports("b", "inter-node") == {"rma": ["tcp/eth0"]}
    if keep == 2:  # cfg#3 was read from path.1 before cfg#4 replaced it: check the order with an older config
        _append(path, _rma("b", 3, "posix/memory", "inter-node"))
        assert log.transports("b", "inter-node") == {"rma": ["tcp/eth0"]}


def test_only_live_agents_tables_are_kept_and_a_new_agent_of_an_old_name_starts_fresh(tmp_path, caplog):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    log.watch("a")
    path.write_text(_rma("gone", 7, "tcp/lo") + _rma("a", 5, "tcp/lo"))
    assert log.transports("gone", "intra-node") == {}  # not watched: not kept
    assert log.transports("a", "intra-node") == {"rma": ["tcp/lo"]}
    log.unwatch("a")
    assert log._newest == {}
    _append(path, _rma("a", 6, "tcp/lo"))  # the closed agent's last table, read after it closed
    log.watch("a")  # a new UCX worker of the same name counts its configurations from 0 again
    _append(path, _rma("a", 1, "cma/memory") + _prefix() + "ucp_ep.c:1 UCX  WARN  slow path\n")
    with caplog.at_level(logging.WARNING, logger="sagellm_comm.transfer"):
        assert log.transports("a", "intra-node") == {"rma": ["cma/memory"]}
        assert log.transports("a", "intra-node") == {"rma": ["cma/memory"]}
    assert [r.getMessage() for r in caplog.records] == ["UCX: ucp_ep.c:1 UCX  WARN  slow path"]  # forwarded once


def test_names_are_matched_as_ucx_prints_them_first_31_bytes_spaces_included(tmp_path):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    long, spaced, accented = "prefill-engine.cluster.local-pid4242-rank0", "decode engine  0 self", "é" * 20
    assert ucx_log.ucx_name(long) == long[:31] and ucx_log.ucx_name(accented) == "é" * 15 + "\ufffd"  # a cut é
    for agent in (long, spaced, accented):
        log.watch(agent)
    text = _rma(long[:31], 1, "cma/memory") + _rma(spaced, 1, "tcp/lo") + _am(spaced, 1, "tcp/lo", "inter-node")
    cut = ("é" * 15).encode() + b"\xc3"  # UCX cuts the 16th é in two
    path.write_bytes(text.encode() + _rma("@", 1, "posix/memory").encode().replace(b"@", cut))
    assert log.transports(long, "intra-node") == {"rma": ["cma/memory"]}
    assert log.transports(spaced, "intra-node") == {"rma": ["tcp/lo"]}
    assert log.transports(spaced, "inter-node") == {"am": ["tcp/lo"]}
    assert log.transports(accented, "intra-node") == {"rma": ["posix/memory"]}
    assert log.describe(long, "intra-node") == "UCX RMA: cma/memory"


def test_an_agent_named_with_ucxs_level_words_has_its_tables_read_not_forwarded_as_warnings(tmp_path, caplog):
    """A table line is never a UCX warning, whatever the agent's name holds: UCX's level is read where UCX puts it,
    before the message, not anywhere in the line."""
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    agents = ("kv WARN store", "kv ERROR store")
    for agent in agents:
        log.watch(agent)
    path.write_text("".join(_rma(agent, 1, "cma/memory") for agent in agents))
    with caplog.at_level(logging.WARNING, logger="sagellm_comm.transfer"):
        for agent in agents:
            assert log.transports(agent, "intra-node") == {"rma": ["cma/memory"]}
    assert caplog.records == []


def test_agents_sharing_their_first_31_bytes_are_ambiguous_and_other_processes_lines_are_skipped(tmp_path):
    path = tmp_path / "ucx.log"
    log = UcxLog(str(path))
    first, second = "prefill-engine-instance-number-0001-rank0", "prefill-engine-instance-number-0001-rank1"
    log.watch(first)
    path.write_text(_rma(first[:31], 1, "cma/memory") + _rma("other", 9, "tcp/lo", pid=os.getpid() + 1))
    assert log.transports(first, "intra-node") == {"rma": ["cma/memory"]} and log.ambiguous(first) == []
    log.watch(second)  # UCX prints its tables under the same header: they cannot be told apart from first's
    _append(path, _rma(second[:31], 2, "tcp/lo"))
    for agent in (first, second):
        assert log.ambiguous(agent) == [first, second]
        assert log.transports(agent, "intra-node") == {}
        assert "ambiguous" in log.describe(agent, "intra-node") and repr(first[:31]) in log.describe(agent, "x")
    log.unwatch(second)  # what was kept under that name mixes both: still ambiguous while first lives
    assert log.ambiguous(first) == [first, second]
    log.unwatch(first)
    log.watch(second)  # a name free again starts fresh
    assert log.ambiguous(second) == [] and log.transports(second, "intra-node") == {}
    log.watch("other")  # a table another process wrote into a shared file is not this process's
    _append(path, _rma("other", 1, "tcp/lo", pid=os.getpid() + 1))
    assert log.transports("other", "intra-node") == {}


def _long_names_worker(rank, world_size, port):
    import torch

    from sagellm_comm.transfer import TransferAgent

    names = ["prefill-engine.cluster.local-pid4242-rank0", "decode engine 0", "shared-prefix-of-thirty-one-by-a",
             "shared-prefix-of-thirty-one-by-b"]  # fmt: skip
    peer = TransferAgent("peer", "nixl")
    peer.allocate("kv", 4096, torch.uint8)
    described = {}
    agents = [TransferAgent(name, "nixl") for name in names]
    for agent in agents:
        agent.allocate("kv", 4096, torch.uint8)
        link = agent.add_peer(peer.metadata())
        agent.write(link, "kv", "kv", [(0, 0, 4096)]).wait(10)
        described[agent.name] = agent.peer_transport(link)
    for agent in [*agents, peer]:
        agent.close()
    return described


def test_real_ucx_tables_of_long_names_and_names_with_spaces_are_read():
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    env = dict.fromkeys(("UCX_LOG_FILE", "UCX_LOG_FILE_SIZE", "UCX_LOG_FILE_ROTATE", "UCX_PROTO_INFO"))
    (described,) = run_ranks(_long_names_worker, 1, timeout=120.0, env=env)
    assert described["prefill-engine.cluster.local-pid4242-rank0"] == "UCX RMA: cma/memory; notify: tcp/lo"
    assert described["decode engine 0"] == "UCX RMA: cma/memory; notify: tcp/lo"
    for name in ("shared-prefix-of-thirty-one-by-a", "shared-prefix-of-thirty-one-by-b"):
        assert "ambiguous" in described[name] and "'shared-prefix-of-thirty-one-by-'" in described[name]


def test_sweeping_removes_a_dead_processs_log_and_its_rotated_files_and_keeps_the_rest(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = [f"{ucx_log.LOG_PREFIX}{dead_pid}.log", f"{ucx_log.LOG_PREFIX}{dead_pid}.log.1",
             f"{ucx_log.LOG_PREFIX}{dead_pid}.log.12", f"{ucx_log.LOG_PREFIX}{dead_pid}.logbook",
             f"{ucx_log.LOG_PREFIX}{os.getpid()}.log", f"{ucx_log.LOG_PREFIX}{os.getpid()}.log.1"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("x")
    monkeypatch.setattr(ucx_log.tempfile, "gettempdir", lambda: str(tmp_path))
    ucx_log._sweep()
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
    ucx_log._remove_all(str(tmp_path / names[4]), os.getpid() + 1)  # a forked child's inherited exit hook
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
    ucx_log._remove_all(str(tmp_path / names[4]), os.getpid())  # this process's exit hook: its file and the rotated
    assert os.listdir(tmp_path) == [names[3]]


def _many_peers_worker(rank, world_size, port, peers):
    import glob

    import torch

    from sagellm_comm.transfer import TransferAgent

    ucx_log.FILE_SIZE = "32k"  # small enough to rotate a few times in this test
    agent = TransferAgent("a", "nixl")
    agent.allocate("kv", 1024, torch.float32)
    path = ucx_log.install().path
    described, largest, files = [], 0, set()
    for i in range(peers):
        other = TransferAgent(f"b{i}", "nixl")
        other.allocate("kv", 1024, torch.float32)
        peer = agent.add_peer(other.metadata())
        agent.write(peer, "kv", "kv", [(0, 64, 64)]).wait(10)
        described.append(agent.peer_transport(peer))
        agent.remove_peer(peer)
        other.close()
        for name in glob.glob(path + "*"):
            files.add(os.path.basename(name)[len(os.path.basename(path)) :])
            largest = max(largest, os.path.getsize(name))
    agent.close()
    return {"described": described, "largest": largest, "files": sorted(files),
            "settings": (os.environ["UCX_LOG_FILE_SIZE"], os.environ["UCX_LOG_FILE_ROTATE"]),
            "retained": sorted(ucx_log.install()._newest)}  # fmt: skip


def test_peers_joining_and_leaving_keep_the_ucx_log_bounded_and_every_peer_described():
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    env = dict.fromkeys(("UCX_LOG_FILE", "UCX_LOG_FILE_SIZE", "UCX_LOG_FILE_ROTATE", "UCX_PROTO_INFO"))
    (out,) = run_ranks(_many_peers_worker, 1, 16, timeout=120.0, env=env)
    assert out["settings"] == ("32k", "1")
    assert out["files"] == ["", ".1"], out["files"]  # rotated, and no more than one older file kept
    assert out["largest"] <= 32 * 1024, out["largest"]
    # a's intra-node configuration was printed once, for the first peer; every later peer shares it
    assert out["described"] == ["UCX RMA: cma/memory; notify: tcp/lo"] * 16, out["described"]
    assert out["retained"] == [], out["retained"]  # closed agents' tables are dropped


_CHILD = """
import os, torch
from sagellm_comm.transfer import TransferAgent, ucx_log
a, b = TransferAgent("child-a", "nixl"), TransferAgent("child-b", "nixl")
a.allocate("kv", 4096, torch.uint8)
b.allocate("kv", 4096, torch.uint8)
peer = a.add_peer(b.metadata())
a.write(peer, "kv", "kv", [(0, 0, 4096)]).wait(10)
print(os.getpid(), ucx_log.install().path, a.peer_transport(peer), sep="|")
a.close()
b.close()
"""


def _parent_and_child_worker(rank, world_size, port):
    import torch

    from sagellm_comm.transfer import TransferAgent

    agent = TransferAgent("parent", "nixl")  # redirects this process's UCX log
    agent.allocate("kv", 4096, torch.uint8)
    mine = ucx_log.install().path
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True)
    pid, path, described = child.stdout.strip().splitlines()[-1].split("|")
    out = {"mine": mine, "mine_exists": os.path.exists(mine), "child_pid": pid, "child_path": path,
           "child_left": os.path.exists(path), "described": described}  # fmt: skip
    agent.close()
    return out


def test_a_child_process_gets_a_ucx_log_of_its_own_and_removes_it():
    """A process with a transfer agent starts another that makes its own: the child's UCX writes its own file
    (the environment it inherits names a per-process pattern, not the parent's file), reads its own tables, and
    removes its file at exit; the parent's file stays its own."""
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    env = dict.fromkeys(("UCX_LOG_FILE", "UCX_LOG_FILE_SIZE", "UCX_LOG_FILE_ROTATE", "UCX_PROTO_INFO"))
    (out,) = run_ranks(_parent_and_child_worker, 1, timeout=180.0, env=env)
    assert out["child_path"].endswith(f"{ucx_log.LOG_PREFIX}{out['child_pid']}.log"), out
    assert out["child_path"] != out["mine"] and out["mine_exists"] and not out["child_left"], out
    assert out["described"] == "UCX RMA: cma/memory; notify: tcp/lo", out
