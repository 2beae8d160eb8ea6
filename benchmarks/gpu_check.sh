#!/usr/bin/env bash
# The GPU checks, run on a machine with one CUDA GPU, from the repository root:
#   1. the `gpu`-marked tests (member groups vectorized and looped on CUDA, members as Ray actors
#      sharing the GPU, placement errors);
#   2. benchmarks/training_cost.py on the GPU: 8 members of the Fashion-MNIST small CNN and of the
#      digits MLP, every mode (plain Trainers one after another, the member group, Ray actors).
# Everything it prints and the benchmark's JSON/PNG results are written to OUT_DIR (default
# benchmarks/results/gpu), named with the card so that CPU results are not overwritten.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [FASHION_TRAIN_IMAGES]
set -uo pipefail
out=${1:-benchmarks/results/gpu}
fashion_images=${2:-15000}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_machine.txt"
python3 -c "import torch, lightning, ray; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, ray {ray.__version__}')" | tee -a "$out/gpu_machine.txt"

python3 -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="--strict-markers -ra" 2>&1 | tee "$out/gpu_tests.log"

for run in "fashion-mnist --members 8 --epochs 1 --train-size $fashion_images" "digits --members 8 --epochs 10"; do
    data=${run%% *}
    python3 benchmarks/training_cost.py --accelerator gpu --data $run 2>&1 | tee "$out/training_cost_gpu_$data.log"
    for ext in json png; do
        cp "benchmarks/results/training_cost_$data.$ext" "$out/training_cost_gpu_$data.$ext" 2>/dev/null
    done
done
