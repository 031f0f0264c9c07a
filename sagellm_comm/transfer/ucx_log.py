"""Which transports UCX picked under NIXL, read from UCX's own protocol-selection tables.

UCX chooses a transport per endpoint configuration silently (``cma``, ``posix``, ``tcp``, ``cuda_ipc``,
``rc_mlx5``...); a fallback to TCP for GPU memory is the slow path users of NIXL most often miss.  UCX prints
what it selected when ``UCX_PROTO_INFO=y``: a table per operation, headed ``<worker> <locality> cfg#<n>`` (the
worker is the NIXL agent's name; the locality ``self``, ``intra-node`` or ``inter-node``) with a ``Config`` column
naming ``transport/device`` per message-size range.  Its log goes to ``UCX_LOG_FILE`` instead of stdout when
that is set.

:func:`install` sets both (a per-process file in the temporary directory) unless the user set them, before the
first NIXL agent loads UCX (UCX reads them when its library loads and when a context is created); an
environment that already set ``UCX_LOG_FILE`` is read where it points.  :class:`UcxLog` then reads the tables
written since a given offset and summarises the transports of the remote-memory (RMA) operations and of active
messages (NIXL's notifications).  UCX warnings and errors found in the file are forwarded to this package's
logger, so moving UCX's log to a file hides nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util
import os
import re
import socket
import tempfile

logger = logging.getLogger("sagellm_comm.transfer")

_HEADER = re.compile(r"\|\s*(\S+)\s+(self|intra-node|inter-node)\s+cfg#(\d+)\s*\|")
_ROW = re.compile(r"\|\s*[\d.]+(?:inf)?\s*\|[^|]*\|([^|]*)\|\s*$")
_TRANSPORT = re.compile(r"[\w.-]+/[\w.:-]+")
_INSTALLED: UcxLog | None = None


class UcxLog:
    """A UCX log file and the protocol tables in it."""

    def __init__(self, path: str | None, why_not: str = ""):
        self.path = path
        self.why_not = why_not
        self._forwarded = 0

    def size(self) -> int:
        try:
            return os.path.getsize(self.path) if self.path else 0
        except OSError:
            return 0

    def _lines(self, offset: int) -> list[str]:
        if not self.path:
            return []
        try:
            with open(self.path, errors="replace") as handle:
                handle.seek(offset)
                return handle.read().splitlines()
        except OSError:
            return []

    def forward_warnings(self) -> None:
        """Log UCX's own warnings and errors written since the last call."""
        lines = self._lines(self._forwarded)
        self._forwarded = self.size()
        for line in lines:
            if " WARN " in line or " ERROR " in line:
                logger.warning("UCX: %s", line.split("]", 2)[-1].strip())

    def transports(self, agent: str, locality: str) -> dict[str, list[str]]:
        """``{"rma": [...], "am": [...]}``: the transports of agent ``agent``'s most recent endpoint configuration
        of ``locality`` (UCX prints each configuration once, when its first operation selects protocols)."""
        found: dict[str, dict[str, set[str]]] = {}
        config, kind = None, None
        for line in self._lines(0):
            header = _HEADER.search(line)
            if header:
                config = (header.group(3)) if header.group(1) == agent and header.group(2) == locality else None
                kind = None
                continue
            if config is None:
                continue
            if "remote memory" in line:
                kind = "rma"
            elif "active message" in line:
                kind = "am"
            elif kind is not None:
                row = _ROW.search(line)
                if row:
                    found.setdefault(config, {}).setdefault(kind, set()).update(_TRANSPORT.findall(row.group(1)))
        if not found:
            return {}
        latest = found[max(found, key=int)]
        return {kind: sorted(names) for kind, names in latest.items()}

    def describe(self, agent: str, locality: str) -> str:
        if not self.path:
            return f"UCX's transport choice is not visible: {self.why_not}"
        chosen = self.transports(agent, locality)
        if not chosen:
            return "UCX printed no protocol table for this peer (UCX_PROTO_INFO is off?)"
        parts = [f"{label}: {', '.join(chosen[kind])}" for kind, label in (("rma", "RMA"), ("am", "notify"))
                 if kind in chosen]  # fmt: skip
        return "UCX " + "; ".join(parts)


def _ucx_loaded() -> bool:
    try:
        with open("/proc/self/maps") as handle:
            return "libucs" in handle.read()
    except OSError:
        return False


def install() -> UcxLog:
    """Arrange for UCX's protocol tables to be readable (once per process; see the module docstring)."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    user_file = os.environ.get("UCX_LOG_FILE")
    if os.environ.get("UCX_PROTO_INFO", "").lower() in ("n", "no", "0", "off"):
        _INSTALLED = UcxLog(None, "UCX_PROTO_INFO is off in the environment")
    elif user_file:
        path = user_file.replace("%p", str(os.getpid())).replace("%h", socket.gethostname())
        os.environ.setdefault("UCX_PROTO_INFO", "y")
        _INSTALLED = UcxLog(path)
    elif _ucx_loaded():
        _INSTALLED = UcxLog(None, "UCX was loaded before the first transfer agent, so its log could not be redirected")
    else:
        _sweep()
        path = os.path.join(tempfile.gettempdir(), f"{LOG_PREFIX}{os.getpid()}.log")
        os.environ["UCX_PROTO_INFO"] = "y"
        os.environ["UCX_LOG_FILE"] = path
        atexit.register(_remove, path)
        # multiprocessing children leave through os._exit, skipping atexit; its own exit hook runs there
        multiprocessing.util.Finalize(None, _remove, args=(path,), exitpriority=0)
        _INSTALLED = UcxLog(path)
    return _INSTALLED


LOG_PREFIX = "sagellm-ucx-"


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _sweep() -> None:
    """Remove the logs of processes that are gone (killed ones never ran their exit hooks)."""
    directory = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            pid = name[len(LOG_PREFIX) : -len(".log")] if name.startswith(LOG_PREFIX) and name.endswith(".log") else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _remove(os.path.join(directory, name))
