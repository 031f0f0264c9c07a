"""What some engines lack, built from what all of them have, and the handle that finishes it.

* AVG: engines without a native average (Gloo, HCCL) run SUM, then divide.  Half-precision dtypes (float16,
  bfloat16, complex32) are summed in float32 (complex64) copies and the mean written back: summed in their own
  dtype, values whose mean fits would overflow (float16 stops at 65504), and CPU torch cannot divide complex32.
* SUM of bools: the logical OR, run as MAX on every engine (Gloo adds the bytes, leaving a True held as 2).
* all_to_all of tensor lists: packed into one flat send and one flat receive buffer and run through
  ``all_to_all_single`` (every engine and torch version has it; Gloo before torch 2.13 lacks the list form),
  then unpacked into the caller's output tensors.

Both are a torch op plus a *post-step* run once, after the engine finished, by :class:`TorchWork.wait` or by the
first :meth:`TorchWork.is_completed` that finds the engine done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.arguments import check_timeout
from sagellm_comm.backend import ReduceOp, Work
from sagellm_comm.errors import CommError

from .checks import seconds
from .engines import TORCH_OPS, Engine

PostStep = Callable[[], None] | None

#: the dtype an emulated AVG sums a half-precision dtype in
WIDE_SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


@dataclass(frozen=True)
class Reduction:
    """How to run a reduction: the torch op, the tensors the engine reduces (the caller's, or wide copies of
    them), and the post-step that finishes it (None: nothing to do)."""

    torch_op: Any
    outputs: list[torch.Tensor]
    inputs: list[torch.Tensor]
    post: PostStep


def reduction(
    rop: ReduceOp, engine: Engine, world_size: int, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
) -> Reduction:
    """How to reduce ``inputs`` into ``outputs`` (all_reduce: its tensor is the output, no inputs) with ``rop``.

    AVG where the engine has none: SUM, then divide; a half-precision dtype is summed in wide copies (made here,
    after every check: the caller's tensors are written only by the post-step) and the mean copied back.  A SUM of
    bools is their logical OR, run as MAX (as NCCL runs it): an engine adding the bytes would leave a True held
    as 2 (0 again after 256 ranks)."""
    if rop is ReduceOp.SUM and outputs[0].dtype == torch.bool:
        rop = ReduceOp.MAX
    if rop is not ReduceOp.AVG or engine.native_avg:
        return Reduction(getattr(dist.ReduceOp, TORCH_OPS[rop]), list(outputs), list(inputs), None)
    wide = WIDE_SUM_DTYPES.get(outputs[0].dtype)
    if wide is None:

        def divide() -> None:
            for t in outputs:
                t.div_(world_size)

        return Reduction(dist.ReduceOp.SUM, list(outputs), list(inputs), divide)
    wide_outputs = [t.to(wide) for t in outputs]  # all_reduce's output holds its input

    def divide_back() -> None:
        for t, sums in zip(outputs, wide_outputs, strict=True):
            t.copy_(sums.div_(world_size))

    return Reduction(dist.ReduceOp.SUM, wide_outputs, [t.to(wide) for t in inputs], divide_back)


def packed_all_to_all(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], engine_group: Any
) -> tuple[Callable[[], Any], PostStep]:
    """Start function and unpack step of a list all_to_all run as one ``all_to_all_single``.

    ``inputs[j]`` goes to rank ``j``; rank ``i``'s chunk lands in ``outputs[i]``.  One dtype throughout
    (checked by the caller); shapes may differ per peer.
    """
    send = torch.cat([t.reshape(-1) for t in inputs])
    recv = torch.empty(sum(o.numel() for o in outputs), dtype=send.dtype, device=send.device)
    send_splits, recv_splits = [t.numel() for t in inputs], [o.numel() for o in outputs]

    def start() -> Any:
        return dist.all_to_all_single(recv, send, recv_splits, send_splits, engine_group, True)

    def unpack() -> None:
        for o, chunk in zip(outputs, recv.split(recv_splits), strict=True):
            o.copy_(chunk.view(o.shape))

    return start, unpack


class TorchWork(Work):
    """Wraps a torch Work: bounded wait on host-blocking engines, the post-step run once, typed errors.

    ``translate(exc, what, limit)`` turns torch's exception into the library's typed error.
    """

    def __init__(
        self,
        work: Any,
        what: str,
        result: Any,
        post: PostStep,
        *,
        host_blocking: bool,
        timeout: float,
        translate: Callable[[BaseException, str, float], Exception],
    ):
        self._work, self._what, self._result, self._post = work, what, result, post
        self._host_blocking, self._timeout, self._translate = host_blocking, timeout, translate
        self._done = False

    def wait(self, timeout: float | None = None) -> Any:
        if self._done:
            return self._result
        limit = self._timeout if timeout is None else check_timeout(timeout)
        try:
            if self._host_blocking:
                self._work.wait(seconds(limit))
            else:  # stream semantics: the current stream waits, the host does not
                self._work.wait()
        except Exception as exc:
            raise self._translate(exc, self._what, limit) from exc
        if self._post is not None:
            self._post()
        self._done = True
        return self._result

    def is_completed(self) -> bool:
        """True once the result may be used (torch's contract): the engine finished, and the post-step (AVG's
        divide, a list all_to_all's unpack) has run, here if :meth:`wait` has not run it yet.  A failed operation
        is completed too; :meth:`wait` raises its error."""
        if self._done:
            return True
        if not self._work.is_completed():
            return False
        if self._post is not None:
            with contextlib.suppress(CommError):  # finished, and failed: wait() raises it again
                self.wait()
        return True
