"""GEMM + all-reduce, the row-parallel linear of one rank: :class:`GemmAllReduce` and its fused, chunked and
sequential paths (the copy-engine path is in ``gemm_copy_engine``, the path policy in ``gemm_policy``, the
workspace size and tile configuration in ``gemm_config``; their public names are importable from here too)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from sagellm_comm.kernels import all_reduce as _ark
from sagellm_comm.kernels import gemm_all_reduce as _gk
from sagellm_comm.selector import AUTO, CHUNKED_PATH, COPY_ENGINE_PATH, ENGINE_ALGO, FUSED_PATH

from ..arguments import check_flag, check_int
from ..custom_all_reduce import CustomAllReduce, fingerprint_launcher, launch_fingerprint_check
from ..errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    WorkspaceExhaustedError,
)
from ..launch import Launcher as _Launcher
from ..launch import interpreting as _interpreting
from ..launch import timeout_ticks as _timeout_ticks
from ..selector import GEMM_PATHS, Selection
from ..workspace import SymmetricWorkspace
from ._common import FUSED_DTYPES, check_gemm_inputs, engine_all_reduced
from .gemm_config import FLAG_AREA_BYTES, gemm_tile_config, gemm_workspace_bytes
from .gemm_copy_engine import CopyEnginePath, copy_engine_units
from .gemm_policy import DEFAULT_GEMM_RULES, GemmPathSelector, GemmRule

__all__ = [
    "DEFAULT_GEMM_RULES",
    "GemmAllReduce",
    "GemmPathSelector",
    "GemmRule",
    "copy_engine_units",
    "gemm_tile_config",
    "gemm_workspace_bytes",
]


def gemm_knobs(
    consumer_programs: int | None = None, num_chunks: int = 4, reduce_programs: int | None = None
) -> tuple[int | None, int, int | None]:
    """The program and chunk counts of :class:`GemmAllReduce` checked: ints of at least 1 (None: the default
    count), else an InvalidArgumentError naming the knob.  Callers that make memory for a GEMM + all-reduce
    check its knobs first."""
    return (
        None if consumer_programs is None else check_int(consumer_programs, "consumer_programs", 1),
        check_int(num_chunks, "num_chunks", 1),
        None if reduce_programs is None else check_int(reduce_programs, "reduce_programs", 1),
    )


class GemmAllReduce(CopyEnginePath):
    """Row-parallel linear of one rank: ``out = sum over ranks of a @ b (+ bias, added once)``.

    Args:
        gemm_workspace: a dedicated :class:`SymmetricWorkspace` (sized with :func:`gemm_workspace_bytes`)
            for the fused path's tile buffers and flags; None disables the fused path.
        all_reduce: the rank's :class:`CustomAllReduce` for the chunked and sequential paths (or a callable
            ``all_reduce(tensor) -> tensor``, in place, e.g. an engine's: from ``world_size`` 3 on it is given a
            16-bit output as fp32, summed as the kernels sum it, and rounded once).
        selector: path policy (a :class:`GemmPathSelector`; None: its default rules).
        consumer_programs: programs of the fused path's reduction kernel (default: a quarter of the SMs).
        num_chunks: row chunks of the chunked path.
        reduce_programs: programs of the copy-engine path's row sum at W > 2, which runs on the caller's
            stream between GEMMs (default: two per SM).
        ce_chunks: row chunks of the copy-engine path (default: by M, see :meth:`copy_engine_chunks`).
    """

    def __init__(
        self,
        gemm_workspace: SymmetricWorkspace | None,
        all_reduce: CustomAllReduce | Callable[[torch.Tensor], torch.Tensor],
        selector: GemmPathSelector | None = None,
        timeout_s: float = 30.0,
        consumer_programs: int | None = None,
        num_chunks: int = 4,
        world_size: int | None = None,
        device: torch.device | str | None = None,
        reduce_programs: int | None = None,
        ce_chunks: int | None = None,
    ):
        consumer_programs, num_chunks, reduce_programs = gemm_knobs(consumer_programs, num_chunks, reduce_programs)
        if not (selector is None or isinstance(selector, GemmPathSelector)):  # else untyped in the first call
            raise InvalidArgumentError(f"selector must be a GemmPathSelector or None, got {selector!r}")
        self.ce_chunks = ce_chunks  # checked by the property
        ws = gemm_workspace
        self.workspace = ws
        self.all_reduce = all_reduce
        self.selector = selector or GemmPathSelector()
        if ws is not None:
            self.world_size = ws.world_size
        else:
            self.world_size = 0 if world_size is None else check_int(world_size, "world_size", 1)
        self.device = ws.device if ws is not None else torch.device(device or "cpu")
        self.use_ptx = self.device.type == "cuda"
        if ws is not None and ws.device.type == "cpu" and not _interpreting():
            raise BackendNotSupportedError("fused kernels on CPU tensors need TRITON_INTERPRET=1; use CUDA tensors")
        self._timeout = _timeout_ticks(timeout_s, self.use_ptx)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.use_ptx else 8
        if consumer_programs is None:
            consumer_programs = max(1, min(_ark.MAX_BLOCKS.value, sms // 4))
        self.consumer_programs = consumer_programs
        self.num_chunks = num_chunks
        self.reduce_programs = reduce_programs if reduce_programs is not None else 2 * sms if self.use_ptx else 2
        # Tile buffer of one parity (see sagellm_comm/kernels/gemm_all_reduce.py): what is left after the flags, halved.
        self.buffer_bytes = 0 if ws is None else (3 * ws.slot_bytes - FLAG_AREA_BYTES) // 2 // 256 * 256
        index = self.device.index or 0
        self._producers: dict[tuple, _Launcher] = {}
        self._consumer = _Launcher(
            _gk.tile_all_reduce_kernel, self.use_ptx, index, num_warps=4 if not self.use_ptx else 8
        )
        self.side_stream = torch.cuda.Stream(self.device, priority=-1) if self.use_ptx else None
        self.last_selection: Selection | None = None
        self._check = fingerprint_launcher(self.use_ptx, index)
        self._init_copy_engine(index, sms)

    # ------------------------------------------------------------------ policy
    def fused_fits(self, m: int, n: int, itemsize: int) -> bool:
        if self.workspace is None:
            return False
        cfg = gemm_tile_config(m, self.use_ptx)
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        return m * n * itemsize <= self.buffer_bytes and tiles <= _gk.MAX_TILES.value

    def select(self, m: int, n: int, itemsize: int = 2) -> Selection:
        """The path ``path="auto"`` runs for an ``[m, n]`` output, with rule id and reason."""
        return self.selector.select(
            m, self.world_size, self.fused_fits(m, n, itemsize), m * n * itemsize, self.copy_engine_fits(m, n, itemsize)
        )

    def validate(self, a, b, bias, batch: int | None = None) -> tuple[int, int, int]:
        return check_gemm_inputs(a, b, bias, self.device, FUSED_DTYPES, batch)

    def pick(self, path: str, m: int, n: int, itemsize: int) -> Selection:
        if path == AUTO:
            sel = self.select(m, n, itemsize)
        elif path in GEMM_PATHS:
            if path == FUSED_PATH and not self.fused_fits(m, n, itemsize):
                raise WorkspaceExhaustedError(
                    f"fused path: a [{m}, {n}] output needs {m * n * itemsize} bytes (and tiles <= "
                    f"{_gk.MAX_TILES.value}); the GEMM workspace holds {self.buffer_bytes}"
                )
            if path == COPY_ENGINE_PATH and not self.copy_engine_fits(m, n, itemsize):
                raise WorkspaceExhaustedError(
                    f"copy_engine path: a [{m}, {n}] output needs {m * n * itemsize} bytes; the GEMM workspace "
                    f"holds {self.buffer_bytes}" + ("" if self.workspace is not None else " (no GEMM workspace)")
                )
            sel = Selection(path, "user", f"path={path} requested")
        else:
            raise InvalidArgumentError(f"path must be auto or one of {GEMM_PATHS}, got {path!r}")
        self.last_selection = sel
        return sel

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None = None,
        path: str = "auto",
        zero_copy: bool = False,
    ):
        """``[M, N]`` = all-reduce of ``a @ b`` over the ranks (+ ``bias``); a new tensor.

        ``a``: ``[M, K_shard]``, ``b``: ``[K_shard, N]`` (any strides; e.g. ``weight.t()``), bf16 or fp16.
        ``path``: ``auto`` (the selector), ``fused``, ``chunked``, ``copy_engine`` or ``sequential``.
        ``zero_copy``: where the copy-engine path runs, return the result as a view of this rank's GEMM
        workspace instead of a new tensor (saves the local copy of this rank's part: 1/W of the output).  The
        view is overwritten by the next call on this workspace and freed when the workspace is closed (unlike a
        ``get_buffer()`` tensor, it does not keep the region): consume or copy it before then; passed to a call as
        ``a``, ``b`` or ``bias`` it raises ``InvalidArgumentError`` (that call would overwrite it while reading it).
        Other paths ignore it.
        """
        check_flag(zero_copy, "zero_copy")  # a truthy string would return a view the next call overwrites
        ws = self.workspace
        if ws is not None and ws.error_view[0]:
            ws.raise_if_failed()
        if ws is not None and ws.closed:  # its peers' regions are unmapped: a launch or copy would fault
            raise ws.closed_error("the GEMM + all-reduce's workspace")
        m, n, _ = self.validate(a, b, bias)
        if ws is not None:
            self._refuse_workspace_inputs(ws, a, b, bias)
        sel = self.pick(path, m, n, a.element_size())
        check = None
        if ws is not None and sel.algo in (FUSED_PATH, COPY_ENGINE_PATH):
            if self.use_ptx:
                ws.enter_stream(torch._C._cuda_getCurrentRawStream(self.device.index or 0))
            if ws.check:
                # Launched by the path once its kernels are loaded: loading a module may wait for the device to
                # go idle, and a spinning check waits for peers (other ranks driven from this thread) that have
                # not launched theirs yet.
                check = lambda: self._launch_check(f"gemm_{sel.algo}", (m, n), a.dtype)  # noqa: E731
        if sel.algo == COPY_ENGINE_PATH:
            out = None if zero_copy else torch.empty((m, n), dtype=a.dtype, device=self.device)
            return self._copy_engine(a, b, bias, out, m, n, check)
        out = torch.empty((m, n), dtype=a.dtype, device=self.device)
        if sel.algo == FUSED_PATH:
            self.launch_fused(a, b, bias, out, m, n, check=check)
        elif sel.algo == CHUNKED_PATH:
            self._chunked(a, b, bias, out, m)
        else:
            self._matmul(a, b, bias, out)
            self._reduce(out)
        return out

    @staticmethod
    def _refuse_workspace_inputs(ws: SymmetricWorkspace, a, b, bias) -> None:
        """``InvalidArgumentError`` for an input in this rank's GEMM workspace (a ``zero_copy`` result): the fused and
        copy-engine paths write their tile buffers there while they read the inputs, so the call would read values
        it had already overwritten (the docs' "valid until the next call")."""
        low = ws.peer_ptrs[ws.rank]
        high = low + _ark.PAD_BYTES.value + 3 * ws.slot_bytes
        for name, t in (("a", a), ("b", b), ("bias", bias)):
            if t is None or t.numel() == 0:
                continue
            start = t.data_ptr()
            reach = sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride(), strict=True))
            end = start + (1 + reach) * t.element_size()
            if start < high and low < end:
                raise InvalidArgumentError(
                    f"{name} lies in this GEMM + all-reduce's workspace (a zero_copy result, valid until the next "
                    f"call): this call would overwrite it while reading it; pass {name}.clone()"
                )

    def _launch_check(self, algo: str, shape: tuple[int, int], dtype: torch.dtype, table=None, ctrl=None, ranks=1):
        """Check mode: the fingerprint comparison of this call (``kernels/fingerprint.py``), before its kernels."""
        ws = self.workspace
        launch_fingerprint_check(
            self._check, ws.table if table is None else table, ws.control if ctrl is None else ctrl, ws.rank,
            ws.world_size, algo, shape, dtype, self._timeout, ranks,
        )  # fmt: skip

    def _rank(self) -> int:
        if self.workspace is not None:
            return self.workspace.rank
        return getattr(getattr(self.all_reduce, "workspace", None), "rank", 0)

    def _matmul(self, a, b, bias, out) -> None:
        if bias is not None and self._rank() == 0:  # the bias is added once: rank 0's partial carries it
            torch.addmm(bias, a, b, out=out)
        else:
            torch.matmul(a, b, out=out)

    def _reduce(self, t: torch.Tensor) -> None:
        """``t`` summed over ranks in place, the fp32 sum of the partials rounded once: on the custom all-reduce's
        kernels where its policy runs one, else on the engine (its ``fallback``, or a callable ``all_reduce``), a
        16-bit ``t`` as fp32 from 3 ranks on (:func:`engine_all_reduced`: an engine rounds per addition)."""
        car = self.all_reduce
        if not isinstance(car, CustomAllReduce):
            engine_all_reduced(t, car, self.world_size, in_place=True)
            return
        engine = (
            car.fallback is not None
            and not (car.error_view[0] or car.workspace.closed)  # the all-reduce's own call raises
            and car.resolve_algo(AUTO, t.numel(), t.numel() * t.element_size()) == ENGINE_ALGO
        )
        if engine:
            engine_all_reduced(t, car.fallback, car.world_size, in_place=True)
        else:
            car.all_reduce(t)

    def _chunked(self, a, b, bias, out, m) -> None:
        self.chunk_pipeline(
            m,
            lambda i, rows: self._matmul(a[rows], b, bias, out[rows]),
            lambda i, rows: self._reduce(out[rows]),
        )

    def chunk_pipeline(
        self, m: int, produce: Callable[[int, slice], None], reduce: Callable[[int, slice], None]
    ) -> None:
        """The chunked path's schedule over ``num_chunks`` row chunks of ``m`` rows: ``produce(i, rows)`` on the
        caller's stream, then ``reduce(i, rows)`` on the side stream once chunk ``i`` is produced, while chunk
        ``i + 1`` is produced; the side stream forks from the caller's stream and joins back (graph capture
        works).  Interpreter (no streams): produce and reduce alternate on the one stream, same data path."""
        chunk = triton.cdiv(m, self.num_chunks)
        if self.side_stream is None:
            for i, start in enumerate(range(0, m, chunk)):
                produce(i, slice(start, start + chunk))
                reduce(i, slice(start, start + chunk))
            return
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        for i, start in enumerate(range(0, m, chunk)):
            rows = slice(start, start + chunk)
            produce(i, rows)
            done = torch.cuda.Event()
            done.record(current)
            self.side_stream.wait_event(done)
            with torch.cuda.stream(self.side_stream):
                reduce(i, rows)
        current.wait_stream(self.side_stream)

    def launch_fused(
        self, a, b, bias, out, m, n, table=None, ctrl=None, virtual_ranks: int = 1, one_shot=None, check=None
    ):
        """Enqueue the fused path: the consumer on the side stream first, then the GEMM on the current one.
        ``check``: a launch to enqueue first, once both kernels are loaded (check mode's fingerprint)."""
        ws = self.workspace
        cfg = dict(gemm_tile_config(m, self.use_ptx))
        bm, bn, bk, gm = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        k = a.shape[-1]
        w, wp = ws.world_size, triton.next_power_of_2(ws.world_size)
        table = ws.table if table is None else table
        ctrl = ws.control if ctrl is None else ctrl
        if one_shot is None:
            one_shot = tiles < 2 * w  # tiny outputs: skip the second flag round trip
        consumers = max(1, min(self.consumer_programs, tiles))
        virtual = virtual_ranks > 1
        sa = a.stride()
        sb = b.stride()
        pkey = tuple(sorted(cfg.items()))
        producer = self._producers.get(pkey)
        if producer is None:
            producer = _Launcher(_gk.gemm_publish_kernel, self.use_ptx, self.device.index or 0, **cfg)
            self._producers[pkey] = producer
        producer_args = producer.bind(
            a=a, b=b, table=table, ctrl=ctrl, M=m, N=n, K=k, stride_aw=sa[0] if virtual else 0, stride_am=sa[-2],
            stride_ak=sa[-1], stride_bw=sb[0] if virtual else 0, stride_bk=sb[-2], stride_bn=sb[-1], rank=ws.rank,
            buffer_bytes=self.buffer_bytes, W=w, WP=wp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
            USE_PTX=self.use_ptx, VIRTUAL=virtual,
        )  # fmt: skip
        sub_m = min(bm, max(16, 8192 // bn))  # rows per slice: W slices of 8K elements in flight per program
        consumer_args = self._consumer.bind(
            out=out, bias=out if bias is None else bias, table=table, ctrl=ctrl, M=m, N=n, rank=ws.rank,
            buffer_bytes=self.buffer_bytes, timeout=self._timeout, W=w, WP=wp, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm,
            SUB_M=sub_m, ONE_SHOT=bool(one_shot), HAS_BIAS=bias is not None, USE_PTX=self.use_ptx, VIRTUAL=virtual,
        )  # fmt: skip
        if check is not None:
            producer.preload(producer_args)
            self._consumer.preload(consumer_args)
            check()
        loaded = producer.is_loaded(producer_args) and self._consumer.is_loaded(consumer_args)
        producer_grid = (tiles * virtual_ranks, 1)  # virtual ranks interleaved (see gemm_publish_kernel)
        if self.side_stream is None or not loaded:
            # Producer first, then the consumer, on the current stream (correct, no overlap).  The interpreter
            # runs one launch to completion before the next; on GPUs the first launch of a specialisation
            # compiles and loads a module, which may wait for the device to go idle -- never while a consumer
            # spins for tiles of a producer that is not launched yet.
            producer(producer_grid, producer_args)
            self._consumer((consumers, virtual_ranks), consumer_args)
            return
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            # Launched first: its consumers * ranks programs are resident before the GEMM fills the GPU, and
            # the GEMM never waits, so it always has the remaining SMs (no co-residency deadlock).
            self._consumer((consumers, virtual_ranks), consumer_args)
        producer(producer_grid, producer_args)
        current.wait_stream(self.side_stream)
        out.record_stream(self.side_stream)

    def check_errors(self) -> None:
        if self.workspace is not None:
            self.workspace.raise_if_failed()
