"""The automatic fusion (``sagellm_comm.compile``): what the pass rewrites, what it leaves, and the numbers.

Graph tests (this process, fake tensors, no communication): model code is traced into the functionalised aten
graph Inductor's post-grad passes see (``fusion_pass._functional_trace``: the same decompositions), the pass runs
on it, and the test reads the graph: which chains became ``torch.ops.sagellm_comm.all_reduce_residual_rmsnorm``,
with which group name, ``eps`` and quantisation mode, and which were left alone (the negative cases: another
operand than the all-reduce, another eps placement or norm, an all-reduce result used elsewhere, a MAX
reduction, a broadcast residual, mixed dtypes, a hidden size over the kernels' limit, ``eps`` a graph input).

Process tests (2 Gloo ranks, one spawn): the rewritten graphs run against the unrewritten ones on real
tensors (the fused op's engine fallback: the group's all-reduce, then torch ops), a chain on a one-rank group
beside one on the world keeps its own group, and a small function compiled by ``torch.compile`` with the pass
in the user's own Inductor options.  The ``transformers`` Llama: tests/test_compile_llama.py.

FP8 (``quant=``) cases run where ``sagellm_comm.fused`` has the FP8 quantisation (``FP8_QUANT_MODES``); they
are skipped, with that reason, where it does not.
"""

from __future__ import annotations

import copy
import functools
import operator
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import sagellm_comm.compile as fusion
from sagellm_comm.compile import fusion_pass
from sagellm_comm.errors import InvalidArgumentError, NotImplementedCommError, ShapeMismatchError
from tests.conftest import checked_values, no_compile_caches, run_ranks

FUSED_OP = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm.default
ALL_REDUCE = torch.ops.sagellm_comm.all_reduce.default
FP8_MAX, FP8_MODES = fusion_pass.fp8_quantisation()
needs_fp8 = pytest.mark.skipif(
    FP8_MAX is None, reason="needs the FP8 quantisation of sagellm_comm.fused (FP8_QUANT_MODES, quant=)"
)
HIDDEN = 256
EPS = 1e-6


# ============================================================================ model code (as models write it)


def llama_rmsnorm(h, weight, eps=EPS):
    """transformers' LlamaRMSNorm.forward."""
    input_dtype = h.dtype
    h = h.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def meta_rmsnorm(h, weight, eps=EPS):
    """The weight on the right, ``type_as`` for the cast (Meta's reference Llama)."""
    v = h.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight


def functional_rmsnorm(h, weight, eps=EPS):
    return F.rms_norm(h, (h.shape[-1],), weight, eps)


def module_rmsnorm(h, weight, eps=EPS):
    norm = torch.nn.RMSNorm(h.shape[-1], eps=eps, device=h.device, dtype=h.dtype)
    return torch.func.functional_call(norm, {"weight": weight}, (h,))


NORM_FORMS = {
    "llama": (llama_rmsnorm, "rmsnorm"),
    "meta": (meta_rmsnorm, "rmsnorm"),
    "F.rms_norm": (functional_rmsnorm, "rms_norm"),
    "nn.RMSNorm": (module_rmsnorm, "rms_norm"),
}


def all_reduce(x, group="tp", op="sum"):
    return torch.ops.sagellm_comm.all_reduce(x, group, op)


def static_fp8(y, scale):
    """The decomposed static per-tensor quantisation (fp32 division, saturating cast)."""
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def decoder_stack(h, w_attn, w_mlp, norm_w, layers=2):
    """LlamaDecoderLayer's residual structure over ``layers`` layers, projections replaced by one partial
    matmul each, then the final norm: the attention output's all-reduce feeds the post-attention norm, the
    MLP's feeds the next layer's input norm (the last: the final norm)."""
    residual = h
    h = llama_rmsnorm(h, norm_w)
    for _ in range(layers):
        h = all_reduce(h @ w_attn)
        h = residual + h
        residual = h
        h = llama_rmsnorm(h, norm_w)
        h = all_reduce(torch.tanh(h @ w_mlp))
        h = residual + h
        residual = h
        h = llama_rmsnorm(h, norm_w)
    return h


def fp8_decoder_stack(h, w_attn, w_mlp, norm_w, scale, layers=2):
    """:func:`decoder_stack` with FP8 linear layers: the attention input quantised with a static scale (the
    decomposed form), the MLP input per token (``quantize_fp8``), each dequantised before its matmul."""
    residual = h
    h = llama_rmsnorm(h, norm_w)
    for _ in range(layers):
        h = all_reduce((static_fp8(h, scale).float() * scale).to(h.dtype) @ w_attn)
        h = residual + h
        residual = h
        q, scales = torch.ops.sagellm_comm.quantize_fp8(llama_rmsnorm(h, norm_w), "fp8_per_token")
        h = all_reduce(torch.tanh((q.float() * scales).to(h.dtype) @ w_mlp))
        h = residual + h
        residual = h
        h = llama_rmsnorm(h, norm_w)
    return h


# ============================================================================ graph helpers


def _trace(fn, *specs):
    """The post-grad-like graph of ``fn`` on fake tensors: ``specs`` are ``(shape, dtype)`` or Python values."""
    with FakeTensorMode():
        args = [torch.empty(s[0], dtype=s[1]) if isinstance(s, tuple) else s for s in specs]
        return fusion_pass._functional_trace(fn, args)


def _rewrite(gm):
    """Run the pass on ``gm`` (in place); return its stats."""
    fusion.reset_stats()
    fusion.passes()(gm.graph)
    gm.recompile()
    return fusion.stats()


def _fused(gm) -> list[torch.fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=FUSED_OP))


def _quant(node: torch.fx.Node) -> str:
    return node.args[5] if len(node.args) > 5 else node.kwargs.get("quant", "none")


def _chain_specs(dtype=torch.bfloat16, hidden=HIDDEN, rows=(2, 3)):
    return [((*rows, hidden), dtype), ((*rows, hidden), dtype), ((hidden,), dtype)]


# ============================================================================ what is rewritten


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("residual_first", [True, False], ids=["residual+ar", "ar+residual"])
@pytest.mark.parametrize("form", sorted(NORM_FORMS))
def test_each_rmsnorm_form_is_fused(form, residual_first, dtype) -> None:
    norm, name = NORM_FORMS[form]

    def chain(x, residual, weight):
        reduced = all_reduce(x)
        new_residual = residual + reduced if residual_first else reduced + residual
        return norm(new_residual, weight, 1e-5), new_residual

    gm = _trace(chain, *_chain_specs(dtype))
    done = _rewrite(gm)
    assert done.replaced == {name: 1} and done.graphs == 1 and done.all_reduces_left == 0
    (node,) = _fused(gm)
    x, residual, weight = (n for n in gm.graph.nodes if n.op == "placeholder")
    assert node.args[:4] == (x, residual, weight, "tp") and _quant(node) == "none"
    assert node.args[4] == pytest.approx(1e-5, rel=1e-6)  # F.rms_norm rounds eps to fp32
    assert not gm.graph.find_nodes(op="call_function", target=ALL_REDUCE)
    outputs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    assert [o.args for o in outputs] == [(node, 0), (node, 2)]  # normed, new_residual


@pytest.mark.parametrize("form", sorted(NORM_FORMS))
def test_cuda_graphs_get_patterns_traced_on_cuda(form) -> None:
    """The patterns are traced per device type (torch decomposes some ops per device): on fake CUDA tensors
    here, so the CUDA patterns are checked without a GPU."""
    norm, name = NORM_FORMS[form]

    def chain(x, residual, weight):
        new_residual = residual + all_reduce(x)
        return norm(new_residual, weight), new_residual

    with FakeTensorMode():
        args = [torch.empty(2, 3, HIDDEN, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        gm = fusion_pass._functional_trace(chain, [*args, torch.empty(HIDDEN, dtype=torch.bfloat16, device="cuda")])
    assert _rewrite(gm).replaced == {name: 1}
    (node,) = _fused(gm)
    assert node.meta["val"][0].device.type == "cuda"


def test_a_decoder_stack_gets_two_fusions_per_layer_and_the_final_norm() -> None:
    specs = [((2, 5, HIDDEN), torch.bfloat16), ((HIDDEN, HIDDEN), torch.bfloat16)]
    specs += [((HIDDEN, HIDDEN), torch.bfloat16), ((HIDDEN,), torch.bfloat16)]
    gm = _trace(functools.partial(decoder_stack, layers=3), *specs)
    done = _rewrite(gm)
    assert done.replaced == {"rmsnorm": 6} and done.all_reduces_left == 0
    # each fused op's new_residual feeds the next fused op as its residual
    nodes = _fused(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes.sort(key=order.__getitem__)
    for before, after in zip(nodes, nodes[1:], strict=False):
        residual = after.args[1]
        assert residual.target is operator.getitem and residual.args == (before, 2)


def test_each_all_reduce_keeps_its_group() -> None:
    def two_groups(x, residual, weight):
        first = residual + all_reduce(x, "tpA")
        second = first + all_reduce(llama_rmsnorm(first, weight), "tpB")
        return llama_rmsnorm(second, weight), second

    gm = _trace(two_groups, *_chain_specs())
    assert _rewrite(gm).replaced == {"rmsnorm": 2}
    assert sorted(n.args[3] for n in _fused(gm)) == ["tpA", "tpB"]


@pytest.mark.parametrize("op", ["SUM", "Sum"])
def test_a_sum_spelled_in_capitals_is_a_sum_all_reduce(op) -> None:
    """The op reads its ``op`` in any case: ``"SUM"`` is fused as ``"sum"`` is, and counted in
    ``all_reduces_left`` when it is left; ``"MAX"`` is neither."""

    def chain(x, residual, weight):
        fused = llama_rmsnorm(residual + all_reduce(x, op=op), weight)
        reduced = all_reduce(x * 2, op=op)  # used twice: left
        maximum = all_reduce(x * 3, op="MAX")
        return fused, llama_rmsnorm(residual + reduced, weight), reduced, llama_rmsnorm(residual + maximum, weight)

    gm = _trace(chain, *_chain_specs())
    done = _rewrite(gm)
    assert done.replaced == {"rmsnorm": 1} and done.all_reduces_left == 1, done
    (node,) = _fused(gm)
    assert node.args[3] == "tp"
    left = gm.graph.find_nodes(op="call_function", target=ALL_REDUCE)
    assert sorted(str(n.args[2:]) for n in left) == ["('MAX',)", "()"]


# ============================================================================ what is left alone


def _residual_plus_twice(x, residual, weight):
    return llama_rmsnorm(residual + all_reduce(x) * 2.0, weight)


def _all_reduce_twice(x, residual, weight):
    reduced = all_reduce(x)
    return llama_rmsnorm(reduced + reduced, weight)


def _eps_after_rsqrt(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True)) + EPS).to(x.dtype)


def _eps_inside_mean(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    return weight * (v * torch.rsqrt((v.pow(2) + EPS).mean(-1, keepdim=True))).to(x.dtype)


def _eps_after_sqrt(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    return weight * (v / (torch.sqrt(v.pow(2).mean(-1, keepdim=True)) + EPS)).to(x.dtype)


def _cube_mean(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    return weight * (v * torch.rsqrt(v.pow(3).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _mean_over_tokens(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(0, keepdim=True) + EPS)).to(x.dtype)


def _all_reduce_used_elsewhere(x, residual, weight):
    reduced = all_reduce(x)
    return llama_rmsnorm(residual + reduced, weight), reduced


def _variance_used_elsewhere(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    variance = v.pow(2).mean(-1, keepdim=True)
    return weight * (v * torch.rsqrt(variance + EPS)).to(x.dtype), variance


def _max_reduction(x, residual, weight):
    return llama_rmsnorm(residual + all_reduce(x, op="max"), weight)


def _add_with_alpha(x, residual, weight):
    return llama_rmsnorm(torch.add(residual, all_reduce(x), alpha=2), weight), llama_rmsnorm(
        torch.add(all_reduce(x * 3), residual, alpha=2), weight
    )


def _plain_chain(x, residual, weight):
    return F.rms_norm(residual + all_reduce(x), (x.shape[-1],), weight)


def _mean_in_fp64(x, residual, weight):
    v = (residual + all_reduce(x)).float()
    variance = v.pow(2).mean(-1, keepdim=True, dtype=torch.float64).float()
    return weight * (v * torch.rsqrt(variance + EPS)).to(x.dtype)


def _eps_as_input(x, residual, weight, eps):
    v = (residual + all_reduce(x)).float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _eps_refused_by_the_op(eps):
    def chain(x, residual, weight):
        v = (residual + all_reduce(x)).float()
        return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return chain


def _weight_from_new_residual(x, residual, weight):
    h = residual + all_reduce(x)
    return llama_rmsnorm(h, h[0, 0] * weight), h  # [hidden], as a weight is: the op would take its own output


LEFT_ALONE = {
    "other operand than the all-reduce": (_residual_plus_twice, _chain_specs()),
    "the all-reduce added to itself": (_all_reduce_twice, _chain_specs()),
    "eps after the rsqrt": (_eps_after_rsqrt, _chain_specs()),
    "eps inside the mean": (_eps_inside_mean, _chain_specs()),
    "eps after a sqrt": (_eps_after_sqrt, _chain_specs()),
    "pow 3": (_cube_mean, _chain_specs()),
    "mean over tokens": (_mean_over_tokens, _chain_specs()),
    "all-reduce result used elsewhere": (_all_reduce_used_elsewhere, _chain_specs()),
    "variance used elsewhere": (_variance_used_elsewhere, _chain_specs()),
    "MAX reduction": (_max_reduction, _chain_specs()),
    "add with alpha": (_add_with_alpha, _chain_specs()),
    "broadcast residual": (_plain_chain, _chain_specs()[:1] + _chain_specs()[2:] * 2),
    "fp32 weight on bf16": (_plain_chain, _chain_specs()[:2] + [((HIDDEN,), torch.float32)]),
    "mean with a dtype": (_mean_in_fp64, _chain_specs()),
    "hidden over the kernels' limit": (_plain_chain, _chain_specs(hidden=16512)),
    "empty hidden": (_plain_chain, _chain_specs(hidden=0)),
    "eps a graph input": (_eps_as_input, _chain_specs() + [((), torch.float64)]),
    "negative eps": (_eps_refused_by_the_op(-1e-7), _chain_specs()),
    "infinite eps": (_eps_refused_by_the_op(float("inf")), _chain_specs()),
    "weight computed from new_residual": (_weight_from_new_residual, _chain_specs()),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LEFT_ALONE))
def test_chains_that_must_not_be_fused_are_left_alone(case) -> None:
    fn, specs = LEFT_ALONE[case]
    gm = _trace(fn, *specs)
    before = len(gm.graph.find_nodes(op="call_function", target=ALL_REDUCE))
    done = _rewrite(gm)
    assert done.total == 0 and not _fused(gm), f"{case}: {done}"
    assert len(gm.graph.find_nodes(op="call_function", target=ALL_REDUCE)) == before
    sums = 0 if case == "MAX reduction" else before
    assert done.all_reduces_left == sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("form", sorted(NORM_FORMS))
def test_a_norm_rounding_before_its_weight_is_left_where_inductor_keeps_that_rounding(form, dtype) -> None:
    """``LlamaRMSNorm`` rounds ``v`` to a 16-bit dtype before its weight multiply; the fused op (and Inductor by
    default, which drops such round trips) multiplies in fp32 and rounds once.  Under ``emulate_precision_casts``
    Inductor keeps the model's rounding, so those chains stay as they are; fp32 chains and ``F.rms_norm`` (which
    multiplies before it rounds) are the fused op's bits and are fused."""
    from sagellm_comm.fused import rmsnorm_reference

    norm, name = NORM_FORMS[form]
    torch.manual_seed(0)
    h, weight = torch.randn(8, HIDDEN).to(dtype), (torch.rand(HIDDEN) * 3 + 0.5).to(dtype)
    exact = torch.equal(norm(h, weight, 1e-5), rmsnorm_reference(h, weight, 1e-5))
    assert exact == (name == "rms_norm" or dtype == torch.float32)  # the bits behind the rule

    def chain(x, residual, weight):
        new_residual = residual + all_reduce(x)
        return norm(new_residual, weight, 1e-5), new_residual

    gm = _trace(chain, *_chain_specs(dtype))
    with torch._inductor.config.patch(emulate_precision_casts=True):
        done = _rewrite(gm)
    assert done.replaced == ({name: 1} if exact else {}) and done.all_reduces_left == (0 if exact else 1), done


def test_a_graph_without_all_reduces_is_untouched() -> None:
    gm = _trace(lambda x, r, w: llama_rmsnorm(x + r, w), *_chain_specs())
    code = gm.code
    done = _rewrite(gm)
    assert done == fusion.FusionStats(graphs=1) and gm.code == code


def _pow4_norm(h, weight):
    v = h.float()
    return weight * (v * torch.rsqrt(v.pow(4).mean(-1, keepdim=True) + EPS)).to(h.dtype)


def _token_mean_norm(h, weight):
    v = h.float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(0, keepdim=True) + EPS)).to(h.dtype)


def _fp16_cast_norm(h, weight):
    v = h.float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.float16)


def _clamp240_fp8(h, weight, scale):
    return (llama_rmsnorm(h, weight).float() / scale).clamp(-240, 240).to(torch.float8_e4m3fn)


FIRST_OF_TWO = {  # a chain like the pattern but for a number, a list or a dtype, read before an exact RMSNorm
    "pow 4": lambda h, w, s: (_pow4_norm(h, w), llama_rmsnorm(h, w)),
    "mean over tokens": lambda h, w, s: (_token_mean_norm(h, w), llama_rmsnorm(h, w)),
    "cast to fp16": lambda h, w, s: (_fp16_cast_norm(h, w), llama_rmsnorm(h, w)),
    "clamp 240": lambda h, w, s: (_clamp240_fp8(h, w, s), static_fp8(llama_rmsnorm(h, w), s)),
}


@pytest.mark.parametrize("case", sorted(FIRST_OF_TWO))
def test_a_chain_that_differs_in_a_literal_is_not_replaced_by_its_exact_neighbour(case) -> None:
    """Two chains read one new_residual; the first differs from a pattern only in a number, a list or a dtype (which
    Inductor's first match ignores), the second is exact.  Inductor re-matches at the real shapes from the same add
    and may find the exact one there: the checks passed on it while the first was replaced by the fused op (a
    pow(4) norm computed as an RMSNorm, a clamp at 240 as one at 448, an fp32 output made bf16)."""
    if case == "clamp 240" and FP8_MAX is None:
        pytest.skip("needs the FP8 quantisation of sagellm_comm.fused")

    def chain(x, residual, weight, scale):
        new_residual = residual + all_reduce(x)
        return (*FIRST_OF_TWO[case](new_residual, weight, scale), new_residual)

    specs = _chain_specs(rows=(3,))
    gm = _trace(chain, *specs, ((1,), torch.float32))
    first = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    first_val = first.meta["val"]
    done = _rewrite(gm)
    gm.graph.lint()
    first = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    assert not (first.target is operator.getitem and first.args[0].target is FUSED_OP), (case, done)
    assert first.meta["val"].dtype == first_val.dtype and first.meta["val"].shape == first_val.shape
    assert all(_quant(n) == "none" for n in _fused(gm)), done


def test_an_all_reduce_plus_a_number_keeps_the_tensor_first() -> None:
    """The residual is put first in ``add(all_reduced, residual)`` to meet the patterns; a number added to the
    all-reduce stays second (``aten.add.Tensor`` takes a tensor first)."""
    gm = _trace(lambda x, r, w: llama_rmsnorm(all_reduce(x) + 2.0, w) + r, *_chain_specs())
    adds = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor)
    assert any(not isinstance(a.args[1], torch.fx.Node) for a in adds)  # the traced form this test is about
    _rewrite(gm)
    adds = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor)
    assert adds and all(isinstance(a.args[0], torch.fx.Node) for a in adds), [a.args for a in adds]


# ============================================================================ FP8


def _quantised_chain(quantise, norm=llama_rmsnorm):
    def chain(x, residual, weight, scale):
        new_residual = residual + all_reduce(x)
        return (*quantise(norm(new_residual, weight), scale), new_residual)

    return chain


FP8_FORMS = {
    "static decomposed": (lambda y, s: (static_fp8(y, s),), "+fp8_static", "fp8"),
    "static promoted": (
        lambda y, s: ((y / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),),
        "+fp8_static",
        "fp8",
    ),
    "op static": (lambda y, s: torch.ops.sagellm_comm.quantize_fp8(y, "fp8", s), "+quantize_fp8(fp8)", "fp8"),
    "op static, scale unused": (
        lambda y, s: (torch.ops.sagellm_comm.quantize_fp8(y, "fp8", s)[0],),
        "+quantize_fp8(fp8)",
        "fp8",
    ),
    "op per token": (
        lambda y, s: torch.ops.sagellm_comm.quantize_fp8(y, "fp8_per_token"),
        "+quantize_fp8(fp8_per_token)",
        "fp8_per_token",
    ),
    "op group128": (
        lambda y, s: torch.ops.sagellm_comm.quantize_fp8(y, "fp8_group128"),
        "+quantize_fp8(fp8_group128)",
        "fp8_group128",
    ),
}


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("norm", ["llama", "F.rms_norm"])
@pytest.mark.parametrize("form", sorted(FP8_FORMS))
def test_each_fp8_quantisation_form_is_fused(form, norm, dtype) -> None:
    quantise, suffix, mode = FP8_FORMS[form]
    norm_fn, norm_name = NORM_FORMS[norm]
    gm = _trace(_quantised_chain(quantise, norm_fn), *_chain_specs(dtype), ((1,), torch.float32))
    done = _rewrite(gm)
    assert done.replaced == {norm_name + suffix: 1}, done
    (node,) = _fused(gm)
    assert _quant(node) == mode
    assert (node.args[6].op == "placeholder") if mode == "fp8" else len(node.args) <= 6
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.sagellm_comm.quantize_fp8.default)


@needs_fp8
def test_fp8_chains_that_cannot_take_the_quantisation_keep_it_and_fuse_the_rest() -> None:
    def two_quantisations(x, residual, weight, scale):  # q, k, v projections quantising one input each
        y = llama_rmsnorm(residual + all_reduce(x), weight)
        return static_fp8(y, scale), static_fp8(y, scale * 2)

    def normed_used_too(x, residual, weight, scale):
        y = llama_rmsnorm(residual + all_reduce(x), weight)
        return static_fp8(y, scale), y

    def bf16_division(x, residual, weight, scale):  # a 0-d scale keeps the division in bf16
        y = llama_rmsnorm(residual + all_reduce(x), weight)
        return (y / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    for fn, scale_shape in ((two_quantisations, (1,)), (normed_used_too, (1,)), (bf16_division, ())):
        gm = _trace(fn, *_chain_specs(), (scale_shape, torch.float32))
        done = _rewrite(gm)
        assert done.replaced == {"rmsnorm": 1}, (fn.__name__, done)
        assert [_quant(n) for n in _fused(gm)] == ["none"]


@needs_fp8
def test_a_chain_the_ops_fakes_refuse_at_its_own_dtype_is_left_and_the_compilation_goes_on() -> None:
    """A float64 residual stream normed to bf16 and quantised per token (valid: the quantiser gets bf16) beside a bf16
    chain of the same group: Inductor's first match ignores dtypes and re-traces the quantised pattern in float64,
    where ``quantize_fp8``'s fake refuses the RMSNorm output.  That refusal is "no match", not the end of the
    compilation (it raised InvalidArgumentError)."""

    def chain(x, residual, weight, x16, residual16):
        new_residual = residual + all_reduce(x)
        v = new_residual.to(torch.float32)
        y = weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
        q, scales = torch.ops.sagellm_comm.quantize_fp8(y, "fp8_per_token")
        new_residual16 = residual16 + all_reduce(x16)
        return q, scales, new_residual, llama_rmsnorm(new_residual16, weight), new_residual16

    fp64 = ((3, HIDDEN), torch.float64)
    gm = _trace(chain, fp64, fp64, ((HIDDEN,), torch.bfloat16), *_chain_specs(rows=(3,))[:2])
    done = _rewrite(gm)
    gm.graph.lint()
    assert done.replaced == {"rmsnorm": 1} and done.all_reduces_left == 1, done
    assert [n.args[0].meta["val"].dtype for n in _fused(gm)] == [torch.bfloat16]


@needs_fp8
def test_a_static_division_without_a_value_keeps_its_quantisation() -> None:
    """A pass that runs before the fusion pass (a ``post_grad_custom_post_pass`` of the user's) can leave a node
    without ``meta["val"]``: the static FP8 division's dtype is then unknown, so the quantisation is not fused (the
    check read ``None.dtype`` and the compilation ended in an AttributeError)."""
    gm = _trace(_quantised_chain(FP8_FORMS["static decomposed"][0]), *_chain_specs(), ((1,), torch.float32))
    (division,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.div.Tensor)
    del division.meta["val"]
    done = _rewrite(gm)
    gm.graph.lint()
    assert done.replaced == {"rmsnorm": 1}, done
    assert [_quant(n) for n in _fused(gm)] == ["none"]


@needs_fp8
def test_a_static_scale_computed_from_new_residual_keeps_its_quantisation() -> None:
    """A scale computed from the chain's own output (an amax of the residual stream): the fused op cannot take
    it (it would need its own output, a cyclic graph), so only the RMSNorm is fused."""

    def scale_from_new_residual(x, residual, weight):
        h = residual + all_reduce(x)
        scale = (h.float().abs().amax() / FP8_MAX).reshape(1)
        return static_fp8(llama_rmsnorm(h, weight), scale), h

    gm = _trace(scale_from_new_residual, *_chain_specs())
    done = _rewrite(gm)
    gm.graph.lint()
    assert done.replaced == {"rmsnorm": 1}, done
    assert [_quant(n) for n in _fused(gm)] == ["none"]


def test_the_dependency_walk_finds_chain_outputs_and_ignores_the_rest() -> None:
    """The cycle check on a weight or scale: computed from a chain node (through several ops) is found; computed
    from inputs only, whether placed above the chain or below it in the graph, is not."""

    def graph(x, w):
        above = (w * 2.0).abs()  # placed before the chain
        chain_a = x + 1.0
        chain_b = chain_a * 3.0
        after = (w - 1.0).exp()  # placed after the chain starts, computed from inputs only
        from_chain = (chain_b.sum() + above.sum()).sqrt()
        return chain_b, after, from_chain

    gm = torch.fx.symbolic_trace(graph)
    by_name = {n.name: n for n in gm.graph.nodes}
    chain = {n for n in gm.graph.nodes if n.name in ("add", "mul_1")}
    assert len(chain) == 2, [n.name for n in gm.graph.nodes]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    above, after, from_chain = by_name["abs_1"], out[1], out[2]
    assert fusion_pass._depends_on([from_chain], chain)
    assert fusion_pass._depends_on([after, from_chain], chain)
    assert not fusion_pass._depends_on([above], chain)
    assert not fusion_pass._depends_on([after, above, 2.0], chain)


def test_a_graph_an_earlier_pass_left_out_of_order_is_checked_in_order() -> None:
    """A weight computed from the chain's own new_residual, its node placed above the chain (an earlier pass can
    leave a graph so; Inductor sorts only after the custom passes): the pass still sees the dependency and fuses
    nothing, and the graph stays valid."""

    def chain(x, residual, w):
        new_residual = residual + all_reduce(x)
        weight = new_residual.mean((0, 1)) + w
        return llama_rmsnorm(new_residual, weight), new_residual

    spec = ((2, 3, HIDDEN), torch.bfloat16)
    gm = _trace(chain, spec, spec, ((HIDDEN,), torch.bfloat16))
    graph = gm.graph
    reduce = next(n for n in graph.nodes if n.target is torch.ops.sagellm_comm.all_reduce.default)
    weight = next(
        n for n in graph.nodes
        if n.target is torch.ops.aten.add.Tensor and n.args[0].target is torch.ops.aten.mean.dim
        and list(n.args[0].args[1]) == [0, 1]
    )  # fmt: skip
    reduce.prepend(weight)  # out of topological order
    done = _rewrite(gm)
    graph.lint()
    assert done.total == 0 and not _fused(gm), done


@needs_fp8
@pytest.mark.parametrize("form", ["static decomposed", "static promoted"])
def test_a_static_scale_of_more_dimensions_than_x_keeps_its_quantisation(form) -> None:
    """A one-element scale of more dimensions than x broadcasts q to them (``[1, 1, 1]`` on ``[T, H]``: ``q`` is
    ``[1, T, H]``); the fused op returns ``q`` shaped like x, so only the RMSNorm is fused."""
    quantise, _, _ = FP8_FORMS[form]
    for rows, scale_shape in (((3,), (1, 1, 1)), ((2, 3), (1, 1, 1, 1))):
        gm = _trace(_quantised_chain(quantise), *_chain_specs(rows=rows), (scale_shape, torch.float32))
        done = _rewrite(gm)
        assert done.replaced == {"rmsnorm": 1}, (rows, scale_shape, done)
        assert [_quant(n) for n in _fused(gm)] == ["none"]


# ============================================================================ the ops


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (1, 64)])
def test_fused_op_fake_gives_shapes_and_dtypes(shape) -> None:
    with FakeTensorMode():
        x = torch.empty(shape, dtype=torch.bfloat16)
        normed, scales, new_residual = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(
            x, torch.empty_like(x), torch.empty(64, dtype=torch.bfloat16), "g", 1e-6
        )
        assert normed.shape == shape and normed.dtype == torch.bfloat16 and new_residual.shape == shape
        assert scales.shape == (0,) and scales.dtype == torch.float32
        with pytest.raises(InvalidArgumentError, match="scale is only taken"):
            scale = torch.ones(1)
            torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(x, x, torch.empty(64), "g", 1e-6, "none", scale)
        with pytest.raises(ShapeMismatchError):
            wrong = torch.empty(3, *shape, dtype=torch.bfloat16)
            torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(x, wrong, torch.empty(64), "g", 1e-6)


@needs_fp8
@pytest.mark.parametrize("mode", ["fp8", "fp8_per_token", "fp8_group128"])
def test_fp8_ops_fake_give_the_reference_shapes(mode) -> None:
    with FakeTensorMode():
        x = torch.empty(2, 3, 256, dtype=torch.bfloat16)
        scale = torch.empty(1, dtype=torch.float32) if mode == "fp8" else None
        q, scales, new_residual = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(
            x, torch.empty_like(x), torch.empty(256, dtype=torch.bfloat16), "g", 1e-6, mode, scale
        )
        q2, scales2 = torch.ops.sagellm_comm.quantize_fp8(x, mode, scale)
        with pytest.raises(InvalidArgumentError):
            torch.ops.sagellm_comm.quantize_fp8(x, "int4", scale)
        with pytest.raises(InvalidArgumentError):
            weight = torch.empty(256, dtype=torch.bfloat16)
            torch.ops.sagellm_comm.all_reduce_residual_rmsnorm(x, x, weight, "g", 1e-6, "int4", scale)
    expected = {"fp8": (1,), "fp8_per_token": (2, 3, 1), "fp8_group128": (2, 3, 2)}[mode]
    for got_q, got_scales in ((q, scales), (q2, scales2)):
        assert got_q.shape == x.shape and got_q.dtype == torch.float8_e4m3fn
        assert got_scales.shape == expected and got_scales.dtype == torch.float32
    assert new_residual.shape == x.shape and new_residual.dtype == torch.bfloat16


def test_fused_op_schema() -> None:
    schema = torch.ops.sagellm_comm.all_reduce_residual_rmsnorm.default._schema
    assert not schema.is_mutable
    assert [a.name for a in schema.arguments] == ["x", "residual", "weight", "group_name", "eps", "quant", "scale"]
    assert len(schema.returns) == 3


# ============================================================================ the API


def test_passes_is_one_custom_graph_pass_with_a_uuid() -> None:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    assert fusion.passes() is fusion.passes() and isinstance(fusion.passes(), CustomGraphPass)
    uuid = fusion.passes().uuid()
    assert isinstance(uuid, str) and uuid == fusion.passes().uuid()


def test_the_uuid_changes_with_the_sources_that_decide_a_rewrite(monkeypatch) -> None:
    """The patterns, the ops' schemas and ``ReduceOp.parse`` (backend.py: which all-reduces are SUMs) decide what
    is rewritten: a change to any of them must not load a graph Inductor cached before it."""
    from pathlib import Path

    before = fusion.passes().uuid()
    read = Path.read_bytes
    for name in ("patterns.py", "ops.py", "backend.py"):
        monkeypatch.setattr(Path, "read_bytes", lambda self, n=name: read(self) + (b"#" if self.name == n else b""))
        fusion_pass._source_hash.cache_clear()
        try:
            assert fusion.passes().uuid() != before, name
        finally:
            monkeypatch.undo()
            fusion_pass._source_hash.cache_clear()
    assert fusion.passes().uuid() == before


def test_the_uuid_changes_with_the_fused_kernels_limits(monkeypatch) -> None:
    """``MAX_HIDDEN`` and ``RMSNORM_DTYPES`` decide which chains are rewritten: a graph Inductor cached under other
    limits must not be loaded (it could hold a fused op for a hidden size the kernels now refuse)."""
    before = fusion.passes().uuid()
    max_hidden, dtypes = fusion_pass._fused_limits()
    monkeypatch.setattr(fusion_pass, "_fused_limits", lambda: (max_hidden // 2, dtypes))
    fusion_pass._source_hash.cache_clear()
    try:
        assert fusion.passes().uuid() != before
    finally:
        monkeypatch.undo()
        fusion_pass._source_hash.cache_clear()
    assert fusion.passes().uuid() == before


def test_cache_hits_count_only_graphs_compiled_with_the_pass(monkeypatch, tmp_path) -> None:
    """Each function is compiled, then loaded from Inductor's FX-graph cache: the hit of the one compiled with
    the pass counts, the hit of the one compiled without it does not (nor a uuid() asked for outside Inductor)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache: the first compilations miss

    def with_pass(a):
        return torch.cos(a) * 3 - 1

    def without_pass(a):
        return torch.sin(a) * 2 + 1

    a = torch.randn(8)
    hits_before = counters["inductor"]["fxgraph_cache_hit"]
    with config.patch(fx_graph_cache=True):
        fusion.reset_stats()
        for compiled, fn in ((fusion.compile, with_pass), (torch.compile, without_pass)):
            for _ in range(2):
                torch._dynamo.reset()
                torch.testing.assert_close(compiled(fn)(a), fn(a))
        fusion.passes().uuid()
        torch._dynamo.reset()
        torch.compile(without_pass)(a)
        done = fusion.stats()
    torch._dynamo.reset()
    assert counters["inductor"]["fxgraph_cache_hit"] - hits_before == 3  # one with the pass, two without
    assert done.graphs == 1 and done.cache_hits == 1, done


def test_install_keeps_a_pass_already_there_and_uninstall_restores_it() -> None:
    from torch._inductor import config

    seen = []

    def theirs(graph):
        seen.append(graph)

    with config.patch(post_grad_custom_post_pass=theirs):
        fusion.install()
        fusion.install()  # idempotent
        chain = config.post_grad_custom_post_pass
        assert isinstance(chain, fusion.PassChain) and chain.passes == (theirs, fusion.passes())
        assert chain.uuid() is None  # a plain callable: Inductor bypasses its cache
        gm = _trace(lambda x, r, w: llama_rmsnorm(r + all_reduce(x), w), *_chain_specs())
        fusion.reset_stats()
        chain(gm.graph)
        assert seen == [gm.graph] and fusion.stats().total == 1
        fusion.uninstall()
        assert config.post_grad_custom_post_pass is theirs
    with config.patch(post_grad_custom_post_pass=None):
        fusion.install()
        assert config.post_grad_custom_post_pass is fusion.passes()
        fusion.uninstall()
        assert config.post_grad_custom_post_pass is None


def test_a_users_inference_aware_pass_runs_beside_the_fusion_pass() -> None:
    """A ``CustomInferenceAwareGraphPass`` of the user's in the options: Inductor calls it with ``is_inference``, so
    the chain ``compile`` makes of it and the fusion pass must hand that on (the chain called it with the graph
    alone: TypeError, and the compilation ended)."""
    from torch._inductor import custom_graph_pass

    aware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)
    if aware is None:
        pytest.skip("this torch has no CustomInferenceAwareGraphPass")
    seen = []

    class Theirs(aware):
        def __call__(self, graph, is_inference):
            seen.append(is_inference)

        def uuid(self):
            return "theirs"

    def fn(a):
        return torch.cos(a) * 2 + 1

    a = torch.randn(8)
    torch._dynamo.reset()
    try:
        with no_compile_caches(), torch.no_grad():
            got = fusion.compile(fn, options={"post_grad_custom_post_pass": Theirs()})(a)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, fn(a))
    assert seen == [True]


def test_a_fusion_pass_inside_a_nested_pass_chain_is_found(monkeypatch) -> None:
    """A ``PassChain`` made around a slot that already holds the fusion pass (a chain in a chain): ``install`` does
    not add a second one, ``uninstall`` removes it, and ``compile`` runs it once."""
    from torch._inductor import config

    def theirs(graph):
        pass

    def mine(graph):
        pass

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    with config.patch(post_grad_custom_post_pass=theirs):
        fusion.install()
        config.post_grad_custom_post_pass = fusion.PassChain([config.post_grad_custom_post_pass, mine])
        fusion.install()
        slot = config.post_grad_custom_post_pass
        assert slot.passes == (theirs, mine, fusion.passes()), slot.passes
        gm = _trace(lambda x, r, w: llama_rmsnorm(r + all_reduce(x), w), *_chain_specs())
        fusion.reset_stats()
        slot(gm.graph)
        assert fusion.stats() == fusion.FusionStats(replaced={"rmsnorm": 1}, graphs=1)
        fusion.compile(torch.nn.Linear(2, 2))
        assert calls[-1]["options"]["post_grad_custom_post_pass"].passes == (theirs, mine, fusion.passes())
        fusion.uninstall()
        assert config.post_grad_custom_post_pass.passes == (theirs, mine)


def test_a_fusion_pass_already_in_the_slot_is_not_installed_twice(monkeypatch) -> None:
    """An ``AllReduceFusionPass()`` of the user's own in the slot is the fusion pass: ``compile`` and ``install``
    do not chain a second one after it (each graph would be rewritten, and counted in ``stats()``, twice)."""
    from torch._inductor import config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    theirs = fusion.AllReduceFusionPass()
    with config.patch(post_grad_custom_post_pass=theirs):
        fusion.compile(torch.nn.Linear(2, 2))
        slot = calls[-1]["options"]["post_grad_custom_post_pass"]
        assert slot is fusion.passes(), slot
        fusion.install()
        assert config.post_grad_custom_post_pass is fusion.passes()
        fusion.uninstall()
        assert config.post_grad_custom_post_pass is None
    fusion.compile(torch.nn.Linear(2, 2), options={"post_grad_custom_post_pass": fusion.PassChain([theirs])})
    slot = calls[-1]["options"]["post_grad_custom_post_pass"]
    assert slot is fusion.passes(), slot
    gm = _trace(lambda x, r, w: llama_rmsnorm(r + all_reduce(x), w), *_chain_specs())
    fusion.reset_stats()
    slot(gm.graph)
    assert fusion.stats() == fusion.FusionStats(replaced={"rmsnorm": 1}, graphs=1)


def test_compile_installs_the_pass_for_that_compilation(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append((model, kw)) or model)
    model = torch.nn.Linear(2, 2)
    assert fusion.compile(model, fullgraph=True) is model
    assert calls[-1][1] == {
        "backend": "inductor",
        "options": {"post_grad_custom_post_pass": fusion.passes()},
        "fullgraph": True,
    }

    def mine(graph):
        pass

    fusion.compile(
        model,
        mode="max-autotune-no-cudagraphs",
        options={"post_grad_custom_post_pass": mine, "coordinate_descent_tuning": False},
    )
    options = calls[-1][1]["options"]
    assert options["max_autotune"] is True and options["coordinate_descent_tuning"] is False
    assert options["post_grad_custom_post_pass"].passes == (mine, fusion.passes())  # mine first
    from torch._inductor import config

    with config.patch(post_grad_custom_post_pass=mine):  # a pass set globally runs too, before ours
        fusion.compile(model)
        assert calls[-1][1]["options"]["post_grad_custom_post_pass"].passes == (mine, fusion.passes())
        fusion.compile(model, options={"post_grad_custom_post_pass": None})  # options override the config
        assert calls[-1][1]["options"]["post_grad_custom_post_pass"] is fusion.passes()
    decorated = fusion.compile(dynamic=False)(model)
    assert decorated is model and calls[-1][1]["dynamic"] is False
    with pytest.raises(InvalidArgumentError, match="backend='inductor'"):
        fusion.compile(model, backend="eager")
    for refused in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(NotImplementedCommError, match="CUDA graphs"):
            fusion.compile(model, **refused)
    with pytest.raises(InvalidArgumentError, match="mode must be one of"):
        fusion.compile(model, mode="fastest")
    with pytest.raises(InvalidArgumentError, match="post-grad passes off"):  # the pass would never run
        fusion.compile(model, options={"use_post_grad_passes": False})
    from torch._inductor import list_mode_options

    if "lite" in list_mode_options():
        with pytest.raises(InvalidArgumentError, match="post-grad passes off"):
            fusion.compile(model, mode="lite")


def test_compile_refuses_what_the_global_inductor_config_turns_on(monkeypatch) -> None:
    """The options of ``compile`` patch ``torch._inductor.config``: a setting the mode and options leave alone is
    the global one, so CUDA graphs or post-grad passes off set there are refused as in the options."""
    from torch._inductor import config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    with config.patch({"triton.cudagraphs": True}):
        for kwargs in ({}, {"mode": "max-autotune-no-cudagraphs"}, {"options": {"max_autotune": True}}):
            with pytest.raises(NotImplementedCommError, match=r"triton.cudagraphs=True from torch._inductor.config"):
                fusion.compile(model, **kwargs)
        fusion.compile(model, options={"triton.cudagraphs": False})  # the options turn them off again
        assert calls[-1]["options"]["triton.cudagraphs"] is False
    with config.patch(use_post_grad_passes=False):
        with pytest.raises(InvalidArgumentError, match=r"from torch._inductor.config.* post-grad passes off"):
            fusion.compile(model)
        fusion.compile(model, options={"use_post_grad_passes": True})
    with pytest.raises(InvalidArgumentError, match=r"from the mode or options.* post-grad passes off"):
        fusion.compile(model, options={"use_post_grad_passes": False})
    assert len(calls) == 2


def test_compile_reads_option_names_spelled_with_dashes(monkeypatch) -> None:
    """torch.compile takes ``"use-post-grad-passes"`` for ``"use_post_grad_passes"``: ``compile`` reads the options
    by the names Inductor gives them, so a dashed spelling is checked, and a pass of yours kept, as the other."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InvalidArgumentError, match="post-grad passes off"):
        fusion.compile(model, options={"use-post-grad-passes": False})

    def mine(graph):
        pass

    fusion.compile(model, options={"post-grad-custom-post-pass": mine, "max-autotune": True})
    options = calls[-1]["options"]
    assert options == {"max_autotune": True, "post_grad_custom_post_pass": options["post_grad_custom_post_pass"]}
    assert options["post_grad_custom_post_pass"].passes == (mine, fusion.passes())  # mine first, as undashed


# ============================================================================ on two Gloo ranks


def _decoder_inputs(rank: int, dtype):
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(2, 5, HIDDEN, generator=gen).to(dtype)
    w_attn = (torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5 * (rank + 1)).to(dtype)
    w_mlp = (torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5 * (2 - rank)).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    return [h, w_attn, w_mlp, norm_w]


def _chain_inputs(rank: int, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 7, HIDDEN, generator=gen) * (rank + 1)).to(dtype)
    residual = torch.randn(3, 7, HIDDEN, generator=gen).to(dtype)
    return [x, residual, (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)]


def _both(fn, inputs):
    """``fn``'s graph unrewritten and rewritten, both run on ``inputs``: (outputs, outputs, stats)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        gm = fusion_pass._functional_trace(fn, [torch.empty_like(t) for t in inputs])
    rewritten = copy.deepcopy(gm)
    done = _rewrite(rewritten)
    return gm(*inputs), rewritten(*inputs), done


def _two_groups(x, residual, weight):
    first = residual + all_reduce(x, "tp")
    second = first + all_reduce(llama_rmsnorm(first, weight), "solo")
    return llama_rmsnorm(second, weight), second


def _small_model(x, residual, weight):
    new_residual = all_reduce(x) + residual
    return F.rms_norm(new_residual, (HIDDEN,), weight, 1e-5), new_residual


def _gloo_worker(rank: int, world_size: int, port: int) -> dict:
    import sagellm_comm
    from sagellm_comm import ops

    world = sagellm_comm.init(backend="gloo", rank=rank, world_size=world_size, master_port=port, timeout=120)
    results: dict = {}
    try:
        ops.register_group(world, "tp")
        ops.register_group(world.split(1), "solo")
        cases = {
            "decoder bf16": (decoder_stack, _decoder_inputs(rank, torch.bfloat16)),
            "decoder fp32": (decoder_stack, _decoder_inputs(rank, torch.float32)),
            "all-reduce used elsewhere": (_all_reduce_used_elsewhere, _chain_inputs(rank, torch.bfloat16)),
            "two groups": (_two_groups, _chain_inputs(rank, torch.bfloat16)),
        }
        for form, (norm, _) in NORM_FORMS.items():
            chain = functools.partial(_normed_chain, norm)
            cases[f"norm {form}"] = (chain, _chain_inputs(rank, torch.bfloat16))
        if FP8_MAX is not None:
            for form, (quantise, _, _) in FP8_FORMS.items():
                inputs = _chain_inputs(rank, torch.bfloat16) + [torch.tensor([0.02])]
                cases[f"fp8 {form}"] = (_quantised_chain(quantise), inputs)
            for value in STATIC_SCALES_TAKEN:  # data the model's own division takes, as the fused op must
                for form in ("static decomposed", "op static"):
                    inputs = _chain_inputs(rank, torch.bfloat16) + [torch.tensor([value])]
                    cases[f"fp8 {form} scale {value}"] = (_quantised_chain(FP8_FORMS[form][0]), inputs)
        for name, (fn, inputs) in cases.items():
            try:
                unfused, fused, done = _both(fn, inputs)
                results[name] = ("ok", (_portable(unfused), _portable(fused), done))
            except Exception:
                results[name] = ("raised", traceback.format_exc())
                return results
        results["ops"] = ("ok", _ops_against_the_fused_function(rank))
        # The user's own torch.compile configuration, through Inductor (C++ code on the CPU).
        inputs = _chain_inputs(rank, torch.float32)
        fusion.reset_stats()
        with no_compile_caches():
            compiled = torch.compile(_small_model, options={"post_grad_custom_post_pass": fusion.passes()})
            got = compiled(*inputs)
        results["inductor"] = ("ok", (_portable(_small_model(*inputs)), _portable(got), fusion.stats()))
        if FP8_MAX is not None:  # an FP8 model through sagellm_comm.compile.compile
            inputs = _decoder_inputs(rank, torch.bfloat16) + [torch.tensor([0.02])]
            fusion.reset_stats()
            with no_compile_caches():
                got = fusion.compile(fp8_decoder_stack, fullgraph=True)(*inputs)
            expected = [fp8_decoder_stack(*inputs), decoder_stack(*inputs[:4])]  # FP8 unfused; unquantised
            results["inductor fp8"] = ("ok", (_portable(expected), _portable(got), fusion.stats()))
            # A static scale of more dimensions than x: the model's q is [1, tokens, hidden].
            x, residual, weight = (t.reshape(-1, t.shape[-1]) for t in _chain_inputs(rank, torch.bfloat16))
            inputs = [x, residual, weight.reshape(-1), torch.full((1, 1, 1), 0.02)]
            chain = _quantised_chain(FP8_FORMS["static decomposed"][0])
            fusion.reset_stats()
            try:
                with no_compile_caches():
                    got = fusion.compile(chain, fullgraph=True)(*inputs)
                outcome = (_portable(chain(*inputs)), _portable(got), fusion.stats())
                results["inductor fp8 scale [1, 1, 1]"] = ("ok", outcome)
            except Exception:
                results["inductor fp8 scale [1, 1, 1]"] = ("raised", traceback.format_exc())
    finally:
        sagellm_comm.destroy()
    return results


def _ops_against_the_fused_function(rank: int):
    """The op wrappers on 3-d inputs against ``sagellm_comm.fused``'s function on the flattened rows (eager)."""
    from sagellm_comm import fused, ops

    x, residual, weight = _chain_inputs(rank, torch.bfloat16)
    rows = (x.reshape(-1, HIDDEN), residual.reshape(-1, HIDDEN))
    expected = [t.reshape(x.shape) for t in fused.all_reduce_residual_rmsnorm(*rows, weight, 1e-5, group="tp")]
    got = list(ops.all_reduce_residual_rmsnorm(x, residual, weight, 1e-5, group="tp"))
    if FP8_MAX is not None:
        scale = torch.tensor([0.02])
        for mode in FP8_MODES:
            mode_scale = scale if mode == "fp8" else None
            q, scales, new_residual = fused.all_reduce_residual_rmsnorm(
                *rows, weight, 1e-5, group="tp", quant=mode, scale=mode_scale
            )
            scales = scales if mode == "fp8" else scales.reshape(*x.shape[:-1], -1)
            expected += [q.reshape(x.shape), scales, new_residual.reshape(x.shape)]
            got += list(ops.all_reduce_residual_rmsnorm(x, residual, weight, 1e-5, "tp", mode, mode_scale))
            expected += list(fused.quantize_fp8_reference(got[-1], mode, mode_scale))
            got += list(ops.quantize_fp8(got[-1], mode, mode_scale))
    return _portable(expected), _portable(got), fusion.FusionStats()


def _normed_chain(norm, x, residual, weight):
    new_residual = residual + all_reduce(x)
    return norm(new_residual, weight), new_residual


def _portable(outputs) -> list[tuple[str, object]]:
    """Tensors as (dtype name, fp32 numpy array): pickled by value to the test process (the values of bf16 and
    FP8 tensors are exact in fp32)."""
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    return [(str(t.dtype).removeprefix("torch."), t.detach().float().numpy().copy()) for t in outputs]


def _tensors(portable) -> list[torch.Tensor]:
    return [torch.from_numpy(array).to(getattr(torch, dtype)) for dtype, array in portable]


@pytest.fixture(scope="module")
def gloo_outcomes() -> list[dict]:
    return run_ranks(_gloo_worker, 2, timeout=420.0)


def _case(outcomes, name):
    """Every rank's ``(unfused, fused, done)`` of case ``name``, as tensors."""
    return [(_tensors(unfused), _tensors(fused), done) for unfused, fused, done in checked_values(outcomes, name)]


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within one rounding of the dtype (the fused op rounds the RMSNorm once, in fp32, before the weight
    multiply of some model code)."""
    if expected.dtype == torch.float8_e4m3fn:
        return _within_one_fp8_step(got, expected)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}[expected.dtype]
    return bool(torch.allclose(got.float(), expected.float(), rtol=2 * ulp, atol=2 * ulp))


def _within_one_fp8_step(got: torch.Tensor, expected: torch.Tensor) -> bool:
    a, b = got.float(), expected.float()
    step = torch.maximum(a.abs(), b.abs()) * 2**-3 + 2**-9  # e4m3: 3 mantissa bits; subnormal step 2^-9
    return bool(((a - b).abs() <= step).all())


GLOO_CASES = ["decoder bf16", "decoder fp32", "two groups"] + [f"norm {form}" for form in sorted(NORM_FORMS)]


@pytest.mark.parametrize("name", GLOO_CASES)
def test_rewritten_graphs_compute_what_the_model_does(gloo_outcomes, name) -> None:
    per_rank = _case(gloo_outcomes, name)
    expected_fusions = {"decoder bf16": 4, "decoder fp32": 4, "two groups": 2}.get(name, 1)
    for rank, (unfused, fused, done) in enumerate(per_rank):
        assert done.total == expected_fusions and done.all_reduces_left == 0, f"rank {rank}: {done}"
        assert len(unfused) == len(fused)
        for index, (got, expected) in enumerate(zip(fused, unfused, strict=True)):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert _close(got, expected), f"rank {rank} output {index}: {(got.float() - expected.float()).abs().max()}"
    for index in range(len(per_rank[0][1])):  # every rank gets the same bits where every rank reduced the same
        if name != "two groups":
            assert torch.equal(per_rank[0][1][index], per_rank[1][1][index])


def test_an_all_reduce_used_elsewhere_is_left_and_every_output_is_right(gloo_outcomes) -> None:
    for unfused, fused, done in _case(gloo_outcomes, "all-reduce used elsewhere"):
        assert done.total == 0 and done.all_reduces_left == 1
        assert all(torch.equal(a, b) for a, b in zip(fused, unfused, strict=True))


def test_the_op_wrappers_give_the_fused_functions_results(gloo_outcomes) -> None:
    for expected, got, _ in _case(gloo_outcomes, "ops"):
        assert len(got) == len(expected) == (2 if FP8_MAX is None else 2 + 5 * len(FP8_MODES))
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.float(), b.float())


def test_the_pass_in_a_users_own_torch_compile_options(gloo_outcomes) -> None:
    for expected, got, done in _case(gloo_outcomes, "inductor"):
        assert done.replaced == {"rms_norm": 1} and done.all_reduces_left == 0
        for a, b in zip(got, expected, strict=True):
            assert _close(a, b)


@needs_fp8
@pytest.mark.parametrize("form", sorted(FP8_FORMS))
def test_fp8_rewrites_match_the_unfused_quantisation(gloo_outcomes, form) -> None:
    per_rank = _case(gloo_outcomes, f"fp8 {form}")
    for rank, (unfused, fused, done) in enumerate(per_rank):
        assert done.total == 1, f"rank {rank}: {done}"
        q, *scales, new_residual = fused
        q_ref, *scales_ref, new_residual_ref = unfused
        assert q.dtype == torch.float8_e4m3fn and _within_one_fp8_step(q, q_ref)
        assert torch.equal(new_residual, new_residual_ref)
        for got, expected in zip(scales, scales_ref, strict=True):  # dynamic scales: amax / 448 of y
            assert torch.allclose(got, expected, rtol=2**-7)
    assert all(torch.equal(a, b) for a, b in zip(per_rank[0][1], per_rank[1][1], strict=True))


STATIC_SCALES_TAKEN = (0.0, -0.5)


@needs_fp8
@pytest.mark.parametrize("value", STATIC_SCALES_TAKEN)
@pytest.mark.parametrize("form", ["static decomposed", "op static"])
def test_a_static_scale_that_is_not_positive_is_computed_with_as_the_model_does(gloo_outcomes, form, value) -> None:
    """The scale is a graph input whose value the pass never sees: the fused op computes ``y / scale`` as the
    model does (0: +-448, NaN where ``y`` is 0; negative: ``q`` negated) instead of refusing it."""
    for rank, (unfused, fused, done) in enumerate(_case(gloo_outcomes, f"fp8 {form} scale {value}")):
        assert done.total == 1, f"rank {rank}: {done}"
        q, *_, new_residual = fused
        q_ref, *_, new_residual_ref = unfused
        assert torch.equal(new_residual, new_residual_ref)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float().isnan(), q_ref.float().isnan())
        finite = ~q.float().isnan()
        if value == 0.0:
            assert torch.equal(q.float()[finite].abs(), torch.full_like(q.float()[finite], 448.0)), f"rank {rank}"
            assert torch.equal(q.float()[finite], q_ref.float()[finite]), f"rank {rank}"
        else:
            assert _within_one_fp8_step(q.float()[finite], q_ref.float()[finite]), f"rank {rank}"


@needs_fp8
def test_an_fp8_model_compiled_with_the_pass(gloo_outcomes) -> None:
    """Per layer: the post-attention norm's per-token quantisation and the next input norm's static one are
    fused; the final norm is fused unquantised; the first input norm has no all-reduce before it."""
    for rank, (expected, got, done) in enumerate(_case(gloo_outcomes, "inductor fp8")):
        assert done.replaced == {
            "rmsnorm+quantize_fp8(fp8_per_token)": 2,
            "rmsnorm+fp8_static": 1,
            "rmsnorm": 1,
        }, f"rank {rank}: {done}"
        assert done.all_reduces_left == 0
        (fused,), (unfused, unquantised) = got, expected
        # The fused op rounds the RMSNorm output once (fp32 math), the model's code twice: some elements land on
        # the other side of an FP8 rounding boundary.  The fused model must be as close to the unquantised one
        # as the unfused FP8 model is, and differ from it by no more than FP8's own error.
        fp8_error = _relative_l2(unfused, unquantised)
        assert _relative_l2(fused, unquantised) <= 1.25 * fp8_error, f"rank {rank}: FP8 error {fp8_error:.3e}"
        assert _relative_l2(fused, unfused) <= 1.5 * fp8_error, f"rank {rank}: FP8 error {fp8_error:.3e}"


@needs_fp8
def test_a_model_with_a_static_scale_of_more_dimensions_than_x_compiles_with_the_pass(gloo_outcomes) -> None:
    """``q`` keeps the model's shape ``[1, tokens, hidden]``: the RMSNorm is fused, the quantisation is not."""
    for rank, (expected, got, done) in enumerate(_case(gloo_outcomes, "inductor fp8 scale [1, 1, 1]")):
        assert done.replaced == {"rmsnorm": 1} and done.all_reduces_left == 0, f"rank {rank}: {done}"
        assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in expected]
        assert got[0].shape == (1, 21, HIDDEN)
        assert all(_close(a, b) for a, b in zip(got, expected, strict=True)), f"rank {rank}"


def _relative_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_eps_is_read_from_the_graph_where_the_match_does_not_name_it() -> None:
    """Inductor re-matches a pattern at the real shapes; where it traces ``eps`` as the graph's own constant
    (torch 2.11), the match has no ``eps``: the pass reads it from the chain (the scalar added to the mean)."""
    from types import SimpleNamespace

    from sagellm_comm.compile.fusion_pass import _eps_of

    def norm(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)

    gm = torch.fx.experimental.proxy_tensor.make_fx(norm)(torch.randn(2, 8))
    assert _eps_of(SimpleNamespace(nodes=list(gm.graph.nodes))) == pytest.approx(1e-5)
    assert _eps_of(SimpleNamespace(nodes=[])) is None
