"""Checkpoints: one Orbax v0 `CheckpointManager` that keeps the latest N saves plus the best one.

Each checkpoint `<directory>/<step>/` is a Composite of two items:

* `state`: the trainer's pytree (params, batch_stats, opt_state, step, rng, ...), `StandardSave`;
* `meta`: a JSON dict (the config, the step, the metrics, anything else JSON-able).

Retention is `AnyPreservationPolicy([LatestN(keep), BestN(n=1)])` on the validation metric given to
`save(..., metrics=)`; `best_fn` is set too, without which Orbax neither writes the metrics to disk
nor tracks the best step. Saves are asynchronous: call `wait()` or
`close()` (or use `with`) before reading the files.

A half-written checkpoint is never picked up: Orbax writes into `<step>.orbax-checkpoint-tmp*` and
renames it when complete, and such names are not steps. A step directory that lacks Orbax's
metadata file (e.g. made by hand, or left by a crash while Orbax deleted it) is also ignored.

Every process of a multi-host job calls `save`/`restore`; Orbax coordinates the writes.

`restore_expert_params` reads one expert's weights out of another run's checkpoints, read-only, for
`config.model.init_from` (parsed by `parse_init_from`; `load_expert_init` puts them in a state).

Resuming a run (`restore_latest_complete`): the latest *complete* checkpoint is restored; a step
that cannot be read is skipped and moved to `workdir/checkpoints_discarded/` (never deleted); a
checkpoint whose arrays do not fit the model fails before training (`CheckpointMismatchError`,
naming the arrays and the config fields that differ from the run that wrote it).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import time
from typing import Sequence

from absl import logging
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from i2m2_jax import optim
from i2m2_jax import sharding

STATE = "state"
META = "meta"
# Written by Orbax into every finished step directory (before the atomic rename).
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_EXPERT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def checkpoint_dir(workdir: str) -> str:
  """Where the trainer's checkpoints for `workdir` live."""
  return os.path.join(os.fspath(workdir), "checkpoints")


def to_json(tree: Any) -> Any:
  """Converts numpy/jax scalars and arrays inside nested dicts/lists to plain Python values."""
  if hasattr(tree, "to_dict") and callable(tree.to_dict):  # ml_collections.ConfigDict
    tree = tree.to_dict()
  if isinstance(tree, Mapping):
    return {str(k): to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v) for v in tree]
  if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(tree).tolist()
  return tree


def _metric_value(metrics: Mapping[str, Any], *, key: str, mode: str) -> float:
  """The ranking value of a checkpoint's metrics; NaN or a missing key ranks worst (never best)."""
  value = float(metrics.get(key, math.nan))
  if math.isnan(value):
    return -math.inf if mode == "max" else math.inf
  return value


def _is_finished_step(directory: epath.Path, step: int) -> bool:
  path = directory / str(step)
  return (path / _STEP_METADATA_FILE).exists() and (path / STATE).is_dir()


def _abstract_leaf(x: Any) -> Any:
  # jax.Arrays become ShapeDtypeStructs that keep their sharding, so the restore lands where the
  # target lives; numpy arrays and Python scalars stay as they are (restored as the same type).
  if isinstance(x, jax.Array):
    return ocp.utils.to_shape_dtype_struct(x)
  return x


def _host_leaf(metadata: Any) -> Any:
  """A restore target leaf for a saved array: numpy on the host (one local device for PRNG keys)."""
  try:
    return np.zeros(metadata.shape, np.dtype(metadata.dtype))
  except TypeError:  # e.g. typed PRNG keys, which numpy cannot hold
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype, sharding=sharding)


class Checkpointer:
  """Saves and restores the training state; keeps the latest `keep` checkpoints + the best one.

  Args:
    directory: the checkpoint directory (for a trainer: `checkpoint_dir(workdir)`).
    keep: how many of the most recent checkpoints to keep (>= 1).
    best_metric: the key of `save(..., metrics=)` that ranks checkpoints.
    best_mode: 'max' (higher is better) or 'min'.
    async_save: save in a background thread (`save` returns once the arrays are copied).
    read_only: open an existing directory without creating, saving or deleting anything.
  """

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str = "accuracy",
               best_mode: str = "max", async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    # epath handles local paths and gs:// alike, as Orbax itself does.
    directory = os.fspath(directory)
    self._directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._read_only = read_only
    if read_only and not self._directory.is_dir():
      raise FileNotFoundError(f"No checkpoint directory at {self._directory}.")

    def best_fn(metrics):
      return _metric_value(metrics, key=best_metric, mode=best_mode)

    policy = ocp_policies.AnyPreservationPolicy([
        ocp_policies.LatestN(n=keep),
        # reverse=True sorts descending, so the n kept at the end are the smallest ('min').
        ocp_policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, keep_checkpoints_without_metrics=False,
        preservation_policy=None if read_only else policy,
        enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        # Removes leftovers of a save interrupted by a crash (they are ignored in any case).
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(
        self._directory, options=options,
        # Registered handlers (not just names) let item_metadata() describe a checkpoint's tree.
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()},
        # Recorded once, so that readers of this directory know how its best step is defined.
        metadata=None if read_only else {"best_metric": best_metric, "best_mode": best_mode})
    self._unfinished = {s for s in self._manager.all_steps()
                        if not _is_finished_step(self._directory, s)}
    if self._unfinished:
      logging.warning("Ignoring unfinished checkpoint directories in %s: steps %s.",
                      self._directory, sorted(self._unfinished))

  # --------------------------------------------------------------------------------- queries

  @property
  def directory(self) -> str:
    return str(self._directory)

  @property
  def unfinished_steps(self) -> list[int]:
    """Step directories found when this Checkpointer was opened that lack Orbax's metadata
    (ignored: never restored)."""
    return sorted(self._unfinished)

  def all_steps(self) -> list[int]:
    """The steps that can be restored (including a save still in flight), ascending."""
    return sorted(s for s in self._manager.all_steps() if s not in self._unfinished)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the best `best_metric`; None when no checkpoint was saved with metrics."""
    best = self._manager.best_step()
    if best is None or best not in self._unfinished:
      return best
    ranked = [(self._rank(m), s) for s in self.all_steps()
              if (m := self.metrics(s)) is not None and self._best_metric in m]
    return max(ranked)[1] if ranked else None

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with `step`, or None."""
    return self._manager.metrics(step)

  def _rank(self, metrics: Mapping[str, Any]) -> float:
    value = _metric_value(metrics, key=self._best_metric, mode=self._best_mode)
    return value if self._best_mode == "max" else -value

  # ------------------------------------------------------------------------------------ save

  def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` (any pytree) at `step`; returns whether a checkpoint was written.

    `metrics` ranks the checkpoint (it must hold `best_metric`); a save without metrics is kept
    only while it is among the latest `keep`. `meta` is stored as JSON together with the step and
    the metrics. Orbax skips a step that is not after the latest saved one (unless `force`).
    """
    if self._read_only:
      raise RuntimeError(f"Checkpointer for {self._directory} is read-only.")
    step = int(step)
    if metrics is not None:
      metrics = to_json(dict(metrics))
      if self._best_metric not in metrics:
        raise ValueError(f"metrics {sorted(metrics)} lack best_metric={self._best_metric!r}.")
    blocking = [s for s in self._unfinished if s >= step]
    if blocking:
      raise RuntimeError(f"Unfinished checkpoint directories {sorted(blocking)} in "
                         f"{self._directory} are at or after step {step}; remove them to save.")
    meta_json = dict(to_json(dict(meta or {})))
    meta_json.setdefault("step", step)
    if metrics is not None:
      meta_json.setdefault("metrics", metrics)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 META: ocp.args.JsonSave(meta_json)})
    return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

  # --------------------------------------------------------------------------------- restore

  def _checked_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint to restore in {self._directory}.")
    step = int(step)
    if step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self._directory}; "
                              f"available: {self.all_steps()}.")
    return step

  def restore(self, step: int | None, target: Any) -> Any:
    """Restores the state saved at `step` (None: the latest) into `target`'s structure and types.

    `target` is a pytree like the saved one (e.g. a freshly initialised TrainState): optax
    NamedTuples and dataclasses survive, and `jax.Array` leaves give their dtype and sharding.
    """
    step = self._checked_step(step)
    abstract = jax.tree.map(_abstract_leaf, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))
    return restored[STATE]

  def restore_raw(self, step: int | None = None) -> Any:
    """Restores the state at `step` without a target: nested dicts/lists of host numpy arrays.

    The target is built from the checkpoint's own metadata, on the host, so this works whatever
    devices the checkpoint was saved from (Orbax's target-less restore needs the same topology).
    """
    step = self._checked_step(step)
    tree = self._manager.item_metadata(step)[STATE].tree
    target = jax.tree.map(_host_leaf, tree)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))
    return restored[STATE]

  def state_metadata(self, step: int | None = None) -> Any:
    """The saved state's tree with one metadata leaf (`.shape`, `.dtype`) per array, read from
    the checkpoint's metadata files without reading the arrays."""
    step = self._checked_step(step)
    metadata = self._manager.item_metadata(step)[STATE]
    if metadata is None or getattr(metadata, "tree", None) is None:
      raise FileNotFoundError(f"Checkpoint step {step} in {self._directory} has no readable "
                              f"metadata of its '{STATE}' item.")
    return metadata.tree

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON `meta` dict saved at `step` (None: the latest)."""
    step = self._checked_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]

  # ------------------------------------------------------------------------------- lifecycle

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished (and old checkpoints are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------
# Initialising experts from other runs


def parse_init_from(spec: str | None) -> dict[str, str]:
  """Parses `"uni_image=runs/a,joint=runs/b"` into `{'uni_image': 'runs/a', 'joint': 'runs/b'}`.

  An empty (or blank) string gives {}. Spaces around names and paths are dropped.
  """
  if spec is None or not spec.strip():
    return {}
  out: dict[str, str] = {}
  for entry in spec.split(","):
    name, sep, workdir = (part.strip() for part in entry.partition("="))
    if not sep or not name or not workdir:
      raise ValueError(f"init_from entry {entry.strip()!r} in {spec!r} is not of the form "
                       f"'expert_name=workdir' (entries are separated by commas).")
    if not _EXPERT_NAME_RE.match(name):
      raise ValueError(f"init_from entry {entry.strip()!r}: {name!r} is not a valid expert name.")
    if name in out:
      raise ValueError(f"init_from {spec!r} names expert {name!r} twice.")
    out[name] = workdir
  return out


def _recorded_best(directory: str) -> tuple[str, str]:
  """The (best_metric, best_mode) a Checkpointer recorded in `directory` (defaults otherwise)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with ocp.CheckpointManager(directory, options=options) as manager:
    recorded = manager.metadata().custom_metadata or {}
  return recorded.get("best_metric", "accuracy"), recorded.get("best_mode", "max")


def restore_expert_params(workdir: str, expert_name: str) -> dict[str, Any]:
  """One expert's weights from another run: `{'params': ..., 'batch_stats': ...}` (plain dicts).

  Opens `checkpoint_dir(workdir)` read-only and restores its best step (else its latest) without
  a target. `batch_stats` is {} when the expert has none (no BatchNorm).
  """
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():
    raise ValueError(f"init_from: no checkpoints for expert {expert_name!r} in workdir "
                     f"{workdir!r} (no directory {directory}).")
  best_metric, best_mode = _recorded_best(directory)
  with Checkpointer(directory, best_metric=best_metric, best_mode=best_mode,
                    read_only=True) as ckpt:
    step = ckpt.best_step()
    if step is None:
      step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"init_from: workdir {workdir!r} has no finished checkpoint in {directory}.")
    state = ckpt.restore_raw(step)
  params = state.get("params") if isinstance(state, Mapping) else None
  if not isinstance(params, Mapping):
    raise ValueError(f"init_from: the checkpoint at step {step} of workdir {workdir!r} has no "
                     f"'params' dict.")
  if expert_name not in params:
    raise ValueError(f"init_from: workdir {workdir!r} (step {step}) has no expert "
                     f"{expert_name!r}; available experts: {sorted(params)}.")
  batch_stats = state.get("batch_stats") or {}
  return {"params": params[expert_name], "batch_stats": batch_stats.get(expert_name, {})}


def load_expert_init(state, init_from: str, mesh: jax.sharding.Mesh):
  """Replaces experts' parameters (and BatchNorm statistics) with those of other runs' best
  checkpoints, from config.model.init_from = "expert=workdir,...". Shapes must match."""
  params = flax.core.unfreeze(jax.device_get(state.params))
  batch_stats = flax.core.unfreeze(jax.device_get(state.batch_stats or {}))
  for expert, workdir in parse_init_from(init_from).items():
    if expert not in params:
      raise ValueError(f"config.model.init_from names expert {expert!r}, which this model does "
                       f"not have; its experts are {sorted(params)}.")
    loaded = restore_expert_params(workdir, expert)
    check_same_shapes(params[expert], loaded["params"],
                      f"config.model.init_from: {workdir} ({expert} params)")
    params[expert] = loaded["params"]
    if expert in batch_stats:
      check_same_shapes(batch_stats[expert], loaded.get("batch_stats") or {},
                        f"config.model.init_from: {workdir} ({expert} batch_stats)")
      batch_stats[expert] = loaded["batch_stats"]
    logging.info("Initialised expert %s from %s.", expert, workdir)
  repl = sharding.replicated(mesh)
  params = jax.device_put(jax.tree.map(np.asarray, params), repl)
  batch_stats = jax.device_put(jax.tree.map(np.asarray, batch_stats), repl)
  # The optimiser starts afresh for the loaded parameters, as in the paper's fine-tuning stage.
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=jax.jit(state.tx.init, out_shardings=repl)(params))


# ------------------------------------------------------------------------------------------
# Compatibility of checkpoints with the model


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


def check_same_shapes(expected, got, where: str):
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
  now = _flat_dict(to_json(now))
  saved = _flat_dict(to_json(saved))
  absent = "<absent>"
  keys = [k for k in sorted(set(now) | set(saved)) if now.get(k, absent) != saved.get(k, absent)]
  keys.sort(key=lambda k: (not k.startswith("model."), not k.startswith("data."), k))
  diffs = [f"config.{k}: now {now.get(k, absent)!r}, checkpoint {saved.get(k, absent)!r}"
           for k in keys]
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


# ------------------------------------------------------------------------------------------
# Resuming a run


def saved_config(ckpt: Checkpointer, step: int) -> dict[str, Any]:
  try:
    return ckpt.restore_meta(step).get("config") or {}
  except Exception:  # pylint: disable=broad-except
    return {}


def open_checkpointer(config, workdir: str, best_metric: str, best_mode: str) -> Checkpointer:
  return Checkpointer(checkpoint_dir(workdir), keep=config.keep_checkpoints,
                      best_metric=best_metric, best_mode=best_mode)


def all_finite(tree) -> bool:
  return not float(sharding.to_host(jax.jit(optim.any_nonfinite)(tree)))


def move_aside(directory: str, steps: Sequence[int], workdir: str) -> str:
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


def restore_latest_complete(config, workdir: str, state: Any, *, best_metric: str,
                            best_mode: str) -> tuple[Checkpointer, int, Any, dict]:
  """Opens workdir's checkpoints (the best one ranked by `best_metric`, higher is better when
  `best_mode` is 'max') and restores the latest complete one into `state`'s structure.

  Returns (checkpointer, step, state, meta); step 0 (and `state` untouched) when there is none.
  A step that cannot be read (missing metadata, truncated or missing array files, non-finite
  parameters) is skipped, and the run resumes from the previous one; such steps after it are
  moved to `workdir/checkpoints_discarded/` (they would block later saves), and the log says
  so. Raises CheckpointMismatchError, naming the arrays and the config fields that differ, when
  a readable checkpoint does not fit the model; RuntimeError when checkpoints exist but none can
  be restored (nothing is moved then).
  """
  ckpt = open_checkpointer(config, workdir, best_metric, best_mode)
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
      config_diffs = config_differences(config.to_dict(), saved_config(ckpt, step))
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
    if not all_finite((candidate.params, candidate.batch_stats, candidate.opt_state)):
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
    moved_to = move_aside(directory, stale, workdir)
    reasons = "; ".join(f"step {s}: {broken.get(s, 'unfinished (no Orbax metadata)')}"
                        for s in stale)
    logging.warning("Resuming from step %d, the latest complete checkpoint in %s: later step(s) "
                    "%s are incomplete or unreadable (%s) and were moved to %s.", start,
                    directory, stale, reasons, moved_to)
    ckpt = open_checkpointer(config, workdir, best_metric, best_mode)
  elif start:
    logging.info("Resumed from step %d in %s.", start, ckpt.directory)
  if start and meta.get("config"):
    changed = config_differences(config.to_dict(), meta["config"])
    if changed:  # e.g. another seed or batch size: the run is no longer the interrupted one
      logging.warning("Resuming step %d with a config that differs from the one that saved it: "
                      "%s.", start, "; ".join(changed))
  return ckpt, start, restored, meta
