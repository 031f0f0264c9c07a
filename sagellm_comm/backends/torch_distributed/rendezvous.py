"""The store the default process group meets on.

* A world of one with no address: a local ``HashStore``.
* Otherwise a ``TCPStore`` at ``master_addr:master_port`` (``$MASTER_ADDR``/``$MASTER_PORT``) hosted by
  rank 0 and created with the backend's ``timeout``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from sagellm_comm.errors import InvalidArgumentError

from .checks import int_arg, seconds


def init_world(
    torch_backend: str,
    rank: int,
    world_size: int,
    addr: str | None,
    port: int | None,
    timeout: float,
    translate: Callable[[BaseException, str, float], Exception],
) -> Any:
    """Create torch.distributed's default group on a new store; returns the store.

    ``translate(exc, what, timeout)`` makes torch's failures typed errors naming the step and address.
    """
    address = store_address(world_size, addr, port)
    where = "a local store" if address is None else "{}:{}".format(*address)
    try:
        store = create_store(rank, world_size, address, timeout)
    except Exception as exc:
        raise translate(exc, f"rendezvous at {where}", timeout) from exc
    try:
        dist.init_process_group(torch_backend, store=store, rank=rank, world_size=world_size, timeout=seconds(timeout))
    except Exception as exc:
        raise translate(exc, f"init_process_group at {where}", timeout) from exc
    return store


def store_address(world_size: int, addr: str | None, port: int | None) -> tuple[str, int] | None:
    """Where the store is: the arguments, else ``$MASTER_ADDR``/``$MASTER_PORT`` (address default
    ``127.0.0.1``); None for a world of one given no port (a local store needs none)."""
    if world_size == 1 and addr is None and port is None and "MASTER_PORT" not in os.environ:
        return None
    port = int_arg(port, "MASTER_PORT", "master_port")
    if not 0 < port < 65536:
        raise InvalidArgumentError(f"master_port must be in 1..65535, got {port}")
    return addr or os.environ.get("MASTER_ADDR") or "127.0.0.1", port


def create_store(rank: int, world_size: int, address: tuple[str, int] | None, timeout: float) -> Any:
    """Make (or join) the rendezvous store at ``address`` (from :func:`store_address`).

    torch's failures propagate for the caller to translate.
    """
    if address is None:
        return dist.HashStore()
    addr, port = address
    return dist.TCPStore(addr, port, world_size, rank == 0, timeout=seconds(timeout), wait_for_workers=True)
