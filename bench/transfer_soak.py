"""Soak: block transfers between two processes for a fixed time, every byte of every request checked.

Two transfer agents in two processes (``--device cuda``: both on GPU 0, the ``ipc`` transport by default;
``--device cpu``: shared-memory regions).  The initiator writes request after request into the peer: each request
is a random block list (1 to 256 blocks of one random size, 512 B to 2 MB + 16, odd sizes and offsets included:
the resident copier, the block-copy kernel and the copy engine all serve some) from random places of its source
region into distinct places of one of ``DEPTH`` areas of the peer's destination region, with a notification
carrying the request's number.  Up to ``DEPTH`` requests are in flight.  The peer, on each notification:

* checks the number is the next one (a notification lost, repeated or out of order is counted);
* compares the whole area with what the request's blocks put there and zeros elsewhere (a wrong byte, a block
  written twice or a byte written outside the blocks is counted), then zeros the area again;
* every ``--read-every``-th request, reads a random block list from the initiator's source region into its own
  landing region and checks it the same way;
* every ``--rejoin-every`` requests both sides remove each other and add each other again; every fifth time the
  peer closes its agent and comes back as a new agent of the same name (a restarted process, as an engine sees
  one).

Both processes generate the source bytes from one seed, so the peer knows what every block must hold.  Every
wait has a deadline (``--timeout``): a request that does not complete, a notification that does not come, a
peer that does not answer ends the run with the error in the record.  Writes a JSON record: device, date,
command, commit, requests, blocks, bytes, reads, rejoins, restarts, wrong bytes, notification faults, errors::

    python -m bench.transfer_soak --seconds 240 --out bench/results/h200/transfer_soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import timedelta

import torch

from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.results import device_name
from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks

DEPTH = 4  # destination areas, so requests in flight
SIZES = {
    "cuda": (512, 4096, 16384, 16387, 65536, 262144, 1 << 20, (2 << 20) + 16),
    "cpu": (512, 4096, 16384, 16387, 65536, 262144),
}
SOURCE_BYTES = {"cuda": 64 << 20, "cpu": 4 << 20}
AREA_BYTES = {"cuda": 32 << 20, "cpu": 2 << 20}
MAX_BLOCKS = 256


def plan(seed: int, k: int, device: str, stream: int) -> list[tuple[int, int, int]]:
    """Request ``k``'s blocks ``(source offset, offset in its area, nbytes)`` (``stream`` 0: the writes, 1: the
    reads): one size, up to ``MAX_BLOCKS``
    blocks (log-uniform), each in its own lane of the area (lanes of the size rounded up to 256 B plus room for
    an odd start), sources anywhere in the source region (they may overlap: only destinations must not)."""
    rng = random.Random(seed * 1_000_003 + k * 2 + stream)
    size = rng.choice(SIZES[device])
    lane = (size + 8 + 255) // 256 * 256
    count = min(AREA_BYTES[device] // lane, int(2 ** rng.uniform(0, 8.0)), MAX_BLOCKS)
    places = rng.sample(range(AREA_BYTES[device] // lane), count)
    return [(rng.randrange(0, SOURCE_BYTES[device] - size + 1), p * lane + rng.choice((0, 0, 1, 7)), size)
            for p in places]  # fmt: skip


def source_bytes(seed: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (SOURCE_BYTES[device],), generator=g, dtype=torch.uint8, device=device)


def wrong_bytes(area: torch.Tensor, blocks: list[tuple[int, int, int]], source: torch.Tensor) -> int:
    """Bytes of ``area`` that differ from the blocks' sources where they landed and from zero elsewhere."""
    expected = torch.zeros_like(area)
    for lo, at, n in blocks:
        expected[at : at + n] = source[lo : lo + n]
    return int((area != expected).sum())


def _store(port: int):
    from torch.distributed import TCPStore

    return TCPStore(MASTER_ADDR, port, is_master=False, timeout=timedelta(seconds=120))


def _get(store, key: str, timeout: float) -> bytes:
    store.wait([key], timedelta(seconds=timeout))
    return store.get(key)


def _rank(rank: int, world_size: int, port: int, cfg: dict) -> dict:
    from sagellm_comm.transfer import TransferAgent

    device, seed, timeout = cfg["device"], cfg["seed"], cfg["timeout"]
    if device == "cuda":
        torch.cuda.set_device(0)
    store = _store(port)
    counts = dict.fromkeys(("requests", "blocks", "bytes", "reads", "read_blocks", "rejoins", "restarts", "wrong_bytes",
                            "wrong_requests", "read_wrong_bytes", "notifications_out_of_order"), 0)  # fmt: skip
    errors: list[str] = []
    state: dict = {}

    def start_agent() -> None:
        """This rank's agent and regions (zeroed; the initiator's source filled), its metadata published."""
        agent = state["agent"] = TransferAgent(("soak-initiator", "soak-peer")[rank], cfg["backend"])
        if rank == 0:
            state["src"] = agent.allocate("src", SOURCE_BYTES[device], torch.uint8, device)
            state["src"].copy_(source_bytes(seed, device))
        else:
            state["dst"] = agent.allocate("dst", DEPTH * AREA_BYTES[device], torch.uint8, device)
            state["land"] = agent.allocate("land", AREA_BYTES[device], torch.uint8, device)
        if device == "cuda":
            torch.cuda.synchronize()

    start_agent()
    store.set(f"meta/{rank}", state["agent"].metadata())
    state["peer"] = state["agent"].add_peer(_get(store, f"meta/{1 - rank}", timeout))
    transport = state["agent"].peer_backend(state["peer"])
    began = time.monotonic()
    try:
        if rank == 0:
            _initiate(state, store, cfg, counts, began + cfg["seconds"])
        else:
            _serve(state, store, cfg, counts, start_agent)
    except Exception as exc:  # the record says what ended the run
        errors.append(f"{type(exc).__name__}: {exc}")
        store.set(f"failed/{rank}", errors[-1])
    finally:
        state["agent"].close()
    elapsed = time.monotonic() - began
    if rank == 1:
        store.set("result/1", json.dumps({"counts": counts, "errors": errors}))
        return {}
    peer_result = json.loads(_get(store, "result/1", timeout + 60))
    merged = dict(counts)
    for key in (
        "reads",
        "read_blocks",
        "wrong_bytes",
        "wrong_requests",
        "read_wrong_bytes",
        "restarts",
        "notifications_out_of_order",
    ):
        merged[key] = peer_result["counts"][key]
    return {"transport": transport, "seconds": round(elapsed, 1), "counts": merged,
            "errors": {"initiator": errors, "peer": peer_result["errors"]}}  # fmt: skip


def _initiate(state: dict, store, cfg: dict, counts: dict, end: float) -> None:
    """Rank 0: requests until the time is up (request ``k`` into area ``k % DEPTH``, once the peer acknowledged
    request ``k - DEPTH``), rejoining on the schedule; then the number of requests goes to the peer (``stop``)."""
    device, seed, timeout = cfg["device"], cfg["seed"], cfg["timeout"]
    agent = state["agent"]
    handles: list = []
    k = 0
    while time.monotonic() < end:
        if len(handles) == DEPTH:  # area k % DEPTH is free once request k - DEPTH was checked
            _wait_acked(store, k - DEPTH, timeout, handles)
            handles.pop(0).wait(timeout=timeout)
        area = (k % DEPTH) * AREA_BYTES[device]
        blocks = [(lo, area + at, n) for lo, at, n in plan(seed, k, device, 0)]
        handles.append(agent.write(state["peer"], "src", "dst", blocks, notify=k.to_bytes(8, "little")))
        counts["requests"] += 1
        counts["blocks"] += len(blocks)
        counts["bytes"] += sum(n for _, _, n in blocks)
        k += 1
        if k % cfg["rejoin_every"] == 0:  # every request acknowledged, then both sides drop each other
            _wait_acked(store, k - 1, timeout, handles)
            for handle in handles:
                handle.wait(timeout=timeout)
            handles.clear()
            rejoin = k // cfg["rejoin_every"]
            agent.remove_peer(state["peer"])
            store.set(f"removed/{rejoin}", b"1")
            state["peer"] = agent.add_peer(_get(store, f"ready/{rejoin}", timeout))  # the peer's (new) metadata
            store.set(f"added/{rejoin}", b"1")
            counts["rejoins"] += 1
    for handle in handles:
        handle.wait(timeout=timeout)
    store.set("stop", str(k).encode())
    _wait_acked(store, k - 1, timeout, [])


def _wait_acked(store, k: int, timeout: float, handles: list) -> None:
    """Until the peer acknowledged request ``k`` (its count of checked requests passed it), or an error; the
    requests in flight are checked meanwhile (NIXL makes progress on a request when its state is checked)."""
    deadline = time.monotonic() + timeout
    while int(store.add("acked", 0)) <= k:
        for handle in handles:
            handle.done()
        failed = store.check(["failed/1"])
        if failed or time.monotonic() > deadline:
            why = store.get("failed/1").decode() if failed else f"no acknowledgement within {timeout:g} s"
            raise RuntimeError(f"request {k}: the peer did not acknowledge it: {why}")
        time.sleep(1e-4)


def _serve(state: dict, store, cfg: dict, counts: dict, start_agent) -> None:
    """Rank 1: check every request as its notification arrives, read some back, rejoin on the schedule."""
    device, seed, timeout = cfg["device"], cfg["seed"], cfg["timeout"]
    source = source_bytes(seed, device)
    k, stop = 0, None
    arrived: set[int] = set()  # notified, not checked yet
    while stop is None or k < stop:
        deadline = time.monotonic() + timeout
        while k not in arrived:
            notes = state["agent"].notifications()
            for _, message in notes:
                got = int.from_bytes(message, "little")
                if not k <= got < k + DEPTH or got in arrived:
                    raise RuntimeError(f"a notification of request {got} where requests {k}-{k + DEPTH - 1} were due")
                counts["notifications_out_of_order"] += got != min(set(range(k, k + DEPTH)) - arrived)
                arrived.add(got)
            if notes:
                continue
            if stop is None and store.check(["stop"]):
                stop = int(store.get("stop"))
            if stop is not None and k >= stop:
                return
            if store.check(["failed/0"]):
                raise RuntimeError(f"the initiator failed: {store.get('failed/0').decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no notification for request {k} within {timeout:g} s")
        arrived.discard(k)
        area = state["dst"][(k % DEPTH) * AREA_BYTES[device] : (k % DEPTH + 1) * AREA_BYTES[device]]
        wrong = wrong_bytes(area, plan(seed, k, device, 0), source)
        counts["wrong_bytes"] += wrong
        counts["wrong_requests"] += wrong > 0
        area.zero_()
        if cfg["read_every"] and k % cfg["read_every"] == 0:
            blocks = plan(seed, k, device, 1)
            land = state["land"]
            state["agent"].read(state["peer"], "land", "src", [(at, lo, n) for lo, at, n in blocks]).wait(
                timeout=timeout
            )
            counts["read_wrong_bytes"] += wrong_bytes(land, blocks, source)
            counts["reads"] += 1
            counts["read_blocks"] += len(blocks)
            land.zero_()
        if device == "cuda":
            torch.cuda.synchronize()  # the area is zero before the initiator may write into it again
        store.add("acked", 1)
        k += 1
        if k % cfg["rejoin_every"] == 0:
            rejoin = k // cfg["rejoin_every"]
            _get(store, f"removed/{rejoin}", timeout)
            state["agent"].remove_peer(state["peer"])
            if rejoin % 5 == 0:  # a restart: a new agent of the same name, new regions
                state["agent"].close()
                start_agent()
                counts["restarts"] += 1
            store.set(f"ready/{rejoin}", state["agent"].metadata())
            _get(store, f"added/{rejoin}", timeout)
            state["peer"] = state["agent"].add_peer(_get(store, "meta/0", timeout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the initiator posts requests")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="where the regions are (default: cuda when there is a GPU)")  # fmt: skip
    parser.add_argument("--backend", default="auto", help="the agents' transport (auto, ipc, nixl)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="the deadline of every wait (seconds)")
    parser.add_argument("--read-every", type=int, default=3, help="the peer reads back every n-th request (0: never)")
    parser.add_argument("--rejoin-every", type=int, default=1000, help="requests between rejoins")
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 86400) or not (0 < args.timeout <= 3600):
        parser.error("--seconds must be in (0, 86400] and --timeout in (0, 3600]")
    if args.read_every < 0 or args.rejoin_every < 1:
        parser.error("--read-every must be >= 0 and --rejoin-every >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/transfer_soak.py: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 1
    cfg = {"device": device, "backend": args.backend, "seed": args.seed, "timeout": args.timeout,
           "seconds": args.seconds, "read_every": args.read_every, "rejoin_every": args.rejoin_every}  # fmt: skip
    result = spawn_ranks(_rank, (cfg,), 2, "transfer soak", timeout=args.timeout + 120)
    counts = result["counts"]
    meta = provenance(f"{device_name(torch.device(device))} (2 processes)", depth=DEPTH, sizes=list(SIZES[device]),
                      source_bytes=SOURCE_BYTES[device], area_bytes=AREA_BYTES[device])  # fmt: skip
    bad = counts["wrong_bytes"] + counts["read_wrong_bytes"] + sum(map(len, result["errors"].values()))
    print(json.dumps(result))
    print(f"wrote {write_record(args.out, meta, **result)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
