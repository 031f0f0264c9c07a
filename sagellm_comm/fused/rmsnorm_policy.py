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
``max_tokens``) and any other value of the wrong type or range is refused with ``InvalidArgumentError``, by the
one check of :class:`FusionRule`, whether the rule is built in code or read by :meth:`FusionPolicy.from_dict`; a
rule that never decides (every call it matches is matched by the rules before it) by :class:`FusionPolicy`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arguments import check_int
from ..errors import InvalidArgumentError
from ..files import read_json
from ..selector import (
    FOLLOW_ALL_REDUCE,
    FUSED_RMSNORM_RULE_IDS,
    ONE_SHOT,
    RESERVED_RULE_IDS,
    RMSNORM_PATHS,
    Conditions,
    Selection,
    check_rule_bounds,
    check_rule_id,
    checked_rule_list,
    policy_from,
    policy_rules,
    refuse_duplicate_ids,
    refuse_never_deciding,
)
from .fp8 import FP8_QUANT_MODES

QUANT_NAMES = ("none", *FP8_QUANT_MODES)  # a rule's ``quant`` condition: "none" is the unquantised op
RULE_PATHS = (*RMSNORM_PATHS, FOLLOW_ALL_REDUCE)
# A fusion rule may not take an id the fused op reports for decisions no fusion rule made: its own (capacities, no rule
# matching) and the all-reduce policy's (a rule following it reports them); nor hold "+" ("<id>+lamport-capacity").
FUSION_RESERVED_RULE_IDS = (*FUSED_RMSNORM_RULE_IDS, *RESERVED_RULE_IDS)


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

    def __post_init__(self) -> None:
        """Check every field (a rule built here or read by :meth:`from_dict`): ``InvalidArgumentError`` naming the
        field.  Lists of sizes or modes are kept as tuples, sizes as Python ints."""
        check_rule_id(self.id, "fusion rule", FUSION_RESERVED_RULE_IDS, "the fusion policy")
        where = f"fusion rule {self.id}"
        if self.path not in RULE_PATHS:
            raise InvalidArgumentError(f"{where}: path must be one of {RULE_PATHS}, got {self.path!r}")
        for key in ("quant", "world_sizes", "hidden"):
            values = getattr(self, key)
            if values is None:
                continue
            if not isinstance(values, tuple | list):  # a string is not a list of modes or sizes
                raise InvalidArgumentError(f"{where}: {key} must be a non-empty list, got {values!r}")
            if not values:
                raise InvalidArgumentError(f"{where}: {key} is empty: the rule matches no call")
            if key == "quant":
                bad = [q for q in values if q not in QUANT_NAMES]
                if bad:
                    raise InvalidArgumentError(f"{where}: quant must name modes of {QUANT_NAMES}, got {bad}")
            else:  # sizes, as the selector's rules take them ("8192" never matches)
                values = [check_int(n, f"{where}: {key}[{i}]", 1) for i, n in enumerate(values)]
            object.__setattr__(self, key, tuple(values))
        check_rule_bounds(self, "min_tokens", "max_tokens", where)
        if not isinstance(self.reason, str):
            raise InvalidArgumentError(f"{where}: reason must be a string, got {self.reason!r}")

    def matches(self, tokens: int, hidden: int, world_size: int, quant: str | None) -> bool:
        return (
            (self.quant is None or (quant or "none") in self.quant)
            and (self.world_sizes is None or world_size in self.world_sizes)
            and (self.hidden is None or hidden in self.hidden)
            and tokens >= self.min_tokens
            and (self.max_tokens is None or tokens <= self.max_tokens)
        )

    def conditions(self) -> Conditions:
        """What the rule matches, for the checks the policies share (:func:`~sagellm_comm.selector.never_deciding`)."""
        values = {"quant": self.quant, "world_sizes": self.world_sizes, "hidden": self.hidden}
        return Conditions(values, self.min_tokens, self.max_tokens)

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
        """Rule ``index`` of a policy's JSON ``rules``: the keys of :meth:`to_dict` (``id`` defaults to
        ``rule-<index>``), checked as the constructor checks them."""
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"fusion rule {index}: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"id", "path", "quant", "world_sizes", "hidden", "min_tokens", "max_tokens", "reason"}
        if unknown:
            raise InvalidArgumentError(f"fusion rule {index}: unknown keys {sorted(unknown)}")
        for key in ("quant", "world_sizes", "hidden"):  # JSON has lists, not tuples: a string is not a list
            if d.get(key) is not None and not isinstance(d[key], list):
                raise InvalidArgumentError(f"fusion rule {index}: {key} must be a non-empty list, got {d[key]!r}")
        rule_id = check_rule_id(d.get("id", f"rule-{index}"), f"fusion rule {index}", FUSION_RESERVED_RULE_IDS,
                                "the fusion policy")  # fmt: skip
        return cls(
            id=rule_id,
            path=d.get("path"),
            quant=d.get("quant"),
            world_sizes=d.get("world_sizes"),
            hidden=d.get("hidden"),
            min_tokens=0 if d.get("min_tokens") is None else d["min_tokens"],
            max_tokens=d.get("max_tokens"),
            reason=d.get("reason", ""),
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

    def __init__(self, rules: Sequence[FusionRule] = DEFAULT_FUSION_RULES, source: str | None = None):
        rules = tuple(checked_rule_list(rules, FusionRule, "fusion rules"))  # each checked its fields when made
        if source is None:  # what a Selection and a mismatch between ranks name
            source = "default" if rules == tuple(DEFAULT_FUSION_RULES) else "rules given in code"
        refuse_duplicate_ids([r.id for r in rules], "fusion rules")
        refuse_never_deciding(
            [(r.id, r.path, r.conditions()) for r in rules], "fusion rule", "call", {"quant": QUANT_NAMES}
        )
        self.rules = rules
        self.source = source

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> FusionPolicy:
        return cls(
            [FusionRule.from_dict(d, i) for i, d in enumerate(policy_rules(data, "a fusion policy"))], source=source
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FusionPolicy:
        """The policy of a JSON file: a policy ``{"rules": [...]}`` (:meth:`from_dict`), or a record of
        ``bench/fp8_fused_bench.py``, whose ``derived_rules`` are the rules the device's measurements give.
        :attr:`source` says which was read (``"<path>"`` or ``"derived_rules of <path>"``).  A file that is
        missing, unreadable, not JSON or neither of the two raises ``InvalidArgumentError``."""
        path = Path(path)
        data = read_json(path, "fusion policy")
        if isinstance(data, dict) and "rules" not in data and "derived_rules" in data:
            return cls.from_dict(data["derived_rules"], source=f"derived_rules of {path}")
        if isinstance(data, dict) and "rules" not in data and "meta" in data:  # a record without the rules
            raise InvalidArgumentError(
                f"fusion policy {path} is a benchmark record without derived_rules (bench/fp8_fused_bench.py derives "
                "them from its virtual-rank rows: run it without --no-virtual)"
            )
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    def digest(self) -> str:
        """A short hash of the rules (not of :attr:`source`): equal on two ranks when they decide alike."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def select(self, tokens: int, hidden: int, world_size: int, quant: str | None) -> Selection:
        for r in self.rules:
            if r.matches(tokens, hidden, world_size, quant):
                return Selection(r.path, r.id, r.reason or f"rule {r.id} ({self.source})")
        return Selection(
            FOLLOW_ALL_REDUCE,
            "no-fusion-rule",
            f"no rule of {self.source} matches {tokens} x {hidden}, ws={world_size}, quant={quant}",
        )


def fusion_policy_from(value: FusionPolicy | str | os.PathLike | None) -> FusionPolicy:
    """A ``fusion_policy=`` argument (the custom backend's, :class:`~sagellm_comm.fused.VirtualFused`'s) as a
    :class:`FusionPolicy`: itself, :meth:`FusionPolicy.from_file` of a path, or the default rules for None."""
    return policy_from(
        value,
        FusionPolicy,
        "fusion_policy must be a FusionPolicy, a policy file, a bench/fp8_fused_bench.py record or None",
    )
