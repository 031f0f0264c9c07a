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
* One deadline, ``timeout`` seconds from the call, bounds the whole rendezvous on every rank, whatever sits
  at the address (:func:`init_world`):

  - a client first waits, in Python, until something accepts a TCP connection there.  torch's own connect
    loop retries each attempt with the full timeout plus a back-off (a lone rank 1 gave up after about twice
    the timeout) and logs every failed attempt with a C++ stack trace; waiting here keeps the bound and keeps
    stderr clean;
  - then it joins the store in a helper thread and waits for it at most until the deadline: torch's
    handshake has no bound of its own, and a listener that accepts and never answers (a silent or stopped
    process, a half-open connection) held a rank forever.  A handshake that fails (something that is not a
    store answered) is retried until the deadline;
  - rank 0 retries binding a port that is taken (a previous run's store still closing) until the deadline;
  - every rank joins under its own key prefix, the rank's count of inits on that store
    (``sagellm_comm/<n>/``), and announces its arrival there; the ranks wait, bounded by the deadline, until
    all have arrived before torch's process group starts.  A stale store (an earlier world's rank 0 still
    alive, or a launcher's store that outlived a world) therefore never hands out an address of a dead
    process: its keys live under another prefix, and the missing ranks are named when the deadline passes;
  - a store that answered and then fell silent (the process that hosts it stopped or hung, its host or the
    network to it down: the connection stays open and nothing comes back) would hold a rank in torch's calls
    for good: torch waits for some replies with no bound of its own (a ``check``, an ``add``, the end of a
    timed-out ``wait``).  So this process's connections to the store are shut down once the deadline has
    passed by ``_ATTEMPT_SLACK_S`` (:func:`_cut_at`), which ends such a call with an error.

  Each failure is ``comm_timeout`` naming the address, the configured timeout, the time waited and what was
  found there.  Only what comes after every rank has arrived (torch's process group, whose own timeout bounds
  each of its waits) can take longer, and only when a rank dies in between.  A store that falls silent then is
  cut like one that falls silent before, once twice the timeout and a second have passed since torch began:
  ``comm_timeout`` saying that the store stopped answering.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from sagellm_comm.arguments import check_timeout
from sagellm_comm.errors import CommError, CommTimeoutError, InvalidArgumentError

from .checks import int_arg, seconds

#: first and largest pause between two connection attempts, seconds
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.05, 0.5


def _back_off(pause: float, deadline: float) -> float:
    """Sleep ``pause`` seconds, or until ``deadline`` (``time.monotonic()``) if that comes first; return the next
    pause (doubled, at most ``_MAX_PAUSE_S``).  Every retry loop of the rendezvous waits with this."""
    time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    return min(2 * pause, _MAX_PAUSE_S)


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
) -> tuple[Any, tuple[str, int] | None]:
    """Create torch.distributed's default group on a new store; returns the store and its address (None: a local
    store), for :func:`store_calls`.

    ``translate(exc, what, timeout)`` makes torch's failures typed errors naming the step and address.  The
    store and the arrival of every rank are bounded by one deadline, ``timeout`` seconds from now (module
    docstring).
    """
    deadline = time.monotonic() + timeout
    address = store_address(world_size, addr, port)
    where = "a local store" if address is None else "{}:{}".format(*address)
    try:
        store = create_store(rank, world_size, address, timeout, deadline)
        if address is not None:
            with _cut_at(address, deadline + _ATTEMPT_SLACK_S, "rendezvous", timeout):
                wait_for_ranks(store, rank, world_size, timeout, deadline, where)
    except CommError:
        raise
    except Exception as exc:
        raise translate(exc, f"rendezvous at {where}", timeout) from exc
    try:
        with store_calls(address, "init_process_group", timeout):
            dist.init_process_group(torch_backend, store=store, rank=rank, world_size=world_size,
                                    timeout=seconds(timeout))  # fmt: skip
    except CommError:
        if dist.is_initialized():  # made just as the store was cut: unusable
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise
    except Exception as exc:
        raise translate(exc, f"init_process_group at {where}", timeout) from exc
    return store, address


def store_calls(address: tuple[str, int] | None, step: str, timeout: float) -> contextlib.AbstractContextManager:
    """``with`` it around a torch call that uses the store at ``address`` (None: a local store) after the
    rendezvous, ``step`` naming the call: torch's own ``timeout`` bounds each of its waits (more than one may run
    out when a rank died in between), but not a store that falls silent meanwhile.  Once twice the timeout and a
    second have passed, this process's connections to the store are shut down (:func:`_cut_at`), which ends the
    call, and ``comm_timeout`` says that the store stopped answering."""
    return _cut_at(address, time.monotonic() + 2 * timeout + _ATTEMPT_SLACK_S, step, timeout)


def store_address(world_size: int, addr: str | None, port: int | None) -> tuple[str, int] | None:
    """Where the store is: the arguments, else ``$MASTER_ADDR``/``$MASTER_PORT`` (address default
    ``127.0.0.1``); None for a world of one given no port (a local store needs none)."""
    if world_size == 1 and addr is None and port is None and "MASTER_PORT" not in os.environ:
        return None
    port = int_arg(port, "MASTER_PORT", "master_port")
    if not 0 < port < 65536:
        raise InvalidArgumentError(f"master_port must be in 1..65535, got {port}")
    if addr is not None and (not isinstance(addr, str) or not addr.strip()):
        raise InvalidArgumentError(f"master_addr must be a host name or address (a non-empty str), got {addr!r}")
    return addr or os.environ.get("MASTER_ADDR") or "127.0.0.1", port


def create_store(
    rank: int, world_size: int, address: tuple[str, int] | None, timeout: float, deadline: float | None = None
) -> Any:
    """Make (or join) the rendezvous store at ``address`` (from :func:`store_address`), under this rank's key
    prefix for this init (module docstring).

    Raises ``comm_timeout`` when no store could be reached (or, rank 0, bound) before ``deadline`` (default
    ``timeout`` seconds from now); torch's other failures propagate for the caller to translate.
    """
    if address is None:
        return dist.HashStore()
    deadline = time.monotonic() + timeout if deadline is None else deadline
    addr, port = address
    if rank == 0 and not _agent_store_at(addr, port):
        store = _bind_store(addr, port, timeout, deadline)
    else:
        store = _join_store(addr, port, timeout, deadline)
    with _cut_at(address, deadline + _ATTEMPT_SLACK_S, "rendezvous", timeout):  # the store answered the join
        generation = store.add(f"sagellm_comm/inits/rank{rank}", 1)
    return dist.PrefixStore(f"sagellm_comm/{generation}", store)


def wait_for_ranks(store: Any, rank: int, world_size: int, timeout: float, deadline: float, where: str) -> None:
    """Announce this rank in ``store`` (its prefix for this init) and wait, until ``deadline``, for every rank."""
    store.set(f"arrived/{rank}", "1")
    keys = [f"arrived/{r}" for r in range(world_size)]
    try:
        store.wait(keys, seconds(max(deadline - time.monotonic(), 0.001)))
    except Exception as exc:
        if not isinstance(exc, dist.DistStoreError) and "timeout" not in str(exc).lower():
            raise
        missing = _missing(store, keys)
        waited = timeout - (deadline - time.monotonic())
        raise CommTimeoutError(
            f"rendezvous at {where}: ranks {missing} did not arrive within the configured timeout of {timeout:g}s "
            f"(waited {waited:.1f}s for all {world_size} ranks).  Start every rank with the same MASTER_ADDR/"
            "MASTER_PORT and world size, or pass a larger timeout=",
            details={"op": "rendezvous", "address": where, "timeout_s": timeout, "missing_ranks": missing},
        ) from exc


def _missing(store: Any, keys: Sequence[str]) -> list[int]:
    try:
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except Exception:  # the store went away: say nothing rather than guess
        return []


def _bind_store(addr: str, port: int, timeout: float, deadline: float) -> Any:
    """Rank 0: host the store at ``addr:port``; a port in use is retried until ``deadline``."""
    pause, last = _FIRST_PAUSE_S, None
    while True:
        if _port_free(addr, port):
            try:
                return dist.TCPStore(addr, port, None, True, timeout=seconds(timeout), wait_for_workers=False)
            except Exception as exc:  # taken between the probe and the bind: retried like a busy port
                if "in use" not in str(exc).lower():
                    raise
                last = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommTimeoutError(
                f"rendezvous at {addr}:{port}: rank 0 could not listen there within the configured timeout of "
                f"{timeout:g}s: the address is in use (another process holds the port: an earlier run's rank 0, "
                f"another job){f'; last error: {last}' if last else ''}.  Stop it, or give every rank another "
                "MASTER_PORT",
                details={"op": "rendezvous", "address": f"{addr}:{port}", "timeout_s": timeout},
            )
        pause = _back_off(pause, deadline)


def _port_free(addr: str, port: int) -> bool:
    """True when ``addr:port`` can be bound now (probed without torch, which logs a failed bind as an error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((addr, port))
        except OSError:
            return False
    return True


def _join_store(addr: str, port: int, timeout: float, deadline: float) -> Any:
    """A client of the store at ``addr:port``, reached before ``deadline`` (module docstring)."""
    pause, last = _FIRST_PAUSE_S, "no attempt finished in time"
    while True:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            wait_for_listener(addr, port, remaining, total=timeout)
            remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        store, error, stuck = _join_once(addr, port, remaining)
        if store is not None:
            store.set_timeout(seconds(timeout))
            return store
        if stuck:  # accepted, never answered: the helper stays blocked until the peer closes
            last = "it accepted the connection and never answered"
            break
        last = " ".join(str(error).split())
        pause = _back_off(pause, deadline)
    raise CommTimeoutError(
        f"rendezvous at {addr}:{port}: something accepts connections there but did not answer as a rendezvous "
        f"store within the configured timeout of {timeout:g}s ({last}).  Rank 0 (or torchrun's agent) hosts the "
        "store there: check that nothing else holds that port and that every rank uses the same MASTER_ADDR/"
        "MASTER_PORT, or pass a larger timeout=",
        details={"op": "rendezvous", "address": f"{addr}:{port}", "timeout_s": timeout, "last_error": last},
    )


#: longest single attempt to join a store, and how long after its own bound torch may still take to give up
_ATTEMPT_S, _ATTEMPT_SLACK_S = 1.0, 1.0


def _join_once(addr: str, port: int, remaining: float) -> tuple[Any, BaseException | None, bool]:
    """One attempt to join the store, in a helper thread, waited for ``remaining`` seconds at most:
    ``(store, error, stuck)``.

    torch bounds an attempt's connection retries by the attempt's timeout but not its handshake: a peer that
    accepts and never answers blocks it for good.  So each attempt is short, and when ``remaining`` runs out
    first the attempt is ended (:func:`_end_attempt`).  No helper may be left to return into Python while the
    interpreter finalises: torch's call returns with the GIL released, taking it back then ends the thread
    inside a C++ destructor, and the process aborts ("terminate called without an active exception").  One
    still alive is ``stuck``, and is ended the same way, for longer, before the interpreter finalises."""
    outcome: dict[str, Any] = {}
    attempt = max(0.1, min(_ATTEMPT_S, remaining))

    def join() -> None:
        try:
            outcome["store"] = dist.TCPStore(addr, port, None, False, timeout=seconds(attempt))
        except Exception as exc:  # reported by the waiting thread
            outcome["error"] = exc

    before = _sockets_to(port)
    helper = threading.Thread(target=join, name="sagellm-comm-store-join", daemon=True)
    helper.start()
    helper.join(remaining)
    abandoned = helper.is_alive()
    if abandoned:  # the deadline came first: end the attempt
        _end_attempt(helper, port, before, _ATTEMPT_SLACK_S)
    if helper.is_alive():
        _left_behind((helper, port, before))
    # a client made after its sockets were shut down is not usable
    store = None if abandoned else outcome.get("store")
    return store, outcome.get("error"), helper.is_alive()


@contextmanager
def _cut_at(address: tuple[str, int] | None, cut: float, step: str, timeout: float) -> Iterator[None]:
    """Run the block (``step``: what it does, in messages), which calls the store at ``address``; if it has not ended
    by ``cut`` (``time.monotonic()``), shut down this process's connections to the store: a call waiting for a
    reply that never comes (a store fallen silent) then fails, and the block raises ``comm_timeout`` saying so.
    The store is unusable after that; it is only cut once the step has run past its own deadline."""
    if address is None:  # a local store: nothing to wait for
        yield
        return
    port, where, start = address[1], "{}:{}".format(*address), time.monotonic()
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        _shut_down(_sockets_to(port))

    timer = threading.Timer(max(0.0, cut - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:
        failure = exc
        if not fired.is_set():
            raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise CommTimeoutError(
            f"{step} at {where}: the store stopped answering (the step had run {time.monotonic() - start:.1f}s; the "
            f"configured timeout is {timeout:g}s): the connection to it is open and nothing comes back (the process "
            "that hosts it, rank 0 or torchrun's agent, is stopped or hung, or its host or the network to it is "
            "down).  Check that process and the network to it, or pass a larger timeout=",
            details={"op": step, "address": where, "timeout_s": timeout},
        ) from failure


#: how often an attempt being ended has its new sockets shut down, seconds
_SHUT_DOWN_EVERY_S = 0.01
#: how long the exit waits for a helper still running, seconds: far past what one needs once its tries fail at
#: once (torch's longest back-off sleep within an attempt of ``_ATTEMPT_S`` is under 2 s)
_EXIT_WAIT_S = 10.0


def _end_attempt(helper: threading.Thread, port: int, before: frozenset, wait_s: float) -> None:
    """End the join attempt running in ``helper``: until it ends, or ``wait_s`` seconds have passed, shut down
    this process's sockets to ``port`` other than ``before`` (those that predate the attempt), again and again.

    A blocked handshake then fails, but torch retries a failed handshake after a back-off sleep (up to its own
    timeout, which may run out a little after the rank's deadline): a single shutdown misses the connection of
    such a retry, which blocks again, and its end may come while the interpreter finalises.  Shut down as they
    appear, every try fails at once, and the helper ends within one back-off once torch's timeout has passed.
    """
    end = time.monotonic() + wait_s
    while helper.is_alive() and (left := end - time.monotonic()) > 0:
        _shut_down(_sockets_to(port) - before)
        helper.join(min(_SHUT_DOWN_EVERY_S, left))


#: helpers that outlived their attempt: (thread, port, the sockets to ``port`` that predate it)
_LEFT_BEHIND: list[tuple[threading.Thread, int, frozenset]] = []
_LEFT_BEHIND_LOCK = threading.Lock()


def _left_behind(entry: tuple[threading.Thread, int, frozenset] | None = None) -> list:
    """The helpers still running, ``entry`` added; those that ended since are dropped here, so a process whose
    rendezvous fails again and again keeps one entry per helper still running, not one per failure."""
    with _LEFT_BEHIND_LOCK:
        _LEFT_BEHIND[:] = [kept for kept in _LEFT_BEHIND if kept[0].is_alive()]
        if entry is not None:
            _LEFT_BEHIND.append(entry)
        return list(_LEFT_BEHIND)


def _sockets_to(port: int) -> frozenset:
    """``(fd, inode)`` of this process's TCP sockets whose peer's port is ``port`` (Linux: /proc/self/fd)."""
    found = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return frozenset()
    for name in fds:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type == socket.SOCK_STREAM and sock.getpeername()[1] == port:
                    found.add((fd, os.fstat(fd).st_ino))
        except (OSError, ValueError, IndexError, TypeError):
            continue
    return frozenset(found)


def _shut_down(sockets: frozenset) -> None:
    """Shut both directions of each socket (the blocked reader in torch then gets an error); its fd stays
    torch's to close."""
    for fd, inode in sockets:
        try:
            if os.fstat(fd).st_ino != inode:
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            continue


@atexit.register
def _end_left_behind() -> None:
    """At exit, before the interpreter finalises: end every helper still running (:func:`_end_attempt`)."""
    for helper, port, before in _left_behind():
        _end_attempt(helper, port, before, _EXIT_WAIT_S)


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
    ranks run; the store stops when it is released.  ``timeout`` bounds the store's own waits (a positive
    number of seconds, else ``InvalidArgumentError``).
    """
    timeout = check_timeout(timeout)
    return dist.TCPStore(addr, 0, None, True, timeout=seconds(timeout), wait_for_workers=False)


def client_env(addr: str, port: int) -> dict[str, str]:
    """The variables that make a rank join the store its launcher hosts at ``addr:port`` as a client."""
    return {"MASTER_ADDR": addr, "MASTER_PORT": str(port), AGENT_STORE_ENV: "True"}


def wait_for_listener(addr: str, port: int, timeout: float, total: float | None = None) -> float:
    """Block until a TCP connection to ``addr:port`` succeeds; returns the seconds waited.

    Retries refused connections and unresolved names (the host of rank 0 may not be up yet) with a
    growing pause, and raises :class:`CommTimeoutError` once ``timeout`` seconds have passed (``total``: the
    configured timeout the message names, when ``timeout`` is what is left of it).
    """
    total = timeout if total is None else total
    start = time.monotonic()
    deadline = start + timeout
    pause, last = _FIRST_PAUSE_S, None
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((addr, port), timeout=min(remaining, 1.0)):
                return time.monotonic() - start
        except OSError as exc:  # refused, unreachable, name not resolvable (yet), connect timed out
            last = exc
        pause = _back_off(pause, deadline)
    waited = time.monotonic() - start
    raise CommTimeoutError(
        f"rendezvous at {addr}:{port}: nothing accepted a connection within the configured timeout of "
        f"{total:g}s (waited {waited:.1f}s; last error: {last}). Rank 0 (or torchrun's agent) hosts the "
        "store there: start it, check that every rank uses the same MASTER_ADDR/MASTER_PORT, or pass a "
        "larger timeout=",
        details={"op": "rendezvous", "address": f"{addr}:{port}", "timeout_s": total, "waited_s": waited},
    )
