"""What our transfer agent costs the host per request over NIXL's own API, with the copy itself taken out.

Two agents with the ``nixl`` transport in one process and a raw NIXL agent beside them, connected over loopback.
Every NIXL call that builds a request is real (``get_xfer_descs``, ``initialize_xfer``, the handle's ``release``);
only the post is replaced: ``transfer`` answers ``DONE`` at once, as NIXL does for small transfers over loopback,
and moves nothing.  So what is timed is the host work of one request of ``count`` scattered 4 KB blocks:

* ``ours_array_us``: ``agent.write(peer, "pool", "pool", table).wait()``, the blocks an int64 ``[count, 3]`` array;
* ``ours_list_us``: the same with the blocks a list of ``(local_offset, remote_offset, nbytes)`` tuples;
* ``raw_us``: what a user of NIXL's API writes (the ``nixl-raw`` backend of ``sagellm-comm transfer``): the two
  ``[count, 3]`` uint64 descriptor arrays, ``get_xfer_descs``, ``initialize_xfer``, the post, the release.

Each figure is the lowest of ``--rounds`` per-call means (the variants interleaved in every round), so a pause of
the machine does not count.  NIXL's progress threads poll without pause; where there are two cores or more the
timing thread runs on a core apart from them.  ``ours - raw`` is what our agent adds to a request (its checks of
the block list and its handle); ``docs/transfer.md`` sets it against NIXL's own loopback time for the same request
(``bench/results/cpu/transfer.json``)::

    python -m bench.transfer_host_cost --out bench/results/cpu/transfer_host_cost.json
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from sagellm_comm.benchmark.provenance import provenance, write_record
from sagellm_comm.benchmark.results import device_name

BLOCK = 4096
POOL_BLOCKS = 4096


class _Posted:
    """What the replaced ``transfer`` does: the request is done, nothing moved."""

    @staticmethod
    def transfer(handle, notif_msg: bytes = b"") -> str:
        return "DONE"


def _cores() -> tuple[set[int], set[int]] | None:
    """``(NIXL threads' core, timing thread's cores)`` when the process may use two cores or more."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return ({cores[0]}, set(cores[1:])) if len(cores) >= 2 else None


def _agents(pool_bytes: int):
    """Our two agents (``a`` with peer ``b``) and a raw NIXL agent with ``b``'s NIXL agent as its remote."""
    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.nixl import nixl_api

    a, b = TransferAgent("host-cost-a", "nixl"), TransferAgent("host-cost-b", "nixl")
    pools = [torch.zeros(pool_bytes, dtype=torch.uint8) for _ in range(3)]
    a.register("pool", pools[0])
    b.register("pool", pools[1])
    peer = a.add_peer(b.metadata())
    api = nixl_api()
    raw = api.nixl_agent("host-cost-raw", api.nixl_agent_config(backends=["UCX"]))
    raw.register_memory(pools[2])
    remote = raw.add_remote_agent(b._backends["nixl"].agent.get_agent_metadata())
    remote = remote.decode() if isinstance(remote, bytes) else str(remote)
    for nixl in (a._backends["nixl"].agent, raw):
        nixl.transfer = _Posted.transfer
    return a, b, peer, raw, remote, pools


def _variants(a, peer: str, raw, remote: str, pools, count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    local_ids = rng.permutation(POOL_BLOCKS)[:count]
    remote_ids = rng.permutation(POOL_BLOCKS)[:count]
    table = np.stack([local_ids * BLOCK, remote_ids * BLOCK, np.full(count, BLOCK)], axis=1).astype(np.int64)
    rows = [tuple(row) for row in table.tolist()]
    local_base, remote_base = pools[2].data_ptr(), pools[1].data_ptr()

    def raw_request() -> None:
        local = np.empty((count, 3), dtype=np.uint64)
        local[:, 0] = local_ids * BLOCK + local_base
        local[:, 1] = BLOCK
        local[:, 2] = 0
        far = np.empty((count, 3), dtype=np.uint64)
        far[:, 0] = remote_ids * BLOCK + remote_base
        far[:, 1] = BLOCK
        far[:, 2] = 0
        handle = raw.initialize_xfer("WRITE", raw.get_xfer_descs(local, "DRAM"), raw.get_xfer_descs(far, "DRAM"),
                                     remote)  # fmt: skip
        state = raw.transfer(handle)
        while state == "PROC":
            state = raw.check_xfer_state(handle)
        handle.release()

    return {
        "ours_array_us": lambda: a.write(peer, "pool", "pool", table).wait(),
        "ours_list_us": lambda: a.write(peer, "pool", "pool", rows).wait(),
        "raw_us": raw_request,
    }


def _mean_us(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def measure(counts: list[int], rounds: int, budget_calls: int) -> list[dict]:
    cores = _cores()
    if cores is not None:
        os.sched_setaffinity(0, cores[0])  # the NIXL threads started from here stay on this core
    a, b, peer, raw, remote, pools = _agents(POOL_BLOCKS * BLOCK)
    if cores is not None:
        os.sched_setaffinity(0, cores[1])
    try:
        out = []
        for count in counts:
            variants = _variants(a, peer, raw, remote, pools, count, seed=count)
            calls = max(50, budget_calls // count)
            for call in variants.values():
                _mean_us(call, max(10, calls // 10))  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, call in variants.items():
                    samples[name].append(_mean_us(call, calls))
            row = {"block_bytes": BLOCK, "count": count, "calls": calls, "rounds": rounds}
            row.update({name: min(values) for name, values in samples.items()})
            row.update({name.replace("_us", "_median_us"): float(np.median(v)) for name, v in samples.items()})
            row["added_us"] = row["ours_array_us"] - row["raw_us"]
            out.append(row)
            print(f"{count:5d} blocks: ours {row['ours_array_us']:7.2f} us (list {row['ours_list_us']:7.2f}), "
                  f"raw NIXL {row['raw_us']:7.2f} us, added {row['added_us']:+6.2f} us", flush=True)  # fmt: skip
        return out
    finally:
        raw.deregister_memory(raw.get_reg_descs(pools[2]))
        a.close()
        b.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="record to write (JSON)")
    parser.add_argument("--counts", default="1,10,100,1000", help="blocks per request")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds, the variants interleaved")
    parser.add_argument("--calls", type=int, default=20000, help="blocks per timed stretch (calls = this / count)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if not counts or min(counts) < 1 or max(counts) > POOL_BLOCKS or args.rounds < 1 or args.calls < 1:
        parser.error(f"counts must be 1..{POOL_BLOCKS}, rounds and calls at least 1")
    pinned = _cores() is not None
    results = measure(counts, args.rounds, args.calls)
    meta = provenance(f"{device_name(torch.device('cpu'))} (one process)",
                      timing="lowest per-call mean over interleaved rounds", pinned=pinned)  # fmt: skip
    print(f"wrote {write_record(args.out, meta, results=results)}")


if __name__ == "__main__":
    main()
