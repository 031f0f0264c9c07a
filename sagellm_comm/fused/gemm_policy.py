"""GEMM + all-reduce path policy: ordered :class:`GemmRule` s (with their measured thresholds) and
:class:`GemmPathSelector`, which turns ``(M, output bytes, world size, capacity)`` into a path.  No tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagellm_comm.selector import CHUNKED_PATH, COPY_ENGINE_PATH, FUSED_PATH, SEQUENTIAL_PATH

from ..errors import InvalidArgumentError
from ..selector import GEMM_PATHS, Selection


@dataclass(frozen=True)
class GemmRule:
    """Use ``path`` when ``min_m <= M <= max_m``, the ``[M, N]`` output has at least ``min_bytes`` bytes, and
    the world size is listed (if a list is given)."""

    id: str
    path: str
    min_m: int = 1
    max_m: int | None = None
    world_sizes: tuple[int, ...] | None = None
    reason: str = ""
    min_bytes: int = 0


# Measured with virtual ranks, one H100 (bench/results/h100/fused_gemm_all_reduce_virtual.json at 5aac79e, in git at
# 290c549; on one H200 bench/results/h200/fused_gemm_all_reduce_virtual.json says the same,
# docs/fused.md): cuBLAS then our all-reduce was the fastest path, or within 1% of it, at every M, N and world
# size; the fused Triton GEMM alone is 1.15-1.6x slower than cuBLAS, which the overlap does not win back, and
# the chunked pipeline loses to contention.  So the default never picks a path measured slower than sequential;
# a rule override (or path="fused") selects the others where real multi-GPU measurements say they pay.
DEFAULT_GEMM_RULES: tuple[GemmRule, ...] = (
    GemmRule(
        "measured-copy-engine-2",
        COPY_ENGINE_PATH,
        min_m=2048,
        world_sizes=(2,),
        min_bytes=32 << 20,
        reason="measured on 2 x H100 (NVLink): 1.14-1.30x faster than cuBLAS then our all-reduce at M >= 2048 with "
        "outputs >= 32 MB (the default call against sequential, bench/results/2xh100/fused.json at 077d3da)",
    ),
    GemmRule(
        "measured-sequential",
        SEQUENTIAL_PATH,
        reason="measured fastest at every M with virtual ranks, one H100: cuBLAS GEMM, then one all-reduce",
    ),
)


class GemmPathSelector:
    """Ordered :class:`GemmRule` list -> :class:`Selection` (``algo`` is the path).  Never touches tensors.

    Capacity overrides every rule: a fused call whose output does not fit the GEMM workspace (or has more
    tiles than the flag area) runs ``chunked`` (rule ``fused-capacity``), and paths without a kernel
    workspace run ``sequential``.
    """

    def __init__(self, rules: Sequence[GemmRule] = DEFAULT_GEMM_RULES):
        for r in rules:
            if r.path not in GEMM_PATHS:
                raise InvalidArgumentError(f"rule {r.id}: path must be one of {GEMM_PATHS}, got {r.path!r}")
        self.rules = tuple(rules)

    def select(
        self,
        m: int,
        world_size: int,
        fused_fits: bool = True,
        output_bytes: int = 0,
        copy_engine_fits: bool = True,
    ) -> Selection:
        sel = Selection(SEQUENTIAL_PATH, "no-rule", f"no rule matches M={m}, world_size={world_size}")
        for r in self.rules:
            if (
                m >= r.min_m
                and (r.max_m is None or m <= r.max_m)
                and (r.world_sizes is None or world_size in r.world_sizes)
                and output_bytes >= r.min_bytes
            ):
                sel = Selection(r.path, r.id, r.reason or f"rule {r.id}")
                break
        if sel.algo == FUSED_PATH and not fused_fits:
            sel = Selection(CHUNKED_PATH, "fused-capacity", "output over the GEMM workspace: chunked pipeline instead")
        if sel.algo == COPY_ENGINE_PATH and not copy_engine_fits:
            sel = Selection(
                SEQUENTIAL_PATH, "copy-engine-capacity", "output over the GEMM workspace: sequential instead"
            )
        return sel
