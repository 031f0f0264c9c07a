"""Every device kernel compiles for Hopper (sm_90) on this CPU machine, with the memory operations the
protocol relies on.

The interpreter runs the kernels' Python, not the compiler: a kernel can pass every CPU test and still fail
to compile (an int32 constant where an int64 atomic needs one, say).  Triton's CUDA backend and its bundled
``ptxas`` compile without a GPU, so each kernel family is compiled here once, and the PTX is checked for
what docs/protocol.md promises: 64-bit system-scope acquire loads of the flags, release exchanges, and
16-byte vector accesses to the peers' data.
"""

from __future__ import annotations

import inspect
import re

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without the CUDA backend
    pytest.skip("this Triton has no CUDA backend to compile with", allow_module_level=True)

TARGET = GPUTarget("cuda", 90, 32)
UNALIGNED = {"rank", "timeout", "eps", "step", "algo", "dtype_code", "n_items", "parts", "me", "n"}


def _compile(kernel, types: dict, constexprs: dict, num_warps: int = 8):
    parameters = inspect.signature(kernel.fn).parameters
    params = list(parameters)
    defaults = {p: v.default for p, v in parameters.items() if v.default is not inspect.Parameter.empty}
    constexprs = {**{p: v for p, v in defaults.items() if p not in types}, **constexprs}
    signature = {p: "constexpr" if p in constexprs else types[p] for p in params}
    # As a launch specialises them: pointers 16-byte aligned, sizes and offsets multiples of 16.
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in types and p not in UNALIGNED}
    src = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in constexprs.items()}, attrs=aligned)
    try:
        return triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    except RuntimeError as exc:  # no ptxas / no CUDA toolchain in this Triton wheel
        if "ptxas" in str(exc).lower():
            pytest.skip(f"Triton cannot compile for CUDA here: {exc}")
        raise


COLLECTIVE = dict(inp="*bf16", out="*bf16", table="*i64", ctrl="*i64", numel="i32", rank="i32", slot_bytes="i64",
                  timeout="i64")  # fmt: skip


def _cases():
    from sagellm_comm.kernels import all_reduce as ar
    from sagellm_comm.kernels import block_copy as bc
    from sagellm_comm.kernels import copy_engine as ce
    from sagellm_comm.kernels import fingerprint as fp
    from sagellm_comm.kernels import fp8_payload_all_reduce as pay
    from sagellm_comm.kernels import fused_all_reduce_rmsnorm as rm
    from sagellm_comm.kernels import gather_scatter as gs
    from sagellm_comm.kernels import gemm_all_reduce as gk
    from sagellm_comm.kernels import lamport_all_reduce as la

    flags = ("ld.acquire.sys.global.b64", "atom.global.sys.release.exch.b64")
    vectors = ("ld.global.cg.v4",)
    record = ("fence.sc.sys",)  # an error record's fields are ordered before its status word
    cases = []
    for kernel in (ar.one_shot_all_reduce_kernel, ar.two_shot_all_reduce_kernel):
        for zero_copy in (False, True):
            cx = dict(W=4, WP=4, BLOCK=2048, ZERO_COPY=zero_copy, USE_PTX=True, VIRTUAL=False, STAGES=1)
            cases.append((kernel, COLLECTIVE, cx, flags + vectors + record))
    for kernel in (gs.all_gather_kernel, gs.reduce_scatter_kernel):
        cases.append((kernel, COLLECTIVE, dict(W=3, WP=4, BLOCK=2048, USE_PTX=True, VIRTUAL=True, STAGES=1), flags))
    cases.append(
        (
            la.lamport_all_reduce_kernel,
            dict(COLLECTIVE, lamport_offset="i64", cap="i32"),
            dict(W=8, WP=8, BLOCK=256, USE_PTX=True, VIRTUAL=True, PDL=True),
            ("griddepcontrol.wait",),
        )
    )
    cases.append(
        (
            pay.two_shot_fp8_all_reduce_kernel,
            COLLECTIVE,
            dict(W=4, WP=4, BLOCK=4096, USE_PTX=True, VIRTUAL=False),
            flags + ("div.rn.f32", "cvt.rn.satfinite.e4m3x2.f32", "ld.global.cg.v4"),
        )
    )
    cases.append(
        (
            fp.fingerprint_check_kernel,
            dict(table="*i64", ctrl="*i64", rank="i32", algo="i32", numel="i64", dtype_code="i32", timeout="i64"),
            dict(W=3, WP=4, USE_PTX=True, VIRTUAL=False),
            flags + record,
        )
    )
    cases.append(  # check mode across a hierarchical group: compares, latches with a CAS, waits for nothing
        (
            fp.group_fingerprint_check_kernel,
            dict(table="*i64", ctrl="*i64", prints="*i64", me="i32", n="i32"),
            dict(W=4, NP=16, USE_PTX=True),
            ("atom.global.acq_rel.gpu.cas.b64",) + record,
        )
    )
    rms_types = dict(
        inp="*fp16",
        residual="*fp16",
        weight="*fp16",
        out="*fp16",
        scales="*fp16",
        residual_out="*fp16",
        table="*i64",
        ctrl="*i64",
        num_rows="i32",
        hidden="i32",
        eps="fp32",
        rank="i32",
        slot_bytes="i64",
        timeout="i64",
    )
    for two_shot in (False, True):
        cases.append(
            (
                rm.all_reduce_rmsnorm_kernel,
                rms_types,
                dict(W=2, WP=2, BLOCK_H=4096, TWO_SHOT=two_shot, QUANT=0, USE_PTX=True, VIRTUAL=False),
                flags,
            )
        )
    # FP8 outputs: a round-to-nearest division and one saturating round-to-nearest conversion (kernels/fp8.py).
    fp8_types = dict(rms_types, inp="*bf16", residual="*bf16", weight="*bf16", residual_out="*bf16", out="*fp8e4nv",
                     scales="*fp32")  # fmt: skip
    fp8_ops = ("div.rn.f32", "cvt.rn.satfinite.e4m3x2.f32")
    for two_shot, quant, w in ((False, 1, 4), (True, 2, 3), (True, 3, 8), (False, 3, 2)):
        cx = dict(W=w, WP=triton.next_power_of_2(w), BLOCK_H=8192, TWO_SHOT=two_shot, QUANT=quant, USE_PTX=True,
                  VIRTUAL=two_shot)  # fmt: skip
        cases.append((rm.all_reduce_rmsnorm_kernel, fp8_types, cx, flags + fp8_ops))
    lamport_rms = {k: v for k, v in fp8_types.items() if k != "slot_bytes"}
    lamport_rms.update(lamport_offset="i64", cap="i32")
    for quant, w in ((0, 2), (2, 8), (3, 4)):
        types = dict(lamport_rms, out="*bf16") if quant == 0 else lamport_rms
        cx = dict(W=w, WP=w, BLOCK_H=4096, QUANT=quant, USE_PTX=True, VIRTUAL=quant == 2, PDL=True)
        cases.append(
            (rm.lamport_all_reduce_rmsnorm_kernel, types, cx, ("griddepcontrol.wait", *(fp8_ops if quant else ())))
        )
    # Rows split over programs: the row exchange polls the row's 32-bit words (data is the flag: no fence).
    row_exchange = ("ld.volatile.global.b32",)
    for quant, w, split in ((0, 2, 4), (1, 8, 2), (2, 4, 16), (3, 8, 8)):
        types = dict(lamport_rms, out="*bf16") if quant == 0 else lamport_rms
        cx = dict(W=w, WP=w, BLOCK_H=8192 // split, QUANT=quant, USE_PTX=True, VIRTUAL=quant == 2, PDL=True,
                  SPLIT=split)  # fmt: skip
        cases.append((rm.lamport_all_reduce_rmsnorm_kernel, types, cx, (*row_exchange, *(fp8_ops if quant else ()))))
    cases.append(
        (
            gk.gemm_publish_kernel,
            dict(
                a="*bf16",
                b="*bf16",
                table="*i64",
                ctrl="*i64",
                M="i32",
                N="i32",
                K="i32",
                stride_aw="i64",
                stride_am="i32",
                stride_ak="i32",
                stride_bw="i64",
                stride_bk="i32",
                stride_bn="i32",
                rank="i32",
                buffer_bytes="i64",
            ),
            dict(W=2, WP=2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, USE_PTX=True, VIRTUAL=False),
            ("atom.global.sys.release.exch.b64",),
        )
    )
    cases.append(
        (
            gk.tile_all_reduce_kernel,
            dict(
                out="*bf16",
                bias="*bf16",
                table="*i64",
                ctrl="*i64",
                M="i32",
                N="i32",
                rank="i32",
                buffer_bytes="i64",
                timeout="i64",
            ),
            dict(
                W=4,
                WP=4,
                BLOCK_M=128,
                BLOCK_N=128,
                GROUP_M=8,
                SUB_M=32,
                ONE_SHOT=False,
                HAS_BIAS=True,
                USE_PTX=True,
                VIRTUAL=False,
            ),
            flags,
        )
    )
    cases.append(
        (
            ce.ce_barrier_kernel,
            dict(table="*i64", ctrl="*i64", out="*bf16", numel="i64", rank="i32", step="i32", timeout="i64"),
            dict(W=2, WP=2, LAST=True, USE_PTX=True, BLOCK=1024),
            flags,
        )
    )
    cases.append(
        (
            ce.ce_gather_kernel,
            dict(table="*i64", out="*bf16", rank="i32", start="i64", part="i64", end="i64"),
            dict(W=2, BLOCK=4096),
            (),
        )
    )
    cases.append(
        (
            ce.ce_sum_rows_kernel,
            dict(scratch="*bf16", out="*bf16", numel="i64", stride="i64"),
            dict(ROWS=3, BLOCK=4096),
            (),
        )
    )
    copy_types = dict(
        table_addr="i64",
        src_base="i64",
        dst_base="i64",
        n_items="i32",
        block_bytes="i32",
        parts="i32",
        part_bytes="i32",
        counter_addr="i64",
        seq_addr="i64",
        ring_addr="i64",
    )
    counted = ("atom.global.sys.acq_rel.add.u64", "atom.global.sys.release.exch.b64")  # stores, count, publish
    vector = ("ld.global.cg.v4.b32", "st.global.v4.b32")
    for fixed, inline in ((False, False), (True, False), (True, True)):
        cases.append(
            (
                bc.block_copy_kernel,
                copy_types,
                dict(FIXED=fixed, INLINE=inline, VEC=True, NOTIFY=True, TILE=2048),
                (*vector, *counted),
            )
        )
    cases.append(
        (bc.block_copy_kernel, copy_types, dict(FIXED=False, INLINE=False, VEC=False, NOTIFY=True, TILE=4096), counted)
    )
    # The resident copier: polls its mailbox with plain volatile loads, copies in vectors through L2, finishes a
    # request with one release fence and plain system-scope stores, decides to exit behind a sequentially
    # consistent fence.
    cases.append(
        (
            bc.block_copy_server_kernel,
            dict(box_addr="i64", idle_ns="i64", max_ns="i64"),
            dict(USE_PTX=True, TILE_VEC=2048, TILE_BYTES=1024),
            (
                "ld.volatile.global.b64",
                "ld.global.cg.v4",
                "fence.acq_rel.sys",
                "st.relaxed.sys.global.b64",
                "fence.sc.sys",
                "%globaltimer",
            ),
        )
    )
    return cases  # fmt: skip


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{k.fn.__name__}-{i}" for i, (k, *_) in enumerate(CASES)])
def test_kernel_compiles_for_sm90_with_the_promised_memory_operations(case):
    kernel, types, constexprs, needles = case
    name = kernel.fn.__name__
    warps = 1 if name.startswith(("ce_barrier", "block_copy_server")) else 4 if name.startswith("block_copy") else 8
    compiled = _compile(kernel, types, constexprs, num_warps=warps)
    ptx = compiled.asm["ptx"]
    for needle in needles:
        assert needle in ptx, f"{kernel.fn.__name__} {constexprs}: no {needle!r} in its PTX"


def test_block_copy_without_a_notification_has_no_atomics_and_one_block_reads_no_table():
    """Without a notification a launch only copies (its completion is a CUDA event): no count, no publish.  A
    one-block launch names its block in its arguments: nothing but the block is loaded."""
    from sagellm_comm.kernels import block_copy as bc

    types = dict(table_addr="i64", src_base="i64", dst_base="i64", n_items="i32", block_bytes="i32", parts="i32",
                 part_bytes="i32", counter_addr="i64", seq_addr="i64", ring_addr="i64")  # fmt: skip
    plain = _compile(bc.block_copy_kernel, types, dict(FIXED=True, INLINE=True, VEC=True, NOTIFY=False, TILE=2048),
                     num_warps=4).asm["ptx"]  # fmt: skip
    assert "atom." not in plain and "ld.global.cg.v4.b32" in plain
    assert len(re.findall(r"ld\.global(?!\.cg\.v4)", plain)) == 0, "a one-block launch loads more than its block"
    table = _compile(bc.block_copy_kernel, types, dict(FIXED=True, INLINE=False, VEC=True, NOTIFY=False, TILE=2048),
                     num_warps=4).asm["ptx"]  # fmt: skip
    assert "atom." not in table and re.search(r"ld\.global(\.\w+)*\.b64|ld\.global(\.\w+)*\.u64", table)


@pytest.mark.parametrize("fused", [False, True], ids=["all_reduce", "rmsnorm"])
def test_lamport_critical_path_has_no_64_bit_division_and_clears_in_vectors(fused):
    # As the launcher runs 8 KB of bf16 on 8 ranks: 256-element tiles (one 4096-wide row fused), byte offsets
    # that fit 32 bits.
    from sagellm_comm.kernels import fused_all_reduce_rmsnorm as rm
    from sagellm_comm.kernels import lamport_all_reduce as la

    if fused:
        types = dict(inp="*bf16", residual="*bf16", weight="*bf16", out="*bf16", scales="*fp32",
                     residual_out="*bf16", table="*i64", ctrl="*i64", num_rows="i32", hidden="i32", eps="fp32",
                     rank="i32", lamport_offset="i32", cap="i32", timeout="i64")  # fmt: skip
        constexprs = dict(W=8, WP=8, BLOCK_H=4096, QUANT=0, USE_PTX=True, VIRTUAL=True, PDL=True)
        compiled = _compile(rm.lamport_all_reduce_rmsnorm_kernel, types, constexprs, num_warps=8)
    else:
        types = dict(COLLECTIVE, lamport_offset="i32", cap="i32")
        constexprs = dict(W=8, WP=8, BLOCK=256, USE_PTX=True, VIRTUAL=True, PDL=True)
        compiled = _compile(la.lamport_all_reduce_kernel, types, constexprs, num_warps=2)
    ptx = compiled.asm["ptx"]
    # ``lepoch % 3`` on an int64 lowers to a 64-bit multiply-high chain between the state load and the pushes.
    for division in ("mul.hi.s64", "mul.hi.u64", "rem.s64", "rem.u64", "div.s64", "div.u64"):
        assert division not in ptx, f"the Lamport kernel does 64-bit division ({division})"
    assert "st.global.v4.b32" in ptx, "the Lamport clear is not in 16-byte vector stores"


@pytest.mark.parametrize("quant", [0, 2])
def test_the_row_exchange_has_no_fence(quant):
    """The split rows of the fused Lamport kernel exchange their sums as data-is-flag words: no fence, no acquire
    (each would cost a round trip on the critical path)."""
    from sagellm_comm.kernels import fused_all_reduce_rmsnorm as rm

    types = dict(inp="*bf16", residual="*bf16", weight="*bf16", out="*bf16" if quant == 0 else "*fp8e4nv",
                 scales="*fp32", residual_out="*bf16", table="*i64", ctrl="*i64", num_rows="i32", hidden="i32",
                 eps="fp32", rank="i32", lamport_offset="i32", cap="i32", timeout="i64")  # fmt: skip
    cx = dict(W=4, WP=4, BLOCK_H=512, QUANT=quant, USE_PTX=True, VIRTUAL=False, PDL=True, SPLIT=8)
    ptx = _without_error_record_fences(
        _compile(rm.lamport_all_reduce_rmsnorm_kernel, types, cx, num_warps=4).asm["ptx"]
    )
    for op in ("fence.", "membar", "ld.acquire", ".release"):
        assert op not in ptx, f"the split-row kernel has {op!r}"


def _without_error_record_fences(ptx: str) -> str:
    """``ptx``'s instructions less each fence that orders a timeout record's fields before its status word (a
    write-through store within the next few instructions): the wait's error path, which runs once, after a
    deadline."""
    lines = [ln for ln in ptx.splitlines() if ln.strip() and not ln.strip().startswith((".loc", "//", "$L"))]
    kept = []
    for i, line in enumerate(lines):
        if "fence.sc.sys" in line and any("st.global.wt.b64" in later for later in lines[i + 1 : i + 4]):
            continue
        kept.append(line)
    return "\n".join(kept)
