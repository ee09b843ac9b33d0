#!/usr/bin/env bash
# Side-by-side CPU benchmark: `sdbooth bench` and the PyTorch step (tools/bench/torch_step.py:
# diffusers' U-Net + transformers' CLIP, as kohya runs them) on the same work: SD1.5 architecture
# with random weights, 256 px (32x32 latents, as with --cache_latents), batch 1, gradient
# checkpointing, U-Net and text encoder trained. The two alternate (A B A B …) so that load from
# other processes falls on both alike; the table gives medians over the rounds and ratios
# sdbooth / PyTorch, with the CPU named. Raw JSON of every run and summary.json go to $OUT.
#
#   bash tools/bench/sidebyside.sh              # 2 rounds of every row
#   bash tools/bench/sidebyside.sh --rounds 3
#
# Rows (ROWS, comma-separated; default all):
#   fp32        sdbooth --optimizer_type AdamW                | torch --mixed_precision no
#   bf16        sdbooth --optimizer_type AdamW --mixed_precision bf16 | torch autocast bf16
#   8bit_fused  sdbooth --optimizer_type AdamW8bit --fused_backward_pass  (no PyTorch twin)
#   full_bf16   the same + --mixed_precision bf16 --full_bf16          (no PyTorch twin)
#   seed512     the seed's legacy command at 512 px: sdbooth --optimizer_type AdamW8bit
#               --mixed_precision bf16 | torch autocast bf16 with torch.optim.AdamW (kohya's
#               AdamW8bit needs bitsandbytes, which has no CPU optimizer in the pinned versions)
# Rows without a PyTorch twin are compared with sdbooth's own fp32 row.
#
# Environment: ROUNDS (2), STEPS (3 timed), WARMUP (1), RESOLUTION (256; seed512: SEED_RESOLUTION, 512),
#   MODEL (builtin:sd15-random), OUT (out/sidebyside-<UTC time>),
#   SDBOOTH (target/release/sdbooth, built when missing),
#   SDBOOTH_BENCH_VENV (tools/.venv: a venv with tools/requirements.txt),
#   TINY=1 (plumbing check in seconds: builtin:tiny-sd1 and torch_step.py --tiny at 64 px).
# Memory: each SD1.5 run holds ~15-16 GiB, and runs go one at a time.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "sidebyside.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
TORCH_MODEL=()
if [ "${TINY:-0}" = 1 ]; then
    RESOLUTION=${RESOLUTION:-64}
    MODEL=${MODEL:-builtin:tiny-sd1}
    TORCH_MODEL=(--tiny)
    SEED_RESOLUTION=${SEED_RESOLUTION:-128}
fi
SEED_RESOLUTION=${SEED_RESOLUTION:-512}
RESOLUTION=${RESOLUTION:-256}
MODEL=${MODEL:-builtin:sd15-random}
ROWS=${ROWS:-fp32,bf16,8bit_fused,full_bf16,seed512}
OUT=${OUT:-out/sidebyside-$(date -u +%Y%m%dT%H%M%SZ)}
SDBOOTH=${SDBOOTH:-target/release/sdbooth}
VENV=${SDBOOTH_BENCH_VENV:-tools/.venv}
PY="$VENV/bin/python"

if ! "$PY" -c 'import torch, diffusers, transformers' 2>/dev/null; then
    echo "sidebyside.sh: no Python with torch, diffusers and transformers at $VENV." >&2
    echo "Create it once (about 6 GB):" >&2
    echo "  python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements.txt" >&2
    echo "or point SDBOOTH_BENCH_VENV at an existing one." >&2
    exit 1
fi
if [ ! -x "$SDBOOTH" ]; then
    echo "sidebyside.sh: building $SDBOOTH (cargo build --release -p sdbooth)" >&2
    cargo build --release -p sdbooth >&2
fi
mkdir -p "$OUT"

# Row name -> sdbooth flags / torch flags ("" = no PyTorch twin).
sdbooth_flags() {
    case "$1" in
        fp32) echo "--optimizer_type AdamW" ;;
        bf16) echo "--optimizer_type AdamW --mixed_precision bf16" ;;
        8bit_fused) echo "--optimizer_type AdamW8bit --fused_backward_pass" ;;
        full_bf16) echo "--optimizer_type AdamW8bit --fused_backward_pass --mixed_precision bf16 --full_bf16" ;;
        seed512) echo "--optimizer_type AdamW8bit --mixed_precision bf16" ;;
        *) echo "sidebyside.sh: unknown row $1" >&2; exit 2 ;;
    esac
}
torch_flags() {
    case "$1" in
        fp32) echo "--mixed_precision no" ;;
        bf16 | seed512) echo "--mixed_precision bf16" ;;
        *) echo "" ;;
    esac
}

# The resolution of a row: the seed's command trains at 512 px, the others at RESOLUTION.
row_resolution() {
    if [ "$1" = seed512 ]; then echo "$SEED_RESOLUTION"; else echo "$RESOLUTION"; fi
}

run_sdbooth() { # row round
    local json="$OUT/$1-r$2-sdbooth.json" log="$OUT/$1-r$2-sdbooth.log"
    # shellcheck disable=SC2046 # the flags are words
    if ! "$SDBOOTH" bench --pretrained_model_name_or_path "$MODEL" --resolution "$(row_resolution "$1")" \
        --steps "$STEPS" --warmup "$WARMUP" --gradient_checkpointing $(sdbooth_flags "$1") \
        --json "$json" >/dev/null 2>"$log"; then
        echo "sidebyside.sh: sdbooth bench failed ($1, round $2); log: $log" >&2
        tail -5 "$log" >&2
        exit 1
    fi
}
run_torch() { # row round
    local json="$OUT/$1-r$2-torch.json" log="$OUT/$1-r$2-torch.log"
    # shellcheck disable=SC2046
    if ! "$PY" tools/bench/torch_step.py "${TORCH_MODEL[@]}" --device cpu --resolution "$(row_resolution "$1")" --steps "$STEPS" \
        --warmup "$WARMUP" $(torch_flags "$1") >"$json.tmp" 2>"$log"; then
        echo "sidebyside.sh: torch_step.py failed ($1, round $2); log: $log" >&2
        tail -5 "$log" >&2
        exit 1
    fi
    tail -1 "$json.tmp" >"$json" && rm -f "$json.tmp"
}

IFS=, read -r -a rows <<<"$ROWS"
for round in $(seq 1 "$ROUNDS"); do
    for row in "${rows[@]}"; do
        if [ -n "$(torch_flags "$row")" ]; then
            echo "round $round/$ROUNDS, $row: PyTorch" >&2
            run_torch "$row" "$round"
        fi
        echo "round $round/$ROUNDS, $row: sdbooth" >&2
        run_sdbooth "$row" "$round"
    done
done

"$PY" - "$OUT" "$ROWS" "$ROUNDS" <<'EOF'
import json, os, platform, statistics, sys

out, rows, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])

def cpu():
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    name = info.get("model name", platform.processor() or "unknown CPU")
    # Virtual machines often hide the full name; family/model identify the generation.
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} logical cores ({', '.join(feats) or 'no AVX-512/AMX flags'})"

def load(row, tool):
    runs = []
    for r in range(1, rounds + 1):
        p = os.path.join(out, f"{row}-r{r}-{tool}.json")
        if os.path.exists(p):
            runs.append(json.load(open(p)))
    return runs

FIELDS = ["s_per_step", "forward_s", "backward_s", "optimizer_s", "peak_rss_bytes"]

def medians(runs):
    m = {}
    for f in FIELDS:
        vals = [r[f] for r in runs if r.get(f) is not None]
        m[f] = statistics.median(vals) if vals else None
    if m["forward_s"] is not None and m["backward_s"] is not None:
        m["forward_backward_s"] = m["forward_s"] + m["backward_s"]
    return m

summary = {"cpu": cpu(), "rounds": rounds, "rows": {}}
for row in rows:
    s, t = load(row, "sdbooth"), load(row, "torch")
    summary["rows"][row] = {"sdbooth": medians(s) if s else None, "torch": medians(t) if t else None,
                            "sdbooth_runs": s, "torch_runs": t}

def fmt_s(v):
    return "—" if v is None else f"{v:.2f}"

def fmt_gib(v):
    return "—" if v is None else f"{v / 2**30:.2f}"

print(f"CPU: {summary['cpu']}; {rounds} rounds, medians; ratio = sdbooth / reference")
head = "| row | who | s/step | forward | backward | fwd+bwd | optimizer | peak RSS GiB |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
fp32 = (summary["rows"].get("fp32") or {}).get("sdbooth")
for row in rows:
    r = summary["rows"][row]
    s, t = r["sdbooth"], r["torch"]
    ref, ref_name = (t, "PyTorch") if t else (fp32, "sdbooth fp32") if row != "fp32" else (None, "")
    fused = any(run.get("fused_backward_pass") for run in r["sdbooth_runs"])
    for who, m in (("sdbooth", s), ("PyTorch", t)):
        if m is None:
            continue
        opt = "in backward" if who == "sdbooth" and fused else fmt_s(m["optimizer_s"])
        print(f"| {row} | {who} | {fmt_s(m['s_per_step'])} | {fmt_s(m['forward_s'])} | "
              f"{fmt_s(m['backward_s'])} | {fmt_s(m.get('forward_backward_s'))} | "
              f"{opt} | {fmt_gib(m['peak_rss_bytes'])} |")
    if s and ref:
        keys = ["s_per_step", "forward_s", "backward_s", "forward_backward_s", "optimizer_s", "peak_rss_bytes"]
        rat = {k: (s[k] / ref[k] if s.get(k) and ref.get(k) else None) for k in keys}
        r["ratio_vs"] = ref_name
        r["ratio"] = rat
        if fused:  # its updates run inside the backward: no optimizer phase to compare
            rat["optimizer_s"] = None
        cells = " | ".join("—" if rat[k] is None else f"{rat[k]:.2f}" for k in keys)
        print(f"| {row} | ratio vs {ref_name} | {cells} |")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(f"raw runs and summary.json: {out}")
EOF
