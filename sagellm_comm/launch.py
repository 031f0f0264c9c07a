"""The one place that launches Triton kernels: named arguments, cached binaries, direct launches.

A launch through ``kernel[grid](...)`` runs Triton's Python launch path (binding, specialisation, checks):
tens of microseconds of host time, where a small collective takes a few on the device.  After the first
launch of a specialisation has compiled and loaded the binary, later launches call the binary's generated
C launcher directly with integer pointers.

Arguments are given by name (:meth:`Launcher.bind`): the kernel's own signature orders them, so a kernel
whose parameters are reordered or renamed fails at the first launch with a typed error instead of reading
one argument as another.  Hot paths bind once at set-up (or once per shape) and launch the bound tuple.
Every kernel of the package is launched through :class:`Launcher`; no other module calls Triton's launch
API (``kernel[grid]``, ``kernel.warmup``, a compiled kernel's ``run``).

Also here: whether kernels run under the Triton interpreter, and the device-side timeout in the unit the
kernels' bounded waits count (nanoseconds).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .arguments import check_timeout
from .errors import InvalidArgumentError


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors): Triton's own
    reading of the variable where this Triton has one (it also takes ``true``, ``on``...), so the package never
    launches as a compiled binary a kernel Triton made an interpreted one."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def timeout_ticks(timeout_s: float, use_ptx: bool) -> int:
    """``timeout_s`` in the unit of the kernels' bounded waits: nanoseconds, on the GPU (``%globaltimer``) and
    under the interpreter (the host clock) alike (see ``kernels/all_reduce.py``)."""
    return int(check_timeout(timeout_s, "timeout_s") * 1e9)


def direct_launch(compiled) -> Callable | None:
    """``fast(grid_x, grid_y, stream, args)``: a launch of an already compiled kernel that skips Triton's
    Python launch path.

    Calls the generated C launcher (``CompiledKernel.run.launch``) with the kernel's function handle and
    metadata bound once; falls back to ``CompiledKernel.run`` when this Triton's launcher does not have
    that shape, or when the kernel needs scratch memory allocated per launch.  Returns None when neither
    is available (e.g. under the interpreter).
    """
    run = getattr(compiled, "run", None)
    function = getattr(compiled, "function", None)
    metadata = getattr(compiled, "packed_metadata", None)
    if run is None or function is None or metadata is None:
        return None
    launch = getattr(run, "launch", None)
    simple = (
        launch is not None
        and getattr(run, "global_scratch_size", 1) == 0
        and getattr(run, "profile_scratch_size", 1) == 0
        and hasattr(run, "launch_cooperative_grid")
        and hasattr(run, "launch_pdl")
    )
    if simple:
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl

        def fast(grid_x: int, grid_y: int, stream: int, args: tuple) -> None:
            launch(grid_x, grid_y, 1, stream, function, coop, pdl, None, None, metadata, None, None, None, *args)

        return fast

    def generic(grid_x: int, grid_y: int, stream: int, args: tuple) -> None:
        run(grid_x, grid_y, 1, stream, function, metadata, None, None, None, *args)

    return generic


# Triton types an integer argument by its range (i32, u32, i64, u64): a binary built for one range cannot take a
# value of another, so the range is part of a binary's key.
_I32_MIN, _I32_MAX, _U32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**32 - 1, 2**63 - 1


def _tensor_positions(values: Sequence) -> tuple[int, ...]:
    """Where ``values`` holds tensors (a direct launch passes their addresses)."""
    return tuple(i for i, a in enumerate(values) if isinstance(a, torch.Tensor))


def _is_constexpr(annotation) -> bool:
    """Whether a kernel parameter's annotation is ``tl.constexpr`` (a string under postponed annotations)."""
    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


class Launcher:
    """Launches of one Triton kernel with named arguments and cached binaries.

    ``Launcher(kernel, use_ptx, device_index, **options)``: ``options`` are Triton's launch options
    (``num_warps``, ``launch_pdl``...), fixed for this launcher.  :meth:`bind` turns named arguments into
    the tuple of every parameter's value in signature order; :meth:`__call__` launches such a tuple.  The
    first launch of a specialisation goes through ``kernel[grid](...)``; later ones call the compiled binary's
    launcher with integer pointers (:func:`direct_launch`).  The cache key holds what Triton specialises on:
    tensor dtypes and 16-byte alignment, integers' divisibility by 16, equality to 1 and range (the integer type
    a binary takes), and the constexpr values.  Of a non-negative integer, its low four bits and its bit length
    decide all three: a caller that keeps its own plans (arguments bound once, a few integers filled in per call,
    :meth:`direct`) may key them with those.
    """

    def __init__(self, kernel, use_ptx: bool, device_index: int, **options):
        self.kernel = kernel
        self.use_ptx = use_ptx
        self.device_index = device_index
        self.options = options
        params = list(inspect.signature(kernel.fn).parameters.values())
        self.names: tuple[str, ...] = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.constexpr_positions = frozenset(i for i, p in enumerate(params) if _is_constexpr(p.annotation))
        self.runtime_positions = tuple(i for i in range(len(params)) if i not in self.constexpr_positions)
        self.cache: dict[tuple, tuple[Callable, tuple[int, ...]]] = {}  # key -> (direct launch, tensor positions)

    def bind(self, **named) -> tuple:
        """Every parameter's value in the kernel's signature order, from ``named`` (a parameter with a default
        may be left out).  Raises ``InvalidArgumentError`` naming what is missing or unknown."""
        if len(named) != len(self.names):
            named = {**self.defaults, **named}
        try:
            values = tuple(map(named.__getitem__, self.names))
        except KeyError:
            values = None
        if values is None or len(named) != len(self.names):
            missing = [n for n in self.names if n not in named]
            unknown = [n for n in named if n not in self.names]
            raise InvalidArgumentError(
                f"{self.kernel.fn.__name__} takes {list(self.names)}; missing {missing}, unknown {unknown}"
            )
        return values

    def key(self, values: Sequence) -> tuple:
        """The cache key of a launch of ``values`` (see the class docstring); on every hot path, so it touches
        only the parameters that are not constexpr."""
        key = list(values)
        for i in self.runtime_positions:
            a = key[i]
            if a.__class__ is int:
                key[i] = (
                    not a & 15,
                    a == 1,
                    0 if _I32_MIN <= a <= _I32_MAX else 1 if 0 <= a <= _U32_MAX else 2 if a <= _I64_MAX else 3,
                )
            elif isinstance(a, torch.Tensor):
                key[i] = (a.dtype, not a.data_ptr() & 15)
            else:
                key[i] = type(a)
        return tuple(key)

    def compile(self, grid: tuple[int, int], values: Sequence, launch: bool = True) -> Callable | None:
        """Launch ``values`` (from :meth:`bind`) through Triton on the current stream (``launch`` False: only
        compile and load the binary), and return its direct launch ``fast(grid_x, grid_y, stream, raw)``
        (``raw``: ``values`` with tensors as integer addresses), or None (the interpreter, or a binary this
        Triton cannot launch directly).  Callers that cache per-shape plans keep what this returns.

        Loading a module may wait for the device to go idle; a kernel that spins for a peer must not be
        running on this device then (virtual ranks), so such kernels are loaded before the first spin.
        """
        if launch:
            compiled = self.kernel[grid](*values, **self.options)
        elif self.use_ptx:
            compiled = self.kernel.warmup(*values, grid=grid, **self.options)
            _ = compiled.run  # the binary's launcher, a lazy property: reading it loads the module now
        else:
            return None
        return direct_launch(compiled) if self.use_ptx else None

    def preload(self, values: Sequence) -> None:
        """Compile and load this specialisation without launching it (nothing under the interpreter); see
        :meth:`compile`."""
        key = self.key(values)
        if not self.use_ptx or key in self.cache:
            return
        fast = self.compile((1, 1), values, launch=False)
        if fast is not None:
            self.cache[key] = (fast, _tensor_positions(values))

    def direct(self, values: Sequence) -> Callable | None:
        """The direct launch ``fast(grid_x, grid_y, stream, values)`` of ``values``' specialisation once a launch
        compiled and loaded it, for integer-only ``values`` (from :meth:`bind`); None before that, under the
        interpreter, or when ``values`` hold tensors.  A caller keeping it must launch with it only values of the
        same key (the class docstring)."""
        entry = self.cache.get(self.key(values))
        if entry is None or entry[1]:
            return None
        return entry[0]

    def is_loaded(self, values: Sequence) -> bool:
        """True when this specialisation's binary is compiled and loaded (its next launch cannot block)."""
        return self.key(values) in self.cache

    def __call__(self, grid: tuple[int, int], values: Sequence, stream: int | None = None) -> None:
        """Launch ``values`` (from :meth:`bind`) on the current stream, or on raw stream handle ``stream`` (the
        first launch of a specialisation compiles through Triton, on that stream too)."""
        key = self.key(values)
        entry = self.cache.get(key)
        if entry is not None:
            fast, tensors = entry
            if tensors:
                raw = list(values)
                for i in tensors:
                    raw[i] = raw[i].data_ptr()
            else:
                raw = values
            if stream is None:
                stream = torch._C._cuda_getCurrentRawStream(self.device_index)
            fast(grid[0], grid[1], stream, raw)
            return
        if stream is not None and self.use_ptx:
            on = torch.cuda.ExternalStream(stream, device=torch.device("cuda", self.device_index))
            with torch.cuda.stream(on):
                fast = self.compile(grid, values)
        else:
            fast = self.compile(grid, values)
        if fast is not None:
            self.cache[key] = (fast, _tensor_positions(values))

    def launch(self, grid: tuple[int, int], stream: int | None = None, **named) -> None:
        """:meth:`bind` then launch: the form for launches off the hot path."""
        self(grid, self.bind(**named), stream)
