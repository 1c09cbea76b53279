"""The trainer end to end: results, resume, logs, expert initialisation, checkpoint selection and
config errors."""
import json
import os
import shutil

import chex
import jax
import pytest

from helpers import NUM_CLASSES, tiny_config, tiny_dataset
from i2m2_jax import checkpointing, sharding, steps, train_lib
from i2m2_jax.experiment import build_experiment


@pytest.fixture(scope="module")
def dataset():
  return tiny_dataset()


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_and_evaluate_writes_results_and_resumes(dataset, tmp_path):
  config = tiny_config()
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(results))
  for split in ("val", "test"):
    assert set(on_disk[split]) >= {"accuracy", "nll", "ece", "experts"}
    assert set(on_disk[split]["experts"]) == {"uni_a", "uni_b", "joint"}
  assert on_disk["model"] == "i2m2" and on_disk["dataset"] == "tiny"
  assert on_disk["steps"] == 12 and on_disk["seed"] == 0 and on_disk["train_examples_per_s"] > 0
  assert on_disk["test"]["accuracy"] > 1.0 / NUM_CLASSES + 0.15
  logged = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert any("train/loss" in row for row in logged) and any("val/accuracy" in row for row in logged)

  # Same workdir, longer run: resumes at step 12 instead of starting again.
  longer = tiny_config(num_train_steps=18)
  resumed = train_lib.train_and_evaluate(longer, workdir, dataset=dataset)
  assert resumed["steps"] == 18
  train_steps = [row["step"] for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                 if "train/loss" in row]
  assert train_steps == [3, 6, 9, 12, 15, 18]


def test_next_step_is_dispatched_before_the_host_waits_for_the_last(dataset, tmp_path,
                                                                    monkeypatch):
  """One step in flight: step n+1 goes to the device before step n's metric sums are read, except
  where step n is evaluated or saved (its sums are checked first)."""
  events, sums_step = [], {}
  make_step, read = steps.jit_train_step, sharding.to_host

  def recording_jit_train_step(*args, **kwargs):
    step_fn = make_step(*args, **kwargs)

    def dispatch(state, batch):
      new_state, sums = step_fn(state, batch)
      events.append(("dispatch", len(sums_step) + 1))
      sums_step[id(sums)] = len(sums_step) + 1
      return new_state, sums
    return dispatch

  def recording_to_host(tree):
    if id(tree) in sums_step:
      events.append(("read", sums_step[id(tree)]))
    return read(tree)

  monkeypatch.setattr(steps, "jit_train_step", recording_jit_train_step)
  monkeypatch.setattr(sharding, "to_host", recording_to_host)
  train_lib.train_and_evaluate(tiny_config(num_train_steps=8, eval_every_steps=4),
                               str(tmp_path / "run"), dataset=dataset)
  order = {event: i for i, event in enumerate(events)}
  assert sorted(order) == sorted([(e, n) for n in range(1, 9) for e in ("dispatch", "read")])
  for n in (1, 2, 3, 5, 6, 7):  # overlapped with the next step
    assert order[("dispatch", n + 1)] < order[("read", n)]
  for n in (4, 8):  # evaluated and saved: read before the next step is dispatched
    assert order[("read", n)] < order.get(("dispatch", n + 1), len(events))


def test_resumed_run_matches_uninterrupted_run(dataset, tmp_path):
  full = train_lib.train_and_evaluate(tiny_config(), str(tmp_path / "full"), dataset=dataset)
  part = str(tmp_path / "part")
  train_lib.train_and_evaluate(tiny_config(num_train_steps=6), part, dataset=dataset)
  resumed = train_lib.train_and_evaluate(tiny_config(), part, dataset=dataset)
  assert resumed["val"] == full["val"] and resumed["test"] == full["test"]


def test_expert_initialised_from_another_runs_checkpoint(dataset, tmp_path):
  uni_dir = str(tmp_path / "uni_a")
  train_lib.train_and_evaluate(tiny_config("uni", **{"model.modality": "a"}), uni_dir,
                               dataset=dataset)
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(uni_dir), read_only=True) as ckpt:
    saved = ckpt.restore_raw(ckpt.best_step())["params"]["uni_a"]

  config = tiny_config(**{"model.init_from": f"uni_a={uni_dir}"})
  exp = build_experiment(config, dataset, stats=None)
  fresh, mesh = exp.state, exp.mesh
  loaded = checkpointing.load_expert_init(fresh, config.model.init_from, mesh)
  chex.assert_trees_all_equal(jax.device_get(loaded.params["uni_a"]), saved)
  chex.assert_trees_all_equal(jax.device_get(loaded.params["joint"]),
                              jax.device_get(fresh.params["joint"]))
  with pytest.raises(ValueError, match="expert 'uni_c'"):
    checkpointing.load_expert_init(fresh, f"uni_c={uni_dir}", mesh)


def test_non_finite_loss_stops_with_the_step_and_expert(dataset, tmp_path):
  config = tiny_config(**{"optimizer.learning_rate": 1e30, "optimizer.grad_clip_norm": 0.0})
  with pytest.raises(train_lib.NonFiniteError, match=r"step \d+; experts with non-finite logits"):
    train_lib.train_and_evaluate(config, str(tmp_path / "nan"), dataset=dataset)


def val_rows(workdir):
  return [row for row in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "val/nll" in row]


@pytest.mark.parametrize("metric", ["nll", "ece", "accuracy"])
def test_best_checkpoint_follows_the_metrics_direction(dataset, tmp_path, metric):
  """nll and ece: lower is better; accuracy: higher (among equal values, the latest step)."""
  workdir = str(tmp_path / metric)
  config = tiny_config(num_train_steps=10, eval_every_steps=2, selection_metric=metric,
                       **{"optimizer.learning_rate": 3e-2})
  results = train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  values = {row["step"]: row[f"val/{metric}"] for row in val_rows(workdir)}
  assert len(set(values.values())) > 1  # the choice matters
  best = (min if metric != "accuracy" else max)(values.values())
  assert results["best_step"] == max(s for s, v in values.items() if v == best)
  assert results["selection_metric"] == metric
  assert results["val"][metric] == pytest.approx(best)


def test_an_unknown_selection_metric_fails_before_anything_is_written(dataset, tmp_path):
  for metric, allowed in (("acc", "'accuracy', 'ece', 'nll'"), ("auprc", "auroc and auprc need 2")):
    with pytest.raises(ValueError, match=f"config.selection_metric='{metric}'.*{allowed}"):
      train_lib.train_and_evaluate(tiny_config(selection_metric=metric), str(tmp_path / metric),
                                   dataset=dataset)
    assert not os.path.exists(tmp_path / metric)


def test_a_resumed_run_logs_each_step_once(dataset, tmp_path):
  """A run killed between checkpoints reruns the steps after its last one; its logs keep one
  record per step, equal to those of the run that was never interrupted."""
  config = tiny_config(checkpoint_every_steps=3, eval_every_steps=6)
  full = str(tmp_path / "full")
  train_lib.train_and_evaluate(config, full, dataset=dataset)
  killed = str(tmp_path / "killed")
  train_lib.train_and_evaluate(config, killed, dataset=dataset)
  # As if killed after logging step 12 but before its checkpoint and results were written.
  os.remove(os.path.join(killed, "results.json"))
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(killed), "12"))
  resumed = train_lib.train_and_evaluate(config, killed, dataset=dataset)
  assert [r["start_step"] for r in read_jsonl(os.path.join(killed, "runs.jsonl"))] == [0, 9]
  assert resumed["steps"] == 12
  rows = read_jsonl(os.path.join(killed, "metrics.jsonl"))
  steps_logged = [row["step"] for row in rows]
  assert steps_logged == sorted(set(steps_logged)) == [3, 6, 9, 12]
  drop_timing = lambda row: {k: v for k, v in row.items() if "per_s" not in k}  # noqa: E731
  assert [drop_timing(r) for r in rows] == [drop_timing(r) for r in
                                            read_jsonl(os.path.join(full, "metrics.jsonl"))]


def test_a_finished_run_is_not_run_again_and_each_start_is_recorded(dataset, tmp_path):
  workdir = str(tmp_path / "run")
  first = train_lib.train_and_evaluate(tiny_config(), workdir, dataset=dataset)
  logged = open(os.path.join(workdir, "metrics.jsonl")).read()
  again = train_lib.train_and_evaluate(tiny_config(), workdir, dataset=dataset)
  assert again == json.loads(json.dumps(first))
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == logged  # nothing written twice
  # A resume with changed fields: hparams.json shows what ran last, runs.jsonl every start.
  train_lib.train_and_evaluate(tiny_config(num_train_steps=15, **{"optimizer.learning_rate": 1e-3}),
                               workdir, dataset=dataset)
  hparams = json.load(open(os.path.join(workdir, "hparams.json")))
  assert hparams["num_train_steps"] == 15 and hparams["optimizer.learning_rate"] == 1e-3
  starts = read_jsonl(os.path.join(workdir, "runs.jsonl"))
  assert [s["start_step"] for s in starts] == [0, 12]
  assert any(c.startswith("config.optimizer.learning_rate: now 0.001") for c in starts[1]["changed"])


@pytest.mark.parametrize("field,value,message", [
    ("model.kind", "joint", "config.model.kind='joint' is unknown"),
    ("model.modality", "c", "config.model.modality='c'"),
    ("model.fusion", "tensor", "config.model.fusion='tensor' is unknown"),
    ("model.encoders", "a=transformer", "config.model.encoders: a='transformer' is unknown"),
    ("model.encoders", "z=mlp", "config.model.encoders names modality 'z'"),
    ("model.expert_inputs", "joint=a+q", "expert 'joint' reads ['a', 'q']"),
    ("model.implementation", "turbo", "config.model.implementation='turbo' is unknown"),
    ("model.compute_dtype", "float16", "config.model.compute_dtype='float16' is unknown"),
    ("model.init_from", "uni_a", "init_from entry 'uni_a'"),
    ("model.init_from", "uni_a=/no/such/run", "has no checkpoints"),
    ("optimizer.name", "lion", "config.optimizer.name='lion' is unknown"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule='linear' is unknown"),
    ("task.name", "regression", "config.task.name='regression' is unknown"),
    ("task.loss", "mse", "config.task.loss='mse' is unknown"),
    ("task.class_weights", "balanced", "applies to the multilabel task only"),
    ("selection_metric", "auroc", "config.selection_metric='auroc'"),
    ("parallel", "vmap", "config.parallel='vmap' is unknown"),
    ("batch_size", 15, "config.batch_size=15 must be a positive multiple"),
    ("eval_batch_size", 0, "config.eval_batch_size=0 must be a positive multiple"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be >= 1"),
])
def test_every_config_field_is_checked_before_the_workdir_is_written(dataset, tmp_path, field,
                                                                     value, message):
  kind = "uni" if field == "model.modality" else "i2m2"
  with pytest.raises(ValueError) as error:
    train_lib.train_and_evaluate(tiny_config(kind, **{field: value}), str(tmp_path / "w"),
                                 dataset=dataset)
  assert message in str(error.value)
  assert not (tmp_path / "w").exists()


def test_epoch_evaluations_are_spaced_by_min_steps_and_weight_decay_follows_the_data(dataset,
                                                                                     tmp_path):
  """128 examples of batch 16 are an 8-step epoch: evaluated every 10 steps (and at the end)
  with min_steps_between_evals=10; weight decay 0.5 for 64 examples is 0.25 for these 128."""
  config = tiny_config("inter", **{"num_train_steps": 25, "eval_every_steps": -1,
                                   "min_steps_between_evals": 10,
                                   "optimizer.weight_decay": 0.5,
                                   "optimizer.weight_decay_examples": 64,
                                   "eval_missing_modalities": False})
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(config, workdir, dataset=dataset)
  evaluated = [row["step"] for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
               if "val/accuracy" in row]
  assert evaluated == [10, 20, 25]
  assert results["weight_decay"] == pytest.approx(0.25)
