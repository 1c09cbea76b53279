"""`fastmri`: fastMRI single-coil knee slices with fastMRI+ labels, built into TFDS.

Modalities (NHWC, in this order): 'magnitude' and 'phase' float32 [S, S, 1] (S =
config.data.image_size, default 320), the magnitude |x| and phase angle(x) of each slice's
complex image x; targets: 'label' int32 [L], one binary label per group of config.data.label_groups
(configs/fastmri.py: abnormal, mtear, acl, cartilage). Each example also carries its 'volume'
(text) and 'slice' (int), which the trainer does not read. config.data.label_names ('a,b,c')
picks the labels and their order among the groups ('' all, in the mapping's order).

Files expected in the manual folder (config.data.manual_dir; "" = <data_dir>/downloads/manual):

  singlecoil_train/file1000001.h5 ...  fastMRI single-coil knee volumes (HDF5): 'kspace' complex
  singlecoil_val/file1000000.h5 ...    [slices, 640, W] (W about 368 to 372), plus reconstructions,
                                       header and attributes, which are not read;
  knee.csv, knee_file_list.csv         the fastMRI+ annotations, at the top of the folder or under
                                       Annotations/ (as github.com/microsoft/fastmri-plus has them).

The pipeline follows the official code (divyam3897/I2M2: fastMRI/data_processing/knee/
knee_singlecoil.py and generate_knee_metadata.py; the knee data module is missing there):

* Volumes: those listed in knee_file_list.csv (one id per line, no header). A listed volume whose
  k-space has more than 400 columns is dropped; the others are zero-filled to 640 x 400, the
  missing n = 400 - W columns added n // 2 on the left and n - n // 2 on the right.
* Split by volume (slices of one knee never cross splits), over the listed volumes: scikit-learn
  `train_test_split(ids, test_size=0.3, random_state=0)` gives train and the rest, then
  `train_test_split(rest, test_size=0.5, random_state=0)` gives test and val, in that order, as
  the official metadata script. The ids are sorted first: the official script splits
  `list(set(ids))`, whose order changes from one Python process to the next (string hashing).
* Image: fastMRI's centred orthonormal inverse FFT (`fastmri.fftc.ifft2c_new`, which the
  official model imports): x = fftshift(ifft2(ifftshift(k), norm='ortho')) over the last two
  axes, in float64; the centre 320 x 320 crop (rows 160..479, columns 40..359). With
  image_size S < 320 (small tests and CPU runs; S must divide 320) the complex crop is averaged
  over (320 / S)^2 blocks before magnitude and phase are taken.
* Labels: a slice's fastMRI+ strings are the `label` of the knee.csv rows with its `file` (the
  volume id, without .h5) and `slice`; rows with study_level 'Yes' describe the whole study
  (fastMRI+ 1.0: 'artifact', filed under slice 0) and are not a slice's. Label l is 1 when one of
  the slice's strings is in group l; strings are matched case-insensitively with runs of
  whitespace as one space ('Joint Effusion ' is 'joint effusion'). Strings in no group are
  logged with their counts, as are the positives per label and split.

A missing folder or CSV, a volume without 'kspace' or with k-space that is not [slices, 640, W]
complex, and a CSV without its columns stop the build with an error naming the file and what
was expected. The build records a SHA-256 fingerprint of the CSVs and the listed volumes it read.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import Any, Iterator, Sequence

from absl import logging
import h5py
import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "fastmri"
MODALITIES = ("magnitude", "phase")
VOLUME_FOLDERS = ("singlecoil_train", "singlecoil_val")
ANNOTATIONS_FILE, FILE_LIST_FILE = "knee.csv", "knee_file_list.csv"
ANNOTATIONS_SUBFOLDER = "Annotations"
ANNOTATION_COLUMNS = ("file", "slice", "study_level", "label")
KSPACE_ROWS, KSPACE_COLUMNS = 640, 400  # zero-filled k-space; wider volumes are dropped
CROP = 320
SPLIT_SEED = 0

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
fastMRI needs a data-use agreement: request the knee single-coil data at
https://fastmri.med.nyu.edu and unpack knee_singlecoil_train.tar.xz and knee_singlecoil_val.tar.xz
into <manual_dir> (config.data.manual_dir), giving <manual_dir>/singlecoil_train/*.h5 and
<manual_dir>/singlecoil_val/*.h5. The fastMRI+ annotations are public
(https://github.com/microsoft/fastmri-plus, folder Annotations/): put knee.csv and
knee_file_list.csv at the top of <manual_dir> or under <manual_dir>/Annotations/.
"""


# ---------------------------------------------------------------------------------------------
# Images


def centred_ifft2(kspace: np.ndarray) -> np.ndarray:
  """fastMRI's centred orthonormal inverse 2-D FFT over the last two axes, in complex128."""
  axes = (-2, -1)
  shifted = np.fft.ifftshift(np.asarray(kspace, np.complex128), axes=axes)
  return np.fft.fftshift(np.fft.ifft2(shifted, axes=axes, norm="ortho"), axes=axes)


def zero_fill(kspace: np.ndarray) -> np.ndarray:
  """[slices, 640, W <= 400] -> [slices, 640, 400], centred in the column direction as the
  official code pads (n // 2 columns on the left, n - n // 2 on the right)."""
  missing = KSPACE_COLUMNS - kspace.shape[-1]
  return np.pad(kspace, ((0, 0), (0, 0), (missing // 2, missing - missing // 2)))


def check_image_size(image_size: int) -> int:
  if not (0 < image_size <= CROP and CROP % image_size == 0):
    raise ValueError(f"config.data.image_size={image_size} must divide {CROP} (the centre crop "
                     f"is averaged over blocks of ({CROP} / image_size)^2 pixels).")
  return image_size


def slice_images(kspace: np.ndarray, image_size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
  """Magnitude and phase, float32 [slices, S, S, 1] each, of k-space [slices, 640, W <= 400]
  (module docstring: zero-fill, centred inverse FFT, centre crop, block average)."""
  image = centred_ifft2(zero_fill(kspace))
  top, left = (image.shape[-2] - CROP) // 2, (image.shape[-1] - CROP) // 2
  image = image[:, top:top + CROP, left:left + CROP]
  factor = CROP // check_image_size(image_size)
  image = image.reshape(len(image), image_size, factor, image_size, factor).mean(axis=(2, 4))
  return (np.abs(image)[..., None].astype(np.float32),
          np.angle(image)[..., None].astype(np.float32))


def kspace_shape(volume) -> tuple[int, ...]:
  """The shape of an open volume's 'kspace', checked: complex [slices, 640, W]."""
  if "kspace" not in volume:
    raise ValueError(f"fastMRI volume {volume.filename} has no 'kspace' dataset (it has "
                     f"{sorted(volume.keys())}); expected complex k-space [slices, "
                     f"{KSPACE_ROWS}, W].")
  kspace = volume["kspace"]
  if kspace.ndim != 3 or kspace.shape[1] != KSPACE_ROWS or kspace.dtype.kind != "c":
    raise ValueError(f"fastMRI volume {volume.filename}: 'kspace' has shape {kspace.shape} and "
                     f"dtype {kspace.dtype}; expected complex k-space [slices, {KSPACE_ROWS}, W] "
                     f"(single-coil).")
  return kspace.shape


# ---------------------------------------------------------------------------------------------
# Annotations and labels


def normalize_label(text: str) -> str:
  """Case-insensitive, runs of whitespace as one space, no leading or trailing space."""
  return " ".join(text.split()).casefold()


def parse_label_groups(groups: Any, names: str = "") -> list[tuple[str, tuple[str, ...]]]:
  """(label, fastMRI+ strings) pairs: config.data.label_groups (label -> strings) in the order
  of config.data.label_names ('a,b,c'; '' every group, in the mapping's order)."""
  groups = dict(groups.to_dict() if hasattr(groups, "to_dict") else groups or {})
  if not groups:
    raise ValueError("config.data.label_groups is empty; expected label name -> list of fastMRI+ "
                     "label strings (configs/fastmri.py has the default).")
  names = [n.strip() for n in (names or "").split(",") if n.strip()] or list(groups)
  unknown = [n for n in names if n not in groups]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"config.data.label_names={','.join(names)!r}: expected distinct labels of "
                     f"config.data.label_groups, {list(groups)}.")
  out = []
  for name in names:
    strings = groups[name]
    strings = (strings,) if isinstance(strings, str) else tuple(strings)
    if not strings or not all(isinstance(s, str) and s.strip() for s in strings):
      raise ValueError(f"config.data.label_groups.{name}={strings!r}: expected a non-empty list "
                       f"of fastMRI+ label strings.")
    out.append((name, strings))
  return out


def annotation_files(root: str) -> tuple[str, str]:
  """(knee.csv, knee_file_list.csv): at the top of root, or under root/Annotations."""
  for folder in (root, os.path.join(root, ANNOTATIONS_SUBFOLDER)):
    paths = tuple(os.path.join(folder, f) for f in (ANNOTATIONS_FILE, FILE_LIST_FILE))
    if all(os.path.isfile(p) for p in paths):
      return paths
  raise FileNotFoundError(
      f"The fastMRI+ annotations are missing: expected {ANNOTATIONS_FILE} and {FILE_LIST_FILE} "
      f"in {root} or in {os.path.join(root, ANNOTATIONS_SUBFOLDER)}.\n"
      f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def volume_id(text: str) -> str:
  text = text.strip()
  return text[:-len(".h5")] if text.endswith(".h5") else text


def read_file_list(path: str) -> list[str]:
  """The annotated volume ids of knee_file_list.csv (one per line, no header), sorted."""
  with open(path, newline="") as f:
    ids = sorted({volume_id(row[0]) for row in csv.reader(f) if row and row[0].strip()})
  if not ids:
    raise ValueError(f"{path} lists no volume; expected one volume id per line (no header), "
                     f"e.g. file1000000.")
  return ids


def read_annotations(path: str) -> dict[tuple[str, int], list[str]]:
  """(volume id, slice) -> the label strings of knee.csv's slice-level rows for that slice."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path} has columns {reader.fieldnames}; expected a header with "
                       f"{list(ANNOTATION_COLUMNS)} (fastMRI+: file,slice,study_level,x,y,width,"
                       f"height,label), missing {missing}.")
    rows: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for line, row in enumerate(reader, start=2):
      if (row["study_level"] or "").strip().lower() == "yes":
        continue
      try:
        slice_index = int(row["slice"])
      except (TypeError, ValueError):
        raise ValueError(f"{path}, line {line}: slice {row['slice']!r} is not an integer; "
                         f"expected a slice index on every slice-level row.") from None
      rows[(volume_id(row["file"]), slice_index)].append(row["label"] or "")
  return dict(rows)


def slice_labels(strings: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]],
                 unknown: collections.Counter) -> np.ndarray:
  """int32 [L]: whether any of a slice's label strings is in each group; strings in no group
  are counted in `unknown`."""
  normalized = {normalize_label(s) for s in strings}
  members = [{normalize_label(s) for s in group} for _, group in groups]
  unknown.update(s for s in normalized if not any(s in m for m in members))
  return np.array([bool(normalized & m) for m in members], np.int32)


# ---------------------------------------------------------------------------------------------
# Volumes and splits


def find_volumes(root: str) -> dict[str, str]:
  """volume id -> path of every .h5 in singlecoil_train/ and singlecoil_val/."""
  volumes = {}
  for folder in VOLUME_FOLDERS:
    directory = os.path.join(root, folder)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"fastMRI folder {directory} is missing; expected the single-coil "
                              f"knee volumes (file*.h5) there.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    for name in sorted(os.listdir(directory)):
      if name.endswith(".h5"):
        if volume_id(name) in volumes:
          raise ValueError(f"fastMRI volume {name} is in both {VOLUME_FOLDERS}; expected each "
                           f"volume once.")
        volumes[volume_id(name)] = os.path.join(directory, name)
  return volumes


def split_volumes(ids: Sequence[str]) -> dict[str, list[str]]:
  """TFDS split name -> volume ids: 70 / 15 / 15 % by scikit-learn as the official script."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  ids = sorted(ids)
  if len(ids) < 4:
    raise ValueError(f"{FILE_LIST_FILE} lists {len(ids)} volumes; the 70/15/15 split by volume "
                     f"needs at least 4.")
  train, rest = train_test_split(ids, test_size=0.3, random_state=SPLIT_SEED)
  test, val = train_test_split(rest, test_size=0.5, random_state=SPLIT_SEED)
  return {"train": train, "validation": val, "test": test}


def source_files(root: str) -> list[str]:
  """The files a build reads (its fingerprint): the two CSVs and the listed volumes on disk."""
  annotations, file_list = annotation_files(root)
  volumes = find_volumes(root)
  return [annotations, file_list] + [volumes[v] for v in read_file_list(file_list) if v in volumes]


@dataclasses.dataclass(frozen=True)
class Volume:
  id: str
  path: str
  labels: np.ndarray  # int32 [slices, L]


def plan(root: str, groups: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[Volume]]:
  """TFDS split name -> the volumes it holds (wide ones dropped) with their slices' labels, from
  the CSVs and the volumes' k-space shapes (no k-space is read); logs what was dropped, the
  label strings in no group and the positives per label and split."""
  annotations_path, file_list_path = annotation_files(root)
  listed = read_file_list(file_list_path)
  annotations = read_annotations(annotations_path)
  on_disk = find_volumes(root)
  absent = [v for v in listed if v not in on_disk]
  if absent:
    logging.warning("fastmri: %d of the %d volumes listed in %s are not in %s (e.g. %s); their "
                    "share of the split stays empty.", len(absent), len(listed), file_list_path,
                    "/".join(VOLUME_FOLDERS), absent[:3])
  logging.info("fastmri: %d volumes on disk are not listed in %s and are not used.",
               len(set(on_disk) - set(listed)), file_list_path)
  unknown = collections.Counter()
  splits = {}
  for split, ids in split_volumes(listed).items():
    volumes, dropped = [], []
    for vid in (v for v in ids if v in on_disk):
      with h5py.File(on_disk[vid], "r") as f:
        slices, _, columns = kspace_shape(f)
      if columns > KSPACE_COLUMNS:
        dropped.append(vid)
        continue
      labels = [slice_labels(annotations.get((vid, s), ()), groups, unknown) for s in range(slices)]
      volumes.append(Volume(vid, on_disk[vid], np.stack(labels).reshape(slices, len(groups))))
    if not volumes:
      raise ValueError(f"fastmri: the {split} split has no volume left (listed {len(ids)}, on "
                       f"disk and at most {KSPACE_COLUMNS} k-space columns: 0) in {root}.")
    positives = np.sum([v.labels.sum(0) for v in volumes], axis=0)
    logging.info("fastmri %s: %d volumes, %d slices; %d dropped (k-space wider than %d "
                 "columns); positive slices per label: %s", split, len(volumes),
                 sum(len(v.labels) for v in volumes), len(dropped), KSPACE_COLUMNS,
                 ", ".join(f"{name} {int(n)}" for (name, _), n in zip(groups, positives)))
    splits[split] = volumes
  if unknown:
    logging.warning("fastmri: label strings in no group of config.data.label_groups (slices "
                    "with each): %s", dict(unknown.most_common()))
  return splits


# ---------------------------------------------------------------------------------------------
# TFDS builder


def builder_config(image_size: int,
                   groups: Sequence[tuple[str, Sequence[str]]]) -> builder_utils.KnobsConfig:
  """Knobs: the image size and the label groups (in order); the name says the size."""
  knobs = {"image_size": check_image_size(int(image_size)),
           "label_groups": [[name, list(strings)] for name, strings in groups]}
  return builder_utils.KnobsConfig(
      name=f"size{image_size}_h{builder_utils.short_hash(knobs, 8)}", knobs=knobs)


class I2m2Fastmri(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of fastMRI single-coil knee slices with fastMRI+ labels (module docstring)."""
  name = "i2m2_fastmri"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Single-coil knee, magnitude and phase, fastMRI+ labels, "
                            "70/15/15 split by volume."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # A loader may set this to the folder it already checked (else dl_manager.manual_dir is used).
  root_dir: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.knobs["image_size"]
    features = {m: tfds.features.Tensor(shape=(size, size, 1), dtype=np.float32)
                for m in MODALITIES}
    features["label"] = tfds.features.Tensor(
        shape=(len(self.builder_config.knobs["label_groups"]),), dtype=np.int32)
    features["volume"] = tfds.features.Text()
    features["slice"] = tfds.features.Scalar(dtype=np.int32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        homepage="https://fastmri.med.nyu.edu")

  def _split_generators(self, dl_manager):
    root = self.root_dir or os.fspath(dl_manager.manual_dir)
    splits = plan(root, self.builder_config.knobs["label_groups"])
    return {split: self._generate_examples(volumes) for split, volumes in splits.items()}

  def _generate_examples(self, volumes: Sequence[Volume]) -> Iterator[tuple[str, dict]]:
    for volume in volumes:
      with h5py.File(volume.path, "r") as f:
        magnitude, phase = slice_images(f["kspace"][()], self.builder_config.knobs["image_size"])
      for s, labels in enumerate(volume.labels):
        yield f"{volume.id}_{s:04d}", {"magnitude": magnitude[s], "phase": phase[s],
                                       "label": labels, "volume": volume.id, "slice": s}


# ---------------------------------------------------------------------------------------------
# Loader


@register_dataset(NAME)
def load_fastmri(data_config) -> Dataset:
  """Reads config.data.{data_dir, manual_dir, image_size, label_groups, label_names}; builds on
  first use (module docstring)."""
  groups = parse_label_groups(data_config.get("label_groups"), data_config.get("label_names", ""))
  size = int(data_config.get("image_size", CROP))
  config = builder_config(size, groups)
  data_dir = builder_utils.data_dir_from_config(data_config)
  builder = I2m2Fastmri(config=config, data_dir=data_dir, file_format="array_record")
  info = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
  root = builder_utils.manual_dir(data_config, builder)
  if not (os.path.isfile(info) and builder.is_prepared()):
    builder = builder_utils.prepare(I2m2Fastmri, config, data_dir,
                                    source_files=source_files(root), root_dir=root)
  return Dataset(name=NAME, modalities={m: (size, size, 1) for m in MODALITIES}, num_classes=2,
                 sources=builder_utils.split_sources(builder), targets={"label": (len(groups),)},
                 task="multilabel", label_names=tuple(name for name, _ in groups),
                 provenance=builder_utils.provenance(builder, root))
