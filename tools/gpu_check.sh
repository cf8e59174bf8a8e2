#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (the `device` tool's run): the Triton kernel tests on CUDA and
# the GPU benchmark against cuBLAS and bitsandbytes. Results land under $OUT (default gpu_out/).
#
# Prepare here, once:  echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Then: device run, carry [".whl"], command "bash tools/gpu_check.sh", timeout about 600 s.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/optim/test_cuda.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 200 python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.md"
bench=${PIPESTATUS[0]}
# a QLoRA training step on a random Llama of TinyLlama-1.1B's shape: ours (defaults, and the
# opt-in precision and recomputation options) against PEFT + bitsandbytes, device memory peaks
timeout 200 python3 benchmarks/bench_train.py --device cuda --model llama-1b --steps 5 --batch 4 --seq 1024 \
  --candidates qlora-compile,qlora-compile/all,peft+bnb --cache /tmp/bench_cache \
  --json "$OUT/bench_train_gpu.json" 2>&1 | tee "$OUT/bench_train_gpu.md"
train=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench, training benchmark exit $train" | tee -a "$OUT/gpu.txt"
exit $(( tests != 0 || bench != 0 || train != 0 ))
