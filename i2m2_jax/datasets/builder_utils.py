"""Shared plumbing for the TFDS builders: cache names from knobs, build-then-read, provenance.

Every builder here is a `tfds.core.GeneratorBasedBuilder` written as array_record (readable without
TensorFlow) and read back with `builder.as_data_source(split)`. The knobs that change the data
go into a `KnobsConfig` whose name is a short hash of them, so a cached build is reused only for
the very same knobs (see `knobs_config`). Which splits are then held in memory is decided once,
by config.data.in_memory_max_gb (`datasets.load_dataset`).

A build records where its data came from and a SHA-256 fingerprint of the files it read
(`source_fingerprint.json` beside the build); results.json carries both (`provenance`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import SPLITS

# Trainer split name -> TFDS split name.
TFDS_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
FINGERPRINT_FILE = "source_fingerprint.json"


@dataclasses.dataclass(eq=False)
class KnobsConfig(tfds.core.BuilderConfig):
  """A BuilderConfig that carries the data knobs its builder reads (JSON-able values)."""
  knobs: dict[str, Any] = dataclasses.field(default_factory=dict)


def short_hash(value: Any, length: int = 12) -> str:
  """A stable hex digest of a JSON-able value (dict keys sorted)."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
  return hashlib.sha256(text.encode()).hexdigest()[:length]


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, np.ndarray)):
    return list(value)
  raise TypeError(f"Not JSON-able: {value!r}")


class _DropCustomConfigWarning(std_logging.Filter):
  """TFDS warns 'Using custom data configuration' on every load of a KnobsConfig; that is the
  design here, not a problem, so the message is dropped."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


std_logging.getLogger("absl").addFilter(_DropCustomConfigWarning())


def knobs_config(knobs: Mapping[str, Any], description: str = "") -> KnobsConfig:
  """A config named after the hash of `knobs`: other knobs, other name, so no stale cache."""
  knobs = json.loads(json.dumps(dict(knobs), default=_json_default))  # plain, comparable values
  return KnobsConfig(name=f"h{short_hash(knobs)}", description=description or None, knobs=knobs)


def data_dir_from_config(data_config) -> str | None:
  """config.data.data_dir, with "" meaning the TFDS default (TFDS_DATA_DIR or
  ~/tensorflow_datasets)."""
  data_dir = data_config.get("data_dir", "") or ""
  return os.path.expanduser(data_dir) if data_dir else None


def manual_dir(data_config, builder: tfds.core.DatasetBuilder) -> str:
  """config.data.manual_dir, with "" meaning TFDS's <data_dir>/downloads/manual of `builder`."""
  folder = data_config.get("manual_dir", "") or ""
  if folder:
    return os.path.expanduser(folder)
  return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def prepare(builder_cls, config: KnobsConfig, data_dir: str | None, *,
            source_files: Sequence[str] = (), **builder_attrs) -> tfds.core.DatasetBuilder:
  """Builds `builder_cls(config)` into data_dir as array_record unless that build exists, and
  records the fingerprint of `source_files` (the files the build reads; none for generated
  data, whose knobs are its fingerprint) beside it.

  `builder_attrs` are set on the builder before preparing (e.g. arrays a loader validated already),
  so a builder need not read its inputs twice. Several processes may build the same data set at
  once: each writes into its own temporary folder and the loser of the final rename finds the
  winner's build, which it then uses.
  """
  builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  for name, value in builder_attrs.items():
    setattr(builder, name, value)
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      raise
    logging.info("%s/%s was built by another process meanwhile; using that build.",
                 builder.name, config.name)
    return builder
  fingerprint = (files_fingerprint(source_files) if source_files
                 else "knobs:" + short_hash(config.knobs, length=64))
  _write_json(os.path.join(os.fspath(builder.data_path), FINGERPRINT_FILE),
              {"fingerprint": fingerprint, "files": [os.path.basename(f) for f in source_files]})
  return builder


def files_fingerprint(paths: Sequence[str], chunk_size: int = 2**20) -> str:
  """'sha256:<hex>' over the names and contents of the files, in sorted order."""
  digest = hashlib.sha256()
  for path in sorted(paths, key=os.path.basename):
    digest.update(os.path.basename(path).encode() + b"\0")
    with open(path, "rb") as f:
      while chunk := f.read(chunk_size):
        digest.update(chunk)
  return "sha256:" + digest.hexdigest()


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def provenance(builder: tfds.core.DatasetBuilder, source: str) -> dict[str, Any]:
  """What results.json records about the data: `source` (the folder or generator it came from),
  the build it was read from, and the fingerprint the build recorded."""
  path = os.path.join(os.fspath(builder.data_path), FINGERPRINT_FILE)
  try:
    with open(path) as f:
      fingerprint = json.load(f)["fingerprint"]
  except (OSError, ValueError, KeyError):
    fingerprint = "unknown (built before fingerprints were recorded)"
  return {"source": source, "build": os.fspath(builder.data_path), "fingerprint": fingerprint}


def split_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """{'train'|'val'|'test': random-access source} of a prepared builder."""
  return {split: builder.as_data_source(TFDS_SPLIT_NAMES[split]) for split in SPLITS}


def stratified_partition(labels: np.ndarray, fractions: Sequence[float],
                         seed: int) -> list[np.ndarray]:
  """Splits indices 0..N-1 into len(fractions) parts keeping each class's proportions.

  Per class, a seeded permutation of its indices is cut at round(cumsum(fractions) * n_class).
  Classes too small for that (fewer than one example expected in the smallest part, e.g. 3
  examples and a 10 % part) are pooled and their pool is cut the same way, without
  stratification, so that the parts still get the requested fractions; the log says so. Each
  part is returned sorted, so examples keep their original order. Deterministic in (labels,
  fractions, seed).
  """
  labels = np.asarray(labels)
  fractions = np.asarray(fractions, dtype=np.float64)
  fractions = fractions / fractions.sum()
  rng = np.random.default_rng(seed)
  parts = [[] for _ in fractions]

  def cut(members):
    bounds = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
    for part, chunk in zip(parts, np.split(members, bounds)):
      part.append(chunk)

  classes, counts = np.unique(labels, return_counts=True)  # sorted: the rng draws in fixed order
  small = counts * fractions.min() < 1.0
  for cls in classes[~small]:
    cut(rng.permutation(np.flatnonzero(labels == cls)))
  if small.any():
    pool = np.flatnonzero(np.isin(labels, classes[small]))
    logging.info("%d of %d classes have too few examples to split by class at fractions %s; "
                 "their %d examples are split without stratification.", small.sum(),
                 len(classes), np.round(fractions, 4).tolist(), len(pool))
    cut(rng.permutation(pool))
  return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
