"""Exact classification metrics from per-batch sums.

The jitted eval step calls `classification_sums` (jax-traceable) and returns masked SUMS, never
means: padded examples (mask False) add nothing, so accumulating the sums of every batch with
`add_sums` (on host, float64/int64) and then calling `summarize` gives the exact metrics of the
whole evaluation set, however it was batched or padded.

Calibration uses the standard 15-bin expected calibration error over the max-probability
confidence: bin i covers (i/15, (i+1)/15], a confidence of exactly 0 falls in bin 0, and
ECE = sum_b |acc_b - conf_b| * n_b / N.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ECE_BINS = 15
EXPERT_PREFIX = "expert_correct/"
# Interior bin edges 1/15 .. 14/15, in float32 like the confidences they are compared with.
_ECE_EDGES = np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1].astype(np.float32)


def ece_bin(confidence: jax.Array) -> jax.Array:
  """The calibration bin (int32 in [0, ECE_BINS)) of each confidence in [0, 1].

  Bin i holds (i/15, (i+1)/15]: the number of interior edges strictly below the confidence.
  Comparing with the edges (rather than ceil(conf * 15)) keeps the edges exact.
  """
  confidence = jnp.asarray(confidence, jnp.float32)
  return jnp.sum(confidence[..., None] > _ECE_EDGES, axis=-1).astype(jnp.int32)


def classification_sums(log_probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                        expert_logits: Mapping[str, jax.Array] | None = None
                        ) -> dict[str, jax.Array]:
  """Masked sums over a batch, for exact metrics over padded batches.

  Args:
    log_probs: [B, C] log-probabilities of the combined model (e.g. the product of experts).
    labels: [B] integer labels.
    mask: [B] booleans, False for padding (None: every example counts). Padded rows may hold
      anything, NaN included.
    expert_logits: optional {name: [B, C] logits} of each expert, for per-expert accuracy.

  Returns:
    A flat dict: `count`, `correct`, `expert_correct/<name>` (int32 scalars), `nll_sum` (float32)
    and the calibration histogram per bin: `ece_count` and `ece_correct_sum` (int32 [15]) and
    `ece_conf_sum` (float32 [15]).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  log_probs = jnp.asarray(log_probs, jnp.float32)

  label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(log_probs, axis=-1) == labels) & mask
  confidence = jnp.exp(jnp.max(log_probs, axis=-1))
  # where (not multiplication) so that NaN/inf in padded rows cannot leak into the sums.
  in_bin = (jax.nn.one_hot(ece_bin(confidence), ECE_BINS, dtype=bool) & mask[:, None])
  sums = {
      "count": jnp.sum(mask, dtype=jnp.int32),
      "correct": jnp.sum(correct, dtype=jnp.int32),
      "nll_sum": -jnp.sum(jnp.where(mask, label_log_prob, 0.0)),
      "ece_count": jnp.sum(in_bin, axis=0, dtype=jnp.int32),
      "ece_conf_sum": jnp.sum(jnp.where(in_bin, confidence[:, None], 0.0), axis=0),
      "ece_correct_sum": jnp.sum(in_bin & correct[:, None], axis=0, dtype=jnp.int32),
  }
  for name, logits in (expert_logits or {}).items():
    expert_correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    sums[EXPERT_PREFIX + name] = jnp.sum(expert_correct, dtype=jnp.int32)
  return sums


def _to_host(value: Any) -> np.ndarray:
  """float64 / int64 numpy, so that sums over many batches stay exact."""
  value = np.asarray(jax.device_get(value))
  if np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
    return value.astype(np.int64)
  return value.astype(np.float64)


def add_sums(total: Mapping[str, Any] | None, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Adds one batch's sums to the running total (None for the first batch), on host."""
  batch = {k: _to_host(v) for k, v in batch.items()}
  if total is None:
    return batch
  if set(total) != set(batch):
    raise ValueError(f"Cannot add sums with different keys: {sorted(total)} vs {sorted(batch)}.")
  return {k: _to_host(total[k]) + batch[k] for k in batch}


def _ratio(numerator: float, count: float) -> float:
  return float(numerator) / float(count) if count > 0 else math.nan


def summarize(sums: Mapping[str, Any]) -> dict[str, Any]:
  """Metrics from accumulated sums: `accuracy`, `nll`, `ece`, `count` and `experts`.

  `experts` maps each expert's name to its accuracy (a float). With no examples (count 0) every
  metric is NaN.
  """
  sums = {k: _to_host(v) for k, v in sums.items()}
  count = int(sums["count"])
  gaps = np.abs(sums["ece_correct_sum"] - sums["ece_conf_sum"])  # = |acc_b - conf_b| * n_b
  return {
      "count": count,
      "accuracy": _ratio(sums["correct"], count),
      "nll": _ratio(sums["nll_sum"], count),
      "ece": _ratio(gaps.sum(), count),
      "experts": {k[len(EXPERT_PREFIX):]: _ratio(v, count)
                  for k, v in sums.items() if k.startswith(EXPERT_PREFIX)},
  }


def binary_auc_metrics(scores: Any, labels: Any) -> dict[str, float]:
  """AUROC and AUPRC (average precision) of positive-class scores, via scikit-learn.

  Args:
    scores: [N] scores of the positive class, or [N, 2] (column 1 is used), e.g. probabilities.
    labels: [N] labels in {0, 1}.

  Returns:
    {'auroc': ..., 'auprc': ...}; both NaN when the labels hold a single class (undefined).
  """
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top

  scores = np.asarray(jax.device_get(scores), np.float64)
  labels = np.asarray(jax.device_get(labels)).astype(np.int64).reshape(-1)
  if scores.ndim == 2 and scores.shape[1] == 2:
    scores = scores[:, 1]
  scores = scores.reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} do not match.")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"binary_auc_metrics needs labels in {{0, 1}}, got {np.unique(labels)}.")
  if np.unique(labels).size < 2:  # AUROC/AUPRC are undefined with a single class
    return {"auroc": math.nan, "auprc": math.nan}
  return {"auroc": float(sk_metrics.roc_auc_score(labels, scores)),
          "auprc": float(sk_metrics.average_precision_score(labels, scores))}
