"""torch.distributed's exceptions -> the library's typed errors (one place for the mapping)."""

from __future__ import annotations

import re

import torch.distributed as dist

from sagellm_comm.errors import (
    CollectiveFailedError,
    CommError,
    CommTimeoutError,
    P2PFailedError,
    UnavailableError,
)


def is_timeout(exc: BaseException) -> bool:
    """True when ``exc`` says a wait ran out of time (torch reports it in several wordings)."""
    text = str(exc).lower()
    waits = ("timed out", "timeout", "monitoredbarrier")  # the last: a rank missed the barrier
    return isinstance(exc, TimeoutError) or any(word in text for word in waits)


def translate(exc: BaseException, what: str, timeout: float, kind: str) -> CommError:
    """The typed error for ``exc`` raised by operation ``what`` of backend ``kind`` bounded by ``timeout`` s.

    Timeouts (and store errors) become ``comm_timeout``, naming the ranks that missed a monitored barrier;
    a failed rendezvous ``unavailable``; a failed send/recv ``comm_p2p_failed``; anything else
    ``comm_collective_failed``.  A :class:`CommError` passes through unchanged.
    """
    if isinstance(exc, CommError):
        return exc
    details = {"op": what, "backend": kind, "timeout_s": timeout}
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
