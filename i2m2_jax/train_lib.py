"""Training and evaluation: pure steps, their data-parallel forms, and `train_and_evaluate`.

The steps are pure functions of (state, batch). One function, `loss_and_grads`, computes the
loss and gradients; `train_step` (jit over a `Mesh`, batch sharded on the 'data' axis, state
replicated) and `pmap_train_step` (`jax.pmap` with `lax.pmean` of the gradients) both use it, so
the two parallel forms compute the same update. Evaluation is one jitted function over batches
padded to a fixed size with a mask, so the last batch neither drops data nor recompiles.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
from flax.training import train_state
import jax
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
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(num_train_steps, warmup + 1))
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
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
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


def make_preprocess(dataset: Dataset, stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None
                    ) -> Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Inputs as float32 on device: standardised with training statistics when given, else uint8
  scaled to [0, 1]. Data stays in its stored dtype on the host (uint8 moves 4x fewer bytes)."""
  def preprocess(inputs):
    out = {}
    for name in dataset.modalities:
      x = inputs[name]
      if stats is not None:
        mean, std = stats[name]
        x = (x.astype(jnp.float32) - mean) / std
      elif x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
      out[name] = x.astype(jnp.float32)
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


def train_step(state: TrainState, batch: Batch, *, preprocess) -> tuple[TrainState, dict]:
  """One update on a global batch (jit form: XLA inserts the cross-device reductions)."""
  grads, batch_stats, sums = loss_and_grads(state, batch, preprocess=preprocess)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), sums


def pmap_train_step(state: TrainState, batch: Batch, *, preprocess,
                    axis_name: str = "batch") -> tuple[TrainState, dict]:
  """One update on a per-device shard (pmap form): gradients and BatchNorm statistics averaged
  and metric sums added over devices. Equal to `train_step` on the whole batch."""
  grads, batch_stats, sums = loss_and_grads(state, batch, preprocess=preprocess)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  sums = {k: (jax.lax.pmax(v, axis_name) if k.startswith("nonfinite/") else
              jax.lax.psum(v, axis_name)) for k, v in sums.items()}
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), sums


def eval_step(state: TrainState, batch: Batch, *, preprocess, present=None) -> dict:
  """Masked metric sums of one padded batch, plus the per-example probability of class 1 (for
  AUROC/AUPRC of binary tasks). `present` drops experts from the product."""
  outputs = state.apply_fn(_variables(state.params, state.batch_stats),
                           preprocess(batch["inputs"]), train=False, present=present)
  positive = jnp.exp(outputs["log_probs"][:, min(1, outputs["log_probs"].shape[-1] - 1)])
  return {"sums": task.eval_sums(outputs, batch), "positive_prob": positive,
          "label": batch["label"], "mask": batch["mask"]}


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


def jit_train_step(preprocess, mesh: Mesh, step_fn=train_step):
  repl, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, preprocess=preprocess),
                 in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def pmapped_train_step(preprocess, step_fn=pmap_train_step):
  return jax.pmap(functools.partial(step_fn, preprocess=preprocess), axis_name="batch",
                  donate_argnums=0)


def jit_eval_step(preprocess, mesh: Mesh, present=None, step_fn=eval_step):
  repl, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, preprocess=preprocess, present=present),
                 in_shardings=(repl, data),
                 out_shardings={"sums": repl, "positive_prob": data, "label": data, "mask": data})


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
                       mesh: Mesh) -> TrainState:
  """The initial state, created directly replicated on the mesh (shapes from jax.eval_shape)."""
  params_rng, dropout_rng = jax.random.split(rng)

  def init(params_rng):
    variables = model.init({"params": params_rng, "dropout": params_rng}, example_inputs,
                           train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
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
    _check_same_shapes(params[expert], loaded["params"], f"{workdir} ({expert} params)")
    params[expert] = loaded["params"]
    if expert in batch_stats:
      _check_same_shapes(batch_stats[expert], loaded.get("batch_stats") or {},
                         f"{workdir} ({expert} batch_stats)")
      batch_stats[expert] = loaded["batch_stats"]
    logging.info("Initialised expert %s from %s.", expert, workdir)
  repl = replicated(mesh)
  params = jax.device_put(jax.tree.map(np.asarray, params), repl)
  batch_stats = jax.device_put(jax.tree.map(np.asarray, batch_stats), repl)
  # The optimiser starts afresh for the loaded parameters, as in the paper's fine-tuning stage.
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=jax.jit(state.tx.init, out_shardings=repl)(params))


def _check_same_shapes(expected, got, where: str):
  want = jax.tree.map(np.shape, expected)
  have = jax.tree.map(np.shape, got)
  if jax.tree.structure(want) != jax.tree.structure(have) or jax.tree.leaves(want) != jax.tree.leaves(have):
    raise ValueError(f"Checkpoint {where} does not match the model: expected shapes {want}, "
                     f"found {have}.")


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


# ---------------------------------------------------------------------------------------------
# The training loop


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any training on settings that cannot work, naming the field."""
  if config.model.kind not in models.MODEL_KINDS:
    raise ValueError(f"config.model.kind={config.model.kind!r} is unknown; expected one of "
                     f"{list(models.MODEL_KINDS)}.")
  if config.parallel not in PARALLEL_MODES:
    raise ValueError(f"config.parallel={config.parallel!r} is unknown; expected one of "
                     f"{list(PARALLEL_MODES)}.")
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value <= 0 or value % jax.device_count():
      raise ValueError(f"config.{field}={value} must be a positive multiple of the device count "
                       f"({jax.device_count()}).")


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


def _check_finite(step: int, sums: Mapping[str, Any]) -> None:
  if np.isfinite(sums["loss_sum"]):
    return
  culprits = [k.split("/", 1)[1] for k, v in sums.items() if k.startswith("nonfinite/") and v > 0]
  raise NonFiniteError(
      f"Non-finite training loss at step {step}; experts with non-finite logits: "
      f"{culprits or 'none (the combination or the labels)'}. The last good checkpoint is kept; "
      f"lower config.optimizer.learning_rate or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None) -> dict[str, Any]:
  """Trains config.model.kind on config.data, keeps the best checkpoint on validation, and
  writes `workdir/results.json` with val and test metrics of that checkpoint.

  Resumes from the latest checkpoint in `workdir/checkpoints` when there is one. `dataset`
  replaces `load_dataset(config.data)` (tests pass in-memory data).
  """
  validate_config(config)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  dataset = dataset or load_dataset(config.data)
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
  preprocess = make_preprocess(dataset, stats)
  tx = create_optimizer(config.optimizer, total_steps)
  schedule = learning_rate_schedule(config.optimizer, total_steps)
  example = {m: jnp.zeros((1,) + tuple(s), jnp.float32) for m, s in dataset.modalities.items()}
  state = create_train_state(model, tx, example, jax.random.key(config.seed), mesh)

  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints,
                                    best_metric=config.selection_metric, best_mode="max")
  start_step = ckpt.latest_step() or 0
  history = {"best_value": -math.inf, "evals_without_gain": 0}
  if start_step:
    state = ckpt.restore(start_step, state)
    history.update(ckpt.restore_meta(start_step).get("history", {}))
    logging.info("Resumed from step %d in %s.", start_step, workdir)
  elif config.model.get("init_from"):
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

  def save(step, state, metrics_=None):
    ckpt.save(step, unreplicated(state), metrics=metrics_,
              meta={"config": config.to_dict(), "history": history}, force=True)

  progress = writers.ProgressBar(total_steps, start_step, enabled=is_main)
  train_sums, train_time, train_examples = None, 0.0, 0
  step = start_step
  stopped_early = False
  try:
    for step in range(start_step + 1, total_steps + 1):
      t0 = time.perf_counter()
      local = next(batches)
      batch = split_for_pmap(local) if config.parallel == "pmap" else global_batch(local, mesh)
      state, sums = train_fn(state, batch)
      sums = to_host(sums)
      if config.parallel == "pmap":
        sums = jax.tree.map(lambda x: x[0], sums)
      if step > start_step + 1:  # the first step includes compilation
        train_time += time.perf_counter() - t0
        train_examples += config.batch_size
      _check_finite(step, sums)
      train_sums = metrics.add_sums(train_sums, {k: v for k, v in sums.items()
                                                 if not k.startswith("nonfinite/")})
      if step % log_every == 0 or step == total_steps:
        scalars = {f"train/{k}": v for k, v in task.summarize_train(train_sums).items()}
        scalars["train/learning_rate"] = float(schedule(step))
        if train_time:
          scalars["train/examples_per_s"] = train_examples / train_time
        writer.write_scalars(step, scalars)
        progress.update(step, {"loss": scalars["train/loss"]})
        train_sums = None
      else:
        progress.update(step, None)

      if step % eval_every == 0 or step == total_steps:
        val = evaluate(eval_fn, unreplicated(state), dataset.sources["val"], dataset,
                       config.eval_batch_size, mesh)
        writer.write_scalars(step, _flat_metrics("val", val))
        value = val[config.selection_metric]
        if value > history["best_value"]:
          history.update(best_value=float(value), evals_without_gain=0)
        else:
          history["evals_without_gain"] += 1
        save(step, state, {config.selection_metric: float(value)})
        patience = config.get("early_stopping_patience", -1)
        if patience > 0 and history["evals_without_gain"] >= patience:
          logging.info("Stopping early at step %d: no gain in %s for %d evaluations.", step,
                       config.selection_metric, patience)
          stopped_early = True
          break
      elif step % ckpt_every == 0:
        save(step, state)
  finally:
    progress.close()
    ckpt.wait()

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
  writer.write_scalars(int(best_step), {**_flat_metrics("best_val", results["val"]),
                                        **_flat_metrics("test", results["test"])})
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
