#!/usr/bin/env bash
# Build DeepSeek's DeepGEMM, FlashMLA and DeepEP from local source checkouts into this Python
# environment (the native kernel backend). Needs a CUDA toolkit (nvcc >= 12.8; 13.0 verified), a
# CUDA build of torch in the environment, and the checkouts with their submodules:
#
#   git clone --recursive https://github.com/deepseek-ai/DeepGEMM && git -C DeepGEMM checkout 54e2261 \
#       && git -C DeepGEMM submodule update --init --recursive     # cutlass f3fde58, fmt 553ec11
#   git clone --recursive https://github.com/deepseek-ai/FlashMLA && git -C FlashMLA checkout 9241ae3 \
#       && git -C FlashMLA submodule update --init --recursive     # cutlass 147f567
#   git clone https://github.com/deepseek-ai/DeepEP && git -C DeepEP checkout 567632d   # V1 Buffer API, NVSHMEM only
#
# usage: scripts/build_native.sh DEEPGEMM_DIR FLASHMLA_DIR [WHEEL_DIR]
#        scripts/build_native.sh --deepep DEEPEP_DIR [WHEEL_DIR]
# Builds the wheels (DeepGEMM and FlashMLA in parallel) into WHEEL_DIR (default: a temp dir) and
# pip-installs them, unless EPSERVE_NATIVE_NO_INSTALL=1. Logs go to WHEEL_DIR/*.log.
#
# DeepEP (567632d, the last commit before V2's NCCL-Gin ElasticBuffer; its V1 deep_ep.Buffer is the
# API model/deepep_dispatch.py calls) builds against the NVSHMEM that pip's nvidia-nvshmem-cu13 ships
# (torch's CUDA 13 wheels depend on it). Its setup.py reads NVSHMEM_DIR and then links
# -l:libnvshmem_host.so, a name the wheel does not ship (only libnvshmem_host.so.3): the script
# finds the wheel's root from its file list, adds that one unversioned symlink beside the .so.3,
# and builds sm90 only (TORCH_CUDA_ARCH_LIST=9.0).
set -euo pipefail
py=${PYTHON:-python3}
cuda=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
if [ "${1:-}" = "--deepep" ]; then
    ep=$(realpath "${2:?DeepEP source dir}"); out=$(realpath -m "${3:-$(mktemp -d)}"); mkdir -p "$out"
    nv=${NVSHMEM_DIR:-$("$py" - <<'PY'
import importlib.metadata as md, os
for dist in md.distributions():
    if (dist.metadata["Name"] or "").lower().replace("_", "-").startswith("nvidia-nvshmem"):
        for f in dist.files or []:
            if os.path.basename(str(f)).startswith("libnvshmem_host.so"):
                print(os.path.dirname(os.path.dirname(str(f.locate())))); raise SystemExit
PY
)}
    [ -n "$nv" ] && [ -d "$nv/lib" ] || { echo "error: no NVSHMEM found: pip install nvidia-nvshmem-cu13 (or set NVSHMEM_DIR)" >&2; exit 2; }
    [ -d "$nv/include" ] && [ -f "$nv/lib/libnvshmem_device.a" ] || {
        echo "error: $nv lacks include/ or lib/libnvshmem_device.a: DeepEP needs NVSHMEM's headers and device library" >&2; exit 2; }
    host=$(cd "$nv/lib" && ls libnvshmem_host.so* | head -1)
    [ -e "$nv/lib/libnvshmem_host.so" ] || ln -s "$host" "$nv/lib/libnvshmem_host.so"
    echo "DeepEP $(git -C "$ep" rev-parse --short HEAD 2>/dev/null || echo '?') against NVSHMEM $nv ($host)"
    ( cd "$ep" && NVSHMEM_DIR="$nv" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        NVCC_APPEND_FLAGS="-I$cuda/include/cccl ${NVCC_APPEND_FLAGS:-}" \
        CPLUS_INCLUDE_PATH="$cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}" \
        "$py" -m pip wheel --no-build-isolation --no-deps -w "$out" . >"$out/deep_ep.log" 2>&1 ) || {
        echo "error: DeepEP build failed; tail of $out/deep_ep.log:" >&2; tail -20 "$out/deep_ep.log" >&2; exit 1; }
    if [ "${EPSERVE_NATIVE_NO_INSTALL:-0}" != 1 ]; then
        "$py" -m pip install --no-deps --force-reinstall "$out"/deep_ep-*.whl
        "$py" -c "import deep_ep, torch; print('deep_ep imports; sm90 compiled:', deep_ep.Buffer.is_sm90_compiled())"
    fi
    ls -la "$out"/deep_ep-*.whl
    exit 0
fi
dg=$(realpath "${1:?DeepGEMM source dir}"); fm=$(realpath "${2:?FlashMLA source dir}")
out=$(realpath -m "${3:-$(mktemp -d)}"); mkdir -p "$out"
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
