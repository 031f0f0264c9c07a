"""All-reduce + residual + RMSNorm (+ FP8) policy: ordered :class:`FusionRule` s -> a path, with rule id and reason.

A path is one of the fused kernels (``one_shot``, ``two_shot``, ``lamport``), ``unfused`` (the fusion off: the
all-reduce, then torch add + RMSNorm + quantisation), or ``all_reduce_policy``: the kernel the all-reduce's own
policy (:class:`~sagellm_comm.selector.AlgoSelector`) picks for a message of that size, the same latency /
bandwidth trade-off.  The first rule whose conditions hold decides.  Capacities then apply whatever a rule says
(:meth:`FusedAllReduceRMSNorm.select <sagellm_comm.fused.FusedAllReduceRMSNorm.select>`).  No tensors here.

``bench/fp8_fused_bench.py`` measures every path per (world size, hidden, tokens, mode) and writes the rules its
figures give (its record's ``derived_rules``, the JSON shape :meth:`FusionPolicy.from_dict` reads)::

    {"rules": [
        {"id": "w8-fp8-unfused", "path": "unfused", "world_sizes": [8], "quant": ["fp8_per_token"],
         "min_tokens": 256, "reason": "..."},
        {"id": "default", "path": "all_reduce_policy"}
    ]}

Conditions: ``quant`` (modes, ``"none"`` for the unquantised op), ``world_sizes``, ``hidden`` (non-empty lists of
positive ints), ``min_tokens`` / ``max_tokens`` (non-negative ints, inclusive); ``id`` and ``reason`` are strings
(what a :class:`Selection` reports: ids are unique).  A rule no call can match (an empty list, ``min_tokens`` over
``max_tokens``) and anything else :meth:`FusionPolicy.from_dict` refuses with ``InvalidArgumentError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..arguments import check_int
from ..errors import InvalidArgumentError
from ..selector import FOLLOW_ALL_REDUCE, ONE_SHOT, RMSNORM_PATHS, Selection
from .fp8 import FP8_QUANT_MODES

QUANT_NAMES = ("none", *FP8_QUANT_MODES)  # a rule's ``quant`` condition: "none" is the unquantised op
RULE_PATHS = (*RMSNORM_PATHS, FOLLOW_ALL_REDUCE)


@dataclass(frozen=True)
class FusionRule:
    """Take ``path`` for a call of ``tokens`` rows of ``hidden`` over ``world_size`` ranks in mode ``quant`` when
    every given condition holds."""

    id: str
    path: str
    quant: tuple[str, ...] | None = None
    world_sizes: tuple[int, ...] | None = None
    hidden: tuple[int, ...] | None = None
    min_tokens: int = 0
    max_tokens: int | None = None
    reason: str = ""

    def matches(self, tokens: int, hidden: int, world_size: int, quant: str | None) -> bool:
        return (
            (self.quant is None or (quant or "none") in self.quant)
            and (self.world_sizes is None or world_size in self.world_sizes)
            and (self.hidden is None or hidden in self.hidden)
            and tokens >= self.min_tokens
            and (self.max_tokens is None or tokens <= self.max_tokens)
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "path": self.path}
        for key in ("quant", "world_sizes", "hidden"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        if self.min_tokens:
            d["min_tokens"] = self.min_tokens
        if self.max_tokens is not None:
            d["max_tokens"] = self.max_tokens
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> FusionRule:
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"fusion rule {index}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"id", "path", "quant", "world_sizes", "hidden", "min_tokens", "max_tokens", "reason"}
        if unknown:
            raise InvalidArgumentError(f"fusion rule {index}: unknown keys {sorted(unknown)}")
        lists = {}
        for key in ("quant", "world_sizes", "hidden"):
            v = d.get(key)
            if v is not None and (not isinstance(v, list) or not v):  # [] would match no call
                raise InvalidArgumentError(f"fusion rule {index}: {key} must be a non-empty list, got {v!r}")
            if v is not None and key != "quant":  # sizes, as the selector's rules take them ("8192" never matches)
                v = [check_int(n, f"fusion rule {index}: {key}[{i}]", 1) for i, n in enumerate(v)]
            lists[key] = tuple(v) if v is not None else None
        for key in ("min_tokens", "max_tokens"):
            v = d.get(key)
            if v is not None:
                check_int(v, f"fusion rule {index}: {key}", 0)  # JSON true is not a token count
        rule_id, reason = d.get("id", f"rule-{index}"), d.get("reason", "")
        if not isinstance(rule_id, str) or not rule_id:  # what every Selection of the rule reports
            raise InvalidArgumentError(f"fusion rule {index}: id must be a non-empty string, got {rule_id!r}")
        if not isinstance(reason, str):
            raise InvalidArgumentError(f"fusion rule {index}: reason must be a string, got {reason!r}")
        return cls(
            id=rule_id,
            path=d.get("path"),
            min_tokens=d.get("min_tokens") or 0,
            max_tokens=d.get("max_tokens"),
            reason=reason,
            **lists,
        )


# The unquantised fused kernel beat all-reduce + torch add + F.rms_norm at every measured shape (1-4096 tokens,
# hidden 4096/8192, 2-8 virtual ranks on one H100: 1.15-1.85x,
# bench/results/h100/fused_rmsnorm_virtual.json in git at 290c549; on one H200:
# bench/results/h200/fused_rmsnorm_virtual.json); the quantised chain adds a torch quantisation (several kernels
# and a full read and write of the activations) to the unfused side only.  So the default fuses everywhere, on
# the kernel the all-reduce policy picks for the size; the H200 record of bench/fp8_fused_bench.py gives the rules
# that turn the fusion off where it loses.
# At 8 ranks the all-reduce policy hands 129-256 KB to two-shot, whose fused form gives each rank tokens / 8 rows:
# 2 programs per rank at 16 tokens.  One H200, virtual ranks, 16 x 8192 bf16: fused two-shot 18.9 us
# (bench/results/h200/fused_rmsnorm_virtual.json, slower than the unfused chain's 18.4) against fused one-shot's
# 10.1 us (the same benchmark at f41a28a: that file in git at 290c549).
DEFAULT_FUSION_RULES: tuple[FusionRule, ...] = (
    FusionRule(
        "w8-h8192-fused-one-shot",
        ONE_SHOT,
        world_sizes=(8,),
        hidden=(8192,),
        min_tokens=9,
        max_tokens=16,
        reason="8 ranks, 9-16 tokens of 8192: fused one-shot (a row per program) 10.1 us against fused two-shot's "
        "18.9 (2 rows per rank) at 16 tokens (virtual ranks, one H200)",
    ),
    FusionRule(
        "fused-follow-all-reduce",
        FOLLOW_ALL_REDUCE,
        reason="fused on the all-reduce policy's kernel for this size: the unquantised fusion was 1.15-1.85x "
        "faster than the unfused chain at every shape measured (virtual ranks, one H100); the quantised chain "
        "only adds work to the unfused side",
    ),
)


class FusionPolicy:
    """Ordered :class:`FusionRule` s -> :class:`Selection` (``algo`` a path of :data:`RULE_PATHS`)."""

    def __init__(self, rules: Sequence[FusionRule] = DEFAULT_FUSION_RULES, source: str = "default"):
        for r in rules:
            if r.path not in RULE_PATHS:
                raise InvalidArgumentError(f"fusion rule {r.id}: path must be one of {RULE_PATHS}, got {r.path!r}")
            bad = [q for q in r.quant or () if q not in QUANT_NAMES]
            if bad:
                raise InvalidArgumentError(f"fusion rule {r.id}: quant must name modes of {QUANT_NAMES}, got {bad}")
            if r.max_tokens is not None and r.min_tokens > r.max_tokens:
                raise InvalidArgumentError(
                    f"fusion rule {r.id}: min_tokens {r.min_tokens} > max_tokens {r.max_tokens}: the rule matches "
                    "no call"
                )
            empty = [key for key in ("quant", "world_sizes", "hidden") if getattr(r, key) == ()]
            if empty:
                raise InvalidArgumentError(f"fusion rule {r.id}: {empty[0]} is empty: the rule matches no call")
        ids = [r.id for r in rules]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise InvalidArgumentError(f"fusion rules: ids {duplicated} name more than one rule; ids are unique")
        self.rules = tuple(rules)
        self.source = source

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> FusionPolicy:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
            raise InvalidArgumentError('a fusion policy is a JSON object {"rules": [...]} with at least one rule')
        return cls([FusionRule.from_dict(d, i) for i, d in enumerate(data["rules"])], source=source)

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    def select(self, tokens: int, hidden: int, world_size: int, quant: str | None) -> Selection:
        for r in self.rules:
            if r.matches(tokens, hidden, world_size, quant):
                return Selection(r.path, r.id, r.reason or f"rule {r.id} ({self.source})")
        return Selection(
            FOLLOW_ALL_REDUCE,
            "no-fusion-rule",
            f"no rule of {self.source} matches {tokens} x {hidden}, ws={world_size}, quant={quant}",
        )
