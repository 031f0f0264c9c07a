"""Algorithm policy: default rules, JSON overrides, reasons, and bad policy files."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sagellm_comm.errors import InvalidArgumentError
from sagellm_comm.selector import DEFAULT_RULES, AlgoSelector, Rule, Selection


def test_default_policy_by_size_and_world_size():
    sel = AlgoSelector()
    small = sel.select(8 << 10, 8)
    assert (small.algo, small.rule_id) == ("lamport", "lamport")
    assert "latency" in small.reason
    large = sel.select(16 << 20, 8)
    assert (large.algo, large.rule_id) == ("two_shot", "large-two-shot")
    two = sel.select(512 << 10, 2)
    assert (two.algo, two.rule_id) == ("one_shot", "ws2-one-shot")
    assert sel.select(4 << 20, 2).algo == "one_shot"
    assert sel.select((4 << 20) + 1, 2).algo == "two_shot"
    assert sel.select(4 << 10, 2).algo == "lamport"
    assert sel.select(256 << 10, 2).algo == "lamport"
    assert sel.select(256 << 10, 4).algo == "lamport"
    assert sel.select(512 << 10, 4).algo == "one_shot"
    assert sel.select(1 << 20, 4).algo == "one_shot"
    assert sel.select((1 << 20) + 1, 4).algo == "two_shot"
    assert sel.select(64 << 10, 8).algo == "lamport"
    assert sel.select(128 << 10, 8).algo == "one_shot"
    assert sel.select(128 << 10, 8).algo == "one_shot"
    assert sel.select((128 << 10) + 1, 8).algo == "two_shot"


def test_messages_over_the_workspace_go_to_nccl_whatever_the_policy():
    sel = AlgoSelector.from_dict({"rules": [{"id": "always", "algo": "one_shot"}]})
    assert sel.select(1 << 20, 4, capacity_bytes=1 << 20).algo == "one_shot"
    over = sel.select((1 << 20) + 1, 4, capacity_bytes=1 << 20)
    assert (over.algo, over.rule_id) == ("nccl", "over-workspace")
    assert str((1 << 20) + 1) in over.reason


def test_a_decision_without_a_capacity_and_one_with_a_zero_byte_workspace_are_not_mixed_up():
    for first, second in ((None, 0), (0, None)):
        sel = AlgoSelector()
        decided = {cap: sel.select(100, 2, capacity_bytes=cap) for cap in (first, second)}
        assert decided[None].algo == "lamport", first
        assert (decided[0].algo, decided[0].rule_id) == ("nccl", "over-workspace"), first


def test_the_engine_path_is_labelled_with_the_engine_that_runs_it():
    sel = AlgoSelector.from_dict({"rules": [{"id": "small", "algo": "one_shot", "max_bytes": 1024}]})
    over = sel.select(4096, 2, capacity_bytes=2048)
    assert "the engine runs it" in over.reason and "NCCL" not in over.reason  # NCCL or Gloo: not known here
    assert over.ran_on("gloo") == Selection("gloo", "over-workspace", over.reason)
    nomatch = sel.select(1500, 2)
    assert (nomatch.ran_on("rccl").algo, nomatch.ran_on("rccl").rule_id) == ("rccl", "no-rule")
    kernel = sel.select(512, 2)
    assert kernel.ran_on("gloo") == Selection("one_shot", "small", kernel.reason)  # a kernel keeps its name


def test_json_policy_overrides_and_first_match_wins(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "rules": [
                    {"id": "tiny", "algo": "two_shot", "max_bytes": 1024, "reason": "forced for a test"},
                    {"id": "ws4", "algo": "nccl", "world_sizes": [4]},
                    {"id": "mid", "algo": "one_shot", "min_bytes": 1025, "max_bytes": 4096},
                ]
            }
        )
    )
    sel = AlgoSelector.from_file(path)
    assert sel.select(512, 4).rule_id == "tiny"
    assert sel.select(512, 4).reason == "forced for a test"
    assert sel.select(2048, 4).algo == "nccl"
    assert sel.select(2048, 8).rule_id == "mid"
    nomatch = sel.select(1 << 20, 8)
    assert (nomatch.algo, nomatch.rule_id) == ("nccl", "no-rule")
    assert AlgoSelector.from_dict(sel.to_dict()).rules == sel.rules


@pytest.mark.parametrize(
    "policy, needle",
    [
        ({"rules": []}, "at least one rule"),
        ({"rules": [{"algo": "ring"}]}, "algo must be one of"),
        ({"rules": [{"algo": "one_shot", "max_bytes": -1}]}, "max_bytes must be a non-negative int"),
        ({"rules": [{"algo": "one_shot", "world_sizes": 4}]}, "world_sizes must be a list"),
        ({"rules": [{"algo": "one_shot", "max_byte": 10}]}, "unknown keys"),
        ({"rules": [{"algo": "one_shot"}], "rule": [{"algo": "nccl"}]}, r"policy: unknown keys \['rule'\]"),
        ([1, 2], "JSON object"),
        ({"rules": [5]}, "rule 0: a rule is a JSON object"),
        ({"rules": [{"algo": "one_shot"}, None]}, "rule 1: a rule is a JSON object"),
        # were taken: rules that can never match, and ids or reasons reported as "None" or shared by two rules
        ({"rules": [{"algo": "one_shot", "min_bytes": 4096, "max_bytes": 1024}]}, "min_bytes 4096 > max_bytes 1024"),
        (
            {"rules": [{"algo": "one_shot", "world_sizes": []}]},
            r"world_sizes must be a list of positive ints \(at least one\)",
        ),
        ({"rules": [{"algo": "one_shot", "id": None}]}, "rule 0: id must be a non-empty string"),
        ({"rules": [{"algo": "one_shot", "reason": 5}]}, "rule 0: reason must be a string"),
        ({"rules": [{"algo": "one_shot", "id": "a"}, {"algo": "two_shot", "id": "a"}]}, "rule 1: id 'a' is also"),
    ],
)
def test_bad_policies_are_typed_errors(policy, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        AlgoSelector.from_dict(policy)


@pytest.mark.parametrize(
    "rules, shadowed, by",
    [
        # a catch-all first: nothing after it decides
        ([{"id": "all", "algo": "one_shot"}, {"id": "small", "algo": "lamport", "max_bytes": 4096}], 1, "'all'"),
        # two ranges that together hold the third's
        (
            [
                {"id": "low", "algo": "lamport", "max_bytes": 1024},
                {"id": "high", "algo": "one_shot", "min_bytes": 1025, "max_bytes": 8192},
                {"id": "mid", "algo": "two_shot", "min_bytes": 512, "max_bytes": 2048},
            ],
            2,
            "'low', 'high'",
        ),
        # world sizes: a rule for 2 and 4 after rules for each of them
        (
            [
                {"id": "ws2", "algo": "one_shot", "world_sizes": [2]},
                {"id": "ws4", "algo": "two_shot", "world_sizes": [4], "max_bytes": 1 << 20},
                {"id": "ws24", "algo": "lamport", "world_sizes": [2, 4], "max_bytes": 4096},
            ],
            2,
            "'ws2', 'ws4'",
        ),
    ],
)
def test_a_rule_that_earlier_rules_leave_no_message_is_refused(rules, shadowed, by):
    """First match wins: a rule whose every message an earlier rule matches never decides, so the policy says
    something it never does; refused, naming the rules before it."""
    with pytest.raises(
        InvalidArgumentError, match=rf"rule {shadowed} .* never decides: .* matched first by rule\(s\) {by}"
    ):
        AlgoSelector.from_dict({"rules": rules})


@pytest.mark.parametrize(
    "rules",
    [
        # a gap an earlier rule leaves (4097 and up) is the later rule's
        [{"id": "small", "algo": "lamport", "max_bytes": 4096}, {"id": "rest", "algo": "one_shot"}],
        # another world size than every earlier rule's
        [{"id": "ws2", "algo": "one_shot", "world_sizes": [2]}, {"id": "rest", "algo": "two_shot"}],
        # a byte between two earlier ranges
        [
            {"id": "low", "algo": "lamport", "max_bytes": 1023},
            {"id": "high", "algo": "one_shot", "min_bytes": 1025},
            {"id": "one", "algo": "two_shot", "min_bytes": 1024, "max_bytes": 1024},
        ],
        # every world size an earlier rule names is covered, but not the others
        [
            {"id": "ws2", "algo": "one_shot", "world_sizes": [2]},
            {"id": "ws1", "algo": "one_shot", "world_sizes": [1]},
            {"id": "rest", "algo": "two_shot"},
        ],
    ],
)
def test_a_rule_that_decides_some_message_is_taken(rules):
    assert [r.id for r in AlgoSelector.from_dict({"rules": rules}).rules] == [r["id"] for r in rules]
    assert AlgoSelector.from_dict(AlgoSelector().to_dict()).rules == AlgoSelector().rules  # the defaults too


@pytest.mark.parametrize(
    "rules, needle",
    [
        ([Rule("x", "ring")], r"selector rule 0: algo must be one of"),
        ([Rule("x", "one_shot", max_bytes=-1)], r"selector rule 0: max_bytes must be a non-negative int"),
        ([Rule("x", "one_shot", world_sizes=())], r"selector rule 0: world_sizes must be a list of positive ints"),
        ([Rule("x", "one_shot", min_bytes=8, max_bytes=4)], r"selector rule 0: min_bytes 8 > max_bytes 4"),
        ([Rule("no-rule", "one_shot")], r"selector rule 0: id 'no-rule' is reserved"),
        ([Rule("a", "lamport", max_bytes=64), Rule("a", "one_shot")], r"selector rule 1: id 'a' is also rule 0's"),
        ([Rule("all", "one_shot"), Rule("small", "lamport", max_bytes=64)], r"selector rule 1 .* never decides"),
        ([{"id": "x", "algo": "one_shot"}], r"selector rules: rule 0 must be a Rule, got dict"),
        (Rule("x", "one_shot"), r"selector rules must be a list of Rule"),
    ],
)
def test_rules_given_in_code_pass_the_checks_of_a_policy_file(rules, needle):
    """A policy built in code (``AlgoSelector([Rule(...)])``, what ``selector=`` of the custom backend takes) is
    checked as a policy file is, when it is made: no decision then names an algorithm no backend runs, a rule id
    the selector reports for its own decisions, or fails untyped (a dict has no ``matches``)."""
    with pytest.raises(InvalidArgumentError, match=needle):
        AlgoSelector(rules)


def test_rules_given_in_code_are_taken_as_a_policy_file_would_give_them():
    sel = AlgoSelector([Rule("ws2", "one_shot", min_bytes=None, world_sizes=[2]), Rule("rest", "two_shot")])
    assert sel.rules == (Rule("ws2", "one_shot", world_sizes=(2,)), Rule("rest", "two_shot"))
    assert (sel.select(512, 2).rule_id, sel.select(512, 4).rule_id) == ("ws2", "rest")


def test_bad_policy_files(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        AlgoSelector.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        AlgoSelector.from_file(bad)
    bad.write_bytes(b"\xff\xfe{")  # not UTF-8
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        AlgoSelector.from_file(bad)
    with pytest.raises(InvalidArgumentError, match="cannot be read"):
        AlgoSelector.from_file(tmp_path)  # a directory


def test_every_default_rule_has_an_id_and_reason():
    assert all(r.id and r.reason for r in DEFAULT_RULES)
    assert DEFAULT_RULES[-1].max_bytes is None  # the last rule catches every size


def test_lamport_choices_over_its_buffers_run_one_shot(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    ws = SymmetricWorkspace(0, 2, 1 << 20, [0, 0], "cpu")  # a view only: nothing is launched
    car = CustomAllReduce(ws, selector=AlgoSelector.from_dict({"rules": [{"id": "all", "algo": "lamport"}]}))
    assert ws.lamport_capacity == 128 * 1024
    assert car.select(256 << 10, 2).algo == "lamport"  # 128K bf16 elements fit
    over = car.select(512 << 10, 2)
    assert (over.algo, over.rule_id) == ("one_shot", "all+lamport-capacity")
    assert "exceed the Lamport buffers" in over.reason
    assert car.select(512 << 10, 4).algo == "lamport"  # the same bytes in fp32 are 128K elements
    assert car.resolve_algo("auto", 256 * 1024, 512 << 10) == "one_shot"


def test_a_new_selector_drops_the_per_shape_decisions(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from sagellm_comm.custom_all_reduce import CustomAllReduce
    from sagellm_comm.workspace import SymmetricWorkspace

    calls = []
    ws = SymmetricWorkspace(0, 2, 1 << 20, [0, 0], "cpu")  # a view only: no kernel is launched below
    car = CustomAllReduce(
        ws,
        selector=AlgoSelector.from_dict({"rules": [{"id": "all", "algo": "nccl"}]}),
        fallback=lambda t: calls.append(t.numel()) or t,
    )
    empty = torch.empty(0)
    car.all_reduce(empty)
    car.all_reduce(empty)  # the cached decision: the engine again
    assert calls == [0, 0]
    car.selector = AlgoSelector.from_dict({"rules": [{"id": "all", "algo": "one_shot"}]})
    car.all_reduce(empty)  # decided anew: one-shot, and an empty tensor launches nothing
    assert calls == [0, 0]


def test_algorithm_names_have_one_source():
    """selector.py holds the names; the backend's choices, the benchmark's and the fused paths are the same objects."""
    from sagellm_comm import selector
    from sagellm_comm.backends import custom
    from sagellm_comm.benchmark import algos
    from sagellm_comm.fused import GEMM_PATHS

    assert ("auto", *selector.KERNEL_ALGOS, selector.HIERARCHICAL_ALGO, selector.ENGINE_ALGO) == selector.ALGO_CHOICES
    assert custom.ALGO_CHOICES == selector.ALGO_CHOICES
    assert algos.KERNEL_ALGOS is selector.KERNEL_ALGOS and GEMM_PATHS is selector.GEMM_PATHS
    # the benchmark's --algo: the call's choices but the node-spanning path, plus NCCL's own algorithms
    assert set(algos.ALGOS) == {"auto", *selector.KERNEL_ALGOS, selector.ENGINE_ALGO, *selector.NCCL_ALGO_NAMES}
    assert set(algos.CUSTOM_PATHS) == {selector.COLLECTIVE_KERNEL_ALGO, selector.HIERARCHICAL_ALGO}


def test_a_policy_made_in_code_is_not_named_the_default():
    # a Selection's reason and a mismatch between ranks name the source: rules given in code are not "default"
    from sagellm_comm.fused.rmsnorm_policy import DEFAULT_FUSION_RULES, FusionPolicy, FusionRule

    assert AlgoSelector().source == "default" and AlgoSelector(list(DEFAULT_RULES)).source == "default"
    assert AlgoSelector(DEFAULT_RULES[1:]).source == "rules given in code"
    assert AlgoSelector(DEFAULT_RULES[1:], source="mine").source == "mine"
    assert FusionPolicy().source == "default" and FusionPolicy(list(DEFAULT_FUSION_RULES)).source == "default"
    unfused = FusionPolicy([FusionRule(id="off", path="unfused")])
    assert unfused.source == "rules given in code"
    assert unfused.select(4, 4096, 2, None).reason == "rule off (rules given in code)"


@pytest.mark.parametrize("rule_id", ["fused-two-shot-capacity", "fused-max-hidden", "no-fusion-rule"])
def test_a_rule_may_not_take_an_id_the_fused_op_following_the_policy_reports_for_its_own(rule_id):
    """A fusion rule ``all_reduce_policy`` reports the rule id this policy's rule gives: a rule named as the fused
    op's capacity checks would make a decision of the rule look like one of the checks."""
    with pytest.raises(InvalidArgumentError, match=re.escape(f"selector rule 0: id {rule_id!r} is reserved")):
        AlgoSelector.from_dict({"rules": [{"id": rule_id, "algo": "one_shot"}]})


@pytest.mark.parametrize("rule_id", ["over-workspace", "no-rule", "user", "engine", "custom-unavailable", "a+b"])
def test_a_rule_may_not_take_an_id_the_selector_reports_for_its_own_decisions(rule_id):
    # a Selection with rule_id "over-workspace" must mean the workspace was too small, never a policy rule
    with pytest.raises(InvalidArgumentError, match=re.escape(f"selector rule 0: id {rule_id!r} is reserved")):
        AlgoSelector.from_dict({"rules": [{"id": rule_id, "algo": "one_shot"}]})
