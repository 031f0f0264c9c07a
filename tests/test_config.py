"""The one configuration (``sagellm_comm/config.py``): read once and typed, documented from the one list, agreed.

* The documentation's table is generated from ``SETTINGS`` and every ``SAGELLM_COMM_*`` name anywhere in the tree
  is a setting of that list; only ``config.py`` reads them from the environment.
* Importing the package with every setting refused succeeds; the first use raises a typed error naming each.
* Agreed settings: one rank set otherwise makes ``init`` of the world and the set-up of a sub-group raise
  ``ConfigMismatchError`` naming the setting and the ranks (every agreed setting of the list, so one added later is
  covered).  Per-rank settings: one rank set otherwise, and every path still gives the exact result (so a setting
  that changes what ranks read or wait for cannot be listed as per-rank without a test failing).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagellm_comm.config import MAX_INITIAL_EPOCH, SETTINGS, CommConfig, env_text, settings_table
from sagellm_comm.errors import ConfigMismatchError, InvalidArgumentError
from tests.conftest import join_gloo, run_ranks

ROOT = Path(__file__).resolve().parents[1]
NAMES = [s.name for s in SETTINGS]
AGREED = [s for s in SETTINGS if s.agreed]
PER_RANK = [s for s in SETTINGS if not s.agreed]
LARGE = 1 << 20  # bytes: from here the kernels use the configuration's large tiles
UNSET = {name: None for name in NAMES}  # the ranks start from the defaults, whatever the caller's environment
# Two programs per launch (the interpreter runs programs one after another); rank 1 of the per-rank test of
# SAGELLM_COMM_MAX_PROGRAMS proposes another count.
INTERP = {"TRITON_INTERPRET": "1", **UNSET, "SAGELLM_COMM_MAX_PROGRAMS": "2"}


# ------------------------------------------------------------------------------------------ the list and the docs
def test_the_documented_table_is_generated_from_the_list():
    text = (ROOT / "docs" / "configuration.md").read_text()
    from sagellm_comm.config import TABLE_BEGIN, TABLE_END

    section = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN) : text.index(TABLE_END)].strip()
    assert section == settings_table(), "stale: run `sagellm-comm config --update docs/configuration.md`"
    for s in SETTINGS:
        assert f"`{s.name}`" in section


def _tree_files():
    for folder in ("sagellm_comm", "bench", "examples", "tests", "docs", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".json", ".csv", ".sh", ".toml", ""):
                yield path
    yield ROOT / "README.md"
    yield ROOT / "pyproject.toml"


def test_every_sagellm_comm_name_in_the_tree_is_a_setting():
    """Code, benchmarks, examples, tests and docs name only settings of the list (a new variable joins the list,
    and with it the documentation, the agreement and the tests below)."""
    unknown = {}
    for path in _tree_files():
        for name in re.findall(r"SAGELLM_COMM_[A-Z0-9_]+", path.read_text(errors="replace")):
            if name not in NAMES:
                unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"not in sagellm_comm/config.py SETTINGS: {unknown}"


def test_only_the_config_module_reads_the_settings_from_the_environment():
    readers = []
    for path in (ROOT / "sagellm_comm").rglob("*.py"):
        if path.name == "config.py":
            continue
        for line in path.read_text().splitlines():
            if re.search(r"SAGELLM_COMM_[A-Z]", line) and re.search(r"os\.environ|getenv", line):
                readers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not readers, readers


def test_the_list_is_consistent():
    from sagellm_comm.config import _MAX_PROGRAMS
    from sagellm_comm.kernels.all_reduce import MAX_BLOCKS

    assert MAX_BLOCKS.value == _MAX_PROGRAMS
    assert len(set(NAMES)) == len(NAMES) and all(n.startswith("SAGELLM_COMM_") for n in NAMES)
    assert [s.field for s in SETTINGS] == [f.name for f in __import__("dataclasses").fields(CommConfig)]
    defaults = CommConfig()
    for s in SETTINGS:
        assert getattr(defaults, s.field) == s.default, s.name
        example = CommConfig.from_env({s.name: s.example})
        assert getattr(example, s.field) != s.default, f"{s.name}: the example must differ from the default"


@pytest.mark.parametrize("setting", SETTINGS, ids=NAMES)
def test_a_refused_value_names_the_variable_and_what_it_accepts(setting):
    with pytest.raises(InvalidArgumentError) as info:
        CommConfig.from_env({setting.name: setting.invalid})
    assert setting.name in str(info.value) and setting.invalid in str(info.value)
    if setting.name != "SAGELLM_COMM_TOPOLOGY":  # the topology's refusal lists its forms instead
        assert setting.accepted in str(info.value)
    assert CommConfig.from_env({setting.name: "  "}) == CommConfig()  # empty: the default


def test_values_given_in_code_are_checked():
    with pytest.raises(InvalidArgumentError, match=r"large_stages=0 \(SAGELLM_COMM_LARGE_STAGES\)"):
        CommConfig(large_stages=0)
    with pytest.raises(InvalidArgumentError, match="a power of two"):
        CommConfig().replace(large_tile_bytes=3000)
    with pytest.raises(InvalidArgumentError, match="no field"):
        CommConfig().replace(tile=4096)
    assert CommConfig().replace(check=True).check is True


def test_a_choice_given_in_code_is_one_of_the_listed_values_not_an_equal_number():
    """``large_num_warps=4.0`` equals the listed 4 but is not one of the integers the setting takes: a float warp count
    would reach the launches, and a rank holding 4.0 would be refused as differing from a peer holding 4."""
    for bad in (4.0, 8.0):
        with pytest.raises(InvalidArgumentError, match=r"large_num_warps=.* \(SAGELLM_COMM_LARGE_NUM_WARPS\)"):
            CommConfig(large_num_warps=bad)
    from_env = CommConfig.from_env({"SAGELLM_COMM_LARGE_NUM_WARPS": "4"})
    assert CommConfig(large_num_warps=4).agreement() == from_env.agreement()


def test_the_initial_epoch_leaves_2_40_calls_before_any_overflow():
    # The largest flag a call writes is the start flag 2 * (call + 1) + 1 (kernels/all_reduce.py).
    assert 2 * (MAX_INITIAL_EPOCH + (1 << 40) + 1) + 1 <= (1 << 63) - 1
    largest = CommConfig.from_env({"SAGELLM_COMM_INITIAL_EPOCH": str(MAX_INITIAL_EPOCH)})
    assert largest.initial_epoch == MAX_INITIAL_EPOCH
    assert CommConfig.from_env({"SAGELLM_COMM_INITIAL_EPOCH": "0x80000000"}).initial_epoch == 2**31
    for bad in (str(MAX_INITIAL_EPOCH + 1), str(2**62 - 1), "-1", "lots"):
        with pytest.raises(InvalidArgumentError, match=r"SAGELLM_COMM_INITIAL_EPOCH .*within 2\^40 further calls"):
            CommConfig.from_env({"SAGELLM_COMM_INITIAL_EPOCH": bad})


_GARBAGE = """
import importlib, pkgutil, sys
import sagellm_comm
for mod in pkgutil.walk_packages(sagellm_comm.__path__, "sagellm_comm."):
    importlib.import_module(mod.name)  # nothing parses the environment at import time
from sagellm_comm import CommBackend, CommConfig, InvalidArgumentError, Topology
names = sys.argv[1:]
for first_use in (CommConfig.from_env, lambda: CommBackend.create("custom"), Topology.discover):
    try:
        first_use()
    except InvalidArgumentError as exc:
        missing = [n for n in names if n not in str(exc)]
        assert not missing, (missing, str(exc))
    else:
        raise AssertionError("no error")
print("ok")
"""


def test_import_succeeds_with_every_setting_refused_and_the_first_use_raises():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_COMM_")}
    env.update({s.name: s.invalid for s in SETTINGS}, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _GARBAGE, *NAMES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_config_command_prints_values_and_refuses_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_COMM_")}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sagellm_comm.cli", "config"], cwd=ROOT, env={**env, **extra}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    ok = run({"SAGELLM_COMM_CHECK": "1"})
    assert ok.returncode == 0 and re.search(r"SAGELLM_COMM_CHECK +1 +\(set; agreed\)", ok.stdout), ok.stdout
    bad = run({"SAGELLM_COMM_LARGE_STAGES": "two"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "SAGELLM_COMM_LARGE_STAGES" in bad.stderr


def test_a_table_update_that_cannot_finish_leaves_the_document_as_it_was(tmp_path):
    """``sagellm-comm config --update PATH`` writes the new text beside the document and swaps it in once complete:
    a write that fails part-way (here the process's file size limit, as a full disk would) leaves the document
    whole and no temporary file behind.  It truncated the document first, then wrote as much as it could."""
    import errno
    import textwrap

    from sagellm_comm.config import TABLE_BEGIN, TABLE_END

    doc = tmp_path / "configuration.md"
    text = "# Settings\n\n" + "Prose before the table.\n" * 1000 + f"{TABLE_BEGIN}\nstale\n{TABLE_END}\n"
    doc.write_text(text)
    script = textwrap.dedent("""
        import resource, signal, sys
        from sagellm_comm.config import update_document
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            update_document(sys.argv[1])
        except OSError as exc:
            print(exc.errno)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(doc)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == str(errno.EFBIG), proc.stderr[-3000:]
    assert doc.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["configuration.md"]


# ------------------------------------------------------------------------------------------ agreement
def _agreement_worker(rank, world_size, port):
    """For each agreed setting, rank 2 alone sets its example: the world's init and a sub-group's set-up refuse."""
    import torch.distributed as dist

    from sagellm_comm import CommBackend
    from sagellm_comm.workspace import SymmetricWorkspace

    join_gloo(rank, world_size, port)
    sub = dist.new_group([1, 2])  # every rank makes it, ranks 1 and 2 use it

    def exchange(obj):
        out = [None] * 2
        dist.all_gather_object(out, obj, group=sub)
        return out

    def subgroup_setup():
        ws = SymmetricWorkspace.rendezvous(rank - 1, 2, 4096, "cpu", exchange, max_programs=2, ranks=(1, 2))
        ws.close()

    outcomes = {}
    if rank > 0:
        subgroup_setup()  # the same configuration everywhere: the set-up succeeds
    for setting in AGREED:
        if rank == 2:
            os.environ[setting.name] = setting.example
        seen = {}
        try:
            CommBackend.create("custom").init()  # adopts the world; its init compares every rank's settings
            seen["world"] = "no error"
        except ConfigMismatchError as exc:
            seen["world"] = (str(exc), exc.details["settings"])
        if rank > 0:
            try:
                subgroup_setup()
                seen["subgroup"] = "no error"
            except ConfigMismatchError as exc:
                seen["subgroup"] = (str(exc), exc.details["settings"])
        os.environ.pop(setting.name, None)
        outcomes[setting.name] = seen
        dist.barrier()
    return outcomes


@pytest.fixture(scope="module")
def agreement_outcomes():
    return run_ranks(_agreement_worker, 3, env=INTERP, timeout=300)


@pytest.mark.parametrize("setting", AGREED, ids=[s.name for s in AGREED])
def test_an_agreed_setting_set_otherwise_on_one_rank_is_refused_at_set_up(setting, agreement_outcomes):
    example = env_text(CommConfig.from_env({setting.name: setting.example}).agreed()[setting.name])
    default = env_text(setting.default)
    for rank, outcomes in enumerate(agreement_outcomes):
        seen = outcomes[setting.name]
        where = {"world": [0, 1], "subgroup": [1]}
        for scope in ("world", "subgroup") if rank else ("world",):
            assert seen[scope] != "no error", (rank, scope)
            message, details = seen[scope]
            assert list(details) == [setting.name], details  # exactly the setting that differs
            sides = details[setting.name]
            assert sides[default] == where[scope] and sides[example] == [2], (scope, sides)
            assert f"{setting.name} ({setting.label}) differs" in message, message
            assert f"on ranks {where[scope]}" in message and "on ranks [2]" in message, message


# ------------------------------------------------------------------------------------------ per-rank settings
def _per_rank_worker(rank, world_size, port, name, value):
    """Rank 1 alone sets ``name``; every path must still give the exact result on every rank."""
    import sagellm_comm
    from sagellm_comm.fused import all_reduce_residual_rmsnorm

    if rank == 1:
        os.environ[name] = value
    world = sagellm_comm.init(
        backend="custom", rank=rank, world_size=world_size, master_port=port, timeout=120, max_bytes=LARGE + 4096
    )
    backend = world.backend
    ok = {}
    try:
        # 1 MiB: the large tiles (a tile setting listed as per-rank fails here: one rank then stages and reads
        # other bytes than its peer)
        x = torch.arange(LARGE // 4, dtype=torch.float32) % 1000 + rank
        backend.all_reduce(x, algo="one_shot" if backend.custom is not None else "auto")
        want = (torch.arange(LARGE // 4, dtype=torch.float32) % 1000) * world_size + sum(range(world_size))
        ok["one_shot 1 MiB"] = bool(torch.equal(x, want))
        for i, algo in enumerate(("auto", "one_shot", "two_shot", "lamport")):
            x = torch.full((37 + i,), float(rank + 1 + i))
            backend.all_reduce(x, algo=algo if backend.custom is not None else "auto")
            ok[algo] = bool(torch.all(x == sum(r + 1 + i for r in range(world_size))))
        gathered = torch.empty(world_size * 5)
        backend.all_gather(gathered, torch.full((5,), float(rank)))
        ok["all_gather"] = bool(torch.equal(gathered, torch.arange(world_size).float().repeat_interleave(5)))
        shard = torch.empty(3)
        backend.reduce_scatter(shard, torch.arange(world_size * 3, dtype=torch.float32) + rank)
        want = torch.arange(rank * 3, rank * 3 + 3).float() * world_size + sum(range(world_size))
        ok["reduce_scatter"] = bool(torch.equal(shard, want))
        x, residual = torch.full((2, 8), float(rank + 1)), torch.ones(2, 8)
        _, new_residual = all_reduce_residual_rmsnorm(x, residual, torch.ones(8))
        ok["fused"] = bool(torch.all(new_residual == 1 + sum(r + 1 for r in range(world_size))))
        if backend.custom is not None:
            backend.custom.synchronize()
        ok["kernels"] = backend.custom is not None
    finally:
        sagellm_comm.destroy()
    return ok


@pytest.mark.parametrize("setting", PER_RANK, ids=[s.name for s in PER_RANK])
def test_a_per_rank_setting_set_otherwise_on_one_rank_keeps_every_result_exact(setting):
    per_rank = run_ranks(_per_rank_worker, 2, setting.name, setting.example, env=INTERP, timeout=300)
    for ok in per_rank:
        kernels = ok.pop("kernels")
        assert all(ok.values()), ok
        # Only the node name takes the kernels away (the ranks are then on two nodes); every other per-rank
        # setting must leave them in place, so the kernels themselves are what this test checked.
        assert kernels == (setting.name != "SAGELLM_COMM_HOSTNAME"), (setting.name, kernels)
