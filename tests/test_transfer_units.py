"""The transfer package's parts on their own, in this process: block tables and their checks, metadata, the
registry, shared memory and owner locks, and the notification rings (records written by the host the way the
block-copy kernel writes them: message first, sequence number last).

Transfers between agents (NIXL over loopback, the ipc path under the Triton interpreter) are in
tests/test_transfer.py; the kernel's PTX is checked in tests/test_kernels_compile.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types

import numpy as np
import pytest
import torch

from sagellm_comm import shm
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CommError,
    CommTimeoutError,
    ErrorCode,
    InvalidArgumentError,
    NotImplementedCommError,
    NotInitializedError,
    PeerLostError,
    ShapeMismatchError,
    TransferError,
    UnavailableError,
)
from sagellm_comm.transfer import agent as agent_module
from sagellm_comm.transfer import descriptors as d
from sagellm_comm.transfer import notify, registry, shared
from sagellm_comm.transfer.base import Link, Request, TransferBackend
from sagellm_comm.transfer.metadata import AgentMetadata, local_identity

F32 = d.RegionInfo("kv", 4096, "float32", 4, "cpu")
U8 = d.RegionInfo("raw", 1000, "uint8", 1, "cpu")


# ---------------------------------------------------------------------------------------------- block tables
def test_block_table_accepts_lists_arrays_and_tensors_and_refuses_malformed_input():
    triples = [(0, 16, 32), (64, 128, 16)]
    for given in (triples, np.array(triples, dtype=np.int32), torch.tensor(triples)):
        table = d.block_table(given)
        assert table.dtype == np.int64 and table.flags.c_contiguous and table.tolist() == [list(t) for t in triples]
    for bad, words in (
        ([], "empty"),
        ([(1, 2)], "shape"),
        ([(1, 2, "x")], "integers"),
        ([(1, 2, "16")], "integers"),  # never parsed
        ([(0, 1.5, 4)], "integers"),  # never rounded: offset 1.5 is not offset 1
        ([(0, 16, 32.0)], "integers"),
        ([(2**70, 0, 4)], "within int64"),
        ([(2**63, 0, 4)], "within int64"),
        (np.array([[2**63, 0, 4]], dtype=np.uint64), "within int64"),
        ([(True, False, True)], "integers"),
        ([(True, 0, 16)], "boolean True at \\[0, 0\\]"),  # numpy reads a bool beside ints as 1: never taken
        ([(0, 16, 32)] * 30 + [(0, False, 32)], "boolean False at \\[30, 1\\]"),
        ([(0, 16, 32)] * 30 + [(np.True_, 0, 32)], "boolean .*True.* at \\[30, 0\\]"),
        ([(0, 1, 2), (3, 4)], "integers"),  # ragged
        (np.zeros((2, 3), dtype=np.float32), "integers"),
        (torch.tensor([[0.0, 1.5, 4.0]]), "integers"),
        ("0,0,4", "list"),
        (torch.zeros(2, 3, dtype=torch.int64, device="meta"), "CPU"),
        (torch.zeros(2, 3, dtype=torch.bfloat16), "integers, got a torch.bfloat16 tensor"),  # numpy has no bfloat16
        (torch.zeros(2, 3, dtype=torch.int64).to_sparse(), "integers"),
    ):
        with pytest.raises(InvalidArgumentError, match=words):
            d.block_table(bad)


@pytest.mark.parametrize(
    ("blocks", "op", "words"),
    [
        ([(0, 0, 0)], "write", "positive"),
        ([(0, 0, -4)], "write", "positive"),
        ([(-4, 0, 4)], "write", "outside the local region"),
        ([(4092, 0, 8)], "write", "outside the local region"),
        ([(0, 4096, 4)], "write", "outside the remote region"),
        ([((1 << 63) - 64, 0, 128)], "write", "outside the local region"),  # offset + nbytes wraps in int64
        ([(0, (1 << 63) - 64, 128)], "write", "outside the remote region"),
        ([(64, 64, (1 << 63) - 4)], "write", "outside the local region"),
        ([(0, 2, 4)], "write", "multiples of the element size"),
        ([(0, 0, 6)], "write", "multiples of the element size"),
        ([(0, 2, 4), (8192, 0, 4)], "write", "multiples of the element size"),  # the first bad block is named
        ([(8192, 0, 4), (0, 2, 4)], "write", "outside the local region"),
        ([(0, 0, 64), (64, 60, 8)], "write", "overlap in the destination"),
        ([(0, 0, 64), (32, 64, 64)], "read", "overlap in the destination"),
    ],
)
@pytest.mark.parametrize("pad", [0, 40], ids=["few", "many"])  # Python-int and numpy paths
def test_check_blocks_refuses_blocks_outside_regions_misaligned_or_overlapping(blocks, op, words, pad):
    padding = [(2048 + 8 * i, 2048 + 8 * i, 4) for i in range(pad)]  # valid, disjoint from the tested blocks
    with pytest.raises(InvalidArgumentError, match=words) as info:
        d.check_blocks(d.block_table(padding + blocks), F32, F32, op, "peer 'p'")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"block {pad}" in str(info.value) or f"blocks {pad}" in str(info.value)  # names the first bad one


def test_check_blocks_accepts_source_overlap_and_adjacent_destinations():
    # The same source block twice (a gather may repeat a source) into adjacent destinations: fine for a write,
    # but the read of the same table has overlapping destinations (the local side).
    table = d.block_table([(0, 0, 64), (0, 64, 64), (128, 128, 4)])
    d.check_blocks(table, F32, F32, "write", "peer 'p'")
    with pytest.raises(InvalidArgumentError, match="overlap"):
        d.check_blocks(table, F32, F32, "read", "peer 'p'")
    d.check_blocks(d.block_table([(999, 0, 1), (0, 999, 1)]), U8, U8, "write", "peer 'p'")  # bytes: any offset


def _verdict(check, *args):
    try:
        return check(*args)
    except InvalidArgumentError as exc:
        return str(exc)


@pytest.mark.parametrize("count", [2, 7, 16, 17, 40], ids=lambda c: f"{c}blocks")
def test_check_blocks_one_length_shortcut_gives_the_general_checks_verdict(count):
    """Tables of one block length (a KV pool's) are checked by a shortcut (extremes and sorted starts); on
    valid tables and on each kind of bad one it must agree with the block-by-block checks, error text included."""
    rng = np.random.default_rng(count)
    mutations = ("none", "negative", "past the end", "misaligned", "overlap", "zero", "other length", "same start",
                 "one odd length")  # fmt: skip
    regions = [d.RegionInfo(name, 8192, dtype, itemsize, "cpu") for name, dtype, itemsize in
               (("f32", "float32", 4), ("u8", "uint8", 1), ("f16", "float16", 2))]  # fmt: skip
    for region in regions:
        size = 64 if region.itemsize > 1 else 8
        for mutation in mutations:
            for _ in range(25):
                slots = rng.permutation(region.nbytes // size)
                rows = [
                    [int(a) * size, int(b) * size, size]
                    for a, b in zip(slots[:count], slots[count : 2 * count], strict=True)
                ]
                i, column = int(rng.integers(count)), int(rng.integers(2))
                if mutation == "negative":
                    rows[i][column] = -size
                elif mutation == "past the end":
                    rows[i][column] = region.nbytes - size // 2
                elif mutation == "misaligned":
                    rows[i][column] += 1 if region.itemsize > 1 else 0
                elif mutation == "overlap":
                    rows[i][column] = rows[(i + 1) % count][column] + int(rng.integers(-size + 1, size))
                elif mutation == "zero":
                    rows[i][2] = 0
                elif mutation == "other length":
                    rows[i][2] = size // 2
                elif mutation == "same start":
                    rows[i][column] = rows[(i + 1) % count][column]
                elif mutation == "one odd length":  # whole elements of u8 only
                    for row in rows:
                        row[2] = size - 1
                table = d.block_table(rows)
                for op in ("write", "read"):
                    want_column = 1 if op == "write" else 0
                    if count <= d.SMALL:
                        expected = _verdict(d._rows_total, table.tolist(), region, region, op)
                    else:
                        expected = _verdict(d._table_total, table, region, region, op, want_column)
                    got = _verdict(d.check_blocks, table, region, region, op, "peer 'p'")
                    assert got == expected, (region.name, mutation, op, rows)
                    if mutation == "none":
                        assert got == size * count


def test_check_pair_refuses_dtype_and_device_mismatch():
    with pytest.raises(ShapeMismatchError, match="holds float32.*holds uint8"):
        d.check_blocks(d.block_table([(0, 0, 4)]), F32, U8, "write", "peer 'p'")
    gpu = d.RegionInfo("kv", 4096, "float32", 4, "cuda")
    with pytest.raises(ShapeMismatchError, match="same kind of device"):
        d.check_blocks(d.block_table([(0, 0, 4)]), F32, gpu, "write", "peer 'p'")


def test_one_block_and_one_id_take_python_ints_only_and_leave_every_other_form_to_the_general_path():
    for blocks in ([(0, 16, 32)], [[0, 16, 32]], ((0, 16, 32),), ([0, 16, 32],), [(-1, 2**70, 0)]):
        assert d.one_block(blocks) == blocks[0]
    for blocks in (np.array([[0, 16, 32]]), np.array([[0, 16, 32]], dtype=np.uint64)):
        row = d.one_block(blocks)
        assert row == [0, 16, 32] and all(v.__class__ is int for v in row)
    for blocks in (
        [(0, 16, 32), (64, 128, 16)], [], [(0, 16)], [(0, 16, 32, 1)], [(True, 16, 32)], [(0, 16, 32.0)],
        [(np.int64(0), 16, 32)], torch.tensor([[0, 16, 32]]), "0,16,32", [range(3)], np.array([[0.0, 16, 32]]),
        np.array([0, 16, 32]), np.array([[0, 16, 32], [64, 128, 16]]), np.array([[True, False, True]]),
    ):  # fmt: skip
        assert d.one_block(blocks) is None, blocks
    for ids, expected in ((7, 7), ([7], 7), ((7,), 7), ([-1], -1), (np.int64(7), 7), (np.array([7]), 7),
                          (np.array([[7]], dtype=np.uint32), 7)):  # fmt: skip
        assert d.one_id(ids) == expected and d.one_id(ids).__class__ is int
    for ids in ([1, 2], [], True, [True], [np.int64(7)], np.array([7.0]), np.array([True]), np.array([1, 2]),
                [7.0], "7"):  # fmt: skip
        assert d.one_id(ids) is None, ids


GPU_F32 = d.RegionInfo("kv", 4096, "float32", 4, "cuda")
F16 = d.RegionInfo("half", 4096, "float16", 2, "cpu")


@pytest.mark.parametrize("remote", [F32, U8, GPU_F32, F16], ids=["f32", "u8", "f32-cuda", "f16"])
def test_one_block_fits_is_check_blocks_verdict_on_one_block(remote):
    local = F32 if remote is not U8 else U8
    edges = (-5, -4, -1, 0, 1, 2, 3, 4, 996, 999, 1000, 4092, 4095, 4096, 4100, 2**63, 2**70)
    for lo in edges:
        for ro in edges:
            for n in (-4, 0, 1, 4, 6, 8, 1000, 4096):
                try:
                    d.check_blocks(d.block_table([(lo, ro, n)]), local, remote, "write", "peer 'p'")
                    accepted = True
                except (InvalidArgumentError, ShapeMismatchError):
                    accepted = False
                assert d.one_block_fits(local, remote, lo, ro, n) == accepted, (lo, ro, n)


def test_ids_fit_is_check_block_ids_verdict_on_one_pair():
    layout = d.make_layout(F32, d.RegionInfo("kv", 1000, "float32", 4, "cpu"), 256, "peer 'p'")  # 16 and 3 blocks
    for local_block in (-1, 0, 15, 16, 2**70):
        for remote_block in (-1, 0, 2, 3):
            try:
                d.check_block_ids(d.block_ids([local_block], [remote_block]), layout, "write")
                accepted = True
            except InvalidArgumentError:
                accepted = False
            assert d.ids_fit(layout, local_block, remote_block) == accepted, (local_block, remote_block)


@pytest.mark.parametrize("part", [1, 16, 100, 4096])
def test_split_rows_cuts_long_blocks_and_covers_every_byte_once(part):
    rng = np.random.default_rng(part)
    table = np.stack([rng.integers(0, 10_000, 50), rng.integers(0, 10_000, 50), rng.integers(1, 9000, 50)], 1)
    rows = d.split_rows(table.astype(np.int64), part)
    assert (rows[:, 2] <= part).all() and (rows[:, 2] > 0).all()
    expected = {(s + k, t + k) for s, t, n in table.tolist() for k in range(n)}
    got = {(s + k, t + k) for s, t, n in rows.tolist() for k in range(n)}
    assert got == expected and rows[:, 2].sum() == table[:, 2].sum()


def test_block_ids_refuse_what_is_not_integers_instead_of_rounding_it():
    for local, remote in (
        ([1.5], [2]), ([1], [2.5]), ([1, 2], ["3", 4]), (np.array([1.0]), [2]), (torch.tensor([1.5]), [2]),
        ([2**64], [1]), (list(range(40)), [0.5] * 40), ([True], [3]), ([0, 1], [2, False]),
        (list(range(40)), [*range(39), True]), (torch.tensor([1], dtype=torch.bfloat16), [2]),
    ):  # fmt: skip
        with pytest.raises(InvalidArgumentError, match="integers"):
            d.block_ids(local, remote)
    assert d.block_ids([3], [4]).tolist() == [[3, 4]]
    assert d.block_ids(torch.tensor([1, 2]), np.array([3, 4], dtype=np.uint32)).tolist() == [[1, 3], [2, 4]]


def test_block_ids_layout_and_their_checks():
    layout = d.make_layout(F32, d.RegionInfo("kv", 1000, "float32", 4, "cpu"), 256, "peer 'p'")
    assert (layout.local_blocks, layout.remote_blocks) == (16, 3)
    ids = d.block_ids([0, 15, 3], np.array([2, 0, 1]))
    d.check_block_ids(ids, layout, "write")
    assert d.ids_to_table(ids, 256).tolist() == [[0, 512, 256], [3840, 0, 256], [768, 256, 256]]
    for local, remote, op, words in (
        ([16], [0], "write", "local block id 16 is outside"),
        ([0], [-1], "write", "remote block id -1"),
        ([0, 1], [2, 2], "write", "remote block 2 is named twice"),
        ([1, 1], [0, 2], "read", "local block 1 is named twice"),
        ([0, 1], [0], "write", "2 local block ids but 1"),
        ([], [], "write", "no block ids"),
    ):
        with pytest.raises(InvalidArgumentError, match=words):
            d.check_block_ids(d.block_ids(local, remote), layout, op)
    d.check_block_ids(d.block_ids([1, 1], [0, 2]), layout, "write")  # repeated source: fine
    for bad, words in ((0, "positive"), (6, "multiple of the element size"), (8192, "larger than")):
        with pytest.raises(InvalidArgumentError, match=words):
            d.make_layout(F32, F32, bad, "peer 'p'")


def test_make_region_refuses_what_cannot_be_registered():
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        d.make_region("kv", torch.zeros(4, 4).t())
    with pytest.raises(InvalidArgumentError, match="empty"):
        d.make_region("kv", torch.zeros(0))
    with pytest.raises(InvalidArgumentError, match="torch.Tensor"):
        d.make_region("kv", np.zeros(4))
    for name in ("", "kv\n", "kv\t0", "\0probe", "x" * 129):
        with pytest.raises(InvalidArgumentError, match="region name"):
            d.make_region(name, torch.zeros(4))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4).to_sparse(),
        lambda: torch.eye(4).to_sparse_csr(),
        lambda: torch.eye(4).to_sparse_csc(),
        lambda: torch.eye(4).to_sparse_bsr((2, 2)),
        lambda: torch.zeros(4).to_mkldnn(),
    ],
    ids=["sparse-coo", "sparse-csr", "sparse-csc", "sparse-bsr", "mkldnn"],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_tensor_of_another_layout_than_strided_is_refused_as_a_region_naming_its_layout(recording_agents, make):
    """A sparse CSR/CSC/BSR or MKL-DNN tensor made register raise torch's RuntimeError (``is_contiguous`` or
    ``data_ptr`` of a layout that has none); a COO one was called not contiguous, with strides it does not have."""
    agent, _ = recording_agents
    try:
        tensor = make()
    except RuntimeError as exc:  # a torch build without this layout
        pytest.skip(f"this torch cannot make the tensor: {exc}")
    with pytest.raises(InvalidArgumentError, match=rf"region 'odd': a {tensor.layout} tensor cannot be registered"):
        agent.register("odd", tensor)
    assert "odd" not in agent.regions


class _Wrapper(torch.Tensor):
    """A wrapper tensor subclass (as DTensor is): shape, dtype and device of its own, its memory in another tensor."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func}")


def test_a_tensor_without_memory_of_its_own_is_refused_as_a_region(recording_agents):
    """A FakeTensor or a wrapper subclass has data pointer 0: registered, a transport was handed address 0 (the
    built-ins refused it by luck, as process-private memory or a NIXL backend error; another transport would copy
    from and to address 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    agent, backend = recording_agents
    with FakeTensorMode():
        fake = torch.zeros(16)
    for tensor in (fake, _Wrapper(torch.zeros(16))):
        with pytest.raises(InvalidArgumentError, match=r"region 'nomem': the tensor \(\w+\) has no memory of its own"):
            agent.register("nomem", tensor)
    assert "nomem" not in agent.regions


def test_a_lazily_conjugated_or_negated_view_is_refused_as_a_region(recording_agents):
    """Peers move a region's memory, and a conjugate (or negative) view's memory holds the values before its lazy
    conjugation: registered, a peer would read ``1+2j`` from a tensor that shows ``1-2j``."""
    agent, _ = recording_agents
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    for view in (z.conj(), torch.tensor([1.0, 2.0])._neg_view()):
        assert view.is_contiguous()
        with pytest.raises(InvalidArgumentError, match=r"region 'lazy' is a lazily conjugated .*resolve_conj\(\)"):
            agent.register("lazy", view)
        with pytest.raises(InvalidArgumentError, match="lazily conjugated"):
            d.make_region("lazy", view)
    assert "lazy" not in agent.regions
    agent.register("lazy", z.conj().resolve_conj())  # resolved: its memory holds what it shows
    assert "lazy" in agent.regions


def test_every_region_name_register_takes_is_one_a_peer_reads_from_the_metadata(recording_agents):
    """A region name the peers' metadata check refuses (a tab, a newline) is refused at ``register``: taken there,
    it made every peer's ``add_peer`` of this agent fail."""
    agent, _ = recording_agents
    with pytest.raises(InvalidArgumentError, match="region name"):
        agent.register("kv\t1", torch.zeros(4))
    agent.register("kv 1 \u00e9", torch.zeros(4))
    assert "kv 1 \u00e9" in AgentMetadata.decode(agent.metadata()).regions
    region = d.make_region("kv", torch.zeros(3, 5, dtype=torch.bfloat16))
    assert region.info == d.RegionInfo("kv", 30, "bfloat16", 2, "cpu", 0)


# ---------------------------------------------------------------------------------------------- metadata
def test_metadata_round_trips_and_refuses_foreign_bytes():
    meta = local_identity("decode-0", "abc")
    meta.regions = {"kv": F32}
    meta.transports = {"nixl": {"agent": "AAEC", "regions": {"kv": [1, 2, 0]}}}
    again = AgentMetadata.decode(meta.encode())
    assert again == meta and again.same_process(meta) and again.same_host(meta)
    other = AgentMetadata("x", "y", meta.host, "another-boot", 1)
    assert not other.same_host(meta)
    # Another pid namespace on this host (a container sharing /dev/shm) whose process has this pid: another
    # process all the same (the ipc path must map its memory, not use its addresses).
    twin = AgentMetadata.decode(local_identity("twin", "abc").encode())
    twin.process = "0" * 16
    assert twin.same_host(meta) and twin.pid == meta.pid and not twin.same_process(meta)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child: the same memory, a process id of its own
        os.write(write, local_identity("child", "i").process.encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == len(meta.process) == 16 and child != meta.process
    for bad in (b"", b"hello", meta.encode()[:-5], 17, b"sagellm-transfer-agent/2\n{}"):
        with pytest.raises(InvalidArgumentError, match="metadata"):
            AgentMetadata.decode(bad)
    older = b'sagellm-transfer-agent/1\n{"name": "x"}'  # an earlier release's agent
    with pytest.raises(InvalidArgumentError, match="metadata of version '1'; this agent reads version 2"):
        AgentMetadata.decode(older)
    # This version's metadata cut short after its version, or with its line ending changed in transit: damaged
    # bytes, not another release's.
    for damaged in (b"sagellm-transfer-agent/2", b'sagellm-transfer-agent/2\r\n{"name": "x"}'):
        with pytest.raises(InvalidArgumentError, match="not a transfer agent's metadata"):
            AgentMetadata.decode(damaged)


def _mutated(meta: AgentMetadata, change) -> bytes:
    import copy
    import json

    from sagellm_comm.transfer.metadata import MAGIC

    body = json.loads(meta.encode()[len(MAGIC) :])
    body = copy.deepcopy(body)
    change(body)
    return MAGIC + json.dumps(body).encode()


def _set(*path_and_value):
    *path, value = path_and_value

    def change(body):
        for key in path[:-1]:
            body = body[key]
        body[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set("pid", float("inf")), "'pid' must be an integer"),
        (_set("pid", 1.7), "'pid' must be an integer"),
        (_set("pid", True), "'pid' must be an integer"),
        (_set("name", None), "'name' must be a string"),
        (_set("name", ""), "'name' must be a printable string"),
        (_set("name", {"x": 1}), "'name' must be a string"),
        (_set("name", "a\nb"), "'name' must be a printable string"),
        (_set("incarnation", 5), "'incarnation' must be a string"),
        (_set("regions", "kv", "nbytes", 0), "'nbytes' must be an integer in 1.."),
        (_set("regions", "kv", "nbytes", -5), "'nbytes' must be an integer"),
        (_set("regions", "kv", "nbytes", 2**80), "'nbytes' must be an integer"),
        (_set("regions", "kv", "nbytes", 1000.5), "'nbytes' must be an integer"),
        (_set("regions", "kv", "nbytes", 4094), "'nbytes' must be a multiple of 4"),
        (_set("regions", "kv", "dtype", "bogus"), "'dtype' must be a torch dtype name"),
        (_set("regions", "kv", "dtype", "Tensor"), "'dtype' must be a torch dtype name"),
        (_set("regions", "kv", "itemsize", 2), "'itemsize' must be an integer in 4..4"),
        (_set("regions", "kv", "device", "tpu"), "'device' must be 'cpu' or 'cuda'"),
        (_set("regions", "kv", "device_index", -7), "'device_index' must be an integer"),
        (_set("regions", "kv", 5), "region 'kv' must be an object"),
        (_set("regions", []), "'regions' must be an object"),
        (_set("regions", "", {"nbytes": 4, "dtype": "uint8", "itemsize": 1, "device": "cpu"}), "region ''"),
        (_set("transports", []), "'transports' must be an object"),
        (_set("transports", "nixl", [1, 2]), "transport 'nixl' must be an object"),
        (_set("transports", "ni\nxl", {}), "transport 'ni\\\\nxl' must be a printable string"),
        (_set("transports", "", {}), "transport '' must be a printable string"),
        (lambda body: body.pop("host"), "has no 'host'"),
        (lambda body: body.pop("process"), "has no 'process'"),
        (_set("process", 12), "'process' must be a string"),
    ],
)
def test_metadata_checks_every_field_and_names_the_bad_one(change, words):
    """Metadata comes from another process: a field of the wrong type or out of range is refused, naming it,
    never converted (a float pid truncated, a name of None taken as 'None') and never an untyped error."""
    meta = local_identity("decode-0", "abc")
    meta.regions = {"kv": F32}
    meta.transports = {"nixl": {"agent": "AAEC", "regions": {"kv": [1, 4096, 0]}}}
    with pytest.raises(InvalidArgumentError, match=words):
        AgentMetadata.decode(_mutated(meta, change))


def test_metadata_refuses_a_key_given_twice_instead_of_keeping_the_last():
    """JSON lets an object name a key twice and Python keeps the last: two regions of one name, or two agent names,
    are malformed metadata, refused naming the key, never one of them chosen silently."""
    from sagellm_comm.transfer.metadata import MAGIC

    meta = local_identity("decode-0", "abc")
    meta.regions = {"kv": F32}
    text = meta.encode()[len(MAGIC) :].decode()
    bigger = '"kv":{"nbytes":8192,"dtype":"float32","itemsize":4,"device":"cpu","device_index":0},'
    for twice, key in ((text.replace('"regions":{', '"regions":{' + bigger, 1), "'kv'"),
                       (text.replace('{"name":', '{"name":"other","name":', 1), "'name'")):  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=f"malformed: key {key} is given twice in an object"):
            AgentMetadata.decode(MAGIC + twice.encode())


def test_a_dtype_name_is_looked_up_without_importing_anything(monkeypatch):
    """A peer's dtype name is looked up among torch's attributes as they are: a name of one of torch's lazily
    imported submodules (``_dynamo``, ``onnx``) is refused without importing it (reading metadata runs no code)."""
    asked = []

    def lazy(name):
        asked.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", lazy, raising=False)
    meta = local_identity("decode-0", "abc")
    meta.regions = {"kv": F32}
    for name in ("_dynamo", "onnx", "not_yet_imported"):
        with pytest.raises(InvalidArgumentError, match="'dtype' must be a torch dtype name"):
            AgentMetadata.decode(_mutated(meta, _set("regions", "kv", "dtype", name)))
    assert asked == []
    assert AgentMetadata.decode(meta.encode()).regions["kv"].dtype == "float32"


def test_metadata_refuses_deep_nesting_and_oversized_bytes():
    from sagellm_comm.transfer.metadata import MAGIC, MAX_METADATA_BYTES

    with pytest.raises(InvalidArgumentError, match="not JSON"):
        AgentMetadata.decode(MAGIC + b'{"name":' + b"[" * 100000 + b"]" * 100000 + b"}")
    with pytest.raises(InvalidArgumentError, match="more than"):
        AgentMetadata.decode(MAGIC + b" " * MAX_METADATA_BYTES)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_builtins_best_first_and_registers_third_party_backends():
    names = registry.list_transfer_backends()
    assert names.index("ipc") < names.index("nixl")
    with pytest.raises(InvalidArgumentError, match="reserved"):
        registry.register_transfer_backend("auto", object)
    with pytest.raises(InvalidArgumentError, match="already registered"):
        registry.register_transfer_backend("nixl", object)
    with pytest.raises(BackendNotSupportedError, match="unknown transfer backend 'nope'"):
        registry.resolve("nope")
    refused = [
        ({"priority": "high"}, "must be an int"),
        ({"priority": 1.9}, "must be an int"),
        ({"priority": True}, "must be an int"),
        ({"is_available": True}, "None or callable"),
    ]
    for name in ("moon\ncake", "moon\x00cake", "m" * 129):  # every peer's metadata check would refuse the agent
        with pytest.raises(InvalidArgumentError, match="printable string of 1..128 characters"):
            registry.register_transfer_backend(name, object)
    for bad, words in refused:
        with pytest.raises(InvalidArgumentError, match=words):
            registry.register_transfer_backend("mooncake-test", object, **bad)
    assert "mooncake-test" not in registry.list_transfer_backends()

    def missing() -> bool:
        raise BackendNotSupportedError("the mooncake package is not installed")

    registry.register_transfer_backend("mooncake-test", object, is_available=missing, priority=1000)
    try:
        assert registry.list_transfer_backends()[0] == "mooncake-test"
        assert "not installed" in registry.transfer_backend_unavailable("mooncake-test")
        with pytest.raises(BackendNotSupportedError, match="not installed"):
            registry.resolve("mooncake-test")
        entries, skipped = registry.resolve("auto")
        assert "mooncake-test" in skipped and "mooncake-test" not in [e.name for e in entries]
    finally:
        registry.unregister_transfer_backend("mooncake-test")


def test_registrations_made_before_the_first_lookup_meet_the_builtins_already_there():
    """A fresh process: unregistering a built-in before anything looked the registry up removes it for good, and
    registering under a built-in's name is refused (it broke the loading of every later built-in)."""
    code = textwrap.dedent("""
        from sagellm_comm.errors import InvalidArgumentError
        from sagellm_comm.transfer import registry
        registry.unregister_transfer_backend("nixl")
        print(registry.list_transfer_backends())
        try:
            registry.register_transfer_backend("ipc", object)
        except InvalidArgumentError as exc:
            print("refused:", exc.message)
        print(registry.list_transfer_backends())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.splitlines()
    assert lines == ["['ipc']", "refused: transfer backend 'ipc' is already registered; pass replace=True", "['ipc']"]


def test_the_reason_names_only_transports_ranked_above_the_one_chosen(monkeypatch):
    """``backend_reason``: a transport ranked below the one that reaches the peer is not a better one skipped."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    registry.register_transfer_backend("below-test", object, is_available=lambda: False, priority=-1000)
    registry.register_transfer_backend("above-test", object, is_available=lambda: False, priority=1000)
    a = b = None
    try:
        a, b = TransferAgent("a"), TransferAgent("b")
        a.allocate("kv", 64, torch.uint8)
        b.allocate("kv", 64, torch.uint8)
        peer = a.add_peer(b.metadata())
        reason = a.backend_reason(peer)
        assert reason.startswith(f"{a.peer_backend(peer)}; better transports skipped: ") and "above-test" in reason
        assert "below-test" not in reason, reason
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.close()
        registry.unregister_transfer_backend("below-test")
        registry.unregister_transfer_backend("above-test")


# ---------------------------------------------------------------------------------------------- the agent's checks
class _Done(Request):
    def poll(self) -> bool:
        return True

    def abort(self) -> None:
        pass


class _RecordingBackend(TransferBackend):
    """A transport that moves nothing: it records what the agent hands it (the agent's checks on their own)."""

    name = "recording-test"

    def __init__(self, context):
        super().__init__(context)
        self.posted: list[tuple] = []
        self.messages: list[tuple[str, bytes]] = []

    def register(self, region) -> None:
        pass

    def deregister(self, region) -> None:
        pass

    def local_metadata(self) -> dict:
        return {}

    def connect(self, peer) -> Link:
        return Link(peer)

    def disconnect(self, link) -> None:
        pass

    def post(self, link, op, local, remote, table, notify, rows=None) -> Request:
        assert rows is None or [list(row) for row in rows] == table.tolist()
        self.posted.append(("table", op, local.name, remote.name, table.tolist(), notify))
        return _Done()

    def post_one(self, link, op, local, remote, local_offset, remote_offset, nbytes, notify) -> Request:
        self.posted.append(("one", op, local.name, remote.name, [local_offset, remote_offset, nbytes], notify))
        return super().post_one(link, op, local, remote, local_offset, remote_offset, nbytes, notify)

    def post_rows(self, link, op, local, remote, rows, notify) -> Request:
        self.posted.append(("rows", op, local.name, remote.name, [list(row) for row in rows], notify))
        return super().post_rows(link, op, local, remote, rows, notify)

    def post_blocks(self, prepared, op, ids, notify) -> Request:
        self.posted.append(("ids", op, ids.tolist(), notify))
        return super().post_blocks(prepared, op, ids, notify)

    def post_one_id(self, prepared, op, local_block, remote_block, notify) -> Request:
        self.posted.append(("one id", op, [local_block, remote_block], notify))
        return super().post_one_id(prepared, op, local_block, remote_block, notify)

    def notifications(self) -> list[tuple[str, bytes]]:
        out, self.messages = self.messages, []
        return out

    def close(self) -> None:
        pass


def test_a_transport_is_known_by_its_registry_name_and_its_factory_must_make_one():
    """A transport registered under another name than its class's ``name`` (a second registration of one class, a
    class that never set it) is that name everywhere: ``peer_backend``, handles, prepared pools, whose release and
    the agent's close looked the class's name up among the registry's (a KeyError).  A factory that returns no
    TransferBackend is a typed error when the agent is made."""
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("renamed-test", _RecordingBackend)
    registry.register_transfer_backend("no-backend-test", lambda context: None)
    a = b = None
    try:
        a, b = TransferAgent("a", "renamed-test"), TransferAgent("b", "renamed-test")
        a.register("kv", torch.zeros(64))
        b.register("kv", torch.zeros(64))
        peer = a.add_peer(b.metadata())
        assert a.peer_backend(peer) == "renamed-test" and a.backend_reason(peer).startswith("renamed-test")
        assert a.write(peer, "kv", "kv", [(0, 0, 16)]).backend == "renamed-test"
        prepared = a.prepare(peer, "kv", "kv", 16)
        assert prepared.backend == "renamed-test" and prepared.write([0], [1]).backend == "renamed-test"
        prepared.release()
        a.prepare(peer, "kv", "kv", 16)  # released by close
        a.close()
        with pytest.raises(InvalidArgumentError, match="'no-backend-test' must return a TransferBackend, got NoneType"):
            TransferAgent("c", "no-backend-test")
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.close()
        registry.unregister_transfer_backend("renamed-test")
        registry.unregister_transfer_backend("no-backend-test")


def test_under_auto_a_factory_that_cannot_run_is_skipped_and_one_that_fails_fails_the_agent(caplog):
    """The factory's contract (``register_transfer_backend``): BackendNotSupportedError is "not here" (``auto`` goes
    on without it and says why), any other exception is a fault that fails the agent, whose transports already
    started are closed again."""
    from sagellm_comm.transfer import TransferAgent

    closed: list[str] = []

    class _Closing(_RecordingBackend):
        def close(self) -> None:
            closed.append(self.name)
            super().close()

    class _FailingClose(_RecordingBackend):
        def close(self) -> None:
            closed.append(self.name)
            raise RuntimeError("transport would not close")

    def not_here(context):
        raise BackendNotSupportedError("no such fabric on this host")

    def broken(context):
        raise RuntimeError("vendor library crashed")

    registry.register_transfer_backend("first-test", _Closing, priority=1002)
    registry.register_transfer_backend("absent-test", not_here, priority=1001)
    agent = None
    try:
        agent = TransferAgent("a")
        assert agent.backends[0] == "first-test" and "absent-test" not in agent.backends
        assert agent.skipped["absent-test"] == "no such fabric on this host"
        agent.close()
        closed.clear()
        registry.register_transfer_backend("broken-test", broken, priority=1000)
        with pytest.raises(RuntimeError, match="vendor library crashed"):
            TransferAgent("b")
        assert closed == ["first-test"]  # started before the fault, closed again
        # A started transport that fails to close as well: every one is closed, and the fault is the error
        closed.clear()
        registry.register_transfer_backend("stuck-test", _FailingClose, priority=1003)
        at_warning = caplog.at_level(logging.WARNING, logger="sagellm_comm.transfer")
        with at_warning, pytest.raises(RuntimeError, match="vendor library crashed"):
            TransferAgent("c")
        assert closed == ["stuck-test", "first-test"]
        assert "closing transport 'stuck-test' after transport 'broken-test' failed to start" in caplog.text
    finally:
        if agent is not None:
            agent.close()
        for name in ("first-test", "absent-test", "broken-test", "stuck-test"):
            registry.unregister_transfer_backend(name)


def test_a_failed_register_raises_its_own_error_when_undoing_an_earlier_transport_raises_too(caplog):
    """Under ``auto`` a region is registered with every transport in turn; when one refuses it, the transports
    that took it let it go again.  A release that raises as well does not replace the refusal (the error that says
    what went wrong) nor stop the other releases: it is logged, and the region is nowhere."""
    from sagellm_comm.transfer import TransferAgent

    events: list[str] = []
    refuse = {"register", "deregister"}  # once each

    class _Taking(_RecordingBackend):
        def register(self, region) -> None:
            events.append(f"register {self.name}")

        def deregister(self, region) -> None:
            events.append(f"deregister {self.name}")
            if self.name == "stuck-test" and "deregister" in refuse:
                refuse.discard("deregister")
                raise RuntimeError("transport could not let the region go")

    class _Refusing(_RecordingBackend):
        def register(self, region) -> None:
            if "register" in refuse:
                refuse.discard("register")
                raise RuntimeError("transport refused the region")

    registry.register_transfer_backend("stuck-test", _Taking, priority=1002)
    registry.register_transfer_backend("taking-test", _Taking, priority=1001)
    registry.register_transfer_backend("refusing-test", _Refusing, priority=1000)
    agent = None
    try:
        agent = TransferAgent("a")
        assert agent.backends[:3] == ["stuck-test", "taking-test", "refusing-test"]
        with caplog.at_level("WARNING", logger="sagellm_comm.transfer"), pytest.raises(RuntimeError, match="refused"):
            agent.register("kv", torch.zeros(64))
        assert events == ["register stuck-test", "register taking-test", "deregister stuck-test",
                          "deregister taking-test"]  # fmt: skip
        assert any("could not let the region go" in r.getMessage() for r in caplog.records)
        assert agent.regions == []
        agent.register("kv", torch.zeros(64))  # the name is free again
        assert agent.regions == ["kv"]
    finally:
        if agent is not None:
            agent.close()
        for name in ("stuck-test", "taking-test", "refusing-test"):
            registry.unregister_transfer_backend(name)


def test_allocate_takes_a_numpy_int_as_a_shape_as_it_takes_one_inside_a_tuple():
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        agent = TransferAgent("a", "device-test")
        assert agent.allocate("kv", np.int64(16), torch.float32).shape == (16,)
        assert agent.allocate("kv2", (np.int64(2), 8), torch.float32).shape == (2, 8)
        agent.close()
    finally:
        registry.unregister_transfer_backend("device-test")


def test_allocate_refuses_what_register_would_refuse_before_making_the_memory(monkeypatch):
    """A name registered already, a name that is no region name, or a closed agent: ``allocate`` refuses it with
    register's error before it makes (and reserves) the memory, so a large pool refused for its name is never the
    shared-memory error of a full ``/dev/shm``."""
    from sagellm_comm.transfer import TransferAgent

    made = []
    real = shared.shared_cpu_tensor
    monkeypatch.setattr(shared, "shared_cpu_tensor", lambda *args: made.append(args) or real(*args))
    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        agent = TransferAgent("a", "device-test")
        agent.allocate("kv", 16, torch.float32)
        assert len(made) == 1
        for name, error, words in (("kv", InvalidArgumentError, "already registered"),
                                   ("", InvalidArgumentError, "region name"),
                                   (7, InvalidArgumentError, "region name")):  # fmt: skip
            with pytest.raises(error, match=words):
                agent.allocate(name, 1 << 20, torch.float32)
        agent.close()
        with pytest.raises(NotInitializedError, match="closed"):
            agent.allocate("other", 1 << 20, torch.float32)
        assert len(made) == 1
    finally:
        registry.unregister_transfer_backend("device-test")


@pytest.mark.parametrize("shape", [(1 << 61,), (1 << 40, 1 << 40), (1 << 62, 2)])
def test_allocate_refuses_a_region_larger_than_any_peer_can_take_before_making_it(shape):
    """A shape whose bytes pass what a region may hold (a peer's metadata check, and past 2**63 the file system's
    offsets: an OverflowError from deep inside) is an InvalidArgumentError naming the region; nothing is left."""
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        agent = TransferAgent("a", "device-test")
        with pytest.raises(InvalidArgumentError, match="region 'kv': shape .* more than a region may hold"):
            agent.allocate("kv", shape, torch.float32)
        assert agent.regions == [] and agent.allocate("kv", 16, torch.float32).shape == (16,)
        agent.close()
    finally:
        registry.unregister_transfer_backend("device-test")


def test_a_gpu_region_on_another_gpu_than_the_agents_device_is_refused(monkeypatch):
    """An agent made with ``device="cuda:1"`` moves regions of cuda:1: a region on cuda:0 is refused at
    ``register`` as one beside a first GPU region on another GPU is (its calls would run on cuda:1 while a
    transport bound itself to cuda:0).  Without a GPU here: the device and the region's description are faked."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setattr(agent_module, "_usable_device", lambda device, what: torch.device(device))
    monkeypatch.setattr(agent_module, "_current_device", lambda: 1)  # the thread is on the agent's GPU already

    def on_gpu0(name, tensor):
        return d.Region(d.RegionInfo(name, 64, "float32", 4, "cuda", 0), tensor)

    monkeypatch.setattr(agent_module, "make_region", on_gpu0)
    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        agent = TransferAgent("a", "device-test", device="cuda:1")
        with pytest.raises(InvalidArgumentError, match="'kv' is on cuda:0 but this agent's GPU regions are on cuda:1"):
            agent.register("kv", torch.zeros(16))
        assert agent.regions == []
        agent.close()
    finally:
        registry.unregister_transfer_backend("device-test")


def test_close_releases_everything_when_a_peers_disconnect_raises_and_raises_that_error_once():
    """A transport whose disconnect raises left the peer known, so close() raised at that peer every time: the
    regions stayed registered and the transports were never stopped.  Now the peer is forgotten, every other step
    runs, the agent is closed, and the first error is raised."""
    from sagellm_comm.transfer import TransferAgent

    events: list[str] = []

    class _FailingDisconnect(_RecordingBackend):
        def disconnect(self, link) -> None:
            events.append(f"disconnect {link.peer.name}")
            raise RuntimeError(f"transport refused to disconnect {link.peer.name}")

        def deregister(self, region) -> None:
            events.append(f"deregister {region.name}")

        def close(self) -> None:
            events.append("close")
            super().close()

    registry.register_transfer_backend("failing-disconnect-test", _FailingDisconnect)
    a = b = c = None
    try:
        a, b, c = (TransferAgent(n, "failing-disconnect-test") for n in "abc")
        for agent in (a, b, c):
            agent.register("kv", torch.zeros(64))
        a.add_peer(b.metadata())
        a.add_peer(c.metadata())
        with pytest.raises(RuntimeError, match="refused to disconnect"):
            a.remove_peer("b")
        assert a.peers == ["c"]  # forgotten all the same
        events.clear()
        with pytest.raises(RuntimeError, match="refused to disconnect c"):
            a.close()
        assert events == ["disconnect c", "deregister kv", "close"], events
        a.close()  # closed: a no-op
        with pytest.raises(NotInitializedError):
            a.metadata()
    finally:
        for agent in (b, c):
            if agent is not None:
                agent.close()
        registry.unregister_transfer_backend("failing-disconnect-test")


class _FailingTeardown(_RecordingBackend):
    """A transport that records its links' lives and refuses the next teardown step named in ``refuse``
    (``"release"``: a prepared pool's, ``"disconnect"``: a link's), once each."""

    events: list[tuple[str, str]] = []
    refuse: set[str] = set()

    def connect(self, peer) -> Link:
        self.events.append(("connect", peer.incarnation))
        return Link(peer)

    def disconnect(self, link) -> None:
        self.events.append(("disconnect", link.peer.incarnation))
        if "disconnect" in self.refuse:
            self.refuse.discard("disconnect")
            raise RuntimeError(f"transport refused to disconnect {link.peer.incarnation}")

    def release_prepared(self, prepared) -> None:
        self.events.append(("release", prepared.link.peer.incarnation))
        if "release" in self.refuse:
            self.refuse.discard("release")
            raise RuntimeError("transport refused to release a prepared pool")

    def post_one(self, link, op, local, remote, local_offset, remote_offset, nbytes, notify) -> Request:
        assert not link.removed, "posted over a link of a peer that was torn down"
        self.events.append(("post", link.peer.incarnation))
        return _Done()


@pytest.fixture
def teardown_agents():
    """``make(name)``: agents over :class:`_FailingTeardown` with a ``kv`` region, closed at the end."""
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("teardown-test", _FailingTeardown)
    _FailingTeardown.events, _FailingTeardown.refuse = [], set()
    made = []

    def make(name: str):
        made.append(TransferAgent(name, "teardown-test"))
        made[-1].register("kv", torch.zeros(64))
        return made[-1]

    try:
        yield make
    finally:
        _FailingTeardown.refuse = set()
        for agent in made:
            agent.close()
        registry.unregister_transfer_backend("teardown-test")


@pytest.mark.parametrize("refuse", ["release", "disconnect"])
def test_a_restarted_peer_whose_old_teardown_raises_is_gone_and_can_be_added_again(teardown_agents, refuse):
    """Re-adding a restarted peer removes the old incarnation first.  A teardown step that raised stopped the
    rest: the old link stayed connected, its later prepared pools unreleased (still posting over it).  Now every
    step runs, no peer of that name is left, the step's own error is raised, and adding the peer again works."""
    a, old = teardown_agents("a"), teardown_agents("b")
    a.add_peer(old.metadata())
    pools = [a.prepare("b", "kv", "kv", 16) for _ in range(2)]
    new = teardown_agents("b")  # the restarted process: same name, another incarnation
    _FailingTeardown.events.clear()
    _FailingTeardown.refuse = {refuse}
    with pytest.raises(RuntimeError, match=f"refused to {refuse}"):
        a.add_peer(new.metadata())
    assert a.peers == [] and all(pool.released for pool in pools)
    gone = old.incarnation
    assert _FailingTeardown.events == [("release", gone), ("release", gone), ("disconnect", gone)]
    with pytest.raises(InvalidArgumentError, match="was released"):
        pools[1].write([0], [1])
    assert a.add_peer(new.metadata()) == "b"
    a.write("b", "kv", "kv", [(0, 16, 16)]).wait(timeout=1.0)
    assert _FailingTeardown.events[-1] == ("post", new.incarnation)


def test_a_live_peer_readded_whose_old_link_fails_to_go_leaves_no_link_behind(teardown_agents):
    """Re-adding a live peer (same incarnation, new regions) connects the new link, then tears the old one down.
    When that raised, the old entry stayed with its link torn down and the new link was connected but never
    recorded (nor ever disconnected).  Now neither is left: both links are let go, no peer of that name
    remains, the old link's error is raised, and adding the peer again works."""
    a, b = teardown_agents("a"), teardown_agents("b")
    a.add_peer(b.metadata())
    pool = a.prepare("b", "kv", "kv", 16)
    b.register("more", torch.zeros(64))
    _FailingTeardown.events.clear()
    _FailingTeardown.refuse = {"disconnect"}
    with pytest.raises(RuntimeError, match="refused to disconnect"):
        a.add_peer(b.metadata())
    assert a.peers == [] and pool.released
    live = b.incarnation
    assert _FailingTeardown.events == [("connect", live), ("release", live), ("disconnect", live), ("disconnect", live)]
    assert a.add_peer(b.metadata()) == "b" and "more" in a.peer_regions("b")
    a.write("b", "kv", "kv", [(0, 16, 16)]).wait(timeout=1.0)


def test_a_cuda_device_this_process_has_no_gpu_for_is_refused_when_the_agent_is_made():
    """``device=`` (and ``allocate``'s device) naming a GPU this process does not see is an InvalidArgumentError at
    once; it made an agent whose every call, close included, failed in torch (a TypeError on a CPU-only build)."""
    from sagellm_comm.transfer import TransferAgent

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: cuda:0 without any
    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        with pytest.raises(InvalidArgumentError, match=f"device '{missing}' is not a GPU of this process"):
            TransferAgent("a", "device-test", device=missing)
        agent = TransferAgent("a", "device-test")
        with pytest.raises(InvalidArgumentError, match=f"region 'kv': device '{missing}' is not a GPU"):
            agent.allocate("kv", 16, torch.float32, missing)
        assert agent.regions == [] and agent.allocate("kv", 16, torch.float32).device.type == "cpu"
        agent.close()
    finally:
        registry.unregister_transfer_backend("device-test")


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "hpu", "lazy", torch.device("meta")])
def test_a_device_that_is_neither_the_cpu_nor_a_cuda_gpu_is_refused_before_anything_is_made(device):
    """``allocate`` on such a device raised torch's own error (AssertionError for xpu, ModuleNotFoundError for hpu,
    NotImplementedError for mps), or made the memory before register refused it (meta); an agent made with one was
    taken, and its ipc transport bound to it (no peer reachable, "this agent meta memory")."""
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        with pytest.raises(InvalidArgumentError, match="neither the CPU nor a CUDA GPU"):
            TransferAgent("a", "device-test", device=device)
        agent = TransferAgent("a", "device-test")
        with pytest.raises(InvalidArgumentError, match="region 'kv': device .* is neither the CPU nor a CUDA GPU"):
            agent.allocate("kv", 16, torch.float32, device)
        assert agent.regions == []
        agent.close()
    finally:
        registry.unregister_transfer_backend("device-test")


@pytest.fixture
def recording_agents():
    """Agents ``a`` and ``b`` over the recording transport, ``a`` with peers ``b`` and ``b-gpu`` (whose ``kv``
    region its metadata calls GPU memory)."""
    from sagellm_comm.transfer import TransferAgent

    registry.register_transfer_backend("recording-test", _RecordingBackend)
    a, b = TransferAgent("a", "recording-test"), TransferAgent("b", "recording-test")
    try:
        a.register("kv", torch.zeros(1024))
        a.register("bytes", torch.zeros(64, dtype=torch.uint8))
        b.register("kv", torch.zeros(1024))
        b.register("bytes", torch.zeros(64, dtype=torch.uint8))
        b.register("half", torch.zeros(64, dtype=torch.float16))
        a.add_peer(b.metadata())
        meta = AgentMetadata.decode(b.metadata())
        meta.name, meta.regions["kv"] = "b-gpu", d.RegionInfo("kv", 4096, "float32", 4, "cuda")
        a.add_peer(meta.encode())
        yield a, a._backends["recording-test"]
    finally:
        a.close()
        b.close()
        registry.unregister_transfer_backend("recording-test")


def _outcome(call) -> tuple[type, str] | None:
    try:
        call()
    except (CommError, TypeError) as exc:
        return type(exc), str(exc)
    return None


def _both_paths(monkeypatch, call) -> tuple:
    """``call``'s outcome through the agent's one-block and few-rows paths, then with them off (the general one)."""
    fast = _outcome(call)
    with monkeypatch.context() as off:
        off.setattr(agent_module, "one_block", lambda blocks: None)
        off.setattr(agent_module, "python_rows", lambda blocks: None)
        off.setattr(agent_module, "one_id", lambda blocks: None)
        general = _outcome(call)
    return fast, general


@pytest.mark.parametrize(
    ("peer", "local", "remote", "block", "message", "words"),
    [
        ("z", "kv", "kv", (0, 0, 64), None, "unknown peer"),
        ("b", "nope", "kv", (0, 0, 64), None, "unknown local region"),
        ("b", "kv", "nope", (0, 0, 64), None, "has no region"),
        ("b", "kv", "kv", (0, 0, 0), None, "positive"),
        ("b", "kv", "kv", (0, 0, -4), None, "positive"),
        ("b", "kv", "kv", (-4, 0, 4), None, "outside the local region"),
        ("b", "kv", "kv", (0, -4, 4), None, "outside the remote region"),
        ("b", "kv", "kv", (4092, 0, 8), None, "outside the local region"),
        ("b", "kv", "kv", (0, 4096 - 60, 64), None, "outside the remote region"),
        ("b", "kv", "kv", (2, 0, 4), None, "element size"),
        ("b", "kv", "kv", (0, 0, 6), None, "element size"),
        ("b", "kv", "kv", (2**64, 0, 4), None, "integers"),
        ("b", "kv", "half", (0, 0, 4), None, "holds float32"),
        ("b-gpu", "kv", "kv", (0, 0, 4), None, "same kind of device"),
        ("b", "kv", "kv", (0, 0, 64), b"x" * 497, "notify must be 1..496"),
        ("b", "kv", "kv", (0, 0, 64), b"", "notify must be 1..496"),
        ("b", "kv", "kv", (0, 0, 64), 17, "notify must be bytes"),
        ("b", "kv", "kv", (0, 0, 64), "req-\ud800", "encodable as UTF-8"),  # a lone surrogate: no bytes
        ("b", "kv", "kv", (2, 0, 4), 17, "notify must be bytes"),  # two faults: the same one is named first
        ("z", "kv", "kv", (2, 0, 4), 17, "unknown peer"),
    ],
)
@pytest.mark.parametrize("op", ["write", "read"])
def test_a_bad_one_block_request_is_refused_with_the_general_paths_error(
    recording_agents, monkeypatch, peer, local, remote, block, message, words, op
):
    agent, backend = recording_agents
    post = getattr(agent, op)
    for blocks in ([block], (list(block),)):
        fast, general = _both_paths(monkeypatch, lambda blocks=blocks: post(peer, local, remote, blocks, message))
        assert fast == general and fast is not None and words in fast[1], (fast, general)
        assert issubclass(fast[0], (InvalidArgumentError, ShapeMismatchError))
    assert backend.posted == []  # nothing reached the transport


@pytest.mark.parametrize(
    ("blocks", "words"),
    [
        ([(0, 0, 64), (64, 64, 0)], "positive"),
        ([(0, 0, 64), (-64, 64, 64)], "outside the local region"),
        ([(0, 0, 64), (64, 4096 - 32, 64)], "outside the remote region"),
        ([(0, 0, 64), (66, 64, 64)], "element size"),
        ([(0, 0, 64), (64, 32, 64)], "overlap"),  # overlapping destinations of a write
        ([(0, 0, 64), (32, 64, 64)], "overlap"),  # ... of a read
        ([(0, 0, 64), (64, 0, 64)], "overlap"),  # the same destination twice
        ([(0, 0, 64), (64, 2**64, 64)], "integers"),
        ([(0, 0, 64), (64, 64, 32), (96, 100, 32)], "overlap"),  # lengths differ: the general path only
        ([(4 * i, 4 * i, 4) for i in range(d.SMALL)] + [(0, 0, 4)], "overlap"),  # past the few-rows form
    ],
)
@pytest.mark.parametrize("op", ["write", "read"])
def test_a_bad_few_block_list_is_refused_with_the_general_paths_error(recording_agents, monkeypatch, blocks, words, op):
    agent, backend = recording_agents
    post = getattr(agent, op)
    for given in (blocks, tuple(list(row) for row in blocks)):
        before = len(backend.posted)
        fast, general = _both_paths(monkeypatch, lambda given=given: post("b", "kv", "kv", given, b"n"))
        if fast is None:  # overlapping sources of the other op (a source may repeat): accepted on both paths
            assert general is None and words == "overlap", (given, op)
            continue
        assert fast == general and words in fast[1], (fast, general)
        assert len(backend.posted) == before  # nothing reached the transport


def test_a_few_block_list_reaches_the_transport_as_its_table(recording_agents, monkeypatch):
    agent, backend = recording_agents
    for op, blocks, region in (
        ("write", [(0, 4032, 64), (256, 0, 64), (64, 128, 64)], "kv"),
        ("read", ([8, 0, 8], [0, 8, 8]), "bytes"),
        ("write", [(4 * i, 4092 - 4 * i, 4) for i in range(d.SMALL)], "kv"),
    ):  # fmt: skip
        handle = getattr(agent, op)("b", region, region, blocks, b"req")
        posted = backend.posted[-2:]  # the rows, then their default table
        assert [p[0] for p in posted] == ["rows", "table"] and posted[0][4] == [list(row) for row in blocks]
        size = blocks[0][2] * len(blocks)
        assert (handle.nbytes, handle.nblocks, handle.op) == (size, len(blocks), op)
        with monkeypatch.context() as off:
            off.setattr(agent_module, "python_rows", lambda blocks: None)
            general = getattr(agent, op)("b", region, region, blocks, b"req")
        assert backend.posted[-1] == posted[1] and (general.nbytes, general.nblocks) == (size, len(blocks))
    for blocks in ([(0, 0, 64), (64, 64, 32)], [(np.int64(0), 0, 4), (4, 4, 4)]):
        agent.write("b", "kv", "kv", blocks)  # other lengths or NumPy ints: the general path
        assert backend.posted[-1][0] == "table"
    assert d.python_rows([(0, 0, 4)]) is None and d.python_rows([(0, 0, 4)] * (d.SMALL + 1)) is None
    assert d.python_rows([(0, 0, 4), (4, 4, 4.0)]) is None and d.python_rows([(0, 0, 4), (True, 4, 4)]) is None
    assert d.python_rows([(0, 0, 4), (4, 4)]) is None
    given = ((0, 0, 4), [4, 4, 4])
    rows = d.python_rows(given)
    given[1][2] = 4096  # what was checked is what is posted: the rows are a copy
    assert rows == [(0, 0, 4), (4, 4, 4)]


def test_a_few_block_array_reaches_the_transport_as_a_copy_of_that_array(recording_agents):
    """A small ``[n, 3]`` array takes the Python-int checks, and the transport gets a private copy of the
    caller's array with its rows (what was checked is what is posted, whatever another thread of the caller's
    does to the array meanwhile); a bad one is refused as a list is."""
    agent, backend = recording_agents
    seen = []
    post = backend.post

    def spy(link, op, local, remote, table, notify, rows=None):
        seen.append((table, rows))
        return post(link, op, local, remote, table, notify, rows)

    backend.post = spy
    for blocks in ([(0, 4032, 64), (256, 0, 64), (64, 128, 64)], [(0, 0, 64), (64, 64, 32)]):  # one length, mixed
        table = np.array(blocks, dtype=np.int64)
        before = len(backend.posted)
        handle = agent.write("b", "kv", "kv", table, b"req")
        posted = seen[-1][0]
        assert not np.shares_memory(posted, table) and posted.tolist() == seen[-1][1] == table.tolist()
        assert [p[0] for p in backend.posted[before:]] == ["table"]
        assert (handle.nbytes, handle.nblocks) == (sum(b[2] for b in blocks), len(blocks))
    big = np.array([(i * 64, 4032 - i * 64, 64) for i in range(40)], dtype=np.int64)  # the vector checks' path
    agent.write("b", "kv", "kv", big)
    assert not np.shares_memory(seen[-1][0], big) and np.array_equal(seen[-1][0], big)
    before = len(backend.posted)
    for bad, words in (([(0, 0, 64), (64, 32, 64)], "overlap"), ([(0, 0, 64), (64, 4096, 64)], "outside")):
        with pytest.raises(InvalidArgumentError, match=words):
            agent.write("b", "kv", "kv", np.array(bad, dtype=np.int64))
    assert len(backend.posted) == before


def test_names_that_are_not_names_fail_alike_on_both_paths(recording_agents, monkeypatch):
    agent, backend = recording_agents
    for names, words in (
        ((["b"], "kv", "kv"), "peer must be a name (str), got list"),
        (("b", b"kv", "kv"), "local region must be a name (str), got bytes"),
        (("b", "kv", None), "peer region must be a name (str), got NoneType"),
        (("z", ["kv"], "kv"), "unknown peer 'z'"),  # the peer is looked up first
    ):  # fmt: skip
        for blocks in ([(0, 0, 4)], [(0, 0, 4), (4, 4, 4)]):
            fast, general = _both_paths(monkeypatch, lambda names=names, b=blocks: agent.write(*names, b))
            assert fast == general and fast[0] is InvalidArgumentError and words in fast[1], (names, fast, general)
    for call in (lambda: agent.register(["x"], torch.zeros(4)), lambda: agent.deregister(["kv"]),
                 lambda: agent.prepare(("b",), "kv", "kv", 64), lambda: agent.remove_peer(["b"]),
                 lambda: agent.peer_backend(["b"])):  # fmt: skip
        with pytest.raises(InvalidArgumentError, match="must be a"):
            call()
    agent.close()
    fast, general = _both_paths(monkeypatch, lambda: agent.write(["b"], "kv", "kv", [(0, 0, 4)]))
    assert fast == general and fast[0] is NotInitializedError
    assert backend.posted == []


def test_a_one_block_request_reaches_the_transport_as_the_general_path_would_hand_it(recording_agents, monkeypatch):
    agent, backend = recording_agents
    for op, blocks, message in (
        ("write", [(0, 4092, 4)], None), ("read", [[4, 8, 4088]], b"req"), ("write", ((1, 63, 1),), "text"),
    ):  # fmt: skip
        region = "bytes" if blocks[0][0] == 1 else "kv"
        handle = getattr(agent, op)("b", region, region, blocks, message)
        posted = backend.posted[-2:]  # the one-block call, then its default table
        assert [p[0] for p in posted] == ["one", "table"] and posted[0][4] == list(blocks[0])
        assert (handle.nbytes, handle.nblocks, handle.op, handle.backend) == (blocks[0][2], 1, op, "recording-test")
        with monkeypatch.context() as off:
            off.setattr(agent_module, "one_block", lambda blocks: None)
            general = getattr(agent, op)("b", region, region, blocks, message)
        assert backend.posted[-1] == posted[1] and (general.nbytes, general.nblocks) == (handle.nbytes, 1)
        handle.wait(5)


def test_a_prepared_one_id_request_is_checked_like_the_general_path(recording_agents, monkeypatch):
    agent, backend = recording_agents
    prepared = agent.prepare("b", "kv", "kv", 256)  # 16 blocks each side
    for local_blocks, remote_blocks, message, words in (
        ([16], [0], None, "local block id 16 is outside"),
        ([0], [-1], None, "remote block id -1"),
        (0, 2**70, None, "integers"),
        ([0], [1], b"x" * 497, "notify must be 1..496"),
        ([16], [1], 17, "notify must be bytes"),
        ([0], [1], "\udfff", "encodable as UTF-8"),
    ):
        request = (local_blocks, remote_blocks, message)
        fast, general = _both_paths(monkeypatch, lambda request=request: prepared.write(*request))
        assert fast == general and fast is not None and words in fast[1], (fast, general)
    assert backend.posted == []
    handle = prepared.read(3, [15], notify=b"m")
    assert backend.posted == [("one id", "read", [3, 15], b"m"), ("ids", "read", [[3, 15]], b"m"),
                              ("table", "read", "kv", "kv", [[768, 3840, 256]], b"m")]  # fmt: skip
    assert (handle.nbytes, handle.nblocks) == (256, 1)
    prepared.release()
    fast, general = _both_paths(monkeypatch, lambda: prepared.write([0], [1]))
    assert fast == general and "released" in fast[1]
    agent.close()
    for call in (lambda: agent.write("b", "kv", "kv", [(0, 0, 4)]), lambda: prepared.write([0], [1])):
        fast, general = _both_paths(monkeypatch, call)
        assert fast == general and fast[0] is NotInitializedError


class _Pending(Request):
    def __init__(self):
        self.aborted = 0

    def poll(self) -> bool:
        return False

    def abort(self) -> None:
        self.aborted += 1


@contextlib.contextmanager
def _held_by_another_thread(agent):
    """Inside the block another thread's call holds the agent's lock; it is released on the way out."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with agent.lock:
            held.set()
            release.wait(10.0)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(5.0)
    try:
        yield
    finally:
        release.set()
        holder.join(5.0)


def test_a_wait_keeps_its_deadline_while_another_thread_holds_the_agent(recording_agents, monkeypatch):
    """wait(timeout) takes the agent's lock for at most what is left of its deadline (another thread's add_peer
    may hold it for seconds); its request is then aborted by the agent's next call."""
    agent, backend = recording_agents
    request = _Pending()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])
    with _held_by_another_thread(agent):
        start = time.monotonic()
        with pytest.raises(CommTimeoutError, match="within 0.2 s"):
            handle.wait(timeout=0.2)
        assert time.monotonic() - start < 1.0 and handle.state == "failed"
        assert request.aborted == 0  # the agent is held: not aborted yet
    agent.notifications()
    assert request.aborted == 1
    with pytest.raises(CommTimeoutError):
        handle.done()  # the failure stays
    handle2 = agent.write("b", "kv", "kv", [(0, 0, 16)])
    with pytest.raises(CommTimeoutError):
        handle2.wait(timeout=0.05)  # the agent free: aborted at once
    assert request.aborted == 2


class _PollAfterAbort(_Pending):
    """A request whose transport state is gone once aborted: a poll or stream wait after that uses released state."""

    def poll(self) -> bool:
        if self.aborted:
            raise AssertionError("polled after it was aborted")
        return False

    def wait_on_stream(self, stream, deadline: float) -> None:
        if self.aborted:
            raise AssertionError("waited on after it was aborted")


@pytest.mark.parametrize("method", ["done", "wait_on_stream"])
def test_a_call_waiting_for_the_agent_sees_a_failure_another_thread_gave_the_handle_meanwhile(
    recording_agents, monkeypatch, method
):
    """done() or wait_on_stream() waiting for the agent's lock while another thread's wait timed out (aborting the
    request) raises that timeout: it never uses the aborted request, nor marks the failed handle done."""
    agent, backend = recording_agents
    request = _PollAfterAbort()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])
    call = handle.done if method == "done" else functools.partial(handle.wait_on_stream, _STREAM, timeout=5.0)
    waits_in = handle._poll.__code__ if method == "done" else handle.wait_on_stream.__code__
    outcome = []

    def run():
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(exc)

    with agent.lock:  # held while the caller starts, so it waits for the lock with the handle still pending
        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        deadline = time.monotonic() + 5.0
        while getattr(sys._current_frames().get(caller.ident), "f_code", None) is not waits_in:
            assert time.monotonic() < deadline, "the caller never reached the agent's lock"
            time.sleep(0.001)
        with pytest.raises(CommTimeoutError):
            handle.wait(timeout=0.01)  # this thread holds the lock: the request is aborted now
        assert request.aborted == 1
    caller.join(5.0)
    assert len(outcome) == 1 and isinstance(outcome[0], CommTimeoutError), outcome
    assert handle.state == "failed" and request.aborted == 1


_STREAM = types.SimpleNamespace(cuda_stream=0)  # taken for a torch.cuda.Stream (none can be made without a GPU)


class _StreamWaits(_Pending):
    """A request completed on the device: ``wait_on_stream`` records the deadline it was given, and raises
    CommTimeoutError past it when ``stuck`` (a host wait that never ends, as a resident copier's that stopped)."""

    def __init__(self, stuck: bool = False):
        super().__init__()
        self.stuck, self.deadlines = stuck, []

    def wait_on_stream(self, stream, deadline: float) -> None:
        self.deadlines.append(deadline)
        if self.stuck:
            while time.monotonic() <= deadline:
                time.sleep(1e-3)
            raise CommTimeoutError("the copier did not serve the request in time")


@pytest.mark.parametrize("given", [True, False], ids=["timeout", "agent-timeout"])
def test_wait_on_stream_keeps_its_deadline_while_another_thread_holds_the_agent(recording_agents, monkeypatch, given):
    """wait_on_stream took the agent's lock with no deadline: another thread's call (an add_peer waiting for a
    peer) held it up for as long as that call ran.  It now takes the lock for at most its timeout (default: the
    agent's) and fails as wait() does, with CommTimeoutError, the request aborted by the agent's next call."""
    agent, backend = recording_agents
    request = _StreamWaits()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    monkeypatch.setattr(agent, "timeout", 0.2)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])
    with _held_by_another_thread(agent):
        start = time.monotonic()
        with pytest.raises(CommTimeoutError, match="peer 'b' .* within 0.2 s"):
            handle.wait_on_stream(_STREAM, **({"timeout": 0.2} if given else {}))
        assert time.monotonic() - start < 1.0 and handle.state == "failed" and request.deadlines == []
    agent.notifications()
    assert request.aborted == 1
    with pytest.raises(CommTimeoutError):
        handle.wait_on_stream(_STREAM)  # the failure stays
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: _Done())
    done = agent.write("b", "kv", "kv", [(0, 0, 16)])
    assert done.done()
    with _held_by_another_thread(agent):
        done.wait_on_stream(_STREAM, timeout=0.05)  # seen complete already: nothing to wait for, not failed
    assert done.state == "done"


def test_wait_on_stream_gives_the_request_its_deadline_and_a_host_wait_past_it_is_the_handles_timeout(
    recording_agents, monkeypatch
):
    agent, backend = recording_agents
    request = _StreamWaits()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    before = time.monotonic()
    agent.write("b", "kv", "kv", [(0, 0, 16)]).wait_on_stream(_STREAM, timeout=5.0)
    assert before + 5.0 <= request.deadlines[0] <= time.monotonic() + 5.0
    stuck = _StreamWaits(stuck=True)
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: stuck)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="to peer 'b' .* within 0.1 s") as info:
        handle.wait_on_stream(_STREAM, timeout=0.1)
    assert time.monotonic() - start < 1.0 and handle.state == "failed" and info.value.details["peer"] == "b"
    assert stuck.aborted == 1
    with pytest.raises(InvalidArgumentError):
        handle.wait_on_stream(_STREAM, timeout=float("nan"))


def test_wait_on_stream_without_cuda_or_given_no_stream_is_a_typed_error_and_leaves_the_handle_pending(
    recording_agents, monkeypatch
):
    """The default stream of a process without CUDA was torch's AssertionError ("Torch not compiled with CUDA
    enabled"), raised for a NIXL handle too, whose documented answer is NotImplementedCommError; a stream that is
    none of torch's failed inside the transport with an AttributeError."""
    agent, backend = recording_agents
    request = _StreamWaits()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])

    def no_cuda():
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    with pytest.raises(NotImplementedCommError, match=r"no CUDA .* use wait\(\)"):
        handle.wait_on_stream()
    for stream in (object(), "stream", 0, types.SimpleNamespace(cuda_stream=1.0)):
        with pytest.raises(InvalidArgumentError, match="stream must be a torch.cuda.Stream"):
            handle.wait_on_stream(stream)
    assert handle.state == "pending" and request.deadlines == [] and request.aborted == 0
    handle.wait_on_stream(_STREAM, timeout=5.0)
    assert len(request.deadlines) == 1


def test_a_resident_copier_request_waits_on_the_stream_until_the_deadline_it_is_given():
    """The resident copier's requests wait on the host (for microseconds); that wait ends at the handle's
    deadline, not at the copier's own timeout."""
    from sagellm_comm.transfer import ipc

    waits = []
    copier = types.SimpleNamespace(wait=lambda seq, deadline=None, peer=None: waits.append((seq, deadline, peer)))
    link = ipc.IpcLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    ipc.ResidentRequest(types.SimpleNamespace(copier=copier), link, 7).wait_on_stream(object(), 123.5)
    assert waits == [(7, 123.5, "peer")]


def test_a_resident_copier_post_reads_the_served_count_only_when_its_mailbox_looks_full():
    """``post`` trusts the served count it last read while that leaves room, and reads the word again before it
    refuses a request: a full mailbox is refused (None, nothing queued) only by the count as it is now."""
    from sagellm_comm.kernels import block_copy as bc
    from sagellm_comm.transfer import ipc_resident as ir

    copier = object.__new__(ir.ResidentCopier)
    box = torch.zeros(bc.SERVER_WORDS, dtype=torch.int64)
    copier.ints = memoryview(box.numpy()).cast("B").cast("q")
    copier.posted = copier.done_seen = 0
    copier.ints[ir.STATE] = ir.SERVING  # a program serves the mailbox: post launches nothing
    for seq in range(1, ir.ENTRIES + 1):
        assert copier.post(64 * seq, 1 << 20, 16, 0, 0, 0) == seq
    assert copier.done_seen == 0  # never read: the mailbox had room by the count it started with
    assert copier.post(0, 1 << 20, 16, 0, 0, 0) is None and copier.posted == ir.ENTRIES  # full, nothing queued
    copier.ints[ir.DONE] = 3  # the program served three
    assert copier.post(0, 1 << 20, 16, 0, 0, 0) == ir.ENTRIES + 1 and copier.done_seen == 3
    entry = ir.RING + (ir.ENTRIES % ir.ENTRIES) * ir.ENTRY_WORDS  # request ENTRIES + 1 reuses entry 0
    assert copier.ints[entry] == ir.ENTRIES + 1
    copier.post(0, 1 << 20, 16, 0, 0, 0)
    copier.post(0, 1 << 20, 16, 0, 0, 0)
    assert copier.post(0, 1 << 20, 16, 0, 0, 0) is None and copier.posted == ir.ENTRIES + 3


@pytest.mark.parametrize("post", ["one block", "few rows", "one id"])
def test_a_request_whose_wait_timed_out_under_another_threads_call_is_aborted_by_a_short_path_post(
    recording_agents, monkeypatch, post
):
    """The abort a timed-out wait left to the agent's next call is made by that call whichever path it takes: an
    engine that only posts one-block requests (the short paths) aborts it at its next post."""
    agent, backend = recording_agents
    request = _Pending()
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: request)
    handle = agent.write("b", "kv", "kv", [(0, 0, 16)])
    prepared = agent.prepare("b", "kv", "kv", 64)
    with _held_by_another_thread(agent), pytest.raises(CommTimeoutError):
        handle.wait(timeout=0.05)
    assert request.aborted == 0
    monkeypatch.setattr(backend, "post", lambda *args, **kwargs: _Pending())
    if post == "one block":
        agent.write("b", "kv", "kv", [(0, 64, 16)])
    elif post == "few rows":
        agent.write("b", "kv", "kv", [(0, 64, 16), (16, 128, 16)])
    else:
        prepared.write(0, 1)
    assert request.aborted == 1


def test_notifications_are_every_transports_in_a_new_list(recording_agents):
    agent, backend = recording_agents
    assert agent.notifications() == []
    backend.messages = [("b", b"one"), ("b", b"two")]
    got = agent.notifications()
    assert got == [("b", b"one"), ("b", b"two")] and agent.notifications() == []
    got.clear()  # the caller owns what it got


class _FailingReads(_RecordingBackend):
    """A recording transport whose notification reads raise while ``failing`` says so."""

    def __init__(self, context):
        super().__init__(context)
        self.failing: list[bool] = []  # one entry per read, popped; empty: always fail

    def notifications(self) -> list[tuple[str, bytes]]:
        if not self.failing or self.failing.pop(0):
            raise TransferError("the second transport could not read its notifications")
        return super().notifications()


@pytest.fixture
def two_transports(monkeypatch):
    """An agent running two transports, ``first`` (best) and ``second`` (whose reads may fail), and both."""
    from sagellm_comm.transfer import TransferAgent

    entries = [types.SimpleNamespace(name="first", factory=_RecordingBackend),
               types.SimpleNamespace(name="second", factory=_FailingReads)]  # fmt: skip
    monkeypatch.setattr(registry, "resolve", lambda backend: (entries, {}))
    agent = TransferAgent("a", "first,second")
    try:
        yield agent, agent._backends["first"], agent._backends["second"]
    finally:
        agent.close()


def test_a_transport_whose_notifications_fail_does_not_hold_back_the_others(two_transports):
    """The first transport's notifications are returned by the call whose read of the second fails, and the
    failure, naming its transport, by the next call (which reads nothing); a call with nothing else to return
    raises it at once."""
    agent, first, second = two_transports
    first.messages, second.messages = [("b", b"one")], [("c", b"three")]
    second.failing = [True, False, True]
    assert agent.notifications() == [("b", b"one")]
    first.messages = [("b", b"two")]
    with pytest.raises(TransferError, match="second transport") as raised:
        agent.notifications()
    assert raised.value.details["transport"] == "second"
    assert agent.notifications() == [("b", b"two"), ("c", b"three")]  # not read by the call that raised
    with pytest.raises(TransferError):  # nothing else to return: raised at once
        agent.notifications()


def test_a_transport_whose_notifications_always_fail_holds_nothing_back(two_transports):
    """A transport whose every read fails: the other transport's notifications all arrive, in order, each at
    most one call after it arrived, while that failure is raised every other call."""
    agent, first, second = two_transports
    sent, got, errors = [], [], 0
    for i in range(20):
        message = ("b", f"n{i}".encode())
        sent.append(message)
        first.messages.append(message)  # waits in its ring until read
        try:
            got += agent.notifications()
        except TransferError as exc:
            assert exc.details["transport"] == "second"
            errors += 1
        assert len(sent) - len(got) <= 1, (sent, got)
    assert got == sent[: len(got)] and len(got) >= 19 and errors == 10, (got, errors)


# ---------------------------------------------------------------------------------------------- shared memory
def test_shared_cpu_tensor_is_a_shared_file_mapping_removed_with_the_tensor():
    tensor = shared.shared_cpu_tensor((3, 5), torch.float16)
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float16 and not tensor.any()
    path, offset = shared.shared_file_of(tensor.data_ptr() + 4, 8)
    assert offset == 4 and os.path.exists(path) and shm.owner_alive(path)
    mapped = torch.from_file(path, shared=True, size=30, dtype=torch.uint8)
    tensor.view(-1).view(torch.uint8)[7] = 42
    assert int(mapped[7]) == 42  # one memory
    del tensor
    assert not os.path.exists(path)
    with pytest.raises(BackendNotSupportedError, match="process-private"):
        shared.shared_file_of(torch.zeros(1024).data_ptr(), 16)


@pytest.mark.parametrize(
    ("shape", "dtype", "words"),
    [
        ((3.9,), torch.float32, "each size of shape must be an int, got 3.9"),  # never rounded to 3
        ("16", torch.float32, "shape must be an int or a tuple"),  # never read as the shape (1, 6)
        (True, torch.float32, "shape must be an int or a tuple"),
        ((-2, -2), torch.float32, "each size of shape must be >= 0"),  # no element count of 4
        (16, "float32", "dtype must be a torch.dtype"),
        ((1 << 61,), torch.float32, "more than a region may hold"),  # an OverflowError from the file system call
        ((0, 4), torch.float32, "at least one element"),
    ],
)
def test_shared_cpu_tensor_refuses_a_shape_or_dtype_it_cannot_take_and_leaves_no_file(shape, dtype, words):
    before = set(os.listdir(shm.shared_dir()))
    with pytest.raises(InvalidArgumentError, match=words):
        shared.shared_cpu_tensor(shape, dtype)
    mine = f"{shm.TRANSFER_PREFIX}{os.getpid()}-"
    assert not [n for n in set(os.listdir(shm.shared_dir())) - before if n.startswith(mine)]
    assert shared.shared_cpu_tensor((np.int64(2), 3), torch.float16).shape == (2, 3)


def test_a_shared_cpu_tensor_that_cannot_be_mapped_leaves_no_file_or_lock(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("unable to mmap: Cannot allocate memory")

    before, fds = set(os.listdir(shm.shared_dir())), len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(torch, "from_file", refuse)
    for _ in range(50):
        with pytest.raises(RuntimeError, match="Cannot allocate memory"):
            shared.shared_cpu_tensor(4096, torch.uint8)
    mine = f"{shm.TRANSFER_PREFIX}{os.getpid()}-"
    assert not [n for n in set(os.listdir(shm.shared_dir())) - before if n.startswith(mine)]
    assert len(os.listdir("/proc/self/fd")) == fds


def test_shared_memory_is_reserved_when_made_and_a_full_dev_shm_is_a_typed_error(monkeypatch):
    """A region's, an inbox's and an interpreter workspace's pages are reserved when the file is made (a sparse
    file let a later store die of SIGBUS on a full /dev/shm); a refusal leaves no file behind."""
    tensor = shared.shared_cpu_tensor(1 << 20, torch.uint8)
    path, _ = shared.shared_file_of(tensor.data_ptr(), 1)
    assert os.stat(path).st_blocks * 512 >= 1 << 20  # not sparse
    inbox = notify.Inbox()
    assert os.stat(inbox.path).st_blocks * 512 >= notify.FILE_BYTES
    inbox.close()
    del tensor

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = set(os.listdir(shm.shared_dir()))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UnavailableError, match="cannot reserve 4096 bytes of shared memory .*--shm-size"):
        shared.shared_cpu_tensor(4096, torch.uint8)
    with pytest.raises(UnavailableError, match=f"cannot reserve {notify.FILE_BYTES} bytes"):
        notify.Inbox()
    mine = f"{shm.TRANSFER_PREFIX}{os.getpid()}-"
    assert not [n for n in set(os.listdir(shm.shared_dir())) - before if n.startswith(mine)]


def test_an_ipc_agent_whose_first_region_met_a_full_dev_shm_works_once_there_is_room(monkeypatch):
    """The ipc transport binds to its device at the first region (a probe in shared memory, a counter, a
    stream); a bind that fails releases what it made, and the next region binds afresh (metadata and close
    raised AttributeError)."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = TransferAgent("a", "ipc")
    kv = shared.shared_cpu_tensor(4096, torch.uint8)  # made while there is room
    real = os.posix_fallocate

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UnavailableError):
        a.register("kv", kv)
    monkeypatch.setattr(os, "posix_fallocate", real)
    a.register("kv", kv)
    section = AgentMetadata.decode(a.metadata()).transports["ipc"]
    assert section["regions"]["kv"]["address"] == kv.data_ptr() and section["probe"]["size"] > 0
    a.close()


def test_the_peer_access_test_copy_is_waited_for_up_to_the_agents_timeout():
    """add_peer's test copy (GPU path) runs on the transfer stream behind the caller's current stream, and was
    waited for with a stream synchronisation: a caller's stream that never drains (a kernel waiting on a dead
    rank) held add_peer, and the agent's lock, forever.  The wait is now the agents' bounded one: past the
    timeout, CommTimeoutError naming the peer (which ``connect`` turns into "not reachable over ipc")."""
    from collections import deque

    from sagellm_comm.transfer import ipc

    class _NeverDrains:
        def __init__(self):
            self.synchronized = 0

        def synchronize(self) -> None:
            self.synchronized += 1
            time.sleep(2.0)  # a stream behind a kernel that does not end (returns, so that the test ends)

    backend = object.__new__(ipc.IpcBackend)
    backend.context = types.SimpleNamespace(name="a", timeout_s=0.2)
    backend.copier, backend.stream = None, _NeverDrains()
    backend.scratch = torch.zeros(ipc.TOKEN_BYTES, dtype=torch.uint8)
    backend.events = types.SimpleNamespace(done=lambda event: False)  # the probe's launch never completes
    backend.in_flight, backend.completed, backend.launches, backend._stalled_at = deque([(1, 0, None)]), 0, 1, -1
    link = ipc.IpcLink(AgentMetadata("peer", "incarnation", "host", "boot", 1), addresses={"\0probe": 4096})
    backend._one_block = lambda link, src, dst, nbytes, notify: ipc.IpcRequest(backend, link, 1, 0)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match="peer 'peer'.* within 0.2 s") as info:
        backend._probe(link, b"t" * ipc.TOKEN_BYTES)
    assert time.monotonic() - start < 1.0 and backend.stream.synchronized == 0
    assert info.value.details["peer"] == "peer"


def test_an_in_process_peers_probe_stays_allocated_while_a_test_copy_given_up_on_may_still_read_it():
    """Agent a's add_peer of c, an agent of this process on a GPU (its probe: memory nothing but c holds), gave up
    on its test copy from c's probe: still running past a's timeout, and past the clean-up's wait.  c then closes,
    without waiting for the copy: its probe stays allocated while the copy may read it, and is freed once a sees the
    copy complete.  Before, c's close freed the probe under the running copy."""
    from collections import deque

    from sagellm_comm.transfer import ipc
    from sagellm_comm.transfer.ipc_memory import Allocation
    from tests.conftest import RecordingFileMemory

    memory = RecordingFileMemory()  # stands for c's device memory: records what is freed
    c = object.__new__(ipc.IpcBackend)
    c.context, c.key, c.lending = types.SimpleNamespace(name="c", timeout_s=0.1), "c", threading.RLock()
    c.device, c.memory, c._probe_memory = torch.device("cuda", 0), memory, Allocation(memory, ipc.PROBE_BYTES)
    c.probe, c.probe_export = c._probe_memory.ptr, {"address": c._probe_memory.ptr, "token": "00" * 16}
    c.inbox = types.SimpleNamespace(path="/dev/shm/sagellm-xfer-c", close=lambda: None)
    c.exported, c.links, c.unreleased, c.copier, c._closed = {}, [], [], None, False
    c.launches, c.completed, c.in_flight, c._stalled_at = 0, 0, deque(), -1
    c.staging, c.events = types.SimpleNamespace(close=lambda in_use: None), types.SimpleNamespace(close=lambda: None)
    probe = c.probe
    described = AgentMetadata("c", "incarnation", "host", "boot", 1)
    described.transports = {"ipc": {"inbox": c.inbox.path, "device": "cuda", "probe": dict(c.probe_export)}}

    running = [True]  # a's test copy from c's probe (launch 1)
    a = object.__new__(ipc.IpcBackend)
    a.context, a.copier, a.unreleased = types.SimpleNamespace(name="a", timeout_s=0.1), None, []
    a.events = types.SimpleNamespace(done=lambda event: not running[0], reuse=lambda event: None)
    a.launches, a.completed, a.in_flight, a._stalled_at = 1, 0, deque([(1, 0, None)]), -1
    link = ipc.IpcLink(described, last=1)
    with c.lend_to(described, {"key": c.key, "regions": {}}) as (link.addresses, link.held):
        assert link.addresses == {"\0probe": probe}
        a._release(link)  # add_peer's clean-up after the test copy timed out: the copy still runs after its wait
    assert a.unreleased == [link]

    start = time.monotonic()
    c.close()
    assert time.monotonic() - start < 0.1, "c's close waited for a's copy"
    assert probe not in memory.freed, "c's probe was freed while a's test copy may still read it"
    a._retry_unreleased()  # the copy is still running: nothing is released
    assert a.unreleased == [link] and probe not in memory.freed
    running[0] = False
    a._retry_unreleased()  # the copy completed: the link's hold on the probe goes, and with it the probe
    assert not a.unreleased and memory.freed == [probe]


def test_a_region_one_transport_fails_to_deregister_is_forgotten_by_every_transport_and_the_agent(monkeypatch):
    """deregister stopped at the first transport that raised: the agent still listed the region while the
    transports before it had forgotten it, so the agent's metadata described a region without its ipc export and
    every peer refused that metadata.  Now every transport's deregister runs, the region is forgotten (a transport
    that could not let go keeps it referenced itself), and the first error is raised.  (The peer's ipc section is
    checked before its test copy, which cannot launch in this process: the peer may be added over NIXL.)"""
    pytest.importorskip("nixl_cu13", reason="needs NIXL: pip install 'isagellm-comm[transfer]'")
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = TransferAgent("a")
    b = TransferAgent("b")
    try:
        assert a.backends == ["ipc", "nixl"]
        a.allocate("kv", 4096, torch.uint8)
        a.allocate("old", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        nixl_agent = a._backends["nixl"].agent

        def refuse(descs):
            raise _NixlAgentError("nixlNotFoundError: NIXL_ERR_NOT_FOUND")

        with monkeypatch.context() as patch:
            patch.setattr(nixl_agent, "deregister_memory", refuse)
            with pytest.raises(TransferError, match="deregister region 'old'"):
                a.deregister("old")
        assert a.regions == ["kv"]
        assert b.add_peer(a.metadata()) == "a" and list(b.peer_regions("a")) == ["kv"]
    finally:
        a.close()
        b.close()


def test_an_ipc_region_deregistered_when_the_transfer_stream_failed_stays_referenced():
    """The agent forgets a region whose deregister raised; the ipc transport, whose wait for its launches raised
    (the transfer stream failed: GPU path, a stand-in here), keeps the region's memory referenced itself."""
    from collections import deque

    from sagellm_comm.transfer import ipc

    def failed(event):
        raise TransferError("the transfer stream failed: CUDA error 700 (cudaEventQuery)")

    backend = object.__new__(ipc.IpcBackend)
    backend.context = types.SimpleNamespace(name="a", timeout_s=0.2)
    kv = types.SimpleNamespace(name="kv")
    backend.copier, backend.exported, backend.kept = None, {"kv": (kv, {})}, []
    backend.events = types.SimpleNamespace(done=failed)
    backend.in_flight, backend.completed, backend.launches, backend._stalled_at = deque([(1, 0, None)]), 0, 1, -1
    with pytest.raises(TransferError, match="stream failed"):
        backend.deregister(kv)
    assert backend.kept == [kv] and backend.exported == {}


def test_an_ipc_transport_whose_resident_copier_fails_to_stop_still_closes_its_inbox_and_buffers(monkeypatch):
    """The ipc transport's close runs every step even when one raises: a resident copier that fails to stop (a
    stand-in here; GPU path) does not keep the inbox's files and lock, nor the staging buffers; its error is
    raised once every step ran."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    agent = TransferAgent("a", "ipc")
    try:
        agent.allocate("kv", 4096, torch.uint8)  # binds the transport: staging buffers, probe
        backend = agent._backends["ipc"]
        closed: list[str] = []

        def stuck() -> None:
            closed.append("copier")
            raise TransferError("the resident copier did not stop")

        backend.copier = types.SimpleNamespace(posted=0, completed=lambda: 0, close=stuck)

        def recorded(name, close):
            def recording(*args, **kwargs):
                closed.append(name)
                return close(*args, **kwargs)

            return recording

        monkeypatch.setattr(backend.inbox, "close", recorded("inbox", backend.inbox.close))
        monkeypatch.setattr(backend.staging, "close", recorded("staging", backend.staging.close))
        with pytest.raises(TransferError, match="did not stop"):
            backend.close()
        assert closed == ["copier", "inbox", "staging"]
    finally:
        agent.close()


def test_a_failed_ipc_bind_raises_its_own_error_when_releasing_its_state_fails_too(monkeypatch, caplog):
    """The ipc transport binds to a device at its first region; a bind that fails releases what it made, and a
    release that raises as well is logged: the bind's error is raised, and the next call binds afresh instead of
    running on the half-made state."""
    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer import ipc as ipc_module
    from sagellm_comm.transfer.ipc_memory import Staging

    released: list[str] = []

    class _StuckStaging(Staging):
        def close(self, in_use: bool) -> None:
            released.append("staging")
            super().close(in_use)
            raise TransferError("the staging buffers would not go")

    def no_launcher(*args, **kwargs):
        raise BackendNotSupportedError("no kernel launcher here")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    agent = TransferAgent("a", "ipc")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(ipc_module, "Staging", _StuckStaging)
            patch.setattr(ipc_module, "Launcher", no_launcher)
            at_warning = caplog.at_level(logging.WARNING, logger="sagellm_comm.transfer")
            with at_warning, pytest.raises(BackendNotSupportedError, match="no kernel launcher here"):
                agent.allocate("kv", 4096, torch.uint8)
        assert released == ["staging"]
        assert "after a failed bind to cpu raised" in caplog.text and "would not go" in caplog.text
        assert agent.regions == []
        region = agent.allocate("kv", 4096, torch.uint8)  # binds afresh
        assert agent.regions == ["kv"] and region.numel() == 4096
    finally:
        agent.close()


def test_a_fifo_where_a_peer_names_its_inbox_is_refused_without_blocking(monkeypatch):
    """Opening a FIFO for reading waits for a writer: the liveness probe opens without blocking, and add_peer
    refuses the path within the agent's timeout instead of holding the agent's lock forever."""
    import json

    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.metadata import MAGIC

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = TransferAgent("a", "ipc", timeout=2.0), TransferAgent("b", "ipc")
    fifo = shared.new_path("-fifo")
    os.mkfifo(fifo)
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        body = json.loads(b.metadata()[len(MAGIC) :])
        body["process"] = "f" * 16  # a peer in another process (one in this process has its live agent's inbox)
        body["transports"]["ipc"]["inbox"] = fifo
        outcome, thread = [], None

        def add():
            try:
                a.add_peer(MAGIC + json.dumps(body).encode())
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=add, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "add_peer blocked on the FIFO"
        assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgumentError), outcome
        assert "not a regular file" in str(outcome[0]), outcome
        probe = shm.LivenessProbe(fifo)
        probe.close()
    finally:
        if thread is not None and thread.is_alive():  # a writer end releases the blocked open (close takes the lock)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(10)
        os.unlink(fifo)
        a.close()
        b.close()


def _not_transfer_files(folder) -> dict[str, str]:
    """Paths a hostile peer's metadata could name, none of them a transfer file, each of 2 MB: a file of the user's
    elsewhere, a link with the transfer prefix in the shared directory pointing at it, a file of the shared
    directory without the prefix, and one with the prefix in a folder below the shared directory."""
    victim = folder / "victim"
    victim.write_bytes(b"\x5a" * (1 << 21))
    link = shared.new_path("-link")
    os.symlink(victim, link)
    unprefixed = os.path.join(shm.shared_dir(), f"not-a-transfer-file-{os.getpid()}")
    below = shared.new_path("-folder")
    os.mkdir(below)
    nested = os.path.join(below, f"{shm.TRANSFER_PREFIX}{os.getpid()}-nested")
    for path in (unprefixed, nested):
        with open(path, "wb") as handle:
            handle.write(b"\x5a" * (1 << 21))
    return {"elsewhere": str(victim), "link": link, "unprefixed": unprefixed, "below": nested}


@pytest.mark.parametrize("field", ["region", "probe", "inbox"])
def test_a_peer_path_that_is_not_a_transfer_file_is_refused_before_anything_is_mapped(tmp_path, monkeypatch, field):
    """The ipc section of a peer's metadata names files this agent maps read-write (its regions, its probe) and
    the inbox it writes notifications into: each must be a transfer file.  Any other path is refused at
    add_peer (``InvalidArgumentError`` naming the field) before it is opened: the file stays untouched and
    unmapped, and no peer is added."""
    import json

    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.metadata import MAGIC

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    paths = _not_transfer_files(tmp_path)
    a, b = TransferAgent("a", "ipc", timeout=2.0), TransferAgent("b", "ipc")
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        for kind, path in paths.items():
            body = json.loads(b.metadata()[len(MAGIC) :])
            section = body["transports"]["ipc"]
            if field == "inbox":
                section["inbox"] = path
            else:
                (section["probe"] if field == "probe" else section["regions"]["kv"])["path"] = path
            with pytest.raises(InvalidArgumentError, match="sagellm-xfer-") as refused:
                a.add_peer(MAGIC + json.dumps(body).encode())
            named = "'inbox'" if field == "inbox" else "'path'"
            assert named in str(refused.value) and "malformed" in str(refused.value), (kind, refused.value)
            assert a.peers == [], kind
            with open("/proc/self/maps") as handle:
                maps = handle.read()
            resolved = os.path.realpath(path)
            assert resolved not in maps, kind
            with open(resolved, "rb") as handle:
                assert handle.read() == b"\x5a" * (1 << 21), kind
    finally:
        a.close()
        b.close()
        for path in (paths["link"], paths["unprefixed"], paths["below"]):
            os.unlink(path)
        os.rmdir(os.path.dirname(paths["below"]))


def test_a_link_put_where_a_transfer_file_was_checked_is_not_followed(monkeypatch, tmp_path):
    """The name is checked on the resolved path, then opened without following a symbolic link: a link that a
    peer puts there in between (here: a resolution that leaves it in place) is refused, as is a FIFO."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 64)
    link, fifo = shared.new_path("-link"), shared.new_path("-fifo")
    os.symlink(victim, link)
    os.mkfifo(fifo)
    try:
        monkeypatch.setattr(os.path, "realpath", lambda path: path)
        with pytest.raises(InvalidArgumentError, match="symbolic link"):
            shared.open_transfer_file(link, os.O_RDWR, "peer file")
        monkeypatch.undo()
        with pytest.raises(InvalidArgumentError, match="not a regular file"):
            shared.open_transfer_file(fifo, os.O_RDONLY, "peer file")
        with pytest.raises(InvalidArgumentError, match="not a transfer file"):
            shared.open_transfer_file(link, os.O_RDONLY, "peer file")  # resolved: the victim, elsewhere
    finally:
        os.unlink(link)
        os.unlink(fifo)


def test_the_ipc_transport_refuses_to_share_a_region_mapped_from_a_file_that_is_not_a_transfer_file(
    tmp_path, monkeypatch
):
    """Peers map transfer files only, so a CPU tensor mapped from another file is refused at register (under
    ``auto`` NIXL moves it) rather than described in metadata every peer would refuse."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = tmp_path / "pool"
    path.write_bytes(b"\0" * 4096)
    tensor = torch.from_file(str(path), shared=True, size=4096, dtype=torch.uint8)
    with TransferAgent("a", "ipc") as agent:
        with pytest.raises(BackendNotSupportedError, match="TransferAgent.allocate"):
            agent.register("kv", tensor)
        assert agent.regions == []


_RESTARTED_MALFORMED = """
import json, torch
from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.transfer import TransferAgent
from sagellm_comm.transfer.metadata import MAGIC
a, b = TransferAgent("a", "ipc", timeout=5.0), TransferAgent("b", "ipc", timeout=5.0)
src, dst = a.allocate("kv", 4096, torch.uint8), b.allocate("kv", 4096, torch.uint8)
a.add_peer(b.metadata())
changes = [
    lambda t: t.__setitem__("inbox", 5),
    lambda t: t["probe"].__setitem__("token", "zz" * 16),
    lambda t: t["regions"].pop("kv"),
]
for i, change in enumerate(changes):
    body = json.loads(b.metadata()[len(MAGIC) :])
    body["incarnation"] = "0" * 32  # another incarnation of "b"
    change(body["transports"]["ipc"])
    try:
        a.add_peer(MAGIC + json.dumps(body).encode())
        refused = "accepted"
    except InvalidArgumentError as exc:
        refused = "ipc section" in str(exc)
    src[:64] = i + 1
    a.write("b", "kv", "kv", [(0, 0, 64)], notify=b"n%d" % i).wait(5.0)
    print(refused, a.peers == ["b"], b.notifications() == [("a", b"n%d" % i)], bool(dst[:64].eq(i + 1).all()))
a.close()
b.close()
"""


def test_metadata_of_a_restarted_peer_with_a_malformed_section_leaves_the_known_peer_connected():
    """Metadata of another incarnation whose transport section is malformed is refused (``InvalidArgumentError``
    naming the field) before the old incarnation is removed: the known peer stays connected and notified."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", _RESTARTED_MALFORMED], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.split() == ["True"] * 12, out.stdout + out.stderr


def _hold_a_shared_file(paths) -> None:
    tensor = shared.shared_cpu_tensor(4096, torch.uint8)
    paths.put(shared.shared_file_of(tensor.data_ptr(), 1)[0])
    time.sleep(120)


def test_stopping_benchmark_processes_removes_the_shared_files_of_those_it_killed():
    """A benchmark process killed by a signal (a peer failed, or the run was stopped) never ran its clean-up:
    its shared-memory files are removed when it is reaped, those of live owners kept."""
    import multiprocessing

    from sagellm_comm.benchmark import spawn

    ctx = multiprocessing.get_context("spawn")
    paths = ctx.Queue()
    process = ctx.Process(target=_hold_a_shared_file, args=(paths,))
    process.start()
    path = paths.get(timeout=120)
    mine = shared.shared_cpu_tensor(4096, torch.uint8)  # a live owner's file, named after this process
    assert os.path.exists(path)
    spawn.stop([process], grace_s=5.0)
    assert process.exitcode < 0 and not os.path.exists(path)
    assert shm.remove_files_of([os.getpid()]) == 0 and mine.sum() == 0


@pytest.mark.parametrize("libc", [True, False], ids=["libc-flock", "fcntl-flock"])
def test_liveness_probe_tells_a_live_owner_from_a_dead_one_and_keeps_no_lock(libc, monkeypatch):
    if libc:
        assert shm.libc_flock() is not None
    else:
        monkeypatch.setattr(shm, "libc_flock", lambda: None)  # where libc cannot be loaded
    path = shared.new_path("-test")
    open(path, "wb").close()
    try:
        lock = shm.OwnerLock(path)
        probe = shm.LivenessProbe(path)
        assert probe.alive() and probe.alive()
        lock.release()
        assert not probe.alive() and not probe.alive()
        lock = shm.OwnerLock(path)  # the probe let go of the lock it took: an owner can take it again
        assert probe.alive()
        lock.release()
        probe.close()
        probe.fd = 1 << 20  # not an open file: an error, not a verdict
        with pytest.raises(OSError):
            probe.alive()
    finally:
        os.unlink(path)


def test_an_ipc_post_trusts_a_live_verdict_for_a_millisecond_and_a_handle_always_checks(monkeypatch):
    """A check that found the peer alive spares the posts of the next ``ALIVE_REUSE_S`` the ``flock``; a dead
    verdict is never kept (every post checks again and is refused), and a completing handle checks afresh
    (failing inside the window when the peer died) and renews the window when the peer is alive."""
    import types

    from sagellm_comm.transfer import ipc

    class Probe:
        live, calls = True, 0

        def alive(self):
            self.calls += 1
            return self.live

    class Finished(ipc._LinkRequest):
        __slots__ = ()

        def _finished(self):
            return True

        def abort(self):
            pass

    now = [100.0]
    monkeypatch.setattr(ipc, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    probe = Probe()
    link = ipc.IpcLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    link.outbox = types.SimpleNamespace(liveness=probe)
    check = ipc.IpcBackend._check_alive
    check(link)
    assert probe.calls == 1
    probe.live = False
    now[0] += ipc.ALIVE_REUSE_S / 2
    check(link)  # inside the window: trusted, no system call
    assert probe.calls == 1
    request = object.__new__(Finished)
    request.backend, request.link = None, link
    with pytest.raises(PeerLostError, match="exited before the transfer was seen complete"):
        request.poll()  # the handle checks afresh even inside the window
    now[0] += ipc.ALIVE_REUSE_S
    for calls in (3, 4):  # past the window: refused, and a dead verdict is checked again at every post
        with pytest.raises(PeerLostError, match="nothing was sent"):
            check(link)
        assert probe.calls == calls
    probe.live = True
    assert request.poll() and probe.calls == 5  # a completed handle renews the window
    probe.live = False
    now[0] += ipc.ALIVE_REUSE_S / 2
    check(link)
    assert probe.calls == 5


def test_owner_lock_tells_a_live_owner_from_a_dead_one():
    path = shared.new_path("-test")
    open(path, "wb").close()
    try:
        lock = shm.OwnerLock(path)
        probe = shm.LivenessProbe(path)
        assert probe.alive()
        lock.release()
        assert not probe.alive()
        probe.close()
        # A process that held the lock and was killed: the kernel released it.
        code = f"import fcntl, os, signal; fd = os.open({path!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); " \
               "print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)"  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "locked" in out.stdout and out.returncode == -9
        assert not shm.owner_alive(path)
        assert not shm.owner_alive(path + "-never-created")
    finally:
        os.unlink(path)


def test_a_forked_child_does_not_keep_its_parents_owner_lock():
    """A ``flock`` belongs to the open file a forked child shares: without the child closing its copy, an owner
    that released its lock (or exited) would look alive for as long as a child forked after the lock lives."""
    path = shared.new_path("-test")
    open(path, "wb").close()
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    lock = shm.OwnerLock(path)
    probe = shm.LivenessProbe(path)
    pid = os.fork()
    if pid == 0:  # the child: says it started, then holds on until the parent has looked
        os.write(to_parent, b"1" if lock.fd == -1 else b"0")
        os.read(to_child, 1)
        os._exit(0)
    try:
        assert os.read(from_child, 1) == b"1"  # the child's copy is closed
        assert probe.alive()  # the parent still holds it
        lock.release()
        assert not probe.alive()  # the child lives on, and holds no lock
    finally:
        os.write(from_parent, b"x")
        os.waitpid(pid, 0)
        for fd in (to_child, from_parent, from_child, to_parent):
            os.close(fd)
        probe.close()
        os.unlink(path)


def test_a_forked_child_leaves_its_parents_shared_tensor_file():
    """A shared CPU tensor's file goes with the tensor, in the process that made it: a forked child that exits
    normally (running the finalizer it inherited) leaves it to its owner."""
    t = shared.shared_cpu_tensor(16, torch.uint8)
    path, _ = shared.shared_file_of(t.data_ptr(), 16)
    pid = os.fork()
    if pid == 0:
        import weakref

        weakref.finalize._exitfunc()  # what a normal exit runs: the finalizers it inherited
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.exists(path) and shm.owner_alive(path)
    del t
    import gc

    gc.collect()
    assert not os.path.exists(path)


def test_an_inbox_dropped_without_close_lets_go_of_its_lock_files_and_descriptors():
    """An agent nobody closed is gone for its peers once it is freed: its inbox's owner lock and descriptors go
    with it, not only its files (a peer's write to it then raises ``PeerLostError``, instead of reporting done
    into memory nobody reads)."""
    import gc

    def still_open(fd: int, file: tuple[int, int]) -> bool:
        """Whether ``fd`` still refers to ``file`` (device, inode): another thread may have reused the number."""
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == file

    for _ in range(3):
        inbox = notify.Inbox()
        path, claim = inbox.path, inbox.claim_path
        owned = [(fd, (os.fstat(fd).st_dev, os.fstat(fd).st_ino)) for fd in (inbox._lock.fd, inbox._mapped.fd)]
        probe = shm.LivenessProbe(path)
        assert probe.alive()
        del inbox
        gc.collect()
        assert not probe.alive() and not os.path.exists(path) and not os.path.exists(claim)
        assert not any(still_open(fd, file) for fd, file in owned)
        probe.close()
        probe = shm.LivenessProbe(path)  # opened after the owner went: dead
        assert not probe.alive() and probe.fd == -1


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 129, "\u9884" * 86, 7])
def test_an_agent_name_a_peers_ring_cannot_hold_is_refused_up_front(name):
    """A name is 1-128 printable characters and at most 256 bytes in UTF-8 (86 CJK characters are 258): the
    notification ring of every ipc peer holds it, and a longer one would fail every add_peer over ipc."""
    from sagellm_comm.transfer import TransferAgent

    with pytest.raises(InvalidArgumentError, match="agent name must be"):
        TransferAgent(name, "nixl")


_DROPPED_AGENT = """
import gc, time, torch
from sagellm_comm.errors import PeerLostError
from sagellm_comm.transfer import TransferAgent
a = TransferAgent("dropper-a", "ipc", timeout=5.0)
b = TransferAgent("dropper-b", "ipc", timeout=5.0)
a.allocate("kv", 4096, torch.uint8)
b.allocate("kv", 4096, torch.uint8)
peer = a.add_peer(b.metadata())
a.write(peer, "kv", "kv", [(0, 0, 64)]).wait(5.0)
del b
gc.collect()
time.sleep(0.01)  # past the time a live verdict is trusted
try:
    a.write(peer, "kv", "kv", [(0, 0, 64)]).wait(5.0)
    print("written")
except PeerLostError as exc:
    print("lost", "dropper-b" in str(exc))
a.close()
"""


def test_a_write_to_an_agent_dropped_without_close_raises_peer_lost():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _DROPPED_AGENT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["lost", "True"], out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- rings
def _publish(outbox: notify.Outbox, message: bytes) -> int:
    """What a transfer does: the sender's host stages length and message, the kernel then writes the number."""
    seq, address = outbox.stage_entry(message)
    entry = outbox.ring_address + ((seq - 1) % notify.ENTRIES) * notify.RECORD_BYTES
    assert address == entry == outbox.entry_address(seq)  # the address the copier publishes the number at
    word = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int64 * 1).from_address(entry))
    notify.fence()
    word[0] = seq
    return seq


@pytest.fixture
def live_sender():
    """The inbox path of a sender that is alive (its owner lock is held)."""
    path = shared.new_path("-sender")
    open(path, "wb").close()
    lock = shm.OwnerLock(path)
    yield path
    lock.release()
    os.unlink(path)


def test_ring_delivers_in_order_across_wrap_refuses_when_full_and_survives_a_new_sender(live_sender):
    inbox = notify.Inbox()
    try:
        first = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        second = notify.Outbox(inbox.path, "prefill-1", live_sender, 5.0)
        assert first.slot != second.slot
        sent = []
        for i in range(3 * notify.ENTRIES + 5):  # wraps the ring three times
            message = f"req-{i}".encode() * (1 + i % 7)
            _publish(first, message)
            sent.append(("prefill-0", message))
            if i % 10 == 9:
                assert inbox.drain() == sent
                sent = []
        _publish(second, b"y" * 496)
        assert inbox.drain() == [*sent, ("prefill-1", b"y" * 496)]
        for _ in range(notify.ENTRIES):
            _publish(first, b"z")
        with pytest.raises(UnavailableError, match="unread notifications"):
            first.stage(b"one too many")
        assert len(inbox.drain()) == notify.ENTRIES
        _publish(first, b"after")  # room again
        first.release()
        # The released slot still drains, then is reused by a new sender whose numbering starts at 1.
        third = notify.Outbox(inbox.path, "prefill-2", live_sender, 5.0)
        assert third.slot != first.slot  # "after" was not consumed yet
        assert inbox.drain() == [("prefill-0", b"after")]
        fourth = notify.Outbox(inbox.path, "prefill-3", live_sender, 5.0)
        assert fourth.slot == first.slot
        _publish(fourth, b"new")
        assert inbox.drain() == [("prefill-3", b"new")]
        for outbox in (second, third, fourth):
            outbox.release()
    finally:
        inbox.close()
    assert not os.path.exists(inbox.path)


def test_a_staged_record_is_not_delivered_before_its_number_is_published(live_sender):
    inbox = notify.Inbox()
    try:
        box = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        for _ in range(notify.ENTRIES + 3):  # entries reused: the staged body overwrites a consumed record
            _publish(box, b"old")
            assert inbox.drain() == [("prefill-0", b"old")]
        seq = box.stage(b"staged, not published")
        assert inbox.drain() == []
        entry = box.ring_address + ((seq - 1) % notify.ENTRIES) * notify.RECORD_BYTES
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int64 * 1).from_address(entry))[0] = seq
        assert inbox.drain() == [("prefill-0", b"staged, not published")]
        box.release()
    finally:
        inbox.close()


def test_a_sender_that_claims_a_lower_slot_again_has_its_older_records_delivered_first(live_sender):
    """A sender gives its slot back (remove_peer) and claims another (add_peer again): the lower slot is read
    after the one claimed before it, so that sender's records stay oldest first."""
    inbox = notify.Inbox()
    try:
        other = notify.Outbox(inbox.path, "other", live_sender, 5.0)
        old = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        assert (other.slot, old.slot) == (0, 1)
        _publish(old, b"n1")
        old.release()  # n1 not read yet: slot 1 stays the old claim's
        other.release()  # nothing unread: slot 0 is free again
        new = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        assert new.slot == 0
        _publish(new, b"n2")
        assert inbox.drain() == [("prefill-0", b"n1"), ("prefill-0", b"n2")]
        _publish(new, b"n3")
        assert inbox.drain() == [("prefill-0", b"n3")]
        new.release()
    finally:
        inbox.close()


def test_ring_slot_of_a_dead_sender_is_reused_once_drained(live_sender):
    inbox = notify.Inbox()
    try:
        # Senders whose inbox path does not exist count as dead: a slot is reclaimable once drained.
        boxes = [notify.Outbox(inbox.path, f"s{i}", live_sender, 5.0) for i in range(1, notify.SLOTS)]
        dead = notify.Outbox(inbox.path, "dead", "/nonexistent/0", 5.0)
        _publish(dead, b"last words")
        with pytest.raises(UnavailableError, match="no free slot"):
            notify.Outbox(inbox.path, "late", live_sender, 5.0)  # the dead sender's record is unread
        assert inbox.drain() == [("dead", b"last words")]
        assert notify.Outbox(inbox.path, "late", live_sender, 5.0).slot == dead.slot
        assert len(boxes) == notify.SLOTS - 1
    finally:
        inbox.close()


def test_adding_a_peer_whose_inbox_is_full_is_a_retryable_error_naming_the_peer(live_sender, monkeypatch):
    """Every slot of the peer's inbox held by live senders is a condition of now, not a transport that cannot
    reach the peer: ``UnavailableError`` naming it, with nothing of the inbox kept open; a slot given back makes
    the next claim succeed."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = TransferAgent("a", "ipc", timeout=2.0), TransferAgent("b", "ipc")
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        metadata, inbox = b.metadata(), b._backends["ipc"].inbox.path
        boxes = [notify.Outbox(inbox, f"s{i}", live_sender, 5.0) for i in range(notify.SLOTS)]
        with pytest.raises(UnavailableError, match="peer 'b'.*no free slot.*add the peer again") as refused:
            a.add_peer(metadata)
        assert refused.value.details["peer"] == "b" and a.peers == []
        before = _open_fds()
        for _ in range(20):  # retrying keeps nothing open
            with pytest.raises(UnavailableError):
                a.add_peer(metadata)
        assert _open_fds() == before
        boxes.pop().release()
        claimed = notify.Outbox(inbox, "next", live_sender, 5.0)  # a slot is free again
        claimed.release()
        for box in boxes:
            box.release()
    finally:
        a.close()
        b.close()


def test_adding_a_peer_whose_claim_lock_is_held_past_the_timeout_is_a_retryable_error_naming_the_peer(
    live_sender, monkeypatch
):
    """Another sender holding the claim lock of the peer's inbox (claiming a slot, or frozen while it does) past the
    agent's timeout is a condition of now, not a transport that cannot reach the peer (it was
    ``BackendNotSupportedError``): ``UnavailableError`` naming the peer; once the lock is free a claim succeeds."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = TransferAgent("a", "ipc", timeout=0.2), TransferAgent("b", "ipc")
    fd = os.open(b._backends["ipc"].inbox.claim_path, os.O_RDWR)
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        metadata = b.metadata()
        fcntl.flock(fd, fcntl.LOCK_EX)  # another sender holds the claim lock
        with pytest.raises(UnavailableError, match="peer 'b'.*claim lock.*within 0.2 s.*add the peer again") as refused:
            a.add_peer(metadata)
        assert refused.value.details["peer"] == "b" and a.peers == []
        fcntl.flock(fd, fcntl.LOCK_UN)
        notify.Outbox(b._backends["ipc"].inbox.path, "next", live_sender, 5.0).release()
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_a_peer_access_test_copy_not_done_in_time_is_a_retryable_error_not_a_fallback(live_sender, monkeypatch):
    """The test copy of ``add_peer`` waiting past the agent's timeout (the GPU busy with other work) says nothing
    about whether ipc reaches the peer: ``UnavailableError`` naming the peer, not ``BackendNotSupportedError``,
    which would make ``auto`` settle on a slower transport for a peer of this host.  Nothing of the peer is kept,
    and adding it again once the copy completes works."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = TransferAgent("a", "ipc", timeout=0.2), TransferAgent("b", "ipc")
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        backend = a._backends["ipc"]

        def stuck(link, token):
            raise CommTimeoutError(f"the peer access test copy from peer {link.peer.name!r} did not complete")

        monkeypatch.setattr(backend, "_probe", stuck)
        before = _open_fds()
        with pytest.raises(UnavailableError, match="peer 'b'.*test copy.*did not complete.*add the peer again") as info:
            a.add_peer(b.metadata())
        assert info.value.details["peer"] == "b" and a.peers == [] and backend.links == []
        assert _open_fds() == before
        # The copy completing this time (the kernel cannot launch in the test's process under the interpreter):
        # the slot and mappings of the failed try were given back, so the peer is added.
        monkeypatch.setattr(backend, "_probe", lambda link, token: None)
        assert a.add_peer(b.metadata()) == "b" and a.peer_backend("b") == "ipc"
    finally:
        a.close()
        b.close()


def test_a_test_copy_still_running_at_the_deadline_gives_the_peers_inbox_slot_back(live_sender, monkeypatch):
    """The test copy of ``add_peer`` still running at the agent's timeout (a GPU whose stream does not drain) keeps
    the peer's mappings it reads, but not the slot of the peer's inbox: the copy carries no notification, so the
    slot is given back.  Each try kept one, held by a live sender, so 32 retries filled the peer's inbox for every
    sender."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b = TransferAgent("a", "ipc", timeout=0.2), TransferAgent("b", "ipc")
    try:
        a.allocate("kv", 4096, torch.uint8)
        b.allocate("kv", 4096, torch.uint8)
        backend, inbox = a._backends["ipc"], b._backends["ipc"].inbox.path

        def stuck(link, token):  # the probe's launch never completes (the interpreter runs every launch at once)
            backend.launches += 1
            link.last = backend.launches
            backend._stalled_at = backend.completed
            raise CommTimeoutError(f"the peer access test copy from peer {link.peer.name!r} did not complete")

        monkeypatch.setattr(backend, "_probe", stuck)
        for _ in range(notify.SLOTS + 1):
            with pytest.raises(UnavailableError, match="peer 'b'.*test copy"):
                a.add_peer(b.metadata())
        notify.Outbox(inbox, "another", live_sender, 5.0).release()  # the peer's inbox still has a free slot
        backend.completed = backend.launches  # the copies completed
        monkeypatch.setattr(backend, "_probe", lambda link, token: None)
        assert a.add_peer(b.metadata()) == "b"
    finally:
        a.close()
        b.close()


def test_a_ring_slot_whose_sender_names_no_transfer_file_counts_as_dead(live_sender, tmp_path):
    """A claimer tells a live sender's slot by that sender's inbox lock, at the path the slot names: a path that is
    not a transfer file (any file some process holds a lock on) is never opened, and its slot is reused once
    drained, as a dead sender's."""
    elsewhere = tmp_path / "locked"
    elsewhere.write_bytes(b"")
    lock = shm.OwnerLock(str(elsewhere))  # looks like a live owner to a probe that opened it
    inbox = notify.Inbox()
    try:
        boxes = [notify.Outbox(inbox.path, f"s{i}", live_sender, 5.0) for i in range(1, notify.SLOTS)]
        posing = notify.Outbox(inbox.path, "posing", str(elsewhere), 5.0)
        _publish(posing, b"unread")
        with pytest.raises(UnavailableError, match="no free slot"):
            notify.Outbox(inbox.path, "late", live_sender, 5.0)  # its record is unread
        assert inbox.drain() == [("posing", b"unread")]
        assert notify.Outbox(inbox.path, "late", live_sender, 5.0).slot == posing.slot
        assert len(boxes) == notify.SLOTS - 1
    finally:
        inbox.close()
        lock.release()


def test_ring_with_every_slot_held_by_live_senders_refuses_a_new_one(live_sender):
    inbox = notify.Inbox()
    try:
        boxes = [notify.Outbox(inbox.path, f"s{i}", live_sender, 5.0) for i in range(notify.SLOTS)]
        with pytest.raises(UnavailableError, match="no free slot"):
            notify.Outbox(inbox.path, "one too many", live_sender, 5.0)
        boxes[3].release()
        assert notify.Outbox(inbox.path, "now", live_sender, 5.0).slot == boxes[3].slot
    finally:
        inbox.close()


def test_releasing_a_slot_never_waits_for_the_claim_lock(live_sender):
    """remove_peer / close give the slot back with two stores: a sender frozen while holding the claim lock
    (stopped, swapped out) cannot stall them; the slot is reused once drained."""
    inbox = notify.Inbox()
    fd = os.open(inbox.claim_path, os.O_RDWR)
    try:
        box = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        _publish(box, b"last")
        fcntl.flock(fd, fcntl.LOCK_EX)  # another sender holds the claim lock
        done = threading.Event()
        threading.Thread(target=lambda: (box.release(), done.set()), daemon=True).start()
        assert done.wait(5.0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert notify.Outbox(inbox.path, "next", live_sender, 5.0).slot != box.slot  # "last" is unread
        assert inbox.drain() == [("prefill-0", b"last")]
        assert notify.Outbox(inbox.path, "later", live_sender, 5.0).slot == box.slot
    finally:
        os.close(fd)
        inbox.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_refused_claim_keeps_no_file_or_mapping_of_the_inbox(live_sender):
    """A sender retrying a full inbox (or one whose claim lock it cannot take) leaves nothing open per try."""
    inbox = notify.Inbox()
    try:
        boxes = [notify.Outbox(inbox.path, f"s{i}", live_sender, 5.0) for i in range(notify.SLOTS)]
        before = _open_fds()
        for _ in range(300):
            with pytest.raises(UnavailableError, match="no free slot"):
                notify.Outbox(inbox.path, "retrying", live_sender, 5.0)
        with pytest.raises(BackendNotSupportedError, match="too long"):
            notify.Outbox(inbox.path, "n" * (notify.MAX_NAME + 1), live_sender, 5.0)
        assert _open_fds() == before
        for box in boxes:
            box.release()
    finally:
        inbox.close()


def test_sweeping_keeps_a_live_inboxs_claim_file_and_removes_a_dead_ones(live_sender, monkeypatch):
    """The claim file has no lock of its own: it lives as long as its inbox's owner, however old it is."""
    inbox, gone = notify.Inbox(), notify.Inbox()
    try:
        gone_paths = (gone.path, gone.claim_path)
        gone._lock.release()  # its owner died: the files stay behind
        old = os.stat(inbox.path).st_mtime - 2 * shm.STALE_AFTER_S
        for path in (inbox.path, inbox.claim_path, *gone_paths):
            os.utime(path, (old, old))
        assert shm.sweep_stale() >= 2  # (and whatever dead processes left)
        assert not any(os.path.exists(path) for path in gone_paths)
        assert os.path.exists(inbox.path) and os.path.exists(inbox.claim_path)
        box = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)  # peers can still claim a slot
        _publish(box, b"still reachable")
        assert inbox.drain() == [("prefill-0", b"still reachable")]
        box.release()
    finally:
        inbox.close()
        gone.close()
    with pytest.raises(InvalidArgumentError, match="companion role"):
        shm.companion_path(inbox.path, "lock")


_KILLED_MID_RENDEZVOUS = """
import os, sys
from sagellm_comm.ipc import SharedFileMemory
memory = SharedFileMemory()
memory.allocate(4096)
print(memory.export(next(iter(memory._maps))), flush=True)
os.kill(os.getpid(), 9)  # killed before the workspace's rendezvous unlinked or freed its file
"""


def test_the_sweep_removes_the_workspace_files_of_a_killed_process_and_keeps_a_live_ones():
    from sagellm_comm.ipc import SharedFileMemory

    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_RENDEZVOUS], capture_output=True, text=True, timeout=60)
    dead = killed.stdout.strip()
    assert os.path.basename(dead).startswith(shm.WORKSPACE_PREFIX) and os.path.exists(dead), killed.stderr
    memory = SharedFileMemory()
    live_ptr = memory.allocate(4096)
    live = memory.export(live_ptr)
    try:
        old = os.stat(live).st_mtime - 2 * shm.STALE_AFTER_S
        for path in (dead, live):
            os.utime(path, (old, old))
        assert shm.sweep_stale() >= 1
        assert not os.path.exists(dead)
        assert os.path.exists(live)  # its owner (this process) holds its lock
        memory.unlink(live_ptr)  # what a workspace does once every peer mapped it: file and lock go
        assert not os.path.exists(live)
        assert memory.tensor(live_ptr).numel() == 4096  # the mapping stays
    finally:
        memory.free(live_ptr)


@pytest.fixture
def shared_dir_at(monkeypatch, tmp_path):
    """``shared_dir()`` decided afresh with ``/dev/shm`` replaced by ``tmp_path/"shm"`` and the temporary directory
    by ``tmp_path/"tmp"``; yields (the ``/dev/shm`` stand-in, the temporary directory)."""
    candidate, fallback = tmp_path / "shm", tmp_path / "tmp"
    fallback.mkdir()
    monkeypatch.setattr(shm, "SHM_DIR", str(candidate), raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(fallback))
    shm.shared_dir.cache_clear()
    yield candidate, fallback
    shm.shared_dir.cache_clear()


@pytest.mark.parametrize("shm_state", ["missing", "not writable"])
def test_workspace_and_transfer_files_are_made_where_the_sweep_looks_when_dev_shm_is_unusable(
    shared_dir_at, monkeypatch, shm_state
):
    """Without a usable /dev/shm (missing, or a directory this process may not write in) the workspace files of
    SharedFileMemory, the transfer files and the sweep all use the temporary directory: a file left there by a
    dead owner is swept (it was made in /dev/shm, or not at all, while the sweep looked elsewhere)."""
    from sagellm_comm.ipc import SharedFileMemory
    from sagellm_comm.transfer import shared

    candidate, fallback = shared_dir_at
    if shm_state == "not writable":
        candidate.mkdir()
        access = os.access  # (root may write anywhere: the check is answered for the stand-in)
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if str(p) == str(candidate) else access(p, mode, **kw)
        )
    assert shm.shared_dir() == str(fallback)
    memory = SharedFileMemory()
    ptr = memory.allocate(4096)
    try:
        path = memory.export(ptr)
        assert os.path.dirname(path) == str(fallback)
        transfer = shared.new_path("-probe")
        assert os.path.dirname(transfer) == str(fallback)
        open(transfer, "wb").close()
        assert shared.transfer_path(transfer) == transfer  # a peer finds and accepts it there
        memory._maps[ptr][2].release()  # its owner died: the file stays behind, its lock free
        old = time.time() - 2 * shm.STALE_AFTER_S
        for stale in (path, transfer):
            os.utime(stale, (old, old))
        assert shm.sweep_stale() == 2
        assert not os.path.exists(path) and not os.path.exists(transfer)
    finally:
        memory.free(ptr)


def test_a_slot_claimed_after_a_drain_is_read_and_a_reclaimed_slot_is_read_with_its_new_name(live_sender):
    inbox = notify.Inbox()
    try:
        assert inbox.drain() == []  # no slot claimed yet
        first = notify.Outbox(inbox.path, "prefill-0", live_sender, 5.0)
        assert inbox.drain() == []  # claimed, nothing published
        _publish(first, b"a")
        _publish(first, b"b")
        assert inbox.drain() == [("prefill-0", b"a"), ("prefill-0", b"b")]
        assert inbox.drain() == []
        first.release()
        # Claimed again between two drains (no drain saw it free): numbering starts at 1 again, new name.
        second = notify.Outbox(inbox.path, "prefill-1", live_sender, 5.0)
        assert second.slot == first.slot
        _publish(second, b"c")
        assert inbox.drain() == [("prefill-1", b"c")]
        third = notify.Outbox(inbox.path, "prefill-2", live_sender, 5.0)  # another slot, later in slot order
        _publish(third, b"d")
        _publish(second, b"e")
        assert inbox.drain() == [("prefill-1", b"e"), ("prefill-2", b"d")]  # oldest first per slot
    finally:
        inbox.close()


def test_a_slot_claimed_while_it_is_read_is_read_again_with_the_new_name(live_sender, monkeypatch):
    inbox = notify.Inbox()
    try:
        box = notify.Outbox(inbox.path, "old", live_sender, 5.0)
        _publish(box, b"r1")
        m = inbox._mapped
        base = m.slot_word(box.slot, 0)
        fences = []

        def racing_fence():
            # The drain's fences (every one taken, as on a CPU that may reorder loads): two as it takes the slot
            # in, one before record 1 is read, then one before the token is read again; a new sender's claim
            # lands just before that last one (simulated: its name, a new token and the claim count; its
            # record 1 is the one in place).
            fences.append(1)
            if len(fences) == 4:
                at = notify.PAGE + box.slot * notify.SLOT_BYTES + notify.NAME_AT
                m.bytes[at : at + 3] = np.frombuffer(b"new", dtype=np.uint8)
                m.words[base + notify.NAME_LEN] = 3
                m.words[base + notify.TOKEN] += 1
                m.words[notify.CLAIMS] += 1

        monkeypatch.setattr(notify, "ORDERED", False)
        monkeypatch.setattr(notify, "fence", racing_fence)
        assert inbox.drain() == []  # the pass is discarded: nothing consumed
        assert int(m.words[base + notify.CONSUMED]) == 0
        assert inbox.drain() == [("new", b"r1")]
        assert inbox.drain() == []
        assert len(fences) == 4 + 4  # the second pass took the slot in again and read the record
    finally:
        inbox.close()


@pytest.mark.parametrize("length", [-1, "near the file's end", -(1 << 40), notify.MAX_MESSAGE_BYTES + 1, 1 << 40])
def test_a_record_with_a_corrupt_length_reads_within_the_record(live_sender, length):
    # The length word is the sender's to write: a wrong one gives a message cut to the record or an empty one,
    # never bytes from elsewhere in the file.
    inbox = notify.Inbox()
    try:
        box = notify.Outbox(inbox.path, "s", live_sender, 5.0)
        message = bytes(range(1, 101))
        seq = _publish(box, message)
        at = notify._Mapped.record_offset(box.slot, seq)
        if length == "near the file's end":  # a slice end that counts from the end of the mapping
            length = -(at + 16) - 100
        inbox._mapped.words[at // 8 + 1] = length
        got = inbox.drain()
        expected = b"" if length < 0 else message + bytes(notify.MAX_MESSAGE_BYTES - len(message))
        assert got == [("s", expected)]
        _publish(box, b"next")  # the ring goes on
        assert inbox.drain() == [("s", b"next")]
    finally:
        inbox.close()


@pytest.mark.parametrize("length", [notify.MAX_NAME + 1, 1 << 40])
def test_a_slot_with_a_corrupt_name_length_reads_the_name_within_its_field(live_sender, length):
    # The name length is the sender's to write: a wrong one gives a name cut to its field, never the bytes of the
    # sender's inbox path that follow it in the slot header.
    inbox = notify.Inbox()
    try:
        box = notify.Outbox(inbox.path, "s", live_sender, 5.0)
        inbox._mapped.words[notify._Mapped.slot_word(box.slot, notify.NAME_LEN)] = length
        _publish(box, b"m")
        ((name, message),) = inbox.drain()
        assert message == b"m" and name == "s" + "\0" * (notify.MAX_NAME - 1)
    finally:
        inbox.close()


def test_reading_a_ring_never_runs_code_from_the_file():
    # A name or message is data: drain returns bytes and str, nothing is evaluated.
    inbox = notify.Inbox()
    try:
        box = notify.Outbox(inbox.path, "__import__('os').system('false')", "/nonexistent/x", 5.0)
        _publish(box, textwrap.dedent("print('x')").encode())
        assert inbox.drain() == [("__import__('os').system('false')", b"print('x')")]
    finally:
        inbox.close()


# ---------------------------------------------------------------------------------------------- nixl handles
class _StuckHandle:
    """A NIXL transfer handle whose first ``refusals`` releases fail (a transfer NIXL cannot cancel yet)."""

    def __init__(self, refusals: float):
        self.refusals, self.released = refusals, False

    def release(self) -> None:
        if self.refusals > 0:
            self.refusals -= 1
            raise RuntimeError("nixlInProgError: transfer in progress")
        self.released = True


def _bare_nixl_backend(agent=None, timeout_s: float = 30.0):
    """A NixlBackend's bookkeeping over a stand-in NIXL agent (no NIXL behind it)."""
    from sagellm_comm.transfer import nixl

    backend = object.__new__(nixl.NixlBackend)
    backend.agent, backend.leaked, backend.kept, backend._retry_at = agent, [], [], nixl.RETRY_RELEASES_FROM
    backend.unsettled, backend.closing, backend.parked = [], False, {}
    backend.registered, backend.addresses = {}, {}
    backend.pending, backend._reap_at = {}, nixl.REAP_FROM
    backend.context = types.SimpleNamespace(name="a", timeout_s=timeout_s)
    backend.note_transport = lambda link: None
    return backend


@pytest.mark.parametrize("stuck_every", [0, 100], ids=["all-later-released", "one-in-100-never"])
def test_nixl_handles_it_could_not_release_are_retried_while_the_agent_runs(stuck_every):
    """Aborted transfers whose handles NIXL refuses to release at first are released again while the agent
    runs: what is kept is bounded by what NIXL still refuses, not by how many aborts there were."""
    from sagellm_comm.transfer import nixl

    backend = _bare_nixl_backend()
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    handles, longest = [], 0
    for i in range(10_000):
        never = stuck_every and i % stuck_every == 0
        handles.append(_StuckHandle(float("inf") if never else 1))
        nixl.NixlRequest(backend, link, handles[-1], "PROC", None).abort()
        longest = max(longest, len(backend.leaked))
    stuck = 10_000 // stuck_every if stuck_every else 0
    assert longest <= 2 * stuck + nixl.RETRY_RELEASES_FROM
    assert {id(h) for h in handles if not h.released} == {id(h) for h, _ in backend.leaked}  # none dropped unreleased


def test_a_nixl_prepare_whose_remote_list_is_refused_releases_the_local_list_it_made():
    from sagellm_comm.transfer import nixl

    class NixlRefusal(Exception):
        __module__ = "nixl_cu13._api"  # what NIXL's own errors are told apart by

    class DescList:
        released = False

        def release(self) -> None:
            self.released = True

    made = []

    class Agent:
        def prep_xfer_dlist(self, agent_name, descs, memory):
            if agent_name != "NIXL_INIT_AGENT":
                raise NixlRefusal("NIXL_ERR_NOT_FOUND")
            made.append(DescList())
            return made[-1]

    backend = _bare_nixl_backend(Agent())
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1), nixl_name="peer")
    link.regions["kv"] = (1 << 20, 4096, 0)
    local = d.make_region("kv", torch.zeros(1024))
    layout = d.make_layout(local.info, F32, 256, "peer 'peer'")
    with pytest.raises(TransferError, match="prepare descriptor lists with peer 'peer'"):
        backend.prepare(link, local, F32, layout)
    assert len(made) == 1 and made[0].released


def test_a_nixl_transfer_that_fails_to_start_reports_its_error_and_keeps_a_handle_it_cannot_release():
    from sagellm_comm.transfer import nixl

    class Agent:
        def transfer(self, handle):
            raise RuntimeError("posting refused")

    backend = _bare_nixl_backend(Agent())
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    handle = _StuckHandle(1)
    with pytest.raises(RuntimeError, match="posting refused"):
        backend._start(link, handle, "write", None)
    assert backend.leaked == [(handle, None)]


def test_a_nixl_transfer_refused_by_its_post_is_a_transfer_error_naming_the_peer():
    """NIXL answering a post with status ERR: ``TransferError`` naming the peer (``details["peer"]``), as every
    other failure of a transfer does, and the handle NIXL made is released."""
    from sagellm_comm.transfer import nixl

    class Agent:
        def transfer(self, handle):
            return "ERR"

    backend = _bare_nixl_backend(Agent())
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    posted = _StuckHandle(0)
    with pytest.raises(TransferError, match="peer 'peer'.*status ERR") as refused:
        backend._start(link, posted, "write", None)
    assert refused.value.details["peer"] == "peer" and posted.released and not backend.pending


@pytest.mark.parametrize("status", ["DONE", "PROC"])
def test_a_nixl_transfer_finished_by_its_post_is_released_at_once_and_its_handle_never_polls(status):
    """NIXL completes small transfers inside the post: such a request gives its handle back there and then, and
    the agent's handle is born done (its wait returns without polling); one still in progress is polled."""
    from sagellm_comm.transfer import nixl
    from sagellm_comm.transfer.handle import TransferHandle

    polls = []

    class Agent:
        state = "DONE"

        def transfer(self, handle):
            return status

        def check_xfer_state(self, handle):
            polls.append(handle)
            return self.state

    class Owner:  # what a TransferHandle reads of its agent
        lock, timeout = threading.RLock(), 1.0

    backend = _bare_nixl_backend(Agent())
    noted = []
    backend.note_transport = noted.append
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    posted = _StuckHandle(0)
    request = backend._start(link, posted, "write", None)
    handle = TransferHandle(Owner(), "peer", "write", "nixl", request, 4096, 1)
    assert (posted.released, request.complete, handle.state) == (
        (True, True, "done") if status == "DONE" else (False, False, "pending")
    )
    handle.wait(timeout=1.0)
    assert handle.state == "done" and posted.released and noted == [link]
    assert polls == ([] if status == "DONE" else [posted])
    # The peer removed afterwards: a request in flight goes on and reports what NIXL does with it (a removal
    # cancelling it would race its notification): done once NIXL finishes it, lost when NIXL fails it.
    if status == "PROC":
        for state, outcome in (("DONE", "done"), ("ERR", "failed")):
            backend.agent.state = "PROC"
            link.removed = False
            request = backend._start(link, _StuckHandle(0), "write", None)
            handle = TransferHandle(Owner(), "peer", "write", "nixl", request, 4096, 1)
            link.removed = True
            assert not handle.done() and request.handle is not None and list(backend.pending) == [request]
            backend.agent.state = state
            if outcome == "done":
                handle.wait(timeout=1.0)
            else:
                with pytest.raises(PeerLostError, match="failed"):
                    handle.wait(timeout=1.0)
            assert handle.state == outcome and request.handle is None and not backend.pending


def test_a_nixl_failure_to_deliver_notifications_is_a_typed_error():
    """NIXL's failure to read its notifications escaped as NIXL's own exception from ``notifications()``; it is a
    TransferError with NIXL's error name, as every other NIXL failure is."""

    class Agent:
        def get_new_notifs(self):
            raise _NixlAgentError("nixlBackendError: NIXL_ERR_BACKEND")

    backend = _bare_nixl_backend(Agent())
    with pytest.raises(TransferError, match="NIXL failed to read notifications.*NIXL_ERR_BACKEND") as info:
        backend.notifications()
    assert info.value.details == {"nixl_error": "_NixlAgentError"}


def test_nixl_notifications_from_a_sender_name_that_is_not_utf8_are_delivered_with_the_others():
    """NIXL hands over a sender's name as it came from the wire: one that is not UTF-8 is delivered with its
    undecodable bytes replaced (as an ipc ring's name is), not an error that drops every notification NIXL had
    already handed over in that call."""

    class Agent:
        def get_new_notifs(self):
            return {b"prefill-\xff": [b"req-1"], b"decode-0": [b"req-2", b"req-3"], "prefill-1": [b"req-4"]}

    backend = _bare_nixl_backend(Agent())
    assert backend.notifications() == [
        ("prefill-\ufffd", b"req-1"),
        ("decode-0", b"req-2"),
        ("decode-0", b"req-3"),
        ("prefill-1", b"req-4"),
    ]


def test_nixl_requests_whose_handles_were_dropped_complete_and_are_reaped():
    """The backend keeps every request in flight (NIXL cancels a transfer whose handle is freed): one whose
    caller dropped its handle is not cancelled, and the sweep releases it once finished; one to a removed peer
    still in flight past the agent's timeout is cancelled; at close every request in flight is cancelled (a
    handle NIXL cannot release yet goes to those released at close) and a poll says it was lost."""
    import gc

    from sagellm_comm.transfer import nixl

    states = {}

    class Agent:
        def transfer(self, handle):
            return "PROC"

        def check_xfer_state(self, handle):
            return states.get(id(handle), "PROC")

    backend = _bare_nixl_backend(Agent(), timeout_s=0.05)
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    handles = [_StuckHandle(0) for _ in range(nixl.REAP_FROM - 1)]
    for h in handles:
        backend._start(link, h, "write", None)  # the caller drops each request at once
    gc.collect()
    assert len(backend.pending) == nixl.REAP_FROM - 1 and not any(h.released for h in handles)  # not cancelled
    for h in handles[:40]:
        states[id(h)] = "DONE"
    backend._start(link, _StuckHandle(0), "write", None)  # the 64th in flight: a sweep
    assert all(h.released for h in handles[:40]) and not any(h.released for h in handles[40:])
    assert len(backend.pending) == nixl.REAP_FROM - 40 and backend._reap_at == nixl.REAP_FROM
    # Each post checks the two oldest in flight: a finished one nobody polls is released (its notification sent).
    oldest = list(backend.pending)[:2]
    for request in oldest:
        states[id(request.handle)] = "DONE"
    backend._start(link, _StuckHandle(0), "write", None)
    assert all(r.handle is None and r.finished for r in oldest) and not set(oldest) & set(backend.pending)
    link.removed = True
    time.sleep(0.1)
    backend.reap()  # removed peer, in flight past the timeout: cancelled
    assert not backend.pending and all(h.released for h in handles)
    # At close: cancelled; a handle NIXL will not release yet is kept for close's own release.
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    stuck = _StuckHandle(1)
    request = backend._start(link, stuck, "write", None)
    for pending in list(backend.pending):
        pending.cancel_at_close()
    assert backend.leaked == [(stuck, None)] and request.handle is None and not backend.pending
    with pytest.raises(PeerLostError, match="closed while the transfer"):
        request.poll()


def test_deregistering_a_region_nixl_moves_waits_for_its_transfers_and_keeps_what_a_cancel_may_still_write():
    """NIXL reads and writes a region's memory until its transfers over it end, and its cancel does not stop bytes
    already on the wire: deregistering the region lets its transfers finish (the agent's timeout) and then hands
    the memory back; a transfer cancelled before it finished (at the timeout here, or earlier at a handle's
    deadline) keeps the region registered until close and referenced while the backend lives, as does one NIXL
    will not release; requests over other regions are left alone."""
    import threading

    from sagellm_comm.transfer import nixl

    states, deregistered = {}, []  # handle -> state (held here: an id could be reused once a handle is freed)

    class Agent:
        def transfer(self, handle):
            return "PROC"

        def check_xfer_state(self, handle):
            return states.get(handle, "PROC")

        def deregister_memory(self, descs):
            deregistered.append(descs)

    backend = _bare_nixl_backend(Agent(), timeout_s=0.3)
    link = nixl.NixlLink(AgentMetadata("peer", "incarnation", "host", "boot", 1))
    kv, hung_region, other, stuck_region = (types.SimpleNamespace(name=n) for n in ("kv", "hung", "other", "stuck"))
    for region in (kv, hung_region, other, stuck_region):
        backend.registered[region.name] = f"descs-{region.name}"
    finishing = backend._start(link, _StuckHandle(0), "read", kv)
    elsewhere = backend._start(link, _StuckHandle(0), "write", other)
    # Finishes while the deregistration waits: then the memory goes.
    threading.Timer(0.05, lambda: states.update({finishing.handle: "DONE"})).start()
    began = time.monotonic()
    backend.deregister(kv)
    assert time.monotonic() - began < 0.25 and finishing.poll() and deregistered == ["descs-kv"]
    assert not backend.kept
    # Never finishes: cancelled at the timeout, and kept (its bytes may still land).
    hung = backend._start(link, _StuckHandle(0), "write", hung_region)
    began = time.monotonic()
    backend.deregister(hung_region)
    assert 0.3 <= time.monotonic() - began < 1.0 and deregistered == ["descs-kv"]
    assert backend.kept == [(hung_region, "descs-hung")]
    with pytest.raises(TransferError, match="region 'hung' was deregistered"):
        hung.poll()
    # Cancelled earlier (a handle's deadline) over a region registered again later: that region is kept too.
    backend.registered["kv"] = "descs-kv"
    early = backend._start(link, _StuckHandle(0), "read", kv)
    early.abort()
    backend.deregister(kv)
    assert deregistered == ["descs-kv"] and backend.kept[-1] == (kv, "descs-kv")
    # Never finishes, and NIXL will not release it: kept as well.
    held = backend._start(link, _StuckHandle(float("inf")), "write", stuck_region)
    backend.deregister(stuck_region)
    assert backend.kept[-1] == (stuck_region, "descs-stuck") and held.handle is None
    assert list(backend.pending) == [elsewhere]
    backend.leaked[0][0].refusals = 0  # NIXL lets go: close releases it, then every kept registration
    backend.links, backend.parked = [], {}
    backend.ucx = types.SimpleNamespace(unwatch=lambda name: None)
    backend.registered.pop("other")
    backend.close()
    assert deregistered == ["descs-kv", "descs-hung", "descs-kv", "descs-stuck"] and not backend.leaked
    assert [region for region, descs in backend.kept] == [hung_region, kv, stuck_region]  # still referenced
    assert all(descs is None for _, descs in backend.kept)


def test_a_region_nixl_refuses_to_deregister_is_a_typed_error_and_stays_registered_and_referenced_until_close():
    """NIXL's refusal to deregister a region escaped as NIXL's own exception, and the registration was forgotten:
    never deregistered again, with the memory free to go once the agent let the region go.  Now it is a
    TransferError naming the region, the region is kept (registered, referenced), and close deregisters it."""
    deregistered = []

    class Agent:
        refuse = True

        def deregister_memory(self, descs):
            if self.refuse:
                self.refuse = False
                raise _NixlAgentError("nixlNotFoundError: NIXL_ERR_NOT_FOUND")
            deregistered.append(descs)

    backend = _bare_nixl_backend(Agent())
    kv = types.SimpleNamespace(name="kv")
    backend.registered["kv"], backend.addresses["kv"] = "descs-kv", [4096, 4096, 0]
    with pytest.raises(TransferError, match="NIXL failed to deregister region 'kv'.*nixlNotFoundError") as info:
        backend.deregister(kv)
    assert info.value.details == {"region": "kv", "nixl_error": "_NixlAgentError"}
    assert backend.kept == [(kv, "descs-kv")] and "kv" not in backend.addresses and deregistered == []
    backend.links, backend.parked = [], {}
    backend.ucx = types.SimpleNamespace(unwatch=lambda name: None)
    backend.close()
    assert deregistered == ["descs-kv"] and backend.kept == [(kv, None)]  # deregistered, still referenced


def test_nixl_parked_peers_with_transfers_in_flight_stay_loaded_and_a_restart_cancels_the_old_ones():
    """Unloading a NIXL remote agent fails its transfers in flight (notification included): a removed peer past
    the parked limit stays loaded while its requests run and is unloaded by the sweep after; a restarted peer's
    old requests are cancelled with ``PeerLostError`` before its old agent is unloaded."""
    from collections import OrderedDict

    from sagellm_comm.transfer import nixl

    unloaded = []

    class Agent:
        def transfer(self, handle):
            return "PROC"

        def check_xfer_state(self, handle):
            return "PROC" if not handle.released else "DONE"

        def remove_remote_agent(self, name):
            unloaded.append(name)

    backend = _bare_nixl_backend(Agent())
    backend.parked, backend.links = OrderedDict(), []
    old = nixl.NixlLink(AgentMetadata("busy", "one", "host", "boot", 1), nixl_name="busy")
    request = backend._start(old, _StuckHandle(0), "write", None)
    backend.disconnect(old)
    for i in range(nixl.PARKED_PEERS):
        backend.disconnect(nixl.NixlLink(AgentMetadata(f"p{i}", "one", "host", "boot", 1), nixl_name=f"p{i}"))
    assert "busy" in backend.parked and unloaded == ["p0"]  # the oldest without requests went instead
    request.handle.released = True  # its transfer finished: the sweep releases it
    backend.reap()
    assert request.finished and not backend.pending and len(backend.parked) == nixl.PARKED_PEERS
    backend.disconnect(nixl.NixlLink(AgentMetadata("late", "one", "host", "boot", 1), nixl_name="late"))
    assert "busy" not in backend.parked and unloaded == ["p0", "busy"]  # the oldest again, now idle
    # A restart: the old incarnation's request is cancelled (PeerLostError), then its agent unloaded.
    gone = nixl.NixlLink(AgentMetadata("p5", "one", "host", "boot", 1), nixl_name="p5")
    gone.removed = True
    stale = backend._start(gone, _StuckHandle(0), "write", None)
    backend._give_up_on("p5", "peer 'p5' restarted (a new incarnation joined)")
    with pytest.raises(PeerLostError, match="restarted"):
        stale.poll()
    assert not backend.pending


class _NixlAgentError(Exception):
    """What the NIXL bindings raise (an exception of a NIXL module)."""


_NixlAgentError.__module__ = "nixl_cu13._bindings"


class _RemoteAgents:
    """A NIXL agent's remote-agent table: loads, in-place updates, unloads; connecting fails while ``refuse``."""

    def __init__(self):
        self.loaded: dict[str, bytes] = {}
        self.refuse = None  # None, "load" or "connect"

    def add_remote_agent(self, metadata: bytes) -> bytes:
        if self.refuse == "load":
            raise _NixlAgentError("nixlInvalidParamError: bad metadata")
        self.loaded["b"] = metadata
        return b"b"

    def make_connection(self, name: str) -> None:
        if self.refuse == "connect":
            raise _NixlAgentError("nixlBackendError: no route")

    def remove_remote_agent(self, name: str) -> None:
        del self.loaded[name]


@pytest.mark.parametrize("refuse", ["load", "connect"])
def test_a_nixl_peer_whose_new_metadata_fails_stays_loaded_for_its_link_or_parked_and_unloads_at_close(refuse):
    """A refused update of a loaded remote agent (a live link's, or a parked one's) neither unloads it under the
    link nor leaves it loaded and untracked: the link keeps working, a parked agent is unloaded at close."""
    from collections import OrderedDict

    from sagellm_comm.transfer import nixl
    from sagellm_comm.transfer.metadata import b64

    def meta(incarnation: str, agent: bytes):
        m = AgentMetadata("b", incarnation, "host", "boot", 1)
        m.regions = {"kv": F32}
        m.transports = {"nixl": {"agent": b64(agent), "regions": {"kv": [4096, 4096, 0]}}}
        return m

    backend = object.__new__(nixl.NixlBackend)
    backend.agent, backend.links, backend.parked = _RemoteAgents(), [], OrderedDict()
    backend.registered, backend.leaked, backend.pending, backend.kept = {}, [], {}, []
    backend.unsettled, backend.closing = [], False
    backend.ucx = types.SimpleNamespace(unwatch=lambda name: None)
    backend.context = types.SimpleNamespace(name="a")
    link = backend.connect(meta("one", b"v1"))
    backend.agent.refuse = refuse
    # Live: the same agent's new metadata refused while the old link stands.
    with pytest.raises(BackendNotSupportedError, match="NIXL cannot"):
        backend.connect(meta("one", b"v2"))
    assert "b" in backend.agent.loaded and backend.links == [link]
    # Parked: removed, then the same agent's new metadata refused.
    backend.disconnect(link)
    with pytest.raises(BackendNotSupportedError, match="NIXL cannot"):
        backend.connect(meta("one", b"v3"))
    assert list(backend.parked) == ["b"] and "b" in backend.agent.loaded
    # Never loaded before (a restarted peer is unloaded first): a failed connection leaves nothing loaded.
    with pytest.raises(BackendNotSupportedError, match="NIXL cannot"):
        backend.connect(meta("two", b"v4"))
    assert not backend.parked and backend.agent.loaded == {}
    backend.agent.refuse = None
    backend.disconnect(backend.connect(meta("two", b"v5")))
    agents = backend.agent
    backend.close()
    assert agents.loaded == {}


def test_an_agent_call_runs_on_the_agents_gpu_and_restores_the_threads_device(monkeypatch):
    """The agent's calls make its CUDA device current in the calling thread for their duration (nested calls
    switch once), restore the thread's own after, also when the call raises, and release the lock; an agent
    without a GPU touches no CUDA state."""
    current = [0]
    switched = []

    def set_device(index):
        switched.append(index)
        current[0] = index

    def refuse():
        raise AssertionError("an agent without a GPU asked for the current device")

    monkeypatch.setattr(agent_module, "_current_device", refuse)
    call = agent_module._AgentCall(threading.RLock())
    with call:
        pass
    monkeypatch.setattr(agent_module, "_current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    call.device_index = 1
    with call:
        assert current[0] == 1
        with call:  # a nested call of the same thread: already there
            assert current[0] == 1
        assert current[0] == 1
    assert current[0] == 0 and switched == [1, 0]
    with pytest.raises(KeyError), call:
        raise KeyError("inside the call")
    assert current[0] == 0 and switched == [1, 0, 1, 0]
    taken = []

    def take():
        if call.lock.acquire(timeout=5):
            taken.append(True)
            call.lock.release()

    other = threading.Thread(target=take)  # the lock was released, also after the failed call
    other.start()
    other.join(10)
    assert taken == [True]
    current[0] = 1  # the thread is on the agent's GPU already: nothing to switch
    with call:
        pass
    assert switched == [1, 0, 1, 0]


def test_an_inbox_not_closed_is_removed_at_exit_but_not_by_a_forked_child():
    """An interpreter that exits without closing its inbox removes the inbox's files; a child forked from it
    that exits normally leaves them to their owner."""
    script = textwrap.dedent(
        """
        import os, sys
        from sagellm_comm.transfer.notify import Inbox
        inbox = Inbox()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit of the child: its inherited finalizer must not remove the parent's files
        os.waitpid(pid, 0)
        print(inbox.path, inbox.claim_path, os.path.exists(inbox.path), os.path.exists(inbox.claim_path))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    path, claim, exists, claim_exists = done.stdout.split()
    assert (exists, claim_exists) == ("True", "True"), done.stdout  # the child left them
    assert not os.path.exists(path) and not os.path.exists(claim), "the inbox's files outlived its process"


_KEPT: list = []


def _own_inbox(queue) -> None:
    from sagellm_comm.transfer.notify import Inbox

    inbox = Inbox()
    _KEPT.append(inbox)  # alive until the child exits, never closed
    queue.put((inbox.path, inbox.claim_path))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_inbox_a_multiprocessing_child_left_open_is_removed_when_it_exits(method):
    import multiprocessing

    context = multiprocessing.get_context(method)
    queue = context.Queue()
    child = context.Process(target=_own_inbox, args=(queue,))
    child.start()
    paths = queue.get(timeout=120)
    child.join(120)
    assert child.exitcode == 0 and not any(os.path.exists(p) for p in paths), paths


@pytest.mark.parametrize("retried_by", ["notifications", "add_peer", "close"])
def test_a_link_removed_with_a_notifying_launch_in_flight_gives_its_slot_back_once_the_launch_completed(
    live_sender, monkeypatch, retried_by
):
    """``remove_peer`` meets a notifying launch still running at the agent's timeout (a GPU whose stream does not
    drain): the link's slot of the peer's inbox and the peer's memory it holds stay while it may still publish, and
    a later call releases them once it completed (they were kept for the life of the process, ``close()``
    included)."""
    from sagellm_comm.transfer import TransferAgent

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, b, c = TransferAgent("a", "ipc", timeout=0.2), TransferAgent("b", "ipc"), TransferAgent("c", "ipc")
    held = []
    try:
        for agent in (a, b, c):
            agent.allocate("kv", 4096, torch.uint8)
        backend, inbox = a._backends["ipc"], b._backends["ipc"].inbox.path
        monkeypatch.setattr(backend, "_probe", lambda link, token: None)  # no kernel runs in this process
        a.add_peer(b.metadata())
        link = a._peers["b"].link
        backend.launches += 1  # a notifying launch to b that has not completed (the interpreter runs them at once)
        link.last = link.notify_last = backend.launches
        a.remove_peer("b")
        assert link.outbox is not None and link.held, "released under a launch that may still publish"
        backend.completed = backend.launches  # the launch completed
        if retried_by == "notifications":
            a.notifications()
        elif retried_by == "add_peer":
            a.add_peer(c.metadata())
        else:
            a.close()
        assert link.outbox is None and not link.held
        for k in range(notify.SLOTS):  # every slot of b's inbox is free again
            held.append(notify.Outbox(inbox, f"other-{k}", live_sender, 5.0))
    finally:
        for outbox in held:
            outbox.release()
        for agent in (a, b, c):
            agent.close()


def test_default_agent_names_of_one_process_are_unique() -> None:
    """A process that connects several groups gives each agent its own name (the first keeps the plain form)."""
    from sagellm_comm.transfer import world

    names = [world.default_agent_name(0) for _ in range(3)] + [world.default_agent_name(1)]
    assert len(set(names)) == len(names), names
    assert all(n.split("-pid")[1].startswith(f"{os.getpid()}-rank") for n in names), names


def test_a_default_agent_name_of_a_long_host_name_is_one_an_agent_takes(monkeypatch) -> None:
    """SAGELLM_COMM_HOSTNAME takes 255 characters; from about 100 the default name passed the 128 characters an
    agent's name may take, and ``backend.transfer_agent()`` failed on every rank over a name nobody gave."""
    from sagellm_comm.transfer import TransferAgent, world

    names = {}
    for host in ("n" * 90, "node-" + "x" * 250, "x" * 200 + "-1", "x" * 200 + "-2"):
        monkeypatch.setenv("SAGELLM_COMM_HOSTNAME", host)
        names[host] = [world.default_agent_name(rank) for rank in (0, 7, 7)]
    registry.register_transfer_backend("device-test", _RecordingBackend)
    try:
        for host, given in names.items():
            assert len(set(given)) == 3 and all(name.startswith(host[:48]) for name in given), given
            assert all(f"-pid{os.getpid()}-rank" in name for name in given) and "-rank7-" in given[2], given
            for name in given:
                TransferAgent(name, "device-test").close()
    finally:
        registry.unregister_transfer_backend("device-test")
    assert names["n" * 90][0].startswith("n" * 90 + "-pid")  # short enough: as it was
    assert names["x" * 200 + "-1"][0].split("-pid")[0] != names["x" * 200 + "-2"][0].split("-pid")[0]


@pytest.mark.parametrize("move", ["share_memory_", "resize_", "set_"])
def test_a_region_whose_tensor_moved_after_register_is_refused_before_any_byte_moves(move):
    """``share_memory_()`` (what torch.multiprocessing does to a tensor it sends), ``resize_()`` and ``set_()`` give
    a registered tensor other memory, and the memory the transports registered may be freed: every post over the
    region is refused naming it, nothing moves, and ``deregister`` then ``register`` of the tensor make it usable
    again."""
    from sagellm_comm.transfer import TransferAgent
    from sagellm_comm.transfer.nixl import nixl_available

    if not nixl_available():
        pytest.skip("needs NIXL (pip install -e '.[transfer]'; the test extra has it)")
    a, b = TransferAgent("moved-a", "nixl"), TransferAgent("moved-b", "nixl")
    try:
        kv = torch.arange(4096, dtype=torch.int64).to(torch.uint8)
        a.register("kv", kv)
        dst = b.allocate("kv", 4096, torch.uint8)
        peer = a.add_peer(b.metadata())
        b.add_peer(a.metadata())
        pool = a.prepare(peer, "kv", "kv", 1024)
        a.write(peer, "kv", "kv", [(0, 0, 1024)]).wait(30)
        assert torch.equal(dst[:1024], kv[:1024])
        if move == "share_memory_":
            kv.share_memory_()
        elif move == "resize_":
            kv.resize_(1 << 20)
        else:
            kv.set_(torch.zeros(4096, dtype=torch.uint8))
        before = dst.clone()
        posts = {
            "one block": lambda: a.write(peer, "kv", "kv", [(0, 1024, 512)], notify=b"x"),
            "blocks": lambda: a.write(peer, "kv", "kv", [(0, 1024, 8), (8, 2048, 8)]),
            "read": lambda: a.read(peer, "kv", "kv", [(0, 0, 64)]),
            "array": lambda: a.write(peer, "kv", "kv", np.array([[0, 1024, 64], [64, 2048, 64]])),
            "prepare": lambda: a.prepare(peer, "kv", "kv", 1024),
            "one id": lambda: pool.write([0], [1]),
            "ids": lambda: pool.write([0, 1], [2, 3]),
        }
        for what, post in posts.items():
            with pytest.raises(InvalidArgumentError, match="region 'kv': its tensor moved") as info:
                post()
            assert info.value.details["region"] == "kv", what
        assert torch.equal(dst, before) and b.notifications() == []
        a.deregister("kv")
        a.register("kv", kv)
        peer = a.add_peer(b.metadata())  # the same peer; b learns the new region from a's new metadata
        b.add_peer(a.metadata())
        a.write(peer, "kv", "kv", [(0, 2048, 1024)]).wait(30)
        assert torch.equal(dst[2048:3072], kv[:1024])
    finally:
        a.close()
        b.close()
