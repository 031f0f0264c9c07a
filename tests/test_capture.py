"""A workspace closed, or a region freed, while a CUDA graph is being captured leaves the capture intact, and is
released as soon as the last capture ends.

CPU stand-ins, as in ``tests/test_custom_all_reduce.py``: a class with the capture methods of
``torch.cuda.CUDAGraph``, tracked as that class is (``sagellm_comm.capture.track``), and shared files that see
captures as CUDA IPC memory does and record every unmap and free.  One process stands for both ranks (its exchange
answers for the peer, which maps this rank's own file).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from sagellm_comm import capture
from sagellm_comm.errors import NotInitializedError, UnavailableError
from sagellm_comm.ipc import CudaIpcMemory
from sagellm_comm.workspace import SymmetricWorkspace, free_deferred_regions
from tests.conftest import RecordingFileMemory


class Graph:  # stands in for torch.cuda.CUDAGraph
    def capture_begin(self) -> None:
        pass

    def capture_end(self) -> None:
        pass


capture.track(Graph)


class Memory(RecordingFileMemory):
    """Shared files that ask about captures as CUDA IPC memory does, and record what is unmapped and freed."""

    device = torch.device("cuda", 0)
    capturing = CudaIpcMemory.capturing


def _workspace(memory: Memory) -> SymmetricWorkspace:
    return SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", lambda obj: [obj, obj], memory=memory)


@contextmanager
def _captured_on_another_thread() -> Iterator[None]:
    """A graph being captured on another thread while the block runs; the capture ends when it exits."""
    graph, began, done = Graph(), threading.Event(), threading.Event()

    def capturer() -> None:
        graph.capture_begin()
        began.set()
        done.wait(30)
        graph.capture_end()

    thread = threading.Thread(target=capturer)
    thread.start()
    try:
        assert began.wait(30)
        yield
    finally:
        done.set()
        thread.join(30)


def test_a_workspace_closed_while_another_thread_captures_is_released_after_the_capture():
    """close() on a thread that does not capture (a watchdog handler's, a finaliser's) while another thread
    captures neither unmaps the peers nor frees the region then (either would invalidate the capture in CUDA's
    global capture mode): the workspace is closed at once, so no new call uses it, and released once the capture
    is over."""
    memory = Memory()
    ws = _workspace(memory)
    try:
        with _captured_on_another_thread():
            ws.close()
            assert ws.closed
            assert memory.unmapped == [] and memory.freed == [], "the workspace was released during a capture"
            with pytest.raises(NotInitializedError):
                ws.registered_tensor(16, torch.float32)
            assert free_deferred_regions() == 0 and memory.freed == []  # still capturing: stays queued
        # Released when the capture ended, on the capturing thread, with no call to free_deferred_regions().
        assert len(memory.unmapped) == 1 and len(memory.freed) == 1
        assert free_deferred_regions() == 0
        ws.close()  # idempotent: nothing more
        assert len(memory.unmapped) == 1 and len(memory.freed) == 1
    finally:
        free_deferred_regions()


def test_a_workspace_closed_on_the_capturing_thread_raises_and_is_released_after_the_capture():
    """close() inside this thread's own capture cannot release the workspace without invalidating the capture, and a
    graph that calls on it would replay on released memory: it raises UnavailableError saying so, the workspace
    is closed all the same, and its release waits for the capture to end."""
    memory = Memory()
    ws = _workspace(memory)
    graph = Graph()
    try:
        graph.capture_begin()
        try:
            with pytest.raises(UnavailableError, match="closed inside a CUDA graph capture on this thread"):
                ws.close()
            assert ws.closed
            assert memory.unmapped == [] and memory.freed == [], "the workspace was released during a capture"
            ws.close()  # already closed: nothing to say
        finally:
            graph.capture_end()  # releases it
        assert len(memory.unmapped) == 1 and len(memory.freed) == 1
        assert free_deferred_regions() == 0
    finally:
        free_deferred_regions()


def test_a_workspace_closed_outside_any_capture_is_released_at_once():
    memory = Memory()
    ws = _workspace(memory)
    with _captured_on_another_thread():
        pass
    ws.close()
    assert len(memory.unmapped) == 1 and len(memory.freed) == 1


def test_what_waited_is_released_when_the_last_capture_ends_not_before():
    """A long-running server may make no rendezvous and close nothing more: a region whose last buffer went during
    a capture is freed when the last tracked capture ends (here two overlap, on two threads), not at exit."""
    import gc

    memory = Memory()
    ws = _workspace(memory)
    buffers = [ws.registered_tensor(16, torch.float32)]
    ws.close()  # outside a capture: unmapped, the region kept by the buffer
    assert len(memory.unmapped) == 1 and memory.freed == []
    graph = Graph()
    try:
        with _captured_on_another_thread():
            graph.capture_begin()
            buffers.clear()
            gc.collect()
            graph.capture_end()  # the other thread still captures
            assert memory.freed == [], "a region was freed while another thread captured a graph"
        assert len(memory.freed) == 1  # freed by the capturing thread, as its capture ended
    finally:
        free_deferred_regions()


def test_a_release_that_fails_when_the_capture_ends_is_logged_not_raised_from_capture_end(caplog):
    """The capture itself succeeded: capture_end returns, and the failed release is logged as a warning."""

    class FailingUnmap(Memory):
        def close(self, ptr: int) -> None:
            super().close(ptr)
            raise RuntimeError("cudaIpcCloseMemHandle failed")

    memory = FailingUnmap()
    ws = _workspace(memory)
    try:
        with caplog.at_level("WARNING", logger="sagellm_comm"), _captured_on_another_thread():
            ws.close()
        assert len(memory.unmapped) == 1 and len(memory.freed) == 1  # the unmap raised; the region went all the same
        assert "cudaIpcCloseMemHandle failed" in caplog.text
    finally:
        free_deferred_regions()


def test_a_region_freed_by_the_watchdog_while_another_thread_captures_is_freed_after_the_capture():
    """The watchdog's error handler closes the workspace and drops its last buffer on the watchdog's thread, whose
    own stream shows no capture, while another thread captures: the free waits for that capture's end."""
    import gc

    from sagellm_comm import watchdog
    from sagellm_comm.config import CommConfig

    memory = Memory()
    config = CommConfig.from_env().replace(watchdog_ms=3_600_000)  # the thread sleeps: poll_once() runs below
    ws = SymmetricWorkspace.rendezvous(0, 2, 4096, "cpu", lambda obj: [obj, obj], memory=memory, config=config)
    buffers = [ws.registered_tensor(16, torch.float32)]
    ws.error_view[:4] = [1, 1, 0, 0]  # latched: the watchdog reports it to the handler

    def close_on_failure(failed, exc):
        failed.close()
        buffers.clear()
        gc.collect()

    watchdog.add_error_handler(close_on_failure)
    try:
        with _captured_on_another_thread():
            assert memory.capturing()  # another thread's capture is seen here
            polling = threading.Thread(target=watchdog.poll_once, name="sagellm-comm-watchdog")
            polling.start()
            polling.join(30)
            assert ws.closed and buffers == []
            assert memory.freed == [], "a region was freed while another thread captured a graph"
            assert free_deferred_regions() == 0 and memory.freed == []  # still capturing: stays queued
    finally:
        watchdog.remove_error_handler(close_on_failure)
    assert not memory.capturing()
    assert len(memory.freed) == 1  # released as the capture ended, on the capturing thread
    assert free_deferred_regions() == 0


def test_a_capture_cannot_begin_while_a_release_holds_captures_off():
    # a release checks for captures and runs inside held_off(): a capture_begin meanwhile waits for it
    graph = Graph()
    with capture.held_off():
        starting = threading.Thread(target=graph.capture_begin)
        starting.start()
        starting.join(0.2)
        assert not capture.underway()
    starting.join(30)
    assert capture.underway()
    graph.capture_end()
    assert not capture.underway()


# ---------------------------------------------------------------------- a real capture (virtual ranks on one GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_workspaces_closed_on_another_thread_during_a_real_capture_leave_it_intact_and_are_released_after():
    # torch.cuda.graph captures in the global mode: a device synchronize from any thread would invalidate it
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda")
    x = torch.ones(4096, device="cuda")
    y = x * 2  # warm-up outside the capture
    torch.cuda.synchronize()
    graph, errors = torch.cuda.CUDAGraph(), []

    def close_all() -> None:
        try:
            for workspace in workspaces:
                workspace.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with torch.cuda.graph(graph):
        y = x * 2
        closer = threading.Thread(target=close_all)
        closer.start()
        closer.join()
        assert all(w.closed for w in workspaces) and all(w.table is not None for w in workspaces)
        y = y + 1
    assert errors == []
    assert all(w.table is None for w in workspaces), "the release waits for the capture's end, then runs"
    x.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 7.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_workspace_closed_inside_a_real_capture_on_its_thread_raises_and_the_capture_still_completes():
    from sagellm_comm.workspace import local_workspaces

    workspaces = local_workspaces(2, 1 << 16, "cuda")
    x = torch.ones(4096, device="cuda")
    y = x * 2
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
        with pytest.raises(UnavailableError, match="inside a CUDA graph capture"):
            workspaces[0].close()
        assert workspaces[0].closed and workspaces[0].table is not None
    assert workspaces[0].table is None
    workspaces[1].close()
    x.fill_(4.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 8.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_virtual_groups_closed_on_another_thread_during_a_real_capture_leave_it_intact():
    """VirtualRankGroup.close and VirtualFused.close synchronise the device, which would invalidate a capture in
    progress: during one they skip the synchronisation and their workspaces release after the capture."""
    from sagellm_comm.fused import VirtualFused
    from sagellm_comm.virtual import VirtualRankGroup

    group = VirtualRankGroup(2, "cuda", max_bytes=1 << 16)
    fused = VirtualFused(group, gemm_max_output_bytes=1 << 20)
    x = torch.ones(4096, device="cuda")
    y = x * 2
    torch.cuda.synchronize()
    graph, errors = torch.cuda.CUDAGraph(), []

    def close_both() -> None:
        try:
            fused.close()
            group.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with torch.cuda.graph(graph):
        y = x * 2
        closer = threading.Thread(target=close_both)
        closer.start()
        closer.join()
        y = y + 1
    assert errors == []
    x.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 7.0))
