"""`nlvr2`: NLVR2 (Suhr et al., ACL 2019) on precomputed backbone features: is a statement true of
a pair of images?

In `config.data.manual_dir`, one feature file per split (datasets/features.py: a folder of
<key>.npy files, or an .npz), named by `config.data.features` with {split} from
`config.data.splits` (train 'train', val 'dev', test 'test1', the names of the NLVR2 release's
JSON files), each holding

  `text` [N, Dt]                    the statement's features,
  `image_0`, `image_1` [N, Di]      each image's features,
  `fused_0`, `fused_1` [N, Df]      the statement fused with each image,
  `label` [N]                       1 if the statement is true, else 0,

of any sizes (FIBER: Dt = Di = 768, Df = 1536). The balanced and unbalanced test sets of the
release (`config.data.extra_test_splits`, default 'balanced_dev,balanced_test1,unbalanced_dev,
unbalanced_test1') are evaluated with the best checkpoint into results.json under their names
when their files are present.

Which expert reads what is config (configs/nlvr2.py: `config.model.expert_inputs`): the image
expert both images' features concatenated, the text expert the statement's, the joint expert
both fused features concatenated, as the official heads (divyam3897/I2M2:
vqa_nlvr/fiber/modules/objectives.py, compute_nlvr2).
"""
from __future__ import annotations

from absl import logging
import numpy as np

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils
from i2m2_jax.datasets import features as features_lib

NAME = "nlvr2"
MODALITIES = ("text", "image_0", "image_1", "fused_0", "fused_1")
SPLIT_ROLES = ("train", "val", "test")
KINDS = {**{m: features_lib.FEATURES for m in MODALITIES}, "label": features_lib.INTEGERS}


def load_split(path: str) -> dict[str, np.ndarray]:
  """The arrays of one split's feature file, labels checked to be 0 or 1."""
  arrays = features_lib.read(path, KINDS)
  bad = ~np.isin(arrays["label"], (0, 1))
  if bad.any():
    raise ValueError(f"{path}: key 'label' has values other than 0 and 1 (e.g. "
                     f"{int(arrays['label'][bad][0])}); expected 1 (true) or 0 (false).")
  if not len(arrays["label"]):
    raise ValueError(f"{path}: no examples.")
  return arrays


def source(arrays) -> features_lib.FeatureSource:
  return features_lib.FeatureSource({m: arrays[m] for m in MODALITIES},
                                    np.arange(len(arrays["label"])), labels=arrays["label"])


@register_dataset(NAME)
def load_nlvr2(data_config) -> Dataset:
  """The NLVR2 data set from config.data (module docstring)."""
  root = features_lib.manual_dir(data_config, "the folder holding the NLVR2 feature files")
  names = dict(data_config.splits)
  files = {features_lib.resolve(root, data_config.features, names[role]): role
           for role in SPLIT_ROLES}
  extra_files = {}
  for split in features_lib.split_names(data_config.get("extra_test_splits", "")):
    try:
      extra_files[features_lib.resolve(root, data_config.features, split)] = split
    except ValueError:
      logging.info("NLVR2 test set %r: no feature file in %s; not evaluated.", split, root)
  arrays = {path: load_split(path) for path in (*files, *extra_files)}
  features_lib.check_same_shapes(arrays, MODALITIES)
  train = arrays[next(iter(files))]
  return Dataset(
      name=NAME, modalities={m: tuple(train[m].shape[1:]) for m in MODALITIES}, num_classes=2,
      sources={role: source(arrays[path]) for path, role in files.items()},
      extra_test_splits={split: source(arrays[path]) for path, split in extra_files.items()},
      provenance={"source": root, "fingerprint": builder_utils.files_fingerprint(
          [f for path in arrays for f in features_lib.files_of(path)])})
