"""Which expert decides (i2m2_jax/attribution.py, evaluation.evaluate_attribution): the numbers of
a product of fake experts with known logits against a float64 NumPy computation."""
import numpy as np
import pytest

from i2m2_jax import evaluation, input_pipeline, sharding, tasks
from i2m2_jax.datasets import Dataset
from i2m2_jax.experiment import make_preprocess
from test_faults import fake_state, log_softmax

N, C = 37, 4  # 37: the last batch of 8 is padded


def fake_data(seed=0, **targets):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(N, C)).astype(np.float32) * 2
  b = rng.normal(size=(N, C)).astype(np.float32) * 2
  targets = targets or {"label": rng.integers(0, C, N)}
  source = input_pipeline.InMemorySource({"a": a, "b": b, **targets})
  return a.astype(np.float64), b.astype(np.float64), Dataset(
      name="fake", modalities={"a": (C,), "b": (C,)}, num_classes=C,
      sources={"train": source, "val": source, "test": source},
      targets={k: tuple(v.shape[1:]) for k, v in targets.items()})


def attribution_of(experts, data, task):
  mesh = sharding.make_mesh()
  state, _ = fake_state(experts, mesh)
  return evaluation.evaluate_attribution(state, data.sources["test"], data, task, 8, mesh,
                                         preprocess=make_preprocess(["a", "b"], None))


def hand_attribution(logits, correctness):
  """float64: the numbers attribution.summarize reports, from the experts' logits."""
  log_q = {e: log_softmax(x) for e, x in logits.items()}
  predicted = sum(log_q.values()).argmax(-1)
  rows = np.arange(N)
  out = {"count": N, "experts": {}}
  for e, lq in log_q.items():
    without = sum(v for k, v in log_q.items() if k != e).argmax(-1)
    out["experts"][e] = {"changes_prediction": np.mean(without != predicted),
                         "log_prob": np.mean(lq[rows, predicted]),
                         "evidence": np.mean(lq[rows, predicted] - lq.mean(-1))}
  if "joint" in logits:
    uni = sum(v for k, v in log_q.items() if k != "joint").argmax(-1)
    over = uni != predicted
    out["joint_overrules"] = {"fraction": over.mean(),
                              "accuracy": correctness(predicted)[over].mean(),
                              "uni_product_accuracy": correctness(uni)[over].mean()}
    out["joint_agrees"] = {"fraction": 1 - over.mean(),
                           "accuracy": correctness(predicted)[~over].mean()}
  return out


def assert_close(got, want):
  if isinstance(want, dict):
    assert set(got) == set(want)
    for k in want:
      assert_close(got[k], want[k])
  else:
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_attribution_of_i2m2_and_intra_matches_numpy():
  a, b, data = fake_data()
  label = data.sources["test"].columns["label"]
  correctness = lambda predicted: (predicted == label).astype(np.float64)  # noqa: E731
  i2m2 = attribution_of(["uni_a", "uni_b", "joint"], data, tasks.MulticlassTask(C))
  want = hand_attribution({"uni_a": a, "uni_b": b, "joint": a - 0.5 * b}, correctness)
  assert_close(i2m2, want)
  assert 0 < i2m2["joint_overrules"]["fraction"] < 1  # the data exercises both branches
  assert i2m2["joint_overrules"]["fraction"] == i2m2["experts"]["joint"]["changes_prediction"]

  intra = attribution_of(["uni_a", "uni_b"], data, tasks.MulticlassTask(C))
  assert_close(intra, hand_attribution({"uni_a": a, "uni_b": b}, correctness))
  assert "joint_overrules" not in intra


def test_soft_labels_count_the_score_of_the_prediction():
  scores = np.random.default_rng(1).uniform(size=(N, C)).astype(np.float32)
  a, b, data = fake_data(scores=scores)
  correctness = lambda predicted: scores[np.arange(N), predicted].astype(np.float64)  # noqa: E731
  got = attribution_of(["uni_a", "uni_b", "joint"], data, tasks.SoftLabelTask(C))
  assert_close(got, hand_attribution({"uni_a": a, "uni_b": b, "joint": a - 0.5 * b}, correctness))
