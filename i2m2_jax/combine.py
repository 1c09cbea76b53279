"""The I2M2 combination rule: a normalised product of experts (PoE).

Each expert gives logits over the same C classes. The combined log-probability is

    s_c     = sum_e log_softmax(o_e)_c
    log q_c = s_c - logsumexp_k s_k

No learned weights, no temperature, no averaging: the rule of the official code in all four
pipelines (Madaan et al., NeurIPS 2024; `divyam3897/I2M2`:
avmnist_and_mimic/training_structures/inter_and_intra_modality.py, fastMRI/module.py,
vqa_nlvr/fiber/modules/classify.py). It equals log_softmax of the summed logits. An expert can
be left out of the product, for every example or per example, which is how a missing modality is
handled at inference.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp

Logits = Union[Sequence[jax.Array], Mapping[str, jax.Array]]


def product_of_experts(expert_logits: Logits, present: jax.Array | None = None) -> jax.Array:
  """Returns the log-probabilities [..., C] of the normalised product of the given experts.

  Args:
    expert_logits: the experts' logits, each [B, ..., C] (e.g. [B, L, C] for L labels, each with
      its own product), as a sequence or a name -> logits mapping (a mapping is combined in its
      iteration order; the result does not depend on it).
    present: optional boolean [E] (all examples) or [B, E] (per example) saying which experts
      take part. An absent expert contributes nothing, even if its logits are NaN. Every
      example needs at least one present expert; with none the result is uniform.
  """
  logits = list(expert_logits.values()) if isinstance(expert_logits, Mapping) else list(expert_logits)
  if not logits:
    raise ValueError("product_of_experts needs at least one expert's logits.")
  stacked = jnp.stack([jax.nn.log_softmax(o.astype(jnp.float32), axis=-1) for o in logits], axis=-2)
  if present is not None:
    present = jnp.asarray(present, dtype=bool)
    if present.shape[-1] != len(logits):
      raise ValueError(f"present has {present.shape[-1]} entries on its last axis but there are "
                       f"{len(logits)} experts.")
    if present.ndim == 2:  # [B, E] -> [B, 1, ..., 1, E] against stacked [B, ..., E, C]
      present = present.reshape(present.shape[:1] + (1,) * (stacked.ndim - 3) + present.shape[1:])
    stacked = jnp.where(present[..., None], stacked, 0.0)
  return jax.nn.log_softmax(stacked.sum(axis=-2), axis=-1)
