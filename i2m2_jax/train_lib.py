"""Training and evaluation: pure steps, their data-parallel forms, and `train_and_evaluate`.

The steps are pure functions of (state, batch). One function, `loss_and_grads`, computes the
loss and gradients; `train_step` (jit over a `Mesh`, batch sharded on the 'data' axis, state
replicated) and `pmap_train_step` (`jax.pmap` with `lax.pmean` of the gradients) both use it, so
the two parallel forms compute the same update. Evaluation is one jitted function over batches
padded to a fixed size with a mask, so the last batch neither drops data nor recompiles.

Faults and restarts (`train_and_evaluate`):

* **Kill and resume, bit for bit.** A run killed at any moment (SIGKILL included) and started
  again with the same command resumes from its latest *complete* checkpoint and ends with the
  same parameters and metrics as an uninterrupted run on the same machine and config. Nothing
  but the checkpoint carries state from one step to the next:
  - the input pipeline is a grain `MapDataset` indexed by step (`input_pipeline.train_batches`):
    batch k is a pure function of (seed, k, global batch size), so the step saved in the
    checkpoint *is* the iterator state and saving grain's iterator state would add nothing (the
    pipeline keeps no other state: no worker processes, no stateful shuffle buffer);
  - the dropout key of step k is fold_in(state.dropout_rng, k), with dropout_rng in the state;
  - the early-stopping history is saved in each checkpoint's JSON meta;
  - the best checkpoint is re-derived from the metrics Orbax stores with each checkpoint.
  Orbax writes a step into a temporary directory and renames it when complete, so a save cut
  short is never picked up. A step directory that is incomplete anyway (no metadata file, or
  arrays that cannot be read) is skipped: the run resumes from the previous complete step, says
  so in the log, and moves the broken steps to `workdir/checkpoints_discarded/`. A checkpoint
  whose arrays do not match the model fails before training (`CheckpointMismatchError`).
  metrics.jsonl is appended to, so the steps between the last checkpoint and a kill appear twice.
* **SIGTERM** (preemption notice): the current step finishes, a checkpoint of it is saved, and
  `Preempted` is raised (main.py logs it and exits with status 143, 128 + SIGTERM); running the
  same command again resumes. With several processes, JAX's preemption sync point makes every
  process stop at the same step (`multihost_utils.reached_preemption_sync_point`).
* **Non-finite values.** Each step reports whether the loss, each expert's logits and
  gradients, and the updated parameters are finite; anything non-finite raises `NonFiniteError`
  naming the step and the experts before anything of that step is saved, so every checkpoint
  holds finite parameters.
* **Several processes.** Run the same command on every host (see main.py). Each process reads
  its slice of every global batch and its shard of the evaluation splits; arrays are assembled
  with `jax.make_array_from_process_local_data`; only process 0 writes logs and results.json;
  every process takes part in Orbax saves and restores.
* **Missing modalities.** `evaluate_without` evaluates the product of the experts that do not
  read a given modality; results.json gets `missing_modality` with test metrics per modality.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import flax
from flax.training import train_state
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from i2m2_jax import checkpointing
from i2m2_jax import input_pipeline
from i2m2_jax import metrics
from i2m2_jax import models
from i2m2_jax import task
from i2m2_jax import writers
from i2m2_jax.datasets import Dataset, load_dataset

Batch = Mapping[str, Any]
PARALLEL_MODES = ("jit", "pmap")
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the dropout key (a raw uint32 key, so
  Orbax stores it like any array)."""
  batch_stats: Any = None
  dropout_rng: jax.Array | None = None


# ---------------------------------------------------------------------------------------------
# Optimiser and input scaling


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  lr = opt.learning_rate
  warmup = max(int(opt.get("warmup_steps", 0)), 0)
  if opt.schedule == "cosine":
    if not warmup:  # (optax warns about a zero-length warm-up)
      return optax.cosine_decay_schedule(lr, max(num_train_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_train_steps, warmup + 1))
  if opt.schedule == "constant":
    return (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                  optax.constant_schedule(lr)], [warmup])
            if warmup else optax.constant_schedule(lr))
  raise ValueError(f"config.optimizer.schedule={opt.schedule!r} is unknown; expected one of "
                   f"['cosine', 'constant'].")


def create_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.GradientTransformation:
  """Gradient clipping by global norm over all experts, then the optimiser.

  SGD and RMSprop add L2 weight decay to the gradient after clipping, as PyTorch does; AdamW
  decays decoupled from the gradient.
  """
  schedule = learning_rate_schedule(opt, num_train_steps)
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == "adamw":
    chain.append(optax.adamw(schedule, weight_decay=opt.weight_decay))
  elif opt.name in ("sgd", "rmsprop"):
    if opt.weight_decay:
      chain.append(optax.add_decayed_weights(opt.weight_decay))
    if opt.name == "sgd":
      chain.append(optax.sgd(schedule, momentum=opt.momentum or None))
    else:  # PyTorch's RMSprop defaults
      chain.append(optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False))
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r} is unknown; expected one of "
                     f"['adamw', 'sgd', 'rmsprop'].")
  return optax.chain(*chain)


def make_preprocess(dataset: Dataset, stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
                    dtype=jnp.float32) -> Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Inputs as `dtype` (the model's compute dtype) on device: standardised in float32 with
  training statistics when given, else uint8 scaled to [0, 1]. Data stays in its stored dtype on
  the host (uint8 moves 4x fewer bytes)."""
  def preprocess(inputs):
    out = {}
    for name in dataset.modalities:
      x = inputs[name]
      if stats is not None:
        mean, std = stats[name]
        x = (x.astype(jnp.float32) - mean) / std
      elif x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
      out[name] = x.astype(jnp.float32).astype(dtype)
    return out
  return preprocess


# ---------------------------------------------------------------------------------------------
# Pure steps


def _variables(params, batch_stats):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def loss_and_grads(state: TrainState, batch: Batch, *, preprocess) -> tuple[Any, Any, dict]:
  """The one loss/gradient function of both parallel forms.

  Returns (grads, new batch_stats, metric sums). The loss is the mean cross-entropy of the
  product of experts over the (global, under jit) batch.
  """
  dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)
  inputs = preprocess(batch["inputs"])

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        _variables(params, state.batch_stats), inputs, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    return task.cross_entropy(outputs["log_probs"], batch["label"], batch["mask"]), (outputs, updates)

  (_, (outputs, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return grads, updates.get("batch_stats", state.batch_stats), task.train_sums(outputs, batch)


def _float_leaves(tree) -> list[jax.Array]:
  return [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def _concatenated(leaves: Sequence[jax.Array]) -> jax.Array:
  """The flat float32 leaves as one vector (an empty one for none)."""
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate(leaves) if len(leaves) > 1 else leaves[0]


def _self_dot(flat: jax.Array) -> jax.Array:
  """sum(v * v) of a flat float32 vector, as one dot product.

  XLA rewrites a reduction of a concatenation (and a sum of per-leaf reductions) into one
  reduction per leaf, each a separate kernel to compile: ~60 per norm for the AV-MNIST I2M2
  gradients. A dot product of the concatenation stays one kernel; with the flags below and
  clip_by_global_norm that took the train step from 916 to 666 kernels and its XLA compile from
  5.43 to 4.95 s on 2 CPU cores (benchmark config, batch 40), step time unchanged. HIGHEST
  precision: a GPU would otherwise take float32 dots in TF32."""
  return jnp.dot(flat, flat, precision=lax.Precision.HIGHEST)


def squared_norm(tree) -> jax.Array:
  """Squared L2 norm of the floating leaves of `tree` (float32 scalar; see _self_dot)."""
  return _self_dot(_concatenated(_float_leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (same rule: updates * max_norm / norm when norm >= max_norm),
  with the norm computed by squared_norm: one kernel instead of one per leaf."""

  def update_fn(updates, state, params=None):
    del params
    g_norm = jnp.sqrt(squared_norm(updates))
    trigger = g_norm < max_norm
    updates = jax.tree.map(
        lambda t: lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _nonfinite(x: jax.Array) -> jax.Array:
  return jnp.logical_not(jnp.isfinite(x)).astype(jnp.float32)


def _any_nonfinite(tree) -> jax.Array:
  """1.0 if any leaf of `tree` holds a NaN or Inf, else 0.0 (float32 scalar).

  Exact: x * 0 is 0 for every finite x and NaN otherwise, so the dot product of those zeros
  cannot overflow; one kernel for all leaves (see _self_dot). The product with zero is taken
  after the concatenation: taken per leaf, XLA kept it as one kernel per leaf (112 of the
  AV-MNIST I2M2 train step's kernels; XLA compile 5.01 -> 4.75 s together with the training
  stem's single loop, fast/ops.py _stem_fwd)."""
  return _nonfinite(_self_dot(_concatenated(_float_leaves(tree)) * 0))


def _nonfinite_norm(tree) -> jax.Array:
  """1.0 if the squared L2 norm of `tree` is not finite, else 0.0: a leaf holds a NaN or Inf,
  or the norm overflows float32 (an element above ~1.8e19 or a sum above ~3.4e38), which also
  defeats gradient clipping."""
  return _nonfinite(squared_norm(tree))


def finiteness_flags(grads, new_state: TrainState) -> dict[str, jax.Array]:
  """Whether each expert's gradient (`nonfinite_grads/<expert>`: NaN/Inf or an overflowing
  squared norm, see _nonfinite_norm) and the updated parameters and BatchNorm statistics
  (`nonfinite_params`: NaN/Inf) are non-finite; checked before any save."""
  flags = {}
  if isinstance(grads, Mapping) and grads:
    for name, g in grads.items():
      flags[f"nonfinite_grads/{name}"] = _nonfinite_norm(g)
  else:
    flags["nonfinite_grads/all"] = _nonfinite_norm(grads)
  flags["nonfinite_params"] = _any_nonfinite((new_state.params, new_state.batch_stats))
  return flags


def train_step(state: TrainState, batch: Batch, *, preprocess) -> tuple[TrainState, dict]:
  """One update on a global batch (jit form: XLA inserts the cross-device reductions)."""
  grads, batch_stats, sums = loss_and_grads(state, batch, preprocess=preprocess)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {**sums, **finiteness_flags(grads, new_state)}


def pmap_train_step(state: TrainState, batch: Batch, *, preprocess,
                    axis_name: str = "batch") -> tuple[TrainState, dict]:
  """One update on a per-device shard (pmap form): gradients and BatchNorm statistics averaged
  and metric sums added over devices. Equal to `train_step` on the whole batch."""
  grads, batch_stats, sums = loss_and_grads(state, batch, preprocess=preprocess)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  sums = {**sums, **finiteness_flags(grads, new_state)}
  sums = {k: (jax.lax.pmax(v, axis_name) if k.startswith("nonfinite") else
              jax.lax.psum(v, axis_name)) for k, v in sums.items()}
  return new_state, sums


def _eval_outputs(state: TrainState, inputs, batch: Batch, present) -> dict:
  outputs = state.apply_fn(_variables(state.params, state.batch_stats), inputs, train=False,
                           present=present)
  positive = jnp.exp(outputs["log_probs"][:, min(1, outputs["log_probs"].shape[-1] - 1)])
  return {"sums": task.eval_sums(outputs, batch), "positive_prob": positive,
          "label": batch["label"], "mask": batch["mask"]}


def eval_step(state: TrainState, batch: Batch, *, preprocess, present=None) -> dict:
  """Masked metric sums of one padded batch, plus the per-example probability of class 1 (for
  AUROC/AUPRC of binary tasks). `present` drops experts from the product."""
  return _eval_outputs(state, preprocess(batch["inputs"]), batch, present)


def eval_step_without(state: TrainState, batch: Batch, present: jax.Array,
                      keep: Mapping[str, jax.Array], *, preprocess) -> dict:
  """`eval_step` with modalities missing: the inputs of each modality m with keep[m] False are
  replaced by zeros (so their values, NaN included, cannot matter) and the experts with
  present False (bool [E], in model order) are left out of the product. Both are traced
  arguments: one compilation serves every missing modality."""
  inputs = preprocess(batch["inputs"])
  inputs = {m: jnp.where(keep[m], x, jnp.zeros_like(x)) for m, x in inputs.items()}
  return _eval_outputs(state, inputs, batch, present)


# ---------------------------------------------------------------------------------------------
# Devices, sharding and compiled steps


def make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: Batch, mesh: Mesh) -> Batch:
  """This process's batch as part of a global array sharded over every device of every process."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


# Evaluation on CPU leaves convolutions to XLA's default (Eigen) implementation instead of its
# library fusions (YNNPACK), which keep matrix products only. Eval steps of the AV-MNIST I2M2 on
# 2 cores, interleaved in one process: plain 520 -> 434 ms at batch 256 and 81 -> 65 ms at 40;
# fast 190 -> 175 and 23.6 -> 22.9 ms (without its channel padding, which only served to reach
# the library). Training keeps the library: there it won at batch 40 (fast 89.5 vs 95.1 ms,
# plain 283 vs 293 ms) and lost at 256 (fast 757 vs 704, plain 1970 vs 1833 ms).
_CPU_EVAL_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this XLA takes these compile options (experimental ones may come and go)."""
  try:
    jax.jit(lambda: 0, compiler_options=dict(options)).lower().compile()
    return True
  except jax.errors.JaxRuntimeError:
    logging.warning("XLA does not accept the compile options %s; using its defaults.", options)
    return False


# XLA's CPU loop fusions emitted by its classic LLVM emitters instead of its newer MLIR fusion
# emitters: about a third less compile time, at about the same step speed. AV-MNIST I2M2 on
# 2 cores, separate processes, twice each (experiments/benchmark.py): fast train step first
# step 6.4 -> 4.7-5.0 s at batch 40 and 9.0 -> 6.5 s at 256 (XLA compile 5.0 -> 3.4 s and
# 7.1 -> 4.6 s), steps 1-2 % slower at batch 40 and 3 % at 256; plain modules 8.5 -> 5.1 s
# (XLA 7.0 -> 3.6 s) with 4 % faster steps. CPU training is mostly tests, debugging and small
# runs, where the compile dominates; long runs go to accelerators, which these options leave
# alone.
_CPU_FAST_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(train: bool = True) -> dict[str, Any] | None:
  """XLA options of the jitted steps; other backends than CPU keep their defaults.

  On CPU, LLVM's optimisation level 1 instead of 2: most of a step's compile time is LLVM's
  passes, and level 1 compiled the AV-MNIST I2M2 train step 0.4-0.7 s (batch 40) and 1.5-1.9 s
  (batch 256) faster on 2 cores with step times equal within noise (level 0 halved compile time
  but ran 2.5x slower); and XLA's classic loop emitters (_CPU_FAST_COMPILE_OPTIONS). Evaluation
  also leaves convolutions to XLA's own (_CPU_EVAL_OPTIONS). Options this XLA does not know are
  dropped with a warning."""
  if jax.default_backend() != "cpu":
    return None
  options = {"xla_backend_optimization_level": 1}
  if _accepted(tuple(_CPU_FAST_COMPILE_OPTIONS.items())):
    options.update(_CPU_FAST_COMPILE_OPTIONS)
  if not train and _accepted(tuple(_CPU_EVAL_OPTIONS.items())):
    options.update(_CPU_EVAL_OPTIONS)
  return options


def jit_train_step(preprocess, mesh: Mesh, step_fn=train_step, xla_defaults: bool = False):
  """The jitted train step (state donated). `xla_defaults`: without compiler_options (the
  benchmark's straightforward baseline)."""
  repl, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, preprocess=preprocess),
                 in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0,
                 compiler_options=None if xla_defaults else compiler_options())


def pmapped_train_step(preprocess, step_fn=pmap_train_step):
  return jax.pmap(functools.partial(step_fn, preprocess=preprocess), axis_name="batch",
                  donate_argnums=0)


def jit_eval_step(preprocess, mesh: Mesh, present=None, step_fn=eval_step,
                  xla_defaults: bool = False):
  """The jitted eval step; `xla_defaults` as jit_train_step."""
  repl, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, preprocess=preprocess, present=present),
                 in_shardings=(repl, data),
                 out_shardings={"sums": repl, "positive_prob": data, "label": data, "mask": data},
                 compiler_options=None if xla_defaults else compiler_options(train=False))


def jit_eval_without_step(preprocess, mesh: Mesh, step_fn=eval_step_without):
  repl, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, preprocess=preprocess),
                 in_shardings=(repl, data, repl, repl),
                 out_shardings={"sums": repl, "positive_prob": data, "label": data, "mask": data},
                 compiler_options=compiler_options(train=False))


def split_for_pmap(local_batch: Batch) -> Batch:
  """[B, ...] -> [local devices, B / local devices, ...]."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), local_batch)


def replicate_for_pmap(state: TrainState) -> TrainState:
  return flax.jax_utils.replicate(jax.device_get(state))


def unreplicate_from_pmap(state: TrainState, mesh: Mesh) -> TrainState:
  return jax.device_put(jax.device_get(flax.jax_utils.unreplicate(state)), replicated(mesh))


def to_host(tree):
  """Host numpy copy of replicated (possibly multi-process) arrays."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def gather_to_host(tree):
  """Host numpy copy of data-sharded arrays, gathered from every process."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ---------------------------------------------------------------------------------------------
# State creation


def create_train_state(model, tx, example_inputs: Mapping[str, Any], rng: jax.Array,
                       mesh: Mesh, compute_dtype=jnp.float32) -> TrainState:
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
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(params_rng)


def load_expert_init(state: TrainState, init_from: str, mesh: Mesh) -> TrainState:
  """Replaces experts' parameters (and BatchNorm statistics) with those of other runs' best
  checkpoints, from config.model.init_from = "expert=workdir,...". Shapes must match."""
  params = flax.core.unfreeze(jax.device_get(state.params))
  batch_stats = flax.core.unfreeze(jax.device_get(state.batch_stats or {}))
  for expert, workdir in checkpointing.parse_init_from(init_from).items():
    if expert not in params:
      raise ValueError(f"config.model.init_from names expert {expert!r}, which this model does "
                       f"not have; its experts are {sorted(params)}.")
    loaded = checkpointing.restore_expert_params(workdir, expert)
    _check_same_shapes(params[expert], loaded["params"],
                       f"config.model.init_from: {workdir} ({expert} params)")
    params[expert] = loaded["params"]
    if expert in batch_stats:
      _check_same_shapes(batch_stats[expert], loaded.get("batch_stats") or {},
                         f"config.model.init_from: {workdir} ({expert} batch_stats)")
      batch_stats[expert] = loaded["batch_stats"]
    logging.info("Initialised expert %s from %s.", expert, workdir)
  repl = replicated(mesh)
  params = jax.device_put(jax.tree.map(np.asarray, params), repl)
  batch_stats = jax.device_put(jax.tree.map(np.asarray, batch_stats), repl)
  # The optimiser starts afresh for the loaded parameters, as in the paper's fine-tuning stage.
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=jax.jit(state.tx.init, out_shardings=repl)(params))


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model built from the config."""


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """'a/b/c' path -> (shape, dtype) of every array leaf of `tree` (arrays, ShapeDtypeStructs or
  Orbax array metadata); dicts, sequences, dataclasses and NamedTuples give the same paths."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    try:
      dtype = np.dtype(dtype).name
    except TypeError:
      dtype = str(dtype)
    out["/".join(_key_name(k) for k in path)] = (shape, dtype)
  return out


def describe_shape_differences(expected: Mapping[str, Any], found: Mapping[str, Any],
                               limit: int = 6) -> list[str]:
  """Human-readable differences between two `leaf_shapes` results (model vs checkpoint)."""
  def fmt(entry):
    return f"{entry[0]} {entry[1]}"
  diffs = []
  # Parameters first: the optimiser state mirrors them.
  for key in sorted(set(expected) | set(found), key=lambda k: (not k.startswith("params"), k)):
    if key not in found:
      diffs.append(f"{key} is missing in the checkpoint (model: {fmt(expected[key])})")
    elif key not in expected:
      diffs.append(f"{key} {fmt(found[key])} is in the checkpoint but not in the model")
    elif tuple(expected[key]) != tuple(found[key]):
      diffs.append(f"{key} has {fmt(found[key])} in the checkpoint but {fmt(expected[key])} in "
                   f"the model")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


def _check_same_shapes(expected, got, where: str):
  diffs = describe_shape_differences(leaf_shapes(expected), leaf_shapes(got))
  if diffs:
    raise CheckpointMismatchError(f"Checkpoint {where} does not match the model: "
                                  f"{'; '.join(diffs)}.")


def _flat_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(now: Mapping[str, Any], saved: Mapping[str, Any],
                       limit: int = 8) -> list[str]:
  """'field: now X, checkpoint Y' for every config field that differs (model fields first)."""
  now = _flat_dict(checkpointing.to_json(now))
  saved = _flat_dict(checkpointing.to_json(saved))
  absent = "<absent>"
  keys = [k for k in sorted(set(now) | set(saved)) if now.get(k, absent) != saved.get(k, absent)]
  keys.sort(key=lambda k: (not k.startswith("model."), not k.startswith("data."), k))
  diffs = [f"config.{k}: now {now.get(k, absent)!r}, checkpoint {saved.get(k, absent)!r}"
           for k in keys]
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(eval_fn, state: TrainState, source, dataset: Dataset, batch_size: int,
             mesh: Mesh) -> dict[str, Any]:
  """Exact metrics over a whole split: padded batches, masked sums added on the host. Binary
  tasks also get `auroc` and `auprc` of the product's probability of class 1."""
  sums, scores = None, []
  for local in input_pipeline.eval_batches(
      source, batch_size=batch_size // jax.process_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), modalities=list(dataset.modalities)):
    out = eval_fn(state, global_batch(local, mesh))
    sums = metrics.add_sums(sums, to_host(out["sums"]))
    if dataset.num_classes == 2:
      scores.append(gather_to_host({k: out[k] for k in ("positive_prob", "label", "mask")}))
  result = metrics.summarize(sums)
  if scores:
    mask = np.concatenate([s["mask"] for s in scores])
    result.update(metrics.binary_auc_metrics(
        np.concatenate([s["positive_prob"] for s in scores])[mask],
        np.concatenate([s["label"] for s in scores])[mask]))
  return result


def experts_without(expert_names: Sequence[str], modalities: Sequence[str], missing: str,
                    kind: str | None = None) -> tuple[bool, ...]:
  """Which experts (in model order) can still predict when modality `missing` is absent: those
  that do not read it (`models.expert_modalities`). ValueError when none can (kind 'inter', or
  'uni' on that modality) or when `missing` is not a modality of the data."""
  modalities = list(modalities)
  if missing not in modalities:
    raise ValueError(f"Cannot evaluate without modality {missing!r}: it is not a modality of "
                     f"this data set; expected one of {modalities}.")
  present = tuple(missing not in models.expert_modalities(n, modalities) for n in expert_names)
  if not any(present):
    what = f"config.model.kind={kind!r}" if kind else "This model"
    raise ValueError(
        f"{what} cannot predict without modality {missing!r}: every expert it has "
        f"({list(expert_names)}) reads {missing!r}. Only a product with an expert that does not "
        f"read it can (i2m2 or intra: the other uni-modal experts; uni on another modality).")
  return present


def model_expert_names(state: TrainState) -> list[str]:
  """The experts of a state's MultiModalClassifier, in model order."""
  apply_fn = getattr(state.apply_fn, "module_apply", state.apply_fn)  # models.apply_in_dtype
  module = getattr(apply_fn, "__self__", None)
  if module is not None and hasattr(module, "experts"):
    return [name for name, _ in module.experts]
  return list(state.params)


def evaluate_without(state: TrainState, missing: str, source, dataset: Dataset,
                     batch_size: int, mesh: Mesh, *, preprocess, kind: str | None = None,
                     eval_fn=None) -> dict[str, Any]:
  """Exact metrics over `source` with modality `missing` absent: the normalised product of the
  experts that do not read it (with i2m2, the other uni-modal experts); the missing modality's
  inputs are replaced by zeros, so its values are never used.

  Returns `evaluate`'s metrics, with `experts` restricted to the experts used, plus
  `experts_used`. Raises ValueError (before evaluating anything) when no expert can do without
  `missing`. `eval_fn` is a `jit_eval_without_step` to reuse (one compile for all modalities).
  """
  names = model_expert_names(state)
  present = experts_without(names, list(dataset.modalities), missing, kind)
  eval_fn = eval_fn or jit_eval_without_step(preprocess, mesh)
  repl = replicated(mesh)
  present_arr = jax.device_put(np.asarray(present, dtype=bool), repl)
  keep = jax.device_put({m: np.asarray(m != missing) for m in dataset.modalities}, repl)
  result = evaluate(lambda s, b: eval_fn(s, b, present_arr, keep), state, source, dataset,
                    batch_size, mesh)
  used = [n for n, p in zip(names, present) if p]
  result["experts"] = {n: v for n, v in result["experts"].items() if n in used}
  result["experts_used"] = used
  return result


def evaluate_missing_modalities(state: TrainState, source, dataset: Dataset, batch_size: int,
                                mesh: Mesh, *, preprocess, kind: str | None = None
                                ) -> dict[str, dict[str, Any]]:
  """{modality: metrics without it} for every modality; a model that cannot do without one gets
  {'unavailable': reason} for it instead of a number."""
  eval_fn = None
  out = {}
  for missing in dataset.modalities:
    try:
      experts_without(model_expert_names(state), list(dataset.modalities), missing, kind)
    except ValueError as e:
      out[missing] = {"unavailable": str(e)}
      continue
    eval_fn = eval_fn or jit_eval_without_step(preprocess, mesh)
    out[missing] = evaluate_without(state, missing, source, dataset, batch_size, mesh,
                                    preprocess=preprocess, kind=kind, eval_fn=eval_fn)
  return out


# ---------------------------------------------------------------------------------------------
# The training loop


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any training on settings that cannot work, naming the field."""
  if config.model.kind not in models.MODEL_KINDS:
    raise ValueError(f"config.model.kind={config.model.kind!r} is unknown; expected one of "
                     f"{list(models.MODEL_KINDS)}.")
  models.compute_dtype(config.model)  # raises on an unknown name
  if config.parallel not in PARALLEL_MODES:
    raise ValueError(f"config.parallel={config.parallel!r} is unknown; expected one of "
                     f"{list(PARALLEL_MODES)}.")
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value <= 0 or value % jax.device_count():
      raise ValueError(f"config.{field}={value} must be a positive multiple of the device count "
                       f"({jax.device_count()}).")


def validate_config_for_dataset(config: ml_collections.ConfigDict, dataset: Dataset) -> None:
  """Checks the modality names the config uses against the data set's, naming the field."""
  modalities = list(dataset.modalities)
  for field in ("encoders", "encoder_kwargs", "joint_encoder_kwargs"):
    entries = config.model.get(field) or {}
    unknown = [k for k in entries if k not in modalities]
    if unknown:
      raise ValueError(f"config.model.{field} names modality {unknown[0]!r}, which data set "
                       f"{dataset.name!r} does not have; expected one of {modalities}.")
  if config.model.kind == "uni" and config.model.get("modality", "") not in modalities:
    raise ValueError(f"config.model.modality={config.model.get('modality', '')!r} is not a "
                     f"modality of data set {dataset.name!r}; expected one of {modalities}.")


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = math.ceil(config.num_epochs * num_train_examples / config.batch_size)
  steps = max(steps, config.get("min_train_steps", 0))
  if config.get("max_train_steps", -1) > 0:
    steps = min(steps, config.max_train_steps)
  return max(int(steps), 1)


class NonFiniteError(FloatingPointError):
  pass


class Preempted(RuntimeError):
  """SIGTERM stopped the run after checkpointing `step`; the same command resumes it."""

  def __init__(self, step: int, directory: str):
    self.step = int(step)
    self.directory = directory
    super().__init__(f"Stopped by SIGTERM at step {step} after saving a checkpoint of it in "
                     f"{directory}; run the same command again to resume.")


def _check_finite(step: int, sums: Mapping[str, Any], last_checkpoint: int | None = None) -> None:
  """Raises NonFiniteError if the step's loss, gradients or updated parameters are not finite."""
  bad_loss = not np.isfinite(sums["loss_sum"])
  bad_grads = [k.split("/", 1)[1] for k, v in sums.items()
               if k.startswith("nonfinite_grads/") and v > 0]
  bad_params = float(sums.get("nonfinite_params", 0.0)) > 0
  if not (bad_loss or bad_grads or bad_params):
    return
  culprits = [k.split("/", 1)[1] for k, v in sums.items() if k.startswith("nonfinite/") and v > 0]
  what = ("training loss" if bad_loss else "gradient" if bad_grads else
          "parameters after the update")
  none = "none (the combination or the labels)" if bad_loss else "none"
  message = f"Non-finite {what} at step {step}; experts with non-finite logits: {culprits or none}"
  if bad_grads:
    message += f"; experts with non-finite gradients: {bad_grads}"
  kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint
          else "no checkpoint had been written yet")
  raise NonFiniteError(
      f"{message}. Nothing of step {step} was saved; {kept}. Lower "
      f"config.optimizer.learning_rate (or set config.optimizer.grad_clip_norm) or check the "
      f"input data.")


class _StopSignal:
  """SIGTERM -> stop after the current step. One process: a Python signal handler. Several:
  JAX's preemption sync point (its notifier catches SIGTERM on any process and all processes
  agree on the step to stop at), or, with JAX's preemption service disabled, the handler plus an
  all-gather of the flag at every step."""

  def __init__(self):
    self._requested = False
    self._jax_sync = jax.process_count() > 1
    self._gather = False
    self._installed, self._previous = False, None
    if not self._jax_sync:
      self._install()

  def _install(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training outside the main thread: SIGTERM will not save a checkpoint.")
      return
    self._previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, self._handle)
    self._installed = True

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if self._jax_sync:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError as e:  # jax_enable_preemption_service is off
        logging.warning("%s; SIGTERM is shared between processes by an all-gather per step.", e)
        self._jax_sync, self._gather = False, True
        self._install()
    if self._gather:
      return bool(np.any(multihost_utils.process_allgather(np.asarray(self._requested))))
    return self._requested

  def close(self):
    """Puts back the SIGTERM handler found at start (the default one if it was set outside
    Python)."""
    if self._installed:
      signal.signal(signal.SIGTERM,
                    self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False


def _load_dataset_in_turn(data_config) -> Dataset:
  """load_dataset on process 0 first (it may build the data), then on the others, so that no two
  processes build the same TFDS data set at once; a failure on process 0 stops them all."""
  if jax.process_count() == 1:
    return load_dataset(data_config)
  dataset, error = None, None
  if jax.process_index() == 0:
    try:
      dataset = load_dataset(data_config)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
  if error is not None:
    raise error
  if not int(ok):
    raise RuntimeError("Process 0 failed to load the data set (see its log); stopping.")
  return dataset if dataset is not None else load_dataset(data_config)


def _all_finite(tree) -> bool:
  return not float(to_host(jax.jit(_any_nonfinite)(tree)))


def _saved_config(ckpt: checkpointing.Checkpointer, step: int) -> dict[str, Any]:
  try:
    return ckpt.restore_meta(step).get("config") or {}
  except Exception:  # pylint: disable=broad-except
    return {}


def _open_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints,
                                    best_metric=config.selection_metric, best_mode="max")


def _move_aside(directory: str, steps: Sequence[int], workdir: str) -> str:
  """Moves step directories out of the checkpoint directory (process 0; all processes wait)."""
  dest = epath.Path(workdir) / "checkpoints_discarded"
  if jax.process_index() == 0:
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s in steps:
      src = epath.Path(directory) / str(s)
      if src.exists():
        target, n = dest / f"{s}-{stamp}", 0
        while target.exists():
          n += 1
          target = dest / f"{s}-{stamp}-{n}"
        src.rename(target)
  multihost_utils.sync_global_devices("broken checkpoints moved aside")
  return str(dest)


def restore_latest_complete(config: ml_collections.ConfigDict, workdir: str, state: TrainState
                            ) -> tuple[checkpointing.Checkpointer, int, TrainState, dict]:
  """Opens workdir's checkpoints and restores the latest complete one into `state`'s structure.

  Returns (checkpointer, step, state, meta); step 0 (and `state` untouched) when there is none.
  A step that cannot be read (missing metadata, truncated or missing array files, non-finite
  parameters) is skipped, and the run resumes from the previous one; such steps after it are
  moved to `workdir/checkpoints_discarded/` (they would block later saves), and the log says
  so. Raises CheckpointMismatchError, naming the arrays and the config fields that differ, when
  a readable checkpoint does not fit the model; RuntimeError when checkpoints exist but none can
  be restored (nothing is moved then).
  """
  ckpt = _open_checkpointer(config, workdir)
  wanted = leaf_shapes(state)
  broken: dict[int, str] = {}
  start, restored, meta = 0, state, {}
  for step in reversed(ckpt.all_steps()):
    try:
      saved = leaf_shapes(ckpt.state_metadata(step))
    except Exception as e:  # pylint: disable=broad-except
      broken[step] = f"{type(e).__name__}: {str(e)[:200].rstrip('.')}"
      continue
    diffs = describe_shape_differences(wanted, saved)
    if diffs:
      config_diffs = config_differences(config.to_dict(), _saved_config(ckpt, step))
      ckpt.close()
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {ckpt.directory} does not match the model and "
          f"optimiser built from the config. Config fields that differ from the run that wrote "
          f"it: {'; '.join(config_diffs) or 'none'}. Arrays that differ: {'; '.join(diffs)}. A "
          f"workdir holds one model: use another --workdir, or that run's config.")
    try:
      candidate = ckpt.restore(step, state)
      candidate_meta = ckpt.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      broken[step] = f"{type(e).__name__}: {str(e)[:200].rstrip('.')}"
      continue
    if not _all_finite((candidate.params, candidate.batch_stats, candidate.opt_state)):
      broken[step] = "non-finite parameters"
      continue
    start, restored, meta = step, candidate, candidate_meta
    break
  if broken and not start:
    ckpt.close()
    raise RuntimeError(
        f"Checkpoints exist in {ckpt.directory} but none can be restored: "
        + "; ".join(f"step {s}: {why}" for s, why in sorted(broken.items()))
        + ". Move the directory away to start afresh.")
  agreed = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
  if agreed != start:
    raise RuntimeError(f"Process {jax.process_index()} would resume from step {start} but "
                       f"process 0 from step {agreed}: the checkpoint directory reads differently.")
  stale = sorted(s for s in set(broken) | set(ckpt.unfinished_steps) if s > start)
  if stale:
    directory = ckpt.directory
    ckpt.close()
    moved_to = _move_aside(directory, stale, workdir)
    reasons = "; ".join(f"step {s}: {broken.get(s, 'unfinished (no Orbax metadata)')}"
                        for s in stale)
    logging.warning("Resuming from step %d, the latest complete checkpoint in %s: later step(s) "
                    "%s are incomplete or unreadable (%s) and were moved to %s.", start,
                    directory, stale, reasons, moved_to)
    ckpt = _open_checkpointer(config, workdir)
  elif start:
    logging.info("Resumed from step %d in %s.", start, ckpt.directory)
  if start and meta.get("config"):
    changed = config_differences(config.to_dict(), meta["config"])
    if changed:  # e.g. another seed or batch size: the run is no longer the interrupted one
      logging.warning("Resuming step %d with a config that differs from the one that saved it: "
                      "%s.", start, "; ".join(changed))
  return ckpt, start, restored, meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None) -> dict[str, Any]:
  """Trains config.model.kind on config.data, keeps the best checkpoint on validation, and
  writes `workdir/results.json` with val and test metrics of that checkpoint (and test metrics
  with each modality missing, `missing_modality`, unless config.eval_missing_modalities is
  False).

  Resumes from the latest complete checkpoint in `workdir/checkpoints` when there is one (see
  the module docstring for what makes the resumed run identical to an uninterrupted one).
  `dataset` replaces `load_dataset(config.data)` (tests pass in-memory data). Raises
  `NonFiniteError` on a non-finite loss, gradient or parameter, `Preempted` after SIGTERM (once
  the checkpoint is saved), and ValueError for config or data errors, before training.
  """
  validate_config(config)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  dataset = dataset or _load_dataset_in_turn(config.data)
  validate_config_for_dataset(config, dataset)
  # The splits read again and again (every step, every evaluation) are kept in host memory
  # when they are small enough (config.data.in_memory_max_gb).
  max_gb = config.data.get("in_memory_max_gb", 0.0)
  dataset = dataclasses.replace(dataset, sources={
      split: input_pipeline.in_memory(source, max_gb, f"{dataset.name}/{split}")
      if split in ("train", "val") else source for split, source in dataset.sources.items()})
  modalities = list(dataset.modalities)
  model = models.build_model(config.model, dataset.modalities, dataset.num_classes)
  mesh = make_mesh()

  num_train = len(dataset.sources["train"])
  total_steps = num_train_steps(config, num_train)
  steps_per_epoch = max(num_train // config.batch_size, 1)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every
  log_every = max(config.log_every_steps, 1)

  stats = (input_pipeline.standardization_stats(dataset.sources["train"], modalities, seed=config.seed)
           if config.data.get("standardize", True) else None)
  for m, (mean, std) in (stats or {}).items():
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      raise ValueError(f"Data set {dataset.name!r}: the train split of modality {m!r} holds NaN "
                       f"or Inf values (its standardisation statistics are not finite); "
                       f"expected finite numbers.")
  dtype = models.compute_dtype(config.model)
  preprocess = make_preprocess(dataset, stats, dtype)
  tx = create_optimizer(config.optimizer, total_steps)
  schedule = learning_rate_schedule(config.optimizer, total_steps)
  example = {m: jnp.zeros((1,) + tuple(s), jnp.float32) for m, s in dataset.modalities.items()}
  state = create_train_state(model, tx, example, jax.random.key(config.seed), mesh, dtype)

  ckpt, start_step, state, meta = restore_latest_complete(config, workdir, state)
  history = {"best_value": -math.inf, "evals_without_gain": 0}
  history.update(meta.get("history", {}))
  if not start_step and config.model.get("init_from"):
    state = load_expert_init(state, config.model.init_from, mesh)

  writer = writers.MetricWriter(workdir, enabled=is_main)
  if not start_step:
    writer.write_hparams(_flatten_config(config))
  train_fn = (pmapped_train_step(preprocess) if config.parallel == "pmap"
              else jit_train_step(preprocess, mesh))
  eval_fn = jit_eval_step(preprocess, mesh)
  batches = input_pipeline.train_batches(
      dataset.sources["train"], batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), modalities=modalities)
  if config.parallel == "pmap":
    state = replicate_for_pmap(state)

  def unreplicated(state):
    return unreplicate_from_pmap(state, mesh) if config.parallel == "pmap" else state

  last_saved = start_step or None

  def save(step, state, metrics_=None):
    nonlocal last_saved
    ckpt.save(step, unreplicated(state), metrics=metrics_,
              meta={"config": config.to_dict(), "history": history}, force=True)
    last_saved = step

  progress = writers.ProgressBar(total_steps, start_step, enabled=is_main)
  stop = _StopSignal()
  train_sums, train_time, train_examples = None, 0.0, 0
  step = start_step
  stopped_early, preempted = False, False
  # One step in flight: step n+1 is dispatched (and its batch copied to the device) before the
  # host waits for step n's metric sums, so the device never idles on the host's per-step work.
  # Step n's sums are checked (fail fast on non-finite values) before anything of step n is
  # evaluated or saved: `finish` runs on them first.
  pending = None  # (step, metric sums still on the device) of the last dispatched step
  last_finished = None  # time.perf_counter() when the previous step's sums arrived

  def finish(done_step, device_sums):
    nonlocal train_sums, train_time, train_examples, last_finished
    sums = to_host(device_sums)
    if config.parallel == "pmap":
      sums = jax.tree.map(lambda x: x[0], sums)
    now = time.perf_counter()
    if last_finished is not None:  # not the first step (compilation) nor one after evaluation
      train_time += now - last_finished
      train_examples += config.batch_size
    last_finished = now
    _check_finite(done_step, sums, last_saved)  # before anything of this step is saved
    train_sums = metrics.add_sums(train_sums, {k: v for k, v in sums.items()
                                               if not k.startswith("nonfinite")})
    if done_step % log_every == 0 or done_step == total_steps:
      scalars = {f"train/{k}": v for k, v in task.summarize_train(train_sums).items()}
      scalars["train/learning_rate"] = float(schedule(done_step))
      if train_time:
        scalars["train/examples_per_s"] = train_examples / train_time
      writer.write_scalars(done_step, scalars)
      progress.update(done_step, {"loss": scalars["train/loss"]})
      train_sums = None
    else:
      progress.update(done_step, None)

  def finish_pending():
    nonlocal pending
    if pending is not None:
      finish(*pending)
      pending = None

  try:
    for step in range(start_step + 1, total_steps + 1):
      local = next(batches)
      batch = split_for_pmap(local) if config.parallel == "pmap" else global_batch(local, mesh)
      state, sums = train_fn(state, batch)
      finish_pending()  # the previous step, while this one runs
      pending = (step, sums)

      if step % eval_every == 0 or step == total_steps:
        finish_pending()
        val = evaluate(eval_fn, unreplicated(state), dataset.sources["val"], dataset,
                       config.eval_batch_size, mesh)
        writer.write_scalars(step, _flat_metrics("val", val))
        value = val[config.selection_metric]
        if value > history["best_value"]:
          history.update(best_value=float(value), evals_without_gain=0)
        else:
          history["evals_without_gain"] += 1
        save(step, state, {config.selection_metric: float(value)})
        last_finished = None  # the next interval would include the evaluation
        patience = config.get("early_stopping_patience", -1)
        if patience > 0 and history["evals_without_gain"] >= patience:
          logging.info("Stopping early at step %d: no gain in %s for %d evaluations.", step,
                       config.selection_metric, patience)
          stopped_early = True
          break
      elif step % ckpt_every == 0:
        finish_pending()
        save(step, state)
        last_finished = None
      if step < total_steps and stop.should_stop(step):
        finish_pending()
        if last_saved != step:
          save(step, state)
        preempted = True
        break
  finally:
    stop.close()
    progress.close()
    ckpt.wait()
    writer.flush()

  if preempted:
    writer.close()
    directory = ckpt.directory
    ckpt.close()
    multihost_utils.sync_global_devices("preempted")
    raise Preempted(step, directory)

  # Test metrics come from the checkpoint that was best on validation.
  best_step = ckpt.best_step() or ckpt.latest_step()
  best_state = ckpt.restore(best_step, unreplicated(state))
  results = {
      "model": config.model.kind,
      "dataset": dataset.name,
      "steps": int(step),
      "best_step": int(best_step),
      "stopped_early": stopped_early,
      "seed": int(config.seed),
      "train_examples_per_s": train_examples / train_time if train_time else None,
      "val": evaluate(eval_fn, best_state, dataset.sources["val"], dataset, config.eval_batch_size, mesh),
      "test": evaluate(eval_fn, best_state, dataset.sources["test"], dataset, config.eval_batch_size, mesh),
  }
  if config.model.kind == "uni":
    results["modality"] = config.model.modality
  scalars = {**_flat_metrics("best_val", results["val"]), **_flat_metrics("test", results["test"])}
  if config.get("eval_missing_modalities", True):
    results["missing_modality"] = evaluate_missing_modalities(
        best_state, dataset.sources["test"], dataset, config.eval_batch_size, mesh,
        preprocess=preprocess, kind=config.model.kind)
    for m, r in results["missing_modality"].items():
      if "unavailable" not in r:
        scalars.update(_flat_metrics(f"test_without_{m}",
                                     {k: v for k, v in r.items() if k != "experts_used"}))
  writer.write_scalars(int(best_step), scalars)
  writer.close()
  ckpt.close()
  if is_main:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  multihost_utils.sync_global_devices("results written")
  return results


def _flat_metrics(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
  flat = {}
  for k, v in result.items():
    if isinstance(v, Mapping):
      flat.update({f"{prefix}/{k}/{name}": float(x) for name, x in v.items()})
    else:
      flat[f"{prefix}/{k}"] = float(v)
  return flat


def _flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, Mapping):
        yield from walk(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}", v if isinstance(v, (int, float, str, bool)) else str(v)
  return dict(walk(config.to_dict(), ""))
