"""Training every model kind on the same data and seeds, and tabulating the results.

The library side of experiments/compare.py and experiments/quickstart.py.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import logging
import jax

from i2m2_jax import report, train_lib
from i2m2_jax.datasets import load_dataset
from i2m2_jax.models import uni_expert_name


def enable_compilation_cache(workdir: str) -> None:
  """Runs of the same model differ only in values, so their XLA programs compile once and are
  read back from DIR/.xla_cache (unless JAX_COMPILATION_CACHE_DIR already names a cache)."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def model_variants(modalities: Sequence[str]) -> list[tuple[str, str, str]]:
  """(label, kind, modality) for every model the paper compares."""
  return ([(uni_expert_name(m), "uni", m) for m in modalities] +
          [("intra", "intra", ""), ("inter", "inter", ""), ("i2m2", "i2m2", "")])


def comparison_metrics(runs) -> list[str]:
  """Test metrics of every run, plus each expert's test accuracy inside i2m2."""
  metrics = ["test/accuracy", "test/nll", "test/ece", "val/accuracy"]
  experts = sorted({e for r in runs.get("i2m2", []) for e in r["test"].get("experts", {})})
  return metrics + [f"test/experts/{e}" for e in experts]


def train_or_read(config, run_dir: str, dataset):
  """The results.json of a finished run in run_dir, else the results of training it there (an
  unfinished run resumes from its checkpoint)."""
  results_path = os.path.join(run_dir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      return json.load(f)
  logging.info("Training %s (seed %d) in %s", config.model.kind, config.seed, run_dir)
  return train_lib.train_and_evaluate(config, run_dir, dataset=dataset)


def run_comparison(config, workdir: str, seeds: int, models: Sequence[str] | None = None):
  """Trains every model variant (or those labelled in `models`) for seeds config.seed, ...,
  config.seed + seeds - 1, each in DIR/<model>/seed_<s> (finished runs are read back, unfinished
  ones resume); writes DIR/comparison.md, .csv and .png; returns (rows, Markdown table)."""
  dataset = load_dataset(config.data)
  variants = model_variants(list(dataset.modalities))
  if models:
    unknown = sorted(set(models) - {label for label, _, _ in variants})
    if unknown:
      raise ValueError(f"models {unknown} are unknown; expected some of {[v[0] for v in variants]}.")
    variants = [v for v in variants if v[0] in models]
  runs = {}
  for label, kind, modality in variants:
    runs[label] = []
    for seed in range(config.seed, config.seed + seeds):
      run_config = config.copy_and_resolve_references()
      run_config.model.kind, run_config.model.modality, run_config.seed = kind, modality, seed
      runs[label].append(
          train_or_read(run_config, os.path.join(workdir, label, f"seed_{seed}"), dataset))
  metrics = comparison_metrics(runs)
  rows = report.summarize_runs(runs, metrics)
  table = report.markdown_table(rows, metrics)
  title = f"{dataset.name}: test accuracy, mean ± std over {seeds} seed(s)"
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(f"# {title}\n\nModels: uni-modal experts alone (uni_*), their product (intra), the "
            f"joint late-fusion model (inter) and I2M2 (product of all). test/experts/* are the "
            f"experts inside I2M2.\n\n{table}")
  report.write_csv(os.path.join(workdir, "comparison.csv"), rows, metrics)
  report.bar_chart(os.path.join(workdir, "comparison.png"), rows, "test/accuracy", title)
  return rows, table
