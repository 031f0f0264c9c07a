"""The catalogue of chains the automatic fusion rewrites, as pairs of plain functions.

Every chain starts with this group's SUM all-reduce (``torch.ops.sagellm_comm.all_reduce``, what the TP layers
call) and its residual add; then an RMSNorm, optionally followed by an FP8 quantisation:

* **RMSNorm** (``NORMS``): ``rmsnorm``, the decomposed math of ``transformers``' ``LlamaRMSNorm`` (and the many
  models that copy it: ``v = h.to(float32)``, ``v * rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)``, cast back,
  times the weight on either side); ``rms_norm``, :func:`torch.nn.functional.rms_norm` (and ``nn.RMSNorm``).
* **residual add**: ``residual + all_reduced``, same shape and dtype (the pass first rewrites
  ``all_reduced + residual`` into this order: addition commutes bit for bit).
* **quantisation** (``QUANTS``): none; ``fp8_static``, the decomposed static per-tensor form
  ``(y.to(float32) / scale).clamp(-448, 448).to(float8_e4m3fn)`` (``y / scale`` with a float32 ``scale`` of at
  least one dimension is the same division; a 0-d one leaves a 16-bit ``y`` divided in its own dtype, which the
  pass does not fuse); ``quantize_fp8(<mode>)``, the custom op ``torch.ops.sagellm_comm.quantize_fp8`` in any mode
  (``"fp8"``, ``"fp8_per_token"``, ``"fp8_group128"``), the quantiser an FP8 linear layer calls.

A pattern's ``search`` function is the unfused chain as model code writes it; Inductor's pattern matcher traces
it into the post-grad aten graph it then looks for, so what is matched follows torch's own decompositions on
every version and device.  Its ``replace`` function calls ``torch.ops.sagellm_comm.all_reduce_residual_rmsnorm``.
Both take ``(x, residual, weight[, scale], eps)`` and return ``(new_residual, out[, scales])``: the residual
add comes first, so every pattern is anchored at that add node and the quantised patterns, registered first,
are tried before the plain one at the same add.  Each pattern's name (``rmsnorm``, ``rms_norm+fp8_static``,
``rmsnorm+quantize_fp8(fp8_per_token)``, ...) is the key of :func:`sagellm_comm.compile.stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagellm_comm.ops import QUANT_NONE

#: the static per-tensor FP8 mode (a caller's scale), as ``sagellm_comm.fused`` names it
STATIC_FP8 = "fp8"


def _rmsnorm_weight_left(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = h.dtype
    v = h.to(torch.float32)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return weight * v.to(dtype)


def _rmsnorm_weight_right(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = h.dtype
    v = h.to(torch.float32)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return v.to(dtype) * weight


def _rms_norm_functional(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(h, (h.shape[-1],), weight, eps)


#: name -> the RMSNorm forms of that name (one pattern each)
NORMS: dict[str, tuple[Callable[..., torch.Tensor], ...]] = {
    "rmsnorm": (_rmsnorm_weight_left, _rmsnorm_weight_right),
    "rms_norm": (_rms_norm_functional,),
}


#: the ``NORMS`` names whose forms round the normalised value to the input dtype before the weight multiply
#: (``LlamaRMSNorm``: ``weight * v.to(dtype)``); the fused op multiplies in fp32 and rounds once
ROUNDS_BEFORE_WEIGHT = frozenset({"rmsnorm"})


@dataclass(frozen=True)
class FusionPattern:
    """One registered rewrite: ``search`` is replaced by ``replace`` (see the module docstring).

    ``name``: the stats key; ``quant``: the fused op's mode (``"none"`` or an FP8 mode); ``takes_scale``:
    the functions take a static FP8 ``scale`` after ``weight``."""

    name: str
    quant: str
    takes_scale: bool
    search: Callable[..., tuple[torch.Tensor, ...]]
    replace: Callable[..., tuple[torch.Tensor, ...]]

    @property
    def rounds_before_weight(self) -> bool:
        """Whether the matched RMSNorm rounds to the input dtype before its weight multiply (one rounding more than
        the fused op in 16 bits; none in fp32, where the cast does nothing)."""
        return self.name.partition("+")[0] in ROUNDS_BEFORE_WEIGHT


def _quant_forms(fp8_max: float, modes: tuple[str, ...]):
    """``(suffix, mode, takes_scale, quantise, returns_scales)``: ``quantise(y, scale) -> (q,) or (q, scales)``."""

    def static_explicit(y, scale):
        return ((y.to(torch.float32) / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn),)

    def static_promoted(y, scale):
        return ((y / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn),)

    forms = [("+fp8_static", STATIC_FP8, True, static_explicit, False)]
    forms.append(("+fp8_static", STATIC_FP8, True, static_promoted, False))
    for mode in modes:
        takes_scale = mode == STATIC_FP8

        def op_form(y, scale, mode=mode):
            return torch.ops.sagellm_comm.quantize_fp8(y, mode, scale)

        def op_form_q_only(y, scale, mode=mode):
            return (torch.ops.sagellm_comm.quantize_fp8(y, mode, scale)[0],)

        forms.append((f"+quantize_fp8({mode})", mode, takes_scale, op_form, True))
        if takes_scale:  # a static scale is the caller's own tensor: the op's copy of it may go unused
            forms.append((f"+quantize_fp8({mode})", mode, True, op_form_q_only, False))
    return forms


def build_patterns(group_name: str, fp8_max: float | None, fp8_modes: tuple[str, ...]) -> list[FusionPattern]:
    """Every pattern for the all-reduces of ``group_name``, the quantised ones first.

    ``fp8_max``/``fp8_modes``: the FP8 range and modes of ``sagellm_comm.fused`` (None/() where it has no FP8
    quantisation: then only the unquantised chains are matched)."""
    patterns: list[FusionPattern] = []
    forms = _quant_forms(fp8_max, fp8_modes) if fp8_max is not None else []
    for suffix, mode, takes_scale, quantise, returns_scales in forms:
        for norm_name, norms in NORMS.items():
            for norm in norms:
                name = norm_name + suffix
                patterns.append(_quantised(group_name, name, mode, takes_scale, norm, quantise, returns_scales))
    for norm_name, norms in NORMS.items():
        for norm in norms:
            patterns.append(_plain(group_name, norm_name, norm))
    return patterns


def _plain(group_name: str, name: str, norm) -> FusionPattern:
    def search(x, residual, weight, eps):
        new_residual = residual + torch.ops.sagellm_comm.all_reduce(x, group_name)
        return new_residual, norm(new_residual, weight, eps)

    def replace(x, residual, weight, eps):
        out, _, new_residual = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(
            x, residual, weight, group_name, eps, QUANT_NONE
        )
        return new_residual, out

    return FusionPattern(name, QUANT_NONE, False, search, replace)


def _quantised(group_name, name, mode, takes_scale, norm, quantise, returns_scales) -> FusionPattern:
    def chain(x, residual, weight, scale, eps):
        new_residual = residual + torch.ops.sagellm_comm.all_reduce(x, group_name)
        return (new_residual, *quantise(norm(new_residual, weight, eps), scale))

    def fused(x, residual, weight, scale, eps):
        q, scales, new_residual = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(
            x, residual, weight, group_name, eps, mode, scale
        )
        return (new_residual, q, scales) if returns_scales else (new_residual, q)

    if takes_scale:
        return FusionPattern(name, mode, True, chain, fused)

    def search(x, residual, weight, eps):
        return chain(x, residual, weight, None, eps)

    def replace(x, residual, weight, eps):
        return fused(x, residual, weight, None, eps)

    return FusionPattern(name, mode, False, search, replace)
