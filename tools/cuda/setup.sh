#!/usr/bin/env bash
# The CUDA 13 toolchain for building sdbooth with `--features cuda` / `--features cudnn`, from
# NVIDIA's PyPI wheels, on a machine with or without a GPU. No driver is needed to build.
#
#   eval "$(bash tools/cuda/setup.sh)"
#   cargo build --release -p sdbooth --features cudnn
#
# Installs once into tools/cuda/toolchain (git-ignored; SDBOOTH_CUDA_TOOLCHAIN=DIR puts it
# elsewhere) and is quick when run again. Prints only `export VAR=...` lines on stdout; progress
# goes to stderr.
#
# Linking: candle links cudarc with `dynamic-linking` (it cannot be combined with cudarc's
# `dynamic-loading`), which would make the binary refuse to start on a machine without the NVIDIA
# driver and libraries. So instead of the libraries themselves, the linker is given static
# lazy-loading stubs (lazy_stubs.py): every CUDA entry point is a jump through a table that is
# filled by dlopen/dlsym on its first call. The binary then starts anywhere; sdbooth checks the
# libraries with dlopen before it creates a CUDA device, and falls back to the CPU without them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=${SDBOOTH_CUDA_TOOLCHAIN:-$here/toolchain}
log() { printf 'cuda setup: %s\n' "$*" >&2; }

# Pinned: nvcc 13.0 (cuBLAS/cuDNN 13 sonames). The cu12 nvcc wheels hold no nvcc. Change these and
# the installed toolchain is replaced on the next run.
pins=(
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.*"
    "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cudnn-cu13==9.13.*"
)
wheels_stamp="$prefix/.wheels"
stubs_stamp="$prefix/.stubs"

if [ ! -f "$wheels_stamp" ] || [ "$(cat "$wheels_stamp")" != "${pins[*]}" ]; then
    command -v python3 >/dev/null || { log "python3 is needed (with venv and pip)"; exit 1; }
    log "installing the CUDA 13 toolchain wheels into $prefix (1.7 GB, once)"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    python3 -m venv "$prefix/venv" >&2
    "$prefix/venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
    nv=$("$prefix/venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')
    [ -x "$nv/cu13/bin/nvcc" ] || { log "no nvcc in $nv/cu13/bin after the install"; exit 1; }
    echo "$nv" >"$prefix/nvidia-root"
    echo "${pins[*]}" >"$wheels_stamp"
    rm -f "$stubs_stamp"
else
    log "toolchain wheels already installed in $prefix"
fi
nv=$(cat "$prefix/nvidia-root")
cu=$nv/cu13

# Lazy-loading stubs, where cudarc's link search finds them first: CUDA_ROOT/lib/stubs and
# CUDNN_LIB/lib/stubs hold lib<name>.a, and no unversioned lib<name>.so exists in those trees
# (the linker takes lib<name>.so over lib<name>.a only within one folder, and the wheels ship only
# versioned names). Regenerated when lazy_stubs.py or this script changes.
stubs_key=$(cat "$here/lazy_stubs.py" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
if [ ! -f "$stubs_stamp" ] || [ "$(cat "$stubs_stamp")" != "$stubs_key" ]; then
    for tool in gcc ar nm; do
        command -v "$tool" >/dev/null || { log "$tool is needed (build-essential)"; exit 1; }
    done
    log "generating lazy-loading link stubs"
    stubs=$cu/lib/stubs
    mkdir -p "$stubs" "$nv/cudnn/lib/stubs"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The driver API comes with the driver, not a wheel: its entry points are read from cuda.h
    # after the preprocessor has applied the _v2/_v3 renames, as cudarc's bindings see them.
    echo '#include <cuda.h>' >"$work/inc.c"
    gcc -E -P -I"$cu/include" "$work/inc.c" >"$work/cuda_pp.h"
    grep -oE '\bCUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' "$work/cuda_pp.h" |
        sed -E 's/^CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u >"$work/cuda.syms"
    stub() { # NAME SONAME SYMBOL_FILE OUT_DIR [lazy_stubs.py options]
        python3 "$here/lazy_stubs.py" --name "$1" --soname "$2" --symbols "$3" "${@:5}" >"$work/$1.c"
        gcc -c -O2 -fPIC -o "$work/$1.o" "$work/$1.c"
        rm -f "$4/lib$1.a"
        ar rcs "$4/lib$1.a" "$work/$1.o"
        log "  lib$1.a: $(wc -l <"$3") entry points of $2"
    }
    stub cuda libcuda.so.1 "$work/cuda.syms" "$stubs"
    # The libraries that do ship in wheels: their exported functions under the API's prefix.
    for spec in "cublas:$cu/lib/libcublas.so.13" "cublasLt:$cu/lib/libcublasLt.so.13" \
        "curand:$cu/lib/libcurand.so.10" "nvrtc:$cu/lib/libnvrtc.so.13" \
        "cudnn:$nv/cudnn/lib/libcudnn.so.9"; do
        name=${spec%%:*}
        file=${spec#*:}
        [ -f "$file" ] || { log "missing $file"; exit 1; }
        dir=$(dirname "$file")
        [ ! -e "$dir/lib$name.so" ] || { log "$dir/lib$name.so would be linked instead of the stub"; exit 1; }
        nm -D --defined-only "$file" | awk '$2 ~ /^[TWi]$/ {print $3}' | sed 's/@.*//' |
            grep -E "^$name" | sort -u >"$work/$name.syms"
        stub "$name" "$(basename "$file")" "$work/$name.syms" "$dir/stubs"
    done
    # The CUDA runtime, for candle-kernels' statically compiled kernels (it links -lcudart): their
    # static constructors register them with the runtime at program start, so without the
    # library those registration calls must do nothing rather than stop the program.
    nm -D --defined-only "$cu/lib/libcudart.so.13" | awk '$2 ~ /^[TWi]$/ {print $3}' | sed 's/@.*//' |
        grep -E '^(cuda|__cuda)' | sort -u >"$work/cudart.syms"
    [ ! -e "$cu/lib/libcudart.so" ] || { log "$cu/lib/libcudart.so would be linked instead of the stub"; exit 1; }
    stub cudart libcudart.so.13 "$work/cudart.syms" "$cu/lib/stubs" --soft-prefix __cuda
    echo "$stubs_key" >"$stubs_stamp"
fi

cat <<EOF
export CUDA_ROOT='$cu'
export CUDNN_LIB='$nv/cudnn'
export PATH='$cu/bin':"\$PATH"
export CUDA_COMPUTE_CAP=80
export LIBRARY_PATH='$cu/lib/stubs:$nv/cudnn/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH='$cu/lib:$nv/cudnn/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
