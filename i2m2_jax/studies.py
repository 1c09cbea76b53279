"""Studies: several runs over several seeds, trained in dependency order, tabulated together.

A study is a list of `Run`s: a label, a config and the experts the run initialises from other
runs' best checkpoints. `run_study` trains every run for every seed s in DIR/<label>/seed_<s>,
all on one loaded data set, each run after the runs it initialises from, whose checkpoints of
the same seed it loads (config.model.init_from). A run whose results.json exists is read back
instead of trained; an unfinished one resumes from its own checkpoint. `write_table` writes what
a `Table` says to show of the results as DIR/<name>.md, .csv and .png.

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

from i2m2_jax import report, train_lib, writers

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
  markdown = report.markdown_table(rows, table.metrics, extra_columns=table.extra_columns)
  path = os.path.join(workdir, table.name)
  with open(path + ".md", "w") as f:
    f.write(f"# {table.title}\n\n{table.intro}\n\n{markdown}")
  report.write_csv(path + ".csv", rows, table.metrics, extra_columns=table.extra_columns)
  report.bar_chart(path + ".png", rows, table.chart_metric, table.title)
  return rows, markdown
