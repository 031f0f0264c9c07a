"""The ``custom`` backend: intra-node all-reduce on our Triton kernels, everything else on the engine.

``CommBackend.create("custom")`` is a :class:`TorchDistributedBackend` (NCCL on CUDA; Gloo on the CPU under
the Triton interpreter, for tests; ``engine="gloo"`` for N processes sharing one GPU, which NCCL refuses)
that sets up the custom kernels for every group it can: the world at ``init``, and every sub-group made with
``new_group`` (``CommGroup.split`` / ``new_subgroup``) by its members when it is made, each group with its
own symmetric workspace (see :mod:`sagellm_comm.backends.custom_setup` for the checks).  A tensor-parallel
group inside one node gets the kernels even when the world spans nodes.

``all_reduce(tensor, op=SUM, group=g)`` runs the kernels of ``g`` for sizes up to its workspace (the
selector picks the algorithm) and the engine for the rest (other ops, groups without kernels, larger messages,
unsupported dtypes).  ``algo=`` forces a kernel algorithm: a call it cannot run is refused with a typed error,
not moved to the engine.  :attr:`CustomBackend.last_selection` records what ran and
why; :meth:`CustomBackend.kernels_reason` says why a group has (no) kernels.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, NoReturn

import torch

from sagellm_comm.selector import AUTO, ENGINE_ALGO, TWO_SHOT

from .. import gather_scatter
from ..arguments import check_flag, check_is_tensor, check_timeout, is_dense_contiguous
from ..backend import ReduceOp, Work, poll_until
from ..config import CommConfig, check_agreement
from ..cupy_probe import require_cupy
from ..custom_all_reduce import KERNEL_ITEMSIZES, SUPPORTED_DTYPES, CustomAllReduce, check_message
from ..errors import (
    BackendNotSupportedError,
    CommTimeoutError,
    InvalidArgumentError,
    NotInitializedError,
    WorkspaceExhaustedError,
    run_every,
    undo_after_failure,
)
from ..fused.gemm_policy import GemmPathSelector
from ..fused.rmsnorm_policy import FusionPolicy, fusion_policy_from
from ..launch import interpreting as _interpreting
from ..registry import register_builtin_backend
from ..selector import (
    ALGO_CHOICES,
    COLLECTIVE_KERNEL_ALGO,
    HIERARCHICAL_ALGO,
    KERNEL_ALGOS,
    PAYLOADS,
    AlgoSelector,
    Selection,
    policy_from,
)
from ..workspace import device_identity, node_name
from .custom_setup import KernelGroup
from .hierarchical import (
    HIER_CROSS_ENV,
    HIER_MIN_BYTES_ENV,
    HierarchicalPlan,
    capacity_bytes,
    node_layout,
)
from .hierarchical import all_reduce as hierarchical_all_reduce
from .torch_distributed import TorchDistributedBackend

log = logging.getLogger("sagellm_comm")

_NOT_KERNEL_CASE = "not a kernel case (op, dtype or layout)"
_USER_SELECTIONS = {a: Selection(a, "user", f"algo={a} requested") for a in KERNEL_ALGOS}
# What a call on a CustomAllReduce kept from before reset() / destroy() says, and what to use instead.
RESET_REASON = (
    "the backend's reset() released and made again every workspace of this rank; get the group's new all-reduce with "
    "backend.kernels_for(group) (backend.custom for the world); the group-level operations (sagellm_comm.fused, "
    "all_gather, reduce_scatter) use the new workspaces by themselves"
)
DESTROY_REASON = "its backend was destroyed; create and init a new backend"
NEW_GROUP_FAILED_REASON = "the set-up of its group failed, and new_group released what it made; call new_group again"
RELEASED_REASON = "its group was released (release_group); make the group again with new_group"


def custom_available() -> bool:
    """The custom kernels can run here: CUDA with CuPy, or the CPU under the Triton interpreter."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        require_cupy("custom")
        return True
    if _interpreting():
        return True
    raise BackendNotSupportedError("custom needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on the CPU)")


class _EventWork(Work):
    """Handle of an all-reduce enqueued by the kernels (completion tracked by a CUDA event); ``timeout``: the
    backend's, which bounds a :meth:`wait` given none."""

    def __init__(self, car: CustomAllReduce, tensor: torch.Tensor, timeout: float):
        self._car = car
        self._tensor = tensor
        self._timeout = timeout
        self._event = None
        if tensor.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until the kernel finished; raise ``CommTimeoutError`` (or ``CollectiveMismatchError``) if it
        failed, or ``CommTimeoutError`` if it is still running after ``timeout`` seconds (default: the backend's
        timeout; a device that never reaches the call's event, a stalled GPU, is not waited for past it)."""
        limit = self._timeout if timeout is None else check_timeout(timeout)  # a NaN deadline would never pass
        if self._event is not None:
            poll_until(
                self._event.query,
                limit,
                lambda: CommTimeoutError(
                    f"custom all-reduce on rank {self._car.rank} did not complete within {limit:g}s",
                    details={"rank": self._car.rank, "timeout_s": limit},
                ),
                self._car.check_errors,  # a failure recorded by the kernel is reported at once
            )
        self._car.check_errors()
        return self._tensor

    def is_completed(self) -> bool:
        return self._event is None or self._event.query()


class CustomBackend(TorchDistributedBackend):
    """Intra-node custom all-reduce with engine fallback, per group (see the module docstring).

    Args:
        device: as for :class:`TorchDistributedBackend`.
        max_bytes: the world group's workspace capacity per rank (largest message its kernels take); default
            ``config.custom_max_bytes`` (``SAGELLM_COMM_CUSTOM_MAX_BYTES``, 64 MiB).
        group_max_bytes: each sub-group's workspace capacity per rank (default ``config.group_max_bytes``,
            ``SAGELLM_COMM_GROUP_MAX_BYTES``, else ``max_bytes``).  A rank's device memory per group is about
            ``3 * capacity`` plus the Lamport buffers (``region_bytes``; ``kernels_for(g).workspace`` and
            ``kernels_reason(g)`` state it).
        selector: algorithm policy (default rules), or a path to a JSON policy file.
        fusion_policy: the fusion rules of the group-level all-reduce + residual + RMSNorm (+ FP8) of every group
            of this backend (:func:`sagellm_comm.fused.all_reduce_residual_rmsnorm`, the custom op the compile
            pass and the TP layers call): a :class:`~sagellm_comm.fused.FusionPolicy`, a path read by
            :meth:`FusionPolicy.from_file <sagellm_comm.fused.FusionPolicy.from_file>` (a policy file, or the
            record of ``bench/fp8_fused_bench.py``: the device's own ``derived_rules``), or None (the default
            rules).
        gemm_policy: the path rules of the group-level GEMM + all-reduce of every group of this backend
            (:func:`sagellm_comm.fused.gemm_all_reduce`): a :class:`~sagellm_comm.fused.GemmPathSelector`, or None
            (the default rules).  Every member of a group must give the same rules for each of ``selector``,
            ``fusion_policy`` and ``gemm_policy``: each group's set-up compares them (``ConfigMismatchError``).
        kernel_timeout: bound in seconds of every device-side wait of the kernels.
        engine: ``nccl`` or ``gloo`` (default: NCCL with CUDA, Gloo on the CPU; Gloo for N processes sharing
            one GPU under MPS, where NCCL refuses two ranks on one device).
        config: the configuration (default: read from the environment now, once); ``max_bytes`` and
            ``group_max_bytes`` given here replace its capacities.  :attr:`config` is what every group,
            workspace and kernel of this backend uses, and what ranks compare at ``init`` and at every group's
            set-up (a difference in an agreed setting raises ``ConfigMismatchError``).
    """

    kind = "custom"

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        max_bytes: int | None = None,
        group_max_bytes: int | None = None,
        selector: AlgoSelector | str | None = None,
        fusion_policy: FusionPolicy | str | os.PathLike | None = None,
        gemm_policy: GemmPathSelector | None = None,
        kernel_timeout: float = 30.0,
        engine: str | None = None,
        config: CommConfig | None = None,
    ):
        has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if engine is None:
            engine = "nccl" if has_cuda else "gloo"
        if engine not in ("nccl", "gloo"):
            raise InvalidArgumentError(f"engine must be 'nccl' or 'gloo', got {engine!r}")
        if not has_cuda and not _interpreting():
            raise BackendNotSupportedError("custom needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
        if engine == "gloo" and has_cuda and device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kernel_timeout = check_timeout(kernel_timeout, "kernel_timeout")
        selector = policy_from(selector, AlgoSelector, "selector must be an AlgoSelector, a policy file or None")
        fusion_policy = fusion_policy_from(fusion_policy)
        if gemm_policy is None:
            gemm_policy = GemmPathSelector()
        elif not isinstance(gemm_policy, GemmPathSelector):
            raise InvalidArgumentError(f"gemm_policy must be a GemmPathSelector or None, got {gemm_policy!r}")
        if not (config is None or isinstance(config, CommConfig)):
            raise InvalidArgumentError(
                f"config must be a CommConfig (CommConfig.from_env(), .replace(...)) or None, got {config!r}"
            )
        super().__init__(engine, device=device)
        self.selector = selector
        self._fusion_policy = fusion_policy
        self._gemm_policy = gemm_policy
        config = CommConfig.from_env() if config is None else config
        if max_bytes is not None:
            config = config.replace(custom_max_bytes=max_bytes)
        if group_max_bytes is not None:
            config = config.replace(group_max_bytes=group_max_bytes)
        self.config = config
        self.max_bytes = config.custom_max_bytes
        self.group_max_bytes = config.group_capacity()
        self.kernel_timeout = kernel_timeout
        self.custom: CustomAllReduce | None = None  # the world group's kernels
        self.custom_reason = "not initialised"
        # What the last call that ran ran, and why (a call refused with an error leaves it as it was).
        self.last_selection: Selection | None = None
        self._world_kernels: KernelGroup | None = None
        self._group_kernels: dict[int, tuple[Any, KernelGroup]] = {}  # id(handle) -> (handle, kernels)
        self._group_roles: dict[int, str] = {}  # id(handle) -> what the group serves (reset's reason names it)
        self._nodes: list[str] = []  # every global rank's node name
        self._processes_on_device = 1  # world ranks on this rank's GPU (N processes under MPS)
        self._hierarchical: dict[int, tuple[Any, HierarchicalPlan]] = {}  # id(handle or None) -> plan
        self._plan_groups: dict[int, list[Any]] = {}  # id(handle) -> the groups its hierarchical plan made

    @property
    def name(self) -> str:
        return "custom"

    @property
    def fusion_policy(self) -> FusionPolicy:
        """The fusion rules of the group-level fused all-reduce + RMSNorm of every group of this backend, given when
        it was made (fixed: the groups' set-ups compared them)."""
        return self._fusion_policy

    @property
    def gemm_policy(self) -> GemmPathSelector:
        """The path rules of the group-level fused GEMM + all-reduce of every group of this backend, given when it
        was made (fixed: the groups' set-ups compared them)."""
        return self._gemm_policy

    @property
    def engine_kind(self) -> str:
        """The engine that runs everything the kernels do not (``nccl`` or ``gloo``)."""
        return self.engine.kind

    # ------------------------------------------------------------------ lifecycle
    def init(self, *args: Any, **kwargs: Any) -> CustomBackend:
        super().init(*args, **kwargs)
        if self._world_kernels is None:
            try:
                where = (node_name(self.config), device_identity(self.device))
                facts = self.exchange(
                    (*where, self.config.agreement()), what="init: comparing nodes, devices, settings"
                )
                # Before anything depends on them: every rank's agreed settings (the groups made later by this
                # backend use the same configuration, and their set-ups compare it again).
                check_agreement([f[2] for f in facts], range(self.world_size), "the custom backend's init")
                self._nodes = [node for node, *_ in facts]
                self._processes_on_device = sum(1 for f in facts if (f[0], f[1]) == where)
                self._world_kernels = self._make_kernels(None)
                self.custom, self.custom_reason = self._world_kernels.kernels, self._world_kernels.reason
                self._plan_hierarchical(None, tuple(range(self.world_size)))
            except BaseException:  # init's own failure is the one to report: a failed release is logged
                undo_after_failure([self.destroy], log, "sagellm-comm custom init: releasing the half-made backend")
                raise
        return self

    def exchange(self, obj: Any, group: Any = None, what: str = "an exchange of objects") -> list[Any]:
        """Every member's ``obj`` in group-rank order, over the Gloo side of ``group`` (None: the world).

        A member gone or silent (its process exited, the backend's timeout passed) is a typed error,
        :class:`~sagellm_comm.errors.CollectiveFailedError` or :class:`~sagellm_comm.errors.CommTimeoutError`, naming
        ``what`` (the exchange) and the group's ranks, with torch's exception as ``__cause__``."""
        import torch.distributed as dist

        cpu_group = self.cpu_group if group is None else group.cpu_group
        out: list[Any] = [None] * (self.world_size if group is None else group.world_size)
        try:
            dist.all_gather_object(out, obj, group=cpu_group)
        except Exception as exc:
            ranks = list(range(self.world_size)) if group is None else list(group.ranks)
            raise self._translate(exc, f"{what} over ranks {ranks}", self.timeout) from exc
        return out

    def _make_kernels(self, handle: Any, one_node: bool = True) -> KernelGroup:
        """Collective over the members of ``handle`` (None: the world): set up that group's kernels
        (``one_node=False``: without the one-node check, for the cross groups of simulated nodes only)."""
        if handle is None:
            rank, size, ranks, capacity = self.rank, self.world_size, tuple(range(self.world_size)), self.max_bytes
        else:
            rank, size, ranks, capacity = handle.rank, handle.world_size, handle.ranks, self.group_max_bytes

        def engine_sum(tensor: torch.Tensor) -> torch.Tensor:
            return TorchDistributedBackend.all_reduce(self, tensor, ReduceOp.SUM, handle)

        return KernelGroup(
            rank, size, ranks, lambda obj, what: self.exchange(obj, handle, what), self.device, capacity, self.selector,
            self.kernel_timeout, engine_sum, one_node=one_node, processes_on_device=self._processes_on_device,
            config=self.config, fusion_policy=self._fusion_policy, gemm_policy=self._gemm_policy,
        )  # fmt: skip

    def new_group(self, ranks):
        """As :meth:`TorchDistributedBackend.new_group`; the members then set up the group's kernels together
        (every rank of the world calls this; only members take part in the set-up).  A set-up that fails releases
        what it made before its error is raised: the group's process groups, and the workspaces (peer mappings
        included) and process groups of the groups its hierarchical plan made."""
        handle = super().new_group(ranks)
        try:
            if handle.is_member:
                self._group_kernels[id(handle)] = (handle, self._make_kernels(handle))
                self._group_roles[id(handle)] = f"group {list(handle.ranks)}"
            self._plan_hierarchical(handle, handle.ranks)
        except BaseException:  # the set-up's own error is the one to report: a failed release is logged
            what = f"sagellm-comm new_group({list(handle.ranks)}): releasing what its failed set-up made"
            release = partial(self._release, self._groups_since(handle), NEW_GROUP_FAILED_REASON)
            undo_after_failure([release], log, what)
            raise
        return handle

    def release_group(self, group: Any) -> None:
        """As :meth:`TorchDistributedBackend.release_group`, with what the custom backend made for the group: its
        kernels (its workspace, peer mappings included; a :class:`CustomAllReduce` kept from it raises
        ``NotInitializedError`` saying so) and, for a group spanning nodes, its hierarchical plan with the node-local
        groups (and their workspaces) and cross groups the plan made."""
        handle = self._releasable(group)
        if handle is None:
            return
        try:
            self._release([handle, *self._plan_groups.get(id(handle), ())], RELEASED_REASON)
        except Exception as exc:
            raise self._translate(exc, f"release_group({list(handle.ranks)})", self.timeout) from exc

    def _release(self, made: list[Any], reason: str) -> None:
        """Release the groups ``made``: their kernels (workspaces, peer mappings; a kept all-reduce then says
        ``reason``), their hierarchical plans, then their process groups; every step runs whatever another raised."""
        keys = {id(handle) for handle in made}
        kernels = [self._group_kernels.pop(key)[1] for key in list(self._group_kernels) if key in keys]
        for key in keys:
            self._group_roles.pop(key, None)
            self._hierarchical.pop(key, None)
            self._plan_groups.pop(key, None)
        run_every([*(partial(k.close, reason) for k in kernels), partial(self._release_groups, made)])

    def _plan_hierarchical(self, handle: Any, members: tuple[int, ...]) -> None:
        """Every rank of the world: for a group spanning nodes, make its node-local groups (with kernels) and
        cross groups (engine only, or kernels too with ``SAGELLM_COMM_HIER_CROSS=kernels``) in one agreed
        order; members keep their plan (see ``hierarchical.py``)."""
        locals_, cross = node_layout(members, self._nodes)
        if not locals_:
            return
        mine_local = mine_cross = None
        spanning = self._spanning(handle)
        made = self._plan_groups.setdefault(id(handle), []) if handle is not None else []
        for ranks in locals_:
            local = self.new_group(ranks)
            made.append(local)
            mine_local = local if local.is_member else mine_local
            if local.is_member:
                self._group_roles[id(local)] = (
                    f"node-local group {list(ranks)} of the hierarchical all-reduce of {spanning}"
                )
        for ranks in cross:
            group = TorchDistributedBackend.new_group(self, ranks)
            made.append(group)
            mine_cross = group if group.is_member else mine_cross
        cross_kernels = None
        if self.config.hier_cross == "kernels" and mine_cross is not None:  # each cross group sets up its own
            kernels = self._make_kernels(mine_cross, one_node=False)
            self._group_kernels[id(mine_cross)] = (mine_cross, kernels)
            self._group_roles[id(mine_cross)] = (
                f"cross group {list(mine_cross.ranks)} of the hierarchical all-reduce of {spanning}"
            )
            cross_kernels = kernels.kernels
            if cross_kernels is None:
                log.warning("sagellm-comm %s=kernels: stage 2 stays on the engine: %s", HIER_CROSS_ENV, kernels.reason)
        if mine_local is not None and mine_cross is not None:
            plan = HierarchicalPlan(
                mine_local, mine_cross, len(locals_), self.config.hier_min_bytes, cross_kernels, handle,
                members.index(self.rank), len(members),
            )  # fmt: skip
            self._hierarchical[None if handle is None else id(handle)] = (handle, plan)
            self._agree_hierarchical(handle, plan)

    def _agree_hierarchical(self, handle: Any, plan: HierarchicalPlan) -> None:
        """Collective over the members of the node-spanning group ``handle`` (None: the world): the plan runs only
        when every member's node-local group has kernels.  A node whose group has none (no peer access, no memory
        for its workspace, a failed self-test) runs the flat engine, and a member running the three stages beside
        it would wait in stage 2 on a cross group its peer never joins."""
        ready = self.exchange(
            self.kernels_for(plan.local) is not None,
            handle,
            "the hierarchical all-reduce's set-up: which nodes have kernels",
        )
        plan.every_node_has_kernels = all(ready)

    @staticmethod
    def _spanning(handle: Any) -> str:
        return "the world" if handle is None else f"group {list(handle.ranks)}"

    def kernels_for(self, group: Any = None) -> CustomAllReduce | None:
        """The custom all-reduce of ``group`` (a ``CommGroup``, a ``GroupHandle`` or None for the world) on
        this rank, or None when that group runs on the engine (:meth:`kernels_reason` says why)."""
        handle = getattr(group, "handle", group)
        if handle is None or handle is self._world:
            return self.custom
        entry = self._group_kernels.get(id(handle))
        return None if entry is None or entry[0] is not handle else entry[1].kernels

    def kernels_reason(self, group: Any = None) -> str:
        """Why ``group`` has (or has not) the custom kernels on this rank, with its workspace size."""
        handle = getattr(group, "handle", group)
        if handle is None or handle is self._world:
            return self.custom_reason
        entry = self._group_kernels.get(id(handle))
        if entry is None or entry[0] is not handle:
            return "not a member of this group, or the group was not made by this backend"
        return entry[1].reason

    def reset(self) -> str:
        """Collective (every rank of the world): rebuild every custom path of this backend after a device-side
        failure, and return what each path runs now.

        A timed-out or mismatched call latches its workspace (every later call raises, every later output of a
        replayed graph is NaN).  ``reset()`` releases every workspace of this rank and makes each group's again,
        self-tested exactly as when the group was made, in the order the groups were made: the world, every
        sub-group from ``new_group`` / ``split`` / ``new_subgroup``, and the node-local (and, with
        ``SAGELLM_COMM_HIER_CROSS=kernels``, cross) groups of every hierarchical plan; the plans, the fused
        operations and all-gather / reduce-scatter then use the new workspaces.  Existing group objects stay valid;
        a :class:`CustomAllReduce` kept from before (``custom``, ``kernels_for``) raises ``NotInitializedError``
        saying so and where the new one is.

        A group whose set-up fails again keeps running on the engine: a peer mapping or the self-test failing
        (the reason says which), or a member that does not answer (gone or stuck; the engine needs every member
        too, so that group's calls fail with a typed error until the job is restarted: the reason says so).
        :attr:`custom_reason` is the world's reason.  CUDA graphs captured before the reset hold the old
        workspaces' addresses: capture them again.
        """
        if not self.is_initialized:
            raise NotInitializedError("reset() needs an initialised backend: call init() first")
        old = [self._world_kernels] + [kernels for _, kernels in self._group_kernels.values()]
        self._world_kernels, self.custom = None, None
        for kernels in old:
            if kernels is None:
                continue
            try:
                kernels.close(RESET_REASON)
            except Exception as exc:  # an unusable device must not stop the rebuild or the fallback
                log.warning("sagellm-comm reset: closing the old workspace of ranks %s failed: %s", kernels.ranks, exc)
        self._world_kernels = self._remake(None, True)
        self.custom, self.custom_reason = self._world_kernels.kernels, self._world_kernels.reason
        reasons = [f"the world: {self.custom_reason}"]
        for key, (handle, kernels) in list(self._group_kernels.items()):
            remade = self._remake(handle, kernels.one_node)
            self._group_kernels[key] = (handle, remade)
            reasons.append(f"{self._group_roles.get(key, f'group {list(handle.ranks)}')}: {remade.reason}")
        for handle, plan in self._hierarchical.values():  # the plans' stage 2 on the cross groups' new kernels
            if plan.cross_kernels is not None:
                plan.cross_kernels = self.kernels_for(plan.cross)
            try:  # and whether every node's group has kernels again
                self._agree_hierarchical(handle, plan)
            except Exception as exc:  # a member that does not answer: the flat engine, which needs it too
                plan.every_node_has_kernels = False
                reasons.append(f"hierarchical all-reduce of {self._spanning(handle)}: off ({exc})")
        reason = f"reset on rank {self.rank}: " + "; ".join(reasons)
        log.info("sagellm-comm %s", reason)
        return reason

    def _remake(self, handle: Any, one_node: bool) -> KernelGroup:
        """``_make_kernels`` for reset: a member that does not answer leaves the group on the engine, said so."""
        try:
            return self._make_kernels(handle, one_node=one_node)
        except Exception as exc:
            ranks = tuple(range(self.world_size)) if handle is None else handle.ranks
            rank = self.rank if handle is None else handle.rank
            why = " ".join(str(exc).split())
            reason = (
                f"reset failed: a member of ranks {list(ranks)} did not answer ({why}); this group's calls now go to "
                f"the {self.engine_kind} engine, which needs every member too: they will fail with a typed error "
                "until the missing rank is back (destroy the backend and init again)"
            )
            return KernelGroup.unavailable(rank, len(ranks), ranks, reason, one_node)

    def destroy(self) -> None:
        kernel_groups = [k for _, k in self._group_kernels.values()] + [self._world_kernels]
        self._group_kernels.clear()
        self._group_roles.clear()
        self._hierarchical.clear()
        self._plan_groups.clear()
        self._world_kernels = self.custom = None
        try:  # every group's workspace, whatever another's close raised
            run_every([partial(kernels.close, DESTROY_REASON) for kernels in kernel_groups if kernels is not None])
        finally:
            if self.custom_reason != "not initialised":
                self.custom_reason = "destroyed"
            super().destroy()

    # ------------------------------------------------------------------ all-reduce
    def _hierarchical_plan(self, group) -> tuple[HierarchicalPlan, CustomAllReduce] | None:
        """This rank's plan for a node-spanning ``group`` and its node-local kernels, or None (no plan here)."""
        handle = getattr(group, "handle", group)
        key = None if handle is None or handle is self._world else id(handle)
        entry = self._hierarchical.get(key)
        if entry is None or (key is not None and entry[0] is not handle):
            return None
        car = self.kernels_for(entry[1].local)
        return None if car is None or not entry[1].every_node_has_kernels else (entry[1], car)

    def _hierarchical_selection(self, plan, car, nbytes: int, itemsize: int, algo: str) -> Selection | None:
        """The hierarchical path's :class:`Selection` for ``nbytes`` of ``itemsize``-byte elements, or None when
        the message is over what the node-local workspace takes or (``auto``) under the threshold."""
        if nbytes > capacity_bytes(plan, car, itemsize):
            return None
        if algo == AUTO and nbytes < plan.min_bytes:
            return None
        between = (
            f"the {self.engine_kind} engine"
            if plan.cross_kernels is None
            else f"the kernels ({HIER_CROSS_ENV}=kernels: simulated nodes)"
        )
        return Selection(
            HIERARCHICAL_ALGO,
            "user" if algo == HIERARCHICAL_ALGO else "hierarchical-span-nodes",
            f"group spans {plan.nodes} nodes x {plan.local_size} ranks: kernels reduce-scatter and all-gather "
            f"inside each node, {between} all-reduces 1/{plan.local_size} between nodes "
            f"(from {plan.min_bytes} bytes: {HIER_MIN_BYTES_ENV}; model in backends/hierarchical.py, unmeasured)",
        )

    def _try_hierarchical(self, tensor, op, group, algo) -> CustomAllReduce | None:
        """Run the hierarchical path for a node-spanning group and return its node-local kernels, or None
        when it does not apply to this call."""
        found = self._hierarchical_plan(group)
        if (
            found is None
            or ReduceOp.parse(op) is not ReduceOp.SUM
            or not isinstance(tensor, torch.Tensor)
            or tensor.dtype not in SUPPORTED_DTYPES
            or not is_dense_contiguous(tensor)
        ):
            return None
        plan, car = found
        itemsize = tensor.element_size()
        sel = self._hierarchical_selection(plan, car, tensor.numel() * itemsize, itemsize, algo)
        if sel is None:
            return None
        hierarchical_all_reduce(self, plan, car, tensor)
        return self._ran(sel, car)

    def select(self, nbytes: int, itemsize: int = 2, group: Any = None) -> Selection:
        """What ``all_reduce`` (SUM, ``algo="auto"``) of a contiguous tensor of ``nbytes`` (``itemsize``-byte elements)
        on ``group`` runs, and why: the :attr:`last_selection` such a call records.  Elements of 2 and 4 bytes are
        read as the kernels' dtypes (bf16/fp16, fp32; an int32 tensor runs on the engine), others run on the engine.
        ``nbytes`` must be a non-negative int of whole elements (``InvalidArgumentError`` otherwise)."""
        check_message(nbytes, itemsize)
        car = self.kernels_for(group)
        if car is None:
            found = self._hierarchical_plan(group) if itemsize in KERNEL_ITEMSIZES else None
            sel = None if found is None else self._hierarchical_selection(*found, nbytes, itemsize, AUTO)
            if sel is not None:
                return sel
            return Selection(self.engine_kind, "custom-unavailable", self.kernels_reason(group))
        if itemsize not in KERNEL_ITEMSIZES:
            return Selection(self.engine_kind, "engine", _NOT_KERNEL_CASE)
        return car.select(nbytes, itemsize).ran_on(self.engine_kind)

    def all_reduce(
        self, tensor, op=ReduceOp.SUM, group=None, async_op=False, algo: str = "auto", payload: str | None = None
    ):
        """As :meth:`CommBackend.all_reduce`; SUM on a group with kernels runs them when they can.

        ``algo``: ``auto`` (the selector), ``one_shot``, ``two_shot``, ``lamport`` or ``nccl`` (the engine).  A
        forced kernel algorithm runs on the kernels or raises before anything runs, never on the engine: a group
        without kernels ``BackendNotSupportedError``; another op, dtype or a non-contiguous tensor
        ``InvalidArgumentError``; a message over the workspace (or, for ``lamport``, over its buffers)
        ``WorkspaceExhaustedError``.
        ``payload="fp8"`` (opt-in, lossy): the kernels' two-shot with FP8 shards (:meth:`CustomAllReduce.all_reduce`);
        with ``algo="auto"``, where the engine runs the call (no kernels for the group, another op or dtype, over the
        workspace) it runs at full precision, and :attr:`last_selection` says so; ``algo="two_shot"`` is refused there
        as above.
        """
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        if algo not in ALGO_CHOICES:
            raise InvalidArgumentError(f"algo must be one of {ALGO_CHOICES}, got {algo!r}")
        if self.custom is None:  # before init() or after destroy(): that, not a forced algorithm's refusal
            self._check_ready()
        if payload is not None:
            return self._all_reduce_payload(tensor, op, group, async_op, algo, payload)
        car = self.custom if group is None else self.kernels_for(group)
        if car is None and self._hierarchical and algo in (AUTO, HIERARCHICAL_ALGO):
            done = self._try_hierarchical(tensor, op, group, algo)
            if done is not None:
                return _EventWork(done, tensor, self.timeout) if async_op else tensor
        if algo == HIERARCHICAL_ALGO:
            self._refuse_hierarchical(car, tensor, op, group)
        if algo in KERNEL_ALGOS:
            self._check_forced(algo, car, tensor, op, group)
        if (
            car is None
            or algo == ENGINE_ALGO
            or ReduceOp.parse(op) is not ReduceOp.SUM
            or not isinstance(tensor, torch.Tensor)
            or tensor.dtype not in SUPPORTED_DTYPES
            or tensor.layout is not torch.strided  # (is_dense_contiguous in line: the eager path)
            or not tensor.is_contiguous()
        ):
            if car is None and algo != ENGINE_ALGO:  # as select() says: the group has no kernels, and why
                sel = Selection(self.engine_kind, "custom-unavailable", self.kernels_reason(group))
            else:
                why = "algo=nccl requested" if algo == ENGINE_ALGO else _NOT_KERNEL_CASE
                sel = Selection(self.engine_kind, "engine", why)
            return self._ran(sel, super().all_reduce(tensor, op, group, async_op))
        # The kernel path: ``car.all_reduce`` checks the device (typed error) and dtype/layout were checked
        # above, so nothing is validated twice; a live ``car`` means the backend is initialised.
        itemsize = tensor.element_size()
        nbytes = tensor.numel() * itemsize
        sel = car.policy_choice(nbytes, itemsize) if algo == AUTO else _USER_SELECTIONS[algo]  # dtype checked
        if sel.algo not in KERNEL_ALGOS or nbytes > car.workspace.slot_bytes:
            if nbytes > car.workspace.slot_bytes and algo != AUTO:
                raise WorkspaceExhaustedError(
                    f"algo={algo} needs the message ({nbytes} bytes) to fit the {car.workspace.slot_bytes}-byte "
                    "workspace; use algo='auto' to fall back to the engine"
                )
            return self._ran(sel.ran_on(self.engine_kind), super().all_reduce(tensor, op, group, async_op))
        car.all_reduce(tensor, algo=sel.algo)
        self.last_selection = sel  # as _ran, inline on the eager path
        return _EventWork(car, tensor, self.timeout) if async_op else tensor

    def _ran(self, sel: Selection, result: Any) -> Any:
        """Record ``sel`` as :attr:`last_selection` once its call was issued, and return ``result``: a call refused
        with an error leaves the selection of the last call that ran."""
        self.last_selection = sel
        return result

    def _check_forced(self, algo: str, car: CustomAllReduce | None, tensor, op, group) -> None:
        """A forced kernel ``algo`` runs on the group's kernels or is refused here, before anything runs: never moved
        to the engine (as a message over the workspace is refused, not moved)."""
        if car is None:
            raise BackendNotSupportedError(
                f"algo={algo!r} needs the custom kernels, and this group runs on the {self.engine_kind} engine "
                f"({self.kernels_reason(group)}); use algo='auto' or 'nccl'"
            )
        self._check_kernel_call(algo, tensor, op)

    def _refuse_hierarchical(self, car: CustomAllReduce | None, tensor, op, group) -> NoReturn:
        """Raise why a forced hierarchical all-reduce of ``tensor`` on ``group`` cannot run."""
        what = f"algo={HIERARCHICAL_ALGO!r}"
        found = None if car is not None else self._hierarchical_plan(group)
        if found is None:
            raise InvalidArgumentError(
                f"{what} needs a group that spans nodes with the same number (>= 2) of members on each and node-local "
                f"kernels on every node; this group: {self.kernels_reason(group)}"
            )
        self._check_kernel_call(HIERARCHICAL_ALGO, tensor, op)
        plan, local = found
        cap = capacity_bytes(plan, local, tensor.element_size())
        raise WorkspaceExhaustedError(
            f"{what}: the message ({tensor.numel() * tensor.element_size()} bytes of {tensor.dtype}) is over the {cap} "
            f"bytes the node-local workspace takes ({plan.local_size} shards); use algo='auto' to run it on the "
            "engine, or a larger group_max_bytes",
            details={"nbytes": tensor.numel() * tensor.element_size(), "capacity_bytes": cap},
        )

    @staticmethod
    def _check_kernel_call(algo: str, tensor, op) -> None:
        """``InvalidArgumentError`` unless the kernels of ``algo`` take ``op`` and ``tensor`` (SUM, a contiguous
        bf16/fp16/fp32 tensor)."""
        op = ReduceOp.parse(op)
        if op is not ReduceOp.SUM:
            raise InvalidArgumentError(
                f"algo={algo!r} sums (op=SUM), got op={op.name}; use algo='auto' or 'nccl' for other ops"
            )
        check_is_tensor(tensor, "tensor")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise InvalidArgumentError(
                f"algo={algo!r} takes bfloat16, float16 and float32 tensors, got {tensor.dtype}; use algo='auto' or "
                "'nccl' for other dtypes"
            )
        if tensor.layout is not torch.strided:
            raise InvalidArgumentError(
                f"algo={algo!r} needs a dense contiguous tensor, got a {tensor.layout} tensor; call .to_dense()"
            )
        if not tensor.is_contiguous():
            raise InvalidArgumentError(
                f"algo={algo!r} needs a contiguous tensor, got shape {tuple(tensor.shape)} with strides "
                f"{tensor.stride()}; call .contiguous(), or use algo='auto' or 'nccl'"
            )

    def _all_reduce_payload(self, tensor, op, group, async_op, algo: str, payload: str):
        """:meth:`all_reduce` with ``payload``: the kernels' FP8 two-shot where they run the call, else the engine."""
        if payload not in PAYLOADS:
            raise InvalidArgumentError(f"payload must be None or one of {PAYLOADS}, got {payload!r}")
        if algo not in (AUTO, TWO_SHOT):
            raise InvalidArgumentError(f"payload={payload!r} runs on two_shot only; got algo={algo!r}")
        car = self.custom if group is None else self.kernels_for(group)
        if algo == TWO_SHOT:
            self._check_forced(algo, car, tensor, op, group)
        kernel_case = (
            car is not None
            and ReduceOp.parse(op) is ReduceOp.SUM
            and isinstance(tensor, torch.Tensor)
            and tensor.dtype in SUPPORTED_DTYPES
            and is_dense_contiguous(tensor)
        )
        ran = car.check_payload(tensor, algo, payload) if kernel_case else self.engine_kind
        if ran != TWO_SHOT:
            why = "over the workspace" if kernel_case else "not a kernel case (group, op, dtype or layout)"
            sel = Selection(self.engine_kind, "engine", f"payload={payload!r} {why}: full precision")
            return self._ran(sel, super().all_reduce(tensor, op, group, async_op))
        car.all_reduce(tensor, algo=TWO_SHOT, payload=payload)
        sel = Selection(
            TWO_SHOT, f"{payload}-payload", f"payload={payload!r} requested: shards travel as FP8 with a scale per 128"
        )
        return self._ran(sel, _EventWork(car, tensor, self.timeout) if async_op else tensor)

    # ------------------------------------------------------------------ all-gather / reduce-scatter
    def _gather_scatter_kernels(self, op: str, flat, shard, group) -> CustomAllReduce | None:
        """The group's kernels when ``op`` of this call can run on them (``flat``: the all-gather output or
        the reduce-scatter input, ``shard``: the other), else None (the engine runs it)."""
        car = self.custom if group is None else self.kernels_for(group)
        if (
            car is None
            or not isinstance(flat, torch.Tensor)
            or not isinstance(shard, torch.Tensor)
            or shard.dtype not in SUPPORTED_DTYPES
            or flat.dtype != shard.dtype
            or flat.device != car.device
            or shard.device != car.device
            or not (is_dense_contiguous(flat) and is_dense_contiguous(shard))
            or flat.numel() != car.world_size * shard.numel()
        ):
            return None
        if (
            gather_scatter.staged_bytes(op, shard.numel(), car.world_size, shard.element_size())
            > car.workspace.slot_bytes
        ):
            return None
        return car

    def _kernel_selection(self, op: str, car: CustomAllReduce) -> Selection:
        return Selection(
            COLLECTIVE_KERNEL_ALGO,
            f"custom-{op.replace('_', '-')}",
            f"the custom {op} kernel on {car.world_size} ranks of one node",
        )

    def all_gather(self, output, tensor, group=None, async_op=False):
        """As :meth:`CommBackend.all_gather`; a flat ``output`` of a group with kernels runs the custom
        all-gather (``sagellm_comm/kernels/gather_scatter.py``) when the input fits its workspace."""
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        car = self._gather_scatter_kernels("all_gather", output, tensor, group)
        if car is None:
            sel = Selection(self.engine_kind, "engine", "not a kernel case (group, layout or size)")
            return self._ran(sel, super().all_gather(output, tensor, group, async_op))
        gather_scatter.all_gather(car, tensor, output)
        done = _EventWork(car, output, self.timeout) if async_op else output
        return self._ran(self._kernel_selection("all_gather", car), done)

    def reduce_scatter(self, output, input, op=ReduceOp.SUM, group=None, async_op=False):
        """As :meth:`CommBackend.reduce_scatter`; SUM of a flat ``input`` on a group with kernels runs the
        custom reduce-scatter when it fits its workspace."""
        if async_op.__class__ is not bool:
            check_flag(async_op, "async_op")
        car = (
            None
            if ReduceOp.parse(op) is not ReduceOp.SUM
            else self._gather_scatter_kernels("reduce_scatter", input, output, group)
        )
        if car is None:
            sel = Selection(self.engine_kind, "engine", "not a kernel case (op, group, layout or size)")
            return self._ran(sel, super().reduce_scatter(output, input, op, group, async_op))
        gather_scatter.reduce_scatter(car, input, output)
        done = _EventWork(car, output, self.timeout) if async_op else output
        return self._ran(self._kernel_selection("reduce_scatter", car), done)


register_builtin_backend("custom", CustomBackend, is_available=custom_available, priority=60)
