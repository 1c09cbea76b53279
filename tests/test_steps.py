"""The pure steps and their compiled forms: learning, exact padded evaluation, jit == pmap (with
and without BatchNorm), sharding, compile options, clipping and the finiteness flags."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import MODALITIES, apply_overrides, tiny_config, tiny_dataset, train_batches
from i2m2_jax import compile_options, evaluation, input_pipeline, optim, sharding, steps
from i2m2_jax.datasets import Dataset
from i2m2_jax.experiment import build_experiment


@pytest.fixture(scope="module")
def dataset():
  return tiny_dataset()


def test_train_step_lowers_loss_without_recompiling(dataset):
  config = tiny_config()
  exp = build_experiment(config, dataset, stats=None)
  step = steps.jit_train_step(exp.task, exp.preprocess, exp.mesh,
                              step_fn=chex.assert_max_traces(steps.train_step, n=1))
  fixed = sharding.global_batch(train_batches(dataset, config.batch_size, 1)[0], exp.mesh)
  state, losses = exp.state, []
  for _ in range(15):
    state, sums = step(state, fixed)
    losses.append(float(sums["loss_sum"]) / float(sums["count"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 15


def test_eval_is_exact_over_padded_batches_without_recompiling(dataset):
  exp = build_experiment(tiny_config(), dataset, stats=None)
  eval_fn = steps.jit_eval_step(exp.task, exp.preprocess, exp.mesh)
  source = dataset.sources["test"]  # 44 examples: 2 full batches of 16 and one padded
  result = evaluation.evaluate(eval_fn, exp.state, source, dataset, exp.task, 16, exp.mesh)
  assert eval_fn._cache_size() == 1  # pylint: disable=protected-access  (one compilation)
  # Reference: the model on all 44 examples at once, accuracy and NLL in float64.
  full = input_pipeline.gather_batch(source, range(len(source)), list(MODALITIES))
  state = exp.state
  out = state.apply_fn({"params": state.params}, exp.preprocess(full["inputs"]), train=False)
  logp = np.asarray(out["log_probs"], np.float64)
  labels = full["label"]
  assert result["count"] == 44
  assert result["accuracy"] == pytest.approx(np.mean(logp.argmax(-1) == labels), abs=1e-9)
  assert result["nll"] == pytest.approx(-np.mean(logp[np.arange(len(labels)), labels]), rel=1e-5)
  joint = np.asarray(out["expert_logits"]["joint"])
  assert result["experts"]["joint"] == pytest.approx(np.mean(joint.argmax(-1) == labels))
  assert set(result["experts"]) == {"uni_a", "uni_b", "joint"}


def run_jit_and_pmap(config, dataset, num_steps):
  """The same steps on the same batches under jit and under pmap; returns both final states
  (host) and the last step's metric sums."""
  jit_exp = build_experiment(config, dataset, stats=None)
  pmap_exp = build_experiment(apply_overrides(config.copy_and_resolve_references(),
                                              {"parallel": "pmap"}), dataset, stats=None)
  jit_step = steps.jit_train_step(jit_exp.task, jit_exp.preprocess, jit_exp.mesh)
  pmap_step = steps.pmapped_train_step(pmap_exp.task, pmap_exp.preprocess)
  jit_state, pmap_state = jit_exp.state, sharding.replicate_for_pmap(pmap_exp.state)
  initial = jax.device_get(jit_exp.state.params)
  for local in train_batches(dataset, config.batch_size, num_steps):
    jit_state, jit_sums = jit_step(jit_state, sharding.global_batch(local, jit_exp.mesh))
    pmap_state, pmap_sums = pmap_step(pmap_state, sharding.split_for_pmap(local))
  pmap_state = jax.device_get(jax.tree.map(lambda x: x[0], pmap_state))
  return initial, jax.device_get(jit_state), pmap_state, jit_sums, pmap_sums


def test_jit_and_pmap_steps_give_the_same_parameters(dataset):
  assert jax.device_count() == 2, "conftest.py sets two fake CPU devices"
  initial, jit_state, pmap_state, jit_sums, pmap_sums = run_jit_and_pmap(tiny_config(), dataset, 4)
  np.testing.assert_allclose(float(jit_sums["loss_sum"]), float(pmap_sums["loss_sum"][0]),
                             rtol=1e-5)
  chex.assert_trees_all_close(jit_state.params, pmap_state.params, rtol=1e-5, atol=1e-6)
  # And the parameters did move: the comparison is not between two untouched states.
  assert not np.allclose(initial["joint"]["head"]["dense_0"]["kernel"],
                         pmap_state.params["joint"]["head"]["dense_0"]["kernel"])


def test_jit_and_pmap_agree_on_a_batchnorm_model():
  """LeNet experts (BatchNorm): under pmap each device normalises with the whole global batch's
  statistics, as jit does, so parameters and running statistics agree after several steps."""
  rng = np.random.default_rng(0)
  n, shapes = 64, {"img": (8, 8, 1), "aud": (8, 8, 1)}
  label = rng.integers(0, 3, n)
  # Devices see different halves of each batch: shift one half so their statistics differ.
  columns = {m: (rng.normal(size=(n,) + s) + 3.0 * (np.arange(n) % 2)[:, None, None, None]
                 ).astype(np.float32) for m, s in shapes.items()}
  source = input_pipeline.InMemorySource({**columns, "label": label})
  dataset = Dataset(name="bn", modalities=shapes, num_classes=3,
                    sources={"train": source, "val": source, "test": source})
  config = tiny_config()
  config.model.encoders = "img=lenet,aud=lenet"
  config.model.encoder_kwargs = ml_collections.ConfigDict(
      {"img": {"channels": 2, "num_blocks": 1}, "aud": {"channels": 2, "num_blocks": 1}})
  config.optimizer.learning_rate = 0.05
  initial, jit_state, pmap_state, jit_sums, pmap_sums = run_jit_and_pmap(config, dataset, 5)
  np.testing.assert_allclose(float(jit_sums["loss_sum"]), float(pmap_sums["loss_sum"][0]),
                             rtol=1e-5)
  chex.assert_trees_all_close(jit_state.params, pmap_state.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(jit_state.batch_stats, pmap_state.batch_stats, rtol=1e-4, atol=1e-5)
  bn = pmap_state.batch_stats["uni_img"]["encoder"]["bn_0"]["mean"]
  assert not np.allclose(bn, 0.0)  # the running statistics did move


def test_batch_is_sharded_over_the_data_axis(dataset):
  mesh = sharding.make_mesh()
  batch = sharding.global_batch(train_batches(dataset, 16, 1)[0], mesh)
  shards = batch["inputs"]["a"].addressable_shards
  assert len(shards) == 2 and shards[0].data.shape == (8, 6)


def test_steps_compile_convolutions_with_xlas_own_implementation_on_cpu():
  """Train and eval steps leave convolutions to XLA's own implementation instead of its library
  (YNNPACK) fusions: measured faster (compile_options.CPU_CONV_OPTIONS)."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU compile options")
  x, k = jnp.ones((2, 8, 8, 24)), jnp.ones((3, 3, 24, 32))  # > 16 channels: library-eligible
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def compiled(options):
    return jax.jit(conv, compiler_options=options).lower(x, k).compile().as_text()

  assert "__ynn_fusion" in compiled(None)  # XLA's default
  text = compiled(compile_options.compiler_options())
  assert "__ynn_fusion" not in text and " convolution(" in text
  # An option this XLA does not know is dropped, not fatal.
  assert not compile_options.accepted((("xla_cpu_no_such_option", True),))


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
  np.testing.assert_allclose(float(optim.squared_norm(tree)), norm ** 2, rtol=1e-6)
  grads = {k: v for k, v in tree.items() if k != "step"}
  ours, _ = optim.clip_by_global_norm(4.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(4.0).update(grads, optax.EmptyState())
  factor = min(1.0, 4.0 / norm)
  for got, ref, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64) * factor, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)


def test_non_finite_flags_are_exact():
  tree = _random_tree(1)
  huge = {"a": jnp.asarray([1e30, -2.0], jnp.float32)}  # finite, but its squared norm overflows
  assert float(optim.any_nonfinite(tree)) == 0.0
  assert float(optim.any_nonfinite(huge)) == 0.0
  assert float(optim.nonfinite_norm(huge)) == 1.0  # clipping cannot use that norm
  for bad in (np.nan, np.inf, -np.inf):
    hit = jax.tree.map(lambda x: x, tree)
    hit["x"]["k"] = hit["x"]["k"].at[1, 0, 2].set(bad)
    assert float(optim.any_nonfinite(hit)) == 1.0
    assert float(optim.nonfinite_norm(hit)) == 1.0


def test_weight_decay_scales_with_the_training_examples():
  """One AdamW step on a zero gradient only decays: p * (1 - lr * wd * min(1, reference / n))."""
  opt = ml_collections.ConfigDict({"name": "adamw", "learning_rate": 0.1, "weight_decay": 2.0,
                                   "weight_decay_examples": 1000, "schedule": "constant",
                                   "grad_clip_norm": 0.0})
  params = {"w": jnp.asarray([1.0, -3.0], jnp.float32)}
  for n, want in ((500, 2.0), (1000, 2.0), (4000, 0.5), (None, 2.0)):
    assert optim.weight_decay(opt, n) == pytest.approx(want)
    tx = optim.create_optimizer(opt, 10, n)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), np.array([1.0, -3.0]) * (1 - 0.1 * want),
                               rtol=1e-6)
  opt.weight_decay_examples = 0  # off: as given, whatever the data
  assert optim.weight_decay(opt, 4000) == pytest.approx(2.0)


def test_adam_adds_l2_decay_to_the_gradient_as_torch_adam_does():
  """'adam': Adam on grad + wd * param (coupled L2, torch.optim.Adam(weight_decay=wd)), against a
  float64 NumPy Adam over three steps with changing gradients."""
  opt = ml_collections.ConfigDict({"name": "adam", "learning_rate": 0.05, "weight_decay": 0.3,
                                   "weight_decay_examples": 0, "schedule": "constant",
                                   "grad_clip_norm": 0.0})
  rng = np.random.default_rng(0)
  p = rng.normal(size=4)
  params = {"w": jnp.asarray(p, jnp.float32)}
  tx = optim.create_optimizer(opt, 10)
  state = tx.init(params)
  m, v = np.zeros(4), np.zeros(4)
  for t in range(1, 4):
    g = rng.normal(size=4)
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    g = g + 0.3 * p
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    p = p - 0.05 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5, atol=1e-6)
