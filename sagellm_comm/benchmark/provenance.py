"""Where a result came from: the commit and whether the tree was dirty (read from git), device, date, command.

Every result file (``sagellm-comm bench`` and the scripts under ``bench/``) records :func:`provenance`.
The commit is read from ``git rev-parse HEAD`` in the source tree of this package and the dirty flag from
``git status --porcelain --untracked-files=no`` (a modified or staged tracked file).  Only where git cannot
answer (a copied tree without ``.git``, no git installed, an installed package whose directory is not the
root of a checkout) is ``SAGELLM_COMMIT`` used, and the record says so (``commit_source``) with the dirty
flag unknown (None).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sagellm_comm.files import write_text

COMMIT_ENV = "SAGELLM_COMMIT"
SOURCE_TREE = Path(__file__).resolve().parents[2]  # the checkout this package was imported from
DISTRIBUTION = "isagellm-comm"  # the name pip knows this package by


@dataclass(frozen=True)
class GitState:
    """``commit``: full hash or ``"unknown"``; ``dirty``: True/False, None when unknown; ``source``: how."""

    commit: str
    dirty: bool | None
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


#: what ``git rev-parse --local-env-vars`` lists: set in the environment (a git hook, a dotfiles setup), they point
#: git at another repository, index or work tree than the one in ``cwd``
_GIT_REPOSITORY_ENV = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_INTERNAL_SUPER_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
)


def _git(*args: str, cwd: Path) -> str | None:
    env = {key: value for key, value in os.environ.items() if key not in _GIT_REPOSITORY_ENV}
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(tree: Path | str = SOURCE_TREE) -> GitState:
    """The commit of ``tree`` and its dirty flag, from git; the ``SAGELLM_COMMIT`` fallback only without git."""
    tree = Path(tree)
    top = _git("rev-parse", "--show-toplevel", cwd=tree) if tree.is_dir() else None
    ours = top is not None and Path(top.strip()).resolve() == tree.resolve()  # not an enclosing repo's commit
    head = _git("rev-parse", "HEAD", cwd=tree) if ours else None
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=tree) if head else None
    if head and head.strip() and status is not None:
        return GitState(head.strip(), bool(status.strip()), "git")
    if os.environ.get(COMMIT_ENV):
        return GitState(
            os.environ[COMMIT_ENV].strip(),
            None,
            f"environment variable {COMMIT_ENV} (git unavailable in {tree}; dirty state unknown)",
        )
    return GitState("unknown", None, f"none (git unavailable in {tree} and {COMMIT_ENV} unset)")


def commit_label(commit: str, dirty: bool | None) -> str:
    """``<12-hex commit>``, ``+ dirty`` when tracked files were modified, ``(dirty unknown)`` without git."""
    short = commit[:12]
    if dirty is None:
        return f"{short} (dirty unknown)"
    return f"{short} + dirty" if dirty else short


def package_version() -> str:
    """The installed distribution's version (its metadata); ``<pyproject version>+source`` for a source tree
    that is not installed; ``unknown`` when neither can be read."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        return tomllib.loads((SOURCE_TREE / "pyproject.toml").read_text())["project"]["version"] + "+source"
    except (ImportError, OSError, KeyError, ValueError):
        return "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (program name and arguments), shell-quoted."""
    args = sys.argv if argv is None else argv
    return " ".join([args[0], shlex.join(args[1:])]) if args else ""


def script_invocation() -> list[str]:
    """How this interpreter was told to run its main module: ``["-m", "bench.soak"]`` for ``python -m bench.soak``
    (``sys.argv[0]`` is then the module's file), else ``[sys.argv[0]]``, the script as given."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name:
        return ["-m", name.removesuffix(".__main__")]
    return sys.argv[:1]


def provenance(device: str, **extra: Any) -> dict:
    """The ``meta`` block of a script's result file: device, date, command, commit, dirty flag, versions."""
    import torch

    state = git_state()
    meta = {
        "device": device,
        "date": now_utc(),
        "command": command_line([os.path.basename(sys.executable), *script_invocation(), *sys.argv[1:]]),
        "commit": state.commit,
        "dirty": state.dirty,
        "commit_source": state.source,
        "torch": torch.__version__,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta.update(extra)
    return meta


def record_text(meta: dict, **sections: Any) -> str:
    """``{"meta": meta, **sections}`` as the indented JSON text of a record file."""
    return json.dumps({"meta": meta, **sections}, indent=1) + "\n"


def write_record(path: str | Path, meta: dict, **sections: Any) -> Path:
    """Write ``{"meta": meta, **sections}`` as indented JSON (:func:`record_text`) to ``path`` (parents created, the
    file replaced whole: :func:`~sagellm_comm.files.write_file`); returns the path."""
    return write_text(path, record_text(meta, **sections))
