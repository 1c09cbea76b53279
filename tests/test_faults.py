"""Faults and bad input: SIGKILL/SIGTERM and resume, partial checkpoints, non-finite values,
config errors, and evaluation with a modality missing."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from helpers import MODALITIES, NUM_CLASSES, apply_overrides, make_split, tiny_config
from i2m2_jax import (checkpointing, evaluation, input_pipeline, modules, sharding, steps, tasks,
                      train_lib)
from i2m2_jax.datasets import Dataset
from i2m2_jax.experiment import build_experiment, make_preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_config(kind="i2m2", **overrides):
  """tiny_config with MLP encoders only (quick to compile) and a checkpoint every 3 steps."""
  config = tiny_config(kind)
  config.model.encoders = "a=mlp,b=mlp"
  config.model.encoder_kwargs = {"a": {"features": (16,)}, "b": {"features": (16,)}}
  config.checkpoint_every_steps = 3
  config.data.standardize = False
  config.eval_missing_modalities = False
  return apply_overrides(config, overrides)


def tiny_dataset(train=None):
  return Dataset(name="tiny", modalities=MODALITIES, num_classes=NUM_CLASSES,
                 sources={"train": train or make_split(128, 0), "val": make_split(40, 1),
                          "test": make_split(44, 2)})


@pytest.fixture(scope="module")
def dataset():
  return tiny_dataset()


@pytest.fixture(scope="module")
def baseline(dataset, tmp_path_factory):
  """An uninterrupted 12-step run: (workdir, results); keeps all its checkpoints (3 .. 12)."""
  workdir = str(tmp_path_factory.mktemp("faults") / "baseline")
  config = fast_config(keep_checkpoints=4, eval_missing_modalities=True)
  return workdir, train_lib.train_and_evaluate(config, workdir, dataset=dataset)


def copy_of(baseline, tmp_path, up_to=None):
  """A copy of the baseline's workdir holding its checkpoints up to step `up_to`."""
  workdir = str(tmp_path / "run")
  shutil.copytree(baseline[0], workdir)
  for step in complete_steps(workdir):
    if up_to is not None and step > up_to:
      shutil.rmtree(os.path.join(ckpt_dir(workdir), str(step)))
  os.remove(os.path.join(workdir, "results.json"))
  return workdir


def ckpt_dir(workdir):
  return checkpointing.checkpoint_dir(str(workdir))


def complete_steps(workdir):
  """Finished step directories (Orbax renames a save's temporary directory when it is done)."""
  directory = ckpt_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def saved_state(workdir, step=None):
  with checkpointing.Checkpointer(ckpt_dir(workdir), read_only=True) as ckpt:
    return ckpt.restore_raw(step if step is not None else ckpt.latest_step())


def assert_all_checkpoints_finite(workdir):
  steps = complete_steps(workdir)
  for step in steps:
    for leaf in jax.tree.leaves(saved_state(workdir, step)):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.all(np.isfinite(leaf)), step
  return steps


def same_results(a, b):
  for key in ("steps", "best_step", "val", "test", "missing_modality"):
    assert json.loads(json.dumps(a[key])) == json.loads(json.dumps(b[key])), key


# ---------------------------------------------------------------------------------------------
# Kill and resume


CLI_STEPS = ["--config.num_train_steps=80", "--config.checkpoint_every_steps=10",
             "--config.eval_every_steps=40", "--config.log_every_steps=10"]
WAIT_S = 180


def _cli(workdir, data_dir, log):
  return subprocess.Popen(
      [sys.executable, "-m", "i2m2_jax.main", "--config", "configs/synthetic.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *CLI_STEPS],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
      env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})


def _wait_for_step_after(proc, workdir, after: int) -> int:
  """Polls (bounded) until a complete checkpoint after step `after` exists; returns its step."""
  deadline = time.monotonic() + WAIT_S
  while time.monotonic() < deadline:
    steps = [s for s in complete_steps(workdir) if s > after]
    if steps:
      return steps[-1]
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.02)
  raise AssertionError(f"no checkpoint after step {after} within {WAIT_S} s")


def test_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(tmp_path, tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / "synthetic_tfds"  # shared with test_multihost.py
  config = synthetic.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.num_train_steps, config.checkpoint_every_steps = 80, 10
  config.eval_every_steps, config.log_every_steps = 40, 10
  # The uninterrupted run, in this process (same devices and flags as the children's).
  full = train_lib.train_and_evaluate(config, str(tmp_path / "full"), dataset=None)

  workdir = tmp_path / "killed"
  log_path = tmp_path / "run.log"
  start = time.perf_counter()
  with open(log_path, "w") as log:
    # 1. SIGKILL as soon as a checkpoint exists: mid-step, maybe mid-save.
    proc = _cli(workdir, data_dir, log)
    try:
      killed_after = _wait_for_step_after(proc, workdir, 0)
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
      if proc.poll() is None:
        proc.kill()
    assert not (workdir / "results.json").exists()
    resumed_from = complete_steps(workdir)[-1]
    assert resumed_from < 80

    # 2. Restart; SIGTERM once it has made progress: it checkpoints its step and exits 143.
    proc = _cli(workdir, data_dir, log)
    try:
      _wait_for_step_after(proc, workdir, resumed_from)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(timeout=120) == 143
    finally:
      if proc.poll() is None:
        proc.kill()
    # 3. Restart and finish.
    proc = _cli(workdir, data_dir, log)
    try:
      assert proc.wait(timeout=WAIT_S) == 0
    finally:
      if proc.poll() is None:
        proc.kill()
  elapsed = time.perf_counter() - start
  text = log_path.read_text()
  stopped = re.findall(r"Stopped by SIGTERM at step (\d+) after saving a checkpoint", text)
  assert stopped, text[-3000:]
  assert f"Resumed from step {resumed_from} " in text
  assert f"Resumed from step {stopped[-1]} " in text  # the SIGTERM checkpoint is its step
  print(f"SIGKILL after step {killed_after} (resumed from {resumed_from}), SIGTERM at step "
        f"{stopped[-1]}; three runs took {elapsed:.1f} s")

  with open(workdir / "results.json") as f:
    same_results(json.load(f), full)
  chex.assert_trees_all_equal(saved_state(workdir, 80), saved_state(tmp_path / "full", 80))

  assert logged_rows(workdir) == logged_rows(tmp_path / "full")


def logged_rows(workdir):
  """metrics.jsonl without timings; each step once (replayed steps replace their rows)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [{k: v for k, v in row.items() if "per_s" not in k} for row in map(json.loads, f)]
  assert len({row["step"] for row in rows}) == len(rows)
  return rows


def test_preempted_between_log_steps_resumes_the_same_train_log(dataset, baseline, tmp_path,
                                                                monkeypatch):
  """A stop at step 4 (logs every 3): the sums of step 4 go with its checkpoint, so the
  resumed run's step-6 row averages steps 4..6 as the uninterrupted run's does."""
  config = fast_config(keep_checkpoints=4, eval_missing_modalities=True)
  workdir = str(tmp_path / "run")
  monkeypatch.setattr(train_lib._StopSignal, "should_stop", lambda self, step: step == 4)
  with pytest.raises(train_lib.Preempted, match="at step 4"):
    train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  assert complete_steps(workdir) == [3, 4]
  monkeypatch.undo()
  results = train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  same_results(results, baseline[1])
  assert logged_rows(workdir) == logged_rows(baseline[0])


def test_partial_and_truncated_latest_steps_resume_from_the_previous_complete_one(
    dataset, baseline, tmp_path, caplog):
  workdir = copy_of(baseline, tmp_path, up_to=9)
  directory = ckpt_dir(workdir)
  assert complete_steps(workdir) == [3, 6, 9]
  # A later step without Orbax's metadata file (unfinished), a save cut short in its temporary
  # directory, and the latest complete-looking step with its array files truncated.
  shutil.copytree(os.path.join(directory, "9"), os.path.join(directory, "12"))
  os.remove(os.path.join(directory, "12", "_CHECKPOINT_METADATA"))
  shutil.copytree(os.path.join(directory, "9"),
                  os.path.join(directory, "13.orbax-checkpoint-tmp-1234567"))
  data_files = glob.glob(os.path.join(directory, "9", "state", "**", "d", "*"), recursive=True)
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(7)

  caplog.set_level("INFO")
  config = fast_config(keep_checkpoints=4, eval_missing_modalities=True)
  resumed = train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  message = "\n".join(r.getMessage() for r in caplog.records)
  assert "Resuming from step 6, the latest complete checkpoint" in message, message[-2000:]
  assert "[9, 12]" in message and "unfinished (no Orbax metadata)" in message
  discarded = sorted(n.split("-")[0] for n in os.listdir(os.path.join(workdir,
                                                                      "checkpoints_discarded")))
  assert discarded == ["12", "9"]
  assert not os.path.exists(os.path.join(directory, "13.orbax-checkpoint-tmp-1234567"))

  full_dir, full = baseline
  same_results(resumed, full)
  chex.assert_trees_all_equal(saved_state(workdir, 12), saved_state(full_dir, 12))


def test_unreadable_checkpoints_and_nothing_else_stop_the_run(dataset, baseline, tmp_path):
  workdir = copy_of(baseline, tmp_path)
  steps = complete_steps(workdir)
  for step in steps:
    os.remove(os.path.join(ckpt_dir(workdir), str(step), "state", "_METADATA"))
  with pytest.raises(RuntimeError, match=r"none can be restored: step 3: .*Move the directory"):
    train_lib.train_and_evaluate(fast_config(), workdir, dataset=dataset)
  assert complete_steps(workdir) == steps  # nothing moved or deleted


# ---------------------------------------------------------------------------------------------
# Non-finite values


def test_nan_in_one_modality_names_its_experts_and_no_nan_checkpoint_is_written(tmp_path):
  train = make_split(128, 0)
  # An example first used at step 5 (after the checkpoints of steps 3 and 4... every 2 steps).
  index_ds = input_pipeline.train_index_dataset(128, batch_size=16, seed=0)
  earlier = set(np.concatenate([index_ds[k] for k in range(4)]))
  bad = next(int(i) for i in index_ds[4] if int(i) not in earlier)
  columns = dict(train.columns)
  columns["a"] = columns["a"].copy()
  columns["a"][bad, 2] = np.nan
  data = tiny_dataset(input_pipeline.InMemorySource(columns))
  workdir = str(tmp_path / "nan")
  with pytest.raises(train_lib.NonFiniteError) as error:
    train_lib.train_and_evaluate(fast_config(checkpoint_every_steps=2), workdir, dataset=data)
  message = str(error.value)
  assert "Non-finite training loss at step 5; experts with non-finite logits: ['joint', 'uni_a']" \
      in message
  assert "the last good checkpoint (step 4) is kept" in message
  assert assert_all_checkpoints_finite(workdir) == [2, 4]


def test_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(dataset, baseline,
                                                                    tmp_path):
  workdir = copy_of(baseline, tmp_path, up_to=6)  # resumes at step 6
  config = fast_config(**{"optimizer.learning_rate": 1e30})
  with pytest.raises(train_lib.NonFiniteError,
                     match=r"Non-finite .* at step [78]; .*last good checkpoint \(step 6\)"):
    train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  assert assert_all_checkpoints_finite(workdir)[-1] == 6


@pytest.mark.parametrize("sums,expected", [
    ({"loss_sum": 1.0, "nonfinite/uni_a": 0.0, "nonfinite_grads/uni_a": 1.0,
      "nonfinite_grads/joint": 0.0, "nonfinite_params": 1.0},
     r"Non-finite gradient at step 7; experts with non-finite logits: none; experts with "
     r"non-finite gradients: \['uni_a'\]. Nothing of step 7 was saved; the last good checkpoint "
     r"\(step 6\)"),
    ({"loss_sum": 1.0, "nonfinite/uni_a": 0.0, "nonfinite_grads/uni_a": 0.0,
      "nonfinite_params": 1.0},
     r"Non-finite parameters after the update at step 7"),
    ({"loss_sum": np.inf, "nonfinite/joint": 1.0, "nonfinite_params": 0.0},
     r"Non-finite training loss at step 7; experts with non-finite logits: \['joint'\]"),
])
def test_check_finite_names_loss_gradients_and_parameters(sums, expected):
  with pytest.raises(train_lib.NonFiniteError, match=expected):
    train_lib.check_finite(7, sums, 6)
  train_lib.check_finite(7, {"loss_sum": 1.0, "nonfinite/a": 0.0, "nonfinite_grads/a": 0.0,
                              "nonfinite_params": 0.0}, 6)


def test_step_reports_non_finite_gradients_of_each_expert(dataset):
  exp = build_experiment(fast_config(), dataset)
  state, mesh = exp.state, exp.mesh
  # A NaN weight in uni_b's head: its logits, the loss and every gradient turn NaN.
  params = jax.tree.map(np.array, jax.device_get(state.params))  # writable copies
  params["uni_b"]["head"]["dense_0"]["kernel"][0, 0] = np.nan
  state = state.replace(params=jax.device_put(params, sharding.replicated(mesh)))
  step = steps.jit_train_step(exp.task, exp.preprocess, mesh)
  it = input_pipeline.train_batches(dataset.sources["train"], batch_size=16, seed=0,
                                    modalities=list(MODALITIES), prefetch=0)
  _, sums = step(state, sharding.global_batch(next(it), mesh))
  sums = sharding.to_host(sums)
  assert sums["nonfinite/uni_b"] == 1 and sums["nonfinite/uni_a"] == 0
  assert sums["nonfinite_grads/uni_b"] == 1 and sums["nonfinite_params"] == 1
  with pytest.raises(train_lib.NonFiniteError, match=r"logits: \['uni_b'\]"):
    train_lib.check_finite(1, sums)


def test_nan_in_the_train_split_fails_before_training_when_standardising(tmp_path):
  columns = dict(make_split(128, 0).columns)
  columns["b"] = columns["b"].copy()
  columns["b"][3, 1, 2] = np.inf
  data = tiny_dataset(input_pipeline.InMemorySource(columns))
  with pytest.raises(ValueError, match=r"train split of modality 'b' holds NaN or Inf"):
    train_lib.train_and_evaluate(fast_config(**{"data.standardize": True}), str(tmp_path / "x"),
                                 dataset=data)
  assert not os.path.exists(tmp_path / "x" / "checkpoints")


# ---------------------------------------------------------------------------------------------
# Config errors


def test_unknown_config_field_fails_on_the_command_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "i2m2_jax.main", "--config", "configs/synthetic.py:smoke",
       f"--workdir={tmp_path / 'w'}", "--config.model.knd=x"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "'knd'" in proc.stderr and 'Did you mean "kind"' in proc.stderr
  assert not (tmp_path / "w").exists()


def test_modality_names_in_the_config_are_checked(dataset, tmp_path):
  with pytest.raises(ValueError, match=r"config.model.encoders names modality 'c', which the data "
                                       r"set does not have; expected one of \['a', 'b'\]"):
    train_lib.train_and_evaluate(fast_config(**{"model.encoders": "a=mlp,c=mlp"}),
                                 str(tmp_path / "a"), dataset=dataset)
  with pytest.raises(ValueError, match=r"config.model.modality='c' is not a modality .*\['a', 'b'\]"):
    train_lib.train_and_evaluate(fast_config("uni", **{"model.modality": "c"}),
                                 str(tmp_path / "b"), dataset=dataset)
  assert not os.path.exists(tmp_path / "a" / "checkpoints")


def test_resuming_another_models_checkpoint_fails_before_training(dataset, baseline, tmp_path):
  workdir = copy_of(baseline, tmp_path)
  before = complete_steps(workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    train_lib.train_and_evaluate(fast_config(**{"model.head_hidden": (8,)}), workdir,
                                 dataset=dataset)
  message = str(error.value)
  assert f"The checkpoint at step 12 in {ckpt_dir(workdir)} does not match" in message
  assert "config.model.head_hidden: now [8], checkpoint [16]" in message
  assert ("params/joint/head/dense_0/kernel has (32, 16) float32 in the checkpoint but (32, 8) "
          "float32 in the model") in message, message
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"config.model.kind: now 'intra', checkpoint 'i2m2'.*"
                           r"params/joint/.* is in the checkpoint but not in the model"):
    train_lib.train_and_evaluate(fast_config("intra"), workdir, dataset=dataset)
  assert complete_steps(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_discarded"))


def test_init_from_a_checkpoint_of_other_shapes_names_the_arrays(dataset, baseline, tmp_path):
  full_dir, _ = baseline
  config = fast_config(**{"model.head_hidden": (8,), "model.init_from": f"uni_a={full_dir}"})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=rf"config.model.init_from: {re.escape(full_dir)} \(uni_a params\) does "
                           r"not match the model: head/dense_0/bias has \(16,\) float32 in the "
                           r"checkpoint but \(8,\) float32 in the model"):
    train_lib.train_and_evaluate(config, str(tmp_path / "init"), dataset=dataset)
  assert complete_steps(tmp_path / "init") == []


# ---------------------------------------------------------------------------------------------
# Missing modalities


class Echo(nn.Module):
  """A fake expert whose logits are one modality's inputs."""
  modality: str

  def __call__(self, inputs, train=False):
    return inputs[self.modality]


class Mix(nn.Module):
  """A fake joint expert reading both modalities."""

  def __call__(self, inputs, train=False):
    return inputs["a"] - 0.5 * inputs["b"]


FAKE_EXPERTS = {"uni_a": Echo("a"), "uni_b": Echo("b"), "joint": Mix()}


FAKE_READS = {"uni_a": ("a",), "uni_b": ("b",), "joint": ("a", "b")}


def fake_state(expert_names, mesh):
  """(state, layout) of a classifier of fake experts."""
  model = modules.MultiModalClassifier(tuple((n, FAKE_EXPERTS[n]) for n in expert_names))
  state = steps.TrainState.create(apply_fn=model.apply, params={}, tx=optax.sgd(0.1),
                                  batch_stats={}, dropout_rng=jnp.zeros(2, jnp.uint32))
  return (jax.device_put(state, sharding.replicated(mesh)),
          {n: FAKE_READS[n] for n in expert_names})


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_missing_modality_evaluation_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  n, c = 37, 3  # 37: the last batch is padded
  a = rng.normal(size=(n, c)).astype(np.float32) * 2
  b = rng.normal(size=(n, c)).astype(np.float32) * 2
  label = rng.integers(0, c, n)
  source = input_pipeline.InMemorySource({"a": a, "b": b, "label": label})
  data = Dataset(name="fake", modalities={"a": (c,), "b": (c,)}, num_classes=c,
                 sources={"train": source, "val": source, "test": source})
  mesh = sharding.make_mesh()
  preprocess = make_preprocess(list(data.modalities), None)
  task = tasks.MulticlassTask(c)
  state, layout = fake_state(["uni_a", "uni_b", "joint"], mesh)  # i2m2

  def without(state, layout, missing, source=source, **kwargs):
    return evaluation.evaluate_without(state, missing, source, data, task, layout, 8, mesh,
                                       preprocess=preprocess, **kwargs)

  def hand(logp):
    return {"accuracy": np.mean(logp.argmax(-1) == label),
            "nll": -np.mean(logp[np.arange(n), label])}

  def check(result, logp):
    want = hand(logp)
    assert result["count"] == n
    assert result["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert result["nll"] == pytest.approx(want["nll"], rel=1e-5)

  full = evaluation.evaluate(steps.jit_eval_step(task, preprocess, mesh), state, source, data,
                             task, 8, mesh)
  check(full, log_softmax(log_softmax(a) + log_softmax(b) + log_softmax(a - 0.5 * b)))
  without_b = without(state, layout, "b")
  check(without_b, log_softmax(a))  # the product of the remaining uni-modal expert: uni_a
  assert without_b["experts_used"] == ["uni_a"] and set(without_b["experts"]) == {"uni_a"}
  check(without(state, layout, "a"), log_softmax(b))

  # The missing modality's values are never used: NaN there changes nothing.
  nan_b = input_pipeline.InMemorySource({"a": a, "b": np.full_like(b, np.nan), "label": label})
  assert without(state, layout, "b", source=nan_b) == without_b

  # intra: the same experts without the joint one.
  check(without(*fake_state(["uni_a", "uni_b"], mesh), "a"), log_softmax(b))

  # inter, and uni on the missing modality, cannot: an error, not a number.
  with pytest.raises(ValueError, match=r"config.model.kind='inter' cannot predict without "
                                       r"modality 'a': every expert it has \(\['joint'\]\)"):
    without(*fake_state(["joint"], mesh), "a", kind="inter")
  uni_a, uni_a_layout = fake_state(["uni_a"], mesh)
  with pytest.raises(ValueError, match=r"kind='uni' cannot predict without modality 'a'"):
    without(uni_a, uni_a_layout, "a", kind="uni")
  with pytest.raises(ValueError, match=r"modality 'c': it is not a modality"):
    without(state, layout, "c")
  report = evaluation.evaluate_missing_modalities(uni_a, source, data, task, uni_a_layout, 8,
                                                  mesh, preprocess=preprocess, kind="uni")
  assert "cannot predict without modality 'a'" in report["a"]["unavailable"]
  check(report["b"], log_softmax(a))


def test_results_json_reports_each_missing_modality(baseline):
  workdir, results = baseline
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert set(on_disk["missing_modality"]) == {"a", "b"}
  assert on_disk["missing_modality"]["a"]["experts_used"] == ["uni_b"]
  assert on_disk["missing_modality"]["b"]["experts_used"] == ["uni_a"]
  for m in ("a", "b"):
    assert 0.0 <= on_disk["missing_modality"][m]["accuracy"] <= 1.0
    assert on_disk["missing_modality"][m]["count"] == 44
  # The product of one uni-modal expert ranks classes as that expert does.
  assert on_disk["missing_modality"]["b"]["accuracy"] == pytest.approx(
      on_disk["test"]["experts"]["uni_a"])
  assert results["missing_modality"] == on_disk["missing_modality"]
