"""CommBackend over Gloo on several processes: every operation against references computed here."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from conftest import HAS_CUDA, join_gloo, run_ranks

from sagellm_comm.backend import CommBackend, ReduceOp, Work, get_comm_backend
from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError, RankMismatchError

SIZES = (1, 7, 64, 1031)  # one element, odd, power of two, odd and larger than a page of floats
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64)
FLOAT_OPS = (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.PRODUCT)
INT_OPS = (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.PRODUCT, ReduceOp.BAND, ReduceOp.BOR)


def make_input(rank: int, numel: int, dtype: torch.dtype, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    """Rank-specific input that any process can rebuild: the reference recomputes every rank's."""
    gen = torch.Generator().manual_seed(1000 * rank + numel)
    if op is ReduceOp.PRODUCT:  # keep products of up to 4 ranks exact / in range
        values = torch.randint(1, 3, (numel,), generator=gen) * (1 - 2 * torch.randint(0, 2, (numel,), generator=gen))
    elif op.is_bitwise:
        values = torch.randint(0, 256, (numel,), generator=gen)
    elif dtype.is_floating_point:
        return (torch.randn(numel, generator=gen, dtype=torch.float64) * 4).to(dtype)
    else:
        values = torch.randint(-50, 50, (numel,), generator=gen)
    return values.to(dtype)


def reference(op: ReduceOp, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The reduction of ``inputs`` computed with plain torch ops (float64 / int64 accumulation)."""
    dtype = inputs[0].dtype
    wide = torch.stack([x.to(torch.float64 if dtype.is_floating_point else torch.int64) for x in inputs])
    if op is ReduceOp.SUM:
        out = wide.sum(0)
    elif op is ReduceOp.AVG:
        out = wide.sum(0) / len(inputs)
    elif op is ReduceOp.MAX:
        out = wide.max(0).values
    elif op is ReduceOp.MIN:
        out = wide.min(0).values
    elif op is ReduceOp.PRODUCT:
        out = wide.prod(0)
    else:
        out = wide[0].clone()
        for x in wide[1:]:
            out = {ReduceOp.BAND: out & x, ReduceOp.BOR: out | x, ReduceOp.BXOR: out ^ x}[op]
    return out.to(dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}
    rtol = tol.get(want.dtype, 0.0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 4, msg=lambda m: f"{what}: {m}")


def _finish(result, async_op: bool):
    if async_op:
        assert isinstance(result, Work), f"async_op=True returned {type(result).__name__}"
        value = result.wait()
        assert result.is_completed()
        return value
    return result


def _every_op(rank: int, world_size: int, port: int) -> int:
    backend = get_comm_backend("gloo").init(
        rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=30
    )
    assert (backend.name, backend.rank, backend.world_size) == ("gloo", rank, world_size)
    assert backend.device == torch.device("cpu") and backend.is_initialized
    checks = 0
    for dtype in DTYPES:
        ops = FLOAT_OPS if dtype.is_floating_point else INT_OPS
        for numel in SIZES:
            for op in ops:
                for async_op in (False, True):
                    tensor = make_input(rank, numel, dtype, op)
                    out = _finish(backend.all_reduce(tensor, op, async_op=async_op), async_op)
                    assert out is tensor  # in place
                    want = reference(op, [make_input(r, numel, dtype, op) for r in range(world_size)])
                    assert_matches(tensor, want, f"all_reduce {op.name} {dtype} n={numel} async={async_op}")
                    checks += 1

            mine = make_input(rank, numel, dtype)
            everyone = [make_input(r, numel, dtype) for r in range(world_size)]
            for async_op in (False, True):
                # all_gather: list and flat-tensor outputs
                outs = [torch.full((numel,), -7, dtype=dtype) for _ in range(world_size)]
                _finish(backend.all_gather(outs, mine, async_op=async_op), async_op)
                for r in range(world_size):
                    assert torch.equal(outs[r], everyone[r]), f"all_gather list rank {r} {dtype} n={numel}"
                flat = torch.empty(world_size * numel, dtype=dtype)
                _finish(backend.all_gather(flat, mine, async_op=async_op), async_op)
                assert torch.equal(flat, torch.cat(everyone)), f"all_gather tensor {dtype} n={numel}"

                # reduce_scatter: rank r keeps chunk r of the reduction of every rank's input
                chunks = [make_input(rank * 7 + c, numel, dtype) for c in range(world_size)]
                out = torch.empty(numel, dtype=dtype)
                _finish(backend.reduce_scatter(out, chunks, async_op=async_op), async_op)
                want = reference(ReduceOp.SUM, [make_input(r * 7 + rank, numel, dtype) for r in range(world_size)])
                assert_matches(out, want, f"reduce_scatter list {dtype} n={numel}")
                op = ReduceOp.AVG if dtype.is_floating_point else ReduceOp.MAX
                out2 = torch.empty(numel, dtype=dtype)
                _finish(backend.reduce_scatter(out2, torch.cat(chunks), op=op, async_op=async_op), async_op)
                want = reference(op, [make_input(r * 7 + rank, numel, dtype) for r in range(world_size)])
                assert_matches(out2, want, f"reduce_scatter tensor {op.name} {dtype} n={numel}")

                # broadcast from every source rank
                for src in range(world_size):
                    tensor = mine.clone()
                    _finish(backend.broadcast(tensor, src=src, async_op=async_op), async_op)
                    assert torch.equal(tensor, everyone[src]), f"broadcast src={src} {dtype} n={numel}"

                # all_to_all: rank i sends block j to rank j
                blocks_in = [make_input(rank * 31 + j, numel, dtype) for j in range(world_size)]
                blocks_out = [torch.empty(numel, dtype=dtype) for _ in range(world_size)]
                _finish(backend.all_to_all(blocks_out, blocks_in, async_op=async_op), async_op)
                for i in range(world_size):
                    assert torch.equal(blocks_out[i], make_input(i * 31 + rank, numel, dtype)), "all_to_all list"
                single_out = torch.empty(world_size * numel, dtype=dtype)
                _finish(backend.all_to_all(single_out, torch.cat(blocks_in), async_op=async_op), async_op)
                want = torch.cat([make_input(i * 31 + rank, numel, dtype) for i in range(world_size)])
                assert torch.equal(single_out, want), f"all_to_all single {dtype} n={numel}"

                # send/recv around the ring
                right, left = (rank + 1) % world_size, (rank - 1) % world_size
                sent = backend.send(mine, dst=right, async_op=True)
                got = torch.empty(numel, dtype=dtype)
                _finish(backend.recv(got, src=left, async_op=async_op), async_op)
                sent.wait()
                assert torch.equal(got, everyone[left]), f"send/recv from {left} {dtype} n={numel}"
                checks += 7
    # blocking send/recv in a fixed order (even ranks send first) and the barrier
    payload = torch.arange(5, dtype=torch.float32) + rank
    partner = rank ^ 1
    if partner < world_size:
        got = torch.empty(5)
        if rank % 2 == 0:
            assert backend.send(payload, dst=partner) is None
            backend.recv(got, src=partner)
        else:
            backend.recv(got, src=partner)
            backend.send(payload, dst=partner)
        assert torch.equal(got, torch.arange(5, dtype=torch.float32) + partner)
    # all_to_all with a different size for every peer: rank i sends j+1 rows to rank j
    uneven_in = [torch.full((j + 1, 2), float(rank * 10 + j)) for j in range(world_size)]
    uneven_out = [torch.empty(rank + 1, 2) for _ in range(world_size)]
    backend.all_to_all(uneven_out, uneven_in)
    for i in range(world_size):
        assert torch.equal(uneven_out[i], torch.full((rank + 1, 2), float(i * 10 + rank))), "uneven all_to_all"
    backend.barrier()
    backend.destroy()
    assert not backend.is_initialized
    return checks


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_operation_matches_torch_reference(world_size: int) -> None:
    checks = run_ranks(_every_op, world_size, timeout=150)
    expected = sum(
        len(SIZES) * (2 * len(FLOAT_OPS if dtype.is_floating_point else INT_OPS) + 2 * 7) for dtype in DTYPES
    )
    assert checks == [expected] * world_size


def test_create_gloo_and_context_manager_single_rank() -> None:
    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        tensor = torch.arange(6, dtype=torch.float32)
        assert backend.all_reduce(tensor, "avg") is tensor
        assert torch.equal(tensor, torch.arange(6, dtype=torch.float32))
    assert not backend.is_initialized
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------- HCCL / RCCL adapter wiring


def _gloo_creator(store, rank, world_size, timeout):
    """Stand-in for a vendor process group: torch registers it under the vendor's name."""
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)


def _hccl_standin(rank: int, world_size: int, port: int) -> list[int]:
    import sys
    import types

    set_device_calls: list[int] = []
    fake = types.ModuleType("torch_npu")  # what `import torch_npu` gives on an Ascend machine
    fake.npu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, set_device=set_device_calls.append
    )
    sys.modules["torch_npu"] = fake
    with pytest.raises(BackendNotSupportedError, match="register the 'hccl' process-group backend"):
        CommBackend.create("hccl")
    torch.distributed.Backend.register_backend("hccl", _gloo_creator, devices=["cpu"])
    backend = CommBackend.create("hccl", device="cpu").init(rank=rank, world_size=world_size, master_port=port)
    assert backend.name == "hccl" and torch.distributed.get_backend() == "hccl"
    x = torch.full((5,), float(rank + 1))
    backend.all_reduce(x, ReduceOp.AVG)  # HCCL path: SUM on the engine, then the adapter divides
    assert torch.equal(x, torch.full((5,), (world_size + 1) / 2))
    with pytest.raises(InvalidArgumentError, match="BAND is not supported by hccl"):
        backend.all_reduce(torch.ones(2, dtype=torch.int32), ReduceOp.BAND)
    sub = backend.new_group([0])
    if rank == 0:
        y = torch.ones(3)
        assert torch.equal(backend.all_reduce(y, group=sub), torch.ones(3))
    backend.destroy()
    return set_device_calls


def _rccl_standin(rank: int, world_size: int, port: int) -> str:
    import dataclasses

    import torch.distributed as dist

    from sagellm_comm.backend import resolve_kind, unregister_comm_backend
    from sagellm_comm.backends import torch_distributed as td

    torch.version.hip = "6.2.0"  # pretend this is a ROCm build with one AMD GPU
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    dist.is_nccl_available = lambda: True
    with pytest.raises(BackendNotSupportedError, match="ROCm build: use 'rccl'"):
        CommBackend.create("nccl")
    unregister_comm_backend("custom")  # compare the torch engines only: rccl must beat gloo
    auto = resolve_kind("auto")
    # torch names RCCL "nccl"; on this CPU build route that name to a Gloo stand-in
    dist.Backend.register_backend("rccl_standin", _gloo_creator, devices=["cpu"])
    td.ENGINES["rccl"] = dataclasses.replace(td.ENGINES["rccl"], torch_backend="rccl_standin")
    backend = get_comm_backend("rccl", device="cpu").init(rank=rank, world_size=world_size, master_port=port)
    assert backend.name == "rccl" and dist.get_backend() == "rccl_standin"
    x = torch.arange(4, dtype=torch.float64) * (rank + 1)
    backend.all_reduce(x, "avg")  # RCCL path: native AVG on the engine
    torch.testing.assert_close(x, torch.arange(4, dtype=torch.float64) * (world_size + 1) / 2)
    backend.destroy()
    return auto


def test_hccl_adapter_runs_on_registered_standin() -> None:
    assert run_ranks(_hccl_standin, 2, timeout=60) == [[], []]  # explicit device: no set_device


def test_rccl_adapter_runs_on_registered_standin_and_auto_prefers_it() -> None:
    assert run_ranks(_rccl_standin, 2, timeout=60) == ["rccl", "rccl"]


# ---------------------------------------------------------------------- ownership and environment


def _ownership(rank: int, world_size: int, port: int) -> None:
    import os

    import torch.distributed as dist

    # 1. torchrun env only (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the helper), left untouched
    before = dict(os.environ)
    with CommBackend.create("gloo").init() as backend:
        assert (backend.rank, backend.world_size) == (rank, world_size)
        assert torch.equal(backend.all_reduce(torch.ones(2)), torch.full((2,), 2.0))
    assert not dist.is_initialized()
    assert dict(os.environ) == before

    # 2. a default group the caller made is adopted, and survives destroy()
    join_gloo(rank, world_size, port)
    backend = CommBackend.create("gloo").init()
    sub = backend.new_group([0, 1])
    backend.all_reduce(torch.ones(1), group=sub)
    with pytest.raises(RankMismatchError, match="already initialised as rank"):
        CommBackend.create("gloo").init(rank=rank, world_size=world_size + 1)
    backend.destroy()
    assert dist.is_initialized()
    x = torch.ones(3)
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((3,), 2.0))
    dist.destroy_process_group()


def test_env_init_no_env_writes_and_caller_owned_world_survives_destroy() -> None:
    run_ranks(_ownership, 2, timeout=90)


def test_explicit_address_beats_the_environment(monkeypatch) -> None:
    from sagellm_comm.backends.torch_distributed.rendezvous import store_address

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert store_address(2, "127.0.0.1", 29500) == ("127.0.0.1", 29500)
    assert store_address(2, None, 29500) == ("10.0.0.1", 29500)
    assert store_address(2, None, None) == ("10.0.0.1", 29400)
    monkeypatch.delenv("MASTER_ADDR")
    assert store_address(2, None, None) == ("127.0.0.1", 29400)
    monkeypatch.delenv("MASTER_PORT")
    assert store_address(1, None, None) is None  # a world of one needs no address
    with pytest.raises(InvalidArgumentError, match="MASTER_PORT"):
        store_address(2, None, None)


def _under_torchrun_agent_store(rank: int, world_size: int, port: int) -> list[float]:
    with CommBackend.create("gloo").init() as backend:  # torchrun's variables only
        x = torch.full((3,), float(rank + 1))
        return backend.all_reduce(x).tolist()


def test_torchrun_agent_store_init_prints_no_bind_error(capfd) -> None:
    """Under torchrun the agent already hosts the store at MASTER_PORT: every rank joins it as a client.

    Were rank 0 to try to host a store on the agent's port, torch would log an error-level
    "TCPStore ... failed to bind" line (then ignore it because TORCHELASTIC_USE_AGENT_STORE is set).
    """
    from sagellm_comm.backends.torch_distributed.rendezvous import host_store

    agent = host_store("127.0.0.1", timeout=30)  # what torchrun's agent runs before it starts the workers
    env = {"MASTER_PORT": str(agent.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert run_ranks(_under_torchrun_agent_store, 2, env=env, timeout=90) == [[3.0, 3.0, 3.0]] * 2
    err = capfd.readouterr().err
    assert "failed to bind" not in err, err[-2000:]
    assert agent.num_keys() > 0  # the ranks did meet on the agent's store
    del agent


def _worlds_one_after_another(rank: int, world_size: int, port: int) -> list[float]:
    """Three worlds in a row on the launcher's store; rank 1 comes late to each new one, so rank 0 would read
    the address rank 1 left there for the previous world if the worlds shared their keys."""
    sums = []
    for world in range(3):
        if rank == 1 and world:
            time.sleep(1.0)
        with CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=60) as b:
            sums.append(b.all_reduce(torch.full((2,), float(world + rank))).tolist()[0])
    return sums


def test_successive_worlds_on_a_launcher_store_do_not_read_each_others_keys() -> None:
    assert run_ranks(_worlds_one_after_another, 2, timeout=240) == [[1.0, 3.0, 5.0]] * 2


def _auto_on_unlike_ranks(rank: int, world_size: int, port: int) -> tuple:
    """``"auto"`` is resolved on each rank: rank 0 can run the custom kernels (under the interpreter), rank 1
    cannot, so each picks another kind for the one world."""
    import os

    import sagellm_comm
    from sagellm_comm.errors import ConfigMismatchError

    if rank == 1:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        world = sagellm_comm.init(backend="auto", rank=rank, world_size=world_size, master_port=port, timeout=20)
    except ConfigMismatchError as exc:
        return ("refused", str(exc), exc.details["settings"])
    name = world.backend.name
    sagellm_comm.destroy()
    return ("ran", name)


def test_ranks_whose_backend_kinds_differ_are_refused_at_init() -> None:
    """Two kinds on one world would pair one kind's set-up exchanges or collectives with the other's (a wait until
    the timeout, or wrong results): every rank's init refuses it, naming each rank's kind."""
    outcomes = run_ranks(_auto_on_unlike_ranks, 2, env={"TRITON_INTERPRET": "1"}, timeout=120)
    for outcome in outcomes:
        assert outcome[0] == "refused", outcomes
        message, settings = outcome[1], outcome[2]
        assert settings == {"the backend kind": {"custom": [0], "gloo": [1]}}, settings
        assert "custom on ranks [0]" in message and "gloo on ranks [1]" in message, message


# ---------------------------------------------------------------------- registry: a backend in one file


class LoopbackBackend(CommBackend):
    """A third-party backend for a world of one: every collective is the identity."""

    kind = "loopback"

    def __init__(self, **kwargs):
        self._up = False

    def init(self, rank=None, world_size=None, master_addr=None, master_port=None, timeout=30.0, **kwargs):
        if (rank or 0, world_size or 1) != (0, 1):
            raise RankMismatchError("loopback runs a world of one")
        self._up = True
        return self

    def destroy(self):
        self._up = False

    name = property(lambda self: "loopback")
    rank = property(lambda self: 0)
    world_size = property(lambda self: 1)
    device = property(lambda self: torch.device("cpu"))
    is_initialized = property(lambda self: self._up)
    cpu_group = property(lambda self: None)

    def new_group(self, ranks):
        from sagellm_comm.backend import GroupHandle

        return GroupHandle(tuple(ranks), 0)

    def _done(self, value, async_op):
        from sagellm_comm.backend import CompletedWork

        return CompletedWork(value) if async_op else value

    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        return self._done(tensor, async_op)

    def all_gather(self, output, tensor, group=None, async_op=False):
        (output[0] if isinstance(output, list) else output).copy_(tensor)
        return self._done(output, async_op)

    def reduce_scatter(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        output.copy_(input[0] if isinstance(input, list) else input)
        return self._done(output, async_op)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        return self._done(tensor, async_op)

    def send(self, tensor, dst, group=None, async_op=False):
        raise RankMismatchError("a world of one has no peer")

    recv = send

    def barrier(self, group=None, timeout=None):
        return None

    def all_to_all(self, output, input, group=None, async_op=False):
        return self.all_gather(output, input[0] if isinstance(input, list) else input, group, async_op)


def test_a_backend_without_release_group_says_so() -> None:
    """``release_group`` is not abstract (a backend written before it still loads); one that does not provide it
    raises a typed error naming itself, and its groups are released by ``destroy()``."""
    from sagellm_comm import CommGroup
    from sagellm_comm.errors import NotImplementedCommError

    backend = LoopbackBackend().init()
    group = CommGroup(backend).new_subgroup([0])
    with pytest.raises(NotImplementedCommError, match="backend 'loopback' cannot release one group; destroy"):
        backend.release_group(group.handle)
    with pytest.raises(NotImplementedCommError, match="cannot release one group"):
        group.destroy()
    backend.destroy()
    group.destroy()  # after destroy(): nothing left to release


def test_third_party_backend_registry(caplog) -> None:
    from sagellm_comm import is_comm_backend_available, list_comm_backends, register_comm_backend
    from sagellm_comm.backend import unregister_comm_backend
    from sagellm_comm.registry import last_auto_choice

    assert {"gloo", "nccl", "rccl", "hccl"} <= set(list_comm_backends())
    assert is_comm_backend_available("gloo") and is_comm_backend_available("nccl") == HAS_CUDA
    baseline = get_comm_backend().name
    assert baseline in (("custom", "nccl") if HAS_CUDA else ("gloo",))
    try:
        register_comm_backend("loopback", LoopbackBackend, priority=1000)
        assert list_comm_backends()[0] == "loopback"
        backend = get_comm_backend("auto").init(rank=0, world_size=1)
        assert isinstance(backend, LoopbackBackend) and backend.name == "loopback"
        out = torch.empty(3)
        assert backend.all_gather(out, torch.arange(3.0), async_op=True).wait() is out
        assert torch.equal(out, torch.arange(3.0))
        with pytest.raises(InvalidArgumentError, match="already registered"):
            register_comm_backend("loopback", LoopbackBackend)
        register_comm_backend("loopback", LoopbackBackend, is_available=lambda: False, priority=1000, replace=True)
        assert not is_comm_backend_available("loopback")
        with caplog.at_level("WARNING", logger="sagellm_comm.registry"):
            fallback = get_comm_backend()  # auto skips what cannot run here, and says why
            assert get_comm_backend().auto_choice == fallback.auto_choice  # the same outcome is logged once
        assert fallback.name == baseline
        assert fallback.auto_choice == last_auto_choice() and fallback.auto_choice.kind == baseline
        assert list(fallback.auto_choice.skipped)[0] == "loopback"
        assert "registered but not available" in fallback.auto_choice.skipped["loopback"]
        logged = [r.getMessage() for r in caplog.records if "loopback" in r.getMessage()]
        assert len(logged) == 1 and f"chose {baseline!r}" in logged[0], logged
        assert CommBackend.create("gloo").auto_choice is None  # a named kind skips nothing
        # An argument of another kind (the custom backend's max_bytes) names the kind, also one auto chose.
        with pytest.raises(
            InvalidArgumentError, match=r"backend 'gloo' cannot be built with the arguments \['max_bytes'\]"
        ):
            CommBackend.create("gloo", max_bytes=1 << 20)
        with pytest.raises(InvalidArgumentError, match=f"'auto' chose {baseline!r}, which cannot be built with"):
            get_comm_backend("auto", no_such_argument=1)
        with pytest.raises(BackendNotSupportedError, match="registered but not available"):
            CommBackend.create("loopback")
        with pytest.raises(InvalidArgumentError, match="reserved"):
            register_comm_backend("auto", LoopbackBackend)
        for bad, words in (({"priority": "high"}, "must be an int"), ({"priority": 2.5}, "must be an int"),
                           ({"is_available": False}, "None or callable")):  # fmt: skip
            with pytest.raises(InvalidArgumentError, match=words):
                register_comm_backend("loopback2", LoopbackBackend, **bad)
        assert "loopback2" not in list_comm_backends()
    finally:
        unregister_comm_backend("loopback")
    assert "loopback" not in list_comm_backends()


def _probe_that_fails() -> bool:
    raise RankMismatchError("the probe asked for a rank it does not have")


def test_auto_skips_a_kind_whose_probe_fails_with_any_error() -> None:
    """An availability probe failing with an error other than BackendNotSupportedError (typed or not) makes its kind
    unavailable, with the reason: "auto" skips it rather than failing."""
    from sagellm_comm import is_comm_backend_available, register_comm_backend
    from sagellm_comm.backend import unregister_comm_backend

    baseline = get_comm_backend().name
    try:
        register_comm_backend("probe-fails", LoopbackBackend, is_available=_probe_that_fails, priority=1000)
        assert not is_comm_backend_available("probe-fails")
        chosen = get_comm_backend()
        assert chosen.name == baseline
        assert (
            "availability check failed ([comm_rank_mismatch] the probe asked for a rank"
            in chosen.auto_choice.skipped["probe-fails"]
        )
        with pytest.raises(BackendNotSupportedError, match="'probe-fails' is not available"):
            CommBackend.create("probe-fails")
    finally:
        unregister_comm_backend("probe-fails")


def _needs_an_address(address: str) -> CommBackend:
    return LoopbackBackend()


def _cannot_connect() -> CommBackend:
    raise OSError("the vendor library found no device")


def test_a_factory_that_cannot_build_its_backend_is_a_typed_error_naming_the_kind() -> None:
    """A third party's factory that needs an argument the call did not give, or that raises, fails as a typed
    error naming the kind (and the failure), not as the factory's own exception."""
    from sagellm_comm import register_comm_backend
    from sagellm_comm.backend import unregister_comm_backend

    try:
        register_comm_backend("needs-address", _needs_an_address)
        register_comm_backend("cannot-connect", _cannot_connect)
        with pytest.raises(
            InvalidArgumentError, match=r"backend 'needs-address' cannot be built with the arguments \[\]"
        ):
            CommBackend.create("needs-address")
        assert isinstance(CommBackend.create("needs-address", address="here"), LoopbackBackend)
        with pytest.raises(
            BackendNotSupportedError, match=r"'cannot-connect' could not be built: .*OSError: the vendor"
        ):
            CommBackend.create("cannot-connect")
    finally:
        unregister_comm_backend("needs-address")
        unregister_comm_backend("cannot-connect")


_FIRST_REGISTRY_CALLS = """
import sagellm_comm as sc
from sagellm_comm.errors import InvalidArgumentError

class Mine(sc.CommBackend):
    pass

try:
    sc.register_comm_backend("gloo", Mine)
    print("gloo taken without replace")
except InvalidArgumentError:
    pass
sc.register_comm_backend("nccl", Mine, replace=True)
sc.unregister_comm_backend("hccl")
from sagellm_comm.registry import _REGISTRY
print("kinds", sc.list_comm_backends(), "nccl is mine", _REGISTRY["nccl"].factory is Mine)
"""


def test_a_registration_made_before_the_registry_is_consulted_holds() -> None:
    """The built-in kinds load when the registry is first consulted; a register or unregister call that comes
    first in a process sees them, and the built-ins never undo it (a fresh process: this one loaded them)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FIRST_REGISTRY_CALLS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "taken without replace" not in done.stdout
    assert "'hccl'" not in done.stdout and "nccl is mine True" in done.stdout, done.stdout


_BROKEN_CUSTOM = """
import importlib.abc, sys
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sagellm_comm.backends.custom":
            raise ImportError("cannot import name 'gone' from 'sagellm_comm.somewhere'", name="sagellm_comm.somewhere")
sys.meta_path.insert(0, Broken())
from sagellm_comm import CommBackend, list_comm_backends
from sagellm_comm.errors import BackendNotSupportedError
print("listed", sorted(list_comm_backends()))
try:
    CommBackend.create("custom")
except BackendNotSupportedError as exc:
    print("refused", exc)
"""


def test_a_built_in_backend_that_fails_to_import_leaves_the_others_usable_and_is_named() -> None:
    """A built-in backend module raising ImportError (a name missing from a broken install, not the module
    absent) is recorded and named when that kind is asked for; listing and the other kinds keep working."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BROKEN_CUSTOM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'gloo'" in done.stdout and "'custom'" not in done.stdout.split("refused")[0], done.stdout
    assert "sagellm_comm.backends.custom failed to import: cannot import name 'gone'" in done.stdout, done.stdout


# ---------------------------------------------------------------------- NCCL on a real GPU


@pytest.mark.gpu
def test_nccl_world_of_one_on_gpu() -> None:
    from sagellm_comm import Topology

    with CommBackend.create("nccl").init(rank=0, world_size=1) as backend:
        assert backend.name == "nccl" and backend.device == torch.device("cuda", 0)
        assert get_comm_backend().name in ("nccl", "custom")  # auto prefers a GPU engine here
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for op in FLOAT_OPS:
                x = make_input(0, 1031, dtype, op).cuda()
                want = x.clone()
                work = backend.all_reduce(x, op, async_op=True)
                work.wait()
                torch.cuda.synchronize()
                assert torch.equal(x, want), f"{op.name} {dtype}"
        x = torch.arange(6.0, device="cuda")
        flat = torch.empty(6, device="cuda")
        backend.all_gather(flat, x)
        out = torch.empty(6, device="cuda")
        backend.reduce_scatter(out, x, op="max")
        backend.broadcast(x, src=0)
        a2a = torch.empty(6, device="cuda")
        backend.all_to_all(a2a, x)
        backend.barrier()
        torch.cuda.synchronize()
        assert torch.equal(flat, x) and torch.equal(out, x) and torch.equal(a2a, x)
        with pytest.raises(InvalidArgumentError, match="needs tensors on cuda:0"):
            backend.all_reduce(torch.ones(2))
        with pytest.raises(InvalidArgumentError, match="BAND is not supported by nccl"):
            backend.all_reduce(torch.ones(2, dtype=torch.int32, device="cuda"), "band")
        topo = Topology.discover(group=backend)
        assert topo.source in ("nvml", "cuda") and topo.num_gpus >= 1 and topo.ranks == [0]
        print(topo.format_matrix())
    assert not torch.distributed.is_initialized()


def test_gloo_refuses_a_cuda_graph_capture_before_enqueuing(monkeypatch):
    """Under capture (simulated here: no GPU) a host-blocking engine raises a typed error and leaves the tensor."""
    from sagellm_comm.backends.torch_distributed import adapter
    from sagellm_comm.errors import BackendNotSupportedError

    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        monkeypatch.setattr(adapter, "capturing", lambda: True)
        x = torch.arange(4.0)
        with pytest.raises(BackendNotSupportedError, match="a CUDA graph cannot capture all_reduce on gloo"):
            backend.all_reduce(x)
        assert torch.equal(x, torch.arange(4.0))
        monkeypatch.setattr(adapter, "capturing", lambda: False)
        backend.all_reduce(x)  # outside a capture the same call runs
        assert torch.equal(x, torch.arange(4.0))


# ---------------------------------------------------------------------- dtypes an engine does not take

GLOO_REFUSED_DTYPES = (torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)


def _every_collective(backend: CommBackend, dtype: torch.dtype) -> dict:
    """One call of every collective (each form) on tensors of ``dtype``, in a world of one."""
    return {
        "all_reduce": lambda: backend.all_reduce(torch.zeros(4, dtype=dtype)),
        "all_gather": lambda: backend.all_gather([torch.zeros(4, dtype=dtype)], torch.zeros(4, dtype=dtype)),
        "all_gather ": lambda: backend.all_gather(torch.zeros(4, dtype=dtype), torch.zeros(4, dtype=dtype)),
        "reduce_scatter": lambda: backend.reduce_scatter(torch.zeros(4, dtype=dtype), [torch.zeros(4, dtype=dtype)]),
        "reduce_scatter ": lambda: backend.reduce_scatter(torch.zeros(4, dtype=dtype), torch.zeros(4, dtype=dtype)),
        "broadcast": lambda: backend.broadcast(torch.zeros(4, dtype=dtype), src=0),
        "all_to_all": lambda: backend.all_to_all([torch.zeros(4, dtype=dtype)], [torch.zeros(4, dtype=dtype)]),
        "all_to_all ": lambda: backend.all_to_all(torch.zeros(4, dtype=dtype), torch.zeros(4, dtype=dtype)),
    }


@pytest.mark.parametrize("dtype", GLOO_REFUSED_DTYPES, ids=str)
def test_gloo_refuses_a_dtype_its_collectives_do_not_take_before_calling_torch(monkeypatch, dtype) -> None:
    from sagellm_comm.backends.torch_distributed import adapter

    def engine_called(*args, **kwargs):
        raise AssertionError("the engine was called")

    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        for name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all_single"):
            monkeypatch.setattr(torch.distributed, name, engine_called)
        monkeypatch.setattr(adapter, "ALL_GATHER_FLAT", engine_called)
        monkeypatch.setattr(adapter, "REDUCE_SCATTER_FLAT", engine_called)
        for what, call in _every_collective(backend, dtype).items():
            with pytest.raises(InvalidArgumentError, match=rf"^\[invalid_argument\] {what.strip()} on gloo") as err:
                call()
            assert str(dtype) in str(err.value), what
            assert err.value.details == {"op": what.strip(), "dtype": str(dtype), "backend": "gloo"}


@pytest.mark.parametrize("dtype", (torch.float16, torch.int8, torch.uint8, torch.bool, torch.complex64), ids=str)
def test_gloo_runs_every_collective_on_the_dtypes_it_takes(dtype) -> None:
    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        for call in _every_collective(backend, dtype).values():
            call()


def test_complex_product_is_refused_before_calling_torch() -> None:
    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        x = torch.ones(4, dtype=torch.complex64)
        with pytest.raises(InvalidArgumentError, match="PRODUCT is not supported for complex dtype torch.complex64"):
            backend.all_reduce(x, ReduceOp.PRODUCT)
        with pytest.raises(InvalidArgumentError, match="PRODUCT is not supported for complex dtype torch.complex64"):
            backend.reduce_scatter(x, [x.clone()], ReduceOp.PRODUCT)


def _send_recv_any_dtype(rank: int, world_size: int, port: int) -> list[int]:
    backend = get_comm_backend("gloo").init(timeout=30)
    got = torch.zeros(3, dtype=torch.int16)
    if rank == 0:
        backend.send(torch.tensor([1, -2, 3], dtype=torch.int16), dst=1)
    else:
        backend.recv(got, src=0)
    backend.destroy()
    return got.tolist()


def test_gloo_send_recv_move_any_dtype() -> None:
    """send/recv move bytes: the collectives' dtype list does not apply to them."""
    assert run_ranks(_send_recv_any_dtype, 2, timeout=60) == [[0, 0, 0], [1, -2, 3]]


def test_a_work_that_reports_completion_has_its_result_in_place() -> None:
    """torch's contract for ``Work.is_completed``: once True, the output may be used without ``wait``.  A list
    all_to_all (packed, then unpacked into the outputs) must have unpacked by then."""
    with get_comm_backend("gloo").init(rank=0, world_size=1) as backend:
        outputs = [torch.zeros(3)]
        work = backend.all_to_all(outputs, [torch.arange(3.0)], async_op=True)
        deadline = time.monotonic() + 30
        while not work.is_completed():
            assert time.monotonic() < deadline, "the all_to_all of one rank did not complete within 30 s"
            time.sleep(0.001)
        assert torch.equal(outputs[0], torch.arange(3.0))
        assert work.wait() is outputs and torch.equal(outputs[0], torch.arange(3.0))


def test_destroy_releases_every_group_when_one_release_raises(monkeypatch) -> None:
    """A release that raises does not keep the other groups held, nor the backend marked initialised."""
    import torch.distributed as dist

    from sagellm_comm.errors import CommError

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's world
    try:
        backend = CommBackend.create("gloo").init(rank=0, world_size=1)
        groups = [backend.new_group([0]), backend.new_group([0])]
        release = dist.destroy_process_group
        released: list = []

        def fails_first(group=None) -> None:
            released.append(group)
            if len(released) == 1:
                raise RuntimeError("the engine refused to release the group")
            release(group)

        monkeypatch.setattr(dist, "destroy_process_group", fails_first)
        with pytest.raises(CommError, match="refused to release"):
            backend.destroy()
        assert released == [g.engine_group for g in reversed(groups)]  # the second release ran too
        assert not backend.is_initialized
        backend.destroy()  # nothing left to release
        assert len(released) == 2
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def _average_of_large_half_values(rank: int, world_size: int, port: int) -> dict:
    """AVG of values whose mean fits the dtype and whose sum does not (40000 on every rank: 80000 > fp16's 65504),
    on Gloo (no native AVG): all_reduce, async, and reduce_scatter in both forms."""
    backend = get_comm_backend("gloo").init(timeout=30)
    results = {}
    for dtype, value in ((torch.float16, 40000.0), (torch.complex32, 40000.0 + 30000.0j)):
        x = torch.full((3,), value, dtype=dtype)
        results[f"all_reduce {dtype}"] = backend.all_reduce(x, ReduceOp.AVG).tolist()
        y = torch.full((3,), value, dtype=dtype)
        results[f"async all_reduce {dtype}"] = backend.all_reduce(y, ReduceOp.AVG, async_op=True).wait().tolist()
        out = torch.empty(3, dtype=dtype)
        backend.reduce_scatter(out, [torch.full((3,), value, dtype=dtype) for _ in range(world_size)], ReduceOp.AVG)
        results[f"reduce_scatter list {dtype}"] = out.tolist()
        flat = torch.full((3 * world_size,), value, dtype=dtype)
        backend.reduce_scatter(flat[3 * rank : 3 * rank + 3], flat, ReduceOp.AVG)  # in place
        results[f"reduce_scatter flat {dtype}"] = flat[3 * rank : 3 * rank + 3].tolist()
    backend.destroy()
    return results


def test_an_emulated_average_of_half_precision_values_does_not_overflow() -> None:
    """Gloo (and HCCL) have no AVG: the adapter sums, then divides.  Summed in a half-precision dtype, values whose
    mean fits overflowed to inf; the sum is taken in float32 (complex64), and every rank gets the mean."""
    for results in run_ranks(_average_of_large_half_values, 2, timeout=60):
        for what, got in results.items():
            want = 40000.0 if "float16" in what else 40000.0 + 30000.0j
            assert got == [want] * 3, (what, got)


def _bool_sums(rank: int, world_size: int, port: int) -> list[list[int]]:
    """SUM of bool tensors on Gloo (all_reduce, reduce_scatter in both forms); the bytes each result holds."""
    backend = get_comm_backend("gloo").init(timeout=30)
    mine = torch.tensor([True, rank == 0, rank == 1, False])
    x = mine.clone()
    backend.all_reduce(x, ReduceOp.SUM)
    out = torch.empty(4, dtype=torch.bool)
    backend.reduce_scatter(out, [mine.clone() for _ in range(world_size)], ReduceOp.SUM)
    flat = torch.empty(4, dtype=torch.bool)
    backend.reduce_scatter(flat, mine.repeat(world_size), ReduceOp.SUM)
    backend.destroy()
    return [t.view(torch.uint8).tolist() for t in (x, out, flat)]


def test_a_sum_of_bools_is_their_logical_or_held_as_valid_bools() -> None:
    """A bool SUM is the logical OR (torch.distributed's meaning, which NCCL implements as MAX): Gloo adding the
    bytes left a True held as 2 (wrapping to False at 256 ranks), a value no bool holds and whose bytes differ
    from a True's."""
    for results in run_ranks(_bool_sums, 2, timeout=60):
        assert results == [[1, 1, 1, 0]] * 3


def test_destroy_releases_nothing_the_caller_already_released() -> None:
    """A backend on the caller's world releases its own groups at destroy, skipping those torch no longer holds: the
    caller may end its world (and every group made on it) first, and make another.  Releasing them anyway raised
    "Invalid process group specified" from destroy."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's world
    backend = CommBackend.create("gloo").init(rank=0, world_size=1)
    backend.new_group([0])
    dist.destroy_process_group()  # the caller ends its world ...
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # ... and makes another
    try:
        backend.destroy()
        assert not backend.is_initialized
        x = torch.ones(2)
        dist.all_reduce(x)  # the caller's new world is untouched
        assert torch.equal(x, torch.ones(2))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("owner", ["caller", "backend"])
def test_a_call_on_a_world_released_outside_the_backend_is_a_typed_error(owner) -> None:
    """torch.distributed.destroy_process_group called by someone else (the caller's world, or the backend's own):
    every later call names it, instead of running on a released group or failing in torch."""
    from sagellm_comm.errors import NotInitializedError

    if owner == "caller":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    backend = CommBackend.create("gloo").init(rank=0, world_size=1)
    sub = backend.new_group([0])
    dist.destroy_process_group()
    calls = {
        "all_reduce": lambda: backend.all_reduce(torch.ones(2)),
        "sub-group all_reduce": lambda: backend.all_reduce(torch.ones(2), group=sub),
        "broadcast": lambda: backend.broadcast(torch.ones(2), src=0),
        "barrier": lambda: backend.barrier(),
        "new_group": lambda: backend.new_group([0]),
    }
    for what, call in calls.items():
        with pytest.raises(NotInitializedError, match="released by torch.distributed.destroy_process_group") as err:
            call()
        assert ("the world" in str(err.value)) == (what != "sub-group all_reduce"), what
    backend.destroy()
    assert not backend.is_initialized and not dist.is_initialized()


def test_a_negative_or_malformed_local_rank_is_refused_before_the_world_is_made(monkeypatch) -> None:
    """``local_rank`` (or ``$LOCAL_RANK``) picks the device ``<type>:<local_rank % device_count>``: -1 (what some
    launchers set outside a distributed run) would pick the last device, another rank's.  Refused, with nothing
    made."""
    with pytest.raises(InvalidArgumentError, match=r"local_rank \(or \$LOCAL_RANK\) must be >= 0, got -1"):
        CommBackend.create("gloo").init(rank=0, world_size=1, local_rank=-1)
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(InvalidArgumentError, match="must be >= 0, got -1"):
        CommBackend.create("gloo").init(rank=0, world_size=1)
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(InvalidArgumentError, match=r"\$LOCAL_RANK='first' is not an integer"):
        CommBackend.create("gloo").init(rank=0, world_size=1)
    assert not dist.is_initialized()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with CommBackend.create("gloo").init(rank=0, world_size=1) as backend:
        assert backend.device == torch.device("cpu")


def test_a_new_group_whose_gloo_side_fails_releases_its_engine_group(monkeypatch) -> None:
    """On a device engine a group is two process groups (the engine's, then a Gloo one for host exchanges): when
    the Gloo one cannot be made, the engine's already made is released, and the error is typed."""
    import dataclasses

    import torch.distributed as dist

    from sagellm_comm.backends.torch_distributed.engines import ENGINES
    from sagellm_comm.errors import CommError

    # the Gloo engine posing as a device engine (its own groups plus a Gloo side), in the caller's world of one
    monkeypatch.setitem(ENGINES, "gloo", dataclasses.replace(ENGINES["gloo"], host_blocking=False))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        backend = CommBackend.create("gloo").init(rank=0, world_size=1)
        make_group = dist.new_group
        made: list = []

        def gloo_side_fails(ranks=None, timeout=None, backend=None, **kwargs):
            if backend == "gloo":
                raise RuntimeError("Gloo could not connect")
            made.append(make_group(ranks, timeout=timeout, backend=backend, **kwargs))
            return made[-1]

        monkeypatch.setattr(dist, "new_group", gloo_side_fails)
        with pytest.raises(CommError, match="Gloo could not connect"):
            backend.new_group([0])
        assert len(made) == 1
        with pytest.raises(ValueError, match="Invalid process group"):  # torch no longer holds it
            dist.destroy_process_group(made[0])
        monkeypatch.setattr(dist, "new_group", make_group)
        backend.destroy()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_a_conjugate_view_is_refused_as_an_argument_before_calling_torch() -> None:
    """A complex tensor with its conjugate bit set (``z.conj()``, lazily conjugated): the engines move its memory,
    which holds the unconjugated values; torch refuses it as an engine failure, the adapter as a bad argument."""
    from sagellm_comm.errors import ErrorCode

    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    with get_comm_backend("gloo").init(rank=0, world_size=1) as backend:
        for call in (
            lambda: backend.all_reduce(z),
            lambda: backend.broadcast(z, src=0),
            lambda: backend.all_gather([torch.empty_like(z)], z),
            lambda: backend.all_gather(torch.empty(2, dtype=torch.complex64).conj(), z.resolve_conj()),
        ):
            with pytest.raises(InvalidArgumentError, match=r"resolve_conj\(\)") as info:
                call()
            assert info.value.code is ErrorCode.INVALID_ARGUMENT
        assert torch.equal(backend.all_reduce(z.resolve_conj()), z)  # resolved: runs


def test_a_sparse_or_mkldnn_tensor_is_refused_as_an_argument_naming_its_layout() -> None:
    """Sparse COO and CSR and MKL-DNN tensors hold no dense block of their values: refused naming the layout (CSR's
    ``is_contiguous`` raises torch's RuntimeError, and Gloo failed MKL-DNN as an engine error)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: sparse CSR support is in beta
        tensors = [torch.eye(3).to_sparse(), torch.eye(3).to_sparse_csr(), torch.ones(4).to_mkldnn()]
    with get_comm_backend("gloo").init(rank=0, world_size=1) as backend:
        for t in tensors:
            for call in (lambda t=t: backend.all_reduce(t), lambda t=t: backend.broadcast(t, src=0)):
                with pytest.raises(InvalidArgumentError, match=rf"is a {t.layout} tensor") as info:
                    call()
                assert info.value.details["layout"] == str(t.layout)
        assert torch.equal(backend.all_reduce(torch.ones(3)), torch.ones(3))


# ------------------------------------------------------------------------ shapes that differ across ranks
def _call_with_this_ranks_shape(backend, rank: int, op: str):
    """Rank 0 passes 4 elements, rank 1 passes 5 (broadcast: the root 5, the receiver 4)."""
    n = 4 + rank
    if op == "all_gather":
        return backend.all_gather([torch.empty(n) for _ in range(2)], torch.ones(n))
    if op == "all_reduce":
        return backend.all_reduce(torch.ones(n))
    if op == "reduce_scatter":
        return backend.reduce_scatter(torch.empty(n), [torch.ones(n), torch.ones(n)])
    if op == "broadcast":
        return backend.broadcast(torch.ones(5 - rank), src=0)
    if op == "dtype":
        return backend.all_reduce(torch.ones(2, 3, dtype=torch.float32 if rank == 0 else torch.float64))
    return backend.all_reduce(torch.ones(4)) if rank == 0 else backend.broadcast(torch.ones(4), src=0)  # "op"


def _shape_mismatch(rank: int, world_size: int, port: int, op: str, detail: bool):
    from sagellm_comm.errors import CommError

    if detail:  # torch reads TORCH_DISTRIBUTED_DEBUG when torch.distributed is imported: here, before this rank's env
        dist.set_debug_level_from_env()
    backend = CommBackend.create("gloo").init(
        rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=10
    )
    try:
        _call_with_this_ranks_shape(backend, rank, op)
    except CommError as exc:
        return type(exc).__name__, exc.code.value, str(exc), exc.details.get("calls")
    return None


ABORTING_RANK = {"all_gather": 0, "all_reduce": 0, "reduce_scatter": 0, "broadcast": 1}  # it expects fewer bytes


@pytest.mark.parametrize("op", ["all_gather"])  # docs/backends.md names the others; one shows the default
def test_gloo_aborts_a_rank_whose_peer_passed_another_shape(op) -> None:
    """What docs/backends.md says of the default: Gloo's enforce aborts the rank that expects fewer bytes
    (std::terminate, no Python exception); its peer either gets a typed error (the connection reset) or returns."""
    aborting = ABORTING_RANK[op]
    results = run_ranks(_shape_mismatch, 2, op, False, timeout=40, expect_dead={aborting})
    assert results[aborting] is None
    peer = results[1 - aborting]  # the peer expected more bytes: it may finish, part of its output stale
    assert peer is None or peer[0] == "CollectiveFailedError", results


@pytest.mark.parametrize("op", [*ABORTING_RANK, "dtype", "op"])
def test_torchs_fingerprint_check_makes_a_mismatch_a_typed_error_naming_each_ranks_call(op) -> None:
    """With TORCH_DISTRIBUTED_DEBUG=DETAIL every rank raises, before any data moved: ShapeMismatchError (an
    InvalidArgumentError) for one collective of other shapes or dtypes, CollectiveMismatchError for two collectives."""
    results = run_ranks(_shape_mismatch, 2, op, True, timeout=40, env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})
    for rank, (name, code, message, calls) in enumerate(results):
        if op == "op":
            assert name == "CollectiveMismatchError" and code == "comm_collective_failed", message
            assert "rank 0: ALLREDUCE of shape [4] Float; rank 1: BROADCAST of shape [4] Float" in message
            continue
        assert name == "ShapeMismatchError" and code == "invalid_argument", message
        kind = "ALLREDUCE" if op == "dtype" else op.upper().replace("ALL_", "ALL")
        shapes, dtypes = {
            "broadcast": (("[5]", "[4]"), ("Float", "Float")),
            "dtype": (("[2, 3]",) * 2, ("Float", "Double")),
        }.get(op, (("[4]", "[5]"), ("Float", "Float")))
        assert (
            f"rank 0: {kind} of shape {shapes[0]} {dtypes[0]}; rank 1: {kind} of shape {shapes[1]} {dtypes[1]}"
            in message
        )
        assert calls[rank] == {"op": kind, "shape": shapes[rank], "dtype": dtypes[rank]}, calls


def test_importing_the_torch_adapter_defines_no_kernel() -> None:
    """Importing one built-in adapter registers its kinds without importing the others: the custom backend's
    Triton kernels are defined only once the registry is consulted, after a process chose the interpreter."""
    import subprocess
    import sys

    code = (
        "import sys, sagellm_comm.backends.torch_distributed\n"
        "others = ('sagellm_comm.kernels', 'sagellm_comm.backends.custom')\n"
        "print(sorted(m for m in sys.modules if m.startswith(others)))\n"
        "from sagellm_comm import list_comm_backends\n"
        "print(sorted(list_comm_backends()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, listed = done.stdout.splitlines()[-2:]
    assert first == "[]", first
    assert "'custom'" in listed and "'gloo'" in listed, listed
