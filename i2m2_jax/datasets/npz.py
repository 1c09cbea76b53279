"""`npz`: bring your own multi-modal data as NumPy .npz files.

Set `--config.data.path=DIR`, a folder holding

* `train.npz` and `test.npz` (required), `val.npz` (optional; without it a stratified hold-out of
  `config.data.val_fraction` of train, seeded by `config.data.split_seed`, becomes the validation
  split and leaves train);
* in each file: `label`, integer classes 0..C-1 of shape [N], and one array per modality under
  any other key, first axis N: vectors [N, D], sequences [N, T, F], images [N, H, W, C], e.g.
  `np.savez(DIR + '/train.npz', image=images, audio=spectrograms, label=labels)`.

Modality order (for the model) is the key order of train.npz. The number of classes C is
`config.data.num_classes` when > 0, else max(train label) + 1.

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

import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "npz"
REQUIRED_FILES = {"train": "train.npz", "test": "test.npz"}
OPTIONAL_FILES = {"val": "val.npz"}
RESERVED_KEYS = ("mask",)  # 'label' is the label; 'mask' is the trainer's padding flag


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


def check_labels(labels: np.ndarray, file_name: str) -> np.ndarray:
  """Labels as int64 [N]; ValueError unless they are whole numbers >= 0 of shape [N]."""
  if labels.ndim != 1:
    raise ValueError(f"{file_name}: key 'label' has shape {labels.shape}; expected [N] integer "
                     f"classes (one per example).")
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
  return labels


def _load_labels(path: str) -> np.ndarray:
  with np.load(path, allow_pickle=False) as f:
    return check_labels(f["label"], os.path.basename(path))


def _check_file_structure(path: str, headers) -> None:
  """One file on its own: a label, >= 1 modality, equal first axes, supported dtypes."""
  name = os.path.basename(path)
  if "label" not in headers:
    raise ValueError(f"{name}: no key 'label'; expected integer class labels of shape [N] next "
                     f"to the modality arrays (found keys {list(headers)}).")
  modalities = [k for k in headers if k != "label"]
  if not modalities:
    raise ValueError(f"{name}: no modality; expected one array per modality besides 'label'.")
  num_examples = headers["label"][0][0] if headers["label"][0] else 0
  if num_examples == 0:
    raise ValueError(f"{name}: key 'label' holds no examples; expected shape [N] with N >= 1.")
  for key in modalities:
    shape, dtype = headers[key]
    if key in RESERVED_KEYS:
      raise ValueError(f"{name}: key {key!r} is reserved; rename that modality.")
    if len(shape) < 2:
      raise ValueError(f"{name}: key {key!r} has shape {shape}; expected [N, ...] with at least "
                       f"one per-example axis (use x[:, None] for a scalar feature).")
    if shape[0] != num_examples:
      raise ValueError(f"{name}: key {key!r} has {shape[0]} examples (first axis) but 'label' "
                       f"has {num_examples}; the first axes must match.")
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
                for k, (shape, dtype) in headers["train"].items() if k != "label"}
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
    extra = [k for k in headers[split] if k != "label" and k not in modalities]
    if extra:
      raise ValueError(f"{name}: key(s) {extra} are not in {train_name}; every file needs the "
                       f"same keys.")

  num_classes = int(data_config.get("num_classes", -1) or -1)
  train_labels = _load_labels(files["train"])
  if num_classes <= 0:
    num_classes = int(train_labels.max()) + 1
  return NpzLayout(folder=folder, files=files,
                   modalities={k: (s, d.name) for k, (s, d) in modalities.items()},
                   num_classes=num_classes, fingerprint=_fingerprint(files))


# ---------------------------------------------------------------------------------------------
# Data: full read, value checks, hold-out


def load_file(path: str, layout: NpzLayout) -> dict[str, np.ndarray]:
  """All arrays of one file, cast to their stored dtypes, with labels and values checked."""
  name = os.path.basename(path)
  with np.load(path, allow_pickle=False) as f:
    labels = check_labels(f["label"], name)
    if labels.size and labels.max() >= layout.num_classes:
      raise ValueError(f"{name}: key 'label' has values outside 0..{layout.num_classes - 1} "
                       f"(max {labels.max()}); C = {layout.num_classes} comes from "
                       f"config.data.num_classes if > 0, else max(train label) + 1.")
    arrays = {"label": labels}
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
        train["label"], [1.0 - val_fraction, val_fraction], split_seed)
    if len(held_out) == 0 or len(keep) == 0:
      raise ValueError(f"train.npz: {len(train['label'])} examples are too few to hold out "
                       f"val_fraction={val_fraction} of them as validation; add val.npz.")
    splits["train"] = {k: v[keep] for k, v in train.items()}
    splits["val"] = {k: v[held_out] for k, v in train.items()}
  return splits


# ---------------------------------------------------------------------------------------------
# TFDS builder


class I2m2Npz(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of a folder of .npz files; the knobs (layout) come in its KnobsConfig."""
  name = "i2m2_npz"
  VERSION = tfds.core.Version("1.0.0")  # bump whenever the dtype rule or the hold-out change
  RELEASE_NOTES = {"1.0.0": "First version."}

  # Arrays already loaded and checked by `load_npz_dataset`; read from the files when unset.
  preloaded_splits: dict[str, dict[str, np.ndarray]] | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    knobs = self.builder_config.knobs
    features = {k: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))
                for k, (shape, dtype) in knobs["modalities"].items()}
    features["label"] = tfds.features.ClassLabel(num_classes=knobs["num_classes"])
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
    keys = [k for k in arrays if k != "label"]
    for i in range(len(arrays["label"])):
      example: dict[str, Any] = {k: arrays[k][i] for k in keys}
      example["label"] = int(arrays["label"][i])
      yield i, example


def layout_knobs(layout: NpzLayout, val_fraction: float, split_seed: int) -> dict[str, Any]:
  return {"folder": layout.folder, "files": dict(layout.files),
          "modalities": {k: [list(s), d] for k, (s, d) in layout.modalities.items()},
          "num_classes": layout.num_classes, "fingerprint": [list(f) for f in layout.fingerprint],
          "val_fraction": float(val_fraction), "split_seed": int(split_seed)}


def layout_from_knobs(knobs: Mapping[str, Any]) -> NpzLayout:
  return NpzLayout(folder=knobs["folder"], files=dict(knobs["files"]),
                   modalities={k: (tuple(s), d) for k, (s, d) in knobs["modalities"].items()},
                   num_classes=knobs["num_classes"],
                   fingerprint=tuple(tuple(f) for f in knobs["fingerprint"]))


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
  builder = builder_utils.prepare(I2m2Npz, config, data_dir, preloaded_splits=preloaded)
  return Dataset(name=NAME,
                 modalities={k: tuple(s) for k, (s, _) in layout.modalities.items()},
                 num_classes=layout.num_classes,
                 sources=builder_utils.split_sources(
                     builder, builder_utils.in_memory_limit_bytes(data_config)))
