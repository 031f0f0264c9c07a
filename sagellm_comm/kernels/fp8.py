"""FP8 (e4m3fn) quantisation helpers shared by the kernels: constants, exact conversion, block scales.

The format is ``torch.float8_e4m3fn`` (Triton's ``float8e4nv``): 1 sign, 4 exponent (bias 7), 3 mantissa bits,
no infinities, largest finite value 448, smallest subnormal 2**-9, NaN ``0x7F`` / ``0xFF``.

Numerics (the host's reference quantiser, ``sagellm_comm/fused/fp8.py``, computes exactly the same):

* a value ``v`` (fp32) is quantised with scale ``s`` as ``q = e4m3(clamp(v / s, -448, 448))``: an IEEE
  division rounded to nearest (``div.rn.f32``, not a multiplication by ``1 / s``, which rounds twice), a clamp
  that keeps NaN, then one round-to-nearest-even conversion (``cvt.rn.satfinite.e4m3x2.f32`` on the GPU);
* a dynamic scale of a set of values (a row, a 128-element group or block) is
  ``s = max(amax / 448, FP8_SCALE_FLOOR)``, ``amax`` the largest magnitude (``tl.max``: NaN ignored), the
  division rounded to nearest;
* ``FP8_SCALE_FLOOR = 2**-117``: the smallest scale for which every non-zero FP8 value times the scale
  (``>= 2**-9 * s = 2**-126``) is a normal fp32 number, so a dequantised value never becomes an fp32
  subnormal that a flush-to-zero GEMM epilogue would drop; an all-zero set gets this scale (and ``q = 0``)
  instead of a division by zero.

Under the Triton interpreter (CPU tests) the fp32 -> fp8 cast does not round to nearest (it keeps the guard
bit only and drops the carry into the exponent: 31.6 becomes 16), and fp8 -> fp32 turns NaN into 480, so
there the bits are computed by exact fp32 arithmetic instead (the branch is resolved at compile time; GPU
code never contains it).
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value
FP8_SCALE_FLOOR = tl.constexpr(2.0**-117)  # see the module docstring
FP8_GROUP = tl.constexpr(128)  # elements per scale of the group / block modes

# Quantisation of the fused epilogue (a constexpr of the fused kernels).
QUANT_NONE = tl.constexpr(0)  # RMSNorm output in the input dtype
QUANT_STATIC = tl.constexpr(1)  # one scale given by the caller
QUANT_PER_TOKEN = tl.constexpr(2)  # one dynamic scale per row
QUANT_GROUP = tl.constexpr(3)  # one dynamic scale per FP8_GROUP elements of a row


@triton.jit
def _saturate(v):
    """``clamp(v, -448, 448)``, NaN kept (a NaN must not become a finite FP8 value)."""
    v = tl.maximum(v, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e4m3_exact(v):
    """fp32 ``v`` (``|v| <= 448`` or NaN) -> e4m3fn, rounded to nearest even, by fp32 arithmetic (interpreter).

    The spacing of ``v``'s binade (``2**(e - 3)``, at least the subnormal spacing ``2**-9``) is a power of two,
    so ``|v| / step`` is exact and ``(n + 2**23) - 2**23`` rounds it to the nearest even integer.
    """
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    is_nan = v != v
    a = tl.where(is_nan, 0.0, tl.abs(v))
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    rounded = ((a / step + 8388608.0) - 8388608.0) * step  # an e4m3 value (possibly the next binade's first)
    rb = rounded.to(tl.int32, bitcast=True)
    normal = ((((rb >> 23) & 0xFF) - 120) << 3) | ((rb >> 20) & 7)
    subnormal = (rounded * 512.0).to(tl.int32)
    code = tl.where(rounded >= 0.015625, normal, subnormal)
    code = tl.where(is_nan, 0x7F, code) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _to_e4m3(v, USE_PTX: tl.constexpr):
    """Saturate fp32 ``v`` to +-448 and round it to e4m3fn (nearest even); NaN stays NaN."""
    v = _saturate(v)
    if USE_PTX:
        q = v.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        q = _e4m3_exact(v)
    return q


@triton.jit
def _from_e4m3(q, USE_PTX: tl.constexpr):
    """e4m3fn -> fp32 (exact)."""
    v = q.to(tl.float32)
    if not USE_PTX:
        bits = q.to(tl.uint8, bitcast=True)
        v = tl.where((bits & 0x7F) == 0x7F, float("nan"), v)  # the interpreter decodes NaN as 480
    return v


@triton.jit
def _dynamic_scale(amax):
    """``max(amax / 448, FP8_SCALE_FLOOR)``, the division rounded to nearest."""
    return tl.maximum(tl.div_rn(amax, FP8_MAX), FP8_SCALE_FLOOR)


@triton.jit
def _quantize_blocks(v, USE_PTX: tl.constexpr):
    """``v``: fp32 ``[blocks, FP8_GROUP]`` -> ``(q [blocks, FP8_GROUP] e4m3fn, s [blocks] fp32)``, one dynamic scale
    per block (padding lanes must hold 0)."""
    s = _dynamic_scale(tl.max(tl.abs(v), axis=1))
    return _to_e4m3(tl.div_rn(v, s[:, None]), USE_PTX), s
