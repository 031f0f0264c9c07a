"""The two processes of ``sagellm-comm transfer``: rank 0 initiates and measures, rank 1 is the passive peer.

Both register one pool of ``plan.pool_bytes`` (device memory, or a shared CPU file) with one agent per measured
backend, and exchange metadata, IPC handles and commands through the store ``spawn_ranks`` hosts.  For every
(block size, count) point the initiator picks ``count`` distinct random blocks in each pool; per backend and op:

1. *time*: ``warmup`` untimed then ``iters`` timed requests (``benchmark/timing.py``): CUDA events with the device
   held for the device-timed backends (``ipc``, ``ipc-launch``, ``torch``, ``copy-engine`` on a GPU: what the
   copies take on the device), the wall clock around request + completion for the host-driven ones (``nixl``,
   ``nixl-raw``, and everything on the CPU).  For ``ipc`` and ``ipc-launch`` on a GPU, also the host cost of
   ``write()`` and the wall time of ``write()`` + ``wait()`` per request, eagerly.
2. *check*: one more request with a seeded pattern in the source blocks; the destination side compares
   (the peer for a write, the initiator for a read) and the count of wrong bytes is the record's ``num_wrong``.

With ``rounds`` > 1 the backends are measured in turn that many times (each round opens and closes each backend's
agents again) and each point's samples are pooled over the rounds before their statistics are taken.

Notification latency (``ipc``, ``ipc-launch`` and ``nixl``): one 16 KB block written with the initiator's
monotonic clock in its message, ``notify_iters`` times, one at a time; the peer polls ``notifications()`` and
records the clock when it sees each one (both processes share the host's ``CLOCK_MONOTONIC``).  Two pacings,
``NOTIFY_PACINGS``: between requests the initiator either sleeps 0.2 ms (``idle``: each request starts on a host
thread that was asleep) or spins 0.2 ms (``busy``: a host thread that never stopped, as an engine's scheduler
loop); the host time of each ``write()`` call is kept too, so what the device and the receiver add is the
difference.  Before each pacing both processes time a fixed Python loop (``timing.python_loop_us``), each while
the other waits: the figure follows how fast the host runs Python, and the record keeps its medians.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import torch

from sagellm_comm.benchmark.timing import python_loop_us, summarize, time_iterations
from sagellm_comm.benchmark.transfer_config import NOTIFY_BLOCK, TransferBenchConfig, TransferPlan, pool_blocks
from sagellm_comm.benchmark.transfer_movers import AgentMover, CopyEngineMover, Point, RawNixlMover, TorchMover
from sagellm_comm.errors import CommError, CommTimeoutError

NAMES = ("init", "peer")
# The columns timed through our TransferAgent: (its transport, its options; nixl's come from the config).
AGENT_BACKENDS = {"ipc": ("ipc", None), "ipc-launch": ("ipc", {"ipc": {"resident": False}}), "nixl": ("nixl", None)}


def _pattern(seed: int, nbytes: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), generator=generator, dtype=torch.uint8, device=device)


def _pool(plan: TransferPlan) -> torch.Tensor:
    if plan.device.type == "cuda":
        return torch.zeros(plan.pool_bytes, dtype=torch.uint8, device=plan.device)
    from sagellm_comm.transfer.shared import shared_cpu_tensor

    return shared_cpu_tensor(plan.pool_bytes, torch.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Side:
    """One process: its pool, the store, and the agent of the backend being measured (one at a time, so that no
    other transport's threads run beside it)."""

    def __init__(self, rank: int, port: int, config: TransferBenchConfig, plan: TransferPlan):
        from sagellm_comm.backends.torch_distributed.rendezvous import create_store
        from sagellm_comm.benchmark.spawn import MASTER_ADDR

        self.rank, self.config, self.plan = rank, config, plan
        if plan.device.type == "cuda":  # "cuda" without an index: this process's current device
            torch.cuda.set_device(torch.cuda.current_device() if plan.device.index is None else plan.device.index)
        # spawn_ranks hosts the store on ``port``: both processes join it as clients, under a prefix of their own
        self.store = create_store(rank, 2, (MASTER_ADDR, port), config.timeout)
        self.pool = _pool(plan)
        self.agents: dict[str, object] = {}
        if rank == 1:
            self.store.set("mapping", json.dumps(self._mapping()))

    def open(self, backend: str) -> bytes:
        """Start this process's agent of ``backend`` with the pool registered; its metadata (empty: none needed)."""
        name = f"{NAMES[self.rank]}-{backend}"
        if backend in AGENT_BACKENDS:
            from sagellm_comm.transfer import TransferAgent

            transport, options = AGENT_BACKENDS[backend]
            if transport == "nixl":
                options = {"nixl": {"progress_thread": self.config.nixl_progress_thread}}
            agent = TransferAgent(name, transport, device=self.plan.device, timeout=self.config.timeout,
                                  options=options)  # fmt: skip
            self.agents[backend] = agent
            agent.register("pool", self.pool)
            return agent.metadata()
        if backend == "nixl-raw":
            from sagellm_comm.transfer.nixl import nixl_api

            api = nixl_api()
            config = api.nixl_agent_config(enable_prog_thread=self.config.nixl_progress_thread, backends=["UCX"])
            agent = self.agents[backend] = api.nixl_agent(name, config)
            agent.register_memory(self.pool)
            return agent.get_agent_metadata()
        return b""

    def close(self, backend: str) -> None:
        agent = self.agents.pop(backend, None)
        if hasattr(agent, "close"):
            agent.close()

    def _mapping(self) -> dict:
        """How the other process maps this pool for the torch / copy-engine references."""
        ptr = self.pool.data_ptr()
        if self.plan.device.type == "cuda":
            if not {"torch", "copy-engine"} & set(self.plan.backends):
                return {"address": ptr}
            from sagellm_comm.ipc import CudaIpcMemory
            from sagellm_comm.transfer.metadata import b64

            handle, offset, _ = CudaIpcMemory(self.plan.device).export_range(ptr)
            return {"address": ptr, "handle": b64(handle), "offset": offset}
        from sagellm_comm.transfer.shared import shared_file_of

        path, offset = shared_file_of(ptr, self.plan.pool_bytes)
        return {"address": ptr, "path": path, "offset": offset}

    def get(self, key: str) -> bytes:
        """The store's ``key``, waiting for it.  A NIXL agent without its progress thread advances only inside its
        own calls, and transfers to it need that: while this process waits, its open NIXL agent is called."""
        quiet = [agent for backend, agent in self.agents.items()
                 if backend in ("nixl", "nixl-raw") and not self.config.nixl_progress_thread]  # fmt: skip
        if quiet:
            deadline = time.monotonic() + self.config.timeout
            while not self.store.check([key]):
                if time.monotonic() > deadline:
                    raise CommTimeoutError(f"no {key!r} from the other process within {self.config.timeout} s")
                for agent in quiet:
                    if hasattr(agent, "notifications"):
                        agent.notifications()  # ours
                    else:
                        agent.get_new_notifs()  # NIXL's own
        return self.store.get(key)

    def close_all(self) -> None:
        for backend in list(self.agents):
            self.close(backend)


# ============================================================================ the passive peer
def _serve(side: _Side) -> None:
    store, device, step = side.store, side.plan.device, 0
    while True:
        command = json.loads(side.get(f"cmd/{step}"))
        reply: dict = {}
        if command["do"] == "exit":
            store.set(f"reply/{step}", json.dumps({"cpus": _cpus()}))
            return
        if command["do"] == "open":
            try:
                store.set(f"meta/{step}", side.open(command["backend"]))
            except CommError as exc:
                reply["error"] = exc.message
        elif command["do"] == "close":
            side.close(command["backend"])
        elif command["do"] in ("fill", "check"):
            blocks = pool_blocks(side.pool, command["block"])
            ids = torch.as_tensor(command["ids"], device=device)
            expected = _pattern(command["seed"], len(command["ids"]) * command["block"], device)
            if command["do"] == "fill":
                blocks[ids] = expected.view(len(command["ids"]), -1)
            else:
                reply["wrong"] = int((blocks[ids].reshape(-1) != expected).sum())
            _sync(device)
        elif command["do"] == "notify":
            agent = side.agents[command["backend"]]
            # Polling a NIXL agent without pause starves its progress thread (notifications then take
            # milliseconds); the ipc inbox is host memory and is polled without pause.
            pause = 1e-4 if command["backend"] == "nixl" else 0.0
            reply["python_loop_us"] = python_loop_us()  # this process's speed, the initiator waiting
            store.set(f"ready/{step}", b"1")
            seen: list[int] = []
            deadline = time.monotonic() + side.config.timeout
            while len(seen) < command["iters"] and time.monotonic() < deadline:
                notes = agent.notifications()
                now = time.monotonic_ns()
                seen.extend(now - struct.unpack("<q", message[:8])[0] for _, message in notes)
                if pause and not notes:
                    time.sleep(pause)
            reply["latencies_ns"] = seen
        store.set(f"reply/{step}", json.dumps(reply))
        step += 1


# ============================================================================ the initiator
class _Initiator:
    def __init__(self, side: _Side):
        self.side, self.store, self.step = side, side.store, 0
        self.device = side.plan.device
        self.python_loop_us: dict[str, list[float]] = {"initiator": [], "peer": []}  # at each notification phase

    def call(self, command: dict, wait_ready: bool = False) -> dict:
        step, self.step = self.step, self.step + 1
        self.store.set(f"cmd/{step}", json.dumps(command))
        if wait_ready:
            self.store.wait([f"ready/{step}"])
            return {"step": step}
        return json.loads(self.store.get(f"reply/{step}"))

    def reply(self, step: int) -> dict:
        return json.loads(self.store.get(f"reply/{step}"))

    def open(self, backend: str):
        """This backend's mover, with the peer's agent started and added (raises CommError when it cannot run)."""
        side, config, plan = self.side, self.side.config, self.side.plan
        step = self.step
        answer = self.call({"do": "open", "backend": backend})
        if "error" in answer:
            raise CommTimeoutError(f"the peer could not start its {backend} agent: {answer['error']}")
        remote_meta = self.store.get(f"meta/{step}")
        side.open(backend)
        mapping = json.loads(self.store.get("mapping"))
        if backend in AGENT_BACKENDS:
            agent = side.agents[backend]
            return AgentMover(agent, agent.add_peer(remote_meta), config.prepared, config.timeout)
        if backend == "nixl-raw":
            agent = side.agents[backend]
            remote = agent.add_remote_agent(remote_meta)
            remote = remote.decode() if isinstance(remote, bytes) else remote
            return RawNixlMover(agent, remote, side.pool, mapping["address"], self.device.index or 0, config.prepared,
                                config.timeout)  # fmt: skip
        remote_address = self._map(mapping)
        if backend == "torch":
            from sagellm_comm.ipc import tensor_at

            return TorchMover(side.pool, tensor_at(remote_address, plan.pool_bytes, torch.uint8, self.device, self))
        return CopyEngineMover(side.pool, remote_address)

    def close(self, backend: str) -> None:
        self.side.close(backend)
        self.call({"do": "close", "backend": backend})

    def _map(self, mapping: dict) -> int:
        if not hasattr(self, "_remote_address"):
            from sagellm_comm.transfer.ipc_memory import PeerMaps, device_memory
            from sagellm_comm.transfer.metadata import unb64

            self._maps = PeerMaps(device_memory(self.device), self.device.index or 0, [])
            key = unb64(mapping["handle"]) if "handle" in mapping else mapping["path"]
            self._remote_address = self._maps.open(key) + mapping["offset"]
        return self._remote_address

    def check(self, mover, op: str, point: Point, seed: int) -> int:
        """One request with a seeded pattern; the number of wrong bytes at the destination."""
        pattern = _pattern(seed, point.nbytes, self.device)
        local = pool_blocks(self.side.pool, point.block)
        local_ids = torch.as_tensor(point.local_ids, device=self.device)
        remote = {"block": point.block, "ids": point.remote_ids.tolist(), "seed": seed}
        if op == "write":
            local[local_ids] = pattern.view(point.count, -1)
            _sync(self.device)
        else:
            self.call({"do": "fill", **remote})
            local[local_ids] = 0
        self.run_once(mover, op, point)
        if op == "write":
            return self.call({"do": "check", **remote})["wrong"]
        return int((local[local_ids].reshape(-1) != pattern).sum())

    def run_once(self, mover, op: str, point: Point) -> None:
        if mover.device_timed:
            mover.enqueue(op, point)
            _sync(self.device)
        else:
            mover.blocking(op, point)

    def time(self, mover, op: str, point: Point) -> dict:
        """One round's samples of ``op`` at ``point``, microseconds per request: ``{"samples": [...], "timing":
        "device" | "wall"}``, and for ``ipc`` on a GPU the host time of each request (``"host"``) and its wall time
        with ``wait()`` (``"e2e"``)."""
        config = self.side.config
        if mover.device_timed:
            samples = time_iterations(lambda: mover.enqueue(op, point), iters=config.iters, warmup=config.warmup,
                                      device=self.device, hold_device=True)  # fmt: skip
            out = {"samples": samples, "timing": "device"}
        else:
            samples = time_iterations(lambda: mover.blocking(op, point), iters=config.iters, warmup=config.warmup,
                                      device=None)  # fmt: skip
            out = {"samples": samples, "timing": "wall"}
        if isinstance(mover, AgentMover) and mover.device_timed:
            host, total = [], []
            for _ in range(config.iters):
                begin = time.perf_counter_ns()
                handle = mover.start(op, point)
                submitted = time.perf_counter_ns()
                handle.wait(config.timeout)
                host.append((submitted - begin) / 1e3)
                total.append((time.perf_counter_ns() - begin) / 1e3)
            out["host"], out["e2e"] = host, total
        return out

    def notify_latency(self, mover: AgentMover, backend: str, iters: int, pool_blocks: int) -> dict:
        """Per pacing (module docstring): the receiver-seen latency of one 16 KB block with its notification and
        the host time of its ``write()`` call, microseconds per request: ``{pacing: {"seen": [...], "host":
        [...]}}``."""
        rng = np.random.default_rng(99)
        point = Point(NOTIFY_BLOCK, 1, rng.choice(pool_blocks, 1), rng.choice(pool_blocks, 1))
        warm = min(5, iters)
        out = {}
        for pacing in NOTIFY_PACINGS:
            self.python_loop_us["initiator"].append(python_loop_us())  # the peer waiting for its command
            step = self.call({"do": "notify", "backend": backend, "iters": iters + warm}, wait_ready=True)["step"]
            host = []
            for _ in range(iters + warm):
                begin = time.perf_counter_ns()
                handle = mover.start("write", point, notify=struct.pack("<q", time.monotonic_ns()) + b"ping")
                host.append((time.perf_counter_ns() - begin) / 1e3)
                handle.wait(self.side.config.timeout)
                _pause(pacing)  # one at a time: the peer has seen this one before the next starts
            reply = self.reply(step)
            self.python_loop_us["peer"].append(reply["python_loop_us"])
            out[pacing] = {"seen": [ns / 1e3 for ns in reply["latencies_ns"][warm:]], "host": host[warm:]}
        return out


NOTIFY_PACINGS = ("idle", "busy")
NOTIFY_PAUSE_S = 2e-4


def _pause(pacing: str) -> None:
    """The initiator's pause between two notification requests: asleep (``idle``) or spinning (``busy``)."""
    if pacing == "idle":
        time.sleep(NOTIFY_PAUSE_S)
        return
    end = time.perf_counter() + NOTIFY_PAUSE_S
    while time.perf_counter() < end:
        pass


def transfer_rank(index: int, world_size: int, port: int, config: TransferBenchConfig, plan: TransferPlan):
    """One process of the benchmark (``spawn.spawn_ranks``); rank 0 returns the measurements."""
    if config.cpus is not None:
        os.sched_setaffinity(0, {config.cpus[index]})
    side = _Side(index, port, config, plan)
    try:
        if index == 1:
            _serve(side)
            return None
        return _measure(_Initiator(side))
    finally:
        side.close_all()


def _measure(init: _Initiator) -> dict:
    from sagellm_comm.benchmark.progress import ProgressBar

    config, plan = init.side.config, init.side.plan
    points = []
    rng = np.random.default_rng(0)
    for block, count in plan.points:
        blocks = plan.pool_bytes // block
        points.append(Point(block, count, rng.choice(blocks, count, replace=False),
                            rng.choice(blocks, count, replace=False)))  # fmt: skip
    bar = ProgressBar(len(points) * len(plan.backends) * len(config.ops) * config.rounds, enabled=config.progress)
    pooled: dict[tuple, dict] = {}  # (backend, point index, op) -> its samples over the rounds
    notify: dict[str, dict] = {}
    failed, transports, seed = {}, {}, 1
    try:
        for _ in range(config.rounds):  # every backend in turn, once a round: drift falls on each alike
            for backend in plan.backends:
                if backend in failed:
                    continue
                try:
                    mover = init.open(backend)
                except CommError as exc:
                    failed[backend] = exc.message
                    init.close(backend)
                    continue
                try:
                    for index, point in enumerate(points):
                        for op in config.ops:
                            entry = pooled.setdefault((backend, index, op), {
                                "backend": backend, "op": op, "block": point.block, "count": point.count,
                                "samples": [], "host": [], "e2e": [], "num_wrong": 0})  # fmt: skip
                            if "error" not in entry:  # a point that failed once is not measured again
                                try:
                                    part = init.time(mover, op, point)
                                    entry["timing"] = part["timing"]
                                    for key in ("samples", "host", "e2e"):
                                        entry[key] += part.get(key, [])
                                    entry["num_wrong"] += init.check(mover, op, point, seed)
                                except CommError as exc:
                                    entry["error"] = exc.message
                            seed += 1
                            bar.step(f"{backend} {op} {point.count}x{point.block}")
                    if config.notify_iters and backend in AGENT_BACKENDS:
                        by_pacing = init.notify_latency(mover, backend, config.notify_iters,
                                                        plan.pool_bytes // NOTIFY_BLOCK)  # fmt: skip
                        for pacing, samples in by_pacing.items():
                            into = notify.setdefault(backend, {}).setdefault(pacing, {"seen": [], "host": []})
                            into["seen"] += samples["seen"]
                            into["host"] += samples["host"]
                    transports[backend] = mover.transport()
                finally:
                    init.close(backend)
    finally:
        bar.close()
        peer = init.call({"do": "exit"})
    measured = [_summarized(entry) for entry in pooled.values()]
    order = {backend: i for i, backend in enumerate(plan.backends)}
    measured.sort(key=lambda e: (e["block"], e["count"], config.ops.index(e["op"]), order[e["backend"]]))
    cpus = {"initiator": _cpus(), "peer": peer.get("cpus")}
    loops = {side: summarize(times).median_us for side, times in init.python_loop_us.items() if times}
    return {"points": measured, "notify": notify, "failed": failed, "transports": transports, "cpus": cpus,
            "python_loop_us": loops or None}  # fmt: skip


def _cpus() -> list[int] | None:
    """The CPUs this process may run on (None where the system does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _summarized(entry: dict) -> dict:
    """A point's record from its pooled samples: their statistics (none when it failed) and, for ``ipc`` on a GPU,
    the median host and end-to-end times of a request."""
    samples, host, e2e = entry.pop("samples"), entry.pop("host"), entry.pop("e2e")
    if "error" not in entry and samples:
        entry["stats"] = summarize(samples)
        if host:
            entry["host_us"], entry["e2e_us"] = summarize(host).median_us, summarize(e2e).median_us
    return entry
