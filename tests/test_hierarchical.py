"""Hierarchical all-reduce on simulated nodes (``SAGELLM_COMM_HOSTNAME``): CPU, interpreter, processes.

Four processes as 2 nodes x 2: the world spans both nodes, so its kernels are off; its all-reduce runs
the kernels' reduce-scatter and all-gather inside each node and the engine (Gloo here, NCCL on GPUs)
between nodes.  Results must be exact and identical on every rank; a missing rank is named.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import pg_alive, run_ranks

INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_INITIAL_EPOCH": None, "SAGELLM_COMM_CHECK": None,
          "SAGELLM_COMM_MAX_PROGRAMS": "2", "SAGELLM_COMM_HIER_MIN_BYTES": "0",
          "SAGELLM_COMM_HIER_CROSS": None}  # fmt: skip


def test_node_layout():
    from sagellm_comm.backends.hierarchical import node_layout

    nodes = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert node_layout(tuple(range(8)), nodes) == ([(0, 1), (2, 3), (4, 5), (6, 7)], [(0, 2, 4, 6), (1, 3, 5, 7)])
    assert node_layout((0, 1), nodes) == ([], [])  # one node: the plain kernels
    assert node_layout((0, 1, 2), nodes) == ([], [])  # 2 + 1: not uniform
    assert node_layout((0, 2), nodes) == ([], [])  # one member per node: nothing for the kernels to do


def _hier_worker(rank, world_size, port, sizes, cross):
    import sagellm_comm
    from sagellm_comm.errors import InvalidArgumentError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    os.environ["SAGELLM_COMM_HIER_CROSS"] = cross
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, max_bytes=16384
    )
    backend = world.backend
    out = {"world_kernels": backend.custom is not None, "reason": backend.custom_reason, "calls": []}
    try:
        for i, (numel, dtype) in enumerate(sizes):
            x = torch.full((numel,), float(rank + 1 + i), dtype=getattr(torch, dtype))
            x[::3] = -float(rank)  # not all equal: a wrong shard placement shows
            want = sum(torch.full((numel,), float(r + 1 + i)).index_fill_(0, torch.arange(0, numel, 3),
                       -float(r)) for r in range(world_size))  # fmt: skip
            work = world.all_reduce(x, async_op=i % 2 == 1)  # async: a Work whose wait() gives the tensor
            if i % 2 == 1:
                assert work.wait() is x
            sel = backend.last_selection
            out["calls"].append((bool(torch.equal(x.float(), want)), sel.algo, sel.rule_id, x.float().sum().item()))
        out["between"] = sel.reason
        out["cross_kernels"] = backend._hierarchical[None][1].cross_kernels is not None
        with pytest.raises(InvalidArgumentError, match="hierarchical"):  # a forced choice that cannot run
            backend.all_reduce(torch.ones(5), group=world.split(2), algo="hierarchical")
    finally:
        sagellm_comm.destroy()
    return out


@pytest.mark.parametrize("cross", ["engine", "kernels"])
def test_hierarchical_all_reduce_on_two_simulated_nodes(cross):
    """Stage 2 on the engine (Gloo), or on the kernels of the cross groups (simulated nodes only)."""
    sizes = [(1, "float32"), (37, "float32"), (1000, "bfloat16"), (2048, "float16")]
    per_rank = run_ranks(_hier_worker, 4, sizes, cross, env=INTERP, timeout=540)
    for out in per_rank:
        assert not out["world_kernels"] and "span 2 nodes" in out["reason"], out["reason"]
        assert out["cross_kernels"] == (cross == "kernels"), out
        assert ("gloo engine" in out["between"]) == (cross == "engine"), out["between"]
        for ok, algo, rule, _ in out["calls"]:
            assert ok and algo == "hierarchical" and rule == "hierarchical-span-nodes", out["calls"]
    digests = [[c[3] for c in out["calls"]] for out in per_rank]
    assert all(d == digests[0] for d in digests)


def _below_threshold_worker(rank, world_size, port):
    import sagellm_comm

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    os.environ["SAGELLM_COMM_HIER_MIN_BYTES"] = "4096"
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              max_bytes=16384)  # fmt: skip
    backend = world.backend
    try:
        x = torch.ones(16)
        world.all_reduce(x)  # 64 bytes: under the threshold, flat engine
        ran = backend.last_selection  # the same algorithm, rule id and reason as select()
        small = (bool(torch.all(x == 4)), ran.algo, backend.select(64, 4) == ran)
        y = torch.ones(2048)  # 8 KB: hierarchical
        world.all_reduce(y)
        ran = backend.last_selection
        large = (bool(torch.all(y == 4)), ran.algo, backend.select(8192, 4) == ran)
    finally:
        sagellm_comm.destroy()
    return small, large


def test_small_messages_stay_on_the_engine():
    """... and ``select`` (what all_reduce runs, and why) says so on both sides of the threshold."""
    for small, large in run_ranks(_below_threshold_worker, 4, env=INTERP, timeout=540):
        assert small == (True, "gloo", True) and large == (True, "hierarchical", True)


def _forced_hierarchical_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm import ReduceOp
    from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError, WorkspaceExhaustedError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              max_bytes=16384)  # fmt: skip
    backend = world.backend
    tp = world.split(2)  # the two ranks of each node: kernels, no hierarchical plan
    try:
        # 2 nodes x 2: the node-local reduce-scatter stages one 4096-element fp32 chunk, so 8192 elements fit.
        fits = torch.full((8192,), float(rank + 1))
        backend.all_reduce(fits, algo="hierarchical")
        assert torch.all(fits == 10.0) and backend.last_selection.algo == "hierarchical"
        # A forced hierarchical all-reduce that cannot run names why, before anything runs.
        cases = [
            (WorkspaceExhaustedError, "32772 bytes .* 32768", torch.ones(8193), {}),
            (InvalidArgumentError, "SUM", torch.ones(8), {"op": ReduceOp.MAX}),
            (InvalidArgumentError, "int32", torch.ones(8, dtype=torch.int32), {}),
            (InvalidArgumentError, "contiguous", torch.ones(8, 2).t(), {}),
            (InvalidArgumentError, "spans nodes", torch.ones(8), {"group": tp}),
        ]
        for error, match, tensor, kwargs in cases:
            with pytest.raises(error, match=match):
                backend.all_reduce(tensor, algo="hierarchical", **kwargs)
            assert torch.all(tensor == 1)
        with pytest.raises(BackendNotSupportedError, match="span 2 nodes"):  # the world has no kernels of its own
            backend.all_reduce(torch.ones(8), algo="one_shot")
        assert backend.last_selection.algo == "hierarchical"  # the last call that ran
    finally:
        sagellm_comm.destroy()


def test_a_forced_hierarchical_all_reduce_that_cannot_run_says_why():
    run_ranks(_forced_hierarchical_worker, 4, env=INTERP, timeout=540)


def _missing_worker(rank, world_size, port, marker):
    import time

    import sagellm_comm
    from sagellm_comm.errors import CommError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    # kernel_timeout: long enough for the set-up's self-tests (two programs a launch) on a loaded machine; rank 2
    # waits it out once.  timeout (the engine's, which rank 0 waits out): 10 s past it, for rank 1 to see rank 3 go.
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=15,
                              max_bytes=16384, kernel_timeout=5.0)  # fmt: skip
    if rank == 3:  # never calls; waits until its node peer has reported, then leaves
        deadline = time.monotonic() + 200
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    x = torch.ones(64)
    try:
        world.all_reduce(x)
        world.backend.kernels_for(world.backend._hierarchical[None][1].local).check_errors()
    except CommError as exc:  # rank 2: the kernels name rank 3; ranks 0 and 1: their node or engine stage fails
        if rank == 2:
            open(marker, "w").close()
        return type(exc).__name__, exc.details.get("peer"), str(exc)
    return "no error", None, str(x[:4])


def test_a_rank_missing_in_the_node_stage_is_named(tmp_path):
    results = run_ranks(_missing_worker, 4, str(tmp_path / "reported"), env=INTERP, timeout=540)
    kind, peer, message = results[2]
    assert kind == "CommTimeoutError" and peer == 1, message  # rank 3 is local rank 1 of node1
    assert "peer rank 3 (rank 1 of the group [2, 3])" in message, message
    for rank in (0, 1):  # no rank hangs, none returns a result
        assert results[rank][0] != "no error", results[rank]
    # Rank 1 waits in stage 2 for rank 3 (its cross partner): the error says the stage and the ranks.
    assert "stage 2" in results[1][2] and "global ranks [1, 3]" in results[1][2], results[1]


def _one_node_without_kernels_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm.errors import UnavailableError
    from sagellm_comm.ipc import SharedFileMemory

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    if rank >= 2:  # node1 has no shared memory for its node-local workspace: that group runs on the engine

        def allocate(self, nbytes):
            raise UnavailableError("cannot reserve shared memory")

        SharedFileMemory.allocate = allocate
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=20,
                              max_bytes=16384)  # fmt: skip
    backend = world.backend
    try:
        x = torch.full((64,), float(rank + 1))
        world.all_reduce(x)  # 256 bytes, over the threshold (0): hierarchical if every node could run it
        ran = backend.last_selection
        return bool(torch.all(x == 10)), ran.algo, backend.select(256, 4) == ran, backend.kernels_for(world) is None
    finally:
        sagellm_comm.destroy()


def test_a_node_without_kernels_keeps_every_member_on_the_flat_engine():
    """The members of a node-spanning group run the same path: where one node's group has no kernels (no peer
    access, no memory for its workspace), every member runs the flat engine, not the three stages on the others
    (whose stage 2 would wait for ranks calling the flat engine until its timeout)."""
    for ok, algo, same, no_world_kernels in run_ranks(_one_node_without_kernels_worker, 4, env=INTERP, timeout=300):
        assert (ok, algo, same, no_world_kernels) == (True, "gloo", True, True)


def _failed_spanning_group_worker(rank, world_size, port):
    """``new_group`` of a node-spanning group whose hierarchical plan fails once its node-local groups (with their
    workspaces) and cross groups are made (a stand-in failure): what it left, and the world's plan after it."""

    import sagellm_comm
    from sagellm_comm.backends import custom
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              max_bytes=16384)  # fmt: skip
    backend = world.backend
    handles, workspaces = [], []
    real_new_group, real_kernel_group = TorchDistributedBackend.new_group, custom.KernelGroup

    def recorded_new_group(self, ranks):
        handles.append(real_new_group(self, ranks))
        return handles[-1]

    class RecordedKernelGroup(real_kernel_group):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.kernels is not None:
                workspaces.append(self.kernels.workspace)

    def refused_plan(*args, **kwargs):
        raise MemoryError("no memory for the plan")

    real_plan = custom.HierarchicalPlan
    TorchDistributedBackend.new_group, custom.KernelGroup = recorded_new_group, RecordedKernelGroup
    custom.HierarchicalPlan = refused_plan
    try:
        with pytest.raises(MemoryError, match="no memory for the plan"):
            backend.new_group(range(world_size))
    finally:
        TorchDistributedBackend.new_group, custom.KernelGroup = real_new_group, real_kernel_group
        custom.HierarchicalPlan = real_plan
    try:
        x = torch.full((64,), float(rank + 1))
        world.all_reduce(x)  # the world's plan, made at init, is untouched
        return {
            "groups made": [list(h.ranks) for h in handles],
            "live": [pg_alive(pg) for h in handles for pg in (h.engine_group, h.cpu_group) if pg is not None],
            "workspaces closed": [ws.closed for ws in workspaces],
            "world": (bool(torch.all(x == 10)), backend.last_selection.algo),
        }
    finally:
        sagellm_comm.destroy()


def test_a_node_spanning_group_whose_plan_fails_releases_its_node_groups_and_workspaces():
    """The node-local groups' workspaces (peer mappings) and every process group the failed ``new_group`` made are
    released before its error is raised, not kept until ``destroy()``; the world's plan still runs."""
    for seen in run_ranks(_failed_spanning_group_worker, 4, env=INTERP, timeout=300):
        assert seen["groups made"] == [[0, 1, 2, 3], [0, 1], [2, 3], [0, 2], [1, 3]], seen
        assert seen["live"] and not any(seen["live"]), seen
        assert seen["workspaces closed"] == [True], seen  # this rank's node-local group's
        assert seen["world"] == (True, "hierarchical"), seen


def _check_mode_worker(rank, world_size, port, cases):
    import sagellm_comm
    from sagellm_comm.errors import CollectiveMismatchError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    os.environ["SAGELLM_COMM_CHECK"] = "1"
    seen = []
    for counts, cross in cases:
        os.environ["SAGELLM_COMM_HIER_CROSS"] = cross
        world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                                  max_bytes=16384)  # fmt: skip
        try:
            x = torch.full((38,), float(rank + 1))
            world.all_reduce(x)  # agreeing calls run exactly in check mode
            assert torch.all(x == 10) and world.backend.last_selection.algo == "hierarchical", x
            x = torch.full((counts[rank],), float(rank + 1))
            try:
                world.all_reduce(x)
                world.backend.kernels_for(world.backend._hierarchical[None][1].local).synchronize()
                seen.append(("no error", x.tolist()))
            except CollectiveMismatchError as exc:
                seen.append((str(exc), exc.details))
        finally:
            sagellm_comm.destroy()
    return seen


def test_check_mode_compares_what_each_rank_passed_across_nodes():
    """37 and 38 elements pad to the same shards (19 a node-local rank): check mode must compare the counts the
    callers passed, on every rank, whether the ranks of one node disagree or two nodes do."""
    cases = [((38, 38, 38, 37), "engine"), ((37, 37, 38, 38), "kernels")]
    per_rank = run_ranks(_check_mode_worker, 4, cases, env=INTERP, timeout=540)
    for case, (counts, _) in enumerate(cases):
        for rank, seen in enumerate(per_rank):
            message, details = seen[case]
            assert message != "no error", (case, rank, details)
            peer = next(r for r in range(4) if counts[r] != counts[rank])  # the first that differs
            assert details["kind"] == "mismatch" and details["global_peer"] == peer, (case, rank, details)
            assert (details["mine"]["numel"], details["theirs"]["numel"]) == (counts[rank], counts[peer])
            assert details["mine"]["algo"] == "hierarchical", details
            assert f"rank {peer} ran hierarchical of {counts[peer]} x float32" in message, message


def _refused_input_worker(rank, world_size, port, cases, markers):
    import dataclasses
    import time

    import sagellm_comm
    from sagellm_comm.errors import CommError

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    os.environ["SAGELLM_COMM_CHECK"] = "1"
    seen = []
    for case, (cross, host_blocking) in enumerate(cases):
        os.environ["SAGELLM_COMM_HIER_CROSS"] = cross
        # Both bounds well over what the test allows a failing call: a rank that waits for another fails the test.
        world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=40,
                                  max_bytes=16384, kernel_timeout=30.0)  # fmt: skip
        backend = world.backend
        if not host_blocking:  # as a device engine (NCCL): nobody reads the group check on the host before stage 2
            backend.engine = dataclasses.replace(backend.engine, host_blocking=False)
        try:
            x = torch.full((38,), float(rank + 1), device="meta" if rank == 3 else "cpu")  # rank 3: another device
            started = time.monotonic()
            try:
                world.all_reduce(x)
                backend.kernels_for(backend._hierarchical[None][1].local).synchronize()
                seen.append(("no error", "", {}, time.monotonic() - started))
            except CommError as exc:
                seen.append((type(exc).__name__, str(exc), exc.details, time.monotonic() - started))
            open(os.path.join(markers, f"{case}-{rank}"), "w").close()
            deadline = time.monotonic() + 120  # rank 3 stays until every other rank has its answer
            while rank == 3 and len(os.listdir(markers)) < 4 * (case + 1) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            sagellm_comm.destroy()
    return seen


def test_check_mode_fails_every_rank_at_once_when_one_refuses_its_input(tmp_path):
    """A rank whose tensor is on another device than its workspace raises at once; in check mode it still takes
    part in the group's comparison, so every other rank raises CollectiveMismatchError naming it instead of waiting
    for it until the engine's or the kernels' timeout, whether stage 2 runs on the engine (Gloo, or one whose calls
    are stream-ordered, as NCCL's are) or on the kernels."""
    cases = [("engine", True), ("engine", False), ("kernels", True)]
    per_rank = run_ranks(_refused_input_worker, 4, cases, str(tmp_path), env=INTERP, timeout=400)
    for case in range(len(cases)):
        kind, message, details, elapsed = per_rank[3][case]
        assert kind == "InvalidArgumentError" and "tensor is on meta" in message, (case, message)
        for rank in range(3):
            kind, message, details, elapsed = per_rank[rank][case]
            assert kind == "CollectiveMismatchError", (case, rank, message)
            assert details["peer"] == 3 and details["theirs"]["algo"] == "refused", (case, rank, details)
            assert "rank 3 ran nothing: it refused its input of 38 x float32" in message, message
            assert elapsed < 20, (case, rank, elapsed)


def test_custom_backend_constructor_rejects_bad_options(monkeypatch):
    from sagellm_comm import CommBackend
    from sagellm_comm.errors import InvalidArgumentError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InvalidArgumentError, match="engine must be"):
        CommBackend.create("custom", engine="mpi")
    with pytest.raises(InvalidArgumentError, match="group_max_bytes"):
        CommBackend.create("custom", group_max_bytes=0)


def _disagree_worker(rank, world_size, port, env, values):
    import sagellm_comm
    from sagellm_comm.errors import ConfigMismatchError

    os.environ[env] = values[rank]
    with pytest.raises(ConfigMismatchError, match=f"{env} .*differs: .* on ranks \\[0\\]; .* on ranks \\[1\\]"):
        sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=60,
                          max_bytes=16384)  # fmt: skip
    return True


KNOBS = [("SAGELLM_COMM_HIER_MIN_BYTES", ("4096", "8192")), ("SAGELLM_COMM_HIER_CROSS", ("engine", "kernels"))]


@pytest.mark.parametrize("env,values", KNOBS)
def test_ranks_that_disagree_on_a_hierarchical_knob_fail_at_init(env, values):
    assert run_ranks(_disagree_worker, 2, env, values, env=INTERP, timeout=300) == [True, True]


def _released_spanning_group_worker(rank, world_size, port):
    """A node-spanning group released on its own (``CommGroup.destroy``): what its hierarchical plan made (the
    node-local groups with their workspaces, the cross groups) after it, and the world's plan."""

    import sagellm_comm

    os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank // 2}"
    world = sagellm_comm.init(backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120,
                              max_bytes=16384)  # fmt: skip
    backend = world.backend
    try:
        before = backend.groups  # the world's plan's node-local and cross groups, made at init
        spanning = world.new_subgroup(range(world_size))
        made = backend.groups[len(before) :]  # the group, then its plan's node-local and cross groups
        local = next(h for h in made[1:3] if h.is_member)
        workspace = backend.kernels_for(local).workspace
        x = torch.full((64,), float(rank + 1))
        spanning.all_reduce(x)
        ran = backend.last_selection.algo
        spanning.destroy()
        y = torch.full((64,), float(rank + 1))
        world.all_reduce(y)  # the world's plan, made at init, is untouched
        return {
            "groups made": [list(h.ranks) for h in made],
            "ran": (ran, bool(torch.all(x == 10))),
            "left": backend.groups == before,
            "live": [pg_alive(pg) for h in made for pg in (h.engine_group, h.cpu_group) if pg is not None],
            "workspace closed": workspace.closed,
            "world": (bool(torch.all(y == 10)), backend.last_selection.algo),
        }
    finally:
        sagellm_comm.destroy()


def test_a_released_node_spanning_group_releases_its_node_groups_and_workspaces():
    """Releasing a group that spans nodes releases what its plan made too: the node-local groups' workspaces (peer
    mappings) and every process group, at once; the world's plan still runs."""
    for seen in run_ranks(_released_spanning_group_worker, 4, env=INTERP, timeout=300):
        assert seen["groups made"] == [[0, 1, 2, 3], [0, 1], [2, 3], [0, 2], [1, 3]], seen
        assert seen["ran"] == ("hierarchical", True), seen
        assert seen["left"] and seen["live"] and not any(seen["live"]), seen
        assert seen["workspace closed"] and seen["world"] == (True, "hierarchical"), seen
