"""Every model kind the paper compares, on one data set with the same config and seeds: the
study of experiments/compare.py and quickstart.py (DIR/comparison.md, .csv, .png)."""
from __future__ import annotations

import os
from typing import Sequence

from i2m2_jax import studies
from i2m2_jax.datasets import load_dataset
from i2m2_jax.models import uni_expert_name

METRICS = ["test/accuracy", "test/nll", "test/ece", "val/accuracy"]


def model_runs(config, modalities: Sequence[str],
               models: Sequence[str] | None = None) -> list[studies.Run]:
  """A run per model kind, uni once per modality (or those labelled in `models`)."""
  variants = ([(uni_expert_name(m), "uni", m) for m in modalities] +
              [("intra", "intra", ""), ("inter", "inter", ""), ("i2m2", "i2m2", "")])
  labels = [label for label, _, _ in variants]
  unknown = sorted(set(models or ()) - set(labels))
  if unknown:
    raise ValueError(f"models {unknown} are unknown; expected some of {labels}.")
  runs = []
  for label, kind, modality in variants:
    if not models or label in models:
      run_config = config.copy_and_resolve_references()
      run_config.model.kind, run_config.model.modality = kind, modality
      runs.append(studies.Run(label, run_config))
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


def compare(config, workdir: str, seeds: int, models: Sequence[str] | None = None):
  """Trains every model kind (or those labelled in `models`) for seeds config.seed, ...,
  config.seed + seeds - 1, each in DIR/<model>/seed_<s>, and writes DIR/comparison.md, .csv and
  .png; returns (rows, Markdown table)."""
  os.makedirs(workdir, exist_ok=True)
  dataset = load_dataset(config.data)
  runs = studies.run_study(model_runs(config, list(dataset.modalities), models), workdir,
                           range(config.seed, config.seed + seeds), dataset)
  return studies.write_table(workdir, table(runs, dataset.name, seeds), runs)
