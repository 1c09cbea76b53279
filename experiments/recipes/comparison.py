"""Every model kind the paper compares, on one data set with the same config and seeds: the
study of experiments/compare.py and quickstart.py (DIR/comparison.md, .csv, .png).

I2M2 is trained from a random start (i2m2_init='scratch'), as `python -m i2m2_jax.main
--config.model.kind=i2m2` alone does; i2m2_init='experts' trains it as the paper's AV-MNIST recipe
does: its uni-modal experts start from the uni runs' best checkpoints and its joint expert from
the inter run's, then the product is fine-tuned. experiments/defaults_study.py measured both on
the npz defaults (README "Your own data"): neither was better, and scratch needs no other runs.
"""
from __future__ import annotations

import os
from typing import Sequence

from experiments.recipes import tuning
from i2m2_jax import studies
from i2m2_jax.datasets import load_dataset
from i2m2_jax.models import JOINT, uni_expert_name

METRICS = ["test/accuracy", "test/nll", "test/ece", "val/accuracy"]


I2M2_INITS = ("scratch", "experts")  # the first is the default


def model_runs(config, modalities: Sequence[str], models: Sequence[str] | None = None,
               i2m2_init: str = "scratch") -> list[studies.Run]:
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


def table(runs: studies.Runs, dataset_name: str, seeds: int) -> studies.Table:
  """Test metrics of every model, plus each expert's test accuracy inside I2M2."""
  experts = [f"test/experts/{e}" for e in sorted(studies.experts_in(runs, ["i2m2"]))]
  return studies.Table(
      name="comparison",
      title=f"{dataset_name}: test accuracy, mean ± std over {seeds} seed(s)",
      intro="Models: uni-modal experts alone (uni_*), their product (intra), the joint "
            "late-fusion model (inter) and I2M2 (product of all). test/experts/* are the "
            "experts inside I2M2.",
      metrics=METRICS + experts, chart_metric="test/accuracy")


def compare(config, workdir: str, seeds: int, models: Sequence[str] | None = None,
            i2m2_init: str = "scratch", tune_budget_s: float | None = None):
  """Trains every model kind (or those labelled in `models`) for seeds config.seed, ...,
  config.seed + seeds - 1, each in DIR/<model>/seed_<s>, and writes DIR/comparison.md, .csv and
  .png; returns (rows, Markdown table). With tune_budget_s, each run's config is first chosen
  on validation by tuning.tune within that budget (DIR/tune.md)."""
  os.makedirs(workdir, exist_ok=True)
  dataset = load_dataset(config.data)
  runs = model_runs(config, list(dataset.modalities), models, i2m2_init)
  if tune_budget_s is not None:
    chosen = tuning.tune(runs, workdir, dataset, tune_budget_s)
    runs = [chosen[run.label] for run in runs]
  results = studies.run_study(runs, workdir, range(config.seed, config.seed + seeds), dataset)
  return studies.write_table(workdir, table(results, dataset.name, seeds), results)
