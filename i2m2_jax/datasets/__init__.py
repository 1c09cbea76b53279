"""Data sets: TFDS builders (array_record, no TensorFlow) and a registry from config names.

Every data set reaches the trainer as a `Dataset`: the modalities' per-example shapes, the number
of classes, and one random-access source of example dicts per split ('train', 'val', 'test'),
each example {modality: np.ndarray, ..., 'label': int}. A source is whatever `tfds.data_source`
returns (or any sequence of such dicts, which tests use); `i2m2_jax.input_pipeline` turns it into
batches with grain.

`load_dataset(config.data)` looks `config.data.name` up in `DATASETS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  modalities: Mapping[str, tuple[int, ...]]  # modality -> per-example shape, in model order
  num_classes: int
  sources: Mapping[str, Sequence[Mapping[str, Any]]]  # split -> random-access examples

  def __post_init__(self):
    missing = [s for s in SPLITS if s not in self.sources]
    if missing:
      raise ValueError(f"Data set {self.name!r} has no split(s) {missing}; every data set needs "
                       f"{list(SPLITS)}.")
    for bad in ("label", "mask"):
      if bad in self.modalities:
        raise ValueError(f"Data set {self.name!r}: {bad!r} is reserved and cannot name a modality.")


# name -> loader(data_config) -> Dataset. Each module below registers itself on import.
DATASETS: dict[str, Callable[[Any], Dataset]] = {}


def register_dataset(name: str):
  def decorator(loader):
    DATASETS[name] = loader
    return loader
  return decorator


def load_dataset(data_config) -> Dataset:
  _import_builtin_datasets()
  if data_config.name not in DATASETS:
    raise ValueError(f"config.data.name={data_config.name!r} is unknown; expected one of "
                     f"{sorted(DATASETS)}.")
  return DATASETS[data_config.name](data_config)


def _import_builtin_datasets():
  # Imported lazily so that `import i2m2_jax` stays light and free of TFDS.
  from i2m2_jax.datasets import avmnist, digits, mimic, npz, synthetic  # noqa: F401  pylint: disable=g-import-not-at-top
