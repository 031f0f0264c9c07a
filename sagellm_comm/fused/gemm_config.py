"""GEMM + all-reduce sizing: the dedicated workspace's size (:func:`gemm_workspace_bytes`) and the Triton tile
configuration of the fused path (:func:`gemm_tile_config`)."""

from __future__ import annotations

import triton

from sagellm_comm.arguments import check_int
from sagellm_comm.kernels import all_reduce as _ark
from sagellm_comm.kernels import gemm_all_reduce as _gk

FLAG_AREA_BYTES = _gk.DATA_OFFSET.value - _ark.PAD_BYTES.value  # produced + reduced tile flags (int64)


def gemm_workspace_bytes(max_output_bytes: int) -> int:
    """``slot_bytes`` to ask a :class:`SymmetricWorkspace` for, so it holds two ``[M, N]`` tile buffers of
    ``max_output_bytes`` each plus the tile flags (the region is ``PAD_BYTES + 3 * slot_bytes``)."""
    max_output_bytes = check_int(max_output_bytes, "max_output_bytes", 0)
    return triton.cdiv(FLAG_AREA_BYTES + 2 * max_output_bytes, 3)


def gemm_tile_config(m: int, use_ptx: bool) -> dict:
    """Tile sizes (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``) and launch options (``num_warps``,
    ``num_stages``) of the fused path's GEMM for ``M = m``; ``use_ptx`` False: the interpreter's small tiles."""
    if not use_ptx:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1}
    if m <= 64:
        return {
            "BLOCK_M": max(16, triton.next_power_of_2(m)),
            "BLOCK_N": 64,
            "BLOCK_K": 128,
            "GROUP_M": 1,
            "num_warps": 4,
            "num_stages": 4,
        }
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
