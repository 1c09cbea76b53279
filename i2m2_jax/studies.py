"""Studies: several runs over several seeds, trained in dependency order, tabulated together.

A study is a list of `Run`s: a label, a config and the experts the run initialises from other
runs' best checkpoints. `run_study` trains every run for every seed s in DIR/<label>/seed_<s>,
all on one loaded data set, each run after the runs it initialises from, whose checkpoints of
the same seed it loads (config.model.init_from). A run whose results.json exists is read back
instead of trained; an unfinished one resumes from its own checkpoint. `write_table` writes what
a `Table` says to show of the results as DIR/<name>.md, .csv and .png;
`write_missing_modality` the test metric of every run with each modality missing
(DIR/missing_modality.md). `run_robustness` evaluates every finished run's best checkpoint with
one modality corrupted at noise levels 0.0 .. 1.0 (i2m2_jax/robustness.py; kept in
DIR/<label>/seed_<s>/robustness.json), and `write_robustness` tabulates and plots the curves
(DIR/robustness.md and .png).

What to run and tabulate (every model kind, a paper benchmark's stages) is in
experiments/recipes/; experiments/compare.py, quickstart.py, reproduce.py and precision.py run
it through here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Collection, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from i2m2_jax import inference, input_pipeline, report, robustness, tasks, train_lib, writers

Runs = report.Runs  # label -> the results.json of each seed


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a study, trained once per seed with config.seed set to that seed."""
  label: str
  config: ml_collections.ConfigDict
  # expert -> label of the run whose best checkpoint (same seed) initialises it. When empty,
  # config.model.init_from is left as the config has it.
  init_from: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Table:
  """What `write_table` shows of a study's results."""
  name: str                # the files DIR/<name>.md, .csv and .png
  title: str
  intro: str               # Markdown between the title and the table
  metrics: Sequence[str]   # the columns: paths into results.json, as report.metric_value reads
  chart_metric: str        # the bar chart's metric
  rows: Sequence[str] = ()  # these labels first, in this order; the others after, in run order
  # metric -> the only rows that show it (e.g. the experts inside product models)
  shown_for: Mapping[str, Collection[str]] = dataclasses.field(default_factory=dict)
  # column after the metrics -> {row: text} (e.g. the paper's published numbers)
  extra_columns: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
  # metric -> its column's header in the Markdown table (default: the metric's path)
  headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.chart_metric not in self.metrics:
      raise ValueError(f"The chart's metric {self.chart_metric} is not a column {self.metrics}.")


def enable_compilation_cache(workdir: str) -> None:
  """Runs of the same model differ only in values, so their XLA programs compile once and are
  read back from DIR/.xla_cache (unless JAX_COMPILATION_CACHE_DIR already names a cache)."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def prepare_workdir(workdir: str) -> None:
  """What every study script does first: the folder, the compilation cache, quiet logs."""
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(workdir)
  writers.quiet_library_logs()


# ---------------------------------------------------------------------------------------------
# Running


def run_dir(workdir: str, label: str, seed: int) -> str:
  return os.path.join(workdir, label, f"seed_{seed}")


def dependency_order(runs: Sequence[Run]) -> list[Run]:
  """The runs in the given order, except that each comes after the runs it initialises from."""
  labels = [run.label for run in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"A study's labels must differ; got {labels}.")
  for run in runs:
    unknown = sorted(set(run.init_from.values()) - set(labels))
    if unknown:
      raise ValueError(f"Run {run.label} initialises from {unknown}, which the study lacks.")
  ordered, done = [], set()
  while len(ordered) < len(runs):
    ready = [r for r in runs if r.label not in done and set(r.init_from.values()) <= done]
    if not ready:
      raise ValueError(f"Runs {sorted(set(labels) - done)} initialise from each other.")
    ordered.append(ready[0])
    done.add(ready[0].label)
  return ordered


def seed_config(run: Run, workdir: str, seed: int) -> ml_collections.ConfigDict:
  """The run's config for one seed, its experts loaded from the runs of that seed."""
  config = run.config.copy_and_resolve_references()
  config.seed = seed
  if run.init_from:
    config.model.init_from = ",".join(
        f"{expert}={os.path.abspath(run_dir(workdir, source, seed))}"
        for expert, source in run.init_from.items())
  return config


def train_or_read(config, directory: str, dataset) -> dict[str, Any]:
  """The results.json of a finished run in `directory`, else the results of training it there
  (an unfinished run resumes from its checkpoint)."""
  results_path = os.path.join(directory, "results.json")
  if os.path.exists(results_path):
    logging.info("%s: finished already; read back.", directory)
    with open(results_path) as f:
      return json.load(f)
  logging.info("Training %s (seed %d) in %s%s", config.model.kind, config.seed, directory,
               f" (init_from {config.model.init_from})" if config.model.init_from else "")
  start = time.perf_counter()
  results = train_lib.train_and_evaluate(config, directory, dataset=dataset)
  logging.info("%s: finished in %.0f s.", directory, time.perf_counter() - start)
  return results


I2M2_INITS = ("scratch", "experts")  # config.model.i2m2_init


def train_i2m2(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.model.kind as train_lib.train_and_evaluate does, except that I2M2 with
  config.model.i2m2_init='experts' (and no init_from of its own) follows the paper's staged
  recipe in one workdir: each uni-modal expert alone (kind uni) and the joint one (kind inter)
  in DIR/experts/<uni_m | inter>, read back or resumed as any study run, then I2M2 in DIR with
  its experts initialised from their best checkpoints and fine-tuned."""
  if config.model.get("i2m2_init", "scratch") not in I2M2_INITS:
    raise ValueError(f"config.model.i2m2_init={config.model.i2m2_init!r} is unknown; expected "
                     f"one of {list(I2M2_INITS)}.")
  if (config.model.kind != "i2m2" or config.model.get("i2m2_init") != "experts"
      or config.model.init_from):
    return train_lib.train_and_evaluate(config, workdir)
  from i2m2_jax.datasets import load_dataset  # pylint: disable=g-import-not-at-top
  from i2m2_jax.models import JOINT, uni_expert_name  # pylint: disable=g-import-not-at-top
  dataset = load_dataset(config.data)
  stages = {uni_expert_name(m): ("uni", m) for m in dataset.modalities} | {JOINT: ("inter", "")}
  init_from = []
  for expert, (kind, modality) in stages.items():
    stage = config.copy_and_resolve_references()
    stage.model.kind, stage.model.modality = kind, modality
    directory = os.path.abspath(os.path.join(workdir, "experts", expert if modality else kind))
    train_or_read(stage, directory, dataset)
    init_from.append(f"{expert}={directory}")
  config = config.copy_and_resolve_references()
  config.model.init_from = ",".join(init_from)
  return train_lib.train_and_evaluate(config, workdir, dataset=dataset)


def run_study(runs: Sequence[Run], workdir: str, seeds: Sequence[int],
              dataset) -> dict[str, list[dict[str, Any]]]:
  """Trains (or reads back) every run for every seed, all on `dataset`, in dependency order.
  Returns {label: [results.json of each seed]} in the order of `runs`."""
  results: dict[str, list[dict[str, Any]]] = {run.label: [] for run in runs}
  for run in dependency_order(runs):
    for seed in seeds:
      results[run.label].append(train_or_read(seed_config(run, workdir, seed),
                                               run_dir(workdir, run.label, seed), dataset))
  return results


# ---------------------------------------------------------------------------------------------
# The table


def uni_first(expert: str) -> tuple[bool, str]:
  """Sort key of expert names: the uni-modal experts (by name), then the joint one."""
  return expert == "joint", expert


def experts_in(runs: Runs, labels: Collection[str]) -> set[str]:
  """The experts whose test metrics the results of these rows report."""
  return {expert for label in labels for result in runs.get(label, ())
          for expert in result["test"].get("experts", {})}


def summarize(table: Table, runs: Runs) -> list[dict[str, Any]]:
  """report.summarize_runs in the table's row order, with its metrics, blank where not shown."""
  order = [r for r in table.rows if r in runs] + [r for r in runs if r not in table.rows]
  rows = report.summarize_runs({r: runs[r] for r in order}, table.metrics)
  for row in rows:
    for metric, shown in table.shown_for.items():
      if row["model"] not in shown:
        row[metric] = (math.nan, 0.0)
  return rows


def write_table(workdir: str, table: Table, runs: Runs) -> tuple[list[dict[str, Any]], str]:
  """Writes DIR/<name>.md (title, intro, table), .csv and .png (the chart metric); returns the
  rows and the Markdown table."""
  rows = summarize(table, runs)
  markdown = report.markdown_table(rows, table.metrics, extra_columns=table.extra_columns,
                                   headers=table.headers)
  path = os.path.join(workdir, table.name)
  with open(path + ".md", "w") as f:
    f.write(f"# {table.title}\n\n{table.intro}\n\n{markdown}")
  report.write_csv(path + ".csv", rows, table.metrics, extra_columns=table.extra_columns)
  report.bar_chart(path + ".png", rows, table.chart_metric, table.title)
  return rows, markdown


# ---------------------------------------------------------------------------------------------
# Modalities: missing, and under noise

ROBUSTNESS_NAME = "robustness.json"


def main_metric(runs: Runs) -> str:
  """The headline metric of the runs' task (accuracy, auroc or vqa_score)."""
  return tasks.MAIN_METRICS[next(r for results in runs.values() for r in results)["task"]]


def write_missing_modality(workdir: str, runs: Runs, modalities: Sequence[str],
                           title: str) -> str:
  """DIR/missing_modality.md: a row per run, the test metric with every modality and then
  without each one (results.json's missing_modality); returns the Markdown table."""
  metric = main_metric(runs)
  columns = [f"test/{metric}"] + [f"missing_modality/{m}/{metric}" for m in modalities]
  headers = {columns[0]: "all modalities",
             **{c: f"without {m}" for c, m in zip(columns[1:], modalities)}}
  markdown = report.markdown_table(report.summarize_runs(runs, columns), columns,
                                   headers=headers)
  with open(os.path.join(workdir, "missing_modality.md"), "w") as f:
    f.write(f"# {title}\n\nTest {metric} (mean ± std over seeds) with every modality, and with "
            f"each one missing: the product of the experts that do not read it (for i2m2 the "
            f"other modalities' uni-modal experts). –: the model cannot predict without it "
            f"(inter, or uni on that modality).\n\n{markdown}")
  return markdown


def late_fusion_baseline(runs: Sequence[Run]) -> str | None:
  """The label of the first late-fusion joint model (MultiBench's LF, the baseline of effective
  robustness), if the study has one."""
  return next((r.label for r in runs if r.config.model.kind == "inter"
               and r.config.model.get("fusion", "late_fusion") == "late_fusion"), None)


def robustness_or_read(directory: str, source, *, kinds: Mapping[str, str], seed: int,
                       scales: Mapping[str, robustness.NoiseScale]) -> dict[str, Any]:
  """The run's robustness.json when it holds these kinds, seed and levels; else the curves of
  its best checkpoint on `source`, written there."""
  path = os.path.join(directory, ROBUSTNESS_NAME)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if (stored["seed"] == seed and stored["levels"] == list(robustness.LEVELS)
        and {m: c["kind"] for m, c in stored["modalities"].items()} == dict(kinds)):
      return stored
  logging.info("%s: robustness to noise (%s).", directory, kinds)
  result = robustness.evaluate_robustness(inference.load_run(directory), source, kinds=kinds,
                                          seed=seed, scales=scales)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  return result


def run_robustness(runs: Sequence[Run], workdir: str, seeds: Sequence[int], dataset,
                   kinds: Any = "", seed: int = 0) -> dict[str, list[dict[str, Any]]]:
  """Every (finished) run's curves on the test split, the same noise for all: {label: [the
  robustness.json of each seed]}. `kinds`: robustness.noise_kinds overrides."""
  source = input_pipeline.in_memory(dataset.sources["test"], 4.0, f"{dataset.name}/test")
  dtypes = inference.stored_dtypes(dataset, "test")
  kinds = robustness.noise_kinds(kinds, {m: (shape, dtypes[m])
                                         for m, shape in dataset.modalities.items()})
  scales = {m: robustness.noise_scale(source, m) for m in kinds}
  return {run.label: [robustness_or_read(run_dir(workdir, run.label, s), source, kinds=kinds,
                                         seed=seed, scales=scales) for s in seeds]
          for run in runs}


def write_robustness(workdir: str, curves: Mapping[str, Sequence[Mapping[str, Any]]],
                     baseline: str | None, title: str) -> str:
  """DIR/robustness.md (per modality, a row per label: the metric at each noise level, the area
  under the curve, MultiBench's relative and effective robustness) and DIR/robustness.png (per
  modality, a curve per label); returns the Markdown."""
  first = next(r for results in curves.values() for r in results)
  metric, levels = first["metric"], first["levels"]
  points = 100.0 if report.is_percent(metric) else 1.0
  sections, panels = [], {}
  for m, curve in first["modalities"].items():
    values = {label: np.array([r["modalities"][m]["values"] for r in results])
              for label, results in curves.items()}
    means = {label: v.mean(0) for label, v in values.items()}
    relative = robustness.relative_robustness(
        {label: robustness.area_under_curve(levels, mean) for label, mean in means.items()})
    rows = []
    for label, v in values.items():
      aucs = np.array([r["modalities"][m]["auc"] for r in curves[label]])
      effective = (robustness.effective_robustness(means[label], means[baseline])
                   if baseline in means else math.nan)
      rows.append([label, str(len(v)), *(report.format_mean(metric, x) for x in means[label]),
                   report.format_cell(metric, aucs.mean(), aucs.std(ddof=1) if len(v) > 1 else 0),
                   "–" if math.isnan(relative[label]) else f"{relative[label]:.2f}",
                   "–" if math.isnan(effective) else f"{points * effective:+.2f}"])
    header = ["model", "seeds", *(f"{x:.1f}" for x in levels), "AUC", "relative", "effective"]
    sections.append(f"## Noise on `{m}` ({curve['kind']})\n\n" + report.markdown(header, rows))
    panels[f"noise on {m} ({curve['kind']})"] = {
        label: (levels, v.mean(0), v.std(0, ddof=1) if len(v) > 1 else np.zeros(len(levels)))
        for label, v in values.items()}
  unit = " (percentage points)" if points == 100.0 else ""
  intro = (
      f"Test {metric} of each model's best checkpoint with one modality corrupted at noise "
      f"levels {levels[0]:.1f} to {levels[-1]:.1f}, the same noise for every model (mean over "
      f"seeds; i2m2_jax/robustness.py, MultiBench's protocol). AUC: the area under the curve, "
      f"mean ± std over seeds (MultiBench's relative robustness before normalisation). "
      f"relative: the AUC of the mean curve min-max normalised over these models (1: the most "
      f"robust). effective: MultiBench's effective robustness against the late-fusion joint "
      f"model ({baseline or 'absent here'}), the sum over levels of the model's change from "
      f"level 0 minus the baseline's{unit}; positive: it loses less.")
  text = f"# {title}\n\n{intro}\n\n" + "\n".join(sections)
  with open(os.path.join(workdir, "robustness.md"), "w") as f:
    f.write(text)
  report.curves_chart(os.path.join(workdir, "robustness.png"), panels, metric, title,
                      xlabel="noise level")
  return text


def write_modality_reports(workdir: str, study: Sequence[Run], runs: Runs, seeds: Sequence[int],
                           dataset, *, robustness: bool = False, kinds: Any = "") -> None:
  """DIR/missing_modality.md of a study's results and, with `robustness`, the noise curves of
  its runs (run_robustness; effective robustness against its late-fusion run):
  DIR/robustness.md and .png."""
  title = f"{dataset.name}: mean over {len(seeds)} seed(s)"
  write_missing_modality(workdir, runs, list(dataset.modalities), title)
  if robustness:
    write_robustness(workdir, run_robustness(study, workdir, seeds, dataset, kinds),
                     late_fusion_baseline(study), title)
