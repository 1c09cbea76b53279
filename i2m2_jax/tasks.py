"""Tasks: the kind of target a classifier predicts; each owns its outputs, loss and metrics.

The trainer never branches on the number of classes or on the model kind: it asks the task for
the experts' output shape, the loss, the metric sums of a batch (jitted, masked, exact over
padded batches and devices: `i2m2_jax.metrics`), the summary metrics on the host, and which
metrics may select a checkpoint and in which direction.

Every task combines its experts the same way, by the normalised product of experts over the last
axis of their logits (`combine.product_of_experts`, computed by the model); what differs is what
the axes mean:

  task        expert logits   batch targets                   loss
  multiclass  [B, C]          label, int [B] in 0..C-1        cross-entropy of the product
  multilabel  [B, L, 2]       label, int [B, L] in {0, 1}     sum over the L labels of each
                                                              label's product's cross-entropy,
                                                              optionally class-weighted
  soft_label  [B, C]          scores, float [B, C] in [0, 1]  'vqa_bce' or 'soft_ce' (below)

`config.task.name` chooses the task; '' takes the data set's default (`Dataset.task`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from i2m2_jax import metrics

MAX, MIN = "max", "min"  # whether a higher or a lower value of a metric is better
Batch = Mapping[str, Any]
Outputs = Mapping[str, Any]  # the model's {'log_probs': ..., 'expert_logits': {name: ...}}


def _mask(batch: Batch) -> jax.Array:
  return batch["mask"].astype(bool)


def label_nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """-log q(label) per position: log_probs [..., C], labels [...] -> [...]."""
  labels = labels.astype(jnp.int32)[..., None]
  return -jnp.take_along_axis(log_probs, labels, axis=-1)[..., 0]


class Task:
  """The interface every task implements (see the module docstring).

  Attributes:
    name: the `config.task.name` that selects it.
    output_shape: per-example shape of each expert's logits; the last axis is the one the
      product of experts normalises.
    target_keys: the batch keys besides 'inputs' and 'mask' that the task reads.
    main_metric: the metric each expert is reported by (`experts` in results.json).
    metric_directions: the metrics that may select a checkpoint (`config.selection_metric`),
      each with MAX or MIN.
    default_selection_metric: what `config.selection_metric = ''` selects by.
  """
  name: str
  output_shape: tuple[int, ...]
  target_keys: tuple[str, ...]
  main_metric: str
  metric_directions: Mapping[str, str]
  default_selection_metric: str

  # -- training (traced) ---------------------------------------------------------------------

  def loss_terms(self, log_probs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(numerators [K], weights [K]) of a batch: the loss is sum_k numerators_k / weights_k with
    both summed over the global batch. The weights do not depend on the model, so a data-parallel
    step can add them over devices first (`steps.loss_and_grads`)."""
    raise NotImplementedError

  def train_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
    """Masked sums for the logged train metrics (`count` and the task's own)."""
    raise NotImplementedError

  def summarize_train(self, sums: Mapping[str, Any]) -> dict[str, float]:
    """Train metrics from accumulated sums (with `loss_sum`, added by the step)."""
    raise NotImplementedError

  # -- evaluation ----------------------------------------------------------------------------

  def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
    """Masked sums of one evaluation batch (traced)."""
    raise NotImplementedError

  def ranking_outputs(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
    """Per-example arrays (batch axis first) gathered to the host for metrics that need every
    example at once, such as AUROC; {} when the task has none (traced)."""
    del outputs, batch
    return {}

  def summarize(self, sums: Mapping[str, Any],
                ranked: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """Metrics from the accumulated sums and the gathered ranking outputs (padding dropped)."""
    raise NotImplementedError

  # -- checkpoint selection ------------------------------------------------------------------

  def selection_metric(self, name: str) -> str:
    """`name` (config.selection_metric), or the task's default for ''; ValueError naming the
    metrics this task can select by otherwise."""
    name = name or self.default_selection_metric
    if name not in self.metric_directions:
      raise ValueError(f"config.selection_metric={name!r} is not a metric of the {self.name!r} "
                       f"task{self._selection_note()}; expected one of "
                       f"{sorted(self.metric_directions)} (or '' for "
                       f"{self.default_selection_metric!r}).")
    return name

  def direction(self, metric: str) -> str:
    return self.metric_directions[self.selection_metric(metric)]

  def _selection_note(self) -> str:
    return ""


# ---------------------------------------------------------------------------------------------
# Single-label multi-class


class MulticlassTask(Task):
  """One label in 0..C-1 per example; binary tasks (C = 2) also get AUROC and AUPRC of the
  product's probability of class 1."""
  name = "multiclass"
  target_keys = ("label",)
  main_metric = "accuracy"
  default_selection_metric = "accuracy"

  def __init__(self, num_classes: int):
    if num_classes < 2:
      raise ValueError(f"A multiclass task needs at least 2 classes, got {num_classes}.")
    self.num_classes = int(num_classes)
    self.output_shape = (self.num_classes,)
    self.metric_directions = {"accuracy": MAX, "nll": MIN, "ece": MIN}
    if self.num_classes == 2:
      self.metric_directions.update(auroc=MAX, auprc=MAX)

  def _selection_note(self) -> str:
    return (" with 2 classes" if self.num_classes == 2 else
            f" with {self.num_classes} classes (auroc and auprc need 2)")

  def loss_terms(self, log_probs, batch):
    mask = _mask(batch)
    nll = jnp.where(mask, label_nll(log_probs, batch["label"]), 0.0)
    return jnp.sum(nll)[None], jnp.sum(mask, dtype=jnp.float32)[None]

  def train_sums(self, outputs, batch):
    mask = _mask(batch)
    correct = (jnp.argmax(outputs["log_probs"], -1) == batch["label"]) & mask
    return {"count": jnp.sum(mask, dtype=jnp.float32),
            "correct": jnp.sum(correct, dtype=jnp.float32)}

  def summarize_train(self, sums):
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count}

  def eval_sums(self, outputs, batch):
    return metrics.classification_sums(outputs["log_probs"], batch["label"], batch["mask"],
                                       outputs["expert_logits"])

  def ranking_outputs(self, outputs, batch):
    if self.num_classes != 2:
      return {}
    return {"positive_prob": jnp.exp(outputs["log_probs"][:, 1]), "label": batch["label"]}

  def summarize(self, sums, ranked):
    result = metrics.summarize(sums)
    if self.num_classes == 2:
      result.update(metrics.binary_auc_metrics(ranked["positive_prob"], ranked["label"]))
    return result


# ---------------------------------------------------------------------------------------------
# Several binary labels


def parse_class_weights(spec: Any, num_labels: int,
                        train_labels: np.ndarray | None = None) -> np.ndarray | None:
  """config.task.class_weights as float32 [L, 2] (weight of class 0, class 1 per label).

  '' or None: none. 'balanced': n / (2 * n_c) per label from the training labels [N, L]
  (scikit-learn's 'balanced' rule; a class absent from training gets weight 1). 'w0,w1': the
  same pair for every label. 'w0,w1;w0,w1;...' or a sequence of pairs: one pair per label.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  where = "config.task.class_weights"
  if isinstance(spec, str) and spec.strip() == "balanced":
    if train_labels is None:
      raise ValueError(f"{where}='balanced' needs the training labels.")
    labels = np.asarray(train_labels).reshape(len(train_labels), num_labels)
    counts = np.stack([(labels == 0).sum(0), (labels == 1).sum(0)], axis=-1).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (2.0 * np.maximum(counts, 1)), 1.0)
    return weights.astype(np.float32)
  try:
    if isinstance(spec, str):
      pairs = [[float(v) for v in part.split(",")] for part in spec.split(";") if part.strip()]
    else:
      pairs = np.asarray(spec, np.float64).reshape(-1, 2).tolist()
    weights = np.asarray(pairs, np.float64)
  except ValueError:
    weights = np.zeros((0,))
  if weights.ndim != 2 or weights.shape[1] != 2 or len(weights) not in (1, num_labels):
    raise ValueError(f"{where}={spec!r} is not understood; expected '', 'balanced', 'w0,w1' (all "
                     f"labels) or {num_labels} pairs 'w0,w1;w0,w1;...' (one per label).")
  if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
    raise ValueError(f"{where}={spec!r}: weights must be positive numbers.")
  return np.broadcast_to(weights, (num_labels, 2)).astype(np.float32)


class MultilabelTask(Task):
  """L binary labels per example; each expert gives two logits per label and the product of
  experts is taken per label. Loss: the sum over labels of each label's cross-entropy (with
  class weights, each label's weighted mean as PyTorch's CrossEntropyLoss(weight=...)). Metrics
  per label and averaged over labels: AUROC, AUPRC, accuracy, NLL; ECE over all decisions."""
  name = "multilabel"
  target_keys = ("label",)
  main_metric = "auroc"
  default_selection_metric = "auroc"
  metric_directions = {"auroc": MAX, "auprc": MAX, "accuracy": MAX, "nll": MIN, "ece": MIN}

  def __init__(self, label_names: Sequence[str], class_weights: np.ndarray | None = None):
    self.label_names = tuple(label_names)
    if not self.label_names:
      raise ValueError("A multilabel task needs at least one label.")
    self.output_shape = (len(self.label_names), 2)
    self.class_weights = None if class_weights is None else np.asarray(class_weights, np.float32)

  def loss_terms(self, log_probs, batch):
    mask = _mask(batch)[:, None]
    labels = batch["label"].astype(jnp.int32)
    if self.class_weights is None:
      weights = jnp.broadcast_to(mask, labels.shape).astype(jnp.float32)
    else:
      per_class = jnp.asarray(self.class_weights)  # [L, 2]
      weights = jnp.where(mask, jnp.where(labels == 1, per_class[:, 1], per_class[:, 0]), 0.0)
    nll = jnp.where(mask, label_nll(log_probs, labels), 0.0)
    return jnp.sum(weights * nll, axis=0), jnp.sum(weights, axis=0)

  def train_sums(self, outputs, batch):
    mask = _mask(batch)
    correct = (jnp.argmax(outputs["log_probs"], -1) == batch["label"]) & mask[:, None]
    return {"count": jnp.sum(mask, dtype=jnp.float32),
            "correct": jnp.sum(correct, dtype=jnp.float32)}

  def summarize_train(self, sums):
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / count,
            "accuracy": float(sums["correct"]) / (count * len(self.label_names))}

  def eval_sums(self, outputs, batch):
    return metrics.classification_sums(outputs["log_probs"], batch["label"], batch["mask"],
                                       outputs["expert_logits"])

  def ranking_outputs(self, outputs, batch):
    out = {"positive_prob": jnp.exp(outputs["log_probs"][..., 1]), "label": batch["label"]}
    for name, logits in outputs["expert_logits"].items():
      out[f"expert_prob/{name}"] = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    return out

  def summarize(self, sums, ranked):
    sums = {k: metrics.to_host(v) for k, v in sums.items()}
    count = int(sums["count"])
    labels = ranked["label"]
    experts = [k[len(metrics.EXPERT_PREFIX):] for k in sums if k.startswith(metrics.EXPERT_PREFIX)]
    per_label = {}
    for i, label in enumerate(self.label_names):
      row = metrics.binary_auc_metrics(ranked["positive_prob"][:, i], labels[:, i])
      row["accuracy"] = metrics.ratio(sums["correct"][i], count)
      row["nll"] = metrics.ratio(sums["nll_sum"][i], count)
      row["experts"] = {e: metrics.binary_auc_metrics(ranked[f"expert_prob/{e}"][:, i],
                                                      labels[:, i])["auroc"] for e in experts}
      per_label[label] = row

    def mean(values):
      values = [v for v in values if not math.isnan(v)]
      return float(np.mean(values)) if values else math.nan

    return {
        "count": count,
        **{m: mean(r[m] for r in per_label.values()) for m in ("auroc", "auprc", "accuracy")},
        "nll": metrics.ratio(np.sum(sums["nll_sum"]), count),  # summed over labels
        "ece": metrics.ece(sums),
        "experts": {e: mean(r["experts"][e] for r in per_label.values()) for e in experts},
        "per_label": per_label,
    }


# ---------------------------------------------------------------------------------------------
# Soft labels (VQA)

SOFT_LABEL_LOSSES = ("vqa_bce", "soft_ce")


def soft_label_loss(log_probs: jax.Array, scores: jax.Array, loss: str) -> jax.Array:
  """Per-example loss [B] of the product's log-probabilities against soft scores [B, C].

  'vqa_bce': the official VQA recipe (`divyam3897/I2M2: vqa_nlvr/fiber/modules/objectives.py`,
  compute_vqa): binary cross-entropy with logits applied to the log-probabilities, times C
  (PyTorch's mean over B*C elements times C is this per-example sum, averaged over the batch).
  'soft_ce': cross-entropy against the scores normalised to sum to 1 (0 for all-zero scores).
  """
  scores = scores.astype(jnp.float32)
  if loss == "vqa_bce":
    # BCE-with-logits(x, t) = softplus(x) - x * t, stable for the x <= 0 it gets here.
    return jnp.sum(jax.nn.softplus(log_probs) - log_probs * scores, axis=-1)
  if loss == "soft_ce":
    total = jnp.sum(scores, axis=-1, keepdims=True)
    target = jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)
    return -jnp.sum(target * log_probs, axis=-1)
  raise ValueError(f"config.task.loss={loss!r} is unknown; expected one of "
                   f"{list(SOFT_LABEL_LOSSES)}.")


def _score_of_prediction(logits_or_log_probs: jax.Array, scores: jax.Array) -> jax.Array:
  """The target score of each example's arg-max class [B]."""
  predicted = jnp.argmax(logits_or_log_probs, axis=-1)
  return jnp.take_along_axis(scores, predicted[:, None], axis=-1)[:, 0].astype(jnp.float32)


class SoftLabelTask(Task):
  """A score in [0, 1] per class and example (VQA: how many annotators gave that answer). The
  product of experts is over the C classes. Metrics: the VQA score (the target score of the
  arg-max class, averaged), accuracy against the top-scored class (a prediction counts when its
  score is the example's highest and above 0), the loss, and ECE with the predicted answer's
  score as its correctness."""
  name = "soft_label"
  target_keys = ("scores",)
  main_metric = "vqa_score"
  default_selection_metric = "vqa_score"
  metric_directions = {"vqa_score": MAX, "accuracy": MAX, "loss": MIN, "ece": MIN}

  def __init__(self, num_classes: int, loss: str = "vqa_bce"):
    if loss not in SOFT_LABEL_LOSSES:
      raise ValueError(f"config.task.loss={loss!r} is unknown; expected one of "
                       f"{list(SOFT_LABEL_LOSSES)}.")
    self.num_classes = int(num_classes)
    self.output_shape = (self.num_classes,)
    self.loss = loss

  def loss_terms(self, log_probs, batch):
    mask = _mask(batch)
    per_example = jnp.where(mask, soft_label_loss(log_probs, batch["scores"], self.loss), 0.0)
    return jnp.sum(per_example)[None], jnp.sum(mask, dtype=jnp.float32)[None]

  def train_sums(self, outputs, batch):
    mask = _mask(batch)
    score = _score_of_prediction(outputs["log_probs"], batch["scores"])
    return {"count": jnp.sum(mask, dtype=jnp.float32),
            "score_sum": jnp.sum(jnp.where(mask, score, 0.0))}

  def summarize_train(self, sums):
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / count,
            "vqa_score": float(sums["score_sum"]) / count}

  def eval_sums(self, outputs, batch):
    mask = _mask(batch)
    log_probs, scores = outputs["log_probs"].astype(jnp.float32), batch["scores"]
    score = _score_of_prediction(log_probs, scores)
    top = jnp.max(scores, axis=-1).astype(jnp.float32)
    masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731
    sums = {
        "count": jnp.sum(mask, dtype=jnp.int32),
        "score_sum": masked_sum(score),
        "top_correct": jnp.sum(mask & (score >= top) & (top > 0), dtype=jnp.int32),
        "loss_sum": masked_sum(soft_label_loss(log_probs, scores, self.loss)),
        **metrics.calibration_sums(jnp.exp(jnp.max(log_probs, axis=-1)), score, mask),
    }
    for name, logits in outputs["expert_logits"].items():
      sums[f"expert_score/{name}"] = masked_sum(_score_of_prediction(logits, scores))
    return sums

  def summarize(self, sums, ranked):
    del ranked
    sums = {k: metrics.to_host(v) for k, v in sums.items()}
    count = int(sums["count"])
    return {
        "count": count,
        "vqa_score": metrics.ratio(sums["score_sum"], count),
        "accuracy": metrics.ratio(sums["top_correct"], count),
        "loss": metrics.ratio(sums["loss_sum"], count),
        "ece": metrics.ece(sums),
        "experts": {k[len("expert_score/"):]: metrics.ratio(v, count)
                    for k, v in sums.items() if k.startswith("expert_score/")},
    }


# ---------------------------------------------------------------------------------------------
# From a config and a data set

TASKS = ("multiclass", "multilabel", "soft_label")
# task name -> the metric it reports each expert by, its headline metric
MAIN_METRICS = {t.name: t.main_metric for t in (MulticlassTask, MultilabelTask, SoftLabelTask)}


def build_task(task_config, dataset) -> Task:
  """The task named by config.task.name ('' for the data set's default), checked against the
  data set's targets (`Dataset.targets`: key -> per-example shape)."""
  name = (task_config.get("name", "") if task_config else "") or dataset.task
  if name not in TASKS:
    raise ValueError(f"config.task.name={name!r} is unknown; expected one of {list(TASKS)} (or "
                     f"'' for the data set's default, {dataset.task!r}).")
  targets = dict(dataset.targets)

  def need(key, rank, what):
    if key not in targets or len(targets[key]) != rank:
      raise ValueError(f"config.task.name={name!r} needs {what}; data set {dataset.name!r} has "
                       f"targets {({k: list(v) for k, v in targets.items()})}.")

  get = (lambda key, default: task_config.get(key, default)) if task_config else (
      lambda key, default: default)
  # Fields of the other tasks are checked too: a misspelt value fails whatever the task.
  if get("loss", "vqa_bce") not in SOFT_LABEL_LOSSES:
    raise ValueError(f"config.task.loss={get('loss', '')!r} is unknown; expected one of "
                     f"{list(SOFT_LABEL_LOSSES)}.")
  if name != "multilabel" and str(get("class_weights", "") or "").strip():
    raise ValueError(f"config.task.class_weights={get('class_weights', '')!r} applies to the "
                     f"multilabel task only; this task is {name!r}.")
  if name == "multiclass":
    need("label", 0, "an integer 'label' per example (shape [N])")
    return MulticlassTask(dataset.num_classes)
  if name == "multilabel":
    need("label", 1, "an integer 'label' array of L binary labels per example (shape [N, L])")
    num_labels = targets["label"][0]
    label_names = tuple(dataset.label_names) or tuple(f"label_{i}" for i in range(num_labels))
    spec = get("class_weights", "")
    train_labels = (dataset.train_targets("label") if isinstance(spec, str)
                    and spec.strip() == "balanced" else None)
    return MultilabelTask(label_names, parse_class_weights(spec, num_labels, train_labels))
  need("scores", 1, "a float 'scores' array per example (shape [N, C])")
  return SoftLabelTask(targets["scores"][0], get("loss", "vqa_bce"))
