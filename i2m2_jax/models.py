"""Flax modules: per-modality encoders, uni-modal and joint experts, and the I2M2 classifier.

Everything here is a pure flax.linen module, usable on its own in other JAX code:

* an *encoder* maps one modality's batch [B, ...] to features [B, F] (`__call__(x, train)`);
* an *expert* maps the dict of all modalities to logits [B, C]: `UniModalExpert` reads one
  modality, `LateFusionExpert` (the paper's LF joint model) concatenates the features of its own
  per-modality encoders and applies an MLP head;
* `MultiModalClassifier` runs a set of named experts and combines them with the normalised product
  of experts. The model kinds of the paper are choices of that set (see `expert_names`).

`build_model(model_config, spec)` turns a config and a dataset's modality shapes into a classifier.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from i2m2_jax.combine import product_of_experts

MODEL_KINDS = ("i2m2", "intra", "inter", "uni")
JOINT = "joint"


def uni_expert_name(modality: str) -> str:
  return f"uni_{modality}"


def expert_names(kind: str, modalities: Sequence[str], modality: str = "") -> tuple[str, ...]:
  """The experts that make up a model kind, in a fixed order: uni-modal ones first, then joint."""
  if kind == "i2m2":
    return tuple(uni_expert_name(m) for m in modalities) + (JOINT,)
  if kind == "intra":
    return tuple(uni_expert_name(m) for m in modalities)
  if kind == "inter":
    return (JOINT,)
  if kind == "uni":
    if modality not in modalities:
      raise ValueError(f"config.model.modality={modality!r} is not a modality of this data set; "
                       f"expected one of {list(modalities)}.")
    return (uni_expert_name(modality),)
  raise ValueError(f"config.model.kind={kind!r} is unknown; expected one of {list(MODEL_KINDS)}.")


def expert_modalities(name: str, modalities: Sequence[str]) -> tuple[str, ...]:
  """Which modalities an expert reads: the joint expert all of them, `uni_<m>` just m."""
  if name == JOINT:
    return tuple(modalities)
  return (name[len("uni_"):],)


# ---------------------------------------------------------------------------------------------
# Encoders


class MLP(nn.Module):
  """Dense layers with ReLU between them (none after the last): the paper's MLP(in, hid, out)."""
  features: Sequence[int]
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.features):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
        if self.dropout_rate:
          x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class MLPEncoder(nn.Module):
  """Vectors [B, D] (or anything, flattened) -> features: Dense + ReLU layers."""
  features: Sequence[int] = (128, 128)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    return nn.relu(MLP(tuple(self.features), self.dropout_rate, name="mlp")(x, train))


class GRUEncoder(nn.Module):
  """Sequences [B, T, F] -> the final hidden state of a one-layer GRU [B, hidden]."""
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.RNN(nn.GRUCell(self.hidden, parent=None), name="gru")(x)[:, -1]


class Conv1DEncoder(nn.Module):
  """Sequences [B, T, F] -> features: 1-D convolutions + ReLU, then mean over time."""
  features: Sequence[int] = (64, 64)
  kernel_size: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Conv(width, (self.kernel_size,), name=f"conv_{i}")(x))
    return x.mean(axis=1)


class CNNEncoder(nn.Module):
  """Images [B, H, W, C] -> features: 3x3 conv + ReLU (+ 2x2 max-pool while the image is larger
  than 4 pixels) per stage, then global average pooling."""
  features: Sequence[int] = (32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{i}")(x))
      if min(x.shape[1:3]) > 4:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x.mean(axis=(1, 2))


# name -> encoder class; config strings select from it. Other modules register more encoders.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLPEncoder,
    "gru": GRUEncoder,
    "conv1d": Conv1DEncoder,
    "cnn": CNNEncoder,
}

# The default encoder for a modality by the rank of one example: vector, sequence, image.
DEFAULT_ENCODER_BY_RANK = {1: "mlp", 2: "gru", 3: "cnn"}


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
  if name in ENCODERS and ENCODERS[name] is not factory:
    raise ValueError(f"An encoder named {name!r} is registered already.")
  ENCODERS[name] = factory


# ---------------------------------------------------------------------------------------------
# Experts


class UniModalExpert(nn.Module):
  """q(y | x_m): one modality's encoder followed by an MLP head."""
  modality: str
  encoder: nn.Module
  head: Sequence[int]  # hidden widths then num_classes
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    features = self.encoder(inputs[self.modality], train)  # a module field: named "encoder"
    return MLP(tuple(self.head), self.dropout_rate, name="head")(features, train)


class LateFusionExpert(nn.Module):
  """q(y | x_1, ..., x_M): its own encoder per modality, features concatenated, MLP head (LF)."""
  encoders: Sequence[tuple[str, nn.Module]]  # (modality, encoder) pairs, concatenated in order
  head: Sequence[int]
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    features = [enc.clone(name=f"encoder_{m}", parent=self)(inputs[m], train)
                for m, enc in self.encoders]
    return MLP(tuple(self.head), self.dropout_rate, name="head")(
        jnp.concatenate(features, axis=-1), train)


class MultiModalClassifier(nn.Module):
  """Named experts combined by the normalised product of experts.

  Returns {'log_probs': [B, C] of the product, 'expert_logits': {name: [B, C]}}. With one expert
  the product is that expert's log-softmax, so the same module serves every model kind.
  `present` (optional, bool [E] or [B, E] in expert order) drops experts from the product.
  """
  experts: Sequence[tuple[str, nn.Module]]

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False,
               present: jax.Array | None = None) -> dict[str, Any]:
    logits = {name: expert.clone(name=name, parent=self, _deep_clone=True)(inputs, train)
              for name, expert in self.experts}
    return {"log_probs": product_of_experts(logits, present), "expert_logits": logits}


# ---------------------------------------------------------------------------------------------
# Building from a config


def _config_entry(config_dict, key: str, default=None):
  """config_dict[key] for a ConfigDict, a plain dict or None."""
  if not config_dict:
    return default
  return config_dict.get(key, default)


def _as_kwargs(config_dict) -> dict[str, Any]:
  """Keyword arguments from a ConfigDict, a dict or None."""
  if not config_dict:
    return {}
  return dict(config_dict.to_dict() if hasattr(config_dict, "to_dict") else config_dict)


def _encoder_for(modality: str, shape: Sequence[int], model_config, joint: bool) -> nn.Module:
  """The encoder of one modality: config.model.encoders[modality], else the default for the
  example's rank, with config.model.encoder_kwargs[modality] (for the joint expert
  joint_encoder_kwargs[modality] first) as its arguments."""
  name = (_config_entry(model_config.get("encoders"), modality)
          or DEFAULT_ENCODER_BY_RANK.get(len(shape)))
  if name is None:
    raise ValueError(f"Modality {modality!r} has per-example shape {tuple(shape)}; no default "
                     f"encoder for rank {len(shape)}. Set config.model.encoders.{modality} to one "
                     f"of {sorted(ENCODERS)}.")
  if name not in ENCODERS:
    raise ValueError(f"config.model.encoders.{modality}={name!r} is unknown; expected one of "
                     f"{sorted(ENCODERS)}.")
  kwargs = _config_entry(model_config.get("encoder_kwargs"), modality)
  if joint:
    kwargs = _config_entry(model_config.get("joint_encoder_kwargs"), modality, kwargs)
  return ENCODERS[name](**_as_kwargs(kwargs))


# name -> joint-expert class, built as cls(encoders=((modality, encoder), ...), head=..., dropout_rate=...).
FUSIONS: dict[str, Callable[..., nn.Module]] = {"late_fusion": LateFusionExpert}


def register_fusion(name: str, factory: Callable[..., nn.Module]) -> None:
  if name in FUSIONS and FUSIONS[name] is not factory:
    raise ValueError(f"A fusion named {name!r} is registered already.")
  FUSIONS[name] = factory


def build_expert(name: str, modality_shapes: Mapping[str, Sequence[int]], num_classes: int,
                 model_config) -> nn.Module:
  head = tuple(model_config.head_hidden) + (num_classes,)
  dropout = model_config.get("dropout_rate", 0.0)
  if name == JOINT:
    fusion = model_config.get("fusion", "late_fusion")
    if fusion not in FUSIONS:
      raise ValueError(f"config.model.fusion={fusion!r} is unknown; expected one of "
                       f"{sorted(FUSIONS)}.")
    encoders = tuple((m, _encoder_for(m, s, model_config, joint=True))
                     for m, s in modality_shapes.items())
    return FUSIONS[fusion](encoders=encoders, head=head, dropout_rate=dropout,
                           **_as_kwargs(model_config.get("fusion_kwargs")))
  modality = expert_modalities(name, list(modality_shapes))[0]
  encoder = _encoder_for(modality, modality_shapes[modality], model_config, joint=False)
  return UniModalExpert(modality, encoder, head, dropout)


# config.model.compute_dtype -> the dtype activations are computed in. Parameters, optimiser
# state and BatchNorm statistics stay float32 (mixed precision); see apply_in_dtype.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config) -> Any:
  """The jnp dtype named by config.model.compute_dtype (default 'float32')."""
  name = model_config.get("compute_dtype", "float32") or "float32"
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={name!r} is unknown; expected one of "
                     f"{list(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[name]


def cast_floating(tree, dtype):
  """Every floating-point leaf of `tree` as `dtype`; other leaves unchanged."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def apply_in_dtype(apply_fn: Callable[..., Any], dtype) -> Callable[..., Any]:
  """`apply_fn` (a module's apply) computing in `dtype`: the floating parameters are cast on the
  way in, so the float32 originals stay the ones trained and checkpointed (their gradients come
  back through the cast as float32). BatchNorm statistics are not cast: they are averaged in
  float32. The caller casts the inputs (train_lib.make_preprocess); the product of experts is
  computed in float32 whatever the experts' dtype (combine.product_of_experts)."""
  if jnp.dtype(dtype) == jnp.float32:
    return apply_fn

  def apply(variables, *args, **kwargs):
    return apply_fn({**variables, "params": cast_floating(variables["params"], dtype)},
                    *args, **kwargs)
  apply.module_apply = apply_fn  # the module's own apply (see train_lib.model_expert_names)
  return apply


def build_model(model_config, modality_shapes: Mapping[str, Sequence[int]],
                num_classes: int) -> nn.Module:
  """The classifier for config.model.kind over the given modalities (name -> example shape).

  config.model.implementation (default 'plain') picks how it is computed: 'plain' is a
  MultiModalClassifier of the modules above; 'fast' is i2m2_jax.fast's classifier, imported
  only here so that the opt-in subpackage is loaded only by the models that use it.
  """
  if len(modality_shapes) < 1:
    raise ValueError("The data set has no modality.")
  implementation = model_config.get("implementation", "plain") or "plain"
  if implementation == "fast":
    fast = importlib.import_module("i2m2_jax.fast")
    return fast.build_fast_model(model_config, modality_shapes, num_classes)
  if implementation != "plain":
    raise ValueError(f"config.model.implementation={implementation!r} is unknown; expected "
                     "one of ['plain', 'fast'].")
  names = expert_names(model_config.kind, list(modality_shapes), model_config.get("modality", ""))
  return MultiModalClassifier(tuple(
      (n, build_expert(n, modality_shapes, num_classes, model_config)) for n in names))


from i2m2_jax import paper_models  # noqa: E402,F401  pylint: disable=g-import-not-at-top  (registers the paper's encoders and fusions)
