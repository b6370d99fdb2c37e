#!/usr/bin/env bash
# Issue 18's runs on a host with several GPUs, each result as JSON in OUT_DIR (default
# benchmarks/results), named after the bench and the GPU count. Needs the CUDA torch, DeepGEMM and
# FlashMLA installed (scripts/build_native.sh) and, for DeepEP, a DeepEP 567632d checkout:
#
#   scripts/multi_gpu_runs.sh [DEEPEP_DIR] [OUT_DIR]
#
# Steps (a failed step is reported and the next one runs; the exit code is the number that failed):
#   build    DeepEP against pip's NVSHMEM, then import it (skipped without DEEPEP_DIR)
#   tests    the 2-GPU unit == single rank test, the GPU hot-path tests, the layout tests
#   deepep   dispatch/combine at V3 shapes, normal and low latency, vs NVLink (all GPUs, up to 8)
#   step     decode and prefill tokens/s per GPU with real EP (all GPUs, up to 8)
#   overlap  on/off/auto with real exchanges on 2 GPUs, a V3-width checkpoint; profiler traces
#   handoff  the KV handoff over an NCCL pair group vs the object store (2 GPUs)
set -uo pipefail
ep=${1:-}; out=$(realpath -m "${2:-benchmarks/results}"); mkdir -p "$out"
py=${PYTHON:-python3}
n=$("$py" -c "import torch; print(min(8, torch.cuda.device_count()))")
dev=$("$py" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null || echo gpu)
tag="${n}x${dev}"
failed=0
step() {   # name, command...: stdout to NAME.json (benches) or NAME.txt (build, tests), stderr to NAME.log
    local name=$1; shift
    local ext=json; case $name in *tests*|*build*) ext=txt;; esac
    echo "== $name: $*" >&2
    if "$@" > "$out/$name.$ext.tmp" 2> "$out/$name.log"; then
        mv "$out/$name.$ext.tmp" "$out/$name.$ext"; echo "   ok -> $out/$name.$ext" >&2
    else
        mv "$out/$name.$ext.tmp" "$out/$name.$ext.failed"; failed=$((failed + 1))
        echo "   FAILED: $(tail -1 "$out/$name.log")" >&2
    fi
}
[ "$n" -ge 2 ] || { echo "error: this host has $n GPU(s); these runs need at least 2" >&2; exit 2; }
if [ -n "$ep" ]; then
    step "deepep_build_$dev" scripts/build_native.sh --deepep "$ep" "$out/wheels"
fi
step "multi_gpu_tests_$tag" "$py" -m pytest -q -rs tests/test_devices.py tests/test_gpu_hot_path.py tests/test_deepep_layouts.py
step "deepep_$tag" "$py" -m epserve bench deepep --gpus "$n"
step "step_ep_decode_$tag" "$py" -m epserve bench step --gpus "$n" --backend native --phase decode
step "step_ep_prefill_$tag" "$py" -m epserve bench step --gpus "$n" --backend native --phase prefill
v3=$(mktemp -d)/v3-ep144-rank
"$py" -m epserve make-tiny-model "$v3" --preset v3-ep144-rank --device cuda >&2
step "overlap_2x$dev" "$py" -m epserve bench overlap --gpus 2 --model "$v3"
step "profile_2x$dev" "$py" -m epserve bench overlap --profile "$out/traces_2x$dev" --model "$v3"
step "handoff_2x$dev" "$py" -m epserve bench handoff
echo "$failed step(s) failed" >&2
exit $failed
