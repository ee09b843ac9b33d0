#!/usr/bin/env bash
# Builds what tools/gpu/accept.sh runs on a GPU machine that has no Rust and no network:
#
#   bash tools/gpu/bundle.sh          # -> tools/gpu/bundle/ (git-ignored)
#
# - sdbooth.xz: the release binary built with --features cudnn, stripped and xz-compressed
#   (its CUDA libraries load at run time, from the machine's PyTorch wheels or a CUDA install);
# - wheels/: diffusers and importlib_metadata for the PyTorch anchor (tools/bench/torch_step.py;
#   the GPU image has torch and transformers but not diffusers).
# The whole folder must stay under the device tool's 64 MiB (with the rest of the working tree);
# the script fails if the bundle alone is over 48 MiB. On the device tool: carry
# ["tools/gpu/bundle"] and run `bash tools/gpu/accept.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=tools/gpu/bundle
log() { printf 'bundle: %s\n' "$*" >&2; }

eval "$(bash tools/cuda/setup.sh)"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
log "cargo build --release -p sdbooth --features cudnn"
nice -n 10 cargo build --release -p sdbooth --features cudnn

mkdir -p "$bundle/wheels"
strip -o "$bundle/sdbooth" target/release/sdbooth
# The binary must not need the NVIDIA libraries to start (they are loaded on first use).
if readelf -d "$bundle/sdbooth" | grep -E 'NEEDED.*(cuda|cublas|curand|nvrtc|cudnn)'; then
    log "the binary links a CUDA library directly: build after eval \"\$(bash tools/cuda/setup.sh)\""
    exit 1
fi
xz -T2 -9 -f "$bundle/sdbooth"

# Pinned: the diffusers release current when this was written, for the GPU image's Python 3.12.
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any \
    -d "$bundle/wheels" "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-8.7.0}"

size=$(du -sb "$bundle" | cut -f1)
log "$(du -sh "$bundle" | cut -f1) in $bundle"
if [ "$size" -gt $((48 * 1024 * 1024)) ]; then
    log "the bundle is over 48 MiB: too large for the device tool's 64 MiB working tree"
    exit 1
fi
