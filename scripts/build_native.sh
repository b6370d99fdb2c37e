#!/usr/bin/env bash
# Build DeepSeek's DeepGEMM and FlashMLA from local source checkouts into this Python environment
# (the native kernel backend; DeepEP is issue 18's). Needs a CUDA toolkit (nvcc >= 12.8; 13.0
# verified), a CUDA build of torch in the environment, and the checkouts with their submodules:
#
#   git clone --recursive https://github.com/deepseek-ai/DeepGEMM && git -C DeepGEMM checkout 54e2261 \
#       && git -C DeepGEMM submodule update --init --recursive     # cutlass f3fde58, fmt 553ec11
#   git clone --recursive https://github.com/deepseek-ai/FlashMLA && git -C FlashMLA checkout 9241ae3 \
#       && git -C FlashMLA submodule update --init --recursive     # cutlass 147f567
#
# usage: scripts/build_native.sh DEEPGEMM_DIR FLASHMLA_DIR [WHEEL_DIR]
# Builds both wheels in parallel into WHEEL_DIR (default: a temp dir) and pip-installs them, unless
# EPSERVE_NATIVE_NO_INSTALL=1. Logs go to WHEEL_DIR/*.log.
set -euo pipefail
dg=$(realpath "${1:?DeepGEMM source dir}"); fm=$(realpath "${2:?FlashMLA source dir}")
out=$(realpath -m "${3:-$(mktemp -d)}"); mkdir -p "$out"
py=${PYTHON:-python3}
cuda=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
[ -d "$dg/third-party/cutlass/include" ] || { echo "error: $dg/third-party/cutlass is empty (submodules?)" >&2; exit 2; }
[ -d "$fm/csrc/cutlass/include" ] || { echo "error: $fm/csrc/cutlass is empty (submodules?)" >&2; exit 2; }

# DeepGEMM: its extension links libstdc++ statically with the symbols kept private. Linked
# dynamically, its std::regex calls (the JIT's header parser and nvcc version check) bind to
# libstdc++ pieces that torch's own libraries export, and the process segfaults on the first
# kernel compile (seen with torch 2.11+cu130, GCC 13.3, libstdc++ 6.0.33; LD_PRELOAD of the
# system libstdc++ also avoids it, but has to be set for every process that imports it).
( cd "$dg" && DG_FORCE_BUILD=1 DG_USE_LOCAL_VERSION=0 \
    LDFLAGS="${EPSERVE_DG_LDFLAGS:--static-libstdc++ -Wl,--exclude-libs,ALL}" \
    "$py" -m pip wheel --no-build-isolation --no-deps -w "$out" . >"$out/deep_gemm.log" 2>&1 ) &
dg_pid=$!
# FlashMLA: sm90 only; CUDA 13 moved libcu++ (cuda/std/...) under include/cccl.
( cd "$fm" && FLASH_MLA_DISABLE_SM100=1 NVCC_APPEND_FLAGS="-I$cuda/include/cccl ${NVCC_APPEND_FLAGS:-}" \
    CPLUS_INCLUDE_PATH="$cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}" \
    "$py" -m pip wheel --no-build-isolation --no-deps -w "$out" . >"$out/flash_mla.log" 2>&1 ) &
fm_pid=$!
rc=0
wait $dg_pid || { echo "error: DeepGEMM build failed; tail of $out/deep_gemm.log:" >&2; tail -20 "$out/deep_gemm.log" >&2; rc=1; }
wait $fm_pid || { echo "error: FlashMLA build failed; tail of $out/flash_mla.log:" >&2; tail -20 "$out/flash_mla.log" >&2; rc=1; }
[ $rc = 0 ] || exit $rc
if [ "${EPSERVE_NATIVE_NO_INSTALL:-0}" != 1 ]; then
    "$py" -m pip install --no-deps --force-reinstall "$out"/deep_gemm-*.whl "$out"/flash_mla-*.whl
fi
ls -la "$out"/*.whl
