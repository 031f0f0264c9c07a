"""Transfer agents for the ranks of an existing ``CommBackend`` world, connected in one collective call.

``backend.transfer_agent(regions={"kv": kv_pool})`` (:meth:`CommBackend.transfer_agent`) is
:func:`connect_world`: every rank of the group makes its agent, registers its regions, and the agents' metadata
is exchanged with ``all_gather_object`` over the backend's Gloo ``cpu_group`` (the same side channel the custom
kernels use for IPC handles), after which every agent has every other rank's agent as a peer.  The world and
the agents then coexist: collectives keep running on the backend, blocks move through the agents, and agents of
other engine instances join with ``add_peer(metadata)`` as usual.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sagellm_comm.errors import CollectiveFailedError, GroupInvalidError, GroupNotFoundError, InvalidArgumentError
from sagellm_comm.transfer.agent import DEFAULT_TIMEOUT_S, MAX_NAME_BYTES, MAX_NAME_CHARS, TransferAgent
from sagellm_comm.transfer.metadata import AgentMetadata

if TYPE_CHECKING:
    from sagellm_comm.backend import CommBackend, GroupHandle


_NAMED = itertools.count(1)  # default names given in this process


def default_agent_name(rank: int) -> str:
    """``<host>-pid<pid>-rank<rank>``, with ``-<n>`` for the n-th such name this process gives (a process that
    connects several groups): unique across the engine instances of a cluster and the agents of a process.  A host
    name too long for an agent's name (``SAGELLM_COMM_HOSTNAME`` takes 255 characters) is cut to its first 48
    bytes followed by ``~`` and 16 hexadecimal digits of its SHA-256."""
    from sagellm_comm.transfer.metadata import host_name

    n = next(_NAMED)
    host, suffix = host_name(), f"-pid{os.getpid()}-rank{rank}" + (f"-{n}" if n > 1 else "")
    name = host + suffix
    if len(name) > MAX_NAME_CHARS or len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(host.encode()).hexdigest()[:16]
        name = f"{host.encode()[:48].decode(errors='ignore')}~{digest}{suffix}"
    return name


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

    Every member reaches the exchange even when its own agent could not be made or a region not registered, so
    a failure is reported on every rank at once: the failing rank raises its own error, the others
    :class:`~sagellm_comm.errors.CollectiveFailedError` naming the failed ranks and their reasons
    (``details["failed_ranks"]``), and every agent made is closed.  Names given to two ranks are an
    :class:`~sagellm_comm.errors.InvalidArgumentError` on every rank.  A member that does not arrive within the
    backend's timeout gives :class:`~sagellm_comm.errors.CommTimeoutError`; another failure of the exchange
    :class:`~sagellm_comm.errors.CollectiveFailedError`.
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
    try:  # a handle whose groups were destroyed with its backend (destroy(), then init() again) is no group now
        mine_index = dist.get_rank(cpu_group)
    except (RuntimeError, ValueError):
        what = "the world's group" if group is None else f"group over ranks {list(group.ranks)}"
        raise GroupNotFoundError(f"{what} does not belong to this backend (or was destroyed)") from None
    device = backend.device if backend.device.type == "cuda" else None
    agent: TransferAgent | None = None
    failure: Exception | None = None
    try:
        if regions is not None and not isinstance(regions, Mapping):  # a failure the other ranks learn of too
            raise InvalidArgumentError(f"regions must map names to tensors, got {type(regions).__name__}")
        name = default_agent_name(backend.rank) if name is None else name  # "" is refused, not replaced
        agent = TransferAgent(name, transfer_backend, device=device,
                              timeout=timeout, options=options)  # fmt: skip
        for region, tensor in (regions or {}).items():
            agent.register(region, tensor)
        mine: tuple[str, Any] = ("metadata", agent.metadata())
    except Exception as exc:  # still join the exchange, so that the other ranks learn of it now
        failure = exc
        mine = ("failed", f"{type(exc).__name__}: {exc}")
    except BaseException:
        if agent is not None:
            agent.close()
        raise
    try:
        blobs = _exchange(backend, cpu_group, mine)
        if failure is not None:
            raise failure
        members = list(range(backend.world_size)) if group is None else list(group.ranks)
        _raise_failed(members, blobs, "could not make or register its agent", "no agent of this group was connected")
        names = [AgentMetadata.decode(blob).name for _, blob in blobs]  # every rank sees the same list
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidArgumentError(
                f"transfer_agent over ranks {members}: agent names must be unique, and {twice} is given to ranks "
                f"{[members[i] for i, n in enumerate(names) if n in twice]}; no agent of this group was connected"
            )
        refused: Exception | None = None
        for index, (_, blob) in enumerate(blobs):
            if index != mine_index:
                try:
                    agent.add_peer(blob)
                except Exception as exc:  # still join the second exchange: the ranks that connected must know
                    refused = exc
                    break
        verdict = ("ok", None) if refused is None else ("failed", f"{type(refused).__name__}: {refused}")
        outcomes = _exchange(backend, cpu_group, verdict)
        if refused is not None:
            raise refused
        _raise_failed(members, outcomes, "could not add its peers", "every agent of this group is closed")
    except BaseException:
        if agent is not None:
            agent.close()
        raise
    return agent


def _raise_failed(members: list[int], outcomes: list[tuple[str, Any]], what: str, after: str) -> None:
    """``CollectiveFailedError`` naming every member whose outcome is ``("failed", reason)``, if any."""
    failed = {members[i]: reason for i, (kind, reason) in enumerate(outcomes) if kind == "failed"}
    if failed:
        reasons = "; ".join(f"rank {r} {what} ({why})" for r, why in failed.items())
        raise CollectiveFailedError(
            f"transfer_agent over ranks {members}: {reasons}; {after}", details={"failed_ranks": failed}
        )


def _exchange(backend: CommBackend, cpu_group: Any, mine: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Every member's ``("metadata", blob)`` or ``("failed", reason)``, in group-rank order; Gloo's failures and
    timeouts as typed errors (``comm_timeout`` when a member did not arrive within the backend's timeout)."""
    import torch.distributed as dist

    from sagellm_comm.backend import DEFAULT_TIMEOUT_S as BACKEND_TIMEOUT_S
    from sagellm_comm.backends.torch_distributed.translate import translate

    out: list[Any] = [None] * dist.get_world_size(cpu_group)
    try:
        dist.all_gather_object(out, mine, group=cpu_group)
    except Exception as exc:
        limit = float(getattr(backend, "timeout", BACKEND_TIMEOUT_S))
        raise translate(exc, "transfer_agent's metadata exchange", limit, backend.name) from exc
    return out
