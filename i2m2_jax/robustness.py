"""Robustness to noise in one modality, with MultiBench's protocol and measures (Liang et al.,
MultiBench, NeurIPS 2021 Datasets and Benchmarks; pliang279/MultiBench: robustness/ and
eval_scripts/robustness.py).

For each modality and each noise level 0.0, 0.1, ..., 1.0, only that modality of the evaluated
split is corrupted and the task's main metric (accuracy; AUROC for multilabel, the VQA score for
soft labels) of a trained run is measured. The corruptions act on the raw inputs, before the
run's preprocessing; by the example's rank and stored dtype, unless overridden
('top=gaussian,static=feature_drop'):

  kind          default for               what level p does
  gaussian      vectors, float images     adds p * std * N(0, 1), std per feature (last axis) of
                                          the evaluated split (uint8 is rounded and clipped)
  salt_pepper   uint8 images [H, W, C]    sets each pixel (all channels) with probability p to
                                          the split's minimum or maximum (one or the other with
                                          equal chance)
  time_drop     sequences [T, F]          zeroes each time step with probability p (random drop)
                                          and each run of 3 consecutive steps starting at a step
                                          with probability p (structured drop)
  feature_drop  (tabular data)            zeroes each entry with probability p

Level 0 leaves the inputs exactly as they are. Seeded: the noise of example i of modality m is
drawn from a key folded from (seed, m's name, i) alone, so it does not depend on the model, the
batch size or the devices: every model of a comparison sees the same corrupted examples. The
draw is the same at every level (a level scales the Gaussian noise and moves the drop
thresholds: what is dropped at 0.3 is dropped at 0.6 too), which keeps each curve smooth.

Measures of a curve f over the levels (MultiBench): the area under it (trapezoids over [0, 1];
MultiBench's *relative robustness* before its min-max normalisation, which `relative_robustness`
applies across the compared models) and the *effective robustness* against a baseline curve b,
the late-fusion joint model (MultiBench's LF: `inter`): sum over levels of (f - f(0)) - (b -
b(0)); positive when f loses less than the baseline.

Not included from MultiBench's sets: its image colour, rotation, flip and crop corruptions, the
Gaussian noise it adds to time series, and the swapping of adjacent tabular entries.
"""
from __future__ import annotations

import itertools
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from i2m2_jax import compile_options
from i2m2_jax import evaluation
from i2m2_jax import inference
from i2m2_jax import input_pipeline
from i2m2_jax import models
from i2m2_jax import sharding
from i2m2_jax import steps

LEVELS = tuple(round(0.1 * i, 1) for i in range(11))
KINDS = ("gaussian", "salt_pepper", "time_drop", "feature_drop")
WINDOW = 3  # time steps of a structured drop (MultiBench's time-series m)
Shapes = Mapping[str, tuple[Sequence[int], Any]]  # modality -> (example shape, stored dtype)


# ---------------------------------------------------------------------------------------------
# Which corruption for which modality


def default_kind(shape: Sequence[int], dtype) -> str:
  if len(shape) == 2:
    return "time_drop"
  if len(shape) == 3 and np.dtype(dtype) == np.uint8:
    return "salt_pepper"
  return "gaussian"


def noise_kinds(spec: Any, modalities: Shapes) -> dict[str, str]:
  """modality -> kind: the default by rank and dtype, or `spec` ('modality=kind,...' or a
  mapping) where it names one."""
  overrides = models.config_mapping(spec, "--robustness_kinds")
  for m, kind in overrides.items():
    if m not in modalities:
      raise ValueError(f"--robustness_kinds names modality {m!r}; the modalities are "
                       f"{list(modalities)}.")
    if kind not in KINDS:
      raise ValueError(f"--robustness_kinds: {m}={kind!r} is unknown; expected one of "
                       f"{list(KINDS)}.")
  return {m: overrides.get(m) or default_kind(shape, dtype)
          for m, (shape, dtype) in modalities.items()}


class NoiseScale(NamedTuple):
  """Per feature (last axis) of one modality over the evaluated split (a pytree)."""
  std: np.ndarray
  low: np.ndarray
  high: np.ndarray


def noise_scale(source, modality: str, chunk_size: int = 1024) -> NoiseScale:
  """The std (input_pipeline.standardization_stats: up to 10,000 examples, seed 0; 1 for a
  constant feature), minimum and maximum of each feature of `modality` in `source`."""
  _, std = input_pipeline.standardization_stats(source, [modality])[modality]
  low = high = None
  for start in range(0, len(source), chunk_size):
    x = input_pipeline.gather_batch(source, range(start, min(len(source), start + chunk_size)),
                                    [modality], ())["inputs"][modality]
    x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
    low = x.min(0) if low is None else np.minimum(low, x.min(0))
    high = x.max(0) if high is None else np.maximum(high, x.max(0))
  if std.ndim == 0:  # a scalar modality
    low, high = low.reshape(()), high.reshape(())
  return NoiseScale(std=std.astype(np.float32), low=low.astype(np.float32),
                    high=high.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Corruptions (traced)


def example_keys(seed: int, modality: str, indices: jax.Array) -> jax.Array:
  """One key per example index, from (seed, the modality's name, index) alone."""
  base = jax.random.fold_in(jax.random.key(seed), zlib.crc32(modality.encode()) & 0x7FFFFFFF)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def _corrupt_example(x: jax.Array, key: jax.Array, kind: str, level: jax.Array,
                     scale: NoiseScale) -> jax.Array:
  xf = x.astype(jnp.float32)
  if kind == "gaussian":
    out = xf + level * scale.std * jax.random.normal(key, x.shape)
  elif kind == "salt_pepper":
    hit_key, salt_key = jax.random.split(key)
    where = x.shape[:-1] + (1,) if x.ndim == 3 else x.shape  # a pixel: all its channels
    hit = jax.random.uniform(hit_key, where) < level
    salt = jax.random.uniform(salt_key, where) < 0.5
    out = jnp.where(hit, jnp.where(salt, scale.high, scale.low), xf)
  elif kind == "time_drop":
    if x.ndim < 1:
      raise ValueError("time_drop needs examples with a time axis first ([T, ...]).")
    drop_key, start_key = jax.random.split(key)
    steps_ = x.shape[0]
    dropped = jax.random.uniform(drop_key, (steps_,)) < level
    starts = jax.random.uniform(start_key, (steps_,)) < level
    for shift in range(WINDOW):  # a run starting at t covers t .. t + WINDOW - 1
      dropped = dropped | jnp.concatenate([jnp.zeros((shift,), bool), starts[:steps_ - shift]])
    out = jnp.where(dropped.reshape((steps_,) + (1,) * (x.ndim - 1)), 0.0, xf)
  elif kind == "feature_drop":
    out = jnp.where(jax.random.uniform(key, x.shape) < level, 0.0, xf)
  else:
    raise ValueError(f"Unknown corruption {kind!r}; expected one of {list(KINDS)}.")
  if jnp.issubdtype(x.dtype, jnp.integer):
    info = jnp.iinfo(x.dtype)
    out = jnp.clip(jnp.round(out), info.min, info.max)
  return out.astype(x.dtype)


def corrupt(x: jax.Array, kind: str, level, keys: jax.Array, scale: NoiseScale) -> jax.Array:
  """A batch [B, ...] of one modality's raw inputs corrupted at `level` (module docstring),
  example b with keys[b]; same shape and dtype."""
  level = jnp.asarray(level, jnp.float32)
  return jax.vmap(lambda xi, key: _corrupt_example(xi, key, kind, level, scale))(x, keys)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _jit_corrupted_eval_step(task, preprocess, mesh, modality: str, kind: str,
                             scale: NoiseScale, seed: int):
  """steps.eval_step with `modality` corrupted: fn(state, batch, level, offset), offset the
  index of the batch's first example (level and offset traced: one compilation per modality)."""
  def step(state, batch, level, offset):
    x = batch["inputs"][modality]
    keys = example_keys(seed, modality, offset + jnp.arange(x.shape[0]))
    inputs = {**batch["inputs"], modality: corrupt(x, kind, level, keys, scale)}
    return steps.eval_step(state, {**batch, "inputs": inputs}, task=task, preprocess=preprocess)

  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl, repl),
                 out_shardings={"sums": repl, "ranked": data},
                 compiler_options=compile_options.compiler_options())


def evaluate_robustness(predictor, source, *, kinds: Any = None,
                        levels: Sequence[float] = LEVELS, seed: int = 0,
                        scales: Mapping[str, NoiseScale] | None = None,
                        in_memory_max_gb: float = 4.0) -> dict[str, Any]:
  """The curves of a loaded run (`inference.load_run`) on `source` (a split with the run's
  modalities): {'metric', 'levels', 'seed', 'modalities': {m: {'kind', 'values' (the metric
  per level), 'auc'}}}. `scales` (noise_scale per modality) default to those of `source`;
  `source` is read into memory once when it is at most in_memory_max_gb GiB."""
  source = input_pipeline.in_memory(source, in_memory_max_gb, "robustness")
  dataset = inference.spec_dataset(predictor.spec)
  kinds = noise_kinds(kinds, predictor.modalities)
  task, mesh = predictor.task, predictor.mesh
  batch_size = -(-predictor.config.eval_batch_size // mesh.size) * mesh.size
  result: dict[str, Any] = {"metric": task.main_metric, "levels": list(levels), "seed": seed,
                            "modalities": {}}
  for m, kind in kinds.items():
    scale = (scales or {}).get(m) or noise_scale(source, m)
    step = _jit_corrupted_eval_step(task, predictor.preprocess, mesh, m, kind, scale, seed)
    values = []
    for level in levels:
      batches = itertools.count()
      metrics = evaluation.evaluate(
          lambda state, batch, level=level, batches=batches: step(
              state, batch, np.float32(level), np.int32(next(batches) * batch_size)),
          predictor.state, source, dataset, task, batch_size, mesh)
      values.append(float(metrics[task.main_metric]))
    result["modalities"][m] = {"kind": kind, "values": values,
                               "auc": area_under_curve(levels, values)}
  return result


# ---------------------------------------------------------------------------------------------
# Measures


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
  """Trapezoids under the metric-vs-level curve (MultiBench's relative robustness before its
  normalisation)."""
  x, y = np.asarray(levels, np.float64), np.asarray(values, np.float64)
  return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def effective_robustness(values: Sequence[float], baseline: Sequence[float]) -> float:
  """MultiBench's effective robustness: sum over levels of (f - f(0)) - (b - b(0))."""
  f, b = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
  return float(np.sum((f - f[0]) - (b - b[0])))


def relative_robustness(areas: Mapping[str, float]) -> dict[str, float]:
  """MultiBench's relative robustness of each model: its area min-max normalised over the
  compared models (1: the most robust, 0: the least; NaN when all are equal)."""
  values = np.asarray(list(areas.values()), np.float64)
  span = values.max() - values.min() if values.size else 0.0
  return {k: float((v - values.min()) / span) if span > 0 else float("nan")
          for k, v in areas.items()}
