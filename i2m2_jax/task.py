"""The classification task: the loss and the metrics of a multi-modal classifier.

Owns what the trainer should not know about: the model's outputs are the product-of-experts
log-probabilities and each expert's logits; the loss is one cross-entropy on the product (no
per-expert losses, as in the paper); the metrics are masked sums so that evaluation over padded
batches and over several devices or hosts is exact.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from i2m2_jax import metrics


def negative_log_likelihood(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example -log q(label) [B]."""
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def cross_entropy(log_probs: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of the labels over the examples where mask is True."""
  nll = negative_log_likelihood(log_probs, labels)
  mask = mask.astype(log_probs.dtype)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_sums(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """What a train step reports: sums of loss and correct predictions, the example count, and
  per expert whether its logits held a non-finite value (to name the culprit of a NaN loss)."""
  mask = batch["mask"].astype(jnp.float32)
  log_probs = outputs["log_probs"]
  nll = negative_log_likelihood(log_probs, batch["label"])
  sums = {
      "loss_sum": jnp.sum(nll * mask),
      "correct": jnp.sum((jnp.argmax(log_probs, -1) == batch["label"]) * mask),
      "count": jnp.sum(mask),
  }
  for name, logits in outputs["expert_logits"].items():
    sums[f"nonfinite/{name}"] = jnp.logical_not(jnp.all(jnp.isfinite(logits))).astype(jnp.float32)
  return sums


def eval_sums(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  return metrics.classification_sums(outputs["log_probs"], batch["label"], batch["mask"],
                                     outputs["expert_logits"])


def summarize_train(sums: Mapping[str, Any]) -> dict[str, float]:
  count = max(float(sums["count"]), 1.0)
  return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count}
