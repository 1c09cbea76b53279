r"""Reproduces a paper benchmark end to end: every stage of its recipe for several seeds, one table.

  python experiments/reproduce.py --config configs/avmnist.py --workdir runs/avmnist --seeds 3 \
      --config.data.manual_dir=/path/to/avmnist
  python experiments/reproduce.py --config configs/mimic.py:icd9_140_239 --workdir runs/icd9_1 \
      --seeds 3 --config.data.manual_dir=/path/to/folder_with_im.pk
  python experiments/reproduce.py --config configs/vqa_vs.py --workdir runs/vqa_vs --seeds 3 \
      --config.data.manual_dir=/path/to/vqa_vs_with_features   # also configs/nlvr2.py

The benchmark's recipe (experiments/recipes/<data set>.py, found by config.data.name) names the
stages, which experts each initialises from which other stage, the table's rows and columns and
the published numbers; the config file's `get_config('<stage>,...')` builds each stage's config.
Every stage trains for every seed s (config.seed, +1, ...) in DIR/<stage>/seed_<s> with
config.seed = s (i2m2_jax/studies.py), a staged one after the stages it loads, with
config.model.init_from pointing at their best checkpoints *of the same seed* (AV-MNIST: intra
from uni_image + uni_audio; i2m2 from those two + inter_lf, or inter_lrtf with --fusion=lrtf;
--fusion=both runs both I2M2 variants, rows i2m2 and i2m2_lrtf). A stage whose
DIR/<stage>/seed_<s>/results.json exists is read back, not trained (its checkpoints exist); an
unfinished one resumes from its own latest checkpoint. The data set is loaded once and shared.

Other tokens of the config argument (e.g. 'smoke', the MIMIC task) and every --config.xxx=...
override apply to every stage; a stage token in --config is ignored (all stages run), and an
override naming a field a stage's config lacks (e.g. model.fusion_kwargs.rank outside the LRTF
stages) is skipped for that stage. config.model.init_from is set here, per stage.

Writes DIR/table.md, DIR/table.csv and DIR/table.png and prints the table: one row per model
(the recipe's rows), the recipe's test metrics (accuracy and ECE; AUROC and AUPRC too for the
MIMIC ICD-9 tasks; VQA-VS: the VQA score on the IID test set, each OOD set and their mean) as
mean ± std over seeds (std with ddof=1), the published I2M2 number beside ours where known (a
third-party extraction of Madaan et al., NeurIPS 2024, arXiv 2405.17613, not verified), and the
score of each expert inside the product models (intra, i2m2); and DIR/missing_modality.md, each
stage's test metric with each modality missing. With --robustness every stage is also evaluated
with each modality corrupted at noise levels 0.0 .. 1.0 (i2m2_jax/robustness.py; the corruption
by rank, except where the recipe says otherwise, as MIMIC's tabular static features'
feature_drop, or --robustness_kinds; the effective robustness is against the late-fusion stage,
inter_lf or inter): DIR/robustness.md and DIR/robustness.png.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import recipes  # noqa: E402
from i2m2_jax import studies  # noqa: E402
from i2m2_jax.datasets import load_dataset  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

PRODUCT_KINDS = ("intra", "i2m2")  # models whose per-expert accuracies the table shows
PUBLISHED_COLUMN = "published I2M2 (arXiv 2405.17613, third-party extraction, unverified)"


# ---------------------------------------------------------------------------------------------
# Stage configs


def load_config_module(path: str):
  """The config file as a module."""
  spec = importlib.util.spec_from_file_location(
      "reproduce_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
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


def build_config(module, tokens: Sequence[str], overrides: Mapping[str, Any]):
  """get_config('<tokens>') plus the command-line overrides naming fields it has."""
  config = module.get_config(",".join(tokens))
  for dotted, value in overrides.items():
    if not _set_if_present(config, dotted, value):
      logging.info("%s has no field %s; override not applied there.", ",".join(tokens), dotted)
  return config


def stage_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The command-line overrides every stage gets: all but model.init_from, set here per stage."""
  if "model.init_from" in overrides:
    logging.warning("--config.model.init_from is ignored: reproduce.py sets it per stage.")
  return {k: v for k, v in overrides.items() if k != "model.init_from"}


def stage_config(module, recipe: recipes.Recipe, stage: str, tokens: Sequence[str],
                 overrides: Mapping[str, Any]):
  """The config of one stage: the --config tokens with `stage` instead of theirs."""
  return build_config(module, [stage] + [t for t in tokens if t not in recipe.stages], overrides)


def study_runs(module, recipe: recipes.Recipe, tokens: Sequence[str],
               overrides: Mapping[str, Any], fusion: str) -> list[studies.Run]:
  return [studies.Run(stage, stage_config(module, recipe, stage, tokens, overrides),
                      recipe.stages[stage])
          for stage in recipe.stages_for(fusion)]


# ---------------------------------------------------------------------------------------------
# The table


def table(recipe: recipes.Recipe, runs: studies.Runs, config, seeds: int) -> studies.Table:
  """The recipe's metrics, then the experts inside the product models (shown for those rows
  only: for the others the single expert is the model itself)."""
  products = [label for label, results in runs.items()
              if any(r.get("model") in PRODUCT_KINDS for r in results)]
  experts = [f"test/experts/{e}"
             for e in sorted(studies.experts_in(runs, products), key=studies.uni_first)]
  task = config.data.get("task", "")
  title = f"{config.data.name}{f' ({task})' if task else ''}: mean ± std over {seeds} seed(s)"
  intro = (
      f"Test metrics of the checkpoint with the best validation {config.selection_metric}, in "
      f"percent. Rows: uni-modal experts alone (uni_*), their product (intra), the joint models "
      f"(inter*), and I2M2 (product of the uni-modal experts and the joint one). "
      f"test/experts/* are the scores of the experts inside the product models, each by the "
      f"task's main metric. The published column is a third-party extraction of the paper "
      f"(Madaan et al., NeurIPS 2024, arXiv 2405.17613), not verified. {recipe.notes}")
  return studies.Table(
      name="table", title=title, intro=intro, metrics=[*recipe.metrics, *experts],
      chart_metric=recipe.chart_metric, rows=recipe.rows,
      shown_for={metric: products for metric in experts},
      extra_columns={PUBLISHED_COLUMN: recipe.published})


def reproduce(config_filename: str, overrides: Mapping[str, Any], workdir: str, seeds: int,
              fusion: str = "lf", *, robustness: bool = False, robustness_kinds: str = "") -> str:
  """Runs every stage and writes the table and DIR/missing_modality.md (with `robustness`,
  DIR/robustness.md and .png too); returns the Markdown table."""
  overrides = stage_overrides(overrides)
  path, tokens = split_config_argument(config_filename)
  module = load_config_module(path)
  config = build_config(module, tokens, overrides)
  recipe = recipes.for_config(config)
  os.makedirs(workdir, exist_ok=True)
  dataset = load_dataset(config.data)
  study = study_runs(module, recipe, tokens, overrides, fusion)
  seed_list = range(config.seed, config.seed + seeds)
  runs = studies.run_study(study, workdir, seed_list, dataset)
  _, markdown = studies.write_table(workdir, table(recipe, runs, config, seeds), runs)
  kinds = ",".join(k for k in (recipe.robustness_kinds, robustness_kinds) if k)  # later wins
  studies.write_modality_reports(workdir, study, runs, seed_list, dataset, robustness=robustness,
                                 kinds=kinds)
  return markdown


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
  flags.DEFINE_bool("robustness", False, "Also evaluate every stage with each modality "
                    "corrupted at noise levels 0.0 .. 1.0: DIR/robustness.md and .png.")
  flags.DEFINE_string("robustness_kinds", "", "modality=kind,... overriding the corruption "
                      "chosen by rank (gaussian, salt_pepper, time_drop, feature_drop).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  table_text = reproduce(config_flags.get_config_filename(FLAGS["config"]),
                         config_flags.get_override_values(FLAGS["config"]), FLAGS.workdir,
                         FLAGS.seeds, FLAGS.fusion, robustness=FLAGS.robustness,
                         robustness_kinds=FLAGS.robustness_kinds)
  print(table_text)
  print(f"Written: {os.path.join(FLAGS.workdir, 'table.md')}, table.csv, table.png, "
        f"missing_modality.md{', robustness.md, robustness.png' if FLAGS.robustness else ''}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
