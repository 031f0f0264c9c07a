"""The built wheel installs one top-level package, ``sagellm_comm``, and coexists with a foreign ``kernels``.

Hugging Face's ``kernels`` (common next to transformers and vLLM) owns the top-level name ``kernels``; a wheel
of ours that also installed ``kernels/`` would merge into its directory.  This test builds our wheel, installs
it into a fresh virtual environment beside a stand-in package that owns a top-level ``kernels`` module, and
runs a two-rank Gloo all-reduce through ``sagellm_comm`` there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FOREIGN_KERNELS = {
    "pyproject.toml": textwrap.dedent(
        """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "foreign-kernels"
        version = "1.0"

        [tool.setuptools]
        packages = ["kernels"]
        """
    ),
    "kernels/__init__.py": "OWNER = 'foreign-kernels'\n",
}

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import kernels, sagellm_comm
    assert kernels.OWNER == "foreign-kernels", kernels.__file__
    assert sagellm_comm.__file__.startswith(sys.prefix), (sagellm_comm.__file__, sys.prefix)
    from sagellm_comm import get_comm_backend
    from sagellm_comm.benchmark.spawn import MASTER_ADDR, spawn_ranks
    import sagellm_comm.kernels.all_reduce  # our kernels live under our own name

    def rank_main(rank, world_size, port):
        b = get_comm_backend("gloo").init(rank=rank, world_size=world_size, master_addr=MASTER_ADDR,
                                          master_port=port, timeout=60)
        x = torch.full((5,), float(rank + 1))
        b.all_reduce(x)
        b.destroy()
        return x.tolist()

    if __name__ == "__main__":
        assert spawn_ranks(rank_main, (), 2, what="all-reduce") == [3.0] * 5
        print("ALL-REDUCE OK")
    """
)


def _wheel(source, dest) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*cmd, "-w", str(dest), str(source)])


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _site_dirs() -> list[str]:
    """Where this interpreter finds its installed packages (torch among them): a virtual environment's
    site-packages, or a plain interpreter's system and user ones."""
    dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    torch_home = str(Path(importlib.util.find_spec("torch").origin).parents[1])
    assert torch_home in dirs, (torch_home, dirs)
    return dirs


def test_wheel_has_one_top_level_package_and_coexists_with_foreign_kernels(tmp_path: Path) -> None:
    # Build from a copy: a wheel build writes build/ beside its source, and a stale build/ could leak files.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".*"))
    wheels = tmp_path / "wheels"
    _wheel(source, wheels)
    (ours,) = list(wheels.glob("*.whl"))
    with zipfile.ZipFile(ours) as wheel:
        tops = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert tops == {"sagellm_comm"}, f"the wheel installs top-level names {sorted(tops)}"

    foreign = tmp_path / "foreign"
    for rel, text in FOREIGN_KERNELS.items():
        (foreign / rel).parent.mkdir(parents=True, exist_ok=True)
        (foreign / rel).write_text(text)
    # Ours and the foreign package are installed in a new venv; torch and triton come from the packages this
    # interpreter sees (see _site_dirs).  --system-site-packages would give the base interpreter's packages,
    # not those of a venv running this test.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    # Outside the repository, and without PYTHONPATH or user packages: what the venv sees is what it holds
    # (pip would take a checkout on PYTHONPATH with its egg-info for an installed copy and skip ours).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    _wheel(foreign, foreign)
    (theirs,) = list(foreign.glob("*.whl"))
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(theirs), str(ours)], cwd=tmp_path, env=env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert (site / "sagellm_comm" / "__init__.py").exists(), "our wheel was not installed in the venv"
    assert (site / "kernels" / "__init__.py").read_text() == FOREIGN_KERNELS["kernels/__init__.py"]
    assert not (site / "kernels" / "all_reduce.py").exists(), "our kernels were merged into the foreign package"
    # This interpreter's packages, after the venv's own, for the run only (pip above and below sees the venv
    # alone).  Path lines: the .pth files of those directories (the editable install's finder) are not run.
    outer = site / "outer-site-packages.pth"
    outer.write_text("".join(f"{d}\n" for d in _site_dirs()))

    script = tmp_path / "run_all_reduce.py"
    script.write_text(SCRIPT)
    proc = _run([python, "-s", str(script)], cwd=tmp_path, env=env)
    assert "ALL-REDUCE OK" in proc.stdout
    outer.unlink()

    # Uninstalling ours leaves the foreign package whole.
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "isagellm-comm"], cwd=tmp_path, env=env)
    assert (site / "kernels" / "__init__.py").exists()
