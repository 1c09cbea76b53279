"""The trainer: steps, parallel forms, padded evaluation, checkpoints, resume and expert init."""
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from i2m2_jax import checkpointing, input_pipeline, models, train_lib
from i2m2_jax.datasets import Dataset

NUM_CLASSES = 3
MODALITIES = {"a": (6,), "b": (4, 3)}


def make_split(n, seed):
  """Two modalities with a learnable signal: a's first features and b's mean carry the label."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, n)
  a = rng.normal(size=(n, 6)).astype(np.float32)
  a[np.arange(n), label] += 2.5
  b = rng.normal(size=(n, 4, 3)).astype(np.float32)
  b[np.arange(n), :, label] += 1.5
  return input_pipeline.InMemorySource({"a": a, "b": b, "label": label.astype(np.int64)})


@pytest.fixture(scope="module")
def dataset():
  return Dataset(name="tiny", modalities=MODALITIES, num_classes=NUM_CLASSES,
                 sources={"train": make_split(128, 0), "val": make_split(40, 1),
                          "test": make_split(44, 2)})


def tiny_config(kind="i2m2", **overrides):
  config = default.get_config()
  config.model.kind = kind
  config.model.head_hidden = (16,)
  config.model.encoder_kwargs = {"a": {"features": (16,)}, "b": {"hidden": 8}}
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 12
  config.eval_every_steps = 6
  config.log_every_steps = 3
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "constant"
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides):
  """Sets config fields named by dotted keys ({'optimizer.learning_rate': 0.1}), as the command
  line's --config.optimizer.learning_rate=0.1 does; returns config."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def setup(dataset, config):
  mesh = train_lib.make_mesh()
  model = models.build_model(config.model, dataset.modalities, dataset.num_classes)
  preprocess = train_lib.make_preprocess(dataset, None)
  tx = train_lib.create_optimizer(config.optimizer, config.num_train_steps)
  example = {m: jnp.zeros((1,) + s) for m, s in dataset.modalities.items()}
  state = train_lib.create_train_state(model, tx, example, jax.random.key(0), mesh)
  return mesh, preprocess, state


def batches(dataset, config, n):
  it = input_pipeline.train_batches(dataset.sources["train"], batch_size=config.batch_size,
                                    seed=0, modalities=list(dataset.modalities), prefetch=0)
  return [next(it) for _ in range(n)]


def test_train_step_lowers_loss_without_recompiling(dataset):
  config = tiny_config()
  mesh, preprocess, state = setup(dataset, config)
  step = train_lib.jit_train_step(preprocess, mesh,
                                  step_fn=chex.assert_max_traces(train_lib.train_step, n=1))
  fixed = train_lib.global_batch(batches(dataset, config, 1)[0], mesh)
  losses = []
  for _ in range(15):
    state, sums = step(state, fixed)
    losses.append(float(sums["loss_sum"]) / float(sums["count"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 15


def test_eval_is_exact_over_padded_batches_without_recompiling(dataset):
  config = tiny_config()
  mesh, preprocess, state = setup(dataset, config)
  eval_fn = train_lib.jit_eval_step(preprocess, mesh,
                                    step_fn=chex.assert_max_traces(train_lib.eval_step, n=1))
  source = dataset.sources["test"]  # 44 examples: 2 full batches of 16 and one padded
  result = train_lib.evaluate(eval_fn, state, source, dataset, 16, mesh)
  # Reference: the model on all 44 examples at once, accuracy and NLL in float64.
  full = input_pipeline.gather_batch(source, range(len(source)), list(MODALITIES))
  out = state.apply_fn({"params": state.params}, preprocess(full["inputs"]), train=False)
  logp = np.asarray(out["log_probs"], np.float64)
  labels = full["label"]
  assert result["accuracy"] == pytest.approx(np.mean(logp.argmax(-1) == labels), abs=1e-9)
  assert result["nll"] == pytest.approx(-np.mean(logp[np.arange(len(labels)), labels]), rel=1e-5)
  joint = np.asarray(out["expert_logits"]["joint"])
  assert result["experts"]["joint"] == pytest.approx(np.mean(joint.argmax(-1) == labels))
  assert set(result["experts"]) == {"uni_a", "uni_b", "joint"}


def test_jit_and_pmap_steps_give_the_same_parameters(dataset):
  assert jax.device_count() == 2, "conftest.py sets two fake CPU devices"
  config = tiny_config()
  mesh, preprocess, state = setup(dataset, config)
  data = batches(dataset, config, 4)
  initial_kernel = np.asarray(state.params["joint"]["head"]["dense_0"]["kernel"])  # donated below
  jit_step = train_lib.jit_train_step(preprocess, mesh)
  pmap_step = train_lib.pmapped_train_step(preprocess)
  pmap_state = train_lib.replicate_for_pmap(state)
  jit_state = state
  for local in data:
    jit_state, jit_sums = jit_step(jit_state, train_lib.global_batch(local, mesh))
    pmap_state, pmap_sums = pmap_step(pmap_state, train_lib.split_for_pmap(local))
  np.testing.assert_allclose(float(jit_sums["loss_sum"]), float(pmap_sums["loss_sum"][0]), rtol=1e-5)
  pmap_params = jax.device_get(jax.tree.map(lambda x: x[0], pmap_state.params))
  chex.assert_trees_all_close(jax.device_get(jit_state.params), pmap_params, rtol=1e-5, atol=1e-6)
  # And the parameters did move: the comparison is not between two untouched states.
  assert not np.allclose(initial_kernel, pmap_params["joint"]["head"]["dense_0"]["kernel"])


def test_batch_is_sharded_over_the_data_axis(dataset):
  config = tiny_config()
  mesh, _, _ = setup(dataset, config)
  batch = train_lib.global_batch(batches(dataset, config, 1)[0], mesh)
  shards = batch["inputs"]["a"].addressable_shards
  assert len(shards) == 2 and shards[0].data.shape == (8, 6)


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
  make_step, read = train_lib.jit_train_step, train_lib.to_host

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

  monkeypatch.setattr(train_lib, "jit_train_step", recording_jit_train_step)
  monkeypatch.setattr(train_lib, "to_host", recording_to_host)
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
  mesh = train_lib.make_mesh()
  model = models.build_model(config.model, dataset.modalities, dataset.num_classes)
  tx = train_lib.create_optimizer(config.optimizer, 10)
  example = {m: jnp.zeros((1,) + s) for m, s in dataset.modalities.items()}
  fresh = train_lib.create_train_state(model, tx, example, jax.random.key(0), mesh)
  loaded = train_lib.load_expert_init(fresh, config.model.init_from, mesh)
  chex.assert_trees_all_equal(jax.device_get(loaded.params["uni_a"]), saved)
  chex.assert_trees_all_equal(jax.device_get(loaded.params["joint"]),
                              jax.device_get(fresh.params["joint"]))
  with pytest.raises(ValueError, match="expert 'uni_c'"):
    train_lib.load_expert_init(fresh, f"uni_c={uni_dir}", mesh)


def test_config_errors_fail_before_training(dataset, tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size=15 .*device count \(2\)"):
    train_lib.train_and_evaluate(tiny_config(batch_size=15), str(tmp_path / "a"), dataset=dataset)
  with pytest.raises(ValueError, match=r"config.parallel='vmap'"):
    train_lib.train_and_evaluate(tiny_config(parallel="vmap"), str(tmp_path / "b"), dataset=dataset)
  with pytest.raises(ValueError, match=r"config.model.kind='joint'"):
    train_lib.train_and_evaluate(tiny_config("joint"), str(tmp_path / "c"), dataset=dataset)
  assert not os.path.exists(str(tmp_path / "a" / "checkpoints"))


def test_eval_steps_compile_convolutions_with_xlas_own_implementation_on_cpu():
  """Training keeps XLA's library (YNNPACK) convolutions, evaluation uses XLA's own: the choice
  measured faster for each (train_lib._CPU_EVAL_OPTIONS)."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU compile options")
  x, k = jnp.ones((2, 8, 8, 24)), jnp.ones((3, 3, 24, 32))  # > 16 channels: library-eligible
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def compiled(train):
    return jax.jit(conv, compiler_options=train_lib.compiler_options(train)).lower(
        x, k).compile().as_text()

  assert "__ynn_fusion" in compiled(True)
  text = compiled(False)
  assert "__ynn_fusion" not in text and " convolution(" in text
  # An option this XLA does not know is dropped, not fatal.
  assert not train_lib._accepted((("xla_cpu_no_such_option", True),))


def _random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 5)) * scale, jnp.float32),
          "x": {"b": jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32),
                "k": jnp.asarray(rng.normal(size=(2, 2, 3)) * scale, jnp.float32)},
          "step": jnp.asarray(3, jnp.int32)}  # integer leaves are not part of the norm


@pytest.mark.parametrize("scale", [0.1, 10.0])  # the clip off, then on
def test_clip_by_global_norm_matches_float64_reference_and_optax(scale):
  tree = _random_tree(0, scale)
  floats = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree) if x.dtype == jnp.float32]
  norm = np.sqrt(sum(np.sum(x * x) for x in floats))
  np.testing.assert_allclose(float(train_lib.squared_norm(tree)), norm ** 2, rtol=1e-6)
  grads = {k: v for k, v in tree.items() if k != "step"}
  ours, _ = train_lib.clip_by_global_norm(4.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(4.0).update(grads, optax.EmptyState())
  factor = min(1.0, 4.0 / norm)
  for got, ref, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64) * factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)


def test_non_finite_flags_are_exact():
  tree = _random_tree(1)
  huge = {"a": jnp.asarray([1e30, -2.0], jnp.float32)}  # finite, but its squared norm overflows
  assert float(train_lib._any_nonfinite(tree)) == 0.0
  assert float(train_lib._any_nonfinite(huge)) == 0.0
  assert float(train_lib._nonfinite_norm(huge)) == 1.0  # clipping cannot use that norm
  for bad in (np.nan, np.inf, -np.inf):
    hit = jax.tree.map(lambda x: x, tree)
    hit["x"]["k"] = hit["x"]["k"].at[1, 0, 2].set(bad)
    assert float(train_lib._any_nonfinite(hit)) == 1.0
    assert float(train_lib._nonfinite_norm(hit)) == 1.0


def test_non_finite_loss_stops_with_the_step_and_expert(dataset, tmp_path):
  config = tiny_config(**{"optimizer.learning_rate": 1e30, "optimizer.grad_clip_norm": 0.0})
  with pytest.raises(train_lib.NonFiniteError, match=r"step \d+; experts with non-finite logits"):
    train_lib.train_and_evaluate(config, str(tmp_path / "nan"), dataset=dataset)
