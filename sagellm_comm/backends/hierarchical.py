"""Hierarchical all-reduce for a group that spans nodes: kernels inside each node, the engine between nodes.

A group of ``N = L * M`` ranks on ``M`` nodes with ``L`` members each (node membership from host names,
``SAGELLM_COMM_HOSTNAME`` in tests) all-reduces ``S`` bytes in three stages:

1. **intra-node reduce-scatter** on the custom kernels over the node-local group (``L`` ranks): local rank
   ``i`` ends with shard ``i`` (``S / L`` bytes) summed over its node;
2. **inter-node all-reduce** of that shard on the engine (NCCL) over the *cross* group: the ``M`` ranks with
   local index ``i``, one per node;
3. **intra-node all-gather** on the kernels: every rank gets every shard.

Every rank ends with identical bits: each shard is summed once per node by its owner (rank order, fp32),
the engine's all-reduce gives all cross ranks one result, and the all-gather copies.  The stages are
stream-ordered on the caller's stream, so the whole is capturable in a CUDA graph when the engine is
(NCCL is; Gloo, the stand-in on one machine, is not and raises a typed error under capture; with
``SAGELLM_COMM_HIER_CROSS=kernels`` simulated nodes run stage 2 on the kernels and capture on one GPU).
A rank missing in stage 1 or 3 is named by the kernels' bounded waits (``CommTimeoutError``, global
rank); in stage 2 by the engine's error (its timeout, or a closed connection), re-raised as the same type
with the stage and the cross group's global ranks (or, on the kernels, their bounded wait).

When it pays (a model, unmeasured here: these machines have one node).  Per GPU, NVLink 4 moves about
``B_intra = 450`` GB/s each way; a node's NICs give each GPU about ``B_inter = 50`` GB/s (one 400 Gb/s NIC
per GPU; 4-8 NICs per 8-GPU node).  Flat NCCL over all ``N`` ranks sends about ``2 (N - 1) / N * S``
bytes per GPU, and with ``M`` nodes in a ring the inter-node hops carry that at ``B_inter``; the
hierarchical form sends ``2 (L - 1) / L * S`` over NVLink and only ``2 (M - 1) / M * S / L`` over the NICs::

    t_flat ~ 2 (N-1)/N * S / B_inter
    t_hier ~ 2 (L-1)/L * S / B_intra + 2 (M-1)/M * (S / L) / B_inter + 3 launches

With ``L = 8``, ``M = 2``, 64 MB: ``t_flat`` ~ 2.5 ms, ``t_hier`` ~ 0.25 + 0.16 = 0.41 ms.  For small
messages the three stages' latency (two kernel barriers plus the engine's inter-node latency, ~10-20 us)
loses to NCCL's single tree/LL pass, and NCCL's own multi-node rings already use NVLink inside a node, so
the conservative default runs ``hierarchical`` only from ``SAGELLM_COMM_HIER_MIN_BYTES`` (1 MB) up to what
the node-local workspace takes, and flat NCCL otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CommError, InvalidArgumentError

HIER_MIN_BYTES_ENV = "SAGELLM_COMM_HIER_MIN_BYTES"  # CommConfig.hier_min_bytes
#: CommConfig.hier_cross: what runs stage 2, ``engine`` (default) or ``kernels``.  ``kernels`` is for
#: *simulated* nodes only (``SAGELLM_COMM_HOSTNAME`` on one machine): the cross groups then get custom kernels
#: too, without the one-node check, so the whole path runs in a CUDA graph on one GPU, where Gloo (the
#: stand-in engine there) cannot be captured and NCCL refuses two ranks.  On real nodes the cross members
#: cannot map each other's memory: their set-up fails and stage 2 stays on the engine (NCCL, capturable).
HIER_CROSS_ENV = "SAGELLM_COMM_HIER_CROSS"


def node_layout(members: tuple[int, ...], nodes: list[str]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """``(local groups, cross groups)`` of ``members`` (global ranks) given every global rank's node name.

    Local groups: the members on each node, nodes in order of their first member; cross group ``i``: the
    ``i``-th member of every node.  Empty lists when the group is on one node, when nodes hold different
    numbers of members, or when a node holds fewer than two (nothing for the kernels to do).  Every rank
    computes the same lists from the same inputs, in the same order.
    """
    by_node: dict[str, list[int]] = {}
    for r in members:
        by_node.setdefault(nodes[r], []).append(r)
    locals_ = [tuple(v) for v in by_node.values()]
    sizes = {len(v) for v in locals_}
    if len(locals_) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return [], []
    cross = [tuple(group[i] for group in locals_) for i in range(len(locals_[0]))]
    return locals_, cross


@dataclass
class HierarchicalPlan:
    """This rank's two groups of a node-spanning group: its node-local group (kernels) and its cross group."""

    local: Any  # GroupHandle of this rank's node
    cross: Any  # GroupHandle of the ranks with this rank's local index
    nodes: int
    min_bytes: int
    cross_kernels: Any = None  # CustomAllReduce of ``cross`` (SAGELLM_COMM_HIER_CROSS=kernels), else None
    group: Any = None  # the node-spanning group's handle (None: the world)
    group_rank: int = 0  # this rank's index in it
    group_size: int = 0
    # Whether every member's node-local group has kernels (agreed over the whole group): a member whose node
    # has none runs the flat engine, and the members must all run the same path or their engine calls never meet.
    every_node_has_kernels: bool = False

    @property
    def local_size(self) -> int:
        return self.local.world_size


def capacity_bytes(plan: HierarchicalPlan, car, itemsize: int) -> int:
    """The largest message (bytes) the plan takes: ``local`` shards of the largest reduce-scatter chunk the
    node-local workspace stages (the all-gather of one shard stages less)."""
    from ..gather_scatter import max_numel

    return max_numel("reduce_scatter", plan.local_size, car.workspace.slot_bytes, itemsize) * plan.local_size * itemsize


def group_check(backend, plan: HierarchicalPlan, car, numel: int, dtype: torch.dtype, refused: bool = False) -> None:
    """Check mode: every member of the node-spanning group compares ``(hierarchical, numel, dtype)`` with every
    other member's, through one engine all-gather and a one-program kernel that latches ``car``'s workspace
    on a difference (``kernels/fingerprint.py``).  Enqueued on the current stream (NCCL: capturable), on the
    workspace's device.  ``refused``: this rank refused its input and compares ``REFUSED`` instead, so that
    every member latches.

    The node-local and cross groups each compare only their own members: ranks of one node that agree with
    each other but not with another node's would pass both, and a rank whose node-local peers all failed would
    be the only one of its node to go on.  Every member sees every row here, so every member latches."""
    from ..kernels.fingerprint import ALGO_CODES, DTYPE_CODES, REFUSED
    from ..selector import HIERARCHICAL_ALGO
    from .torch_distributed import TorchDistributedBackend

    device = car.device
    mine = torch.empty(4, dtype=torch.int64, device=device)
    operation = ALGO_CODES[REFUSED if refused else HIERARCHICAL_ALGO]
    words = (operation, numel, DTYPE_CODES[str(dtype).removeprefix("torch.")], backend.rank)
    for i, word in enumerate(words):  # one fill each: no host-to-device copy, so a graph can capture it
        mine[i] = word
    everyone = torch.empty(plan.group_size * 4, dtype=torch.int64, device=device)
    TorchDistributedBackend.all_gather(backend, everyone, mine, plan.group)
    car.launch_group_check(everyone.view(plan.group_size, 4), plan.group_rank)


def all_reduce(backend, plan: HierarchicalPlan, car, tensor: torch.Tensor) -> torch.Tensor:
    """The three stages on ``tensor`` (contiguous, in place), enqueued on the current stream.

    In check mode (the node-local workspace's, agreed by the group) the whole group first compares what each
    member was asked for (:func:`group_check`), and every stage's own check compares the caller's operation and
    element count (``hierarchical``, ``tensor.numel()``), not the padded shards the stages move.  Every member
    reads that comparison on the host (``synchronize()``: a wait for its work bounded by ``host_timeout_s``; not while
    a CUDA graph is captured) before any stage runs, and a mismatch raises there on every member: no member runs on
    into a stage whose peers stopped.
    A member whose input the stages refuse (a tensor on another device than its workspace) takes part in the
    comparison as ``REFUSED`` and raises its ``InvalidArgumentError``; the others raise ``CollectiveMismatchError``
    naming it, instead of waiting for it until a timeout."""
    from .. import gather_scatter
    from ..selector import HIERARCHICAL_ALGO
    from .torch_distributed import TorchDistributedBackend
    from .torch_distributed.engines import capturing

    if plan.cross_kernels is None:  # stage 2 on the engine: refuse a capture before stage 1 is enqueued
        backend.check_capturable(
            "the inter-node stage of a hierarchical all-reduce",
            f"capture with the nccl engine ({HIER_CROSS_ENV}=kernels for simulated nodes on one machine)",
        )
    if car.check:
        backend.check_capturable(
            "the check-mode comparison of a hierarchical all-reduce (an engine all-gather)",
            "capture with the nccl engine, or without check mode (SAGELLM_COMM_CHECK=0)",
        )
    local = plan.local_size
    flat = tensor.view(-1)
    numel = flat.numel()
    what = (HIERARCHICAL_ALGO, numel)  # what check mode fingerprints in every stage: the caller's call
    if car.check:
        refusal = _refusal(car, tensor)
        group_check(backend, plan, car, numel, tensor.dtype, refused=refusal is not None)
        if refusal is not None:
            raise refusal
        if not capturing():  # read the comparison before any stage: none runs on, to wait for a member that raised
            car.synchronize()
    shard_numel = -(-numel // local)
    padded = shard_numel * local
    staged = flat if padded == numel else torch.zeros(padded, dtype=tensor.dtype, device=tensor.device)
    if staged is not flat:
        staged[:numel].copy_(flat)
    shard = torch.empty(shard_numel, dtype=tensor.dtype, device=tensor.device)
    gather_scatter.reduce_scatter(car, staged, shard, fingerprint=what)
    if plan.cross_kernels is not None:  # simulated nodes (see HIER_CROSS_ENV)
        plan.cross_kernels.all_reduce(shard, fingerprint=what)
    else:
        try:
            TorchDistributedBackend.all_reduce(backend, shard, "sum", plan.cross)
        except CommError as exc:  # say which stage, and which ranks it waited for
            raise type(exc)(
                f"hierarchical all-reduce, stage 2 (inter-node, {backend.engine_kind} over global ranks "
                f"{list(plan.cross.ranks)}, one per node; one of them failed or never arrived): {exc.message}",
                details={**exc.details, "stage": 2, "cross_ranks": list(plan.cross.ranks)},
                code=exc.code,
            ) from exc
    gather_scatter.all_gather(car, shard, staged, fingerprint=what)
    if staged is not flat:
        flat.copy_(staged[:numel])
    return tensor


def _refusal(car, tensor: torch.Tensor) -> InvalidArgumentError | None:
    """The error the stages would raise for this rank's ``tensor`` (its device: dtype, layout and size were
    checked when the path was chosen), or None."""
    return car.device_error(tensor, "hierarchical all-reduce: ") if car.wrong_device(tensor) else None
