"""What a benchmark run is asked to do (:class:`BenchConfig`) and how it will run (:class:`LaunchPlan`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sagellm_comm.benchmark.provenance import GitState

DEFAULT_OUTPUT_DIR = ".benchmarks/collective"
DEFAULT_GPU_SIZES = "1K:256M"
DEFAULT_CPU_SIZES = "1K:1M"
DEFAULT_WARMUP = 5
DEFAULT_ITERS = 20
DEFAULT_GRAPH_CALLS = 10
DEFAULT_SPAWN_WORLD_SIZE = 2
VIRTUAL_MODES = ("stacked", "streams")
VIRTUAL_RANKS = range(2, 9)  # --virtual-ranks: the custom kernels' group sizes
VIRTUAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class BenchConfig:
    """Everything a run needs; the CLI fills it from its options (same names)."""

    op: str = "all_reduce"
    backend: str = "auto"
    algos: list[str] = field(default_factory=lambda: ["auto"])
    sizes: list[int] | None = None  # None: DEFAULT_GPU_SIZES on GPUs, DEFAULT_CPU_SIZES on CPU
    dtype: str = "float32"
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    graph: bool = False
    graph_calls: int = DEFAULT_GRAPH_CALLS  # calls captured back to back in the timed graph
    selector_config: str | None = None
    output_dir: str | None = DEFAULT_OUTPUT_DIR  # None: write no files
    plot: str | None = None
    world_size: int | None = None
    virtual_ranks: int | None = None
    virtual_mode: str = "stacked"  # stacked: one launch for all ranks; streams: one launch per rank
    zero_copy: bool = False
    progress: bool = True
    timeout: float = 120.0
    command: str = ""


@dataclass(frozen=True)
class LaunchPlan:
    mode: str  # virtual | torchrun | spawn | in_process
    world_size: int
    backend_kind: str  # the kind the registry resolves to before init ("custom" for virtual ranks)
    sizes: tuple[int, ...]
    uses_cuda: bool
    git: GitState | None = None  # the tree's commit and dirty flag when the run started (None: read when it ends)
