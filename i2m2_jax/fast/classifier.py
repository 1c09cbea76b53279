"""FastLeNetClassifier: LeNet experts and their product, with the first blocks of the experts that
read a modality fused into one (item 1 of the package docstring) and every block computed by
ops.py; its variables are declared at the plain modules' paths. build_fast_model builds it from
config.model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from i2m2_jax import models
from i2m2_jax import modules
from i2m2_jax import paper_models
from i2m2_jax.combine import product_of_experts
from i2m2_jax.fast import ops

# ---------------------------------------------------------------------------------------------
# Variable holders: the plain modules' variable tree, declared at the same paths by the same
# functions of paper_models


class _BatchNormVars(nn.Module):
  """paper_models.TorchBatchNorm's variables, with its running-average update for batch moments
  computed elsewhere (by ops)."""
  features: int

  def setup(self):
    self.scale, self.bias, self.mean, self.var = paper_models.batch_norm_variables(
        self, self.features)

  def __call__(self):
    return self.scale, self.bias, self.mean.value, self.var.value

  def update(self, batch_mean, batch_var, count):
    if not self.is_initializing():
      paper_models.update_running_averages(self.mean, self.var, batch_mean, batch_var, count,
                                           paper_models.BN_MOMENTUM)


class _LeNetVars(nn.Module):
  """paper_models.LeNet's variables (conv_i, bn_i)."""
  in_channels: int
  channels: int
  num_blocks: int

  def setup(self):
    ci = self.in_channels
    for i, (co, k) in enumerate(paper_models.lenet_blocks(self.channels, self.num_blocks)):
      setattr(self, f"conv_{i}", paper_models.LeNetConv((k, k, ci, co)))
      setattr(self, f"bn_{i}", _BatchNormVars(co))
      ci = co

  def __call__(self) -> list[dict[str, jax.Array]]:
    out = []
    for i in range(1 + self.num_blocks):  # the first block, then num_blocks more
      scale, bias, mean, var = getattr(self, f"bn_{i}")()
      out.append({"kernel": getattr(self, f"conv_{i}").kernel, "scale": scale, "bias": bias,
                  "mean": mean, "var": var})
    return out

  def update(self, stats: Sequence[tuple[jax.Array, jax.Array, int]]):
    for i, (mean, var, count) in enumerate(stats):
      getattr(self, f"bn_{i}").update(mean, var, count)


class _ExpertVars(nn.Module):
  """An expert's variables under its plain names: 'encoder' (uni-modal) or 'encoder_<m>' (joint),
  and 'head' (modules.MLP, also applied here so that dropout keys match the plain module)."""
  encoder_names: tuple[tuple[str, str], ...]  # (modality, submodule name)
  lenets: tuple[tuple[int, int, int], ...]    # per modality: (in_channels, channels, num_blocks)
  head: tuple[int, ...]
  dropout_rate: float = 0.0

  def setup(self):
    for (_, sub), (ci, c, k) in zip(self.encoder_names, self.lenets):
      setattr(self, sub, _LeNetVars(ci, c, k))
    self.head_mlp = modules.MLP(self.head, self.dropout_rate, name="head")

  def encoders(self) -> dict[str, list[dict[str, jax.Array]]]:
    return {m: getattr(self, sub)() for m, sub in self.encoder_names}

  def update(self, stats: Mapping[str, Sequence[tuple[jax.Array, jax.Array, int]]]):
    for m, sub in self.encoder_names:
      getattr(self, sub).update(stats[m])

  def __call__(self, features: jax.Array, train: bool):
    return self.head_mlp(features, train)


# ---------------------------------------------------------------------------------------------
# The classifier


class FastLeNetClassifier(nn.Module):
  """LeNet experts + PoE, computed with fused first convolutions per modality (package docstring).

  `experts`: (name, modalities read, {modality: (channels, num_blocks)}, head widths, dropout)
  in the plain classifier's expert order. `modality_shapes`: per-example shapes [H, W, C].
  `use_s2d`: space-to-depth for the fused first convolutions where the shape allows it.
  `fuse_first_conv`: one convolution per modality for all experts' first blocks.
  `stem_matmul`: the first block as stem_bn_relu_pool (where cpu_kernels do not run it).
  `cpu_kernels`: blocks on cpu_kernels where use_cpu_kernels allows.
  """
  experts: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, tuple[int, int]], ...],
                       tuple[int, ...], float], ...]
  modality_shapes: tuple[tuple[str, tuple[int, ...]], ...]
  use_s2d: bool = True
  fuse_first_conv: bool = True
  stem_matmul: bool = True
  cpu_kernels: bool = True

  def setup(self):
    shapes = dict(self.modality_shapes)
    holders = {}
    for name, modalities, lenets, head, dropout in self.experts:
      lenets = dict(lenets)
      names = tuple((m, "encoder" if name != models.JOINT else f"encoder_{m}") for m in modalities)
      holders[name] = _ExpertVars(names, tuple((shapes[m][-1],) + tuple(lenets[m])
                                               for m in modalities), tuple(head), dropout,
                                  name=name)
    self.holders = holders

  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False,
               present: jax.Array | None = None) -> dict[str, Any]:
    variables = {name: self.holders[name].encoders() for name, *_ in self.experts}
    features: dict[str, dict[str, jax.Array]] = {name: {} for name, *_ in self.experts}
    stats: dict[str, dict[str, list]] = {name: {} for name, *_ in self.experts}
    for modality, _ in self.modality_shapes:
      readers = [name for name, modalities, *_ in self.experts if modality in modalities]
      if not readers:
        continue
      x = inputs[modality]
      if x.ndim != 4:
        raise ValueError(f"LeNet expects images [B, H, W, C] (NHWC); got {modality!r} of shape "
                         f"{x.shape}.")
      branch_vars = [variables[name][modality] for name in readers]
      outs, branch_stats = self._encode(x.astype(jnp.float32), branch_vars, train)
      for name, h, st in zip(readers, outs, branch_stats):
        features[name][modality] = h.reshape(h.shape[0], -1)
        stats[name][modality] = st
    logits = {}
    for name, modalities, *_ in self.experts:
      f = [features[name][m] for m in modalities]
      logits[name] = self.holders[name](f[0] if len(f) == 1 else jnp.concatenate(f, axis=-1),
                                        train)
      if train:
        self.holders[name].update(stats[name])
    return {"log_probs": product_of_experts(logits, present), "expert_logits": logits}

  # -- encoders ---------------------------------------------------------------------------------

  def _encode(self, x, branch_vars, train):
    """All LeNet branches reading one modality: the first block fused across branches, the
    rest per branch. Returns per branch the features and the (mean, var, count) of each block.
    Activations between blocks on cpu_kernels stay channels-first (`channels_first`)."""
    widths = [v[0]["kernel"].shape[-1] for v in branch_vars]
    if self.fuse_first_conv:
      h_all, stats_all, channels_first = self._block0(
          x, _concat_block([v[0] for v in branch_vars]), train)
      splits = np.cumsum(widths)[:-1].tolist()
      hs = jnp.split(h_all, splits, axis=1 if channels_first else -1)
      stats0 = list(zip(*(jnp.split(s, splits) if i < 2 else [s] * len(widths)
                          for i, s in enumerate(stats_all))))
      layouts = [channels_first] * len(widths)
    else:
      hs, stats0, layouts = zip(*(self._block0(x, v[0], train) for v in branch_vars))
    outs, all_stats = [], []
    for h, channels_first, st0, blocks in zip(hs, layouts, stats0, branch_vars):
      st = [tuple(st0)]
      for block in blocks[1:]:
        h, s, channels_first = self._block(h, channels_first, block, train)
        st.append(s)
      # Features are flattened in the plain modules' NHWC order.
      outs.append(h.transpose(0, 2, 3, 1) if channels_first else h)
      all_stats.append(st)
    return outs, all_stats

  def _block(self, h, channels_first, block, train):
    """A 3x3 block after the first; returns (output, statistics, output channels-first)."""
    kernel = block["kernel"]
    b, *spatial, c = h.shape if not channels_first else (h.shape[0], *h.shape[2:], h.shape[1])
    if self.cpu_kernels and ops.use_cpu_kernels((b, *spatial, c), kernel.shape):
      x = h if channels_first else h.transpose(0, 3, 1, 2)
      return *self._cpu_block(x, block, train), True
    if channels_first:
      h = h.transpose(0, 2, 3, 1)
    if not train and self.use_s2d and ops.use_s2d_conv3x3(h.shape, kernel.shape):
      return *self._bn_pool(ops.conv3x3_s2d(h, kernel), block, train, "s2d"), False
    y = ops.conv3x3(h, kernel) if train else paper_models.conv2d(h, kernel, 1)
    return *self._bn_pool(y, block, train, "nhwc"), False

  @staticmethod
  def _cpu_block(x, block, train):
    """A block on cpu_kernels: channels-first x -> (channels-first output, statistics)."""
    count = x.shape[0] * x.shape[2] * x.shape[3]
    args = (x, block["kernel"], block["scale"], block["bias"])
    if train:
      out, mean, var = ops.conv_bn_relu_pool_cpu(*args)
      return out, (mean, var, count)
    return (ops.conv_bn_relu_pool_eval_cpu(*args, block["mean"], block["var"]),
            (block["mean"], block["var"], count))

  def _block0(self, x, block, train):
    """The first block; returns (output, statistics, output channels-first)."""
    kernel = block["kernel"]
    k = kernel.shape[0]
    count = x.shape[0] * x.shape[1] * x.shape[2]
    if self.cpu_kernels and ops.use_cpu_kernels(x.shape, kernel.shape, min_pixels=0):
      return *self._cpu_block(x.transpose(0, 3, 1, 2), block, train), True
    if self.stem_matmul and k == 5 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
      if train:
        out, mean, var = ops.stem_bn_relu_pool(x, kernel, block["scale"], block["bias"],
                                               ops.stem_chunk(x.shape[0], train=True),
                                               ops.stem_forward_chunk(x.shape))
        return out, (mean, var, count), False
      out = ops.stem_bn_relu_pool_eval(x, kernel, block["scale"], block["bias"], block["mean"],
                                       block["var"], ops.stem_chunk(x.shape[0], train=False))
      return out, (block["mean"], block["var"], count), False
    if self.use_s2d and ops.can_use_s2d(x.shape, k):
      y = paper_models.conv2d(ops.space_to_depth(x, 2), ops.s2d_kernel(kernel, 2), 1)
      b, h, w, _ = y.shape
      return *self._bn_pool(y.reshape(b, h, w, 4, kernel.shape[-1]), block, train, "s2d"), False
    return *self._bn_pool(paper_models.conv2d(x, kernel, k // 2), block, train, "nhwc"), False

  @staticmethod
  def _bn_pool(y, block, train, layout):
    count = y.size // y.shape[-1]
    if train:
      out, mean, var = ops.bn_relu_pool(y, block["scale"], block["bias"], layout)
      return out, (mean, var, count)
    out = ops.bn_relu_pool_eval(y, block["scale"], block["bias"], block["mean"], block["var"],
                                layout)
    return out, (block["mean"], block["var"], count)


def _concat_block(blocks):
  if len(blocks) == 1:
    return blocks[0]
  return {"kernel": jnp.concatenate([b["kernel"] for b in blocks], axis=-1),
          **{k: jnp.concatenate([b[k] for b in blocks]) for k in ("scale", "bias", "mean", "var")}}


# ---------------------------------------------------------------------------------------------
# Building from a config, and the (identity) layout conversion


def _lenet_kwargs(model_config, modality: str, joint: bool) -> dict[str, Any]:
  kwargs = models.config_mapping(model_config.get("encoder_kwargs"),
                                 "config.model.encoder_kwargs").get(modality)
  if joint:
    kwargs = models.config_mapping(model_config.get("joint_encoder_kwargs"),
                                   "config.model.joint_encoder_kwargs").get(modality, kwargs)
  kwargs = models.config_mapping(kwargs, f"encoder_kwargs.{modality}")
  unsupported = {k: v for k, v in kwargs.items()
                 if k not in ("channels", "num_blocks") and v not in (False, None)}
  if unsupported:
    raise ValueError(f"config.model.implementation='fast' supports LeNet's channels and "
                     f"num_blocks only; {'joint_' if joint else ''}encoder_kwargs.{modality} "
                     f"sets {unsupported}. Use implementation='plain'.")
  defaults = paper_models.LeNet()
  return {"channels": int(kwargs.get("channels", defaults.channels)),
          "num_blocks": int(kwargs.get("num_blocks", defaults.num_blocks))}


def check_supported(model_config, modality_shapes: Mapping[str, Sequence[int]],
                    layout: Mapping[str, Sequence[str]]) -> None:
  """Raises a ValueError naming the field when the fast implementation cannot build this model
  (`layout`: its experts and what each reads, models.expert_layout)."""
  if models.compute_dtype(model_config) != jnp.float32:
    raise ValueError(f"config.model.implementation='fast' computes in float32 only (it is tuned "
                     f"for CPUs); config.model.compute_dtype is "
                     f"{model_config.get('compute_dtype')!r}. Use implementation='plain' for "
                     f"bfloat16 compute.")
  if (model_config.get("head", "mlp") or "mlp") != "mlp":
    raise ValueError(f"config.model.implementation='fast' supports the 'mlp' head only; "
                     f"config.model.head is {model_config.head!r}. Use implementation='plain'.")
  encoders = models.config_mapping(model_config.get("encoders"), "config.model.encoders")
  for m, shape in modality_shapes.items():
    name = encoders.get(m)
    if name != "lenet":
      raise ValueError(f"config.model.implementation='fast' supports LeNet experts only "
                       f"(the AV-MNIST models); config.model.encoders.{m} is {name!r}. Use "
                       f"implementation='plain' for this model.")
    if len(shape) != 3:
      raise ValueError(f"config.model.implementation='fast' needs images [H, W, C]; modality "
                       f"{m!r} has per-example shape {tuple(shape)}.")
  if any(name != models.JOINT and len(keys) != 1 for name, keys in layout.items()):
    raise ValueError("config.model.implementation='fast' needs uni-modal experts that read one "
                     "modality each; config.model.expert_inputs says otherwise. Use "
                     "implementation='plain'.")
  if models.JOINT in layout:
    fusion = model_config.get("fusion", "late_fusion")
    if fusion != "late_fusion" or model_config.get("fusion_kwargs"):
      raise ValueError(f"config.model.implementation='fast' supports the late_fusion joint "
                       f"expert without fusion_kwargs; config.model.fusion is {fusion!r}. Use "
                       f"implementation='plain' (e.g. for lrtf).")


def build_fast_model(model_config, modality_shapes: Mapping[str, Sequence[int]],
                     num_classes: int, layout: Mapping[str, Sequence[str]] | None = None,
                     **options) -> FastLeNetClassifier:
  """The fast classifier for config.model (same experts and variables as models.build_model);
  `layout` is models.expert_layout's (computed here when not given)."""
  layout = layout or models.expert_layout(model_config, list(modality_shapes))
  check_supported(model_config, modality_shapes, layout)
  head = tuple(model_config.head_hidden) + (num_classes,)
  dropout = float(model_config.get("dropout_rate", 0.0))
  experts = []
  for name, reads in layout.items():
    reads = tuple(reads)
    lenets = tuple((m, tuple(_lenet_kwargs(model_config, m, name == models.JOINT).values()))
                   for m in reads)
    experts.append((name, reads, lenets, head, dropout))
  return FastLeNetClassifier(
      experts=tuple(experts),
      modality_shapes=tuple((m, tuple(int(d) for d in s)) for m, s in modality_shapes.items()),
      **options)


def _same_tree(a, b) -> bool:
  """Same tree structure and leaf shapes (arrays or jax.ShapeDtypeStruct)."""
  shapes = lambda t: [tuple(getattr(x, "shape", np.shape(x))) for x in jax.tree.leaves(t)]  # noqa: E731
  return jax.tree.structure(a) == jax.tree.structure(b) and shapes(a) == shapes(b)


def to_plain_variables(fast_variables, plain_template=None):
  """The plain classifier's variables from the fast one's. The layouts are the same (module
  docstring), so this returns the same tree; with `plain_template` (e.g. `jax.eval_shape` of
  the plain model's init) it checks the structure and shapes first."""
  if plain_template is not None and not _same_tree(fast_variables, plain_template):
    raise ValueError("These variables do not have the plain model's layout.")
  return fast_variables


def from_plain_variables(plain_variables, fast_template=None):
  """The fast classifier's variables from the plain one's (the same tree; see
  `to_plain_variables`)."""
  if fast_template is not None and not _same_tree(plain_variables, fast_template):
    raise ValueError("These variables do not have the fast model's layout.")
  return plain_variables
