"""The ipc transfer path on a GPU (``-m gpu``): two processes on one GPU, the block-copy kernel over CUDA IPC
mappings, exact bytes against a reference computed on the receiving side, notifications after every byte,
peers that die.  Skipped without a CUDA GPU.

Commands for the device machine (python3 3.12, torch 2.11+cu130, cupy-cuda13x; NIXL from the wheel)::

    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -m gpu tests/test_transfer_gpu.py tests/test_llama_disaggregated.py
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import numpy as np
import pytest
import torch

from tests.conftest import HAS_CUDA, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
GPU_ENV = {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
MB = 1 << 20


def _store(rank: int, port: int):
    from torch.distributed import TCPStore

    # run_ranks hosts the store on ``port``: every rank is a client
    return TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))


def _pattern(seed: int, nbytes: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8, device="cuda")


def _notes(agent, count: int, timeout: float = 60.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += agent.notifications()
    assert len(got) >= count, got
    return got


def _write_until_the_ring_has_room(agent, peer, blocks, notify: bytes, timeout: float = 60.0):
    from sagellm_comm.errors import UnavailableError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return agent.write(peer, "pool", "pool", blocks, notify=notify)
        except UnavailableError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1e-4)


# (local_offset, remote_offset, nbytes) cases: 16-byte aligned (vector path), odd (byte path), one long block
# (the copy engine), 1000 scattered 16 KB blocks, one odd block under the copy-engine threshold (named in the
# launch's arguments, byte path) and one over it at odd offsets
def _cases(rng) -> dict[str, np.ndarray]:
    scattered = rng.permutation(2048)[:1000]
    return {
        "aligned": np.array([[0, 16 * MB, 4096], [8192, 20 * MB, 48], [MB, 5 * MB, 65536 + 16]]),
        "odd": np.array([[1, 30 * MB + 3, 1], [17, 31 * MB + 1, 12345], [33 * MB + 7, 90, 999]]),
        "long": np.array([[40 * MB, 64 * MB, 64 * MB]]),
        "scattered": np.stack([np.arange(1000) * 16384, 130 * MB + scattered * 16384, np.full(1000, 16384)], 1),
        "one_odd": np.array([[5, 163 * MB + 3, 777777]]),
        "one_long_odd": np.array([[2 * MB + 1, 165 * MB + 7, 3 * MB + 5]]),
    }


def _pair_worker(rank, world_size, port):
    from sagellm_comm.transfer import TransferAgent

    torch.cuda.set_device(0)
    store = _store(rank, port)
    agent = TransferAgent(("sender", "receiver")[rank])
    # The pool is a slice of a larger caching-allocator block: its IPC handle names the whole allocation.
    backing = torch.zeros(200 * MB + 4096, dtype=torch.uint8, device="cuda")
    pool = backing[4096:]
    agent.register("pool", pool)
    store.set(f"meta/{rank}", agent.metadata())
    peer = agent.add_peer(store.get(f"meta/{1 - rank}"))
    out = {"backend": agent.peer_backend(peer), "reason": agent.backend_reason(peer)}
    cases = _cases(np.random.default_rng(3))
    if rank == 0:
        pool[: 100 * MB].copy_(_pattern(1, 100 * MB))
        for name, table in cases.items():
            agent.write(peer, "pool", "pool", table, notify=name.encode()).wait(60)
        # 200 writes queued back to back (each from its own source block); past 64 notifications not yet read the
        # receiver's ring refuses the next (nothing sent): the sender tries again, as a user would
        for k in range(200):
            pool[150 * MB + k * 4096 : 150 * MB + (k + 1) * 4096].fill_(k % 251)
            _write_until_the_ring_has_room(agent, peer, [(150 * MB + k * 4096, 180 * MB + k * 4096, 4096)],
                                           f"v{k}".encode())  # fmt: skip
        torch.cuda.synchronize()
        # prepared pools: 1000 x 16 KB by block ids, then a read back into a fresh region checked on the device
        prepared = agent.prepare(peer, "pool", "pool", 16384)
        prepared.write(list(range(1000)), list(range(6000, 7000)), notify=b"prepared").wait(60)
        prepared.write([1001], [7001]).wait(60)  # one block by id: named in the launch's arguments
        store.set("written", b"1")
        store.wait(["checked"])
        back = torch.zeros(16 * MB, dtype=torch.uint8, device="cuda")
        agent.register("back", back)
        want = _pattern(1, 100 * MB)[: 1000 * 16384].clone()
        torch.cuda.synchronize()  # nothing of this process's own work left on the stream before the read
        handle = agent.read(peer, "back", "pool", cases["scattered"], notify=b"read")
        handle.wait_on_stream()  # the comparison below is queued right behind the copy, no host wait
        out["read_wrong"] = int((back[: 1000 * 16384] != want).sum())
    else:
        notes = _notes(agent, len(cases) + 200 + 1)
        out["notes"] = [m for _, m in notes]
        store.wait(["written"])
        source = torch.zeros_like(pool)  # the sender's pool when the cases were written: the pattern, then zeros
        source[: 100 * MB] = _pattern(1, 100 * MB)
        expected = torch.zeros_like(pool)
        for table in cases.values():
            for lo, ro, n in table.tolist():
                expected[ro : ro + n] = source[lo : lo + n]
        for k in range(200):
            expected[180 * MB + k * 4096 : 180 * MB + (k + 1) * 4096] = k % 251
        for i, j in [*zip(range(1000), range(6000, 7000), strict=True), (1001, 7001)]:
            expected[j * 16384 : (j + 1) * 16384] = source[i * 16384 : (i + 1) * 16384]
        out["wrong"] = int((pool != expected).sum())  # touched and untouched bytes alike
        out["front_untouched"] = bool((backing[:4096] == 0).all())
        store.set("checked", b"1")
        out["read_note"] = _notes(agent, 1)
    store.set(f"done/{rank}", b"1")
    if rank == 0:
        store.wait(["done/1"])
    agent.close()
    return out


def test_ipc_between_two_processes_on_one_gpu_moves_exact_bytes_and_notifies_after_them():
    sender, receiver = run_ranks(_pair_worker, 2, timeout=300.0, env=GPU_ENV)
    assert sender["backend"] == receiver["backend"] == "ipc", sender["reason"]
    assert receiver["wrong"] == 0 and receiver["front_untouched"] and sender["read_wrong"] == 0
    notes = receiver["notes"]
    assert notes[:6] == [b"aligned", b"odd", b"long", b"scattered", b"one_odd", b"one_long_odd"]
    assert notes[6:206] == [f"v{k}".encode() for k in range(200)] and notes[206] == b"prepared"
    assert receiver["read_note"] == [("sender", b"read")]


def _ordering_worker(rank, world_size, port, block, options):
    """Every notification's block already holds its bytes when the notification is seen (checked on arrival: the
    block's last bytes, which a one-program copy of a long block writes last, tens of microseconds after its
    first)."""
    from sagellm_comm.transfer import TransferAgent

    torch.cuda.set_device(0)
    store = _store(rank, port)
    agent = TransferAgent(("sender", "receiver")[rank], "ipc", options={"ipc": options})
    pool = agent.allocate("pool", 2 * 300 * block, torch.uint8, "cuda")
    store.set(f"meta/{rank}", agent.metadata())
    bad = 0
    if rank == 0:
        peer = agent.add_peer(store.get("meta/1"))
        for k in range(300):  # queued back to back, each from its own source block into its own block
            pool[k * block : (k + 1) * block].fill_(k % 256)
            agent.write(peer, "pool", "pool", [(k * block, (300 + k) * block, block)], notify=k.to_bytes(4, "little"))
            if k % 50 == 49:  # the ring to the peer holds 64 unread notifications
                store.wait([f"seen/{k}"])
        torch.cuda.synchronize()
    else:
        seen = 0
        deadline = time.monotonic() + 120
        host = torch.empty(16, dtype=torch.uint8, pin_memory=True)
        while seen < 300 and time.monotonic() < deadline:
            for _, message in agent.notifications():
                k = int.from_bytes(message, "little")
                host.copy_(pool[(301 + k) * block - 16 : (301 + k) * block])  # the block's last bytes, after the note
                bad += not bool((host == k % 256).all())
                seen += 1
                if k % 50 == 49:
                    store.set(f"seen/{k}", b"1")
        assert seen == 300, seen
    agent.close()
    return bad


@pytest.mark.parametrize(
    "block, options",
    [
        (64 * 1024, {"resident": True}),
        (64 * 1024, {"resident": False}),
        (MB - 16, {"resident": False, "max_programs": 1}),
        (2 * MB, {}),
    ],
    ids=["resident_copier", "kernel", "kernel_one_program", "copy_engine"],
)
def test_a_notification_is_never_seen_before_its_bytes(block, options):
    assert run_ranks(_ordering_worker, 2, block, options, timeout=300.0, env=GPU_ENV) == [0, 0]


def _death_worker(rank, world_size, port):
    from sagellm_comm.errors import PeerLostError
    from sagellm_comm.transfer import TransferAgent

    torch.cuda.set_device(0)
    store = _store(rank, port)
    agent = TransferAgent(f"r{rank}")
    agent.allocate("pool", 4 * MB, torch.uint8, "cuda")
    store.set(f"meta/{rank}", agent.metadata())
    store.set(f"pid/{rank}", str(os.getpid()))
    if rank == 1:
        time.sleep(120)  # killed by rank 0
        return None
    peer = agent.add_peer(store.get("meta/1"))
    agent.write(peer, "pool", "pool", [(0, 0, MB)]).wait(30)
    os.kill(int(store.get("pid/1")), signal.SIGKILL)
    start = time.monotonic()
    while True:
        try:
            agent.write(peer, "pool", "pool", [(0, 0, MB)]).wait(10)
        except PeerLostError as exc:
            elapsed = time.monotonic() - start
            agent.close()
            return exc.details["peer"], elapsed
        if time.monotonic() - start > 30:
            return "never failed", None
        time.sleep(0.05)  # the process exits over a few milliseconds


def test_a_killed_peer_on_the_same_gpu_fails_the_next_transfer_naming_it():
    result, _ = run_ranks(_death_worker, 2, timeout=200.0, env=GPU_ENV, expect_dead={1})
    peer, elapsed = result
    assert peer == "r1" and elapsed < 10.0, result


def test_the_transfer_benchmark_runs_on_one_gpu_with_every_byte_right():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "sagellm_comm.cli", "transfer", "--block-sizes", "16K", "--block-counts", "1,100",
           "--iters", "5", "--warmup", "2", "--notify-iters", "10", "--no-save", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(repo)]))}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Wrong bytes: 0" in proc.stdout and "notification latency, ipc" in proc.stdout


def test_a_write_carries_what_the_callers_pending_kernels_write():
    """Two agents in one process: a write queued behind a long kernel on the caller's stream carries what that
    stream wrote (the transfer stream waits for it), and so does a write from an idle stream."""
    from sagellm_comm.transfer import TransferAgent

    a, b = TransferAgent("stream-a", backend="ipc"), TransferAgent("stream-b", backend="ipc")
    try:
        src = torch.zeros(MB, dtype=torch.uint8, device="cuda")
        dst = torch.zeros_like(src)
        a.register("pool", src)
        b.register("pool", dst)
        peer = a.add_peer(b.metadata())
        b.add_peer(a.metadata())
        for k in range(1, 301):
            busy = k % 2 == 0
            if busy:
                torch.cuda._sleep(200_000)  # the caller's stream still runs when write() is called
            src[: 16384 + k].fill_(k % 251)
            if not busy:
                torch.cuda.synchronize()  # nothing left on the caller's stream
            a.write(peer, "pool", "pool", [(0, 4096, 16384 + k)], notify=b"k").wait(30.0)
            got = dst[4096 : 4096 + 16384 + k]
            assert bool((got == k % 251).all()), (k, busy, int((got != k % 251).sum()))
            assert b.notifications() == [("stream-a", b"k")], k  # published before the launch completed
    finally:
        a.close()
        b.close()


def _resident_worker(rank, world_size, port):
    """3000 one-block requests through two agents of one process: the resident copier serves most of them, table
    launches and requests behind a busy stream go the launch path, pauses longer than the idle window make the
    copier exit and start again; every byte and every notification's order is checked."""
    from sagellm_comm.transfer import TransferAgent

    torch.cuda.set_device(0)
    options = {"ipc": {"resident": True, "resident_idle_us": 200}}
    a, b = TransferAgent("res-a", "ipc", options=options), TransferAgent("res-b", "ipc", options=options)
    size = 16 * MB
    src = a.allocate("kv", size, torch.uint8, "cuda")
    dst = b.allocate("kv", size, torch.uint8, "cuda")
    src.copy_(_pattern(5, size))
    peer = a.add_peer(b.metadata())
    b.add_peer(a.metadata())
    copier = a._peers[peer].backend.copier
    launches = [0]
    launch = copier._launch

    def counted():
        launches[0] += 1
        launch()

    copier._launch = counted
    expected = torch.zeros_like(dst)
    rng = np.random.default_rng(11)
    sizes = [1, 15, 16, 4096, 16384, 65536 - 16, 65536, 100003]  # the last over the copier's limit: a launch
    sent, seen, moved, cursor, served_before = [], [], [], 0, copier.completed()
    for k in range(3000):
        n = int(sizes[k % len(sizes)])
        lo = int(rng.integers(0, size - n)) & (~15 if k % 3 else ~0)
        if cursor + n > size:
            cursor = 0
        blocks = [(lo, cursor, n)]
        if k % 97 == 0:  # a table launch
            blocks.append((lo // 2, (cursor + n + 16) % (size - 64), 48))
        if k % 150 == 0:
            torch.cuda._sleep(200_000)  # the caller's stream is busy: this one goes the launch path
        if k % 200 == 0:
            time.sleep(0.002)  # longer than the idle window: the copier exits, the next request starts it
        handle = a.write(peer, "kv", "kv", blocks, notify=f"r{k}".encode())
        moved += blocks  # replayed at the end: a copy queued here would keep the caller's stream busy
        sent.append(f"r{k}".encode())
        cursor = (cursor + n + 15) & ~15
        if k % 32 == 31:
            handle.wait(30)
            seen += [m for _, m in b.notifications()]
    handle.wait(30)
    seen += [m for _, m in _notes(b, len(sent) - len(seen))]
    torch.cuda.synchronize()
    for s, d, m in moved:
        expected[d : d + m] = src[s : s + m]
    out = {"wrong": int((dst != expected).sum()), "in_order": seen == sent, "launches": launches[0],
           "served": copier.completed() - served_before}  # fmt: skip
    # After a last request the copier exits within its idle window: a device-wide synchronise returns.
    a.write(peer, "kv", "kv", [(0, 0, 4096)]).wait(30)
    begin = time.monotonic()
    torch.cuda.synchronize()
    out["sync_s"] = time.monotonic() - begin
    a.close()
    b.close()
    out["stopped"] = not copier.leaked
    return out


def test_the_resident_copier_serves_small_requests_exactly_in_order_and_exits_when_idle():
    (out,) = run_ranks(_resident_worker, 1, timeout=300.0, env=GPU_ENV)
    assert out["wrong"] == 0 and out["in_order"], out
    assert out["served"] > 2000, out  # most one-block requests went through the copier
    assert out["launches"] >= 10, out  # it exited at the pauses and was started again
    assert out["sync_s"] < 0.05 and out["stopped"], out


def test_re_adding_a_live_peer_on_the_gpu_keeps_its_slot_and_the_order():
    """Two agents in one process on the GPU: the peer re-added 40 times with the same metadata, a notifying write
    left unread between re-adds (more re-adds than the inbox has slots): each new link goes on with the old one's
    ring, device counter and host-registered pages; every byte and notification arrives, in order."""
    from sagellm_comm.transfer import TransferAgent

    a, b = TransferAgent("readd-a", backend="ipc"), TransferAgent("readd-b", backend="ipc")
    try:
        src = torch.arange(64 * 1024, dtype=torch.int32, device="cuda").view(torch.uint8)
        dst = torch.zeros_like(src)
        a.register("pool", src)
        b.register("pool", dst)
        meta = b.metadata()
        peer = a.add_peer(meta)
        for i in range(40):
            a.write(peer, "pool", "pool", [(i * 4096, i * 4096, 4096)], notify=b"%d" % i).wait(30)
            a.add_peer(meta)
        a.write(peer, "pool", "pool", [(40 * 4096, 40 * 4096, 4096)], notify=b"last").wait(30)
        torch.cuda.synchronize()
        assert a.peer_backend(peer) == "ipc"
        assert [m for _, m in b.notifications()] == [b"%d" % i for i in range(40)] + [b"last"]
        assert torch.equal(dst[: 41 * 4096], src[: 41 * 4096]) and not dst[41 * 4096 :].any()
    finally:
        a.close()
        b.close()


def test_an_in_process_peers_forged_region_address_on_the_gpu_is_refused_and_nothing_is_written():
    """Two agents in one process on the GPU (no CUDA IPC mapping to check an address against): metadata that puts
    the peer's region at other device memory of this process is refused naming the region and the field, and that
    memory is never written; the metadata as made is taken and moves the bytes."""
    import json

    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.metadata import MAGIC

    a, b = TransferAgent("forged-a", backend="ipc"), TransferAgent("forged-b", backend="ipc")
    try:
        src = torch.full((MB,), 7, dtype=torch.uint8, device="cuda")
        dst, victim = torch.zeros_like(src), torch.zeros_like(src)
        a.register("pool", src)
        b.register("pool", dst)
        body = json.loads(b.metadata()[len(MAGIC) :])
        body["transports"]["ipc"]["regions"]["pool"]["address"] = victim.data_ptr()
        with pytest.raises(InvalidArgumentError, match="region 'pool'.*'address'"):
            a.add_peer(MAGIC + json.dumps(body).encode())
        assert a.peers == []
        peer = a.add_peer(b.metadata())
        a.write(peer, "pool", "pool", [(0, 0, MB)]).wait(30)
        torch.cuda.synchronize()
        assert torch.equal(dst, src) and not victim.any()
    finally:
        a.close()
        b.close()


def test_an_in_process_peer_closing_while_its_probe_is_read_on_the_gpu_frees_it_after_the_read():
    """Agent c closes in another thread while a's add_peer reads c's probe (device memory that nothing but c holds):
    c's close, which frees the probe, waits until the read is done, and the read finds c's token."""
    import threading

    from sagellm_comm.transfer import TransferAgent

    a, c = TransferAgent("probe-a", backend="ipc"), TransferAgent("probe-c", backend="ipc")
    try:
        closing, seen = threading.Thread(target=c.close), []
        ipc_a = a._backends["ipc"]
        probe = ipc_a._probe

        def reading(link, token):
            closing.start()
            closing.join(0.5)
            seen.append(closing.is_alive())
            probe(link, token)  # raises unless c's token was read
            seen.append("read")

        ipc_a._probe = reading
        a.add_peer(c.metadata())
        closing.join(30.0)
        assert seen == [True, "read"] and not closing.is_alive(), seen
    finally:
        a.close()
        c.close()


def _inflated_worker(rank, world_size, port):
    """Rank 1 publishes its metadata with its region (and the allocation it names) claimed 1 GB larger than the
    CUDA allocation behind it; rank 0 must refuse it from the mapping's own size, then take the true metadata."""
    import json

    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.metadata import MAGIC

    torch.cuda.set_device(0)
    store = _store(rank, port)
    agent = TransferAgent(("inflated-a", "inflated-b")[rank], "ipc")
    pool = torch.full((MB,), 5 if rank else 0, dtype=torch.uint8, device="cuda")
    agent.register("pool", pool)
    out = {}
    if rank == 1:
        body = json.loads(agent.metadata()[len(MAGIC) :])
        export = body["transports"]["ipc"]["regions"]["pool"]
        body["regions"]["pool"]["nbytes"] += 1 << 30
        export["size"] += 1 << 30
        store.set("inflated", MAGIC + json.dumps(body).encode())
        store.set("meta", agent.metadata())
        store.wait(["done"])
    else:
        try:
            agent.add_peer(store.get("inflated"))
            out["inflated"] = "accepted"
        except InvalidArgumentError as exc:
            out["inflated"] = str(exc)
        peer = agent.add_peer(store.get("meta"))
        agent.read(peer, "pool", "pool", [(0, 0, MB)]).wait(30)
        torch.cuda.synchronize()
        out["read"] = bool((pool == 5).all())
        store.set("done", b"1")
    agent.close()
    return out


def test_a_peer_whose_metadata_claims_more_than_its_cuda_allocation_is_refused_from_the_mappings_size():
    result, _ = run_ranks(_inflated_worker, 2, timeout=200.0, env=GPU_ENV)
    assert "region 'pool'" in result["inflated"] and "CUDA allocation its handle maps" in result["inflated"], result
    assert result["read"], result
