"""Every model kind the paper compares, on one data set with the same config and seeds: the
study of experiments/compare.py and quickstart.py (DIR/comparison.md, .csv, .png,
DIR/missing_modality.md, and with --robustness DIR/robustness.md and .png).

I2M2 is trained as the paper's AV-MNIST recipe does (i2m2_init='experts', the default): its
uni-modal experts start from the uni runs' best checkpoints and its joint expert from the inter
run's, then the product is fine-tuned; the comparison trains those runs anyway. i2m2_init='scratch'
trains it from a random start, as `python -m i2m2_jax.main --config.model.kind=i2m2` alone does.
experiments/defaults_study.py measured both on the npz defaults (README "Your own data", 3 seeds):
from scratch the uni-modal experts over-fit inside the product on two sets, 2.2 and 1.4 points
below the joint model alone; from the experts 1.8 and 0.3.
"""
from __future__ import annotations

import os
from typing import Sequence

from experiments.recipes import tuning
from i2m2_jax import studies
from i2m2_jax.datasets import load_dataset
from i2m2_jax.models import JOINT, uni_expert_name

METRICS = ["test/accuracy", "test/nll", "test/ece", "val/accuracy"]


I2M2_INITS = ("experts", "scratch")  # the first is the default


def model_runs(config, modalities: Sequence[str], models: Sequence[str] | None = None,
               i2m2_init: str = I2M2_INITS[0]) -> list[studies.Run]:
  """A run per model kind, uni once per modality (or those labelled in `models`, plus the runs
  I2M2 starts from when i2m2_init='experts')."""
  if i2m2_init not in I2M2_INITS:
    raise ValueError(f"i2m2_init={i2m2_init!r}; expected one of {list(I2M2_INITS)}.")
  unis = [uni_expert_name(m) for m in modalities]
  variants = ([(u, "uni", m) for u, m in zip(unis, modalities)] +
              [("intra", "intra", ""), ("inter", "inter", ""), ("i2m2", "i2m2", "")])
  labels = [label for label, _, _ in variants]
  unknown = sorted(set(models or ()) - set(labels))
  if unknown:
    raise ValueError(f"models {unknown} are unknown; expected some of {labels}.")
  i2m2_from = {u: u for u in unis} | {JOINT: "inter"} if i2m2_init == "experts" else {}
  wanted = set(models or labels)
  if "i2m2" in wanted:
    wanted |= set(i2m2_from.values())
  runs = []
  for label, kind, modality in variants:
    if label in wanted:
      run_config = config.copy_and_resolve_references()
      run_config.model.kind, run_config.model.modality = kind, modality
      runs.append(studies.Run(label, run_config, i2m2_from if label == "i2m2" else {}))
  return runs


# Which expert decides (results.json's attribution), after the experts' own accuracies.
OVERRULES = {"attribution/joint_overrules/accuracy": "accuracy where joint overrules",
             "attribution/joint_overrules/uni_product_accuracy": "uni product's there",
             "attribution/joint_agrees/accuracy": "accuracy where joint agrees"}


def table(runs: studies.Runs, dataset_name: str, seeds: int) -> studies.Table:
  """Test metrics of every model, each expert's test accuracy inside I2M2, and which expert
  decides the predictions of the products (i2m2, intra)."""
  experts = sorted(studies.experts_in(runs, ["i2m2"]), key=studies.uni_first)
  changes = {f"attribution/experts/{e}/changes_prediction": f"{e} left out: flips"
             for e in sorted(studies.experts_in(runs, ["i2m2", "intra"]), key=studies.uni_first)}
  return studies.Table(
      name="comparison",
      title=f"{dataset_name}: test accuracy, mean ± std over {seeds} seed(s)",
      intro="Models: uni-modal experts alone (uni_*), their product (intra), the joint "
            "late-fusion model (inter) and I2M2 (product of all). test/experts/* are the "
            "experts inside I2M2. Which expert decides (i2m2_jax/attribution.py; "
            "results.json's attribution): '<expert> left out: flips' is how often the product "
            "without that expert predicts another class (for joint: how often the joint expert "
            "overrules the product of the uni-modal ones); then I2M2's accuracy on the examples "
            "where the joint expert overrules, what the uni-modal product alone gets there, and "
            "I2M2's accuracy on the other examples.",
      metrics=METRICS + [f"test/experts/{e}" for e in experts] + list(changes) + list(OVERRULES),
      chart_metric="test/accuracy", headers={**changes, **OVERRULES})


def compare(config, workdir: str, seeds: int, models: Sequence[str] | None = None, *,
            i2m2_init: str = I2M2_INITS[0], tune_budget_s: float | None = None,
            robustness: bool = False, robustness_kinds: str = ""):
  """Trains every model kind (or those labelled in `models`) for seeds config.seed, ...,
  config.seed + seeds - 1, each in DIR/<model>/seed_<s>, and writes DIR/comparison.md, .csv and
  .png and DIR/missing_modality.md; with `robustness`, DIR/robustness.md and .png too (noise
  kinds overridden by `robustness_kinds`, 'modality=kind,...'). With tune_budget_s, each run's
  config is first chosen on validation by tuning.tune within that budget (DIR/tune.md).
  Returns (rows, Markdown table)."""
  os.makedirs(workdir, exist_ok=True)
  dataset = load_dataset(config.data)
  study = model_runs(config, list(dataset.modalities), models, i2m2_init)
  if tune_budget_s is not None:
    chosen = tuning.tune(study, workdir, dataset, tune_budget_s)
    study = [chosen[run.label] for run in study]
  seed_list = range(config.seed, config.seed + seeds)
  runs = studies.run_study(study, workdir, seed_list, dataset)
  written = studies.write_table(workdir, table(runs, dataset.name, seeds), runs)
  studies.write_modality_reports(workdir, study, runs, seed_list, dataset, robustness=robustness,
                                 kinds=robustness_kinds)
  return written
