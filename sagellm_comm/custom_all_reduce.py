"""One rank's custom all-reduce: validation, algorithm choice and a low-overhead kernel launch.

``CustomAllReduce(workspace).all_reduce(tensor)`` sums ``tensor`` over the workspace's ranks in place,
enqueued on the current stream, returning before completion (like ``torch.distributed.all_reduce``).

Host cost matters more than kernel time at small sizes (Triton's Python launch path costs tens of
microseconds).  After the first call of a given shape the compiled kernel's direct launch and its bound
arguments are kept (:class:`AllReduceKernels`), so a call costs a few attribute checks, one dictionary
lookup and the driver launch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from sagellm_comm.kernels import all_reduce as _k
from sagellm_comm.kernels import fingerprint as _fp
from sagellm_comm.kernels import fp8_payload_all_reduce as _k8
from sagellm_comm.kernels.lamport_all_reduce import lamport_all_reduce_kernel as _k_lamport
from sagellm_comm.selector import AUTO, ENGINE_ALGO

from .arguments import check_int, check_is_tensor, is_dense_contiguous, share_bytes
from .config import CommConfig
from .errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    NotInitializedError,
    WorkspaceExhaustedError,
    run_every,
)
from .launch import Launcher, interpreting, timeout_ticks
from .selector import ALGO_CHOICES, KERNEL_ALGOS, LAMPORT, ONE_SHOT, PAYLOADS, TWO_SHOT, AlgoSelector, Selection
from .workspace import (
    DEFAULT_MAX_PROGRAMS,
    SymmetricWorkspace,
    default_max_programs,
    lamport_capacity,
    lamport_offset,
)

# DEFAULT_MAX_PROGRAMS and default_max_programs (the workspace's program count) are re-exported for callers here.
__all__ = [
    "DEFAULT_MAX_PROGRAMS",
    "SUPPORTED_DTYPES",
    "INT32_INDEX_LIMIT",
    "MAX_KERNEL_ELEMENTS",
    "AllReduceKernels",
    "CustomAllReduce",
    "check_kernel_elements",
    "check_message",
    "default_max_programs",
    "pdl_enabled",
    "tile_shape",
]

SUPPORTED_DTYPES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
# Bytes per tile: 16 bytes per thread x 256 threads for latency-bound sizes; from LARGE_TILE_THRESHOLD bytes
# the configuration's large tiles (default 4 such vectors per thread: more loads in flight) once bandwidth
# dominates (see tile_shape).
SMALL_TILE_BYTES = 4096
LARGE_TILE_THRESHOLD = 1 << 20
NUM_WARPS = 8
LAMPORT_MIN_BLOCK = 256
LAMPORT_MAX_BLOCK = 1024
MAX_CACHED_PLANS = 4096
DTYPE_CODES = {dtype: _fp.DTYPE_CODES[str(dtype).removeprefix("torch.")] for dtype in SUPPORTED_DTYPES}
KERNEL_ITEMSIZES = frozenset(SUPPORTED_DTYPES.values())  # element sizes of the kernels' dtypes
# The kernels compute element offsets in int32: Triton types an int argument below 2**31 as i32, so offsets made
# from it wrap instead of growing, and a wrapped (negative) offset still passes the ``offs < numel`` masks.  They
# are the tile offsets ``tile * BLOCK + lane`` (one-shot, two-shot, FP8 payload, all-gather, reduce-scatter) and
# ``c * chunk + in_chunk`` (two-shot, FP8 payload), which reach past ``numel`` by up to a tile (at most 32768
# elements: SAGELLM_COMM_LARGE_TILE_BYTES <= 65536) plus the chunk rounding (CHUNK_ALIGN or FP8_GROUP elements a
# rank), and with virtual ranks the row offset ``rank * numel`` of one launch serving every rank
# (kernels/all_reduce.py, lamport_all_reduce.py, fp8_payload_all_reduce.py; ``rank * num_rows * hidden`` in
# fused_all_reduce_rmsnorm.py, ``rank * M * N`` in gemm_all_reduce.py).  Every such offset stays below this limit:
# a rank's message is at most MAX_KERNEL_ELEMENTS elements, and a virtual-rank launch holds fewer than this many
# elements in all (world_size * numel).  A larger message runs on the engine (algo="auto") or is refused.
INT32_INDEX_LIMIT = 2**31
MAX_KERNEL_ELEMENTS = INT32_INDEX_LIMIT - (1 << 16)  # headroom for a tile's and the chunks' rounding (above)


def check_message(nbytes: int, itemsize: int) -> None:
    """Refuse a message size no call has: ``nbytes`` must be a non-negative int holding whole ``itemsize``-byte
    elements, ``itemsize`` a positive int (``InvalidArgumentError`` naming the argument)."""
    if nbytes.__class__ is int and itemsize.__class__ is int and nbytes >= 0 and itemsize > 0 and not nbytes % itemsize:
        return
    nbytes = check_int(nbytes, "nbytes", 0)
    itemsize = check_int(itemsize, "itemsize", 1)
    if nbytes % itemsize:
        raise InvalidArgumentError(
            f"nbytes={nbytes} is not a whole number of {itemsize}-byte elements", details={"nbytes": nbytes}
        )


def check_kernel_elements(numel: int, what: str = "a rank's message") -> None:
    """Refuse (``InvalidArgumentError``) ``numel`` elements that a kernel would index past int32: more than
    :data:`MAX_KERNEL_ELEMENTS` (``what`` names the count in the message)."""
    if numel > MAX_KERNEL_ELEMENTS:
        raise InvalidArgumentError(
            f"{what} has {numel} elements, over the kernels' limit of {MAX_KERNEL_ELEMENTS} (their element offsets "
            f"are int32 and must stay below {INT32_INDEX_LIMIT}); use algo='auto' (runs on the engine) or split it",
            details={"numel": numel, "limit": MAX_KERNEL_ELEMENTS},
        )


def check_virtual_elements(world_size: int, numel: int, what: str = "message") -> None:
    """Refuse (``InvalidArgumentError``) a launch of ``world_size`` virtual ranks of ``numel`` elements each
    (``what`` names them) whose row offsets ``rank * numel`` or tile offsets would pass int32: ``world_size *
    numel`` must stay below :data:`INT32_INDEX_LIMIT` and ``numel`` within :data:`MAX_KERNEL_ELEMENTS`."""
    if world_size * numel >= INT32_INDEX_LIMIT or numel > MAX_KERNEL_ELEMENTS:
        raise InvalidArgumentError(
            f"virtual ranks: {world_size} ranks x {numel} elements of {what} reach the kernels' int32 index limit "
            f"{INT32_INDEX_LIMIT} (one launch indexes every rank's row); split the call",
            details={"world_size": world_size, "numel": numel, "limit": INT32_INDEX_LIMIT},
        )


def lamport_tile_warps(block: int) -> int:
    """Warps of a Lamport program that moves ``block`` elements: 4 elements a thread (256 elements a warp measured
    no better at W = 2 and 4, worse at 8, at 8 KB; 1024-element tiles with 4 warps 1.3-2x slower at 16-256 KB
    than with 8, virtual ranks on one H100), between 2 and 16."""
    return min(16, max(2, block // 128))


def tile_shape(nbytes: int, itemsize: int, config: CommConfig) -> tuple[int, int, int]:
    """``(BLOCK, num_warps, stages)`` of the tile loops of the all-reduce, all-gather and reduce-scatter
    kernels for ``nbytes`` moved per rank: 4096-byte tiles of 8 warps below ``LARGE_TILE_THRESHOLD``, the
    configuration's large tiles from there.  ``BLOCK`` decides which program moves which bytes, so every rank
    of a group must use the same configuration (its tile settings are agreed when the workspace is made)."""
    if nbytes >= LARGE_TILE_THRESHOLD:
        return config.large_tile_bytes // itemsize, config.large_num_warps, config.large_stages
    return SMALL_TILE_BYTES // itemsize, NUM_WARPS, 1


def pdl_enabled(device: torch.device, config: CommConfig) -> bool:
    """Whether the Lamport kernel is launched with programmatic dependent launch (PDL).

    On by default on Hopper and later (``griddepcontrol``); ``config.pdl`` False (``SAGELLM_COMM_PDL=0``)
    turns it off, True insists on it (an error on older GPUs).  Never under the interpreter, and never for a
    launch of one rank whose GPU other ranks of the group share (:func:`pdl_for_launch`).
    """
    flag = config.pdl
    if device.type != "cuda" or flag is False:
        return False
    major = torch.cuda.get_device_capability(device)[0]
    if flag and major < 9:
        raise BackendNotSupportedError(
            f"SAGELLM_COMM_PDL=1 needs compute capability 9.0 or later, {device} has {major}.x"
        )
    return major >= 9


def pdl_for_launch(pdl: bool, launch_ranks: int, ranks_on_device: int) -> bool:
    """Whether one Lamport launch holding ``launch_ranks`` ranks (virtual ranks: all of them in one launch) uses
    PDL (``pdl``: :func:`pdl_enabled`) when ``ranks_on_device`` ranks of the group share its GPU.

    PDL lets a launch's programs become resident while the previous launch on the stream still runs; they then
    wait on the device for it.  When the ranks sharing a GPU launch separately (processes under MPS), the grids
    are sized so that every rank's programs are resident at once, which a rank's early next launch breaks: its
    waiting programs can hold the SMs that a slower rank's current launch needs, and that rank's peers spin until
    the timeout (seen with an FP8 fused kernel at one program per SM, 4 processes under MPS on one GPU, which run
    every mode without PDL).  So PDL only for a launch that holds every rank on its GPU."""
    return pdl and launch_ranks >= ranks_on_device


class AllReduceKernels:
    """The all-reduce family's launches (one-shot, two-shot, Lamport, FP8-payload two-shot): which kernel,
    grid, tile and named arguments each call gets, launched through :class:`~sagellm_comm.launch.Launcher`.

    The first call of a shape binds the kernel's arguments by name and compiles (or only loads, with
    ``preload``) through the launcher; it keeps a *plan*: the binary's direct launch, the grid and the bound
    values after ``inp`` and ``out``.  A later call of that shape costs one dictionary lookup and the C
    launcher.  The plan key holds every argument except the data pointers, and the pointers' 16-byte
    alignment (Triton specialises the binary on it).
    """

    def __init__(
        self,
        world_size: int,
        slot_bytes: int,
        timeout_ticks: int,
        use_ptx: bool,
        device_index: int,
        pdl: bool = False,
        config: CommConfig | None = None,
        ranks_on_device: int = 1,
    ):
        self.config = CommConfig.from_env() if config is None else config  # the tile shapes (tile_shape)
        self.world_size = world_size
        self.pdl = pdl and use_ptx  # the Lamport kernel only: see pdl_enabled and pdl_for_launch
        self.ranks_on_device = ranks_on_device
        self.slot_bytes = slot_bytes
        self.timeout_ticks = timeout_ticks
        self.use_ptx = use_ptx
        self.device_index = device_index
        self.wp = triton.next_power_of_2(world_size)
        self.lamport_offset = lamport_offset(slot_bytes)
        self.lamport_capacity = lamport_capacity(slot_bytes)
        self.cache: dict[tuple, tuple] = {}
        self.launchers: dict[tuple, Launcher] = {}

    def launcher(self, kernel, num_warps: int, pdl: bool) -> Launcher:
        """The launcher of ``kernel`` with ``num_warps`` warps (and programmatic dependent launch)."""
        key = (kernel, num_warps, pdl)
        launcher = self.launchers.get(key)
        if launcher is None:
            options = {"launch_pdl": True} if pdl else {}
            launcher = self.launchers[key] = Launcher(kernel, self.use_ptx, self.device_index, num_warps=num_warps,
                                                      **options)  # fmt: skip
        return launcher

    def launch(
        self,
        algo: str,
        tensor: torch.Tensor,
        out: torch.Tensor,
        numel: int,
        itemsize: int,
        zero_copy: bool,
        table: torch.Tensor,
        ctrl: torch.Tensor,
        rank: int,
        grid_y: int,
        max_programs: int,
        virtual: bool = False,
        preload: bool = False,
        payload: str | None = None,
    ) -> None:
        """Enqueue one all-reduce kernel on the current stream (``grid_y`` > 1: virtual ranks, one launch).

        ``payload="fp8"``: the two-shot kernel whose shards travel as FP8 (``algo`` must be ``two_shot``).

        ``preload``: only compile and load this call's binary (nothing is enqueued).  Loading a module may
        wait for the device to go idle, so a kernel that something already enqueued may spin for (check
        mode's fingerprint kernel, another virtual rank) must be loaded before that.
        """
        in_ptr = tensor.data_ptr()
        out_ptr = in_ptr if out is tensor else out.data_ptr()
        table_ptr = table.data_ptr()
        ctrl_ptr = ctrl.data_ptr()
        key = (
            algo, tensor.dtype, numel, zero_copy, virtual, grid_y, max_programs, rank, table_ptr, ctrl_ptr,
            in_ptr % 16 == 0, out_ptr % 16 == 0, payload,
        )  # fmt: skip
        plan = self.cache.get(key)
        if plan is not None and preload:
            return
        if plan is not None:
            fast, programs, tail = plan
            fast(programs, grid_y, torch._C._cuda_getCurrentRawStream(self.device_index), (in_ptr, out_ptr, *tail))
            return
        launcher, programs, named = self.arguments(
            algo, numel, itemsize, zero_copy, rank, max_programs, virtual, payload
        )
        values = launcher.bind(inp=tensor, out=out, table=table, ctrl=ctrl, **named)
        if launcher.names[:2] != ("inp", "out"):  # a plan passes the data pointers first
            name = launcher.kernel.fn.__name__
            raise InvalidArgumentError(f"{name} must take inp, out first (per call in a plan): {launcher.names}")
        fast = launcher.compile((programs, grid_y), values, launch=not preload)
        if fast is not None:
            if len(self.cache) >= MAX_CACHED_PLANS:  # many distinct sizes: start over rather than grow
                self.cache.clear()
            tail = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values[2:])
            self.cache[key] = (fast, programs, tail)

    def arguments(
        self, algo: str, numel: int, itemsize: int, zero_copy: bool, rank: int, max_programs: int, virtual: bool,
        payload: str | None,
    ) -> tuple[Launcher, int, dict]:  # fmt: skip
        """``(launcher, programs, named)``: the kernel's launcher, the programs per rank and every argument
        after ``inp``, ``out``, ``table`` and ``ctrl``, by name."""
        block, warps, stages = tile_shape(numel * itemsize, itemsize, self.config)
        common = dict(numel=numel, rank=rank, timeout=self.timeout_ticks, W=self.world_size, WP=self.wp,
                      USE_PTX=self.use_ptx, VIRTUAL=virtual)  # fmt: skip
        pdl = False  # the Lamport kernel's only
        if payload is not None:
            if algo != TWO_SHOT or payload not in PAYLOADS:
                raise InvalidArgumentError(f"payload {payload!r} runs on {TWO_SHOT} only, got algo={algo!r}")
            kernel = _k8.two_shot_fp8_all_reduce_kernel
            block = max(block, _k8.FP8_GROUP.value)  # whole 128-element blocks (both are powers of two)
            tiles = triton.cdiv(_k8.chunk_elements(numel, self.world_size), block)
            named = dict(common, slot_bytes=self.slot_bytes, BLOCK=block)
        elif algo in (ONE_SHOT, TWO_SHOT):
            if algo == ONE_SHOT:
                kernel = _k.one_shot_all_reduce_kernel
                tiles = triton.cdiv(numel, block)
            else:
                kernel = _k.two_shot_all_reduce_kernel
                tiles = triton.cdiv(_k.two_shot_chunk(numel, self.world_size), block)
            named = dict(common, slot_bytes=self.slot_bytes, BLOCK=block, ZERO_COPY=zero_copy, STAGES=stages)
        elif algo == LAMPORT:
            kernel = _k_lamport
            # Latency-bound: spread the message over every program (one round trip each), 4 elements a
            # thread.  Measured on H100 virtual ranks: 1024-element tiles with 4 warps or 2048 with 8 were
            # 1.3-2x slower at 16-256 KB than 1024 with 8 warps; 256-element tiles win at <= 8 KB.
            per_program = triton.next_power_of_2(triton.cdiv(numel, max_programs))
            block = min(LAMPORT_MAX_BLOCK, max(LAMPORT_MIN_BLOCK, per_program))
            warps = lamport_tile_warps(block)
            tiles = triton.cdiv(numel, block)
            # A stacked launch of virtual ranks holds every rank of the group (the ranks on this GPU).
            pdl = pdl_for_launch(self.pdl, self.world_size if virtual else 1, self.ranks_on_device)
            named = dict(common, lamport_offset=self.lamport_offset, cap=self.lamport_capacity, BLOCK=block, PDL=pdl)
        else:
            raise InvalidArgumentError(f"algo must be one of {ALGO_CHOICES}, got {algo!r}")
        # Lamport keeps per-program state: every launch on a workspace uses the same grid.
        programs = max_programs if algo == LAMPORT or tiles >= max_programs else tiles
        return self.launcher(kernel, warps, pdl), programs, named


def fingerprint_launcher(use_ptx: bool, device_index: int) -> Launcher:
    """The launcher of check mode's fingerprint comparison (``kernels/fingerprint.py``)."""
    return Launcher(_fp.fingerprint_check_kernel, use_ptx, device_index, num_warps=1)


def launch_fingerprint_check(
    launcher: Launcher, table, ctrl, rank: int, world_size: int, operation: str, size: int | tuple[int, int],
    dtype: torch.dtype, timeout: int, ranks: int = 1,
) -> None:  # fmt: skip
    """Check mode: enqueue the comparison of this call's fingerprint ``(operation, size, dtype)`` with every
    peer's on the current stream (``ranks`` > 1: virtual ranks in one launch), before the collective kernel it
    describes.  ``size``: the element count, or the shape ``(rows, cols)`` of a 2-D family
    (``fingerprint.SHAPED_PREFIXES``).  Every kernel family's check goes through here."""
    launcher.launch(
        (1, ranks), table=table, ctrl=ctrl, rank=rank, algo=_fp.ALGO_CODES[operation], numel=_fp.size_word(size),
        dtype_code=DTYPE_CODES[dtype], timeout=timeout, W=world_size, WP=triton.next_power_of_2(world_size),
        USE_PTX=launcher.use_ptx, VIRTUAL=ranks > 1,
    )  # fmt: skip


class CustomAllReduce:
    """All-reduce (SUM) of one rank over a :class:`SymmetricWorkspace`.

    Args:
        workspace: this rank's workspace (from ``SymmetricWorkspace.rendezvous`` or ``local_workspaces``).
        selector: policy for ``algo="auto"`` (default rules when omitted).
        timeout_s: bound of every device-side wait; a peer that does not arrive in time is reported by
            :meth:`check_errors` (and by the next call) as ``CommTimeoutError`` naming that peer.
        max_programs: programs (thread blocks) per launch.  It is agreed by the group when the workspace is
            made (``workspace.max_programs``: every rank's launches must use the same grid); passing any
            other value raises.  Kept for explicitness; leave it None.
        fallback: callable ``fallback(tensor) -> tensor`` used when the policy picks ``nccl``.
    """

    def __init__(
        self,
        workspace: SymmetricWorkspace,
        selector: AlgoSelector | None = None,
        timeout_s: float = 30.0,
        max_programs: int | None = None,
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if workspace.device.type == "cpu" and not interpreting():
            raise BackendNotSupportedError(
                "the custom all-reduce on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1); "
                "on GPUs use CUDA tensors"
            )
        if max_programs is not None and max_programs != workspace.max_programs:
            raise InvalidArgumentError(
                f"max_programs={max_programs} differs from the {workspace.max_programs} programs this workspace's "
                "group agreed on; every rank must launch the same grid: pass max_programs to "
                "SymmetricWorkspace.rendezvous / local_workspaces instead"
            )
        max_programs = workspace.max_programs
        self._resolved: dict[tuple, str] = {}
        self.workspace = workspace
        self.selector = selector or AlgoSelector()
        self.fallback = fallback
        self.max_programs = max_programs
        self.timeout_s = timeout_s
        self.rank = workspace.rank
        self.world_size = workspace.world_size
        self.device = workspace.device
        self.use_ptx = workspace.device.type == "cuda"
        self.device_index = workspace.device.index if workspace.device.index is not None else 0
        self.timeout_ticks = timeout_ticks(timeout_s, self.use_ptx)
        self.error_view = workspace.error_view
        self.config = workspace.config
        self.kernels = AllReduceKernels(
            self.world_size, workspace.slot_bytes, self.timeout_ticks, self.use_ptx, self.device_index,
            pdl_enabled(workspace.device, workspace.config), workspace.config, workspace.ranks_on_device,
        )  # fmt: skip
        self._table = workspace.table
        self._control = workspace.control
        self._closers: list[Callable[[], None]] = []  # close_with
        self.closed_reason: str | None = None  # set by close(): what a later call's error says
        self.check = workspace.check
        self._check = fingerprint_launcher(self.use_ptx, self.device_index)
        self._group_check = Launcher(_fp.group_fingerprint_check_kernel, self.use_ptx, self.device_index, num_warps=1)

    # ------------------------------------------------------------------ policy
    @property
    def selector(self) -> AlgoSelector:
        """The policy for ``algo="auto"``; assigning a new one drops the per-shape decisions made so far."""
        return self._selector

    @selector.setter
    def selector(self, selector: AlgoSelector) -> None:
        self._selector = selector
        self._resolved.clear()

    def select(self, nbytes: int, itemsize: int = 2) -> Selection:
        """The algorithm ``algo="auto"`` runs for ``nbytes`` of ``itemsize``-byte elements, with rule id and reason.

        The policy's choice, except that a Lamport choice over the Lamport buffers' capacity runs one-shot
        (rule id suffixed ``+lamport-capacity``).  ``itemsize`` is one of the kernels' dtypes' (2: bf16/fp16, 4: fp32)
        and ``nbytes`` a whole number of such elements; anything else raises ``InvalidArgumentError``.
        """
        check_message(nbytes, itemsize)
        if itemsize not in KERNEL_ITEMSIZES:
            raise InvalidArgumentError(
                f"itemsize must be one of {sorted(KERNEL_ITEMSIZES)} (the kernels take {list(SUPPORTED_DTYPES)}), "
                f"got {itemsize}"
            )
        return self.policy_choice(nbytes, itemsize)

    def policy_choice(self, nbytes: int, itemsize: int) -> Selection:
        """:meth:`select` without its argument checks, for a message a tensor of a kernel dtype gives (the eager
        path, where every call counts; the caller has checked the dtype)."""
        sel = self.selector.select(nbytes, self.world_size, self.workspace.slot_bytes)
        if sel.algo != ENGINE_ALGO and nbytes // itemsize > MAX_KERNEL_ELEMENTS:
            return Selection(
                ENGINE_ALGO,
                "over-int32-index",
                f"{nbytes // itemsize} elements exceed the kernels' {MAX_KERNEL_ELEMENTS} (int32 element offsets); "
                "the engine runs it",
            )
        if sel.algo == LAMPORT and nbytes // itemsize > self.workspace.lamport_capacity:
            return Selection(
                ONE_SHOT,
                f"{sel.rule_id}+lamport-capacity",
                f"{sel.reason}; but {nbytes // itemsize} elements exceed the Lamport buffers "
                f"({self.workspace.lamport_capacity}), so one-shot runs",
            )
        return sel

    def get_buffer(self, numel: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A tensor in this rank's registered region: fill it and all-reduce it without a copy-in.

        The tensor is reused by every call.  After ``all_reduce(buf)`` (in place) it holds the sum; with
        ``all_reduce(buf, out=other)`` its contents are undefined afterwards (two-shot reduces in place).
        """
        if dtype not in SUPPORTED_DTYPES:
            raise InvalidArgumentError(f"dtype {dtype} is not supported; use one of {list(SUPPORTED_DTYPES)}")
        return self.workspace.registered_tensor(numel, dtype)

    @property
    def epoch(self) -> int:
        """Calls of the barrier kernels (one-shot, two-shot, fused RMSNorm) made on this workspace so far,
        plus its initial epoch (``SAGELLM_COMM_INITIAL_EPOCH``).  Read from the device once this rank's enqueued work
        is done, waited for as :meth:`synchronize` waits (``CommTimeoutError`` past :attr:`host_timeout_s`)."""
        return self.workspace.counter(_k.CTRL_EPOCH.value, self.host_timeout_s)

    @property
    def lamport_epoch(self) -> int:
        """Lamport calls made on this workspace so far (program 0's counter; every program's is the same),
        plus its initial epoch.  Read from the device as :attr:`epoch` is."""
        return self.workspace.counter(_k.CTRL_LAMPORT.value, self.host_timeout_s)

    def check_errors(self) -> None:
        """Raise ``CommTimeoutError`` if a kernel of this rank timed out waiting for a peer, or (check mode)
        ``CollectiveMismatchError`` if a peer's call differed (no sync)."""
        self.workspace.raise_if_failed()

    @property
    def host_timeout_s(self) -> float:
        """How long the host waits for this rank's enqueued work (:meth:`synchronize`, :meth:`close`): twice the
        kernels' own bound ``timeout_s``, so that a kernel that gave up on a peer is reported first, naming it."""
        return 2 * self.timeout_s

    def synchronize(self) -> None:
        """Wait, at most :attr:`host_timeout_s`, for this rank's enqueued work (the workspace's calls and the current
        stream: :meth:`SymmetricWorkspace.drain <sagellm_comm.workspace.SymmetricWorkspace.drain>`), then
        :meth:`check_errors`.  A kernel's recorded failure raises as soon as it is seen; work still running at the
        deadline raises ``CommTimeoutError`` naming its stream."""
        self.workspace.drain(self.host_timeout_s, "the custom all-reduce's enqueued work", self.check_errors)
        self.check_errors()

    # ------------------------------------------------------------------ the call
    def all_reduce(
        self,
        tensor: torch.Tensor,
        out: torch.Tensor | None = None,
        algo: str = "auto",
        payload: str | None = None,
        fingerprint: tuple[str, int] | None = None,
    ) -> torch.Tensor:
        """Sum ``tensor`` over all ranks; in place unless ``out`` is given (``tensor``'s own memory, or memory that
        shares no byte with it: a partial overlap raises).  Returns the result tensor.

        ``tensor``: contiguous bf16/fp16/fp32 on the workspace's device, at most ``slot_bytes`` bytes (or
        a tensor from :meth:`get_buffer`: zero-copy).  Enqueued on the current stream; returns before
        completion.  ``algo``: ``auto``, ``one_shot``, ``two_shot``, ``lamport`` (barrier-free one-shot for
        small messages) or ``nccl``.  Every rank must make the
        same sequence of calls with the same sizes and algorithms.

        ``payload="fp8"`` (opt-in, never chosen by ``auto``): two-shot with every shard travelling as FP8 with one
        fp32 scale per 128 elements, reduced in fp32, returned in the input dtype, the same bits on every rank
        (``sagellm_comm/kernels/fp8_payload_all_reduce.py``; lossy: docs/custom_all_reduce.md gives the error).
        ``algo`` must be ``auto`` or ``two_shot``; a message whose FP8 staging does not fit the workspace runs on
        the engine at full precision with ``auto`` and an attached ``fallback``, and raises
        ``WorkspaceExhaustedError`` with ``two_shot`` or without a ``fallback``.

        ``fingerprint``: what check mode compares for this call, ``(operation, element count)`` (default: this
        algorithm and ``tensor``'s count); a caller running this as one stage of a larger operation passes that
        operation's.
        """
        out, algo = self.check_call(tensor, out, algo, payload)
        if algo == ENGINE_ALGO:
            return self._engine_into(tensor, out)
        numel = tensor.numel()
        if numel == 0 and not self.check:
            return out
        if payload is not None:
            return self._launch_payload(tensor, out, numel, payload)
        itemsize = SUPPORTED_DTYPES[tensor.dtype]
        if self.use_ptx:
            self.workspace.enter_stream(torch._C._cuda_getCurrentRawStream(self.device_index))
        zero_copy = self.workspace.is_registered(tensor)
        if self.check:
            if numel:
                self.kernels.launch(
                    algo, tensor, out, numel, itemsize, zero_copy, self._table, self._control, self.rank, 1,
                    self.max_programs, preload=True,
                )  # fmt: skip
            # An empty call is compared too: a peer that passed elements must not wait for this rank in vain.
            self.launch_check(*(fingerprint or (algo, numel)), tensor.dtype)
            if numel == 0:
                return out
        self.kernels.launch(
            algo, tensor, out, numel, itemsize, zero_copy, self._table, self._control, self.rank, 1, self.max_programs
        )
        return out

    def check_call(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, algo: str = "auto", payload: str | None = None
    ) -> tuple[torch.Tensor, str]:
        """Every check :meth:`all_reduce` makes of a call before it enqueues anything, with its typed errors, and
        nothing enqueued: returns the tensor the result goes to (``out``, or ``tensor`` for an in-place call) and the
        algorithm that runs (a kernel's, or ``nccl``: the attached engine).  A caller that launches several ranks'
        calls (virtual ranks) checks every rank's first, so that a call one rank refuses is refused before any rank
        launched (a launched rank would wait for the refused one until the timeout)."""
        check_is_tensor(tensor, "tensor")
        if self.error_view[0]:
            self.workspace.raise_if_failed()
        if self.workspace.closed:
            raise self.closed_error()
        if payload is not None:
            if not is_dense_contiguous(tensor):
                layout = f"strides {tensor.stride()}" if tensor.layout is torch.strided else f"layout {tensor.layout}"
                raise InvalidArgumentError(
                    f"payload={payload!r} needs a contiguous tensor, got shape {tuple(tensor.shape)} with {layout}; "
                    "call .contiguous()"
                )
            if self.wrong_device(tensor):
                raise self.device_error(tensor)
            out = self._check_out(tensor, out)
            return out, self.check_payload(tensor, algo, payload)
        itemsize = SUPPORTED_DTYPES.get(tensor.dtype)
        if itemsize is None:
            raise InvalidArgumentError(f"custom all-reduce supports bfloat16, float16 and float32, got {tensor.dtype}")
        if not is_dense_contiguous(tensor):
            raise InvalidArgumentError("custom all-reduce needs a contiguous tensor (call .contiguous())")
        if self.wrong_device(tensor):
            raise self.device_error(tensor)
        out = self._check_out(tensor, out)
        numel = tensor.numel()
        algo = self.resolve_algo(algo, numel, numel * itemsize)
        if algo == ENGINE_ALGO and self.fallback is None:
            raise BackendNotSupportedError("algo 'nccl' needs a fallback engine; none is attached here")
        return out, algo

    def _engine_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The engine's in-place all-reduce of ``tensor`` into ``out`` (``tensor`` itself, or a copy of it there, so
        that ``tensor`` is left as it was, as on the kernels' path)."""
        if out is not tensor:
            out.copy_(tensor)
        result = self.fallback(out)
        if isinstance(result, torch.Tensor) and result is not out:
            out.copy_(result)
        return out

    def check_payload(self, tensor: torch.Tensor, algo: str, payload: str) -> str:
        """``two_shot`` if the kernels run ``payload`` for ``tensor`` with ``algo``, ``nccl`` if the engine does (full
        precision: ``algo="auto"`` and a message over the workspace); typed errors for the rest."""
        if payload not in PAYLOADS:
            raise InvalidArgumentError(f"payload must be None or one of {PAYLOADS}, got {payload!r}")
        if algo not in (AUTO, TWO_SHOT):
            raise InvalidArgumentError(f"payload={payload!r} runs on two_shot only; got algo={algo!r}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise InvalidArgumentError(f"custom all-reduce supports bfloat16, float16 and float32, got {tensor.dtype}")
        need = _k8.stage_bytes(tensor.numel(), self.world_size)
        if need <= self.workspace.slot_bytes and tensor.numel() <= MAX_KERNEL_ELEMENTS:
            return TWO_SHOT
        if need <= self.workspace.slot_bytes and (algo == TWO_SHOT or self.fallback is None):
            check_kernel_elements(tensor.numel())
        if algo == TWO_SHOT or self.fallback is None:
            raise WorkspaceExhaustedError(
                f"payload={payload!r} stages {need} bytes for {tensor.numel()} elements, over the "
                f"{self.workspace.slot_bytes}-byte workspace; use algo='auto' with an engine, or a larger workspace"
            )
        return ENGINE_ALGO

    def _launch_payload(self, tensor: torch.Tensor, out: torch.Tensor, numel: int, payload: str) -> torch.Tensor:
        """Enqueue the checked ``payload`` call (:meth:`check_call` chose the kernels) of ``numel`` elements."""
        if self.use_ptx:
            self.workspace.enter_stream(torch._C._cuda_getCurrentRawStream(self.device_index))
        itemsize = tensor.element_size()
        if self.check:
            if numel:
                self.kernels.launch(
                    TWO_SHOT, tensor, out, numel, itemsize, False, self._table, self._control, self.rank, 1,
                    self.max_programs, preload=True, payload=payload,
                )  # fmt: skip
            self.launch_check(f"two_shot_{payload}", numel, tensor.dtype)  # an empty call too, as all_reduce
            if numel == 0:
                return out
        self.kernels.launch(
            TWO_SHOT, tensor, out, numel, itemsize, False, self._table, self._control, self.rank, 1,
            self.max_programs, payload=payload,
        )  # fmt: skip
        return out

    def launch_check(self, algo: str, numel: int, dtype: torch.dtype, table=None, ctrl=None, grid_y: int = 1) -> None:
        """Check mode: enqueue the fingerprint comparison of this call (``kernels/fingerprint.py``) on the
        current stream, before the collective kernel it describes (``grid_y`` > 1: virtual ranks)."""
        launch_fingerprint_check(
            self._check, self._table if table is None else table, self._control if ctrl is None else ctrl, self.rank,
            self.world_size, algo, numel, dtype, self.timeout_ticks, grid_y,
        )  # fmt: skip

    def launch_group_check(self, prints: torch.Tensor, me: int) -> None:
        """Check mode across a group that spans nodes: enqueue the comparison of row ``me`` of ``prints`` (int64
        ``[n, 4]``: every member's ``(algo code, numel, dtype code, global rank)``, all-gathered by the engine)
        with every row; a difference latches this workspace and records the first differing member's global
        rank (``kernels/fingerprint.py``).  On the current stream; nothing waits."""
        n = prints.shape[0]
        self._group_check.launch(
            (1, 1), table=self._table, ctrl=self._control, prints=prints, me=me, n=n, W=self.world_size,
            NP=triton.next_power_of_2(n), USE_PTX=self.use_ptx,
        )  # fmt: skip

    def _check_out(self, tensor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The tensor a call's result goes to: ``tensor`` where ``out`` is None (in place), else ``out``, checked: as
        many contiguous elements as ``tensor`` of its dtype on this device, either ``tensor``'s own memory (in place)
        or memory it shares no byte with.  A partial overlap is refused: the kernels read ``tensor`` while they write
        ``out``, a tile at a time, so the sum would take in elements that an earlier tile had already overwritten."""
        if out is None:
            return tensor
        check_is_tensor(out, "out")
        numel = tensor.numel()
        if out.dtype != tensor.dtype or out.numel() != numel or not out.is_contiguous() or self.wrong_device(out):
            raise InvalidArgumentError(
                f"out must be a contiguous {tensor.dtype} tensor of {numel} elements on {self.device}, got "
                f"{out.dtype} x {out.numel()} on {out.device}"
            )
        start, other = tensor.data_ptr(), out.data_ptr()
        if start != other and share_bytes(tensor, out):
            raise InvalidArgumentError(
                f"out overlaps tensor, {other - start:+d} bytes from its start; pass out=None (in place) or an out "
                "that shares no memory with tensor",
                details={"offset_bytes": other - start},
            )
        return out

    def wrong_device(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is not on this rank's workspace device (where every call's tensors must be)."""
        if self.use_ptx:
            return not tensor.is_cuda or tensor.get_device() != self.device_index
        return tensor.device.type != "cpu"

    def device_error(self, tensor: torch.Tensor, what: str = "") -> InvalidArgumentError:
        """The error for a ``tensor`` that :meth:`wrong_device` refuses; ``what`` prefixes the message (the
        operation, where it is not this object's own call)."""
        return InvalidArgumentError(
            f"{what}tensor is on {tensor.device}, this rank's workspace is on {self.device}",
            details={"device": str(tensor.device), "workspace_device": str(self.device)},
        )

    def resolve_algo(self, algo: str, numel: int, nbytes: int) -> str:
        """The algorithm that will run: ``auto`` resolved by the policy, capacities enforced.

        Depends on its arguments only (the workspace and the policy are fixed; a new ``selector`` clears
        the memo), so each (algo, numel, nbytes) is decided once; a refusal raises every time.
        """
        key = (algo, numel, nbytes)
        try:
            resolved = self._resolved.get(key)
        except TypeError:  # an unhashable algo: refused below
            resolved = None
        if resolved is not None:
            return resolved
        if not isinstance(algo, str) or algo not in (AUTO, *KERNEL_ALGOS, ENGINE_ALGO):
            raise InvalidArgumentError(f"algo must be one of {(AUTO, *KERNEL_ALGOS, ENGINE_ALGO)}, got {algo!r}")
        if algo == AUTO:
            resolved = self.policy_choice(nbytes, nbytes // numel if numel else 2).algo
        elif algo == LAMPORT and numel > self.workspace.lamport_capacity:
            raise WorkspaceExhaustedError(
                f"lamport takes at most {self.workspace.lamport_capacity} elements, got {numel}; use one_shot"
            )
        else:
            resolved = algo
        if resolved != ENGINE_ALGO and nbytes > self.workspace.slot_bytes:
            raise WorkspaceExhaustedError(
                f"message of {nbytes} bytes exceeds the custom all-reduce workspace ({self.workspace.slot_bytes}"
                " bytes); use algo='auto' (falls back to NCCL) or a larger workspace"
            )
        if resolved != ENGINE_ALGO:
            check_kernel_elements(numel)
        if len(self._resolved) >= MAX_CACHED_PLANS:  # many distinct sizes: start over rather than grow
            self._resolved.clear()
        self._resolved[key] = resolved
        return resolved

    def close_with(self, close: Callable[[], None]) -> None:
        """Call ``close`` when this all-reduce is closed, before its workspace: what was made for its group's other
        operations (the GEMM + all-reduce's workspace) goes with the group's kernels (``destroy``, ``reset``)."""
        self._closers.append(close)

    def closed_error(self, call: str | None = None) -> NotInitializedError:
        """The error of a call made once this all-reduce (or its workspace) was closed, saying why and what to do;
        ``call``: the operation refused, where it is not the all-reduce (``all_gather``, ...)."""
        reason = self.closed_reason or "its workspace was closed; make a new CustomAllReduce on a new workspace"
        refused = "" if call is None else f"custom {call}: "
        return NotInitializedError(
            f"{refused}this custom all-reduce of ranks {list(self.workspace.global_ranks or range(self.world_size))} "
            f"is closed: {reason}",
            details={"rank": self.rank, "reason": reason},
        )

    def close(self, reason: str | None = None) -> None:
        """Release the workspace and what :meth:`close_with` named (collective in spirit: every rank should
        close), once the work of its calls is done, waited for at most :attr:`host_timeout_s`
        (:meth:`SymmetricWorkspace.close <sagellm_comm.workspace.SymmetricWorkspace.close>`).  ``reason``: why, with
        what to use instead, for the error of every later call, on this object and on its workspace (default: this
        object was closed)."""
        if self.closed_reason is None:
            self.closed_reason = reason or "close() was called; make a new CustomAllReduce on a new workspace"
        closers, self._closers = self._closers[::-1], []

        def forget() -> None:
            self.kernels.cache.clear()
            self._resolved.clear()
            self._table = self._control = None

        def close_workspace() -> None:
            self.workspace.close(self.closed_reason, self.host_timeout_s)

        run_every([*closers, forget, close_workspace])  # a closer that raises does not keep the workspace
