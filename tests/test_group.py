"""CommGroup, sub-groups and the module-level CollectiveOps on four Gloo ranks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import pg_alive, process_resources, resources_back_to, run_ranks

import sagellm_comm
from sagellm_comm import CollectiveOps, CommGroup, GroupInvalidError, InvalidArgumentError, RankMismatchError, ReduceOp


def _tp_groups(rank: int, world_size: int, port: int) -> dict:
    world = sagellm_comm.init(backend="gloo")  # torchrun env from the helper
    assert sagellm_comm.get_default_group() is world and sagellm_comm.get_default_backend() is world.backend
    assert world.ranks == (0, 1, 2, 3) and world.rank == rank

    tp = world.split(2)  # {0,1} and {2,3}
    first = 0 if rank < 2 else 2
    assert tp.ranks == (first, first + 1) and tp.rank == rank - first and tp.world_size == 2

    # each TP group reduces on its own: a collective that ignored `group` would sum 1+2+3+4
    x = torch.full((9,), float(rank + 1))
    CollectiveOps.all_reduce(x, group=tp)
    assert torch.equal(x, torch.full((9,), float((first + 1) + (first + 2))))
    y = torch.full((4,), float(rank + 1))
    CollectiveOps.all_reduce(y, op=ReduceOp.MAX, group=tp)
    assert torch.equal(y, torch.full((4,), float(first + 2)))

    # src/dst are group ranks: group rank 1 is global rank first + 1
    z = torch.full((3,), float(rank))
    CollectiveOps.broadcast(z, src=1, group=tp)
    assert torch.equal(z, torch.full((3,), float(first + 1)))
    gathered = [torch.empty(2) for _ in range(2)]
    CollectiveOps.all_gather(gathered, torch.full((2,), float(rank)), group=tp)
    assert [g[0].item() for g in gathered] == [first, first + 1]
    out = torch.empty(2)
    CollectiveOps.reduce_scatter(out, torch.arange(4.0) * (rank + 1), group=tp)
    chunk = torch.arange(4.0)[2 * tp.rank : 2 * tp.rank + 2] * ((first + 1) + (first + 2))
    assert torch.equal(out, chunk)
    peer = 1 - tp.rank
    got = torch.empty(2)
    work = CollectiveOps.send(torch.full((2,), float(rank)), dst=peer, group=tp, async_op=True)
    CollectiveOps.recv(got, src=peer, group=tp)
    work.wait()
    assert torch.equal(got, torch.full((2,), float(tp.ranks[peer])))
    CollectiveOps.barrier(group=tp)

    # group-rank-addressed sub-group of the world; non-members are told so
    odd = world.new_subgroup([1, 3])
    assert odd.ranks == (1, 3) and odd.is_member == (rank % 2 == 1)
    w = torch.ones(2)
    if odd.is_member:
        odd.all_reduce(w)
        assert torch.equal(w, torch.full((2,), 2.0))
    else:
        with pytest.raises(RankMismatchError, match=r"not a member of the group over ranks \[1, 3\]"):
            CollectiveOps.all_reduce(w, group=odd)
    with pytest.raises(GroupInvalidError, match="cannot be split into blocks of 3"):
        world.split(3)
    with pytest.raises(GroupInvalidError, match="duplicates"):
        world.new_subgroup([0, 0])
    with pytest.raises(GroupInvalidError, match="outside"):
        world.new_subgroup([4])
    with pytest.raises(InvalidArgumentError, match=r"group rank must be an int, got \[1\]"):
        world.new_subgroup([0, [1]])  # not a rank (unhashable): named, not a TypeError
    # NumPy's integers are ranks (np.arange, a config read with NumPy), as everywhere an int is taken
    pair = world.new_subgroup(np.arange(2))
    assert pair.ranks == (0, 1) and all(type(r) is int for r in pair.ranks)
    np_group = CommGroup(world.backend, world.backend.new_group(np.array([2, 3])))  # the backend's own check
    assert np_group.ranks == (2, 3)
    if pair.is_member:
        peer = np.int64(1 - rank)
        got = torch.empty(1)
        work = CollectiveOps.send(torch.full((1,), float(rank)), dst=peer, group=pair, async_op=True)
        CollectiveOps.recv(got, src=peer, group=pair)
        work.wait()
        assert got.item() == float(1 - rank)
    for bad in (np.float64(1.0), np.bool_(True)):
        with pytest.raises(InvalidArgumentError, match="group rank must be an int"):
            world.new_subgroup([0, bad])

    # default group: group=None means the world
    v = torch.ones(1)
    CollectiveOps.all_reduce(v)
    assert v.item() == 4.0
    assert sagellm_comm.init() is world  # same arguments: the same group
    sagellm_comm.destroy()
    with pytest.raises(sagellm_comm.NotInitializedError):
        CollectiveOps.all_reduce(v)
    return {"tp": list(tp.ranks)}


def test_tp_subgroups_reduce_independently_and_default_group() -> None:
    results = run_ranks(_tp_groups, 4, timeout=120)
    assert [r["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_comm_group_create_single_rank_context_manager() -> None:
    with CommGroup.create(world_size=1, rank=0, backend="gloo") as group:
        assert group.ranks == (0,) and group.device == torch.device("cpu")
        t = torch.tensor([1.0, 2.0])
        assert group.all_reduce(t, op="prod") is t
        assert torch.equal(t, torch.tensor([1.0, 2.0]))  # a product over one rank is the input itself
        assert "ranks=[0]" in repr(group)
    assert not group.backend.is_initialized


def test_comm_group_create_refuses_options_given_with_a_backend_instance() -> None:
    """Constructor options go to a backend made from a kind; with an instance (already constructed) they would be
    dropped, so they are refused by name, before any rendezvous."""
    instance = sagellm_comm.CommBackend.create("gloo")
    with pytest.raises(InvalidArgumentError, match=r"options \['device'\] were given with a 'gloo' backend") as err:
        CommGroup.create(world_size=1, rank=0, backend=instance, device="cpu")
    assert err.value.details == {"options": ["device"], "backend": "gloo"}
    assert not instance.is_initialized
    with pytest.raises(InvalidArgumentError, match=r"options \['device'\]"):
        sagellm_comm.init(rank=0, world_size=1, backend=instance, device="cpu")
    assert not instance.is_initialized
    with CommGroup.create(world_size=1, rank=0, backend=instance) as group:  # without options: the instance
        assert group.backend is instance


def test_comm_group_create_refuses_an_initialised_backend_instance_it_would_destroy() -> None:
    """A group made by create() destroys its backend with itself: one its caller initialised (and still uses) is
    refused, the caller's backend untouched; CommGroup(backend) is that backend's world group, and leaves it."""
    with sagellm_comm.CommBackend.create("gloo").init(rank=0, world_size=1) as instance:
        with pytest.raises(InvalidArgumentError, match=r"'gloo' backend instance is already initialised"):
            CommGroup.create(world_size=1, rank=0, backend=instance)
        with pytest.raises(InvalidArgumentError, match="already initialised"):
            sagellm_comm.init(rank=0, world_size=1, backend=instance)
        with pytest.raises(sagellm_comm.NotInitializedError):
            sagellm_comm.get_default_group()
        with CommGroup(instance) as world:
            assert world.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]
        assert instance.is_initialized  # still the caller's
        assert instance.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]


def _groups_made_in_different_orders(rank: int, world_size: int, port: int) -> list:
    world = sagellm_comm.init(backend="gloo", timeout=60)
    try:
        # ranks 0 and 1 make {0,1} first, ranks 2 and 3 make {2,3} first: torch would give both groups one
        # name (its count of groups made so far), so their rendezvous keys would collide
        first, then = ([0, 1], [2, 3]) if rank < 2 else ([2, 3], [0, 1])
        said = r"different groups \(\[0, 1\] on ranks \[0, 1\]; \[2, 3\] on ranks \[2, 3\]\)"
        with pytest.raises(GroupInvalidError, match=said):
            world.new_subgroup(first)
        with pytest.raises(GroupInvalidError, match="different groups"):
            world.new_subgroup(then)
        # nothing was made: groups made alike afterwards work
        tp = world.split(2)
        x = torch.full((3,), float(rank + 1))
        tp.all_reduce(x)
        return x.tolist()
    finally:
        sagellm_comm.destroy()


def test_groups_asked_for_differently_on_different_ranks_raise_on_every_rank() -> None:
    assert run_ranks(_groups_made_in_different_orders, 4, timeout=120) == [[3.0] * 3] * 2 + [[7.0] * 3] * 2


def test_init_again_on_another_backend_raises_naming_both() -> None:
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo")
    try:
        assert sagellm_comm.init(backend="gloo") is world  # the same backend: the same group
        assert sagellm_comm.init(backend=" GLOO ") is world
        assert sagellm_comm.init() is world  # "auto" asks for whichever backend runs
        assert sagellm_comm.init(backend=world.backend) is world
        with pytest.raises(InvalidArgumentError, match=r"initialised on backend 'gloo', asked for 'nccl'") as err:
            sagellm_comm.init(backend="nccl")
        assert err.value.details == {"running": "gloo", "requested": "nccl"}
        other = sagellm_comm.CommBackend.create("gloo")
        with pytest.raises(InvalidArgumentError, match=r"backend 'gloo', asked for another 'gloo' backend") as err:
            sagellm_comm.init(backend=other)
        assert err.value.details == {"running": "gloo", "requested": "gloo"}
        assert not other.is_initialized
        assert sagellm_comm.get_default_group() is world
    finally:
        sagellm_comm.destroy()


def test_init_again_with_other_backend_options_raises_naming_them() -> None:
    """A backend option given to init() again is compared with the one the default group was made with, as the
    timeout is: an option it was not made with, or another value, is refused rather than dropped."""
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo", device="cpu")
    try:
        assert sagellm_comm.init(device="cpu") is world  # the same option: the same group
        assert sagellm_comm.init() is world  # an option left out agrees with the one it was made with
        with pytest.raises(InvalidArgumentError, match=r"initialised with device='cpu', asked for device='meta'") as e:
            sagellm_comm.init(device="meta")
        assert e.value.details == {"options": ["device"]}
        assert sagellm_comm.get_default_group() is world
    finally:
        sagellm_comm.destroy()
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo")
    try:
        with pytest.raises(InvalidArgumentError, match=r"initialised with device not given, asked for device='cpu'"):
            sagellm_comm.init(device="cpu")
    finally:
        sagellm_comm.destroy()


def test_init_again_with_another_timeout_raises_naming_both() -> None:
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo", timeout=45)
    try:
        assert sagellm_comm.init(timeout=45.0) is world  # the same timeout: the same group
        assert sagellm_comm.init() is world  # a timeout left out agrees with the one running
        with pytest.raises(InvalidArgumentError, match=r"initialised with timeout 45s, asked for 12\.5s") as err:
            sagellm_comm.init(backend="gloo", timeout=12.5)
        assert err.value.details == {"running": 45.0, "requested": 12.5}
        assert world.backend.timeout == 45.0
        with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
            sagellm_comm.init(timeout=float("nan"))
        assert sagellm_comm.get_default_group() is world
    finally:
        sagellm_comm.destroy()
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo")  # after destroy(): the default timeout
    try:
        assert world.backend.timeout == sagellm_comm.backend.DEFAULT_TIMEOUT_S
        with pytest.raises(InvalidArgumentError, match=r"with timeout 30s, asked for 45s"):
            sagellm_comm.init(timeout=45)
    finally:
        sagellm_comm.destroy()


def test_init_with_a_rank_or_world_size_that_is_not_an_int_is_an_invalid_argument_running_or_not() -> None:
    """A rank or world size of the wrong type is the caller's argument error on every call, whether or not the
    default group is made: never read as another rank (a mismatch) nor converted."""
    for bad in ({"rank": "0"}, {"rank": 0.0}, {"rank": True}, {"world_size": "1"}, {"world_size": 1.0}):
        with pytest.raises(InvalidArgumentError, match="must be an int"):
            sagellm_comm.init(backend="gloo", **{"rank": 0, "world_size": 1, **bad})
    world = sagellm_comm.init(rank=0, world_size=1, backend="gloo")
    try:
        for bad in ({"rank": "0"}, {"rank": 0.0}, {"world_size": "1"}):
            with pytest.raises(InvalidArgumentError, match="must be an int"):
                sagellm_comm.init(**bad)
        assert sagellm_comm.init(rank=0, world_size=1) is world
    finally:
        sagellm_comm.destroy()


def _released_groups(rank: int, world_size: int, port: int) -> dict:
    """A sub-group released with ``destroy()`` (and ``backend.release_group``): what torch and the backend hold
    after it, what a call on it does, and groups made after it."""
    from sagellm_comm.backend import GroupHandle
    from sagellm_comm.errors import GroupNotFoundError

    world = sagellm_comm.init(backend="gloo", timeout=60)
    backend = world.backend
    try:
        pair = world.new_subgroup([0, 1])
        solo = world.split(1)  # {0} and {1}: this rank's, and the other rank's (a non-member's handle)
        made = backend.groups
        pgs = [pair.handle.engine_group, solo.handle.engine_group]
        x = torch.full((2,), float(rank + 1))
        pair.all_reduce(x)
        pair.destroy()
        pair.destroy()  # released already: left as it is
        seen = {"sum": x.tolist(), "made": [list(h.ranks) for h in made], "live": [pg_alive(pg) for pg in pgs]}
        with pytest.raises(GroupNotFoundError, match=r"group over ranks \[0, 1\] does not belong to this backend"):
            pair.all_reduce(x)
        for handle in backend.groups:
            backend.release_group(handle)
        seen["left"] = [list(h.ranks) for h in backend.groups]
        seen["live after"] = [pg_alive(pg) for pg in pgs]
        with pytest.raises(GroupNotFoundError, match="was not made by this backend"):
            backend.release_group(GroupHandle((0, 1), rank))
        with pytest.raises(InvalidArgumentError, match="the world is not a sub-group"):
            backend.release_group(world)
        CommGroup(backend).destroy()  # a world group over a backend its caller initialised: nothing
        again = world.split(2)  # made anew after the releases
        y = torch.full((3,), float(rank + 1))
        again.all_reduce(y)
        seen["again"] = y.tolist()
        return seen
    finally:
        sagellm_comm.destroy()


def test_a_released_sub_group_is_gone_from_torch_and_the_backend() -> None:
    """``group.destroy()`` on a sub-group (``backend.release_group``) destroys its process groups at once, not at
    the backend's ``destroy()``; a later call on it raises ``GroupNotFoundError``; a release again does nothing."""
    for seen in run_ranks(_released_groups, 2, timeout=120):
        assert seen["sum"] == [3.0, 3.0] and seen["made"] == [[0, 1], [0], [1]], seen
        assert seen["live"] == [False, True], seen  # the pair's, released; the split block's, still held
        assert seen["left"] == [] and seen["live after"] == [False, False], seen
        assert seen["again"] == [3.0] * 3, seen


def _split_again_and_again(rank: int, world_size: int, port: int, cycles: int) -> dict:
    """``split(1)`` (this rank's block, and the other rank's, whose handle here holds nothing but its place in the
    backend's records), a call on it and its ``destroy()``, again and again: what the backend and the process hold
    after a warm-up and after ``cycles`` more."""
    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, timeout=60)
    backend = world.backend
    held = []

    def cycle() -> None:
        block = world.split(1)
        x = torch.full((2,), float(rank + 1))
        block.all_reduce(x)
        assert x.tolist() == [float(rank + 1)] * 2
        block.destroy()
        held.append(len(backend.groups))

    try:
        cycle()
        warm = process_resources()
        for _ in range(cycles):
            cycle()
        return {"held": held, "warm": warm, "after": resources_back_to(warm)}
    finally:
        sagellm_comm.destroy()


def test_destroying_a_split_block_releases_every_block_the_split_made_on_this_rank() -> None:
    """``split`` makes every block on every rank and returns this rank's: its ``destroy()`` releases the other blocks
    this split made here too.  They stayed in the backend's records until its ``destroy()``, one more per split on
    every rank, so a process splitting and releasing again and again held more and more."""
    for out in run_ranks(_split_again_and_again, 2, 6, timeout=120):
        assert out["held"] == [0] * 7, out
        assert all(out["after"][key] <= out["warm"][key] for key in out["warm"]), out


def _backend_failing_blocks():
    """A Gloo backend whose set-up of a block fails on a rank after torch made the block's process group (as a
    member's workspace or self-test can): it releases what it made and raises, as a backend's ``new_group`` does.
    ``fail``: (the block's global ranks, the failing rank) -> the error, each used once; ``made``: every handle
    made."""
    from sagellm_comm.backends.torch_distributed import TorchDistributedBackend

    class FailingBlocks(TorchDistributedBackend):
        def __init__(self) -> None:
            super().__init__("gloo")
            self.fail: dict = {}
            self.made: list = []

        def new_group(self, ranks):
            handle = super().new_group(ranks)
            self.made.append(handle)
            error = self.fail.pop((handle.ranks, self.rank), None)
            if error is not None:
                self.release_group(handle)
                raise error
            return handle

    return FailingBlocks()


def _split_with_failing_blocks(rank: int, world_size: int, port: int) -> dict:
    """``split(2)`` of four ranks with the first block failing on rank 1, then with the last block failing on ranks
    2 and 3: what each rank raised and how soon, what it still holds; then a split that works."""
    from sagellm_comm.errors import CommTimeoutError, WorkspaceExhaustedError

    backend = _backend_failing_blocks()
    world = CommGroup.create(backend=backend, timeout=60)
    seen: dict = {}
    try:
        for name, fail in (
            ("one", {((0, 1), 1): MemoryError("no memory for the group's workspace")}),
            (
                "two",
                {
                    ((2, 3), 2): CommTimeoutError("the group's self-test did not finish within 60s"),
                    ((2, 3), 3): WorkspaceExhaustedError("the group's workspace does not fit"),
                },
            ),
        ):
            backend.fail, backend.made = fail, []
            start = time.monotonic()
            with pytest.raises(sagellm_comm.CommError) as raised:
                world.split(2)
            seen[name] = {
                "type": type(raised.value).__name__,
                "message": str(raised.value),
                "details": raised.value.details,
                "cause": type(raised.value.__cause__).__name__,
                "seconds": time.monotonic() - start,
                "held": [list(h.ranks) for h in backend.groups],
                "live": [pg_alive(h.engine_group) for h in backend.made if h.engine_group is not None],
            }
        tp = world.split(2)
        x = torch.full((3,), float(rank + 1))
        tp.all_reduce(x)
        seen["after"] = (x.tolist(), [list(h.ranks) for h in backend.groups])
        return seen
    finally:
        world.destroy()


def test_blocks_that_fail_on_some_ranks_fail_split_on_every_rank_at_once() -> None:
    """Every rank raises the same typed error naming the block, the failed ranks and their messages, well within
    the timeout (no rank goes on to the next block to wait there for a failed rank), and every rank has released
    the blocks it made; a split after it works."""
    results = run_ranks(_split_with_failing_blocks, 4, timeout=240)
    for rank, seen in enumerate(results):
        one, two = seen["one"], seen["two"]
        assert one["type"] == "CollectiveFailedError", seen  # an untyped failure travels as this class
        assert one["message"] == (
            "[comm_collective_failed] split(2): the set-up of block 0 (ranks [0, 1]) failed on rank 1 (rank 1: "
            "[comm_collective_failed] MemoryError: no memory for the group's workspace)"
        ), one
        assert one["details"] == {
            "block": 0,
            "block_ranks": [0, 1],
            "failed_ranks": {1: "comm_collective_failed"},
            "messages": {1: "MemoryError: no memory for the group's workspace"},
        }, one
        assert two["type"] == "CommTimeoutError", seen  # the lowest failed rank's class, on every rank
        assert two["message"] == (
            "[comm_timeout] split(2): the set-up of block 1 (ranks [2, 3]) failed on ranks [2, 3] (rank 2: "
            "[comm_timeout] CommTimeoutError: the group's self-test did not finish within 60s; rank 3: "
            "[comm_workspace_exhausted] WorkspaceExhaustedError: the group's workspace does not fit)"
        ), two
        assert two["details"]["failed_ranks"] == {2: "comm_timeout", 3: "comm_workspace_exhausted"}, two
        # a failed rank raises it from its own error
        assert one["cause"] == ("MemoryError" if rank == 1 else "NoneType"), one
        assert two["cause"] == {2: "CommTimeoutError", 3: "WorkspaceExhaustedError"}.get(rank, "NoneType"), two
        # this rank's process group of each block made (none where it is not a member): all destroyed
        assert one["live"] == ([False] if rank < 2 else []) and two["live"] == [False], seen
        for outcome in (one, two):
            assert outcome["seconds"] < 20, outcome  # the timeout is 60 s
            assert outcome["held"] == [], outcome
        assert seen["after"] == ([3.0] * 3 if rank < 2 else [7.0] * 3, [[0, 1], [2, 3]]), seen
