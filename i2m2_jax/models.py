"""Models from configs: the registries of encoders and fusions, which experts a model kind has
and which inputs each reads, and `build_model`.

The modules themselves live in `i2m2_jax.modules` (generic encoders, experts, the classifier) and
`i2m2_jax.paper_models` (the paper's LeNet, GRU and low-rank tensor fusion); this module imports
both and is imported by neither, so there is no import cycle. The fast CPU implementation of the
AV-MNIST models (`i2m2_jax.fast`) is imported only when `config.model.implementation='fast'`.

Expert names are `uni_<modality>` and `joint` in every model kind, so a `uni` run's expert
initialises the same expert inside `intra` or `i2m2` (config.model.init_from). `expert_layout` is
the one place that says which experts a model has and which input keys each reads; the trainer,
the evaluation of missing modalities and the fast implementation all ask it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from i2m2_jax import modules
from i2m2_jax import paper_models

MODEL_KINDS = ("i2m2", "intra", "inter", "uni")
JOINT = "joint"
UNI_PREFIX = "uni_"

# name -> encoder class (config.model.encoders selects from it).
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": modules.MLPEncoder,
    "gru": modules.GRUEncoder,
    "conv1d": modules.Conv1DEncoder,
    "cnn": modules.CNNEncoder,
    # The paper's (MultiBench's) encoders: AV-MNIST LeNet; MIMIC GRUWithLinear, GRU and MLP.
    "lenet": paper_models.LeNet,
    "gru_linear": paper_models.GRUSequenceEncoder,
    "gru_all_states": functools.partial(paper_models.GRUSequenceEncoder, per_step_features=0),
    "mlp_raw": paper_models.MLPRawEncoder,
    # fastMRI knee: PreActResNet-18 (widths, blocks and pooled size are its arguments).
    "preactresnet18": paper_models.PreActResNet,
    # The input straight to the head, flattened: precomputed features (e.g. of a frozen backbone),
    # and the default for small inputs (default_encoder).
    "identity": modules.IdentityEncoder,
}

# name -> head class, built as cls(features=config.model.head_hidden + (num_outputs,),
# dropout_rate=config.model.dropout_rate) (config.model.head selects from it). Every expert's
# head is one of these, named 'head' in its parameters.
HEADS: dict[str, Callable[..., nn.Module]] = {
    "mlp": modules.MLP,               # Dense + ReLU per hidden width, then Dense
    "fiber": modules.LayerNormMLP,    # Dense + LayerNorm + GELU per hidden width, then Dense
}

# Default encoders (default_encoder): vectors, and sequences and images of at most
# FLATTEN_MAX_SIZE numbers per example, are flattened, so that each expert is an MLP (its head)
# on its inputs; larger sequences and images get the structured encoder of their rank.
# Threshold measured by experiments/defaults_study.py (README "Your own data").
FLATTEN_MAX_SIZE = 1024
STRUCTURED_ENCODER_BY_RANK = {2: "conv1d", 3: "cnn"}
# The per-example ranks an encoder reads (those not listed flatten any shape).
ENCODER_RANKS = {"gru": (2,), "conv1d": (2,), "gru_linear": (2,), "gru_all_states": (2,),
                 "cnn": (3,), "lenet": (3,), "preactresnet18": (3,)}

# name -> joint-expert class, built as cls(encoders=((key, encoder), ...), head=<a HEADS module>,
# dropout_rate=..., **config.model.fusion_kwargs).
FUSIONS: dict[str, Callable[..., nn.Module]] = {
    "late_fusion": modules.LateFusionExpert,
    "lrtf": paper_models.LowRankTensorFusionExpert,
    # One encoder over the inputs stacked as channels (the first input's encoder; fastMRI).
    "channel_stack": modules.ChannelStackExpert,
}

IMPLEMENTATIONS = ("plain", "fast")

# Encoders whose first layer convolves the raw input: zero channels appended to the input, read
# by zero kernel rows, change nothing. Experts on them that differ only in their input's channel
# count (fastMRI: the joint expert reads 2, the uni-modal ones 1) are stacked with both padded
# (config.model.stack_experts, modules.stacked_expert_logits).
CHANNEL_PADDABLE_ENCODERS = (paper_models.PreActResNet, modules.CNNEncoder)


def uni_expert_name(modality: str) -> str:
  return f"{UNI_PREFIX}{modality}"


def config_mapping(value: Any, field: str) -> dict[str, Any]:
  """A config field that maps names to values, given as a ConfigDict/dict or, from the command
  line (where a ConfigDict cannot gain keys), as 'name=value,name=value'."""
  if not value:
    return {}
  if isinstance(value, str):
    out = {}
    for entry in value.split(","):
      name, sep, item = (part.strip() for part in entry.partition("="))
      if not sep or not name or not item:
        raise ValueError(f"{field}={value!r}: entry {entry.strip()!r} is not of the form "
                         f"'name=value' (entries separated by commas).")
      out[name] = item
    return out
  return dict(value.to_dict() if hasattr(value, "to_dict") else value)


# ---------------------------------------------------------------------------------------------
# Which experts a model has, and what each reads


def available_experts(model_config, input_keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Every expert the data allows, name -> the input keys it reads: by default `uni_<m>` reads
  m for each input key m and `joint` reads them all; `config.model.expert_inputs`
  ('uni_image=image,uni_text=text,joint=fused', keys joined by '+' for an expert that reads
  several) replaces that mapping, e.g. for precomputed features."""
  input_keys = list(input_keys)
  spec = config_mapping(model_config.get("expert_inputs", ""), "config.model.expert_inputs")
  if not spec:
    return {**{uni_expert_name(m): (m,) for m in input_keys}, JOINT: tuple(input_keys)}
  experts = {}
  for name, keys in spec.items():
    keys = tuple(k.strip() for k in (keys.split("+") if isinstance(keys, str) else keys))
    if name != JOINT and not name.startswith(UNI_PREFIX):
      raise ValueError(f"config.model.expert_inputs names expert {name!r}; expert names are "
                       f"'{UNI_PREFIX}<name>' (uni-modal) or '{JOINT}'.")
    unknown = [k for k in keys if k not in input_keys]
    if unknown or not keys:
      raise ValueError(f"config.model.expert_inputs: expert {name!r} reads {list(keys)}, but the "
                       f"data set's inputs are {input_keys}.")
    experts[name] = keys
  return dict(sorted(experts.items(), key=lambda item: item[0] == JOINT))  # uni-modal first


def expert_layout(model_config, input_keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """The experts of config.model.kind in model order (uni-modal ones first, then the joint one),
  each with the input keys it reads."""
  available = available_experts(model_config, input_keys)
  kind = model_config.kind
  unis = [n for n in available if n != JOINT]
  if kind == "uni":
    modality = model_config.get("modality", "")
    name = uni_expert_name(modality)
    if name not in available:
      raise ValueError(f"config.model.modality={modality!r} is not a modality with a uni-modal "
                       f"expert; expected one of {[n[len(UNI_PREFIX):] for n in unis]}.")
    names = [name]
  elif kind in ("i2m2", "intra", "inter"):
    needs_unis, needs_joint = kind != "inter", kind != "intra"
    if (needs_unis and not unis) or (needs_joint and JOINT not in available):
      raise ValueError(f"config.model.kind={kind!r} needs "
                       f"{'uni-modal experts and ' if needs_unis else ''}"
                       f"{'the joint expert' if needs_joint else ''}".removesuffix(" and ")
                       + f"; config.model.expert_inputs defines only {list(available)}.")
    names = (unis if needs_unis else []) + ([JOINT] if needs_joint else [])
  else:
    raise ValueError(f"config.model.kind={kind!r} is unknown; expected one of "
                     f"{list(MODEL_KINDS)}.")
  return {n: available[n] for n in names}


def check_named_inputs(model_config, input_keys: Sequence[str]) -> None:
  """The per-input config fields name inputs the data has (a misspelt one would be ignored)."""
  for field in ("encoders", "encoder_kwargs", "joint_encoder_kwargs"):
    unknown = [k for k in config_mapping(model_config.get(field), f"config.model.{field}")
               if k not in input_keys]
    if unknown:
      raise ValueError(f"config.model.{field} names modality {unknown[0]!r}, which the data set "
                       f"does not have; expected one of {list(input_keys)}.")


def experts_without(layout: Mapping[str, Sequence[str]], missing: str) -> tuple[bool, ...]:
  """Which experts of `layout` (in order) can still predict when input `missing` is absent:
  those that do not read it."""
  return tuple(missing not in keys for keys in layout.values())


# ---------------------------------------------------------------------------------------------
# Building


def default_encoder(shape: Sequence[int]) -> str | None:
  """The encoder of an input whose examples have this shape when config.model.encoders does not
  name one: 'identity' (flattened) for vectors and for small sequences and images, so that the
  expert is an MLP on them (as good as a structured encoder there, and faster); the structured
  encoder of the rank for larger ones; None for rank 4+."""
  if len(shape) == 1 or (len(shape) in STRUCTURED_ENCODER_BY_RANK
                         and math.prod(shape) <= FLATTEN_MAX_SIZE):
    return "identity"
  return STRUCTURED_ENCODER_BY_RANK.get(len(shape))


def encoder_name(model_config, key: str, shape: Sequence[int]) -> str:
  """The encoder input `key` gets: config.model.encoders[key], else config.model.default_encoder,
  else default_encoder(shape); checked against the registry and the example's rank."""
  encoders = config_mapping(model_config.get("encoders"), "config.model.encoders")
  field = "config.model.encoders" if key in encoders else "config.model.default_encoder"
  name = encoders.get(key) or model_config.get("default_encoder") or default_encoder(shape)
  if name is None:
    raise ValueError(f"Input {key!r} has per-example shape {tuple(shape)}; no default encoder for "
                     f"rank {len(shape)}. Set --config.model.encoders={key}=NAME with NAME one of "
                     f"{sorted(ENCODERS)} (e.g. 'mlp' flattens any shape).")
  if name not in ENCODERS:
    raise ValueError(f"{field}: {key}={name!r} is unknown; expected one of {sorted(ENCODERS)}.")
  if len(shape) not in ENCODER_RANKS.get(name, (len(shape),)):
    fits = sorted(n for n in ENCODERS if len(shape) in ENCODER_RANKS.get(n, (len(shape),)))
    raise ValueError(f"{field}: {key}={name!r} reads examples of rank "
                     f"{ENCODER_RANKS[name]}, but input {key!r} has per-example shape "
                     f"{tuple(shape)}; encoders for it: {fits} (mlp flattens any shape).")
  return name


def _encoder_for(key: str, shape: Sequence[int], model_config, joint: bool,
                 batch_axis_name: str | None) -> nn.Module:
  """The encoder of one input (encoder_name), with config.model.encoder_kwargs[key] (for the
  joint expert joint_encoder_kwargs[key] first) as its arguments. Encoders with BatchNorm get
  the pmap device axis."""
  name = encoder_name(model_config, key, shape)
  kwargs = config_mapping(model_config.get("encoder_kwargs"), "config.model.encoder_kwargs").get(key)
  if joint:
    kwargs = config_mapping(model_config.get("joint_encoder_kwargs"),
                            "config.model.joint_encoder_kwargs").get(key, kwargs)
  kwargs = config_mapping(kwargs, f"config.model.encoder_kwargs.{key}")
  factory = ENCODERS[name]
  cls = getattr(factory, "func", factory)
  fields = {f.name for f in dataclasses.fields(cls)}
  if batch_axis_name and "bn_axis_name" in fields:
    kwargs["bn_axis_name"] = batch_axis_name
  if model_config.get("remat", False):
    if "remat" in fields:  # the encoder rematerialises its own blocks (residual networks)
      kwargs["remat"] = True
    else:  # the whole encoder, recomputed in the backward pass; `train` (argument 2) is static
      return nn.remat(cls, static_argnums=(2,))(**{**getattr(factory, "keywords", {}), **kwargs})
  return factory(**kwargs)


def build_head(model_config, num_outputs: int) -> nn.Module:
  """An expert's head: config.model.head ('mlp' by default) with config.model.head_hidden."""
  name = model_config.get("head", "mlp") or "mlp"
  if name not in HEADS:
    raise ValueError(f"config.model.head={name!r} is unknown; expected one of {sorted(HEADS)}.")
  return HEADS[name](features=tuple(model_config.head_hidden) + (num_outputs,),
                     dropout_rate=model_config.get("dropout_rate", 0.0))


def build_expert(name: str, keys: Sequence[str], modality_shapes: Mapping[str, Sequence[int]],
                 num_outputs: int, model_config, batch_axis_name: str | None = None) -> nn.Module:
  """One expert: the joint one by config.model.fusion; a uni-modal one as an encoder and a head
  (or, reading several keys, their encoders concatenated as in late fusion)."""
  head = build_head(model_config, num_outputs)
  dropout = model_config.get("dropout_rate", 0.0)
  joint = name == JOINT
  encoders = tuple((k, _encoder_for(k, modality_shapes[k], model_config, joint, batch_axis_name))
                   for k in keys)
  if joint:
    fusion = FUSIONS[model_config.get("fusion", "late_fusion")]  # checked by build_model
    return fusion(encoders=encoders, head=head, dropout_rate=dropout,
                  **config_mapping(model_config.get("fusion_kwargs"), "config.model.fusion_kwargs"))
  if len(encoders) == 1:
    return modules.UniModalExpert(keys[0], encoders[0][1], head, dropout)
  return modules.LateFusionExpert(encoders=encoders, head=head, dropout_rate=dropout)


def stack_groups(experts: Sequence[tuple[str, nn.Module]],
                 modality_shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, ...], ...]:
  """The groups of experts computed as one network (config.model.stack_experts), in model
  order: two or more experts that are one encoder and a head over one array
  (modules.single_encoder) with equal encoders and heads, inputs of one shape (but for the
  channel count with CHANNEL_PADDABLE_ENCODERS) and no dropout. Groups whose experts turn out to
  hold BatchNorm statistics are computed expert by expert (modules.MultiModalClassifier)."""
  groups: list[tuple[Any, list[str]]] = []
  abstract_inputs = {k: jax.ShapeDtypeStruct((1, *s), jnp.float32)
                     for k, s in modality_shapes.items()}
  for name, expert in experts:
    encoder = modules.single_encoder(expert)
    if encoder is None:
      continue
    if any(getattr(m, "dropout_rate", 0.0) for m in (expert, encoder, expert.head)):
      logging.info("config.model.stack_experts: expert %s has dropout, computed on its own.", name)
      continue
    shape = jax.eval_shape(expert.encoder_input, abstract_inputs).shape[1:]
    key = (encoder, expert.head,
           shape[:-1] if isinstance(encoder, CHANNEL_PADDABLE_ENCODERS) else shape)
    match = next((names for k, names in groups if k == key), None)
    if match is None:
      groups.append((key, [name]))
    else:
      match.append(name)
  stacks = tuple(tuple(names) for _, names in groups if len(names) > 1)
  logging.info("config.model.stack_experts: experts computed as one network: %s.", stacks)
  return stacks


def build_model(model_config, modality_shapes: Mapping[str, Sequence[int]],
                output_shape: int | Sequence[int], *, batch_axis_name: str | None = None
                ) -> nn.Module:
  """The classifier for config.model over the given inputs (name -> example shape).

  `output_shape`: the task's per-example logits shape ((C,), or (L, 2) for L binary labels; an
  int C means (C,)). `batch_axis_name`: the pmap axis, so that BatchNorm layers normalise with
  the statistics of the whole global batch. config.model.implementation (default 'plain') picks
  how it is computed: 'plain' is a modules.MultiModalClassifier (with config.model.stack_experts,
  experts of one architecture computed as one network: stack_groups); 'fast' the CPU-tuned LeNet
  classifier of i2m2_jax.fast (same function and variables).
  """
  if len(modality_shapes) < 1:
    raise ValueError("The data set has no modality.")
  output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
  check_named_inputs(model_config, list(modality_shapes))
  fusion = model_config.get("fusion", "late_fusion")
  if fusion not in FUSIONS:  # checked even when the kind has no joint expert
    raise ValueError(f"config.model.fusion={fusion!r} is unknown; expected one of "
                     f"{sorted(FUSIONS)}.")
  layout = expert_layout(model_config, list(modality_shapes))
  implementation = model_config.get("implementation", "plain") or "plain"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.implementation={implementation!r} is unknown; expected one "
                     f"of {list(IMPLEMENTATIONS)}.")
  stack = model_config.get("stack_experts", False)
  if not isinstance(stack, bool):
    raise ValueError(f"config.model.stack_experts={stack!r}: expected True or False.")
  if implementation == "fast":
    if stack:
      raise ValueError("config.model.stack_experts stacks the experts of "
                       "implementation='plain'; the fast one fuses its LeNets its own way.")
    if len(output_shape) != 1:
      raise ValueError(f"config.model.implementation='fast' serves single-label tasks; this "
                       f"task's outputs have shape {output_shape}. Use implementation='plain'.")
    if batch_axis_name:
      raise ValueError("config.model.implementation='fast' runs under config.parallel='jit' "
                       "only; use 'jit' (the same computation) or implementation='plain'.")
    if model_config.get("remat", False):
      raise ValueError("config.model.remat rematerialises the plain implementation's modules; "
                       "set config.model.implementation='plain' or config.model.remat=False.")
    fast = importlib.import_module("i2m2_jax.fast")  # opt-in: never imported otherwise
    return fast.build_fast_model(model_config, modality_shapes, output_shape[0], layout=layout)
  num_outputs = 1
  for d in output_shape:
    num_outputs *= d
  experts = tuple((name, build_expert(name, keys, modality_shapes, num_outputs, model_config,
                                       batch_axis_name)) for name, keys in layout.items())
  return modules.MultiModalClassifier(
      experts, output_shape=output_shape,
      stacks=stack_groups(experts, modality_shapes) if stack else ())


# ---------------------------------------------------------------------------------------------
# Mixed precision

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
  float32. The caller casts the inputs (`state.make_preprocess`); the product of experts is
  computed in float32 whatever the experts' dtype (combine.product_of_experts)."""
  if jnp.dtype(dtype) == jnp.float32:
    return apply_fn

  def apply(variables, *args, **kwargs):
    return apply_fn({**variables, "params": cast_floating(variables["params"], dtype)},
                    *args, **kwargs)
  return apply
