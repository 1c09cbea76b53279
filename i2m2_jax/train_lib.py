"""The training loop: `train_and_evaluate(config, workdir)`.

What a run is made of comes from elsewhere: the task, model, preprocessing, optimiser and initial
state from `experiment.build_experiment`; the pure steps from `steps`; evaluation (missing
modalities included) from `evaluation`; checkpoints, resuming and expert initialisation from
`checkpointing`. This module runs them in order, logs, and handles faults:

* **Kill and resume, bit for bit.** A run killed at any moment (SIGKILL included) and started
  again with the same command resumes from its latest *complete* checkpoint and ends with the
  same parameters and metrics as an uninterrupted run on the same machine and config. Nothing
  but the checkpoint carries state from one step to the next: batch k is a pure function of
  (seed, k, global batch size) (`input_pipeline.train_batches`), the dropout key of step k is
  fold_in(state.dropout_rng, k), the early-stopping history is saved in each checkpoint's JSON
  meta, and the best checkpoint is re-derived from the metrics Orbax stores with each one. The
  logs of the steps run again after the checkpoint are replaced, not repeated
  (`writers.MetricWriter(resume_step=...)`). A run that had finished (results.json written) is
  not run again.
* **Changed config on resume.** Every start records its config (`hparams.json` holds the latest,
  `runs.jsonl` one line per start with the fields that changed). The learning-rate schedule is a
  function of the run's total length: raising `num_train_steps` (or `num_epochs`) on resume
  continues on the longer schedule from the resumed step, so with cosine decay the learning rate
  goes up to the new schedule's value at that step (logged as a warning).
* **SIGTERM** (preemption notice): the current step finishes, a checkpoint of it is saved, and
  `Preempted` is raised (main.py exits with status 143, 128 + SIGTERM). With several processes,
  JAX's preemption sync point makes every process stop at the same step.
* **Non-finite values.** Each step reports whether the loss, each expert's logits and
  gradients, and the updated parameters are finite; anything non-finite raises `NonFiniteError`
  naming the step and the experts before anything of that step is saved.
* **Several processes.** Each process reads its slice of every global batch and its shard of the
  evaluation splits; only process 0 writes logs and results.json; every process takes part in
  Orbax saves and restores.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from i2m2_jax import checkpointing
from i2m2_jax import evaluation
from i2m2_jax import inference
from i2m2_jax import input_pipeline
from i2m2_jax import metrics
from i2m2_jax import models
from i2m2_jax import optim
from i2m2_jax import sharding
from i2m2_jax import steps
from i2m2_jax import tasks
from i2m2_jax import writers
from i2m2_jax.datasets import Dataset, keep_in_memory, load_dataset
from i2m2_jax.experiment import build_experiment, num_train_steps

PARALLEL_MODES = ("jit", "pmap")
RESULTS_NAME = "results.json"
RUNS_NAME = "runs.jsonl"


class NonFiniteError(FloatingPointError):
  pass


class Preempted(RuntimeError):
  """SIGTERM stopped the run after checkpointing `step`; the same command resumes it."""

  def __init__(self, step: int, directory: str):
    self.step = int(step)
    self.directory = directory
    super().__init__(f"Stopped by SIGTERM at step {step} after saving a checkpoint of it in "
                     f"{directory}; run the same command again to resume.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails on settings that cannot work whatever the data, naming the field (the rest is
  checked by build_experiment against the data, also before anything is written)."""
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
  if config.keep_checkpoints < 1:
    raise ValueError(f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1.")
  for expert, run in checkpointing.parse_init_from(config.model.get("init_from", "")).items():
    if not os.path.isdir(checkpointing.checkpoint_dir(run)):
      raise ValueError(f"config.model.init_from: {expert}={run} has no checkpoints (no folder "
                       f"{checkpointing.checkpoint_dir(run)}); expected a finished run's workdir.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None) -> dict[str, Any]:
  """Trains config.model.kind on config.data, keeps the best checkpoint on validation
  (config.selection_metric, in the task's direction) and writes `workdir/results.json`: val and
  test metrics of that checkpoint, test metrics with each modality missing and, for a product of
  experts, which expert decides (`attribution`). Before training it writes what
  `inference.load_run` needs besides the checkpoints (run_spec.json, preprocess.npz). Resumes
  from the latest complete checkpoint (module docstring). `dataset` replaces
  load_dataset(config.data). Raises NonFiniteError, Preempted (after SIGTERM, once saved), and
  ValueError for config or data errors before anything is written."""
  start_time = time.perf_counter()
  validate_config(config)
  is_main = jax.process_index() == 0
  dataset = keep_in_memory(dataset or _load_dataset_in_turn(config.data),
                           config.data.get("in_memory_max_gb", 0.0))
  exp = build_experiment(config, dataset)
  task, mesh, total_steps = exp.task, exp.mesh, exp.total_steps
  mode = task.direction(exp.selection_metric)
  if is_main:
    os.makedirs(workdir, exist_ok=True)

  ckpt, start_step, state, meta = checkpointing.restore_latest_complete(
      config, workdir, exp.state, best_metric=exp.selection_metric, best_mode=mode)
  history = {"best_value": None, "evals_without_gain": 0, **meta.get("history", {})}
  patience = config.get("early_stopping_patience", -1)
  finished = start_step >= total_steps or 0 < patience <= history["evals_without_gain"]
  results_path = os.path.join(workdir, RESULTS_NAME)
  if finished and os.path.exists(results_path):
    ckpt.close()
    logging.info("%s is finished (%s exists); nothing to do.", workdir, RESULTS_NAME)
    with open(results_path) as f:
      return json.load(f)
  if not start_step and config.model.get("init_from"):
    state = checkpointing.load_expert_init(state, config.model.init_from, mesh)
  # From the restored step on (0 for a new run): what was logged after it is replaced.
  writer = writers.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  _record_start(config, workdir, start_step, meta, writer, exp.schedule,
                len(dataset.sources["train"]), is_main)
  if is_main:  # what inference.load_run needs besides the checkpoints (config: in their meta)
    inference.save_run_spec(workdir, dataset, task, exp.stats)

  pmap = config.parallel == "pmap"
  train_fn = (steps.pmapped_train_step(task, exp.preprocess) if pmap
              else steps.jit_train_step(task, exp.preprocess, mesh))
  eval_fn = steps.jit_eval_step(task, exp.preprocess, mesh)
  batches = input_pipeline.train_batches(
      dataset.sources["train"], batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), modalities=list(dataset.modalities),
      targets=task.target_keys)
  host_state = lambda s: sharding.unreplicate_from_pmap(s, mesh) if pmap else s  # noqa: E731
  if pmap:
    state = sharding.replicate_for_pmap(state)

  def evaluate(state, split, reference=None):
    source = (dataset.sources[split] if split in dataset.sources
              else dataset.extra_test_splits[split])
    return evaluation.evaluate(eval_fn, state, source, dataset, task, config.eval_batch_size, mesh,
                               reference)

  steps_per_epoch = max(len(dataset.sources["train"]) // config.batch_size, 1)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0 else
                max(steps_per_epoch, config.get("min_steps_between_evals", 1)))
  ckpt_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every
  log = _TrainLog(task, exp.schedule, writer, total_steps, start_step, config, is_main,
                  sums=meta.get("train_sums"))
  last_saved = start_step or None

  def save(step, state, metrics_=None):
    nonlocal last_saved
    log.flush_pending()  # this step's sums are checked (finite) before it is saved
    writer.flush()       # a checkpoint never exists without the logs up to it
    # The train sums since the last log step go with it, so that a run resumed from a step
    # between log steps (SIGTERM) logs the same window means as an uninterrupted run.
    ckpt.save(step, host_state(state), metrics=metrics_, force=True,
              meta={"config": config.to_dict(), "history": history, "train_sums": log.sums})
    last_saved = step

  stop = _StopSignal()
  step, stopped_early, preempted = start_step, False, False
  try:
    for step in range(start_step + 1, total_steps + 1) if not finished else ():
      local = next(batches)
      batch = sharding.split_for_pmap(local) if pmap else sharding.global_batch(local, mesh)
      state, sums = train_fn(state, batch)
      log.step_dispatched(step, sums, last_saved)  # checks the previous step while this runs

      if step % eval_every == 0 or step == total_steps:
        log.flush_pending()
        val = evaluate(host_state(state), "val")
        writer.write_scalars(step, _flat_metrics("val", val))
        value = float(val[exp.selection_metric])
        if _improved(value, history["best_value"], mode):
          history.update(best_value=value, evals_without_gain=0)
        else:
          history["evals_without_gain"] += 1
        save(step, state, {exp.selection_metric: value})
        log.restart_timer()  # the next interval would include the evaluation
        if 0 < patience <= history["evals_without_gain"]:
          logging.info("Stopping early at step %d: no gain in %s for %d evaluations.", step,
                       exp.selection_metric, patience)
          stopped_early = True
          break
      elif step % ckpt_every == 0:
        save(step, state)
        log.restart_timer()
      if step < total_steps and stop.should_stop(step):
        if last_saved != step:
          save(step, state)
        preempted = True
        break
    log.flush_pending()
  finally:
    stop.close()
    log.close()
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
  best_state = ckpt.restore(best_step, host_state(state))
  val = evaluate(best_state, "val")
  results = {
      "model": config.model.kind,
      "dataset": dataset.name,
      "task": task.name,
      "data": dict(dataset.provenance),
      "selection_metric": exp.selection_metric,
      "steps": int(step),
      "best_step": int(best_step),
      "stopped_early": stopped_early or (finished and start_step < total_steps),
      "seed": int(config.seed),
      "train_examples_per_s": log.examples_per_s(),
      "weight_decay": optim.weight_decay(config.optimizer, len(dataset.sources["train"])),
      "wall_s": None,  # set last: this start's time, data loading and compilation included
      "val": val,
      "test": evaluate(best_state, "test", reference=val),  # at val's choices (operating points)
      **{name: evaluate(best_state, name, reference=val) for name in dataset.extra_test_splits},
  }
  if dataset.extra_test_mean and dataset.extra_test_splits:
    results[dataset.extra_test_mean] = evaluation.mean_metrics(
        {name: results[name] for name in dataset.extra_test_splits})
  if config.model.kind == "uni":
    results["modality"] = config.model.modality
  scalars = _flat_metrics("best_val", results["val"])
  for name in ("test", *dataset.extra_test_splits, dataset.extra_test_mean):
    if name in results:
      scalars.update(_flat_metrics(name, results[name]))
  if config.get("eval_missing_modalities", True):
    results["missing_modality"] = evaluation.evaluate_missing_modalities(
        best_state, dataset.sources["test"], dataset, task, exp.layout, config.eval_batch_size,
        mesh, preprocess=exp.preprocess, kind=config.model.kind)
    for m, r in results["missing_modality"].items():
      if "unavailable" not in r:
        scalars.update(_flat_metrics(f"test_without_{m}", r))
  if config.get("eval_attribution", True) and len(exp.layout) > 1:  # a product of experts
    results["attribution"] = evaluation.evaluate_attribution(
        best_state, dataset.sources["test"], dataset, task, config.eval_batch_size, mesh,
        preprocess=exp.preprocess)
  results["wall_s"] = round(time.perf_counter() - start_time, 2)
  writer.write_scalars(int(step), scalars)  # at the last step: one record per step
  writer.close()
  ckpt.close()
  if is_main:
    with open(results_path, "w") as f:
      json.dump(results, f, indent=2)
  multihost_utils.sync_global_devices("results written")
  return results


# ---------------------------------------------------------------------------------------------
# Pieces of the loop


def _improved(value: float, best: float | None, mode: str) -> bool:
  """A strict gain in the metric's direction; NaN never improves."""
  if np.isnan(value):
    return False
  return best is None or (value > best if mode == tasks.MAX else value < best)


class _TrainLog:
  """Train metrics between log steps, the examples/s of the steps alone, and the progress bar.

  The trainer keeps one step in flight: step n+1 is dispatched (and its batch copied to the
  device) before the host waits for step n's metric sums, so the device never idles on the
  host's per-step work. `step_dispatched` then finishes step n: its sums are checked (fail fast
  on non-finite values) before anything of step n is evaluated or saved.
  """

  def __init__(self, task: tasks.Task, schedule, writer: writers.MetricWriter, total_steps: int,
               start_step: int, config, is_main: bool, sums: Mapping[str, Any] | None = None):
    self._task, self._schedule, self._writer = task, schedule, writer
    self._total, self._batch_size = total_steps, config.batch_size
    self._log_every = max(config.log_every_steps, 1)
    self._pmap = config.parallel == "pmap"
    self._progress = writers.ProgressBar(total_steps, start_step, enabled=is_main)
    self._pending = None   # (step, sums on the device, last saved step) of the dispatched step
    # train sums since the last log step (restored from the checkpoint on resume)
    self._sums = {k: metrics.to_host(v) for k, v in sums.items()} if sums else None
    self._time, self._examples, self._last = 0.0, 0, None

  def step_dispatched(self, step: int, device_sums, last_saved: int | None) -> None:
    self.flush_pending()
    self._pending = (step, device_sums, last_saved)

  def flush_pending(self) -> None:
    """Waits for the dispatched step's sums, checks them, accumulates and logs."""
    if self._pending is None:
      return
    step, device_sums, last_saved = self._pending
    self._pending = None
    sums = sharding.to_host(device_sums)
    if self._pmap:
      sums = jax.tree.map(lambda x: x[0], sums)
    now = time.perf_counter()
    if self._last is not None:  # not the first step (compilation) nor one after evaluation
      self._time += now - self._last
      self._examples += self._batch_size
    self._last = now
    check_finite(step, sums, last_saved)
    self._sums = metrics.add_sums(self._sums, {k: v for k, v in sums.items()
                                               if not k.startswith("nonfinite")})
    if step % self._log_every == 0 or step == self._total:
      scalars = {f"train/{k}": v for k, v in self._task.summarize_train(self._sums).items()}
      scalars["train/learning_rate"] = float(self._schedule(step))
      if self._time:
        scalars["train/examples_per_s"] = self.examples_per_s()
      self._writer.write_scalars(step, scalars)
      self._progress.update(step, {"loss": scalars["train/loss"]})
      self._sums = None
    else:
      self._progress.update(step, None)

  @property
  def sums(self) -> dict[str, np.ndarray] | None:
    return self._sums

  def restart_timer(self) -> None:
    self._last = None

  def examples_per_s(self) -> float | None:
    return self._examples / self._time if self._time else None

  def close(self) -> None:
    self._progress.close()


def check_finite(step: int, sums: Mapping[str, Any], last_checkpoint: int | None = None) -> None:
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


def _record_start(config, workdir: str, start_step: int, meta: Mapping[str, Any],
                  writer: writers.MetricWriter, schedule, num_train: int, is_main: bool) -> None:
  """hparams.json (and TensorBoard's hparams) get this start's config; runs.jsonl one line per
  start with the fields changed since the checkpoint's run. Warns when the learning rate at the
  resumed step differs from the one the interrupted run would have used."""
  writer.write_hparams(_flatten_config(config))
  changed = checkpointing.config_differences(config.to_dict(), meta.get("config") or {},
                                             limit=1000) if start_step else []
  if changed:
    logging.warning("Resuming step %d with a config that differs from the one that saved it: "
                    "%s.", start_step, "; ".join(changed))
    saved = ml_collections.ConfigDict(meta["config"])
    saved_schedule = optim.learning_rate_schedule(saved.optimizer,
                                                  num_train_steps(saved, num_train))
    before, after = float(saved_schedule(start_step)), float(schedule(start_step))
    if not np.isclose(before, after):
      logging.warning("The learning rate at step %d moves from %g to %g: the schedule follows "
                      "the new config (run length, learning rate).", start_step, before, after)
  if is_main:
    with open(os.path.join(workdir, RUNS_NAME), "a") as f:
      f.write(json.dumps({"start_step": int(start_step), "time": time.time(),
                          "changed": changed, "config": checkpointing.to_json(config)}) + "\n")


def _flat_metrics(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
  """'prefix/a/b' -> number for every numeric leaf of a metrics dict (lists of names skipped)."""
  flat = {}
  for k, v in result.items():
    if isinstance(v, Mapping):
      flat.update(_flat_metrics(f"{prefix}/{k}", v))
    elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
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
