"""Shared pieces of the fused operations: dtypes, limits, the reference RMSNorm, input checks."""

from __future__ import annotations

import torch

from ..arguments import check_dense, check_is_tensor
from ..errors import InvalidArgumentError, ShapeMismatchError

FUSED_DTYPES = (torch.bfloat16, torch.float16)
RMSNORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_ENGINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # the engine fallback's GEMM
MAX_HIDDEN = 16384


def rmsnorm_reference(new_residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``new_residual * rsqrt(mean(new_residual**2) + eps) * weight`` in fp32, rounded to the input dtype."""
    v = new_residual.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(new_residual.dtype)


def engine_all_reduced(x: torch.Tensor, all_reduce, world_size: int, in_place: bool = False) -> torch.Tensor:
    """``x`` summed over ranks by an engine's in-place ``all_reduce(tensor)``, as the kernels sum it (in fp32,
    rounded once to ``x``'s dtype), though in the engine's order rather than rank order: the same bits wherever
    the fp32 sum is exact (docs/fused.md, the engine fallback).  A new tensor, or with ``in_place`` ``x`` itself
    holding the sum (a tensor of the caller's own, e.g. a GEMM's output).

    An engine reduces a 16-bit tensor in 16 bits, a rounding per addition: from 3 ranks on, the sum is not the
    fp32 sum rounded once (one ulp of the sum, which a residual of the opposite sign turns into the whole of
    ``new_residual``: 1 + 2**-8 + 2**-8 - 1 is 0 in bf16 steps, 2**-7 rounded once).  So there a 16-bit ``x``
    travels as fp32, twice the bytes; 2 ranks (one addition) and fp32 inputs travel as they are."""
    if world_size > 2 and x.dtype in (torch.bfloat16, torch.float16):
        wide = x.float()
        result = all_reduce(wide)
        wide = result if isinstance(result, torch.Tensor) else wide
        return x.copy_(wide) if in_place else wide.to(x.dtype)  # one rounding, to nearest even
    reduced = x if in_place else x.clone()
    result = all_reduce(reduced)
    if isinstance(result, torch.Tensor) and result is not reduced:
        return reduced.copy_(result) if in_place else result
    return reduced


def _check_2d(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    check_is_tensor(t, name)
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise InvalidArgumentError(f"{name} is on {t.device}, this call runs on {device}; move it there")


def check_gemm_inputs(a, b, bias, device: torch.device, dtypes, batch: int | None = None) -> tuple[int, int, int]:
    """Typed errors for bad inputs of the GEMM + all-reduce, before anything runs; returns ``(M, N, K)``.

    ``a`` ``[M, K]`` and ``b`` ``[K, N]`` (``[batch, ...]`` with ``batch``; any strides), of one dtype in ``dtypes``
    and on ``device``; ``bias`` None or a contiguous ``[N]`` tensor of that dtype; no empty dimension.  A wrong type,
    dtype or device, or an empty GEMM raises ``InvalidArgumentError``; a wrong rank, shapes that do not chain or
    dtypes that differ raise ``ShapeMismatchError``.
    """
    for name, t in (("a", a), ("b", b)):
        _check_2d(name, t, device, dtypes)
    dims = 2 if batch is None else 3
    if a.dim() != dims or b.dim() != dims or b.dtype != a.dtype:
        raise ShapeMismatchError(
            f"a and b must be {dims}-d tensors of one dtype, got {tuple(a.shape)} {a.dtype}, {tuple(b.shape)} {b.dtype}"
        )
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2 or (batch is not None and (a.shape[0] != batch or b.shape[0] != batch)):
        raise ShapeMismatchError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain (a: [M, K], b: [K, N])")
    if bias is not None:
        _check_2d("bias", bias, device, dtypes)
        if bias.shape != (n,) or bias.dtype != a.dtype or not bias.is_contiguous():
            raise ShapeMismatchError(f"bias must be a contiguous [{n}] {a.dtype} tensor, got {tuple(bias.shape)}")
    if m == 0 or n == 0 or k == 0:
        raise InvalidArgumentError(f"empty GEMM: M={m}, K={k}, N={n}")
    return m, n, k


def check_rmsnorm_inputs(
    x, residual, weight, device: torch.device, rows_dims: int = 2, max_hidden: int | None = MAX_HIDDEN
) -> tuple[int, int]:
    """Typed errors for bad inputs of the all-reduce + residual + RMSNorm, before anything runs; returns
    ``(rows, hidden)``.

    ``x`` and ``residual``: contiguous ``rows_dims``-d tensors of one shape (``[..., rows, hidden]``), ``weight``
    a contiguous ``[hidden]`` tensor, all three of one dtype in :data:`RMSNORM_DTYPES` and on ``device``;
    ``1 <= hidden <= max_hidden`` (None: no upper bound).  A wrong type, dtype, device, rank or layout raises
    ``InvalidArgumentError``; shapes or dtypes that differ from ``x``'s raise ``ShapeMismatchError``.
    """
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        _check_2d(name, t, device, RMSNORM_DTYPES)
        check_dense(t, name)
    if x.dim() != rows_dims:
        raise InvalidArgumentError(f"x must be a contiguous {rows_dims}-d tensor, got a {x.dim()}-d x {tuple(x.shape)}")
    for name, t in (("x", x), ("residual", residual)):
        if not t.is_contiguous():
            raise InvalidArgumentError(
                f"{name} must be a contiguous {rows_dims}-d tensor, got shape {tuple(t.shape)} with strides "
                f"{t.stride()}; pass {name}.contiguous()"
            )
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.dtype != x.dtype:
        raise ShapeMismatchError(
            f"residual {tuple(residual.shape)} {residual.dtype} and weight {weight.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ShapeMismatchError(f"weight must be a contiguous [{hidden}] tensor, got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise InvalidArgumentError(
            f"weight must be a contiguous [{hidden}] tensor, got strides {weight.stride()}; pass weight.contiguous()"
        )
    if hidden < 1 or (max_hidden is not None and hidden > max_hidden):
        bound = "at least 1" if max_hidden is None else f"in 1..{max_hidden}"
        raise InvalidArgumentError(f"hidden size must be {bound}, got {hidden}")
    return x.shape[-2], hidden
