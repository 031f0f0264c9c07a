"""docs/architecture.md's "one of each" promises, checked on the package source: one timer, algorithm names
only from ``selector.py``, no module reading another module's private attributes."""

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
