"""One-sided block transfers between engine instances: the transport under KV-cache transfer.

``TransferAgent`` is one engine instance's endpoint: it registers memory pools once, hands out metadata
for peers (exchanged out of band), and moves lists of byte blocks to and from peers that join and leave at any
time, with a notification the receiver sees only after every byte.  Transports come from a registry
(``register_transfer_backend``): ``ipc`` (our block-copy kernel over CUDA IPC mappings, GPUs of one host) and
``nixl`` (NIXL over UCX: other hosts, CPU memory).  See docs/transfer.md.
"""

from sagellm_comm.kernels.block_copy import MAX_MESSAGE_BYTES as MAX_NOTIFY_BYTES
from sagellm_comm.transfer.agent import TransferAgent
from sagellm_comm.transfer.base import AgentContext, Link, Prepared, Request, TransferBackend
from sagellm_comm.transfer.descriptors import BlockLayout, RegionInfo
from sagellm_comm.transfer.handle import PreparedBlocks, TransferHandle
from sagellm_comm.transfer.registry import (
    list_transfer_backends,
    register_transfer_backend,
    transfer_backend_unavailable,
    unregister_transfer_backend,
)
from sagellm_comm.transfer.shared import shared_cpu_tensor

__all__ = [
    "MAX_NOTIFY_BYTES",
    "AgentContext",
    "BlockLayout",
    "Link",
    "Prepared",
    "PreparedBlocks",
    "RegionInfo",
    "Request",
    "TransferAgent",
    "TransferBackend",
    "TransferHandle",
    "list_transfer_backends",
    "register_transfer_backend",
    "shared_cpu_tensor",
    "transfer_backend_unavailable",
    "unregister_transfer_backend",
]
