"""The error of a lossy all-reduce payload against an fp32 reference, over realistic activations.

Shared by ``bench/fp8_payload_error.py`` (virtual ranks on a GPU, with kernel times) and its CPU test (the
kernels under the interpreter, ranks as processes), so both measure the same thing the same way:

* :func:`activations`: every rank's partial sums of one all-reduce, ``[rows, hidden]`` fp32, by distribution:
  ``normal`` (N(0, 1)); ``student_t`` (Student's t with 3 degrees of freedom: heavy tails, occasional values
  10-30x the typical magnitude); ``outliers`` (N(0, 1) times a per-row log-normal scale, with 0.5% of the hidden
  channels 50x larger on every rank, the systematic outlier features of LLM activations);
* :func:`error_stats`: relative L2 error and the largest absolute error (also relative to the largest magnitude
  of the reference) of one rank's result against the fp32 sum of the inputs as given to the all-reduce;
* :func:`bytes_moved`: the bytes a rank reads from its peers in a two-shot all-reduce, 16-bit and FP8 payloads.
"""

from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("normal", "student_t", "outliers")
STUDENT_T_DOF = 3
OUTLIER_CHANNELS = 0.005  # fraction of hidden channels
OUTLIER_GAIN = 50.0


def activations(
    kind: str, world_size: int, rows: int, hidden: int, seed: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """``world_size`` fp32 ``[rows, hidden]`` tensors of distribution ``kind`` (see the module docstring),
    the same on every process for the same arguments."""
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"kind must be one of {DISTRIBUTIONS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if kind == "outliers":
        channels = torch.randperm(hidden, generator=g)[: max(1, math.ceil(OUTLIER_CHANNELS * hidden))]
        gain = torch.ones(hidden)
        gain[channels] = OUTLIER_GAIN
        row_scale = torch.exp(0.5 * normal(rows, 1))
    out = []
    for _ in range(world_size):
        if kind == "normal":
            x = normal(rows, hidden)
        elif kind == "student_t":
            chi2 = sum(normal(rows, hidden) ** 2 for _ in range(STUDENT_T_DOF))
            x = normal(rows, hidden) / torch.sqrt(chi2 / STUDENT_T_DOF)
        else:
            x = normal(rows, hidden) * row_scale * gain
        out.append(x.to(device))
    return out


def fp32_reference(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The exact-as-fp32 sum of every rank's input (in rank order), as the inputs were given (any dtype)."""
    acc = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
    for x in inputs:
        acc += x.float()
    return acc


def error_stats(result: torch.Tensor, inputs: list[torch.Tensor]) -> dict[str, float]:
    """``rel_l2`` = ||result - ref|| / ||ref||, ``max_abs``, and ``max_rel_to_amax`` = max_abs / max |ref|,
    of ``result`` against :func:`fp32_reference` of ``inputs``."""
    ref = fp32_reference(inputs)
    err = result.float() - ref
    norm = float(torch.linalg.vector_norm(ref))
    max_abs = float(err.abs().max())
    return {
        "rel_l2": float(torch.linalg.vector_norm(err)) / norm if norm else 0.0,
        "max_abs": max_abs,
        "max_rel_to_amax": max_abs / float(ref.abs().max()) if norm else 0.0,
    }


def bytes_moved(numel: int, world_size: int, itemsize: int, payload: str | None = None) -> int:
    """Bytes one rank reads from its peers in a two-shot all-reduce of ``numel`` elements: ``W - 1`` chunks of
    its own reduction and ``W - 1`` chunks of the gather.  16-bit payload: ``itemsize`` bytes an element
    (chunks of ``cdiv(numel, W)``, rounded to 8 elements); FP8: 1 byte an element and 4 per 128 (chunks rounded
    to 128 elements)."""
    if payload is None:
        return 2 * (world_size - 1) * _round_up(_cdiv(numel, world_size), 8) * itemsize
    if payload != "fp8":
        raise ValueError(f"payload must be None or 'fp8', got {payload!r}")
    chunk = _round_up(_cdiv(numel, world_size), 128)
    return 2 * (world_size - 1) * (chunk + chunk // 128 * 4)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b
