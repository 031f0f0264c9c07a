"""The custom kernels on sub-groups (TP x DP, TP x PP) and on simulated nodes: CPU, interpreter, processes.

Every group from ``split`` / ``new_subgroup`` inside one node gets its own symmetric workspace and runs the
kernels; groups of one world run at the same time (each process is in one TP group and the world).  Nodes
are simulated with ``SAGELLM_COMM_HOSTNAME``.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_ranks

INTERP = {"TRITON_INTERPRET": "1", "SAGELLM_COMM_INITIAL_EPOCH": None, "SAGELLM_COMM_CHECK": None,
          "SAGELLM_COMM_MAX_PROGRAMS": "2"}  # fmt: skip
KERNELS = ("one_shot", "two_shot", "lamport")


def _tp_worker(rank, world_size, port, tp_sizes, nodes):
    import os

    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm, last_selection

    if nodes:
        os.environ["SAGELLM_COMM_HOSTNAME"] = f"node{rank * nodes // world_size}"
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, max_bytes=16384
    )
    backend = world.backend
    out = {"world_kernels": backend.kernels_for(None) is not None, "world_reason": backend.custom_reason}
    try:
        for tp_size in tp_sizes:
            tp = world.split(tp_size)
            members = tp.ranks
            got = {"members": members, "kernels": backend.kernels_for(tp) is not None}
            got["reason"] = backend.kernels_reason(tp)
            results = []
            for i, algo in enumerate(("auto", *KERNELS)):
                x = torch.full((37 + i,), float(rank + 1 + i))
                tp.all_reduce(x) if algo == "auto" else backend.all_reduce(x, group=tp, algo=algo)
                want = float(sum(r + 1 + i for r in members))
                results.append(
                    (bool(torch.all(x == want)), backend.last_selection.algo, backend.last_selection.rule_id)
                )
            got["results"] = results
            # the fused AR + RMSNorm on the same group's workspace
            xs = torch.full((2, 8), float(rank + 1))
            residual = torch.ones(2, 8)
            _, new_res = all_reduce_residual_rmsnorm(xs, residual, torch.ones(8), group=tp)
            got["fused"] = (bool(torch.all(new_res == 1 + sum(r + 1 for r in members))), last_selection(tp).algo)
            # all-gather and reduce-scatter on the group's kernels, through the backend
            n = len(members)
            gathered = torch.empty(n * 3)
            backend.all_gather(gathered, torch.full((3,), float(rank)), group=tp)
            ag = (bool(torch.equal(gathered, torch.tensor([float(r) for r in members]).repeat_interleave(3))),
                  backend.last_selection.algo)  # fmt: skip
            shard = torch.empty(5)
            backend.reduce_scatter(shard, torch.arange(n * 5, dtype=torch.float32) + rank, group=tp)
            me = members.index(rank)
            want = torch.arange(me * 5, me * 5 + 5, dtype=torch.float32) * n + sum(members)
            rs = (bool(torch.equal(shard, want)), backend.last_selection.algo)
            listed = [torch.empty(3) for _ in members]  # a list output: the engine's all-gather
            backend.all_gather(listed, torch.full((3,), float(rank)), group=tp)
            got["gather_scatter"] = (ag, rs, backend.last_selection.algo)
            # the world group still works, interleaved with the sub-group's calls
            y = torch.full((5,), float(rank))
            world.all_reduce(y)
            got["world_sum_ok"] = bool(torch.all(y == world_size * (world_size - 1) / 2))
            out[tp_size] = got
    finally:
        sagellm_comm.destroy()
    return out


def _check_tp(per_rank, tp_sizes, world_kernels=True):
    for rank, out in enumerate(per_rank):
        assert out["world_kernels"] is world_kernels, out["world_reason"]
        for tp_size in tp_sizes:
            got = out[tp_size]
            assert rank in got["members"] and len(got["members"]) == tp_size
            assert got["kernels"], got["reason"]
            assert f"ranks {list(got['members'])}" in got["reason"] and "MiB of workspace" in got["reason"]
            for ok, algo, rule in got["results"]:
                assert ok and algo in KERNELS, (algo, rule)
            assert got["results"][0][2] not in ("engine", "user")  # auto: a selector rule ran
            assert got["fused"] == (True, got["fused"][1]) and got["fused"][1] in ("lamport", "one_shot", "two_shot")
            assert got["world_sum_ok"]
            assert got["gather_scatter"] == ((True, "kernel"), (True, "kernel"), "gloo"), got["gather_scatter"]


def test_two_tp_groups_of_two_in_a_world_of_four():
    _check_tp(run_ranks(_tp_worker, 4, (2,), 0, env=INTERP, timeout=540), (2,))


@pytest.mark.slow
@pytest.mark.parametrize("tp_sizes", [(4, 2)], ids=["tp4x2-then-tp2x4"])
def test_tp_groups_in_a_world_of_eight(tp_sizes):
    _check_tp(run_ranks(_tp_worker, 8, tp_sizes, 0, env=INTERP, timeout=540), tp_sizes)


def test_tp_groups_inside_simulated_nodes_get_the_kernels_while_the_world_does_not():
    per_rank = run_ranks(_tp_worker, 4, (2,), 2, env=INTERP, timeout=540)
    _check_tp(per_rank, (2,), world_kernels=False)
    assert "span 2 nodes" in per_rank[0]["world_reason"], per_rank[0]["world_reason"]


def _capped_worker(rank, world_size, port):
    import sagellm_comm
    from sagellm_comm import workspace

    # Program counts as a GPU would propose them (8 "SMs" here): a group of 2 on a device shared by the 4
    # processes of the world must take 8 // 4, not 8 // 2, since the other group runs on the same SMs.
    workspace.default_max_programs = lambda device, ranks_on_device=1, override=None: 8 // ranks_on_device
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, max_bytes=16384,
        group_max_bytes=4096,
    )  # fmt: skip
    try:
        tp = world.split(2)
        car = world.backend.kernels_for(tp)
        assert (
            car is not None and car.workspace.slot_bytes == 4096 and world.backend.custom.workspace.slot_bytes == 16384
        )
        assert world.backend._processes_on_device == 4
        assert car.workspace.max_programs == 2 and world.backend.custom.workspace.max_programs == 2
        x = torch.ones(2048)  # 8 KB: over the group's 4 KB workspace, so the engine runs it
        tp.all_reduce(x)
        sel = world.backend.last_selection
        assert torch.all(x == 2.0) and sel.algo == "gloo" and sel.rule_id == "over-workspace", sel
    finally:
        sagellm_comm.destroy()


def test_a_user_caps_the_group_workspace_and_groups_sharing_a_device_divide_its_sms():
    run_ranks(_capped_worker, 4, env=INTERP, timeout=540)


def test_a_set_up_that_fails_after_the_workspace_was_made_releases_it(monkeypatch):
    """A member that stops answering between the workspace rendezvous and the self-test's verdicts (a reset
    after a failure, a rank killed during set-up) leaves no workspace behind on the others: each failed
    set-up would keep one (its memory, its peer mappings and the watchdog's polling) for the life of the job."""
    import os

    from sagellm_comm.backends import custom_setup
    from sagellm_comm.selector import AlgoSelector
    from sagellm_comm.workspace import SymmetricWorkspace

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    made = []
    rendezvous = SymmetricWorkspace.rendezvous.__func__

    def recording(cls, *args, **kwargs):
        made.append(rendezvous(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(SymmetricWorkspace, "rendezvous", classmethod(recording))
    monkeypatch.setattr(custom_setup.KernelGroup, "_self_test", lambda self, car: True)

    def exchange(obj, what):  # a peer that mirrors this rank, then is gone when the verdicts are exchanged
        if isinstance(obj, bool):
            raise RuntimeError("Connection closed by peer")
        return [obj, obj]

    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(RuntimeError, match="closed by peer"):
            custom_setup.KernelGroup(
                0, 2, (0, 1), exchange, torch.device("cpu"), 1 << 16, AlgoSelector(), 5.0, lambda t: t
            )  # fmt: skip
    assert len(made) == 20 and all(ws.closed for ws in made)
    assert len(os.listdir("/proc/self/fd")) <= fds
