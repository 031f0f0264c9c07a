"""Virtual ranks: N ranks of the custom all-reduce on one GPU, as N streams of one process.

Only single-GPU machines may be at hand; this harness runs the very same kernels and workspace layout
as N real GPUs would, with every rank's region on one device and every rank's kernel on its own stream,
so the kernels of all ranks run concurrently and synchronise through the same flags.  (The multi-process
form of the same thing, one process per rank under CUDA MPS, is ``SymmetricWorkspace.rendezvous`` with
``CudaIpcMemory``; tests use both.)

``VirtualRankGroup.all_reduce`` forks from the current stream to the rank streams and joins back, so
it can be captured in a CUDA graph and replayed: the epochs live on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .arguments import check_device, check_is_tensor
from .config import CommConfig
from .custom_all_reduce import SUPPORTED_DTYPES, CustomAllReduce, check_virtual_elements
from .errors import BackendNotSupportedError, InvalidArgumentError, NotInitializedError, run_every, undo_after_failure
from .selector import KERNEL_ALGOS, AlgoSelector, Selection
from .workspace import DEFAULT_SLOT_BYTES, SymmetricWorkspace, local_workspaces

logger = logging.getLogger(__name__)


def stacked_rows(workspaces: Sequence[SymmetricWorkspace]) -> tuple[torch.Tensor, torch.Tensor]:
    """The arguments that let one launch serve every virtual rank (grid axis 1 = rank): every rank's row of the
    peer pointer table, stacked (row ``r`` = rank ``r``'s), and rank 0's control words, the first row of the
    ``[world_size, CTRL_WORDS]`` block that :func:`~sagellm_comm.workspace.local_workspaces` allocates."""
    return torch.cat([ws.table for ws in workspaces]), workspaces[0].control


class VirtualRankGroup:
    """``world_size`` virtual ranks sharing ``device``.

    Args:
        world_size: number of virtual ranks (2..8).
        device: the CUDA device all ranks live on.
        max_bytes: workspace capacity per rank (largest message).
        max_programs: programs per rank and launch; by default the SMs are divided between the ranks (all
            ranks' programs must be resident at once).
        selector: policy for ``algo="auto"``.
        timeout_s: bound of every device-side wait.
        config: the ranks' configuration (default: read from the environment); :attr:`config` keeps it.
    """

    def __init__(
        self,
        world_size: int,
        device: torch.device | str = "cuda:0",
        max_bytes: int = DEFAULT_SLOT_BYTES,
        max_programs: int | None = None,
        selector: AlgoSelector | None = None,
        timeout_s: float = 30.0,
        config: CommConfig | None = None,
    ):
        device = check_device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendNotSupportedError("virtual ranks need a CUDA GPU (none is available here)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.world_size = world_size
        self.device = device
        self.workspaces = local_workspaces(world_size, max_bytes, device, max_programs=max_programs, config=config)
        self.timeout_s = timeout_s
        try:
            self.config = self.workspaces[0].config
            self.ranks = [CustomAllReduce(ws, selector=selector, timeout_s=timeout_s) for ws in self.workspaces]
            self.streams = [torch.cuda.Stream(device) for _ in range(world_size)]
            self.max_bytes = self.workspaces[0].slot_bytes
            # Default: one program per SM and rank (the workspaces know all ranks share this GPU), so every
            # program of every rank can be resident at once.
            self.max_programs = self.ranks[0].max_programs
            # One launch for all ranks: the rows of every rank's pointer table, stacked.
            self.stacked_table, self.stacked_control = stacked_rows(self.workspaces)
        except BaseException as exc:  # the workspaces just made are nobody's: closed, the set-up's error raised
            what = f"closing the virtual ranks' workspaces after their set-up failed ({exc!r})"
            undo_after_failure([ws.close for ws in self.workspaces], logger, what)
            raise

    def select(self, nbytes: int, itemsize: int = 2) -> Selection:
        """The algorithm ``algo="auto"`` runs for ``nbytes`` of ``itemsize``-byte elements (same on every rank)."""
        return self.ranks[0].select(nbytes, itemsize)

    def get_buffers(self, numel: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        """Every rank's registered (zero-copy) tensor of ``numel`` elements."""
        return [r.get_buffer(numel, dtype) for r in self.ranks]

    def all_reduce(
        self, tensors: Sequence[torch.Tensor], algo: str = "auto", outs: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """All-reduce ``tensors[r]`` of every rank ``r`` (in place unless ``outs``), one stream per rank.

        Work is ordered after what is already on the current stream and the current stream waits for all
        ranks, so callers see ordinary stream semantics (and CUDA-graph capture works).  Every rank's call is
        checked before any rank launches (:meth:`CustomAllReduce.check_call`): a call that one rank refuses raises
        its typed error with nothing enqueued, and the group stays usable (a launched rank would wait for the
        refused one until the timeout, and its workspace would latch the timeout).
        """
        if len(tensors) != self.world_size:
            raise InvalidArgumentError(f"expected {self.world_size} tensors (one per rank), got {len(tensors)}")
        if outs is not None and len(outs) != self.world_size:
            raise InvalidArgumentError(f"expected {self.world_size} outputs, got {len(outs)}")
        for r, car in enumerate(self.ranks):
            car.check_call(tensors[r], None if outs is None else outs[r], algo)
        shapes = {(t.numel(), t.dtype) for t in tensors}
        if len(shapes) != 1:
            raise InvalidArgumentError(
                f"every rank must all-reduce the same numel and dtype, got {sorted(map(str, shapes))}"
            )
        current = torch.cuda.current_stream(self.device)
        results = []
        for r, (car, stream) in enumerate(zip(self.ranks, self.streams, strict=True)):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                results.append(car.all_reduce(tensors[r], out=None if outs is None else outs[r], algo=algo))
        for stream in self.streams:
            current.wait_stream(stream)
        return results

    def all_reduce_stacked(self, stacked: torch.Tensor, algo: str = "auto", payload: str | None = None) -> torch.Tensor:
        """All-reduce row ``r`` of ``stacked`` ([world_size, numel]) as rank ``r``'s tensor, in place.

        All ranks run in *one* kernel launch (grid axis 1 is the rank), the way N GPUs each launch their
        own kernel at the same moment; the kernel body is the one real ranks run.  This is the mode
        device-time benchmarks use: N launches on N streams would be serialised by the one GPU's front end.
        ``payload="fp8"``: the two-shot kernel with FP8 shards (:meth:`CustomAllReduce.all_reduce`).
        ``world_size * numel`` must stay below ``INT32_INDEX_LIMIT`` (2**31: the kernel's row offsets are int32);
        a larger call raises ``InvalidArgumentError`` before anything is launched.
        """
        check_is_tensor(stacked, "stacked")
        if stacked.dim() != 2 or stacked.shape[0] != self.world_size:
            raise InvalidArgumentError(
                f"stacked must have shape [world_size={self.world_size}, numel], got {tuple(stacked.shape)}"
            )
        car = self.ranks[0]
        if car.error_view[0]:
            self.check_errors()
        if car.workspace.closed:  # the stacked table still holds the freed regions' addresses
            raise NotInitializedError("the virtual ranks' workspaces were closed (close() was called)")
        itemsize = SUPPORTED_DTYPES.get(stacked.dtype)
        if itemsize is None or not stacked.is_contiguous() or stacked.device != self.device:
            raise InvalidArgumentError(
                f"stacked must be a contiguous bf16/fp16/fp32 tensor on {self.device}, got {stacked.dtype} on "
                f"{stacked.device} (contiguous={stacked.is_contiguous()})"
            )
        numel = stacked.shape[1]
        check_virtual_elements(self.world_size, numel)  # the launch's row offsets rank * numel are int32
        if payload is not None:
            algo = car.check_payload(stacked[0], algo, payload)
        else:
            algo = car.resolve_algo(algo, numel, numel * itemsize)
        if algo not in KERNEL_ALGOS:
            raise BackendNotSupportedError(f"virtual ranks run the custom kernels only ({KERNEL_ALGOS}), not {algo!r}")
        if numel:
            raw = torch._C._cuda_getCurrentRawStream(self.device.index)
            for ws in self.workspaces:
                ws.enter_stream(raw)
            if car.check:
                car.launch_check(
                    algo if payload is None else f"{algo}_{payload}", numel, stacked.dtype, self.stacked_table,
                    self.stacked_control, grid_y=self.world_size,
                )  # fmt: skip
            self.launch_stacked(algo, stacked, self.max_programs, payload)
        return stacked

    def launch_stacked(self, algo: str, stacked: torch.Tensor, programs: int, payload: str | None = None) -> None:
        """Enqueue kernel ``algo`` on the current stream for every rank at once, in place on the rows of the
        contiguous ``[world_size, numel]`` tensor ``stacked``, with ``programs`` programs per rank.  No checks,
        no stream ordering: :meth:`all_reduce_stacked` is the checked call; this is its launch, shared with
        callers that size the grid themselves (the fused chunked path runs beside a GEMM on few programs)."""
        numel = stacked.shape[1]
        self.ranks[0].kernels.launch(
            algo, stacked, stacked, numel, stacked.element_size(), False, self.stacked_table, self.stacked_control, 0,
            self.world_size, programs, virtual=True, payload=payload,
        )  # fmt: skip

    def check_errors(self) -> None:
        """Raise ``CommTimeoutError`` if any rank's kernel timed out (no device sync)."""
        for car in self.ranks:
            car.check_errors()

    def close(self) -> None:
        """Release every rank's all-reduce and workspace, each once the work of its calls is done (waited for at most
        :attr:`CustomAllReduce.host_timeout_s <sagellm_comm.custom_all_reduce.CustomAllReduce.host_timeout_s>`); a
        rank's close that fails does not stop the others, and the first error is raised once every step ran.  During
        a CUDA graph capture nothing is waited for (that would invalidate the capture): the workspaces are closed at
        once and release their memory when the capture ends."""
        run_every(car.close for car in self.ranks)

    def __enter__(self) -> VirtualRankGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
