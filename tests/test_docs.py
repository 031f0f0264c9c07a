"""The documentation keeps its word: every Python snippet of README.md and docs/*.md runs as written,
``.ci/run`` runs exactly the README's test command, docs/architecture.md names every module, and every file path
the docs name exists.

Snippets: every fenced ``python`` block is a case, named ``FILE:LINE``.  An HTML comment on the line just
before the fence says how it runs (it is invisible on a rendered page):

* no comment: a script, one process, on the CPU;
* ``<!-- snippet: processes N -->``: N processes of the script, each given its rank as its argument and
  torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, and ``MASTER_ADDR``/``MASTER_PORT`` of a
  store this test hosts, which every rank joins as a client);
* ``<!-- snippet: skip REASON -->``: not run here (it needs GPUs, for instance); reported as skipped with
  REASON.

Any other ``snippet:`` comment fails, so a typo cannot silently skip a snippet.  Each script runs in a
temporary directory (files it writes land there) with this checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.script_processes import REPO, run_script_ranks, script_env, start_script

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPET_TIMEOUT_S = 180.0
_MARK = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    how: str  # "", "processes N" or "skip REASON"

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The fenced ``python`` blocks of ``path`` with the ``snippet:`` comment just before each (if any)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, end = i, i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            mark = _MARK.match(lines[start - 1].strip()) if start else None
            code = "\n".join(lines[start + 1 : end]) + "\n"
            found.append(Snippet(path, start + 1, code, mark.group(1) if mark else ""))
            i = end
        i += 1
    return found


ALL = [s for path in DOCS for s in snippets(path)]


@pytest.mark.parametrize("snippet", ALL, ids=[s.name for s in ALL])
def test_snippet_runs_as_written(snippet: Snippet, tmp_path: Path) -> None:
    how = snippet.how.split(maxsplit=1)
    if how and how[0] == "skip":
        assert len(how) == 2, f"{snippet.name}: 'snippet: skip' needs a reason"
        pytest.skip(f"{snippet.name}: {how[1]}")
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)
    if not how:
        proc = start_script(script, [], script_env(script))
        try:
            out, err = proc.communicate(timeout=SNIPPET_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        outcomes = [(proc.returncode, out, err)]
    elif how[0] == "processes" and len(how) == 2 and how[1].isdigit():
        outcomes = run_script_ranks(script, int(how[1]), SNIPPET_TIMEOUT_S)
    else:
        pytest.fail(f"{snippet.name}: unknown '<!-- snippet: {snippet.how} -->' (see tests/test_docs.py)")
    for rank, (status, out, err) in enumerate(outcomes):
        assert status == 0, f"{snippet.name}, process {rank} exited {status}:\n{out[-2000:]}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{snippet.name}, process {rank}:\n{err[-3000:]}"


def test_every_python_fence_is_found() -> None:
    """The parser sees every ```python fence (an indented or misspelt fence would escape the test)."""
    for path in DOCS:
        text = path.read_text()
        fences = [line for line in text.splitlines() if re.match(r"^[ \t]*```[ \t]*py", line, re.IGNORECASE)]
        assert all(line == "```python" for line in fences), f"{path}: a Python fence the test would not run: {fences}"
        assert len(snippets(path)) == len(fences), path


# ------------------------------------------------------------------------------------- README and CI


def _readme_command(intro: str) -> str:
    """The one command line of the bash block that follows the README paragraph ending in ``intro``."""
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(intro) + r"\s*```bash\n(.*?)\n```", text, re.DOTALL)
    assert block is not None, f"README.md has no bash block after {intro!r}"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_ci_runs_exactly_the_readme_test_command_in_a_fresh_venv() -> None:
    command = _readme_command("Install and run the tests:")
    ci = (REPO / ".ci" / "run").read_text()
    assert command in [line.strip() for line in ci.splitlines()], f".ci/run does not run {command!r}"
    assert "-m venv" in ci and "/bin/activate" in ci  # a fresh virtual environment, not the caller's
    assert os.access(REPO / ".ci" / "run", os.X_OK)


def test_readme_names_the_examples_and_their_extra() -> None:
    text = (REPO / "README.md").read_text()
    assert "examples/llama_tp.py" in text and '".[examples]"' in text
    for example in (REPO / "examples").glob("*.py"):
        assert f"examples/{example.name}" in text, f"README.md does not mention examples/{example.name}"


# ------------------------------------------------------------------------------------- the map and its paths


def test_architecture_names_every_module_and_example() -> None:
    """docs/architecture.md is the map: every module of the package and every example is named there."""
    text = (REPO / "docs" / "architecture.md").read_text()
    files = [p for p in sorted((REPO / "sagellm_comm").rglob("*.py")) if p.name != "__init__.py"]
    files += sorted((REPO / "examples").glob("*.py"))
    missing = [str(p.relative_to(REPO)) for p in files if not re.search(rf"(?<![\w.]){re.escape(p.name)}\b", text)]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    docs = sorted(p.stem for p in (REPO / "docs").glob("*.md") if p.stem != "architecture")
    listing = re.search(r"^docs/ +(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert listing is not None, "docs/architecture.md has no docs/ entry in its tree"
    assert not [d for d in docs if d not in listing.group(1)], f"the docs/ entry lacks some of {docs}"


# A repository path in the prose: a folder of this tree, then a file name with an extension.  A path after a colon
# is a git object (``55a2a51:bench/x.py``, which ``git show`` prints) and is not in the working tree.
_REPO_PATH = re.compile(
    r"(?<![\w./:-])((?:sagellm_comm|bench|tests|examples|docs|\.ci)/[\w./-]*\w\.(?:py|md|json|csv|png|sh))\b"
)


def test_docs_name_only_paths_that_exist() -> None:
    """A file path named in README.md or docs/ is in the tree (a module that moved leaves no stale path)."""
    stale = {
        f"{path.relative_to(REPO)}: {found}"
        for path in DOCS
        for found in _REPO_PATH.findall(path.read_text())
        if not (REPO / found).exists()
    }
    assert not stale, f"paths that do not exist: {sorted(stale)}"


def test_the_path_scan_sees_what_it_should() -> None:
    found = _REPO_PATH.findall(
        "see sagellm_comm/benchmark/files.py, `bench/results/h200/soak.json`, 55a2a51:bench/launch_cost.py, "
        "docs/protocol.md. and tests/conftest.py"
    )
    assert found == [
        "sagellm_comm/benchmark/files.py",
        "bench/results/h200/soak.json",
        "docs/protocol.md",
        "tests/conftest.py",
    ]
