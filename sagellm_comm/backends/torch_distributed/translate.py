"""torch.distributed's exceptions -> the library's typed errors (one place for the mapping)."""

from __future__ import annotations

import re

import torch.distributed as dist

from sagellm_comm.errors import (
    CollectiveFailedError,
    CollectiveMismatchError,
    CommError,
    CommTimeoutError,
    P2PFailedError,
    ShapeMismatchError,
    UnavailableError,
)

# torch's ProcessGroupWrapper (TORCH_DISTRIBUTED_DEBUG=DETAIL): "Rank 0 is running collective:
# CollectiveFingerPrint(SequenceNumber=2, OpType=ALLGATHER, TensorShape=[4], TensorDtypes=Float, ...), but Rank 1 ..."
_FINGERPRINT = re.compile(
    r"Rank (\d+) is running collective: CollectiveFingerPrint\(SequenceNumber=\d+, OpType=(\w+), "
    r"TensorShape=(.*?), TensorDtypes=(.*?), TensorDeviceTypes="
)


def is_timeout(exc: BaseException) -> bool:
    """True when ``exc`` says a wait ran out of time (torch reports it in several wordings)."""
    text = str(exc).lower()
    waits = ("timed out", "timeout", "monitoredbarrier")  # the last: a rank missed the barrier
    return isinstance(exc, TimeoutError) or any(word in text for word in waits)


def translate(exc: BaseException, what: str, timeout: float, kind: str) -> CommError:
    """The typed error for ``exc`` raised by operation ``what`` of backend ``kind`` bounded by ``timeout`` s.

    A mismatch found by torch's fingerprint check (``TORCH_DISTRIBUTED_DEBUG=DETAIL``, docs/backends.md) becomes
    :class:`ShapeMismatchError` when the ranks ran one collective on tensors of other shapes or dtypes, and
    :class:`CollectiveMismatchError` when they ran different collectives, naming each rank's.
    Timeouts (and store errors) become ``comm_timeout``, naming the ranks that missed a monitored barrier;
    a failed rendezvous ``unavailable``; a failed send/recv ``comm_p2p_failed``; anything else
    ``comm_collective_failed``.  A :class:`CommError` passes through unchanged.
    """
    if isinstance(exc, CommError):
        return exc
    details = {"op": what, "backend": kind, "timeout_s": timeout}
    mismatch = _fingerprint_mismatch(exc, what, kind, details)
    if mismatch is not None:
        return mismatch
    if is_timeout(exc) or isinstance(exc, dist.DistStoreError):
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
        if missing:
            details["missing_ranks"] = [int(r) for r in missing.group(1).replace(",", " ").split()]
        who = f"; ranks {details['missing_ranks']} did not arrive" if missing else ""
        return CommTimeoutError(
            f"{what} did not complete within {timeout:g}s on {kind}{who}: a peer is missing, "
            f"slow or called a different operation ({exc})",
            details=details,
        )
    if what.startswith(("rendezvous", "init_process_group")):
        return UnavailableError(f"{what} failed: {exc}", details=details)
    cls = P2PFailedError if what.startswith(("send", "recv")) else CollectiveFailedError
    return cls(f"{what} failed on {kind}: {exc}", details=details)


def _fingerprint_mismatch(exc: BaseException, what: str, kind: str, details: dict) -> CommError | None:
    """The typed error for torch's "Detected mismatch between collectives" (None for any other exception)."""
    found = _FINGERPRINT.findall(str(exc))
    if "Detected mismatch between collectives" not in str(exc) or len(found) < 2:
        return None
    calls = {int(rank): {"op": op, "shape": shape, "dtype": dtype} for rank, op, shape, dtype in found[:2]}
    details = {**details, "calls": calls}
    said = "; ".join(f"rank {r}: {c['op']} of shape {c['shape']} {c['dtype']}" for r, c in sorted(calls.items()))
    if len({c["op"] for c in calls.values()}) > 1:
        return CollectiveMismatchError(
            f"{what} on {kind}: the ranks called different collectives ({said}); every rank must call the same "
            "collectives in the same order (found by TORCH_DISTRIBUTED_DEBUG=DETAIL before any data moved)",
            details=details,
        )
    return ShapeMismatchError(
        f"{what} on {kind}: the ranks passed tensors of other shapes or dtypes ({said}); every rank must pass the "
        "same shapes and dtypes to each collective (found by TORCH_DISTRIBUTED_DEBUG=DETAIL before any data moved)",
        details=details,
    )
