"""sagellm-comm: the communication layer of an LLM inference engine.

One :class:`CommBackend` interface over Gloo / NCCL / RCCL / HCCL (torch.distributed) and the
intra-node custom kernels, chosen by a registry; groups and module-level collectives; topology.

Importing this package is cheap: it loads the interface modules only (torch, not triton or cupy).
Engines are imported when the registry is first consulted.  Heavier parts are exported lazily
through ``_LAZY`` below (name -> module); add an entry there to export one.
"""

from __future__ import annotations

import importlib
from typing import Any

from sagellm_comm.backend import (
    CommBackend,
    CommOp,
    CompletedWork,
    GroupHandle,
    ReduceOp,
    Work,
    get_comm_backend,
    is_comm_backend_available,
    list_comm_backends,
    register_comm_backend,
    unregister_comm_backend,
)
from sagellm_comm.config import CommConfig
from sagellm_comm.errors import (
    BackendNotSupportedError,
    CollectiveFailedError,
    CollectiveMismatchError,
    CommError,
    CommTimeoutError,
    ConfigMismatchError,
    ErrorCode,
    GroupInvalidError,
    GroupNotFoundError,
    InvalidArgumentError,
    NotImplementedCommError,
    NotInitializedError,
    P2PFailedError,
    PeerLostError,
    RankMismatchError,
    ShapeMismatchError,
    TransferError,
    UnavailableError,
    WorkspaceExhaustedError,
)
from sagellm_comm.group import (
    CollectiveOps,
    CommGroup,
    destroy,
    get_default_backend,
    get_default_group,
    init,
)
from sagellm_comm.topology import GPUInfo, Topology

__version__ = "0.1.0"

#: public names served on first access: name -> module that defines it
_LAZY: dict[str, str] = {
    "TorchDistributedBackend": "sagellm_comm.backends.torch_distributed",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sagellm_comm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendNotSupportedError",
    "CollectiveFailedError",
    "CollectiveMismatchError",
    "CollectiveOps",
    "CommBackend",
    "CommConfig",
    "CommError",
    "CommGroup",
    "CommOp",
    "CommTimeoutError",
    "CompletedWork",
    "ConfigMismatchError",
    "ErrorCode",
    "GPUInfo",
    "GroupHandle",
    "GroupInvalidError",
    "GroupNotFoundError",
    "InvalidArgumentError",
    "NotImplementedCommError",
    "NotInitializedError",
    "P2PFailedError",
    "PeerLostError",
    "RankMismatchError",
    "ReduceOp",
    "ShapeMismatchError",
    "Topology",
    "TorchDistributedBackend",
    "TransferError",
    "UnavailableError",
    "Work",
    "WorkspaceExhaustedError",
    "__version__",
    "destroy",
    "get_comm_backend",
    "get_default_backend",
    "get_default_group",
    "init",
    "is_comm_backend_available",
    "list_comm_backends",
    "register_comm_backend",
    "unregister_comm_backend",
]
