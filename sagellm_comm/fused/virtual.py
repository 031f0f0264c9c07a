"""The fused operations for N virtual ranks on one GPU (tests and benchmarks), one launch for all ranks."""

from __future__ import annotations

import logging
import os

import torch
import triton

from sagellm_comm.selector import AUTO, COPY_ENGINE_PATH, FUSED_PATH, ONE_SHOT, SEQUENTIAL_PATH, TWO_SHOT

from ..arguments import check_finite, check_is_tensor
from ..custom_all_reduce import check_virtual_elements
from ..errors import (
    BackendNotSupportedError,
    InvalidArgumentError,
    NotInitializedError,
    WorkspaceExhaustedError,
    run_every,
    undo_after_failure,
)
from ..selector import UNFUSED_PATH, Selection
from ..virtual import stacked_rows
from ..workspace import local_workspaces
from .fp8 import check_quant, unfused_tail
from .gemm import GemmAllReduce, GemmPathSelector, gemm_knobs, gemm_workspace_bytes
from .rmsnorm import FusedAllReduceRMSNorm
from .rmsnorm_policy import FusionPolicy, fusion_policy_from

logger = logging.getLogger(__name__)


class VirtualFused:
    """The fused operations for the ``world_size`` virtual ranks of a :class:`VirtualRankGroup`, each call
    one launch per kernel for all ranks (grid axis 1 = rank), tensors stacked as ``[world_size, ...]``.

    Args:
        group: the virtual ranks (their all-reduce workspaces carry the AR + RMSNorm kernel); its ``timeout_s``
            bounds every device-side wait of the fused kernels too, and a fusion rule ``all_reduce_policy`` follows
            its all-reduce policy (``VirtualRankGroup(selector=...)``) as it is at each call: a selector set later
            on its ranks' all-reduces (``car.selector = ...``, which ``group.select`` reads) is followed.
        gemm_max_output_bytes: per-rank capacity of the fused GEMM's tile buffer (a dedicated workspace).
        consumer_programs: programs per rank of the fused GEMM's reduction (default: SMs / (4 * ranks)).
        fusion_policy: the fusion rules of :meth:`all_reduce_residual_rmsnorm`, as the custom backend's
            ``fusion_policy=``: a :class:`~sagellm_comm.fused.FusionPolicy`, a path read by
            :meth:`FusionPolicy.from_file <sagellm_comm.fused.FusionPolicy.from_file>`, or None (the default rules).
    """

    def __init__(
        self,
        group,
        gemm_max_output_bytes: int = 64 << 20,
        consumer_programs: int | None = None,
        selector: GemmPathSelector | None = None,
        num_chunks: int = 4,
        fusion_policy: FusionPolicy | str | os.PathLike | None = None,
    ):
        consumer_programs, num_chunks, _ = gemm_knobs(consumer_programs, num_chunks)  # before any workspace
        fusion_policy = fusion_policy_from(fusion_policy)
        self.group = group
        self.world_size = w = group.world_size
        self.device = group.device
        self.rmsnorm = FusedAllReduceRMSNorm(  # a rule following the all-reduce policy follows the group's, as it is
            group.workspaces[0], all_reduce=group.ranks[0], max_programs=group.max_programs,  # at each call
            timeout_s=group.timeout_s, policy=fusion_policy,
        )  # fmt: skip
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._overlap_programs = max(1, sms // (4 * w))
        self.gemm_workspaces = local_workspaces(
            w, gemm_workspace_bytes(gemm_max_output_bytes), self.device, config=group.config
        )
        if consumer_programs is None:
            consumer_programs = self._overlap_programs
        try:
            self.gemm = GemmAllReduce(
                self.gemm_workspaces[0],
                self._all_reduce_stacked,
                selector=selector,
                consumer_programs=consumer_programs,
                num_chunks=num_chunks,
                timeout_s=group.timeout_s,
            )
            self._gemm_table, self._gemm_ctrl = stacked_rows(self.gemm_workspaces)
        except BaseException as exc:  # the workspaces just made are nobody's: closed, the set-up's error raised
            undo_after_failure([ws.close for ws in self.gemm_workspaces], logger,
                               f"closing the fused GEMM's workspaces after its set-up failed ({exc!r})")  # fmt: skip
            raise

    def _all_reduce_stacked(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_stacked(t.view(self.world_size, -1))

    def _all_reduce_beside_gemm(self, t: torch.Tensor) -> None:
        """The chunked path's all-reduce: few programs, so that it becomes resident while a GEMM holds SMs."""
        flat = t.view(self.world_size, -1)
        numel, itemsize = flat.shape[1], flat.element_size()
        algo = self.group.select(numel * itemsize).algo
        if algo not in (ONE_SHOT, TWO_SHOT):
            self.group.all_reduce_stacked(flat)  # raises the group's typed error for what it cannot run
            return
        self.group.launch_stacked(algo, flat, self._overlap_programs)

    def all_reduce_residual_rmsnorm(
        self, x, residual, weight, eps: float = 1e-6, algo: str = "auto", quant: str | None = None, scale=None
    ):
        """``x``, ``residual``: ``[world_size, rows, hidden]`` (row block r = rank r); ``weight``: ``[hidden]``.

        Returns ``(normed, new_residual)``, or with ``quant`` ``(q, scale(s), new_residual)``, each with a leading
        ``[world_size]`` dimension (a static ``scale`` is shared by every rank and returned as given); one launch.
        ``algo="unfused"`` (or a fusion rule saying so) runs the unfused chain: the virtual ranks' all-reduce, then
        torch ops.
        """
        check_is_tensor(x, "x")
        if x.dim() != 3 or x.shape[0] != self.world_size:
            raise InvalidArgumentError(f"x must be [world_size={self.world_size}, rows, hidden], got {tuple(x.shape)}")
        self.group.check_errors()
        self._check_open()
        check_quant(quant, scale, x)
        eps = check_finite(eps, "eps", 0.0)
        rows, hidden = self.rmsnorm.validate(x, residual, weight, rows_dims=3)
        check_virtual_elements(self.world_size, rows * hidden, "x")  # the kernel's rank * rows * hidden is int32
        sel = self.rmsnorm.pick(algo, x[0], rows, hidden, quant)
        if sel.algo == UNFUSED_PATH:
            if sel.rule_id == "over-workspace":
                raise WorkspaceExhaustedError(f"{x[0].numel() * x.element_size()} bytes per rank exceed the workspace")
            reduced = x.clone()
            self._all_reduce_stacked(reduced)
            return unfused_tail(reduced, residual, weight, eps, quant, scale)
        out, scales, new_residual = self.rmsnorm.new_outputs(x, quant, scale)
        if rows:
            self.rmsnorm.launch(
                sel.algo,
                x,
                residual,
                weight,
                out,
                scales,
                new_residual,
                rows,
                hidden,
                eps,
                quant,
                table=self.group.stacked_table,
                ctrl=self.group.stacked_control,
                virtual_ranks=self.world_size,
            )
        return (out, new_residual) if quant is None else (out, scales, new_residual)

    def gemm_all_reduce(self, a, b, bias=None, path: str = "auto", one_shot: bool | None = None):
        """``a``: ``[world_size, M, K]``, ``b``: ``[world_size, K, N]`` -> ``[world_size, M, N]``, every block the
        sum over ranks of ``a[r] @ b[r]`` (+ ``bias`` once)."""
        g = self.gemm
        for ws in self.gemm_workspaces:
            ws.raise_if_failed()
        self._check_open()
        m, n, _ = g.validate(a, b, bias, batch=self.world_size)
        check_virtual_elements(self.world_size, m * n, "the GEMM output")  # the kernel's rank * M * N is int32
        sel = g.pick(path, m, n, a.element_size())
        if sel.algo == COPY_ENGINE_PATH:  # per-rank streams and copies: not in the one-launch-for-all-ranks layout
            if path != AUTO:
                raise BackendNotSupportedError(
                    f"path={COPY_ENGINE_PATH!r} needs one GemmAllReduce and stream pair per rank (one process per "
                    "rank); the stacked virtual-rank layout runs fused, chunked or sequential"
                )
            sel = g.last_selection = Selection(
                SEQUENTIAL_PATH, "virtual-no-copy-engine", f"{sel.reason}; virtual ranks"
            )
        w = self.world_size
        out = torch.empty((w, m, n), dtype=a.dtype, device=self.device)
        if sel.algo == FUSED_PATH:
            g.launch_fused(
                a, b, bias, out, m, n, table=self._gemm_table, ctrl=self._gemm_ctrl, virtual_ranks=w, one_shot=one_shot
            )
        elif sel.algo == SEQUENTIAL_PATH:
            self._bmm(a, b, bias, out)
            self._all_reduce_stacked(out)
        else:
            chunk = triton.cdiv(m, g.num_chunks)
            stage = torch.empty((g.num_chunks, w * chunk * n), dtype=a.dtype, device=self.device)

            def part(i: int, rows: slice) -> torch.Tensor:  # contiguous per chunk
                return stage[i, : w * (min(rows.stop, m) - rows.start) * n].view(w, -1, n)

            def produce(i: int, rows: slice) -> None:
                self._bmm(a[:, rows], b, bias, part(i, rows))

            def reduce(i: int, rows: slice) -> None:
                self._all_reduce_beside_gemm(part(i, rows))
                out[:, rows].copy_(part(i, rows))  # virtual ranks only: rank blocks are not contiguous per chunk

            g.chunk_pipeline(m, produce, reduce)
            stage.record_stream(g.side_stream)
        return out

    @staticmethod
    def _bmm(a, b, bias, out) -> None:
        if bias is None:
            torch.bmm(a, b, out=out)
            return
        # Once: rank 0's partial carries the bias, added before the rounding as one rank's addmm adds it (the
        # product rounded first, then the bias added, would be another partial: other bits than the per-rank paths).
        torch.addmm(bias, a[0], b[0], out=out[0])
        if out.shape[0] > 1:
            torch.bmm(a[1:], b[1:], out=out[1:])

    def _check_open(self) -> None:
        """Raise NotInitializedError once this object or its group was closed: the stacked tables still hold the
        freed regions' addresses."""
        if self.group.workspaces[0].closed or self.gemm_workspaces[0].closed:
            raise NotInitializedError("the virtual ranks' fused workspaces were closed (close() was called)")

    def close(self) -> None:
        """Release the fused GEMM's workspaces, each once the work of its calls is done (waited for at most the
        group's ``host_timeout_s``); a workspace close that fails does not stop the others, and the first error is
        raised once every step ran.  During a CUDA graph capture nothing is waited for (that would invalidate the
        capture): the workspaces are closed at once and release their memory when the capture ends, as
        :meth:`SymmetricWorkspace.close <sagellm_comm.workspace.SymmetricWorkspace.close>` says."""
        timeout = self.group.ranks[0].host_timeout_s
        run_every(lambda ws=ws: ws.close(timeout=timeout) for ws in self.gemm_workspaces)
