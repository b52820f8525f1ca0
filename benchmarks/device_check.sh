#!/usr/bin/env bash
# The whole device check in one command, for a lent GPU machine (see benchmarks/README.md):
#
#   bash benchmarks/device_check.sh [SECTIONS]      # default env,a,b,c,d; e.g. env,b
#
# 1. the CUDA-marked tests (kernels vs float64, the real offload copy engine vs device-resident state);
#    they need torch, transformers and pytest only (the device image has them, not hydra/torchdata)
# 2. benchmarks/gpu_check.py SECTIONS; section d (train.py) needs hydra-core, omegaconf, antlr4 and
#    torchdata wheels in .whl/ (carried: `carry: [".whl"]`), otherwise it reports itself skipped
#
# Logs and gpu_check.json go to $OUT (or ./device_check_out). Without CUDA: the tests skip and gpu_check
# runs --smoke (checks this script, not a GPU). Exit status: that of pytest, else that of gpu_check.
set -u -o pipefail
cd "$(dirname "$0")/.."
sections=${1:-env,a,b,c,d}
export OUT=${OUT:-$PWD/device_check_out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
py=$(command -v python3 || command -v python)
smoke=()
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || smoke=(--smoke)
wheels=()
[ -n "$(ls .whl/*.whl 2>/dev/null)" ] && wheels=(--wheels .whl)

# hydra registers a pytest plugin when installed; not needed by these tests, absent on the device image
timeout 150 "$py" -m pytest -q -m gpu -p no:cacheprovider -p no:hydra_pytest \
    tests/test_attention.py tests/test_chunk_exactness.py 2>&1 | tee "$OUT/pytest_gpu.log"
rc_tests=$?
"$py" benchmarks/gpu_check.py --sections "$sections" "${wheels[@]}" "${smoke[@]}" 2>&1 | tee "$OUT/gpu_check.log"
rc_check=$?
echo "device_check: pytest -m gpu exit $rc_tests, gpu_check exit $rc_check; logs in $OUT"
[ "$rc_tests" -ne 0 ] && exit "$rc_tests"
exit "$rc_check"
