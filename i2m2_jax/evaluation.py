"""Evaluation over whole splits: exact metrics from padded, masked batches, and the same with a
modality missing.

`evaluate` runs a jitted eval step (`steps.jit_eval_step`) over `input_pipeline.eval_batches`
(every batch the same shape, the last one padded with masked examples, so nothing recompiles),
adds the task's metric sums on the host and gathers the per-example outputs of rank metrics from
every process; the task summarises them. `evaluate_without` evaluates the normalised product of
the experts that do not read a given input, with that input replaced by zeros.
`mean_metrics` averages the results of several test sets (e.g. VQA-VS's out-of-distribution
sets); `evaluate_attribution` says which expert decides the product's predictions
(`attribution`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh
import numpy as np

from i2m2_jax import attribution
from i2m2_jax import compile_options
from i2m2_jax import input_pipeline
from i2m2_jax import metrics
from i2m2_jax import models
from i2m2_jax import sharding
from i2m2_jax import steps
from i2m2_jax.datasets import Dataset
from i2m2_jax.tasks import Task

Layout = Mapping[str, Sequence[str]]  # expert -> the input keys it reads (models.expert_layout)


def evaluate(eval_fn: Callable, state, source, dataset: Dataset, task: Task, batch_size: int,
             mesh: Mesh, reference: Mapping[str, Any] | None = None,
             summarize: Callable | None = None) -> dict[str, Any]:
  """The task's metrics over a whole split (`eval_fn(state, batch)`: a jitted eval step, called
  once per global batch, in order). `reference`: another split's metrics whose choices apply
  (Task.summarize); `summarize(sums, ranked)` replaces task.summarize."""
  sums, ranked = None, []
  for local in input_pipeline.eval_batches(
      source, batch_size=batch_size // jax.process_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), modalities=list(dataset.modalities),
      targets=task.target_keys):
    out = eval_fn(state, sharding.global_batch(local, mesh))
    sums = metrics.add_sums(sums, sharding.to_host(out["sums"]))
    if out["ranked"]:
      ranked.append(sharding.gather_to_host(out["ranked"]))
  gathered = None
  if ranked:
    mask = np.concatenate([r["mask"] for r in ranked]).astype(bool)
    gathered = {k: np.concatenate([r[k] for r in ranked])[mask] for k in ranked[0] if k != "mask"}
  if summarize is not None:
    return summarize(sums, gathered)
  return task.summarize(sums, gathered, reference)


def mean_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The unweighted mean over test sets (name -> `evaluate`'s metrics) of every number they all
  have, nested ones too (e.g. `experts`), except the example `count`; `splits` names them."""
  def mean(values: Sequence[Any]) -> Any:
    if all(isinstance(v, Mapping) for v in values):
      common = [k for k in values[0] if k != "count" and all(k in v for v in values)]
      return {k: m for k in common if (m := mean([v[k] for v in values])) is not None}
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
      return float(np.mean(values))
    return None
  return {**mean(list(results.values())), "splits": list(results)}


def _only_experts(result: Any, used: Sequence[str]) -> Any:
  """`result` with every 'experts' mapping in it (per label too) restricted to `used`."""
  if not isinstance(result, Mapping):
    return result
  return {k: ({n: v for n, v in value.items() if n in used} if k == "experts"
              else _only_experts(value, used)) for k, value in result.items()}


def check_can_do_without(layout: Layout, missing: str, inputs: Sequence[str],
                         kind: str | None = None) -> tuple[bool, ...]:
  """models.experts_without, or ValueError when `missing` is not an input of the data, or when
  every expert reads it (kind 'inter', or 'uni' on that modality)."""
  if missing not in inputs:
    raise ValueError(f"Cannot evaluate without modality {missing!r}: it is not a modality of "
                     f"this data set; expected one of {list(inputs)}.")
  present = models.experts_without(layout, missing)
  if not any(present):
    what = f"config.model.kind={kind!r}" if kind else "This model"
    raise ValueError(
        f"{what} cannot predict without modality {missing!r}: every expert it has "
        f"({list(layout)}) reads {missing!r}. Only a product with an expert that does not "
        f"read it can (i2m2 or intra: the other uni-modal experts; uni on another modality).")
  return present


def evaluate_without(state, missing: str, source, dataset: Dataset, task: Task, layout: Layout,
                     batch_size: int, mesh: Mesh, *, preprocess, kind: str | None = None,
                     eval_fn: Callable | None = None) -> dict[str, Any]:
  """Exact metrics over `source` with input `missing` absent: the normalised product of the
  experts that do not read it (with i2m2, the other uni-modal experts); the missing input is
  replaced by zeros, so its values are never used.

  Returns `evaluate`'s metrics with `experts` restricted to the experts used, plus
  `experts_used`. Raises ValueError (before evaluating anything) when no expert can do without
  `missing`. `eval_fn` is a `steps.jit_eval_step(..., without=True)` to reuse (one compile for
  all modalities).
  """
  present = check_can_do_without(layout, missing, list(dataset.modalities), kind)
  eval_fn = eval_fn or steps.jit_eval_step(task, preprocess, mesh, without=True)
  repl = sharding.replicated(mesh)
  present_arr = jax.device_put(np.asarray(present, dtype=bool), repl)
  keep = jax.device_put({m: np.asarray(m != missing) for m in dataset.modalities}, repl)
  result = evaluate(lambda s, b: eval_fn(s, b, present_arr, keep), state, source, dataset, task,
                    batch_size, mesh)
  used = [n for n, p in zip(layout, present) if p]
  return {**_only_experts(result, used), "experts_used": used}


def evaluate_missing_modalities(state, source, dataset: Dataset, task: Task, layout: Layout,
                                batch_size: int, mesh: Mesh, *, preprocess,
                                kind: str | None = None) -> dict[str, dict[str, Any]]:
  """{modality: metrics without it} for every modality; a model that cannot do without one gets
  {'unavailable': reason} for it instead of a number."""
  eval_fn = None
  out = {}
  for missing in dataset.modalities:
    try:
      check_can_do_without(layout, missing, list(dataset.modalities), kind)
    except ValueError as e:
      out[missing] = {"unavailable": str(e)}
      continue
    eval_fn = eval_fn or steps.jit_eval_step(task, preprocess, mesh, without=True)
    out[missing] = evaluate_without(state, missing, source, dataset, task, layout, batch_size,
                                    mesh, preprocess=preprocess, kind=kind, eval_fn=eval_fn)
  return out


def evaluate_attribution(state, source, dataset: Dataset, task: Task, batch_size: int,
                         mesh: Mesh, *, preprocess) -> dict[str, Any]:
  """Which expert decides the product's predictions over `source` (i2m2_jax/attribution.py);
  the model needs at least two experts."""
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def step(state, batch):
    outputs = state.apply_fn(steps.model_variables(state.params, state.batch_stats),
                             preprocess(batch["inputs"]), train=False)
    return {"sums": attribution.attribution_sums(outputs, batch), "ranked": {}}

  eval_fn = jax.jit(step, in_shardings=(repl, data), out_shardings={"sums": repl, "ranked": repl},
                    compiler_options=compile_options.compiler_options())
  return evaluate(eval_fn, state, source, dataset, task, batch_size, mesh,
                  summarize=lambda sums, _: attribution.summarize(sums))
