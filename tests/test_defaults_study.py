"""experiments/defaults_study.py: its data sets carry the evidence they claim, its checks are the
issue's, and the --smoke run writes the table, CSV and chart through the npz command path."""
import csv
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import import_experiment  # noqa: E402

study = import_experiment("defaults_study")


def class_mean_spread(x, y):
  """How far the class means of x lie apart, relative to the noise: max over classes of
  |class mean - overall mean| / std, over all features."""
  x = x.reshape(len(x), -1).astype(np.float64)
  means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
  return float(np.abs(means - x.mean(0)).max() / x.std(0).mean())


def test_synthetic_modalities_carry_the_evidence_they_claim():
  sizes = {"train": 4000, "val": 10, "test": 10}
  mods = {"a": study.Modality((8,), intra=0.0), "b": study.Modality((6, 2), intra=0.0),
          "c": study.Modality((5, 5, 1), intra=1.5, in_relation=False, uint8=True)}
  data = study.synthetic(mods, 3, 1.0, sizes, seed=0)["train"]
  y = data["label"]
  assert data["a"].shape == (4000, 8) and data["b"].shape == (4000, 6, 2)
  assert data["c"].dtype == np.uint8 and data["c"].shape == (4000, 5, 5, 1)
  # a and b say nothing alone (their class means agree up to sampling noise); c does.
  assert class_mean_spread(data["a"], y) < 0.1 and class_mean_spread(data["b"], y) < 0.1
  assert class_mean_spread(data["c"], y) > 0.3
  again = study.synthetic(mods, 3, 1.0, sizes, seed=0)["train"]
  assert all(np.array_equal(data[k], again[k]) for k in data)  # deterministic in the seed


def test_checks_are_the_issues_criteria():
  row = {"intra": 0.70, "inter": 0.80, "i2m2": 0.795, "mlp_concat": 0.81, "evidence": "both"}
  assert study.checks(row) == {"ours_vs_mlp": True, "i2m2_vs_best": True,
                               "i2m2_above_both": False}
  row.update(i2m2=0.785, mlp_concat=0.83, evidence="inter")
  assert study.checks(row) == {"ours_vs_mlp": False, "i2m2_vs_best": False}


def test_smoke_study_writes_table_csv_and_chart(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "experiments/defaults_study.py", "--smoke",
                         "--workdir", str(tmp_path), "--sets", "seq_image",
                         "--config.eval_missing_modalities=false"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "study.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["set"] for r in rows] == ["seq_image"] and rows[0]["seeds"] == "1"
  for row in rows:
    values = {k: float(row[k]) for k in ("intra", "inter", "i2m2", "lr_concat", "mlp_concat")}
    assert all(0.0 <= v <= 1.0 for v in values.values())
    # The CSV's verdicts are the checks of its numbers.
    want = study.checks({**values, "evidence": row["evidence"]})
    assert row["i2m2_vs_best"] == str(want["i2m2_vs_best"])
    assert row["ours_vs_mlp"] == str(want["ours_vs_mlp"])
    assert float(row["i2m2_wall_s"]) > 0
  # The folders are npz data sets as users write them, and the runs are the npz command's.
  with np.load(tmp_path / "data" / "seq_image" / "train.npz") as f:
    assert f["img"].dtype == np.uint8 and f["seq"].shape[1:] == (20, 4)
  assert (tmp_path / "runs" / "seq_image" / "i2m2" / "seed_0" / "results.json").exists()
  # I2M2 was fine-tuned from the uni and inter runs (compare.py's default), trained beside it.
  assert (tmp_path / "runs" / "seq_image" / "uni_img" / "seed_0" / "results.json").exists()
  table = (tmp_path / "study.md").read_text()
  assert "| seq_image | both |" in table and (tmp_path / "study.png").stat().st_size > 1000
