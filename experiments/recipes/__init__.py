"""What experiments/reproduce.py runs and tabulates for each of the paper's benchmarks.

A benchmark's module here is named after its data set (config.data.name: avmnist.py, mimic.py,
vqa_vs.py, nlvr2.py)
and listed in BENCHMARKS; its `recipe(config) -> Recipe` is given the benchmark's config (e.g.
the MIMIC task picks the table's columns and published numbers). A recipe holds what is not a
hyper-parameter: the stage graph, which stages --fusion runs, the table's rows, metrics and
chart, and the published numbers. Each stage's hyper-parameters stay in the config file
(configs/<name>.py), whose get_config('<stage>,...') builds it.

comparison.py is the study of experiments/compare.py and quickstart.py: every model kind on one
data set.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Recipe:
  # stage -> {expert of its model: the stage whose best checkpoint (same seed) initialises it}
  stages: Mapping[str, Mapping[str, str]]
  fusions: Mapping[str, Sequence[str]]  # --fusion value -> the stages it runs
  rows: Sequence[str]                   # the table's rows, in order
  # The table's metric columns, paths into results.json (report.metric_value); reproduce.py adds
  # the test metrics of the experts inside the product models after them.
  metrics: Sequence[str]
  chart_metric: str                     # one of metrics, for DIR/table.png
  published: Mapping[str, str]          # row -> the paper's number, as the table shows it
  # What the table's intro says about the metrics and the deviations from the official code.
  notes: str = ("Deviations from the reference code (divyam3897/I2M2: avmnist_and_mimic/): "
                "BatchNorm in eval mode at test, trained LRTF factors, intra tested as a product "
                "(README: Where we differ from the official code).")
  # --robustness: corruptions other than the defaults by rank ('modality=kind,...'), before
  # those of --robustness_kinds
  robustness_kinds: str = ""

  def stages_for(self, fusion: str) -> list[str]:
    if fusion not in self.fusions:
      raise ValueError(f"--fusion={fusion!r}: this benchmark has {list(self.fusions)}.")
    return list(self.fusions[fusion])


BENCHMARKS = ("avmnist", "mimic", "vqa_vs", "nlvr2")  # data set names, each a module here


def for_config(config) -> Recipe:
  name = config.data.name
  if name not in BENCHMARKS:
    raise ValueError(f"No benchmark recipe for data set {name!r}: experiments/reproduce.py "
                     f"knows {list(BENCHMARKS)} (experiments/recipes/).")
  return importlib.import_module(f"{__name__}.{name}").recipe(config)
