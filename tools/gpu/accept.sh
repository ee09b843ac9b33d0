#!/usr/bin/env bash
# GPU acceptance check of sdbooth, for a machine with an NVIDIA GPU, PyTorch and no Rust.
# Runs the pre-built binary of tools/gpu/bundle.sh and prints one table:
#   1. `sdbooth selftest`: every op's forward and gradients on CUDA against the CPU (bounds);
#   2. a 50-step builtin:tiny-sd1 training on CUDA and on the CPU: loss curves and final weights;
#   3. `sdbooth bench` on builtin:sd15-random at 512 px: the seed's flags in fp16 and bf16
#      (AdamW8bit, --gradient_checkpointing, --cache_latents) and the lean setting (--full_bf16
#      --fused_backward_pass AdamW8bit): s/step, peak VRAM (nvidia-smi), images/s;
#   4. the same step in PyTorch (tools/bench/torch_step.py, bf16) as the anchor.
# Stages that would overrun the time budget (SDBOOTH_ACCEPT_BUDGET_S, default 450 s) are skipped
# and say so. Logs and the table go to $OUT (the device tool's return folder) or
# SDBOOTH_ACCEPT_OUT (default /tmp/sdbooth-accept): accept.log and summary.md.
#
#   bash tools/gpu/accept.sh                              # on the GPU machine
#   SDBOOTH_ACCEPT_REHEARSAL=1 bash tools/gpu/accept.sh   # here: --device cpu, tiny-sd1, few steps
#
# Rehearsal mode tests the plumbing on a CPU-only machine: the "device" side is the CPU (its
# training and benchmarks with SDBOOTH_REFERENCE_OPS=1, the generic path a GPU takes), the benchmarks use
# builtin:tiny-sd1 at 128 px, training runs 5 steps, and the PyTorch anchor runs its tiny
# architecture on the CPU (when torch and diffusers are importable).
# SDBOOTH_BIN=path uses that binary instead of the bundle's (or target/release/sdbooth).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
rehearsal=${SDBOOTH_ACCEPT_REHEARSAL:-0}
out=${OUT:-${SDBOOTH_ACCEPT_OUT:-/tmp/sdbooth-accept}}
budget=${SDBOOTH_ACCEPT_BUDGET_S:-450}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$out/accept.log
summary=$out/summary.md
: >"$log"
failed=0
start=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$summary"; }
elapsed() { echo $((SECONDS - start)); }
# fits SECONDS: whether a stage expected to take that long still fits the budget.
fits() { [ $((SECONDS - start + $1)) -le "$budget" ]; }
# run NAME TIMEOUT CMD...: runs with a timeout, output appended to the log.
run() {
    local name=$1 limit=$2
    shift 2
    say "== $name ($(elapsed) s): $*"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] && say "   $name: timed out after $limit s"
    return "$rc"
}
json_field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=d.get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }

# --- the binary and the CUDA libraries -------------------------------------------------------
if [ -n "${SDBOOTH_BIN:-}" ]; then
    bin=$SDBOOTH_BIN
elif [ -f tools/gpu/bundle/sdbooth.xz ]; then
    xz -dc tools/gpu/bundle/sdbooth.xz >"$work/sdbooth" && chmod +x "$work/sdbooth"
    bin=$work/sdbooth
elif [ -x target/release/sdbooth ]; then
    bin=$root/target/release/sdbooth
else
    say "no sdbooth binary: run tools/gpu/bundle.sh where Rust is, or set SDBOOTH_BIN"
    exit 2
fi
# The binary loads cuBLAS/cuRAND/NVRTC/cuDNN 13 at run time: take them from PyTorch's wheels.
nvlibs=$(python3 - <<'PY' 2>/dev/null
import glob, os
import nvidia
dirs = {os.path.dirname(p) for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "*", "lib", "lib*.so*"))}
print(":".join(sorted(dirs)))
PY
)
[ -n "$nvlibs" ] && export LD_LIBRARY_PATH=$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# In rehearsal the training under test takes the generic (GPU) code path on the CPU.
if [ "$rehearsal" = 1 ]; then
    dev=cpu model=builtin:tiny-sd1 res=128 train_steps=5 torch_args=(--tiny --device cpu)
    tested_env=(SDBOOTH_REFERENCE_OPS=1)
else
    dev=cuda model=builtin:sd15-random res=512 train_steps=50 torch_args=() tested_env=()
fi
gpu="no GPU"
if command -v nvidia-smi >/dev/null; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
fi
{
    echo "# sdbooth GPU acceptance ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "binary: $("$bin" --version 2>&1); device under test: $dev; GPU: $gpu$([ "$rehearsal" = 1 ] && echo '; REHEARSAL on the CPU')"
    echo
    echo "| check | setting | result | figures |"
    echo "|---|---|---|---|"
} >"$summary"

# --- peak VRAM: nvidia-smi sampled every 100 ms while a command runs ------------------------
watch_pid=""
vram_start() {
    : >"$work/vram"
    if [ "$dev" = cuda ] && command -v nvidia-smi >/dev/null; then
        idle_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/vram" 2>/dev/null &
        watch_pid=$!
    fi
}
vram_stop() { # prints the peak above idle, in GiB, or "n/a"
    if [ -n "$watch_pid" ]; then
        kill "$watch_pid" 2>/dev/null
        wait "$watch_pid" 2>/dev/null
        watch_pid=""
        local peak
        peak=$(sort -n "$work/vram" | tail -1)
        [ -n "$peak" ] && { awk -v p="$peak" -v i="$idle_mib" 'BEGIN { printf "%.2f GiB", (p - i) / 1024 }'; return; }
    fi
    echo "n/a"
}

# --- 1. selftest ----------------------------------------------------------------------------
if run selftest 120 "$bin" selftest --device "$dev"; then
    verdict=pass
else
    verdict=FAIL failed=1
fi
counts=$(grep -E '^[0-9]+ of [0-9]+ compared tensors' "$log" | tail -1)
row "selftest: every op, forward + gradients" "$dev vs CPU kernels" "$verdict" "${counts:-no table (see accept.log)}"

# --- 2. tiny training, device vs CPU --------------------------------------------------------
if fits 120; then
    train() { # FOLDER DEVICE [ENV=VALUE...]
        local folder=$1 device=$2
        shift 2
        (cd examples/toy && run "train $train_steps steps on $device $*" 300 env "$@" "$bin" train --device "$device" \
            --pretrained_model_name_or_path builtin:tiny-sd1 --dataset_config dataset.toml \
            --output_dir "$work/$folder" --output_name tiny --save_model_as safetensors \
            --max_train_steps "$train_steps" --learning_rate 1e-4 --optimizer_type AdamW --seed 7 \
            --mixed_precision no)
    }
    if run "initial weights" 60 "$bin" convert builtin:tiny-sd1 "$work/init.safetensors" &&
        train tested "$dev" "${tested_env[@]}" && train baseline cpu; then
        figures=$(python3 tools/gpu/compare_runs.py --init "$work/init.safetensors" \
            --a "$work/tested/tiny.safetensors" --b "$work/baseline/tiny.safetensors" \
            --loss-a "$work/tested/tiny.jsonl" --loss-b "$work/baseline/tiny.jsonl" 2>&1)
        rc=$?
        say "$figures"
        [ "$rc" -eq 0 ] && verdict=pass || { verdict=FAIL; failed=1; }
        row "training: builtin:tiny-sd1, $train_steps steps, AdamW, f32" "$dev${tested_env[*]:+ (${tested_env[*]})} vs cpu" "$verdict" "$figures"
    else
        row "training: builtin:tiny-sd1, $train_steps steps" "$dev vs cpu" "FAIL" "a run failed (see accept.log)"
        failed=1
    fi
else
    row "training: builtin:tiny-sd1" "$dev vs cpu" "skipped" "time budget"
fi

# --- 3. benchmarks --------------------------------------------------------------------------
seed_flags="--optimizer_type AdamW8bit --xformers --cache_latents --gradient_checkpointing"
bench_dev="$dev${tested_env[*]:+ (${tested_env[*]})}"
bench() { # NAME EXPECTED_S FLAGS...
    local name=$1 expect=$2
    shift 2
    if ! fits "$expect"; then
        row "bench $model ${res}px: $name" "$bench_dev" "skipped" "time budget ($(elapsed) s used)"
        return
    fi
    local json=$work/bench.json
    rm -f "$json"
    vram_start
    run "bench $name" 240 env "${tested_env[@]}" "$bin" bench --device "$dev" --pretrained_model_name_or_path "$model" \
        --resolution "$res" --steps 3 --warmup 1 --json "$json" "$@"
    local rc=$? vram
    vram=$(vram_stop)
    if [ "$rc" -ne 0 ] || [ ! -f "$json" ]; then
        row "bench $model ${res}px: $name" "$bench_dev" "FAIL" "exit $rc (see accept.log)"
        failed=1
        return
    fi
    local s rss
    s=$(json_field "$json" s_per_step)
    rss=$(json_field "$json" peak_rss_bytes)
    row "bench $model ${res}px: $name" "$bench_dev" "ran" "$(awk -v s="$s" -v r="${rss:-0}" -v v="$vram" \
        'BEGIN { printf "%.3f s/step, %.2f images/s, peak VRAM %s, peak RSS %.2f GiB", s, 1 / s, v, r / 2^30 }')"
}
# shellcheck disable=SC2086 # the flag strings are word lists
bench "seed flags, fp16" 150 $seed_flags --mixed_precision fp16
# shellcheck disable=SC2086
bench "seed flags, bf16" 150 $seed_flags --mixed_precision bf16
bench "--full_bf16 --fused_backward_pass AdamW8bit" 150 --full_bf16 --fused_backward_pass \
    --optimizer_type AdamW8bit --mixed_precision bf16 --cache_latents --gradient_checkpointing

# --- 4. PyTorch anchor ----------------------------------------------------------------------
if ! python3 -c 'import diffusers' 2>/dev/null && ls tools/gpu/bundle/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
        tools/gpu/bundle/wheels/*.whl >>"$log" 2>&1 && export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c 'import torch, diffusers, transformers' 2>/dev/null; then
    row "PyTorch anchor (diffusers + transformers)" "-" "skipped" "torch/diffusers/transformers not importable"
elif ! fits 90; then
    row "PyTorch anchor (diffusers + transformers)" "-" "skipped" "time budget ($(elapsed) s used)"
else
    torch_json=$work/torch.json
    if run "PyTorch step" 180 sh -c 'python3 "$0" "$@" | tail -1 >"'"$torch_json"'"' tools/bench/torch_step.py \
        --resolution "$res" --mixed_precision bf16 --steps 3 --warmup 1 "${torch_args[@]}"; then
        cat "$torch_json" >>"$log"
        row "PyTorch step: $(json_field "$torch_json" model) ${res}px bf16 autocast, AdamW, SDPA, checkpointing" \
            "$(json_field "$torch_json" device)" "ran" "$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
peak = d.get("peak_reserved_bytes")
vram = "n/a" if peak is None else "%.2f GiB" % (peak / 2**30)
print("%.3f s/step, %.2f images/s, peak VRAM (torch reserved) %s" % (d["s_per_step"], d["images_per_s"], vram))
' "$torch_json")"
    else
        row "PyTorch anchor" "-" "FAIL" "see accept.log"
        failed=1
    fi
fi

echo >>"$summary"
echo "total $(elapsed) s; logs: accept.log" >>"$summary"
cat "$summary"
exit "$failed"
