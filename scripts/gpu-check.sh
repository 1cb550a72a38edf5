#!/usr/bin/env bash
# The GPU path, checked in one run on a machine with an NVIDIA GPU. Nothing is built
# there: build the binary here with scripts/build-cuda.sh and carry target/release/bd3lm
# (and .cuda/nvidia/cu13/lib, the CUDA 13 runtime libraries, unless the host has them).
#
#   scripts/gpu-check.sh [BD3LM_BINARY]        # default target/release/bd3lm
#
# It prints, one JSON document or line per step:
#   1. the device (nvidia-smi);
#   2. check-reference on cuda in f32 (tolerance 1e-4, as on the CPU) and in bf16
#      (tolerance 0.05: bf16 keeps 8 significant bits against f16's 11; the same fixture
#      in f16 on the CPU differs from the reference by at most 0.004 (train_hidden, the
#      NELBO), so bf16's 8x coarser rounding gives about 0.03, and 0.05 leaves a margin
#      while a wrong mask or prefix (3e-2 to 9e-2 on every logit) still fails most keys);
#   3. local generation of 128 tokens on cuda in bf16 with the demo model;
#   4. bench serve on the paper's small shape (d 768, 12 layers, 12 heads, vocabulary
#      50258, context 1024, block size 4, random weights) in bf16 at concurrency 1, 16 and
#      64: tokens/s, block and first-block latency, mean batch size, and the share of
#      tokens identical to those the same seed got at the previous level (batch
#      invariance on the GPU).
# Each step's failure is reported and the next step still runs; the exit code is the
# number of failed steps.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/bd3lm}
lib=$root/.cuda/nvidia/cu13/lib
if [ -d "$lib" ]; then
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
fixture=$root/tests/data/reference-bd3lm-bs4
failed=0

step() {
    local name=$1
    shift
    echo "=== $name"
    local started=$SECONDS
    if ! "$@"; then
        echo "step $name FAILED"
        failed=$((failed + 1))
    fi
    echo "=== $name took $((SECONDS - started)) s"
}

step device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step reference-f32 "$bin" check-reference --device cuda --dtype f32 \
    --checkpoint "$fixture" --fixtures "$fixture/fixtures.safetensors" --tolerance 1e-4
step reference-bf16 "$bin" check-reference --device cuda --dtype bf16 \
    --checkpoint "$fixture" --fixtures "$fixture/fixtures.safetensors" --tolerance 0.05
step generate "$bin" generate --device cuda --dtype bf16 \
    --prompt "The state of the Union" --max-tokens 128 --seed 1
step bench-small "$bin" bench serve --model small --device cuda --dtype bf16 \
    --concurrency 1,16,64 --tokens 128
exit "$failed"
