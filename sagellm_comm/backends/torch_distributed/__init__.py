"""CommBackend over torch.distributed: Gloo (CPU), NCCL (NVIDIA), RCCL (ROCm), HCCL (Ascend, torch_npu).

Importing this package registers the four kinds.  :class:`TorchDistributedBackend` is in :mod:`.adapter`;
the engines' data and probes in :mod:`.engines`.
"""

from .adapter import TorchDistributedBackend
from .engines import ENGINES, Engine

__all__ = ["ENGINES", "Engine", "TorchDistributedBackend"]
