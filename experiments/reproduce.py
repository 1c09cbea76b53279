r"""Reproduces a paper benchmark end to end: every stage of its recipe for several seeds, one table.

  python experiments/reproduce.py --config configs/avmnist.py --workdir runs/avmnist --seeds 3 \
      --config.data.manual_dir=/path/to/avmnist
  python experiments/reproduce.py --config configs/mimic.py:icd9_140_239 --workdir runs/icd9_1 \
      --seeds 3 --config.data.manual_dir=/path/to/folder_with_im.pk

The config file defines the stages (`STAGES`: stage -> {expert: stage it is initialised from},
`stages(fusion)`, `TABLE_ROWS`, `published(config)`) and `get_config('<stage>,...')` builds each
stage's recipe. For every stage, in dependency order, and every seed s (config.seed, +1, ...),
the stage trains in DIR/<stage>/seed_<s> with config.seed = s and, for staged recipes,
config.model.init_from pointing at the best checkpoints of the stages it loads *with the same
seed* (AV-MNIST: intra from uni_image + uni_audio; i2m2 from those two + inter_lf, or inter_lrtf
with --fusion=lrtf; --fusion=both runs both I2M2 variants, rows i2m2 and i2m2_lrtf). A stage
whose DIR/<stage>/seed_<s>/results.json exists is skipped (its checkpoints exist); an unfinished
one resumes from its own latest checkpoint. The data set is loaded once and shared by all runs.

Other tokens of the config argument (e.g. 'smoke', the MIMIC task) and every --config.xxx=...
override apply to every stage; a stage token in --config is ignored (all stages run), and an
override naming a field a stage's config lacks (e.g. model.fusion_kwargs.rank outside the LRTF
stages) is skipped for that stage. config.model.init_from is set here, per stage.

Writes DIR/table.md, DIR/table.csv and DIR/table.png (test accuracy) and prints the table: one
row per model (TABLE_ROWS), test accuracy (+ AUROC and AUPRC for binary tasks) and ECE as
mean ± std over seeds (std with ddof=1), the paper's published I2M2 number beside ours where
known, and the accuracy of each expert inside the product models (intra, i2m2).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from i2m2_jax import report, train_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from i2m2_jax.datasets import load_dataset  # noqa: E402  pylint: disable=g-import-not-at-top

PRODUCT_KINDS = ("intra", "i2m2")  # models whose per-expert accuracies the table shows
PUBLISHED_COLUMN = "published I2M2 (i2m2-method.md §5, unverified)"


# ---------------------------------------------------------------------------------------------
# Stage configs


def load_config_module(path: str):
  """The config file as a module (it must define get_config, STAGES, stages, TABLE_ROWS and
  published)."""
  spec = importlib.util.spec_from_file_location(
      "reproduce_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  missing = [n for n in ("get_config", "STAGES", "stages", "TABLE_ROWS", "published")
             if not hasattr(module, n)]
  if missing:
    raise ValueError(f"{path} is not a benchmark config for experiments/reproduce.py: it lacks "
                     f"{missing} (see configs/avmnist.py).")
  return module


def split_config_argument(config_filename: str) -> tuple[str, list[str]]:
  """'configs/mimic.py:icd9_140_239,smoke' -> ('configs/mimic.py', ['icd9_140_239', 'smoke'])."""
  path, _, arg = config_filename.partition(":")
  return path, [t.strip() for t in arg.split(",") if t.strip()]


def _set_if_present(config, dotted: str, value) -> bool:
  node = config
  *parents, last = dotted.split(".")
  for key in parents:
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  if not hasattr(node, "keys") or last not in node:
    return False
  node[last] = value
  return True


def stage_config(module, stage: str, tokens: Sequence[str], overrides: Mapping[str, Any]):
  """The config of one stage: get_config('<stage>,<other tokens>') plus the command-line
  overrides (those naming fields this stage has)."""
  other = [t for t in tokens if t not in module.STAGES]
  config = module.get_config(",".join([stage] + other))
  for dotted, value in overrides.items():
    if dotted == "model.init_from":
      logging.warning("--config.model.init_from is ignored: reproduce.py sets it per stage.")
    elif not _set_if_present(config, dotted, value):
      logging.info("Stage %s has no field %s; override not applied there.", stage, dotted)
  return config


def run_dir(workdir: str, stage: str, seed: int) -> str:
  return os.path.join(workdir, stage, f"seed_{seed}")


def init_from(module, workdir: str, stage: str, seed: int) -> str:
  """config.model.init_from of a stage: each loaded expert from its source stage, same seed."""
  entries = []
  for expert, source in module.STAGES[stage].items():
    source_dir = os.path.abspath(run_dir(workdir, source, seed))
    if not os.path.exists(os.path.join(source_dir, "results.json")):
      raise RuntimeError(f"Stage {stage} (seed {seed}) loads expert {expert} from stage "
                         f"{source}, which has not finished: no {source_dir}/results.json.")
    entries.append(f"{expert}={source_dir}")
  return ",".join(entries)


# ---------------------------------------------------------------------------------------------
# Running


def run_all(module, tokens: Sequence[str], overrides: Mapping[str, Any], workdir: str,
            seeds: int, fusion: str = "lf", dataset=None):
  """Trains (or finds) every stage for every seed. Returns ({stage: [results.json dicts]},
  the dataset, a stage config for the table's title)."""
  stage_list = module.stages(fusion)
  base = stage_config(module, stage_list[0], tokens, overrides)
  if dataset is None:
    dataset = load_dataset(base.data)
  first_seed = int(base.seed)
  runs: dict[str, list[dict]] = {}
  for stage in stage_list:
    runs[stage] = []
    for seed in range(first_seed, first_seed + seeds):
      directory = run_dir(workdir, stage, seed)
      results_path = os.path.join(directory, "results.json")
      if os.path.exists(results_path):
        logging.info("Stage %s seed %d: finished already (%s); skipped.", stage, seed,
                     results_path)
        with open(results_path) as f:
          runs[stage].append(json.load(f))
        continue
      config = stage_config(module, stage, tokens, overrides)
      config.seed = seed
      config.model.init_from = init_from(module, workdir, stage, seed)
      logging.info("Stage %s seed %d in %s%s", stage, seed, directory,
                   f" (init_from {config.model.init_from})" if config.model.init_from else "")
      start = time.perf_counter()
      result = train_lib.train_and_evaluate(config, directory, dataset=dataset)
      logging.info("Stage %s seed %d: test accuracy %.4f in %.0f s.", stage, seed,
                   result["test"]["accuracy"], time.perf_counter() - start)
      runs[stage].append(result)
  return runs, dataset, base


# ---------------------------------------------------------------------------------------------
# The table


def table_metrics(runs: Mapping[str, Sequence[Mapping[str, Any]]], num_classes: int) -> list[str]:
  metrics = ["test/accuracy"]
  if num_classes == 2:
    metrics += ["test/auroc", "test/auprc"]
  metrics.append("test/ece")
  experts = []
  for results in runs.values():
    for result in results:
      if result.get("model") in PRODUCT_KINDS:
        experts += [e for e in result["test"].get("experts", {}) if e not in experts]
  experts.sort(key=lambda e: (e == "joint", e))  # uni-modal experts first, then the joint one
  return metrics + [f"test/experts/{e}" for e in experts]


def summarize(runs, metrics, row_order):
  """report.summarize_runs in table order; per-expert cells only for product models (for the
  others the single expert is the model itself)."""
  ordered = {r: runs[r] for r in row_order if r in runs}
  ordered.update({r: v for r, v in runs.items() if r not in ordered})
  rows = report.summarize_runs(ordered, metrics)
  for row in rows:
    kinds = {r.get("model") for r in ordered[row["model"]]}
    if not kinds & set(PRODUCT_KINDS):
      for metric in metrics:
        if "/experts/" in metric:
          row[metric] = (math.nan, 0.0)
  return rows


def write_table(module, runs, dataset, config, workdir: str, seeds: int) -> str:
  metrics = table_metrics(runs, dataset.num_classes)
  rows = summarize(runs, metrics, module.TABLE_ROWS)
  published = {PUBLISHED_COLUMN: module.published(config)}
  table = report.markdown_table(rows, metrics, extra_columns=published)
  task = config.data.get("task", "")
  name = f"{dataset.name}" + (f" ({task})" if task else "")
  title = f"{name}: mean ± std over {seeds} seed(s)"
  selection = config.selection_metric
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(
        f"# {title}\n\n"
        f"Test metrics of the checkpoint with the best validation {selection}, in percent. "
        f"Rows: uni-modal experts alone (uni_*), their product (intra), the joint models "
        f"(inter*), and I2M2 (product of the uni-modal experts and the joint one). "
        f"test/experts/* are the accuracies of the experts inside the product models. "
        f"The published column is a third-party extraction of the paper, not verified "
        f"(i2m2-method.md §5). Deviations from the reference code: BatchNorm in eval mode at "
        f"test, trained LRTF factors, intra tested as a product (i2m2-method.md §6).\n\n{table}")
  report.write_csv(os.path.join(workdir, "table.csv"), rows, metrics, extra_columns=published)
  report.bar_chart(os.path.join(workdir, "table.png"), rows, "test/accuracy", title)
  return table


def reproduce(config_filename: str, overrides: Mapping[str, Any], workdir: str, seeds: int,
              fusion: str = "lf", dataset=None) -> str:
  """Runs everything and writes the table; returns the Markdown table."""
  path, tokens = split_config_argument(config_filename)
  module = load_config_module(path)
  os.makedirs(workdir, exist_ok=True)
  runs, dataset, config = run_all(module, tokens, overrides, workdir, seeds, fusion, dataset)
  return write_table(module, runs, dataset, config, workdir, seeds)


def define_flags():
  """The command-line flags (defined only when run as a script, so that importing this module
  leaves absl's global flags alone)."""
  config_flags.DEFINE_config_file(
      "config", None, "Benchmark config file, e.g. configs/avmnist.py or "
      "configs/mimic.py:mortality.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Output folder: DIR/<stage>/seed_<s>, DIR/table.*")
  flags.DEFINE_integer("seeds", 3, "Number of seeds (config.seed, config.seed + 1, ...).")
  flags.DEFINE_enum("fusion", "lf", ["lf", "lrtf", "both"],
                    "AV-MNIST: the I2M2 joint expert comes from inter_lf (lf) or inter_lrtf "
                    "(lrtf), or both I2M2 variants run (both).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  table = reproduce(config_flags.get_config_filename(FLAGS["config"]),
                    config_flags.get_override_values(FLAGS["config"]), FLAGS.workdir,
                    FLAGS.seeds, FLAGS.fusion)
  print(table)
  print(f"Written: {os.path.join(FLAGS.workdir, 'table.md')}, table.csv, table.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
