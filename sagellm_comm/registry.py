"""The registry of communication backends: kind -> factory, and the ``auto`` choice.

Kind -> engine has exactly one dispatch point, :func:`_lookup` over ``_REGISTRY``.  The built-in
adapters register themselves when their module is imported; :func:`_ensure_builtins` imports them the
first time the registry is consulted, so ``import sagellm_comm`` stays cheap.

``"auto"`` picks the available kind of highest priority.  What it skipped, and why, is recorded
(:func:`last_auto_choice`, and :attr:`CommBackend.auto_choice` on a backend built with ``"auto"``) and
logged once per process at WARNING, so a server that silently runs NCCL instead of the custom kernels
says so (for example: "custom: custom needs CuPy for CUDA IPC handles: pip install ...").

A third-party backend is one file::

    from sagellm_comm import CommBackend, register_comm_backend

    class MyBackend(CommBackend): ...

    register_comm_backend("mine", MyBackend, is_available=lambda: True, priority=10)
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_comm.arguments import check_int
from sagellm_comm.errors import BackendNotSupportedError, CommError, InvalidArgumentError

if TYPE_CHECKING:
    from sagellm_comm.backend import CommBackend

__all__ = [
    "AUTO",
    "AutoChoice",
    "create_backend",
    "get_comm_backend",
    "is_comm_backend_available",
    "last_auto_choice",
    "list_comm_backends",
    "register_comm_backend",
    "resolve_kind",
    "unregister_comm_backend",
]

AUTO = "auto"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` chose and why every kind ranked above it was skipped.

    Attributes:
        kind: the kind chosen.
        skipped: ``{kind: reason}`` for each better-ranked kind that cannot run here, best first.
    """

    kind: str
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.skipped:
            return f"backend 'auto' chose {self.kind!r}, the best registered kind"
        why = "; ".join(f"{kind}: {reason}" for kind, reason in self.skipped.items())
        return f"backend 'auto' chose {self.kind!r}; better kinds cannot run here ({why})"


@dataclass
class _Entry:
    name: str
    factory: Callable[..., CommBackend]
    is_available: Callable[[], bool] | None
    priority: int
    order: int

    def check(self) -> None:
        """Raise BackendNotSupportedError unless this backend can run here."""
        if self.is_available is None:
            return
        try:
            ok = bool(self.is_available())
        except BackendNotSupportedError:  # the probe's own "not here", saying what is missing
            raise
        except Exception as exc:  # a probe that fails otherwise (any other error, typed or not) means "not here" too
            raise BackendNotSupportedError(
                f"backend {self.name!r} is not available: its availability check failed ({exc})",
                details={"kind": self.name},
            ) from exc
        if not ok:
            raise BackendNotSupportedError(
                f"backend {self.name!r} is registered but not available on this machine",
                details={"kind": self.name},
            )


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.RLock()
_BUILTINS_LOADED = False
#: modules whose import registers built-in kinds; a missing optional one is skipped
_BUILTIN_MODULES = ("sagellm_comm.backends.torch_distributed", "sagellm_comm.backends.custom")
_IMPORT_FAILURES: dict[str, str] = {}
_LAST_AUTO: AutoChoice | None = None
_LOGGED_AUTO: set[str] = set()


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _LOCK:
        if _BUILTINS_LOADED:
            return
        _BUILTINS_LOADED = True
        for module in _BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as exc:  # a module missing, or a name missing from one (a broken install)
                if isinstance(exc, ModuleNotFoundError) and exc.name == module:  # optional, not in this install
                    continue
                if module == _BUILTIN_MODULES[0]:
                    raise
                _IMPORT_FAILURES[module] = str(exc)  # reported by _lookup; the others stay usable


def register_comm_backend(
    name: str,
    factory: Callable[..., CommBackend],
    *,
    is_available: Callable[[], bool] | None = None,
    priority: int = 0,
    replace: bool = False,
) -> None:
    """Register a backend kind.

    Args:
        name: the kind, lower case (``"mine"``); ``"auto"`` is reserved.
        factory: ``factory(**kwargs) -> CommBackend`` building an uninitialised backend.
        is_available: cheap probe; False (or raising :class:`BackendNotSupportedError` whose message
            says what is missing) when the kind cannot run here. None: always available.
        priority: ``"auto"`` picks the available kind with the highest priority (built-ins: custom
            60, nccl/rccl 50, hccl 40, gloo 0).
        replace: allow replacing an existing registration of ``name``.
    """
    key = _checked_registration(name, factory, is_available, priority)
    _ensure_builtins()  # a built-in kind registered later would replace this one
    _insert(key, factory, is_available, priority, replace)


def register_builtin_backend(
    name: str, factory: Callable[..., CommBackend], *, is_available: Callable[[], bool] | None, priority: int
) -> None:
    """What a built-in backend module calls when it is imported: :func:`register_comm_backend` with
    ``replace=True``, without loading the other built-ins first (importing one adapter must not import the
    others: the custom backend's kernels would be defined before a process chose the Triton interpreter)."""
    _insert(_checked_registration(name, factory, is_available, priority), factory, is_available, priority, True)


def _checked_registration(name, factory, is_available, priority) -> str:
    """The kind's key, once the registration's arguments are checked (typed errors naming the kind)."""
    key = _normalise(name)
    if key == AUTO:
        raise InvalidArgumentError("'auto' is reserved and cannot be registered as a backend")
    if not callable(factory):
        raise InvalidArgumentError(f"factory for backend {key!r} must be callable, got {factory!r}")
    if is_available is not None and not callable(is_available):
        raise InvalidArgumentError(f"is_available of backend {key!r} must be None or callable, got {is_available!r}")
    check_int(priority, f"priority of backend {key!r}")
    return key


def _insert(key: str, factory, is_available, priority: int, replace: bool) -> None:
    with _LOCK:
        if key in _REGISTRY and not replace:
            raise InvalidArgumentError(f"backend {key!r} is already registered; pass replace=True to override it")
        order = _REGISTRY[key].order if key in _REGISTRY else len(_REGISTRY)
        _REGISTRY[key] = _Entry(key, factory, is_available, int(priority), order)


def unregister_comm_backend(name: str) -> None:
    """Remove a registered kind (no-op if absent). Mainly for tests and plugins."""
    key = _normalise(name)
    _ensure_builtins()  # a built-in kind loaded later would come back
    with _LOCK:
        _REGISTRY.pop(key, None)


def list_comm_backends() -> list[str]:
    """Every registered kind, available here or not, best ``auto`` candidate first."""
    _ensure_builtins()
    with _LOCK:
        entries = sorted(_REGISTRY.values(), key=lambda e: (-e.priority, e.order))
    return [e.name for e in entries]


def is_comm_backend_available(name: str) -> bool:
    """True if ``name`` is registered and can run on this machine (``"auto"``: if any can)."""
    try:
        resolve_kind(name)
        if _normalise(name) != AUTO:
            _lookup(_normalise(name)).check()
    except CommError:
        return False
    return True


def resolve_kind(kind: str | None) -> str:
    """Map ``kind`` to a registered name; ``None``/``"auto"`` -> the best available kind.

    For ``"auto"`` the outcome, with the reason each better kind was skipped, is recorded
    (:func:`last_auto_choice`).
    """
    global _LAST_AUTO
    _ensure_builtins()
    key = _normalise(AUTO if kind is None else kind)  # an empty name is refused, not taken for "auto"
    if key != AUTO:
        _lookup(key)
        return key
    skipped: dict[str, str] = {}
    for name in list_comm_backends():
        try:
            _lookup(name).check()
        except BackendNotSupportedError as exc:
            skipped[name] = exc.message
            continue
        _LAST_AUTO = AutoChoice(name, skipped)
        return name
    raise BackendNotSupportedError(
        "no communication backend can run here: " + "; ".join(skipped.values() or ["none registered"]),
        details={"kind": AUTO, "skipped": skipped},
    )


def last_auto_choice() -> AutoChoice | None:
    """The latest ``"auto"`` outcome in this process (None before the first)."""
    return _LAST_AUTO


def create_backend(kind: str = AUTO, **kwargs: Any) -> CommBackend:
    """Build an *uninitialised* backend of ``kind`` (what :meth:`CommBackend.create` does).

    With ``"auto"`` the backend's ``auto_choice`` says what was skipped and why; the first time a given
    outcome with skipped kinds occurs in this process, it is logged at WARNING.
    """
    from sagellm_comm.backend import CommBackend

    auto = _normalise(AUTO if kind is None else kind) == AUTO
    name = resolve_kind(kind)
    entry = _lookup(name)
    entry.check()
    _check_arguments(entry, kwargs, auto)
    try:
        backend = entry.factory(**kwargs)
    except CommError:  # already typed, and saying what is wrong
        raise
    except Exception as exc:  # a third party's factory failing: typed, naming the kind and the failure
        raise BackendNotSupportedError(
            f"backend {name!r} could not be built: its factory raised {type(exc).__name__}: {exc}",
            details={"kind": name},
        ) from exc
    if not isinstance(backend, CommBackend):
        raise BackendNotSupportedError(
            f"factory of backend {name!r} returned {type(backend).__name__}, not a CommBackend",
            details={"kind": name},
        )
    if auto and _LAST_AUTO is not None:
        backend.auto_choice = _LAST_AUTO
        text = str(_LAST_AUTO)
        if _LAST_AUTO.skipped and text not in _LOGGED_AUTO:
            _LOGGED_AUTO.add(text)
            logger.warning("%s", text)
    return backend


def get_comm_backend(kind: str | None = None, **kwargs: Any) -> CommBackend:
    """Build an uninitialised backend of ``kind``; ``None`` or ``"auto"``: the best available."""
    return create_backend(AUTO if kind is None else kind, **kwargs)


def _check_arguments(entry: _Entry, kwargs: dict[str, Any], auto: bool) -> None:
    """Refuse keyword arguments ``entry``'s factory does not take, and a call without one it requires, before it
    is called (its TypeError would name neither the kind nor, with ``auto``, that the kind was chosen here)."""
    try:
        signature = inspect.signature(entry.factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): the factory checks its own arguments
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        chosen = f"backend 'auto' chose {entry.name!r}, which" if auto else f"backend {entry.name!r}"
        raise InvalidArgumentError(
            f"{chosen} cannot be built with the arguments {sorted(kwargs)} ({exc})",
            details={"kind": entry.name, "arguments": sorted(kwargs)},
        ) from exc


def _lookup(name: str) -> _Entry:
    _ensure_builtins()
    with _LOCK:
        entry = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if entry is None:
        failed = "".join(f"; {m} failed to import: {why}" for m, why in _IMPORT_FAILURES.items())
        raise BackendNotSupportedError(
            f"unknown backend {name!r}; registered: {', '.join(known) or 'none'} (or 'auto'){failed}",
            details={"kind": name, "registered": known, "import_failures": dict(_IMPORT_FAILURES)},
        )
    return entry


def _normalise(name: str | None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"backend kind must be a non-empty string, got {name!r}")
    return name.strip().lower()
