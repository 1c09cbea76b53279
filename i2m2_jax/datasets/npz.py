"""`npz`: bring your own multi-modal data as NumPy .npz files.

Set `--config.data.path=DIR`, a folder holding

* `train.npz` and `test.npz` (required), `val.npz` (optional; without it a stratified hold-out of
  `config.data.val_fraction` of train, seeded by `config.data.split_seed`, becomes the validation
  split and leaves train);
* in each file the targets and one array per modality under any other key, first axis N:
  vectors [N, D], sequences [N, T, F], images [N, H, W, C], e.g.
  `np.savez(DIR + '/train.npz', image=images, audio=spectrograms, label=labels)`. Targets:
  - `label` [N]: integer classes 0..C-1 (task `multiclass`);
  - `label` [N, L]: L binary labels in {0, 1} (task `multilabel`; names from
    `config.data.label_names`, 'a,b,c');
  - `scores` [N, C]: a score in [0, 1] per class, e.g. VQA answer scores (task `soft_label`), with
    or without a `label` beside it.
  The data set's default task follows from which targets it has (`--config.task.name` chooses
  another the targets allow).

Modality order (for the model) is the key order of train.npz. The number of classes C is
`config.data.num_classes` when > 0, else max(train label) + 1 (or the width of `scores`).

Dtypes are stored as float32 or uint8 by this rule: float32 and uint8 as they are; other floats
(float16, float64) -> float32; bool -> uint8; other integers -> float32 (exact below 2**24).
Labels may be any integer dtype, or floats holding whole numbers. After that rule, each modality
must have the same per-example shape and dtype in every file.

Everything is checked before building; a problem raises ValueError naming the file and key.
The TFDS config name hashes the folder, the files' sizes and modification times and the knobs, so
editing a file triggers a rebuild into config.data.data_dir; an unchanged folder reuses its build.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Mapping

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "npz"
REQUIRED_FILES = {"train": "train.npz", "test": "test.npz"}
OPTIONAL_FILES = {"val": "val.npz"}
TARGETS = ("label", "scores")  # keys that are targets, not modalities
RESERVED_KEYS = ("mask",)  # the trainer's padding flag


# ---------------------------------------------------------------------------------------------
# Dtype rule


def stored_dtype(dtype: np.dtype) -> np.dtype | None:
  """The dtype a modality is stored in (see module docstring); None when unsupported."""
  dtype = np.dtype(dtype)
  if dtype in (np.float32, np.uint8):
    return dtype
  if dtype == np.bool_:
    return np.dtype(np.uint8)
  if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer):
    return np.dtype(np.float32)
  return None


# ---------------------------------------------------------------------------------------------
# Layout: what the folder holds, read from the .npy headers and the labels only (cheap)


@dataclasses.dataclass(frozen=True)
class NpzLayout:
  folder: str
  files: Mapping[str, str]                     # 'train' / 'val' / 'test' -> file path
  modalities: Mapping[str, tuple[tuple[int, ...], str]]  # name -> (example shape, stored dtype)
  num_classes: int
  fingerprint: tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) per file
  targets: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=lambda: {"label": ()})   # target key -> per-example shape

  @property
  def task(self) -> str:
    if "scores" in self.targets:
      return "soft_label"
    return "multilabel" if len(self.targets["label"]) == 1 else "multiclass"


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of one array in an .npz without reading its data."""
  with zf.open(member) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
  return tuple(int(s) for s in shape), np.dtype(dtype)


def read_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """key -> (shape, dtype) of every array in an .npz file, in the file's order."""
  name = os.path.basename(path)
  try:
    with zipfile.ZipFile(path) as zf:
      return {m[:-len(".npy")]: _header(zf, m) for m in zf.namelist() if m.endswith(".npy")}
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"{name}: cannot read it as an .npz file written by np.savez ({e}).") from e


def _check_label_rank(shape: tuple[int, ...], file_name: str) -> None:
  if len(shape) not in (1, 2):
    raise ValueError(f"{file_name}: key 'label' has shape {tuple(shape)}; expected [N] integer "
                     f"classes (one per example) or [N, L] binary labels.")


def check_labels(labels: np.ndarray, file_name: str) -> np.ndarray:
  """Labels as int64 [N] (classes) or [N, L] (binary labels); ValueError unless they are whole
  numbers >= 0 (and in {0, 1} for [N, L])."""
  _check_label_rank(labels.shape, file_name)
  if np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise ValueError(f"{file_name}: key 'label' has non-integer values (dtype "
                       f"{labels.dtype}); expected integer classes 0..C-1.")
  elif not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise ValueError(f"{file_name}: key 'label' has dtype {labels.dtype}; expected integer "
                     f"classes 0..C-1.")
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise ValueError(f"{file_name}: key 'label' has negative values (min {labels.min()}); "
                     f"expected integer classes 0..C-1.")
  if labels.ndim == 2 and labels.size and labels.max() > 1:
    raise ValueError(f"{file_name}: key 'label' of shape [N, L] has values above 1 (max "
                     f"{labels.max()}); expected binary labels in {{0, 1}} (multilabel).")
  return labels


def check_scores(scores: np.ndarray, file_name: str) -> np.ndarray:
  """Soft labels as float32 [N, C]; ValueError unless they are finite numbers in [0, 1]."""
  if scores.ndim != 2 or not (np.issubdtype(scores.dtype, np.floating)
                              or np.issubdtype(scores.dtype, np.integer)):
    raise ValueError(f"{file_name}: key 'scores' has shape {scores.shape} and dtype "
                     f"{scores.dtype}; expected float scores [N, C] in [0, 1].")
  if not np.all(np.isfinite(scores)) or (scores.size and (scores.min() < 0 or scores.max() > 1)):
    raise ValueError(f"{file_name}: key 'scores' has values outside [0, 1] or NaN/Inf; expected "
                     f"a score in [0, 1] per class.")
  return scores.astype(np.float32)


def _load_labels(path: str) -> np.ndarray:
  with np.load(path, allow_pickle=False) as f:
    return check_labels(f["label"], os.path.basename(path))


def _num_classes_from_labels(labels: np.ndarray) -> int:
  """max(label) + 1, saying so when some classes below it never occur (labels with gaps)."""
  present = np.unique(labels)
  num_classes = int(present.max()) + 1
  if len(present) < num_classes:
    logging.warning(
        "train.npz: the labels use %d of the %d classes 0..%d (C = max label + 1; e.g. %s never "
        "occur). The model has %d outputs; relabel with np.unique(labels, return_inverse=True) "
        "for %d classes, or set config.data.num_classes.", len(present), num_classes,
        num_classes - 1, sorted(set(range(num_classes)) - set(present.tolist()))[:5],
        num_classes, len(present))
  return num_classes


def _check_file_structure(path: str, headers) -> None:
  """One file on its own: targets, >= 1 modality, equal first axes, supported dtypes."""
  name = os.path.basename(path)
  for key, (_, dtype) in headers.items():
    if dtype == np.dtype(object):
      raise ValueError(f"{name}: key {key!r} holds Python objects (dtype object, e.g. strings "
                       f"from a pandas column); expected numbers. Convert class names with "
                       f"`codes, names = np.unique(values, return_inverse=True)[::-1]`.")
  targets = [k for k in TARGETS if k in headers]
  if "label" in headers:
    _check_label_rank(headers["label"][0], name)
  if not targets:
    raise ValueError(f"{name}: no key 'label' (nor 'scores'); expected integer class labels of "
                     f"shape [N] (or [N, L] binary labels, or float 'scores' [N, C]) next to the "
                     f"modality arrays (found keys {list(headers)}).")
  modalities = [k for k in headers if k not in TARGETS]
  if not modalities:
    raise ValueError(f"{name}: no modality; expected one array per modality besides "
                     f"{targets}.")
  num_examples = headers[targets[0]][0][0] if headers[targets[0]][0] else 0
  if num_examples == 0:
    raise ValueError(f"{name}: key {targets[0]!r} holds no examples; expected N >= 1 rows.")
  for key in targets[1:]:
    if (headers[key][0] or (0,))[0] != num_examples:
      raise ValueError(f"{name}: key {key!r} has {(headers[key][0] or (0,))[0]} examples but "
                       f"{targets[0]!r} has {num_examples}; the first axes must match.")
  for key in modalities:
    shape, dtype = headers[key]
    if key in RESERVED_KEYS:
      raise ValueError(f"{name}: key {key!r} is reserved; rename that modality.")
    if len(shape) < 2:
      raise ValueError(f"{name}: key {key!r} has shape {shape}; expected [N, ...] with at least "
                       f"one per-example axis (use x[:, None] for a scalar feature).")
    if shape[0] != num_examples:
      raise ValueError(f"{name}: key {key!r} has {shape[0]} examples (first axis) but "
                       f"{targets[0]!r} has {num_examples}; the first axes must match.")
    if stored_dtype(dtype) is None:
      raise ValueError(f"{name}: key {key!r} has dtype {dtype}; expected float32 or uint8 (or "
                       f"another float/int/bool dtype, which is cast).")


def _fingerprint(files: Mapping[str, str]) -> tuple[tuple[str, int, int], ...]:
  out = []
  for split in sorted(files):
    st = os.stat(files[split])
    out.append((os.path.basename(files[split]), int(st.st_size), int(st.st_mtime_ns)))
  return tuple(out)


def scan_folder(data_config) -> NpzLayout:
  """Checks everything visible without reading the modality data, and describes the folder."""
  folder = data_config.get("path", "") or ""
  if not folder:
    raise ValueError("config.data.path is empty; set --config.data.path to a folder holding "
                     "train.npz and test.npz (and optionally val.npz).")
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise ValueError(f"config.data.path={folder!r} is not a folder; expected a folder holding "
                     f"train.npz and test.npz (and optionally val.npz).")
  files = {}
  for split, name in REQUIRED_FILES.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise ValueError(f"{name}: missing in config.data.path={folder!r}; expected train.npz and "
                       f"test.npz (val.npz optional).")
    files[split] = path
  for split, name in OPTIONAL_FILES.items():
    if os.path.isfile(os.path.join(folder, name)):
      files[split] = os.path.join(folder, name)

  headers = {split: read_headers(path) for split, path in files.items()}
  for split, path in files.items():
    _check_file_structure(path, headers[split])
  train_name = REQUIRED_FILES["train"]
  modalities = {k: (shape[1:], stored_dtype(dtype))
                for k, (shape, dtype) in headers["train"].items() if k not in TARGETS}
  targets = {k: tuple(headers["train"][k][0][1:]) for k in TARGETS if k in headers["train"]}
  for split, path in files.items():
    if split == "train":
      continue
    name = os.path.basename(path)
    for key, (shape, dtype) in modalities.items():
      if key not in headers[split]:
        raise ValueError(f"{name}: modality {key!r} (present in {train_name}) is missing; every "
                         f"file needs the same keys.")
      other_shape, other_dtype = headers[split][key]
      if other_shape[1:] != shape or stored_dtype(other_dtype) != dtype:
        raise ValueError(
            f"{name}: key {key!r} has per-example shape {other_shape[1:]} and dtype "
            f"{other_dtype} (stored as {stored_dtype(other_dtype)}), but {train_name} has shape "
            f"{shape} and dtype {headers['train'][key][1]} (stored as {dtype}); they must match.")
    extra = [k for k in headers[split] if k not in modalities and k not in targets]
    if extra:
      raise ValueError(f"{name}: key(s) {extra} are not in {train_name}; every file needs the "
                       f"same keys.")
    for key, shape in targets.items():
      other = tuple(headers[split][key][0][1:]) if key in headers[split] else None
      if other != shape:
        raise ValueError(f"{name}: target {key!r} has per-example shape {other} but "
                         f"{train_name} has {shape}; every file needs the same targets.")

  num_classes = int(data_config.get("num_classes", -1) or -1)
  if "label" in targets and len(targets["label"]) == 1:
    num_classes = 2  # binary labels
  elif num_classes <= 0:
    num_classes = (_num_classes_from_labels(_load_labels(files["train"])) if "label" in targets
                   else targets["scores"][0])
  return NpzLayout(folder=folder, files=files,
                   modalities={k: (s, d.name) for k, (s, d) in modalities.items()},
                   num_classes=num_classes, fingerprint=_fingerprint(files), targets=targets)


# ---------------------------------------------------------------------------------------------
# Data: full read, value checks, hold-out


def load_file(path: str, layout: NpzLayout) -> dict[str, np.ndarray]:
  """All arrays of one file, cast to their stored dtypes, with labels and values checked."""
  name = os.path.basename(path)
  with np.load(path, allow_pickle=False) as f:
    arrays = {}
    if "label" in layout.targets:
      labels = check_labels(f["label"], name)
      if labels.size and labels.max() >= layout.num_classes:
        raise ValueError(f"{name}: key 'label' has values outside 0..{layout.num_classes - 1} "
                         f"(max {labels.max()}); C = {layout.num_classes} comes from "
                         f"config.data.num_classes if > 0, else max(train label) + 1.")
      arrays["label"] = labels
    if "scores" in layout.targets:
      arrays["scores"] = check_scores(f["scores"], name)
    for key, (_, dtype) in layout.modalities.items():
      x = f[key]
      if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
          first = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
          raise ValueError(f"{name}: key {key!r} has {int(bad.sum())} NaN/Inf values (first in "
                           f"example {first}); expected finite numbers.")
      arrays[key] = x.astype(dtype, copy=False)
  return arrays


def load_splits(layout: NpzLayout, val_fraction: float,
                split_seed: int) -> dict[str, dict[str, np.ndarray]]:
  """'train' / 'val' / 'test' -> arrays; val from val.npz or a stratified hold-out of train."""
  splits = {split: load_file(path, layout) for split, path in layout.files.items()}
  if "val" not in splits:
    train = splits["train"]
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"val.npz: missing and config.data.val_fraction={val_fraction} is not in "
                       f"(0, 1), so no validation split can be held out of train.npz.")
    keep, held_out = builder_utils.stratified_partition(
        _strata(train), [1.0 - val_fraction, val_fraction], split_seed)
    if len(held_out) == 0 or len(keep) == 0:
      raise ValueError(f"train.npz: {len(train['label'])} examples are too few to hold out "
                       f"val_fraction={val_fraction} of them as validation; add val.npz.")
    splits["train"] = {k: v[keep] for k, v in train.items()}
    splits["val"] = {k: v[held_out] for k, v in train.items()}
  return splits


def _strata(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """What the validation hold-out keeps the proportions of: the class, the top-scored class, or
  (binary labels) nothing."""
  if "label" in arrays and arrays["label"].ndim == 1:
    return arrays["label"]
  if "scores" in arrays:
    return np.argmax(arrays["scores"], axis=-1)
  return np.zeros(len(arrays["label"]), np.int64)


# ---------------------------------------------------------------------------------------------
# TFDS builder


class I2m2Npz(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of a folder of .npz files; the knobs (layout) come in its KnobsConfig."""
  name = "i2m2_npz"
  VERSION = tfds.core.Version("1.1.0")  # bump whenever the dtype rule or the hold-out change
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "1.1.0": "Classes too small to stratify are held out without stratification; "
                            "multilabel and soft-label targets."}

  # Arrays already loaded and checked by `load_npz_dataset`; read from the files when unset.
  preloaded_splits: dict[str, dict[str, np.ndarray]] | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    knobs = self.builder_config.knobs
    features = {k: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))
                for k, (shape, dtype) in knobs["modalities"].items()}
    targets = knobs.get("targets", {"label": []})
    if "label" in targets:
      features["label"] = (tfds.features.ClassLabel(num_classes=knobs["num_classes"])
                           if not targets["label"] else
                           tfds.features.Tensor(shape=tuple(targets["label"]), dtype=np.int32))
    if "scores" in targets:
      features["scores"] = tfds.features.Tensor(shape=tuple(targets["scores"]), dtype=np.float32)
    # Kept in file order (TFDS would otherwise reorder by key hash).
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = self.preloaded_splits
    if splits is None:
      knobs = self.builder_config.knobs
      layout = layout_from_knobs(knobs)
      splits = load_splits(layout, knobs["val_fraction"], knobs["split_seed"])
    return {builder_utils.TFDS_SPLIT_NAMES[s]: self._generate_examples(arrays)
            for s, arrays in splits.items()}

  def _generate_examples(self, arrays: Mapping[str, np.ndarray]):
    first = next(iter(arrays.values()))
    for i in range(len(first)):
      example: dict[str, Any] = {k: arrays[k][i] for k in arrays}
      if "label" in example and example["label"].ndim == 0:
        example["label"] = int(example["label"])
      elif "label" in example:
        example["label"] = example["label"].astype(np.int32)
      yield i, example


def layout_knobs(layout: NpzLayout, val_fraction: float, split_seed: int) -> dict[str, Any]:
  return {"folder": layout.folder, "files": dict(layout.files),
          "modalities": {k: [list(s), d] for k, (s, d) in layout.modalities.items()},
          "num_classes": layout.num_classes, "fingerprint": [list(f) for f in layout.fingerprint],
          "targets": {k: list(v) for k, v in layout.targets.items()},
          "val_fraction": float(val_fraction), "split_seed": int(split_seed)}


def layout_from_knobs(knobs: Mapping[str, Any]) -> NpzLayout:
  return NpzLayout(folder=knobs["folder"], files=dict(knobs["files"]),
                   modalities={k: (tuple(s), d) for k, (s, d) in knobs["modalities"].items()},
                   num_classes=knobs["num_classes"],
                   fingerprint=tuple(tuple(f) for f in knobs["fingerprint"]),
                   targets={k: tuple(v) for k, v in knobs["targets"].items()})


@register_dataset(NAME)
def load_npz_dataset(data_config) -> Dataset:
  layout = scan_folder(data_config)
  val_fraction = float(data_config.get("val_fraction", 0.1))
  split_seed = int(data_config.get("split_seed", 0))
  config = builder_utils.knobs_config(layout_knobs(layout, val_fraction, split_seed),
                                      description=f"npz files in {layout.folder}")
  data_dir = builder_utils.data_dir_from_config(data_config)
  probe = I2m2Npz(config=config, data_dir=data_dir, file_format="array_record")
  # Read and check all values only when a build is needed; a build was checked when it was made.
  preloaded = None if probe.is_prepared() else load_splits(layout, val_fraction, split_seed)
  builder = builder_utils.prepare(I2m2Npz, config, data_dir, preloaded_splits=preloaded,
                                  source_files=list(layout.files.values()))
  label_names = tuple(n.strip() for n in str(data_config.get("label_names", "") or "").split(",")
                      if n.strip())
  if label_names and (len(layout.targets.get("label", ())) != 1
                      or len(label_names) != layout.targets["label"][0]):
    raise ValueError(f"config.data.label_names names {len(label_names)} labels; the 'label' "
                     f"array has per-example shape {layout.targets.get('label')}.")
  return Dataset(name=NAME,
                 modalities={k: tuple(s) for k, (s, _) in layout.modalities.items()},
                 num_classes=layout.num_classes,
                 sources=builder_utils.split_sources(builder),
                 targets=dict(layout.targets), task=layout.task, label_names=label_names,
                 provenance=builder_utils.provenance(builder, layout.folder))
