"""The paper's benchmarks: configs/avmnist.py and configs/mimic.py (each stage's hyper-parameters),
experiments/recipes/ (stages, tables) and experiments/reproduce.py.

The end-to-end tests run the documented command, `python experiments/reproduce.py`, in
subprocesses (AV-MNIST and MIMIC side by side) on small files in MultiBench's formats (the writers
of test_avmnist_mimic.py), with the smoke stage configs (4 steps per stage; for AV-MNIST smaller
LeNets and LRTF through --config overrides). The subprocesses get two fake CPU devices, as the
rest of the suite, plus XLA flags that trade run speed for compile speed and a compilation cache
shared by the seeds: compilation is most of the cost of a 4-step run. ~75 s on the shared 2-core
machine (CPU time about the same; ~40 s expected on two idle cores).
"""
import csv
import glob
import json
import os
import pickle
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from configs import avmnist as avmnist_config
from configs import mimic as mimic_config
from experiments import recipes
from experiments.recipes import avmnist as avmnist_recipe
from experiments.recipes import mimic as mimic_recipe
from i2m2_jax import checkpointing, evaluation, input_pipeline, steps, train_lib
from i2m2_jax.datasets import Dataset, load_dataset
from i2m2_jax.experiment import build_experiment, make_preprocess
from test_avmnist_mimic import mimic_arrays, write_avmnist, write_mimic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import reproduce  # noqa: E402  pylint: disable=g-import-not-at-top

# Runs experiments/reproduce.py as __main__ after wrapping checkpointing.load_expert_init, so that
# the state each staged run starts from is dumped to $SPY_DIR (the trainer calls it by module
# name).
SPY_RUNNER = r"""
import os, pickle, runpy, sys
import jax
from i2m2_jax import checkpointing
original = checkpointing.load_expert_init
def spy(state, init_from, mesh):
  state = original(state, init_from, mesh)
  dump = {"init_from": init_from, "params": jax.device_get(state.params),
          "batch_stats": jax.device_get(state.batch_stats)}
  path = os.path.join(os.environ["SPY_DIR"], f"{len(os.listdir(os.environ['SPY_DIR']))}.pkl")
  with open(path, "wb") as f:
    pickle.dump(dump, f)
  return state
checkpointing.load_expert_init = spy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_reproduce(tmp_path, args, spy_dir):
  """Starts the command in the background (the two benchmarks' chains run side by side)."""
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true"),
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "SPY_DIR": str(spy_dir),
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
  })
  os.makedirs(spy_dir, exist_ok=True)
  command = [sys.executable, "-c", SPY_RUNNER, os.path.join(REPO, "experiments", "reproduce.py"),
             *args]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  try:
    stdout, stderr = proc.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, stderr[-5000:]
  return stdout


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def assert_trees_equal(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# The recipes


@pytest.mark.parametrize("stage,kind,modality,fusion,lr,patience", [
    ("uni_image", "uni", "image", "late_fusion", 0.01, -1),
    ("uni_audio", "uni", "audio", "late_fusion", 0.01, -1),
    ("inter_lf", "inter", "", "late_fusion", 0.1, 11),
    ("inter_lrtf", "inter", "", "lrtf", 0.1, 11),
    ("intra", "intra", "", "late_fusion", 0.1, 11),
    ("i2m2", "i2m2", "", "late_fusion", 0.01, 11),
    ("i2m2_lrtf", "i2m2", "", "lrtf", 0.01, 11),
])
def test_avmnist_stage_recipes(stage, kind, modality, fusion, lr, patience):
  config = avmnist_config.get_config(stage)
  assert (config.stage, config.model.kind, config.model.modality, config.model.fusion) == (
      stage, kind, modality, fusion)
  assert config.optimizer.learning_rate == lr
  assert config.early_stopping_patience == patience
  assert (config.optimizer.name, config.optimizer.momentum, config.optimizer.weight_decay,
          config.optimizer.grad_clip_norm, config.optimizer.schedule) == (
              "sgd", 0.0, 1e-4, 8.0, "constant")
  assert (config.batch_size, config.num_epochs, config.eval_every_steps,
          config.selection_metric) == (40, 30.0, -1, "accuracy")
  assert (config.data.name, config.data.standardize, config.data.num_val) == ("avmnist", False,
                                                                              5000)
  assert dict(config.model.fusion_kwargs) == ({"rank": 40, "output_dim": 120}
                                              if fusion == "lrtf" else {})
  smoke = avmnist_config.get_config(f"{stage},smoke")
  assert smoke.num_train_steps == 4 and smoke.stage == stage
  assert smoke.optimizer.learning_rate == lr


def test_avmnist_default_stages_and_bad_arguments():
  assert avmnist_config.get_config().stage == "i2m2"
  recipe = recipes.for_config(avmnist_config.get_config("smoke"))
  assert recipe.stages_for("lf") == ["uni_image", "uni_audio", "inter_lf", "inter_lrtf",
                                     "intra", "i2m2"]
  assert recipe.stages_for("lrtf")[-1] == "i2m2_lrtf" and "i2m2" not in recipe.stages_for("lrtf")
  assert recipe.stages_for("both")[-2:] == ["i2m2", "i2m2_lrtf"]
  # The recipe's stages are the config's, and every stage loads its experts from stages.
  assert list(recipe.stages) == list(avmnist_config.STAGE_HPARAMS)
  assert set(recipe.rows) == set(recipe.stages)
  for sources in recipe.stages.values():
    assert set(sources.values()) <= set(recipe.stages)
  assert "test/auroc" not in recipe.metrics  # ten classes: accuracy and ECE
  assert recipe.published == {"i2m2": "72.38 (test acc)", "i2m2_lrtf": "72.38 (test acc)"}
  with pytest.raises(ValueError, match="bad argument"):
    avmnist_config.get_config("uni_image,intra")
  with pytest.raises(ValueError, match="bad argument"):
    avmnist_config.get_config("smoek")


@pytest.mark.parametrize("task,selection", [("mortality", "accuracy"),
                                            ("icd9_140_239", "auprc"),
                                            ("icd9_460_519", "auprc")])
def test_mimic_recipes(task, selection):
  recipe = recipes.for_config(mimic_config.get_config(task))
  assert list(recipe.stages) == list(recipe.rows) == list(mimic_config.STAGE_HPARAMS)
  assert recipe.stages_for("lf") == list(recipe.stages)
  with pytest.raises(ValueError, match="fusion"):
    recipe.stages_for("lrtf")
  # Binary tasks add AUROC and AUPRC; the published number is the task's.
  assert ("test/auprc" in recipe.metrics) == (selection == "auprc")
  assert recipe.published == {"mortality": {"i2m2": "78.10 (test acc)"},
                              "icd9_140_239": {"i2m2": "91.58 (test acc)"}}.get(task, {})
  for stage in mimic_config.STAGE_HPARAMS:
    config = mimic_config.get_config(f"{task},{stage}")
    assert config.data.task == task and config.selection_metric == selection
    assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.weight_decay,
            config.optimizer.grad_clip_norm, config.optimizer.schedule) == (
                "rmsprop", 1e-3, 0.0, 8.0, "constant")
    assert (config.batch_size, config.num_epochs, config.eval_every_steps) == (40, 20.0, -1)
    assert config.early_stopping_patience == (-1 if stage.startswith("uni_") else 11)
    assert not recipe.stages[stage]  # from scratch
  assert mimic_config.get_config(task).stage == "i2m2"
  assert mimic_config.get_config().data.task == "mortality"
  with pytest.raises(ValueError, match="bad argument"):
    mimic_config.get_config("mortality,icd9_140_239")


def test_stage_config_applies_overrides_where_the_field_exists():
  overrides = reproduce.stage_overrides(
      {"data.manual_dir": "/data", "model.fusion_kwargs.rank": 20, "seed": 7,
       "model.init_from": "uni_image=elsewhere"})
  assert "model.init_from" not in overrides  # set per stage, never from the command line
  recipe = recipes.for_config(avmnist_config.get_config())
  lrtf = reproduce.stage_config(avmnist_config, recipe, "inter_lrtf", ["i2m2", "smoke"],
                                overrides)
  lf = reproduce.stage_config(avmnist_config, recipe, "inter_lf", ["i2m2", "smoke"], overrides)
  assert lrtf.stage == "inter_lrtf" and lrtf.num_train_steps == 4
  assert lrtf.data.manual_dir == lf.data.manual_dir == "/data" and lrtf.seed == lf.seed == 7
  assert lrtf.model.fusion_kwargs.rank == 20 and "rank" not in lf.model.fusion_kwargs
  runs = reproduce.study_runs(avmnist_config, recipe, ["smoke"], overrides, "lrtf")
  assert [r.label for r in runs] == recipe.stages_for("lrtf")
  assert dict(runs[-1].init_from) == avmnist_recipe.STAGES["i2m2_lrtf"]
  with pytest.raises(ValueError, match="No benchmark recipe for data set 'synthetic'"):
    recipes.for_config(ml_collections.ConfigDict({"data": {"name": "synthetic"}}))
  assert reproduce.split_config_argument("configs/mimic.py:icd9_140_239, smoke") == (
      "configs/mimic.py", ["icd9_140_239", "smoke"])


def test_avmnist_config_inputs_reach_the_model_as_x_over_255(tmp_path):
  files = write_avmnist(tmp_path / "manual", n_train=12, n_test=4)
  config = avmnist_config.get_config("uni_audio,smoke")
  config.data.update({"manual_dir": str(tmp_path / "manual"),
                      "data_dir": str(tmp_path / "tfds"), "num_val": 4})
  dataset = load_dataset(config.data)
  stats = None if not config.data.standardize else "would standardise"
  preprocess = make_preprocess(list(dataset.modalities), stats)
  batch = input_pipeline.gather_batch(dataset.sources["test"], range(4), list(dataset.modalities))
  assert batch["inputs"]["audio"].dtype == np.uint8  # 4x fewer bytes to the device
  out = jax.jit(preprocess)(batch["inputs"])
  np.testing.assert_allclose(out["audio"], files["test"]["audio"][..., None] / 255.0, rtol=1e-6)
  np.testing.assert_allclose(out["image"], files["test"]["image"].reshape(4, 28, 28, 1) / 255.0,
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Binary evaluation


def test_binary_evaluation_auroc_auprc_match_sklearn():
  rng = np.random.default_rng(0)
  n = 37  # not a multiple of the batch: the last batch is padded
  label = rng.integers(0, 2, n)
  a = rng.normal(size=(n, 5)).astype(np.float32) + label[:, None]
  b = rng.normal(size=(n, 4, 3)).astype(np.float32)
  source = input_pipeline.InMemorySource({"a": a, "b": b, "label": label})
  dataset = Dataset(name="binary", modalities={"a": (5,), "b": (4, 3)}, num_classes=2,
                    sources={"train": source, "val": source, "test": source})
  config = mimic_config.get_config("icd9_140_239,i2m2")
  config.model.encoders = "a=mlp_raw,b=mlp_raw"
  config.model.encoder_kwargs = ml_collections.ConfigDict(
      {"a": {"features": (10, 10)}, "b": {"features": (8,)}})
  config.model.joint_encoder_kwargs = ml_collections.ConfigDict()
  config.seed = 3
  exp = build_experiment(config, dataset, stats=None)
  state, preprocess, mesh = exp.state, exp.preprocess, exp.mesh
  result = evaluation.evaluate(steps.jit_eval_step(exp.task, preprocess, mesh), state, source,
                               dataset, exp.task, 8, mesh)
  out = state.apply_fn({"params": state.params}, preprocess({"a": a, "b": b}), train=False)
  p1 = np.exp(np.asarray(out["log_probs"], np.float64)[:, 1])
  assert result["auroc"] == pytest.approx(sk_metrics.roc_auc_score(label, p1), abs=1e-6)
  assert result["auprc"] == pytest.approx(sk_metrics.average_precision_score(label, p1),
                                          abs=1e-6)
  assert 0.0 < result["auroc"] < 1.0


# ---------------------------------------------------------------------------------------------
# End to end

# Smaller LeNets (one 3x3 block after the first: fewer ops to compile) and a rank-2 LRTF for the
# AV-MNIST chain; the real architectures are checked in test_paper_models.py. The LRTF fields
# exist only in the LRTF stages' configs, hence `:inter_lrtf` (the stage token itself is ignored:
# every stage runs, and each override reaches the stages that have its field).
AVMNIST_SMALL = [f"--config.model.{kwargs}.{m}.num_blocks=1"
                 for kwargs in ("encoder_kwargs", "joint_encoder_kwargs")
                 for m in ("image", "audio")] + ["--config.model.fusion_kwargs.rank=2",
                                                 "--config.model.fusion_kwargs.output_dim=8"]
AVMNIST_STAGES = ["uni_image", "uni_audio", "inter_lf", "inter_lrtf", "intra", "i2m2"]


def _speed_flags():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  return [f"--config.{field}=False" for field in ("eval_missing_modalities", "eval_attribution")
          if field in config]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
  """Both benchmarks' reproduce commands on small files, started at once."""
  av = tmp_path_factory.mktemp("avmnist")
  write_avmnist(av / "manual", n_train=60, n_test=20)
  av_overrides = {"data.manual_dir": str(av / "manual"), "data.data_dir": str(av / "tfds"),
                  "data.num_val": 20}
  av_args = (["--config", "configs/avmnist.py:inter_lrtf,smoke", "--workdir", str(av / "run"),
              "--seeds", "2"] + [f"--config.{k}={v}" for k, v in av_overrides.items()]
             + AVMNIST_SMALL + ["--config.eval_every_steps=4"] + _speed_flags())
  mi = tmp_path_factory.mktemp("mimic")
  write_mimic(mi / "manual", mimic_arrays())
  mi_args = ["--config", "configs/mimic.py:icd9_140_239,smoke", "--workdir", str(mi / "run"),
             "--seeds", "1", f"--config.data.manual_dir={mi / 'manual'}",
             f"--config.data.data_dir={mi / 'tfds'}"] + _speed_flags()
  procs = {"avmnist": start_reproduce(av, av_args, av / "spy"),
           "mimic": start_reproduce(mi, mi_args, mi / "spy")}
  yield {"avmnist": (procs["avmnist"], av, av_overrides), "mimic": (procs["mimic"], mi)}
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_avmnist_staged_chain_table_skip_and_exact_init(chains, monkeypatch):
  proc, root, overrides = chains["avmnist"]
  stdout = finish(proc)
  workdir = root / "run"
  for stage in AVMNIST_STAGES:
    for seed in (0, 1):
      result = json.loads((workdir / stage / f"seed_{seed}" / "results.json").read_text())
      assert result["seed"] == seed and result["steps"] == 4
      assert result["model"] == avmnist_config.get_config(stage).model.kind
  assert not (workdir / "i2m2_lrtf").exists()  # --fusion=lf (the default)

  # The table: rows in order, the task's columns, the published number beside I2M2.
  table = (workdir / "table.md").read_text()
  assert "| i2m2 | 2 |" in stdout and "72.38" in table
  header = next(line for line in table.splitlines() if line.startswith("| model"))
  assert [c.strip() for c in header.strip("|").split("|")] == [
      "model", "seeds", "test/accuracy", "test/ece", "test/experts/uni_audio",
      "test/experts/uni_image", "test/experts/joint", reproduce.PUBLISHED_COLUMN]
  rows = read_csv(workdir / "table.csv")
  assert [r["model"] for r in rows] == ["uni_image", "uni_audio", "intra", "inter_lf",
                                        "inter_lrtf", "i2m2"]
  by_model = {r["model"]: r for r in rows}
  i2m2_acc = [json.loads((workdir / "i2m2" / f"seed_{s}" / "results.json").read_text())
              ["test"]["accuracy"] for s in (0, 1)]
  assert float(by_model["i2m2"]["test/accuracy_mean"]) == pytest.approx(np.mean(i2m2_acc))
  assert float(by_model["i2m2"]["test/accuracy_std"]) == pytest.approx(np.std(i2m2_acc, ddof=1))
  assert by_model["i2m2"]["test/experts/joint_mean"] != "nan"
  assert by_model["uni_image"]["test/experts/uni_image_mean"] == "nan"  # not a product model
  assert by_model["i2m2"][reproduce.PUBLISHED_COLUMN] == "72.38 (test acc)"
  assert (workdir / "table.png").exists()

  # The overrides reached every stage: the LRTF rank only the LRTF stage.
  lrtf = json.loads((workdir / "inter_lrtf" / "seed_0" / "results.json").read_text())
  assert lrtf["model"] == "inter"
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir / "inter_lrtf" / "seed_0"),
                                  read_only=True) as ckpt:
    factor = ckpt.restore_raw()["params"]["joint"]["fusion"]["factor_0"]
  assert factor.shape[0] == 2 and factor.shape[2] == 8

  # The staged runs started from exactly the stage-1 best checkpoints of the same seed.
  dumps = [pickle.loads(open(p, "rb").read())
           for p in sorted(glob.glob(str(root / "spy" / "*.pkl")))]
  assert len(dumps) == 4  # intra and i2m2, two seeds each
  for dump in dumps:
    sources = checkpointing.parse_init_from(dump["init_from"])
    assert len({os.path.basename(d) for d in sources.values()}) == 1, dump["init_from"]
    expected = ({"uni_image": "uni_image", "uni_audio": "uni_audio", "joint": "inter_lf"}
                if "joint" in sources else {"uni_image": "uni_image", "uni_audio": "uni_audio"})
    assert {e: os.path.basename(os.path.dirname(d)) for e, d in sources.items()} == expected
    assert sorted(dump["params"]) == sorted(expected)
    for expert, directory in sources.items():
      best_step = json.loads(open(os.path.join(directory, "results.json")).read())["best_step"]
      with checkpointing.Checkpointer(checkpointing.checkpoint_dir(directory),
                                      read_only=True) as ckpt:
        saved = ckpt.restore_raw(best_step)
      assert_trees_equal(dump["params"][expert], saved["params"][expert])
      assert_trees_equal(dump["batch_stats"][expert], saved["batch_stats"][expert])

  # A second invocation finds every stage finished: nothing trained or saved, the same table.
  def snapshot():
    return {p: os.stat(p).st_mtime_ns
            for p in glob.glob(str(workdir / "*" / "seed_*" / "results.json"))
            + glob.glob(str(workdir / "*" / "seed_*" / "checkpoints" / "*"))}
  before = snapshot()
  monkeypatch.setattr(train_lib, "train_and_evaluate",
                      lambda *a, **k: pytest.fail("a finished stage was trained again"))
  again = reproduce.reproduce(os.path.join(REPO, "configs", "avmnist.py") + ":smoke", overrides,
                              str(workdir), seeds=2)
  assert snapshot() == before and len(before) >= 12
  assert again in table


def test_mimic_icd9_reproduce_selects_by_auprc(chains):
  proc, root = chains["mimic"]
  finish(proc)
  workdir = root / "run"
  rows = read_csv(workdir / "table.csv")
  assert [r["model"] for r in rows] == ["uni_static", "uni_timeseries", "intra", "inter", "i2m2"]
  assert {"test/accuracy_mean", "test/auroc_mean", "test/auprc_mean", "test/ece_mean",
          "test/experts/uni_static_mean", "test/experts/uni_timeseries_mean",
          "test/experts/joint_mean"} <= set(rows[0])
  assert rows[-1][reproduce.PUBLISHED_COLUMN] == "91.58 (test acc)"
  assert not glob.glob(str(root / "spy" / "*.pkl"))  # MIMIC: every model from scratch
  for stage in mimic_recipe.STAGES:
    directory = workdir / stage / "seed_0"
    result = json.loads((directory / "results.json").read_text())
    assert 0 <= result["test"]["auprc"] <= 1 and 0 <= result["val"]["auroc"] <= 1
    assert checkpointing._recorded_best(checkpointing.checkpoint_dir(directory)) == (
        "auprc", "max")
    with checkpointing.Checkpointer(checkpointing.checkpoint_dir(directory),
                                    read_only=True) as ckpt:
      metas = {s: ckpt.restore_meta(s) for s in ckpt.all_steps()}
    auprc = {s: m["metrics"]["auprc"] for s, m in metas.items() if "metrics" in m}
    assert len(auprc) == 2  # evaluations at steps 2 and 4, both kept
    assert result["val"]["auprc"] == pytest.approx(max(auprc.values()))
    assert auprc[result["best_step"]] == pytest.approx(max(auprc.values()))
