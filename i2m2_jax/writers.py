"""Metric logging without TensorFlow: TensorBoard event files (tensorboardX) + a JSON-lines log.

`MetricWriter` keeps clu's method names (`write_scalars`, `write_hparams`, `flush`, `close`) but
never imports TensorFlow (clu.metric_writers and flax.metrics.tensorboard do). In a multi-host job
only process 0 writes: build it with `enabled=jax.process_index() == 0`; a disabled writer creates
no file at all.

Files under `workdir`:
  tensorboard/events.out.tfevents.*   scalars and hparams, for TensorBoard
  metrics.jsonl                       one JSON object per step: {"step": s, ...} (the scalars of
                                      consecutive `write_scalars` calls at the same step merged)
  hparams.json                        the last `write_hparams` dict, nested as given

A writer opened with `resume_step=k` (a run resumed from its checkpoint at step k) first drops
what the interrupted run logged after step k: those steps run again, so every step keeps one
record (metrics.jsonl is rewritten without them; TensorBoard is told to purge them).

`ProgressBar` is a tqdm bar over training steps showing steps/s and the ETA.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"
HPARAMS_NAME = "hparams.json"
TENSORBOARD_DIR = "tensorboard"


def _to_scalar(name: str, value: Any) -> int | float | bool:
  """A Python int/float/bool from a Python, NumPy or JAX scalar (or size-1 array)."""
  if isinstance(value, (bool, int, float)):
    return value
  array = np.asarray(jax.device_get(value))
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"write_scalars: {name!r} is not a numeric scalar "
                     f"(shape {array.shape}, dtype {array.dtype}).")
  return array.reshape(()).item()


def flatten_scalars(scalars: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts to 'a/b' names: {'val': {'acc': 1, 'experts': {'joint': 2}}} ->
  {'val/acc': 1, 'val/experts/joint': 2}."""
  flat: dict[str, Any] = {}
  for key, value in scalars.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_scalars(value, prefix=name + "/"))
    else:
      flat[name] = value
  return flat


def _hparam_value(value: Any) -> int | float | bool | str:
  # The TensorBoard hparams plugin takes only bool/number/string values.
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.generic, jax.Array)) and np.asarray(value).size == 1:
    return np.asarray(value).item()
  return str(value)


def _to_json(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` under `workdir` (nothing if disabled).

  Args:
    workdir: the run's directory (created if needed).
    enabled: False on processes other than 0: every method is then a no-op.
    resume_step: the step a resumed run continues from (module docstring); None for a new run.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self._enabled = enabled
    self._workdir = os.fspath(workdir)
    self._tb = None
    self._jsonl = None
    self._pending: tuple[int, dict[str, Any]] | None = None  # the current step's merged row
    self._last_row: tuple[int, int, dict[str, Any]] | None = None  # (offset, step, values) on disk
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    os.makedirs(self._workdir, exist_ok=True)
    jsonl_path = os.path.join(self._workdir, JSONL_NAME)
    if resume_step is not None:
      _drop_rows_after(jsonl_path, int(resume_step))
    self._tb = SummaryWriter(logdir=os.path.join(self._workdir, TENSORBOARD_DIR), flush_secs=30,
                             purge_step=None if resume_step is None else int(resume_step) + 1)
    self._jsonl = open(jsonl_path, "a+", encoding="utf-8")

  @property
  def enabled(self) -> bool:
    return self._enabled

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs numeric scalars at `step`. Nested dicts are flattened to 'a/b' names.

    JSON gets Python floats/ints; NaN and inf are written as NaN/Infinity (Python's json reads
    them).
    """
    if not self._enabled:
      return
    step = int(step)
    values = {name: _to_scalar(name, v) for name, v in flatten_scalars(scalars).items()}
    if "step" in values:
      raise ValueError("write_scalars: 'step' is reserved for the step number.")
    for name, value in values.items():
      self._tb.add_scalar(name, float(value), global_step=step)
    if self._pending is not None and self._pending[0] == step:
      self._pending[1].update(values)
    else:
      self._write_pending()
      self._pending = (step, values)

  def _write_pending(self) -> None:
    """Appends the pending row, or rewrites the last row on disk when it is of the same step
    (scalars of one step logged across a flush, e.g. before a checkpoint)."""
    if self._pending is None:
      return
    step, values = self._pending
    self._pending = None
    if self._last_row is not None and self._last_row[1] == step:
      offset, _, written = self._last_row
      values = {**written, **values}
      self._jsonl.truncate(offset)
    self._jsonl.seek(0, os.SEEK_END)
    offset = self._jsonl.tell()
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._last_row = (offset, step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records hyper-parameters: `hparams.json` (nested) and TensorBoard's hparams tab (flat)."""
    if not self._enabled:
      return
    # pylint: disable-next=g-import-not-at-top
    from tensorboardX.summary import hparams as hparams_summary

    with open(os.path.join(self._workdir, HPARAMS_NAME), "w", encoding="utf-8") as f:
      json.dump(_to_json(hparams), f, indent=2, sort_keys=True)
    flat = {k: _hparam_value(v) for k, v in flatten_scalars(hparams).items()}
    # Into this run's own event file (tensorboardX's add_hparams would start a new run dir).
    file_writer = self._tb._get_file_writer()  # pylint: disable=protected-access
    for summary in hparams_summary(flat, {}):
      file_writer.add_summary(summary)

  def flush(self) -> None:
    """Writes everything logged so far to disk (the current step's row included)."""
    if not self._enabled:
      return
    self._write_pending()
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if not self._enabled or self._jsonl is None:
      return
    self._write_pending()
    self._jsonl.close()
    self._tb.close()
    self._jsonl = self._tb = None
    self._enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl without its rows after `step` (atomically; nothing if absent)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _format_postfix(value: Any) -> str:
  try:
    number = float(np.asarray(jax.device_get(value)))
  except (TypeError, ValueError):
    return str(value)
  if math.isfinite(number) and number == int(number) and abs(number) < 1e9:
    return str(int(number))
  return f"{number:.4g}"


class ProgressBar:
  """A tqdm bar over training steps (shows steps/s and the ETA) on stderr.

  Args:
    total_steps: the step at which training ends.
    initial_step: the step training starts from (e.g. after a resume).
    enabled: False on processes other than 0 (then it prints nothing).
    mininterval: seconds between redraws; by default 1 s on a terminal and 30 s otherwise, so
      that logs redirected to a file stay short.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *,
               desc: str = "train", mininterval: float | None = None):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    if mininterval is None:
      mininterval = 1.0 if sys.stderr.isatty() else 30.0
    self._step = int(initial_step)
    self._bar = tqdm(total=int(total_steps), initial=self._step, disable=not enabled,
                     desc=desc, unit="step", mininterval=mininterval, dynamic_ncols=True,
                     file=sys.stderr, smoothing=0.05)

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` (absolute) and shows `postfix` (e.g. {'loss': 0.3}) beside it."""
    step = int(step)
    if postfix:
      self._bar.set_postfix({k: _format_postfix(v) for k, v in postfix.items()}, refresh=False)
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step

  @property
  def rate(self) -> float | None:
    """Steps per second as tqdm measures it (None before it has a measurement)."""
    return self._bar.format_dict.get("rate")

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _OwnInfoOnly:
  """Logging filter: warnings and errors from everyone, INFO only from i2m2_jax's own modules
  (Orbax and TFDS log dozens of INFO lines per checkpoint or build)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or f"{os.sep}i2m2_jax{os.sep}" in record.pathname


def quiet_library_logs() -> None:
  """Keeps the console readable in command-line runs; call once after absl starts logging."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
