"""Which ``--algo`` can run on which backend, and how to say what really ran.

Algorithms:

* ``auto``: the backend's own choice.  Gloo runs its allreduce, NCCL its tuner's choice, the custom
  backend its selector's (recorded per size with the rule id and reason).
* ``one_shot``, ``two_shot``, ``lamport``: the custom intra-node kernels (``custom`` backend or ``--virtual-ranks``),
  all-reduce only.
* ``nccl``: the NCCL path (on the custom backend: its NCCL fallback).
* ``ring``, ``tree``: NCCL with ``NCCL_ALGO=Ring`` / ``Tree``, set in the environment before the
  communicator is created.  NCCL reads it once per communicator, so one run holds at most one of
  ``nccl``/``ring``/``tree``; compare them across runs.  NCCL implements Tree for all-reduce only.

Nothing is relabelled: an algorithm that cannot run on the chosen backend is a usage error when the
backend is known before launch, and a reported skip when it is only known after ``init`` (``auto``
resolving to a fallback).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.selector import (
    COLLECTIVE_KERNEL_ALGO,
    ENGINE_ALGO,
    HIERARCHICAL_ALGO,
    KERNEL_ALGOS,
    NCCL_ALGO_NAMES,
    NCCL_RING,
    NCCL_TREE,
)

ALGOS = ("auto", *KERNEL_ALGOS, *NCCL_ALGO_NAMES, ENGINE_ALGO)
NCCL_PATH_ALGOS = (ENGINE_ALGO, *NCCL_ALGO_NAMES)
NCCL_ALGO_VALUES = {NCCL_RING: "Ring", NCCL_TREE: "Tree"}
NCCL_KINDS = ("nccl", "rccl")
CUSTOM_KIND = "custom"
# What else the custom backend records as having run: its all-gather / reduce-scatter kernel, and the
# hierarchical all-reduce of a group spanning nodes.
CUSTOM_PATHS = (COLLECTIVE_KERNEL_ALGO, HIERARCHICAL_ALGO)


def parse_algos(items: Iterable[str] | str | None) -> list[str]:
    """``["one_shot,two_shot", "nccl"]`` -> ``["one_shot", "two_shot", "nccl"]`` (order kept, no repeats)."""
    if items is None:
        return ["auto"]
    if isinstance(items, str):
        items = [items]
    algos: list[str] = []
    for item in items:
        for token in item.split(","):
            name = token.strip().lower()
            if not name:
                continue
            if name not in ALGOS:
                raise InvalidArgumentError(f"unknown algo {name!r}; choose from: {', '.join(ALGOS)}")
            if name not in algos:
                algos.append(name)
    if not algos:
        raise InvalidArgumentError("empty --algo list")
    return algos


def allowed_algos(backend_kind: str, op: str, virtual: bool = False) -> tuple[str, ...]:
    """The algorithms a backend kind can run for ``op`` (see the module docstring)."""
    if virtual:
        return ("auto", *KERNEL_ALGOS) if op == "all_reduce" else ()
    nccl_path = NCCL_PATH_ALGOS if op == "all_reduce" else ("nccl", NCCL_RING)
    if backend_kind in NCCL_KINDS:
        return ("auto", *nccl_path)
    if backend_kind == CUSTOM_KIND:
        return ("auto", *KERNEL_ALGOS, *nccl_path) if op == "all_reduce" else ("auto", *nccl_path)
    return ("auto",)


def unsupported_reason(algo: str, backend_kind: str, op: str, virtual: bool = False) -> str | None:
    """None if ``algo`` can run, else a sentence saying why not and what to use instead."""
    if algo in allowed_algos(backend_kind, op, virtual):
        return None
    if virtual:
        if op != "all_reduce":
            return f"--virtual-ranks runs the custom all-reduce only, not {op}"
        return (
            f"--virtual-ranks runs one process on one GPU: {algo!r} needs NCCL; use auto, one_shot, two_shot or lamport"
        )
    if algo in KERNEL_ALGOS:
        if op != "all_reduce":
            return f"{algo} is an all-reduce kernel; {op} has no custom kernel (use --algo auto or nccl)"
        return f"{algo} is a custom-kernel algorithm; backend {backend_kind!r} cannot run it (use --backend custom)"
    if algo == NCCL_TREE and op != "all_reduce" and backend_kind in (*NCCL_KINDS, CUSTOM_KIND):
        return f"NCCL implements Tree for all_reduce only, not {op}"
    return f"backend {backend_kind!r} runs its own algorithm only; {algo!r} needs --backend nccl or custom"


def check_algos(algos: list[str], backend_kind: str, op: str, virtual: bool = False) -> None:
    """Raise :class:`InvalidArgumentError` if any algo cannot run, or NCCL_ALGO would be ambiguous."""
    for algo in algos:
        reason = unsupported_reason(algo, backend_kind, op, virtual)
        if reason is not None:
            raise InvalidArgumentError(reason)
    if virtual:
        return
    nccl_path = [a for a in algos if a in NCCL_PATH_ALGOS]
    if backend_kind in NCCL_KINDS:
        nccl_path = algos  # on NCCL, auto is NCCL's tuner too
    if len(nccl_path) > 1:
        raise InvalidArgumentError(
            f"{' and '.join(nccl_path)} all run NCCL, which reads NCCL_ALGO once per communicator: "
            "run one of them per invocation and compare the JSON files"
        )


def engine_reason(algo: str, engine_kind: str) -> str | None:
    """None if ``algo`` can run on the custom backend whose engine is ``engine_kind``, else why not: ``ring`` and
    ``tree`` set ``NCCL_ALGO``, which only an NCCL engine reads."""
    if algo in NCCL_ALGO_VALUES and engine_kind not in NCCL_KINDS:
        return f"{algo} sets NCCL_ALGO, but the custom backend's engine here is {engine_kind}"
    return None


def nccl_algo_env(algos: list[str]) -> str | None:
    """The ``NCCL_ALGO`` value the run must set before init (None: leave NCCL's tuner alone)."""
    for algo in algos:
        if algo in NCCL_ALGO_VALUES:
            return NCCL_ALGO_VALUES[algo]
    return None


def apply_nccl_algo_env(algos: list[str]) -> None:
    """Set ``NCCL_ALGO`` for the requested ring/tree run; refuse to override a different user setting."""
    wanted = nccl_algo_env(algos)
    if wanted is None:
        return
    existing = os.environ.get("NCCL_ALGO")
    if existing and existing.strip().lower() != wanted.lower():
        raise InvalidArgumentError(
            f"NCCL_ALGO={existing} is set in the environment but --algo asks for {wanted}; unset one of them"
        )
    os.environ["NCCL_ALGO"] = wanted


def nccl_run_label() -> tuple[str, str, str]:
    """``(algo_id, rule_id, reason)`` of an NCCL call, from the NCCL_ALGO this process runs with."""
    value = os.environ.get("NCCL_ALGO", "").strip()
    if not value:
        return "nccl", "nccl-tuner", "NCCL's tuner picks algorithm and protocol (NCCL_ALGO unset)"
    lowered = value.lower()
    if lowered in (NCCL_RING, NCCL_TREE):
        return lowered, "nccl-algo-env", f"NCCL_ALGO={value} set before the communicator was created"
    return "nccl", "nccl-algo-env", f"NCCL_ALGO={value} set before the communicator was created"
