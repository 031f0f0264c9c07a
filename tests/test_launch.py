"""The one launcher (``sagellm_comm/launch.py``): named arguments bound by the kernel's own signature, and no
other module calling Triton's launch API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

PACKAGE = Path(__file__).resolve().parent.parent / "sagellm_comm"


@triton.jit
def _scale_kernel(inp, out, numel, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out + offs, tl.load(inp + offs, mask=mask) * factor, mask=mask)


@triton.jit
def _scale_kernel_reordered(factor, numel, out, inp, BLOCK: tl.constexpr = 64):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out + offs, tl.load(inp + offs, mask=mask) * factor, mask=mask)


def test_bind_orders_named_arguments_by_the_kernels_signature():
    from sagellm_comm.launch import Launcher

    inp, out = torch.ones(3), torch.zeros(3)
    named = dict(inp=inp, out=out, numel=3, factor=2.0, BLOCK=64)
    first = Launcher(_scale_kernel, False, 0).bind(**named)
    second = Launcher(_scale_kernel_reordered, False, 0).bind(**named)
    assert first == (inp, out, 3, 2.0, 64)
    assert second == (2.0, 3, out, inp, 64)  # the same names land where this signature wants them
    # A parameter with a default may be left out.
    assert Launcher(_scale_kernel_reordered, False, 0).bind(inp=inp, out=out, numel=3, factor=2.0)[-1] == 64


def test_bind_refuses_missing_and_unknown_names():
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.launch import Launcher

    launcher = Launcher(_scale_kernel, False, 0)
    with pytest.raises(InvalidArgumentError, match=r"missing \['factor'\]"):
        launcher.bind(inp=torch.ones(1), out=torch.ones(1), numel=1, BLOCK=64)
    with pytest.raises(InvalidArgumentError, match=r"unknown \['scale'\]"):
        launcher.bind(inp=torch.ones(1), out=torch.ones(1), numel=1, factor=1.0, scale=2.0, BLOCK=64)
    with pytest.raises(InvalidArgumentError, match=r"missing \['factor'\], unknown \['scale'\]"):
        launcher.bind(inp=torch.ones(1), out=torch.ones(1), numel=1, scale=2.0, BLOCK=64)


def test_cache_key_holds_constexpr_values_and_what_triton_specialises_on():
    from sagellm_comm.launch import Launcher

    launcher = Launcher(_scale_kernel, False, 0)
    inp, out = torch.ones(64), torch.zeros(64)
    key = launcher.key(launcher.bind(inp=inp, out=out, numel=64, factor=2.0, BLOCK=64))
    assert key != launcher.key(launcher.bind(inp=inp, out=out, numel=64, factor=2.0, BLOCK=128))
    assert key != launcher.key(launcher.bind(inp=inp, out=out, numel=63, factor=2.0, BLOCK=64))
    assert key == launcher.key(launcher.bind(inp=inp, out=out, numel=32, factor=3.0, BLOCK=64))
    # An integer's range decides the type a binary takes (i32, u32, i64, u64): a binary built for a 32-bit value
    # cannot take a 64-bit one (a timeout in ticks, a byte offset), so each range has its own key.
    keys = {launcher.key(launcher.bind(inp=inp, out=out, numel=n, factor=2.0, BLOCK=64))
            for n in (32, 2**31 + 16, 2**32 + 16, 2**63 + 16)}  # fmt: skip
    assert len(keys) == 4


def test_low_bits_and_bit_length_of_a_non_negative_integer_decide_its_part_of_the_key():
    """What a caller's own plans may key a launch by (``ipc.py``'s one-block launches): integers alike in these
    two take the same binary."""
    from sagellm_comm.launch import Launcher

    launcher = Launcher(_scale_kernel, False, 0)
    inp = torch.ones(1)
    edges = [0, 1, 16, 2**31, 2**32, 2**48, 2**63, 2**64]
    values = {e + delta for e in edges for delta in (-33, -17, -16, -15, -1, 0, 1, 2, 15, 16, 17, 31)} | {
        int(v) for v in torch.randint(0, 2**62, (200,), generator=torch.Generator().manual_seed(0))}  # fmt: skip
    keys: dict[tuple, set] = {}
    for value in (v for v in values if v >= 0):
        key = launcher.key(launcher.bind(inp=inp, out=inp, numel=value, factor=2.0, BLOCK=64))
        keys.setdefault((value & 15, value.bit_length()), set()).add(key)
    assert all(len(k) == 1 for k in keys.values())
    assert len({k for ks in keys.values() for k in ks}) == 9  # /16 or not (or 1) in each of the four ranges


def test_direct_is_the_compiled_binary_of_that_key_only(monkeypatch):
    from sagellm_comm.launch import Launcher

    launcher = Launcher(_scale_kernel, False, 0)
    values = launcher.bind(inp=0x1000, out=0x2000, numel=64, factor=2.0, BLOCK=64)  # integer addresses
    assert launcher.direct(values) is None  # not launched yet

    def binary(grid_x, grid_y, stream, raw):
        raise AssertionError("not launched here")

    monkeypatch.setattr(Launcher, "compile", lambda self, grid, values, launch=True: binary)  # what a GPU gives
    launcher((1, 1), values)
    assert launcher.direct(values) is binary
    assert launcher.direct(launcher.bind(inp=0x1010, out=0x2020, numel=32, factor=3.0, BLOCK=64)) is binary
    assert launcher.direct(launcher.bind(inp=0x1000, out=0x2000, numel=63, factor=2.0, BLOCK=64)) is None
    assert launcher.direct(launcher.bind(inp=0x1000, out=0x2000, numel=64, factor=2.0, BLOCK=128)) is None
    tensors = launcher.bind(inp=torch.ones(64), out=torch.ones(64), numel=64, factor=2.0, BLOCK=64)
    launcher((1, 1), tensors)
    assert launcher.is_loaded(tensors) and launcher.direct(tensors) is None  # its raw values are addresses


def test_named_launch_runs_under_the_interpreter(monkeypatch):
    from sagellm_comm.launch import Launcher, interpreting

    if not interpreting():
        pytest.skip("runs the kernel on CPU tensors: needs TRITON_INTERPRET=1")
    inp, out = torch.arange(100, dtype=torch.float32), torch.zeros(100)
    Launcher(_scale_kernel_reordered, False, 0).launch((2, 1), inp=inp, out=out, numel=100, factor=3.0)
    torch.testing.assert_close(out, inp * 3.0, rtol=0, atol=0)


def _triton_launches(tree: ast.AST) -> list[int]:
    """Lines that launch through Triton: ``kernel[grid](...)``, ``kernel.warmup(...)``, ``direct_launch(...)``."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Subscript)
            or (isinstance(func, ast.Attribute) and func.attr == "warmup")
            or (isinstance(func, ast.Name) and func.id == "direct_launch")
        ):
            lines.append(node.lineno)
    return lines


def test_only_launch_py_calls_tritons_launch_api():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "launch.py" and path.parent == PACKAGE:
            continue
        for line in _triton_launches(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert not offenders, f"kernel launches outside sagellm_comm/launch.py: {offenders}"
    assert _triton_launches(ast.parse((PACKAGE / "launch.py").read_text()))  # the scan does see launches


def test_every_kernel_launch_binds_by_name():
    """No module passes a kernel's arguments as positional tuples: launches go through ``bind`` / ``launch``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "kernels" or path.name == "launch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            preload = isinstance(node.func, ast.Attribute) and node.func.attr == "preload"
            tuples = [isinstance(a, ast.Tuple) and bool(a.elts) for a in node.args[:2]]
            if (preload and tuples[0]) or tuples == [True, True]:  # preload((a, ...)), launcher(grid, (a, ...))
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"positional kernel arguments: {offenders}"


@pytest.mark.parametrize("value", ["1", "true", "on", "0", "false", ""])
def test_interpreting_is_what_triton_decides(monkeypatch, value):
    # Triton's jit makes interpreted kernels for TRITON_INTERPRET=true too: the package must not then launch them
    # as compiled binaries on a device
    from sagellm_comm.launch import interpreting

    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is bool(knobs.runtime.interpret)
