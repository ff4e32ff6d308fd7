#!/usr/bin/env bash
# spinfer beside llama.cpp on the same weights, same thread count, interleaved (spinfer, then
# llama.cpp, then spinfer again ...) so a noisy neighbour hits both alike.
#
#   benches/compare-llama-cpp.sh                       # every work item, 2 pairs each (hours)
#   benches/compare-llama-cpp.sh --only smollm2,tinyllama-q4_0 --pairs 3
#   benches/compare-llama-cpp.sh --list                # the work items
#   options: --threads N (2)  --prompt N (128)  --gen N (32)  --reps N (llama-bench -r, 3)
#            --no-prepare (fail instead of making missing models)
#
# Work items:
#   tinyllama-{bf16,f16,f32}, smollm-{bf16,f16,f32}: random TinyLlama-1.1B / SmolLM-135M-shaped
#       weights (fixtures/make_bench_models.py); spinfer reads the safetensors, llama.cpp the
#       same weights converted by its own convert_hf_to_gguf.py (same dtype).
#   tinyllama-{q4_0,q8_0,q4_k_m}: that TinyLlama (bf16) quantized by llama-quantize; one GGUF
#       file for both.
#   smollm2: the real SmolLM2-135M-Instruct Q4_1 GGUF (fixtures/fetch-smollm2.sh); one file.
#
# What is compared: prefill of --prompt tokens from an empty context (llama-bench pp<N>), and
# decode of --gen tokens after the prompt (spinfer: after its prefill; llama-bench tg<N> at
# depth --prompt, i.e. -d). llama.cpp's "GB/s" is its decode rate times the bytes per token
# spinfer counts for the same model (weights + KV cache), to set beside spinfer's probe.
#
# llama.cpp is built (if missing) by fixtures/build-llama-cpp.sh from the llama-cpp-python sdist
# on PyPI, never into this repository: LLAMA_CPP_BUILD (default /work/llamacpp-build, binaries
# in its bin/) and LLAMA_CPP_SRC (default /work/llamacpp-src). Models are made by
# fixtures/make_bench_models.py in the fixtures venv (fixtures/.venv; see fixtures/README.md)
# under fixtures/bench-models/ (gitignored). SPINFER: the spinfer binary (default: cargo build
# --release, target/release/spinfer).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ALL="tinyllama-bf16 tinyllama-f16 tinyllama-f32 smollm-bf16 smollm-f16 smollm-f32 tinyllama-q4_0 tinyllama-q8_0 tinyllama-q4_k_m smollm2"
ONLY=$ALL
PAIRS=2
THREADS=2
PROMPT=128
GEN=32
REPS=3
PREPARE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY=${2//,/ }; shift 2 ;;
        --pairs) PAIRS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --prompt) PROMPT=$2; shift 2 ;;
        --gen) GEN=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --no-prepare) PREPARE=0; shift ;;
        --list) echo "$ALL" | tr ' ' '\n'; exit 0 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for w in $ONLY; do
    case " $ALL " in *" $w "*) ;; *) echo "unknown work item '$w' (see --list)" >&2; exit 2 ;; esac
done

LLAMA_CPP_BUILD=${LLAMA_CPP_BUILD:-/work/llamacpp-build}
LLAMA_CPP_SRC=${LLAMA_CPP_SRC:-/work/llamacpp-src}
LLAMA_BENCH=$LLAMA_CPP_BUILD/bin/llama-bench
PY=${PYTHON:-$ROOT/fixtures/.venv/bin/python}
BM=$ROOT/fixtures/bench-models

if [ ! -x "$LLAMA_BENCH" ]; then
    [ "$PREPARE" = 1 ] || { echo "no $LLAMA_BENCH" >&2; exit 1; }
    echo "building llama.cpp into $LLAMA_CPP_BUILD (slow)" >&2
    SRC=$LLAMA_CPP_SRC BUILD=$LLAMA_CPP_BUILD TOOLS="llama-quantize llama-bench" \
        fixtures/build-llama-cpp.sh >&2
fi
if [ -z "${SPINFER:-}" ]; then
    cargo build --release --quiet --bin spinfer >&2
    SPINFER=$ROOT/target/release/spinfer
fi

# shape, dtype-or-quant type of a work item
shape_of() { case "$1" in tinyllama-*) echo tinyllama-1.1b ;; smollm-*) echo smollm-135m ;; esac; }
kind_of() { echo "${1#*-}"; }

# Sets SP_REG SP_MODEL (spinfer) and LC_FILE (llama.cpp) for a work item; makes what is missing.
locate() {
    local w=$1 shape kind
    if [ "$w" = smollm2 ]; then
        SP_REG=$ROOT/fixtures/real/registry SP_MODEL=smollm2-135m-instruct
        LC_FILE=$SP_REG/llama/$SP_MODEL/SmolLM2-135M-Instruct.Q4_1.gguf
        if [ ! -f "$LC_FILE" ] && [ "$PREPARE" = 1 ]; then fixtures/fetch-smollm2.sh >&2; fi
        return
    fi
    shape=$(shape_of "$w") kind=$(kind_of "$w")
    SP_REG=$BM SP_MODEL=$shape-$kind
    case "$kind" in
        bf16|f16|f32)
            LC_FILE=$BM/gguf/llama/$shape-$kind/$shape-$kind.gguf
            if [ "$PREPARE" = 1 ]; then
                local only=()
                [ -f "$BM/llama/$shape-$kind/model.safetensors" ] && only=(--only-gguf)
                if [ ! -f "$LC_FILE" ] || [ ${#only[@]} = 0 ]; then
                    LLAMA_CPP_BIN=$LLAMA_CPP_BUILD/bin nice "$PY" fixtures/make_bench_models.py \
                        --shape "$shape" --dtype "$kind" --gguf "${only[@]}" >&2
                fi
            fi ;;
        *)
            local q
            q=$(echo "$kind" | tr a-z A-Z)
            LC_FILE=$BM/llama/$shape-$kind/$shape-$kind.gguf
            if [ ! -f "$LC_FILE" ] && [ "$PREPARE" = 1 ]; then
                local only=()
                [ -f "$BM/llama/$shape-bf16/model.safetensors" ] && only=(--only-gguf)
                LLAMA_CPP_BIN=$LLAMA_CPP_BUILD/bin nice "$PY" fixtures/make_bench_models.py \
                    --shape "$shape" --dtype bf16 --quant "$q" "${only[@]}" >&2
            fi ;;
    esac
    [ -f "$LC_FILE" ] || { echo "missing $LC_FILE (run without --no-prepare)" >&2; exit 1; }
}

# spinfer bench -> "prefill decode decode_GBs probe_GBs"
run_spinfer() {
    local out
    out=$("$SPINFER" bench --registry "$SP_REG" --model "$SP_MODEL" --threads "$THREADS" \
        --prompt-tokens "$PROMPT" --gen-tokens "$GEN")
    echo "$out" >>"$LOG"
    echo "$out" | awk '
        /^prefill:/ { pp = $2 }
        /^decode:/ { tg = $2; for (i = 1; i <= NF; i++) if ($i == "GB/s") gb = $(i - 1) }
        /memory read/ { for (i = 1; i <= NF; i++) if ($i == "read" && $(i + 2) == "GB/s,") bw = $(i + 1) }
        END { print pp, tg, gb, bw }'
}

# llama-bench -> "prefill decode"
run_llama() {
    local pp tg
    pp=$("$LLAMA_BENCH" -m "$LC_FILE" -t "$THREADS" -p "$PROMPT" -n 0 -r "$REPS" -o json 2>>"$LOG")
    tg=$("$LLAMA_BENCH" -m "$LC_FILE" -t "$THREADS" -p 0 -n "$GEN" -d "$PROMPT" -r "$REPS" \
        -o json 2>>"$LOG")
    printf '%s\n%s\n' "$pp" "$tg" >>"$LOG"
    python3 -c '
import json, sys
pp = json.loads(sys.argv[1]); tg = json.loads(sys.argv[2])
print("%.2f %.2f" % (pp[0]["avg_ts"], tg[0]["avg_ts"]))' "$pp" "$tg"
}

LOG=${LOG:-$(mktemp /tmp/compare-llama-cpp.XXXXXX.log)}
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
FAMILY=$(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2- | tr -d ' ')
MODEL=$(grep -m1 '^model[^ ]*:' /proc/cpuinfo | cut -d: -f2- | tr -d ' ')
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512_bf16|avx512_vnni|amx_bf16|amx_tile)$' | tr '\n' ' ')
echo "CPU: $CPU (family $FAMILY model $MODEL; $(nproc) CPUs; $FLAGS)"
echo "spinfer $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'); $("$LLAMA_BENCH" --version 2>&1 | grep -m1 version)"
echo "threads $THREADS, prefill $PROMPT tokens, decode $GEN tokens after them (llama-bench -r $REPS, tg at -d $PROMPT); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "full output of every run: $LOG"
echo

# Both engines map the files; a file just written (quantized, converted, unpacked) sits in the
# page cache in 4 KiB pages, one read afresh in large folios mapped 2 MiB at a time, which
# decodes faster (spinfer bench: "weights in 2 MiB pages"). Drop each file from the cache and
# read it again, so both engines see it the way a file read from disk is seen.
recache() {
    local f
    for f in "$@"; do
        sync "$f" && dd if="$f" iflag=nocache count=0 status=none && cat "$f" >/dev/null || true
    done
}
for w in $ONLY; do
    locate "$w"
    recache "$LC_FILE" "$SP_REG/llama/$SP_MODEL"/*.gguf "$SP_REG/llama/$SP_MODEL"/*.safetensors
done 2>/dev/null
echo "| work | pair | spinfer prefill tok/s | llama.cpp prefill | ratio | spinfer decode tok/s | llama.cpp decode | ratio | spinfer probe GB/s | spinfer decode GB/s | llama.cpp decode GB/s (same bytes/token) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for pair in $(seq 1 "$PAIRS"); do
    for w in $ONLY; do
        locate "$w"
        echo "== $w pair $pair: spinfer $SP_REG/llama/$SP_MODEL; llama.cpp $LC_FILE" >>"$LOG"
        read -r s_pp s_tg s_gb s_bw <<<"$(run_spinfer)"
        read -r l_pp l_tg <<<"$(run_llama)"
        python3 -c '
import sys
w, pair, spp, stg, sgb, sbw, lpp, ltg = sys.argv[1:]
spp, stg, sgb, sbw, lpp, ltg = map(float, (spp, stg, sgb, sbw, lpp, ltg))
print("| %s | %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f | %.1f | %.1f | %.1f |" % (
    w, pair, spp, lpp, spp / lpp, stg, ltg, stg / ltg, sbw, sgb, ltg * sgb / stg))' \
            "$w" "$pair" "$s_pp" "$s_tg" "$s_gb" "$s_bw" "$l_pp" "$l_tg"
    done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
