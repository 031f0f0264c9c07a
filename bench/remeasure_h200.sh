#!/usr/bin/env bash
# Re-measure every one-GPU record (virtual ranks) on one H200 and write it under bench/results/h200/.
#
# Run from the root of a git checkout of the commit to measure (a clone of a bundle works: `git bundle create
# sagellm.bundle HEAD` here, `git clone sagellm.bundle sagellm && cd sagellm` on the device), so that every
# record's commit and dirty flag are read from git by sagellm_comm/benchmark/provenance.py:
#
#     bash bench/remeasure_h200.sh            # then: python -m bench.make_docs_tables
#     MPS=1 bash bench/remeasure_h200.sh      # as root: also the FP8 record's missing processes-under-MPS shapes
#     ONLY='transfer|fp8' bash bench/remeasure_h200.sh   # only the steps whose name matches the regex
#
# Each step has its own time limit; a step that fails or runs out is named at the end (exit 1) and the others
# still run.  The quick options keep the whole run near 11 minutes (bench/README.md says which records are
# quick sweeps); FULL=1 runs every bench's full sweep instead (about an hour).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=bench/results/h200
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! git rev-parse --verify -q HEAD >/dev/null; then
    echo "bench/remeasure_h200.sh: not a git checkout: clone the commit to measure (see the header)" >&2
    exit 2
fi
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "bench/remeasure_h200.sh: note: tracked files are modified; every record will say dirty: yes" >&2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/remeasure_h200.sh: needs a CUDA GPU" >&2
    exit 2
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
if [[ $GPU != *H200* ]]; then
    echo "bench/remeasure_h200.sh: this GPU is a $GPU: the records under bench/results/h200/ are an H200's" >&2
    exit 2
fi
mkdir -p "$DEST"
SCRATCH=$(mktemp -d)
# Records are written outside the checkout and copied in on exit (a killed run keeps the finished ones): a record
# written into the tree would make every later step's provenance read a modified tracked file (dirty).
OUT=$SCRATCH/records
mkdir -p "$OUT"
trap 'cp -r "$OUT"/. "$DEST"/; rm -rf "$SCRATCH"' EXIT
FAILED=()
START=$SECONDS

# step NAME LIMIT_S COMMAND...: run one benchmark under a time limit, say how long it took; OK=1 if it passed.
# With DEADLINE=S (seconds for the whole run) a step gets at most what is left, and is skipped (named at the
# end) when less than 20 s is left: the steps run in order of priority.
step() {
    local name=$1 limit=$2 began=$SECONDS status=0
    shift 2
    OK=0
    if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then
        echo "== $name: not in ONLY=$ONLY"
        return 0
    fi
    if [[ -n ${DEADLINE:-} ]]; then
        local left=$((DEADLINE - (SECONDS - START)))
        if ((left < 20)); then
            echo "== $name: SKIPPED: ${left}s left of DEADLINE=${DEADLINE}" >&2
            FAILED+=("$name (skipped: DEADLINE)")
            return 0
        fi
        ((limit > left)) && limit=$left
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" || status=$?
    if ((status == 0)); then
        echo "== $name: done in $((SECONDS - began))s"
        OK=1
    else
        echo "== $name: FAILED (exit $status) after $((SECONDS - began))s" >&2
        FAILED+=("$name")
    fi
}

# cli_record VR NAME: move the CLI's timestamped JSON/CSV of world size VR to NAME.json / NAME.csv
cli_record() {
    local json
    json=$(ls -t "$SCRATCH/vr$1"/all_reduce_ws"$1"_*.json | head -n 1)
    mv "$json" "$OUT/$2.json"
    mv "${json%.json}.csv" "$OUT/$2.csv"
}

if [[ ${FULL:-0} == 1 ]]; then
    VR8_SIZES=1K:64M VR2_SIZES=1K:16M AR_SIZES=1K:256M FUSED_M=1,16,128,512,2048,8192,16384
    RMS_TOKENS=1,16,128,1024,4096 RMS_HIDDEN=4096,8192 FP8_QUICK=() CALLS=(--calls 20 --reps 10)
else
    VR8_SIZES=1K:64M VR2_SIZES=1K:16M AR_SIZES=8K,128K,1M,16M,256M FUSED_M=1,128,512,2048,8192,16384
    RMS_TOKENS=1,16,128,1024 RMS_HIDDEN=8192 FP8_QUICK=(--quick) CALLS=(--calls 10 --reps 5)
fi

# protocol cost: this checkout against the tree before the agreed configuration (fccbcf2), interleaved in one process
BASELINE=fccbcf2
if git cat-file -e "$BASELINE^{commit}" 2>/dev/null; then
    step "protocol cost" 120 "$PY" -m bench.protocol_cost --baseline "$BASELINE" --rounds 2 \
        --out "$OUT/protocol_cost.json"
else
    echo "== protocol cost: SKIPPED: commit $BASELINE is not in this clone's history" >&2
    FAILED+=("protocol cost (no $BASELINE)")
fi
# Merged into the record (its rows of the shapes measured replaced): a run stopped by its limit never shrinks it.
# First the shapes the record lacks (its meta.not_measured), then the policy's paths again where time is left.
# fp8_base: the newest FP8 record, this run's own once a step has written it.
fp8_base() { if [[ -f $OUT/fp8_fused.json ]]; then echo "$OUT/fp8_fused.json"; else echo "$DEST/fp8_fused.json"; fi; }
if [[ -f $DEST/fp8_fused.json ]]; then
    step "fp8 fused, missing shapes" 150 "$PY" -m bench.fp8_fused_bench --quick --merge-into "$(fp8_base)" \
        --only-missing --out "$SCRATCH/fp8_missing.json"
    if [[ -f $SCRATCH/fp8_missing.json ]]; then cp "$SCRATCH/fp8_missing.json" "$OUT/fp8_fused.json"; fi
    step "fp8 fused" 90 "$PY" -m bench.fp8_fused_bench "${FP8_QUICK[@]}" --merge-into "$(fp8_base)" \
        --out "$SCRATCH/fp8_again.json"
    if [[ -f $SCRATCH/fp8_again.json ]]; then cp "$SCRATCH/fp8_again.json" "$OUT/fp8_fused.json"; fi
else
    step "fp8 fused" 90 "$PY" -m bench.fp8_fused_bench "${FP8_QUICK[@]}" --out "$OUT/fp8_fused.json"
fi
step "fp8 payload error" 45 "$PY" -m bench.fp8_payload_error --out "$OUT/fp8_payload.json"
TRANSFER_BACKENDS=ipc,torch,copy-engine
if "$PY" -c "import nixl_cu13" 2>/dev/null || "$PY" -c "import nixl_cu12" 2>/dev/null; then
    TRANSFER_BACKENDS=$TRANSFER_BACKENDS,nixl
fi
step "transfer" 150 "$PY" -m sagellm_comm.cli transfer --backend "$TRANSFER_BACKENDS" \
    --block-sizes 4K,16K,64K,256K,1M,64M --block-counts 1,100,1000 --max-bytes 1G --out "$OUT/transfer" \
    --plot "$OUT/transfer.png" --no-progress
# One small block with its notification: the resident copier beside one launch per request (the JSON is the record).
step "transfer notification" 60 "$PY" -m sagellm_comm.cli transfer --backend ipc,ipc-launch --ops write \
    --block-sizes 16K,64K --block-counts 1 --notify-iters 300 --rounds 3 --out "$SCRATCH/transfer_notify" --no-progress
if ((OK)); then cp "$SCRATCH/transfer_notify.json" "$OUT/"; fi
# The same with the initiator and the receiver pinned to two cores of different halves of the machine.
PIN_CPUS="$(nproc --all)"; PIN_CPUS="2,$((PIN_CPUS / 2 + 2))"
step "transfer notification, pinned" 60 "$PY" -m sagellm_comm.cli transfer --backend ipc,ipc-launch --ops write \
    --block-sizes 16K,64K --block-counts 1 --notify-iters 300 --rounds 3 --cpus "$PIN_CPUS" \
    --out "$SCRATCH/transfer_notify_pinned" --no-progress
if ((OK)); then cp "$SCRATCH/transfer_notify_pinned.json" "$OUT/"; fi
step "transfer latency paths" 60 "$PY" -m bench.transfer_latency --requests 100 --rounds 3 \
    --out "$OUT/transfer_latency.json"
# Two processes moving random block lists, every byte checked, peers rejoining and restarting (the JSON is the record).
step "transfer soak" 150 "$PY" -m bench.transfer_soak --seconds 120 --out "$OUT/transfer_soak.json"

step "custom all-reduce, W = 2, 4, 8" 120 "$PY" -m bench.custom_all_reduce_bench --sizes "$AR_SIZES" \
    "${CALLS[@]}" --out "$OUT/custom_all_reduce_virtual.json"
step "CLI, 8 virtual ranks" 150 "$PY" -m sagellm_comm.cli bench --virtual-ranks 8 \
    --algo auto,one_shot,two_shot,lamport --dtype bf16 --sizes "$VR8_SIZES" --graph --no-progress \
    --output-dir "$SCRATCH/vr8" --plot "$OUT/all_reduce_vr8_graph.png"
if ((OK)); then cli_record 8 all_reduce_vr8_graph; fi
step "CLI, 2 virtual ranks" 90 "$PY" -m sagellm_comm.cli bench --virtual-ranks 2 \
    --algo one_shot,two_shot,auto --dtype bf16 --sizes "$VR2_SIZES" --graph --iters 50 --no-progress \
    --output-dir "$SCRATCH/vr2" --plot "$OUT/all_reduce_vr2_graph.png"
if ((OK)); then cli_record 2 all_reduce_vr2_graph; fi
step "fused AR + RMSNorm" 45 "$PY" -m bench.fused_bench --skip-gemm --tokens "$RMS_TOKENS" \
    --hidden "$RMS_HIDDEN" "${CALLS[@]}" --out "$OUT/fused_rmsnorm_virtual"
step "fused GEMM + all-reduce" 120 "$PY" -m bench.fused_bench --skip-rmsnorm --m "$FUSED_M" --n 4096,8192 \
    "${CALLS[@]}" --out "$OUT/fused_gemm_all_reduce_virtual"

# MPS=1 (as root, with nvidia-cuda-mps-control on the PATH): last, the processes-under-MPS shapes the FP8 record lacks.
if [[ ${MPS:-0} == 1 && -f $(fp8_base) ]]; then
    if nvidia-cuda-mps-control -d; then
        step "fp8 fused, missing MPS shapes" 240 "$PY" -m bench.fp8_fused_bench --quick --mps --no-virtual \
            --merge-into "$(fp8_base)" --only-missing --out "$SCRATCH/fp8_mps.json"
        if [[ -f $SCRATCH/fp8_mps.json ]]; then cp "$SCRATCH/fp8_mps.json" "$OUT/fp8_fused.json"; fi
        echo quit | nvidia-cuda-mps-control || true
    else
        echo "== fp8 fused, missing MPS shapes: SKIPPED: the MPS daemon did not start" >&2
        FAILED+=("fp8 fused, missing MPS shapes (no MPS)")
    fi
fi

echo "== all steps: $((SECONDS - START))s; records in $DEST/ (on exit)"
echo "== next: python -m bench.make_docs_tables (the docs then cite the h200/ records), then git rm the h100/"
echo "   records they replace: bench/results/h100/{custom_all_reduce_virtual,fused_gemm_all_reduce_virtual,"
echo "   fused_rmsnorm_virtual,all_reduce_vr8_graph,all_reduce_vr2_graph,transfer_latency,transfer_notify}.* and"
echo "   python -m bench.make_docs_tables"
if ((${#FAILED[@]})); then
    printf '== failed: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
