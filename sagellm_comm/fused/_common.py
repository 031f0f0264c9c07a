"""Shared pieces of the fused operations: dtypes, limits, the cached direct launcher, input checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..custom_all_reduce import INTERPRETER_SPINS_PER_SECOND
from ..errors import (
    InvalidArgumentError,
)

FUSED_DTYPES = (torch.bfloat16, torch.float16)
RMSNORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_PATHS = ("fused", "chunked", "copy_engine", "sequential")
MAX_HIDDEN = 16384


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _timeout_ticks(timeout_s: float, use_ptx: bool) -> int:
    if timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be positive, got {timeout_s}")
    return int(timeout_s * 1e9) if use_ptx else max(1, int(timeout_s * INTERPRETER_SPINS_PER_SECOND))


def rmsnorm_reference(new_residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``new_residual * rsqrt(mean(new_residual**2) + eps) * weight`` in fp32, rounded to the input dtype."""
    v = new_residual.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(new_residual.dtype)


class _Launcher:
    """Direct launches of one Triton kernel with cached binaries (the ``KernelLauncher`` pattern).

    The first launch of a specialisation goes through ``kernel[grid](...)``; later ones call the compiled
    binary's launcher with integer pointers.  The key holds what Triton specialises on: tensor dtypes and
    16-byte alignment, integers' divisibility by 16 and equality to 1, and the constexpr values.
    """

    def __init__(self, kernel, use_ptx: bool, device_index: int, **options):
        self.kernel = kernel
        self.use_ptx = use_ptx
        self.device_index = device_index
        self.options = options
        self.cache: dict[tuple, object] = {}

    @staticmethod
    def key(args: Sequence, constexprs: Sequence) -> tuple:
        return tuple(
            (a.dtype, a.data_ptr() % 16 == 0)
            if isinstance(a, torch.Tensor)
            else (a % 16 == 0, a == 1)
            if isinstance(a, int)
            else type(a)
            for a in args
        ) + tuple(constexprs)

    def preload(self, args: Sequence, constexprs: Sequence) -> None:
        """Compile and load this specialisation without launching it (nothing under the interpreter).

        Loading a module may wait for the device to go idle; a kernel that spins for a peer must not be
        running on this device then (virtual ranks), so such kernels are loaded before the first spin.
        """
        key = self.key(args, constexprs)
        if not self.use_ptx or key in self.cache:
            return
        compiled = self.kernel.warmup(*args, *constexprs, grid=(1,), **self.options)
        _ = compiled.run  # the binary's launcher, a lazy property: reading it loads the module now
        self.cache[key] = compiled

    def is_loaded(self, args: Sequence, constexprs: Sequence) -> bool:
        """True when this specialisation's binary is compiled and loaded (its next launch cannot block)."""
        return self.key(args, constexprs) in self.cache

    def __call__(self, grid: tuple[int, int], args: Sequence, constexprs: Sequence) -> None:
        key = self.key(args, constexprs)
        compiled = self.cache.get(key)
        if compiled is not None:
            raw = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
            stream = torch._C._cuda_getCurrentRawStream(self.device_index)
            compiled.run(
                grid[0],
                grid[1],
                1,
                stream,
                compiled.function,
                compiled.packed_metadata,
                None,
                None,
                None,
                *raw,
                *constexprs,
            )
            return
        compiled = self.kernel[grid](*args, *constexprs, **self.options)
        if self.use_ptx and getattr(compiled, "run", None) is not None and hasattr(compiled, "packed_metadata"):
            self.cache[key] = compiled


def _check_2d(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise InvalidArgumentError(f"{name} is on {t.device}, the workspace is on {device}")
