#!/usr/bin/env bash
# Checks the lazy-loading link stubs of tools/cuda/setup.sh without a GPU: a C program linked
# against them must not list the CUDA libraries as needed, must run its NVRTC and cuDNN calls
# (arguments in registers, on the stack and in vector registers pass through), must stop with a
# message naming the library when that library cannot be loaded, except for the CUDA runtime's
# registration calls, which then do nothing.
#   eval "$(bash tools/cuda/setup.sh)" && bash tools/cuda/check_stubs.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${CUDA_ROOT:?run eval \"\$(bash tools/cuda/setup.sh)\" first}" "${CUDNN_LIB:?}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O1 -o "$work/check" "$here/stub_check.c" -I"$CUDA_ROOT/include" -I"$CUDNN_LIB/include" \
    -L"$CUDA_ROOT/lib/stubs" -L"$CUDNN_LIB/lib/stubs" -lcudnn -lnvrtc -lcudart
if readelf -d "$work/check" | grep -E 'NEEDED.*(nvrtc|cudnn|cudart)'; then
    echo "check_stubs: the CUDA libraries were linked directly, not through the stubs" >&2
    exit 1
fi
got=$("$work/check")
expected='desc 2 3 5 7 105 35 7 1'
for want in "nvrtc 13." "ptx " "$expected" "coef 6.25"; do
    grep -qF "$want" <<<"$got" || { echo "check_stubs: missing '$want' in:"$'\n'"$got" >&2; exit 1; }
done
if msg=$(env -u LD_LIBRARY_PATH "$work/check" 2>&1); then
    echo "check_stubs: ran without its libraries" >&2
    exit 1
fi
grep -q 'cannot load libnvrtc.so.13' <<<"$msg" || { echo "check_stubs: unexpected failure: $msg" >&2; exit 1; }
# The runtime's registration calls, made by static constructors of kernels compiled into a
# binary, must do nothing (not stop the program) when the runtime is missing.
soft=$(env -u LD_LIBRARY_PATH "$work/check" soft 2>&1) || { echo "check_stubs: $soft" >&2; exit 1; }
echo "check_stubs: lazy CUDA stubs ok (no NEEDED entries; calls pass their arguments; missing library named)"
