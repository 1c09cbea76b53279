r"""Measures the wall time per epoch of every stage of a benchmark config, on random data of the
real shapes (no data files needed).

  python experiments/time_per_epoch.py --config configs/avmnist.py --steps 40
  python experiments/time_per_epoch.py --config configs/mimic.py:mortality --steps 40
  python experiments/time_per_epoch.py --config configs/fastmri.py --batch_size 2 --steps 3 \
      --warmup 1 --eval_examples 4 --stages magnitude,i2m2   # slow on a CPU: few small steps

For each stage of the benchmark's recipe (experiments/recipes/): the stage's model, optimiser
and batch size, the trainer's jitted train step fed by the trainer's input pipeline (grain over
an in-memory source of random examples: uint8 0..255 for AV-MNIST, float32 normal for MIMIC),
host sync every step as in the training loop. `warmup` steps (compilation included) are
discarded, then `steps` steps are timed in windows of 10 (or `steps`, if fewer) and the fastest
window is used (on a shared machine the closest to an idle one; the median window is printed
beside it). `--batch_size` times smaller batches than the config's, for training and evaluation
(a slow model on a CPU); the epoch is then extrapolated per example, at the config's batch size. The memory per training
example is the growth of the compiled train step's temporary buffers (XLA's memory_analysis:
activations kept for the backward pass and other temporaries) from batch b to 2b, over b. The
evaluation of `eval_examples` examples is timed (faster of two passes) after one compiling pass.
One epoch is extrapolated as ceil(num_train / batch_size) train steps plus one evaluation of
num_val examples (the real split sizes below). Not included: checkpoint saves (one per epoch,
asynchronous) and reading from a TFDS ArrayRecord source instead of memory (AV-MNIST's training
split, ~730 MB, exceeds the 512 MB in-memory default; ~2 ms per batch of 40).

Prints a Markdown table and the machine (device, CPU count, load average before and after).
"""
from __future__ import annotations

import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import recipes  # noqa: E402
from i2m2_jax import evaluation, input_pipeline, sharding  # noqa: E402
from i2m2_jax.experiment import build_experiment  # noqa: E402
from i2m2_jax.steps import jit_eval_step, jit_train_step  # noqa: E402
from i2m2_jax.datasets import Dataset  # noqa: E402
from i2m2_jax.datasets import avmnist, fastmri, mimic  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

# data set -> (training examples, validation examples) of the real data.
REAL_SIZES = {
    "avmnist": (55_000, 5_000),          # MultiBench's 60,000 training rows, last 5,000 = val
    "mimic": (36_212 - 36_212 // 5, 36_212 // 10),  # MultiBench's 36,212 patients, 80/10/10
    # 70 % / 15 % of the 41,877 slices of the 1,172 annotated single-coil knee volumes (split by
    # volume, before volumes wider than 400 k-space columns are dropped: about).
    "fastmri": (29_300, 6_300),
}


def fake_dataset(config, rows: int, seed: int = 0) -> Dataset:
  """Random examples of the real shapes, dtypes and number of classes."""
  rng = np.random.default_rng(seed)
  targets, task, label_names = {"label": ()}, "multiclass", ()
  if config.data.name == "avmnist":
    shapes, num_classes = avmnist.MODALITY_SHAPES, avmnist.NUM_CLASSES
    make = lambda s: rng.integers(0, 256, (rows,) + s, dtype=np.uint8)  # noqa: E731
  elif config.data.name == "mimic":
    shapes, num_classes = mimic.MODALITY_SHAPES, mimic.TASKS[config.data.task][1]
    make = lambda s: rng.normal(size=(rows,) + s).astype(np.float32)  # noqa: E731
  elif config.data.name == "fastmri":
    size = config.data.image_size
    shapes, num_classes = {m: (size, size, 1) for m in fastmri.MODALITIES}, 2
    label_names = tuple(config.data.label_names.split(","))
    targets, task = {"label": (len(label_names),)}, "multilabel"
    make = lambda s: rng.normal(size=(rows,) + s).astype(np.float32)  # noqa: E731
  else:
    raise ValueError(f"No real sizes known for data set {config.data.name!r}.")
  columns = {m: make(s) for m, s in shapes.items()}
  columns["label"] = rng.integers(0, num_classes, (rows,) + targets["label"])
  source = input_pipeline.InMemorySource(columns)
  return Dataset(name=config.data.name, modalities=dict(shapes), num_classes=num_classes,
                 sources={"train": source, "val": source, "test": source}, targets=targets,
                 task=task, label_names=label_names)


def n_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def temp_bytes(train_fn, state, batch) -> int:
  """The temporary buffers of the compiled train step for `batch` (XLA's memory analysis)."""
  return int(train_fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def time_stage(config, dataset: Dataset, steps: int, warmup: int, eval_examples: int,
               window: int = 10):
  """(parameters, seconds per train step in the fastest window of `window` steps, the same in
  the median window, seconds per evaluated example in the faster of two passes, train-step
  memory per example in bytes). On a shared machine the fastest window is the best estimate of
  an idle one."""
  exp = build_experiment(config, dataset, stats=None)  # uint8 scaled to [0, 1] on device
  mesh, state = exp.mesh, exp.state
  train_fn = jit_train_step(exp.task, exp.preprocess, mesh)
  batches = input_pipeline.train_batches(
      dataset.sources["train"], batch_size=config.batch_size, seed=0,
      modalities=list(dataset.modalities), targets=exp.task.target_keys)

  def run(n, state):
    for _ in range(n):
      state, sums = train_fn(state, sharding.global_batch(next(batches), mesh))
      sharding.to_host(sums)  # the training loop syncs on the metrics every step
    return state

  state = run(warmup, state)
  window = min(window, steps)
  windows = []  # per-step seconds of each window of `window` steps
  for _ in range(max(steps // window, 1)):
    start = time.perf_counter()
    state = run(window, state)
    windows.append((time.perf_counter() - start) / window)

  eval_fn = jit_eval_step(exp.task, exp.preprocess, mesh)
  subset = input_pipeline.InMemorySource(
      {k: v[:eval_examples] for k, v in dataset.sources["val"].columns.items()})
  evaluation.evaluate(eval_fn, state, subset, dataset, exp.task, config.eval_batch_size,
                      mesh)  # compiles
  evals = []
  for _ in range(2):
    start = time.perf_counter()
    evaluation.evaluate(eval_fn, state, subset, dataset, exp.task, config.eval_batch_size,
                        mesh)
    evals.append((time.perf_counter() - start) / eval_examples)
  b = config.batch_size
  twice = input_pipeline.gather_batch(dataset.sources["train"], range(2 * b),
                                      list(dataset.modalities), exp.task.target_keys)
  memory = (temp_bytes(train_fn, state, sharding.global_batch(twice, mesh))
            - temp_bytes(train_fn, state, sharding.global_batch(next(batches), mesh))) / b
  return n_params(state.params), min(windows), float(np.median(windows)), min(evals), memory


def measure(config_filename: str, steps: int, warmup: int, eval_examples: int,
            stages=None, batch_size: int = 0) -> str:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import reproduce  # pylint: disable=g-import-not-at-top
  path, tokens = reproduce.split_config_argument(config_filename)
  module = reproduce.load_config_module(path)
  recipe = recipes.for_config(reproduce.build_config(module, tokens, {}))
  load_before = os.getloadavg()
  lines = ["| stage | parameters | batch | train step, fastest / median window (ms) | "
           "eval (ms / example) | epoch (s) | full run (min) | train memory / example (MiB) |",
           "|---|---|---|---|---|---|---|---|"]
  dataset = None
  for stage in stages or list(recipe.stages):
    config = reproduce.stage_config(module, recipe, stage, tokens, {})
    full_batch = config.batch_size
    if batch_size:  # smaller batches, also for evaluation (whose time is per example)
      config.batch_size, config.eval_batch_size = batch_size, min(batch_size,
                                                                  config.eval_batch_size)
    if dataset is None:
      dataset = fake_dataset(config, rows=max(eval_examples, 4 * config.batch_size))
    num_train, num_val = REAL_SIZES[config.data.name]
    params, step_s, median_s, eval_s, memory = time_stage(config, dataset, steps, warmup,
                                                          eval_examples)
    # Per example at the measured batch, times the config's batch (step time grows about
    # linearly with the batch once it fills the machine).
    epoch_s = (math.ceil(num_train / full_batch) * full_batch * step_s / config.batch_size
               + num_val * eval_s)
    lines.append(f"| {stage} | {params:,} | {config.batch_size} | {1e3 * step_s:.1f} / "
                 f"{1e3 * median_s:.1f} | {1e3 * eval_s:.3f} | {epoch_s:.0f} | "
                 f"{config.num_epochs * epoch_s / 60:.0f} | {memory / 2 ** 20:.0f} |")
    logging.info("Measured: %s", lines[-1])  # a slow stage's row is not lost if a later one fails
  load_after = os.getloadavg()
  device = jax.devices()[0]
  lines.append("")
  lines.append(f"{len(jax.devices())} x {device.platform} ({device.device_kind}), "
               f"{os.cpu_count()} CPUs; load average (1/5/15 min) before "
               f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
               f"{'/'.join(f'{x:.2f}' for x in load_after)}; {steps} timed steps (windows of {min(10, steps)}) "
               f"after {warmup}; epoch (fastest window) = ceil({num_train}/{full_batch}) steps of "
               f"{full_batch} + {num_val} val examples; full run = config.num_epochs epochs (no "
               f"early stop).")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  print(measure(config_flags.get_config_filename(FLAGS["config"]), FLAGS.steps, FLAGS.warmup,
                FLAGS.eval_examples, FLAGS.stages, FLAGS.batch_size))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Benchmark config file.", lock_config=False)
  flags.DEFINE_integer("steps", 40, "Timed train steps per stage.")
  flags.DEFINE_integer("warmup", 3, "Untimed train steps first (compilation).")
  flags.DEFINE_integer("eval_examples", 1000, "Examples in the timed evaluation.")
  flags.DEFINE_list("stages", None, "Only these stages (default: all of the recipe's).")
  flags.DEFINE_integer("batch_size", 0, "Time this batch size (0: the config's); the epoch is "
                       "extrapolated per example at the config's.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
