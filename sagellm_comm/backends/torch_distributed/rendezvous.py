"""The store the default process group meets on, bounded by the backend's timeout on every rank.

* A world of one with no address: a local ``HashStore``.
* Otherwise a ``TCPStore`` at ``master_addr:master_port`` (``$MASTER_ADDR``/``$MASTER_PORT``).  Rank 0
  hosts it, as ``torch.distributed``'s ``env://`` does.
* Client-only mode: when the process that starts the ranks already hosts the store
  (``TORCHELASTIC_USE_AGENT_STORE=True`` and the address is ``$MASTER_ADDR:$MASTER_PORT``), every rank
  is a client, rank 0 included.  torchrun's agent works this way, and so do :func:`host_store` /
  :func:`client_env` for any launcher that starts its own ranks (``sagellm-comm bench``, the test
  helper): the launcher binds port 0, so no port is ever picked, released and raced for.  Rank 0 never
  tries to bind a port that is taken (torch would log an error-level "failed to bind" line).  Such a
  store outlives one world, so each ``init`` of a rank works under its own key prefix, the rank's
  count of inits on that store (``sagellm_comm/<n>/``): the n-th world of every rank meets in the same
  prefix and never reads a key an earlier world left behind (Gloo would connect to a dead address).
* A client first waits, in Python, until something accepts a TCP connection at the address, for at most
  ``timeout`` seconds.  torch's own connect loop retries each attempt with the full timeout plus a
  back-off (a lone rank 1 gave up after about twice the timeout) and logs every failed attempt with a C++
  stack trace; waiting here keeps the bound and keeps stderr clean.  A rank whose rank 0 never starts
  gets ``comm_timeout`` naming the address, the configured timeout and the time it waited.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from sagellm_comm.errors import CommTimeoutError, InvalidArgumentError

from .checks import int_arg, seconds

#: first and largest pause between two connection attempts, seconds
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.05, 0.5
#: torch's variable (torchrun sets it): the launcher hosts the store at MASTER_ADDR:MASTER_PORT, ranks are clients
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


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

    Raises ``comm_timeout`` when a client finds nobody listening within ``timeout`` seconds; torch's own
    failures propagate for the caller to translate.
    """
    if address is None:
        return dist.HashStore()
    addr, port = address
    launcher_hosts = _agent_store_at(addr, port)
    host = rank == 0 and not launcher_hosts
    if not host:
        wait_for_listener(addr, port, timeout)
    # wait_for_workers=True on every rank: a client adds itself to the join count only then, and the
    # host waits (bounded by ``timeout``) until the count reaches world_size
    store = dist.TCPStore(addr, port, world_size, host, timeout=seconds(timeout), wait_for_workers=True)
    if not launcher_hosts:
        return store  # a store of its own: nothing earlier lives in it
    generation = store.add(f"sagellm_comm/inits/rank{rank}", 1)
    return dist.PrefixStore(f"sagellm_comm/{generation}", store)


def _agent_store_at(addr: str, port: int) -> bool:
    """True when the launcher hosts the store at exactly this address (torch's env:// rule)."""
    if os.environ.get(AGENT_STORE_ENV) != "True":
        return False
    return (addr, str(port)) == (os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT"))


def host_store(addr: str = "127.0.0.1", timeout: float = 300.0) -> Any:
    """Host a rendezvous store for ranks this process is about to start; returns the ``TCPStore``.

    It listens on a port the operating system picks (port 0; ``store.port`` says which), so no port is
    picked, released and then taken by someone else before the ranks bind it.  Start each rank with
    :func:`client_env` ``(addr, store.port)`` in its environment: every rank then joins as a client
    (rank 0 included), whether it calls ``init`` with that address or none, or ``torch.distributed``'s
    ``env://`` / ``tcp://`` init (which honour the same variable).  Keep the object alive while the
    ranks run; the store stops when it is released.  ``timeout`` bounds the store's own waits.
    """
    return dist.TCPStore(addr, 0, None, True, timeout=seconds(timeout), wait_for_workers=False)


def client_env(addr: str, port: int) -> dict[str, str]:
    """The variables that make a rank join the store its launcher hosts at ``addr:port`` as a client."""
    return {"MASTER_ADDR": addr, "MASTER_PORT": str(port), AGENT_STORE_ENV: "True"}


def wait_for_listener(addr: str, port: int, timeout: float) -> float:
    """Block until a TCP connection to ``addr:port`` succeeds; returns the seconds waited.

    Retries refused connections and unresolved names (the host of rank 0 may not be up yet) with a
    growing pause, and raises :class:`CommTimeoutError` once ``timeout`` seconds have passed.
    """
    start = time.monotonic()
    deadline = start + timeout
    pause, last = _FIRST_PAUSE_S, None
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((addr, port), timeout=min(remaining, 1.0)):
                return time.monotonic() - start
        except OSError as exc:  # refused, unreachable, name not resolvable (yet), connect timed out
            last = exc
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(2 * pause, _MAX_PAUSE_S)
    waited = time.monotonic() - start
    raise CommTimeoutError(
        f"rendezvous at {addr}:{port}: nothing accepted a connection within the configured timeout of "
        f"{timeout:g}s (waited {waited:.1f}s; last error: {last}). Rank 0 (or torchrun's agent) hosts the "
        "store there: start it, check that every rank uses the same MASTER_ADDR/MASTER_PORT, or pass a "
        "larger timeout=",
        details={"op": "rendezvous", "address": f"{addr}:{port}", "timeout_s": timeout, "waited_s": waited},
    )
