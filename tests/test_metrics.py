"""Tests for i2m2_jax.metrics against an independent per-example float64 NumPy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from i2m2_jax import metrics
from i2m2_jax.metrics import ECE_BINS, add_sums, binary_auc_metrics, classification_sums, summarize

EXPERTS = ("uni_image", "uni_audio", "joint")


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _data(seed, n=203, c=7):
  rng = np.random.default_rng(seed)
  expert_logits = {name: rng.normal(size=(n, c)) * rng.uniform(0.5, 4.0) for name in EXPERTS}
  expert_logits = {k: np.where(v == 0, 0.1, v) for k, v in expert_logits.items()}  # non-zero
  # The combined model: a product of experts, as the trainer's model gives.
  log_probs = _log_softmax64(sum(_log_softmax64(v) for v in expert_logits.values()))
  labels = rng.integers(0, c, size=n)
  # Make the predictions right more often than chance, so accuracy is not tiny.
  labels = np.where(rng.uniform(size=n) < 0.5, log_probs.argmax(-1), labels)
  mask = rng.uniform(size=n) < 0.8
  return log_probs, labels, mask, expert_logits


def _reference(log_probs, labels, mask, expert_logits):
  """Per-example loop in float64; ECE bins by the ceil rule, clipped to [0, 14]."""
  n, nll, correct = 0, 0.0, 0
  expert_correct = dict.fromkeys(expert_logits, 0)
  bin_n, bin_conf, bin_correct = np.zeros(ECE_BINS), np.zeros(ECE_BINS), np.zeros(ECE_BINS)
  for i in range(len(labels)):
    if not mask[i]:
      continue
    n += 1
    nll -= log_probs[i, labels[i]]
    ok = int(np.argmax(log_probs[i]) == labels[i])
    correct += ok
    for name, logits in expert_logits.items():
      expert_correct[name] += int(np.argmax(logits[i]) == labels[i])
    conf = float(np.exp(np.max(log_probs[i])))
    b = min(max(math.ceil(conf * ECE_BINS) - 1, 0), ECE_BINS - 1)
    bin_n[b] += 1
    bin_conf[b] += conf
    bin_correct[b] += ok
  ece = sum(abs(bin_correct[b] / bin_n[b] - bin_conf[b] / bin_n[b]) * bin_n[b] / n
            for b in range(ECE_BINS) if bin_n[b])
  return {"count": n, "accuracy": correct / n, "nll": nll / n, "ece": ece,
          "experts": {k: v / n for k, v in expert_correct.items()},
          "bin_n": bin_n, "bin_conf": bin_conf, "bin_correct": bin_correct}


_jitted_sums = jax.jit(classification_sums)


def _sums(log_probs, labels, mask, expert_logits):
  return _jitted_sums(jnp.asarray(log_probs, jnp.float32), jnp.asarray(labels),
                      jnp.asarray(mask), {k: jnp.asarray(v, jnp.float32)
                                          for k, v in expert_logits.items()})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed):
  data = _data(seed)
  ref = _reference(*data)
  sums = _sums(*data)
  assert sums["ece_count"].shape == sums["ece_conf_sum"].shape == (ECE_BINS,)
  np.testing.assert_array_equal(sums["ece_count"], ref["bin_n"])
  np.testing.assert_array_equal(sums["ece_correct_sum"], ref["bin_correct"])
  np.testing.assert_allclose(sums["ece_conf_sum"], ref["bin_conf"], rtol=1e-5, atol=1e-5)

  got = summarize(add_sums(None, sums))
  assert got["count"] == ref["count"]
  assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
  assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)
  assert got["ece"] == pytest.approx(ref["ece"], abs=1e-6)
  assert set(got["experts"]) == set(EXPERTS)
  for name in EXPERTS:
    assert got["experts"][name] == pytest.approx(ref["experts"][name], abs=1e-12)
  assert all(isinstance(v, float) for v in [got["accuracy"], got["nll"], got["ece"],
                                            *got["experts"].values()])


def test_sums_of_halves_equal_the_whole():
  log_probs, labels, mask, expert_logits = _data(3)
  whole = add_sums(None, _sums(log_probs, labels, mask, expert_logits))
  total = None
  for part in (slice(0, 100), slice(100, None)):
    total = add_sums(total, _sums(log_probs[part], labels[part], mask[part],
                                  {k: v[part] for k, v in expert_logits.items()}))
  assert set(total) == set(whole)
  for key in whole:
    np.testing.assert_allclose(total[key], whole[key], rtol=1e-6, err_msg=key)
    assert total[key].dtype in (np.float64, np.int64)
  a, b = summarize(total), summarize(whole)
  assert (a["count"], a["accuracy"], a["experts"]) == (b["count"], b["accuracy"], b["experts"])
  assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
  assert a["ece"] == pytest.approx(b["ece"], abs=1e-7)


def test_padding_adds_nothing_even_when_garbage():
  log_probs, labels, mask, expert_logits = _data(4, n=40)
  base = summarize(add_sums(None, _sums(log_probs, labels, mask, expert_logits)))
  bad = ~mask
  garbage_lp = np.where(bad[:, None], np.nan, log_probs)
  garbage_labels = np.where(bad, -1, labels)
  garbage_experts = {k: np.where(bad[:, None], np.inf, v) for k, v in expert_logits.items()}
  padded = summarize(add_sums(None, _sums(garbage_lp, garbage_labels, mask, garbage_experts)))
  assert padded == base
  assert math.isfinite(padded["nll"])


def test_no_mask_counts_everything():
  log_probs, labels, _, expert_logits = _data(5, n=30)
  got = summarize(classification_sums(jnp.asarray(log_probs, jnp.float32), jnp.asarray(labels)))
  assert got["count"] == 30
  assert got["experts"] == {}
  assert got["accuracy"] == pytest.approx(np.mean(log_probs.argmax(-1) == labels))


def test_ece_bin_edges():
  edges = np.linspace(0.0, 1.0, ECE_BINS + 1).astype(np.float32)
  conf = [0.0, np.nextafter(np.float32(0), np.float32(1)), 1.0]
  expected = [0, 0, ECE_BINS - 1]
  for k in range(1, ECE_BINS):
    conf += [edges[k], np.nextafter(edges[k], np.float32(1))]
    expected += [k - 1, k]  # bin k-1 is (k-1)/15 .. k/15, closed on the right
  got = metrics.ece_bin(jnp.asarray(np.array(conf, np.float32)))
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert got.dtype == jnp.int32


def test_ece_hand_computed():
  # Confidences 0.9 (right), 0.88 (wrong) share bin 13; 0.62 (right) is in bin 9, 0.58 (wrong)
  # in bin 8. ECE = (|0.5 - 0.89| * 2 + |1 - 0.62| + |0 - 0.58|) / 4 = 0.435.
  probs = np.array([[0.9, 0.1], [0.88, 0.12], [0.38, 0.62], [0.58, 0.42]])
  labels = np.array([0, 1, 1, 1])
  sums = classification_sums(jnp.log(jnp.asarray(probs, jnp.float32)), labels, np.ones(4, bool))
  np.testing.assert_array_equal(np.nonzero(np.asarray(sums["ece_count"]))[0], [8, 9, 13])
  got = summarize(sums)
  assert got["ece"] == pytest.approx(0.435, abs=1e-6)
  assert got["accuracy"] == 0.5
  assert got["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.12, 0.62, 0.42])), rel=1e-6)


def test_full_confidence_goes_to_last_bin():
  log_probs = jnp.array([[0.0, -jnp.inf], [-jnp.inf, 0.0]])
  sums = classification_sums(log_probs, jnp.array([0, 0]), jnp.array([True, True]))
  np.testing.assert_array_equal(sums["ece_count"], [0] * 14 + [2])
  got = summarize(sums)
  assert got["accuracy"] == 0.5
  assert got["ece"] == pytest.approx(0.5)
  assert got["nll"] == math.inf


def test_empty_and_mismatched():
  log_probs, labels, mask, expert_logits = _data(6, n=8)
  empty = summarize(_sums(log_probs, labels, np.zeros(8, bool), expert_logits))
  assert empty["count"] == 0
  assert all(math.isnan(empty[k]) for k in ("accuracy", "nll", "ece"))
  assert all(math.isnan(v) for v in empty["experts"].values())
  with pytest.raises(ValueError, match="different keys"):
    add_sums(add_sums(None, _sums(log_probs, labels, mask, expert_logits)),
             _sums(log_probs, labels, mask, {}))


def test_binary_auc_metrics():
  scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
  got = binary_auc_metrics(scores, labels)
  assert got["auroc"] == pytest.approx(0.75)
  assert got["auprc"] == pytest.approx(0.8333333333)
  two_columns = np.stack([1 - scores, scores], axis=1)
  assert binary_auc_metrics(jnp.asarray(two_columns), jnp.asarray(labels)) == pytest.approx(got)


def test_binary_auc_metrics_single_class_is_nan():
  got = binary_auc_metrics(np.array([0.2, 0.9]), np.array([1, 1]))
  assert math.isnan(got["auroc"]) and math.isnan(got["auprc"])
  with pytest.raises(ValueError, match="labels in"):
    binary_auc_metrics(np.array([0.2, 0.9]), np.array([0, 2]))
