"""One typed error hierarchy for sagellm-comm.

Every error is a :class:`CommError` *and* the matching built-in exception (``ValueError`` for bad
arguments, ``RuntimeError`` for bad state, ``TimeoutError`` for timeouts), so code written against
plain Python exceptions keeps working.  Each carries a stable string ``code`` (the protocol's
values), so callers and logs can match on it without parsing messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes (string values are part of the public protocol)."""

    INVALID_ARGUMENT = "invalid_argument"
    COMM_TIMEOUT = "comm_timeout"
    COMM_GROUP_INVALID = "comm_group_invalid"
    COMM_GROUP_NOT_FOUND = "comm_group_not_found"
    COMM_RANK_MISMATCH = "comm_rank_mismatch"
    COMM_BACKEND_NOT_SUPPORTED = "comm_backend_not_supported"
    COMM_COLLECTIVE_FAILED = "comm_collective_failed"
    COMM_P2P_FAILED = "comm_p2p_failed"
    COMM_NOT_INITIALIZED = "comm_not_initialized"
    COMM_WORKSPACE_EXHAUSTED = "comm_workspace_exhausted"
    UNAVAILABLE = "unavailable"
    NOT_IMPLEMENTED = "not_implemented"
    TRANSFER_FAILED = "transfer_failed"
    TRANSFER_PEER_LOST = "transfer_peer_lost"


class CommError(Exception):
    """Root of every error raised by sagellm-comm.

    Attributes:
        code: the stable :class:`ErrorCode` of this error.
        details: optional machine-readable context (ranks, sizes, backend names, ...).
    """

    code: ErrorCode = ErrorCode.COMM_COLLECTIVE_FAILED

    def __init__(self, message: str, *, details: dict | None = None, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"


class InvalidArgumentError(CommError, ValueError):
    """An argument is wrong: dtype, shape, device, size, op, rank, world size..."""

    code = ErrorCode.INVALID_ARGUMENT


class ShapeMismatchError(InvalidArgumentError):
    """Tensors that must agree in shape or dtype do not."""


class ConfigMismatchError(InvalidArgumentError):
    """Ranks of one group were configured differently in a setting they must agree on (``docs/configuration.md``),
    found when the group was set up.  ``details["settings"]`` maps each differing setting to its values and
    the ranks that hold them."""


class WorkspaceExhaustedError(InvalidArgumentError):
    """The message does not fit the symmetric workspace."""

    code = ErrorCode.COMM_WORKSPACE_EXHAUSTED


class CommTimeoutError(CommError, TimeoutError):
    """A blocking call or a device-side wait ran past its timeout."""

    code = ErrorCode.COMM_TIMEOUT


class NotInitializedError(CommError, RuntimeError):
    """The backend or group is used before ``init`` or after ``destroy``."""

    code = ErrorCode.COMM_NOT_INITIALIZED


class GroupInvalidError(CommError, ValueError):
    """A group is malformed: empty, duplicate or out-of-range ranks, invalid world size."""

    code = ErrorCode.COMM_GROUP_INVALID


class GroupNotFoundError(CommError, LookupError):
    """A group id or name that does not exist (or was destroyed)."""

    code = ErrorCode.COMM_GROUP_NOT_FOUND


class RankMismatchError(CommError, ValueError):
    """A rank argument is outside the group or does not match this process."""

    code = ErrorCode.COMM_RANK_MISMATCH


class BackendNotSupportedError(CommError, RuntimeError):
    """The requested backend cannot run here (library missing, no device, unknown name)."""

    code = ErrorCode.COMM_BACKEND_NOT_SUPPORTED


class CollectiveFailedError(CommError, RuntimeError):
    """The engine underneath failed while running a collective."""

    code = ErrorCode.COMM_COLLECTIVE_FAILED


class P2PFailedError(CommError, RuntimeError):
    """A point-to-point transfer or peer-memory operation failed."""

    code = ErrorCode.COMM_P2P_FAILED


class UnavailableError(CommError, RuntimeError):
    """A resource the call needs is not available right now."""

    code = ErrorCode.UNAVAILABLE


class NotImplementedCommError(CommError, NotImplementedError):
    """The operation exists in the interface but this backend does not provide it."""

    code = ErrorCode.NOT_IMPLEMENTED


class CollectiveMismatchError(CollectiveFailedError):
    """Ranks issued different collectives (algorithm, size, dtype or call order), found by check mode
    (``SAGELLM_COMM_CHECK=1``) before any data was combined, or by torch's fingerprint check on a torch.distributed
    engine (``TORCH_DISTRIBUTED_DEBUG=DETAIL``, docs/backends.md).  ``details`` names both fingerprints."""

    code = ErrorCode.COMM_COLLECTIVE_FAILED


class TransferError(CommError, RuntimeError):
    """A one-sided block transfer (``sagellm_comm.transfer``) failed after it was accepted; ``details`` names
    the peer, the operation and the transport."""

    code = ErrorCode.TRANSFER_FAILED


class PeerLostError(TransferError):
    """The transfer's peer exited, restarted or was removed before the transfer completed; ``details["peer"]``
    names it.  Other peers' transfers are not affected."""

    code = ErrorCode.TRANSFER_PEER_LOST


def run_every(steps: Iterable[Callable[[], object]]) -> None:
    """Run every step of a release even when one raises, then raise the first error: a release that stopped at its
    first failure would keep everything after it held for the life of the process."""
    errors: list[Exception] = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - collected, the first re-raised below
            errors.append(exc)
    if errors:
        raise errors[0]


def undo_after_failure(steps: Iterable[Callable[[], object]], log: logging.Logger, what: str) -> None:
    """Release what a failed operation made, before the caller raises that operation's error: every step runs
    (as :func:`run_every`), and a step that raises is logged as a warning (``what: error``), never raised, so that
    the error the caller raises stays the one that says what went wrong."""
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - logged; the caller's failure is the error
            log.warning("%s: %r", what, exc)


__all__ = [
    "BackendNotSupportedError",
    "CollectiveFailedError",
    "CollectiveMismatchError",
    "CommError",
    "CommTimeoutError",
    "ConfigMismatchError",
    "ErrorCode",
    "GroupInvalidError",
    "GroupNotFoundError",
    "InvalidArgumentError",
    "NotImplementedCommError",
    "NotInitializedError",
    "P2PFailedError",
    "PeerLostError",
    "RankMismatchError",
    "ShapeMismatchError",
    "TransferError",
    "UnavailableError",
    "WorkspaceExhaustedError",
]
