#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with a CUDA GPU (CI has none):
#   1. the 4-bit tests (NF4 round trip, grads through 4-bit, export, lossy merge, QLoRA training,
#      PEFT interop) and the layer tests with their models on CUDA;
#   2. the strategy tests with accelerator=cuda, and a resumed paged optimizer's state paged again;
#   3. an FSDP-QLoRA smoke run (scripts/fsdp_smoke.py);
#   4. the QLoRA step benchmark on CUDA (tokens/s and peak GPU memory, ours vs PEFT), if present;
#   5. a 70B-shaped Llama streamed into NF4 layer by layer, one QLoRA step at 1 x 512 with gradient
#      checkpointing and paged 8-bit AdamW: peak GPU memory (< 48 GB expected), step time, estimate.
# Usage (from the repository root, after the README's install line): bash scripts/gpu_check.sh [out_dir]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
status=0
run() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/gpu_check.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))" || exit 1
LP_TEST_DEVICE=cuda run python -m pytest -q -p no:cacheprovider tests/test_qlora.py tests/test_lora_layer.py tests/test_peft_oracle.py
LP_TEST_ACCELERATOR=cuda run python -m pytest -q -p no:cacheprovider tests/test_strategy.py
LP_TEST_ACCELERATOR=cuda run python -m pytest -q -p no:cacheprovider tests/test_paged_optimizer.py -k on_cuda
run python scripts/fsdp_smoke.py "$out"
if [ -f benchmarks/qlora_gpu.py ]; then
  run python benchmarks/qlora_gpu.py --out "$out/qlora_gpu.md"
fi
run python scripts/big_70b.py --out "$out/big_70b.md"
echo "gpu_check status: $status (log: $out/gpu_check.log)"
exit $status
