"""Bad input gives a typed error with the right code and a message naming the problem; nothing is
corrupted and the group keeps working; a missing peer gives comm_timeout in bounded time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, run_ranks

import sagellm_comm
from sagellm_comm import (
    BackendNotSupportedError,
    CommBackend,
    CommError,
    CommTimeoutError,
    ErrorCode,
    GroupInvalidError,
    InvalidArgumentError,
    NotInitializedError,
    RankMismatchError,
    ShapeMismatchError,
)

ROOT = Path(__file__).resolve().parents[1]


def expect(fn, cls: type[CommError], code: ErrorCode, *words: str) -> CommError:
    with pytest.raises(cls) as info:
        fn()
    err = info.value
    assert err.code is code, f"{err!r} has code {err.code}, expected {code}"
    text = str(err)
    assert text.startswith(f"[{code.value}]")
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    return err


# ---------------------------------------------------------------------- no rendezvous needed


@pytest.mark.parametrize(
    ("rank", "world_size", "cls", "code", "words"),
    [
        (-1, 2, RankMismatchError, ErrorCode.COMM_RANK_MISMATCH, ("rank must be in [0, 1]", "got -1")),
        (2, 2, RankMismatchError, ErrorCode.COMM_RANK_MISMATCH, ("got 2",)),
        (0, 0, GroupInvalidError, ErrorCode.COMM_GROUP_INVALID, ("world_size must be >= 1", "got 0")),
        (0, -1, GroupInvalidError, ErrorCode.COMM_GROUP_INVALID, ("got -1",)),
    ],
)
def test_init_rejects_bad_rank_and_world_size(rank, world_size, cls, code, words) -> None:
    backend = CommBackend.create("gloo")
    expect(lambda: backend.init(rank=rank, world_size=world_size, master_port=1), cls, code, *words)
    assert not backend.is_initialized and not torch.distributed.is_initialized()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "30"])
def test_host_store_refuses_a_timeout_that_is_not_a_positive_number(timeout) -> None:
    from sagellm_comm.backends.torch_distributed.rendezvous import host_store

    expect(
        lambda: host_store("127.0.0.1", timeout=timeout), InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "timeout"
    )


def test_uninitialised_and_destroyed_backend() -> None:
    backend = CommBackend.create("gloo")
    expect(lambda: backend.all_reduce(torch.ones(2)), NotInitializedError, ErrorCode.COMM_NOT_INITIALIZED, "init(")
    expect(lambda: backend.rank, NotInitializedError, ErrorCode.COMM_NOT_INITIALIZED, "not initialised")
    backend.init(rank=0, world_size=1)
    backend.destroy()
    backend.destroy()  # idempotent
    expect(lambda: backend.barrier(), NotInitializedError, ErrorCode.COMM_NOT_INITIALIZED, "was destroyed")
    expect(sagellm_comm.get_default_backend, NotInitializedError, ErrorCode.COMM_NOT_INITIALIZED, "init(")


def test_backend_not_available_names_what_is_missing() -> None:
    if not HAS_CUDA:
        expect(
            lambda: CommBackend.create("nccl"), BackendNotSupportedError, ErrorCode.COMM_BACKEND_NOT_SUPPORTED, "GPU"
        )
    expect(lambda: CommBackend.create("rccl"), BackendNotSupportedError, ErrorCode.COMM_BACKEND_NOT_SUPPORTED, "ROCm")
    expect(
        lambda: CommBackend.create("hccl"), BackendNotSupportedError, ErrorCode.COMM_BACKEND_NOT_SUPPORTED, "torch_npu"
    )
    err = expect(
        lambda: CommBackend.create("mpi-magic"), BackendNotSupportedError, ErrorCode.COMM_BACKEND_NOT_SUPPORTED
    )
    assert "gloo" in str(err) and "unknown backend" in str(err)
    # an empty name is refused, not taken for "auto"
    from sagellm_comm.backend import get_comm_backend, resolve_kind

    for call in (lambda: resolve_kind(""), lambda: get_comm_backend(""), lambda: CommBackend.create(" ")):
        expect(call, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT, "backend kind must be a non-empty string")


def test_missing_cupy_is_one_typed_error_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from sagellm_comm.cupy_probe import cupy_present, require_cupy

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    assert not cupy_present()
    err = expect(lambda: require_cupy("custom"), BackendNotSupportedError, ErrorCode.COMM_BACKEND_NOT_SUPPORTED)
    assert str(err).startswith("[comm_backend_not_supported] custom needs CuPy for CUDA IPC handles: ")
    assert "isagellm-comm[cuda13]" in str(err) and "isagellm-comm[cuda12]" in str(err)
    assert err.details == {"missing": "cupy"}


def test_errors_are_builtin_exceptions_too() -> None:
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(NotInitializedError, RuntimeError)
    assert issubclass(CommTimeoutError, TimeoutError) and issubclass(ShapeMismatchError, InvalidArgumentError)
    with pytest.raises(ValueError, match="unsupported reduce op"):
        sagellm_comm.ReduceOp.parse("median")
    assert sagellm_comm.CommOp is sagellm_comm.ReduceOp
    assert [op.value for op in sagellm_comm.CommOp] == ["sum", "avg", "max", "min", "prod", "band", "bor", "bxor"]
    assert sagellm_comm.ReduceOp.parse(torch.distributed.ReduceOp.MAX) is sagellm_comm.ReduceOp.MAX
    # an instance of torch's ReduceOp class (what torch.distributed's collectives also take) names its op too
    for name in ("SUM", "AVG", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR"):
        made = torch.distributed.ReduceOp(getattr(torch.distributed.ReduceOp, name))
        assert sagellm_comm.ReduceOp.parse(made) is sagellm_comm.ReduceOp[name]
    with pytest.raises(InvalidArgumentError, match="unsupported reduce op"):
        sagellm_comm.ReduceOp.parse(torch.distributed.ReduceOp.PREMUL_SUM)


@pytest.mark.parametrize("spelling", ["\u017fum", "m\u0131n", "MA\u0425", "sum\u0000", "", "s u m"])
def test_reduce_op_parse_takes_no_spelling_that_only_unicode_case_mapping_or_lookalikes_make_a_name(spelling) -> None:
    """``"ſum"`` upper-cases to ``"SUM"`` and ``"mın"`` to ``"MIN"``; neither names an op, nor does a Cyrillic
    lookalike or a name with a NUL: each is refused, never guessed."""
    with pytest.raises(InvalidArgumentError, match="unsupported reduce op"):
        sagellm_comm.ReduceOp.parse(spelling)


# ---------------------------------------------------------------------- on two ranks


def _bad_inputs(rank: int, world_size: int, port: int) -> int:
    backend = CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=20)
    x = torch.arange(8, dtype=torch.float32) + rank
    out8, out12 = torch.empty(8), torch.empty(12)
    before = x.clone()
    ia, sm, rm, gi = (
        (InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
        (ShapeMismatchError, ErrorCode.INVALID_ARGUMENT),
        (RankMismatchError, ErrorCode.COMM_RANK_MISMATCH),
        (GroupInvalidError, ErrorCode.COMM_GROUP_INVALID),
    )
    cases = [
        (lambda: backend.new_group([]), gi, "empty"),
        (lambda: backend.new_group([0, 0]), gi, "repeat [0]"),
        (lambda: backend.new_group([0, 5]), gi, "[5] are outside the world [0, 1]"),
        (lambda: backend.broadcast(x, src=5), rm, "invalid src rank 5"),
        (lambda: backend.broadcast(x, src=-1), rm, "invalid src rank -1"),
        (lambda: backend.send(x, dst=rank), rm, "invalid dst rank", "it is this rank"),
        (lambda: backend.recv(x, src=7), rm, "invalid src rank 7"),
        (lambda: backend.all_reduce(x, op="median"), ia, "unsupported reduce op 'median'"),
        (lambda: backend.all_reduce(x, op="band"), ia, "BAND needs an integer"),
        (lambda: backend.all_reduce(torch.ones(2, dtype=torch.int32), op="avg"), ia, "AVG needs a floating"),
        (lambda: backend.all_reduce([1.0, 2.0]), ia, "must be a torch.Tensor"),
        (lambda: backend.all_reduce(torch.ones(4, device="meta")), ia, "is on meta", "needs tensors on cpu"),
        (lambda: backend.all_reduce(torch.ones(4, 4).t()), ia, "contiguous"),
        (lambda: backend.all_gather([torch.empty(8)], x), ia, "must hold 2 tensors"),
        (lambda: backend.all_gather([torch.empty(8), torch.empty(9)], x), sm, "output[1] is (9,)"),
        (lambda: backend.all_gather([torch.empty(8), torch.empty(8, dtype=torch.int64)], x), sm, "torch.int64"),
        (lambda: backend.all_gather(torch.empty(15), x), sm, "expected 16 elements"),
        (lambda: backend.reduce_scatter(torch.empty(4), [x, x]), sm, "input[0] is (8,)"),
        (lambda: backend.reduce_scatter(torch.empty(4), torch.empty(9)), sm, "expected 8 elements"),
        (lambda: backend.all_to_all(torch.empty(3), torch.empty(3)), sm, "split evenly into 2"),
        (lambda: backend.all_to_all([torch.empty(4)], [x, x]), ia, "must hold 2 tensors"),
        # in place, or shifted by one element: the engine would send blocks it has already overwritten
        (lambda: backend.all_to_all(x, x), ia, "all_to_all: output and input overlap"),
        (lambda: backend.all_to_all(x[2:], x[:-2]), ia, "output and input overlap"),
        # another rank's block of the other tensor: refused as the custom kernels refuse it (in place is allowed)
        (lambda: backend.all_gather(x, x[4 * (1 - rank) : 4 * (2 - rank)]), ia, "all_gather: output and input overlap"),
        (lambda: backend.reduce_scatter(x[4 * (1 - rank) : 4 * (2 - rank)], x), ia, "reduce_scatter: output and"),
        (lambda: backend.reduce_scatter(x[1:5], x), ia, "only overlap allowed"),
        # the list forms too: the output is another rank's input chunk, or the input another rank's output
        (lambda: backend.reduce_scatter(x[:4], [x[:4], x[4:]][:: 2 * rank - 1]), ia, "reduce_scatter: output and"),
        (lambda: backend.reduce_scatter(x[1:5], [x[:4], x[4:]]), ia, "only overlap allowed"),
        (lambda: backend.all_gather([x, torch.empty(8)][:: 2 * rank - 1], x), ia, "all_gather: output and input"),
        # outputs that share memory: one rank's block would overwrite another's
        (lambda: backend.all_gather([out8, out8], x), ia, "output[0] and output[1] overlap"),
        (lambda: backend.all_gather([out12[:8], out12[4:]], x), ia, "output[0] and output[1] overlap"),
        (lambda: backend.all_to_all([out8[:4], out8[2:6]], [x[:4], x[4:]]), ia, "output[0] and output[1] overlap"),
        (lambda: backend.barrier(timeout=-1), ia, "timeout must be a positive"),
        (lambda: backend.all_reduce(x, group="tp"), ia, "group must come from new_group()"),
    ]
    for fn, (cls, code), *words in cases:
        expect(fn, cls, code, *words)
        assert torch.equal(x, before), "a rejected call changed its tensor"
    # a group this rank is not in: every rank creates it, only rank 0 is a member
    only0 = backend.new_group([0])
    if rank == 1:
        expect(lambda: backend.all_reduce(x, group=only0), *rm, "not a member of the group over ranks [0]")
    # the world still works after every rejection
    backend.all_reduce(x)
    assert torch.equal(x, torch.arange(8, dtype=torch.float32) * 2 + 1)
    # in place: the input is this rank's block of the all-gather output, the output this rank's reduce-scatter chunk
    gathered = torch.full((8,), -1.0)
    gathered[4 * rank : 4 * (rank + 1)] = float(rank)
    backend.all_gather(gathered, gathered[4 * rank : 4 * (rank + 1)])
    assert torch.equal(gathered, torch.tensor([0.0] * 4 + [1.0] * 4))
    scattered = torch.arange(8, dtype=torch.float32)
    backend.reduce_scatter(scattered[4 * rank : 4 * (rank + 1)], scattered)
    assert torch.equal(scattered[4 * rank : 4 * (rank + 1)], torch.arange(4 * rank, 4 * rank + 4.0) * 2)
    chunks = [torch.full((4,), float(10 * rank + j)) for j in range(2)]  # the list forms in place
    backend.reduce_scatter(chunks[rank], chunks)
    assert torch.equal(chunks[rank], torch.full((4,), 10.0 + 2 * rank))
    mine = torch.full((4,), float(rank))
    blocks = [mine if j == rank else torch.empty(4) for j in range(2)]
    backend.all_gather(blocks, mine)
    assert [b.tolist() for b in blocks] == [[0.0] * 4, [1.0] * 4]
    backend.destroy()
    return len(cases)


def test_bad_inputs_raise_typed_errors_and_leave_group_working() -> None:
    counts = run_ranks(_bad_inputs, 2, timeout=60)
    assert counts[0] == counts[1] > 20


def _missing_peer(rank: int, world_size: int, port: int, done_path: str) -> dict[str, float]:
    backend = CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=20)
    backend.timeout = 1.5
    timings: dict[str, float] = {}
    if rank == 1:  # alive but absent (a closed connection would be another error) until rank 0 is done
        deadline = time.monotonic() + 120
        while not os.path.exists(done_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return timings
    try:  # each wait below is bounded although rank 1 never takes part
        start = time.monotonic()
        expect(lambda: backend.all_reduce(torch.ones(4)), CommTimeoutError, ErrorCode.COMM_TIMEOUT, "1.5s")
        timings["all_reduce"] = time.monotonic() - start
        start = time.monotonic()
        work = backend.broadcast(torch.ones(4), src=1, async_op=True)
        assert not work.is_completed()
        expect(lambda: work.wait(timeout=0.5), CommTimeoutError, ErrorCode.COMM_TIMEOUT, "broadcast")
        timings["async_wait"] = time.monotonic() - start
        start = time.monotonic()
        err = expect(lambda: backend.barrier(timeout=1.0), CommTimeoutError, ErrorCode.COMM_TIMEOUT, "barrier")
        assert err.details.get("missing_ranks") == [1], err.details
        assert "ranks [1] did not arrive" in str(err)
        timings["barrier"] = time.monotonic() - start
    finally:
        open(done_path, "w").close()
    return timings


def test_missing_peer_gives_comm_timeout_in_bounded_time(tmp_path) -> None:
    """Each wait lasts at least its timeout and ends well before the init timeout of 20 s it would
    otherwise fall back to (the upper bounds leave room for a loaded machine)."""
    timings = run_ranks(_missing_peer, 2, str(tmp_path / "rank0-done"), timeout=120)[0]
    assert 0.9 <= timings["barrier"] < 12, timings
    assert 1.4 <= timings["all_reduce"] < 12, timings
    assert 0.4 <= timings["async_wait"] < 12, timings


def _sub_millisecond_waits(rank: int, world_size: int, port: int, done_path: str) -> dict[str, float]:
    backend = CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=20)
    timings: dict[str, float] = {}
    if rank == 1:  # alive but absent until rank 0 is done
        deadline = time.monotonic() + 120
        while not os.path.exists(done_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return timings
    try:
        work = backend.broadcast(torch.ones(4), src=1, async_op=True)
        start = time.monotonic()
        expect(lambda: work.wait(timeout=0.0005), CommTimeoutError, ErrorCode.COMM_TIMEOUT, "broadcast")
        timings["async_wait"] = time.monotonic() - start
        start = time.monotonic()
        expect(lambda: backend.barrier(timeout=1e-6), CommTimeoutError, ErrorCode.COMM_TIMEOUT, "barrier")
        timings["barrier"] = time.monotonic() - start
    finally:
        open(done_path, "w").close()
    return timings


def test_a_timeout_under_a_millisecond_is_kept_not_read_as_none(tmp_path) -> None:
    """torch counts timeouts in whole milliseconds: a shorter one must not become 0 ms ("no timeout" to
    Work.wait), which waited for the process group's timeout of 20 s instead."""
    timings = run_ranks(_sub_millisecond_waits, 2, str(tmp_path / "rank0-done"), timeout=120)[0]
    assert timings["async_wait"] < 10, timings
    assert timings["barrier"] < 10, timings


_LONE_RANK = """
import json, sys, time
from sagellm_comm import CommBackend, CommError
rank, port, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
kwargs = {} if timeout == "default" else {"timeout": float(timeout)}
backend = CommBackend.create("gloo")
start = time.monotonic()
try:
    backend.init(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, **kwargs)
except CommError as exc:
    print(json.dumps({"elapsed": time.monotonic() - start, "code": exc.code.value, "message": str(exc),
                      "initialized": backend.is_initialized}))
"""


@pytest.mark.parametrize(
    ("rank", "timeout"),
    [
        (0, 3.0),  # the host of the store, waiting for a worker that never comes
        (1, 3.0),  # a worker whose rank 0 never starts
        pytest.param(1, None, marks=pytest.mark.slow),  # the same with the default timeout (30 s)
    ],
)
def test_rendezvous_timeout_when_a_rank_never_starts(rank: int, timeout: float | None) -> None:
    """Every rank gives up within its timeout plus a small margin, says so truly, and prints no C++ stack."""
    from sagellm_comm.backend import DEFAULT_TIMEOUT_S

    limit = DEFAULT_TIMEOUT_S if timeout is None else timeout
    for _attempt in range(3):
        # A lone rank 1 needs an address where nothing accepts a connection: a socket bound there and held,
        # never listening.  A lone rank 0 binds the store itself: the socket is closed first, and the rare
        # port taken in between is retried (the bind fails at once; nothing else is reached).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
            held.bind(("127.0.0.1", 0))
            port = held.getsockname()[1]
            if rank == 0:
                held.close()
            seen, stderr = _lone_rank(rank, port, timeout, limit)
        if rank == 1 or "address already in use" not in seen["message"].lower():
            break
    assert seen["code"] == "comm_timeout", seen
    assert limit - 0.2 <= seen["elapsed"] < limit + 2.5, seen
    assert f"{limit:g}s" in seen["message"] and f"127.0.0.1:{port}" in seen["message"], seen
    assert not seen["initialized"]
    for trace in ("Exception raised from", "frame #"):
        assert trace not in stderr, stderr[-3000:]


def _lone_rank(rank: int, port: int, timeout: float | None, limit: float) -> tuple[dict, str]:
    launcher = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run(
        [sys.executable, "-c", _LONE_RANK, str(rank), str(port), "default" if timeout is None else str(timeout)],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=limit + 60,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


class _Server:
    """A port of 127.0.0.1 this process listens on; each connection goes to :meth:`_accepted` (in a thread)."""

    def __init__(self):
        import threading

        self.held: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class _Listener(_Server):
    """Something other than a rendezvous store on a port of 127.0.0.1, held (and served) by this process.

    ``silent``: accepts and never reads or answers (a stopped process); ``close``: accepts and closes at once;
    ``half-open``: accepts and shuts its sending side, keeping the connection; ``garbage``: answers bytes that
    are not the store's protocol.
    """

    def __init__(self, mode: str):
        self.mode = mode
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        if self.mode == "close":
            conn.close()
            return
        if self.mode == "half-open":
            conn.shutdown(socket.SHUT_WR)
        elif self.mode == "garbage":
            conn.sendall(b"\xff" * 64)
        self.held.append(conn)


def _stale_store(earlier_world: bool):
    """A real store nobody of this world hosts: a launcher's store that outlived its world, with (or without)
    the keys an earlier world of two ranks left in it."""
    from datetime import timedelta

    store = torch.distributed.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=60),
                                       wait_for_workers=False)  # fmt: skip
    if earlier_world:
        for rank in (0, 1):
            store.add(f"sagellm_comm/inits/rank{rank}", 1)
            store.set(f"sagellm_comm/1/arrived/{rank}", "1")
    return store


def test_helpers_of_failed_rendezvous_are_kept_only_while_they_run(monkeypatch):
    """A join attempt that outlives its deadline leaves its helper thread to be ended at exit; a helper that ends
    later is dropped, so a process whose rendezvous fails again and again does not keep one entry per failure."""
    import threading

    from sagellm_comm.backends.torch_distributed import rendezvous

    releases: list[threading.Event] = []

    def store_that_hangs(*args, **kwargs):  # a handshake that never ends until released
        releases.append(threading.Event())
        releases[-1].wait(30)
        raise RuntimeError("released")

    monkeypatch.setattr(rendezvous.dist, "TCPStore", store_that_hangs)
    monkeypatch.setattr(rendezvous, "_ATTEMPT_SLACK_S", 0.01)
    monkeypatch.setattr(rendezvous, "_LEFT_BEHIND", [])
    with socket.socket() as unused:  # a port nobody connects to: no socket of this process is shut down
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    helpers = []
    for _ in range(20):
        store, _error, stuck = rendezvous._join_once("127.0.0.1", port, 0.01)
        assert store is None and stuck
        helpers.append(rendezvous._LEFT_BEHIND[-1][0])
        releases[-1].set()  # this helper ends after its attempt was given up
        helpers[-1].join(5)
    assert not any(helper.is_alive() for helper in helpers)
    assert len(rendezvous._LEFT_BEHIND) == 1  # the last one, not yet seen to end
    assert rendezvous._left_behind() == [] and rendezvous._LEFT_BEHIND == []


def test_the_exit_ends_a_helper_whose_handshake_is_retried_after_the_deadline(monkeypatch):
    """torch retries a failed handshake after a back-off sleep until its own timeout, which may run out after the
    rank's deadline: a helper asleep when its attempt was given up connects again and blocks in a new handshake.
    The exit ends it too (one whose torch call returns while the interpreter finalises aborts the process:
    "terminate called without an active exception")."""
    from sagellm_comm.backends.torch_distributed import rendezvous

    def store_that_retries(host, port, world_size, is_master, timeout):  # torch's connect/validate loop, in short
        deadline = time.monotonic() + timeout.total_seconds()
        first = True
        while True:
            with socket.create_connection((host, port)) as conn:
                if not first:  # the first handshake fails at once; the next waits for an answer
                    conn.recv(1)
            first = False
            if time.monotonic() > deadline:
                raise RuntimeError("timed out")
            time.sleep(0.3)  # the back-off: the attempt is given up meanwhile

    monkeypatch.setattr(rendezvous.dist, "TCPStore", store_that_retries)
    monkeypatch.setattr(rendezvous, "_ATTEMPT_SLACK_S", 0.05)
    monkeypatch.setattr(rendezvous, "_LEFT_BEHIND", [])
    silent = _Listener("silent")
    try:
        store, _error, stuck = rendezvous._join_once("127.0.0.1", silent.port, 0.1)
        assert store is None and stuck
        helper = rendezvous._LEFT_BEHIND[-1][0]
        rendezvous._end_left_behind()
        assert not helper.is_alive(), "a helper still runs as the interpreter finalises"
    finally:
        silent.close()  # ends a helper left blocked in its handshake


def test_init_keeps_its_deadline_whatever_sits_on_the_port():
    """A listener that accepts and never answers held init past any timeout; a half-open or closing one, or one
    answering garbage, took twice the timeout; a stale store handed out a dead world's addresses.  Every rank
    must get comm_timeout within its timeout + 2 s (measured in the rank, from its init call), and exit."""
    timeout = 3.0
    holders = {mode: _Listener(mode) for mode in ("silent", "close", "half-open", "garbage")}
    stores = {"stale store": _stale_store(False), "stale store of an earlier world": _stale_store(True)}
    cases = [(1, mode, h.port) for mode, h in holders.items()] + [(1, m, s.port) for m, s in stores.items()]
    cases.append((0, "rank 0, the port held by a silent listener", holders["silent"].port))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                           "TORCHELASTIC_USE_AGENT_STORE")}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LONE_RANK, str(rank), str(port), str(timeout)],
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, _, port in cases
    ]
    try:
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        for holder in holders.values():
            holder.close()
    for (_, what, port), proc, (stdout, stderr) in zip(cases, procs, outputs, strict=True):
        assert proc.returncode == 0 and stdout.strip(), (what, stderr[-3000:])
        seen = json.loads(stdout.strip().splitlines()[-1])
        assert seen["code"] == "comm_timeout", (what, seen)
        assert timeout - 0.2 <= seen["elapsed"] < timeout + 2.0, (what, seen)
        assert f"{timeout:g}s" in seen["message"] and f"127.0.0.1:{port}" in seen["message"], (what, seen)
        assert not seen["initialized"], (what, seen)


class _SilencingRelay(_Server):
    """A real store behind a relay on a port of 127.0.0.1 that passes bytes both ways until ``silent`` is set,
    then swallows them and keeps every connection open: a store whose host stopped answering (stopped or hung,
    its host or the network to it down) after a rank joined it.

    ``silence_when``: asked before each request is passed on to the store (one at a time); once it returns True
    the relay falls silent with that request, so a condition on the store's state catches the next request after
    it became true, however the threads are scheduled."""

    def __init__(self, store_port: int, silence_when: Callable[[], bool] | None = None):
        import threading

        self.store_port = store_port
        self.silent = threading.Event()
        self.silence_when = silence_when
        self._asking = threading.Lock()
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        import threading

        upstream = socket.create_connection(("127.0.0.1", self.store_port))
        self.held += [conn, upstream]
        for source, sink, request in ((conn, upstream, True), (upstream, conn, False)):
            threading.Thread(target=self._pass, args=(source, sink, request), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    return
                if request and self.silence_when is not None and not self.silent.is_set():
                    with self._asking:
                        if self.silence_when():
                            self.silent.set()
                if not self.silent.is_set():
                    sink.sendall(data)
            except OSError:
                return


def _two_ranks_behind(relay: _SilencingRelay, script: str, timeout: float, **popen) -> list[subprocess.Popen]:
    """Ranks 0 and 1 running ``script`` (argv: rank, port, timeout) with the relay's port as the launcher's store."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(relay.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"})  # fmt: skip
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), str(relay.port), str(timeout)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )  # fmt: skip
        for rank in (0, 1)
    ]


def test_init_keeps_its_deadline_when_the_store_falls_silent():
    """A store that answered the rank's join and its arrival, then fell silent, held init forever: torch waits for
    the end of a timed-out wait (and for a check's or an add's reply) with no bound.  The rank gets comm_timeout
    within its timeout + 2 s saying that the store stopped answering."""
    timeout = 3.0
    store = _stale_store(False)
    # Silent from the first request after rank 1's arrival
    relay = _SilencingRelay(store.port, silence_when=lambda: store.check(["sagellm_comm/1/arrived/1"]))
    try:
        seen, _ = _lone_rank(1, relay.port, timeout, limit=timeout)
    finally:
        relay.silent.set()
        relay.close()
    assert seen["code"] == "comm_timeout", seen
    assert timeout - 0.2 <= seen["elapsed"] < timeout + 2.0, seen
    assert f"127.0.0.1:{relay.port}: the store stopped answering" in seen["message"], seen
    assert f"{timeout:g}s" in seen["message"] and not seen["initialized"], seen


def test_init_process_group_keeps_a_deadline_when_the_store_falls_silent():
    """Both ranks arrived, then the store fell silent while torch set up the process group: torch's own timeout
    did not end it (its store wait waits forever for the end of a timed-out wait).  A rank caught by the silence
    gets comm_timeout once twice its timeout + 1 s have passed since the set-up began, saying that the store
    stopped answering; every rank exits."""

    timeout = 2.0
    store = _stale_store(False)
    arrived = store.num_keys() + 4  # each rank's count of inits, and its arrival
    # Silent from the first request after torch's process group wrote its first key: the ranks exchange their
    # addresses through the store after that, so at least one of them is caught.
    relay = _SilencingRelay(store.port, silence_when=lambda: store.num_keys() > arrived)
    procs = _two_ranks_behind(relay, _LONE_RANK, timeout)
    try:
        outputs = [proc.communicate(timeout=40) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        relay.silent.set()
        relay.close()
    assert relay.silent.is_set()
    reports = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        if stdout.strip():  # else its set-up had read every reply before the silence: it initialised
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert reports, "no rank was caught by the silence"
    for seen in reports:
        assert seen["code"] == "comm_timeout", seen
        # its wait for the other rank's arrival (the timeout at most), then the cut: twice the timeout + 1 s
        assert seen["elapsed"] < 3 * timeout + 6.0, seen
        assert f"127.0.0.1:{relay.port}: the store stopped answering" in seen["message"], seen
        assert f"configured timeout is {timeout:g}s" in seen["message"] and not seen["initialized"], seen


_NEW_GROUP_RANK = """
import json, sys, time
from sagellm_comm import CommBackend, CommError
rank, port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
backend = CommBackend.create("gloo")
backend.init(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, timeout=timeout)
print("initialised", flush=True)
sys.stdin.readline()  # the store falls silent meanwhile
start = time.monotonic()
try:
    backend.new_group([0, 1])
    print(json.dumps({"code": None}))
except CommError as exc:
    print(json.dumps({"elapsed": time.monotonic() - start, "code": exc.code.value, "message": str(exc)}))
"""


def test_new_group_keeps_a_deadline_when_the_store_falls_silent():
    """A sub-group is made over the store: one that fell silent after init held new_group forever on every rank
    (torch's timeout did not end it).  Every rank gets comm_timeout once twice its timeout + 1 s have passed,
    saying that the store stopped answering."""
    timeout = 2.0
    store = _stale_store(False)
    relay = _SilencingRelay(store.port)
    procs = _two_ranks_behind(relay, _NEW_GROUP_RANK, timeout, stdin=subprocess.PIPE)
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "initialised"
        relay.silent.set()
        for proc in procs:  # both at once: new_group first compares the members over Gloo
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=40) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        relay.close()
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and stdout.strip(), stderr[-3000:]
        seen = json.loads(stdout.strip().splitlines()[-1])
        assert seen["code"] == "comm_timeout", seen
        assert 2 * timeout <= seen["elapsed"] < 2 * timeout + 3.0, seen
        assert f"new_group([0, 1]) at 127.0.0.1:{relay.port}: the store stopped answering" in seen["message"], seen


def test_undo_after_failure_runs_every_step_and_logs_what_raises(caplog):
    """The release after a failed operation: every step runs, each one that raises is logged (not raised), so the
    error the caller goes on to raise is the operation's own."""
    import logging

    from sagellm_comm.errors import P2PFailedError, undo_after_failure

    ran: list[int] = []

    def step(n: int, fails: bool):
        def run() -> None:
            ran.append(n)
            if fails:
                raise P2PFailedError(f"step {n} could not release")

        return run

    with caplog.at_level(logging.WARNING, logger="sagellm_comm.test"):
        undo_after_failure(
            [step(0, True), step(1, False), step(2, True)], logging.getLogger("sagellm_comm.test"), "undoing the set-up"
        )
    assert ran == [0, 1, 2]
    assert caplog.text.count("undoing the set-up: P2PFailedError") == 2
    assert "step 0 could not release" in caplog.text and "step 2 could not release" in caplog.text


def test_every_error_the_library_raises_is_exported_at_the_top_level() -> None:
    """A caller catches what the library raises without importing sagellm_comm.errors: every error class is public."""
    import inspect

    import sagellm_comm
    from sagellm_comm import errors

    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.CommError) and value.__module__ == errors.__name__
    }
    assert defined - set(sagellm_comm.__all__) == set()
    for name in defined:
        assert getattr(sagellm_comm, name) is getattr(errors, name)
