"""Flax modules: per-modality encoders, uni-modal and joint experts, and the I2M2 classifier.

Everything here is a pure flax.linen module, usable on its own in other JAX code:

* an *encoder* maps one modality's batch [B, ...] to features [B, F] (`__call__(x, train)`);
* an *expert* maps the dict of all modalities to logits [B, K]: `UniModalExpert` reads one
  modality, `LateFusionExpert` (the paper's LF joint model) concatenates the features of its own
  per-modality encoders and applies a head: a module (e.g. `LayerNormMLP`, the FIBER heads of the
  paper's VQA and NLVR2 experiments) or layer widths, which build an `MLP`; `ChannelStackExpert`
  stacks the modalities as channels of one input to one encoder (fastMRI's joint model);
* `MultiModalClassifier` runs a set of named experts, shapes their logits to the task's output
  shape ([B, C], or [B, L, 2] for L binary labels) and combines them with the normalised product
  of experts over the last axis. The model kinds of the paper are choices of that set.

`i2m2_jax.models.build_model` builds these from a config.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from i2m2_jax.combine import product_of_experts

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


class LayerNormMLP(nn.Module):
  """Dense -> LayerNorm -> GELU per hidden width, then Dense: the classifier heads the paper puts
  on FIBER features (divyam3897/I2M2: vqa_nlvr/fiber/modules/classify.py, Linear(d, 1536) ->
  LayerNorm -> GELU -> Linear(1536, C)), initialised as there (objectives.init_weights): weights
  normal(0.02), biases 0, LayerNorm scale 1 and bias 0."""
  features: Sequence[int]  # hidden widths then num_classes
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.02))
    for i, width in enumerate(self.features[:-1]):
      x = dense(width, name=f"dense_{i}")(x)
      x = nn.gelu(nn.LayerNorm(epsilon=1e-5, name=f"layer_norm_{i}")(x), approximate=False)
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.features[-1], name=f"dense_{len(self.features) - 1}")(x)


class IdentityEncoder(nn.Module):
  """The input straight to the head, flattened: features computed elsewhere (e.g. by a frozen
  backbone), or small raw inputs (the expert is then an MLP on them)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return x.reshape(x.shape[0], -1)


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


# ---------------------------------------------------------------------------------------------
# Experts


class UniModalExpert(nn.Module):
  """q(y | x_m): one modality's encoder followed by a head (a module, or the widths of an MLP:
  hidden widths then num_classes, with `dropout_rate`; see `apply_head`)."""
  modality: str
  encoder: nn.Module
  head: Any
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    features = self.encoder(inputs[self.modality], train)  # a module field: named "encoder"
    return apply_head(self, features, train)


class LateFusionExpert(nn.Module):
  """q(y | x_1, ..., x_M): its own encoder per modality, features concatenated, head (LF)."""
  encoders: Sequence[tuple[str, nn.Module]]  # (modality, encoder) pairs, concatenated in order
  head: Any  # a module, or MLP widths (see UniModalExpert)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    features = [enc.clone(name=f"encoder_{m}", parent=self)(inputs[m], train)
                for m, enc in self.encoders]
    return apply_head(self, jnp.concatenate(features, axis=-1), train)


def apply_head(expert: nn.Module, features: jax.Array, train: bool) -> jax.Array:
  """An expert's head on its features, as its child 'head': `expert.head` when it is a module,
  else an MLP of those widths (hidden widths then num_classes) with `expert.dropout_rate`
  between its layers. Either way an MLP head's parameters are head/dense_i."""
  if isinstance(expert.head, nn.Module):
    return expert.head(features, train)  # a module field: named "head"
  return MLP(tuple(expert.head), expert.dropout_rate, name="head")(features, train)


class ChannelStackExpert(nn.Module):
  """q(y | x_1, ..., x_M) from ONE encoder over the inputs concatenated on their last (channel)
  axis, then an MLP head: the fastMRI joint expert reads magnitude and phase as the 2 channels of
  one image. Built by the fusion factory like LateFusionExpert, from one encoder per input: the
  inputs are stacked in that order and the first input's encoder reads the stack (configure it
  with config.model.encoders / joint_encoder_kwargs of that input); the others are not used.
  Every input must have the same shape but for the last axis."""
  encoders: Sequence[tuple[str, nn.Module]]  # (input key, encoder) pairs, stacked in order
  head: Any  # a module, or MLP widths (see UniModalExpert)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    keys = [k for k, _ in self.encoders]
    shapes = {k: tuple(inputs[k].shape[:-1]) for k in keys}
    if len(set(shapes.values())) != 1:
      raise ValueError(f"The channel_stack fusion stacks its inputs on their last axis; they "
                       f"must agree on every other axis, got {shapes}.")
    stacked = jnp.concatenate([inputs[k] for k in keys], axis=-1)
    features = self.encoders[0][1].clone(name="encoder", parent=self)(stacked, train)
    return apply_head(self, features, train)


class MultiModalClassifier(nn.Module):
  """Named experts combined by the normalised product of experts.

  Each expert's logits [B, prod(output_shape)] are reshaped to [B, *output_shape] (default: as
  they come, [B, C]); the product is taken over the last axis. Returns {'log_probs': the
  product's log-probabilities [B, *output_shape], 'expert_logits': {name: [B, *output_shape]}}.
  With one expert the product is that expert's log-softmax, so the same module serves every
  model kind. `present` (optional, bool [E] or [B, E] in expert order) drops experts from the
  product.
  """
  experts: Sequence[tuple[str, nn.Module]]
  output_shape: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False,
               present: jax.Array | None = None) -> dict[str, Any]:
    logits = {}
    for name, expert in self.experts:
      out = expert.clone(name=name, parent=self, _deep_clone=True)(inputs, train)
      logits[name] = out if self.output_shape is None else out.reshape(
          (out.shape[0],) + tuple(self.output_shape))
    return {"log_probs": product_of_experts(logits, present), "expert_logits": logits}
