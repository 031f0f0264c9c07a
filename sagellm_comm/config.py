"""One configuration: every ``SAGELLM_COMM_*`` setting, read once, typed, frozen, and agreed where it must be.

:data:`SETTINGS` is the single list of the package's environment settings: name, type, default, accepted
values, what each changes, and whether the ranks of a group must agree on it.  Everything else derives from
it: :class:`CommConfig` (one field per setting), :meth:`CommConfig.from_env` (the only reader of these
variables), the agreement exchanged when a group is set up (:func:`check_agreement`), and the table of
``docs/configuration.md`` (:func:`settings_table`; ``sagellm-comm config --update docs/configuration.md``
rewrites it, and a test fails when it is stale).  ``sagellm-comm config`` shows this environment's values.

Nothing reads the environment when the package is imported.  A :class:`CommConfig` is read when an object
that needs it is made without one (``CustomBackend``, ``SymmetricWorkspace.rendezvous``,
``local_workspaces``, ``VirtualRankGroup``, ``Topology.discover``) and then passed down: a backend's groups,
workspaces, kernels and hierarchical plans all use the one it read.  A bad value is an
:class:`~sagellm_comm.errors.InvalidArgumentError` naming the variable and what it accepts.

**Agreed settings** change what a rank reads, writes or waits for (or shape its kernels' launches): ranks that
differ would read the wrong bytes or wait on the wrong flag.  Every group set-up exchanges the agreed part of
each member's configuration (a digest and the values) and refuses a difference with
:class:`~sagellm_comm.errors.ConfigMismatchError` naming the setting and the ranks on each side.  The others are
each rank's own business: its host name, its topology description, its watchdog's period, whether its launches
use programmatic dependent launch, and its proposal for the program count (the group launches the smallest).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigMismatchError, InvalidArgumentError
from .files import write_text

__all__ = [
    "MAX_INITIAL_EPOCH",
    "SETTINGS",
    "CommConfig",
    "Setting",
    "check_agreement",
    "describe",
    "env_text",
    "settings_table",
    "update_document",
]

#: calls a workspace must be able to make after the largest initial epoch without any counter or flag
#: overflowing int64 (the largest flag value is the start flag ``2 * (call + 1) + 1``)
HEADROOM_CALLS = 1 << 40
#: the largest ``SAGELLM_COMM_INITIAL_EPOCH``: ``2 * (MAX_INITIAL_EPOCH + HEADROOM_CALLS + 1) + 1 < 2**63``
MAX_INITIAL_EPOCH = (1 << 62) - HEADROOM_CALLS - 2
#: every setting's name starts with it; a variable with it that is not a setting is refused
PREFIX = "SAGELLM_COMM_"
_MAX_PROGRAMS = 128  # kernels/all_reduce.py MAX_BLOCKS (checked by tests/test_config.py)


@dataclass(frozen=True)
class Setting:
    """One environment setting (see the module docstring).

    ``parse(text)`` turns the variable's text into the value and ``check(value)`` validates a value given in
    code; both raise ``ValueError`` for what is not :attr:`accepted`.  ``example`` is a valid value other than
    the default (documentation, and the tests that set it on one rank only), ``invalid`` one it refuses.
    """

    name: str
    field: str
    label: str
    type: str
    default: Any
    default_text: str
    accepted: str
    doc: str
    agreed: bool
    example: str
    invalid: str
    parse: Callable[[str], Any]
    check: Callable[[Any], Any]


# ------------------------------------------------------------------------------------------ value kinds
def _integer(low: int, high: int, power_of_two: bool = False, note: str = "") -> tuple[str, Callable, Callable]:
    what = "a power of two" if power_of_two else "an integer"
    accepted = f"{what} in [{low}, {high}]" + (f" ({note})" if note else "")

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(accepted)
        if power_of_two and value & (value - 1):
            raise ValueError(accepted)
        return value

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise ValueError(accepted) from None
        return check(value)

    return accepted, parse, check


def _one_of(*values: Any) -> tuple[str, Callable, Callable]:
    accepted = "one of " + ", ".join(str(v) for v in values)
    by_text = {str(v): v for v in values}

    def check(value: Any) -> Any:
        # The value itself, not one equal to it: 4.0 == 4 and True == 1, but neither is a listed value.
        if not any(type(value) is type(v) and value == v for v in values):
            raise ValueError(accepted)
        return value

    def parse(text: str) -> Any:
        key = text.strip().lower()
        if key not in by_text:
            raise ValueError(accepted)
        return by_text[key]

    return accepted, parse, check


def _flag() -> tuple[str, Callable, Callable]:
    accepted = "0 or 1"

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(accepted)
        return value

    def parse(text: str) -> bool:
        if text.strip() not in ("0", "1"):
            raise ValueError(accepted)
        return text.strip() == "1"

    return accepted, parse, check


def _number(low: float, high: float) -> tuple[str, Callable, Callable]:
    accepted = f"a number in [{low:g}, {high:g}]"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(accepted)
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(accepted)
        return float(value)

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(accepted) from None
        return check(value)

    return accepted, parse, check


_HOST = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


def _host_name() -> tuple[str, Callable, Callable]:
    accepted = "a host name (1-255 letters, digits, '.', '-', '_', ':')"

    def check(value: Any) -> str:
        if not isinstance(value, str) or not _HOST.fullmatch(value):
            raise ValueError(accepted)
        return value

    return accepted, lambda text: check(text.strip()), check


def _topology() -> tuple[str, Callable, Callable]:
    accepted = "a JSON object, or the path of a JSON file (docs/configuration.md)"

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(accepted)
        from .topology import parse_override  # the topology module owns the format

        parse_override(value)  # raises InvalidArgumentError naming the variable and the forms it takes
        return value

    return accepted, check, check


def _setting(*, kind: tuple[str, Callable, Callable], doc: str, **fields: Any) -> Setting:
    accepted, parse, check = kind
    return Setting(accepted=accepted, parse=parse, check=check, doc=" ".join(doc.split()), **fields)


# ------------------------------------------------------------------------------------------ the list
#: Every ``SAGELLM_COMM_*`` setting of the package, in the order of the documentation's table.
SETTINGS: tuple[Setting, ...] = (
    _setting(
        name="SAGELLM_COMM_CUSTOM_MAX_BYTES",
        field="custom_max_bytes",
        label="the world's workspace capacity",
        type="bytes",
        default=64 << 20,
        default_text="67108864 (64 MiB)",
        kind=_integer(1024, 1 << 40),
        doc="""The world group's workspace capacity per rank: the largest message its kernels take (larger ones
        run on the engine).  Each rank's region is about three times this plus the Lamport buffers.  The
        ``max_bytes=`` argument of the custom backend overrides it.""",
        agreed=True,
        example="16384",
        invalid="64MB",
    ),
    _setting(
        name="SAGELLM_COMM_GROUP_MAX_BYTES",
        field="group_max_bytes",
        label="the sub-groups' workspace capacity",
        type="bytes",
        default=None,
        default_text="unset: the world's capacity",
        kind=_integer(1024, 1 << 40),
        doc="""Each sub-group's workspace capacity per rank (``split``, ``new_subgroup``, the node-local groups
        of a hierarchical plan).  The ``group_max_bytes=`` argument of the custom backend overrides it.""",
        agreed=True,
        example="8192",
        invalid="-1",
    ),
    _setting(
        name="SAGELLM_COMM_LARGE_TILE_BYTES",
        field="large_tile_bytes",
        label="the tile bytes of large messages",
        type="bytes",
        default=16384,
        default_text="16384",
        kind=_integer(1024, 65536, power_of_two=True),
        doc="""Bytes per tile of the all-reduce, all-gather and reduce-scatter kernels for messages of 1 MiB
        and more (smaller messages use 4096-byte tiles).  The tile size decides which program stages and reads
        which bytes.""",
        agreed=True,
        example="4096",
        invalid="16000",
    ),
    _setting(
        name="SAGELLM_COMM_LARGE_NUM_WARPS",
        field="large_num_warps",
        label="the warps of large messages",
        type="integer",
        default=8,
        default_text="8",
        kind=_one_of(1, 2, 4, 8, 16, 32),
        doc="""Warps per program of those kernels for messages of 1 MiB and more.  Agreed with the tile size:
        every rank's launches of one call have one shape.""",
        agreed=True,
        example="4",
        invalid="3",
    ),
    _setting(
        name="SAGELLM_COMM_LARGE_STAGES",
        field="large_stages",
        label="the pipelining stages of large messages",
        type="integer",
        default=1,
        default_text="1",
        kind=_integer(1, 8),
        doc="""Software-pipelining stages of the tile loops of those kernels for messages of 1 MiB and more.
        Agreed with the tile size: every rank's launches of one call have one shape.""",
        agreed=True,
        example="2",
        invalid="two",
    ),
    _setting(
        name="SAGELLM_COMM_CHECK",
        field="check",
        label="check mode",
        type="flag",
        default=False,
        default_text="0",
        kind=_flag(),
        doc="""Check mode: before each collective the ranks compare a fingerprint of the call (operation and
        algorithm, the element count the caller passed or the shape of a fused RMSNorm or GEMM, dtype) on the
        device; a difference raises
        ``CollectiveMismatchError`` naming both ranks and both calls instead of a wrong result or a hang.""",
        agreed=True,
        example="1",
        invalid="yes",
    ),
    _setting(
        name="SAGELLM_COMM_INITIAL_EPOCH",
        field="initial_epoch",
        label="the initial call counter",
        type="integer",
        default=0,
        default_text="0",
        kind=_integer(
            0,
            MAX_INITIAL_EPOCH,
            note="2^62 - 2^40 - 2: larger values could overflow a 64-bit counter or flag within 2^40 further calls",
        ),
        doc="""Where every call counter of a new workspace starts (a test hook for counter wrap-around; decimal
        or 0x-hexadecimal).  Values from which 2^40 further calls could overflow a counter or flag are
        refused.""",
        agreed=True,
        example="0x7fffff00",
        invalid=str(1 << 62),
    ),
    _setting(
        name="SAGELLM_COMM_HIER_MIN_BYTES",
        field="hier_min_bytes",
        label="the hierarchical threshold",
        type="bytes",
        default=1 << 20,
        default_text="1048576 (1 MiB)",
        kind=_integer(0, 1 << 62),
        doc="""The smallest message ``algo="auto"`` runs hierarchically on a group that spans nodes (kernels
        inside each node, the engine between nodes); smaller ones run on the engine.""",
        agreed=True,
        example="4096",
        invalid="1MB",
    ),
    _setting(
        name="SAGELLM_COMM_HIER_CROSS",
        field="hier_cross",
        label="the between-nodes stage of a hierarchical all-reduce",
        type="choice",
        default="engine",
        default_text="engine",
        kind=_one_of("engine", "kernels"),
        doc="""What runs the between-nodes stage of a hierarchical all-reduce: the ``engine`` (NCCL, Gloo), or
        ``kernels`` for nodes simulated on one machine (the cross groups get custom kernels, so the whole
        path can be captured in a CUDA graph on one GPU).""",
        agreed=True,
        example="kernels",
        invalid="nvlink",
    ),
    _setting(
        name="SAGELLM_COMM_MAX_PROGRAMS",
        field="max_programs",
        label="the program count proposal",
        type="integer",
        default=None,
        default_text="unset: one per SM and rank sharing the GPU (32 on the CPU)",
        kind=_integer(1, _MAX_PROGRAMS),
        doc="""This rank's proposal for the programs (thread blocks) of every kernel launch.  Ranks may differ:
        the group launches the smallest proposal, agreed when its workspace is made.""",
        agreed=False,
        example="3",
        invalid="0",
    ),
    _setting(
        name="SAGELLM_COMM_HOSTNAME",
        field="hostname",
        label="this rank's node name",
        type="host name",
        default=None,
        default_text="unset: the host name",
        kind=_host_name(),
        doc="""The node this rank reports when ranks decide which of them share one (tests simulate several
        nodes on one machine with it).  Per rank by nature: each rank reports its own and learns the
        others'.""",
        agreed=False,
        example="node1",
        invalid="node 1",
    ),
    _setting(
        name="SAGELLM_COMM_TOPOLOGY",
        field="topology",
        label="the topology description",
        type="JSON or path",
        default=None,
        default_text="unset: discovered (NVML, CUDA)",
        kind=_topology(),
        doc="""Overrides ``Topology.discover()`` with a description of this machine's GPUs and links (for tests
        and drivers that misreport): a JSON object or the path of a JSON file.  Reported by ``sagellm-comm
        topo`` and in benchmark records; the kernels decide with a real peer copy test, never from it.""",
        agreed=False,
        example='{"num_gpus": 2, "link": "NV18"}',
        invalid="{not json",
    ),
    _setting(
        name="SAGELLM_COMM_WATCHDOG_MS",
        field="watchdog_ms",
        label="the watchdog period",
        type="milliseconds",
        default=200.0,
        default_text="200",
        kind=_number(0, 3_600_000),
        doc="""How often this process's watchdog thread polls the error records of its live workspaces to
        report a device-side failure nobody asked about (under CUDA-graph replay); 0 turns it off.""",
        agreed=False,
        example="50",
        invalid="soon",
    ),
    _setting(
        name="SAGELLM_COMM_PDL",
        field="pdl",
        label="programmatic dependent launch",
        type="flag",
        default=None,
        default_text="unset: on from compute capability 9.0",
        kind=_flag(),
        doc="""Programmatic dependent launch of the Lamport kernels (one may be scheduled while the previous
        kernel on the stream finishes); 1 insists (an error below compute capability 9.0), 0 turns it off.
        Never used by a rank whose GPU other ranks of the group share as separate launches (processes under
        MPS), where an early launch could hold the SMs a peer's kernel needs, nor by a fused Lamport launch
        that splits rows over programs (they wait for each other inside the launch). A launch attribute of
        this rank only: no peer sees it.""",
        agreed=False,
        example="0",
        invalid="yes",
    ),
)

_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class CommConfig:
    """The package's configuration: one field per entry of :data:`SETTINGS` (see there for each).

    Read the environment with :meth:`from_env`; change fields with :meth:`replace`.  Every value is checked
    when the object is made (an ``InvalidArgumentError`` names the field, its variable and what it accepts).
    """

    custom_max_bytes: int = _BY_FIELD["custom_max_bytes"].default
    group_max_bytes: int | None = _BY_FIELD["group_max_bytes"].default
    large_tile_bytes: int = _BY_FIELD["large_tile_bytes"].default
    large_num_warps: int = _BY_FIELD["large_num_warps"].default
    large_stages: int = _BY_FIELD["large_stages"].default
    check: bool = _BY_FIELD["check"].default
    initial_epoch: int = _BY_FIELD["initial_epoch"].default
    hier_min_bytes: int = _BY_FIELD["hier_min_bytes"].default
    hier_cross: str = _BY_FIELD["hier_cross"].default
    max_programs: int | None = _BY_FIELD["max_programs"].default
    hostname: str | None = _BY_FIELD["hostname"].default
    topology: str | None = _BY_FIELD["topology"].default
    watchdog_ms: float = _BY_FIELD["watchdog_ms"].default
    pdl: bool | None = _BY_FIELD["pdl"].default

    def __post_init__(self) -> None:
        bad: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if value is None and setting.default is None:
                continue
            try:
                object.__setattr__(self, setting.field, setting.check(value))
            except InvalidArgumentError as exc:
                bad[setting.field] = f"{setting.field}: {exc.message}"
            except ValueError:
                bad[setting.field] = f"{setting.field}={value!r} ({setting.name}) must be {setting.accepted}"
        if bad:
            raise InvalidArgumentError("; ".join(bad.values()), details={"fields": list(bad)})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CommConfig:
        """The configuration the environment (or ``environ``) describes; unset or empty variables take the
        default.  Raises one ``InvalidArgumentError`` naming every variable whose value is refused and what
        each accepts, and every ``SAGELLM_COMM_*`` variable that is not a setting (a misspelt name)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        bad: dict[str, str] = {}
        for setting in SETTINGS:
            text = environ.get(setting.name)
            if text is None or not text.strip():
                continue
            try:
                values[setting.field] = setting.parse(text)
            except InvalidArgumentError as exc:  # a kind with its own message (the topology)
                bad[setting.name] = exc.message
            except ValueError:
                bad[setting.name] = f"{setting.name} must be {setting.accepted}, got {text!r}"
        names = [setting.name for setting in SETTINGS]
        for name in sorted(set(environ) - set(names)):  # a misspelt setting would otherwise be ignored
            if name.startswith(PREFIX):
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.85)
                hint = f" (did you mean {close[0]}?)" if close else ""
                bad[name] = f"{name} is not a setting{hint}; the settings: docs/configuration.md, sagellm-comm config"
        if bad:
            refused = {name: environ[name] for name in bad}
            first = next(iter(refused))  # details name the first refused variable, and list them all
            raise InvalidArgumentError(
                "; ".join(bad.values()), details={"variable": first, "value": refused[first], "variables": refused}
            )
        return cls(**values)

    def replace(self, **changes: Any) -> CommConfig:
        """A copy with ``changes`` (field names) applied and checked."""
        unknown = sorted(set(changes) - set(_BY_FIELD))
        if unknown:
            raise InvalidArgumentError(f"CommConfig has no field {unknown}; fields: {sorted(_BY_FIELD)}")
        return dataclasses.replace(self, **changes)

    def agreed(self) -> dict[str, Any]:
        """The values every rank of a group must share, by variable name."""
        return {s.name: getattr(self, s.field) for s in SETTINGS if s.agreed}

    def agreement(self) -> tuple[str, dict[str, Any]]:
        """``(digest, values)`` of :meth:`agreed`: what a rank sends when a group is set up."""
        values = self.agreed()
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16], values

    def group_capacity(self) -> int:
        """Bytes of a sub-group's workspace: ``group_max_bytes``, else the world's ``custom_max_bytes``."""
        return self.custom_max_bytes if self.group_max_bytes is None else self.group_max_bytes


def env_text(value: Any) -> str:
    """``value`` as the environment writes it: ``1``/``0`` for flags, ``unset`` for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def check_agreement(everyone: Sequence[tuple[str, Mapping[str, Any]]], ranks: Sequence[int], where: str) -> None:
    """Raise :class:`ConfigMismatchError` unless every member sent the same :meth:`CommConfig.agreement`.

    ``everyone``: each member's ``(digest, values)`` in group order; ``ranks``: the members' global ranks
    (messages name those); ``where``: which set-up this is (e.g. "the custom backend's init").
    """
    if len({digest for digest, _ in everyone}) <= 1:
        return
    names = sorted({name for _, values in everyone for name in values})
    differing = {}
    for name in names:
        sides: dict[str, list[int]] = {}
        for rank, (_, values) in zip(ranks, everyone, strict=True):
            shown = env_text(values[name]) if name in values else "not a setting of this version"
            sides.setdefault(shown, []).append(rank)
        if len(sides) > 1:
            differing[name] = sides
    if not differing:  # equal values, different digests: the package versions differ
        sides = {}
        for rank, (digest, _) in zip(ranks, everyone, strict=True):
            sides.setdefault(f"digest {digest}", []).append(rank)
        differing["the package version"] = sides
    parts = []
    for name, sides in differing.items():
        label = f" ({_BY_NAME[name].label})" if name in _BY_NAME else ""
        split = "; ".join(f"{value} on ranks {members}" for value, members in sides.items())
        parts.append(f"{name}{label} differs: {split}")
    raise ConfigMismatchError(
        f"{where}: ranks {list(ranks)} must agree on every setting that changes what a rank reads, writes or waits "
        f"for, and they do not: {'; '.join(parts)}.  Set it alike on every rank (docs/configuration.md lists "
        "these settings)",
        details={
            "settings": {name: {v: list(m) for v, m in sides.items()} for name, sides in differing.items()},
            "ranks": list(ranks),
            "where": where,
        },  # fmt: skip
    )


# ------------------------------------------------------------------------------------------ the table
TABLE_BEGIN = "<!-- settings table: generated by `sagellm-comm config --update docs/configuration.md` -->"
TABLE_END = "<!-- end of the settings table -->"


def settings_table() -> str:
    """The Markdown table of every setting (``docs/configuration.md`` holds it between its markers)."""
    rows = [
        "| Variable | Type | Default | Accepted | Ranks must agree | What it changes |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        agree = "**yes**" if s.agreed else "no"
        cells = [f"`{s.name}`", s.type, s.default_text, s.accepted, agree, s.doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def describe(config: CommConfig) -> str:
    """Every setting's value in ``config``, one line each (what ``sagellm-comm config`` prints)."""
    width = max(len(s.name) for s in SETTINGS)
    lines = []
    for s in SETTINGS:
        value = getattr(config, s.field)
        shown = s.default_text if value is None else env_text(value)
        origin = "default" if value == s.default else "set"
        lines.append(f"{s.name:<{width}}  {shown}  ({origin}; {'agreed' if s.agreed else 'per rank'})")
    return "\n".join(lines)


def update_document(path: str) -> bool:
    """Rewrite the generated table of the Markdown file at ``path``; True when it changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise InvalidArgumentError(f"{path} has no generated-table markers ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    new = text[: start + len(TABLE_BEGIN)] + "\n" + settings_table() + "\n" + text[end:]
    if new != text:
        write_text(path, new)  # whole: a write that fails leaves the document as it was
    return new != text
