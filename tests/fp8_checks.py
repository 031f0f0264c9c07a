"""Checks shared by the FP8 tests (CPU and GPU): the FP8 step of a value, dequantisation, the one-step bound.

An independent statement of the format (not the code under test): e4m3fn has 3 mantissa bits, so the spacing of
FP8 values in the binade ``[2**e, 2**(e + 1))`` is ``2**(e - 3)`` for ``e >= -6``, and ``2**-9`` below (subnormals).
"""

from __future__ import annotations

import torch

GROUP = 128


def fp8_step(q: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3fn values at each element of ``q`` (in q's own units, fp32)."""
    a = q.float().abs()
    e = torch.floor(torch.log2(a.clamp(min=2.0**-6)))
    return torch.exp2(e - 3)


def expand_scales(scales: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-element scale of ``q`` (``[..., hidden]``) from a one-element, ``[..., 1]`` or ``[..., hidden // 128]``
    tensor."""
    s = scales.float()
    if s.numel() == 1:
        return s.reshape(()).expand(q.shape)
    return s.repeat_interleave(q.shape[-1] // s.shape[-1], dim=-1)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * expand_scales(scales, q)


def assert_within_one_step(q, scales, q_ref, scales_ref, what: str = "", slack: float = 0.125) -> None:
    """Every dequantised element within one FP8 step (of the coarser of the two) of the reference's.

    ``slack``: the fraction of a step allowed on top for a ``y`` that differs by one ulp of its 16-bit dtype
    (``2**-8`` relative after rounding to nearest, ``2**-7`` where the interpreter truncates), which moves
    ``y / s`` by at most ``2**-7 * 16 = 1/8`` of a step.
    """
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape, (what, q.dtype, q.shape, q_ref.shape)
    got, want = dequantize(q, scales), dequantize(q_ref, scales_ref)
    assert torch.isfinite(got).all(), f"{what}: non-finite dequantised values"
    step = torch.maximum(fp8_step(q) * expand_scales(scales, q), fp8_step(q_ref) * expand_scales(scales_ref, q_ref))
    excess = (got - want).abs() / step
    worst = float(excess.max()) if excess.numel() else 0.0
    assert worst <= 1.0 + slack, f"{what}: an element is {worst:.3f} FP8 steps from the reference"


def block_scales(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Per element, the FP8 scale (amax / 448) of its 128-element block as the kernel cuts blocks: chunks of
    cdiv(numel, W) rounded up to 128, blocks of 128 from each chunk's start (written out independently)."""
    flat = x.float().reshape(-1)
    n = flat.numel()
    chunk = ((n + world_size - 1) // world_size + 127) // 128 * 128
    padded = torch.zeros(world_size * chunk, device=flat.device)
    padded[:n] = flat.abs()
    amax = padded.view(-1, 128).amax(-1) / 448.0
    return amax.repeat_interleave(128)[:n].view(x.shape)


def payload_bound(inputs, ref, world_size):
    """Per element, the error bound of the FP8-payload all-reduce (tests/test_fp8_payload.py derives it)."""
    terms = sum(x.float().abs() for x in inputs) + ref.abs()
    scales = sum(block_scales(x, world_size) for x in inputs) + block_scales(ref, world_size)
    return 1.1 * (2.0**-4 * terms + 2.0**-10 * scales) + 2.0**-7 * ref.abs()
