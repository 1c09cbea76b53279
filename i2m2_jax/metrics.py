"""Exact metrics from per-batch sums, and the rank metrics computed on the host.

Jitted eval steps return masked SUMS, never means: padded examples (mask False) add nothing, so
accumulating the sums of every batch with `add_sums` (on host, float64/int64) and dividing at the
end gives the exact metrics of the whole evaluation set, however it was batched or padded. The
tasks (`i2m2_jax.tasks`) build their sums from the pieces here.

Calibration uses the standard 15-bin expected calibration error over the max-probability
confidence: bin i covers (i/15, (i+1)/15], a confidence of exactly 0 falls in bin 0, and
ECE = sum_b |acc_b - conf_b| * n_b / N. `calibration_sums` takes the correctness of each
prediction as a number in [0, 1], so soft targets (a VQA answer's score) calibrate the same way.
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


def calibration_sums(confidence: jax.Array, correctness: jax.Array,
                     mask: jax.Array) -> dict[str, jax.Array]:
  """The calibration histogram of predictions of any shape [...] (flattened): per bin the count
  (`ece_count`, int32 [15]), the summed confidence and the summed correctness (float32 [15]).
  `mask` broadcasts to the predictions' shape ([B, 1] for [B, L]); masked predictions add
  nothing, even NaN ones."""
  shape = jnp.shape(confidence)
  confidence = jnp.ravel(confidence).astype(jnp.float32)
  correctness = jnp.ravel(correctness).astype(jnp.float32)
  mask = jnp.ravel(jnp.broadcast_to(mask, shape))
  # where (not multiplication) so that NaN/inf in padded rows cannot leak into the sums.
  in_bin = jax.nn.one_hot(ece_bin(confidence), ECE_BINS, dtype=bool) & mask[:, None]
  return {
      "ece_count": jnp.sum(in_bin, axis=0, dtype=jnp.int32),
      "ece_conf_sum": jnp.sum(jnp.where(in_bin, confidence[:, None], 0.0), axis=0),
      "ece_correct_sum": jnp.sum(jnp.where(in_bin, correctness[:, None], 0.0), axis=0),
  }


def ece(sums: Mapping[str, Any]) -> float:
  """ECE from accumulated `calibration_sums`; NaN with no prediction."""
  gaps = np.abs(np.asarray(sums["ece_correct_sum"], np.float64)
                - np.asarray(sums["ece_conf_sum"], np.float64))  # = |acc_b - conf_b| * n_b
  return ratio(gaps.sum(), np.sum(sums["ece_count"]))


def classification_sums(log_probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                        expert_logits: Mapping[str, jax.Array] | None = None
                        ) -> dict[str, jax.Array]:
  """Masked sums of single-label predictions, for exact metrics over padded batches.

  Args:
    log_probs: [..., C] log-probabilities of the combined model (e.g. the product of experts).
    labels: [...] integer labels.
    mask: [B] booleans, False for padding (None: every example counts). Padded rows may hold
      anything, NaN included.
    expert_logits: optional {name: [..., C] logits} of each expert, for per-expert accuracy.

  Returns:
    A flat dict: `count` (examples), `correct` and `expert_correct/<name>` (int32, per position
    of labels' trailing axes), `nll_sum` (float32, same shape) and the calibration histogram over
    every prediction (`calibration_sums`).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  mask = (jnp.ones(labels.shape[:1], bool) if mask is None else jnp.asarray(mask).astype(bool))
  row_mask = mask.reshape(mask.shape + (1,) * (labels.ndim - 1))
  log_probs = jnp.asarray(log_probs, jnp.float32)

  label_log_prob = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(log_probs, axis=-1) == labels) & row_mask
  sums = {
      "count": jnp.sum(mask, dtype=jnp.int32),
      "correct": jnp.sum(correct, axis=0, dtype=jnp.int32),
      "nll_sum": -jnp.sum(jnp.where(row_mask, label_log_prob, 0.0), axis=0),
      **calibration_sums(jnp.exp(jnp.max(log_probs, axis=-1)), correct, row_mask),
  }
  for name, logits in (expert_logits or {}).items():
    expert_correct = (jnp.argmax(logits, axis=-1) == labels) & row_mask
    sums[EXPERT_PREFIX + name] = jnp.sum(expert_correct, axis=0, dtype=jnp.int32)
  return sums


def to_host(value: Any) -> np.ndarray:
  """float64 / int64 numpy, so that sums over many batches stay exact."""
  value = np.asarray(jax.device_get(value))
  if np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
    return value.astype(np.int64)
  return value.astype(np.float64)


def add_sums(total: Mapping[str, Any] | None, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Adds one batch's sums to the running total (None for the first batch), on host."""
  batch = {k: to_host(v) for k, v in batch.items()}
  if total is None:
    return batch
  if set(total) != set(batch):
    raise ValueError(f"Cannot add sums with different keys: {sorted(total)} vs {sorted(batch)}.")
  return {k: to_host(total[k]) + batch[k] for k in batch}


def ratio(numerator: Any, count: Any) -> Any:
  """numerator / count as floats (elementwise for arrays); NaN where count is 0."""
  numerator, count = np.asarray(numerator, np.float64), np.asarray(count, np.float64)
  out = np.divide(numerator, count, out=np.full(np.broadcast(numerator, count).shape, math.nan),
                  where=count > 0)
  return float(out) if out.ndim == 0 else out


def summarize(sums: Mapping[str, Any]) -> dict[str, Any]:
  """Single-label metrics from accumulated `classification_sums` (no trailing label axes):
  `accuracy`, `nll`, `ece`, `count` and `experts` (each expert's accuracy, a float). With no
  examples (count 0) every metric is NaN."""
  sums = {k: to_host(v) for k, v in sums.items()}
  count = int(sums["count"])
  return {
      "count": count,
      "accuracy": ratio(sums["correct"], count),
      "nll": ratio(sums["nll_sum"], count),
      "ece": ece(sums),
      "experts": {k[len(EXPERT_PREFIX):]: ratio(v, count)
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


# ---------------------------------------------------------------------------------------------
# Operating points (the official fastMRI evaluation)

MAX_FALSE_NEGATIVE_RATE = 0.1


def operating_point(scores: Any, labels: Any,
                    max_false_negative_rate: float = MAX_FALSE_NEGATIVE_RATE) -> float:
  """The decision threshold of the official fastMRI evaluation (divyam3897/I2M2:
  fastMRI/metrics/classification_metrics.py, get_operating_point): the first (highest) threshold
  of scikit-learn's `roc_curve(labels, scores)` (default arguments, so collinear points are
  dropped as there) whose false-negative rate 1 - TPR is below `max_false_negative_rate`. NaN
  when the labels hold a single class.

  The reference falls back to the first threshold with a false-positive rate above 0.25 when no
  threshold qualifies; with both classes present that never happens (the curve ends at TPR 1),
  so the fallback is not reproduced.
  """
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top

  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(np.int64)
  if np.unique(labels).size < 2:
    return math.nan
  _, tpr, thresholds = sk_metrics.roc_curve(labels, scores)
  return float(thresholds[np.flatnonzero(1.0 - tpr < max_false_negative_rate)[0]])


def metrics_at_threshold(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
  """Sensitivity, specificity and balanced accuracy of the decisions `scores > threshold`
  (strictly above, as the reference decides); NaN when the labels hold a single class or the
  threshold is NaN."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  if math.isnan(threshold) or labels.all() or not labels.any():
    return {"balanced_accuracy": math.nan, "sensitivity": math.nan, "specificity": math.nan}
  predicted = scores > threshold
  sensitivity = float(np.mean(predicted[labels]))
  specificity = float(np.mean(~predicted[~labels]))
  return {"balanced_accuracy": (sensitivity + specificity) / 2, "sensitivity": sensitivity,
          "specificity": specificity}


def bootstrap_auroc_std(scores: np.ndarray, labels: np.ndarray, samples: int,
                        seed: int = 0) -> tuple[np.ndarray, float]:
  """Bootstrap standard deviations (ddof 0, as the reference's np.std) of the AUROC of each
  column of scores/labels [N, L] and of their mean over columns, from `samples` resamples of the
  N rows with replacement (the same resamples for every column). A resample in which a column
  holds a single class gives that column no AUROC (and the mean none); those are left out."""
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  aurocs = np.full((samples, labels.shape[1]), math.nan)
  for s in range(samples):
    rows = rng.integers(0, len(labels), len(labels))
    for l in range(labels.shape[1]):
      if np.unique(labels[rows, l]).size == 2:
        aurocs[s, l] = sk_metrics.roc_auc_score(labels[rows, l], scores[rows, l])

  def std(values):
    values = values[np.isfinite(values)]
    return float(np.std(values)) if values.size > 1 else math.nan

  return (np.array([std(aurocs[:, l]) for l in range(labels.shape[1])]),
          std(aurocs.mean(axis=1)))
