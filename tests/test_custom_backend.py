"""The ``custom`` backend end to end on the CPU: Gloo engine + kernels under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import join_gloo, pg_alive, run_ranks

# two programs a launch (the CPU default is 32, interpreted one after another)
INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_MAX_PROGRAMS": "2"}


def _small_custom_backend(rank: int, world_size: int, port: int):
    """This rank's ``custom`` backend with an 8 KB workspace (larger messages go to the engine), initialised."""
    from sagellm_comm import CommBackend

    backend = CommBackend.create("custom", max_bytes=8192, kernel_timeout=60.0)
    return backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port)


def _backend_worker(rank, world_size, port):
    from sagellm_comm import ReduceOp
    from sagellm_comm.errors import InvalidArgumentError, WorkspaceExhaustedError

    backend = _small_custom_backend(rank, world_size, port)
    seen = {"name": backend.name, "engine": backend.engine_kind, "reason": backend.custom_reason}
    assert backend.custom is not None, backend.custom_reason
    seen["sharing"] = backend.custom.workspace.ranks_on_device  # both ranks on this host's CPU

    # SUM on the world group: the kernels (Lamport at this size by the default policy).
    x = torch.arange(100, dtype=torch.float32) + rank
    out = backend.all_reduce(x)
    assert out is x
    assert torch.equal(x, (torch.arange(100, dtype=torch.float32) * world_size) + sum(range(world_size)))
    seen["small"] = backend.last_selection.algo

    # Forced algorithm, bf16.
    y = torch.full((301,), float(rank + 1), dtype=torch.bfloat16)
    backend.all_reduce(y, algo="two_shot")
    assert torch.all(y == float(sum(range(1, world_size + 1))))
    seen["forced"] = backend.last_selection.rule_id
    y = torch.full((301,), float(rank + 1), dtype=torch.bfloat16)
    backend.all_reduce(y, algo="lamport")
    assert torch.all(y == float(sum(range(1, world_size + 1))))
    assert backend.last_selection.algo == "lamport"
    with pytest.raises(InvalidArgumentError, match="algo must be one of"):
        backend.all_reduce(y, algo="ring")
    with pytest.raises(InvalidArgumentError, match="is on meta"):  # the kernel path checks the device
        backend.all_reduce(torch.ones(8, device="meta"))

    # Over the workspace: the engine runs it (auto), a forced kernel algo is refused.
    big = torch.ones(4096, dtype=torch.float32) * (rank + 1)
    backend.all_reduce(big)
    assert torch.all(big == float(sum(range(1, world_size + 1))))
    seen["big"] = (backend.last_selection.algo, backend.last_selection.rule_id)
    with pytest.raises(WorkspaceExhaustedError, match="fit the 8192-byte workspace"):
        backend.all_reduce(torch.ones(4096), algo="one_shot")

    # Other ops go to the engine.
    m = torch.tensor([float(rank)])
    backend.all_reduce(m, op=ReduceOp.MAX)
    assert m.item() == world_size - 1
    seen["max"] = backend.last_selection.algo

    # Async handle.
    z = torch.ones(64) * 2
    work = backend.all_reduce(z, async_op=True)
    assert work.wait() is z
    assert work.is_completed()
    assert torch.all(z == 2.0 * world_size)
    backend.destroy()
    assert backend.custom is None
    return seen


def test_custom_backend_runs_kernels_and_falls_back():
    seen = run_ranks(_backend_worker, 2, env=INTERP, timeout=300)
    for s in seen:
        assert s["name"] == "custom" and s["engine"] == "gloo"
        assert "custom kernels on 2 ranks" in s["reason"]
        assert s["small"] == "lamport"  # 400 bytes on 2 ranks: the barrier-free kernel
        assert s["forced"] == "user"
        assert s["big"][1] == "over-workspace"
        assert s["max"] == "gloo"
        assert s["sharing"] == 2
        # The engine ran the over-workspace call: Gloo here, so the label says "gloo".
        assert s["big"][0] == "gloo", s["big"]


def _forced_algo_worker(rank, world_size, port):
    from sagellm_comm import ReduceOp
    from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError

    backend = _small_custom_backend(rank, world_size, port)
    solos = [backend.new_group([r]) for r in range(world_size)]  # one member each: no kernels
    mine = solos[rank]
    before = backend.last_selection

    def refused(error, match, tensor, **kwargs):
        kept = tensor.clone()
        with pytest.raises(error, match=match):
            backend.all_reduce(tensor, **kwargs)
        assert torch.equal(tensor, kept)  # nothing ran: the engine would have summed or taken the max
        assert backend.last_selection is before

    # A forced kernel algorithm on a call the kernels cannot run is refused, as an over-workspace message is.
    refused(InvalidArgumentError, "int32", torch.full((8,), rank + 1, dtype=torch.int32), algo="one_shot")
    refused(InvalidArgumentError, "SUM", torch.full((8,), rank + 1.0), op=ReduceOp.MAX, algo="two_shot")
    refused(InvalidArgumentError, "contiguous", torch.full((8, 2), rank + 1.0).t(), algo="lamport")
    refused(BackendNotSupportedError, "group size 1", torch.full((8,), rank + 1.0), group=mine, algo="one_shot")
    # With payload="fp8" too: algo="two_shot" is the FP8 kernel or an error, never the engine at full precision.
    wide = torch.full((8,), rank + 1.0, dtype=torch.float64)
    refused(InvalidArgumentError, "float64", wide, algo="two_shot", payload="fp8")
    refused(BackendNotSupportedError, "group size 1", torch.full((8,), rank + 1.0), group=mine, algo="two_shot",
            payload="fp8")  # fmt: skip
    # A sparse tensor (CSR's is_contiguous raises torch's RuntimeError): typed errors, auto and forced alike.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: sparse CSR support is in beta
        csr = torch.eye(4).to_sparse_csr()
    for kwargs, match in (({}, "is a torch.sparse_csr tensor"), ({"algo": "one_shot"}, "contiguous")):
        with pytest.raises(InvalidArgumentError, match=match):
            backend.all_reduce(csr, **kwargs)
        assert backend.last_selection is before
    with pytest.raises(InvalidArgumentError, match="is a torch.sparse_csr tensor"):
        backend.all_gather(torch.empty(8, 4), csr)
    # The same calls with auto run on the engine.
    ints = torch.full((8,), rank + 1, dtype=torch.int32)
    backend.all_reduce(ints)
    assert torch.all(ints == 3) and backend.last_selection.algo == "gloo"
    peak = torch.full((8,), rank + 1.0)
    backend.all_reduce(peak, op=ReduceOp.MAX)
    assert torch.all(peak == 2.0) and backend.last_selection.algo == "gloo"
    alone = torch.full((8,), rank + 1.0)
    backend.all_reduce(alone, group=mine)
    assert torch.all(alone == rank + 1.0) and backend.last_selection.rule_id == "custom-unavailable"
    x = torch.full((8,), rank + 1.0)
    backend.all_reduce(x, algo="one_shot")  # and the kernels still run
    assert torch.all(x == 3.0) and backend.last_selection.algo == "one_shot"
    backend.destroy()


def test_a_forced_kernel_algo_the_kernels_cannot_run_is_refused():
    run_ranks(_forced_algo_worker, 2, env=INTERP, timeout=300)


def _refused_selection_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError

    backend = _small_custom_backend(rank, world_size, port)
    x = torch.full((64,), rank + 1.0)
    backend.all_reduce(x, algo="two_shot")
    ran = backend.last_selection
    assert ran.algo == "two_shot" and torch.all(x == 3.0)
    # Calls refused before anything runs leave last_selection saying what the last call that ran ran.
    with pytest.raises(InvalidArgumentError, match="is on meta"):
        backend.all_reduce(torch.ones(8, device="meta"))
    assert backend.last_selection is ran
    flat = torch.zeros(16)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        backend.all_gather(flat[1:9], flat[:4])
    assert backend.last_selection is ran
    with pytest.raises(InvalidArgumentError, match="overlap"):
        backend.reduce_scatter(flat[1:5], flat[:8])
    assert backend.last_selection is ran
    out = torch.empty(8)
    backend.all_gather(out, torch.full((4,), rank + 1.0))  # and the next call runs, and is recorded
    assert backend.last_selection.rule_id == "custom-all-gather"
    assert torch.equal(out, torch.tensor([1.0] * 4 + [2.0] * 4))
    backend.destroy()


def test_a_refused_call_leaves_last_selection_as_it_was():
    run_ranks(_refused_selection_worker, 2, env=INTERP, timeout=300)


def _select_worker(rank, world_size, port):
    from sagellm_comm.errors import InvalidArgumentError

    backend = _small_custom_backend(rank, world_size, port)
    solos = [backend.new_group([r]) for r in range(world_size)]
    # select() says what all_reduce of such a tensor runs: the kernels' dtypes by their size, the engine for the rest.
    for dtype, numel in ((torch.float32, 64), (torch.bfloat16, 301), (torch.float64, 64), (torch.int8, 100),
                         (torch.float32, 2049)):  # fmt: skip
        x = torch.ones(numel, dtype=dtype)
        said = backend.select(x.numel() * x.element_size(), x.element_size())
        backend.all_reduce(x)
        assert said == backend.last_selection, (dtype, numel, said, backend.last_selection)
        assert torch.all(x == world_size)
    for car_select in (backend.select, backend.custom.select, lambda *a: backend.select(*a, group=solos[rank])):
        for nbytes, itemsize in ((1024, 0), (-2, 2), (1.5, 2), (True, 2), (1024, "2"), (None, 2), (1025, 2)):
            with pytest.raises(InvalidArgumentError, match="nbytes|itemsize"):
                car_select(nbytes, itemsize)
    with pytest.raises(InvalidArgumentError, match="itemsize"):  # the kernels' own policy: their dtypes only
        backend.custom.select(1024, 8)
    backend.destroy()


def test_select_says_what_all_reduce_runs_and_refuses_what_no_call_has():
    run_ranks(_select_worker, 2, env=INTERP, timeout=300)


def _single_rank_worker(rank, world_size, port):
    from sagellm_comm import CommBackend

    backend = CommBackend.create("custom")
    backend.init(rank=0, world_size=1)
    reason = backend.custom_reason
    x = torch.ones(8)
    backend.all_reduce(x)
    assert torch.all(x == 1.0)
    backend.destroy()
    return reason


def _refusals_after_close(car):
    """A function that makes every call on ``car``, and on objects made now over its workspace, once they were closed,
    and returns what each raised (every one must raise NotInitializedError)."""
    from sagellm_comm import gather_scatter
    from sagellm_comm.errors import NotInitializedError
    from sagellm_comm.fused import FusedAllReduceRMSNorm

    rmsnorm = FusedAllReduceRMSNorm(car.workspace)
    shard = torch.ones(4)
    calls = [
        lambda: car.all_reduce(torch.ones(8), algo="one_shot"),
        lambda: car.all_reduce(torch.ones(8), payload="fp8"),
        lambda: car.get_buffer(8, torch.float32),
        lambda: car.workspace.counter(0),
        lambda: gather_scatter.all_gather(car, shard, torch.empty(4 * car.world_size)),
        lambda: gather_scatter.reduce_scatter(car, torch.ones(4 * car.world_size), shard),
        lambda: rmsnorm(torch.ones(1, 8), torch.ones(1, 8), torch.ones(8)),
    ]

    def said() -> list[str]:
        refusals = []
        for call in calls:
            with pytest.raises(NotInitializedError) as err:
                call()
            refusals.append(str(err.value))
        return refusals

    return said


def _kept_kernels_worker(rank, world_size, port):
    backend = _small_custom_backend(rank, world_size, port)
    pair = backend.new_group([0, 1])
    kept_world, kept_pair = backend.custom, backend.kernels_for(pair)
    assert kept_world is not None and kept_pair is not None, backend.custom_reason
    after_reset = [_refusals_after_close(kept) for kept in (kept_world, kept_pair)]
    backend.reset()
    said = [refusals() for refusals in after_reset]
    x = torch.full((8,), float(rank + 1))
    backend.kernels_for(pair).all_reduce(x, algo="one_shot")  # the group's new kernels, as the error says
    backend.kernels_for(pair).synchronize()
    assert torch.all(x == 3.0)
    after_destroy = _refusals_after_close(backend.custom)
    backend.destroy()
    return said, after_destroy()


def test_kernels_kept_from_before_reset_say_so_and_where_the_new_ones_are():
    """Every call on a CustomAllReduce kept from before reset() (the all-reduce, its buffer, its workspace,
    all-gather and reduce-scatter on it, a fused all-reduce + RMSNorm over its workspace) says that reset() replaced
    it and where the new one is, not that the backend was destroyed; after destroy() they say that."""
    for said, after_destroy in run_ranks(_kept_kernels_worker, 2, env=INTERP, timeout=300):
        for refusals in said:
            assert len(refusals) == 7, refusals
            for refusal in refusals:
                assert "reset() released and made again" in refusal and "ranks [0, 1]" in refusal, refusal
                assert "destroy" not in refusal, refusal
            assert "kernels_for(group)" in refusals[0], refusals
        assert len(after_destroy) == 7, after_destroy
        for refusal in after_destroy:
            assert "its backend was destroyed; create and init a new backend" in refusal, refusal
            assert "reset()" not in refusal, refusal


def test_custom_backend_records_why_it_falls_back():
    reason = run_ranks(_single_rank_worker, 1, env=INTERP, timeout=120)[0]
    assert "group size 1 is outside 2..8" in reason


def _policy_agreement_worker(rank, world_size, port, same_rules_file):
    """Rank 1 alone gives other fusion rules, then another selector, then other GEMM path rules; then the same
    fusion rules from a file, and the same GEMM path rules from another source, which the group-level GEMM +
    all-reduce decides by."""
    import torch.distributed as dist

    from sagellm_comm import CommBackend, CommGroup
    from sagellm_comm.errors import ConfigMismatchError
    from sagellm_comm.fused import FusionPolicy, FusionRule, GemmPathSelector, GemmRule, gemm_all_reduce, last_selection
    from sagellm_comm.selector import AlgoSelector, Rule

    join_gloo(rank, world_size, port)
    off = FusionPolicy([FusionRule("off", "unfused")], source="in code")
    cases = {
        "fusion_policy": {"fusion_policy": off if rank == 1 else None},
        "selector": {"selector": AlgoSelector([Rule("all-one-shot", "one_shot")]) if rank == 1 else None},
        "same rules": {"fusion_policy": same_rules_file if rank == 1 else off},
        "gemm_policy": {
            "gemm_policy": GemmPathSelector([GemmRule("all-chunked", "chunked")]) if rank == 1 else None,
            "max_bytes": 8192,
        },
        "same GEMM rules": {
            "gemm_policy": GemmPathSelector([GemmRule("tuned-sequential", "sequential")], source=f"rank {rank}"),
            "max_bytes": 8192,
        },
    }
    seen = {}
    for case, kwargs in cases.items():
        backend = CommBackend.create("custom", **kwargs)
        try:
            backend.init()  # adopts the world; the world group's set-up compares the policies
            seen[case] = ("no error", backend.custom is not None)
            if case == "same GEMM rules":  # the group-level GEMM + all-reduce decides by the compared rules
                world = CommGroup(backend)
                a, b = torch.ones(4, 16, dtype=torch.bfloat16) * (rank + 1), torch.ones(16, 8, dtype=torch.bfloat16)
                out = gemm_all_reduce(a, b, group=world)
                seen["the GEMM's rule"] = (last_selection(world).rule_id, out.float().unique().tolist())
            backend.destroy()
        except ConfigMismatchError as exc:
            seen[case] = (str(exc), exc.details["policies"])
        dist.barrier()
    return seen


def test_ranks_deciding_by_other_policies_are_refused_at_set_up(tmp_path):
    """Two ranks with other fusion rules, another selector or other GEMM path rules would run other kernels for one
    call (a hang or a wrong result): the group's set-up refuses them on every rank, naming the policy; the same
    rules read from elsewhere agree."""
    import json

    same = tmp_path / "off.json"
    same.write_text(json.dumps({"rules": [{"id": "off", "path": "unfused"}]}))
    for seen in run_ranks(_policy_agreement_worker, 2, str(same), env=INTERP, timeout=300):
        for case, label, source in (
            ("fusion_policy", "the fusion policy (fusion_policy=)", "in code"),
            ("selector", "the all-reduce policy (selector=)", "rules given in code"),
            ("gemm_policy", "the GEMM path policy (gemm_policy=)", "rules given in code"),
        ):
            message, policies = seen[case]
            assert list(policies) == [case], policies
            assert f"{label} differs" in message and "(default) on ranks [0]" in message, message
            assert f"({source}) on ranks [1]" in message, message
        assert seen["same rules"] == ("no error", True), seen["same rules"]
        assert seen["same GEMM rules"] == ("no error", True), seen["same GEMM rules"]
        assert seen["the GEMM's rule"] == ("tuned-sequential", [48.0]), seen["the GEMM's rule"]


def test_the_custom_backend_refuses_a_fusion_policy_it_cannot_read(monkeypatch, tmp_path):
    from sagellm_comm import CommBackend
    from sagellm_comm.errors import InvalidArgumentError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InvalidArgumentError, match="fusion_policy must be a FusionPolicy, a policy file"):
        CommBackend.create("custom", fusion_policy={"rules": []})
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        CommBackend.create("custom", fusion_policy=tmp_path / "missing.json")
    assert CommBackend.create("custom").fusion_policy.source == "default"
    with pytest.raises(InvalidArgumentError, match="gemm_policy must be a GemmPathSelector or None"):
        CommBackend.create("custom", gemm_policy=tmp_path / "rules.json")
    assert CommBackend.create("custom").gemm_policy.source == "default"


def test_custom_backend_unavailable_without_gpu_or_interpreter(monkeypatch):
    from sagellm_comm import CommBackend, is_comm_backend_available
    from sagellm_comm.errors import BackendNotSupportedError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not is_comm_backend_available("custom")
    with pytest.raises(BackendNotSupportedError, match="custom needs a CUDA GPU"):
        CommBackend.create("custom")


def test_an_uninitialised_custom_backend_names_itself(monkeypatch):
    # the message named the engine underneath ("backend 'gloo' is not initialised", "... was destroyed") for a
    # backend made as "custom"
    from sagellm_comm import CommBackend
    from sagellm_comm.errors import NotInitializedError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = CommBackend.create("custom", engine="gloo")
    with pytest.raises(NotInitializedError, match="backend 'custom' is not initialised"):
        backend.all_reduce(torch.ones(2))
    with pytest.raises(NotInitializedError, match="backend 'custom' is not initialised"):
        backend.all_gather(torch.empty(4), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs",
    [{"algo": "one_shot"}, {"algo": "lamport"}, {"algo": "hierarchical"}, {"algo": "two_shot", "payload": "fp8"}],
)
def test_a_forced_kernel_algorithm_on_an_uninitialised_custom_backend_is_not_initialised(monkeypatch, kwargs):
    """A forced kernel (or hierarchical) algorithm on a backend before init() (or after destroy()) is the one error
    of every call there, NotInitializedError: not "this group runs on the engine" (BackendNotSupportedError) nor
    "this group does not span nodes" (InvalidArgumentError), which send the caller after the wrong cause."""
    from sagellm_comm import CommBackend
    from sagellm_comm.errors import NotInitializedError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = CommBackend.create("custom", engine="gloo")
    with pytest.raises(NotInitializedError, match="backend 'custom' is not initialised"):
        backend.all_reduce(torch.ones(2), **kwargs)


def _peer_gone_at_set_up_worker(rank, world_size, port, step):
    """Rank 1 exits at ``step`` of the world kernels' set-up; rank 0 reports what its ``init`` raised."""
    import os

    from sagellm_comm import CommBackend
    from sagellm_comm.backends import custom_setup
    from sagellm_comm.workspace import SymmetricWorkspace

    if rank == 1:
        if step == "settings":  # before it sends its node, device and settings
            custom_setup.KernelGroup._local_checks = lambda self: os._exit(0)
        else:  # inside the workspace rendezvous, before it sends its IPC handles
            SymmetricWorkspace.rendezvous = classmethod(lambda cls, *a, **k: os._exit(0))
    backend = CommBackend.create("custom", max_bytes=8192)
    try:
        backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=10)
    except Exception as exc:
        return type(exc).__mro__[1:], str(exc), type(exc.__cause__).__name__
    return None


@pytest.mark.parametrize("step", ["settings", "workspace"])
def test_a_peer_gone_during_the_set_up_exchanges_is_a_typed_error_naming_the_exchange(step):
    """Was Gloo's untyped RuntimeError ("Connection closed by peer") out of ``init``."""
    from sagellm_comm.errors import CommError

    mro, message, cause = run_ranks(_peer_gone_at_set_up_worker, 2, step, env=INTERP, timeout=60, expect_dead={1})[0]
    assert CommError in mro, (mro, message)
    exchange = {"settings": "comparing the members' nodes, devices, settings and policies",
                "workspace": "the workspace rendezvous"}[step]  # fmt: skip
    assert f"the custom kernels' set-up of ranks [0, 1]: {exchange}" in message, message
    assert cause in ("RuntimeError", "DistBackendError"), cause


def _init_fails_and_its_release_too(rank, world_size, port):
    """``init`` fails after the world exists (a stand-in settings mismatch), and releasing the half-made backend
    fails as well (the engine refuses to release a group): what ``init`` raises, and the backend's state."""
    import torch.distributed as dist

    from sagellm_comm import CommBackend
    from sagellm_comm.backends import custom
    from sagellm_comm.errors import ConfigMismatchError

    def differ(*args, **kwargs):
        raise ConfigMismatchError("the ranks' settings differ (a stand-in)")

    def refuse(group=None):
        raise RuntimeError("the engine refused to release the group")

    custom.check_agreement, release = differ, dist.destroy_process_group
    dist.destroy_process_group = refuse
    backend = CommBackend.create("custom", max_bytes=8192)
    try:
        backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=10)
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    finally:
        dist.destroy_process_group = release
    if dist.is_initialized():
        dist.destroy_process_group()
    return raised, backend.is_initialized


def test_an_init_that_fails_reports_its_own_error_when_releasing_what_it_made_fails_too():
    """The release of a half-made backend is logged when it fails, never raised in place of init's own error."""
    raised, initialised = run_ranks(_init_fails_and_its_release_too, 1, env=INTERP, timeout=60)[0]
    assert raised == ("ConfigMismatchError", "[invalid_argument] the ranks' settings differ (a stand-in)")
    assert not initialised


def test_an_async_kernel_call_is_waited_for_without_sleeping_while_it_ends_in_microseconds(monkeypatch):
    """``Work.wait()`` polls its event without a pause at first (a 0.2 ms sleep per poll would add up to 0.2 ms to
    every wait of a kernel that ends in microseconds), and sleeps between polls only after 2 ms."""
    import time
    from types import SimpleNamespace

    from sagellm_comm.backends.custom import _EventWork

    class DoneAfter:  # the device reaches it after 50 queries
        left = 50

        def record(self):
            pass

        def query(self):
            self.left -= 1
            return self.left <= 0

    slept: list[float] = []
    monkeypatch.setattr(torch.cuda, "Event", DoneAfter)
    monkeypatch.setattr(time, "sleep", slept.append)
    car = SimpleNamespace(rank=0, check_errors=lambda: None)
    work = _EventWork(car, SimpleNamespace(is_cuda=True), 5.0)
    assert work.wait() is not None and slept == []


def test_an_async_kernel_call_waited_for_without_a_timeout_ends_at_the_backends_timeout(monkeypatch):
    """``Work.wait()`` with no timeout is bounded by the backend's: a device that never reaches the call's event (a
    stalled GPU) raises ``CommTimeoutError`` then, instead of blocking the host in ``Event.synchronize()``."""
    import time
    from types import SimpleNamespace

    from sagellm_comm.backends.custom import _EventWork
    from sagellm_comm.errors import CommTimeoutError

    class StalledEvent:  # the stream never reaches it
        def record(self):
            pass

        def query(self):
            return False

        def synchronize(self):
            raise AssertionError("the host waited for the device with no deadline")

    monkeypatch.setattr(torch.cuda, "Event", StalledEvent)
    car = SimpleNamespace(rank=1, check_errors=lambda: None)
    work = _EventWork(car, SimpleNamespace(is_cuda=True), 0.2)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="custom all-reduce on rank 1 did not complete within 0.2s"):
        work.wait()
    assert time.monotonic() - start < 5


def _failed_new_group_worker(rank, world_size, port):
    """A sub-group whose kernels cannot be set up (a stand-in: its all-reduce cannot be made over its workspace,
    after the workspace's peer mappings are open): what the failed ``new_group`` left, and a later one."""

    from sagellm_comm import ReduceOp
    from sagellm_comm.backends import custom_setup
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend
    from sagellm_comm.errors import GroupNotFoundError
    from sagellm_comm.selector import KERNEL_ALGOS

    backend = _small_custom_backend(rank, world_size, port)
    made, real_new_group, real_all_reduce = [], TorchDistributedBackend.new_group, custom_setup.CustomAllReduce

    def recorded_new_group(self, ranks):
        made.append(real_new_group(self, ranks))
        return made[-1]

    def refused(workspace, **kwargs):
        made.append(workspace)
        raise MemoryError("no memory for the group's all-reduce")

    TorchDistributedBackend.new_group, custom_setup.CustomAllReduce = recorded_new_group, refused
    try:
        with pytest.raises(MemoryError, match="no memory for the group's all-reduce"):
            backend.new_group([0, 1])
    finally:
        TorchDistributedBackend.new_group, custom_setup.CustomAllReduce = real_new_group, real_all_reduce
    handle, workspace = made
    seen = {
        "workspace closed": workspace.closed,
        "process groups live": [pg_alive(pg) for pg in (handle.engine_group, handle.cpu_group)],
        "reason": backend.kernels_reason(handle),
    }
    with pytest.raises(GroupNotFoundError, match="does not belong to this backend"):
        backend.all_reduce(torch.ones(4), group=handle)
    again = backend.new_group([0, 1])  # the group can be made again, and runs on its kernels
    x = torch.full((8,), float(rank + 1))
    backend.all_reduce(x, ReduceOp.SUM, group=again)
    seen["again"] = (backend.kernels_for(again) is not None, backend.last_selection.algo in KERNEL_ALGOS, x.tolist())
    backend.destroy()
    return seen


def test_a_new_group_whose_set_up_fails_releases_what_it_made():
    """Its process groups (the engine's and the Gloo side) and its workspace are released before the error is
    raised, not kept until ``destroy()``; a later ``new_group`` of the same ranks works."""
    for seen in run_ranks(_failed_new_group_worker, 2, env=INTERP, timeout=300):
        assert seen["workspace closed"], seen
        assert seen["process groups live"] == [False, False], seen
        assert seen["reason"].startswith("not a member of this group, or the group was not made"), seen
        assert seen["again"] == (True, True, [3.0] * 8), seen


def _one_member_fails_worker(rank, world_size, port, step):
    """Rank 1 has no memory at ``step`` of a sub-group's set-up (a stand-in), after the workspace rendezvous's
    exchanges: what each rank's ``new_group`` raised and how long it took (both timeouts are 60s), then a later
    ``new_group`` of the same ranks."""
    import time

    from sagellm_comm import CommBackend, ReduceOp
    from sagellm_comm.backends import custom_setup
    from sagellm_comm.selector import KERNEL_ALGOS
    from sagellm_comm.workspace import SymmetricWorkspace

    backend = CommBackend.create("custom", max_bytes=8192, kernel_timeout=60.0)
    backend.init(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port, timeout=60)
    real_workspace, real_all_reduce = SymmetricWorkspace.__init__, custom_setup.CustomAllReduce

    def no_memory(*args, **kwargs):
        raise MemoryError(f"no memory for the group's {step}")

    if rank == 1 and step == "workspace":
        SymmetricWorkspace.__init__ = no_memory
    elif rank == 1:
        custom_setup.CustomAllReduce = no_memory
    start = time.monotonic()
    raised = None
    try:
        backend.new_group([0, 1])
    except Exception as exc:
        raised = (type(exc).__name__, str(exc), exc.details if hasattr(exc, "details") else None)
    finally:
        elapsed = time.monotonic() - start
        SymmetricWorkspace.__init__, custom_setup.CustomAllReduce = real_workspace, real_all_reduce
    again = backend.new_group([0, 1])
    x = torch.full((8,), float(rank + 1))
    backend.all_reduce(x, ReduceOp.SUM, group=again)
    seen = {
        "raised": raised,
        "elapsed": elapsed,
        "again": (backend.kernels_for(again) is not None, backend.last_selection.algo in KERNEL_ALGOS, x.tolist()),
    }
    backend.destroy()
    return seen


@pytest.mark.parametrize("step", ["workspace", "all-reduce"])
def test_a_member_that_fails_its_part_of_the_set_up_makes_every_member_raise_at_once(step):
    """The failed member sends its error to the exchange the others wait in: it raises its own error, the others a
    typed error naming it and its error, within seconds (not at a timeout); a later ``new_group`` gets the kernels."""
    no, yes = run_ranks(_one_member_fails_worker, 2, step, env=INTERP, timeout=300)
    error = f"[comm_collective_failed] MemoryError: no memory for the group's {step}"
    assert no["raised"] == (
        "CollectiveFailedError",
        "[comm_collective_failed] the custom kernels' set-up of ranks [0, 1]: workspace setup failed on rank 1 "
        f"(rank 1: {error})",
        {"failed_ranks": [1], "messages": {1: error}},
    ), no
    assert yes["raised"] == ("MemoryError", f"no memory for the group's {step}", None), yes
    for seen in (no, yes):
        assert seen["elapsed"] < 15, seen
        assert seen["again"] == (True, True, [3.0] * 8), seen


def _peer_access_worker(rank, world_size, port):
    """Rank 1's driver alone says the members' GPUs cannot reach each other (a stand-in for the CUDA query)."""
    from sagellm_comm.backends import custom_setup

    if rank == 1:
        custom_setup.KernelGroup._peer_access = lambda self, facts: "GPU 0 cannot access GPU 1 (a stand-in)"
    backend = _small_custom_backend(rank, world_size, port)
    try:
        x = torch.full((8,), float(rank + 1))
        backend.all_reduce(x)
        return backend.custom is None, backend.custom_reason, backend.last_selection.algo, x.tolist()
    finally:
        backend.destroy()


def test_the_members_of_a_group_take_the_path_every_members_peer_access_allows():
    """Peer access is asked of each rank's own driver: where one member's answer is no, every member runs the group
    on the engine, the reason naming that rank (a member taking the kernels would wait in their set-up for it)."""
    for no_kernels, reason, algo, values in run_ranks(_peer_access_worker, 2, env=INTERP, timeout=300):
        assert no_kernels and reason == "rank 1: GPU 0 cannot access GPU 1 (a stand-in)", reason
        assert (algo, values) == ("gloo", [3.0] * 8)


def _released_group_worker(rank, world_size, port):
    """A sub-group with kernels released on its own (``CommGroup.destroy``, ``release_group``): what the backend
    and torch hold after it, what its kept all-reduce says, and the group made again."""

    from sagellm_comm import CommGroup, ReduceOp
    from sagellm_comm.errors import GroupNotFoundError, NotInitializedError
    from sagellm_comm.selector import KERNEL_ALGOS

    backend = _small_custom_backend(rank, world_size, port)
    handle = backend.new_group([0, 1])
    car = backend.kernels_for(handle)
    assert car is not None, backend.kernels_reason(handle)
    CommGroup(backend, handle).destroy()
    seen = {
        "workspace closed": car.workspace.closed,
        "process groups live": [pg_alive(pg) for pg in (handle.engine_group, handle.cpu_group)],
        "kernels": backend.kernels_for(handle),
        "groups": backend.groups,
    }
    with pytest.raises(NotInitializedError, match=r"is closed: its group was released \(release_group\)"):
        car.all_reduce(torch.ones(8))
    with pytest.raises(GroupNotFoundError, match="does not belong to this backend"):
        backend.all_reduce(torch.ones(4), group=handle)
    again = backend.new_group([0, 1])
    x = torch.full((8,), float(rank + 1))
    backend.all_reduce(x, ReduceOp.SUM, group=again)
    seen["again"] = (backend.last_selection.algo in KERNEL_ALGOS, x.tolist())
    backend.destroy()
    return seen


def test_a_released_group_closes_its_workspace_at_once():
    """Its workspace (peer mappings included) and process groups are released when the group is, not kept until
    the backend's ``destroy()``; an all-reduce kept from it says why; the group can be made again."""
    for seen in run_ranks(_released_group_worker, 2, env=INTERP, timeout=300):
        assert seen["workspace closed"] and seen["process groups live"] == [False, False], seen
        assert seen["kernels"] is None and seen["groups"] == (), seen
        assert seen["again"] == (True, [3.0] * 8), seen
