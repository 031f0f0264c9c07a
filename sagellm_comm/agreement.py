"""After a step that may fail on some ranks only, every rank of the world learns whether it failed anywhere.

A step that is collective over the whole world, such as a sub-group's set-up (torch.distributed's ``new_group``
is), can still fail on a few ranks: one member's workspace or self-test.  Those ranks raise; the others would go
on to the next collective step and wait there for them until the timeout.  :func:`agree`, called by every rank
after the step, ends that: each rank puts its outcome in its own slot of one all-reduce over the world, so the
failure reaches every rank at once, and every rank raises the same typed error naming the step and the failed
ranks.  A failed rank's own error is the ``__cause__`` of the error it raises.

On success the cost is that one all-reduce of ``world_size`` int32 values on the backend's device (bounded by the
backend's timeout, as every blocking call of a backend is).  On failure a second step, an all-gather of each
rank's message (at most :data:`MESSAGE_BYTES` of UTF-8), gives every rank the failed ranks' own words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagellm_comm import errors
from sagellm_comm.backend import ReduceOp
from sagellm_comm.errors import CollectiveFailedError, CommError

if TYPE_CHECKING:
    from sagellm_comm.backend import CommBackend

__all__ = ["MESSAGE_BYTES", "agree"]

#: how much of a failed rank's message reaches the other ranks (UTF-8 bytes; a longer one is cut)
MESSAGE_BYTES = 1024

# A rank's outcome travels as one int: 0 for success, else 1 + the index here of its error's class (the same tuple
# on every rank: errors.__all__ is sorted).  A failure of no typed class travels as CollectiveFailedError.
_CLASSES: tuple[type[CommError], ...] = tuple(
    cls
    for cls in (getattr(errors, name) for name in errors.__all__)
    if isinstance(cls, type) and issubclass(cls, CommError)
)


def _outcome(failure: BaseException | None) -> int:
    if failure is None:
        return 0
    typed = next((cls for cls in type(failure).__mro__ if cls in _CLASSES), CollectiveFailedError)
    return 1 + _CLASSES.index(typed)


def _message(failure: BaseException) -> str:
    """What ``failure`` says (a typed error's message without its code, which travels beside it)."""
    return failure.message if isinstance(failure, CommError) else str(failure)


def agree(
    backend: CommBackend, failure: BaseException | None, what: str, details: dict[str, Any] | None = None
) -> None:
    """Collective over ``backend``'s whole world, called by every rank after the step ``what``: return when the
    step succeeded on every rank (``failure`` is this rank's error, None where it succeeded); otherwise raise the
    same error on every rank.

    That error is of the class of the failure on the lowest failed rank (a typed class of
    :mod:`sagellm_comm.errors`; :class:`CollectiveFailedError` for any other exception), and its message names
    ``what``, the failed ranks with their error codes and their own messages; ``details`` holds ``details`` plus
    ``failed_ranks`` (rank -> code) and ``messages`` (rank -> message).  A failed rank raises it from its own error.
    When the agreement itself fails (a rank gone, the backend's timeout), its typed error is raised, with a note
    naming this rank's own failure if it had one.
    """
    import torch

    world_size, rank = backend.world_size, backend.rank
    outcomes = torch.zeros(world_size, dtype=torch.int32, device=backend.device)
    outcomes[rank] = _outcome(failure)
    try:
        backend.all_reduce(outcomes, ReduceOp.MAX)
        found = outcomes.tolist()
        if not any(found):
            return
        said = "" if failure is None else f"{type(failure).__name__}: {_message(failure)}"
        text = list(said.encode("utf-8", "replace")[:MESSAGE_BYTES])
        mine = torch.tensor(text + [0] * (MESSAGE_BYTES - len(text)), dtype=torch.uint8, device=backend.device)
        everyone = torch.empty(world_size * MESSAGE_BYTES, dtype=torch.uint8, device=backend.device)
        backend.all_gather(everyone, mine)
        words = everyone.view(world_size, MESSAGE_BYTES).cpu()
    except BaseException as exc:
        exc.add_note(f"raised while the ranks of the world agreed on whether {what} succeeded on every rank")
        if failure is not None:
            exc.add_note(f"rank {rank}'s own failure in {what}: {type(failure).__name__}: {_message(failure)}")
        raise
    failed = [r for r, outcome in enumerate(found) if outcome]
    messages = {r: bytes(words[r].tolist()).rstrip(b"\0").decode("utf-8", "replace") for r in failed}
    cls = _CLASSES[found[failed[0]] - 1]
    codes = {r: _CLASSES[found[r] - 1].code.value for r in failed}
    each = "; ".join(f"rank {r}: [{codes[r]}] {messages[r]}" for r in failed)
    who = f"ranks {failed}" if len(failed) > 1 else f"rank {failed[0]}"
    error = cls(
        f"{what} failed on {who} ({each})",
        details={**(details or {}), "failed_ranks": codes, "messages": messages},
    )
    raise error from failure
