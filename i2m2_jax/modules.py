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
  of experts over the last axis. The model kinds of the paper are choices of that set. Experts
  of one architecture can be computed as one network vmapped over their parameters
  (`stacked_expert_logits`), each keeping its own parameters.

`i2m2_jax.models.build_model` builds these from a config.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from absl import logging
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
    features = self.encoder(self.encoder_input(inputs), train)  # a module field: "encoder"
    return apply_head(self, features, train)

  def encoder_input(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
    return inputs[self.modality]


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
    features = self.encoders[0][1].clone(name="encoder", parent=self)(
        self.encoder_input(inputs), train)
    return apply_head(self, features, train)

  def encoder_input(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
    """The inputs concatenated on their last axis, in order."""
    keys = [k for k, _ in self.encoders]
    shapes = {k: tuple(inputs[k].shape[:-1]) for k in keys}
    if len(set(shapes.values())) != 1:
      raise ValueError(f"The channel_stack fusion stacks its inputs on their last axis; they "
                       f"must agree on every other axis, got {shapes}.")
    return jnp.concatenate([inputs[k] for k in keys], axis=-1)


def single_encoder(expert: nn.Module) -> nn.Module | None:
  """The encoder of an expert that is one encoder and a head over one array
  (`expert.encoder_input(inputs)`; parameters 'encoder' and 'head'), else None."""
  if isinstance(expert, UniModalExpert):
    return expert.encoder
  if isinstance(expert, ChannelStackExpert):
    return expert.encoders[0][1]
  return None


def stack_zero_padded(arrays: Sequence[jax.Array], axis: int) -> jax.Array:
  """`arrays` stacked on a new leading axis, those narrower on `axis` zero-padded at its end to
  the widest (every other axis must agree)."""
  if len({a.shape for a in arrays}) == 1:
    return jnp.stack(arrays)
  size = max(a.shape[axis] for a in arrays)
  return jnp.stack([jnp.pad(a, [(0, size - a.shape[axis]) if d == axis % a.ndim else (0, 0)
                                for d in range(a.ndim)]) for a in arrays])


def stacked_expert_logits(experts: Sequence[nn.Module], params: Sequence[Any],
                          xs: Sequence[jax.Array], train: bool) -> list[jax.Array]:
  """The logits [B, K] of experts of one architecture (models.stack_groups: equal encoders and
  heads, one array each) computed as ONE network: the first expert's encoder and head vmapped
  over the experts' parameters and inputs, each stacked on a new leading axis. Parameters stay
  one subtree per expert (`params`, in order); their gradients come back through the stack.

  Inputs narrower on their last (channel) axis are zero-padded to the widest, and so are the
  parameter leaves narrower on their input axis (-2: a kernel's input channels): exact for an
  encoder whose first layer convolves the raw input (models.CHANNEL_PADDABLE_ENCODERS), since
  zero channels read by zero kernel rows add nothing.
  """
  first = experts[0]
  template = UniModalExpert("x", single_encoder(first), first.head, first.dropout_rate,
                            parent=None)
  stacked_params = jax.tree.map(lambda *leaves: stack_zero_padded(leaves, -2), *params)
  logits = jax.vmap(lambda p, x: template.apply({"params": p}, {"x": x}, train))(
      stacked_params, stack_zero_padded(xs, -1))
  return list(logits)


class MultiModalClassifier(nn.Module):
  """Named experts combined by the normalised product of experts.

  Each expert's logits [B, prod(output_shape)] are reshaped to [B, *output_shape] (default: as
  they come, [B, C]); the product is taken over the last axis. Returns {'log_probs': the
  product's log-probabilities [B, *output_shape], 'expert_logits': {name: [B, *output_shape]}}.
  With one expert the product is that expert's log-softmax, so the same module serves every
  model kind. `present` (optional, bool [E] or [B, E] in expert order) drops experts from the
  product.

  `stacks`: groups of expert names computed as one network (stacked_expert_logits; built by
  models.stack_groups for config.model.stack_experts). Initialisation creates every expert on
  its own, so the parameters are the same either way.
  """
  experts: Sequence[tuple[str, nn.Module]]
  output_shape: tuple[int, ...] | None = None
  stacks: Sequence[Sequence[str]] = ()

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False,
               present: jax.Array | None = None) -> dict[str, Any]:
    stacked = {} if self.is_initializing() else self._stacked_logits(inputs, train)
    logits = {}
    for name, expert in self.experts:
      out = stacked.get(name)
      if out is None:
        out = expert.clone(name=name, parent=self, _deep_clone=True)(inputs, train)
      logits[name] = out if self.output_shape is None else out.reshape(
          (out.shape[0],) + tuple(self.output_shape))
    return {"log_probs": product_of_experts(logits, present), "expert_logits": logits}

  def _stacked_logits(self, inputs: Mapping[str, jax.Array], train: bool
                      ) -> dict[str, jax.Array]:
    """The logits of the experts of `stacks`, each group as one network; a group whose experts
    hold variables besides parameters (BatchNorm statistics, which a stacked apply would not
    update) or whose inputs differ in dtype is left to be computed expert by expert."""
    experts, out = dict(self.experts), {}
    for group in self.stacks:
      xs = [experts[n].encoder_input(inputs) for n in group]
      stateful = sorted({c for c, tree in self.variables.items() if c != "params"
                         for n in group if n in tree})
      if stateful or len({x.dtype for x in xs}) > 1:
        logging.info("Stacked experts %s computed one by one: %s.", list(group),
                     f"they hold {stateful}" if stateful else
                     f"their inputs' dtypes differ ({[str(x.dtype) for x in xs]})")
        continue
      params = [self.variables["params"][n] for n in group]
      out.update(zip(group, stacked_expert_logits([experts[n] for n in group], params, xs,
                                                  train)))
    return out
