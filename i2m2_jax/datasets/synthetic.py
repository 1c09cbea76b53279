"""`synthetic`: a toy multi-modal problem with separate knobs for intra- and inter-modality signal.

It follows the I2M2 paper's generative story: the label y generates each modality (intra-modality
dependency), and a selection mechanism that looks at all modalities together with y keeps only
some combinations (inter-modality dependency). Sampled directly, with no rejection:

  y   ~ Uniform{0..C-1}
  u_m ~ Uniform{0..C-1}                     for the codes of modalities m = 0..M-2
  u_{M-1} = (y - sum_{m<M-1} u_m) mod C     with probability inter_strength, else Uniform{0..C-1}
  x_m = P_m [intra_strength_m * onehot(y); code_scale * onehot(u_m)] + N(0, I_{D_m})

P_m is a fixed random D_m x 2C matrix with orthonormal columns (drawn from data_seed; unit random
directions when D_m < 2C), so the class means of modality m are intra_strength_m * sqrt(2) apart
and its code centres code_scale * sqrt(2) apart. Consequences:

* every single code u_m is independent of y, so a single modality only carries its class mean:
  with intra_strength = 0 each modality alone is at chance and only a joint model can learn y
  (from sum_m u_m mod C, which equals y for a fraction inter_strength of examples, plus chance);
* with inter_strength = 0 the modalities are conditionally independent given y, so the product of
  uni-modal experts is the right model and a joint model has nothing more to find.

Examples: {'m0': float32 [D_0], ..., 'm{M-1}': float32 [D_{M-1}], 'label': int}; splits
train/val/test of num_train/num_val/num_test examples, each from its own seeded stream, so
resizing one split leaves the others unchanged.

Knobs (config.data, defaults in DEFAULTS): num_modalities, num_classes, dims and intra_strength
(each a number or a tuple of 1 entry shared by all modalities or one entry per modality),
inter_strength in [0, 1], code_scale, num_train, num_val, num_test, data_seed. They are hashed
into the TFDS config name, so a changed knob never reuses a build.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils

NAME = "synthetic"
DEFAULTS = dict(num_modalities=2, num_classes=4, dims=(16,), intra_strength=(1.0,),
                inter_strength=0.8, code_scale=3.0, num_train=4000, num_val=1000, num_test=1000,
                data_seed=0)
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}  # per-split sampling streams


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """The knobs, normalised: per-modality tuples, plain Python numbers."""
  num_modalities: int
  num_classes: int
  dims: tuple[int, ...]
  intra_strength: tuple[float, ...]
  inter_strength: float
  code_scale: float
  num_train: int
  num_val: int
  num_test: int
  data_seed: int

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(f"m{i}" for i in range(self.num_modalities))

  @property
  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_val, "test": self.num_test}


def _per_modality(value, num_modalities: int, name: str, cast) -> tuple:
  """A number, or a sequence of 1 (shared by every modality) or num_modalities entries."""
  if isinstance(value, (list, tuple)):
    if len(value) == 1:
      value = value[0]
    elif len(value) != num_modalities:
      raise ValueError(f"config.data.{name}={tuple(value)} has {len(value)} entries; expected 1 "
                       f"(shared) or one per modality ({num_modalities}).")
    else:
      return tuple(cast(v) for v in value)
  return (cast(value),) * num_modalities


def spec_from_config(data_config) -> SyntheticSpec:
  """Reads the knobs from config.data (missing ones take DEFAULTS) and checks them."""
  get = lambda k: data_config.get(k, DEFAULTS[k])
  m = int(get("num_modalities"))
  if m < 2:
    raise ValueError(f"config.data.num_modalities={m}; the synthetic data needs at least 2.")
  spec = SyntheticSpec(
      num_modalities=m, num_classes=int(get("num_classes")),
      dims=_per_modality(get("dims"), m, "dims", int),
      intra_strength=_per_modality(get("intra_strength"), m, "intra_strength", float),
      inter_strength=float(get("inter_strength")), code_scale=float(get("code_scale")),
      num_train=int(get("num_train")), num_val=int(get("num_val")),
      num_test=int(get("num_test")), data_seed=int(get("data_seed")))
  if spec.num_classes < 2:
    raise ValueError(f"config.data.num_classes={spec.num_classes}; expected at least 2.")
  if min(spec.dims) < 1:
    raise ValueError(f"config.data.dims={spec.dims}; every dimension must be >= 1.")
  if not 0.0 <= spec.inter_strength <= 1.0:
    raise ValueError(f"config.data.inter_strength={spec.inter_strength}; expected in [0, 1].")
  if min(spec.num_train, spec.num_val, spec.num_test) < 1:
    raise ValueError("config.data.num_train/num_val/num_test must all be >= 1.")
  return spec


def projections(spec: SyntheticSpec) -> list[np.ndarray]:
  """Per modality a fixed [D_m, 2C] matrix: columns 0..C-1 class directions, C..2C-1 code ones."""
  rng = np.random.default_rng([spec.data_seed, 1000])
  c = spec.num_classes
  mats = []
  for d in spec.dims:
    g = rng.standard_normal((d, 2 * c))
    if d >= 2 * c:
      q, r = np.linalg.qr(g)
      mats.append(q * np.sign(np.diag(r)))  # orthonormal columns, sign-fixed for determinism
    else:
      mats.append(g / np.linalg.norm(g, axis=0, keepdims=True))  # too few dims: unit directions
  return mats


def sample(spec: SyntheticSpec, num_examples: int, stream: int):
  """Draws num_examples examples from stream `stream` of data_seed.

  Returns (xs, labels, codes): xs a list of float32 [N, D_m] per modality, labels int64 [N] and the
  latent codes int64 [N, M] (kept for tests and analysis; not part of the data set).
  """
  rng = np.random.default_rng([spec.data_seed, stream])
  c, m, n = spec.num_classes, spec.num_modalities, num_examples
  labels = rng.integers(0, c, size=n)
  codes = rng.integers(0, c, size=(n, m))
  selected = rng.random(n) < spec.inter_strength
  tied_code = (labels - codes[:, :-1].sum(axis=1)) % c
  codes[:, -1] = np.where(selected, tied_code, codes[:, -1])
  eye = np.eye(c)
  xs = []
  for i, proj in enumerate(projections(spec)):
    latent = np.concatenate([spec.intra_strength[i] * eye[labels],
                             spec.code_scale * eye[codes[:, i]]], axis=1)
    noise = rng.standard_normal((n, spec.dims[i]))
    xs.append((latent @ proj.T + noise).astype(np.float32))
  return xs, labels, codes


class I2m2Synthetic(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of `sample`; one KnobsConfig per knob setting (see module docstring)."""
  name = "i2m2_synthetic"
  VERSION = tfds.core.Version("1.0.0")  # bump whenever `sample` or `projections` change
  RELEASE_NOTES = {"1.0.0": "First version."}

  @property
  def spec(self) -> SyntheticSpec:
    knobs = dict(self.builder_config.knobs)
    return SyntheticSpec(**{**knobs, "dims": tuple(knobs["dims"]),
                            "intra_strength": tuple(knobs["intra_strength"])})

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self.spec
    features = {name: tfds.features.Tensor(shape=(d,), dtype=np.float32)
                for name, d in zip(spec.modality_names, spec.dims)}
    features["label"] = tfds.features.ClassLabel(num_classes=spec.num_classes)
    # Kept in generation order (TFDS would otherwise reorder by key hash).
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.spec.split_sizes}

  def _generate_examples(self, split: str):
    spec = self.spec
    xs, labels, _ = sample(spec, spec.split_sizes[split], _SPLIT_STREAM[split])
    for i in range(len(labels)):
      example: dict[str, Any] = {name: x[i] for name, x in zip(spec.modality_names, xs)}
      example["label"] = int(labels[i])
      yield i, example


@register_dataset(NAME)
def load_synthetic(data_config) -> Dataset:
  spec = spec_from_config(data_config)
  builder = builder_utils.prepare(
      I2m2Synthetic, builder_utils.knobs_config(dataclasses.asdict(spec)),
      builder_utils.data_dir_from_config(data_config))
  return Dataset(name=NAME,
                 modalities={name: (d,) for name, d in zip(spec.modality_names, spec.dims)},
                 num_classes=spec.num_classes,
                 sources=builder_utils.split_sources(builder),
                 provenance=builder_utils.provenance(builder, "generated from config.data"))
