"""The custom kernels of one group: the collective decision, the workspace, the self-test.

A :class:`KernelGroup` is made collectively by the members of one group (the world, or a sub-group from
``new_group`` / ``split``), over that group's CPU (Gloo) side.  The members first compare the agreed part of
their configuration (``docs/configuration.md``): a difference raises
:class:`~sagellm_comm.errors.ConfigMismatchError` naming the setting and the ranks (it is an error, not a
reason to fall back: the engine would run, but the job is misconfigured).  A group that gets the kernels then
compares its members' policies, a digest of the all-reduce's rules (``selector``), of the fused RMSNorm's
(``fusion_policy``) and of the fused GEMM + all-reduce's paths (``gemm_policy``): members deciding by other
rules would run other kernels for one call, so a difference raises ``ConfigMismatchError`` too
(:func:`check_policies`).  The kernels are used only when every check passes on every member:

1. 2..8 members, all on one node (node names gathered over the group: the host name, or
   ``SAGELLM_COMM_HOSTNAME`` where a test simulates nodes);
2. CUDA: every pair of the members' GPUs has peer access (members sharing one GPU, processes under MPS,
   need none), and CuPy is installed for IPC handles.  GPUs are told apart by UUID, never by index: a
   process's indices follow its ``CUDA_VISIBLE_DEVICES``, so with one GPU visible per process every
   member's GPU is its ``cuda:0``.  Each member asks about its own GPU and every other member's
   (:func:`peer_access_refusal`): its driver where it sees that GPU, else NVML, which sees every GPU of the
   node; the answers are exchanged, and one member's no is every member's;
3. a real self-test all-reduce through the opened peer mappings gives the exact expected sum on every
   member (``canAccessPeer`` has lied before).

Otherwise :attr:`KernelGroup.kernels` is None and :attr:`KernelGroup.reason` says why; the backend then
runs that group's calls on the engine.  A step after the first exchange that fails on some members only (the
workspace, the all-reduce over it, the self-test) does not leave the others waiting: a failed member sends its
error to the next exchange in place of its part, and every member then decides alike.  Where every failure is
typed (a :class:`~sagellm_comm.errors.CommError`: a region that cannot be allocated or mapped, a refusal), the
group runs on the engine and the reason names the failed ranks with their errors; otherwise (a ``MemoryError``,
an untyped ``RuntimeError``) every member raises: a failed member its own error, the others
:class:`~sagellm_comm.errors.CollectiveFailedError` naming the failed ranks and their errors.

Each group has its own symmetric workspace of ``region_bytes(slot_bytes, members)`` per member (``slot_bytes`` =
the backend's ``max_bytes`` for the world, ``group_max_bytes`` for sub-groups), released by
:meth:`KernelGroup.close`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..config import CommConfig, check_agreement
from ..cupy_probe import cupy_present
from ..custom_all_reduce import CustomAllReduce
from ..errors import CollectiveFailedError, CommError, ConfigMismatchError
from ..fused.gemm_policy import GemmPathSelector
from ..fused.rmsnorm_policy import FusionPolicy
from ..kernels.all_reduce import MAX_WORLD
from ..selector import KERNEL_ALGOS, AlgoSelector
from ..topology import nvml_peer_access
from ..workspace import SymmetricWorkspace, device_identity, node_name, region_bytes


class KernelGroup:
    """The custom all-reduce of one group on this rank (see the module docstring).

    Args:
        rank, world_size: this rank's index in the group and the group's size.
        ranks: the members' global ranks (for messages).
        exchange: ``exchange(obj, what)`` -> every member's ``obj`` in group-rank order (over the group's Gloo
            side); ``what`` names the exchange, for the typed error the exchange raises when a member is gone.
        device: this rank's device.
        slot_bytes: the workspace's message capacity.
        selector, timeout_s: as for :class:`CustomAllReduce`.
        fallback: the engine's in-place SUM all-reduce over this group (``algo="nccl"`` and over-size calls).
        one_node: refuse members on different nodes (False only for the cross groups of *simulated* nodes,
            ``SAGELLM_COMM_HIER_CROSS=kernels``: the peer mappings and the self-test still decide).
        processes_on_device: processes of the whole world on this rank's GPU (see
            :meth:`SymmetricWorkspace.rendezvous`: groups running at once on one GPU share its SMs).
        config: the backend's configuration (tile shapes, check mode, initial epoch, ... of the workspace).
        fusion_policy: the fusion rules the group-level fused all-reduce + RMSNorm runs on this group (default
            rules when omitted); compared, with ``selector``, among the members (:func:`check_policies`).
        gemm_policy: the path rules the group-level fused GEMM + all-reduce runs on this group (default rules when
            omitted); compared with the others.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        ranks: tuple[int, ...],
        exchange: Callable[[Any], list[Any]],
        device: torch.device,
        slot_bytes: int,
        selector: AlgoSelector,
        timeout_s: float,
        fallback: Callable[[torch.Tensor], torch.Tensor],
        one_node: bool = True,
        processes_on_device: int = 1,
        config: CommConfig | None = None,
        fusion_policy: FusionPolicy | None = None,
        gemm_policy: GemmPathSelector | None = None,
    ):
        self.config = CommConfig.from_env() if config is None else config
        self.rank, self.world_size, self.ranks = rank, world_size, tuple(ranks)
        self.one_node = one_node
        self.processes_on_device = processes_on_device
        self.device = device
        self.kernels: CustomAllReduce | None = None
        self.reason = "not set up"
        self.nbytes = 0  # device memory of this rank's region
        self._send = exchange
        self.fusion_policy = fusion_policy or FusionPolicy()
        self.gemm_policy = gemm_policy or GemmPathSelector()
        self.kernels, self.reason = self._setup(slot_bytes, selector, timeout_s, fallback)
        if self.kernels is not None:
            self.nbytes = region_bytes(self.kernels.workspace.slot_bytes, world_size)

    def _exchange(self, obj: Any, what: str = "the workspace rendezvous") -> list[Any]:
        """``exchange(obj, what)`` with ``what`` saying which set-up step of which group (default: the workspace's
        rendezvous, which calls it with one argument)."""
        return self._send(obj, f"the custom kernels' set-up of ranks {list(self.ranks)}: {what}")

    def _setup(self, slot_bytes, selector, timeout_s, fallback) -> tuple[CustomAllReduce | None, str]:
        local_ok, local_reason = self._local_checks()
        policies = policy_digests(selector, self.fusion_policy, self.gemm_policy)
        gpu = device_identity(self.device)  # the GPU's UUID: each process's indices follow its CUDA_VISIBLE_DEVICES
        facts = self._exchange(
            (node_name(self.config), gpu, local_ok, local_reason, self.config.agreement(), policies),
            "comparing the members' nodes, devices, settings and policies",
        )
        where = f"the set-up of the group of ranks {list(self.ranks)}"
        check_agreement([f[4] for f in facts], self.ranks, where)
        reason = self._verdict(facts)
        if reason is None:  # each rank's driver answers for itself: every member takes the path of all the answers
            answers = self._exchange(self._peer_access(facts), "comparing each member's peer access")
            reason = next((f"rank {self.ranks[r]}: {why}" for r, why in enumerate(answers) if why is not None), None)
        if reason is not None:  # the engine runs the group: no policy of this backend decides its calls
            return None, reason
        check_policies([f[5] for f in facts], self.ranks, where)
        ws = car = None
        try:  # a member whose part fails sends its failure to the exchange the others wait in, and decides with them
            ws = SymmetricWorkspace.rendezvous(
                self.rank, self.world_size, slot_bytes, self.device, self._exchange,
                processes_on_device=self.processes_on_device, config=self.config, ranks=self.ranks,
            )  # fmt: skip
            if self.ranks != tuple(range(self.world_size)):
                ws.global_ranks = self.ranks
            car = CustomAllReduce(ws, selector=selector, timeout_s=timeout_s, fallback=fallback)
            failure = None
        except Exception as exc:
            failure = exc
        try:
            made = self._share(None, failure, "whether every member made its workspace and all-reduce")
            reason = self._decide(made, failure, "workspace setup")
            if reason is not None:  # every failure was typed: the engine runs the group
                _release(ws, car)
                return None, reason
            try:
                ok, failure = self._self_test(car), None
            except Exception as exc:
                ok, failure = False, exc
            verdicts = self._share(ok, failure, "the self-test's verdicts")
            reason = self._decide(verdicts, failure, "self-test")
            if reason is not None:
                _release(ws, car)
                return None, reason
        except BaseException:  # a member gone or failed before the verdicts (reset after a failure...): nothing is kept
            _release(ws, car)
            raise
        if not all(verdicts):
            car.close()
            bad = [self.ranks[r] for r, v in enumerate(verdicts) if not v]
            return None, f"self-test all-reduce through peer mappings gave wrong results on ranks {bad}"
        return car, (
            f"custom kernels on {self.world_size} ranks of one node ({self.device.type}; ranks "
            f"{list(self.ranks)}; {region_bytes(ws.slot_bytes, self.world_size) >> 20} MiB of workspace per rank)"
        )

    def _share(self, answer: Any, failure: Exception | None, what: str) -> list[Any]:
        """Every member's answer to the exchange ``what``: this member sends ``answer``, or its ``failure`` where
        its own step failed.  Where the exchange fails too (a member gone), a failed member raises its own error,
        the first one, with the exchange's as a note."""
        try:
            return self._exchange(answer if failure is None else _Failed.of(failure), what)
        except Exception as exc:
            if failure is None:
                raise
            failure.add_note(f"then sending it to the other members failed: {exc}")
        raise failure

    def _decide(self, answers: list[Any], failure: Exception | None, step: str) -> str | None:
        """After the exchange that follows ``step``, the same decision on every member: None where no member failed;
        the reason to run the group on the engine where every failure was typed (a :class:`CommError`); otherwise
        raise, a failed member its own error (``failure``), the others :class:`CollectiveFailedError` naming the
        failed ranks with their errors."""
        failed = {self.ranks[r]: answer for r, answer in enumerate(answers) if isinstance(answer, _Failed)}
        if not failed:
            return None
        who = f"ranks {list(failed)}" if len(failed) > 1 else f"rank {next(iter(failed))}"
        each = "; ".join(f"rank {r}: {answer.error}" for r, answer in failed.items())
        if all(answer.typed for answer in failed.values()):
            return f"{step} failed on {who} ({each})"
        if failure is not None:
            raise failure
        raise CollectiveFailedError(
            f"the custom kernels' set-up of ranks {list(self.ranks)}: {step} failed on {who} ({each})",
            details={"failed_ranks": list(failed), "messages": {r: answer.error for r, answer in failed.items()}},
        )

    def _local_checks(self) -> tuple[bool, str]:
        if not 2 <= self.world_size <= MAX_WORLD.value:
            return False, f"group size {self.world_size} is outside 2..{MAX_WORLD.value}"
        if self.device.type == "cuda" and not cupy_present():
            return False, "CuPy is not installed (needed for CUDA IPC handles)"
        return True, ""

    def _verdict(self, facts: list[tuple]) -> str | None:
        bad = [(self.ranks[r], why) for r, (_, _, ok, why, *_) in enumerate(facts) if not ok]
        if bad:
            return "; ".join(f"rank {r}: {why}" for r, why in bad)
        nodes = {h for h, *_ in facts}
        if len(nodes) > 1 and self.one_node:
            return f"ranks {list(self.ranks)} span {len(nodes)} nodes ({sorted(nodes)}); the kernels need one node"
        return None

    def _peer_access(self, facts: list[tuple]) -> str | None:
        """Why this rank's GPU cannot reach another member's (:func:`peer_access_refusal`), or None."""
        if self.device.type != "cuda":
            return None
        return peer_access_refusal(self.device, [identity for _, identity, *_ in facts], self.ranks)

    def _self_test(self, car: CustomAllReduce) -> bool:
        numel = min(4099, car.workspace.slot_bytes // 4)  # odd, and fits any workspace
        expected = float(sum(range(1, self.world_size + 1)))
        try:
            for algo in KERNEL_ALGOS:
                x = torch.full((numel,), float(self.rank + 1), dtype=torch.float32, device=self.device)
                car.all_reduce(x, algo=algo)
                car.synchronize()
                if not bool(torch.all(x == expected)):
                    return False
        except CommError:
            return False
        return True

    @classmethod
    def unavailable(cls, rank: int, world_size: int, ranks: tuple[int, ...], reason: str, one_node: bool = True):
        """A group whose set-up could not finish (a member did not answer): no kernels, ``reason`` says why."""
        group = cls.__new__(cls)
        group.rank, group.world_size, group.ranks, group.one_node = rank, world_size, tuple(ranks), one_node
        group.kernels, group.reason, group.nbytes = None, reason, 0
        return group

    def close(self, reason: str | None = None) -> None:
        """Release this rank's workspace (idempotent).  Every member should close (it is collective in spirit).
        ``reason``: what a later call on the kernels, kept by a caller, says (:meth:`CustomAllReduce.close`)."""
        if self.kernels is not None:
            try:
                self.kernels.close(reason)
            finally:
                self.kernels = None


class _Failed(NamedTuple):
    """What a member sends, in place of its part, to the set-up's exchange after a step of its own that failed."""

    error: str  # "[code] class: message"; an error of no typed class has CollectiveFailedError's code
    typed: bool  # a CommError: the group runs on the engine, else every member raises

    @classmethod
    def of(cls, failure: Exception) -> _Failed:
        typed = isinstance(failure, CommError)
        code = (failure.code if typed else CollectiveFailedError.code).value
        message = failure.message if typed else str(failure)
        return cls(f"[{code}] {type(failure).__name__}: {message}", typed)


def _release(workspace: SymmetricWorkspace | None, kernels: CustomAllReduce | None) -> None:
    """Close what a set-up that does not keep them made (the all-reduce closes its workspace); the set-up's own
    error or reason is the one to report."""
    with contextlib.suppress(Exception):
        if kernels is not None:
            kernels.close()
        elif workspace is not None:
            workspace.close()


def peer_access_refusal(device: torch.device, identities: Sequence[str], ranks: Sequence[int]) -> str | None:
    """Why this rank's GPU cannot read and write every other member's GPU, as this process can learn, or None.

    Args:
        device: this rank's CUDA device.
        identities: every member's GPU by :func:`~sagellm_comm.workspace.device_identity` (its UUID), in group-rank
            order.
        ranks: the members' global ranks, in the same order (for messages).

    A member on this rank's GPU (processes sharing one GPU, MPS) needs no peer access.  Another member's GPU that
    this process sees (its UUID is one of this process's devices') is asked of the driver, both GPUs by this
    process's indices (``can_device_access_peer``); one that this process does not see (the members run with other
    ``CUDA_VISIBLE_DEVICES``) is asked of NVML, by the two GPUs' UUIDs
    (:func:`~sagellm_comm.topology.nvml_peer_access`), and where NVML cannot answer either, the kernels are refused.
    A query that fails is an answer too, not an error on this rank alone.  Each member asks about its own GPU:
    together, the members' answers cover every pair.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:  # this process's devices by UUID
        mine = device_identity(torch.device("cuda", index))
        seen = {device_identity(torch.device("cuda", i)): i for i in range(torch.cuda.device_count())}
    except (AssertionError, RuntimeError) as exc:
        return f"listing the GPUs this process sees failed: {exc}"
    me = f"{_gpu_name(mine)} (cuda:{index} here)"
    asked = {mine}
    for rank, theirs in zip(ranks, identities, strict=True):
        if theirs in asked:
            continue
        asked.add(theirs)
        there = seen.get(theirs)
        if there is not None:
            them = f"rank {rank}'s {_gpu_name(theirs)} (cuda:{there} here)"
            try:
                ok = torch.cuda.can_device_access_peer(index, there)
            except (AssertionError, RuntimeError) as exc:
                return f"asking whether {me} can access {them} failed: {exc}"
            if not ok:
                return f"{me} cannot access {them}: no peer access, as the driver reports (PCIe without P2P?)"
            continue
        them = f"rank {rank}'s {_gpu_name(theirs)}, which this process does not see (CUDA_VISIBLE_DEVICES)"
        ok = nvml_peer_access(mine, theirs)
        if ok is None:
            return (
                f"cannot tell whether {me} can access {them}: NVML cannot answer for the two GPUs; make every "
                "member's GPU visible to every member (CUDA_VISIBLE_DEVICES) so that the driver answers"
            )
        if not ok:
            return f"{me} cannot access {them}: no peer access, as NVML reports (PCIe without P2P?)"
    return None


def _gpu_name(identity: str) -> str:
    """A GPU's :func:`~sagellm_comm.workspace.device_identity` as ``nvidia-smi -L`` writes its UUID."""
    return identity if identity.startswith(("GPU-", "MIG-", "cuda")) else f"GPU-{identity}"


# What the members of a group compare besides the agreed configuration: the rules that pick each call's kernel.
POLICY_NAMES = {
    "selector": "the all-reduce policy (selector=)",
    "fusion_policy": "the fusion policy (fusion_policy=)",
    "gemm_policy": "the GEMM path policy (gemm_policy=)",
}


def policy_digests(
    selector: AlgoSelector, fusion_policy: FusionPolicy, gemm_policy: GemmPathSelector
) -> dict[str, tuple[str, str]]:
    """``{name: (digest of the rules, source)}`` of the policies a rank sends at a group's set-up."""
    return {
        "selector": (selector.digest(), selector.source),
        "fusion_policy": (fusion_policy.digest(), fusion_policy.source),
        "gemm_policy": (gemm_policy.digest(), gemm_policy.source),
    }


def check_policies(everyone: list[dict[str, tuple[str, str]]], ranks: tuple[int, ...], where: str) -> None:
    """Raise :class:`ConfigMismatchError` unless every member sent the same rules (:func:`policy_digests`; the
    sources may differ).  Two members deciding by other rules would run other kernels for one call: each would wait
    for a flag the other never writes, or read what the other did not stage."""
    differing = {}
    for name in POLICY_NAMES:
        # A member of another package version may not send every policy: that is a difference too.
        sent = [policies.get(name, ("none", "not a policy of this version")) for policies in everyone]
        if len({digest for digest, _ in sent}) > 1:
            sides: dict[str, list[int]] = {}
            for rank, (digest, source) in zip(ranks, sent, strict=True):
                sides.setdefault(f"rules {digest} ({source})", []).append(rank)
            differing[name] = sides
    if not differing:
        return
    parts = [
        f"{POLICY_NAMES[name]} differs: " + "; ".join(f"{side} on ranks {members}" for side, members in sides.items())
        for name, sides in differing.items()
    ]
    raise ConfigMismatchError(
        f"{where}: ranks {list(ranks)} must decide every call by the same rules, and they do not: {'; '.join(parts)}.  "
        "Give every rank the same policy (the same file)",
        details={"policies": differing, "ranks": list(ranks), "where": where},
    )
