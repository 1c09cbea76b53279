"""`mimic`: MIMIC-III as pre-processed by MultiBench (`im.pk`), built into TFDS.

Modalities: 'static' float32 [5] (admission features) and 'timeseries' float32 [24, 12]
(12 variables, hourly over the first 24 h). Tasks (config.data.task; the reference's --task):

  'mortality'     (-1): 6 classes: the index of the first column among 1..5 of adm_labels_all that
                        is > 0, else 0;
  'icd9_140_239'   (1): binary, y_icd9[:, 1] (neoplasms);
  'icd9_460_519'   (7): binary, y_icd9[:, 7] (respiratory).

Preprocessing as the reference (MultiBench `datasets/mimic/get_data.py`): NaN and inf -> 0, then
z-scores of the static features per column and of the series per variable (over patients and
hours), with the population std. The statistics come from the training split by default; set
config.data.normalize_with_all_splits=True for the reference's statistics over all patients
(quirk #6: mild leakage). A constant column (std 0) is divided by 1, not 0 (the reference would
produce NaN there).

Split as the reference: the (static, series, label) tuples in file order are shuffled by Python's
`random.seed(10); random.shuffle(...)`; val = the first N//10, test = N//10 .. N//5, train = the
rest (each keeps the shuffled order). Task and normalisation are part of the build's config name.

Security: `im.pk` is a pickle, and loading a pickle runs code. It is read only from the user's
own folder (config.data.manual_dir, "" = <data_dir>/downloads/manual), never fetched; only use a
file obtained from the MultiBench authors.
"""
from __future__ import annotations

import os
import pickle
import random
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "mimic"
FILE_NAME = "im.pk"
MODALITY_SHAPES = {"static": (5,), "timeseries": (24, 12)}
# task -> (y_icd9 column, or None for mortality; number of classes)
TASKS = {"mortality": (None, 6), "icd9_140_239": (1, 2), "icd9_460_519": (7, 2)}
MORTALITY_COLUMNS = (1, 2, 3, 4, 5)  # adm_labels_all columns, in order of precedence
SPLIT_SEED = 10

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MIMIC-III needs PhysioNet credentials. The pre-processed file `im.pk` used by MultiBench and I2M2
is sent by the MultiBench authors on proof of credentials (https://github.com/pliang279/MultiBench,
README section "Healthcare"). Put it at <manual_dir>/im.pk (config.data.manual_dir). It is a
pickled dict with 'ep_tdata' [N, 24, 12], 'adm_features_all' [N, 5], 'adm_labels_all' [N, >=6] and
'y_icd9' [N, 20]. Loading a pickle runs code: only use the file you received from them.
"""

# key -> (expected shape as text, check on the shape)
_KEYS = {
    "adm_features_all": ("[N, 5]", lambda s: len(s) == 2 and s[1] == 5),
    "ep_tdata": ("[N, 24, 12]", lambda s: len(s) == 3 and s[1:] == (24, 12)),
    "adm_labels_all": ("[N, >=6]", lambda s: len(s) == 2 and s[1] >= 6),
    "y_icd9": ("[N, 20]", lambda s: len(s) == 2 and s[1] > max(c for c, _ in TASKS.values()
                                                             if c is not None)),
}


# ---------------------------------------------------------------------------------------------
# Reading and preprocessing


def load_pickle(path: str) -> dict[str, np.ndarray]:
  """The arrays of im.pk as float64, checked for keys, shapes and equal row counts.

  Unpickling runs code: call this only on the user's own copy of the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"MIMIC-III file {path} is missing; expected a pickled dict with "
        + ", ".join(f"{k!r} {shape}" for k, (shape, _) in _KEYS.items())
        + f".\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  with open(path, "rb") as f:
    data = pickle.load(f)
  if not isinstance(data, Mapping):
    raise ValueError(f"MIMIC-III file {path} holds a {type(data).__name__}; expected a dict.")
  arrays = {}
  for key, (expected, ok) in _KEYS.items():
    if key not in data:
      raise ValueError(f"MIMIC-III file {path} has no key {key!r} (expected shape {expected}); "
                       f"its keys: {sorted(map(str, data))}.")
    try:
      arrays[key] = np.array(data[key], dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"MIMIC-III file {path}: {key!r} is not numeric ({e}).") from e
    if not ok(arrays[key].shape):
      raise ValueError(f"MIMIC-III file {path}: {key!r} has shape {arrays[key].shape}; expected "
                       f"{expected}.")
  rows = {k: len(a) for k, a in arrays.items()}
  if len(set(rows.values())) != 1:
    raise ValueError(f"MIMIC-III file {path}: the arrays disagree on the number of patients: "
                     f"{rows}.")
  return arrays


def task_labels(arrays: Mapping[str, np.ndarray], task: str, path: str = FILE_NAME) -> np.ndarray:
  """int64 [N] labels of a task (module docstring)."""
  column, _ = TASKS[task]
  if column is None:
    flags = arrays["adm_labels_all"][:, MORTALITY_COLUMNS] > 0
    first = np.argmax(flags, axis=1)  # the first positive column (0 when none)
    return np.where(flags.any(axis=1), np.asarray(MORTALITY_COLUMNS)[first], 0).astype(np.int64)
  values = arrays["y_icd9"][:, column]
  if not np.isin(values, (0, 1)).all():
    raise ValueError(f"MIMIC-III file {path}: 'y_icd9'[:, {column}] must be 0/1 for task "
                     f"{task!r}; got values {np.unique(values)[:10]}.")
  return values.astype(np.int64)


def reference_split(num_patients: int) -> dict[str, np.ndarray]:
  """TFDS split name -> patient rows, in the order of the reference's seeded shuffle."""
  order = list(range(num_patients))
  # The same stream as the reference's `random.seed(10); random.shuffle(list)`; a private
  # Random keeps the global one untouched. The permutation depends on the length only.
  random.Random(SPLIT_SEED).shuffle(order)
  order = np.asarray(order, dtype=np.int64)
  n_val, n_test_end = num_patients // 10, num_patients // 5
  return {"train": order[n_test_end:], "validation": order[:n_val],
          "test": order[n_val:n_test_end]}


def _finite(x: np.ndarray) -> np.ndarray:
  return np.where(np.isfinite(x), x, 0.0)


def _zscore(x: np.ndarray, rows: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """(x - mean) / std with statistics over `rows` (and further `axes`); std 0 counts as 1."""
  mean = x[rows].mean(axis=axes)
  std = x[rows].std(axis=axes)
  return (x - mean) / np.where(std > 0, std, 1.0)


def preprocess(arrays: Mapping[str, np.ndarray], task: str, normalize_with_all_splits: bool,
               path: str = FILE_NAME) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
  """Returns ({'static': f32 [N, 5], 'timeseries': f32 [N, 24, 12]}, labels [N], splits)."""
  n = len(arrays["adm_features_all"])
  splits = reference_split(n)
  rows = np.arange(n) if normalize_with_all_splits else splits["train"]
  static = _zscore(_finite(arrays["adm_features_all"]), rows, (0,))
  series = _zscore(_finite(arrays["ep_tdata"]), rows, (0, 1))
  features = {"static": static.astype(np.float32), "timeseries": series.astype(np.float32)}
  return features, task_labels(arrays, task, path), splits


# ---------------------------------------------------------------------------------------------
# TFDS builder


def builder_config(task: str, normalize_with_all_splits: bool) -> builder_utils.KnobsConfig:
  """Knobs: task and where the z-score statistics come from; both spelled out in the name."""
  if task not in TASKS:
    raise ValueError(f"config.data.task={task!r} is unknown; expected one of {list(TASKS)}.")
  knobs = {"task": task, "normalize_with_all_splits": bool(normalize_with_all_splits)}
  stats = "allsplits" if normalize_with_all_splits else "train"
  name = f"{task}_{stats}_stats_h{builder_utils.short_hash(knobs, 8)}"
  return builder_utils.KnobsConfig(name=name, knobs=knobs)


class I2m2Mimic(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of MultiBench's MIMIC-III im.pk (see module docstring)."""
  name = "i2m2_mimic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MultiBench im.pk; the reference's seeded 80/10/10 split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # A loader may set this to the folder it already checked (else dl_manager.manual_dir is used).
  root_dir: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    num_classes = TASKS[self.builder_config.knobs["task"]][1]
    features = {m: tfds.features.Tensor(shape=s, dtype=np.float32)
                for m, s in MODALITY_SHAPES.items()}
    features["label"] = tfds.features.ClassLabel(num_classes=num_classes)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        homepage="https://github.com/pliang279/MultiBench")

  def _split_generators(self, dl_manager):
    root = self.root_dir or os.fspath(dl_manager.manual_dir)
    path = os.path.join(root, FILE_NAME)
    knobs = self.builder_config.knobs
    features, labels, splits = preprocess(load_pickle(path), knobs["task"],
                                          knobs["normalize_with_all_splits"], path)
    return {split: self._generate_examples(features, labels, rows)
            for split, rows in splits.items()}

  def _generate_examples(self, features, labels, rows):
    # Keys are positions, so the stored order is the reference's shuffled order.
    for position, row in enumerate(rows):
      example: dict[str, Any] = {m: x[row] for m, x in features.items()}
      example["label"] = int(labels[row])
      yield position, example


# ---------------------------------------------------------------------------------------------
# Loader


@register_dataset(NAME)
def load_mimic(data_config) -> Dataset:
  """Reads config.data.{data_dir, manual_dir, task, normalize_with_all_splits}; builds on first
  use (module docstring)."""
  task = data_config.get("task", "mortality") or "mortality"
  config = builder_config(task, bool(data_config.get("normalize_with_all_splits", False)))
  data_dir = builder_utils.data_dir_from_config(data_config)
  builder = I2m2Mimic(config=config, data_dir=data_dir, file_format="array_record")
  info = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
  if not (os.path.isfile(info) and builder.is_prepared()):
    root = builder_utils.manual_dir(data_config, builder)
    path = os.path.join(root, FILE_NAME)
    if not os.path.isfile(path):
      load_pickle(path)  # raises the FileNotFoundError that names the file and its format
    builder = builder_utils.prepare(I2m2Mimic, config, data_dir, source_files=[path],
                                    root_dir=root)
  return Dataset(name=NAME, modalities=dict(MODALITY_SHAPES), num_classes=TASKS[task][1],
                 sources=builder_utils.split_sources(builder),
                 provenance=builder_utils.provenance(
                     builder, builder_utils.manual_dir(data_config, builder)))
