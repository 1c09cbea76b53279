"""Everything one run trains, built from a config and a data set: the task, the experts, the
model, the input preprocessing, the optimiser and the initial state.

`build_experiment(config, dataset)` is the one place that does it, used by the trainer
(`train_lib.train_and_evaluate`), `experiments/benchmark.py` and `experiments/time_per_epoch.py`.
It raises ValueError for a config that cannot work with this data (task, selection metric,
encoders, expert inputs, optimiser...) before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from i2m2_jax import input_pipeline
from i2m2_jax import models
from i2m2_jax import optim
from i2m2_jax import sharding
from i2m2_jax import tasks
from i2m2_jax.datasets import Dataset
from i2m2_jax.steps import TrainState

Stats = Mapping[str, tuple[np.ndarray, np.ndarray]]


def make_preprocess(modalities, stats: Stats | None,
                    dtype=jnp.float32) -> Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Inputs as `dtype` (the model's compute dtype) on device: standardised in float32 with
  training statistics when given, else uint8 scaled to [0, 1]. Data stays in its stored dtype on
  the host (uint8 moves 4x fewer bytes)."""
  def preprocess(inputs):
    out = {}
    for name in modalities:
      x = inputs[name]
      if stats is not None:
        mean, std = stats[name]
        x = (x.astype(jnp.float32) - mean) / std
      elif x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
      out[name] = x.astype(jnp.float32).astype(dtype)
    return out
  return preprocess


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example_inputs: Mapping[str, Any], rng: jax.Array, mesh: Mesh,
                       compute_dtype=jnp.float32) -> TrainState:
  """The initial state, created directly replicated on the mesh (shapes from jax.eval_shape).
  Parameters are float32; `compute_dtype` is the dtype state.apply_fn computes in
  (models.apply_in_dtype)."""
  params_rng, dropout_rng = jax.random.split(rng)

  def init(params_rng):
    variables = model.init({"params": params_rng, "dropout": params_rng}, example_inputs,
                           train=False)
    return TrainState.create(apply_fn=models.apply_in_dtype(model.apply, compute_dtype),
                             params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             dropout_rng=jax.random.key_data(dropout_rng))

  abstract = jax.eval_shape(init, params_rng)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(params_rng)


def standardization_stats(config: ml_collections.ConfigDict, dataset: Dataset) -> Stats | None:
  """Training-split statistics of every modality when config.data.standardize (default), with
  a clear error when the split holds NaN or Inf."""
  if not config.data.get("standardize", True):
    return None
  stats = input_pipeline.standardization_stats(dataset.sources["train"], list(dataset.modalities),
                                               seed=config.seed)
  for m, (mean, std) in stats.items():
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      raise ValueError(f"Data set {dataset.name!r}: the train split of modality {m!r} holds NaN "
                       f"or Inf values (its standardisation statistics are not finite); "
                       f"expected finite numbers.")
  return stats


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """config.num_train_steps if > 0; else num_epochs of the train split, clipped to
  [min_train_steps, max_train_steps]."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = math.ceil(config.num_epochs * num_train_examples / config.batch_size)
  steps = max(steps, config.get("min_train_steps", 0))
  if config.get("max_train_steps", -1) > 0:
    steps = min(steps, config.max_train_steps)
  return max(int(steps), 1)


@dataclasses.dataclass(frozen=True)
class Experiment:
  task: tasks.Task
  layout: dict[str, tuple[str, ...]]  # expert -> input keys it reads (models.expert_layout)
  model: nn.Module
  preprocess: Callable
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  selection_metric: str  # the validation metric that selects the best checkpoint
  state: TrainState      # the initial state, replicated on `mesh`
  mesh: Mesh
  stats: Stats | None = None  # the standardisation statistics preprocess uses (None: none)


def build_experiment(config: ml_collections.ConfigDict, dataset: Dataset, *,
                     mesh: Mesh | None = None, stats: Stats | None | str = "train"
                     ) -> Experiment:
  """The run of `config` on `dataset`. `stats`: 'train' computes the standardisation statistics
  of the training split (when config.data.standardize); or pass them (None: no
  standardisation)."""
  mesh = mesh or sharding.make_mesh()
  task = tasks.build_task(config.get("task"), dataset,
                          (config.get("eval") or {}).get("bootstrap_samples", 0))
  selection_metric = task.selection_metric(config.get("selection_metric", ""))
  layout = models.expert_layout(config.model, list(dataset.modalities))
  pmap_axis = sharding.PMAP_AXIS if config.get("parallel", "jit") == "pmap" else None
  model = models.build_model(config.model, dataset.modalities, task.output_shape,
                             batch_axis_name=pmap_axis)
  total_steps = num_train_steps(config, len(dataset.sources["train"]))
  tx = optim.create_optimizer(config.optimizer, total_steps, len(dataset.sources["train"]))
  dtype = models.compute_dtype(config.model)
  if isinstance(stats, str):
    stats = standardization_stats(config, dataset)
  example = {m: jnp.zeros((1,) + tuple(s), jnp.float32) for m, s in dataset.modalities.items()}
  state = create_train_state(model, tx, example, jax.random.key(config.seed), mesh, dtype)
  return Experiment(task=task, layout=layout, model=model,
                    preprocess=make_preprocess(list(dataset.modalities), stats, dtype), tx=tx,
                    schedule=optim.learning_rate_schedule(config.optimizer, total_steps),
                    total_steps=total_steps, selection_metric=selection_metric, state=state,
                    mesh=mesh, stats=stats)
