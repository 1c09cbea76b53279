"""The pure steps: one update of (state, batch) and the metric sums of an evaluation batch, with
their jitted (Mesh + NamedSharding) and pmapped forms.

One function, `loss_and_grads`, computes the loss and the gradients of both parallel forms:
`train_step` runs under jit on the global batch (XLA inserts the cross-device reductions) and
`pmap_train_step` runs once per device on its shard, adding the loss weights and the gradients
over devices, with BatchNorm statistics taken over the whole global batch (the model is built
with the pmap axis, `models.build_model(batch_axis_name=...)`). Both compute the same update.
The task (`i2m2_jax.tasks`) owns the loss and the metric sums; the steps never look at targets.

Every train step also reports whether each expert's logits and gradients and the updated state
are finite, so that the trainer can stop before saving anything non-finite.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from i2m2_jax import compile_options
from i2m2_jax import optim
from i2m2_jax import sharding
from i2m2_jax.tasks import Task

Batch = Mapping[str, Any]


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the dropout key (a raw uint32 key, so
  Orbax stores it like any array)."""
  batch_stats: Any = None
  dropout_rng: jax.Array | None = None


def model_variables(params, batch_stats) -> dict[str, Any]:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def loss_and_grads(state: TrainState, batch: Batch, *, task: Task, preprocess,
                   axis_name: str | None = None) -> tuple[Any, Any, dict]:
  """The one loss/gradient function of both parallel forms.

  Returns (grads, new batch_stats, metric sums). The loss is the task's, over the global batch:
  under pmap (`axis_name`) its weights are added over devices first, so each device's gradient
  is its share of the global one and their sum is the gradient of the whole batch.
  """
  dropout_rng = jax.random.fold_in(state.dropout_rng, state.step)
  inputs = preprocess(batch["inputs"])

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        model_variables(params, state.batch_stats), inputs, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    numerators, weights = task.loss_terms(outputs["log_probs"], batch)
    weights = jax.lax.stop_gradient(weights)
    if axis_name is not None:
      weights = jax.lax.psum(weights, axis_name)
    loss = jnp.sum(numerators / jnp.maximum(weights, 1e-12))
    return loss, (outputs, updates)

  (loss, (outputs, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  count = jnp.sum(batch["mask"], dtype=jnp.float32)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  sums = {**task.train_sums(outputs, batch), "loss_sum": loss * count}
  for name, logits in outputs["expert_logits"].items():
    sums[f"nonfinite/{name}"] = optim.any_nonfinite(logits)
  return grads, updates.get("batch_stats", state.batch_stats), sums


def finiteness_flags(grads, new_state: TrainState) -> dict[str, jax.Array]:
  """Whether each expert's gradient (`nonfinite_grads/<expert>`: NaN/Inf or an overflowing
  squared norm, see optim.nonfinite_norm) and the updated parameters and BatchNorm statistics
  (`nonfinite_params`: NaN/Inf) are non-finite; checked before any save."""
  flags = {}
  if isinstance(grads, Mapping) and grads:
    for name, g in grads.items():
      flags[f"nonfinite_grads/{name}"] = optim.nonfinite_norm(g)
  else:
    flags["nonfinite_grads/all"] = optim.nonfinite_norm(grads)
  flags["nonfinite_params"] = optim.any_nonfinite((new_state.params, new_state.batch_stats))
  return flags


def train_step(state: TrainState, batch: Batch, *, task: Task, preprocess
               ) -> tuple[TrainState, dict]:
  """One update on a global batch (jit form)."""
  grads, batch_stats, sums = loss_and_grads(state, batch, task=task, preprocess=preprocess)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {**sums, **finiteness_flags(grads, new_state)}


def pmap_train_step(state: TrainState, batch: Batch, *, task: Task, preprocess,
                    axis_name: str = sharding.PMAP_AXIS) -> tuple[TrainState, dict]:
  """One update on a per-device shard (pmap form): gradients added over devices (each device's
  is its share of the global batch's), metric sums added too. Equal to `train_step` on the
  whole batch."""
  grads, batch_stats, sums = loss_and_grads(state, batch, task=task, preprocess=preprocess,
                                            axis_name=axis_name)
  grads = jax.lax.psum(grads, axis_name)
  # Equal on every device already when BatchNorm reduces over the axis; kept in step either way.
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  sums = {**sums, **finiteness_flags(grads, new_state)}
  sums = {k: (jax.lax.pmax(v, axis_name) if k.startswith("nonfinite") else
              jax.lax.psum(v, axis_name)) for k, v in sums.items()}
  return new_state, sums


def eval_step(state: TrainState, batch: Batch, present=None,
              keep: Mapping[str, jax.Array] | None = None, *, task: Task, preprocess) -> dict:
  """The task's masked metric sums of one padded batch, and its per-example ranking outputs
  (with the mask) when it has any.

  `present` (bool [E], model order) leaves experts out of the product; `keep` ({input: bool})
  replaces the inputs with keep False by zeros, so their values (NaN included) cannot matter.
  Both may be traced arguments: one compilation serves every missing modality."""
  inputs = preprocess(batch["inputs"])
  if keep is not None:
    inputs = {m: jnp.where(keep[m], x, jnp.zeros_like(x)) for m, x in inputs.items()}
  outputs = state.apply_fn(model_variables(state.params, state.batch_stats), inputs, train=False,
                           present=present)
  ranked = task.ranking_outputs(outputs, batch)
  return {"sums": task.eval_sums(outputs, batch),
          "ranked": {**ranked, "mask": batch["mask"]} if ranked else {}}


# ---------------------------------------------------------------------------------------------
# Compiled forms


def _options(xla_defaults: bool, extra_options: Mapping[str, Any] | None):
  options = None if xla_defaults else compile_options.compiler_options()
  return {**(options or {}), **extra_options} if extra_options else options


def jit_train_step(task: Task, preprocess, mesh: Mesh, step_fn=train_step,
                   xla_defaults: bool = False, extra_options: Mapping[str, Any] | None = None):
  """The jitted train step (state donated). `xla_defaults`: without the CPU compile options
  (the benchmark's straightforward baseline); `extra_options`: XLA options added on top (the
  benchmark's option-by-option study)."""
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(functools.partial(step_fn, task=task, preprocess=preprocess),
                 in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0,
                 compiler_options=_options(xla_defaults, extra_options))


def pmapped_train_step(task: Task, preprocess, step_fn=pmap_train_step):
  return jax.pmap(functools.partial(step_fn, task=task, preprocess=preprocess),
                  axis_name=sharding.PMAP_AXIS, donate_argnums=0)


def jit_eval_step(task: Task, preprocess, mesh: Mesh, *, without: bool = False,
                  present=None, xla_defaults: bool = False,
                  extra_options: Mapping[str, Any] | None = None):
  """The jitted eval step: `fn(state, batch)`, or with `without=True`
  `fn(state, batch, present, keep)` (missing inputs as traced arguments, see eval_step)."""
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  options = _options(xla_defaults, extra_options)
  outputs = {"sums": repl, "ranked": data}
  if without:
    return jax.jit(functools.partial(eval_step, task=task, preprocess=preprocess),
                   in_shardings=(repl, data, repl, repl), out_shardings=outputs,
                   compiler_options=options)
  return jax.jit(functools.partial(eval_step, task=task, preprocess=preprocess, present=present),
                 in_shardings=(repl, data), out_shardings=outputs, compiler_options=options)
