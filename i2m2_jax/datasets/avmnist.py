"""`avmnist`: AV-MNIST as distributed by MultiBench (`avmnist.tar.gz`), built into TFDS.

Modalities (NHWC, in this order): 'image' [28, 28, 1] (MNIST digits with reduced information)
and 'audio' [112, 112, 1] (FSDD spoken-digit spectrograms mixed with ESC-50 noise); 10 classes.

Files expected in the manual folder (config.data.manual_dir; "" = <data_dir>/downloads/manual),
either directly or in an `avmnist/` subfolder, as the tarball unpacks:

  image/train_data.npy  [N, 784] (or [N, 28, 28])    image/test_data.npy  [M, 784]
  audio/train_data.npy  [N, 112, 112]                audio/test_data.npy  [M, 112, 112]
  train_labels.npy      [N] ints 0..9                test_labels.npy      [M]

(MultiBench: N = 60000, M = 10000, values 0..255.)

Preprocessing as the reference (`datasets/avmnist/get_data.py`): both modalities divided by 255,
no augmentation, no mean/std normalisation. How it is stored, per modality:

* values all integral in 0..255 -> uint8 0..255; the trainer divides uint8 inputs by 255 when
  config.data.standardize is False (as configs/avmnist.py sets), which gives the reference's x/255;
* otherwise -> float32 x/255 already.

The choice is made by scanning the files once, before the first build, and is part of the build's
config name. Splits as the reference: train = all but the last `num_val` training rows, val = the
last `num_val` rows (config.data.num_val, default 5000: 55000/5000), test = the test files; rows
keep their file order.
"""
from __future__ import annotations

import itertools
import os
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "avmnist"
MODALITY_SHAPES = {"image": (28, 28, 1), "audio": (112, 112, 1)}
NUM_CLASSES = 10
DEFAULT_NUM_VAL = 5000
STORAGE_DTYPES = ("uint8", "float32")
_CHUNK_ROWS = 1000  # rows per chunk when scanning memory-mapped files

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
AV-MNIST is distributed by MultiBench (https://github.com/pliang279/MultiBench, README section
"Multimedia"; the I2M2 code links the same archive): download `avmnist.tar.gz` and unpack it, e.g.

  tar -xzf avmnist.tar.gz -C <manual_dir>

so that <manual_dir> (config.data.manual_dir) holds, directly or under `avmnist/`:

  image/train_data.npy (60000 x 784)     image/test_data.npy (10000 x 784)
  audio/train_data.npy (60000 x 112 x 112)   audio/test_data.npy (10000 x 112 x 112)
  train_labels.npy (60000)               test_labels.npy (10000)
"""

def _split_files(split: str) -> dict[str, tuple[str, tuple[tuple[int, ...], ...]]]:
  """(file inside the folder, accepted per-row shapes) of each array of 'train' or 'test'."""
  return {
      "image": (f"image/{split}_data.npy", ((784,), (28, 28))),
      "audio": (f"audio/{split}_data.npy", ((112, 112),)),
      "label": (f"{split}_labels.npy", ((), (1,))),
  }


def write_split(root: str, split: str, image: np.ndarray, audio: np.ndarray,
                label: np.ndarray) -> None:
  """Writes one split ('train' or 'test') in MultiBench's layout under root, the files this
  builder reads: for data made here (tests, the benchmark, experiments/digits_as_avmnist.py)."""
  for key, array in (("image", image), ("audio", audio), ("label", label)):
    path = os.path.join(root, _split_files(split)[key][0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, array)


# ---------------------------------------------------------------------------------------------
# Reading and checking the files


def source_files(root: str) -> list[str]:
  """The files a build reads (for its fingerprint)."""
  return [os.path.join(root, path) for split in ("train", "test")
          for path, _ in _split_files(split).values()]


def find_root(manual_dir: str) -> str:
  """The folder holding image/, audio/ and the labels: manual_dir or its avmnist/ subfolder."""
  nested = os.path.join(manual_dir, "avmnist")
  if not os.path.isdir(os.path.join(manual_dir, "image")) and os.path.isdir(nested):
    return nested
  return manual_dir


def _expected(rows, accepted) -> str:
  return " or ".join(str((rows,) + shape) for shape in accepted)


def _open_array(path: str, accepted: tuple[tuple[int, ...], ...]) -> np.ndarray:
  """The .npy at path, memory-mapped, after checking that each row has an accepted shape."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"AV-MNIST file {path} is missing; expected an array of shape "
        f"{_expected('N', accepted)}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"AV-MNIST file {path} is not a plain numeric .npy array: {e}") from e
  if array.ndim < 1 or array.shape[1:] not in accepted or array.dtype.kind not in "biuf":
    rows = array.shape[0] if array.ndim else "N"
    raise ValueError(f"AV-MNIST file {path} has shape {array.shape} and dtype {array.dtype}; "
                     f"expected a numeric array of shape {_expected(rows, accepted)}.")
  return array


def open_split(root: str, split: str) -> dict[str, np.ndarray]:
  """{'image', 'audio', 'label'} arrays of 'train' or 'test', checked for shape and row counts;
  the labels are loaded as int64, the rest stay memory-mapped."""
  files = _split_files(split)
  arrays = {key: _open_array(os.path.join(root, rel), accepted)
            for key, (rel, accepted) in files.items()}
  rows = {files[k][0]: len(a) for k, a in arrays.items()}
  if len(set(rows.values())) != 1:
    raise ValueError(f"AV-MNIST {split} files in {root} disagree on the number of rows: {rows}.")
  arrays["label"] = _labels(np.asarray(arrays["label"]).reshape(-1),
                            os.path.join(root, files["label"][0]))
  return arrays


def _labels(values: np.ndarray, path: str) -> np.ndarray:
  labels = values.astype(np.int64)
  if (labels != values).any() or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
    raise ValueError(f"AV-MNIST labels in {path} must be integers 0..{NUM_CLASSES - 1}; got values "
                     f"in [{values.min()}, {values.max()}].")
  return labels


def is_integral_byte_range(array: np.ndarray) -> bool:
  """Whether every value is an integer in 0..255 (scanned in chunks; stops at the first miss)."""
  for start in range(0, len(array), _CHUNK_ROWS):
    chunk = np.asarray(array[start:start + _CHUNK_ROWS])
    if chunk.size and (chunk.min() < 0 or chunk.max() > 255):
      return False
    if chunk.dtype.kind == "f" and not np.array_equal(chunk, np.floor(chunk)):
      return False  # also catches NaN
  return True


def storage_dtypes(root: str) -> dict[str, str]:
  """Per modality 'uint8' if both its files are integral 0..255, else 'float32' (module doc)."""
  splits = [open_split(root, s) for s in ("train", "test")]
  return {m: ("uint8" if all(is_integral_byte_range(s[m]) for s in splits) else "float32")
          for m in MODALITY_SHAPES}


def to_stored(row: np.ndarray, modality: str, dtype: str) -> np.ndarray:
  """One example of a modality as stored: uint8 0..255 or float32 x/255, NHWC."""
  row = np.asarray(row).reshape(MODALITY_SHAPES[modality])
  if dtype == "uint8":
    stored = row.astype(np.uint8)
    if not np.array_equal(stored, row):
      raise ValueError(f"AV-MNIST {modality} values are not integers in 0..255; build the "
                       f"'float32' storage for it instead.")
    return stored
  return (row / 255.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# TFDS builder


def builder_config(num_val: int, dtypes: Mapping[str, str]) -> builder_utils.KnobsConfig:
  """Knobs: num_val and the per-modality storage dtype; the name spells them out (plus a hash)."""
  knobs = {"num_val": int(num_val), "image_dtype": dtypes["image"],
           "audio_dtype": dtypes["audio"]}
  name = (f"val{num_val}_image_{dtypes['image']}_audio_{dtypes['audio']}_"
          f"h{builder_utils.short_hash(knobs, 8)}")
  return builder_utils.KnobsConfig(name=name, knobs=knobs)


class I2m2Avmnist(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of AV-MNIST from MultiBench's .npy files (see module docstring)."""
  name = "i2m2_avmnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MultiBench AV-MNIST; val = last num_val training rows."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # A loader may set this to the folder it already checked (else dl_manager.manual_dir is used).
  root_dir: str | None = None

  def _dtype(self, modality: str) -> str:
    return self.builder_config.knobs[f"{modality}_dtype"]

  def _info(self) -> tfds.core.DatasetInfo:
    features = {m: tfds.features.Tensor(shape=s, dtype=np.dtype(self._dtype(m)))
                for m, s in MODALITY_SHAPES.items()}
    features["label"] = tfds.features.ClassLabel(num_classes=NUM_CLASSES)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        homepage="https://github.com/pliang279/MultiBench")

  def _split_generators(self, dl_manager):
    root = self.root_dir or find_root(os.fspath(dl_manager.manual_dir))
    train, test = open_split(root, "train"), open_split(root, "test")
    num_val, num_train = self.builder_config.knobs["num_val"], len(train["label"])
    if not 0 < num_val < num_train:
      raise ValueError(f"config.data.num_val={num_val} must be in [1, {num_train - 1}]: the "
                       f"training files in {root} have {num_train} rows.")
    cut = num_train - num_val
    return {"train": self._generate_examples(train, range(cut)),
            "validation": self._generate_examples(train, range(cut, num_train)),
            "test": self._generate_examples(test, range(len(test["label"])))}

  def _generate_examples(self, arrays, rows):
    for i in rows:
      example = {m: to_stored(arrays[m][i], m, self._dtype(m)) for m in MODALITY_SHAPES}
      example["label"] = int(arrays["label"][i])
      yield int(i), example


# ---------------------------------------------------------------------------------------------
# Loader


def _manual_dir(data_config, data_dir: str | None) -> str:
  manual_dir = data_config.get("manual_dir", "") or ""
  if manual_dir:
    return os.path.expanduser(manual_dir)
  root = I2m2Avmnist(config=builder_config(1, {m: "uint8" for m in MODALITY_SHAPES}),
                     data_dir=data_dir).data_dir_root
  return os.path.join(os.fspath(root), "downloads", "manual")


def _existing_build(num_val: int, data_dir: str | None) -> I2m2Avmnist | None:
  """A finished build for num_val with any storage dtypes, so the files need no new scan."""
  for image, audio in itertools.product(STORAGE_DTYPES, repeat=2):
    builder = I2m2Avmnist(config=builder_config(num_val, {"image": image, "audio": audio}),
                          data_dir=data_dir, file_format="array_record")
    # Look for the info file first: is_prepared() logs a warning for every absent build.
    info = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
    if os.path.isfile(info) and builder.is_prepared():
      return builder
  return None


@register_dataset(NAME)
def load_avmnist(data_config) -> Dataset:
  """Reads config.data.{data_dir, manual_dir, num_val}; builds on first use (module docstring)."""
  num_val = int(data_config.get("num_val", DEFAULT_NUM_VAL))
  data_dir = builder_utils.data_dir_from_config(data_config)
  builder = _existing_build(num_val, data_dir)
  if builder is None:
    root = find_root(_manual_dir(data_config, data_dir))
    builder = builder_utils.prepare(I2m2Avmnist, builder_config(num_val, storage_dtypes(root)),
                                    data_dir, source_files=source_files(root), root_dir=root)
  return Dataset(name=NAME, modalities=dict(MODALITY_SHAPES), num_classes=NUM_CLASSES,
                 sources=builder_utils.split_sources(builder),
                 provenance=builder_utils.provenance(builder, _manual_dir(data_config, data_dir)))
