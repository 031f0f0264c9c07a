"""Checking an overlap benchmark request and deciding how it runs (:func:`plan_overlap`), before any process
starts; the overlap benchmark's counterpart of :mod:`sagellm_comm.benchmark.plan`, with the same launch modes
(``virtual``, ``torchrun``, ``spawn``) and the same checks where the options are the same.

Every problem is an :class:`~sagellm_comm.errors.InvalidArgumentError` naming it; the CLI prints it as one
line and exits 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sagellm_comm.arguments import check_int
from sagellm_comm.benchmark.config import VIRTUAL_DTYPES
from sagellm_comm.benchmark.ops import resolve_dtype
from sagellm_comm.benchmark.overlap_results import CPU_DEFAULTS, GPU_DEFAULTS, OverlapConfig
from sagellm_comm.benchmark.plan import (
    available_kind,
    check_fits_memory,
    check_given_backend,
    check_message_sizes,
    check_outputs,
    check_repetitions,
    check_settings,
    check_virtual_ranks,
    cuda_available,
    launch_world,
    memory_bytes,
    ranks_sharing_memory,
    torchrun_env,
)
from sagellm_comm.benchmark.sizes import parse_size_list
from sagellm_comm.errors import InvalidArgumentError


@dataclass(frozen=True)
class OverlapPlan:
    mode: str  # virtual | torchrun | spawn | in_process
    world_size: int  # ranks (virtual ones included)
    backend_kind: str
    sizes: tuple[int, ...]
    dtype: torch.dtype
    uses_cuda: bool

    @property
    def defaults(self) -> dict:
        return GPU_DEFAULTS if self.uses_cuda else CPU_DEFAULTS


def check_numbers(config: OverlapConfig) -> None:
    """The options that need no machine: counts, times, sizes."""
    check_repetitions(config.warmup, config.iters, config.timeout)
    if config.compute_duration_ms is not None and not 0 < config.compute_duration_ms < math.inf:
        raise InvalidArgumentError(f"--compute-ms must be > 0 and finite, got {config.compute_duration_ms}")
    if config.compute_duration_ms is not None and config.compute_duration_ms >= config.timeout * 1000:
        # the ranks meet after every GEMM loop: one that outlasts the timeout fails every iteration (and one of
        # absurd length keeps every rank computing, so no wait ever starts its deadline)
        raise InvalidArgumentError(
            f"--compute-ms {config.compute_duration_ms:g} is not below --timeout ({config.timeout:g} s): the GEMM "
            "loop of every iteration would outlast the deadline"
        )
    if config.gemm_size is not None:
        check_int(config.gemm_size, "--gemm-size", 1)
    if config.world_size is not None:
        check_int(config.world_size, "--world-size", 1)
    if config.virtual_ranks is not None:
        check_virtual_ranks(config.virtual_ranks)


def resolve_payload(config: OverlapConfig, uses_cuda: bool) -> tuple[tuple[int, ...], torch.dtype]:
    """The sizes and dtype of the run (the defaults of a GPU or a CPU run where not given), checked."""
    defaults = GPU_DEFAULTS if uses_cuda else CPU_DEFAULTS
    dtype = resolve_dtype(config.dtype or defaults["dtype"])
    if not dtype.is_floating_point:
        raise InvalidArgumentError(f"--dtype: the GEMM needs a floating-point dtype, got {config.dtype}")
    given = config.comm_sizes  # an empty list is refused below, not taken for the defaults
    sizes = tuple(parse_size_list(defaults["comm_sizes"]) if given is None else given)
    check_message_sizes(sizes, dtype)
    return sizes, dtype


def check_gemm_fits(config: OverlapConfig, dtype: torch.dtype, ranks: int, uses_cuda: bool) -> None:
    """Refuse a ``--gemm-size`` whose three ``[g, g]`` matrices (each rank makes its own) cannot fit in the memory
    ``ranks`` ranks share (this host's on the CPU, one GPU's): no rank could allocate them."""
    total = memory_bytes(uses_cuda)
    size = config.gemm_size or (GPU_DEFAULTS if uses_cuda else CPU_DEFAULTS)["gemm_size"]
    need = ranks * 3 * size * size * torch.empty((), dtype=dtype).element_size()
    if total is not None and need > total:
        where = "one GPU's" if uses_cuda else "this host's"
        who = f"{ranks} ranks x " if ranks > 1 else ""
        raise InvalidArgumentError(
            f"--gemm-size {size} cannot fit: {who}3 matrices of {size}x{size} {str(dtype).removeprefix('torch.')} "
            f"need {need / 2**30:.1f} GiB, more than {where} {total / 2**30:.1f} GiB of memory"
        )


def plan_overlap(config: OverlapConfig) -> OverlapPlan:
    """Check ``config`` and decide how to run it; raises InvalidArgumentError naming the problem."""
    check_numbers(config)
    if config.dtype is not None:
        resolve_dtype(config.dtype)  # an unknown name is refused before the machine is looked at
    check_outputs(config.output_dir, config.plot)
    check_settings()
    cuda = cuda_available()
    env = torchrun_env()
    if config.virtual_ranks is not None:
        if not cuda:
            raise InvalidArgumentError("--virtual-ranks needs a CUDA GPU, and none is available here")
        if config.world_size is not None:
            raise InvalidArgumentError("give either --virtual-ranks or --world-size, not both")
        if env is not None:
            raise InvalidArgumentError("--virtual-ranks runs in one process; do not start it under torchrun")
        if config.backend not in ("auto", "custom"):
            raise InvalidArgumentError(f"--virtual-ranks runs the custom kernels; --backend {config.backend} cannot")
        sizes, dtype = resolve_payload(config, True)
        if dtype not in VIRTUAL_DTYPES:  # as sagellm-comm bench --virtual-ranks: refused here, not by the first call
            raise InvalidArgumentError(f"the custom all-reduce runs float32, float16 and bfloat16, not {config.dtype}")
        check_fits_memory(sizes, config.virtual_ranks, True)
        check_gemm_fits(config, dtype, 1, True)  # one process runs the GEMMs
        return OverlapPlan("virtual", config.virtual_ranks, "custom", sizes, dtype, True)

    kind = available_kind(config.backend)
    uses_cuda = kind != "gloo" and cuda
    sizes, dtype = resolve_payload(config, uses_cuda)
    mode, world_size = launch_world(kind, uses_cuda, config.world_size, env)
    sharing = ranks_sharing_memory(mode, world_size, uses_cuda)
    check_fits_memory(sizes, sharing, uses_cuda)
    check_gemm_fits(config, dtype, sharing, uses_cuda)
    return OverlapPlan(mode, world_size, kind, sizes, dtype, uses_cuda)


def plan_overlap_in_process(config: OverlapConfig, backend: Any) -> OverlapPlan:
    """Check ``config`` for a run on ``backend``, an initialised backend of this process's rank (every rank of its
    world calls): the checks of :func:`plan_overlap` that apply, then those of a given backend
    (:func:`~sagellm_comm.benchmark.plan.check_given_backend`, as ``run_benchmark`` makes them).  Raises
    InvalidArgumentError naming the problem, before anything is measured."""
    check_numbers(config)
    world_size = check_given_backend(backend, config.world_size, config.virtual_ranks, "run_overlap_benchmark")
    check_outputs(config.output_dir, config.plot)
    uses_cuda = backend.device.type == "cuda"
    sizes, dtype = resolve_payload(config, uses_cuda)
    sharing = ranks_sharing_memory("in_process", world_size, uses_cuda)
    check_fits_memory(sizes, sharing, uses_cuda)
    check_gemm_fits(config, dtype, sharing, uses_cuda)
    return OverlapPlan("in_process", world_size, backend.name, sizes, dtype, uses_cuda)
