"""The paper's AV-MNIST, MIMIC-III and fastMRI experts as flax.linen modules.

`i2m2_jax.models` names them in its registries:

* encoder `lenet`: `LeNet(channels=3, num_blocks=3)`; AV-MNIST image (3, 3), audio (3, 5),
  the joint expert's encoders with channels=6;
* encoder `gru_linear`: `GRUSequenceEncoder(hidden=30, per_step_features=15)`; the MIMIC series
  expert, GRUWithLinear(12, 30, 15) flattened to 360;
* encoder `gru_all_states`: the same with per_step_features=0; the MIMIC joint expert's GRU(12, 30),
  all 24 hidden states flattened to 720 (`gru_linear` with per_step_features=0 is identical);
* encoder `mlp_raw`: `MLPRawEncoder(features=(10, 10))`; the MIMIC static MLP(5, 10, 10);
* fusion `lrtf`: `LowRankTensorFusionExpert(encoders, head, rank=40, output_dim=120)`; the
  AV-MNIST LRTF joint expert (`late_fusion`, modules.LateFusionExpert, is the LF one);
* encoder `preactresnet18`: `PreActResNet()`, the fastMRI knee experts' PreActResNet-18
  (divyam3897/I2M2: fastMRI/models/preactresnet_knee.py), see its docstring.

Sources (pliang279/MultiBench, which divyam3897/I2M2 copies): `unimodals/common_models.py`
(LeNet, MLP, GRU, GRUWithLinear) and `fusions/common_fusions.py` (LowRankTensorFusion).

Porting choices, each checked against PyTorch semantics:

* LeNet convolutions: the reference calls `nn.init.kaiming_uniform_(weight)` with its defaults
  (a=0, fan_in, gain sqrt(2)), i.e. U(+-sqrt(6 / fan_in)) -- *not* PyTorch's Conv2d default
  (a=sqrt(5), U(+-1/sqrt(fan_in))). We match the reference: `variance_scaling(2, fan_in, uniform)`.
* BatchNorm: `TorchBatchNorm` below reproduces PyTorch's BatchNorm2d: batch statistics with the
  biased variance for normalising, running averages with momentum 0.1 (flax convention: 0.9) and
  the *unbiased* batch variance (flax's own BatchNorm stores the biased one), epsilon 1e-5,
  scale 1 / bias 0. Running averages are used whenever train=False (quirk #1 of the reference
  -- uni-modal models evaluated in train mode -- is available as `LeNet.batch_stats_at_eval`).
* Linear layers and the GRU inside these encoders use PyTorch's default init when
  `torch_init=True` (the default): weights and biases U(+-1/sqrt(fan_in)) for Linear,
  U(+-1/sqrt(hidden)) for every GRU weight and bias. The MLP heads come from `models.MLP` and
  keep flax's defaults (lecun-normal weights, zero biases).
* GRU: flax's `GRUCell` computes PyTorch's equations exactly
  (r = s(W_ir x + W_hr h + b_r), z = s(W_iz x + W_hz h + b_z),
  n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h, h_0 = 0) but keeps one
  bias for r and one for z where PyTorch has two each (b_i* + b_h*), so it has 4H bias
  parameters instead of 6H: 3900 instead of 3960 parameters for GRU(12, 30). Same function class.
* LRTF factors are trained parameters here. In the reference they sit in a Python list and are
  moved with `.cuda()`, which leaves them unregistered (quirk #3): there they act as fixed random
  projections. Init as MultiBench: xavier-normal (untruncated, PyTorch's fan convention) for the
  factors and the fusion weights, zero fusion bias.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from i2m2_jax import modules

# ---------------------------------------------------------------------------------------------
# Initialisers matching PyTorch


def symmetric_uniform(bound: float):
  """U(-bound, bound): PyTorch's default Linear/GRU init with bound = 1/sqrt(fan_in or hidden)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_xavier_normal(key, shape, dtype=jnp.float32):
  """`torch.nn.init.xavier_normal_` with PyTorch's fans: fan_in = shape[1] * prod(shape[2:]),
  fan_out = shape[0] * prod(shape[2:]); an untruncated normal with std sqrt(2/(fan_in+fan_out))."""
  receptive = math.prod(shape[2:])
  fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (fan_in + fan_out))


# kaiming_uniform_(a=0): U(+-sqrt(6 / fan_in)), what the reference LeNet applies to its convs.
kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


def dense(features: int, fan_in: int, torch_init: bool, name: str) -> nn.Dense:
  """nn.Dense with PyTorch's default Linear init when torch_init, else flax's default."""
  if not torch_init:
    return nn.Dense(features, name=name)
  bound = 1.0 / math.sqrt(fan_in)
  return nn.Dense(features, kernel_init=symmetric_uniform(bound),
                  bias_init=symmetric_uniform(bound), name=name)


# ---------------------------------------------------------------------------------------------
# AV-MNIST: LeNet
#
# LeNet's variables are declared by lenet_blocks, LeNetConv, batch_norm_variables and
# update_running_averages, which i2m2_jax.fast's classifier uses too: so the two
# implementations have the same variable tree (paths, shapes, initial values) and running
# averages by construction, and checkpoints move between them.

BN_MOMENTUM = 0.9  # PyTorch's BatchNorm momentum 0.1, in flax's convention
BN_EPSILON = 1e-5


def lenet_blocks(channels: int, num_blocks: int) -> list[tuple[int, int]]:
  """(output channels, kernel size) of each block of LeNet(channels, num_blocks)."""
  return [(channels, 5)] + [(channels * 2 ** (i + 1), 3) for i in range(num_blocks)]


def conv2d(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """Stride-1 NHWC convolution with HWIO kernel and symmetric zero padding (as nn.Conv)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class LeNetConv(nn.Module):
  """A LeNet convolution: KxK, 'same' padding, no bias, kernel [K, K, C_in, C_out] (params
  'kernel', nn.Conv's name and layout) kaiming-uniform. Computes what nn.Conv computes, but
  declares the kernel in setup, so that it can be read without convolving (`.kernel`): the fast
  classifier convolves it its own way."""
  kernel_shape: tuple[int, int, int, int]

  def setup(self):
    self.kernel = self.param("kernel", kaiming_uniform, self.kernel_shape, jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Promoted as nn.Conv does (e.g. bfloat16 inputs with float32 parameters compute in float32).
    return conv2d(*nn.dtypes.promote_dtype(x, self.kernel), self.kernel_shape[0] // 2)


def batch_norm_variables(module: nn.Module, features: int):
  """TorchBatchNorm's variables, declared in `module` (in setup or its compact method): params
  'scale' (ones) and 'bias' (zeros), batch_stats 'mean' (zeros) and 'var' (ones), each
  [features]. Returns the parameters and the two batch_stats Variables."""
  scale = module.param("scale", nn.initializers.ones, (features,))
  bias = module.param("bias", nn.initializers.zeros, (features,))
  ra_mean = module.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
  ra_var = module.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
  return scale, bias, ra_mean, ra_var


def update_running_averages(ra_mean: nn.Variable, ra_var: nn.Variable, mean: jax.Array,
                            var: jax.Array, count: int | jax.Array, momentum: float) -> None:
  """PyTorch's running averages, with flax's momentum convention, from a batch's mean and
  biased variance over `count` elements per feature: PyTorch stores the unbiased variance."""
  unbiased = var * (count / jnp.maximum(count - 1, 1))
  ra_mean.value = momentum * ra_mean.value + (1 - momentum) * mean
  ra_var.value = momentum * ra_var.value + (1 - momentum) * unbiased


class TorchBatchNorm(nn.Module):
  """BatchNorm over every axis but the last, with PyTorch's BatchNorm semantics.

  Variables have flax's names (params 'scale', 'bias'; batch_stats 'mean', 'var'). `momentum`
  uses flax's convention (running = momentum * running + (1 - momentum) * batch), so PyTorch's
  momentum 0.1 is 0.9 here. The running variance is updated with the unbiased batch variance as
  PyTorch does; normalisation uses the biased one.
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  # Under pmap: the device axis the batch is split over. Training statistics are then those of
  # the whole global batch, as under jit (evaluation uses running averages, or its own batch).
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool, update_stats: bool = False):
    scale, bias, ra_mean, ra_var = batch_norm_variables(self, x.shape[-1])
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, count = self._batch_moments(x, self.axis_name if update_stats else None)
      if update_stats and not self.is_initializing():
        update_running_averages(ra_mean, ra_var, mean, var, count, self.momentum)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)

  @staticmethod
  def _batch_moments(x, axis_name):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = math.prod(x.shape[:-1])
    mean = xf.mean(axes)
    if axis_name is not None:
      mean = jax.lax.pmean(mean, axis_name)
      count *= jax.lax.psum(1, axis_name)
    var = jnp.square(xf - mean).mean(axes)
    if axis_name is not None:
      var = jax.lax.pmean(var, axis_name)
    return mean, var, count


class LeNet(nn.Module):
  """MultiBench's `LeNet(1, channels, num_blocks)`: images NHWC [B, H, W, C_in] -> [B, F].

  Block 0: Conv 5x5 (-> c, pad 2, no bias) -> BN -> ReLU -> MaxPool 2; blocks i = 0..k-1:
  Conv 3x3 (2^i c -> 2^(i+1) c, pad 1, no bias) -> BN -> ReLU -> MaxPool 2 (VALID, flooring
  7 -> 3 -> 1). The result is flattened (the reference squeezes; the same once it is 1x1), so
  F = 2^k c for 28x28 with k=3 and 112x112 with k=5.

  `batch_stats_at_eval=True` reproduces quirk #1 of the reference (uni-modal models evaluated in
  BatchNorm train mode): batch statistics at eval too, without updating the running averages
  (which the reference does update at eval). Default False: running averages at eval.
  """
  channels: int = 3
  num_blocks: int = 3
  batch_stats_at_eval: bool = False
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"LeNet expects images [B, H, W, C] (NHWC); got shape {x.shape}.")
    use_batch_stats = train or self.batch_stats_at_eval
    for i, (width, k) in enumerate(lenet_blocks(self.channels, self.num_blocks)):
      x = LeNetConv((k, k, x.shape[-1], width), name=f"conv_{i}")(x)
      x = TorchBatchNorm(axis_name=self.bn_axis_name, name=f"bn_{i}")(
          x, use_running_average=not use_batch_stats, update_stats=train)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="VALID")
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# MIMIC-III: static MLP and GRU encoders


class MLPRawEncoder(nn.Module):
  """MultiBench's `MLP(in, hid, out)` used as an encoder: Dense -> ReLU -> Dense, *no* output
  activation (models.MLPEncoder ends with a ReLU, so it is not the reference). Input flattened.
  The MIMIC static encoder is MLP(5, 10, 10): features=(10, 10)."""
  features: Sequence[int] = (10, 10)
  torch_init: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.features):
      x = dense(width, x.shape[-1], self.torch_init, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class GRUSequenceEncoder(nn.Module):
  """Sequences [B, T, D] -> a one-layer unidirectional GRU (h_0 = 0) over the T steps.

  * per_step_features > 0: a Linear hidden -> per_step_features on every step's hidden state, no
    activation (MultiBench's GRUWithLinear; the MIMIC series expert is GRUWithLinear(12, 30, 15),
    flatten=True: 24 * 15 = 360 features);
  * per_step_features = 0: the raw hidden states (MultiBench's GRU(12, 30) of the MIMIC joint
    expert: 24 * 30 = 720 features).
  flatten_all_steps=True returns every step flattened [B, T * F]; False only the last step [B, F].
  """
  hidden: int = 30
  per_step_features: int = 15
  flatten_all_steps: bool = True
  torch_init: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if x.ndim != 3:
      raise ValueError(f"GRUSequenceEncoder expects sequences [B, T, D]; got shape {x.shape}.")
    h = nn.RNN(self._cell())(x)  # [B, T, hidden]; the cell's parameters live under 'gru'.
    if self.per_step_features:
      h = dense(self.per_step_features, self.hidden, self.torch_init, name="linear")(h)
    return h.reshape(h.shape[0], -1) if self.flatten_all_steps else h[:, -1]

  def _cell(self) -> nn.GRUCell:
    if not self.torch_init:
      return nn.GRUCell(self.hidden, name="gru")
    init = symmetric_uniform(1.0 / math.sqrt(self.hidden))
    return nn.GRUCell(self.hidden, kernel_init=init, recurrent_kernel_init=init, bias_init=init,
                      name="gru")


# ---------------------------------------------------------------------------------------------
# Low-rank tensor fusion


class LowRankTensorFusion(nn.Module):
  """MultiBench's LowRankTensorFusion(input_dims, output_dim, rank), flatten=True.

  For each modality m: [1, x_m] @ factor_m (rank x (d_m + 1) x output_dim); the elementwise
  product over modalities, then a weighted sum over the ranks plus a bias. Input dims are read
  from the features at init.
  """
  output_dim: int = 120
  rank: int = 40

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]):
    fused = None
    for i, f in enumerate(features):
      f = f.reshape(f.shape[0], -1)
      with_one = jnp.concatenate([jnp.ones((f.shape[0], 1), f.dtype), f], axis=-1)
      factor = self.param(f"factor_{i}", torch_xavier_normal,
                          (self.rank, with_one.shape[-1], self.output_dim))
      projected = jnp.einsum("bd,rdo->rbo", with_one, factor)
      fused = projected if fused is None else fused * projected
    weights = self.param("fusion_weights", torch_xavier_normal, (1, self.rank))
    bias = self.param("fusion_bias", nn.initializers.zeros, (1, self.output_dim))
    return jnp.einsum("r,rbo->bo", weights[0], fused) + bias


class LowRankTensorFusionExpert(nn.Module):
  """q(y | x_1, ..., x_M) by low-rank tensor fusion: its own encoder per modality, LRTF to
  `output_dim` features, then the MLP head (AV-MNIST: LRTF([48, 192], 120, rank 40) ->
  MLP(120, 100, 10)). Built like modules.LateFusionExpert, with the same submodule names.

  Deviation from the reference (quirk #3): the LRTF factors are trained here; MultiBench leaves
  them unregistered, so there they stay at their random init.
  """
  encoders: Sequence[tuple[str, nn.Module]]  # (modality, encoder) pairs, in fusion order
  head: Any  # a module, or MLP widths: hidden widths then num_classes (modules.apply_head)
  dropout_rate: float = 0.0
  rank: int = 40
  output_dim: int = 120

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False):
    features = [enc.clone(name=f"encoder_{m}", parent=self)(inputs[m], train)
                for m, enc in self.encoders]
    fused = LowRankTensorFusion(self.output_dim, self.rank, name="fusion")(features)
    return modules.apply_head(self, fused, train)


# ---------------------------------------------------------------------------------------------
# fastMRI: pre-activation ResNet

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (C_out * K * K)), untruncated,
# what the reference applies to every convolution (the shortcuts too).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
GROUP_NORM_EPSILON = 1e-5  # PyTorch's GroupNorm default (flax's is 1e-6)


def resnet_conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  """A bias-free KxK convolution with PyTorch's symmetric padding K // 2 (for stride 2, 'SAME'
  would pad an even input on one side only)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False,
                 kernel_init=kaiming_normal_fan_out, name=name)


def group_norm(channels: int, groups: int, name: str) -> nn.GroupNorm:
  """GroupNorm with min(groups, channels) groups (32 in the reference; narrower layers, as in
  small test models, get one channel per group), scale 1, bias 0, epsilon 1e-5."""
  groups = min(groups, channels)
  if channels % groups:
    raise ValueError(f"PreActResNet: {channels} channels do not split into {groups} groups of "
                     f"GroupNorm; use widths that are multiples of {groups} (or below it).")
  return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPSILON, use_fast_variance=False,
                      name=name)


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d on NHWC: output cell i of n along an axis of length L averages
  input positions floor(i L / n) .. ceil((i + 1) L / n) - 1 (exact blocks when n divides L)."""
  def averaging(length: int, n: int) -> np.ndarray:
    weights = np.zeros((n, length), np.float32)
    for i in range(n):
      start, end = (i * length) // n, -(-(i + 1) * length // n)
      weights[i, start:end] = 1.0 / (end - start)
    return weights
  rows, cols = averaging(x.shape[1], size[0]), averaging(x.shape[2], size[1])
  return jnp.einsum("ih,bhwc,jw->bijc", rows.astype(x.dtype), x, cols.astype(x.dtype))


class PreActBlock(nn.Module):
  """The pre-activation basic block: out = conv_2(relu(norm_2(conv_1(a)))) + shortcut, with
  a = relu(norm_1(x)); the shortcut is x, or a 1x1 convolution of a when the stride or the
  width changes."""
  features: int
  stride: int = 1
  groups: int = 32

  @nn.compact
  def __call__(self, x):
    a = nn.relu(group_norm(x.shape[-1], self.groups, "norm_1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = resnet_conv(self.features, 1, self.stride, "shortcut")(a)
    out = resnet_conv(self.features, 3, self.stride, "conv_1")(a)
    out = nn.relu(group_norm(self.features, self.groups, "norm_2")(out))
    return resnet_conv(self.features, 3, 1, "conv_2")(out) + shortcut


class PreActResNet(nn.Module):
  """The fastMRI knee encoder, images NHWC [B, H, W, C] -> features [B, P * P * widths[-1]].

  As the reference's PreActResNet18 (divyam3897/I2M2: fastMRI/models/preactresnet_knee.py,
  norm='group'): a 3x3 stride-1 convolution to widths[0]; stages of `blocks` PreActBlocks
  (widths 64/128/256/512, [2, 2, 2, 2]; every stage but the first starts with stride 2);
  no normalisation after the last block (the reference's final GroupNorm serves only its
  shared_conv variant); adaptive average pooling to P x P (P = pooled_size = 10: 40x40 -> 10x10
  for 320x320 inputs); flattened (in H, W, C order; PyTorch flattens C, H, W). Convolutions are
  bias-free and Kaiming-normal (fan_out); GroupNorm has 32 groups, or one per channel for widths
  below 32 (small test models). The input's channel count is free: 1 (magnitude or phase) or 2
  (both, the joint expert). The reference's `drop_prob` is never used, so there is no dropout.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  blocks: Sequence[int] = (2, 2, 2, 2)
  pooled_size: int = 10
  groups: int = 32
  remat: bool = False  # recompute each block in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # GroupNorm: the same computation in training and evaluation
    if x.ndim != 4:
      raise ValueError(f"PreActResNet expects images [B, H, W, C] (NHWC); got shape {x.shape}.")
    if len(self.widths) != len(self.blocks):
      raise ValueError(f"PreActResNet: widths {tuple(self.widths)} and blocks "
                       f"{tuple(self.blocks)} must have one entry per stage.")
    # Rematerialised, a block keeps only its input for the backward pass and recomputes the
    # rest: activation memory falls to about one tensor per block, for one more forward pass.
    block_cls = nn.remat(PreActBlock) if self.remat else PreActBlock
    x = resnet_conv(self.widths[0], 3, 1, "stem")(x)
    for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
      for block in range(count):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(width, stride, self.groups, name=f"stage_{stage}_block_{block}")(x)
    x = adaptive_avg_pool(x, (self.pooled_size, self.pooled_size))
    return x.reshape(x.shape[0], -1)
