"""End to end through the command lines users run: main, compare and quickstart on smoke configs."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_main_trains_and_writes_results(tmp_path):
  workdir = tmp_path / "run"
  proc = run(["-m", "i2m2_jax.main", "--config", "configs/synthetic.py:smoke",
              "--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}",
              "--config.optimizer.learning_rate=0.003"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert {"model", "dataset", "steps", "seed", "train_examples_per_s", "val", "test"} <= set(results)
  assert results["model"] == "i2m2" and results["dataset"] == "synthetic" and results["steps"] == 20
  assert set(results["test"]["experts"]) == {"uni_m0", "uni_m1", "joint"}
  assert 0.0 <= results["test"]["ece"] <= 1.0 and results["test"]["nll"] > 0
  assert (workdir / "metrics.jsonl").exists() and (workdir / "tensorboard").is_dir()
  with open(workdir / "hparams.json") as f:
    assert json.load(f)["optimizer.learning_rate"] == pytest.approx(0.003)


def test_misspelt_config_field_fails_before_training(tmp_path):
  proc = run(["-m", "i2m2_jax.main", "--config", "configs/synthetic.py:smoke",
              "--workdir", str(tmp_path / "run"), "--config.optimizer.learning_rat=0.1"], tmp_path)
  assert proc.returncode != 0
  assert "learning_rat" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_compare_writes_table_csv_and_chart(tmp_path):
  workdir = tmp_path / "cmp"
  args = ["experiments/compare.py", "--config", "configs/synthetic.py:smoke", "--workdir",
          str(workdir), "--seeds", "2", "--models", "uni_m0,i2m2",
          f"--config.data.data_dir={tmp_path / 'tfds'}"]
  proc = run(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # I2M2 starts from the uni and inter runs (--i2m2_init=experts), so they are trained too.
  models = ["uni_m0", "uni_m1", "inter", "i2m2"]
  with open(workdir / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["model"] for r in rows] == models
  assert all(r["seeds"] == "2" for r in rows)
  assert all(0.0 <= float(r["test/accuracy_mean"]) <= 1.0 for r in rows)
  assert float(rows[-1]["test/experts/joint_mean"]) >= 0.0  # experts inside i2m2 are reported
  table = (workdir / "comparison.md").read_text()
  assert all(f"| {m} | 2 |" in table for m in models)
  assert (workdir / "comparison.png").stat().st_size > 1000
  accuracies = []
  for model in models:
    for seed in (0, 1):
      with open(workdir / model / f"seed_{seed}" / "results.json") as f:
        result = json.load(f)
      assert result["seed"] == seed
      accuracies.append(result["test"]["accuracy"])
  init_from = json.loads((workdir / "i2m2" / "seed_1" / "hparams.json").read_text())
  assert str(workdir / "inter" / "seed_1") in json.dumps(init_from)
  mean = float(rows[0]["test/accuracy_mean"])
  assert mean == pytest.approx(sum(accuracies[:2]) / 2)
  # Each model's accuracy without each modality, from results.json.
  missing = (workdir / "missing_modality.md").read_text()
  assert "| model | seeds | all modalities | without m0 | without m1 |" in missing
  without_m1 = [json.loads((workdir / "i2m2" / f"seed_{s}" / "results.json").read_text())
                ["missing_modality"]["m1"]["accuracy"] for s in (0, 1)]
  cells = {m: [c.strip() for c in missing.split(f"| {m} | 2 |")[1].split("\n")[0].split("|")]
           for m in models}
  assert cells["i2m2"][0].startswith(f"{100 * (accuracies[-2] + accuracies[-1]) / 2:.2f} ± ")
  assert cells["i2m2"][2].startswith(f"{100 * (without_m1[0] + without_m1[1]) / 2:.2f} ± ")
  assert cells["uni_m0"][1] == "–"  # uni on m0 cannot predict without m0

  # A second invocation reads the finished runs back instead of training again; --robustness
  # evaluates them with each modality corrupted, level 0 being the clean test accuracy.
  before = (workdir / "i2m2" / "seed_0" / "results.json").stat().st_mtime_ns
  proc = run(args + ["--robustness"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "i2m2" / "seed_0" / "results.json").stat().st_mtime_ns == before
  for model in models:
    for seed in (0, 1):
      curves = json.loads((workdir / model / f"seed_{seed}" / "robustness.json").read_text())
      result = json.loads((workdir / model / f"seed_{seed}" / "results.json").read_text())
      assert [curves["modalities"][m]["values"][0] for m in ("m0", "m1")] == [
          result["test"]["accuracy"]] * 2
  robust = (workdir / "robustness.md").read_text()
  assert "## Noise on `m0` (gaussian)" in robust and "## Noise on `m1` (gaussian)" in robust
  assert "| model | seeds | 0.0 | 0.1 |" in robust and "| i2m2 | 2 |" in robust
  assert (workdir / "robustness.png").stat().st_size > 1000


def test_quickstart_summarises_digits_and_every_regime(tmp_path):
  workdir = tmp_path / "quick"
  proc = run(["experiments/quickstart.py", "--smoke", "--seeds", "1", "--workdir", str(workdir),
              "--data_dir", str(tmp_path / "tfds")], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = (workdir / "summary.md").read_text()
  assert "| model | digits |" in summary
  assert "| model | intra_only | inter_only | both |" in summary
  for model in ("uni_top", "uni_bottom", "intra", "inter", "i2m2"):
    assert f"| {model} | " in summary
  for part in ("digits", "intra_only", "inter_only", "both"):
    assert (workdir / part / "comparison.png").exists()


def test_precision_trains_both_dtypes_and_reports_the_difference(tmp_path):
  workdir = tmp_path / "prec"
  proc = run(["experiments/precision.py", "--config", "configs/synthetic.py:smoke", "--workdir",
              str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}",
              "--config.eval_missing_modalities=false", "--config.eval_attribution=false"],
             tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = {d: json.loads((workdir / d / "seed_0" / "results.json").read_text())
             for d in ("float32", "bfloat16")}
  assert results["float32"]["test"]["accuracy"] > 0.3  # learns (chance 0.25)
  table = (workdir / "precision.md").read_text()
  assert "| float32 | 1 |" in table and "| bfloat16 | 1 |" in table
  diff = 100 * (results["bfloat16"]["val"]["accuracy"] - results["float32"]["val"]["accuracy"])
  assert f"mean {diff:+.2f} pt" in table
