"""CuPy, which the custom kernels need on CUDA for IPC handles: is it here, and how to install it.

The one probe and the one install hint; everything that needs CuPy asks here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sagellm_comm.errors import BackendNotSupportedError

__all__ = ["CUPY_INSTALL_HINT", "cupy_present", "require_cupy"]

#: the extras of pyproject.toml, one per CUDA major version
CUPY_INSTALL_HINT = "pip install 'isagellm-comm[cuda13]' (CUDA 13) or 'isagellm-comm[cuda12]' (CUDA 12)"


def require_cupy(what: str) -> ModuleType:
    """The ``cupy`` module; :class:`BackendNotSupportedError` saying ``what`` needs it and how to install it.

    Imports it (cached after the first call), so a CuPy that is installed but cannot load counts as absent,
    with its import error in the message.
    """
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        raise BackendNotSupportedError(
            f"{what} needs CuPy for CUDA IPC handles: {CUPY_INSTALL_HINT} ({exc})", details={"missing": "cupy"}
        ) from exc


def cupy_present() -> bool:
    """True when ``cupy`` imports."""
    try:
        require_cupy("this check")
    except BackendNotSupportedError:
        return False
    return True
