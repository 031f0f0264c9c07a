"""FP8 output of the fused all-reduce + residual + RMSNorm: modes, constants, argument checks, the reference.

Modes (``quant=`` of :func:`~sagellm_comm.fused.all_reduce_residual_rmsnorm`):

* ``"fp8"``: static per-tensor scale, a one-element fp32 tensor the caller gives -> ``(q, scale, new_residual)``;
* ``"fp8_per_token"``: one dynamic fp32 scale per row -> ``(q, scales [tokens, 1], new_residual)``;
* ``"fp8_group128"``: one per 128 elements of a row -> ``(q, scales [tokens, hidden // 128], new_residual)``.

``q`` is ``torch.float8_e4m3fn`` ``[tokens, hidden]``, saturated at +-448, and ``q * scale`` (broadcast per row or
per group) approximates the RMSNorm output: the operands ``torch._scaled_mm`` takes (``scale_a`` a one-element
tensor, or ``[tokens, 1]`` for row-wise scaling).

The numerics (:func:`quantize_fp8_reference`, computed identically by the kernels of
``sagellm_comm/kernels/fp8.py``): with ``y`` the RMSNorm output as the unfused chain holds it (rounded to
``x``'s dtype) and fp32 math,

* static: ``q = e4m3(clamp(y / scale, -448, 448))``;
* dynamic: ``s = max(amax(|y|) / 448, FP8_SCALE_FLOOR)`` over the row (or group), ``q = e4m3(clamp(y / s, ...))``;
  the amax ignores NaN, so a NaN in ``y`` is NaN in that element of ``q`` only and leaves its row's (group's)
  scale as the other elements make it (an infinity counts: the scale is inf, ``q`` 0 or NaN at the inf);

every division an IEEE fp32 division (rounded to nearest, never a multiplication by a reciprocal, which would
round twice), the conversion round-to-nearest-even.  ``FP8_SCALE_FLOOR = 2**-117``: the smallest scale for
which every non-zero ``q * s`` is a normal fp32 number (an all-zero row gets it instead of a division by zero).

The static scale's value is data, read by the quantisation only, never by an argument check, on every device:
reading it on the host would synchronise the host with a GPU on every call and fail during CUDA graph capture, and
a compiled model whose own ``y / scale`` the fused op replaces must compute whatever that division computes.  A
scale that is not finite and positive gives the formula's outputs, the same bits on the kernels, the fallback and
here: 0 gives +-448 (NaN where ``y`` is 0), a negative scale negates ``q``, an infinite one makes ``q`` 0 (NaN
where ``y`` is infinite), NaN makes ``q`` NaN.
"""

from __future__ import annotations

import torch

from sagellm_comm.kernels import fp8 as _k8

from ..arguments import check_dense, check_is_tensor
from ..errors import InvalidArgumentError, ShapeMismatchError
from ._common import RMSNORM_DTYPES, rmsnorm_reference

FP8_MAX = float(_k8.FP8_MAX.value)
FP8_SCALE_FLOOR = float(_k8.FP8_SCALE_FLOOR.value)
FP8_GROUP_SIZE = int(_k8.FP8_GROUP.value)
FP8_DTYPE = torch.float8_e4m3fn
FP8_QUANT_MODES = ("fp8", "fp8_per_token", "fp8_group128")
# The kernels' constexpr for each mode (None: the RMSNorm output in x's dtype).
QUANT_CODES = {
    None: _k8.QUANT_NONE.value,
    "fp8": _k8.QUANT_STATIC.value,
    "fp8_per_token": _k8.QUANT_PER_TOKEN.value,
    "fp8_group128": _k8.QUANT_GROUP.value,
}


def check_quant(quant: str | None, scale: torch.Tensor | None, x: torch.Tensor) -> None:
    """Typed errors for a bad ``quant`` / ``scale`` / input dtype combination, before anything runs.

    ``quant`` must be None or one of :data:`FP8_QUANT_MODES`; ``"fp8"`` needs ``scale``, a one-element fp32
    tensor on ``x``'s device, whose value is data, not read here (module docstring); the dynamic modes take no
    ``scale`` and need a hidden size of at least 1; ``"fp8_group128"`` one divisible by 128; a quantised call needs
    ``x`` in bf16, fp16 or fp32.
    """
    if quant is None:
        if scale is not None:
            raise InvalidArgumentError("scale is only taken with quant='fp8' (a static FP8 scale); quant is None")
        return
    if quant not in FP8_QUANT_MODES:
        raise InvalidArgumentError(f"quant must be None or one of {FP8_QUANT_MODES}, got {quant!r}")
    check_is_tensor(x, "x")
    check_dense(x, "x")
    if x.dtype not in RMSNORM_DTYPES:
        raise InvalidArgumentError(
            f"quant={quant!r} takes x in {[str(d) for d in RMSNORM_DTYPES]}, got {x.dtype}; cast x first"
        )
    if quant == "fp8":
        if not isinstance(scale, torch.Tensor):
            raise InvalidArgumentError(
                f"quant='fp8' needs scale, a one-element torch.float32 tensor (the static FP8 scale), got "
                f"{type(scale).__name__}"
            )
        check_dense(scale, "the FP8 scale")
        if scale.numel() != 1:
            raise ShapeMismatchError(
                f"quant='fp8' needs a one-element scale (of any shape: (), (1,), (1, 1), ...), got shape "
                f"{tuple(scale.shape)}"
            )
        if scale.dtype != torch.float32:
            raise InvalidArgumentError(f"the FP8 scale must be torch.float32, got {scale.dtype}; pass scale.float()")
        if scale.device != x.device:
            raise InvalidArgumentError(f"the FP8 scale is on {scale.device}, x is on {x.device}; move it there")
        return
    if scale is not None:
        raise InvalidArgumentError(
            f"quant={quant!r} computes its scales from the data; scale must be None (use quant='fp8' for a static one)"
        )
    if x.dim() < 1:
        raise ShapeMismatchError(f"quant={quant!r} takes x of shape [..., hidden], got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ShapeMismatchError(f"quant={quant!r} needs hidden >= 1 to compute its scales, got x {tuple(x.shape)}")
    if quant == "fp8_group128" and x.shape[-1] % FP8_GROUP_SIZE:
        raise ShapeMismatchError(
            f"quant='fp8_group128' needs hidden divisible by {FP8_GROUP_SIZE}, got hidden={x.shape[-1]}; "
            "use quant='fp8_per_token'"
        )


def scales_shape(tokens: int, hidden: int, quant: str) -> tuple[int, int]:
    """Shape of the dynamic scales ``quant`` returns for a ``[tokens, hidden]`` input."""
    return (tokens, 1) if quant == "fp8_per_token" else (tokens, hidden // FP8_GROUP_SIZE)


def quantize_fp8_reference(
    y: torch.Tensor, quant: str, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: the documented FP8 quantisation of ``y`` (``[..., hidden]``) in torch ops.

    ``q`` is ``float8_e4m3fn`` like ``y``; ``scales`` is ``scale`` itself (``"fp8"``), ``[..., 1]``
    (``"fp8_per_token"``) or ``[..., hidden // 128]`` (``"fp8_group128"``), fp32.  See the module docstring for
    the arithmetic; the fused kernels produce the same bits from the same ``y``.
    """
    if quant not in FP8_QUANT_MODES:  # check_quant takes None (no quantisation), which has no q to give
        raise InvalidArgumentError(f"quant must be one of {FP8_QUANT_MODES}, got {quant!r}")
    check_quant(quant, scale, y)
    v = y.float()
    if quant == "fp8":
        return (v / scale.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    # A tensor divisor: torch divides a CUDA tensor by a Python number as a multiplication by its reciprocal.
    fp8_max = torch.full((), FP8_MAX, dtype=torch.float32, device=v.device)
    if quant == "fp8_per_token":
        s = (_amax_ignoring_nan(v) / fp8_max).clamp(min=FP8_SCALE_FLOOR)
        return (v / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
    groups = v.reshape(*v.shape[:-1], v.shape[-1] // FP8_GROUP_SIZE, FP8_GROUP_SIZE)
    s = (_amax_ignoring_nan(groups) / fp8_max).clamp(min=FP8_SCALE_FLOOR)
    q = (groups / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(v.shape), s.squeeze(-1)


def _amax_ignoring_nan(v: torch.Tensor) -> torch.Tensor:
    """``max(|v|)`` over the last dimension (kept), NaN ignored as the kernels' ``tl.max`` does (0 where every
    element is NaN); an infinity counts."""
    magnitude = v.abs()
    return torch.where(magnitude.isnan(), 0.0, magnitude).amax(-1, keepdim=True)


def unfused_tail(
    reduced: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    quant: str | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """What follows the all-reduce in the unfused chain, in torch ops: ``(normed, new_residual)`` or
    ``(q, scales, new_residual)``.  ``reduced`` is the all-reduced ``x``; nothing is modified."""
    new_residual = residual + reduced
    normed = rmsnorm_reference(new_residual, weight, eps)
    if quant is None:
        return normed, new_residual
    q, scales = quantize_fp8_reference(normed, quant, scale)
    return q, scales, new_residual
