"""Files written whole, and JSON files read with typed errors.

Files written whole: a process killed while it writes, or a write that fails (a full disk), leaves the previous
file (or none), never a part.

Every file the package writes goes through :func:`write_file`: the benchmark's results (the JSON and CSV of
``sagellm-comm bench``, ``overlap`` and ``transfer``, the records of the ``bench/`` scripts, the plots) and the
generated parts of the documentation (``sagellm-comm config --update``, ``bench/make_docs_tables.py``).  The
content is written to a temporary file beside the target (same directory, so same file system), flushed to disk,
then renamed over the target with ``os.replace``, which swaps it in one step.  A process killed before the rename
leaves at most a hidden ``.<name>.<random>.tmp`` beside the target; the target itself is untouched.

:func:`read_json` reads the policy files a user hands the package (the all-reduce selector's, the fusion
policy's): a file that is missing, unreadable or not JSON is an ``InvalidArgumentError`` naming it.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import InvalidArgumentError

__all__ = ["read_json", "write_file", "write_text"]


def write_file(
    path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = False, exclusive: bool = False
) -> Path:
    """Call ``write(handle)`` on a new file and move it to ``path`` (parents made) only once it is complete.

    ``handle`` is a text file (UTF-8, no newline translation, as ``csv`` wants) unless ``binary``.  If ``write``
    raises, the temporary file is removed and ``path`` keeps what it held.  ``exclusive``: never replace a file; where
    ``path`` exists once the new file is complete (another process wrote it meanwhile), ``FileExistsError`` is raised
    and the new file removed (the complete file is linked to ``path``, which fails, in one step, if the name is taken).
    Returns ``path``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        text = {} if binary else {"encoding": "utf-8", "newline": ""}
        with open(fd, "wb" if binary else "w", **text) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _link_new(partial, out)
        else:
            os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def _link_new(partial: Path, out: Path) -> None:
    """Give ``partial`` the name ``out`` unless ``out`` exists (``FileExistsError``), then drop the name ``partial``.
    A file system without hard links gets the same check, then the rename, a step apart."""
    try:
        os.link(partial, out)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        if out.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(out)) from None
        os.replace(partial, out)
        return
    partial.unlink()


def write_text(path: str | Path, text: str, *, exclusive: bool = False) -> Path:
    """Write ``text`` to ``path`` whole (:func:`write_file`; ``exclusive``: never replace a file)."""
    return write_file(path, lambda handle: handle.write(text), exclusive=exclusive)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in the file at ``path``; ``what`` names the file in the ``InvalidArgumentError`` of a file
    that does not exist, cannot be read (a directory, no permission) or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"{what} {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{what} {path} is not valid JSON: {exc}") from exc
    except OSError as exc:  # a directory, no permission, ...
        raise InvalidArgumentError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
