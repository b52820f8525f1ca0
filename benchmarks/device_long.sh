#!/usr/bin/env bash
# The long-context device check in two commands on one warm GPU machine (flash-attn-4 needs two carries):
#
#   bash benchmarks/fa4_wheels.sh pack                          # here, once: .fa4a/ and .fa4b/
#   device run, carry [".fa4a"]:  bash benchmarks/device_long.sh 1 [DEADLINE_S]
#   device run, carry [".fa4b"]:  bash benchmarks/device_long.sh 2 [DEADLINE_S]   (within ~30 s of call 1)
#
# Call 1 (PyTorch's kernels only): stashes flash-attn-4's first half, runs the CUDA test of layer
# checkpointing with the real copy engine, then gpu_check sections env, a (torch flash), l (layer
# checkpointing on/off), p (transformers peer), c (torch flash, 32K/128K).
# Call 2: joins and installs flash-attn-4, runs its CUDA kernel test, then gpu_check env, a (flash-attn-4),
# g (whole-step gradients), c (flash-attn-4, 32K/128K), t (profile at 128K), m (1M-token stage), and with
# what is left of DEADLINE_S, c at 512K for flash-attn-4 and torch flash.
# Logs and JSON go to $OUT (or ./device_check_out). Sections past the deadline are skipped, never cut:
# every number in the JSON is a whole measurement.
set -u -o pipefail
cd "$(dirname "$0")/.."
call=${1:?call 1 or 2}
deadline=${2:-$([ "$call" = 1 ] && echo 150 || echo 480)}
export OUT=${OUT:-$PWD/device_check_out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1  # a second process reuses the first one's compiled kernels
mkdir -p "$OUT"
t_start=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - t_start) )); }
py=$(command -v python3 || command -v python)
pytest_gpu() {  # hydra registers a pytest plugin when installed; the device image has none
    timeout "$1" "$py" -m pytest -q -m gpu -p no:cacheprovider -p no:hydra_pytest "${@:2}" 2>&1 | tee -a "$OUT/pytest_gpu_$call.log"
}
check() {  # gpu_check TAG ARGS...: its JSON kept as gpu_check_TAG.json
    local tag=$1
    shift
    "$py" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check_$tag.log"
    [ -f "$OUT/gpu_check.json" ] && mv "$OUT/gpu_check.json" "$OUT/gpu_check_$tag.json"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/card_$call.txt"
if [ "$call" = 1 ]; then
    bash benchmarks/fa4_wheels.sh stash .fa4a || echo "device_long: no .fa4a carried: call 2 cannot install flash-attn-4"
    pytest_gpu 60 tests/test_layer_checkpoint.py
    check 1 --sections env,a,l,p,c --a-kernels torch-flash --c-backends sdpa --c-lengths 32k,128k \
        --deadline "$(left)"
else
    t0=$(date +%s)
    exports=$(bash benchmarks/fa4_wheels.sh install .fa4b) && eval "$exports"
    echo "device_long: flash-attn-4 install took $(( $(date +%s) - t0 )) s; $exports" | tee "$OUT/fa4_install.txt"
    t0=$(date +%s)
    "$py" -c "import flash_attn.cute.interface as i; print('flash_attn.cute imported from', i.__file__)" 2>&1 \
        | tee -a "$OUT/fa4_install.txt"
    echo "device_long: import took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/fa4_install.txt"
    pytest_gpu 120 tests/test_attention.py -k "flash-attn-4"
    check 2 --sections env,a,g,c,t,m --a-kernels flash-attn-4 --c-backends flash --c-lengths 32k,128k \
        --budgets m=400 --deadline "$(left)"
    # 512K: one step each, ~1-2 min (flash-attn-4 first; torch flash only with clear room, never cut short)
    [ "$(left)" -gt 100 ] && check 2b --sections c --c-backends flash --c-lengths 512k --budgets c=600 \
        --deadline "$(left)"
    [ "$(left)" -gt 150 ] && check 2c --sections c --c-backends sdpa --c-lengths 512k --budgets c=600 \
        --deadline "$(left)"
fi
echo "device_long: call $call done in $(( $(date +%s) - t_start )) s (deadline $deadline s)"
