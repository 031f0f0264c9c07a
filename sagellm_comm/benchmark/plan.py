"""Checking a benchmark request and deciding how it runs (:func:`plan_launch`), before any process starts.

Launch modes:

* ``virtual``: ``--virtual-ranks N``: N ranks of the custom all-reduce on one GPU, one process.
* ``torchrun``: ``RANK`` and ``WORLD_SIZE`` are in the environment: this process is one rank.
* ``spawn``: otherwise the benchmark starts ``world_size`` processes itself on this host (Gloo on CPU
  by default; one process per GPU for device backends).
* ``in_process``: ``run_benchmark(backend=...)``: every rank of an initialised backend the caller made runs it
  (:func:`plan_in_process`).

Both plans start with the same checks of the request (:func:`check_request`).

Every problem with the request or the environment (an option, a backend this machine cannot run, an
output path that cannot be written, a malformed ``SAGELLM_COMM_TOPOLOGY``) is an
:class:`~sagellm_comm.errors.InvalidArgumentError` whose message names it; the CLI prints it as one
line and exits 2.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sagellm_comm.arguments import MAX_TIMEOUT_S, check_int
from sagellm_comm.benchmark import algos as algo_rules
from sagellm_comm.benchmark.config import (
    DEFAULT_CPU_SIZES,
    DEFAULT_GPU_SIZES,
    DEFAULT_GRAPH_CALLS,
    DEFAULT_SPAWN_WORLD_SIZE,
    VIRTUAL_DTYPES,
    VIRTUAL_MODES,
    VIRTUAL_RANKS,
    BenchConfig,
    LaunchPlan,
)
from sagellm_comm.benchmark.ops import OPS, element_count, resolve_dtype
from sagellm_comm.benchmark.sizes import format_size, parse_size_range
from sagellm_comm.errors import BackendNotSupportedError, InvalidArgumentError


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_run_device(text: str, option: str = "--device") -> torch.device:
    """``text`` (an ``option`` of a command) as ``cpu`` or a CUDA GPU of this host; anything else (empty, not a
    device, another device type, ``cpu:1``, a GPU this host does not have) an :class:`InvalidArgumentError`."""
    if not text.strip():  # an empty value is not the option left out
        raise InvalidArgumentError(f"{option} names no device; give cpu or cuda[:N], or leave the option out")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"{option} must be cpu or cuda[:N], got {text!r}") from None
    if device.type == "cuda":
        if not cuda_available():
            raise InvalidArgumentError(f"{option} {text}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"{option} {device}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu" or device.index not in (None, 0):  # cpu:1 reached NIXL as device id 1
        raise InvalidArgumentError(f"{option} must be cpu or cuda[:N], got {text!r}")
    return device


def torchrun_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when both are in the environment (a torchrun rank), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as exc:
            raise InvalidArgumentError(
                f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not integers"
            ) from exc
    return None


def available_kind(name: str) -> str:
    """The registered kind ``name`` resolves to, refused unless it can run on this machine."""
    from sagellm_comm.backend import get_comm_backend, is_comm_backend_available, resolve_kind

    try:
        kind = resolve_kind(name)
        if is_comm_backend_available(kind):
            return kind
        get_comm_backend(kind)  # not available: raises the registry's reason (the factory never runs)
    except BackendNotSupportedError as exc:
        raise InvalidArgumentError(f"--backend {name}: {_without_gpu_hint(exc.message)}") from exc
    raise InvalidArgumentError(f"--backend {name}: backend {kind!r} is not available on this machine")


def _without_gpu_hint(message: str) -> str:
    if cuda_available():
        return message
    return f"{message}; on a machine without GPUs use --backend gloo"


def _is_kind(path: Path, test, what: str, given: str | Path | None = None) -> bool:
    """``test(path)`` (``Path.exists``, ``is_dir``, ``is_file``); a path the system cannot even look up (a name
    too long, a null byte) is refused as ``what`` ``given`` (default: ``path``), naming the reason."""
    try:
        return test(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidArgumentError(f"{what} {path if given is None else given}: {reason}") from exc


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuse a directory this process cannot write files in; leave nothing behind either way.

    A file is created in the directory and removed: permissions alone do not say (root passes every access check,
    and still cannot write under ``/proc``).  Where the directory (or some of its parents) is missing, the missing
    directories are made, with the file, inside a probe directory of this process's own (named by its pid and a
    random token) in the nearest one that exists, then removed: the ranks of a torchrun job check the same path at
    once, and a check that made and removed the path itself would collide with another rank's (its ``mkdir``
    failing on the directory that rank just made, or its file refused because that rank just removed it).
    """
    target = Path(path)
    if _is_kind(target, Path.exists, what) and not target.is_dir():
        raise InvalidArgumentError(f"{what} {path}: exists and is not a directory")
    missing = []  # innermost first
    nearest = target
    while not _is_kind(nearest, Path.exists, what, path):
        if nearest.is_symlink():  # dangling: its name is taken, so no directory can be made there
            raise InvalidArgumentError(
                f"{what} {path}: cannot be created, {nearest} is a symbolic link that leads to no directory (its "
                "target is missing, or a loop)"
            )
        missing.append(nearest)
        nearest = nearest.parent
    if not nearest.is_dir():
        raise InvalidArgumentError(f"{what} {path}: cannot be created, {nearest} is not a directory")
    made: list[Path] = []
    step = ""
    probe_name = f".sagellm-comm-write-test-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        where = nearest
        if missing:
            step = f"cannot create {missing[-1]}"
            where = nearest / probe_name
            where.mkdir()
            made.append(where)
        for directory in reversed(missing):  # the same names, inside the probe directory
            step = f"cannot create {directory}"
            where = where / directory.name
            where.mkdir()
            made.append(where)
        step = "cannot create a file there"
        handle, probe = tempfile.mkstemp(prefix=f"{probe_name}-", dir=where)
        os.close(handle)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidArgumentError(f"{what} {path}: {step} ({reason})") from exc
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # not empty (should not happen: the directories are this process's)
                directory.rmdir()


def _plot_formats() -> tuple[str, ...]:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise InvalidArgumentError(
            "--plot needs matplotlib, which is not installed: pip install -e '.[plot]' in this checkout "
            "(or pip install matplotlib)"
        ) from exc
    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def check_selector_file(path: str) -> None:
    """Refuse a ``--selector-config`` file the custom backend could not read as its policy
    (:meth:`~sagellm_comm.selector.AlgoSelector.from_file`): every rank reads it, and would fail there."""
    from sagellm_comm.files import read_json
    from sagellm_comm.selector import AlgoSelector

    data = read_json(path, "--selector-config")
    try:
        AlgoSelector.from_dict(data, source=str(path))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--selector-config {path}: {exc.message}") from exc


def check_outputs(output_dir: str | None, plot: str | None) -> None:
    """Refuse an output directory or a plot file that cannot be written (see :func:`check_writable_dir`)."""
    if output_dir is not None:
        check_writable_dir(output_dir, "--output-dir")
    if plot is not None:
        suffix = Path(plot).suffix.lower().lstrip(".")
        formats = _plot_formats()
        if suffix not in formats:
            found = f"'.{suffix}' is not a format matplotlib writes" if suffix else "the file name has no extension"
            raise InvalidArgumentError(f"--plot {plot}: {found}; use one of: {', '.join(formats)}")
        if _is_kind(Path(plot), Path.is_dir, "--plot"):
            raise InvalidArgumentError(f"--plot {plot}: is a directory")
        check_writable_dir(Path(plot).parent, "--plot's directory")


def check_message_sizes(sizes: Sequence[int], dtype: torch.dtype) -> None:
    """Refuse an empty list (the defaults are asked for by giving no list), a message size given twice (it would be
    measured twice) or that is not a whole number of ``dtype`` elements (it would be rounded)."""
    if not sizes:
        raise InvalidArgumentError(
            "the message size list is empty: give at least one size, or none at all (None) for the defaults"
        )
    for nbytes in sizes:
        check_int(nbytes, "message size", 1)  # a float is refused, not rounded
    twice = sorted({nbytes for nbytes in sizes if sizes.count(nbytes) > 1})
    if twice:
        raise InvalidArgumentError(f"message size {twice[0]} B is given twice: give each size once")
    itemsize = torch.empty((), dtype=dtype).element_size()
    partial = [nbytes for nbytes in sizes if nbytes % itemsize]
    if partial:
        name = str(dtype).removeprefix("torch.")
        below = partial[0] // itemsize * itemsize
        examples = f"{below} or {below + itemsize}" if below else str(itemsize)
        raise InvalidArgumentError(
            f"message size {partial[0]} B is not a whole number of {name} elements ({itemsize} bytes each): "
            f"give sizes that are multiples of {itemsize} bytes (e.g. {examples})"
        )


def _given_or(sizes: Sequence[int] | None, default_range: str) -> Sequence[int]:
    """The sizes given, even an empty list (refused by :func:`check_message_sizes`), or the default range's."""
    return parse_size_range(default_range) if sizes is None else sizes


def check_distinct_points(sizes: Sequence[int], dtype: torch.dtype, op: str, world_size: int) -> None:
    """Refuse two sizes that give one point of ``op`` on ``world_size`` ranks (all-gather and reduce-scatter round a
    size down to a whole share per rank, at least one element each, as nccl-tests does): it would be measured
    twice."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    seen: dict[int, int] = {}
    for nbytes in sizes:
        count = element_count(op, nbytes, dtype, world_size)
        if count in seen:
            raise InvalidArgumentError(
                f"message sizes {seen[count]} B and {nbytes} B are both measured as {count * itemsize} B by {op} on "
                f"{world_size} ranks (a whole share per rank): give sizes that differ after that rounding"
            )
        seen[count] = nbytes


#: processes a spawned run may start per CPU core this process may run on: each rank is a Python interpreter
#: with torch imported, and a world size past this is a typo that would start processes until memory runs out
MAX_SPAWN_RANKS_PER_CPU = 8


def max_spawn_world_size() -> int:
    """The most ranks a spawned run starts on this host: :data:`MAX_SPAWN_RANKS_PER_CPU` per usable CPU core."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return MAX_SPAWN_RANKS_PER_CPU * max(1, cpus)


def launch_world(kind: str, uses_cuda: bool, requested: int | None, env: tuple[int, int] | None) -> tuple[str, int]:
    """``("torchrun", WORLD_SIZE)`` under torchrun (``env`` from :func:`torchrun_env`; ``--world-size``, when
    given, must agree), else ``("spawn", N)``: ``--world-size``, or one rank per GPU, or
    ``DEFAULT_SPAWN_WORLD_SIZE`` on the CPU; a GPU backend needs one GPU per rank, and a spawned run starts at
    most :func:`max_spawn_world_size` processes."""
    if env is not None:
        rank, world_size = env
        if requested is not None and requested != world_size:
            raise InvalidArgumentError(f"--world-size {requested} disagrees with torchrun's WORLD_SIZE={world_size}")
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        return "torchrun", world_size
    if requested is not None:
        world_size = requested
    else:
        world_size = torch.cuda.device_count() if uses_cuda else DEFAULT_SPAWN_WORLD_SIZE
    if uses_cuda and world_size > torch.cuda.device_count():
        raise InvalidArgumentError(
            f"backend {kind!r} needs one GPU per rank: world size {world_size} > {torch.cuda.device_count()} "
            "GPU(s); use --virtual-ranks N to run N ranks on one GPU, or --backend gloo"
        )
    limit = max_spawn_world_size()
    if world_size > limit:
        raise InvalidArgumentError(
            f"--world-size {world_size} would start {world_size} processes on this host, more than "
            f"{MAX_SPAWN_RANKS_PER_CPU} per CPU core ({limit} here); start larger runs under torchrun"
        )
    return "spawn", world_size


def memory_bytes(uses_cuda: bool) -> int | None:
    """The memory the buffers of a point must fit in: the smallest GPU's of this host (from its topology, which
    NVML gives without a CUDA context in the process that starts the ranks), or this host's; None if unknown."""
    if uses_cuda:
        from sagellm_comm.topology import Topology

        known = [gpu.memory_bytes for gpu in Topology.discover().gpus if gpu.memory_bytes]
        return min(known) if known else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_memory(sizes: Sequence[int], ranks: int, uses_cuda: bool) -> None:
    """Refuse a message size that ``ranks`` ranks sharing one memory (this host's on the CPU, one GPU's) cannot
    each hold once: no run of it can allocate its buffers (each rank holds at least one of ``size`` bytes)."""
    total = memory_bytes(uses_cuda)
    if total is None:
        return
    largest = max(sizes)
    if largest * ranks > total:
        where = "one GPU's" if uses_cuda else "this host's"
        need = f"{ranks} ranks x {format_size(largest)}" if ranks > 1 else format_size(largest)
        raise InvalidArgumentError(
            f"message size {format_size(largest)} ({largest} B) cannot fit: {need} is more than {where} "
            f"{total / 2**30:.1f} GiB of memory"
        )


def ranks_sharing_memory(mode: str, world_size: int, uses_cuda: bool) -> int:
    """The ranks of a run whose buffers share one memory (:func:`check_fits_memory`): one on a GPU (a GPU per rank);
    on the CPU every rank of a spawned run, and under torchrun the ranks of this host (torchrun's
    ``LOCAL_WORLD_SIZE``; ``world_size`` where it is not set or not a positive integer).  A run on a backend the
    caller made (``mode`` ``"in_process"``) counts the ranks of this host where ``LOCAL_WORLD_SIZE`` gives them, else
    one (nothing says where the other ranks run)."""
    if uses_cuda:
        return 1
    if mode in ("torchrun", "in_process"):
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        if local.isdigit() and 0 < int(local) <= world_size:
            return int(local)
        if mode == "in_process":
            return 1
    return world_size


MAX_REPETITIONS = 10_000_000  # a sample list of that many floats is 80 MB per point; more is a typo


def check_repetitions(warmup: int, iters: int, timeout: float) -> None:
    """The options every benchmark has: ``0 <= --warmup`` and ``1 <= --iters``, both integers at most
    :data:`MAX_REPETITIONS`, and ``--timeout`` > 0."""
    check_int(warmup, "--warmup", 0, MAX_REPETITIONS)
    check_int(iters, "--iters", 1, MAX_REPETITIONS)
    if not 0 < timeout <= MAX_TIMEOUT_S:  # False for NaN
        raise InvalidArgumentError(f"--timeout must be positive and finite (at most {MAX_TIMEOUT_S:g}), got {timeout}")


def check_virtual_ranks(virtual_ranks: int) -> None:
    """``--virtual-ranks`` (``sagellm-comm bench`` and ``overlap``): an integer the custom kernels run, 2..8."""
    check_int(virtual_ranks, "--virtual-ranks", VIRTUAL_RANKS.start, VIRTUAL_RANKS.stop - 1)


def check_settings() -> None:
    """A malformed ``SAGELLM_COMM_*`` setting (``docs/configuration.md``; e.g. ``SAGELLM_COMM_TOPOLOGY``) is
    refused here, naming the variable, rather than in every rank."""
    from sagellm_comm.config import CommConfig

    CommConfig.from_env()


def check_request(config: BenchConfig) -> tuple[torch.dtype, list[str]]:
    """The checks of a request whatever runs it (:func:`plan_launch`, or :func:`plan_in_process` on a backend the
    caller made): op, dtype, repetitions, the combinations of options, the selector file, the output paths.
    Returns the dtype and the algorithms asked for."""
    if config.op not in OPS:
        raise InvalidArgumentError(f"unknown op {config.op!r}; choose one of: {', '.join(OPS)}")
    dtype = resolve_dtype(config.dtype)
    check_repetitions(config.warmup, config.iters, config.timeout)
    check_int(config.graph_calls, "--graph-calls", 1)
    if config.world_size is not None:
        check_int(config.world_size, "--world-size", 1)
    algos = algo_rules.parse_algos(config.algos)
    if config.selector_config is not None and not _is_kind(
        Path(config.selector_config), Path.is_file, "--selector-config"
    ):
        raise InvalidArgumentError(f"--selector-config {config.selector_config}: no such file")
    check_outputs(config.output_dir, config.plot)
    if config.zero_copy and config.virtual_ranks is None:
        raise InvalidArgumentError("--zero-copy applies to --virtual-ranks runs only")
    if config.virtual_mode != "stacked" and config.virtual_ranks is None:
        raise InvalidArgumentError(f"--virtual-mode {config.virtual_mode} applies to --virtual-ranks runs only")
    if config.graph_calls != DEFAULT_GRAPH_CALLS and not config.graph:
        raise InvalidArgumentError(f"--graph-calls {config.graph_calls} applies to --graph runs only")
    if config.virtual_mode not in VIRTUAL_MODES:
        raise InvalidArgumentError(
            f"--virtual-mode must be one of {', '.join(VIRTUAL_MODES)}, got {config.virtual_mode!r}"
        )
    if config.zero_copy and config.virtual_mode != "streams":
        raise InvalidArgumentError("--zero-copy needs --virtual-mode streams (stacked mode reduces one stacked tensor)")
    if config.graph and config.virtual_ranks is not None and config.virtual_mode == "streams":
        # The ranks' kernels on N streams wait for each other; CUDA does not promise to run a graph's parallel
        # branches at the same time, and on an H200 one replay in a few thousand ran them one after another:
        # rank 0 spun until the timeout (docs/benchmark.md).  Stacked mode is one launch: nothing to co-schedule.
        raise InvalidArgumentError(
            "--graph needs --virtual-mode stacked: a CUDA graph may run the rank streams' kernels one after "
            "another, and each waits for the others until the timeout"
        )
    return dtype, algos


def check_given_backend(backend: Any, world_size: int | None, virtual_ranks: int | None, call: str) -> int:
    """What a benchmark run on ``backend``, a backend the caller made (``call``: the function given it, for the
    message), implies whatever it measures: the backend is initialised, ``virtual_ranks`` (ranks the benchmark
    makes) is not given, and ``world_size``, if given, is the backend's.  Returns the backend's world size."""
    if not getattr(backend, "is_initialized", False):
        raise InvalidArgumentError(f"{call}(backend=...) needs an initialised CommBackend (call init)")
    if virtual_ranks is not None:
        raise InvalidArgumentError("virtual_ranks runs ranks of its own; it does not take a backend: pass a kind")
    given = backend.world_size
    if world_size is not None and world_size != given:
        ranks = f"{given} rank{'s' if given != 1 else ''}"
        raise InvalidArgumentError(f"world_size {world_size} disagrees with the given backend's world of {ranks}")
    return given


def plan_in_process(config: BenchConfig, backend: Any) -> LaunchPlan:
    """Check ``config`` for a run on ``backend``, an initialised backend of this process's rank (every rank of its
    world calls): the checks of every request (:func:`check_request`), then those of a given backend.  Raises
    InvalidArgumentError naming the problem, before anything is measured."""
    dtype, algos = check_request(config)
    world_size = check_given_backend(backend, config.world_size, config.virtual_ranks, "run_benchmark")
    if config.selector_config is not None:
        raise InvalidArgumentError(
            "--selector-config applies to a backend the benchmark makes; give the policy to the backend you made "
            "(get_comm_backend('custom', selector=...))"
        )
    kind = backend.name
    algo_rules.check_algos(algos, kind, config.op)
    if algo_rules.nccl_algo_env(algos) is not None:
        raise InvalidArgumentError("ring/tree set NCCL_ALGO before init; pass a backend kind, not an instance")
    cuda = backend.device.type == "cuda"
    if config.graph and not cuda:
        raise InvalidArgumentError("--graph needs a backend on a CUDA device")
    sizes = tuple(_given_or(config.sizes, DEFAULT_GPU_SIZES if cuda else DEFAULT_CPU_SIZES))
    check_message_sizes(sizes, dtype)
    check_distinct_points(sizes, dtype, config.op, world_size)
    check_fits_memory(sizes, ranks_sharing_memory("in_process", world_size, cuda), cuda)
    return LaunchPlan("in_process", world_size, kind, sizes, cuda)


def plan_launch(config: BenchConfig) -> LaunchPlan:
    """Check ``config`` and decide how to run it; raises InvalidArgumentError naming the problem."""
    dtype, algos = check_request(config)
    check_settings()
    cuda = cuda_available()

    if config.virtual_ranks is not None:
        check_virtual_ranks(config.virtual_ranks)
        if not cuda:
            raise InvalidArgumentError("--virtual-ranks needs a CUDA GPU, and none is available here")
        if config.world_size is not None:
            raise InvalidArgumentError("give either --virtual-ranks or --world-size, not both")
        if torchrun_env() is not None:
            raise InvalidArgumentError("--virtual-ranks runs in one process; do not start it under torchrun")
        if config.backend not in ("auto", "custom"):
            raise InvalidArgumentError(f"--virtual-ranks runs the custom kernels; --backend {config.backend} cannot")
        if dtype not in VIRTUAL_DTYPES:
            raise InvalidArgumentError(f"the custom all-reduce runs float32, float16 and bfloat16, not {config.dtype}")
        algo_rules.check_algos(algos, "custom", config.op, virtual=True)
        if config.selector_config is not None:
            check_selector_file(config.selector_config)
        sizes = tuple(_given_or(config.sizes, DEFAULT_GPU_SIZES))
        check_message_sizes(sizes, dtype)
        check_distinct_points(sizes, dtype, config.op, config.virtual_ranks)
        check_fits_memory(sizes, config.virtual_ranks, True)
        return LaunchPlan("virtual", config.virtual_ranks, "custom", sizes, True)

    kind = available_kind(config.backend)
    uses_cuda = kind not in ("gloo",) and cuda
    if config.graph and not cuda:
        raise InvalidArgumentError("--graph times CUDA-graph replays and needs a CUDA GPU; none is available here")
    if config.graph and not uses_cuda:
        raise InvalidArgumentError(f"--graph times CUDA-graph replays; backend {kind!r} runs on the CPU")
    if config.selector_config is not None and kind != "custom":
        raise InvalidArgumentError(
            f"--selector-config is the custom all-reduce's policy; backend {kind!r} does not use it"
        )
    if config.selector_config is not None:
        check_selector_file(config.selector_config)
    algo_rules.check_algos(algos, kind, config.op)
    if kind == algo_rules.CUSTOM_KIND:  # the custom backend this run makes runs NCCL with a GPU, Gloo without
        for algo in algos:
            reason = algo_rules.engine_reason(algo, "nccl" if cuda else "gloo")
            if reason is not None:
                raise InvalidArgumentError(reason)
    wanted, existing = algo_rules.nccl_algo_env(algos), os.environ.get("NCCL_ALGO", "").strip()
    if wanted and existing and existing.lower() != wanted.lower():
        raise InvalidArgumentError(
            f"NCCL_ALGO={existing} is set in the environment but --algo asks for {wanted}; unset one of them"
        )
    sizes = tuple(_given_or(config.sizes, DEFAULT_GPU_SIZES if uses_cuda else DEFAULT_CPU_SIZES))
    check_message_sizes(sizes, dtype)
    mode, world_size = launch_world(kind, uses_cuda, config.world_size, torchrun_env())
    check_distinct_points(sizes, dtype, config.op, world_size)
    check_fits_memory(sizes, ranks_sharing_memory(mode, world_size, uses_cuda), uses_cuda)
    return LaunchPlan(mode, world_size, kind, sizes, uses_cuda)
