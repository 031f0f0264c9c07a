"""What a peer's metadata may make the ``ipc`` path touch in this process: addresses come from memory this process
can prove is the peer's registered regions, never from the bytes.

* A peer in this process: its regions are looked up among the process's live agents by the key its metadata
  carries, and taken only where the metadata describes them exactly as that agent registered them now.
* A peer in another process: its regions are the mappings made from its handles (shared files here), checked to
  hold what the metadata claims.
* Damaged metadata (bytes flipped or cut, numbers out of range): a typed error, or the same memory.

Agents that copy run in a child process under the Triton interpreter (the same kernel, descriptors and checks as
on GPUs; the interpreter is chosen when the kernel is defined), so that a copy through a bad address shows as a
failed test, not a dead test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.transfer.metadata import MAGIC

# Two agents of one process over ipc, each with a 4 KB "kv" region (b's holding 1..251, never 0), and
# forged(agent, change): the agent's metadata after change(body, its ipc section).
_PRELUDE = """
import json, torch
from sagellm_comm.errors import CommError, InvalidArgumentError
from sagellm_comm.transfer import TransferAgent
from sagellm_comm.transfer.metadata import MAGIC

a, b = TransferAgent("a", "ipc", timeout=5.0), TransferAgent("b", "ipc", timeout=5.0)
mine = a.allocate("kv", 4096, torch.uint8)
theirs = b.allocate("kv", 4096, torch.uint8)
theirs.copy_(torch.arange(4096) % 251 + 1)


def forged(agent, change):
    body = json.loads(agent.metadata()[len(MAGIC) :])
    change(body, body["transports"]["ipc"])
    return MAGIC + json.dumps(body).encode()


def refused(metadata, *words):
    try:
        a.add_peer(metadata)
    except InvalidArgumentError as exc:
        assert all(word in str(exc) for word in ("peer 'b'", *words)), (words, str(exc))
        assert a.peers == [], a.peers
        return
    raise AssertionError(f"metadata accepted; expected a refusal naming {words}")
"""


def _child(script: str) -> str:
    """Run ``script`` after the prelude in a child process; its standard output (it asserts what it checks)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    code = _PRELUDE + textwrap.dedent(script) + "\na.close()\nb.close()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stdout}{out.stderr}"
    return out.stdout


def test_an_in_process_peers_region_address_pointing_elsewhere_is_refused_and_nothing_is_written():
    """A peer of this process whose metadata puts its region at another address (any memory of this process) is
    refused, naming the peer, the region and the field: no peer is added and that memory is never written."""
    _child("""
        victim = torch.zeros(4096, dtype=torch.uint8)
        def elsewhere(body, section):
            section["regions"]["kv"]["address"] = victim.data_ptr()
        try:
            refused(forged(b, elsewhere), "region 'kv'", "'address'")
        finally:
            if a.peers:
                a.write("b", "kv", "kv", [(0, 0, 4096)]).wait(5.0)
        assert victim.eq(0).all()
        a.add_peer(b.metadata())  # the metadata as made is taken
        a.read("b", "kv", "kv", [(0, 0, 4096)]).wait(5.0)
        assert mine.equal(theirs)
    """)


def test_an_in_process_peers_metadata_that_differs_from_the_live_agent_is_refused():
    """Sizes, offsets and the probe of a peer in this process are what its live agent registered, or the metadata is
    refused naming the field (a size larger than the region, a probe at an unmapped address: before, copies out of
    bounds or a crash); a key that names no live agent of this process is refused too."""
    _child("""
        def region(key, value):
            return lambda body, section: section["regions"]["kv"].__setitem__(key, value)
        def probe(key, value):
            return lambda body, section: section["probe"].__setitem__(key, value)
        def larger(body, section):
            body["regions"]["kv"]["nbytes"] = section["regions"]["kv"]["size"] = 1 << 20
        cases = [
            (region("size", 1 << 40), ("region 'kv'", "'size'")),
            (lambda body, section: section["regions"]["kv"].update(offset=64, size=8192), ("region 'kv'", "'offset'")),
            (larger, ("region 'kv'", "'nbytes'")),
            (probe("address", 1 << 46), ("probe", "'address'")),
            (lambda body, section: section["probe"].update(offset=16, size=4096), ("probe", "'offset'")),
            (probe("token", "ab" * 16), ("probe", "'token'")),
            (lambda body, section: section.__setitem__("key", "0" * 32), ("'key'", "no live agent")),
            (lambda body, section: section.pop("key"), ("'key'",)),
        ]
        for change, words in cases:
            refused(forged(b, change), *words)
    """)


def test_an_in_process_peer_is_refused_once_it_closed_or_deregistered_the_region():
    """Metadata outlives what it describes: a region deregistered since, or an agent closed since, is refused instead
    of used at its old address."""
    _child("""
        before = b.metadata()
        b.deregister("kv")
        refused(before, "region 'kv'", "not registered")
        c = TransferAgent("c", "ipc", timeout=5.0)
        c.allocate("kv", 4096, torch.uint8)
        closed = c.metadata()
        c.close()
        try:
            a.add_peer(closed)
            raise AssertionError("accepted")
        except InvalidArgumentError as exc:
            assert "peer 'c'" in str(exc) and "no live agent of this process" in str(exc), str(exc)
        assert a.peers == []
    """)


def test_an_in_process_peer_keeps_the_regions_it_was_added_with_alive():
    """A link to a peer of this process holds the peer's regions as a mapping would: a region the peer deregisters
    and drops stays valid memory until the link goes (a write to it never lands in freed memory)."""
    _child("""
        import gc, weakref
        pool = b.allocate("pool", 4096, torch.uint8)
        held = weakref.ref(pool)
        a.add_peer(b.metadata())
        b.deregister("pool")
        del pool
        gc.collect()
        assert held() is not None, "freed while a link may still write it"
        a.write("b", "kv", "pool", [(0, 0, 4096)]).wait(5.0)
        a.remove_peer("b")
        gc.collect()
        assert held() is None, "kept after the link went"
    """)


@pytest.mark.parametrize("when", ["taking", "reading"])
def test_an_in_process_peer_that_closes_while_its_probe_is_taken_or_read_closes_after_the_read(when):
    """Agent c (no region: its probe is all that is taken from it) closes in another thread while a's add_peer,
    having found it live, takes its probe (``taking``) or reads it through the mapping (``reading``): c's close waits
    until a read the probe.  Before, it went on and released the probe (on a GPU: freed it) under a's read."""
    _child(
        """
        import threading
        from sagellm_comm.transfer import ipc

        c = TransferAgent("c", "ipc", timeout=5.0)
        closing, seen = threading.Thread(target=c.close), []
        same, probe = ipc._same, a._backends["ipc"]._probe

        def close_meanwhile():
            seen.append("c closing")
            closing.start()
            closing.join(0.5)

        def taking(peer, what, given, registered):
            if WHEN == "taking" and what.endswith("'probe'") and not seen:
                close_meanwhile()
            return same(peer, what, given, registered)

        def reading(link, token):
            if WHEN == "reading":
                close_meanwhile()
            seen.append("c closed before the read" if not closing.is_alive() else "c still open at the read")
            probe(link, token)
            seen.append("read")

        ipc._same, a._backends["ipc"]._probe = taking, reading
        a.add_peer(c.metadata())
        closing.join(10.0)
        assert seen == ["c closing", "c still open at the read", "read"], seen
        assert not closing.is_alive(), "c's close did not end once the probe was read"
        assert c._backends["ipc"].key not in ipc._LIVE
        """.replace("WHEN", repr(when))
    )


def test_a_peer_in_another_process_gets_mappings_of_its_files_whatever_addresses_its_bytes_give():
    """For a peer of another process (here: this one's metadata under another process id) the addresses in the
    bytes are never used: its files are mapped, checked to hold its regions, and the regions found there."""
    _child("""
        victim = torch.zeros(4096, dtype=torch.uint8)
        def elsewhere(body, section):
            body["process"] = "f" * 16
            section["regions"]["kv"]["address"] = victim.data_ptr()
            section["probe"]["address"] = 1 << 46
        a.add_peer(forged(b, elsewhere))
        a.read("b", "kv", "kv", [(0, 0, 4096)]).wait(5.0)
        assert mine.equal(theirs) and victim.eq(0).all()
        a.remove_peer("b")
        def larger(body, section):
            body["process"] = "f" * 16
            body["regions"]["kv"]["nbytes"] = section["regions"]["kv"]["size"] = 1 << 20
        try:
            a.add_peer(forged(b, larger))
            raise AssertionError("accepted")
        except InvalidArgumentError as exc:
            assert all(w in str(exc) for w in ("peer 'b'", "region 'kv'", "1048576 bytes", "4096")), str(exc)
        assert a.peers == []
    """)


def test_an_export_of_another_kind_than_its_sections_device_or_a_handle_of_another_length_is_refused():
    """A CPU section's exports are transfer files, a GPU section's CUDA IPC handles of 64 bytes: a handle cut short
    (which the CUDA runtime would read past) or of the other kind is refused naming the field, before it is
    opened."""
    _child("""
        import base64
        def handle(device, nbytes):
            def change(body, section):
                body["process"] = "f" * 16
                section["device"] = device
                for export in (section["probe"], section["regions"]["kv"]):
                    del export["path"]
                    export["handle"] = base64.b64encode(b"h" * nbytes).decode()
            return change
        refused(forged(b, handle("cpu", 64)), "'probe' has no 'path'")
        refused(forged(b, handle("cuda", 8)), "'probe': 'handle' must be a CUDA IPC handle of 64 bytes")
        refused(forged(b, handle("cuda", 65)), "'probe': 'handle' must be a CUDA IPC handle of 64 bytes")
        def cuda(body, section):
            body["process"] = "f" * 16
            section["device"] = "cuda"
        refused(forged(b, cuda), "'probe' has no 'handle'")
    """)


class _Allocation:
    """A stand-in for CUDA IPC memory (``CudaIpcMemory``'s calls that ``open_shared`` makes): each handle maps an
    allocation of ``nbytes``."""

    def __init__(self, nbytes: int):
        self.nbytes, self.closed = nbytes, []

    def open(self, handle: bytes, nbytes: int) -> int:
        return 1 << 40

    def mapped_bytes(self, ptr: int) -> int:
        return self.nbytes

    def close(self, ptr: int) -> None:
        self.closed.append(ptr)


def test_a_cuda_handle_is_mapped_only_where_its_allocation_holds_what_the_metadata_claims():
    """The size in a GPU peer's metadata is the peer's word: the allocation a handle maps is measured after it is
    opened (``cuMemGetAddressRange`` on a GPU), and metadata that puts more bytes in it is refused, the mapping
    closed, also when the handle was already open for another region."""
    from sagellm_comm.errors import InvalidArgumentError
    from sagellm_comm.transfer.ipc_memory import close_shared, open_shared

    memory = _Allocation(4096)
    with pytest.raises(InvalidArgumentError, match="8192 bytes.*4096"):
        open_shared(memory, b"h" * 64, 0, 8192)
    assert memory.closed == [1 << 40]
    assert open_shared(memory, b"h" * 64, 0, 4096) == 1 << 40
    with pytest.raises(InvalidArgumentError, match="4097 bytes.*4096"):
        open_shared(memory, b"h" * 64, 0, 4097)
    close_shared(memory, b"h" * 64, 0)
    assert memory.closed == [1 << 40] * 2


def test_damaged_metadata_is_refused_with_a_typed_error_or_moves_the_right_bytes():
    """A few hundred damaged copies of a peer's metadata (fixed seed: a bit flipped, a byte replaced, removed or
    doubled, the bytes cut short, a number changed: by one, by a page, to 0, -1, 2**62, 2**63, 2**64 or another
    number of the metadata, such as another address), as from this process and as from another: each is refused
    with a typed error and no peer added, or it still describes the same memory and a read through it returns the
    peer's bytes (or is refused before a byte moves).  Never a crash, an untyped error, or a copy through an
    address of the bytes."""
    out = _child(r"""
        import random, re
        from collections import Counter
        from sagellm_comm.errors import BackendNotSupportedError
        def elsewhere(body, section):
            body["process"] = "f" * 16
        bases = [b.metadata(), forged(b, elsewhere)]
        numbers = re.compile(rb"(?<=[:\[, ])-?[0-9]+(?=[,}\]])")
        rng, seen = random.Random(20261207), Counter()
        for i in range(300):
            data = bytearray(bases[i % 2])
            at = rng.randrange(len(data))
            how = rng.choice(["flip", "replace", "remove", "double", "cut", "number", "number"])
            if how == "number":
                found = list(numbers.finditer(data))
                token, other = rng.choice(found), rng.choice(found)
                value = int(token.group())
                value = rng.choice([value + 1, value - 1, value + 4096, value - 4096, 0, -1, 1 << 62, 1 << 63,
                                    1 << 64, int(other.group())])
                data[token.start() : token.end()] = str(value).encode()
            elif how == "flip":
                data[at] ^= 1 << rng.randrange(8)
            elif how == "replace":
                data[at] = rng.choice(b'0123456789abcdef",:{}[] -')
            elif how == "remove":
                del data[at]
            elif how == "double":
                data.insert(at, data[at])
            else:
                del data[at:]
            try:
                name = a.add_peer(bytes(data))
            except (InvalidArgumentError, BackendNotSupportedError) as exc:
                assert a.peers == [], (i, how, a.peers)
                assert "cannot map peer" not in str(exc), (i, how, str(exc))  # an unchecked field's raw error
                seen[type(exc).__name__] += 1
                continue
            mine.zero_()
            try:
                a.read(name, "kv", "kv", [(0, 0, 4096)]).wait(5.0)
                assert mine.equal(theirs), (i, how, bytes(data))
                seen["accepted, bytes right"] += 1
            except CommError:
                assert not mine.any(), (i, how, bytes(data))
                seen["accepted, read refused"] += 1
            a.remove_peer(name)
        print(json.dumps(seen))
    """)
    seen = json.loads(out.splitlines()[-1])
    assert sum(seen.values()) == 300 and seen["InvalidArgumentError"] > 100, seen
    assert seen.get("accepted, bytes right", 0) > 0, seen


@pytest.mark.parametrize(
    ("export", "key", "value"),
    [
        ("regions", "offset", -1),
        ("regions", "offset", 1 << 63),
        ("regions", "offset", (1 << 62) + 1),
        ("regions", "size", 0),
        ("regions", "size", 1 << 63),
        ("regions", "size", 4096.0),
        ("regions", "address", -1),
        ("regions", "address", 1 << 64),
        ("regions", "address", True),
        ("probe", "offset", 1 << 62),
        ("probe", "size", 1 << 64),
    ],
)
def test_an_ipc_sections_numbers_out_of_range_are_refused_naming_the_field(monkeypatch, export, key, value):
    """Every number of a peer's ipc section is an integer in its range (never converted), and an offset plus the
    region's size must fit the memory the section names: refused at add_peer naming the field, before anything
    is opened, for a peer of another process as for one of this process."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with TransferAgent("a", "ipc") as a, TransferAgent("b", "ipc") as b:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        for process in ("f" * 16, None):
            body = json.loads(b.metadata()[len(MAGIC) :])
            body["process"] = process or body["process"]
            section = body["transports"]["ipc"]
            (section["probe"] if export == "probe" else section["regions"]["kv"])[key] = value
            named = "'probe'" if export == "probe" else "'regions' 'kv'"
            with pytest.raises(InvalidArgumentError, match=f"malformed: peer 'b''s ipc section: {named}") as refused:
                a.add_peer(MAGIC + json.dumps(body).encode())
            assert f"'{key}' must be an integer" in str(refused.value) or "at its offset" in str(refused.value)
            assert a.peers == []
