"""Transfer agents for the ranks of an existing ``CommBackend`` world, connected in one collective call.

``backend.transfer_agent(regions={"kv": kv_pool})`` (:meth:`CommBackend.transfer_agent`) is
:func:`connect_world`: every rank of the group makes its agent, registers its regions, and the agents' metadata
is exchanged with ``all_gather_object`` over the backend's Gloo ``cpu_group`` (the same side channel the custom
kernels use for IPC handles), after which every agent has every other rank's agent as a peer.  The world and
the agents then coexist: collectives keep running on the backend, blocks move through the agents, and agents of
other engine instances join with ``add_peer(metadata)`` as usual.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sagellm_comm.errors import GroupInvalidError, InvalidArgumentError
from sagellm_comm.transfer.agent import DEFAULT_TIMEOUT_S, TransferAgent

if TYPE_CHECKING:
    from sagellm_comm.backend import CommBackend, GroupHandle


def default_agent_name(rank: int) -> str:
    """``<host>-pid<pid>-rank<rank>``: unique across the engine instances of a cluster."""
    from sagellm_comm.transfer.metadata import host_name

    return f"{host_name()}-pid{os.getpid()}-rank{rank}"


def connect_world(
    backend: CommBackend,
    regions: Mapping[str, torch.Tensor] | None = None,
    *,
    name: str | None = None,
    transfer_backend: str = "auto",
    group: GroupHandle | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    options: dict[str, dict] | None = None,
) -> TransferAgent:
    """Collective over ``group`` (default: the world): this rank's agent, peered with every other rank's.

    Args:
        backend: an initialised :class:`~sagellm_comm.CommBackend`.
        regions: ``{name: tensor}`` to register before the metadata is exchanged.
        name: this rank's agent name (default :func:`default_agent_name`); names must be unique.
        transfer_backend: ``"auto"`` or a registered transfer backend name.
        group: a :class:`~sagellm_comm.backend.GroupHandle` of ``backend`` (every member must call).
        timeout: the agent's default wait deadline; the exchange itself is bounded by the backend's timeout.
    """
    import torch.distributed as dist

    from sagellm_comm.backend import CommBackend, GroupHandle

    if not isinstance(backend, CommBackend):
        raise InvalidArgumentError(f"backend must be an initialised CommBackend, got {type(backend).__name__}")
    if group is not None and not isinstance(group, GroupHandle):
        raise InvalidArgumentError(f"group must be a GroupHandle of backend (backend.new_group) or None, got {group!r}")
    if group is not None and not group.is_member:
        raise GroupInvalidError(f"rank {backend.rank} is not a member of group {list(group.ranks)}")
    cpu_group = backend.cpu_group if group is None else group.cpu_group
    if regions is not None and not isinstance(regions, Mapping):
        raise InvalidArgumentError(f"regions must map names to tensors, got {type(regions).__name__}")
    device = backend.device if backend.device.type == "cuda" else None
    agent = TransferAgent(name or default_agent_name(backend.rank), transfer_backend, device=device,
                          timeout=timeout, options=options)  # fmt: skip
    try:
        for region, tensor in (regions or {}).items():
            agent.register(region, tensor)
        size = dist.get_world_size(cpu_group)
        metadata: list[Any] = [None] * size
        dist.all_gather_object(metadata, agent.metadata(), group=cpu_group)
        mine = dist.get_rank(cpu_group)
        for rank, blob in enumerate(metadata):
            if rank != mine:
                agent.add_peer(blob)
    except BaseException:
        agent.close()
        raise
    return agent
