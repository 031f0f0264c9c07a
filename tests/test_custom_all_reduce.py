"""Custom all-reduce on the CPU: the Triton kernels under the interpreter, ranks as processes.

Each rank is a process; the workspace regions are shared files mapped by every rank (the CPU stand-in for
CUDA IPC), so the kernels' pointer tables, flags and epochs work exactly as on GPUs.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from tests.conftest import NAN_BITS, exchange_objects, join_gloo, run_ranks

INTERP = {"TRITON_INTERPRET": "1"}
SLOT_BYTES = 16384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Rounding of one final conversion from the fp32 sum (the interpreter truncates instead of rounding).
RTOL = {"float32": 1e-6, "bfloat16": 2**-7, "float16": 2**-10}


def _setup(rank: int, world_size: int, port: int, slot_bytes: int = SLOT_BYTES, timeout_s: float = 60.0, memory=None):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    ws = SymmetricWorkspace.rendezvous(
        rank, world_size, slot_bytes, "cpu", exchange_objects, max_programs=3, memory=memory
    )
    return CustomAllReduce(ws, timeout_s=timeout_s)


def _recording_memory():
    """Shared-file regions that remember which of them were freed (``freed``)."""
    from sagellm_comm.ipc import SharedFileMemory

    class Recording(SharedFileMemory):
        def __init__(self):
            super().__init__()
            self.freed: list[int] = []

        def free(self, ptr: int) -> None:
            self.freed.append(ptr)
            super().free(ptr)

    return Recording()


def _inputs(case: int, world_size: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * case + numel)
    return [(torch.randn(numel, generator=g) * 4).to(dtype) for _ in range(world_size)]


def _matrix_worker(rank, world_size, port, cases):
    car = _setup(rank, world_size, port)
    results = []
    for i, (algo, numel, dtype_name, mode) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        ins = _inputs(i, world_size, numel, dtype)
        if mode == "zero_copy":
            x = car.get_buffer(numel, dtype)
            x.copy_(ins[rank])
            out = car.all_reduce(x, algo=algo)
            assert out.data_ptr() == x.data_ptr()
        elif mode == "out_of_place":
            x = ins[rank].clone()
            target = torch.full((numel,), float("nan"), dtype=dtype)
            out = car.all_reduce(x, out=target, algo=algo)
            assert out is target
            assert torch.equal(x, ins[rank]), "out-of-place call modified its input"
        else:
            x = ins[rank].clone()
            out = car.all_reduce(x, algo=algo)
            assert out is x
        car.check_errors()
        ref = torch.zeros(numel, dtype=torch.float32)
        for t in ins:  # fp32, rank order: what every rank must compute
            ref += t.float()
        torch.testing.assert_close(
            out.float(),
            ref.to(dtype).float(),
            rtol=RTOL[dtype_name],
            atol=1e-6,
            msg=lambda m, c=(algo, numel): f"{c}: {m}",
        )
        results.append(hashlib.sha256(out.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    car.close()
    return results


def _matrix(world_size: int) -> list[tuple]:
    max_bf16 = SLOT_BYTES // 2
    max_fp32 = SLOT_BYTES // 4
    cases = []
    for algo in ("one_shot", "two_shot", "lamport"):
        for numel, dtype in [
            (1, "bfloat16"),
            (7, "float32"),
            (1001, "bfloat16"),
            (4096, "float16"),
            (max_bf16, "bfloat16"),
            (max_fp32, "float32"),
            (world_size * 3 + 1, "float32"),
        ]:
            cases.append((algo, numel, dtype, "copy"))
        cases.append((algo, 513, "float32", "out_of_place"))
        cases.append((algo, 2049, "bfloat16", "zero_copy"))
        cases.append((algo, max_bf16, "bfloat16", "zero_copy"))
    return cases  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_kernels_match_reference_and_ranks_agree(world_size):
    cases = _matrix(world_size)
    per_rank = run_ranks(_matrix_worker, world_size, cases, env=INTERP, timeout=540)
    for r in range(1, world_size):
        assert per_rank[r] == per_rank[0], f"rank {r} differs bitwise from rank 0"


def _back_to_back_worker(rank, world_size, port, calls):
    car = _setup(rank, world_size, port)
    for i in range(calls):
        algo = ("one_shot", "two_shot", "lamport")[i % 3]
        numel = 97 + 61 * (i % 5)
        x = torch.full((numel,), float(i + rank), dtype=torch.float32)
        car.all_reduce(x, algo=algo)
        expected = world_size * i + world_size * (world_size - 1) / 2
        assert torch.all(x == expected), f"call {i} ({algo}, {numel}): got {x[:4]}, expected {expected}"
    from sagellm_comm.kernels.lamport_all_reduce import LAMPORT_STATE

    # program 0's Lamport call counter (every program keeps its own; all run every call)
    epochs = (int(car.workspace.control[0]), int(car.workspace.control[LAMPORT_STATE.value]))
    car.close()
    return epochs


def test_back_to_back_calls_reuse_buffers_safely():
    # Alternating algorithms and sizes: slot parity and flag epochs must stay consistent across calls.
    # (flag-protocol calls, Lamport calls) as counted by the kernels themselves
    epochs = run_ranks(_back_to_back_worker, 2, 60, env=INTERP, timeout=540)
    assert epochs == [(40, 20), (40, 20)]


def _missing_peer_worker(rank, world_size, port, algo):
    import time

    import torch.distributed as dist

    from sagellm_comm.errors import CommTimeoutError, ErrorCode

    car = _setup(rank, world_size, port, timeout_s=0.5)
    if rank == 1:  # never calls all_reduce
        dist.barrier()
        return None
    x = torch.ones(100)
    t0 = time.monotonic()
    car.all_reduce(x, algo=algo)
    elapsed = time.monotonic() - t0
    with pytest.raises(CommTimeoutError) as info:
        car.check_errors()
    assert info.value.code == ErrorCode.COMM_TIMEOUT
    assert "peer rank 1 never arrived" in str(info.value)
    assert info.value.details["peer"] == 1
    with pytest.raises(CommTimeoutError):  # the workspace stays failed: the next call raises at once
        car.all_reduce(torch.ones(100))
    dist.barrier()
    return elapsed


@pytest.mark.parametrize("algo", ["one_shot", "lamport"])
def test_missing_rank_times_out_with_named_peer(algo):
    elapsed = run_ranks(_missing_peer_worker, 2, algo, env=INTERP, timeout=300)[0]
    assert elapsed < 120


def _bad_input_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError, WorkspaceExhaustedError

    car = _setup(rank, world_size, port)
    cases = {
        "dtype": (torch.ones(8, dtype=torch.int32), "supports bfloat16, float16 and float32"),
        "contiguous": (torch.ones(8, 2)[:, 0], "contiguous"),
        "device": (torch.ones(8, device="meta"), "is on meta"),
    }
    messages = {}
    for name, (tensor, needle) in cases.items():
        with pytest.raises(InvalidArgumentError) as info:
            car.all_reduce(tensor)
        assert needle in str(info.value), str(info.value)
        messages[name] = str(info.value)
    with pytest.raises(WorkspaceExhaustedError, match="exceeds the custom all-reduce workspace"):
        car.all_reduce(torch.ones(SLOT_BYTES // 4 + 1), algo="one_shot")
    with pytest.raises(InvalidArgumentError, match="out must be"):
        car.all_reduce(torch.ones(8), out=torch.ones(9))
    with pytest.raises(InvalidArgumentError, match="algo must be"):
        car.all_reduce(torch.ones(8), algo="ring")
    # Not tensors (were AttributeErrors): the all-reduce, its FP8 payload, out=, all-gather and reduce-scatter.
    from sagellm_comm.gather_scatter import all_gather, reduce_scatter

    for call, what in (
        (lambda: car.all_reduce([1.0] * 8), "tensor"),
        (lambda: car.all_reduce([1.0] * 8, payload="fp8"), "tensor"),
        (lambda: car.all_reduce(torch.ones(8), out=[0.0] * 8), "out"),
        (lambda: all_gather(car, [1.0] * 8, torch.ones(16)), "tensor"),
        (lambda: reduce_scatter(car, torch.ones(16), None), "out"),
    ):
        with pytest.raises(InvalidArgumentError, match=rf"\] {what} must be a torch.Tensor, got (list|NoneType)$"):
            call()
    # An out that overlaps the input in part: the kernels would sum elements an earlier tile overwrote.
    buf = torch.arange(3001, dtype=torch.float32)
    before = buf.clone()
    for algo in ("one_shot", "two_shot", "lamport"):
        for x, out in ((buf[:3000], buf[1:]), (buf[1:], buf[:3000])):
            with pytest.raises(InvalidArgumentError, match="out overlaps tensor"):
                car.all_reduce(x, out=out, algo=algo)
    with pytest.raises(InvalidArgumentError, match="out overlaps tensor"):
        car.all_reduce(buf[:3000], out=buf[1:], algo="two_shot", payload="fp8")
    assert torch.equal(buf, before), "a refused call changed its tensor"
    same = torch.full((40,), float(rank + 1))
    assert car.all_reduce(same, out=same.view(4, 10)).data_ptr() == same.data_ptr()  # its own memory: in place
    assert torch.all(same == 3.0)
    # Nothing was corrupted: a valid call still works on both ranks afterwards.
    x = torch.full((33,), float(rank + 1))
    car.all_reduce(x, algo="two_shot")
    assert torch.all(x == 3.0)
    car.close()
    return messages


def test_bad_input_gives_typed_errors_and_corrupts_nothing():
    run_ranks(_bad_input_worker, 2, env=INTERP, timeout=300)


def _cycles_worker(rank, world_size, port, cycles):
    import glob

    from sagellm_comm.workspace import SymmetricWorkspace

    car = _setup(rank, world_size, port)
    car.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    files_before = len(glob.glob(f"/dev/shm/sagellm-comm-{os.getpid()}-*"))
    for _ in range(cycles):
        ws = SymmetricWorkspace.rendezvous(rank, world_size, 4096, "cpu", exchange_objects)
        ws.close()
    return (
        len(os.listdir("/proc/self/fd")) - fds_before,
        len(glob.glob(f"/dev/shm/sagellm-comm-{os.getpid()}-*")) - files_before,
    )


def test_create_destroy_cycles_leak_nothing():
    leaks = run_ranks(_cycles_worker, 2, 1000, env=INTERP, timeout=540)
    assert leaks == [(0, 0), (0, 0)]


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import BackendNotSupportedError
    from sagellm_comm.workspace import SymmetricWorkspace

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ws = SymmetricWorkspace(0, 2, 4096, [0, 0], "cpu")
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        CustomAllReduce(ws)


def test_a_bad_algo_or_buffer_count_is_a_typed_error_before_anything_runs(monkeypatch):
    """``algo`` is checked on every call, an empty tensor's too (it was returned as if summed), and one that cannot
    be a key (a list) is an InvalidArgumentError, not a TypeError; ``get_buffer`` takes a count that is an int >= 0
    (-1 gave an empty buffer, 2.5 a TypeError, True one element)."""
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    workspaces = local_workspaces(2, 4096, "cpu")
    car = CustomAllReduce(workspaces[0])
    try:
        for algo in ("ring", ["one_shot"], "hierarchical"):
            for numel in (0, 4):
                x = torch.ones(numel)
                with pytest.raises(InvalidArgumentError, match="algo must be one of"):
                    car.all_reduce(x, algo=algo)
                assert torch.equal(x, torch.ones(numel))
        for numel in (-1, 2.5, True):
            with pytest.raises(InvalidArgumentError, match="numel must be"):
                car.get_buffer(numel, torch.float32)
        assert car.get_buffer(0, torch.float32).numel() == 0
    finally:
        for ws in workspaces:
            ws.close()


def test_workspace_rejects_bad_world_sizes():
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import SymmetricWorkspace

    for ws, rank in ((1, 0), (9, 0), (2, 2), (2, -1)):
        with pytest.raises(InvalidArgumentError):
            SymmetricWorkspace(rank, ws, 4096, [0] * ws, "cpu")


def test_a_workspace_refused_after_its_rendezvous_releases_its_regions():
    """A rendezvous that mapped the regions and then could not make the workspace (a world of one, no memory for
    its tables) frees this rank's region and unmaps the peers' before raising."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import SymmetricWorkspace

    memory = _recording_memory()
    with pytest.raises(InvalidArgumentError, match="2..8 ranks"):
        SymmetricWorkspace.rendezvous(0, 1, 4096, "cpu", lambda obj: [obj], memory=memory)
    assert len(memory.freed) == 1 and not memory._maps


def test_a_failed_rendezvous_frees_its_region_when_an_unmap_fails_too():
    """A rendezvous that fails after mapping peers (a peer it cannot map)
    unmaps every peer and frees this rank's region even when an unmap raises, and raises its own error; so does
    close(), which then raises the unmap's error.  One
    process stands for every rank (its exchange answers for the peers, which map this rank's own file)."""
    from sagellm_comm.errors import P2PFailedError
    from sagellm_comm.ipc import SharedFileMemory
    from sagellm_comm.workspace import SymmetricWorkspace

    class FailingUnmap(SharedFileMemory):
        def __init__(self, opens: int):
            super().__init__()
            self.opens, self.closed, self.freed = opens, [], []

        def open(self, handle, nbytes):
            if self.opens == 0:
                raise P2PFailedError("cannot map the peer's region")
            self.opens -= 1
            return super().open(handle, nbytes)

        def close(self, ptr: int) -> None:
            self.closed.append(ptr)
            super().close(ptr)
            raise RuntimeError("cudaIpcCloseMemHandle failed")

        def free(self, ptr: int) -> None:
            self.freed.append(ptr)
            super().free(ptr)

    def every(world_size):
        return lambda obj: [obj] * world_size

    memory = FailingUnmap(opens=2)  # maps two peers, then fails on the third
    with pytest.raises(P2PFailedError, match="cannot map"):
        SymmetricWorkspace.rendezvous(0, 4, 4096, "cpu", every(4), memory=memory)
    assert len(memory.closed) == 2 and len(memory.freed) == 1
    memory = FailingUnmap(opens=2)  # close(): every peer is unmapped and the region freed, then the error raised
    ws = SymmetricWorkspace.rendezvous(0, 3, 4096, "cpu", every(3), memory=memory)
    with pytest.raises(RuntimeError, match="cudaIpcCloseMemHandle"):
        ws.close()
    assert ws.closed and len(memory.closed) == 2 and len(memory.freed) == 1


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("max_programs", 2.5, "an int"),
        ("max_programs", 4.0, "an int"),
        ("max_programs", "4", "an int"),
        ("max_programs", 0, "in 1..128"),
        ("processes_on_device", 1.5, "an int"),
        ("processes_on_device", 0, ">= 1"),
    ],
)
def test_rendezvous_refuses_a_count_that_is_not_a_positive_int_before_allocating(name, value, accepted):
    """A program or process count is an integer: 2.5 is refused by name, not truncated to 2, and before this
    rank allocates its region or exchanges anything with its peers."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import SymmetricWorkspace

    memory = _recording_memory()
    exchanged = []

    def exchange(obj):
        exchanged.append(obj)
        return [obj, obj]

    with pytest.raises(InvalidArgumentError, match=f"^\\[invalid_argument\\] {name} must be {accepted}, got"):
        SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", exchange, memory=memory, **{name: value})
    assert not exchanged and not memory.freed


def test_workspace_refuses_a_share_of_the_device_that_is_not_a_positive_int():
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import SymmetricWorkspace

    for value in (1.5, 0):
        with pytest.raises(InvalidArgumentError, match="ranks_on_device must be"):
            SymmetricWorkspace(0, 2, 4096, [0, 0], "cpu", ranks_on_device=value)


def test_a_cuda_region_that_cannot_be_zeroed_is_freed(monkeypatch):
    """``CudaIpcMemory.allocate`` raises P2PFailedError when zeroing the new region fails (an asynchronous error
    reported by the memset or the synchronisation), and frees the region first: it was never handed out."""
    import sys
    import types

    from sagellm_comm.errors import P2PFailedError
    from sagellm_comm.ipc import CudaIpcMemory

    freed = []

    class Runtime:  # CuPy's runtime where the memset of the new region fails
        def malloc(self, nbytes):
            return 0x1000

        def memset(self, ptr, value, nbytes):
            raise RuntimeError("cudaErrorLaunchFailure")

        def free(self, ptr):
            freed.append(ptr)

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime, cuda.Device = Runtime(), Device
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    memory = CudaIpcMemory(torch.device("cuda", 0))
    with pytest.raises(P2PFailedError, match="cudaErrorLaunchFailure"):
        memory.allocate(4096)
    assert freed == [0x1000]


def _buffer_after_close_worker(rank, world_size, port):
    import gc

    from sagellm_comm.errors import NotInitializedError
    from sagellm_comm.workspace import SymmetricWorkspace

    memory = _recording_memory()
    car = _setup(rank, world_size, port, timeout_s=30.0, memory=memory)
    ws = car.workspace
    buf = car.get_buffer(64, torch.float32)
    buf.fill_(rank + 1)
    car.all_reduce(buf, algo="one_shot")
    summed = buf.tolist()
    exchange_objects(None)  # every rank's call is done before any region goes
    if rank == 1:  # nothing holds rank 1's region: close() frees it
        del buf
        gc.collect()  # the interpreter's launch left the tensor in a reference cycle
    ws.close()
    freed_at_close = len(memory.freed)
    if rank == 0:  # the buffer outlives the workspace as plain memory of this process
        buf.fill_(7.0)
        kept = bool(torch.all(buf == 7.0))
        with pytest.raises(NotInitializedError):
            car.all_reduce(buf)
        del buf
        gc.collect()
    else:
        kept = None
    freed = len(memory.freed)
    dropped = SymmetricWorkspace.rendezvous(rank, world_size, 4096, "cpu", exchange_objects, memory=memory)
    del dropped  # never closed: its region stays (a free at collection could land in a graph capture)
    gc.collect()
    return summed, freed_at_close, freed, kept, len(memory.freed) - freed


def test_a_buffer_from_get_buffer_keeps_its_region_past_close():
    """A get_buffer() tensor still held when its workspace closes stays valid memory (the region is freed when the
    tensor goes, not under it); a workspace whose buffers are gone frees its region at close(); one never closed
    frees nothing when it is collected."""
    (sum0, at_close0, after0, kept, dropped0), (sum1, at_close1, after1, _, dropped1) = run_ranks(
        _buffer_after_close_worker, 2, env=INTERP, timeout=120
    )
    assert sum0 == sum1 == [3.0] * 64
    assert (at_close0, after0, kept) == (0, 1, True)
    assert (at_close1, after1) == (1, 1)
    assert dropped0 == dropped1 == 0


def test_a_region_whose_last_buffer_goes_during_a_graph_capture_is_freed_after_it():
    """Freeing device memory inside a CUDA-graph capture invalidates the capture: a region whose last get_buffer()
    tensor goes while the memory reports a capture is queued, and freed by free_deferred_regions() once the capture
    is over, or by the next workspace's rendezvous or close().  One process stands for both ranks (its exchange
    answers for the peer, which maps this rank's own file)."""
    import gc

    from sagellm_comm.ipc import SharedFileMemory
    from sagellm_comm.workspace import SymmetricWorkspace, free_deferred_regions

    class Capturing(SharedFileMemory):
        def __init__(self):
            super().__init__()
            self.freed: list[int] = []
            self.capture = False

        def capturing(self) -> bool:
            return self.capture

        def free(self, ptr: int) -> None:
            self.freed.append(ptr)
            super().free(ptr)

    def twice(obj):
        return [obj, obj]

    memory = Capturing()

    def workspace():
        return SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", twice, memory=memory)

    def close_and_drop_buffer_in_a_capture(ws):
        buf = ws.registered_tensor(16, torch.float32)
        ws.close()
        memory.capture = True
        del buf
        gc.collect()
        memory.capture = False

    try:
        ws = workspace()
        buf = ws.registered_tensor(16, torch.float32)
        ws.close()
        memory.capture = True
        del buf
        gc.collect()
        assert memory.freed == [], "a region was freed during a graph capture"
        assert free_deferred_regions() == 0 and memory.freed == []  # still capturing: stays queued
        memory.capture = False
        assert free_deferred_regions() == 1 and len(memory.freed) == 1
        assert free_deferred_regions() == 0 and len(memory.freed) == 1

        close_and_drop_buffer_in_a_capture(workspace())
        fresh = workspace()  # its rendezvous frees the queued region
        assert len(memory.freed) == 2
        fresh.close()
        assert len(memory.freed) == 3

        other = workspace()
        close_and_drop_buffer_in_a_capture(workspace())
        other.close()  # its own region and the queued one
        assert len(memory.freed) == 5 and free_deferred_regions() == 0
    finally:
        memory.capture = False
        free_deferred_regions()


def _failing_closer_worker(rank, world_size, port):
    memory = _recording_memory()
    car = _setup(rank, world_size, port, timeout_s=30.0, memory=memory)
    ws = car.workspace
    ran = []

    def failing():
        raise RuntimeError("the GEMM workspace could not synchronise")

    car.close_with(lambda: ran.append("first"))
    car.close_with(failing)
    with pytest.raises(RuntimeError, match="could not synchronise"):
        car.close()
    return ran, ws.closed, len(memory.freed)


def test_a_closer_that_raises_still_closes_the_workspace():
    """A resource closed with the all-reduce (close_with) that raises does not keep the others or the workspace:
    every closer runs, the region is freed, and the first error reaches the caller."""
    assert run_ranks(_failing_closer_worker, 2, env=INTERP, timeout=120) == [(["first"], True, 1)] * 2


def _one_rank_fails_worker(rank, world_size, port, step):
    import glob

    from sagellm_comm.errors import CommError, UnavailableError
    from sagellm_comm.ipc import SharedFileMemory
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)

    class Failing(SharedFileMemory):  # the last rank: no shared memory left, or a peer's region it cannot map
        def allocate(self, nbytes):
            if step == "allocate":
                raise UnavailableError("cannot reserve shared memory")
            return super().allocate(nbytes)

        def open(self, handle, nbytes):
            if step == "open":
                raise RuntimeError("mapping refused")
            return super().open(handle, nbytes)

    memory = Failing() if rank == world_size - 1 else SharedFileMemory()
    try:
        SymmetricWorkspace.rendezvous(rank, world_size, 4096, "cpu", exchange_objects, memory=memory)
        raised = "nothing"
    except CommError as exc:
        raised = f"{type(exc).__name__}: {exc}"
    after = exchange_objects(rank)  # every rank left the rendezvous in the same round
    return raised, after, glob.glob(f"/dev/shm/sagellm-comm-{os.getpid()}-*"), len(memory._maps)


@pytest.mark.parametrize("step", ["allocate", "open"])
def test_a_rendezvous_failing_on_one_rank_raises_on_every_rank_and_keeps_nothing(step):
    """A rank whose own part of the workspace rendezvous fails (no memory for its region, a peer's region it cannot
    map) still answers its round: every rank raises a typed error naming it, none is left waiting in a later round
    or reading the failure as a peer's handle, and no region, mapping or file stays behind."""
    results = run_ranks(_one_rank_fails_worker, 3, step, env=INTERP, timeout=120)
    for rank, (raised, after, files, maps) in enumerate(results):
        assert after == [0, 1, 2] and files == [] and maps == 0, results[rank]
        if rank == 2:
            kind = "UnavailableError" if step == "allocate" else "P2PFailedError"
            assert raised.startswith(kind), raised
        else:
            assert raised.startswith("P2PFailedError") and "rank 2" in raised, raised


def _sentinel_nan_worker(rank, world_size, port):
    car = _setup(rank, world_size, port, timeout_s=20.0)
    results = {}
    for dtype, bits_dtype, sentinel in (
        (torch.bfloat16, torch.int16, -1),  # 0xFFFF: a bf16 NaN with the Lamport sentinel's bit pattern
        (torch.float32, torch.int32, -1),  # 0xFFFFFFFF
    ):
        x = torch.full((37,), float(rank + 1), dtype=dtype)
        x.view(bits_dtype)[5] = sentinel  # real data that looks like "not arrived yet" unless canonicalised
        x[9] = float("nan")
        car.all_reduce(x, algo="lamport")
        car.check_errors()  # a sentinel pushed as data would leave the peer polling until the timeout
        results[str(dtype)] = (bool(torch.isnan(x[5])), bool(torch.isnan(x[9])), x[0].item(), x[36].item())
    car.close()
    return results


def test_lamport_nan_inputs_with_the_sentinel_bit_pattern_arrive():
    per_rank = run_ranks(_sentinel_nan_worker, 2, env=INTERP, timeout=300)
    for res in per_rank:
        for dtype_name, (nan5, nan9, first, last) in res.items():
            assert nan5 and nan9, f"{dtype_name}: NaN inputs must give NaN sums"
            assert first == last == 3.0, f"{dtype_name}: other elements must be summed (got {first}, {last})"


def _signed(bits: int, width: int) -> int:
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


def _nan_inputs(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Per NaN pattern ``p`` three elements: ``p`` on rank 0 only, on rank 1 only, and ``p`` on rank 0 with the
    first pattern of the opposite sign on rank 1; then one finite element.  Rank ``r``'s other elements are
    ``r + 1``."""
    bits_dtype, patterns = NAN_BITS[dtype]
    width = torch.iinfo(bits_dtype).bits
    x = torch.full((3 * len(patterns) + 1,), float(rank + 1), dtype=dtype)
    view = x.view(bits_dtype)
    for i, pattern in enumerate(patterns):
        other = patterns[1] if pattern >> (width - 1) == 0 else patterns[0]
        mine = {0: (pattern, None, pattern), 1: (None, pattern, other)}[rank]
        for j, bits in enumerate(mine):
            if bits is not None:
                view[3 * i + j] = _signed(bits, width)
    return x


def _nan_bits_worker(rank, world_size, port):
    car = _setup(rank, world_size, port, timeout_s=20.0)
    results = {}
    for dtype, (bits_dtype, _patterns) in NAN_BITS.items():
        mask = (1 << torch.iinfo(bits_dtype).bits) - 1
        for algo in ("one_shot", "two_shot", "lamport"):
            x = _nan_inputs(rank, dtype)
            car.all_reduce(x, algo=algo)
            car.check_errors()
            results[(str(dtype), algo)] = [b & mask for b in x.view(bits_dtype).tolist()]
    car.close()
    return results


def test_nan_bits_agree_across_ranks_and_algorithms():
    """A NaN in any rank's input gives a NaN, the same bits on every rank, with every algorithm.  Under the
    interpreter the adds keep the first NaN operand's sign and payload (quieted), as torch's fp32 adds on the CPU
    do, and Lamport carries every NaN bit for bit as one-shot and two-shot read it, except an all-ones element:
    its sentinel, which arrives with the lowest bit cleared (docs/protocol.md)."""
    per_rank = run_ranks(_nan_bits_worker, 2, env=INTERP, timeout=300)
    assert per_rank[0] == per_rank[1], "ranks disagree"
    for dtype, (bits_dtype, patterns) in NAN_BITS.items():
        got = {algo: per_rank[0][(str(dtype), algo)] for algo in ("one_shot", "two_shot", "lamport")}
        one_shot = got["one_shot"]
        width = torch.iinfo(bits_dtype).bits
        as_float = torch.tensor([_signed(b, width) for b in one_shot], dtype=bits_dtype).view(dtype).float()
        assert bool(torch.all(torch.isnan(as_float[:-1]))) and as_float[-1].item() == 3.0, (dtype, one_shot)
        assert got["two_shot"] == one_shot, (dtype, got)
        sentinel = patterns[-1]
        expected_lamport = [b - 1 if b == sentinel else b for b in one_shot]
        assert got["lamport"] == expected_lamport, (dtype, [hex(b) for b in got["lamport"]], [hex(b) for b in one_shot])
        if dtype == torch.float32:  # torch's own sum on this CPU, where one rank holds a NaN (where both do, its
            # vectorised add may return either operand's)
            reference = [
                b & 0xFFFFFFFF for b in (_nan_inputs(0, dtype) + _nan_inputs(1, dtype)).view(torch.int32).tolist()
            ]
            one_nan = [k for k in range(len(one_shot)) if k % 3 != 2]
            assert [one_shot[k] for k in one_nan] == [reference[k] for k in one_nan]


def test_two_shot_chunks_are_aligned_and_cover_the_message():
    from sagellm_comm.kernels.all_reduce import CHUNK_ALIGN, two_shot_chunk

    for world_size in (2, 3, 4, 5, 8):
        for numel in (1, 7, 8, 9, 100, 1001, 4096, 65_537, 1 << 20):
            chunk = two_shot_chunk(numel, world_size)
            assert chunk % CHUNK_ALIGN.value == 0  # every chunk starts on a 16-byte boundary (bf16)
            assert chunk * world_size >= numel  # the W chunks cover the message
            assert chunk - CHUNK_ALIGN.value < -(-numel // world_size)  # and are no larger than needed


def test_default_program_count(monkeypatch):
    from sagellm_comm import custom_all_reduce as car_mod
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.kernels.all_reduce import MAX_BLOCKS

    assert car_mod.default_max_programs(torch.device("cpu")) == car_mod.DEFAULT_MAX_PROGRAMS

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda", 0)
    assert car_mod.default_max_programs(cuda) == MAX_BLOCKS.value  # one per SM, capped by the flag layout
    assert car_mod.default_max_programs(cuda, ranks_on_device=2) == 66  # ranks sharing a GPU divide its SMs
    assert car_mod.default_max_programs(cuda, ranks_on_device=8) == 16
    assert car_mod.default_max_programs(cuda, override=24) == 24  # CommConfig.max_programs
    with pytest.raises(InvalidArgumentError, match="max_programs must be in 1..128"):
        car_mod.default_max_programs(cuda, override=100000)


def test_programmatic_dependent_launch_choice(monkeypatch):
    from sagellm_comm import custom_all_reduce as car_mod
    from sagellm_comm.config import CommConfig
    from sagellm_comm.errors import BackendNotSupportedError

    auto, off, on = CommConfig(), CommConfig(pdl=False), CommConfig(pdl=True)
    assert car_mod.pdl_enabled(torch.device("cpu"), auto) is False  # the interpreter has no griddepcontrol
    cuda = torch.device("cuda", 0)
    for major, expected in ((8, False), (9, True), (10, True)):  # Hopper and later
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, m=major: (m, 0))
        assert car_mod.pdl_enabled(cuda, auto) is expected
    assert car_mod.pdl_enabled(cuda, off) is False
    assert car_mod.pdl_enabled(cuda, on) is True
    assert car_mod.pdl_enabled(torch.device("cpu"), on) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(BackendNotSupportedError, match="SAGELLM_COMM_PDL=1 needs compute capability 9.0"):
        car_mod.pdl_enabled(cuda, on)
    # A launcher on a CPU device never passes PDL to the kernel, whatever it was asked for.
    assert car_mod.AllReduceKernels(2, 1 << 16, 1, False, 0, pdl=True).pdl is False


def test_programmatic_dependent_launch_only_for_a_launch_holding_every_rank_of_its_gpu():
    """Ranks sharing a GPU as separate launches (processes under MPS) get no PDL: a rank's early next launch could
    hold the SMs a slower rank's current launch needs.  One rank per GPU, or all of them in one launch, keep it."""
    from sagellm_comm import custom_all_reduce as car_mod
    from sagellm_comm.selector import LAMPORT

    rule = car_mod.pdl_for_launch
    assert rule(True, 1, 1) is True  # one rank per GPU
    assert rule(True, 4, 4) is True  # four virtual ranks in one launch
    assert rule(True, 1, 4) is False  # one of four processes sharing the GPU
    assert rule(True, 2, 4) is False
    assert rule(False, 1, 1) is False  # off stays off
    # The Lamport launch's constexpr and launch option follow the rule (use_ptx=True: nothing is compiled here).
    for ranks_on_device, virtual, expected in ((1, False, True), (4, False, False), (4, True, True)):
        kernels = car_mod.AllReduceKernels(4, 1 << 16, 1, True, 0, pdl=True, ranks_on_device=ranks_on_device)
        launcher, _, named = kernels.arguments(LAMPORT, 4096, 2, False, 0, 33, virtual, None)
        assert named["PDL"] is expected, (ranks_on_device, virtual)
        assert launcher.options.get("launch_pdl", False) is expected, (ranks_on_device, virtual)


def test_split_rows_launch_without_programmatic_dependent_launch():
    """The fused Lamport kernel's split rows wait for each other inside the launch: such launches never use PDL;
    an unsplit launch follows the plain Lamport kernel's rule; the interpreter never splits a row."""
    from sagellm_comm.fused.rmsnorm import lamport_launch, row_split

    assert row_split(4, 8192, 33) > 1 and row_split(12, 8192, 33) == 1
    assert lamport_launch(4, 8192, 33, True, True, 4, 4) == (row_split(4, 8192, 33), False)  # split: no PDL
    assert lamport_launch(1, 4096, 128, True, True, 1, 1) == (row_split(1, 4096, 128), False)
    assert lamport_launch(12, 8192, 33, True, True, 4, 4) == (1, True)  # unsplit, every rank in the launch
    assert lamport_launch(12, 8192, 33, True, True, 1, 4) == (1, False)  # unsplit, one of four processes
    assert lamport_launch(12, 8192, 33, True, False, 4, 4) == (1, False)  # off stays off
    assert lamport_launch(4, 8192, 33, False, True, 4, 4) == (1, True)  # interpreter: one program a row


class _NoStream:
    """A stand-in CUDA stream (the virtual ranks' streams, made on the CPU here)."""

    def wait_stream(self, other) -> None:
        pass


def _bad_rank_call(case: str, numel: int) -> tuple[object, object]:
    """``(tensor, out)`` of a rank's call that the custom all-reduce refuses, the same count and dtype as its peers'."""
    if case == "not a tensor":
        return [1.0] * numel, None
    if case == "not contiguous":
        return torch.ones(2, numel // 2).t(), None
    if case == "on another device":
        return torch.ones(numel, device="meta"), None
    if case == "out of another dtype":
        return torch.ones(numel), torch.empty(numel, dtype=torch.float16)
    base = torch.ones(numel + numel // 2)  # "out overlapping the tensor"
    return base[:numel], base[numel // 2 :]


@pytest.mark.parametrize(
    "case", ["not a tensor", "not contiguous", "on another device", "out of another dtype", "out overlapping"]
)
@pytest.mark.parametrize("bad_rank", [0, 2])
def test_virtual_ranks_refuse_any_ranks_bad_call_before_a_rank_launches(monkeypatch, case, bad_rank):
    """VirtualRankGroup.all_reduce checks every rank's call (CustomAllReduce.check_call) before it launches any: a
    call that the last rank refuses was refused after the ranks before it had launched, and they waited for it until
    the timeout (their workspaces latched).  Now nothing is launched, the typed error is raised, and the next good
    call launches every rank.  (The group needs CUDA: made here without its constructor, over the interpreter's CPU
    workspaces, the streams stood in for and every kernel launch recorded instead of run.)"""
    import contextlib

    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.virtual import VirtualRankGroup
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world_size, numel = 3, 16
    workspaces = local_workspaces(world_size, 4096, "cpu")
    group = object.__new__(VirtualRankGroup)
    group.world_size, group.device, group.workspaces = world_size, torch.device("cpu"), workspaces
    group.ranks = [CustomAllReduce(ws, timeout_s=1.0) for ws in workspaces]
    group.streams = [_NoStream() for _ in range(world_size)]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    launched: list[int] = []
    for car in group.ranks:
        monkeypatch.setattr(car.kernels, "launch", lambda *args, _rank=car.rank, **kwargs: launched.append(_rank))
    try:
        tensors = [torch.ones(numel) for _ in range(world_size)]
        outs = [torch.empty(numel) for _ in range(world_size)]
        tensors[bad_rank], outs[bad_rank] = _bad_rank_call(case, numel)
        with pytest.raises(InvalidArgumentError):
            group.all_reduce(tensors, outs=None if outs[bad_rank] is None else outs)
        assert launched == []
        assert not any(ws.error_view[0] for ws in workspaces)
        group.all_reduce([torch.ones(numel) for _ in range(world_size)])
        assert launched == list(range(world_size))
    finally:
        for car in group.ranks:
            car.close()


def test_virtual_workspaces_share_one_device():
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(4, 4096, "cpu")
    try:
        assert [ws.ranks_on_device for ws in workspaces] == [4, 4, 4, 4]
    finally:
        for ws in workspaces:
            ws.close()


def test_messages_past_the_kernels_int32_offsets_run_on_the_engine_or_are_refused(monkeypatch):
    """The kernels index elements in int32: a message over MAX_KERNEL_ELEMENTS (a workspace of up to 1 TiB takes one)
    runs on the engine with algo='auto' (rule over-int32-index) and is refused by a kernel named for it.  Sizes only:
    nothing that large is allocated."""
    from sagellm_comm.custom_all_reduce import MAX_KERNEL_ELEMENTS, CustomAllReduce
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ws, other = local_workspaces(2, 4096, "cpu")
    car = CustomAllReduce(ws, timeout_s=1.0, fallback=lambda t: t)
    try:
        monkeypatch.setattr(ws, "slot_bytes", 1 << 40)  # SAGELLM_COMM_CUSTOM_MAX_BYTES's largest workspace
        big, fits = MAX_KERNEL_ELEMENTS + 1, MAX_KERNEL_ELEMENTS
        sel = car.select(big * 2, 2)
        assert (sel.algo, sel.rule_id) == ("nccl", "over-int32-index") and str(MAX_KERNEL_ELEMENTS) in sel.reason
        assert car.select(fits * 2, 2).algo != "nccl"
        assert car.resolve_algo("auto", big, big * 2) == "nccl"
        for algo in ("one_shot", "two_shot"):
            assert car.resolve_algo(algo, fits, fits * 2) == algo
            with pytest.raises(InvalidArgumentError, match=str(MAX_KERNEL_ELEMENTS)):
                car.resolve_algo(algo, big, big * 2)
        huge = torch.empty(1).expand(big)  # numel() of a message that size, one element of memory
        assert car.check_payload(huge, "auto", "fp8") == "nccl"
        with pytest.raises(InvalidArgumentError, match=str(MAX_KERNEL_ELEMENTS)):
            car.check_payload(huge, "two_shot", "fp8")
    finally:
        car.close()
        other.close()


def test_virtual_ranks_refuse_a_launch_past_int32_row_offsets(monkeypatch):
    """One launch serves every virtual rank and offsets row ``rank`` by ``rank * numel`` in int32: a stacked call of
    world_size * numel >= 2**31 elements is refused before anything is launched (meta tensors: no memory)."""
    from sagellm_comm.custom_all_reduce import INT32_INDEX_LIMIT, CustomAllReduce, check_virtual_elements
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.virtual import VirtualRankGroup
    from sagellm_comm.workspace import local_workspaces

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world_size = 8
    workspaces = local_workspaces(world_size, 4096, "cpu")
    group = object.__new__(VirtualRankGroup)
    group.world_size, group.device, group.workspaces = world_size, torch.device("meta"), workspaces
    group.ranks = [CustomAllReduce(ws, timeout_s=1.0) for ws in workspaces]
    launched: list[str] = []
    monkeypatch.setattr(group, "launch_stacked", lambda algo, *args, **kwargs: launched.append(algo))
    try:
        numel = INT32_INDEX_LIMIT // world_size  # 8 ranks x 512 MiB of bf16
        for payload in (None, "fp8"):
            with pytest.raises(InvalidArgumentError, match="int32"):
                group.all_reduce_stacked(torch.empty((world_size, numel), device="meta"), payload=payload)
        assert launched == []
        check_virtual_elements(world_size, numel - 1)
        with pytest.raises(InvalidArgumentError):
            check_virtual_elements(2, INT32_INDEX_LIMIT // 2)
    finally:
        for car in group.ranks:
            car.close()
