"""agree(): after a step that failed on some ranks, every rank raises the same typed error.  One rank here (the
error's class, message and details, the agreement failing); several ranks in ``test_group.py`` (split's blocks)."""

from __future__ import annotations

import pytest
import torch

from sagellm_comm import CommGroup
from sagellm_comm.agreement import MESSAGE_BYTES, agree
from sagellm_comm.errors import CollectiveFailedError, CommTimeoutError, GroupInvalidError, PeerLostError


class _OwnGroupError(GroupInvalidError):
    """A typed error of the caller's own, below one of the library's classes."""


def test_a_failure_reaches_the_error_with_its_class_code_and_message() -> None:
    with CommGroup.create(world_size=1, rank=0, backend="gloo") as world:
        agree(world.backend, None, "a step")  # nothing failed: nothing raised
        lost = PeerLostError("peer 2 exited", details={"peer": 2})
        with pytest.raises(PeerLostError) as raised:
            agree(world.backend, lost, "a step", {"step": 3})
        assert str(raised.value) == (
            "[transfer_peer_lost] a step failed on rank 0 (rank 0: [transfer_peer_lost] PeerLostError: peer 2 exited)"
        )
        assert raised.value.details == {
            "step": 3,
            "failed_ranks": {0: "transfer_peer_lost"},
            "messages": {0: "PeerLostError: peer 2 exited"},
        }
        assert raised.value.__cause__ is lost
        # a class of the caller's own travels as the library's class above it; an untyped failure as a failed
        # collective; a long message is cut at MESSAGE_BYTES
        with pytest.raises(GroupInvalidError) as raised:
            agree(world.backend, _OwnGroupError("ranks [0, 0]"), "a step")
        assert type(raised.value) is GroupInvalidError and raised.value.details["failed_ranks"] == {
            0: "comm_group_invalid"
        }
        with pytest.raises(CollectiveFailedError) as raised:
            agree(world.backend, MemoryError("x" * 5000), "a step")
        assert raised.value.details["messages"][0] == ("MemoryError: " + "x" * 5000)[:MESSAGE_BYTES]


class _SilentWorld:
    """A backend whose world all-reduce runs out of time (a rank gone)."""

    world_size, rank, device = 2, 0, torch.device("cpu")

    def all_reduce(self, tensor, op):
        raise CommTimeoutError("all_reduce over ranks [0, 1] did not complete within 1s")


def test_an_agreement_that_fails_raises_its_error_naming_what_was_agreed_and_this_ranks_failure() -> None:
    with pytest.raises(CommTimeoutError, match="did not complete within 1s") as raised:
        agree(_SilentWorld(), MemoryError("no memory"), "the set-up of block 1")
    assert raised.value.__notes__ == [
        "raised while the ranks of the world agreed on whether the set-up of block 1 succeeded on every rank",
        "rank 0's own failure in the set-up of block 1: MemoryError: no memory",
    ]
