"""The registry of transfer backends: name -> factory, availability probe and ``auto`` rank.

As with the collectives' registry (``sagellm_comm/registry.py``), each backend is one file that registers
itself; the built-ins (``ipc.py``, ``nixl.py``) are imported the first time the registry is consulted.  An
agent built with ``backend="auto"`` starts every available backend and, for each peer, uses the
highest-ranked one that can reach that peer (``TransferAgent.peer_backend`` / ``backend_reason`` say which
and why); an agent built with one name uses that backend only.

Another engine (Mooncake's Transfer Engine, a vendor library) is one file::

    from sagellm_comm.transfer import TransferBackend, register_transfer_backend

    class MooncakeBackend(TransferBackend):
        name = "mooncake"
        ...  # register / local_metadata / connect / post / notifications / close (see base.py)

    register_transfer_backend("mooncake", MooncakeBackend, is_available=mooncake_importable, priority=60)
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import BackendNotSupportedError, CommError, InvalidArgumentError
from sagellm_comm.transfer.base import AgentContext, TransferBackend

AUTO = "auto"
_BUILTIN_MODULES = ("sagellm_comm.transfer.ipc", "sagellm_comm.transfer.nixl")


@dataclass
class _Entry:
    name: str
    factory: Callable[[AgentContext], TransferBackend]
    is_available: Callable[[], bool] | None
    priority: int
    order: int

    def unavailable_reason(self) -> str | None:
        """None when the backend can run in this process, else why not."""
        if self.is_available is None:
            return None
        try:
            ok = bool(self.is_available())
        except CommError as exc:
            return exc.message
        except Exception as exc:  # a probe that crashes means "not here", with the reason
            return f"its availability check failed ({exc!r})"
        return None if ok else f"transfer backend {self.name!r} is registered but not available here"


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.RLock()
_LOADED = False


def _ensure_builtins() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if not _LOADED:
            _LOADED = True
            for module in _BUILTIN_MODULES:
                importlib.import_module(module)


def register_transfer_backend(
    name: str,
    factory: Callable[[AgentContext], TransferBackend],
    *,
    is_available: Callable[[], bool] | None = None,
    priority: int = 0,
    replace: bool = False,
) -> None:
    """Register a transfer backend.

    Args:
        name: lower case (``"mooncake"``), a printable string of 1..128 characters (it names the transport's
            section of the agent's metadata, which peers check); ``"auto"`` is reserved.
        factory: ``factory(context) -> TransferBackend`` for one agent (``context``: :class:`AgentContext`).
            When the backend cannot run for this agent it raises :class:`BackendNotSupportedError` (``auto``
            then goes on without it and ``TransferAgent.skipped`` says why); any other exception is a fault and
            fails the agent's construction, under ``auto`` too, rather than leave a peer on a slower transport
            without a word.
        is_available: cheap probe: False, or :class:`BackendNotSupportedError` saying what is missing, when the
            backend cannot run in this process.  None: always available.
        priority: ``auto`` tries, for each peer, the available backends highest first (built-ins: ``ipc`` 100,
            ``nixl`` 50).
        replace: allow replacing an existing registration of ``name``.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if not key or len(key) > 128 or not key.isprintable():  # the name keys the agent's metadata, as peers read it
        raise InvalidArgumentError(
            f"a transfer backend name must be a printable string of 1..128 characters, got {name!r}"
        )
    if key == AUTO:
        raise InvalidArgumentError("'auto' is reserved and cannot be registered as a transfer backend")
    if not callable(factory):
        raise InvalidArgumentError(f"factory of transfer backend {key!r} must be callable, got {factory!r}")
    if is_available is not None and not callable(is_available):
        raise InvalidArgumentError(
            f"is_available of transfer backend {key!r} must be None or callable, got {is_available!r}"
        )
    priority = check_int(priority, f"priority of transfer backend {key!r}")
    _ensure_builtins()  # a registration made first must not be met (or overwritten) by the built-ins' later
    with _LOCK:
        if key in _REGISTRY and not replace:
            raise InvalidArgumentError(f"transfer backend {key!r} is already registered; pass replace=True")
        order = _REGISTRY[key].order if key in _REGISTRY else len(_REGISTRY)
        _REGISTRY[key] = _Entry(key, factory, is_available, priority, order)


def unregister_transfer_backend(name: str) -> None:
    """Remove a registration (no-op if absent)."""
    _ensure_builtins()  # else a built-in removed before the first look-up came back at it
    with _LOCK:
        _REGISTRY.pop(str(name).strip().lower(), None)


def list_transfer_backends() -> list[str]:
    """Every registered backend, available here or not, highest ``auto`` rank first."""
    _ensure_builtins()
    with _LOCK:
        return [e.name for e in sorted(_REGISTRY.values(), key=lambda e: (-e.priority, e.order))]


def transfer_backend_unavailable(name: str) -> str | None:
    """None when backend ``name`` can run in this process, else why not (unknown names included)."""
    try:
        return _lookup(name).unavailable_reason()
    except BackendNotSupportedError as exc:
        return exc.message


def _lookup(name: str) -> _Entry:
    _ensure_builtins()
    key = str(name).strip().lower()
    with _LOCK:
        entry = _REGISTRY.get(key)
        known = sorted(_REGISTRY)
    if entry is None:
        raise BackendNotSupportedError(
            f"unknown transfer backend {name!r}; registered: {', '.join(known) or 'none'} (or 'auto')",
            details={"backend": name, "registered": known},
        )
    return entry


def resolve(backend: str) -> tuple[list[_Entry], dict[str, str]]:
    """The entries an agent starts for ``backend`` (best first) and why each skipped one cannot run here.

    ``"auto"``: every available backend (none at all raises).  A name: that one, or
    :class:`BackendNotSupportedError` saying why it cannot run.
    """
    if not isinstance(backend, str) or not backend.strip():
        raise InvalidArgumentError(f"backend must be 'auto' or a transfer backend name, got {backend!r}")
    if backend.strip().lower() != AUTO:
        entry = _lookup(backend)
        reason = entry.unavailable_reason()
        if reason is not None:
            raise BackendNotSupportedError(reason, details={"backend": entry.name})
        return [entry], {}
    chosen, skipped = [], {}
    for name in list_transfer_backends():
        entry = _lookup(name)
        reason = entry.unavailable_reason()
        if reason is None:
            chosen.append(entry)
        else:
            skipped[name] = reason
    if not chosen:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none registered"
        raise BackendNotSupportedError(f"no transfer backend can run here ({why})", details={"skipped": skipped})
    return chosen, skipped
