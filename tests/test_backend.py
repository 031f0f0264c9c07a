"""CommBackend over Gloo on several processes: every operation against references computed here."""

from __future__ import annotations

import pytest
import torch
from conftest import run_ranks

from sagellm_comm.backend import CommBackend, ReduceOp, Work, get_comm_backend

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
