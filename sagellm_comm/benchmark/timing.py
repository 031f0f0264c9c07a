"""Timing a collective: per-iteration samples, warm-up, statistics, CUDA graphs.

How one (size, algo) point is timed (see :func:`time_iterations`):

1. ``warmup`` untimed calls (compilation, lazy communicator set-up, caches).
2. A barrier (``barrier()``, then a device synchronisation) so every rank starts the timed batch
   together.
3. ``iters`` timed calls back to back.  Before each call, ``reset()`` (if given) restores the inputs of
   an in-place collective; it runs *outside* the timed interval.  On CUDA every call is bracketed by a
   pair of pre-allocated CUDA events recorded on the current stream; on CPU the interval is
   ``time.perf_counter_ns`` around the (blocking) call.

   What a CUDA interval means depends on who is slower.  When the host submits slower than the GPU
   runs (small messages, eager calls), the GPU drains its queue and each interval includes the host's
   submission of the call: that is the eager latency a caller sees.  ``hold_device=True`` (used for
   CUDA-graph replays and the transfer benchmark's device timing) first enqueues a device-side spin
   (``torch.cuda._sleep``) long enough for the host to queue the whole batch behind it, so the intervals
   are device time alone; a process timed alone checks that the spin outlasted the queuing, and queues
   the batch again behind a longer one when it did not.
4. The samples (microseconds) are summarised by :func:`summarize`: median, p10/p90, min/max, mean.

Nothing is allocated inside the timed loop: events are created before it, inputs are pre-allocated by
the caller.  The cross-rank reduction (the slowest rank is the collective's time) is done by the
runner, on the statistics, after the batch.

CUDA graphs (:func:`time_graph`, used by ``--graph`` and by every script under ``bench/``): ``fn`` is
run ``CAPTURE_WARMUP`` times eagerly on a side stream, ``calls`` back-to-back calls are captured into one
graph, then the graph's replays are timed as above (``warmup`` untimed replays, barrier, device held)
and each sample is divided by ``calls``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

CAPTURE_WARMUP = 3  # eager calls on a side stream before a graph is captured
DEFAULT_HOST_US_PER_CALL = 100.0  # host submission estimate when there was no warm-up to measure it
MAX_HOLD_US = 2e6  # never hold the device longer than 2 s
HOLD_TRIES = 3  # batches of one process queued behind a hold, at most, until one is queued before it ends
STAT_FIELDS = ("median_us", "p10_us", "p90_us", "min_us", "max_us", "mean_us")


@dataclass(frozen=True)
class TimingStats:
    """Summary of per-iteration times, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    min_us: float
    max_us: float
    mean_us: float
    samples: int

    def as_list(self) -> list[float]:
        return [getattr(self, name) for name in STAT_FIELDS]

    @classmethod
    def from_list(cls, values: list[float], samples: int) -> TimingStats:
        return cls(*[float(v) for v in values], samples=samples)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of an already sorted, non-empty list.

    Same definition as ``numpy.percentile(..., method="linear")``.
    """
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


def summarize(samples_us: list[float]) -> TimingStats:
    """Median, p10, p90, min, max and mean of per-iteration times (microseconds)."""
    if not samples_us:
        raise ValueError("no timing samples to summarise")
    ordered = sorted(samples_us)
    return TimingStats(
        median_us=percentile(ordered, 50.0),
        p10_us=percentile(ordered, 10.0),
        p90_us=percentile(ordered, 90.0),
        min_us=ordered[0],
        max_us=ordered[-1],
        mean_us=sum(ordered) / len(ordered),
        samples=len(ordered),
    )


PYTHON_LOOP_ITERATIONS = 1000


def python_loop_us(repeats: int = 51) -> float:
    """How fast this thread runs Python here: the median time (microseconds) of a fixed loop of
    ``PYTHON_LOOP_ITERATIONS`` iterations, each a dict lookup, an attribute read, a call and integer arithmetic
    (the kind of work a request's host path is made of), over ``repeats`` runs.  Host-bound figures (the
    notification latency) follow it from host to host, so records carry it beside them."""
    table, box = {"key": 3}, _Box()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter_ns()
        total = 0
        for i in range(PYTHON_LOOP_ITERATIONS):
            total += table["key"] + box.value + _same(i & 7)
        times.append((time.perf_counter_ns() - begin) / 1e3)
    return summarize(times).median_us


class _Box:
    value = 1


def _same(value: int) -> int:
    return value


def _cycles_per_us(device: torch.device | str) -> float:
    """SM clock cycles per microsecond (for ``torch.cuda._sleep``); 2 GHz when the driver does not say."""
    khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 0
    return khz / 1e3 if khz > 0 else 2000.0


def hold(us: float, device: torch.device | str) -> None:
    """Enqueue a device-side spin of about ``us`` microseconds on the current stream (returns at once), so
    that what the host queues behind it starts back to back: the intervals after it are device time."""
    torch.cuda._sleep(int(us * _cycles_per_us(device)))


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class Marks:
    """Timing points inside one run of a body: ``mark()`` at each point, then :meth:`intervals_ms` after the
    device has finished (interval ``j``: mark ``j`` -> mark ``j + 1``).

    CUDA: events recorded on the current stream (device time); anything else: the host clock.  Events are
    made once, so marking allocates nothing; :meth:`start` begins a new run.
    """

    def __init__(self, device: torch.device | str | None, capacity: int):
        self.cuda = _is_cuda(device)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(capacity)] if self.cuda else []
        self.stamps = [0] * capacity
        self.count = 0

    def start(self) -> None:
        self.count = 0

    def mark(self) -> None:
        if self.cuda:
            self.events[self.count].record()
        else:
            self.stamps[self.count] = time.perf_counter_ns()
        self.count += 1

    def intervals_ms(self) -> list[float]:
        """The intervals of the current run, in milliseconds (CUDA: after the device has passed every mark)."""
        if self.cuda:
            return [self.events[j].elapsed_time(self.events[j + 1]) for j in range(self.count - 1)]
        return [(self.stamps[j + 1] - self.stamps[j]) / 1e6 for j in range(self.count - 1)]


def time_iterations(
    fn: Callable[[], object],
    *,
    iters: int,
    warmup: int,
    device: torch.device | str | None,
    reset: Callable[[], object] | None = None,
    barrier: Callable[[], object] | None = None,
    hold_device: bool = False,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` timed times; return per-call microseconds.

    Args:
        fn: one collective call (or one CUDA-graph replay).  Must not allocate if you care about the
            numbers; everything it touches should be pre-allocated.
        iters: timed calls (>= 1).
        warmup: untimed calls before the barrier (>= 0).
        device: where ``fn`` runs; CUDA devices are timed with CUDA events on the current stream,
            anything else with the wall clock around the blocking call.
        reset: restores in-place inputs before every call (warm-up and timed), outside the interval.
        barrier: host barrier across ranks, called once after warm-up, before the timed batch.
        hold_device: CUDA only: keep the GPU busy while the host queues the batch, so the samples are
            device time without host submission (see the module docstring).  The hold is sized from the
            warm-up's host time; when it ends before the host has queued the whole batch (the device may
            then have waited for the host between calls) and there is no ``barrier`` (the batch is this
            process's alone), the batch is queued again behind a hold sized from the time it took, up to
            ``HOLD_TRIES`` batches in all.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    cuda = _is_cuda(device)
    host_ns = []  # host time per warm-up call: sizes the device hold (the median skips compilation)
    for _ in range(warmup):
        if reset is not None:
            reset()
        begin = time.perf_counter_ns()
        fn()
        host_ns.append(time.perf_counter_ns() - begin)
    host_us_per_call = percentile(sorted(host_ns), 50.0) / 1e3 if host_ns else DEFAULT_HOST_US_PER_CALL
    if cuda:
        torch.cuda.synchronize(device)
    if barrier is not None:
        barrier()
    if cuda:
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        held = torch.cuda.Event() if hold_device else None
        # A batch of this process alone may be queued again; one with a barrier is the ranks' together.
        for _ in range(HOLD_TRIES if hold_device and barrier is None else 1):
            if held is not None:
                hold(min(MAX_HOLD_US, 100.0 + 2.0 * iters * max(host_us_per_call, 10.0)), device)
                held.record()  # completes when the hold has ended
            begin = time.perf_counter_ns()
            for start, end in zip(starts, ends, strict=True):
                if reset is not None:
                    reset()
                start.record()
                fn()
                end.record()
            if held is None or not held.query():
                break  # the hold outlasted the queuing: every interval is device time
            # The host queued slower than the warm-up said (fn took another path behind a busy stream, or
            # the host slowed down), so the device may have drained between calls: again, held for that.
            host_us_per_call = (time.perf_counter_ns() - begin) / 1e3 / iters
            torch.cuda.synchronize(device)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends, strict=True)]
    samples_ns = [0] * iters
    for i in range(iters):
        if reset is not None:
            reset()
        begin = time.perf_counter_ns()
        fn()
        samples_ns[i] = time.perf_counter_ns() - begin
    return [ns / 1e3 for ns in samples_ns]


def capture_graph(
    fn: Callable[[], object], *, device: torch.device | str, warmup: int = CAPTURE_WARMUP, calls: int = 1
) -> torch.cuda.CUDAGraph:
    """Capture ``calls`` back-to-back calls of ``fn`` into a CUDA graph; replay it with ``graph.replay()``.

    ``fn`` is run ``warmup`` times on a side stream first (as torch's documentation requires before
    capture), then captured once.  Every tensor it touches must stay alive and at the same address for
    as long as the graph is replayed.
    """
    if not _is_cuda(device):
        raise ValueError(f"CUDA-graph capture needs a CUDA device, got {device}")
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize(device)
    return graph


def time_graph(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    calls: int = 1,
    iters: int,
    warmup: int = 1,
    barrier: Callable[[], object] | None = None,
) -> list[float]:
    """Device time of one ``fn()`` call under CUDA-graph replay, in microseconds, one sample per replay.

    ``calls`` back-to-back calls are captured into one graph (:func:`capture_graph`); its replays are
    timed by :func:`time_iterations` with the device held (``warmup`` untimed replays, then ``barrier``,
    then ``iters`` timed ones), and each sample is divided by ``calls``.  Summarise with
    :func:`summarize`; across ranks, the slowest rank's statistic is the collective's time.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    graph = capture_graph(fn, device=device, calls=calls)
    try:
        samples = time_iterations(
            graph.replay, iters=iters, warmup=warmup, device=device, barrier=barrier, hold_device=True
        )
    finally:
        del graph
    return [sample / calls for sample in samples]


def median_graph_us(fn: Callable[[], object], *, calls: int = 1, iters: int = 10, device=None) -> float:
    """Median of :func:`time_graph`'s per-call samples on ``device`` (default: the current CUDA device)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return summarize(time_graph(fn, device=device, calls=calls, iters=iters)).median_us
