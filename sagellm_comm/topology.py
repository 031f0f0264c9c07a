"""What the machine looks like to the communication layer: GPUs, the links between them, which ranks
share a node.

``Topology.discover(group=None)`` tries, in order:

1. ``SAGELLM_COMM_TOPOLOGY``: a JSON object (the string itself, or a path to a file) describing the
   GPUs; for tests and machines whose drivers misreport.  ``source == "env"``.
2. NVML (``nvidia-ml-py``): names, PCI ids, NVLink (``NVML_P2P_CAPS_INDEX_NVLINK`` and link counts),
   the PCIe level between every pair (``nvmlDeviceGetTopologyCommonAncestor``) and the driver's
   peer-read capability.  ``source == "nvml"``.
3. torch.cuda: names and ``can_device_access_peer``; the link kind is unknown.  ``source == "cuda"``.
4. No GPU: an empty CPU-only topology.  ``source == "cpu"``.  Discovery never raises on a machine
   without GPUs; only a malformed ``SAGELLM_COMM_TOPOLOGY`` is an error (it was asked for).

Link labels follow ``nvidia-smi topo -m``: ``X`` (self), ``NV<n>`` (n NVLinks, direct or through
NVSwitch), ``PIX`` (one PCIe switch), ``PXB`` (several PCIe switches), ``PHB`` (PCIe host bridge),
``NODE`` (host bridges in one NUMA node), ``SYS`` (across NUMA nodes), ``none`` (no path known),
``unknown`` (torch.cuda source: the path is not reported).  Peer access is what the driver *claims*;
a real peer copy test decides before kernels rely on it.  :func:`nvml_peer_access` asks NVML about two GPUs
named by UUID, which it answers whatever this process's ``CUDA_VISIBLE_DEVICES`` (the custom kernels' set-up
asks it about a member's GPU that this process does not see).

With a ``group`` (a :class:`~sagellm_comm.group.CommGroup` or an initialised
:class:`~sagellm_comm.backend.CommBackend`), every rank's hostname is gathered over the backend's
Gloo CPU group (collective: every member calls ``discover``), so :meth:`Topology.same_node` answers
from facts, never guesses.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sagellm_comm.arguments import is_int
from sagellm_comm.errors import InvalidArgumentError, UnavailableError

__all__ = ["ENV_VAR", "GPUInfo", "Topology"]

ENV_VAR = "SAGELLM_COMM_TOPOLOGY"
PCIE_LEVELS = ("PIX", "PXB", "PHB", "NODE", "SYS")
SOURCES = ("nvml", "cuda", "env", "cpu")
#: the most GPUs a description may give (more than any host holds; the link matrices grow as its square)
MAX_GPUS = 1024
#: the keys a description may have: :meth:`Topology.to_dict`'s, and the short form's
_KEYS = ("source", "hostname", "gpus", "links", "peer_access", "ranks", "rank_hostnames")
_KEYS += ("num_gpus", "link", "gpu_name")


@dataclass
class GPUInfo:
    """One GPU as this process sees it (``index`` is the CUDA device index)."""

    index: int
    name: str = "unknown"
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_bytes: int | None = None


@dataclass
class Topology:
    """GPUs of this node, their link matrix and, when discovered with a group, every rank's host.

    Attributes:
        source: where the GPU data came from: ``nvml``, ``cuda``, ``env`` or ``cpu``.
        hostname: this process's host.
        gpus: the GPUs visible to this process.
        links: ``links[i][j]`` is the label of the path between GPU i and GPU j (see module doc).
        peer_access: ``peer_access[i][j]``: the driver reports that GPU i can read GPU j's memory.
        ranks: global ranks of the group given to ``discover`` (empty without one).
        rank_hostnames: ``rank_hostnames[k]`` is the host of global rank ``ranks[k]``.
    """

    source: str
    hostname: str
    gpus: list[GPUInfo] = field(default_factory=list)
    links: list[list[str]] = field(default_factory=list)
    peer_access: list[list[bool]] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    rank_hostnames: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ discovery
    @classmethod
    def discover(cls, group: Any = None, config: Any = None) -> Topology:
        """Describe this node (see module doc); with ``group``, gather every member's hostname (collective over
        the members; a rank outside ``group`` raises :class:`InvalidArgumentError`).

        ``config``: a :class:`~sagellm_comm.config.CommConfig` (default: read from the environment, which
        raises ``InvalidArgumentError`` for a malformed setting)."""
        from .backend import CommBackend
        from .config import CommConfig
        from .group import CommGroup

        if group is not None and not isinstance(group, CommGroup | CommBackend):
            raise InvalidArgumentError(f"group must be a CommGroup, a CommBackend or None, got {group!r}")
        if isinstance(group, CommGroup) and not group.is_member:  # it has no side of the members' exchange
            raise InvalidArgumentError(
                f"this rank is not a member of {group!r}: Topology.discover(group) is called by the group's members"
            )
        if config is None:
            config = CommConfig.from_env()
        elif not isinstance(config, CommConfig):
            raise InvalidArgumentError(f"config must be a CommConfig or None, got {config!r}")
        if config.topology:
            topo = parse_override(config.topology)
        else:
            topo = _from_nvml() or _from_cuda() or cls(source="cpu", hostname=socket.gethostname())
        if group is not None and not topo.ranks:
            topo.ranks, topo.rank_hostnames = _gather_hostnames(group, topo.hostname)
        return topo

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "env") -> Topology:
        """Build from :meth:`to_dict`'s form, or the short one: ``{"num_gpus": 8, "link": "NV18"}``.

        Full form keys: ``gpus`` (list of GPUInfo dicts or names; a dict's fields of GPUInfo's types, each
        ``index`` given once), ``links`` (n x n labels),
        ``peer_access`` (n x n bools or one bool), ``hostname``, ``ranks`` (distinct ints >= 0) and
        ``rank_hostnames`` (a host name per rank; without ``ranks``, of ranks 0, 1, ...).
        Unless given, peer access is assumed exactly where the link is NVLink.  A short-form key beside the full
        form's key for the same thing (``num_gpus`` of another count than ``gpus``, ``gpu_name`` with ``gpus``,
        ``link`` with ``links``) is refused rather than ignored.
        """
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{ENV_VAR} must describe a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:  # a misspelt key ("num_gpu") would otherwise describe no GPU at all
            raise InvalidArgumentError(f"{ENV_VAR}: unknown key(s) {unknown}; the keys: {', '.join(_KEYS)}")
        bad = f"{ENV_VAR}: bad 'gpus'/'num_gpus' entry:"
        count, listed = data.get("num_gpus", 0), data.get("gpus") or []
        if count.__class__ is not int or not 0 <= count <= MAX_GPUS:
            raise InvalidArgumentError(f"{bad} 'num_gpus' must be an integer in 0..{MAX_GPUS}, got {count!r}")
        if not isinstance(listed, list) or len(listed) > MAX_GPUS:
            raise InvalidArgumentError(f"{bad} 'gpus' must be a list of at most {MAX_GPUS} GPUs")
        # The short form's keys fill in what the full form leaves out; beside it they would be ignored.
        if "gpus" in data and "num_gpus" in data and count != len(listed):
            raise InvalidArgumentError(f"{bad} 'num_gpus' is {count} but 'gpus' lists {len(listed)}; give one")
        if "gpus" in data and "gpu_name" in data:
            raise InvalidArgumentError(f"{bad} 'gpu_name' names the GPUs of 'num_gpus'; with 'gpus', name each there")
        if "link" in data and "links" in data:
            raise InvalidArgumentError(f"{ENV_VAR}: give 'link' or 'links', not both")
        try:
            gpus = [
                GPUInfo(**g) if isinstance(g, dict) else GPUInfo(index=i, name=str(g))
                for i, g in enumerate(data.get("gpus") or [])
            ]
            if not gpus and data.get("num_gpus"):
                gpus = [GPUInfo(index=i, name=str(data.get("gpu_name", "unknown"))) for i in range(data["num_gpus"])]
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{ENV_VAR}: bad 'gpus'/'num_gpus' entry: {exc}") from exc
        _check_gpus(gpus)
        n = len(gpus)
        links = data.get("links")
        if links is None:
            uniform = str(data.get("link", "none"))
            links = [["X" if i == j else uniform for j in range(n)] for i in range(n)]
        _check_matrix(links, n, "links", str)
        for i, row in enumerate(links):
            for j, label in enumerate(row):
                if (i == j) != (label == "X") or not _valid_label(label):
                    raise InvalidArgumentError(
                        f"{ENV_VAR}: links[{i}][{j}] = {label!r}; expected 'X' on the diagonal only, "
                        f"else NV<n>, {', '.join(PCIE_LEVELS)}, none or unknown"
                    )
        peer = data.get("peer_access")
        if peer is None or isinstance(peer, bool):
            peer = [
                [i != j and (peer if peer is not None else links[i][j].startswith("NV")) for j in range(n)]
                for i in range(n)
            ]
        _check_matrix(peer, n, "peer_access", bool)
        ranks, hosts = data.get("ranks", []), data.get("rank_hostnames", [])
        ints = isinstance(ranks, list) and all(r.__class__ is int and r >= 0 for r in ranks)
        if not ints or len(set(ranks)) != len(ranks):  # a rank on two hosts, or 1.7 read as rank 1
            raise InvalidArgumentError(f"{ENV_VAR}: 'ranks' must be a list of distinct ints >= 0, got {ranks!r}")
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            raise InvalidArgumentError(f"{ENV_VAR}: 'rank_hostnames' must be a list of host names, got {hosts!r}")
        ranks, hosts = list(ranks), list(hosts)
        if hosts and not ranks:
            ranks = list(range(len(hosts)))
        if len(ranks) != len(hosts):
            raise InvalidArgumentError(f"{ENV_VAR}: 'ranks' and 'rank_hostnames' differ in length")
        if source not in SOURCES:
            raise InvalidArgumentError(f"source must be one of {SOURCES}, got {source!r}")
        hostname = str(data.get("hostname") or socket.gethostname())
        return cls(source, hostname, gpus, [list(r) for r in links], [list(r) for r in peer], ranks, hosts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``Topology.from_dict(t.to_dict(), t.source)`` rebuilds ``t``."""
        return asdict(self)

    # ------------------------------------------------------------------ questions
    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    def link(self, i: int, j: int) -> str:
        """Label of the path between GPU ``i`` and GPU ``j``."""
        for k in (i, j):
            if not is_int(k):
                raise InvalidArgumentError(f"GPU index must be an int, got {k!r}")
            if not 0 <= k < self.num_gpus:
                raise InvalidArgumentError(f"GPU index {k} is outside [0, {self.num_gpus - 1}]")
        return self.links[int(i)][int(j)]

    def nvlink_count(self, i: int, j: int) -> int:
        """Number of NVLinks between GPU ``i`` and GPU ``j`` (0 when none)."""
        label = self.link(i, j)
        return int(label[2:]) if label.startswith("NV") else 0

    def all_pairs_p2p(self, devices: Sequence[int] | None = None, nvlink_only: bool = False) -> bool:
        """True if every pair of ``devices`` (default: all GPUs) is NVLink-connected or, unless
        ``nvlink_only``, peer-access capable.

        No device (a machine without GPUs, or an empty list): False, there is no peer to reach.  One
        device: True (ranks that share one GPU need no peer access).  An index outside the GPUs raises
        :class:`InvalidArgumentError`.
        """
        devs = list(range(self.num_gpus)) if devices is None else _as_list(devices, "devices")
        if not devs:
            return False
        for i in devs:
            self.link(i, i)  # checks the index, also for a single device
        for i in devs:
            for j in devs:
                if i == j:
                    continue
                nvlink = self.nvlink_count(i, j) > 0
                if not (nvlink or (not nvlink_only and self.peer_access[int(i)][int(j)])):
                    return False
        return True

    def hosts(self) -> dict[str, list[int]]:
        """Host -> global ranks on it (needs ``discover(group)``)."""
        self._need_group()
        by_host: dict[str, list[int]] = {}
        for rank, host in zip(self.ranks, self.rank_hostnames, strict=True):
            by_host.setdefault(host, []).append(rank)
        return by_host

    def same_node(self, ranks: Sequence[int] | None = None) -> bool:
        """True if all ``ranks`` (global; default: the whole group) run on one host."""
        self._need_group()
        wanted = list(self.ranks) if ranks is None else _as_list(ranks, "ranks")
        wrong = [r for r in wanted if not is_int(r)]
        if wrong:
            raise InvalidArgumentError(f"ranks must be ints, got {wrong}")
        unknown = [r for r in wanted if r not in self.ranks]
        if unknown:
            raise InvalidArgumentError(f"ranks {unknown} are not in the discovered group {self.ranks}")
        return len({self.rank_hostnames[self.ranks.index(r)] for r in wanted}) <= 1

    def _need_group(self) -> None:
        if not self.ranks:
            raise UnavailableError("this topology has no rank hostnames: call Topology.discover(group=...)")

    # ------------------------------------------------------------------ text
    def format_matrix(self, peer_access: bool = True) -> str:
        """The link matrix as text, like ``nvidia-smi topo -m`` (plus the peer-access matrix)."""
        lines = [f"host {self.hostname}, source {self.source}, {self.num_gpus} GPU(s)"]
        if self.gpus:
            names = [f"GPU{g.index}" for g in self.gpus]
            width = max(6, *(len(x) for x in names), *(len(x) for row in self.links for x in row)) + 2
            lines.append(" " * width + "".join(n.ljust(width) for n in names) + "Name")
            for g, row in zip(self.gpus, self.links, strict=True):
                lines.append(f"GPU{g.index}".ljust(width) + "".join(x.ljust(width) for x in row) + g.name)
            if peer_access:
                lines.append("")
                lines.append("peer access (driver-reported):".ljust(width))
                lines.append(" " * width + "".join(n.ljust(width) for n in names))
                for i, g in enumerate(self.gpus):
                    cells = ["X" if i == j else ("OK" if ok else "NS") for j, ok in enumerate(self.peer_access[i])]
                    lines.append(f"GPU{g.index}".ljust(width) + "".join(c.ljust(width) for c in cells).rstrip())
            lines += [
                "",
                "Legend: X = self, NV# = # NVLinks, PIX = one PCIe switch, PXB = several PCIe switches,",
                "        PHB = PCIe host bridge, NODE = within a NUMA node, SYS = across NUMA nodes,",
                "        none = no path, unknown = not reported; OK/NS = peer access supported/not",
            ]
        else:
            lines.append("no GPU visible: CPU-only (Gloo) communication")
        if self.ranks:
            lines.append("")
            for host, ranks in self.hosts().items():
                lines.append(f"ranks on {host}: {', '.join(map(str, ranks))}")
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format_matrix()


# ====================================================================== sources


#: what SAGELLM_COMM_TOPOLOGY accepts, quoted by every refusal
_OVERRIDE_FORMS = (
    'a JSON object or the path of a JSON file, short form {"num_gpus": 2, "link": "NV18"} or the form of '
    "Topology.to_dict() (gpus, links, peer_access, hostname, ranks, rank_hostnames)"
)


def parse_override(value: str) -> Topology:
    """The topology ``SAGELLM_COMM_TOPOLOGY=value`` describes, or one line saying why it is refused."""
    try:
        return Topology.from_dict(_load_override(value), source="env")
    except (InvalidArgumentError, TypeError, ValueError, KeyError, AttributeError) as exc:
        why = exc.message if isinstance(exc, InvalidArgumentError) else f"{type(exc).__name__}: {exc}"
        why = " ".join(why.replace(f"{ENV_VAR}: ", "").split())  # one line
        shown = value if len(value) <= 120 else value[:117] + "..."
        raise InvalidArgumentError(
            f"{ENV_VAR}={shown!r} is refused: {why}; accepted: {_OVERRIDE_FORMS}",
            details={"variable": ENV_VAR, "value": value},
        ) from exc


def _load_override(value: str) -> dict[str, Any]:
    text = value
    if not value.lstrip().startswith("{"):
        try:
            with open(value, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise InvalidArgumentError(f"neither a JSON object nor a readable file ({exc.strerror})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"not valid JSON ({exc})") from exc


def _check_matrix(matrix: Any, n: int, what: str, kind: type) -> None:
    ok = isinstance(matrix, list) and len(matrix) == n
    ok = ok and all(isinstance(row, list) and len(row) == n and all(isinstance(x, kind) for x in row) for row in matrix)
    if not ok:
        raise InvalidArgumentError(f"{ENV_VAR}: '{what}' must be a {n}x{n} matrix of {kind.__name__}")


def _check_gpus(gpus: list[GPUInfo]) -> None:
    """Refuse a GPU of a description whose fields are not what :class:`GPUInfo` holds (``memory_bytes`` "80G" would
    reach the benchmark's memory check as text, a numeric ``name`` the matrix's text), or an index given twice."""
    bad = f"{ENV_VAR}: bad 'gpus'/'num_gpus' entry:"
    seen: set[int] = set()
    for position, gpu in enumerate(gpus):
        where = f"gpus[{position}]"
        if gpu.index.__class__ is not int or gpu.index < 0:
            raise InvalidArgumentError(f"{bad} {where}.index must be an int >= 0, got {gpu.index!r}")
        if gpu.index in seen:
            raise InvalidArgumentError(f"{bad} {where}.index {gpu.index} is given to two GPUs")
        seen.add(gpu.index)
        if not isinstance(gpu.name, str):
            raise InvalidArgumentError(f"{bad} {where}.name must be a string, got {gpu.name!r}")
        for key in ("uuid", "pci_bus_id"):
            value = getattr(gpu, key)
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(f"{bad} {where}.{key} must be a string or null, got {value!r}")
        memory = gpu.memory_bytes
        if memory is not None and (memory.__class__ is not int or memory < 1):
            raise InvalidArgumentError(f"{bad} {where}.memory_bytes must be an int >= 1 or null, got {memory!r}")


def _as_list(values: Any, what: str) -> list:
    """``values`` (a sequence of GPU indices or ranks) as a list, or a typed error naming ``what``."""
    if isinstance(values, str | bytes):
        raise InvalidArgumentError(f"{what} must be a list of ints, got {values!r}")
    try:
        return list(values)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be a list of ints, got {values!r}") from None


def _valid_label(label: str) -> bool:
    if label.startswith("NV"):
        return label[2:].isdigit() and int(label[2:]) > 0
    return label in ("X", "none", "unknown", *PCIE_LEVELS)


def _from_nvml() -> Topology | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: not an error, try the next source
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(
                GPUInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(h).busId).lower(),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                )
            )
        links = [["X"] * count for _ in range(count)]
        peer = [[False] * count for _ in range(count)]
        active = [_nvml_nvlinks(pynvml, h, gpus) for h in handles]
        for i in range(count):
            for j in range(count):
                if i == j:
                    continue
                peer[i][j] = _p2p_ok(pynvml, handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_READ)
                if _p2p_ok(pynvml, handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK):
                    direct, total = active[i]
                    links[i][j] = f"NV{direct.get(j) or total or 1}"
                else:
                    links[i][j] = _pcie_level(pynvml, handles[i], handles[j])
        return Topology("nvml", socket.gethostname(), gpus, links, peer)
    except Exception:
        return None  # a partial NVML (old driver) falls back to torch.cuda
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_nvlinks(pynvml: Any, handle: Any, gpus: list[GPUInfo]) -> tuple[dict[int, int], int]:
    """(links going straight to each peer GPU, active links in total); NVSwitch links count only in total."""
    by_bus = {g.pci_bus_id: g.index for g in gpus}
    direct: dict[int, int] = {}
    total = 0
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
        except Exception:
            continue
        total += 1
        try:
            remote = _text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId).lower()
        except Exception:
            continue
        if remote in by_bus:
            direct[by_bus[remote]] = direct.get(by_bus[remote], 0) + 1
    return direct, total


def _p2p_ok(pynvml: Any, a: Any, b: Any, caps: int) -> bool:
    try:
        return pynvml.nvmlDeviceGetP2PStatus(a, b, caps) == pynvml.NVML_P2P_STATUS_OK
    except Exception:
        return False


def nvml_peer_access(accessor: str, target: str) -> bool | None:
    """Whether NVML reports that GPU ``accessor`` can read and write GPU ``target``'s memory (``nvmlDeviceGetP2PStatus``
    for reads and for writes), or None where NVML cannot answer (no library or driver, a UUID it does not know).

    Both GPUs are named by UUID (``GPU-...`` as NVML and ``nvidia-smi -L`` write it, or without the prefix as
    ``torch.cuda.get_device_properties(i).uuid`` does).  NVML sees every GPU of the node whatever this process's
    ``CUDA_VISIBLE_DEVICES``: it answers for a GPU that the CUDA driver of this process cannot be asked about."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        a, b = (pynvml.nvmlDeviceGetHandleByUUID(_nvml_uuid(uuid)) for uuid in (accessor, target))
        caps = (pynvml.NVML_P2P_CAPS_INDEX_READ, pynvml.NVML_P2P_CAPS_INDEX_WRITE)
        return all(pynvml.nvmlDeviceGetP2PStatus(a, b, cap) == pynvml.NVML_P2P_STATUS_OK for cap in caps)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_uuid(uuid: str) -> str:
    """``uuid`` as NVML spells a GPU's: with its ``GPU-`` (or a MIG instance's ``MIG-``) prefix."""
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def _pcie_level(pynvml: Any, a: Any, b: Any) -> str:
    try:
        level = pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b)
    except Exception:
        return "none"
    return {
        pynvml.NVML_TOPOLOGY_INTERNAL: "PIX",
        pynvml.NVML_TOPOLOGY_SINGLE: "PIX",
        pynvml.NVML_TOPOLOGY_MULTIPLE: "PXB",
        pynvml.NVML_TOPOLOGY_HOSTBRIDGE: "PHB",
        pynvml.NVML_TOPOLOGY_NODE: "NODE",
        pynvml.NVML_TOPOLOGY_SYSTEM: "SYS",
    }.get(level, "none")


def _from_cuda() -> Topology | None:
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None
        count = torch.cuda.device_count()
        gpus = []
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            gpus.append(GPUInfo(index=i, name=props.name, memory_bytes=int(props.total_memory)))
        peer = [[i != j and torch.cuda.can_device_access_peer(i, j) for j in range(count)] for i in range(count)]
    except Exception:
        return None
    links = [["X" if i == j else "unknown" for j in range(count)] for i in range(count)]
    return Topology("cuda", socket.gethostname(), gpus, links, peer)


def _gather_hostnames(group: Any, hostname: str) -> tuple[list[int], list[str]]:
    """Every member's hostname, over the Gloo CPU group of ``group`` (collective).  A member gone or silent past
    the backend's timeout is a typed error (``comm_collective_failed`` or ``comm_timeout``) naming the ranks."""
    import torch.distributed as dist

    from sagellm_comm.backend import DEFAULT_TIMEOUT_S
    from sagellm_comm.backends.torch_distributed.translate import translate

    backend = getattr(group, "backend", group)  # CommGroup -> its backend; else a CommBackend
    handle = getattr(group, "handle", None)
    cpu_group = handle.cpu_group if handle is not None else backend.cpu_group
    ranks = list(handle.ranks) if handle is not None else list(range(backend.world_size))
    hostnames: list[Any] = [None] * len(ranks)
    try:
        dist.all_gather_object(hostnames, hostname, group=cpu_group)
    except Exception as exc:
        limit = float(getattr(backend, "timeout", DEFAULT_TIMEOUT_S))
        raise translate(exc, f"Topology.discover's hostname exchange over ranks {ranks}", limit, backend.name) from exc
    return ranks, [str(h) for h in hostnames]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
