"""Automatic fusion: ``torch.compile`` with an Inductor pass that fuses all-reduce + residual add + RMSNorm (+ FP8).

In unmodified model code built on the TP layers, every tensor-parallel block ends with the all-reduce op
(``torch.ops.sagellm_comm.all_reduce``), a residual add and an RMSNorm, often followed by the FP8 quantisation of
the next linear layer's input.  The pass (:class:`AllReduceFusionPass`) replaces each such chain in the graph
Inductor compiles by one call of ``torch.ops.sagellm_comm.all_reduce_residual_rmsnorm``, which runs
:func:`sagellm_comm.fused.all_reduce_residual_rmsnorm` (one fused kernel on the group's custom workspace, the
engine's all-reduce and torch ops elsewhere).  What is matched: :mod:`sagellm_comm.compile.patterns`; when a
chain is left alone: :mod:`sagellm_comm.compile.fusion_pass`; docs/fused.md ("Automatic fusion").

Use::

    import sagellm_comm.compile as scc

    model = scc.compile(model, fullgraph=True)            # torch.compile(model, fullgraph=True) + the pass
    model = scc.compile(model, dynamic=False)             # any torch.compile arguments (backend "inductor")
    logits = model(input_ids)                              # compiles on the first call
    print(scc.stats())                                     # FusionStats(replaced={'rmsnorm': 4}, graphs=1, ...)

    # or in your own torch.compile configuration:
    torch.compile(model, options={"post_grad_custom_post_pass": scc.passes()})
    torch._inductor.config.post_grad_custom_post_pass = scc.passes()   # every later compilation
    scc.install()                                          # the same, kept beside a pass already set there

The pass is an Inductor ``CustomGraphPass`` with a ``uuid()``, so Inductor's FX-graph cache stays on: a graph
loaded from the cache was rewritten when it was compiled and is counted in :attr:`FusionStats.cache_hits`
(graphs compiled with the pass only), not in :attr:`FusionStats.replaced`.  Forward-only (inference), like the
ops it rewrites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._inductor import custom_graph_pass as _custom_graph_pass
from torch._inductor.custom_graph_pass import CustomGraphPass

from sagellm_comm.errors import InvalidArgumentError, NotImplementedCommError

from .fusion_pass import AllReduceFusionPass, FusionStats, reset_stats, stats

__all__ = [
    "AllReduceFusionPass",
    "FusionStats",
    "PassChain",
    "compile",
    "install",
    "passes",
    "reset_stats",
    "stats",
    "uninstall",
]

_PASS = AllReduceFusionPass()
_CONFIG_KEY = "post_grad_custom_post_pass"


def passes() -> AllReduceFusionPass:
    """The fusion pass, for ``torch._inductor.config.post_grad_custom_post_pass`` or
    ``torch.compile(options={"post_grad_custom_post_pass": passes()})`` (always the same object)."""
    return _PASS


# torch releases that have it call a pass of this class with ``is_inference`` as well as the graph
_INFERENCE_AWARE: type | None = getattr(_custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class PassChain(_INFERENCE_AWARE or CustomGraphPass):  # type: ignore[misc]
    """Several post-grad passes in one slot, run in order (torch releases whose slot holds one pass).

    Its ``uuid()`` joins the passes' uuids, and is None (Inductor then skips its FX-graph cache) when one of
    them is a plain callable or has no uuid.  Where torch has ``CustomInferenceAwareGraphPass``, the chain is one:
    Inductor gives it ``is_inference``, which it hands to the passes of that class (called with the graph alone,
    they raised a TypeError and the compilation ended), the others getting the graph alone."""

    def __init__(self, passes: list[Callable[[torch.fx.Graph], None]]):
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph, is_inference: bool | None = None) -> None:
        for graph_pass in self.passes:
            if is_inference is not None and _INFERENCE_AWARE is not None and isinstance(graph_pass, _INFERENCE_AWARE):
                graph_pass(graph, is_inference=is_inference)
            else:
                graph_pass(graph)

    def uuid(self) -> str | None:
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(i is None for i in ids) else "|".join(str(i) for i in ids)


def _members(slot: Any) -> list[Any]:
    """The passes of ``slot`` in the order they run, chains and lists flattened (a chain may hold a chain)."""
    if slot is None:
        return []
    if isinstance(slot, PassChain):
        return _members(slot.passes)
    if isinstance(slot, (list, tuple)):
        return [p for item in slot for p in _members(item)]
    return [slot]


def _others(slot: Any) -> list[Any]:
    """The passes of ``slot`` that are not a fusion pass: ``passes()`` or another ``AllReduceFusionPass()`` (every
    instance rewrites alike and counts in the same :func:`stats`: two in one slot would count each graph twice)."""
    return [p for p in _members(slot) if type(p) is not AllReduceFusionPass]


def _with_ours(slot: Any) -> Any:
    """``slot`` (a pass, a list of passes or None) with the fusion pass added last, once."""
    others = _others(slot)
    return _PASS if not others else PassChain([*others, _PASS])


def _without_ours(slot: Any) -> Any:
    others = _others(slot)
    return None if not others else others[0] if len(others) == 1 else PassChain(others)


def install() -> None:
    """Add the fusion pass to ``torch._inductor.config.post_grad_custom_post_pass`` for every later
    compilation of this process (after a pass already there; idempotent).  :func:`uninstall` removes it."""
    from torch._inductor import config

    setattr(config, _CONFIG_KEY, _with_ours(getattr(config, _CONFIG_KEY)))


def uninstall() -> None:
    """Remove the fusion pass from ``torch._inductor.config.post_grad_custom_post_pass`` (other passes stay)."""
    from torch._inductor import config

    setattr(config, _CONFIG_KEY, _without_ours(getattr(config, _CONFIG_KEY)))


def _setting(merged: dict[str, Any], key: str) -> tuple[Any, str]:
    """The value Inductor will use for ``key`` (a dotted config name) and where it comes from: the mode and options
    of the call, else ``torch._inductor.config`` (the options patch the global config, they do not replace it)."""
    if key in merged:
        return merged[key], "the mode or options"
    from torch._inductor import config

    value: Any = config
    for part in key.split("."):
        value = getattr(value, part, None)
    return value, "torch._inductor.config"


def compile(  # noqa: A001 -- the module's verb, as torch.compile
    model: Callable[..., Any] | None = None,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.compile(model, ...)`` with the fusion pass installed for this compilation only.

    Takes every ``torch.compile`` argument (``fullgraph``, ``dynamic``, ``disable``, ...).  The backend must be
    ``"inductor"`` (the pass is an Inductor pass); ``mode`` and ``options`` may be given together (the mode's
    options, then yours; an option's name may be spelled with dashes, as ``torch.compile`` allows); a
    ``post_grad_custom_post_pass`` of yours in ``options`` (else the one in
    ``torch._inductor.config`` when this is called: the options this passes replace that slot) runs before the
    fusion pass.
    ``model=None`` returns a decorator, as ``torch.compile`` does.  Inductor's own CUDA graphs
    (``mode="reduce-overhead"``, ``"max-autotune"``, ``options={"triton.cudagraphs": True}``, or
    ``torch._inductor.config.triton.cudagraphs`` set where the mode and options leave it) are refused with
    ``NotImplementedCommError``; capture the compiled step with ``torch.cuda.graph`` instead.  A mode, options or
    global config that turn Inductor's post-grad passes off (``mode="lite"``, ``use_post_grad_passes=False``),
    which would leave the pass unrun, are refused with ``InvalidArgumentError``.
    """
    if backend != "inductor":
        raise InvalidArgumentError(
            f"sagellm_comm.compile.compile runs Inductor passes and needs backend='inductor', got {backend!r}; "
            "for another backend, compile without the fusion"
        )
    merged: dict[str, Any] = {}
    if mode is not None:
        from torch._inductor import list_mode_options

        modes = list_mode_options()
        if mode not in modes:
            raise InvalidArgumentError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        merged.update(list_mode_options(mode, kwargs.get("dynamic")))
    # Inductor's names: torch.compile reads "use-post-grad-passes" as "use_post_grad_passes"
    merged.update({key.replace("-", "_"): value for key, value in (options or {}).items()})
    cudagraphs, where = _setting(merged, "triton.cudagraphs")
    if cudagraphs:
        raise NotImplementedCommError(
            f"sagellm_comm.compile.compile does not support Inductor's CUDA graphs (triton.cudagraphs=True from "
            f"{where}, mode={mode!r}): a tensor-parallel Llama compiled with the fusion pass ended in a "
            "segmentation fault on every rank under them; "
            "capture the compiled decode step with torch.cuda.graph instead (examples/llama_tp.py --mode "
            "fused-cuda-graph), or compile without them (mode='max-autotune-no-cudagraphs', "
            "options={'triton.cudagraphs': False})"
        )
    post_grad, where = _setting(merged, "use_post_grad_passes")
    if post_grad is False:
        raise InvalidArgumentError(
            f"use_post_grad_passes=False (from {where}, mode={mode!r}) turns Inductor's post-grad passes off, and the "
            "fusion pass is one: it would rewrite nothing; compile with torch.compile for that mode, or use another"
        )
    if _CONFIG_KEY not in merged:  # options override the global config: a pass set there would not run
        from torch._inductor import config

        merged[_CONFIG_KEY] = getattr(config, _CONFIG_KEY)
    merged[_CONFIG_KEY] = _with_ours(merged[_CONFIG_KEY])
    if model is None:
        return lambda fn: torch.compile(fn, backend="inductor", options=merged, **kwargs)
    return torch.compile(model, backend="inductor", options=merged, **kwargs)
