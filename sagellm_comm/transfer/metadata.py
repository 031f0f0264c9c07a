"""An agent's metadata: the bytes an engine hands to peers out of band (``TransferAgent.metadata()``).

It says who the agent is (name, incarnation: a fresh id per agent object, so a restarted peer with the same
name is told apart), where it runs (host, boot id, process id), which regions it registered (name, size,
dtype, device kind) and, per transport it offers, that transport's own description (NIXL's agent metadata;
the ipc path's handles, notification inbox and probe).

Encoding: a magic line, then JSON (binary fields in base64).  JSON, not pickle: the bytes come from another
process, and reading them must never run code.  A malformed or foreign blob is an
:class:`~sagellm_comm.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache

from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.transfer.descriptors import RegionInfo

MAGIC = b"sagellm-transfer-agent/1\n"


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

    def same_host(self, other: AgentMetadata) -> bool:
        """Both agents run on one machine (same host name and, where known, the same boot)."""
        return self.host == other.host and (not self.boot_id or not other.boot_id or self.boot_id == other.boot_id)

    def same_process(self, other: AgentMetadata) -> bool:
        return self.same_host(other) and self.pid == other.pid

    def encode(self) -> bytes:
        body = {
            "name": self.name,
            "incarnation": self.incarnation,
            "host": self.host,
            "boot_id": self.boot_id,
            "pid": self.pid,
            "regions": {name: info.to_json() for name, info in self.regions.items()},
            "transports": self.transports,
        }
        return MAGIC + json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> AgentMetadata:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes) or not data.startswith(MAGIC):
            head = data[:32] if isinstance(data, bytes) else type(data).__name__
            raise InvalidArgumentError(
                f"not a transfer agent's metadata (expected bytes from TransferAgent.metadata(), got {head!r})"
            )
        try:
            body = json.loads(data[len(MAGIC) :])
            return cls(
                name=str(body["name"]),
                incarnation=str(body["incarnation"]),
                host=str(body["host"]),
                boot_id=str(body["boot_id"]),
                pid=int(body["pid"]),
                regions={name: RegionInfo.from_json(name, info) for name, info in body["regions"].items()},
                transports={str(k): dict(v) for k, v in body["transports"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgumentError(f"transfer agent metadata is malformed: {exc!r}") from None


def local_identity(name: str, incarnation: str) -> AgentMetadata:
    return AgentMetadata(name, incarnation, host_name(), boot_id(), os.getpid())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))
