"""The host waits of a symmetric workspace's close and of ``CustomAllReduce.synchronize``: CUDA events on the streams
that hold the workspace's work, polled with a deadline, never a device-wide synchronisation.

CPU stand-ins: a workspace of shared files (one process answers for both ranks: its exchange answers for the peer,
which maps this rank's own file), given a CUDA device after it is made, with streams and events faked; the device's
own synchronisation raises if anything calls it.
"""

from __future__ import annotations

import pytest
import torch

from sagellm_comm.errors import CommTimeoutError
from sagellm_comm.workspace import SymmetricWorkspace
from tests.conftest import RecordingFileMemory


class Stream:
    """Stands in for ``torch.cuda.Stream``: ``running`` says whether work enqueued on it is still running."""

    def __init__(self, handle: int, running: bool = False):
        self.cuda_stream = handle
        self.running = running

    def wait_event(self, event) -> None:
        pass


class Device:
    """The CUDA calls a workspace makes, on streams of this stand-in; ``recorded`` lists the streams recorded on."""

    def __init__(self, monkeypatch, current: Stream):
        self.current = current
        self.recorded: list[Stream] = []
        device = self

        class Event:
            def record(self, stream=None) -> None:
                self.stream = stream
                device.recorded.append(stream)

            def query(self) -> bool:
                return not self.stream.running

        def synchronize(where=None) -> None:
            raise AssertionError("a device-wide synchronisation: it has no deadline")

        class on:  # torch.cuda.stream(s): makes s current for the block
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.before, device.current = device.current, self.stream

            def __exit__(self, *exc):
                device.current = self.before

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda where=None: device.current)
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def launch_on(self, ws: SymmetricWorkspace, stream: Stream) -> None:
        """A call on ``ws`` from ``stream``, as the kernels' launchers make it."""
        self.current = stream
        ws.enter_stream(stream.cuda_stream)


def _cuda_workspace(memory: RecordingFileMemory) -> SymmetricWorkspace:
    ws = SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", lambda obj: [obj, obj], memory=memory)
    ws.device = torch.device("cuda", 0)  # from here on it waits as a CUDA workspace does
    return ws


def test_close_waits_for_the_stream_of_the_last_call_and_the_callers_stream_not_the_whole_device(monkeypatch):
    memory = RecordingFileMemory()
    ws = _cuda_workspace(memory)
    side, last, callers = Stream(0x10), Stream(0x20), Stream(0x30)
    device = Device(monkeypatch, callers)
    device.launch_on(ws, side)
    device.launch_on(ws, last)  # waits for the call on ``side`` (enter_stream)
    device.current = callers
    device.recorded.clear()
    ws.close()
    assert device.recorded == [callers, last]
    assert len(memory.unmapped) == 1 and len(memory.freed) == 1


def test_close_with_work_still_running_at_its_deadline_names_the_stream_and_keeps_the_mappings(monkeypatch):
    """Unmapping a peer's region under a kernel that still reads it would fault the device: work still running at
    the deadline raises CommTimeoutError naming its stream, and the peers stay mapped, the region allocated."""
    memory = RecordingFileMemory()
    ws = _cuda_workspace(memory)
    last = Stream(0x20, running=True)
    device = Device(monkeypatch, Stream(0x30))
    device.launch_on(ws, last)
    device.current = Stream(0x30)
    with pytest.raises(CommTimeoutError, match=r"did not complete within 0.05s: work is still running on the stream "
                       r"of its last call \(0x20\); its peers stay mapped") as caught:  # fmt: skip
        ws.close(timeout=0.05)
    assert caught.value.details["streams"] == ["the stream of its last call (0x20)"]
    assert ws.closed and memory.unmapped == [] and memory.freed == []


def test_close_whose_wait_fails_still_releases_the_mappings_and_raises_that_error(monkeypatch):
    """A failed wait (a dead context) is no reason to keep the mappings: they and the region are released, and the
    wait's error raised."""
    memory = RecordingFileMemory()
    ws = _cuda_workspace(memory)
    Device(monkeypatch, Stream(0x30))

    class DeadEvent:
        def record(self, stream=None) -> None:
            pass

        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "Event", DeadEvent)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ws.close()
    assert len(memory.unmapped) == 1 and len(memory.freed) == 1


def test_synchronize_is_bounded_by_twice_the_kernels_timeout_and_names_the_stream(monkeypatch):
    """``CustomAllReduce.synchronize`` waits for the workspace's work at most ``host_timeout_s`` (twice the kernels'
    own timeout, so that a kernel that gave up on a peer reports first), never for the whole device."""
    from sagellm_comm.custom_all_reduce import CustomAllReduce

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    memory = RecordingFileMemory()
    ws = SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", lambda obj: [obj, obj], memory=memory)
    car = CustomAllReduce(ws, timeout_s=0.05)
    ws.device = torch.device("cuda", 0)
    car.use_ptx = True  # as on a GPU
    device = Device(monkeypatch, Stream(0x30))
    busy = Stream(0x20, running=True)
    device.launch_on(ws, busy)
    device.current = Stream(0x30)
    assert car.host_timeout_s == 0.1
    with pytest.raises(CommTimeoutError, match=r"the custom all-reduce's enqueued work on cuda:0 .* did not complete "
                       r"within 0.1s: work is still running on the stream of its last call \(0x20\)"):  # fmt: skip
        car.synchronize()
    busy.running = False
    car.synchronize()
    ws.device = torch.device("cpu")  # released as the CPU workspace it is
    car.close()
    assert len(memory.freed) == 1


def test_reading_a_call_counter_waits_for_the_calls_work_with_a_deadline(monkeypatch):
    """``epoch`` / ``lamport_epoch`` (``SymmetricWorkspace.counter``) read the device once the workspace's work is
    done: bounded as ``synchronize()`` is, where a stream-ordered read waited for it without a deadline."""
    from sagellm_comm.custom_all_reduce import CustomAllReduce

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ws = SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", lambda obj: [obj, obj], memory=RecordingFileMemory())
    car = CustomAllReduce(ws, timeout_s=0.05)
    ws.device = torch.device("cuda", 0)
    device = Device(monkeypatch, Stream(0x30))
    busy = Stream(0x20, running=True)
    device.launch_on(ws, busy)
    device.current = Stream(0x30)
    for read in (lambda: car.epoch, lambda: car.lamport_epoch):
        with pytest.raises(CommTimeoutError, match=r"reading control word \d+ of the symmetric workspace: .* did not "
                           r"complete within 0.1s: work is still running on the stream of its last call"):  # fmt: skip
            read()
    busy.running = False
    assert (car.epoch, car.lamport_epoch) == (ws.initial_epoch, ws.initial_epoch)
    ws.device = torch.device("cpu")
    car.close()


@pytest.mark.gpu
def test_on_a_gpu_synchronize_leaves_other_streams_work_alone_and_close_bounds_its_own():
    """On a GPU: ``synchronize()`` returns while unrelated work on another stream still runs (a device-wide
    synchronisation waited for it), and a close whose workspace's last call's stream is still busy at the deadline
    raises CommTimeoutError naming that stream, before any unmap or free."""
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import local_workspaces

    cycles = 2_000_000_000  # about a second of torch.cuda._sleep
    workspaces = local_workspaces(2, 1 << 16, "cuda")
    cars = [CustomAllReduce(ws, timeout_s=30.0) for ws in workspaces]
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        torch.cuda._sleep(cycles)
    unrelated = torch.cuda.Event()
    unrelated.record(other)
    cars[0].synchronize()
    assert not unrelated.query(), "synchronize() waited for another stream's work"
    torch.cuda.synchronize()
    for car in cars:
        car.close()

    busy_ws, idle_ws = local_workspaces(2, 1 << 16, "cuda")
    busy = torch.cuda.Stream()
    with torch.cuda.stream(busy):
        busy_ws.enter_stream(busy.cuda_stream)  # as a call from this stream does
        torch.cuda._sleep(cycles)
    with pytest.raises(
        CommTimeoutError, match=rf"still running on the stream of its last call \({busy.cuda_stream:#x}\)"
    ):
        busy_ws.close(timeout=0.05)
    torch.cuda.synchronize()
    idle_ws.close(timeout=30.0)
