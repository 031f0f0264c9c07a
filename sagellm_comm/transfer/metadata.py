"""An agent's metadata: the bytes an engine hands to peers out of band (``TransferAgent.metadata()``).

It says who the agent is (name, incarnation: a fresh id per agent object, so a restarted peer with the same
name is told apart), where it runs (host, boot id, process id and a random id of the process: processes of
containers that share a host's /dev/shm, each in its own pid namespace, often have the same pid), which
regions it registered (name, size, dtype, device kind) and, per transport it offers, that transport's own
description (NIXL's agent metadata; the ipc path's handles, notification inbox and probe).

Encoding: a magic line, then JSON (binary fields in base64).  JSON, not pickle: the bytes come from another
process, and reading them must never run code.  A malformed or foreign blob is an
:class:`~sagellm_comm.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from functools import lru_cache

from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.transfer.descriptors import RegionInfo

MAGIC_PREFIX = b"sagellm-transfer-agent/"
VERSION = 2  # 2: the process's random id beside its pid
MAGIC = MAGIC_PREFIX + f"{VERSION}\n".encode()
_PROCESS_ID = secrets.token_hex(8)  # this process's random id (a forked child draws its own)


def _new_process_id() -> None:
    global _PROCESS_ID
    _PROCESS_ID = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_process_id)


@lru_cache(maxsize=1)
def boot_id() -> str:
    """This machine's boot id (Linux), so that two hosts with the same name are not taken for one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def host_name(config=None) -> str:
    """The node this process runs on (``config.hostname``, ``SAGELLM_COMM_HOSTNAME``, overrides, as for the
    collectives; default: the configuration the environment describes now)."""
    from sagellm_comm.config import CommConfig
    from sagellm_comm.workspace import node_name

    return node_name(CommConfig.from_env() if config is None else config)


@dataclass
class AgentMetadata:
    name: str
    incarnation: str
    host: str
    boot_id: str
    pid: int
    regions: dict[str, RegionInfo] = field(default_factory=dict)
    transports: dict[str, dict] = field(default_factory=dict)
    process: str = ""  # a random id of the process (pids repeat across pid namespaces)

    def same_host(self, other: AgentMetadata) -> bool:
        """Both agents run on one machine (same host name and, where known, the same boot)."""
        return self.host == other.host and (not self.boot_id or not other.boot_id or self.boot_id == other.boot_id)

    def same_process(self, other: AgentMetadata) -> bool:
        """Both agents run in one process: one address space (the ipc path then takes the peer's regions from its
        live agent in this process, not from the metadata's addresses)."""
        return self.same_host(other) and self.pid == other.pid and self.process == other.process

    def encode(self) -> bytes:
        body = {
            "name": self.name,
            "incarnation": self.incarnation,
            "host": self.host,
            "boot_id": self.boot_id,
            "pid": self.pid,
            "process": self.process,
            "regions": {name: info.to_json() for name, info in self.regions.items()},
            "transports": self.transports,
        }
        return MAGIC + json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> AgentMetadata:
        """The metadata in ``data``; every field is checked for its type and range (the bytes come from another
        process): anything else is an :class:`InvalidArgumentError` naming the field."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if isinstance(data, bytes) and data.startswith(MAGIC_PREFIX) and not data.startswith(MAGIC):
            version = data[len(MAGIC_PREFIX) :].split(b"\n", 1)[0][:16].decode(errors="replace")
            if version.strip() != str(VERSION):  # else this version's, cut short or its line changed in transit
                raise InvalidArgumentError(
                    f"transfer agent metadata of version {version!r}; this agent reads version {VERSION}: peers must "
                    "run the same sagellm-comm release"
                )
        if not isinstance(data, bytes) or not data.startswith(MAGIC):
            head = data[:32] if isinstance(data, bytes) else type(data).__name__
            raise InvalidArgumentError(
                f"not a transfer agent's metadata (expected bytes from TransferAgent.metadata(), got {head!r})"
            )
        if len(data) > MAX_METADATA_BYTES:
            raise InvalidArgumentError(f"transfer agent metadata of {len(data)} bytes: more than {MAX_METADATA_BYTES}")
        try:
            body = json.loads(data[len(MAGIC) :], object_pairs_hook=_unique_keys)
        except InvalidArgumentError:
            raise
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            raise InvalidArgumentError(f"transfer agent metadata is not JSON: {exc!r}") from None
        top = MetadataField("the metadata", body)
        body = top.mapping()
        regions = top.item(body, "regions").mapping()
        transports = top.item(body, "transports").mapping()
        return cls(
            name=top.item(body, "name").name(),
            incarnation=top.item(body, "incarnation").text(),
            host=top.item(body, "host").text(),
            boot_id=top.item(body, "boot_id").text(),
            pid=top.item(body, "pid").integer(0, 1 << 31),
            process=top.item(body, "process").text(64),
            regions={
                MetadataField(f"region {name!r}", name).name(): RegionInfo.from_json(name, info)
                for name, info in regions.items()
            },
            transports={
                MetadataField(f"transport {name!r}", name).name(): MetadataField(f"transport {name!r}", blob).mapping()
                for name, blob in transports.items()
            },
        )


MAX_METADATA_BYTES = 16 << 20  # far above what thousands of regions take


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different (``json`` would keep the last of a key given twice: of two
    regions of one name, one would be dropped without a word)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgumentError(f"transfer agent metadata is malformed: key {key!r} is given twice in an object")
        out[key] = value
    return out


class MetadataField:
    """One value of a peer's metadata being read: typed accessors that raise :class:`InvalidArgumentError` naming
    the field (``what``) when the value is missing, of another type or out of range.  Transports read their own
    sections with it too."""

    def __init__(self, what: str, value: object = None):
        self.what = what
        self.value = value

    def item(self, mapping: dict, key: str) -> MetadataField:
        if key not in mapping:
            raise InvalidArgumentError(f"transfer agent metadata is malformed: {self.what} has no {key!r}")
        return MetadataField(f"{self.what}: {key!r}", mapping[key])

    def get(self, mapping: dict, key: str, default: object) -> MetadataField:
        return MetadataField(f"{self.what}: {key!r}", mapping.get(key, default))

    def bad(self, expected: str) -> InvalidArgumentError:
        """The error saying this field must be ``expected`` (for the caller to raise)."""
        shown = repr(self.value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return InvalidArgumentError(
            f"transfer agent metadata is malformed: {self.what} must be {expected}, got {shown}"
        )

    def mapping(self) -> dict:
        if not isinstance(self.value, dict):
            raise self.bad("an object")
        return self.value

    def text(self, limit: int = 4096) -> str:
        if not isinstance(self.value, str) or len(self.value) > limit:
            raise self.bad(f"a string of at most {limit} characters")
        return self.value

    def name(self) -> str:
        value = self.text(128)
        if not value or not value.isprintable():
            raise self.bad("a printable string of 1..128 characters")
        return value

    def integer(self, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(f"an integer in {low}..{high}")
        return value

    def choice(self, *options: str) -> str:
        if self.value not in options:
            raise self.bad(" or ".join(repr(o) for o in options))
        return self.value


def local_identity(name: str, incarnation: str) -> AgentMetadata:
    return AgentMetadata(name, incarnation, host_name(), boot_id(), os.getpid(), process=_PROCESS_ID)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes of base64 ``text``; ``ValueError`` for anything that is not base64."""
    return base64.b64decode(text.encode("ascii"), validate=True)
