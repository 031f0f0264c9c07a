"""The Inductor post-grad pass that puts the fused all-reduce + residual + RMSNorm (+ FP8) op in place of the chain.

:class:`AllReduceFusionPass` is a ``torch._inductor.custom_graph_pass.CustomGraphPass``: Inductor calls it on
every post-grad graph (aten ops, functionalised, after its own pattern passes) and keys its FX-graph cache on
:meth:`~AllReduceFusionPass.uuid`.  A call:

1. finds the graph's SUM all-reduces (``torch.ops.sagellm_comm.all_reduce``, ``op`` in any case as the op reads
   it; a spelled-out SUM is dropped for the op's default, the patterns' form) and, for each (group name, fp32 or
   16-bit dtype, device type) not seen before, registers the patterns of :mod:`.patterns` for it (traced once
   per process, on fake tensors, with ``eps`` a free scalar); an add of an all-reduce result and another
   tensor gets the other tensor first (``residual + all_reduced``, the patterns' order: exact, addition
   commutes);
2. runs Inductor's pattern matcher (``torch._inductor.pattern_matcher.PatternMatcherPass``): each match is
   re-traced at its real shapes and dtypes (where an op of this package refuses that trace, it is no match:
   :func:`_refusals_as_trace_failures`), checked (:func:`_fusable`), and replaced by
   ``torch.ops.sagellm_comm.all_reduce_residual_rmsnorm`` with the group name, ``eps`` and the quantisation mode
   read from the graph;
3. restores a topological order (the fused node is inserted at the residual add, and may use a weight or
   scale defined later in the graph) and records what it replaced (:func:`stats`).

A chain is left alone when one of its ops has a keyword argument the pattern does not have (``alpha`` of an
add, ``dtype`` of a mean: Inductor's matcher does not look at them), when an intermediate value of it has a use
outside the chain (the all-reduce result, the fp32 upcast, the un-quantised RMSNorm output of a quantised
chain: the fused op does not return them), when its tensors differ in dtype, shape or device (a broadcast
residual, an fp32 weight on bf16 activations), when its RMSNorm rounds to a 16-bit dtype before the weight
multiply (``LlamaRMSNorm``) and Inductor keeps that rounding (``torch._inductor.config.emulate_precision_casts``:
the fused op rounds once, as Inductor computes the chain without that setting), when an output of the chain is
not shaped like ``x`` (a static FP8 scale of more dimensions than ``x`` broadcasts the quantised output to them:
the RMSNorm alone is fused),
when the hidden size is 0 (the fused op refuses it) or over the fused kernels' limit
(``sagellm_comm.fused.MAX_HIDDEN``), when ``eps`` is not a
constant of the graph (``torch.compile(dynamic=True)`` turns Python floats into graph inputs; compile with the
default ``dynamic=None``, or mark dimensions dynamic with ``torch._dynamo.mark_dynamic``) or one the fused op
refuses (negative, infinite), when its weight or static scale is computed from the chain's own output (the fused
op would feed itself), when the static FP8 division is not an fp32 division (or has no value to tell, a node an
earlier pass made), or when the re-match at the real
shapes found other nodes than the first match (:func:`_same_chain`: two chains read one ``new_residual`` and the
first differs from a pattern only in a number, a list or a dtype).  What is left is counted in
:attr:`FusionStats.all_reduces_left`.
Where :mod:`sagellm_comm.fused` cannot be imported (no Triton), the pass rewrites nothing.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._inductor import pattern_matcher as pm
from torch._inductor.custom_graph_pass import CustomGraphPass

from sagellm_comm.backend import ReduceOp
from sagellm_comm.errors import CommError, InvalidArgumentError

from . import patterns as _patterns

__all__ = ["AllReduceFusionPass", "FusionStats", "fp8_quantisation", "reset_stats", "stats"]

_ALL_REDUCE = torch.ops.sagellm_comm.all_reduce.default
# The dtypes the fused op takes; bf16 and fp16 chains trace alike (dtypes are checked per match).
_PATTERN_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.bfloat16}
# A pattern's eps while it is traced: exactly representable in fp32 (torch.rms_norm rounds eps to fp32 on
# some paths), so the traced constant is found again and becomes the free scalar ``eps``.
_EPS_PLACEHOLDER = 2.0**-17
_EXAMPLE_TOKENS, _EXAMPLE_HIDDEN = 4, 256  # hidden: a multiple of the FP8 group of 128


@functools.cache
def _fused_limits() -> tuple[int, tuple[torch.dtype, ...]] | None:
    """``(MAX_HIDDEN, RMSNORM_DTYPES)`` of :mod:`sagellm_comm.fused`, or None where it cannot be imported."""
    try:
        from sagellm_comm.fused import MAX_HIDDEN, RMSNORM_DTYPES
    except ImportError:
        return None
    return MAX_HIDDEN, tuple(RMSNORM_DTYPES)


def fp8_quantisation() -> tuple[float | None, tuple[str, ...]]:
    """``(FP8_MAX, FP8_QUANT_MODES)`` of :mod:`sagellm_comm.fused`, or ``(None, ())`` where it has no FP8
    quantisation (then only unquantised chains are fused)."""
    try:
        from sagellm_comm.fused import FP8_MAX, FP8_QUANT_MODES
    except ImportError:
        return None, ()
    return float(FP8_MAX), tuple(FP8_QUANT_MODES)


# ============================================================================ stats


@dataclass(frozen=True)
class FusionStats:
    """What the pass did in this process since the last :func:`reset_stats`.

    ``replaced``: pattern name -> chains rewritten (only names that were); ``graphs``: graphs the pass ran on;
    ``all_reduces_left``: SUM all-reduces of those graphs it left as they were; ``cache_hits``: graphs compiled
    with the pass that Inductor loaded from its FX-graph cache instead of compiling (rewritten when first
    compiled, not counted again); cache hits of compilations without the pass are not counted."""

    replaced: dict[str, int] = field(default_factory=dict)
    graphs: int = 0
    all_reduces_left: int = 0
    cache_hits: int = 0

    @property
    def total(self) -> int:
        """Chains rewritten, all patterns together."""
        return sum(self.replaced.values())


_STATS_LOCK = threading.Lock()
_REPLACED: collections.Counter[str] = collections.Counter()
_GRAPHS = 0
_LEFT = 0
_CACHE_HITS = 0
# The process's FX-graph cache (hits, lookups) when Inductor last computed the cache key of a graph compiled with
# the pass (it calls the pass's uuid() to do so), until that graph's lookup is known to have hit or not.
_KEYED_AT: tuple[int, int] | None = None


def _fx_cache_counts() -> tuple[int, int]:
    """Inductor's FX-graph cache counters of this process: ``(hits, hits + misses)``."""
    from torch._dynamo.utils import counters

    hits = int(counters["inductor"]["fxgraph_cache_hit"])
    return hits, hits + int(counters["inductor"]["fxgraph_cache_miss"])


def _key_computed() -> None:
    """Inductor is keying a graph compiled with the pass (under ``_STATS_LOCK``)."""
    global _KEYED_AT
    _settle_key()
    _KEYED_AT = _fx_cache_counts()


def _settle_key() -> None:
    """Count the graph keyed last if its lookup hit (under ``_STATS_LOCK``).

    After its key, Inductor looks the graph up once (an AOTAutograd cache hit loads it through the same lookup);
    on a miss it compiles the graph at once, running the pass (:func:`_compiled`, which forgets the key) before
    any other graph is looked up.  So while the key is pending, a hit since it is that graph's, and a lookup
    without a hit is its miss."""
    global _CACHE_HITS, _KEYED_AT
    if _KEYED_AT is None:
        return
    hits, lookups = _fx_cache_counts()
    if hits < _KEYED_AT[0] or lookups < _KEYED_AT[1]:
        _KEYED_AT = None  # the counters were cleared: that lookup cannot be told
    elif hits > _KEYED_AT[0]:
        _CACHE_HITS += 1
        _KEYED_AT = None
    elif lookups > _KEYED_AT[1]:
        _KEYED_AT = None


def _compiled() -> None:
    """The pass runs on a graph (under ``_STATS_LOCK``): the graph keyed last, if any, was not a cache hit."""
    global _KEYED_AT
    _KEYED_AT = None


def stats() -> FusionStats:
    """The rewrites of every :class:`AllReduceFusionPass` of this process since :func:`reset_stats`."""
    with _STATS_LOCK:
        _settle_key()
        return FusionStats(dict(_REPLACED), _GRAPHS, _LEFT, _CACHE_HITS)


def reset_stats() -> None:
    """Zero :func:`stats`."""
    global _GRAPHS, _LEFT, _CACHE_HITS
    with _STATS_LOCK:
        _settle_key()
        _REPLACED.clear()
        _GRAPHS = _LEFT = _CACHE_HITS = 0


# ============================================================================ matching


def _reduce_op(node: torch.fx.Node) -> str:
    """The reduction of an all-reduce node, as the op reads its ``op`` argument (``"SUM"`` and ``"sum"`` alike)."""
    op = node.args[2] if len(node.args) > 2 else node.kwargs.get("op", ReduceOp.SUM.value)
    try:
        return ReduceOp.parse(op).value
    except InvalidArgumentError:  # the op refuses it when it runs
        return str(op)


def _group_name(node: torch.fx.Node) -> str:
    return str(node.args[1] if len(node.args) > 1 else node.kwargs["group_name"])


def _sum_all_reduces(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    nodes = graph.find_nodes(op="call_function", target=_ALL_REDUCE)
    return [n for n in nodes if _reduce_op(n) == ReduceOp.SUM.value]


def _default_sum(sites: list[torch.fx.Node]) -> None:
    """``all_reduce(x, group, "SUM")`` -> ``all_reduce(x, group)``: the patterns' form (the op's default is SUM)."""
    for node in sites:
        node.args = node.args[:2]
        node.kwargs = {key: value for key, value in node.kwargs.items() if key != "op"}


def _residual_first(sites: list[torch.fx.Node]) -> None:
    """``add(all_reduced, other)`` -> ``add(other, all_reduced)`` where ``other`` is a tensor (no ``alpha``: that
    add does not commute; a number stays second, as ``aten.add.Tensor`` takes it)."""
    for node in sites:
        for user in list(node.users):
            if user.target is torch.ops.aten.add.Tensor and not user.kwargs and len(user.args) == 2:
                first, second = user.args
                if first is node and isinstance(second, torch.fx.Node) and second is not node:
                    user.args = (second, first)


def _value(arg):
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _same_size(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def _eps_of(match: pm.Match):
    """The ``eps`` of a matched chain read from its graph: the scalar added to the mean of squares.  (Where
    Inductor re-matches at the real shapes with ``eps`` traced as the graph's own constant, as torch 2.11 does,
    the match does not name it.)"""
    for node in match.nodes:
        if (
            node.target in (torch.ops.aten.add.Scalar, torch.ops.aten.add.Tensor)
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].target is torch.ops.aten.mean.dim
            and not isinstance(node.args[1], torch.fx.Node)
        ):
            return node.args[1]
    return None


def _depends_on(args, nodes: set) -> bool:
    """Whether a node among ``args`` is computed from one of ``nodes`` (transitively).

    A graph's nodes are in topological order, so the walk stops at a node placed before all of ``nodes``: neither
    it nor anything above it can be computed from them (a weight or a constant scale stops at once, and a scale
    computed from earlier activations does not walk the graph above the chain)."""
    first = min(nodes)
    seen: set = set()
    stack = [a for a in args if isinstance(a, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node in nodes:
            return True
        if node < first:
            continue
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def _same_chain(generic: list[pm.PatternExpr], match: pm.Match) -> bool:
    """Whether ``match`` (the re-match at the real shapes, which :func:`_fusable` checks) holds the nodes of the
    first match, the one Inductor rewrites.

    Inductor first matches a pattern with its numbers, lists and dtypes ignored (``generic``), then re-matches at
    the real shapes from the same add; each later output (the RMSNorm, the quantisation) is looked for again among
    the users of the nodes found.  Where ``new_residual`` feeds two chains, the first match can take one that
    differs only in such a literal (``pow(4)``, ``mean(0)``, a cast to another dtype) and the re-match the other,
    exact one: the checks would pass on the second while the first is replaced."""
    node = match.output_nodes()[0]
    for expr in generic:
        first = expr.match(node)
        if pm.is_match(first):
            return set(first.nodes) == set(match.nodes) and first.output_nodes() == match.output_nodes()
    return False


def _keeps_precision_casts() -> bool:
    """Whether Inductor compiles 16-bit casts as eager runs them (``emulate_precision_casts``).  By default it drops
    a round trip to 16 bits between two fused ops, the rounding of ``LlamaRMSNorm`` before its weight multiply
    included, and so computes that chain as the fused op does (in fp32, rounded once); with the setting on, the
    compiled chain keeps that rounding, which the fused op does not have."""
    from torch._inductor import config

    return bool(config.emulate_precision_casts)


def _fusable(pattern: _patterns.FusionPattern, generic: list[pm.PatternExpr], match: pm.Match) -> bool:
    """The checks a structural match must pass before it is rewritten (see the module docstring); ``generic``: the
    pattern Inductor matched first (:func:`_same_chain`)."""
    limits = _fused_limits()
    if limits is None:
        return False
    if not _same_chain(generic, match):
        return False
    max_hidden, dtypes = limits
    x, residual, weight = (_value(match.kwargs.get(name)) for name in ("x", "residual", "weight"))
    if not all(isinstance(t, torch.Tensor) for t in (x, residual, weight)):
        return False
    if x.dtype not in dtypes or residual.dtype != x.dtype or weight.dtype != x.dtype:
        return False
    if pattern.rounds_before_weight and x.dtype != torch.float32 and _keeps_precision_casts():
        return False  # the compiled chain rounds before its weight multiply, the fused op does not: other bits
    if x.device != residual.device or weight.device != x.device or x.dim() < 1 or weight.dim() != 1:
        return False
    if x.dim() != residual.dim() or not all(_same_size(a, b) for a, b in zip(x.shape, residual.shape, strict=True)):
        return False
    hidden = x.shape[-1]
    if not _same_size(weight.shape[0], hidden) or not (isinstance(hidden, int) and 1 <= hidden <= max_hidden):
        return False
    for expr, node in match.ctx.pattern_to_node.items():
        # Inductor's matcher ignores keyword arguments a pattern does not name: ``add(r, a, alpha=2)`` would
        # match ``r + a``, ``mean(v, -1, dtype=float64)`` would match ``mean(v, -1)``.
        if isinstance(node, torch.fx.Node) and set(node.kwargs) - set(getattr(expr, "kwargs", None) or {}):
            return False
    eps = match.kwargs["eps"] if "eps" in match.kwargs else _eps_of(match)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return False  # eps is a graph input (dynamic=True unspecialises floats): the op takes a number
    if not (math.isfinite(eps) and eps >= 0):
        return False  # the fused op refuses it (NaN, inf, negative): the chain computes with it
    inputs = [match.kwargs.get(name) for name in ("x", "residual", "weight", "scale")]
    if any(isinstance(arg, torch.fx.Node) and arg in match.nodes for arg in inputs):
        return False  # an input computed inside the chain (e.g. residual = the all-reduce itself)
    if _depends_on(inputs[2:], set(match.nodes)):
        return False  # a weight or scale computed from new_residual: the fused op would feed itself (a cycle)
    # The fused op returns new_residual and the output shaped like x; a chain whose outputs have other shapes (a
    # static FP8 scale of more dimensions than x broadcasts q to them) is not what it computes.
    for node in match.output_nodes()[:2]:
        out = _value(node)
        if not isinstance(out, torch.Tensor) or out.dim() != x.dim():
            return False
        if not all(_same_size(a, b) for a, b in zip(out.shape, x.shape, strict=True)):
            return False
    if pattern.takes_scale:
        scale = _value(match.kwargs.get("scale"))
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.device != x.device:
            return False
        if not _same_size(scale.numel(), 1):
            return False
        for node in match.nodes:  # the static division must be fp32 (a 0-d scale keeps y's dtype)
            if node.target is not torch.ops.aten.div.Tensor:
                continue
            value = _value(node)  # None for a node an earlier pass made without a value: its dtype is unknown
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                return False
    return True


# ============================================================================ the pass


def _functional_trace(fn, args, **kwargs) -> torch.fx.GraphModule:
    """``pattern_matcher.fwd_only`` with functionalisation, as AOTAutograd does for the graphs Inductor sees
    (``torch.rms_norm``'s C++ decomposition adds ``eps`` in place; the post-grad graph has the functional
    add)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.fx_passes.post_grad import remove_noop_ops
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.traceback import preserve_node_meta

    get_decomp_fn = kwargs.get("get_decomp_fn") or pm.select_decomp_table
    with enable_python_dispatcher(), preserve_node_meta():
        gm = make_fx(dispatch_functionalize(fn, FunctionalTensorMode()), get_decomp_fn(), tracing_mode="real")(*args)
    remove_noop_ops(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _refusals_as_trace_failures(search):
    """``search`` raising a :class:`~sagellm_comm.errors.CommError` that is not a ``RuntimeError`` as one.

    Inductor re-traces a pattern at the real shapes and dtypes of each match, which its first match found with
    dtypes ignored, and takes a ``RuntimeError`` from that trace for "no match".  A fake of this package's ops can
    refuse the re-trace's arguments where the model's own call was valid (``quantize_fp8`` on the RMSNorm output
    in ``x``'s dtype, float64, where the model cast it to bf16 first): that refusal, an
    ``InvalidArgumentError``, ended the compilation."""

    @functools.wraps(search)
    def traced(*args):
        try:
            return search(*args)
        except CommError as exc:
            if isinstance(exc, RuntimeError):
                raise
            raise RuntimeError(f"the pattern does not trace at these arguments: {exc}") from exc

    return traced


class _Registry:
    """The process's patterns: one ``PatternMatcherPass`` holding the patterns of every key seen so far."""

    def __init__(self):
        self.lock = threading.RLock()
        self.matcher = pm.PatternMatcherPass(pass_name="sagellm_comm_all_reduce_fusion")
        self.keys: set[tuple[str, torch.dtype, str]] = set()
        self.applying: collections.Counter[str] | None = None  # rewrites of the graph being processed

    def ensure(self, group_name: str, dtype: torch.dtype, device_type: str) -> None:
        key = (group_name, dtype, device_type)
        if key in self.keys:
            return
        from torch._guards import tracing
        from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

        fp8_max, modes = fp8_quantisation()
        # Out of the compilation's own fake mode and tracing context: the examples are fresh fake tensors.
        with unset_fake_temporarily(), tracing(None), FakeTensorMode():
            x = torch.empty(_EXAMPLE_TOKENS, _EXAMPLE_HIDDEN, dtype=dtype, device=device_type)
            weight = torch.empty(_EXAMPLE_HIDDEN, dtype=dtype, device=device_type)
            scale = torch.empty(1, dtype=torch.float32, device=device_type)
            for pattern in _patterns.build_patterns(group_name, fp8_max, modes):
                examples = [x, torch.empty_like(x), weight] + ([scale] if pattern.takes_scale else [])
                generic: list[pm.PatternExpr] = []  # filled below: the pattern Inductor matches first
                before = {key: len(entries) for key, entries in self.matcher.patterns.items()}
                pm.register_replacement(
                    _refusals_as_trace_failures(pattern.search),
                    self._counted(pattern),
                    examples,
                    _functional_trace,
                    self.matcher,
                    extra_check=functools.partial(_fusable, pattern, generic),
                    scalar_workaround={"eps": _EPS_PLACEHOLDER},
                    skip_duplicates=True,  # in fp32 some forms trace alike (no casts)
                )
                for key, entries in self.matcher.patterns.items():
                    generic.extend(entry.pattern for entry in entries[before.get(key, 0) :])
        self.keys.add(key)

    def _counted(self, pattern: _patterns.FusionPattern):
        """``pattern.replace``, counting one rewrite each time the matcher traces it for an accepted match."""

        def replace(*args):
            if self.applying is not None:
                self.applying[pattern.name] += 1
            return pattern.replace(*args)

        return replace

    def apply(self, graph: torch.fx.Graph) -> collections.Counter[str]:
        with self.lock:
            self.applying = collections.Counter()
            try:
                self.matcher.apply(graph)
                return self.applying
            finally:
                self.applying = None


_REGISTRY = _Registry()


@functools.cache
def _source_hash() -> str:
    package = Path(__file__).resolve().parent
    # the patterns and checks, the ops' schemas, and ReduceOp.parse (which all-reduces count as SUM)
    files = sorted(package.glob("*.py")) + [package.parent / "ops.py", package.parent / "backend.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(repr(fp8_quantisation()).encode())
    digest.update(repr(_fused_limits()).encode())  # what _fusable accepts: the hidden bound and the dtypes
    return f"sagellm_comm.compile:{digest.hexdigest()}"


class AllReduceFusionPass(CustomGraphPass):
    """The post-grad pass (module docstring); one instance serves any number of compilations.

    Install it as ``torch._inductor.config.post_grad_custom_post_pass`` (or in ``torch.compile(options=...)``),
    or through :func:`sagellm_comm.compile.compile` / :func:`sagellm_comm.compile.install`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        global _GRAPHS, _LEFT
        with _STATS_LOCK:
            _compiled()
        sites = _sum_all_reduces(graph)
        replaced: collections.Counter[str] = collections.Counter()
        if _fused_limits() is None:
            sites = []  # nothing could run the fused op
        with _REGISTRY.lock:
            for node in sites:
                value = node.meta.get("val")
                if isinstance(value, torch.Tensor) and value.dtype in _PATTERN_DTYPE:
                    _REGISTRY.ensure(_group_name(node), _PATTERN_DTYPE[value.dtype], value.device.type)
            if sites:
                # In topological order (Inductor sorts only after the custom post passes, so an earlier pass may
                # leave it out of order): the cycle check stops at nodes placed above a chain (_depends_on).
                pm.stable_topological_sort(graph)
                _default_sum(sites)
                _residual_first(sites)
                replaced = _REGISTRY.apply(graph)
        if replaced:
            pm.stable_topological_sort(graph)
            graph.lint()
        with _STATS_LOCK:
            _REPLACED.update(replaced)
            _GRAPHS += 1
            _LEFT += len(_sum_all_reduces(graph))

    def uuid(self) -> str:
        """Changes with this package's pattern sources, the ops' schemas, ``ReduceOp``'s parsing (which all-reduces
        count as SUM), the FP8 modes available and the fused kernels' limits (``MAX_HIDDEN``, ``RMSNORM_DTYPES``):
        what decides the rewrite of a graph.

        Inductor calls it while it keys a graph compiled with the pass, which is how :func:`stats` tells the
        cache hits of those graphs from the process's others."""
        from torch._guards import TracingContext

        if TracingContext.try_get() is not None:  # a compilation, not a caller asking for the id
            with _STATS_LOCK:
                _key_computed()
        return _source_hash()
