"""Fused tensor-parallel operations: all-reduce + residual + RMSNorm, and GEMM + all-reduce.

Per rank (one process per GPU, or the Triton interpreter with ranks as processes):

* :class:`FusedAllReduceRMSNorm` ``(workspace)`` -- on the custom all-reduce's own workspace (the kernels
  share its flags, epochs, staging slots and Lamport buffers; see
  ``sagellm_comm/kernels/fused_all_reduce_rmsnorm.py``): one-shot, two-shot or Lamport, with an optional FP8
  output (``quant=``: static, per-token or per-128-group scales; ``fp8.py`` holds the modes, the checks and
  :func:`quantize_fp8_reference`, the definition), and a :class:`FusionPolicy` of rules (``rmsnorm_policy.py``)
  saying which kernel runs, or none (``unfused``).
* :class:`GemmAllReduce` ``(gemm_workspace, all_reduce)`` -- the row-parallel linear; paths ``fused`` (tile-level
  overlap, ``sagellm_comm/kernels/gemm_all_reduce.py``, on a dedicated workspace from :func:`gemm_workspace_bytes`),
  ``chunked`` (cuBLAS GEMM of row chunk i on the caller's stream while chunk i-1 is all-reduced on a side
  stream), ``copy_engine`` (cuBLAS per row part, the reduction folded into the owner's ``addmm``, every
  transfer by DMA copy engines; ``sagellm_comm/kernels/copy_engine.py``) and ``sequential`` (cuBLAS GEMM, then one
  all-reduce); :class:`GemmPathSelector` picks by M, output size and world size.

Group level: :func:`all_reduce_residual_rmsnorm` and :func:`gemm_all_reduce` use the ``custom`` backend's
workspace when it is active on the whole group, and otherwise fall back to ``backend.all_reduce`` plus torch
ops; :func:`last_selection` says which path ran and why.  Virtual ranks (N ranks on one GPU, for tests and
benchmarks): :class:`VirtualFused`.

Modules: ``rmsnorm`` (AR + residual + RMSNorm), ``fp8`` (its FP8 output), ``rmsnorm_policy`` (its fusion rules),
``gemm`` (GEMM + all-reduce of one rank: fused, chunked and
sequential paths), ``gemm_copy_engine`` (its copy-engine path), ``gemm_policy`` (:class:`GemmPathSelector` and its
rules), ``gemm_config`` (GEMM workspace size, Triton tile configuration), ``virtual`` (virtual ranks), ``group``
(group-level functions; :func:`group_gemm` gives a group's :class:`GemmAllReduce`), ``_common`` (dtypes, limits,
input checks).

Stream semantics everywhere: work is enqueued on the caller's current stream (side streams fork from it
and join back, so CUDA-graph capture works); calls return before completion; every rank must make the
same sequence of calls with the same shapes and modes (and, for ``quant="fp8"``, the same scale).  Errors:
:class:`InvalidArgumentError` for bad inputs, :class:`CommTimeoutError` (from ``check_errors`` or the next call)
naming a peer that never arrived.
"""

from ..selector import GEMM_PATHS
from ._common import FUSED_DTYPES, MAX_HIDDEN, RMSNORM_DTYPES, check_rmsnorm_inputs, rmsnorm_reference
from .fp8 import FP8_MAX, FP8_QUANT_MODES, FP8_SCALE_FLOOR, check_quant, quantize_fp8_reference
from .gemm import GemmAllReduce, GemmPathSelector, GemmRule, copy_engine_units, gemm_tile_config, gemm_workspace_bytes
from .group import all_reduce_residual_rmsnorm, gemm_all_reduce, group_gemm, last_selection
from .rmsnorm import FusedAllReduceRMSNorm
from .rmsnorm_policy import DEFAULT_FUSION_RULES, FusionPolicy, FusionRule
from .virtual import VirtualFused

__all__ = [
    "DEFAULT_FUSION_RULES",
    "FP8_MAX",
    "FP8_QUANT_MODES",
    "FP8_SCALE_FLOOR",
    "FUSED_DTYPES",
    "GEMM_PATHS",
    "MAX_HIDDEN",
    "RMSNORM_DTYPES",
    "FusedAllReduceRMSNorm",
    "FusionPolicy",
    "FusionRule",
    "GemmAllReduce",
    "GemmPathSelector",
    "GemmRule",
    "VirtualFused",
    "all_reduce_residual_rmsnorm",
    "check_quant",
    "check_rmsnorm_inputs",
    "copy_engine_units",
    "gemm_all_reduce",
    "gemm_tile_config",
    "gemm_workspace_bytes",
    "group_gemm",
    "last_selection",
    "quantize_fp8_reference",
    "rmsnorm_reference",
]
