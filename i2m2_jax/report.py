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


PERCENT_METRICS = ("accuracy", "ece", "auroc", "auprc", "vqa_score", "changes_prediction",
                   "fraction", "uni_product_accuracy")


def is_percent(metric: str) -> bool:
  """Whether a metric path shows in percent: accuracy-like leaves and each expert's own metric
  ('test/experts/joint')."""
  keys = metric.split("/")
  return keys[-1] in PERCENT_METRICS or (len(keys) > 1 and keys[-2] == "experts")


def format_cell(metric: str, mean: float, std: float) -> str:
  if math.isnan(mean):
    return "–"
  if is_percent(metric):
    return f"{100 * mean:.2f} ± {100 * std:.2f}"
  return f"{mean:.4f} ± {std:.4f}"


def format_mean(metric: str, mean: float) -> str:
  """A value alone, as format_cell shows its mean."""
  if math.isnan(mean):
    return "–"
  return f"{100 * mean:.2f}" if is_percent(metric) else f"{mean:.4f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table of text cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                   extra_columns: Mapping[str, Mapping[str, str]] | None = None,
                   headers: Mapping[str, str] | None = None) -> str:
  """Accuracy-like metrics in percent. `extra_columns` adds {column: {model: text}} (e.g. the
  paper's published numbers); `headers` names metric columns (default: the metric's path)."""
  extra_columns, headers = extra_columns or {}, headers or {}
  return markdown(
      ["model", "seeds", *(headers.get(m, m) for m in metrics), *extra_columns],
      [[row["model"], str(row["seeds"]), *(format_cell(m, *row[m]) for m in metrics),
        *(extra_columns[c].get(row["model"], "") for c in extra_columns)] for row in rows])


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


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


I2M2_COLOR = "#c44e52"  # I2M2 stands out in red; the others take these in turn
OTHER_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#8c8c8c", "#64b5cd")


def bar_chart(path: str, rows: Sequence[Mapping[str, Any]], metric: str, title: str) -> None:
  plt = _pyplot()
  scale = 100.0 if is_percent(metric) else 1.0
  means = [scale * row[metric][0] for row in rows]
  stds = [scale * row[metric][1] for row in rows]
  fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
  bars = ax.bar([row["model"] for row in rows], means, yerr=stds, capsize=4,
                color=[I2M2_COLOR if row["model"] == "i2m2" else OTHER_COLORS[0] for row in rows])
  ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=3)
  finite = [m for m in means if np.isfinite(m)]
  if finite and scale == 100.0:
    ax.set_ylim(max(0.0, min(finite) - 10.0), min(100.0, max(finite) + 8.0))
  ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def curves_chart(path: str, panels: Mapping[str, Mapping[str, tuple[Any, Any, Any]]], metric: str,
                 title: str, xlabel: str) -> None:
  """One panel per key of `panels`, each with one line per label: {panel: {label: (x, mean,
  std)}}, the std as a band."""
  plt = _pyplot()
  scale = 100.0 if is_percent(metric) else 1.0
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.2, 3.4), squeeze=False,
                           sharey=True)
  for ax, (panel, curves) in zip(axes[0], panels.items()):
    others = iter(OTHER_COLORS * len(curves))
    for label, (x, mean, std) in curves.items():
      mean, std = scale * np.asarray(mean), scale * np.asarray(std)
      color = I2M2_COLOR if label == "i2m2" else next(others)
      ax.plot(x, mean, marker="o", markersize=3, label=label, color=color,
              linewidth=2.2 if label == "i2m2" else 1.4)
      ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_title(panel, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
  axes[0][-1].legend(fontsize=8, loc="lower left")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
