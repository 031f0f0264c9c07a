"""Shared pieces of the fused operations: dtypes, limits, the reference RMSNorm, input checks."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

FUSED_DTYPES = (torch.bfloat16, torch.float16)
RMSNORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HIDDEN = 16384


def rmsnorm_reference(new_residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``new_residual * rsqrt(mean(new_residual**2) + eps) * weight`` in fp32, rounded to the input dtype."""
    v = new_residual.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(new_residual.dtype)


def _check_2d(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise InvalidArgumentError(f"{name} is on {t.device}, the workspace is on {device}")
