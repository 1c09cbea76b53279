"""i2m2_jax/studies.py: dependency order, skip and resume, init_from per seed, the table.

Training is replaced by a fake that records its calls and writes results.json, so these tests
check the orchestration alone (test_experiments.py and test_reproduce.py train for real)."""
import csv
import math
import os

import ml_collections
import pytest

import helpers
from i2m2_jax import studies


def config(kind="uni"):
  return ml_collections.ConfigDict(
      {"seed": 0, "model": {"kind": kind, "init_from": "from the command line"}})


def graph():
  """Given out of order: i2m2 needs both unis and inter; intra needs the unis."""
  return [studies.Run("i2m2", config("i2m2"), {"uni_a": "uni_a", "uni_b": "uni_b",
                                               "joint": "inter"}),
          studies.Run("uni_a", config()),
          studies.Run("intra", config("intra"), {"uni_a": "uni_a", "uni_b": "uni_b"}),
          studies.Run("uni_b", config()),
          studies.Run("inter", config("inter"))]


DATASET = "the data set"


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces training: records (run dir, seed, init_from) and writes results.json."""
  return helpers.fake_training(monkeypatch, lambda cfg: {
      "model": cfg.model.kind, "seed": cfg.seed,
      "test": {"accuracy": 0.5 + 0.1 * cfg.seed, "experts": {"joint": 0.25}}}, DATASET)


def test_dependency_order_puts_each_run_after_its_sources():
  order = [run.label for run in studies.dependency_order(graph())]
  assert order == ["uni_a", "uni_b", "intra", "inter", "i2m2"]
  with pytest.raises(ValueError, match="lacks"):
    studies.dependency_order([studies.Run("i2m2", config(), {"joint": "inter"})])
  with pytest.raises(ValueError, match="each other"):
    studies.dependency_order([studies.Run("a", config(), {"x": "b"}),
                              studies.Run("b", config(), {"x": "a"})])
  with pytest.raises(ValueError, match="must differ"):
    studies.dependency_order([studies.Run("a", config()), studies.Run("a", config())])


def test_run_study_trains_in_order_with_same_seed_sources_then_reads_back(
    tmp_path, monkeypatch, fake_training):
  monkeypatch.chdir(tmp_path)
  results = studies.run_study(graph(), "study", [3, 4], DATASET)
  assert list(results) == ["i2m2", "uni_a", "intra", "uni_b", "inter"]  # the given order
  assert [r["seed"] for r in results["i2m2"]] == [3, 4]
  trained = [(d, s) for d, s, _ in fake_training]
  assert trained == [(f"study/{label}/seed_{seed}", seed)
                     for label in ("uni_a", "uni_b", "intra", "inter", "i2m2") for seed in (3, 4)]
  init_from = {(d, s): i for d, s, i in fake_training}
  assert init_from[("study/i2m2/seed_4", 4)] == ",".join(
      f"{e}={tmp_path}/study/{source}/seed_4"
      for e, source in (("uni_a", "uni_a"), ("uni_b", "uni_b"), ("joint", "inter")))
  # A run that loads nothing keeps the config's own init_from.
  assert init_from[("study/uni_a/seed_3", 3)] == "from the command line"

  # Again, with one run unfinished (no results.json): only that one trains,
  # in its own folder, where train_and_evaluate resumes from the checkpoint.
  os.remove("study/intra/seed_4/results.json")
  fake_training.clear()
  again = studies.run_study(graph(), "study", [3, 4], DATASET)
  assert [(d, s) for d, s, _ in fake_training] == [("study/intra/seed_4", 4)]
  assert again == results


def test_write_table_orders_rows_blanks_unshown_cells_and_writes_three_files(tmp_path):
  runs = {label: [{"model": label, "test": {"accuracy": a, "experts": {"joint": 0.25}}}
                  for a in accs]
          for label, accs in (("uni", [0.5, 0.7]), ("i2m2", [0.8, 0.9]), ("extra", [0.1]))}
  assert studies.experts_in(runs, ["i2m2", "missing"]) == {"joint"}
  table = studies.Table(name="t", title="Title", intro="Intro.",
                        metrics=["test/accuracy", "test/experts/joint"],
                        chart_metric="test/accuracy", rows=["i2m2", "uni", "absent"],
                        shown_for={"test/experts/joint": ["i2m2"]},
                        extra_columns={"published": {"i2m2": "99 (test acc)"}})
  rows, markdown = studies.write_table(str(tmp_path), table, runs)
  assert [r["model"] for r in rows] == ["i2m2", "uni", "extra"]
  assert rows[0]["test/accuracy"] == pytest.approx((0.85, 0.0707107))
  assert rows[0]["test/experts/joint"] == (0.25, 0.0)
  assert math.isnan(rows[1]["test/experts/joint"][0])
  assert (tmp_path / "t.md").read_text() == f"# Title\n\nIntro.\n\n{markdown}"
  assert "| i2m2 | 2 | 85.00 ± 7.07 | 25.00 ± 0.00 | 99 (test acc) |" in markdown
  with open(tmp_path / "t.csv", newline="") as f:
    assert [r["published"] for r in csv.DictReader(f)] == ["99 (test acc)", "", ""]
  assert (tmp_path / "t.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="chart"):
    studies.Table(name="t", title="", intro="", metrics=["test/auroc"],
                  chart_metric="test/accuracy")



def test_train_i2m2_from_experts_trains_each_expert_alone_first(tmp_path, monkeypatch):
  """config.model.i2m2_init='experts' (configs/npz.py): main trains uni per modality and inter in
  WORKDIR/experts/, then I2M2 in WORKDIR from their checkpoints; a second start reads them back."""
  import i2m2_jax.datasets  # pylint: disable=g-import-not-at-top
  dataset = ml_collections.ConfigDict({"modalities": {"a": (3,), "b": (2, 2)}})
  calls = helpers.fake_training(monkeypatch, lambda cfg: {"model": cfg.model.kind}, dataset)
  monkeypatch.setattr(i2m2_jax.datasets, "load_dataset", lambda data_config: dataset)
  monkeypatch.chdir(tmp_path)
  cfg = ml_collections.ConfigDict({"seed": 1, "data": {}, "model": {
      "kind": "i2m2", "modality": "", "init_from": "", "i2m2_init": "experts"}})
  studies.train_i2m2(cfg, "run")
  experts = {"uni_a": "run/experts/uni_a", "uni_b": "run/experts/uni_b",
             "joint": "run/experts/inter"}
  assert [(d, s) for d, s, _ in calls] == [(d, 1) for d in experts.values()] + [("run", 1)]
  assert calls[-1][2] == ",".join(f"{e}={tmp_path}/{d}" for e, d in experts.items())
  with open("run/experts/uni_b/results.json") as f:
    assert '"uni"' in f.read()
  calls.clear()
  os.remove("run/results.json")
  studies.train_i2m2(cfg, "run")  # the experts are read back, I2M2 trained (resumed) again
  assert [d for d, _, _ in calls] == ["run"]

  # Other kinds, scratch, or an init_from of the user's own: one run, as train_and_evaluate
  # (which loads the data itself).
  calls = helpers.fake_training(monkeypatch, lambda cfg: {"model": cfg.model.kind}, None)
  for kind, init, own in (("inter", "experts", ""), ("i2m2", "scratch", ""),
                          ("i2m2", "experts", "joint=elsewhere")):
    calls.clear()
    cfg.model.update(kind=kind, i2m2_init=init, init_from=own)
    studies.train_i2m2(cfg, f"single_{kind}_{init}")
    assert [(d, i) for d, _, i in calls] == [(f"single_{kind}_{init}", own)]
  cfg.model.i2m2_init = "staged"
  with pytest.raises(ValueError, match=r"config.model.i2m2_init='staged' is unknown; expected "
                                       r"one of \['scratch', 'experts'\]"):
    studies.train_i2m2(cfg, "bad")
