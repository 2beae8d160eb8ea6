#!/usr/bin/env bash
# The GPU checks, run on a machine with one CUDA GPU, from the repository root:
#   1. the `gpu`-marked tests (member groups vectorized and looped on CUDA, member threads, a group actor on one
#      whole GPU, members as Ray actors sharing the GPU, placement errors);
#   2. benchmarks/training_cost.py on the GPU, 8 members each:
#      - Fashion-MNIST small CNN, 20,000 images, 3 epochs, 2 repeats (throughput once fixed costs are paid:
#        the GPU target, run first; hqde-named: the same group with vmap named, nothing timed);
#      - Fashion-MNIST small CNN, 1 epoch on FASHION_TRAIN_IMAGES images (the 1-epoch case, where
#        every fit's fixed cost weighs most);
#      - digits MLP, 10 epochs (the CPU target case);
#   3. benchmarks/step_cost.py (per-step cost, fixed costs taken out) and benchmarks/inference_cost.py
#      (the ensemble's members vmapped or looped at evaluation) on the GPU;
#   4. a cProfile of the member group's 1-epoch Fashion-MNIST fit (where its time goes: the rows of
#      hqde_lightning and of Lightning's loops).
# Everything it prints, the benchmark's JSON/PNG results and the profile are written to OUT_DIR
# (default benchmarks/results/gpu), named with the case, so that CPU results are not overwritten.
# MODES overrides the modes run (Ray actors are left out by default: they cost minutes on a GPU and
# the `gpu` tests run them); ACCELERATOR=cpu dry-runs the script on a machine without a GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [FASHION_TRAIN_IMAGES]
set -uo pipefail
out=${1:-benchmarks/results/gpu}
fashion_images=${2:-15000}
accelerator=${ACCELERATOR:-gpu}
modes=${MODES:-sequential sequential-channels-last torch-vmap hqde hqde-loop hqde-manual}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ "$accelerator" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_machine.txt"
fi
python3 -c "import cloudpickle, torch, lightning, ray; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, ray {ray.__version__}, cloudpickle {cloudpickle.__version__}')" | tee -a "$out/gpu_machine.txt"

timeout 240 python3 -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="--strict-markers -ra" 2>&1 | tee "$out/gpu_tests.log"

bench() {  # bench NAME ARGS...: one training_cost.py run, its log and results saved as training_cost_gpu_NAME.*
    local name=$1 data=$2
    shift
    timeout 300 python3 benchmarks/training_cost.py --accelerator "$accelerator" --members 8 --data "$@" 2>&1 | tee "$out/training_cost_gpu_$name.log"
    for ext in json png; do
        cp "benchmarks/results/training_cost_$data.$ext" "$out/training_cost_gpu_$name.$ext" 2>/dev/null
    done
}
# shellcheck disable=SC2086  # $modes is a list of words
# the target case first (8 SmallCNN members at >= 4x the throughput of 8 plain Trainers), twice, in case time runs out
bench fashion-mnist-3epochs fashion-mnist --epochs 3 --train-size 20000 --repeats 2 --modes sequential torch-vmap hqde hqde-named
bench fashion-mnist fashion-mnist --epochs 1 --train-size "$fashion_images" --modes single $modes
bench digits digits --epochs 10 --modes $modes
for script in step_cost inference_cost; do
    timeout 120 python3 "benchmarks/$script.py" --accelerator "$accelerator" 2>&1 | tee "$out/${script}_gpu.log"
done

python3 -m cProfile -o "$out/hqde_fashion_profile.prof" benchmarks/training_cost.py --accelerator "$accelerator" --data fashion-mnist \
    --members 8 --epochs 1 --train-size "$fashion_images" --run hqde --result-file "$out/hqde_fashion_profile.json" >/dev/null 2>&1
python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats('hqde_lightning|lightning/pytorch/loops', 45)" "$out/hqde_fashion_profile.prof" \
    > "$out/hqde_fashion_profile.txt" 2>&1
