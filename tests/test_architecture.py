"""docs/architecture.md's "one of each" promises, checked on the package source: one timer, one end of a benchmark
run, algorithm names only from ``selector.py``, no module reading another module's private attributes."""

from __future__ import annotations

import ast
import inspect
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sagellm_comm"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), str(path))


def test_marks_time_intervals_on_the_host_clock():
    from sagellm_comm.benchmark.timing import Marks

    marks = Marks("cpu", 4)
    for _ in range(2):  # a second run starts over
        marks.start()
        marks.mark()
        time.sleep(0.002)
        marks.mark()
        marks.mark()
    first, second = marks.intervals_ms()
    assert first >= 1.5 and 0 <= second < first


def test_the_overlap_benchmark_times_with_the_one_timer():
    """``benchmark/timing.py`` is the one timer: the overlap measurement records no CUDA events of its own."""
    from sagellm_comm.benchmark import overlap_measure

    tree = ast.parse(inspect.getsource(overlap_measure))
    own = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("Event", "elapsed_time")]
    assert not own, f"overlap_measure.py times with its own events at lines {own}"


def test_a_benchmark_run_ends_through_the_one_write_and_report():
    """``benchmark/report.py``'s ``write_and_report`` is the one end of a run (its files, its plot, then the table):
    no other module prints a run's table and files itself (``print_report``)."""
    callers = {
        name
        for name, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and "print_report" in (getattr(node.func, "id", None), getattr(node.func, "attr", None))
    }
    assert callers == {"sagellm_comm/benchmark/report.py"}, f"print_report called outside report.py: {callers}"


# Private attributes of other projects' modules the package reads on purpose (the host-cost fast paths).
EXTERNAL = ("torch", "os")


def _module_local_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def private_reads(path: str, tree: ast.Module) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` / ``cls`` / ``super()``, a name defined in this module, or another
    project's module: a read of another module's private attribute."""
    local = _module_local_names(tree) | {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in local:
            continue
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            continue
        root = _root(base)
        if isinstance(root, ast.Name) and root.id in EXTERNAL:
            continue
        found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_attributes():
    offenders = [line for path, tree in _modules() for line in private_reads(path, tree)]
    assert not offenders, "private attributes read across modules:\n" + "\n".join(offenders)


def test_the_private_attribute_scan_sees_what_it_should():
    tree = ast.parse(
        "import torch\nclass A:\n    def f(self, car):\n        return car._timeout, self._x, A._y, torch._C, "
        "self.group._table, super()._z"
    )
    assert [line.split(": ")[1] for line in private_reads("m.py", tree)] == ["car._timeout", "self.group._table"]


def _algorithm_names() -> set[str]:
    """The names ``selector.py`` spells that mean nothing else in the package.  ``auto`` (also a backend kind),
    ``nccl`` (also an engine) and ``fp8`` (also a quantisation mode) are left out: a literal of them may mean
    the other thing."""
    from sagellm_comm import selector as s

    return {
        *s.KERNEL_ALGOS, s.HIERARCHICAL_ALGO, s.COLLECTIVE_KERNEL_ALGO, *s.NCCL_ALGO_NAMES, *s.GEMM_PATHS,
        s.UNFUSED_PATH, s.FOLLOW_ALL_REDUCE,
    }  # fmt: skip


def algorithm_literals(path: str, tree: ast.Module, names: set[str]) -> list[str]:
    """String literals (docstrings aside) equal to an algorithm or path name."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    ]


def test_algorithm_names_are_spelled_only_in_selector_py():
    names = _algorithm_names()
    offenders = [
        line
        for path, tree in _modules()
        if path != "sagellm_comm/selector.py"
        for line in algorithm_literals(path, tree, names)
    ]
    assert not offenders, "algorithm names spelled outside selector.py (import its constants):\n" + "\n".join(offenders)


def test_the_algorithm_name_scan_sees_what_it_should():
    tree = ast.parse('"""one_shot"""\nx = "two_shot"\ny = f"rmsnorm_{x}"\nz = "one_shot_fp8"\nif x == "fused": pass')
    found = [line.split(": ")[1] for line in algorithm_literals("m.py", tree, _algorithm_names())]
    assert found == ["'two_shot'", "'fused'"]


def _kernel_modules():
    return [(path, tree) for path, tree in _modules() if path.startswith("sagellm_comm/kernels/")]


def test_one_spin_loop_in_the_package():
    """Every wait of every kernel (flag barriers, GEMM tile flags, Lamport tiles, the fused kernel's row exchange)
    goes through ``_bounded_wait`` (kernels/all_reduce.py), which keeps its deadline and latch through
    ``_wait_step``.  The only other ``while`` loop is the resident copier's serving loop (kernels/block_copy.py),
    which waits for nobody: it reads the clock every pass and exits once idle or old."""
    loops = []
    for path, tree in _kernel_modules():
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.While):
                    calls = {
                        c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                    }
                    loops.append((f"{path}:{fn.name}", "_wait_step" in calls or "_uniform_clock" in calls))
    assert loops == [
        ("sagellm_comm/kernels/all_reduce.py:_bounded_wait", True),
        ("sagellm_comm/kernels/block_copy.py:block_copy_server_kernel", True),
    ], f"spin loops: {loops}"
    callers = {
        f"{path}:{fn.name}"
        for path, tree in _kernel_modules()
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
        if any(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "_bounded_wait" for c in ast.walk(fn))
    }
    assert callers == {
        "sagellm_comm/kernels/all_reduce.py:_wait_flags",
        "sagellm_comm/kernels/lamport_all_reduce.py:_wait_tile",
        "sagellm_comm/kernels/fused_all_reduce_rmsnorm.py:_row_exchange",
    }, callers


def test_collective_kernels_share_the_rank_view_and_the_slot_address():
    """The virtual-rank prologue (``tl.program_id(1)`` as the rank, the table row and control words) is written
    once, in ``_rank_view``, and the staging-slot address once, in ``_slot_offset``."""
    prologues, slot_formulas = [], []
    for path, tree in _kernel_modules():
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            source = ast.unparse(fn)
            if "tl.program_id(1)" in source and "rank * CTRL_WORDS" in source and fn.name != "_rank_view":
                prologues.append(f"{path}:{fn.name}")
            if "slot_bytes * (1 + epoch % 2)" in source and fn.name != "_slot_offset":
                slot_formulas.append(f"{path}:{fn.name}")
    assert not prologues, f"kernels rebuilding the rank view: {prologues}"
    assert not slot_formulas, f"the slot address written out again: {slot_formulas}"


# Tile loops that keep their own offsets, and why (docs/architecture.md says the same): two-shot's batched copies
# cut a ``[ranks, tile]`` block (a row per chunk, masks per row), not one tile.
OPEN_CODED_TILES = {
    "sagellm_comm/kernels/all_reduce.py:two_shot_all_reduce_kernel": 2,
}


def open_coded_tiles(tree: ast.Module) -> dict[str, int]:
    """Per function, the statements that cut a tile by hand: ``x = <tile> * BLOCK + ...`` (the grid-stride tile
    loops' offsets), outside the two helpers that do it."""
    found = {}
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        if fn.name in ("_tile_offsets", "_chunk_tile_offsets"):
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.BinOp)
                and isinstance(node.value.op, ast.Add)
                and isinstance(node.value.left, ast.BinOp)
                and isinstance(node.value.left.op, ast.Mult)
                and isinstance(node.value.left.right, ast.Name)
                and node.value.left.right.id == "BLOCK"
            ):
                found[fn.name] = found.get(fn.name, 0) + 1
    return found


def test_tile_loops_cut_their_tiles_with_the_one_helper():
    """The grid-stride tile loops take their offsets and mask from ``_tile_offsets`` / ``_chunk_tile_offsets``
    (kernels/all_reduce.py); only the copies listed in ``OPEN_CODED_TILES`` keep their own."""
    counts = {}
    for path, tree in _kernel_modules():
        counts.update({f"{path}:{name}": n for name, n in open_coded_tiles(tree).items()})
    assert counts == OPEN_CODED_TILES


def test_the_open_coded_tile_scan_sees_what_it_should():
    tree = ast.parse(
        "def k(tile, BLOCK, lane):\n    offs = tile * BLOCK + lane\n    x = tile * TILE + lane\n"
        "def _tile_offsets(tile, BLOCK):\n    offs = tile * BLOCK + lane\n"
    )
    assert open_coded_tiles(tree) == {"k": 1}


def _nested_unpacking(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Tuple | ast.List) and any(isinstance(e, ast.Tuple | ast.List) for e in target.elts)
    ]


def test_kernels_never_unpack_nested_tuples():
    """Triton's dependency finder (3.6, the GPU machines' version) cannot hash a nested assignment target
    (``(a, b), c = f()``): every kernel using one fails at its first launch, and the interpreter does not see it."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted((PACKAGE / "kernels").glob("*.py"))
        for line in _nested_unpacking(ast.parse(path.read_text()))
    ]
    assert not offenders, offenders
    assert _nested_unpacking(ast.parse("(a, b), c = f()")) == [1]  # the check itself sees one
