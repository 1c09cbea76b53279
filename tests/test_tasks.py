"""Tasks: losses and metrics against float64 NumPy and scikit-learn references, checkpoint
selection directions, and multilabel / soft-label training through the command line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn.utils.class_weight import compute_class_weight

from i2m2_jax import metrics, tasks
from i2m2_jax.combine import product_of_experts
from i2m2_jax.datasets import Dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def outputs_of(expert_logits):
  """The model's outputs for these experts' logits: their product and the logits."""
  logits = {k: jnp.asarray(v, jnp.float32) for k, v in expert_logits.items()}
  return {"log_probs": product_of_experts(logits), "expert_logits": logits}


def summarize(task, outputs, batch):
  """Eval sums and ranking outputs of one batch, summarised as the evaluator does."""
  sums = metrics.add_sums(None, jax.jit(task.eval_sums)(outputs, batch))
  ranked = jax.device_get(task.ranking_outputs(outputs, batch))
  mask = np.asarray(batch["mask"])
  return task.summarize(sums, {k: np.asarray(v)[mask] for k, v in ranked.items()} or None)


# ---------------------------------------------------------------------------------------------
# Multilabel


def multilabel_data(seed, n=61, num_labels=3):
  rng = np.random.default_rng(seed)
  experts = {e: rng.normal(size=(n, num_labels, 2)) * 2 for e in ("uni_a", "uni_b", "joint")}
  labels = (rng.uniform(size=(n, num_labels)) < [0.2, 0.5, 0.7]).astype(np.int32)
  # Predictions better than chance: shift the joint expert towards the labels.
  experts["joint"][..., 1] += 1.5 * (2 * labels - 1)
  mask = rng.uniform(size=n) < 0.85
  return experts, labels, mask


@pytest.mark.parametrize("weights", [None, np.array([[1.0, 4.0], [0.5, 2.0], [1.0, 1.0]])])
def test_multilabel_loss_is_the_sum_of_per_label_weighted_cross_entropies(weights):
  experts, labels, mask = multilabel_data(0)
  task = tasks.MultilabelTask(["x", "y", "z"], weights)
  outputs = outputs_of(experts)
  num, den = task.loss_terms(outputs["log_probs"], {"label": labels, "mask": mask})
  loss = float(jnp.sum(num / den))
  # Reference: per label, PyTorch's CrossEntropyLoss(weight=w) on the product of experts.
  logp = log_softmax64(sum(log_softmax64(v) for v in experts.values()))
  want = 0.0
  for l in range(3):
    w = np.ones(2) if weights is None else weights[l]
    y = labels[mask, l]
    nll = -logp[mask, l][np.arange(len(y)), y]
    want += np.sum(w[y] * nll) / np.sum(w[y])
  assert loss == pytest.approx(want, rel=1e-5)


def test_multilabel_metrics_match_scikit_learn():
  experts, labels, mask = multilabel_data(1)
  task = tasks.MultilabelTask(["abnormal", "acl", "mtear"])
  result = summarize(task, outputs_of(experts), {"label": labels, "mask": mask})
  logp = log_softmax64(sum(log_softmax64(v) for v in experts.values()))
  prob, y = np.exp(logp[mask][..., 1]), labels[mask]
  assert result["count"] == mask.sum()
  for l, name in enumerate(task.label_names):
    row = result["per_label"][name]
    assert row["auroc"] == pytest.approx(sk_metrics.roc_auc_score(y[:, l], prob[:, l]), abs=1e-6)
    assert row["auprc"] == pytest.approx(
        sk_metrics.average_precision_score(y[:, l], prob[:, l]), abs=1e-6)
    assert row["accuracy"] == pytest.approx(np.mean((prob[:, l] > 0.5) == y[:, l]))
    joint = np.exp(log_softmax64(experts["joint"])[mask][:, l, 1])
    assert row["experts"]["joint"] == pytest.approx(
        sk_metrics.roc_auc_score(y[:, l], joint), abs=1e-6)
  assert result["auroc"] == pytest.approx(np.mean([r["auroc"] for r in result["per_label"].values()]))
  want_nll = -np.mean(np.take_along_axis(logp[mask], y[..., None], -1).sum((1, 2)))
  assert result["nll"] == pytest.approx(want_nll, rel=1e-5)
  assert set(result["experts"]) == {"uni_a", "uni_b", "joint"}
  assert 0.0 <= result["ece"] <= 1.0


def test_balanced_class_weights_follow_scikit_learn():
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(200, 3)) < [0.1, 0.5, 0.8]).astype(int)
  weights = tasks.parse_class_weights("balanced", 3, labels)
  for l in range(3):
    np.testing.assert_allclose(weights[l], compute_class_weight("balanced", classes=np.array([0, 1]),
                                                                y=labels[:, l]), rtol=1e-6)
  np.testing.assert_array_equal(tasks.parse_class_weights("1,3", 2), [[1, 3], [1, 3]])
  np.testing.assert_array_equal(tasks.parse_class_weights("1,3;2,5", 2), [[1, 3], [2, 5]])
  assert tasks.parse_class_weights("", 2) is None
  for bad in ("1,2,3", "1,3;2,5;1,1", "0,1", "a,b"):
    with pytest.raises(ValueError, match="config.task.class_weights"):
      tasks.parse_class_weights(bad, 2)


# ---------------------------------------------------------------------------------------------
# Soft labels


def soft_data(seed, n=53, c=7):
  rng = np.random.default_rng(seed)
  experts = {e: rng.normal(size=(n, c)) * 2 for e in ("uni_image", "uni_text", "joint")}
  counts = rng.integers(0, 5, size=(n, c)) * (rng.uniform(size=(n, c)) < 0.3)
  scores = np.minimum(np.array([0.0, 0.3, 0.6, 0.9, 1.0])[counts], 1.0).astype(np.float32)
  scores[:3] = 0.0  # questions whose answers are all outside the vocabulary
  mask = rng.uniform(size=n) < 0.9
  return experts, scores, mask


def test_soft_label_losses_match_numpy():
  experts, scores, mask = soft_data(0)
  logp = log_softmax64(sum(log_softmax64(v) for v in experts.values()))
  # BCE with logits on the log-probabilities, times C (PyTorch's mean over B*C elements * C).
  bce = np.logaddexp(0, logp) - logp * scores
  want_bce = np.mean(bce[mask].mean(-1) * scores.shape[1])
  totals = scores.sum(-1, keepdims=True)
  target = np.divide(scores, totals, out=np.zeros_like(scores, np.float64), where=totals > 0)
  want_ce = np.mean(-(target * logp).sum(-1)[mask])
  outputs = outputs_of(experts)
  for loss, want in (("vqa_bce", want_bce), ("soft_ce", want_ce)):
    task = tasks.SoftLabelTask(scores.shape[1], loss)
    num, den = task.loss_terms(outputs["log_probs"], {"scores": scores, "mask": mask})
    assert float(jnp.sum(num / den)) == pytest.approx(want, rel=1e-5), loss


def test_vqa_score_and_accuracy_by_hand():
  scores = np.array([[0.0, 0.3, 1.0], [0.6, 0.6, 0.0], [0.0, 0.0, 0.0], [0.9, 0.3, 0.0]],
                    np.float32)
  joint = np.array([[0, 5, 1], [0, 4, 1], [3, 0, 0], [1, 0, 9]], np.float32)  # argmax 1, 1, 0, 2
  other = np.array([[0, 0, 7], [0, 0, 0], [0, 0, 0], [2, 0, 0]], np.float32)
  task = tasks.SoftLabelTask(3)
  result = summarize(task, {"log_probs": jax.nn.log_softmax(jnp.asarray(joint)),
                            "expert_logits": {"joint": joint, "uni_x": other}},
                     {"scores": scores, "mask": np.array([True, True, True, True])})
  assert result["vqa_score"] == pytest.approx((0.3 + 0.6 + 0.0 + 0.0) / 4)
  # Top-scored class: example 1 (tie 0.6/0.6, chose one of them) only.
  assert result["accuracy"] == pytest.approx(1 / 4)
  assert result["experts"]["uni_x"] == pytest.approx((1.0 + 0.6 + 0.0 + 0.9) / 4)
  assert result["experts"]["joint"] == pytest.approx(result["vqa_score"])


# ---------------------------------------------------------------------------------------------
# Selection and construction

DIRECTIONS = {  # every selectable metric of every task, and whether higher is better
    "multiclass": {"accuracy": "max", "nll": "min", "ece": "min"},
    "binary": {"accuracy": "max", "nll": "min", "ece": "min", "auroc": "max", "auprc": "max"},
    "multilabel": {"auroc": "max", "auprc": "max", "accuracy": "max", "nll": "min", "ece": "min"},
    "soft_label": {"vqa_score": "max", "accuracy": "max", "loss": "min", "ece": "min"},
}


@pytest.mark.parametrize("name,task", [
    ("multiclass", tasks.MulticlassTask(4)), ("binary", tasks.MulticlassTask(2)),
    ("multilabel", tasks.MultilabelTask(["a", "b"])), ("soft_label", tasks.SoftLabelTask(5))])
def test_every_selectable_metric_has_its_direction(name, task):
  assert dict(task.metric_directions) == DIRECTIONS[name]
  for metric, direction in DIRECTIONS[name].items():
    assert task.direction(metric) == direction
  assert task.selection_metric("") == task.default_selection_metric
  assert task.direction("") == "max"
  with pytest.raises(ValueError, match=r"config.selection_metric='acc'.*expected one of"):
    task.selection_metric("acc")


def test_build_task_checks_the_targets():
  source = [{"a": np.zeros(2), "label": 0}]
  single = Dataset(name="d", modalities={"a": (2,)}, num_classes=3,
                   sources={s: source for s in ("train", "val", "test")})
  config = ml_collections.ConfigDict({"name": "", "class_weights": "", "loss": "vqa_bce"})
  assert isinstance(tasks.build_task(config, single), tasks.MulticlassTask)
  config.name = "multilabel"
  with pytest.raises(ValueError, match=r"config.task.name='multilabel' needs .*\[N, L\]"):
    tasks.build_task(config, single)
  config.name = "regression"
  with pytest.raises(ValueError, match=r"config.task.name='regression' is unknown"):
    tasks.build_task(config, single)


# ---------------------------------------------------------------------------------------------
# End to end through the command line


def write_npz_folder(folder, targets_fn, n=(160, 40, 40), seed=0):
  """Two modalities whose first features carry the targets."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for split, size in zip(("train", "val", "test"), n):
    targets, signal = targets_fn(rng, size)
    vec = rng.normal(size=(size, 5)).astype(np.float32)
    vec[:, : signal.shape[1]] += 2.0 * signal
    seq = rng.normal(size=(size, 3, 2)).astype(np.float32)
    np.savez(os.path.join(folder, f"{split}.npz"), vec=vec, seq=seq, **targets)
  return str(folder)


def run_main(folder, workdir, *overrides, steps=30):
  proc = subprocess.run(
      [sys.executable, "-m", "i2m2_jax.main", "--config", "configs/npz.py:smoke",
       f"--workdir={workdir}", f"--config.data.path={folder}",
       f"--config.data.data_dir={os.path.join(os.path.dirname(workdir), 'tfds')}",
       f"--config.num_train_steps={steps}", "--config.optimizer.learning_rate=0.01", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_multilabel_npz_trains_through_the_command_line(tmp_path):
  def targets(rng, n):
    label = (rng.uniform(size=(n, 3)) < 0.4).astype(np.int64)
    return {"label": label}, label
  folder = write_npz_folder(tmp_path / "data", targets, n=(240, 80, 80))
  results = run_main(folder, str(tmp_path / "run"), "--config.data.label_names=x,y,z",
                     "--config.task.class_weights=balanced", steps=60)
  assert results["task"] == "multilabel" and results["selection_metric"] == "auroc"
  assert set(results["test"]["per_label"]) == {"x", "y", "z"}
  assert results["test"]["auroc"] > 0.8  # the signal is learnt
  assert all(row["auroc"] > 0.65 for row in results["test"]["per_label"].values())
  assert results["data"]["fingerprint"].startswith("sha256:")
  assert results["data"]["source"] == folder
  assert results["missing_modality"]["seq"]["experts_used"] == ["uni_vec"]
  # configs/npz.py trains I2M2 from its experts, each trained alone first in WORKDIR/experts/.
  for stage in ("uni_vec", "uni_seq", "inter"):
    with open(tmp_path / "run" / "experts" / stage / "results.json") as f:
      assert json.load(f)["task"] == "multilabel"
  hparams = json.loads((tmp_path / "run" / "hparams.json").read_text())
  assert f"joint={tmp_path / 'run' / 'experts' / 'inter'}" in hparams["model.init_from"]


def test_soft_label_npz_trains_through_the_command_line(tmp_path):
  def targets(rng, n):
    best = rng.integers(0, 4, n)
    scores = np.zeros((n, 4), np.float32)
    scores[np.arange(n), best] = 1.0
    scores[np.arange(n), (best + 1) % 4] = 0.3
    return {"scores": scores, "label": best}, np.eye(4)[best]
  folder = write_npz_folder(tmp_path / "data", targets)
  results = run_main(folder, str(tmp_path / "run"))
  assert results["task"] == "soft_label" and results["selection_metric"] == "vqa_score"
  assert results["test"]["vqa_score"] > 0.7 and results["test"]["accuracy"] > 0.6
  # The same folder as a multiclass task on its 'label' array.
  results = run_main(folder, str(tmp_path / "multiclass"), "--config.task.name=multiclass")
  assert results["task"] == "multiclass" and results["test"]["accuracy"] > 0.6
