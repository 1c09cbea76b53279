"""Feature files: arrays computed elsewhere (e.g. by a frozen vision-and-language backbone,
`experiments/extract_features.py`), one file per split, served as random-access sources.

A feature file is either

* a folder holding one `<key>.npy` per key (what extract_features.py writes; memory-mapped, so
  nothing is read before it is used and the operating system caches what is), or
* an `.npz` file written by `np.savez` (read into memory),

each array with the examples on its first axis. Which keys a data set reads and what they hold
is the data set's business (datasets/vqa_vs.py: `question_id`, `image`, `text`, `fused`;
datasets/nlvr2.py: `text`, `image_0`, `image_1`, `fused_0`, `fused_1`, `label`); keys it does
not read are ignored. Features are float16 or float32 (kept as they are; other floats become
float32), finite, of any per-example shape; ids and labels are integers.

These data sets are not copied into a TFDS build: the arrays are already random-access on disk,
and VQA-VS's features alone are gigabytes. `FeatureSource` reads batches from them directly, and
turns sparse soft targets (a few answers per question out of thousands) into dense scores one
batch at a time.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

# Kinds of arrays a data set asks for: features (float, [N, ...]) or integers ([N]).
FEATURES, INTEGERS = "features", "integers"
FEATURE_DTYPES = (np.float16, np.float32)  # kept as stored; other floats become float32


def manual_dir(data_config, expected: str) -> str:
  """config.data.manual_dir, which must be a folder (`expected` says what it should hold)."""
  root = os.path.expanduser(data_config.get("manual_dir", "") or "")
  if not os.path.isdir(root):
    raise ValueError(f"config.data.manual_dir={root!r} is not a folder; expected {expected}.")
  return root


def resolve(root: str, template: str, split: str) -> str:
  """The feature file of `split`: `template` with {split} filled in, relative to `root`: that
  folder (of <key>.npy files) or file, else the same name + '.npz'. ValueError when none exists."""
  path = os.path.join(root, template.format(split=split))
  for candidate in (path, path + ".npz"):
    if os.path.isdir(candidate) or os.path.isfile(candidate):
      return candidate
  raise ValueError(f"{path}: no feature file for split {split!r}; expected a folder of <key>.npy "
                   f"files or an .npz file (also tried {path}.npz).")


def files_of(path: str) -> list[str]:
  """The files a feature file consists of (the .npz, or the .npy files of the folder)."""
  if os.path.isdir(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy"))
  return [path]


def _open(path: str) -> dict[str, Any]:
  """key -> array (memory-mapped for a folder of .npy files)."""
  if os.path.isdir(path):
    return {os.path.basename(f)[:-len(".npy")]: np.load(f, mmap_mode="r", allow_pickle=False)
            for f in files_of(path)}
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: cannot read it as an .npz file written by np.savez ({e}).") from e


def _check_finite(x: np.ndarray, path: str, key: str, chunk: int = 8192) -> None:
  for start in range(0, len(x), chunk):
    bad = ~np.isfinite(x[start:start + chunk])
    if bad.any():
      first = start + int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
      raise ValueError(f"{path}: key {key!r} has NaN or Inf values (first in example {first}); "
                       f"expected finite features.")


def read(path: str, kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
  """The arrays `kinds` names (key -> FEATURES or INTEGERS) of one feature file, checked: every
  key present, one first axis, features float and finite with at least one per-example axis,
  integers whole. Errors name the file and the key."""
  arrays = _open(path)
  out = {}
  for key, kind in kinds.items():
    if key not in arrays:
      raise ValueError(f"{path}: no key {key!r}; expected the keys {list(kinds)} (found "
                       f"{sorted(arrays)}).")
    x = arrays[key]
    if kind == INTEGERS:
      if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{path}: key {key!r} has shape {x.shape} and dtype {x.dtype}; expected "
                         f"integers [N].")
      x = np.asarray(x, np.int64)
    else:
      if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: key {key!r} has shape {x.shape} and dtype {x.dtype}; expected "
                         f"float features [N, ...] (float16 or float32).")
      if x.dtype not in FEATURE_DTYPES:
        x = np.asarray(x, np.float32)
      _check_finite(x, path, key)
    out[key] = x
  lengths = {k: len(v) for k, v in out.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{path}: the keys disagree on the number of examples (first axes "
                     f"{lengths}); they must match.")
  return out


def check_same_shapes(files: Mapping[str, Mapping[str, np.ndarray]], keys: Sequence[str]) -> None:
  """Every file (path -> arrays) has the first one's per-example shape for each feature key."""
  (first, reference), *others = files.items()
  for path, arrays in others:
    for key in keys:
      if arrays[key].shape[1:] != reference[key].shape[1:]:
        raise ValueError(f"{path}: key {key!r} has per-example shape {arrays[key].shape[1:]}, "
                         f"but {first} has {reference[key].shape[1:]}; they must match.")


def split_names(value: Any) -> list[str]:
  """A config field listing splits, 'a,b,c' (or a sequence), as a list."""
  return [s.strip() for s in (value.split(",") if isinstance(value, str) else value or ())
          if s.strip()]


class SparseScores:
  """Soft targets stored sparsely: per example up to K (class, score) pairs, class -1 for none;
  densified to [B, num_classes] a batch at a time."""

  def __init__(self, classes: np.ndarray, scores: np.ndarray, num_classes: int):
    self.classes = np.asarray(classes, np.int32)   # [N, K]
    self.scores = np.asarray(scores, np.float32)   # [N, K]
    self.num_classes = int(num_classes)

  def dense(self, indices: np.ndarray) -> np.ndarray:
    classes, scores = self.classes[indices], self.scores[indices]
    out = np.zeros((len(indices), self.num_classes), np.float32)
    rows, slots = np.nonzero(classes >= 0)
    out[rows, classes[rows, slots]] = scores[rows, slots]
    return out


class FeatureSource(Sequence):
  """Examples read from feature arrays: example i is row `rows[i]` of every array in `features`
  (key -> [N_file, ...], possibly memory-mapped), with its targets: `labels` (int [N], as
  'label') and/or `scores` (SparseScores over the N examples, as dense 'scores').

  Same contract as input_pipeline.InMemorySource (`len`, `[i]`, `gather` for whole batches).
  """

  def __init__(self, features: Mapping[str, np.ndarray], rows: np.ndarray, *,
               labels: np.ndarray | None = None, scores: SparseScores | None = None):
    self.features = dict(features)
    self.rows = np.asarray(rows, np.int64)
    self.labels = None if labels is None else np.asarray(labels, np.int64)
    self.scores = scores

  def __len__(self) -> int:
    return len(self.rows)

  def gather(self, indices: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    rows = self.rows[indices]
    out = {}
    for key in keys:
      if key == "label" and self.labels is not None:
        out[key] = self.labels[indices]
      elif key == "scores" and self.scores is not None:
        out[key] = self.scores.dense(indices)
      else:
        out[key] = np.asarray(self.features[key][rows])
    return out

  def __getitem__(self, index):
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    keys = [*self.features, *(["label"] if self.labels is not None else []),
            *(["scores"] if self.scores is not None else [])]
    example = {k: v[0] for k, v in self.gather(np.array([index % len(self)]), keys).items()}
    if "label" in example:
      example["label"] = int(example["label"])
    return example

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def subset(self, indices: np.ndarray) -> "FeatureSource":
    """The examples `indices` (of this source) as a source of their own."""
    indices = np.asarray(indices, np.int64)
    scores = None if self.scores is None else SparseScores(
        self.scores.classes[indices], self.scores.scores[indices], self.scores.num_classes)
    return FeatureSource(self.features, self.rows[indices], scores=scores,
                         labels=None if self.labels is None else self.labels[indices])

  def __repr__(self) -> str:
    shapes = {k: (v.shape[1:], str(v.dtype)) for k, v in self.features.items()}
    return f"FeatureSource(n={len(self)}, {shapes})"
