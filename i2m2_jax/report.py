"""Tables and charts over several runs: mean ± std per model and metric, as Markdown, CSV, PNG.

Used by experiments/compare.py and experiments/reproduce.py. A run is its results.json dict.
"""
from __future__ import annotations

import csv
import math
from typing import Any, Mapping, Sequence

import numpy as np

Runs = Mapping[str, Sequence[Mapping[str, Any]]]  # row label -> the results.json of each seed


def metric_value(result: Mapping[str, Any], metric: str) -> float:
  """A value by path, e.g. 'test/accuracy' or 'test/experts/joint'; NaN where absent."""
  node: Any = result
  for key in metric.split("/"):
    if not isinstance(node, Mapping) or key not in node or node[key] is None:
      return math.nan
    node = node[key]
  return float(node)


def summarize_runs(runs: Runs, metrics: Sequence[str]) -> list[dict[str, Any]]:
  """One row per label: for each metric the mean, the std over seeds (ddof=1; 0 for one seed)
  and the number of seeds that had it."""
  rows = []
  for label, results in runs.items():
    row: dict[str, Any] = {"model": label, "seeds": len(results)}
    for metric in metrics:
      values = np.array([metric_value(r, metric) for r in results], np.float64)
      values = values[np.isfinite(values)]
      row[metric] = (float(values.mean()) if values.size else math.nan,
                     float(values.std(ddof=1)) if values.size > 1 else 0.0)
    rows.append(row)
  return rows


def _percent(metric: str) -> bool:
  return (metric.split("/")[-1] in ("accuracy", "ece", "auroc", "auprc", "vqa_score")
          or "/experts/" in metric)


def format_cell(metric: str, mean: float, std: float) -> str:
  if math.isnan(mean):
    return "–"
  if _percent(metric):
    return f"{100 * mean:.2f} ± {100 * std:.2f}"
  return f"{mean:.4f} ± {std:.4f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                   extra_columns: Mapping[str, Mapping[str, str]] | None = None) -> str:
  """Accuracy-like metrics in percent. `extra_columns` adds {column: {model: text}} (e.g. the
  paper's published numbers)."""
  extra_columns = extra_columns or {}
  header = ["model", "seeds", *metrics, *extra_columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["model"], str(row["seeds"])]
    cells += [format_cell(m, *row[m]) for m in metrics]
    cells += [extra_columns[c].get(row["model"], "") for c in extra_columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
              extra_columns: Mapping[str, Mapping[str, str]] | None = None) -> None:
  """One row per model: mean and std of each metric (fractions, not percent), then the
  `extra_columns` texts as in `markdown_table`."""
  extra_columns = extra_columns or {}
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["model", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
                    + list(extra_columns))
    for row in rows:
      writer.writerow([row["model"], row["seeds"]] + [v for m in metrics for v in row[m]]
                      + [extra_columns[c].get(row["model"], "") for c in extra_columns])


def bar_chart(path: str, rows: Sequence[Mapping[str, Any]], metric: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  scale = 100.0 if _percent(metric) else 1.0
  means = [scale * row[metric][0] for row in rows]
  stds = [scale * row[metric][1] for row in rows]
  fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
  bars = ax.bar([row["model"] for row in rows], means, yerr=stds, capsize=4,
                color=["#c44e52" if row["model"] == "i2m2" else "#4c72b0" for row in rows])
  ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=3)
  finite = [m for m in means if np.isfinite(m)]
  if finite and scale == 100.0:
    ax.set_ylim(max(0.0, min(finite) - 10.0), min(100.0, max(finite) + 8.0))
  ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
