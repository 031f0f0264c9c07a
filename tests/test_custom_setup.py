"""Peer access in the custom kernels' set-up, decided per pair of physical GPUs (CPU: the CUDA and NVML calls are
stand-ins for one node's).

The node has four GPUs: 0-1 and 2-3 reach each other, no other pair does.  Each simulated rank sees the GPUs its
``CUDA_VISIBLE_DEVICES`` lists, in that order, as ``cuda:0``, ``cuda:1``...; every member's set-up is played in
this process, each member's queries answered as its own process's driver would answer them.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from sagellm_comm.backends import custom_setup
from sagellm_comm.errors import CommError
from sagellm_comm.selector import AlgoSelector
from sagellm_comm.workspace import SymmetricWorkspace

UUIDS = [f"5d1c0a7e-0000-4000-8000-00000000000{gpu}" for gpu in range(4)]  # as torch writes them (no "GPU-")
REACH = {frozenset((0, 1)), frozenset((2, 3))}


class Node:
    """The node's GPUs as seen from each rank: ``visible[rank]`` (physical GPUs, in ``CUDA_VISIBLE_DEVICES`` order)
    and ``index[rank]`` (the rank's device in its own numbering); ``nvml``: whether NVML answers."""

    def __init__(self, monkeypatch, visible, index, nvml=True):
        self.monkeypatch, self.visible, self.index, self.nvml = monkeypatch, visible, index, nvml
        self.asked: list[tuple[int, int, int]] = []  # (rank, physical GPU, physical GPU) the driver was asked about
        self.rank = 0

    def physical(self, device) -> int:
        index = device.index if isinstance(device, torch.device) else device
        return self.visible[self.rank][index]

    def can_access(self, a: int, b: int) -> bool:
        pair = (self.physical(a), self.physical(b))
        self.asked.append((self.rank, *pair))
        return frozenset(pair) in REACH  # the driver answers no for a == b

    def pynvml(self) -> types.ModuleType:
        nv = types.ModuleType("pynvml")
        nv.NVML_P2P_CAPS_INDEX_READ, nv.NVML_P2P_CAPS_INDEX_WRITE, nv.NVML_P2P_STATUS_OK = 0, 1, 0

        def init():
            if not self.nvml:
                raise RuntimeError("NVML Shared Library Not Found")

        nv.nvmlInit, nv.nvmlShutdown = init, lambda: None
        nv.nvmlDeviceGetHandleByUUID = lambda uuid: UUIDS.index(uuid.removeprefix("GPU-"))
        nv.nvmlDeviceGetP2PStatus = lambda a, b, caps: 0 if frozenset((a, b)) in REACH else 4
        return nv

    @contextlib.contextmanager
    def as_rank(self, rank: int):
        """This process as rank ``rank``'s: its devices, its driver's answers, NVML (the node's)."""
        before, self.rank = self.rank, rank
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "device_count", lambda: len(self.visible[rank]))
            patch.setattr(torch.cuda, "get_device_properties", self.properties)
            patch.setattr(torch.cuda, "can_device_access_peer", self.can_access)
            patch.setitem(sys.modules, "pynvml", self.pynvml())
            try:
                yield
            finally:
                self.rank = before

    def properties(self, device) -> types.SimpleNamespace:
        return types.SimpleNamespace(uuid=UUIDS[self.physical(device)])

    def set_up(self, rank: int) -> str:
        """Rank ``rank``'s :class:`KernelGroup` set-up, the others' sides of its exchanges played by their own
        views; its reason (the workspace rendezvous, which needs GPUs, reached means peer access passed)."""
        ranks = tuple(range(len(self.visible)))
        devices = [torch.device("cuda", self.index[r]) for r in ranks]

        identities = []

        def exchange(obj, what):
            if "nodes, devices" in what:  # every member's facts: its GPU as its own process names it
                for r in ranks:
                    with self.as_rank(r):
                        identities.append(obj[1] if r == rank else custom_setup.device_identity(devices[r]))
                return [(obj[0], identity, *obj[2:]) for identity in identities]
            if "peer access" in what:  # every member's answer, from its own process
                answers = []
                for r in ranks:
                    with self.as_rank(r):
                        answers.append(custom_setup.peer_access_refusal(devices[r], identities, ranks))
                assert answers[rank] == obj
                return answers
            return [obj] * len(ranks)

        self.monkeypatch.setattr(custom_setup, "cupy_present", lambda: True)

        def rendezvous(*args, **kwargs):
            raise CommError("the workspace rendezvous was reached")

        self.monkeypatch.setattr(SymmetricWorkspace, "rendezvous", rendezvous)
        with self.as_rank(rank):
            group = custom_setup.KernelGroup(
                rank, len(ranks), ranks, exchange, devices[rank], 1 << 16, AlgoSelector(), 5.0, lambda t: t
            )
        assert group.kernels is None
        return group.reason


PASSED = "workspace setup failed"  # peer access let the set-up through to the workspace


def name(gpu: int) -> str:
    return f"GPU-{UUIDS[gpu]}"


def test_ranks_that_each_see_one_gpu_are_decided_by_their_physical_gpus(monkeypatch):
    """One GPU visible per process: every rank's GPU is its cuda:0, and the pair is the two physical GPUs (NVML
    answers, the driver of neither process seeing the other's GPU)."""
    reaching = Node(monkeypatch, visible=[[0], [1]], index=[0, 0])
    assert reaching.set_up(0).startswith(PASSED)
    apart = Node(monkeypatch, visible=[[0], [2]], index=[0, 0])
    reason = apart.set_up(0)
    assert reason == (
        f"rank 0: {name(0)} (cuda:0 here) cannot access rank 1's {name(2)}, which this process does not see "
        "(CUDA_VISIBLE_DEVICES): no peer access, as NVML reports (PCIe without P2P?)"
    ), reason
    assert apart.set_up(1) == reason  # every member takes the same path


def test_an_index_is_mapped_to_the_gpu_it_names_in_each_process(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0 and =0,2, each rank on its cuda:1: the same index, two GPUs that cannot reach each
    other; each rank asks its driver about the pair by its own indices."""
    node = Node(monkeypatch, visible=[[2, 0], [0, 2]], index=[1, 1])
    reason = node.set_up(0)
    assert reason == (
        f"rank 0: {name(0)} (cuda:1 here) cannot access rank 1's {name(2)} (cuda:0 here): no peer access, as the "
        "driver reports (PCIe without P2P?)"
    ), reason
    assert {(0, 0, 2), (1, 2, 0)} <= set(node.asked), node.asked
    swapped = Node(monkeypatch, visible=[[1, 0], [0, 1]], index=[1, 1])  # GPUs 0 and 1, which reach each other
    assert swapped.set_up(1).startswith(PASSED)


def test_ranks_on_one_physical_gpu_need_no_peer_access(monkeypatch):
    """Two processes on GPU 0 (MPS), known to them as cuda:0 and cuda:1: the same device, nothing to ask, although
    their indices 0 and 1 name GPUs 0 and 2 in the first process, which cannot reach each other."""
    node = Node(monkeypatch, visible=[[0, 2], [2, 0]], index=[0, 1])
    assert node.set_up(0).startswith(PASSED)
    assert node.asked == []


def test_a_pair_the_driver_says_cannot_reach_each_other_is_refused_naming_both_gpus(monkeypatch):
    """Every GPU visible to every rank: ranks on GPUs 1 and 2, which cannot reach each other."""
    node = Node(monkeypatch, visible=[[0, 1, 2, 3]] * 2, index=[1, 2])
    reason = node.set_up(1)
    assert reason == (
        f"rank 0: {name(1)} (cuda:1 here) cannot access rank 1's {name(2)} (cuda:2 here): no peer access, as the "
        "driver reports (PCIe without P2P?)"
    ), reason
    assert Node(monkeypatch, visible=[[0, 1, 2, 3]] * 2, index=[2, 3]).set_up(0).startswith(PASSED)


def test_a_gpu_that_neither_the_driver_nor_nvml_can_be_asked_about_is_refused(monkeypatch):
    node = Node(monkeypatch, visible=[[0], [1]], index=[0, 0], nvml=False)
    reason = node.set_up(0)
    assert reason == (
        f"rank 0: cannot tell whether {name(0)} (cuda:0 here) can access rank 1's {name(1)}, which this process does "
        "not see (CUDA_VISIBLE_DEVICES): NVML cannot answer for the two GPUs; make every member's GPU visible to "
        "every member (CUDA_VISIBLE_DEVICES) so that the driver answers"
    ), reason


@pytest.mark.gpu
def test_on_gpus_the_answer_for_two_visible_gpus_is_the_drivers():
    """The GPUs' own UUIDs: one GPU is the same device, nothing asked; two visible GPUs get the driver's answer."""
    from sagellm_comm.workspace import device_identity

    count = torch.cuda.device_count()
    identities = [device_identity(torch.device("cuda", i)) for i in range(count)]
    assert len(set(identities)) == count, identities
    first = torch.device("cuda", 0)
    assert custom_setup.peer_access_refusal(first, [identities[0]] * 2, (0, 1)) is None
    if count < 2:
        pytest.skip("one GPU: no pair to ask about")
    reason = custom_setup.peer_access_refusal(first, identities[:2], (0, 1))
    assert (reason is None) == torch.cuda.can_device_access_peer(0, 1), reason
