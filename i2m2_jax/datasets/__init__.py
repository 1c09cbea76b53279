"""Data sets: TFDS builders (array_record, no TensorFlow) and a registry from config names.

Every data set reaches the trainer as a `Dataset`: the modalities' per-example shapes, its
targets' per-example shapes and default task (`i2m2_jax.tasks`), and one random-access source of
example dicts per split ('train', 'val', 'test'), each example {modality: np.ndarray, ...,
target key: value} (targets: 'label' an int or int [L], 'scores' float [C]). A source is whatever
`tfds.data_source` returns (or any sequence of such dicts, which tests use);
`i2m2_jax.input_pipeline` turns it into batches with grain.

`load_dataset(config.data)` looks `config.data.name` up in `DATASETS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
TARGET_KEYS = ("label", "scores")  # what a task may read; never a modality name
RESERVED_KEYS = TARGET_KEYS + ("mask",)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set as the trainer sees it.

  Attributes:
    name: the registry name (config.data.name).
    modalities: modality -> per-example shape, in model order.
    num_classes: classes of the label (per label for multilabel data; C for soft labels).
    sources: split -> random-access examples.
    targets: target key -> per-example shape: {'label': ()} (one class per example), {'label':
      (L,)} (L binary labels), {'scores': (C,)} (soft labels), possibly with 'label' beside it.
    task: the default `config.task.name` for this data.
    label_names: the names of the L labels of multilabel data ('' -> label_0, ...).
    provenance: what results.json records about where the data came from (`data.source` and a
      `fingerprint` of what was read).
    extra_test_splits: results.json key -> random-access examples of a further test set, which
      the trainer evaluates with the best checkpoint like 'test' (e.g. VQA-VS's
      out-of-distribution test sets 'ood_QT', ...; NLVR2's 'balanced_test1').
    extra_test_mean: the results.json key of the unweighted mean of the extra test sets' metrics
      ('' for none; VQA-VS: 'ood_mean').
  """
  name: str
  modalities: Mapping[str, tuple[int, ...]]
  num_classes: int
  sources: Mapping[str, Sequence[Mapping[str, Any]]]
  targets: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=lambda: {"label": ()})
  task: str = "multiclass"
  label_names: tuple[str, ...] = ()
  provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra_test_splits: Mapping[str, Sequence[Mapping[str, Any]]] = dataclasses.field(
      default_factory=dict)
  extra_test_mean: str = ""

  def __post_init__(self):
    missing = [s for s in SPLITS if s not in self.sources]
    if missing:
      raise ValueError(f"Data set {self.name!r} has no split(s) {missing}; every data set needs "
                       f"{list(SPLITS)}.")
    for bad in RESERVED_KEYS:
      if bad in self.modalities:
        raise ValueError(f"Data set {self.name!r}: {bad!r} is reserved and cannot name a modality.")
    extra = [*self.extra_test_splits, *([self.extra_test_mean] if self.extra_test_mean else [])]
    if len(set(extra)) != len(extra) or set(extra) & set(SPLITS):
      raise ValueError(f"Data set {self.name!r}: the extra test sets' names {extra} must differ "
                       f"from each other and from {list(SPLITS)}.")
    unknown = [k for k in self.targets if k not in TARGET_KEYS]
    if unknown or not self.targets:
      raise ValueError(f"Data set {self.name!r}: targets {list(self.targets)}; expected some of "
                       f"{list(TARGET_KEYS)}.")

  def train_targets(self, key: str) -> np.ndarray:
    """Every training example's `key` target, [N, ...] (read from the source's columns when it
    holds them in memory, else example by example)."""
    from i2m2_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.read_column(self.sources["train"], key)


# name -> loader(data_config) -> Dataset. Each module below registers itself on import.
DATASETS: dict[str, Callable[[Any], Dataset]] = {}


def register_dataset(name: str):
  def decorator(loader):
    DATASETS[name] = loader
    return loader
  return decorator


def load_dataset(data_config) -> Dataset:
  """The data set config.data names, with its train and val splits (read again and again) in
  host memory when each is at most config.data.in_memory_max_gb GiB (decoding array_record at
  every batch cannot keep a GPU busy); the test split is read once, from its files."""
  _import_builtin_datasets()
  if data_config.name not in DATASETS:
    raise ValueError(f"config.data.name={data_config.name!r} is unknown; expected one of "
                     f"{sorted(DATASETS)}.")
  return keep_in_memory(DATASETS[data_config.name](data_config),
                        data_config.get("in_memory_max_gb", 0.0))


def keep_in_memory(dataset: Dataset, max_gb: float) -> Dataset:
  """`dataset` with its train and val splits read into memory when each is at most `max_gb` GiB
  (`input_pipeline.in_memory`; <= 0: never)."""
  from i2m2_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(dataset, sources={
      split: input_pipeline.in_memory(source, max_gb, f"{dataset.name}/{split}")
      if split in ("train", "val") else source for split, source in dataset.sources.items()})


def _import_builtin_datasets():
  # Imported lazily so that `import i2m2_jax` stays light and free of TFDS.
  from i2m2_jax.datasets import avmnist, digits, mimic, nlvr2, npz, synthetic, vqa_vs  # noqa: F401  pylint: disable=g-import-not-at-top
