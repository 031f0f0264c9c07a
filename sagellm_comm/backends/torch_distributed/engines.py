"""What each torch.distributed engine is and whether it can run here (vendor probing).

One adapter class serves Gloo, NCCL, RCCL and HCCL; what differs between them is data, one :class:`Engine`
per kind in :data:`ENGINES`.  ``Engine.require()`` raises :class:`BackendNotSupportedError` naming what is
missing (torch build, library, device), so the registry can say why a kind is unavailable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sagellm_comm.backend import ReduceOp
from sagellm_comm.errors import BackendNotSupportedError

__all__ = ["ENGINES", "Engine", "npu_api", "pick_device"]


def _require_gloo() -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        raise BackendNotSupportedError("gloo needs torch built with torch.distributed and Gloo")


def _require_nccl() -> None:
    if torch.version.hip is not None:
        raise BackendNotSupportedError("nccl needs a CUDA build of torch; this is a ROCm build: use 'rccl'")
    if torch.version.cuda is None or not dist.is_nccl_available():
        raise BackendNotSupportedError(
            f"nccl needs a CUDA build of torch and a GPU; torch {torch.__version__} has no CUDA/NCCL"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendNotSupportedError("nccl needs a CUDA build of torch and a GPU; no GPU is visible")


def _require_rccl() -> None:
    if torch.version.hip is None:
        raise BackendNotSupportedError(
            f"rccl needs a ROCm build of torch (torch.version.hip is None in torch {torch.__version__})"
        )
    if not dist.is_nccl_available():
        raise BackendNotSupportedError("rccl needs torch built with RCCL (dist.is_nccl_available() is False)")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendNotSupportedError("rccl needs an AMD GPU; none is visible to torch")


def npu_api() -> Any:
    """The ``torch_npu.npu`` device API; importing torch_npu registers the 'hccl' process group."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError as exc:
        raise BackendNotSupportedError(
            f"hccl needs torch_npu (pip install torch_npu matching torch {torch.__version__}): {exc}"
        ) from exc
    return torch_npu.npu


def _require_hccl() -> None:
    npu = npu_api()
    if not npu.is_available() or npu.device_count() == 0:
        raise BackendNotSupportedError("hccl needs an Ascend NPU; torch_npu sees none")
    if not hasattr(dist.Backend, "HCCL"):
        raise BackendNotSupportedError("hccl needs torch_npu to register the 'hccl' process-group backend")


@dataclass(frozen=True)
class Engine:
    """What one kind needs from torch.distributed.

    Attributes:
        kind: our name (``"rccl"``); torch_backend: torch's (``"nccl"`` on ROCm too).
        device_type: where tensors live; host_blocking: operations complete on the host (Gloo).
        native_avg: the engine reduces AVG itself (else SUM then divide, exact for floats).
        bitwise_ops: the engine offers BAND/BOR/BXOR.
        priority: rank of this kind in the registry's ``auto`` choice.
        require: raises :class:`BackendNotSupportedError` naming what is missing here.
        collective_dtypes: the dtypes the engine's collectives take, checked before it is called (None: the
            engine's own check applies).  send/recv move bytes and take any dtype.
    """

    kind: str
    torch_backend: str
    device_type: str
    host_blocking: bool
    native_avg: bool
    bitwise_ops: bool
    priority: int
    require: Callable[[], None]
    collective_dtypes: frozenset[torch.dtype] | None = None


#: the dtypes Gloo's collectives take (the type switch of torch's ProcessGroupGloo: "Invalid scalar type" for any
#: other); complex tensors travel as pairs of their real dtype
GLOO_DTYPES = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex32,
        torch.complex64,
        torch.complex128,
    }
)

ENGINES: dict[str, Engine] = {
    "gloo": Engine("gloo", "gloo", "cpu", True, False, True, 0, _require_gloo, GLOO_DTYPES),
    "nccl": Engine("nccl", "nccl", "cuda", False, True, False, 50, _require_nccl),
    "rccl": Engine("rccl", "nccl", "cuda", False, True, False, 50, _require_rccl),
    "hccl": Engine("hccl", "hccl", "npu", False, False, False, 40, _require_hccl),
}

# torch 2.13 renamed the flat-tensor collectives; older torch (>= 2.4) has only the old names
ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: our ReduceOp -> the name of torch.distributed.ReduceOp's member
TORCH_OPS = {
    ReduceOp.SUM: "SUM",
    ReduceOp.AVG: "AVG",
    ReduceOp.MAX: "MAX",
    ReduceOp.MIN: "MIN",
    ReduceOp.PRODUCT: "PRODUCT",
    ReduceOp.BAND: "BAND",
    ReduceOp.BOR: "BOR",
    ReduceOp.BXOR: "BXOR",
}


def pick_device(engine: Engine, local_rank: int) -> torch.device:
    """This rank's device: the CPU for Gloo, else ``<type>:<local_rank % device_count>``, made current."""
    if engine.device_type == "cpu":
        return torch.device("cpu")
    api = npu_api() if engine.device_type == "npu" else torch.cuda
    device = torch.device(engine.device_type, local_rank % api.device_count())
    api.set_device(device.index)
    return device


def capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph (False without CUDA): a host-blocking
    engine (Gloo) must refuse then, before it enqueues anything."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
