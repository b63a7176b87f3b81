#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes:
#   1. the fast path's correctness checks on the GPU (tests marked `gpu`),
#   2. the loss alone: our Triton kernel against F.cross_entropy (benchmarks/loss_kernel.py),
#   3. the training-step variants side by side (benchmarks/gpu_train_variants.py: the default
#      against the plain loss and the peers, with a kernel profile),
#   4. the benchmark table for llmscratch and the peers (`bench train` by default; BENCH=all
#      adds the attention op and decoding), written as JSON and logs under $OUT
#      (default /tmp/gpu_check).
# The GPU machine has PyTorch, transformers and no network: we run from the source tree with
# PYTHONPATH=src, and install carried wheels (.whl/, e.g. llms-from-scratch) into /tmp/site.
# Each stage has its own time limit, so a slow stage cannot lose the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout "${TEST_LIMIT:-120}" python3 -m pytest -m gpu tests/test_fast_path.py tests/test_optim.py tests/test_kernels.py \
  -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log"

echo "== the loss alone"
timeout "${LOSS_LIMIT:-60}" python3 benchmarks/loss_kernel.py --json "$OUT/loss_kernel.json" 2>&1  # its table is in the JSON too

echo "== training-step variants"
timeout "${VARIANTS_LIMIT:-230}" python3 benchmarks/gpu_train_variants.py --out "$OUT" --budget 170 --hard 215 \
  2>&1 | tee "$OUT/variants.log"

echo "== benchmarks"
BENCH_ARGS=(--peers --steps 5 --repeats 3)  # compiled rows too: the default on CUDA
timeout "${BENCH_LIMIT:-170}" python3 -m llmscratch bench "${BENCH:-train}" --preset nanogpt-124m --batch 16 --context 1024 \
  "${BENCH_ARGS[@]}" --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
echo "== done"
