#!/bin/bash
# The GPU measurements of the README's Performance section in one call: the benchmark in
# float32 and bfloat16, and short training runs showing bfloat16 keeps accuracy. For a machine
# that has JAX with CUDA (python3 = its Python) and no package index: setup.py's other pinned
# dependencies travel as wheels in .whl/, fetched beforehand on a machine with one, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#     ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 ...
# plus what they need that the machine lacks (promise, which has no wheel, as its package
# folder). Without .whl/ the installed packages are used. Results go to $OUT (./gpu_out).
#
#   bash experiments/gpu_check.sh            # the full check, about 15 minutes
#   QUICK=1 bash experiments/gpu_check.sh    # plumbing only (small shapes; also runs on a CPU)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/i2m2_site .whl/*.whl || exit 1
  cp -r .whl/promise /tmp/i2m2_site/ 2>/dev/null
  export PYTHONPATH=/tmp/i2m2_site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [ "${QUICK:-0}" = 1 ]; then
  BENCH="--batches 8 --steps 2 --quick"; TRAIN=300; TEST=100; EPOCHS=1; SEEDS=1
  PREC_DIGITS="--config configs/digits.py:smoke"
else
  BENCH="--batches 40,256,1024 --steps 20 --repeats 2"; TRAIN=6000; TEST=1000; EPOCHS=4
  PREC_DIGITS="--config configs/digits.py"; SEEDS=2
fi

# 1. Throughput: plain and fast in float32, plain in bfloat16 (fast is float32 only); input
#    wait of the fast path fed by grain from an array_record build, in the trainer's loop (one
#    step in flight). No plain_tuned: compile options are CPU-only, so it would repeat plain.
timeout 280 "$PY" experiments/benchmark.py --config configs/avmnist.py $BENCH \
    --paths plain,fast --dtypes float32,bfloat16 --experts=false --input_path fast \
    --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i "warning" | tee "$OUT/bench_gpu.txt"

# 1b. fastMRI's I2M2 (three PreActResNet-18) at the paper's 320x320 in float32 and bfloat16,
#     experts separate and stacked into one vmapped network (config.model.stack_experts), with
#     the share of the card's matmul peak measured in the same run; and its memory per example.
if [ "${QUICK:-0}" = 1 ]; then FM="--hw 32 --batches 4 --steps 2 --quick"
else FM="--hw 320 --batches 16,64 --steps 5 --repeats 2"; fi
timeout 300 "$PY" experiments/benchmark.py --config configs/fastmri.py $FM \
    --paths plain,stacked --dtypes float32,bfloat16 --experts=false \
    --json "$OUT/bench_fastmri_gpu.json" 2>&1 | grep -v -i "warning" | tee "$OUT/bench_fastmri_gpu.txt"
timeout 120 "$PY" experiments/benchmark.py --config configs/fastmri.py --hw 320 --batches 16 \
    --paths plain,remat --memory_only --memory_budget_gib 139 \
    --json "$OUT/memory_fastmri_gpu.json" 2>&1 | tail -4 | tee "$OUT/memory_fastmri_gpu.txt"

# 2. Accuracy: the AV-MNIST I2M2 (LeNet experts) on digits made into AV-MNIST files, trained
#    from scratch in float32 and bfloat16 with the same seed.
"$PY" experiments/digits_as_avmnist.py --out /tmp/digits_av --train $TRAIN --val $((TRAIN / 6)) \
    --test $TEST
timeout 170 "$PY" experiments/precision.py --config configs/avmnist.py:i2m2 \
    --workdir /tmp/precision_av --config.model.init_from= --config.data.manual_dir=/tmp/digits_av \
    --config.data.data_dir=/tmp/tfds --config.data.num_val=$((TRAIN / 6)) \
    --config.num_epochs=$EPOCHS --config.optimizer.learning_rate=0.05 \
    --config.eval_missing_modalities=false 2>&1 | grep -v -i "warning" | tail -12 \
    | tee "$OUT/precision_avmnist.txt"
grep -H '"accuracy"' /tmp/precision_av/*/seed_*/results.json  # in case the table was cut short

# 3. Accuracy: the digits quick-start model (MLP experts), several seeds.
timeout 110 "$PY" experiments/precision.py $PREC_DIGITS --workdir /tmp/precision_digits \
    --seeds $SEEDS --config.data.data_dir=/tmp/tfds --config.eval_missing_modalities=false \
    2>&1 | grep -v -i "warning" | tail -12 | tee "$OUT/precision_digits.txt"
