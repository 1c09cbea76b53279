r"""Trains every model kind on one data set and seeds, and compares them.

  python experiments/compare.py --config configs/digits.py --workdir runs/compare_digits --seeds 3

Runs uni (one per modality), intra, inter and i2m2 with the same data, config and seeds, each in
DIR/<model>/seed_<s> (a finished run, with its results.json, is not run again; an unfinished one
resumes from its checkpoint), then writes DIR/comparison.md (mean ± std over seeds per model and
metric), DIR/comparison.csv and DIR/comparison.png (test accuracy), and prints the table.
Config overrides work as in i2m2_jax.main: --config.data.inter_strength=0.5.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from i2m2_jax import report, train_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from i2m2_jax.datasets import load_dataset  # noqa: E402  pylint: disable=g-import-not-at-top
from i2m2_jax.models import uni_expert_name  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Data set config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (config.seed, config.seed + 1, ...).")
_MODELS = flags.DEFINE_list("models", None, "Only these models (e.g. intra,inter,i2m2); default all.")
flags.mark_flags_as_required(["config", "workdir"])


def model_variants(modalities):
  """(label, kind, modality) for every model the paper compares."""
  return ([(uni_expert_name(m), "uni", m) for m in modalities] +
          [("intra", "intra", ""), ("inter", "inter", ""), ("i2m2", "i2m2", "")])


def metrics_for(rows_source):
  """Test metrics of every run, plus each expert's test accuracy inside i2m2."""
  metrics = ["test/accuracy", "test/nll", "test/ece", "val/accuracy"]
  experts = sorted({e for r in rows_source.get("i2m2", []) for e in r["test"].get("experts", {})})
  return metrics + [f"test/experts/{e}" for e in experts]


def run_comparison(config, workdir, seeds, models=None):
  """Trains every model variant (or those labelled in `models`) for each seed; writes and returns
  the rows and the Markdown table."""
  dataset = load_dataset(config.data)
  variants = model_variants(list(dataset.modalities))
  if models:
    unknown = sorted(set(models) - {label for label, _, _ in variants})
    if unknown:
      raise ValueError(f"--models names {unknown}; expected some of {[v[0] for v in variants]}.")
    variants = [v for v in variants if v[0] in models]
  runs = {}
  for label, kind, modality in variants:
    runs[label] = []
    for seed in range(config.seed, config.seed + seeds):
      run_dir = os.path.join(workdir, label, f"seed_{seed}")
      results_path = os.path.join(run_dir, "results.json")
      if os.path.exists(results_path):
        with open(results_path) as f:
          runs[label].append(json.load(f))
        continue
      run_config = config.copy_and_resolve_references()
      run_config.model.kind, run_config.model.modality, run_config.seed = kind, modality, seed
      logging.info("Training %s, seed %d, in %s", label, seed, run_dir)
      runs[label].append(train_lib.train_and_evaluate(run_config, run_dir, dataset=dataset))
  metrics = metrics_for(runs)
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


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  _, table = run_comparison(_CONFIG.value, _WORKDIR.value, _SEEDS.value, _MODELS.value)
  print(table)
  print(f"Written: {os.path.join(_WORKDIR.value, 'comparison.md')}, comparison.csv, comparison.png")


if __name__ == "__main__":
  app.run(main)
