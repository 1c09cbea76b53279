"""The fast implementation (the i2m2_jax/fast package) computes the plain modules' function.

Checked against models.build_model's MultiModalClassifier on random inputs: outputs in eval and
train mode, BatchNorm statistic updates, gradients, the trainer's sharded train step, the layout
conversion and init_from across implementations; and a smoke run of experiments/benchmark.py.
The real AV-MNIST I2M2 is covered once at batch 2; other cases use smaller LeNets.
"""
import functools
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import avmnist as avmnist_config
from configs import default as default_config
from i2m2_jax import checkpointing
from i2m2_jax import models
from i2m2_jax import paper_models
from i2m2_jax import evaluation
from i2m2_jax import input_pipeline
from i2m2_jax import modules
from i2m2_jax import sharding
from i2m2_jax import steps
from i2m2_jax import tasks
from i2m2_jax import train_lib
from i2m2_jax.datasets import Dataset
from i2m2_jax.experiment import build_experiment, create_train_state, make_preprocess
from i2m2_jax.optim import create_optimizer
from i2m2_jax.fast import FastLeNetClassifier
from i2m2_jax.fast import classifier as fast_classifier
from i2m2_jax.fast import ops as fast_ops
from helpers import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVMNIST_SHAPES = {"image": (28, 28, 1), "audio": (112, 112, 1)}
SMALL_SHAPES = {"image": (28, 28, 1), "audio": (28, 28, 1)}
TINY_SHAPES = {"image": (12, 12, 1), "audio": (12, 12, 1)}
KEY = jax.random.key(0, impl="rbg")  # threefry's init compiles slowly on CPU


def small_model_config(kind="i2m2", modality="", num_blocks=3, **overrides):
  """LeNets of the AV-MNIST structure (uni-modal c=3/2, joint c=6/4), `num_blocks` blocks after
  the first (3 for 28x28 inputs; 1 for the tiny 12x12 ones that keep compilation short)."""
  config = default_config.get_config().model
  config.kind, config.modality = kind, modality
  config.encoders = "image=lenet,audio=lenet"
  config.encoder_kwargs = ml_collections.ConfigDict({
      "image": {"channels": 3, "num_blocks": num_blocks},
      "audio": {"channels": 2, "num_blocks": num_blocks}})
  config.joint_encoder_kwargs = ml_collections.ConfigDict({
      "image": {"channels": 6, "num_blocks": num_blocks},
      "audio": {"channels": 4, "num_blocks": num_blocks}})
  config.head_hidden = (16,)
  for k, v in overrides.items():
    config[k] = v
  return config


def build_pair(model_config, shapes, num_classes=10):
  plain = models.build_model(model_config, shapes, num_classes)
  fast_config = model_config.copy_and_resolve_references()
  fast_config.implementation = "fast"
  fast = models.build_model(fast_config, shapes, num_classes)
  return plain, fast


def random_inputs(shapes, batch, seed=0):
  """Inputs as the trainer feeds them: uint8 1..255 scaled to (0, 1]."""
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.integers(1, 256, (batch,) + s).astype(np.float32) / 255.0)
          for m, s in shapes.items()}


def perturbed(variables, seed=1):
  """BatchNorm scales/biases and running statistics moved off their init (some scales
  negative, so the pool's min branch is exercised), other parameters kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if "'scale'" in name:
      x = x * rng.choice([-1.0, 1.0], x.shape, p=[0.25, 0.75]) + 0.1 * rng.normal(size=x.shape)
    elif "'bias'" in name and "bn_" in name or "'mean'" in name:
      x = x + 0.1 * rng.normal(size=x.shape)
    elif "'var'" in name:
      x = x * rng.uniform(0.5, 1.5, x.shape)
    out.append(jnp.asarray(x, jnp.float32))
  return jax.tree.unflatten(treedef, out)


def everything(model, variables, x, labels):
  """Eval outputs, train outputs with the new batch_stats, and gradients of the loss."""
  eval_out = model.apply(variables, x, train=False)
  train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(out["log_probs"], labels[:, None], axis=1))

  return eval_out, train_out, updates["batch_stats"], jax.grad(loss)(variables["params"])


def assert_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(float(np.abs(x).max()), 1e-6)
    np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * scale,
                               err_msg=jax.tree_util.keystr(path))


def check_same_function(model_config, shapes, batch, seed=0):
  plain, fast = build_pair(model_config, shapes)
  x = random_inputs(shapes, batch, seed)
  plain_vars = jax.jit(plain.init)(KEY, x)
  fast_vars = jax.jit(fast.init)(KEY, x)
  # Same variables, same initial values.
  chex.assert_trees_all_equal(plain_vars, fast_vars)
  variables = perturbed(plain_vars)
  labels = jnp.asarray(np.random.default_rng(seed).integers(0, 10, batch))
  want = jax.jit(lambda v: everything(plain, v, x, labels))(variables)
  got = jax.jit(lambda v: everything(fast, v, x, labels))(variables)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  eval_want, train_want, stats_want, grads_want = want
  eval_got, train_got, stats_got, grads_got = got
  assert_close(eval_want, eval_got, rtol=1e-4, atol=1e-5)
  assert_close(train_want, train_got, rtol=1e-4, atol=1e-5)
  assert_close(stats_want, stats_got, rtol=1e-4, atol=1e-5)
  assert_close(grads_want, grads_got, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Same function


def test_real_avmnist_i2m2_same_function_at_batch_2():
  check_same_function(avmnist_config.get_config("i2m2").model, AVMNIST_SHAPES, batch=2)


@pytest.mark.parametrize("kind,modality", [("uni", "audio"), ("inter", ""), ("intra", "")])
def test_other_kinds_same_function(kind, modality):
  check_same_function(small_model_config(kind, modality, num_blocks=1), TINY_SHAPES, batch=4)


def test_odd_sizes_and_unfused_paths_same_function():
  # 27x27: the first block cannot use space-to-depth (odd); 7x7 pools drop a row and a column.
  shapes = {"image": (27, 27, 1), "audio": (14, 14, 2)}
  check_same_function(small_model_config(num_blocks=1), shapes, batch=3)
  # The same model with the first-block optimisations switched off gives the same outputs
  # (cpu_kernels=False: the XLA implementation of the first block).
  plain, fast = build_pair(small_model_config(num_blocks=1), TINY_SHAPES)
  x = random_inputs(TINY_SHAPES, 4)
  variables = perturbed(jax.jit(plain.init)(KEY, x))
  want = jax.jit(lambda v: plain.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  for options in ({"cpu_kernels": False}, {"stem_matmul": False},
                  {"fuse_first_conv": False, "use_s2d": False, "stem_matmul": False}):
    variant = fast.clone(**options)
    got = jax.jit(lambda v, m=variant: m.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables)
    assert_close(want, got, rtol=1e-4, atol=1e-5)


def test_stem_block_matches_reference_and_input_gradient():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 12, 16, 2)), jnp.float32)
  k = jax.random.normal(jax.random.key(1), (5, 5, 2, 5)) * 0.3
  scale, bias = jnp.array([1.0, -0.5, 0.7, 0.0001, -2.0]), jnp.linspace(-0.2, 0.3, 5)
  cot = jax.random.normal(jax.random.key(2), (6, 6, 8, 5))

  def reference(x, k, scale, bias):
    y = paper_models.conv2d(x, k, 2)
    return fast_ops.bn_relu_pool(y, scale, bias, "nhwc")

  # (backward chunk, forward chunk): the forward pass in larger chunks regroups its saved
  # pooling choices for the backward pass's chunks.
  for chunk, forward_chunk in ((1, 0), (4, 0), (2, 6), (1, 3)):
    stem = functools.partial(fast_ops.stem_bn_relu_pool, chunk=chunk,
                             forward_chunk=forward_chunk)
    assert_close(reference(x, k, scale, bias), stem(x, k, scale, bias), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a)[0] * cot), argnums=(0, 1, 2, 3))(
        x, k, scale, bias) for f in (reference, stem)]
    assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_forward_chunk_is_a_multiple_of_the_backward_chunk_dividing_the_batch():
  assert fast_ops._forward_chunk_size(40, 4, 20) == 20  # pylint: disable=protected-access
  assert fast_ops._forward_chunk_size(256, 4, 20) == 16  # pylint: disable=protected-access
  assert fast_ops._forward_chunk_size(36, 4, 20) == 12  # pylint: disable=protected-access
  assert fast_ops._forward_chunk_size(6, 3, 0) == 3  # pylint: disable=protected-access


@pytest.fixture
def rbg_default_prng():
  """The 'rbg' PRNG as default (threefry's parameter initialisation compiles slowly on CPU)."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


def test_trainer_step_on_two_devices_same_update(rbg_default_prng):
  """train_lib's jitted step (batch sharded over the 2 test devices, state donated) makes the
  same updates with either implementation, starting from the same state."""
  del rbg_default_prng
  assert jax.device_count() == 2
  shapes = {"image": (8, 8, 1), "audio": (12, 12, 1)}
  model_config = small_model_config(num_blocks=1)
  plain, fast = build_pair(model_config, shapes)
  mesh = sharding.make_mesh()
  tx = create_optimizer(avmnist_config.get_config("i2m2").optimizer, 100)
  example = {m: jnp.zeros((1,) + s) for m, s in shapes.items()}
  preprocess = make_preprocess(list(shapes), None)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
      {"inputs": {m: rng.integers(1, 256, (8,) + s, dtype=np.uint8) for m, s in shapes.items()},
       "label": rng.integers(0, 10, 8).astype(np.int32), "mask": np.ones(8, bool)}, mesh)
  results = []
  for model in (plain, fast):
    state = create_train_state(model, tx, example, jax.random.key(0), mesh)
    step = steps.jit_train_step(tasks.MulticlassTask(10), preprocess, mesh)
    for _ in range(2):
      state, sums = step(state, batch)
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                    sharding.to_host(sums)["loss_sum"]))
  assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)


def test_fast_run_reports_the_plain_models_missing_modality_numbers(tmp_path, rbg_default_prng):
  """A fast model trained through train_and_evaluate reports, for each missing modality, the
  numbers the plain model gives on the same weights (the trainer asks models.expert_layout which
  experts read what, whatever the implementation)."""
  del rbg_default_prng
  rng = np.random.default_rng(0)
  label = rng.integers(0, 10, 48)
  columns = {m: rng.integers(1, 256, (48,) + s, dtype=np.uint8) for m, s in TINY_SHAPES.items()}
  source = input_pipeline.InMemorySource({**columns, "label": label})
  dataset = Dataset(name="tiny_av", modalities=dict(TINY_SHAPES), num_classes=10,
                    sources={"train": source, "val": source, "test": source})
  config = default_config.get_config()
  config.model = small_model_config(num_blocks=1, implementation="fast")
  config.data.standardize = False
  config.batch_size, config.eval_batch_size, config.num_train_steps = 16, 16, 4
  config.eval_every_steps = config.log_every_steps = 4
  results = train_lib.train_and_evaluate(config, str(tmp_path / "fast"), dataset=dataset)
  missing = results["missing_modality"]
  assert missing["image"]["experts_used"] == ["uni_audio"]
  assert missing["audio"]["experts_used"] == ["uni_image"]

  plain_config = config.copy_and_resolve_references()
  plain_config.model.implementation = "plain"
  exp = build_experiment(plain_config, dataset, stats=None)
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path / "fast")),
                                  read_only=True) as ckpt:
    state = ckpt.restore(results["best_step"], exp.state)
  plain = evaluation.evaluate_missing_modalities(state, source, dataset, exp.task, exp.layout, 16,
                                                 exp.mesh, preprocess=exp.preprocess, kind="i2m2")
  for m in TINY_SHAPES:
    assert missing[m]["accuracy"] == pytest.approx(plain[m]["accuracy"], abs=1e-9)
    assert missing[m]["nll"] == pytest.approx(plain[m]["nll"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Layout, checkpoints, configuration


def test_variable_conversion_round_trip():
  plain, fast = build_pair(avmnist_config.get_config("i2m2").model, AVMNIST_SHAPES)
  x = {m: jnp.zeros((1,) + s) for m, s in AVMNIST_SHAPES.items()}
  plain_shapes = jax.eval_shape(lambda: plain.init(KEY, x))
  fast_shapes = jax.eval_shape(lambda: fast.init(KEY, x))
  variables = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape), fast_shapes)
  as_plain = fast_classifier.to_plain_variables(variables, plain_shapes)
  back = fast_classifier.from_plain_variables(as_plain, fast_shapes)
  chex.assert_trees_all_equal(back, variables)
  chex.assert_trees_all_equal_shapes(as_plain, plain_shapes)
  wrong = {"params": {"uni_image": variables["params"]["uni_image"]}}
  with pytest.raises(ValueError, match="layout"):
    fast_classifier.to_plain_variables(wrong, plain_shapes)


def _save_state(workdir, model_config, shapes):
  model = models.build_model(model_config, shapes, 10)
  mesh = sharding.make_mesh()
  tx = create_optimizer(default_config.get_config().optimizer, 10)
  state = create_train_state(model, tx, {m: jnp.zeros((1,) + s) for m, s in shapes.items()},
                             jax.random.key(3), mesh)
  state = state.replace(params=perturbed(state.params, seed=5),
                        batch_stats=perturbed(state.batch_stats, seed=6))
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir)) as ckpt:
    ckpt.save(1, state, metrics={"accuracy": 0.5}, force=True)
  return jax.device_get(state)


@pytest.mark.parametrize("saved_with,loaded_into", [("fast", "plain"), ("plain", "fast")])
def test_init_from_across_implementations(tmp_path, saved_with, loaded_into, rbg_default_prng):
  """Experts trained alone with one implementation initialise I2M2 with the other."""
  del rbg_default_prng
  uni = small_model_config("uni", "audio", num_blocks=1, implementation=saved_with)
  joint = small_model_config("inter", num_blocks=1, implementation=saved_with)
  saved_uni = _save_state(str(tmp_path / "uni_audio"), uni, TINY_SHAPES)
  saved_joint = _save_state(str(tmp_path / "inter"), joint, TINY_SHAPES)
  i2m2 = small_model_config(num_blocks=1, implementation=loaded_into)
  model = models.build_model(i2m2, TINY_SHAPES, 10)
  mesh = sharding.make_mesh()
  tx = create_optimizer(default_config.get_config().optimizer, 10)
  state = create_train_state(model, tx, {m: jnp.zeros((1,) + s) for m, s in TINY_SHAPES.items()},
                             jax.random.key(0), mesh)
  spec = f"uni_audio={tmp_path / 'uni_audio'},joint={tmp_path / 'inter'}"
  loaded = jax.device_get(checkpointing.load_expert_init(state, spec, mesh))
  chex.assert_trees_all_equal(loaded.params["uni_audio"], saved_uni.params["uni_audio"])
  chex.assert_trees_all_equal(loaded.batch_stats["joint"], saved_joint.batch_stats["joint"])
  chex.assert_trees_all_equal(loaded.params["uni_image"], jax.device_get(state.params["uni_image"]))


def test_build_model_selects_and_rejects():
  config = small_model_config()
  assert isinstance(models.build_model(config, SMALL_SHAPES, 10), modules.MultiModalClassifier)
  config.implementation = "fast"
  assert isinstance(models.build_model(config, SMALL_SHAPES, 10), FastLeNetClassifier)
  assert default_config.get_config().model.implementation == "plain"
  with pytest.raises(ValueError, match="implementation='fast' supports the late_fusion"):
    models.build_model(small_model_config(fusion="lrtf", implementation="fast"), SMALL_SHAPES, 10)
  bad = small_model_config(implementation="fast")
  bad.encoders = "image=lenet,audio=cnn"
  with pytest.raises(ValueError, match=r"encoders.audio is 'cnn'"):
    models.build_model(bad, SMALL_SHAPES, 10)
  bad = small_model_config(implementation="fast")
  bad.encoder_kwargs.image.batch_stats_at_eval = True
  with pytest.raises(ValueError, match="batch_stats_at_eval"):
    models.build_model(bad, SMALL_SHAPES, 10)
  with pytest.raises(ValueError, match=r"implementation='turbo' is unknown"):
    models.build_model(small_model_config(implementation="turbo"), SMALL_SHAPES, 10)


def test_fast_package_is_imported_only_by_build_model():
  """`import i2m2_jax`, and importing every other module of it, leave the opt-in fast package
  unloaded; models.build_model imports it for implementation='fast'. In a fresh process, since
  this test module imports the package itself."""
  script = textwrap.dedent("""
      import importlib, json, pkgutil, sys
      import i2m2_jax

      def loaded():
        return sorted(m for m in sys.modules if m.startswith("i2m2_jax.fast"))

      def import_all_but_fast(package):  # pkgutil.walk_packages would import the fast package
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
          if info.name != "i2m2_jax.fast":
            module = importlib.import_module(info.name)
            if info.ispkg:
              import_all_but_fast(module)

      after_init = loaded()
      import_all_but_fast(i2m2_jax)
      after_all = loaded()
      from configs import avmnist
      from i2m2_jax import models
      config = avmnist.get_config("i2m2").model
      config.implementation = "fast"
      model = models.build_model(config, {"image": (28, 28, 1), "audio": (112, 112, 1)}, 10)
      print(json.dumps([after_init, after_all, type(model).__module__, type(model).__name__]))
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  after_init, after_all, module, name = json.loads(result.stdout.splitlines()[-1])
  assert after_init == [] and after_all == []
  assert (module, name) == ("i2m2_jax.fast.classifier", "FastLeNetClassifier")


# ---------------------------------------------------------------------------------------------
# The benchmark


def test_benchmark_flop_count_by_hand():
  benchmark = import_experiment("benchmark")
  config = avmnist_config.get_config("i2m2").model
  flops = benchmark.model_flops(config)
  # Image LeNet(1,c,3): 784*25c + 196*9*2c^2 + 49*9*8c^2 + 9*9*32c^2 multiply-adds.
  image = lambda c: 784 * 25 * c + (196 * 18 + 49 * 72 + 9 * 288) * c * c  # noqa: E731
  # Audio LeNet(1,c,5): 12544*25c + (3136*18 + 784*72 + 196*288 + 49*1152 + 9*4608) c^2.
  audio = lambda c: 12544 * 25 * c + (3136 * 18 + 784 * 72 + 196 * 288 + 49 * 1152  # noqa: E731
                                      + 9 * 4608) * c * c
  heads = (24 + 96 + 240) * 100 + 3 * 100 * 10
  forward = 2 * (image(3) + audio(3) + image(6) + audio(6) + heads)
  assert flops["forward"] == forward
  first_convs = 2 * 25 * (784 + 12544) * 9
  assert flops["train"] == 3 * forward - first_convs


def test_benchmark_smoke_run_writes_json_rows(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "experiments/benchmark.py", "--config", "configs/avmnist.py",
       "--steps", "2", "--batches", "8", "--quick", "--compilation_cache", "--json", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())
  # (bfloat16 rows: tests/test_performance.py, in process; float32 keeps this subprocess short.)
  assert sorted((r["path"], r["dtype"], r["mode"], r["batch"]) for r in rows) == sorted(
      [(p, "float32", m, 8) for p in ("plain", "plain_tuned", "fast") for m in ("train", "eval")])
  for r in rows:
    assert {"path", "mode", "batch", "examples_per_s", "step_ms", "gflop_per_s",
            "peak_fraction", "recompilations"} <= set(r)
    assert r["examples_per_s"] > 0 and r["recompilations"] == 0
  train = {r["path"]: r for r in rows if r["mode"] == "train" and r["dtype"] == "float32"}
  assert train["fast"]["speedup_vs_plain"] > 0 and train["plain_tuned"]["speedup_vs_plain"] > 0
  for key in ("input_wait_fraction", "input_wait_fraction_streamed"):
    assert 0 <= train["fast"][key] < 1
  assert train["fast"]["pipeline_examples_per_s"] > 0
  assert {"first_step_s", "compile_s"} <= set(train["plain"])
  assert all(r["recompilations_padded_eval"] == 0 for r in rows if r["mode"] == "eval")
  assert "| fast | float32 | train | 8 |" in result.stdout
