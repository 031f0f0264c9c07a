"""Topology: CPU-only here, from an env override, from a fake NVML, and hostnames over a group."""

from __future__ import annotations

import json
import socket
import sys
import types

import pytest
from conftest import HAS_CUDA, run_ranks

from sagellm_comm import CommBackend, InvalidArgumentError, Topology, UnavailableError
from sagellm_comm.topology import ENV_VAR, nvml_peer_access


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_cpu_only_machine_gives_honest_empty_topology() -> None:
    topo = Topology.discover()
    assert topo.source == "cpu" and topo.gpus == [] and topo.links == []
    assert topo.hostname == socket.gethostname()
    assert not topo.all_pairs_p2p()  # no GPU: no peer to reach
    assert not topo.all_pairs_p2p([], nvlink_only=True)
    assert "no GPU visible: CPU-only" in topo.format_matrix()
    with pytest.raises(UnavailableError, match="discover\\(group=...\\)"):
        topo.same_node([0])


def test_env_override_eight_nvlink_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, json.dumps({"num_gpus": 8, "gpu_name": "NVIDIA H100 80GB HBM3", "link": "NV18"}))
    topo = Topology.discover()
    assert topo.source == "env" and topo.num_gpus == 8
    assert topo.link(0, 7) == "NV18" and topo.nvlink_count(3, 4) == 18 and topo.link(5, 5) == "X"
    assert topo.all_pairs_p2p(nvlink_only=True)
    assert topo.all_pairs_p2p([3]) and not topo.all_pairs_p2p([])  # one GPU needs no peer; none has none
    with pytest.raises(InvalidArgumentError, match="GPU index 8 is outside"):
        topo.all_pairs_p2p([8])
    lines = topo.format_matrix().splitlines()
    assert lines[1].split() == [f"GPU{i}" for i in range(8)] + ["Name"]
    assert lines[2].split()[:9] == ["GPU0", "X"] + ["NV18"] * 7
    assert lines[9].split()[:9] == ["GPU7"] + ["NV18"] * 7 + ["X"]
    assert "peer access" in lines[11] and lines[13].split() == ["GPU0", "X"] + ["OK"] * 7
    assert Topology.from_dict(topo.to_dict(), "env") == topo


def test_env_override_file_with_mixed_links_and_hosts(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = [
        ["X", "NV4", "SYS", "SYS"],
        ["NV4", "X", "SYS", "SYS"],
        ["SYS", "SYS", "X", "PIX"],
        ["SYS", "SYS", "PIX", "X"],
    ]
    peer = [[False, True, False, False], [True, False, False, False], [False] * 4, [False] * 4]
    spec = {"links": links, "peer_access": peer, "gpus": ["A100"] * 4, "rank_hostnames": ["n0", "n0", "n1", "n1"]}
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(spec))
    monkeypatch.setenv(ENV_VAR, str(path))
    topo = Topology.discover()
    assert topo.link(2, 3) == "PIX" and topo.nvlink_count(2, 3) == 0
    assert topo.all_pairs_p2p([0, 1]) and not topo.all_pairs_p2p() and not topo.all_pairs_p2p([2, 3])
    assert topo.same_node([0, 1]) and not topo.same_node([1, 2]) and not topo.same_node()
    assert topo.hosts() == {"n0": [0, 1], "n1": [2, 3]}
    assert "ranks on n1: 2, 3" in topo.format_matrix()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("{not json", "not valid JSON"),
        ("/no/such/topology.json", "neither a JSON object nor a readable file"),
        ("[1, 2]", "neither a JSON object"),
        (json.dumps({"num_gpus": 2, "links": [["X", "NVLINK"], ["NVLINK", "X"]]}), "links[0][1] = 'NVLINK'"),
        (json.dumps({"num_gpus": 2, "links": [["X"]]}), "2x2 matrix"),
        (json.dumps({"num_gpus": "2"}), "bad 'gpus'/'num_gpus' entry"),
        # were taken: no GPU, one GPU, one GPU per character, and a hang building a 10^16-entry matrix
        (json.dumps({"num_gpu": 8, "link": "NV18"}), "unknown key(s) ['num_gpu']"),
        (json.dumps({"num_gpus": -1}), "'num_gpus' must be an integer in 0..1024, got -1"),
        (json.dumps({"num_gpus": True}), "'num_gpus' must be an integer in 0..1024, got True"),
        (json.dumps({"gpus": "H100"}), "'gpus' must be a list"),
        (json.dumps({"num_gpus": 100_000_000, "link": "NV18"}), "got 100000000"),
        (json.dumps({"num_gpus": 4, "gpus": ["A100", "A100"]}), "'num_gpus' is 4 but 'gpus' lists 2"),
        (json.dumps({"gpus": ["A100"], "gpu_name": "H100"}), "'gpu_name' names the GPUs of 'num_gpus'"),
        (json.dumps({"gpus": ["A", "B"], "link": "NV4", "links": [["X", "PIX"], ["PIX", "X"]]}), "'link' or 'links'"),
        (json.dumps({"ranks": ["a"], "rank_hostnames": ["h"]}), "'ranks' must be a list of distinct ints >= 0"),
        (json.dumps({"rank_hostnames": 5}), "'rank_hostnames' must be a list of host names"),
        # were taken: one rank or host per character, truncated ranks, one rank on two hosts
        (json.dumps({"ranks": "01", "rank_hostnames": ["a", "b"]}), "'ranks' must be a list of distinct ints"),
        (json.dumps({"rank_hostnames": "ab"}), "'rank_hostnames' must be a list of host names"),
        (json.dumps({"ranks": [0.5, 1.7], "rank_hostnames": ["a", "b"]}), "'ranks' must be a list of distinct ints"),
        (json.dumps({"ranks": [0, 0], "rank_hostnames": ["a", "b"]}), "'ranks' must be a list of distinct ints"),
        (json.dumps({"ranks": [True], "rank_hostnames": ["a"]}), "'ranks' must be a list of distinct ints"),
        (json.dumps({"ranks": [-1], "rank_hostnames": ["a"]}), "'ranks' must be a list of distinct ints"),
        (json.dumps({"ranks": [0], "rank_hostnames": [None]}), "'rank_hostnames' must be a list of host names"),
        # were taken, and failed later: a TypeError in the benchmark's memory check, in `sagellm-comm topo`'s matrix
        (json.dumps({"gpus": [{"index": 0, "memory_bytes": "80G"}]}), "gpus[0].memory_bytes must be an int >= 1"),
        (json.dumps({"gpus": [{"index": 0, "memory_bytes": 0}]}), "gpus[0].memory_bytes must be an int >= 1"),
        (json.dumps({"gpus": [{"index": 0, "name": 5}]}), "gpus[0].name must be a string, got 5"),
        (json.dumps({"gpus": [{"index": 0, "uuid": 7}]}), "gpus[0].uuid must be a string or null"),
        (json.dumps({"gpus": [{"index": "0"}]}), "gpus[0].index must be an int >= 0, got '0'"),
        (json.dumps({"gpus": [{"index": 0}, {"index": 0}]}), "gpus[1].index 0 is given to two GPUs"),
    ],
)
def test_bad_override_is_one_line_naming_variable_value_and_forms(
    monkeypatch: pytest.MonkeyPatch, value: str, words: str
) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(InvalidArgumentError) as info:
        Topology.discover()
    text = str(info.value)
    assert "\n" not in text and words in text, text
    assert text.startswith(f"[invalid_argument] {ENV_VAR}={value!r} is refused: "), text
    assert 'accepted: a JSON object or the path of a JSON file, short form {"num_gpus": 2' in text
    assert (info.value.details["variable"], info.value.details["value"]) == (ENV_VAR, value)


def _fake_pynvml() -> types.ModuleType:
    """4 GPUs: 0-1 joined by 4 direct NVLinks, 2-3 behind one PCIe switch, everything else SYS."""
    nv = types.ModuleType("pynvml")
    nv.NVML_FEATURE_ENABLED, nv.NVML_P2P_STATUS_OK, nv.NVML_NVLINK_MAX_LINKS = 1, 0, 18
    nv.NVML_P2P_CAPS_INDEX_READ, nv.NVML_P2P_CAPS_INDEX_NVLINK = 0, 2
    names = ("INTERNAL", "SINGLE", "MULTIPLE", "HOSTBRIDGE", "NODE", "SYSTEM")
    for value, name in enumerate(names):
        setattr(nv, f"NVML_TOPOLOGY_{name}", value * 10)
    bus = [f"00000000:{0x18 + i:02x}:00.0" for i in range(4)]
    nvlinked = {(0, 1), (1, 0)}
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 4
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA A100-SXM4-80GB"
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    nv.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=bus[h].upper().encode())
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30)
    nv.nvmlDeviceGetNvLinkState = lambda h, link: int(h in (0, 1) and link < 4)
    nv.nvmlDeviceGetNvLinkRemotePciInfo = lambda h, link: types.SimpleNamespace(busId=bus[1 - h].encode())
    p2p = {0: lambda a, b: a in (0, 1) and b in (0, 1) or {a, b} == {2, 3}, 2: lambda a, b: (a, b) in nvlinked}
    nv.nvmlDeviceGetP2PStatus = lambda a, b, caps: 0 if p2p[caps](a, b) else 4
    nv.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: 10 if {a, b} == {2, 3} else 50
    return nv


def test_nvml_source_checks_each_pair_instead_of_assuming_nvlink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    topo = Topology.discover()
    assert topo.source == "nvml" and topo.num_gpus == 4
    assert topo.gpus[0].pci_bus_id == "00000000:18:00.0" and topo.gpus[0].name == "NVIDIA A100-SXM4-80GB"
    assert topo.links[0] == ["X", "NV4", "SYS", "SYS"]
    assert topo.links[2] == ["SYS", "SYS", "X", "PIX"]
    assert topo.peer_access[2][3] and not topo.peer_access[0][2]
    assert topo.all_pairs_p2p([0, 1], nvlink_only=True) and not topo.all_pairs_p2p([2, 3], nvlink_only=True)
    assert topo.all_pairs_p2p([2, 3]) and not topo.all_pairs_p2p()


def test_nvml_answers_peer_access_between_two_gpus_named_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads and writes both, the UUIDs as NVML or as torch writes them; None where NVML cannot answer."""
    nv = _fake_pynvml()
    status = nv.nvmlDeviceGetP2PStatus
    nv.NVML_P2P_CAPS_INDEX_WRITE = 1
    nv.nvmlDeviceGetP2PStatus = lambda a, b, caps: status(a, b, 0) if caps in (0, 1) else status(a, b, caps)
    nv.nvmlDeviceGetHandleByUUID = lambda uuid: {f"GPU-{i}": i for i in range(4)}[uuid]  # KeyError: not found
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert nvml_peer_access("GPU-2", "3") and nvml_peer_access("0", "GPU-1")
    assert nvml_peer_access("0", "2") is False and nvml_peer_access("GPU-1", "GPU-3") is False
    assert nvml_peer_access("0", "GPU-9") is None
    nv.nvmlDeviceGetP2PStatus = lambda a, b, caps: 0 if caps == 0 else 5  # reads only
    assert nvml_peer_access("0", "1") is False

    def no_library() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    nv.nvmlInit = no_library
    assert nvml_peer_access("0", "1") is None


def _hostnames(rank: int, world_size: int, port: int) -> dict:
    backend = CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port)
    topo = Topology.discover(group=backend)
    backend.destroy()
    return {"ranks": topo.ranks, "hosts": topo.rank_hostnames, "same": topo.same_node()}


def test_discover_with_group_gathers_real_hostnames() -> None:
    results = run_ranks(_hostnames, 2, timeout=60, env={ENV_VAR: None})
    me = socket.gethostname()
    assert results == [{"ranks": [0, 1], "hosts": [me, me], "same": True}] * 2


def _hostnames_of_a_sub_group(rank: int, world_size: int, port: int) -> dict:
    from sagellm_comm import CommGroup

    world = CommGroup.create(rank=rank, world_size=world_size, backend="gloo", master_port=port, timeout=10)
    try:
        first = world.new_subgroup([0])  # rank 1 is not a member
        try:
            topo = Topology.discover(group=first)
        except InvalidArgumentError as exc:
            return {"refused": str(exc)}
        return {"ranks": topo.ranks, "hosts": len(topo.rank_hostnames)}
    finally:
        world.destroy()


def test_discover_with_a_group_this_rank_is_not_in_is_refused_on_that_rank() -> None:
    """The hostnames are gathered over the group's members; a non-member has no side of that exchange (it would
    run its half over the whole world, where no peer answers), so it is refused there before anything is sent."""
    member, outsider = run_ranks(_hostnames_of_a_sub_group, 2, timeout=60, env={ENV_VAR: None})
    assert member == {"ranks": [0], "hosts": 1}
    assert "not a member" in outsider.get("refused", ""), outsider


def test_gpu_and_rank_arguments_that_are_not_ints_are_typed_errors() -> None:
    """A GPU index or a rank is an int (NumPy's too); anything else (a float, a str, a bool, a bare int where a
    list is asked for) is an InvalidArgumentError naming it, never a TypeError or another GPU's answer."""
    import numpy as np

    topo = Topology.from_dict({"num_gpus": 2, "link": "NV4", "ranks": [0, 1], "rank_hostnames": ["a", "b"]})
    assert topo.link(np.int64(0), 1) == "NV4" and topo.all_pairs_p2p([np.int32(0), 1])
    for bad in (0.5, 1.0, "1", None, True):
        with pytest.raises(InvalidArgumentError, match="GPU index"):
            topo.link(bad, 0)
        with pytest.raises(InvalidArgumentError, match="GPU index"):
            topo.nvlink_count(0, bad)
        with pytest.raises(InvalidArgumentError, match="GPU index"):
            topo.all_pairs_p2p([0, bad])
        with pytest.raises(InvalidArgumentError, match="rank"):
            topo.same_node([0, bad])
    for call in (topo.all_pairs_p2p, topo.same_node):
        with pytest.raises(InvalidArgumentError, match="list"):
            call(5)


def _hostnames_with_a_peer_gone(rank: int, world_size: int, port: int) -> dict:
    from sagellm_comm import CommError

    backend = CommBackend.create("gloo").init(rank=rank, world_size=world_size, master_port=port, timeout=5)
    if rank == 1:  # leaves without taking part in the exchange
        backend.destroy()
        return {}
    try:
        Topology.discover(group=backend)
    except CommError as exc:
        return {"error": type(exc).__name__, "cause": exc.__cause__ is not None, "text": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the defect this test finds
        return {"error": f"untyped {type(exc).__name__}"}
    finally:
        backend.destroy()
    return {"error": None}


def test_discover_with_a_group_whose_peer_is_gone_raises_a_typed_error() -> None:
    found, _ = run_ranks(_hostnames_with_a_peer_gone, 2, timeout=60, env={ENV_VAR: None})
    assert found["error"] in ("CollectiveFailedError", "CommTimeoutError") and found["cause"], found
    assert "hostname" in found["text"] and "[0, 1]" in found["text"], found
