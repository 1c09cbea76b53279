"""Which expert decides: for a product of experts (i2m2, intra), how much each expert drives the
product's predictions on a split.

Per decision (an example; for multilabel tasks an example and label), with ŷ the product's
predicted class and q_e expert e's softmax:

* `experts.<e>.changes_prediction`: how often the product of the *other* experts (e left out, as
  a missing modality leaves it out: `combine.product_of_experts(present=...)`) predicts another
  class than ŷ;
* `experts.<e>.log_prob`: the mean of log q_e(ŷ), the log-probability e gives the prediction
  (0: e is sure of it; log(1/C): e is indifferent; very negative: e is against it);
* `experts.<e>.evidence`: the mean of log q_e(ŷ) - mean_c log q_e(c), the log-evidence e adds
  to ŷ over an average class. The product's logit of ŷ minus its mean over classes is the sum
  of the experts' evidences, so this says which expert the decision rests on (0 for an
  indifferent expert);
* with a joint expert and uni-modal ones (i2m2): `joint_overrules`, the decisions where the
  joint expert overrules the product of the uni-modal experts (leaving it out changes the
  prediction: its `fraction` equals experts.joint.changes_prediction), with the product's
  `accuracy` there and the `uni_product_accuracy` the uni-modal product alone would have had
  there; `joint_agrees`, the other decisions, with the product's `accuracy`.

Accuracy is the prediction's correctness: equal to the label, or for soft labels (VQA) the
target score of the predicted class. The sums are masked and exact over padded batches
(`i2m2_jax.metrics`); `evaluation.evaluate_attribution` runs them over a whole split. It tells a
user whether their task is carried by intra- or inter-modality evidence.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from i2m2_jax import metrics
from i2m2_jax.combine import product_of_experts
from i2m2_jax.models import JOINT


def _correctness(predicted: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
  """float32 [B, ...]: 1 where the prediction equals the label; the target score of the
  predicted class for soft labels."""
  if "label" in batch:
    return (predicted == batch["label"]).astype(jnp.float32)
  return jnp.take_along_axis(batch["scores"], predicted[..., None], axis=-1)[..., 0].astype(
      jnp.float32)


def attribution_sums(outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Masked sums of one batch (traced) from the model's outputs ({'log_probs', 'expert_logits'},
  at least two experts) and the batch's targets and mask."""
  logits = outputs["expert_logits"]
  names = list(logits)
  predicted = jnp.argmax(outputs["log_probs"], axis=-1)  # [B, ...]
  mask = batch["mask"].astype(bool)
  mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (predicted.ndim - 1)), predicted.shape)
  correct = _correctness(predicted, batch)

  def masked_sum(x, where=mask):
    return jnp.sum(jnp.where(where, x, 0.0))

  def predicted_without(left_out):
    present = np.array([n not in left_out for n in names])
    return jnp.argmax(product_of_experts(logits, present), axis=-1)

  sums = {"count": jnp.sum(mask, dtype=jnp.int32)}
  for name in names:
    log_q = jax.nn.log_softmax(logits[name].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_q, predicted[..., None], axis=-1)[..., 0]
    sums[f"changed/{name}"] = jnp.sum(mask & (predicted_without({name}) != predicted),
                                      dtype=jnp.int32)
    sums[f"log_prob/{name}"] = masked_sum(chosen)
    sums[f"evidence/{name}"] = masked_sum(chosen - jnp.mean(log_q, axis=-1))
  if JOINT in names and len(names) > 1:
    uni = predicted_without({JOINT})
    overruled = mask & (uni != predicted)
    sums["overruled"] = jnp.sum(overruled, dtype=jnp.int32)
    sums["overruled_correct"] = masked_sum(correct, overruled)
    sums["overruled_uni_correct"] = masked_sum(_correctness(uni, batch), overruled)
    sums["agreed_correct"] = masked_sum(correct, mask & ~overruled)
  return sums


def summarize(sums: Mapping[str, Any]) -> dict[str, Any]:
  """results.json's `attribution` from the sums added over a split (module docstring)."""
  sums = {k: metrics.to_host(v) for k, v in sums.items()}
  count = int(sums["count"])
  names = [k.split("/", 1)[1] for k in sums if k.startswith("changed/")]
  result: dict[str, Any] = {"count": count, "experts": {
      n: {"changes_prediction": metrics.ratio(sums[f"changed/{n}"], count),
          "log_prob": metrics.ratio(sums[f"log_prob/{n}"], count),
          "evidence": metrics.ratio(sums[f"evidence/{n}"], count)} for n in names}}
  if "overruled" in sums:
    overruled = int(sums["overruled"])
    result["joint_overrules"] = {
        "fraction": metrics.ratio(overruled, count),
        "accuracy": metrics.ratio(sums["overruled_correct"], overruled),
        "uni_product_accuracy": metrics.ratio(sums["overruled_uni_correct"], overruled)}
    result["joint_agrees"] = {"fraction": metrics.ratio(count - overruled, count),
                              "accuracy": metrics.ratio(sums["agreed_correct"], count - overruled)}
  return result
