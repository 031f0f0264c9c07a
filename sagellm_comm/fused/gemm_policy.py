"""GEMM + all-reduce path policy: ordered :class:`GemmRule` s (with their measured thresholds) and
:class:`GemmPathSelector`, which turns ``(M, output bytes, world size, capacity)`` into a path.  No tensors.

A rule is checked when it is made, as the all-reduce policy's rules are (``sagellm_comm/selector.py``): a known
path, bounds that are ints (``min_m``, ``max_m``, ``min_bytes`` non-negative, ``min_m <= max_m``), ``world_sizes`` a
non-empty list of positive ints, ``reason`` a string, an id that is a non-empty string, not one the selector reports
for its own decisions (:data:`GEMM_RESERVED_RULE_IDS`) and without ``+``; a selector, that its ids are unique and
that every rule decides some call.  Anything else raises ``InvalidArgumentError`` naming the rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm_comm.selector import CHUNKED_PATH, COPY_ENGINE_PATH, FUSED_PATH, SEQUENTIAL_PATH

from ..arguments import check_int
from ..errors import InvalidArgumentError
from ..selector import (
    GEMM_PATHS,
    Conditions,
    Selection,
    check_rule_bounds,
    check_rule_id,
    checked_rule_list,
    refuse_duplicate_ids,
    refuse_never_deciding,
)

# Rule ids a Selection of the GEMM + all-reduce reports for decisions no rule made: no rule matching, a forced path,
# the capacities that override a rule, no custom kernels, virtual ranks without copy engines; a rule may not take one.
GEMM_RESERVED_RULE_IDS = (
    "no-rule", "user", "fused-capacity", "copy-engine-capacity", "custom-unavailable", "virtual-no-copy-engine",
)  # fmt: skip


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

    def __post_init__(self) -> None:
        """Check every field: ``InvalidArgumentError`` naming it (a rule no call matches, a bound that is not an int,
        an id a Selection could not report as this rule's).  ``world_sizes`` is kept as a tuple."""
        check_rule_id(self.id, "GEMM rule", GEMM_RESERVED_RULE_IDS, "the GEMM path selector")
        where = f"GEMM rule {self.id}"
        if self.path not in GEMM_PATHS:
            raise InvalidArgumentError(f"{where}: path must be one of {GEMM_PATHS}, got {self.path!r}")
        if self.world_sizes is not None:
            if not isinstance(self.world_sizes, tuple | list) or not self.world_sizes:
                raise InvalidArgumentError(f"{where}: world_sizes must be a non-empty list, got {self.world_sizes!r}")
            sizes = tuple(check_int(w, f"{where}: world_sizes[{i}]", 1) for i, w in enumerate(self.world_sizes))
            object.__setattr__(self, "world_sizes", sizes)
        check_rule_bounds(self, "min_m", "max_m", where)
        object.__setattr__(self, "min_bytes", check_int(self.min_bytes, f"{where}: min_bytes", 0))
        if not isinstance(self.reason, str):
            raise InvalidArgumentError(f"{where}: reason must be a string, got {self.reason!r}")

    def matches(self, m: int, world_size: int, output_bytes: int) -> bool:
        return (
            m >= self.min_m
            and (self.max_m is None or m <= self.max_m)
            and (self.world_sizes is None or world_size in self.world_sizes)
            and output_bytes >= self.min_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        """The rule's fields as JSON-ready data."""
        data = dataclasses.asdict(self)
        if self.world_sizes is not None:
            data["world_sizes"] = list(self.world_sizes)
        return data

    def conditions(self) -> Conditions:
        """What the rule matches, for the checks the policies share (:func:`~sagellm_comm.selector.never_deciding`)."""
        return Conditions({"world_sizes": self.world_sizes}, self.min_m, self.max_m, {"output_bytes": self.min_bytes})


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
    tiles than the flag area, or no GEMM workspace is there) runs ``chunked`` (rule ``fused-capacity``), a copy-engine
    call that does not fit it ``sequential`` (rule ``copy-engine-capacity``); the reason names the rule that chose
    the path and why.
    """

    def __init__(self, rules: Sequence[GemmRule] = DEFAULT_GEMM_RULES, source: str | None = None):
        """``rules`` (:class:`GemmRule` s, each checked when it was made): a list or tuple of unique ids, each rule
        deciding some call (none whose every call the rules before it match); else ``InvalidArgumentError``.
        ``source``: where the rules come from, for messages (default: ``"default"`` for the default rules, else
        ``"rules given in code"``)."""
        rules = tuple(checked_rule_list(rules, GemmRule, "GEMM rules"))
        refuse_duplicate_ids([r.id for r in rules], "GEMM rules")
        refuse_never_deciding([(r.id, r.path, r.conditions()) for r in rules], "GEMM rule", "call")
        if source is None:  # what a mismatch between ranks names
            source = "default" if rules == tuple(DEFAULT_GEMM_RULES) else "rules given in code"
        self.rules = rules
        self.source = source

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    def digest(self) -> str:
        """A short hash of the rules (not of :attr:`source`): equal on two ranks when they decide alike."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def select(
        self,
        m: int,
        world_size: int,
        fused_fits: bool = True,
        output_bytes: int = 0,
        copy_engine_fits: bool = True,
    ) -> Selection:
        sel = Selection(
            SEQUENTIAL_PATH, "no-rule",
            f"no rule matches M={m}, world_size={world_size}, {output_bytes} output bytes; sequential runs",
        )  # fmt: skip
        for r in self.rules:
            if r.matches(m, world_size, output_bytes):
                sel = Selection(r.path, r.id, r.reason or f"rule {r.id}")
                break
        # The rule's choice and why it does not run: the capacities say only whether the path takes the call.
        unfit = f"rule {sel.rule_id} picks {sel.algo} ({sel.reason}), but"
        if sel.algo == FUSED_PATH and not fused_fits:
            sel = Selection(
                CHUNKED_PATH, "fused-capacity",
                f"{unfit} the [{m}, N] output does not fit the GEMM workspace (its tile buffer or flag area), or there "
                "is none: chunked pipeline instead",
            )  # fmt: skip
        if sel.algo == COPY_ENGINE_PATH and not copy_engine_fits:
            sel = Selection(
                SEQUENTIAL_PATH, "copy-engine-capacity",
                f"{unfit} the [{m}, N] output does not fit the GEMM workspace (its tile buffers or copy steps), or "
                "there is none: sequential instead",
            )  # fmt: skip
        return sel
