"""After training: a run loaded from its workdir alone (i2m2_jax/inference.py), evaluated on a data
set by the command line (i2m2_jax/evaluate.py), exported with jax.export (i2m2_jax/export.py) and
run by the standalone loader in a fresh process (i2m2_jax/exported.py).

One small npz run (a float vector and a uint8 image, MLP encoders) trained once for the module.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import npz as npz_config
from i2m2_jax import export, exported, inference, input_pipeline, train_lib
from i2m2_jax.datasets import Dataset, load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 96, "val": 32, "test": 40}
NUM_CLASSES = 3


def arrays(n, seed):
  """A float vector and a uint8 image that both carry the label (vec in float64: stored float32)."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, n)
  vec = rng.normal(size=(n, 5)) * 3.0 + 1.0
  vec[np.arange(n), label] += 4.0
  img = rng.integers(0, 120, size=(n, 4, 4, 1))
  img[np.arange(n), label, :, 0] += 130
  return {"vec": vec, "img": img.astype(np.uint8), "label": label}


def write_folder(folder):
  os.makedirs(folder, exist_ok=True)
  for i, (split, n) in enumerate(SIZES.items()):
    np.savez(os.path.join(folder, f"{split}.npz"), **arrays(n, i))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, results, config) of a finished i2m2 run on npz files."""
  root = tmp_path_factory.mktemp("inference")
  write_folder(root / "data")
  config = npz_config.get_config("smoke")
  config.data.path, config.data.data_dir = str(root / "data"), str(root / "tfds")
  config.model.encoders = "vec=mlp,img=mlp"
  config.model.encoder_kwargs = {"vec": {"features": (16,)}, "img": {"features": (16,)}}
  config.eval_batch_size = 16  # the test split in 3 batches, the last one padded
  workdir = str(root / "run")
  return workdir, train_lib.train_and_evaluate(config, workdir), config


@pytest.fixture(scope="module")
def predictor(run):
  return inference.load_run(run[0])


def test_the_run_spec_and_the_statistics_are_saved_with_the_run(run):
  workdir, results, _ = run
  spec = json.loads(open(os.path.join(workdir, "run_spec.json")).read())
  assert spec["modalities"] == {"vec": {"shape": [5], "dtype": "float32"},
                                "img": {"shape": [4, 4, 1], "dtype": "uint8"}}
  assert (spec["task"], spec["num_classes"], spec["targets"]) == ("multiclass", 3, {"label": []})
  assert spec["data"] == results["data"]
  train = arrays(SIZES["train"], 0)
  with np.load(os.path.join(workdir, "preprocess.npz")) as saved:
    for m in ("vec", "img"):
      x = train[m].astype(np.float64).reshape(-1, train[m].shape[-1])
      np.testing.assert_allclose(saved[f"{m}.mean"], x.mean(0), rtol=1e-5)
      np.testing.assert_allclose(saved[f"{m}.std"], x.std(0), rtol=1e-5)


def test_load_run_reproduces_results_json_exactly(run, predictor):
  workdir, results, config = run
  assert predictor.step == results["best_step"] and predictor.experts == ["uni_vec", "uni_img",
                                                                           "joint"]
  again = inference.evaluate_dataset(predictor, load_dataset(config.data))
  for key in ("val", "test", "missing_modality", "attribution"):
    assert again[key] == json.loads(json.dumps(results[key])), key


def test_predictions_are_the_product_of_the_experts_at_any_batch_size(run, predictor):
  _, results, _ = run
  test = arrays(SIZES["test"], 2)
  inputs = {"vec": test["vec"], "img": test["img"]}  # vec in float64: cast as the data was
  out = predictor(inputs)
  assert out["probs"].shape == (40, 3) and set(out["expert_probs"]) == set(predictor.experts)
  assert np.mean(out["probs"].argmax(-1) == test["label"]) == results["test"]["accuracy"]
  product = np.prod([out["expert_probs"][e].astype(np.float64) for e in predictor.experts], 0)
  np.testing.assert_allclose(out["probs"], product / product.sum(-1, keepdims=True), atol=1e-6)

  compiled = predictor._predict._cache_size()
  for start, stop in ((0, 1), (3, 8), (8, 13), (13, 40)):  # padded to 8, 8, 8 and 32
    part = predictor({m: x[start:stop] for m, x in inputs.items()})
    np.testing.assert_allclose(part["probs"], out["probs"][start:stop], atol=1e-6)
    np.testing.assert_array_equal(part["probs"].argmax(-1), out["probs"][start:stop].argmax(-1))
  assert predictor._predict._cache_size() - compiled == 2  # 8 and 32: one compilation each

  # A missing modality: the product of the experts that do not read it.
  without_img = predictor({"vec": test["vec"][:6]})
  np.testing.assert_allclose(without_img["probs"], out["expert_probs"]["uni_vec"][:6], atol=1e-6)
  only_img = predictor(inputs, present=[False, True, False])
  np.testing.assert_allclose(only_img["probs"], out["expert_probs"]["uni_img"], atol=1e-6)


def test_bad_inputs_name_what_does_not_fit(predictor):
  test = arrays(4, 2)
  good = {"vec": test["vec"], "img": test["img"]}
  with pytest.raises(ValueError, match=r"\['audio'\] do not fit the run .* modalities are "
                                       r"\['vec', 'img'\]"):
    predictor({**good, "audio": test["vec"]})
  with pytest.raises(ValueError, match=r"inputs\['vec'\] has per-example shape \[4\]; .* "
                                       r"expects \[5\]"):
    predictor({**good, "vec": test["vec"][:, :4]})
  with pytest.raises(ValueError, match=r"inputs\['img'\] is float64; .* stores 'img' as uint8"):
    predictor({**good, "img": test["img"] / 255.0})
  with pytest.raises(ValueError, match=r"present has shape \[2\]; expected \[3\] or \[4, 3\]"):
    predictor(good, present=[True, False])


def test_workdirs_without_a_finished_run_are_refused(run, tmp_path):
  workdir, results, _ = run
  with pytest.raises(FileNotFoundError, match="the folder does not exist"):
    inference.load_run(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: it has no run_spec.json"):
    inference.load_run(str(tmp_path / "empty"))
  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(workdir, unfinished)
  os.remove(os.path.join(unfinished, "results.json"))
  with pytest.raises(FileNotFoundError, match=r"No finished run in .*unfinished: it has no "
                                              r"results.json .* step=N"):
    inference.load_run(unfinished)
  assert inference.load_run(unfinished, step=results["best_step"]).step == results["best_step"]
  with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 999 .* available: \["):
    inference.load_run(unfinished, step=999)


def test_a_data_set_with_other_modalities_is_refused(predictor):
  test = arrays(8, 2)
  source = input_pipeline.InMemorySource({"vec": test["vec"][:, :4].astype(np.float32),
                                          "pic": test["img"], "label": test["label"]})
  other = Dataset(name="other", modalities={"vec": (4,), "pic": (4, 4, 1)}, num_classes=3,
                  sources={"train": source, "val": source, "test": source})
  with pytest.raises(ValueError) as error:
    inference.evaluate_dataset(predictor, other)
  message = str(error.value)
  assert "Data set 'other' does not fit the run in" in message
  assert "modality 'img' is missing (the run's: shape [4, 4, 1], uint8)" in message
  assert "modality 'pic' is not one of the run's ['vec', 'img']" in message
  assert "modality 'vec' has shape [4], float32; the run's: shape [5], float32" in message


def subprocess_env():
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_evaluate_command_writes_results_json_for_the_data(run, tmp_path):
  workdir, results, config = run
  proc = subprocess.run(
      [sys.executable, "-m", "i2m2_jax.evaluate", "--workdir", workdir, "--config",
       "configs/npz.py:smoke", f"--config.data.path={config.data.path}",
       f"--config.data.data_dir={config.data.data_dir}", "--out", str(tmp_path / "eval")],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert evaluated["step"] == results["best_step"] and evaluated["model"] == "i2m2"
  for key in ("val", "test", "missing_modality", "attribution", "data"):
    assert evaluated[key] == json.loads(json.dumps(results[key])), key


def test_the_exported_predictor_runs_without_the_model_code_in_a_fresh_process(
    run, predictor, tmp_path):
  workdir, _, _ = run
  test = arrays(11, 3)  # a batch size the export never saw
  present = np.ones((11, 3), bool)
  present[::3, 2] = False  # some examples without the joint expert
  np.savez(tmp_path / "inputs.npz", vec=test["vec"], img=test["img"], present=present)
  model = str(tmp_path / "model.jaxexport")
  loader = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('i2m2_jax', 'flax')]")
  proc = subprocess.run(
      f"{sys.executable} -m i2m2_jax.export --workdir {workdir} --out {model} --platforms=cpu && "
      f"cd {tmp_path} && {sys.executable} -c \"{loader}\" {REPO}/i2m2_jax/exported.py {model} "
      f"inputs.npz out.npz", shell=True, cwd=REPO, env=subprocess_env(), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = predictor({"vec": test["vec"], "img": test["img"]}, present=present)
  with np.load(tmp_path / "out.npz") as got:
    np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-6)
    np.testing.assert_array_equal(got["probs"].argmax(-1), want["probs"].argmax(-1))
    for expert in predictor.experts:
      np.testing.assert_allclose(got[f"expert_probs.{expert}"], want["expert_probs"][expert],
                                 atol=1e-6)


def test_exports_for_unknown_or_absent_platforms_are_refused(predictor):
  with pytest.raises(ValueError, match=r"Cannot export for platform 'metal': jax.export knows "
                                       r"\['cpu', 'cuda', 'rocm', 'tpu'\]"):
    export.export_predictor(predictor, ["cpu", "metal"])
  cuda_only = exported.ExportedPredictor(export.export_predictor(predictor, ["cuda"]), "gpu.bin")
  assert cuda_only.modalities == {"vec": ((5,), np.float32), "img": ((4, 4, 1), np.uint8)}
  assert jax.default_backend() == "cpu"
  with pytest.raises(ValueError, match=r"gpu.bin was exported for platforms \['cuda'\], not for "
                                       r"this machine's 'cpu': export it again with "
                                       r"--platforms=cuda,cpu"):
    cuda_only({"vec": np.zeros((1, 5), np.float32), "img": np.zeros((1, 4, 4, 1), np.uint8)})
