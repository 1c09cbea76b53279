"""The grid of experiments/tune.py and `compare.py --tune`: per model kind, learning rate x weight
decay x encoder family, each point trained once (seed config.seed) in
DIR/tune/<model>/<point>/seed_<s>; the best on validation (the run's selection metric, in its
direction) is linked as DIR/<model>/seed_<s>, where compare.py reads its runs, and the grid is
tabulated in DIR/tune.md, .csv and .png (i2m2_jax/studies.py trains and tabulates).

Points are tried default first, then nearest the default first, until the time budget is spent
(each model kind always gets its default point); a point not tried is listed as skipped.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging

from i2m2_jax import models, studies, tasks

LEARNING_RATE_FACTORS = (1.0, 0.3, 3.0)   # times config.optimizer.learning_rate
WEIGHT_DECAY_FACTORS = (1.0, 0.3, 3.0)    # times config.optimizer.weight_decay
# Encoder families: every sequence and image flattened into the MLP head ('identity'), or read
# by the structured encoder of its rank (models.STRUCTURED_ENCODER_BY_RANK); vectors keep theirs.
ENCODER_FAMILIES = ("identity", "structured")
METRICS = ["val/accuracy", "test/accuracy", "best_step", "wall_s"]


@dataclasses.dataclass(frozen=True)
class Point:
  learning_rate: float
  weight_decay: float
  encoders: str  # config.model.encoders

  def label(self) -> str:
    encoders = self.encoders.replace("=", "-").replace(",", "+") or "default"
    return f"lr{self.learning_rate:g}_wd{self.weight_decay:g}_{encoders}"


def encoder_families(config, modalities: Mapping[str, Sequence[int]]) -> list[str]:
  """The distinct config.model.encoders values to try: the config's own first, then each of
  ENCODER_FAMILIES for the sequences and images that config.model.encoders leaves out."""
  own = models.config_mapping(config.model.get("encoders"), "config.model.encoders")

  def resolved(encoders: str) -> dict[str, str]:  # modality -> the encoder it gets
    model = config.model.copy_and_resolve_references()
    model.encoders = encoders
    return {m: models.encoder_name(model, m, s) for m, s in modalities.items()}

  out = [config.model.get("encoders", "")]
  for family in ENCODER_FAMILIES:
    chosen = dict(own)
    for m, shape in modalities.items():
      if m not in own and len(shape) in models.STRUCTURED_ENCODER_BY_RANK:
        chosen[m] = ("identity" if family == "identity"
                     else models.STRUCTURED_ENCODER_BY_RANK[len(shape)])
    value = ",".join(f"{m}={e}" for m, e in chosen.items())
    if all(resolved(value) != resolved(v) for v in out):
      out.append(value)
  return out


def grid(config, modalities: Mapping[str, Sequence[int]]) -> list[Point]:
  """Every point, the config's own first, then by how many factors differ from it."""
  opt = config.optimizer
  points = [Point(opt.learning_rate * lr, opt.weight_decay * wd, enc)
            for lr, wd, enc in itertools.product(LEARNING_RATE_FACTORS, WEIGHT_DECAY_FACTORS,
                                                 encoder_families(config, modalities))]
  own = points[0]
  distance = lambda p: sum(a != b for a, b in zip(dataclasses.astuple(p),  # noqa: E731
                                                  dataclasses.astuple(own)))
  return sorted(points, key=distance)  # stable: the product's order among equals


def point_config(config, point: Point):
  out = config.copy_and_resolve_references()
  out.optimizer.learning_rate = point.learning_rate
  out.optimizer.weight_decay = point.weight_decay
  out.model.encoders = point.encoders
  return out


def link_chosen(workdir: str, label: str, point_label: str, seed: int) -> None:
  """DIR/<label>/seed_<s> -> the chosen point's run (a link, replaced when tuning again)."""
  link = studies.run_dir(workdir, label, seed)
  target = studies.run_dir(os.path.join(workdir, "tune", label), point_label, seed)
  if os.path.lexists(link) and not os.path.islink(link):
    raise ValueError(f"{link} holds a run that was not tuned; tune into another --workdir.")
  os.makedirs(os.path.dirname(link), exist_ok=True)
  if os.path.lexists(link):
    os.remove(link)
  os.symlink(os.path.relpath(target, os.path.dirname(link)), link)


def _from_chosen(run: studies.Run, points: Sequence[Point], chosen: Mapping[str, studies.Run],
                 modalities: Mapping[str, Sequence[int]]):
  """A run that starts from others' checkpoints must read its inputs with their encoders: its
  points are learning rate x weight decay at the encoders chosen for its joint source (else its
  first source), and an expert whose source chose other encoders for its modality starts from
  scratch. Returns (points, init_from, a note of the experts left out or '')."""
  sources = {expert: chosen[label] for expert, label in run.init_from.items()}
  lead = sources.get(models.JOINT) or next(iter(sources.values()))
  encoders = lead.config.model.get("encoders", "")
  own = points[0].encoders
  points = [dataclasses.replace(p, encoders=encoders) for p in points if p.encoders == own]
  target = run.config.model.copy_and_resolve_references()
  target.encoders = encoders

  def reads_alike(expert, source):
    return all(models.encoder_name(source.config.model, m, shape)
               == models.encoder_name(target, m, shape)
               for m, shape in modalities.items() if expert in (models.JOINT,
                                                                 models.uni_expert_name(m)))
  kept = {e: run.init_from[e] for e, source in sources.items() if reads_alike(e, source)}
  left = sorted(set(run.init_from) - set(kept))
  note = (f"{', '.join(left)} from scratch: their chosen runs read the inputs with other encoders "
          f"than {encoders or 'the defaults'}" if left else "")
  return points, kept, note


def tune(runs: Sequence[studies.Run], workdir: str, dataset,
         budget_s: float) -> dict[str, studies.Run]:
  """Tunes each run's config in dependency order (a run that initialises from others starts from
  their chosen points), links each chosen point as DIR/<label>/seed_<s>, writes DIR/tune.md,
  .csv and .png, and returns {label: the run with its chosen config}."""
  deadline = time.monotonic() + budget_s
  chosen: dict[str, studies.Run] = {}
  results: dict[str, list[dict[str, Any]]] = {}
  marks: dict[str, str] = {}
  for run in studies.dependency_order(runs):
    seed = run.config.seed
    better = tasks.build_task(run.config.get("task"), dataset).direction(
        run.config.get("selection_metric", "")) == tasks.MAX
    anchors = [chosen[label] for label in sorted(set(run.init_from.values()))]
    points, init_from = grid(run.config, dataset.modalities), run.init_from
    if init_from:
      points, init_from, note = _from_chosen(run, points, chosen, dataset.modalities)
      if note:
        marks[f"{run.label} (all points)"] = note
    best = None
    for i, point in enumerate(points):
      row = f"{run.label} {point.label()}"
      if i and time.monotonic() > deadline:
        marks[row] = "skipped (time budget)"
        continue
      candidate = studies.Run(f"tune/{run.label}/{point.label()}",
                              point_config(run.config, point), init_from)
      result = studies.run_study([*anchors, candidate], workdir, [seed],
                                 dataset)[candidate.label][0]
      results[row] = [result]
      value = float(result["val"][result["selection_metric"]])
      if best is None or (value > best[0] if better else value < best[0]):
        best = (value, row, point, candidate.config)
    value, row, point, config = best
    marks[row] = "chosen"
    link_chosen(workdir, run.label, point.label(), seed)
    chosen[run.label] = dataclasses.replace(run, config=config, init_from=init_from)
    logging.info("Tuning %s: chose %s (validation %.4f).", run.label, point.label(), value)
  studies.write_table(workdir, studies.Table(
      name="tune", title="Tuning grid: one run per point, chosen on validation",
      intro=f"Learning rate x weight decay x encoders per model kind "
            f"(experiments/recipes/tuning.py), the config's own point first, within a budget of "
            f"{budget_s:.0f} s. Each chosen run is linked as DIR/<model>/seed_<s>."
            + "".join(f"\n- {row}: {mark}" for row, mark in marks.items()
                      if mark != "chosen"),
      metrics=METRICS, chart_metric="val/accuracy",
      extra_columns={"chosen": {row: "yes" for row, m in marks.items() if m == "chosen"}}),
      results)
  return chosen
