r"""Measures how fast the heads on frozen features train: examples/s of every stage of the VQA-VS
(or NLVR2) recipe, I2M2 beside the experts it combines, on random features of FIBER's sizes.

  python experiments/head_speed.py                         # VQA-VS: 768 / 768 / 1536, C = 3129
  python experiments/head_speed.py --config configs/nlvr2.py --batch 256

Each stage's model, optimiser and jitted train step as the trainer builds them, fed by the
trainer's input pipeline (an in-memory source of random float32 features and soft scores), with
the host sync of every step (experiments/time_per_epoch.py: `warmup` steps discarded, then the
fastest window of 10 steps). Beside them: the head's largest matrix product alone ([B, 1536] x
[1536, C], forward), the step's floating-point work counted by hand (6 x parameters of the dense
layers per example: forward, and two products for the backward pass) and its rate. Prints a
Markdown table with the machine and its load.
"""
from __future__ import annotations

import os
import sys
import timeit

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import reproduce, time_per_epoch  # noqa: E402
from experiments import recipes  # noqa: E402
from i2m2_jax import input_pipeline  # noqa: E402
from i2m2_jax.datasets import Dataset, nlvr2, vqa_vs  # noqa: E402
from i2m2_jax.experiment import build_experiment  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

FIBER = {"image": 768, "text": 768, "fused": 1536}  # FIBER's feature sizes
VQA_ANSWERS = 3129  # the VQA v2 answer vocabulary of the official recipe


def fiber_dataset(name: str, rows: int, seed: int = 0) -> Dataset:
  """Random features of FIBER's sizes for `vqa_vs` (soft scores over 3,129 answers, a few
  answers per question) or `nlvr2` (binary labels)."""
  rng = np.random.default_rng(seed)
  if name == "vqa_vs":
    shapes = {m: (FIBER[m],) for m in vqa_vs.MODALITIES}
    scores = np.zeros((rows, VQA_ANSWERS), np.float32)
    for value in (1.0, 0.6, 0.3):
      scores[np.arange(rows), rng.integers(0, VQA_ANSWERS, rows)] = value
    targets, num_classes = {"scores": scores}, VQA_ANSWERS
  else:
    shapes = {m: (FIBER[m.split("_")[0]],) for m in nlvr2.MODALITIES}
    targets, num_classes = {"label": rng.integers(0, 2, rows)}, 2
  source = input_pipeline.InMemorySource(
      {**{m: rng.normal(size=(rows,) + s).astype(np.float32) for m, s in shapes.items()},
       **targets})
  return Dataset(name=name, modalities=shapes, num_classes=num_classes,
                 sources={"train": source, "val": source, "test": source},
                 targets={k: v.shape[1:] for k, v in targets.items()},
                 task="soft_label" if name == "vqa_vs" else "multiclass")


def dense_params(params) -> int:
  """Parameters of the dense layers' kernels (what the matrix products multiply by)."""
  return int(sum(np.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if getattr(path[-1], "key", "") == "kernel"))


def matmul_ms(batch: int, hidden: int, classes: int, repeats: int = 20) -> float:
  """Fastest forward [batch, hidden] x [hidden, classes] (jitted), in ms."""
  x = jax.random.normal(jax.random.key(0), (batch, hidden))
  w = jax.random.normal(jax.random.key(1), (hidden, classes))
  product = jax.jit(jnp.dot)
  product(x, w).block_until_ready()  # compiles
  return 1e3 * min(timeit.repeat(lambda: product(x, w).block_until_ready(), number=1,
                                 repeat=repeats))


def measure(config_filename: str, batch: int, steps: int, warmup: int) -> str:
  path, tokens = reproduce.split_config_argument(config_filename)
  module = reproduce.load_config_module(path)
  overrides = {"batch_size": batch}
  recipe = recipes.for_config(reproduce.build_config(module, tokens, overrides))
  load_before = os.getloadavg()
  lines = ["| stage | parameters | train step (ms), fastest / median window | examples/s | "
           "GFLOP/s (hand count) |", "|---|---|---|---|---|"]
  dataset = None
  for stage in recipe.stages:
    config = reproduce.stage_config(module, recipe, stage, tokens, overrides)
    dataset = dataset or fiber_dataset(config.data.name, rows=4 * batch)
    params, step_s, median_s, _ = time_per_epoch.time_stage(config, dataset, steps, warmup,
                                                            eval_examples=batch)
    flop = 6 * dense_params(build_experiment(config, dataset, stats=None).state.params) * batch
    lines.append(f"| {stage} | {params:,} | {1e3 * step_s:.1f} / {1e3 * median_s:.1f} | "
                 f"{batch / step_s:,.0f} | {flop / step_s / 1e9:.0f} |")
  classes = dataset.num_classes
  product_ms = matmul_ms(batch, config.model.head_hidden[-1], classes)
  load_after = os.getloadavg()
  device = jax.devices()[0]
  lines += ["", f"The head's largest product alone, [{batch}, {config.model.head_hidden[-1]}] x "
            f"[{config.model.head_hidden[-1]}, {classes}] forward: {product_ms:.2f} ms "
            f"({2 * batch * config.model.head_hidden[-1] * classes / product_ms / 1e6:.0f} "
            f"GFLOP/s).",
            f"{len(jax.devices())} x {device.platform} ({device.device_kind}), {os.cpu_count()} "
            f"CPUs, JAX {jax.__version__}; load average (1/5/15 min) before "
            f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
            f"{'/'.join(f'{x:.2f}' for x in load_after)}; batch {batch}, {steps} timed steps "
            f"(windows of 10) after {warmup}."]
  return "\n".join(lines)


_CONFIG = flags.DEFINE_string("config", "configs/vqa_vs.py", "configs/vqa_vs.py or nlvr2.py.")
_BATCH = flags.DEFINE_integer("batch", 512, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps per stage.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed train steps first (compilation).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"Command: python {' '.join(sys.argv)}")
  print(measure(_CONFIG.value, _BATCH.value, _STEPS.value, _WARMUP.value))


if __name__ == "__main__":
  app.run(main)
