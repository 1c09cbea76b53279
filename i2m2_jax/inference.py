"""After training: a run loaded from its workdir alone, as a jitted predictor.

A workdir holds everything a prediction needs: the config (in each checkpoint's meta), the
checkpoints, and two files `train_lib.train_and_evaluate` writes before training (process 0):

* `run_spec.json`: the data set as the run saw it: modality names, per-example shapes and stored
  dtypes (in model order), targets, task, number of classes, label names, provenance;
* `preprocess.npz`: the training split's standardisation statistics (`<modality>.mean`,
  `<modality>.std`; empty when config.data.standardize is off: uint8 is then scaled to [0, 1]).

`load_run(workdir)` restores the checkpoint that results.json's test metrics come from (its
`best_step`; `step=` for another, finished run or not) into the run's model, task and
preprocessing:

  predictor = load_run("runs/digits_i2m2")
  out = predictor({"top": top, "bottom": bottom})  # raw arrays [B, ...], any B
  out["probs"]                 # [B, C]: the product of experts
  out["expert_probs"]["joint"]  # [B, C]: one expert's own softmax

A call takes the arrays as stored in the data set (before standardisation), of any batch size:
it pads them to a power of two (at least `min_batch`; batches above `max_batch` go in chunks),
so a new size rarely compiles anything, and shards the batch over the local devices.
`present` (bool [E] or [B, E], experts in `predictor.experts` order) leaves experts out of the
product; a modality left out of `inputs` is missing: the experts that read it are left out (for
i2m2, the other modalities' uni-modal experts decide).

`evaluate_dataset(predictor, dataset)` gives results.json's metrics of the run on another data
set with the same modalities (`python -m i2m2_jax.evaluate`); `i2m2_jax.export` serialises
`predict` with jax.export.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from i2m2_jax import checkpointing
from i2m2_jax import evaluation
from i2m2_jax import sharding
from i2m2_jax import steps
from i2m2_jax import tasks
from i2m2_jax.datasets import SPLITS, Dataset
from i2m2_jax.experiment import Stats, build_experiment

RUN_SPEC_NAME = "run_spec.json"
PREPROCESS_NAME = "preprocess.npz"
RESULTS_NAME = "results.json"  # as train_lib writes it


# ---------------------------------------------------------------------------------------------
# What a run saw: written at train start, read by load_run


def stored_dtypes(dataset: Dataset, split: str = "train") -> dict[str, str]:
  """The dtype each modality is stored in, read from the split's first example."""
  example = dataset.sources[split][0]
  return {m: np.asarray(example[m]).dtype.name for m in dataset.modalities}


def save_run_spec(workdir: str, dataset: Dataset, task: tasks.Task, stats: Stats | None) -> None:
  """Writes workdir/run_spec.json and workdir/preprocess.npz (module docstring)."""
  dtypes = stored_dtypes(dataset)
  spec = {
      "dataset": dataset.name,
      "modalities": {m: {"shape": list(shape), "dtype": dtypes[m]}
                     for m, shape in dataset.modalities.items()},
      "targets": {k: list(shape) for k, shape in dataset.targets.items()},
      "task": task.name,
      "num_classes": int(dataset.num_classes),
      "label_names": list(dataset.label_names),
      "standardize": stats is not None,
      "data": checkpointing.to_json(dict(dataset.provenance)),
  }
  with open(os.path.join(workdir, RUN_SPEC_NAME), "w") as f:
    json.dump(spec, f, indent=2)
  arrays = {f"{m}.{part}": value for m, (mean, std) in (stats or {}).items()
            for part, value in (("mean", mean), ("std", std))}
  np.savez(os.path.join(workdir, PREPROCESS_NAME), **arrays)


def read_run_spec(workdir: str) -> tuple[dict[str, Any], Stats | None]:
  """(run_spec.json, the standardisation statistics or None) of a run's workdir."""
  path = os.path.join(workdir, RUN_SPEC_NAME)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"No run in {workdir}: the folder does not exist.")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No run in {workdir}: it has no {RUN_SPEC_NAME} (written when a run starts training "
        f"with `python -m i2m2_jax.main --workdir {workdir}`; runs trained before it existed "
        f"must be trained again).")
  with open(path) as f:
    spec = json.load(f)
  stats = None
  if spec["standardize"]:
    with np.load(os.path.join(workdir, PREPROCESS_NAME)) as saved:
      stats = {m: (saved[f"{m}.mean"], saved[f"{m}.std"]) for m in spec["modalities"]}
  return spec, stats


def spec_dataset(spec: Mapping[str, Any]) -> Dataset:
  """The run's data set without its examples: what builds its task and model."""
  return Dataset(name=spec["dataset"],
                 modalities={m: tuple(v["shape"]) for m, v in spec["modalities"].items()},
                 num_classes=spec["num_classes"], sources={s: () for s in SPLITS},
                 targets={k: tuple(v) for k, v in spec["targets"].items()}, task=spec["task"],
                 label_names=tuple(spec["label_names"]), provenance=spec.get("data", {}))


def check_compatible(spec: Mapping[str, Any], dataset: Dataset, task: tasks.Task,
                     workdir: str) -> None:
  """ValueError naming every difference between the run's modalities (names, per-example
  shapes, stored dtypes) and targets and those of `dataset`."""
  want = {m: (tuple(v["shape"]), v["dtype"]) for m, v in spec["modalities"].items()}
  dtypes = stored_dtypes(dataset, "test")
  have = {m: (tuple(shape), dtypes[m]) for m, shape in dataset.modalities.items()}
  problems = [f"modality {m!r} is missing (the run's: shape {list(want[m][0])}, {want[m][1]})"
              for m in want if m not in have]
  problems += [f"modality {m!r} is not one of the run's {list(want)}"
               for m in have if m not in want]
  problems += [f"modality {m!r} has shape {list(have[m][0])}, {have[m][1]}; the run's: shape "
               f"{list(want[m][0])}, {want[m][1]}"
               for m in want if m in have and have[m] != want[m]]
  for key in task.target_keys:
    shape = spec["targets"][key]
    if key not in dataset.targets or list(dataset.targets[key]) != list(shape):
      problems.append(f"target {key!r} of shape {shape} is missing (the data set's targets: "
                      f"{({k: list(v) for k, v in dataset.targets.items()})})")
  if task.name == "multiclass" and dataset.num_classes > spec["num_classes"]:
    problems.append(f"labels go up to {dataset.num_classes - 1}; the run has "
                    f"{spec['num_classes']} classes")
  if problems:
    raise ValueError(f"Data set {dataset.name!r} does not fit the run in {workdir}: "
                     + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------
# The predictor


def predict(state, inputs: Mapping[str, jax.Array], present: jax.Array, *,
            preprocess: Callable) -> dict[str, Any]:
  """The product's and each expert's probabilities [B, *output_shape] of raw inputs (stored
  dtypes); `present` bool [B, E] leaves experts out of the product. Pure: what the predictor
  jits and what `i2m2_jax.export` serialises."""
  outputs = state.apply_fn(steps.model_variables(state.params, state.batch_stats),
                           preprocess(inputs), train=False, present=present)
  return {"probs": jnp.exp(outputs["log_probs"]),
          "expert_probs": {name: jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
                           for name, logits in outputs["expert_logits"].items()}}


def bucket_size(n: int, min_batch: int, num_devices: int) -> int:
  """The padded batch size of n examples: the next power of two, at least min_batch, rounded
  up to a multiple of the device count."""
  size = max(min_batch, 1 << max(n - 1, 0).bit_length())
  return -(-size // num_devices) * num_devices


@dataclasses.dataclass
class Predictor:
  """A trained run, ready to predict (`load_run`; module docstring)."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict  # the config of the run's checkpoint
  spec: dict[str, Any]               # run_spec.json
  task: tasks.Task
  layout: dict[str, tuple[str, ...]]  # expert -> the modalities it reads
  preprocess: Callable
  state: Any                          # the checkpoint's TrainState (no optimiser state)
  mesh: Mesh                          # the local devices
  min_batch: int = 8
  max_batch: int = 1024

  def __post_init__(self):
    repl, data = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    self._predict = jax.jit(functools.partial(predict, preprocess=self.preprocess),
                            in_shardings=(repl, data, data), out_shardings=data)

  @property
  def experts(self) -> list[str]:
    return list(self.layout)

  @property
  def modalities(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """modality -> (per-example shape, stored dtype), in model order."""
    return {m: (tuple(v["shape"]), np.dtype(v["dtype"]))
            for m, v in self.spec["modalities"].items()}

  def __call__(self, inputs: Mapping[str, Any], present: Any = None) -> dict[str, Any]:
    """{'probs': [B, *output_shape], 'expert_probs': {expert: [B, *output_shape]}} as numpy."""
    arrays, missing = self._checked_inputs(inputs)
    size = len(next(iter(arrays.values())))
    mask = self._present(present, size, missing)
    data = sharding.data_sharded(self.mesh)
    chunks = []
    for start in range(0, size, self.max_batch):
      n = min(self.max_batch, size - start)
      padded = bucket_size(n, self.min_batch, self.mesh.size)

      def pad(x, fill=0):
        out = np.full((padded,) + x.shape[1:], fill, x.dtype)
        out[:n] = x[start:start + n]
        return jax.device_put(out, data)

      out = self._predict(self.state, {m: pad(x) for m, x in arrays.items()}, pad(mask, True))
      chunks.append(jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(out)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)

  def _checked_inputs(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every modality as an array of its stored dtype (zeros for a missing one), and the
    missing modalities; ValueError naming what does not fit."""
    modalities = self.modalities
    unknown = [k for k in inputs if k not in modalities]
    if unknown or not inputs:
      raise ValueError(f"inputs {sorted(unknown) if unknown else '{}'} do not fit the run in "
                       f"{self.workdir}: its modalities are {list(modalities)}.")
    arrays = {m: np.asarray(x) for m, x in inputs.items()}
    sizes = {m: (x.shape[0] if x.ndim else None) for m, x in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values() or 0 in sizes.values():
      raise ValueError(f"inputs need one batch axis of the same, non-zero size first; got "
                       f"batch sizes {sizes}.")
    size = next(iter(sizes.values()))
    for m, x in arrays.items():
      shape, dtype = modalities[m]
      if x.shape[1:] != shape:
        raise ValueError(f"inputs[{m!r}] has per-example shape {list(x.shape[1:])}; the run in "
                         f"{self.workdir} expects {list(shape)}.")
      if not np.can_cast(x.dtype, dtype, "same_kind"):
        raise ValueError(f"inputs[{m!r}] is {x.dtype}; the run in {self.workdir} stores {m!r} as "
                         f"{dtype}: give the raw values in that dtype.")
      arrays[m] = x.astype(dtype, copy=False)
    missing = [m for m in modalities if m not in arrays]
    for m in missing:
      shape, dtype = modalities[m]
      arrays[m] = np.zeros((size,) + shape, dtype)
    return {m: arrays[m] for m in modalities}, missing

  def _present(self, present: Any, size: int, missing: Sequence[str]) -> np.ndarray:
    """bool [B, E]: `present` (None: all) and, for each missing modality, the experts that do
    not read it."""
    count = len(self.layout)
    if present is None:
      mask = np.ones((size, count), bool)
    else:
      mask = np.asarray(present, bool)
      if mask.shape not in ((count,), (size, count)):
        raise ValueError(f"present has shape {list(mask.shape)}; expected [{count}] or [{size}, "
                         f"{count}]: one flag per expert of {self.experts}.")
      mask = np.broadcast_to(mask, (size, count))
    for m in missing:
      mask = mask & np.asarray(evaluation.check_can_do_without(
          self.layout, m, list(self.modalities), self.config.model.kind))
    if not mask.any(axis=1).all():
      raise ValueError(f"Some examples have no expert left to predict (present={present!r}, "
                       f"missing modalities {list(missing)}; experts {self.experts}).")
    return mask


def local_mesh() -> Mesh:
  """A data-parallel mesh over this process's devices."""
  return Mesh(np.array(jax.local_devices()), (sharding.DATA_AXIS,))


def load_run(workdir: str, step: int | None = None, *, implementation: str | None = None,
             min_batch: int = 8, max_batch: int = 1024) -> Predictor:
  """The run in `workdir` at its best checkpoint (results.json's `best_step`: a finished run)
  or at `step`. `implementation` overrides config.model.implementation ('plain' for export:
  the fast path's CPU kernels do not serialise). Raises FileNotFoundError naming what is
  missing (folder, run_spec.json, results.json, checkpoints or the step)."""
  workdir = os.fspath(workdir)
  spec, stats = read_run_spec(workdir)
  if step is None:
    results_path = os.path.join(workdir, RESULTS_NAME)
    if not os.path.exists(results_path):
      raise FileNotFoundError(
          f"No finished run in {workdir}: it has no {RESULTS_NAME} (the run has not finished "
          f"training). Finish it with the same command, or load a checkpoint with step=N.")
    with open(results_path) as f:
      step = int(json.load(f)["best_step"])
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {workdir}: {directory} does not exist.")
  with checkpointing.Checkpointer(directory, read_only=True) as ckpt:
    config = ml_collections.ConfigDict(ckpt.restore_meta(step)["config"])
    config.parallel = "jit"  # one device or many, the same function at evaluation
    if "task" in config:  # class weights weigh the training loss only (and need training data)
      config.task.class_weights = ""
    if implementation:
      config.model.implementation = implementation
    mesh = local_mesh()
    exp = build_experiment(config, spec_dataset(spec), mesh=mesh, stats=stats)
    checkpointing.check_same_shapes(exp.state, ckpt.state_metadata(step),
                                    f"step {step} in {directory}")
    state = ckpt.restore(step, exp.state)
  return Predictor(workdir=workdir, step=int(step), config=config, spec=spec, task=exp.task,
                   layout=exp.layout, preprocess=exp.preprocess,
                   state=state.replace(opt_state=None), mesh=mesh, min_batch=min_batch,
                   max_batch=max_batch)


# ---------------------------------------------------------------------------------------------
# Evaluation on a data set


def evaluate_dataset(predictor: Predictor, dataset: Dataset,
                     splits: Sequence[str] = ("val", "test")) -> dict[str, Any]:
  """results.json's metrics of the run on `dataset` (its modalities must be the run's): the task
  metrics of each of `splits` and of the data set's extra test sets (with their mean), and on
  the test split `missing_modality` and, for a product of experts, `attribution`. Batches of the
  run's config.eval_batch_size (rounded up to a multiple of the device count)."""
  check_compatible(predictor.spec, dataset, predictor.task, predictor.workdir)
  task, state, mesh, preprocess = (predictor.task, predictor.state, predictor.mesh,
                                   predictor.preprocess)
  batch_size = -(-predictor.config.eval_batch_size // mesh.size) * mesh.size
  eval_fn = steps.jit_eval_step(task, preprocess, mesh)
  sources = {**{split: dataset.sources[split] for split in splits}, **dataset.extra_test_splits}
  results: dict[str, Any] = {
      name: evaluation.evaluate(eval_fn, state, source, dataset, task, batch_size, mesh)
      for name, source in sources.items()}
  if dataset.extra_test_mean and dataset.extra_test_splits:
    results[dataset.extra_test_mean] = evaluation.mean_metrics(
        {name: results[name] for name in dataset.extra_test_splits})
  test = dataset.sources["test"]
  results["missing_modality"] = evaluation.evaluate_missing_modalities(
      state, test, dataset, task, predictor.layout, batch_size, mesh, preprocess=preprocess,
      kind=predictor.config.model.kind)
  if len(predictor.layout) > 1:
    results["attribution"] = evaluation.evaluate_attribution(
        state, test, dataset, task, batch_size, mesh, preprocess=preprocess)
  return results
