"""Which transports UCX picked under NIXL, read from UCX's own protocol-selection tables.

UCX chooses a transport per endpoint configuration silently (``cma``, ``posix``, ``tcp``, ``cuda_ipc``,
``rc_mlx5``...); a fallback to TCP for GPU memory is the slow path users of NIXL most often miss.  UCX prints
what it selected when ``UCX_PROTO_INFO=y``: a table per operation, headed ``| <worker> <locality> cfg#<n>`` (the
worker is the NIXL agent's name as UCX keeps it, its first 31 bytes, spaces included; the locality ``self``,
``intra-node`` or ``inter-node``) with a ``Config`` column naming ``transport/device`` per message-size range.
Each worker prints a configuration once, when its first operation selects protocols: a later peer that shares an
earlier one's configuration prints nothing new.  Its log goes to ``UCX_LOG_FILE`` instead of stdout when that is
set.

:func:`install` sets both (a per-process file in the temporary directory) unless the user set them, before the
first NIXL agent loads UCX (UCX reads them when its library loads and when a context is created); an
environment that already set ``UCX_LOG_FILE`` is read where it points.  For a process that runs for weeks, the
file is bounded by UCX's own rotation (``UCX_LOG_FILE_SIZE`` per file, ``UCX_LOG_FILE_ROTATE`` older files
``<file>.1``...; UCX renames them when a whole message would not fit, so a table never straddles two files) unless
the user set those.

:class:`UcxLog` reads the file incrementally: it keeps the file it reads open (a file UCX rotated away, even
removed, is read to its end before the files written after it), reads each byte once (a line longer than
:data:`LINE_MAX`, which no table has, is dropped rather than kept whole), and keeps what it parsed: the transports
of the newest configuration of each (watched agent, locality), so a peer whose tables UCX printed long ago, in a
file rotated away since, is still described.  It summarises the transports of the remote-memory
(RMA) operations and of active messages (NIXL's notifications).  UCX warnings and errors read are forwarded to this
package's logger, so moving UCX's log to a file hides nothing.  Lines whose prefix ``[<time>] [<host>:<pid>:...]``
names another process (a ``UCX_LOG_FILE`` several processes share) are skipped.  Agents of one process whose names
share their first 31 bytes get identical headers: their transports are reported as ambiguous, never mixed up.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import multiprocessing.util
import os
import re
import socket
import tempfile
import threading

logger = logging.getLogger("sagellm_comm.transfer")

_HEADER = re.compile(r"\| (.+) (self|intra-node|inter-node) cfg#(\d+) *\|\s*$")  # the name may hold spaces
_WRITER = re.compile(r"^\[[\d.]+\] \[[^:\]]*:(\d+) *:\d+\]")  # UCX's line prefix: [time] [host:pid:thread]
_ROW = re.compile(r"\|\s*[\d.]+(?:inf)?\s*\|[^|]*\|([^|]*)\|\s*$")
_TRANSPORT = re.compile(r"[\w.-]+/[\w.:-]+")
_INSTALLED: UcxLog | None = None
LOG_PREFIX = "sagellm-ucx-"
FILE_SIZE = "1m"  # UCX_LOG_FILE_SIZE of the file install() creates: one peer's tables take about 12 KiB
FILE_ROTATE = "1"  # UCX_LOG_FILE_ROTATE: the file and one older one, at most 2 MiB on disk
_NO_CONFIG: tuple[int, dict] = (-1, {})  # what is kept for an (agent, locality) with no table yet (read only)
LINE_MAX = 64 << 10  # the longest line kept (UCX's table lines take under 200 bytes); a longer one is dropped
READ_BYTES = 1 << 20  # the file is read in pieces of this size
UCX_NAME_BYTES = 31  # UCX keeps a worker's name in 32 bytes, the last one the terminating NUL


def ucx_name(agent: str) -> str:
    """The name UCX prints in its tables for the worker of NIXL agent ``agent``: the first 31 bytes of its UTF-8,
    decoded as this module decodes UCX's log (a character cut in two becomes U+FFFD)."""
    return agent.encode()[:UCX_NAME_BYTES].decode(errors="replace")


class UcxLog:
    """A UCX log file (and the older files UCX rotated it into) and the protocol tables read from it."""

    def __init__(self, path: str | None, why_not: str = ""):
        self.path = path
        self.why_not = why_not
        self._lock = threading.Lock()
        self._handle = None  # the file being read, open (UCX may rename or remove it meanwhile)
        self._partial = b""  # the start of a line UCX has not finished writing (at most LINE_MAX bytes)
        self._overlong = False  # the line being read passed LINE_MAX: dropped up to its newline
        self._table: tuple[str, str, int] | None = None  # (UCX name, locality, config) of the table being read
        self._kind: str | None = None  # "rma" or "am": which operations the table's rows are for
        self._watched: collections.Counter[str] = collections.Counter()  # agent -> live NIXL agents of that name
        # UCX name -> the agents watched under it since it was last unwatched by all (more than one: ambiguous)
        self._sharers: dict[str, set[str]] = {}
        self._newest: dict[tuple[str, str], tuple[int, dict[str, set[str]]]] = {}  # (UCX name, locality) -> config

    def watch(self, agent: str) -> None:
        """Parse the tables of UCX worker ``agent`` from now on (a NIXL agent of that name was just made: tables
        of an earlier one of that name, written before, are not its own)."""
        with self._lock:
            self._read_new()
            name = ucx_name(agent)
            if name not in self._sharers:
                self._forget(name)
                self._sharers[name] = set()
            self._sharers[name].add(agent)
            self._watched[agent] += 1

    def unwatch(self, agent: str) -> None:
        """Stop parsing ``agent``'s tables and drop what was kept of them (its NIXL agent was closed)."""
        with self._lock:
            self._watched[agent] -= 1
            if self._watched[agent] <= 0:
                del self._watched[agent]
            name = ucx_name(agent)
            if not any(ucx_name(live) == name for live in self._watched):
                self._sharers.pop(name, None)
                self._forget(name)

    def _forget(self, name: str) -> None:
        if self._table is not None and self._table[0] == name:
            self._table = None
        for key in [key for key in self._newest if key[0] == name]:
            del self._newest[key]

    def ambiguous(self, agent: str) -> list[str]:
        """The agents of this process, ``agent`` among them, whose tables UCX printed under one name since that
        name was last free (their names share the first 31 bytes); ``[]`` when ``agent``'s tables are its own."""
        with self._lock:
            sharers = self._sharers.get(ucx_name(agent), set())
            return sorted(sharers) if len(sharers) > 1 else []

    def transports(self, agent: str, locality: str) -> dict[str, list[str]]:
        """``{"rma": [...], "am": [...]}``: the transports of agent ``agent``'s newest endpoint configuration of
        ``locality``, after reading what UCX wrote since the last call (forwarding its warnings); ``{}`` when
        they cannot be told from another agent's (:meth:`ambiguous`)."""
        with self._lock:
            self._read_new()
            name = ucx_name(agent)
            if len(self._sharers.get(name, ())) > 1:
                return {}
            _, kinds = self._newest.get((name, locality), _NO_CONFIG)
            return {kind: sorted(names) for kind, names in kinds.items() if names}

    def describe(self, agent: str, locality: str) -> str:
        if not self.path:
            return f"UCX's transport choice is not visible: {self.why_not}"
        sharers = self.ambiguous(agent)
        if sharers:
            return (f"UCX's transport choice is ambiguous: UCX names a worker by its first {UCX_NAME_BYTES} bytes, "
                    f"{ucx_name(agent)!r}, which agents {sharers} of this process share; give agents names that "
                    "differ in their first 31 bytes")  # fmt: skip
        chosen = self.transports(agent, locality)
        if not chosen:
            return "UCX printed no protocol table for this peer (UCX_PROTO_INFO is off?)"
        parts = [f"{label}: {', '.join(chosen[kind])}" for kind, label in (("rma", "RMA"), ("am", "notify"))
                 if kind in chosen]  # fmt: skip
        return "UCX " + "; ".join(parts)

    # ------------------------------------------------------------------------------------------------ reading
    def _read_new(self) -> None:
        """Parse every complete line written since the last call, in the order UCX wrote them (lock held)."""
        if not self.path:
            return
        if self._handle is None:
            self._handle = _open(self.path)
            if self._handle is None:
                return
        self._consume(self._handle)
        newer = self._written_after(os.fstat(self._handle.fileno()).st_ino)
        if not newer:
            return
        self._handle.close()
        self._end_of_file()
        for handle in newer[:-1]:
            with handle:
                self._consume(handle)
            self._end_of_file()
        self._handle = newer[-1]
        self._consume(self._handle)

    def _written_after(self, inode: int) -> list:
        """The files UCX wrote after the one of ``inode`` (it rotated that one away), oldest first, open; ``[]``
        while that one is still the current file."""
        try:
            if os.stat(self.path).st_ino == inode:
                return []
        except OSError:
            return []  # between UCX's removal of a full file and its reopening: read on at the next call
        directory, base = os.path.split(self.path)
        try:
            names = os.listdir(directory or ".")
        except OSError:
            return []
        older = sorted((int(name[len(base) + 1 :]), name) for name in names
                       if name.startswith(base + ".") and name[len(base) + 1 :].isdigit())  # fmt: skip
        candidates = [os.path.join(directory, name) for _, name in reversed(older)] + [self.path]
        handles = [handle for handle in map(_open, candidates) if handle is not None]
        inodes = [os.fstat(handle.fileno()).st_ino for handle in handles]
        start = inodes.index(inode) + 1 if inode in inodes else 0  # gone: every file kept is newer
        for handle in handles[:start]:
            handle.close()
        return handles[start:]

    def _consume(self, handle) -> None:
        if os.fstat(handle.fileno()).st_size < handle.tell():  # truncated in place (not UCX's way): start over
            handle.seek(0)
            self._partial, self._overlong = b"", False
        while chunk := handle.read(READ_BYTES):
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        """Parse the lines ``chunk`` completes; keep its unfinished end, or drop it once that line passed LINE_MAX
        (memory and time stay linear in what is read, whatever is in the file)."""
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            line, self._partial = self._partial + line, b""
            if self._overlong:
                self._overlong = False  # the end of a line too long to keep
            elif len(line) <= LINE_MAX:
                self._parse(line.decode(errors="replace"))
        if self._overlong or len(self._partial) + len(rest) > LINE_MAX:
            self._partial, self._overlong = b"", True
        else:
            self._partial += rest

    def _end_of_file(self) -> None:
        if self._partial and not self._overlong:
            self._parse(self._partial.decode(errors="replace"))
        self._partial, self._overlong = b"", False

    def _parse(self, line: str) -> None:
        writer = _WRITER.match(line)
        if writer and int(writer.group(1)) != os.getpid():
            return  # another process's line, in a log file it shares with this one
        body = line[writer.end() :].lstrip() if writer else line.lstrip()
        if not body.startswith(("|", "+")) and (" WARN " in line or " ERROR " in line):  # a table holds names
            logger.warning("UCX: %s", line.split("]", 2)[-1].strip())
            return
        header = _HEADER.search(line)
        if header:
            name, locality, config = header.group(1), header.group(2), int(header.group(3))
            self._table, self._kind = None, None
            if name not in self._sharers:
                return
            newest, _ = self._newest.get((name, locality), _NO_CONFIG)
            if config > newest:
                self._newest[(name, locality)] = (config, {})
            if config >= newest:
                self._table = (name, locality, config)
            return
        if self._table is None:
            return
        if "remote memory" in line:
            self._kind = "rma"
        elif "active message" in line:
            self._kind = "am"
        elif self._kind is not None:
            row = _ROW.search(line)
            if row:
                kinds = self._newest[self._table[:2]][1]
                kinds.setdefault(self._kind, set()).update(_TRANSPORT.findall(row.group(1)))


def _open(path: str):
    try:
        return open(path, "rb")  # noqa: SIM115 (kept open across calls; closed when UCX rotates it away)
    except OSError:
        return None


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
    # Ours, as a parent process of ours left it in the environment this one inherited: UCX expands its %p to each
    # process's own pid, so this process gets a file of its own, which is ours to remove.
    ours = os.path.join(tempfile.gettempdir(), f"{LOG_PREFIX}%p.log")
    if os.environ.get("UCX_PROTO_INFO", "").lower() in ("n", "no", "0", "off"):
        _INSTALLED = UcxLog(None, "UCX_PROTO_INFO is off in the environment")
    elif user_file and user_file != ours:
        path = user_file.replace("%p", str(os.getpid())).replace("%h", socket.gethostname())
        os.environ.setdefault("UCX_PROTO_INFO", "y")
        _INSTALLED = UcxLog(path)
    elif _ucx_loaded():
        _INSTALLED = UcxLog(None, "UCX was loaded before the first transfer agent, so its log could not be redirected")
    else:
        _sweep()
        path = ours.replace("%p", str(os.getpid()))
        os.environ["UCX_PROTO_INFO"] = "y"
        os.environ["UCX_LOG_FILE"] = ours  # a child process inherits the pattern, not this process's file
        os.environ.setdefault("UCX_LOG_FILE_SIZE", FILE_SIZE)
        os.environ.setdefault("UCX_LOG_FILE_ROTATE", FILE_ROTATE)
        atexit.register(_remove_all, path, os.getpid())
        # multiprocessing children leave through os._exit, skipping atexit; its own exit hook runs there
        multiprocessing.util.Finalize(None, _remove_all, args=(path, os.getpid()), exitpriority=0)
        _INSTALLED = UcxLog(path)
    return _INSTALLED


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_all(path: str, owner: int) -> None:
    """Remove the log at ``path`` and the older files UCX rotated it into (``path.1``...), in process ``owner``
    only: a forked child inherits the exit hooks, not the file."""
    if os.getpid() != owner:
        return
    directory, base = os.path.split(path)
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name == base or (name.startswith(base + ".") and name[len(base) + 1 :].isdigit()):
                _remove(os.path.join(directory, name))


def _sweep() -> None:
    """Remove the logs of processes that are gone (killed ones never ran their exit hooks), rotated ones too."""
    directory = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(LOG_PREFIX):
                continue
            pid, _, rest = name[len(LOG_PREFIX) :].partition(".log")
            if pid.isdigit() and (not rest or rest[1:].isdigit()) and not os.path.exists(f"/proc/{pid}"):
                _remove(os.path.join(directory, name))
