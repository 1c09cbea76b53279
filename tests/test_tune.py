"""experiments/recipes/tuning.py (tune.py, compare.py --tune): the grid, the choice on validation,
the time budget, the links compare.py reads, and I2M2 starting from the chosen runs.

Training is replaced by a fake whose validation accuracy is a known function of the point, so
these tests check the orchestration alone (test_experiments.py trains compare.py for real)."""
import json
import os
import sys

import pytest

import helpers
from configs import npz
from i2m2_jax import studies
from i2m2_jax.datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.recipes import comparison, tuning  # noqa: E402  pylint: disable=g-import-not-at-top

DATASET = Dataset(name="fake", modalities={"vec": (6,), "seq": (20, 4)}, num_classes=3,
                  sources={"train": [], "val": [], "test": []})


def val_accuracy(cfg):
  """Best at learning rate 3e-3, weight decay x0.3 (of the default) and structured encoders."""
  opt = cfg.optimizer
  below_default = opt.weight_decay < 0.9 * npz.get_config().optimizer.weight_decay
  return round(0.5 + 0.1 * (opt.learning_rate > 2e-3) + 0.05 * below_default
               + 0.02 * ("conv1d" in cfg.model.encoders), 4)


@pytest.fixture
def fake_training(monkeypatch):
  return helpers.fake_training(monkeypatch, lambda cfg: {
      "model": cfg.model.kind, "seed": cfg.seed, "selection_metric": "accuracy",
      "val": {"accuracy": val_accuracy(cfg)}, "test": {"accuracy": 0.4}, "best_step": 7,
      "wall_s": 1.0}, DATASET)


def test_grid_starts_at_the_config_and_spans_distinct_encoder_families():
  config = npz.get_config()
  points = tuning.grid(config, DATASET.modalities)
  assert len(points) == (len(tuning.LEARNING_RATE_FACTORS) * len(tuning.WEIGHT_DECAY_FACTORS)
                         * 2)
  first = points[0]
  assert (first.learning_rate, first.weight_decay, first.encoders) == (
      config.optimizer.learning_rate, config.optimizer.weight_decay, "")
  # The default already flattens the short sequence, so the other family is the structured one.
  assert {p.encoders for p in points} == {"", "seq=conv1d"}
  # Vectors only: one family.
  assert {p.encoders for p in tuning.grid(config, {"a": (6,), "b": (3,)})} == {""}


def test_tune_chooses_on_validation_links_the_choice_and_compare_reads_it(fake_training,
                                                                        tmp_path):
  config = npz.get_config()
  runs = comparison.model_runs(config, list(DATASET.modalities), ["i2m2"], "experts")
  assert [r.label for r in runs] == ["uni_vec", "uni_seq", "inter", "i2m2"]  # I2M2's sources
  chosen = tuning.tune(runs, str(tmp_path), DATASET, budget_s=1e6)
  for label, run in chosen.items():
    opt = run.config.optimizer
    assert opt.learning_rate == pytest.approx(3 * config.optimizer.learning_rate)
    assert opt.weight_decay == pytest.approx(0.3 * config.optimizer.weight_decay)
    assert run.config.model.encoders == "seq=conv1d"
    link = tmp_path / label / "seed_0"
    assert os.path.islink(link) and json.loads((link / "results.json").read_text())[
        "val"]["accuracy"] == pytest.approx(0.67)
  # Every I2M2 point starts from the chosen uni and inter runs (the links), at their encoders:
  # learning rate x weight decay only.
  i2m2_calls = [init for d, _, init in fake_training if "/tune/i2m2/" in d]
  assert len(i2m2_calls) == len(tuning.LEARNING_RATE_FACTORS) * len(tuning.WEIGHT_DECAY_FACTORS)
  assert all("seq-conv1d" in d for d, _, _ in fake_training if "/tune/i2m2/" in d)
  assert all(f"joint={tmp_path / 'inter' / 'seed_0'}" in init for init in i2m2_calls)
  table = (tmp_path / "tune.md").read_text()
  assert table.count("| yes |") == 4 and (tmp_path / "tune.png").exists()
  # compare.py on the same folder reads the chosen runs back instead of training them.
  before = len(fake_training)
  results = studies.run_study(list(chosen.values()), str(tmp_path), [0], DATASET)
  assert len(fake_training) == before
  assert results["i2m2"][0]["val"]["accuracy"] == pytest.approx(0.67)


def test_time_budget_keeps_each_kinds_own_point(fake_training, tmp_path):
  config = npz.get_config()
  runs = comparison.model_runs(config, list(DATASET.modalities), ["inter"])
  chosen = tuning.tune(runs, str(tmp_path), DATASET, budget_s=0.0)
  assert [d for d, _, _ in fake_training] == [
      os.path.relpath(tmp_path / "tune" / "inter" / tuning.grid(config, DATASET.modalities)[0]
                      .label() / "seed_0")]
  assert chosen["inter"].config.optimizer.learning_rate == config.optimizer.learning_rate
  assert "skipped (time budget)" in (tmp_path / "tune.md").read_text()


def test_i2m2_takes_the_joint_sources_encoders_and_leaves_out_a_mismatched_expert(
    monkeypatch, tmp_path):
  """uni_seq prefers the flattened sequence, inter the conv1d: I2M2 reads the sequence with
  conv1d (as its joint source) and its uni_seq expert starts from scratch, not from a checkpoint
  of another shape (the failure `compare.py --tune` hit on the study's seq_image set)."""
  def results(cfg):
    flat = "conv1d" not in cfg.model.encoders
    val = 0.6 + 0.1 * (flat == (cfg.model.kind == "uni"))
    return {"model": cfg.model.kind, "seed": cfg.seed, "selection_metric": "accuracy",
            "val": {"accuracy": val}, "test": {"accuracy": 0.4}, "best_step": 7, "wall_s": 1.0}
  calls = helpers.fake_training(monkeypatch, results, DATASET)
  config = npz.get_config()
  runs = comparison.model_runs(config, list(DATASET.modalities), ["i2m2"], "experts")
  chosen = tuning.tune(runs, str(tmp_path), DATASET, budget_s=1e6)
  assert chosen["uni_seq"].config.model.encoders == ""
  assert chosen["inter"].config.model.encoders == "seq=conv1d"
  assert chosen["i2m2"].config.model.encoders == "seq=conv1d"
  assert set(chosen["i2m2"].init_from) == {"uni_vec", "joint"}
  i2m2_inits = [init for d, _, init in calls if "/tune/i2m2/" in d]
  assert i2m2_inits and all("uni_seq=" not in i and "uni_vec=" in i for i in i2m2_inits)
  assert "uni_seq from scratch" in (tmp_path / "tune.md").read_text()
