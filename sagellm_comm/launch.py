"""The one place that launches Triton kernels through the compiled binary's launcher.

A Triton launch through ``kernel[grid](...)`` costs ~19 us of host time on a single-GPU H100 host; a collective
that takes 3 us on the device cannot afford that.  After the first launch of a specialisation has
compiled and bound the kernel, later launches call the binary's generated C launcher directly with
integer pointers.  Every kernel of the package goes through :class:`Launcher` (or, for the all-reduce's
per-shape plans, :func:`direct_launch`), so Triton's launch internals are touched here only.

Also here: whether kernels run under the Triton interpreter, and the device-side timeout in the unit the
kernels' bounded waits count (nanoseconds).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .errors import InvalidArgumentError


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def timeout_ticks(timeout_s: float, use_ptx: bool) -> int:
    """``timeout_s`` in the unit of the kernels' bounded waits: nanoseconds, on the GPU (``%globaltimer``) and
    under the interpreter (the host clock) alike (see ``kernels/all_reduce.py``)."""
    if timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be positive, got {timeout_s}")
    return int(timeout_s * 1e9)


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


class Launcher:
    """Direct launches of one Triton kernel with cached binaries.

    The first launch of a specialisation goes through ``kernel[grid](...)``; later ones call the compiled
    binary's launcher with integer pointers (:func:`direct_launch`).  The key holds what Triton specialises
    on: tensor dtypes and 16-byte alignment, integers' divisibility by 16 and equality to 1, and the
    constexpr values.
    """

    def __init__(self, kernel, use_ptx: bool, device_index: int, **options):
        self.kernel = kernel
        self.use_ptx = use_ptx
        self.device_index = device_index
        self.options = options
        self.cache: dict[tuple, Callable] = {}

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
        fast = direct_launch(compiled)
        if fast is not None:
            self.cache[key] = fast

    def is_loaded(self, args: Sequence, constexprs: Sequence) -> bool:
        """True when this specialisation's binary is compiled and loaded (its next launch cannot block)."""
        return self.key(args, constexprs) in self.cache

    def __call__(self, grid: tuple[int, int], args: Sequence, constexprs: Sequence, stream: int | None = None) -> None:
        """Launch on the current stream, or on raw stream handle ``stream`` once this specialisation is loaded
        (:meth:`is_loaded`; the first launch compiles through Triton and uses the current stream)."""
        key = self.key(args, constexprs)
        fast = self.cache.get(key)
        if fast is not None:
            raw = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
            if stream is None:
                stream = torch._C._cuda_getCurrentRawStream(self.device_index)
            fast(grid[0], grid[1], stream, (*raw, *constexprs))
            return
        compiled = self.kernel[grid](*args, *constexprs, **self.options)
        if self.use_ptx:
            fast = direct_launch(compiled)
            if fast is not None:
                self.cache[key] = fast
