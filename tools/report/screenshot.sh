#!/usr/bin/env bash
# Renders a training run's report.html in headless Chromium and takes a screenshot, to check by
# eye that the report shows its curves, sample grids and tables (not run in CI).
#
#   tools/report/screenshot.sh [OUT_DIR]      # default OUT_DIR: /tmp/sdbooth-report
#
# Trains builtin:tiny-sd1 on examples/toy for 30 steps with samples every 10 steps (and at first)
# and validation_split 0.4, then writes OUT_DIR/report.png. Needs Debian's chromium
# (`apt-get install -y chromium`) and a built `sdbooth` (cargo build -p sdbooth). Keep the
# screenshot out of git.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-/tmp/sdbooth-report}"
bin="${SDBOOTH:-$root/target/debug/sdbooth}"
rm -rf "$out" && mkdir -p "$out"
cat > "$out/prompts.txt" <<'P'
a photo of sks dog --w 64 --h 64 --s 8 --d 1
a photo of sks dog on the beach --n blurry --w 64 --h 64 --s 8 --d 2
a photo of a dog --w 64 --h 64 --s 8
P
cd "$root/examples/toy"
"$bin" train --pretrained_model_name_or_path builtin:tiny-sd1 --dataset_config dataset.toml \
  --output_dir "$out/run" --output_name toy --save_model_as safetensors --max_train_steps 30 \
  --learning_rate 1e-4 --optimizer_type AdamW --lr_scheduler cosine --lr_warmup_steps 5 --seed 1 \
  --cache_latents --save_every_n_steps 10 --validation_split 0.4 --validation_seed 3 \
  --sample_prompts "$out/prompts.txt" --sample_every_n_steps 10 --sample_at_first --sample_sampler euler_a \
  --logging_dir "$out/logs"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --screenshot="$out/report.png" \
  --window-size=1200,2600 "file://$out/run/report.html"
echo "report: $out/run/report.html  screenshot: $out/report.png"
