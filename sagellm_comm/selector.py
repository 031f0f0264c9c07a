"""Algorithm policy for all-reduce: which algorithm for which message size and world size, and why.

A policy is an ordered list of rules; the first rule whose conditions hold decides.  Every decision
carries the rule's id and a human-readable reason (the benchmark prints both).  The default rules come
from measurements recorded in ``bench/results/`` (see docs/custom_all_reduce.md); a JSON file with the same
shape overrides them::

    {"rules": [
        {"id": "small-one-shot", "algo": "one_shot", "max_bytes": 262144,
         "reason": "latency-bound: one barrier"},
        {"id": "ws2", "algo": "one_shot", "world_sizes": [2], "max_bytes": 4194304},
        {"id": "rest", "algo": "two_shot"}
    ]}

Conditions: ``min_bytes`` (inclusive), ``max_bytes`` (inclusive), ``world_sizes`` (non-empty list); a rule that
can match no message (``min_bytes`` over ``max_bytes``) is refused, as is a rule that never decides because every
message it matches is matched by the rules before it (a policy contradicting itself), and so are a key the policy
or a rule does not have (a misspelt one would be ignored) and two rules of one ``id`` (the id and
the ``reason``, strings, are what a :class:`Selection` reports; an id may not hold ``+`` nor be one of
:data:`RESERVED_RULE_IDS` or :data:`FUSED_RMSNORM_RULE_IDS`, which name decisions no rule made).  A message no rule
matches runs on the engine (rule ``no-rule``): a policy need not cover every size.  Algorithms:
``one_shot``, ``two_shot``, ``lamport`` (barrier-free one-shot; larger messages than its buffers take run
one-shot), and ``nccl``, the policy's name for *the engine* the backend runs beside the kernels (NCCL on
CUDA, Gloo on the CPU under the interpreter).  Messages larger than the workspace always go to the engine
(rule ``over-workspace``), whatever the policy says.  The selector does not know which engine that is: a
backend records what ran with :meth:`Selection.ran_on` (``"gloo"`` rather than ``"nccl"`` on the CPU).
The selector never touches tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .arguments import check_int
from .errors import InvalidArgumentError
from .files import read_json

# The one list of algorithm names: everything else imports these.
ENGINE_ALGO = "nccl"  # the policy's name for "the engine runs it" (see the module doc)
ONE_SHOT = "one_shot"  # every rank reads every peer's whole message: one barrier
TWO_SHOT = "two_shot"  # reduce-scatter then all-gather: two barriers, 2 (W - 1) / W of the traffic
LAMPORT = "lamport"  # barrier-free one-shot over data-as-flag buffers (small messages)
KERNEL_ALGOS = (ONE_SHOT, TWO_SHOT, LAMPORT)  # the custom all-reduce kernels
ALGOS = (*KERNEL_ALGOS, ENGINE_ALGO)  # what a policy rule may name
HIERARCHICAL_ALGO = "hierarchical"  # the custom backend's all-reduce of a group spanning nodes (no policy rule)
AUTO = "auto"  # the policy decides
ALGO_CHOICES = (AUTO, *KERNEL_ALGOS, HIERARCHICAL_ALGO, ENGINE_ALGO)  # what an all-reduce call's ``algo=`` may be
COLLECTIVE_KERNEL_ALGO = "kernel"  # the label of the custom all-gather / reduce-scatter kernel when it ran
NCCL_RING = "ring"
NCCL_TREE = "tree"
NCCL_ALGO_NAMES = (NCCL_RING, NCCL_TREE)  # NCCL's own algorithms (NCCL_ALGO), selectable in the benchmark only
# Paths of the GEMM + all-reduce (sagellm_comm.fused): one fused kernel pair, a chunked pipeline, the copy engines,
# or the matmul then the all-reduce.
FUSED_PATH = "fused"
CHUNKED_PATH = "chunked"
COPY_ENGINE_PATH = "copy_engine"
SEQUENTIAL_PATH = "sequential"
GEMM_PATHS = (FUSED_PATH, CHUNKED_PATH, COPY_ENGINE_PATH, SEQUENTIAL_PATH)
# The all-reduce + residual + RMSNorm (+ FP8) of sagellm_comm.fused: one of its kernels, or the fusion off.
UNFUSED_PATH = "unfused"  # the all-reduce, then torch add + RMSNorm (+ quantisation)
RMSNORM_PATHS = (*KERNEL_ALGOS, UNFUSED_PATH)
FOLLOW_ALL_REDUCE = "all_reduce_policy"  # a fusion rule's "the kernel the all-reduce policy picks for this size"
PAYLOADS = ("fp8",)  # the all-reduce's opt-in low-precision payloads (two-shot only)
# Rule ids a Selection reports for decisions no policy rule made (the workspace too small, no rule matching, a
# forced algorithm, no kernels, a message past the kernels' int32 element offsets, ...); a policy rule may not
# take one, nor hold "+" (a rule's id suffixed "+lamport-capacity" says its Lamport choice ran one-shot).
RESERVED_RULE_IDS = (
    "over-workspace", "no-rule", "user", "engine", "custom-unavailable", "hierarchical-span-nodes",
    "over-int32-index",
)  # fmt: skip
# Rule ids the fused all-reduce + RMSNorm (sagellm_comm.fused) reports for its own decisions (its capacities, no fusion
# rule matching).  A fusion rule following this policy reports this policy's rule ids, so neither policy's rules may
# take one.
FUSED_RMSNORM_RULE_IDS = ("no-fusion-rule", "fused-max-hidden", "fused-over-int32-index", "fused-two-shot-capacity")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Selection:
    """The outcome of a policy decision: the algorithm, the id of the rule that chose it, and why."""

    algo: str
    rule_id: str
    reason: str

    def ran_on(self, engine_kind: str) -> Selection:
        """This selection labelled with what runs it: a kernel algorithm stays; the engine path
        (:data:`ENGINE_ALGO`) becomes ``engine_kind`` (``"gloo"``, ``"nccl"``, ``"rccl"``...)."""
        if self.algo in KERNEL_ALGOS or self.algo == engine_kind:
            return self
        return replace(self, algo=engine_kind)


@dataclass(frozen=True)
class Rule:
    id: str
    algo: str
    min_bytes: int = 0
    max_bytes: int | None = None
    world_sizes: tuple[int, ...] | None = None
    reason: str = ""

    def matches(self, nbytes: int, world_size: int) -> bool:
        if nbytes < self.min_bytes:
            return False
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        return self.world_sizes is None or world_size in self.world_sizes

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> Rule:
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"selector rule {index}: a rule is a JSON object, got {d!r}")
        unknown = set(d) - {"id", "algo", "min_bytes", "max_bytes", "world_sizes", "reason"}
        if unknown:
            raise InvalidArgumentError(f"selector rule {index}: unknown keys {sorted(unknown)}")
        algo = d.get("algo")
        if algo not in ALGOS:
            raise InvalidArgumentError(f"selector rule {index}: algo must be one of {ALGOS}, got {algo!r}")
        ws = d.get("world_sizes")
        if ws is not None and (not isinstance(ws, list) or not ws or not all(_is_int(w) and w > 0 for w in ws)):
            raise InvalidArgumentError(
                f"selector rule {index}: world_sizes must be a list of positive ints (at least one)"
            )
        for key in ("min_bytes", "max_bytes"):
            v = d.get(key)
            if v is not None and (not _is_int(v) or v < 0):  # JSON true is not a byte count
                raise InvalidArgumentError(f"selector rule {index}: {key} must be a non-negative int")
        min_bytes, max_bytes = d.get("min_bytes") or 0, d.get("max_bytes")
        if max_bytes is not None and min_bytes > max_bytes:  # a rule no message matches
            raise InvalidArgumentError(
                f"selector rule {index}: min_bytes {min_bytes} > max_bytes {max_bytes}: the rule matches no message"
            )
        rule_id, reason = d.get("id", f"rule-{index}"), d.get("reason", "")
        check_rule_id(rule_id, f"selector rule {index}", (*RESERVED_RULE_IDS, *FUSED_RMSNORM_RULE_IDS),
                      "the selector and the fused ops following it")  # fmt: skip
        if not isinstance(reason, str):
            raise InvalidArgumentError(f"selector rule {index}: reason must be a string, got {reason!r}")
        return cls(
            id=rule_id,
            algo=algo,
            min_bytes=min_bytes,
            max_bytes=max_bytes,
            world_sizes=tuple(ws) if ws is not None else None,
            reason=reason,
        )


# Measured on H100, bf16, CUDA-graph replay.  Virtual ranks, one H100 (all ranks in one launch), for 2, 4 and 8
# ranks: bench/results/h100/custom_all_reduce_virtual.json (measured at c852ddd, in git at 290c549), which gives
# every boundary below and the figures in the reasons (the boundaries were first drawn from the virtual-rank
# record at dd41bf9, in git at 55a2a51, which has the same best kernel at every size).  Two real H100s over NVLink:
# bench/results/2xh100/all_reduce_graph.json at dd41bf9, which agrees on every 2-rank boundary.  The barrier-free
# Lamport kernel wins up to 256 KB at 2-4 ranks and 64 KB at 8; one-shot's single barrier then wins up to
# 4 MB at 2 ranks, 1 MB at 4 and 128 KB at 8; two-shot's 2(W-1)/W traffic wins everything larger.  At 8 ranks
# the boundary comes from one H200 (bench/results/h200/all_reduce_vr8_graph.csv): two-shot, staging and
# gathering tile t of every chunk in one access, overtakes one-shot from 256 KB.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("ws2-lamport", "lamport", max_bytes=256 << 10, world_sizes=(2,),
         reason="2 ranks, <=256 KB: no barrier at all (data is the flag); 1.9-4.4 us vs one-shot's 4.5-5.3 "
                "(virtual ranks, one H100)"),
    Rule("ws34-lamport", "lamport", max_bytes=256 << 10, world_sizes=(3, 4),
         reason="3-4 ranks, <=256 KB: no barrier; 2.2-5.8 us at 4 ranks vs one-shot's 4.7-6.7 "
                "(virtual ranks, one H100)"),
    Rule("lamport", "lamport", max_bytes=64 << 10,
         reason="<=64 KB, latency-bound: no barrier; 2.4-6.1 us at 8 ranks vs one-shot's 5.5-6.3 "
                "(virtual ranks, one H100)"),
    Rule("ws2-one-shot", "one_shot", max_bytes=4 << 20, world_sizes=(2,),
         reason="2 ranks, <=4 MB: one barrier; two-shot's second barrier costs more than the traffic it saves "
                "(2 x H100 and virtual ranks)"),
    Rule("ws34-one-shot", "one_shot", max_bytes=1 << 20, world_sizes=(3, 4),
         reason="3-4 ranks, <=1 MB: one barrier; 8.4-10.7 us at 4 ranks vs two-shot's 8.9-11.2 "
                "(virtual ranks, one H100)"),
    Rule("small-one-shot", "one_shot", max_bytes=128 << 10,
         reason="<=128 KB: one barrier; 6.2-7.3 us at 8 ranks vs two-shot's 8.0-8.1; from 256 KB two-shot "
                "is faster (8.3 vs 9.7 us) (virtual ranks, one H200)"),
    Rule("large-two-shot", "two_shot",
         reason="bandwidth-bound size: two-shot moves 2(W-1)/W of the message instead of (W-1)"),
)  # fmt: skip


class AlgoSelector:
    """Ordered rules -> :class:`Selection`.  ``select`` is pure and cheap (called per all-reduce)."""

    def __init__(self, rules: tuple[Rule, ...] | list[Rule] = DEFAULT_RULES, source: str | None = None):
        """``rules`` (:class:`Rule` objects) pass the checks of a policy file (module docstring): typed errors
        naming the rule, before any decision."""
        self.rules = _checked_rules(rules)
        if source is None:  # what a Selection and a mismatch between ranks name
            source = "default" if self.rules == tuple(DEFAULT_RULES) else "rules given in code"
        self.source = source
        self._cache: dict[tuple[int, int, int | None], Selection] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> AlgoSelector:
        rules = [Rule.from_dict(d, i) for i, d in enumerate(policy_rules(data, "a selector policy"))]
        return cls(rules, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> AlgoSelector:
        path = Path(path)
        data = read_json(path, "selector config")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The policy as JSON-ready data (``from_dict(to_dict())`` gives the same rules)."""
        rules = []
        for r in self.rules:
            d: dict[str, Any] = {"id": r.id, "algo": r.algo}
            if r.min_bytes:
                d["min_bytes"] = r.min_bytes
            if r.max_bytes is not None:
                d["max_bytes"] = r.max_bytes
            if r.world_sizes is not None:
                d["world_sizes"] = list(r.world_sizes)
            if r.reason:
                d["reason"] = r.reason
            rules.append(d)
        return {"rules": rules}

    def digest(self) -> str:
        """A short hash of the rules (not of :attr:`source`): equal on two ranks when they decide alike."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def select(self, nbytes: int, world_size: int, capacity_bytes: int | None = None) -> Selection:
        """Pick the algorithm for an all-reduce of ``nbytes`` over ``world_size`` ranks."""
        key = (nbytes, world_size, capacity_bytes)  # None (no capacity) is not 0 (a workspace that takes nothing)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if capacity_bytes is not None and nbytes > capacity_bytes:
            sel = Selection(
                ENGINE_ALGO,
                "over-workspace",
                f"{nbytes} bytes exceed the {capacity_bytes}-byte workspace; the engine runs it",
            )
        else:
            sel = None
            for rule in self.rules:
                if rule.matches(nbytes, world_size):
                    sel = Selection(rule.algo, rule.id, rule.reason or f"rule {rule.id} ({self.source})")
                    break
            if sel is None:
                why = f"no rule of {self.source} matches {nbytes} bytes, ws={world_size}; the engine runs it"
                sel = Selection(ENGINE_ALGO, "no-rule", why)
        if len(self._cache) < 4096:
            self._cache[key] = sel
        return sel


def check_rule_id(rule_id: Any, where: str, reserved: Sequence[str], decider: str) -> str:
    """``rule_id`` if it is a non-empty string, not one of ``reserved`` (the ids ``decider`` reports for decisions
    no rule made) and without ``+`` (a rule's id suffixed ``+<why>`` says a capacity changed its choice); else
    ``InvalidArgumentError`` starting with ``where``: a Selection's rule id must say which rule, or which check,
    decided."""
    if not isinstance(rule_id, str) or not rule_id:
        raise InvalidArgumentError(f"{where}: id must be a non-empty string, got {rule_id!r}")
    if rule_id in reserved or "+" in rule_id:
        raise InvalidArgumentError(
            f"{where}: id {rule_id!r} is reserved for {decider}'s own decisions ({', '.join(reserved)}; no '+')"
        )
    return rule_id


def check_rule_bounds(rule: Any, low: str, high: str, where: str) -> None:
    """A frozen rule's range ``rule.<low>`` .. ``rule.<high>`` (inclusive; ``high`` None: no upper bound): each a
    non-negative int, stored back as a Python int, the low one not above the high one; else
    ``InvalidArgumentError`` starting with ``where`` and naming the field (a rule no call matches included)."""
    lo = check_int(getattr(rule, low), f"{where}: {low}", 0)
    object.__setattr__(rule, low, lo)
    hi = getattr(rule, high)
    if hi is not None:  # JSON true is not a bound: check_int refuses it
        hi = check_int(hi, f"{where}: {high}", 0)
        object.__setattr__(rule, high, hi)
        if lo > hi:
            raise InvalidArgumentError(f"{where}: {low} {lo} > {high} {hi}: the rule matches no call")


def checked_rule_list(given: Any, kind: type, what: str) -> list[Any]:
    """``given`` (a list or tuple of rules) as a list, every item a ``kind``; else ``InvalidArgumentError`` naming
    ``what`` (the policy's rules) and the first item that is not one."""
    if not isinstance(given, list | tuple):
        raise InvalidArgumentError(f"{what} must be a list of {kind.__name__}, got {given!r}")
    for index, rule in enumerate(given):
        if not isinstance(rule, kind):
            raise InvalidArgumentError(
                f"{what}: rule {index} must be a {kind.__name__}, got {type(rule).__name__} {rule!r}"
            )
    return list(given)


def _checked_rules(given: Any) -> tuple[Rule, ...]:
    """``given`` as a tuple of rules that pass every check of a policy file (each rule's fields as
    :meth:`Rule.from_dict` checks them, unique ids, no rule that never decides); typed errors name the rule."""
    checked = []
    for index, rule in enumerate(checked_rule_list(given, Rule, "selector rules")):
        fields = {"id": rule.id, "algo": rule.algo, "min_bytes": rule.min_bytes, "max_bytes": rule.max_bytes,
                  "reason": rule.reason}  # fmt: skip
        if rule.world_sizes is not None:  # a tuple in code, a list in a policy file
            fields["world_sizes"] = list(rule.world_sizes) if isinstance(rule.world_sizes, tuple) else rule.world_sizes
        checked.append(Rule.from_dict(fields, index))
    for index, rule in enumerate(checked):  # a Selection names its rule by id
        first = next(i for i, r in enumerate(checked) if r.id == rule.id)
        if first != index:
            raise InvalidArgumentError(f"selector rule {index}: id {rule.id!r} is also rule {first}'s; ids are unique")
    refuse_never_deciding(
        [(r.id, r.algo, Conditions({"world_sizes": r.world_sizes}, r.min_bytes, r.max_bytes)) for r in checked],
        "selector rule", "message",
    )  # fmt: skip
    return tuple(checked)


def refuse_duplicate_ids(ids: Sequence[str], what: str) -> None:
    """``InvalidArgumentError`` naming the ids of ``ids`` (of ``what``, the policy's rules) given to more than one
    rule: a Selection names its rule by id."""
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise InvalidArgumentError(f"{what}: ids {duplicated} name more than one rule; ids are unique")


def refuse_never_deciding(
    rules: Sequence[tuple[str, str, Conditions]], what: str, calls: str, domains: dict[str, Sequence[Any]] | None = None
) -> None:
    """``InvalidArgumentError`` for the first of the ordered ``rules`` (``(id, choice, conditions)``) that never
    decides (:func:`never_deciding`), naming it (``what`` and its index) and the rules before it that match its
    ``calls`` (``"message"``, ``"call"``)."""
    found = never_deciding([conditions for _, _, conditions in rules], domains)
    if found is None:
        return
    index, shadowing = found
    rule_id, choice, _ = rules[index]
    by = [rules[i][0] for i in shadowing]
    raise InvalidArgumentError(
        f"{what} {index} ({rule_id!r}, {choice}) never decides: every {calls} it matches is matched first by rule(s) "
        f"{', '.join(map(repr, by))} (the first matching rule decides); remove it, or move it before them",
        details={"rule": rule_id, "shadowed_by": by},
    )


@dataclass(frozen=True)
class Conditions:
    """What one rule of an ordered policy matches, as the checks every policy here shares see it (the all-reduce's
    rules, the fusion and GEMM paths' rules): per named condition the values it takes (``values``, None: any);
    per named lower bound the least value it takes (``floors``, matching every value from there); and one inclusive
    range of a size (bytes, tokens, rows: ``low`` .. ``high``, None: no upper bound)."""

    values: dict[str, Sequence[Any] | None]
    low: int = 0
    high: int | None = None
    floors: dict[str, int] = field(default_factory=dict)

    def overlaps(self, other: Conditions) -> bool:
        """Whether some call matches both."""
        for name, mine in self.values.items():
            theirs = other.values.get(name)
            if mine is not None and theirs is not None and not set(mine) & set(theirs):
                return False
        top = min((m for m in (self.high, other.high) if m is not None), default=None)
        return top is None or max(self.low, other.low) <= top


_ANY_OTHER = object()  # stands for every value of a condition that no rule names


def never_deciding(
    rules: Sequence[Conditions], domains: dict[str, Sequence[Any]] | None = None
) -> tuple[int, list[int]] | None:
    """``(index, earlier)`` of the first rule of the ordered ``rules`` that never decides (every call it matches is
    matched by a rule before it: the first matching rule decides), ``earlier`` the indices of the rules before it
    that match some of its calls; None when every rule decides some call.

    Checked per combination of its conditions' values: each one it names; for a condition it leaves open, each
    value of the condition's ``domains`` entry if given (a finite set: every mode), else each one an earlier rule
    names plus one no rule names, which stands for all the others; for a lower bound, its own (the fewest rules
    before it match there)."""
    domains = domains or {}
    for index, rule in enumerate(rules):
        earlier = rules[:index]
        axes = []
        for name, values in rule.values.items():
            if values is None:
                named = {v for r in earlier if r.values.get(name) is not None for v in r.values[name]}
                values = domains.get(name, [*named, _ANY_OTHER])
            axes.append([(name, v) for v in values])
        every = all(
            _covers(
                [
                    (r.low, r.high)
                    for r in earlier
                    if all(r.values.get(name) is None or v in r.values[name] for name, v in point)
                    and all(r.floors.get(name, 0) <= floor for name, floor in rule.floors.items())
                ],
                rule.low,
                rule.high,
            )
            for point in itertools.product(*axes)
        )
        if every:
            return index, [i for i, r in enumerate(earlier) if r.overlaps(rule)]
    return None


def _covers(ranges: Sequence[tuple[int, int | None]], low: int, high: int | None) -> bool:
    """Whether the inclusive ``ranges`` together hold every size in ``[low, high]`` (``high`` None: unbounded)."""
    point = low  # the smallest size not yet known to be held
    for start, stop in sorted(ranges, key=lambda r: r[0]):
        if start > point:  # sorted: no later range holds ``point`` either
            return False
        if stop is None:
            return True
        point = max(point, stop + 1)
        if high is not None and point > high:
            return True
    return False


def policy_rules(data: Any, what: str) -> list:
    """The rule list of a policy's JSON data ``{"rules": [...]}``: ``InvalidArgumentError`` (``what`` names the
    policy) for anything else, an empty list, or another top-level key (a misspelt one would be ignored)."""
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise InvalidArgumentError(f'{what} is a JSON object {{"rules": [...]}} with at least one rule')
    unknown = sorted(str(k) for k in data if k != "rules")
    if unknown:
        raise InvalidArgumentError(f'{what}: unknown keys {unknown} (the only key is "rules")')
    return data["rules"]


def policy_from(value: Any, kind: type, refusal: str) -> Any:
    """A ``selector=`` / ``fusion_policy=`` argument as a policy of ``kind`` (:class:`AlgoSelector`,
    :class:`~sagellm_comm.fused.FusionPolicy`): itself, one read from a file (``kind.from_file``), or the default
    rules for None; anything else ``InvalidArgumentError`` (``refusal``, the value appended)."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, str | os.PathLike):
        return kind.from_file(value)
    raise InvalidArgumentError(f"{refusal}, got {value!r}")
