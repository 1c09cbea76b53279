"""config.model.stack_experts: experts of one architecture computed as one vmapped network give
the same outputs, gradients and train steps as the same experts one by one, with the same
parameters; experts that differ (or hold BatchNorm statistics, or use dropout) stay separate."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import avmnist as avmnist_config
from configs import default
from configs import fastmri as fastmri_config
from i2m2_jax import experiment, input_pipeline, models, optim, sharding, steps, tasks
from i2m2_jax.datasets import Dataset

FASTMRI_SHAPES = {"magnitude": (16, 16, 1), "phase": (16, 16, 1)}
FASTMRI_OUTPUT = (4, 2)  # four binary labels


def random_inputs(shapes, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.normal(size=(batch,) + s), jnp.float32) for m, s in shapes.items()}


def random_params(model, inputs, seed=1):
  """Parameters of `model`'s shapes with random normal values (no compiled init)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), shapes)


def separate_and_stacked(model_config, shapes, output_shape):
  model_config = model_config.copy_and_resolve_references()
  model_config.stack_experts = False
  separate = models.build_model(model_config, shapes, output_shape)
  model_config.stack_experts = True
  return separate, models.build_model(model_config, shapes, output_shape)


def assert_same_function(separate, stacked, inputs, seed=2):
  """Same log-probabilities, expert logits and gradients of a loss w.r.t. every parameter, with
  the same parameters."""
  params = random_params(separate, inputs)
  weights = jax.random.normal(jax.random.key(seed),
                              separate.apply({"params": params}, inputs)["log_probs"].shape)

  def outputs_and_grads(model):
    def loss(p):
      out = model.apply({"params": p}, inputs, train=True)
      return -jnp.sum(out["log_probs"] * weights), out
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  grads_sep, out_sep = outputs_and_grads(separate)
  grads_stk, out_stk = outputs_and_grads(stacked)
  np.testing.assert_allclose(out_stk["log_probs"], out_sep["log_probs"], rtol=1e-5, atol=1e-6)
  assert list(out_stk["expert_logits"]) == list(out_sep["expert_logits"])  # model order
  for name, logits in out_sep["expert_logits"].items():
    np.testing.assert_allclose(out_stk["expert_logits"][name], logits, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads_stk) == jax.tree.structure(grads_sep)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_sep):
    assert np.abs(g).max() > 0, path  # every parameter takes part
  # Absolute tolerance on the scale of each leaf: an entry that cancels to near zero keeps the
  # float32 rounding of the leaf's large terms.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=max(1e-6, 1e-5 * np.abs(b).max())), grads_stk, grads_sep)


def test_fastmri_experts_stack_into_one_network_with_the_same_function_and_parameters():
  config = fastmri_config.get_config("i2m2,smoke").model
  separate, stacked = separate_and_stacked(config, FASTMRI_SHAPES, FASTMRI_OUTPUT)
  # The joint expert too: its stem reads 2 channels, the uni-modal ones' 1 (zero-padded).
  assert stacked.stacks == (("uni_magnitude", "uni_phase", "joint"),)
  inputs = random_inputs(FASTMRI_SHAPES)
  # Initialisation creates each expert on its own: the same parameters, layout and values.
  init_sep = jax.eval_shape(separate.init, jax.random.key(0), inputs)
  init_stk = jax.eval_shape(stacked.init, jax.random.key(0), inputs)
  assert init_stk == init_sep
  assert init_stk["params"]["joint"]["encoder"]["stem"]["kernel"].shape == (3, 3, 2, 8)
  assert_same_function(separate, stacked, inputs)


@pytest.mark.parametrize("stage, stacks", [("intra", (("uni_magnitude", "uni_phase"),)),
                                           ("joint", ()), ("magnitude", ())])
def test_fastmri_stages_stack_what_they_have(stage, stacks):
  config = fastmri_config.get_config(f"{stage},smoke").model
  config.stack_experts = True
  assert models.build_model(config, FASTMRI_SHAPES, FASTMRI_OUTPUT).stacks == stacks


def test_same_shape_modalities_of_any_data_stack_and_the_others_stay_separate():
  """Two image modalities with the same cnn encoder stack; a third of another shape, and the
  late-fusion joint expert (several encoders), are computed on their own."""
  config = default.get_config().model
  config.head_hidden = (8,)
  config.encoders = "a=cnn,b=cnn,c=mlp"
  config.encoder_kwargs = ml_collections.ConfigDict(
      {m: {"features": (4, 8)} for m in ("a", "b")})
  shapes = {"a": (8, 8, 2), "b": (8, 8, 2), "c": (5,)}
  separate, stacked = separate_and_stacked(config, shapes, (3,))
  assert stacked.stacks == (("uni_a", "uni_b"),)
  inputs = random_inputs(shapes, seed=3)
  assert_same_function(separate, stacked, inputs)
  # Inputs of different dtypes: computed one by one, as the separate model does.
  inputs["b"] = inputs["b"].astype(jnp.bfloat16)
  variables = {"params": random_params(separate, inputs)}
  np.testing.assert_array_equal(jax.jit(stacked.apply)(variables, inputs)["log_probs"],
                                jax.jit(separate.apply)(variables, inputs)["log_probs"])


@pytest.mark.parametrize("change", ["encoder_kwargs", "shape", "head_dropout"])
def test_experts_that_differ_are_not_stacked(change):
  config = fastmri_config.get_config("intra,smoke").model
  shapes = dict(FASTMRI_SHAPES)
  if change == "encoder_kwargs":
    config.encoder_kwargs.phase.widths = (16,)
  elif change == "shape":
    shapes["phase"] = (8, 8, 1)
  else:
    config.dropout_rate = 0.1
  config.stack_experts = True
  assert models.build_model(config, shapes, FASTMRI_OUTPUT).stacks == ()


def test_avmnist_lenets_differ_so_nothing_stacks():
  config = avmnist_config.get_config("smoke").model
  config.stack_experts = True
  shapes = {"image": (28, 28, 1), "audio": (112, 112, 1)}
  assert models.build_model(config, shapes, (10,)).stacks == ()


def test_experts_with_batchnorm_statistics_are_computed_one_by_one():
  """Equal LeNets (BatchNorm) group at build time, but the stacked apply would not update their
  statistics: they are computed separately, giving the same outputs and updated statistics."""
  config = default.get_config().model
  config.kind = "intra"
  config.head_hidden = (8,)
  config.encoders = "a=lenet,b=lenet"
  config.encoder_kwargs = ml_collections.ConfigDict(
      {m: {"channels": 2, "num_blocks": 1} for m in ("a", "b")})
  shapes = {"a": (8, 8, 1), "b": (8, 8, 1)}
  separate, stacked = separate_and_stacked(config, shapes, (3,))
  assert stacked.stacks == (("uni_a", "uni_b"),)
  inputs = random_inputs(shapes, seed=4)
  variables = separate.init(jax.random.key(0), inputs)
  out_sep, stats_sep = separate.apply(variables, inputs, train=True, mutable=["batch_stats"])
  out_stk, stats_stk = stacked.apply(variables, inputs, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out_stk["log_probs"], out_sep["log_probs"], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, stats_stk, stats_sep)
  assert not np.allclose(stats_sep["batch_stats"]["uni_a"]["encoder"]["bn_0"]["mean"], 0)


def test_a_train_step_with_stacked_experts_equals_the_separate_one():
  """The trainer's jitted step on the fastMRI smoke model (multilabel, class weights): same loss
  and parameter updates from the same state."""
  rng = np.random.default_rng(5)
  n = 8
  columns = {m: rng.normal(size=(n,) + s).astype(np.float32) for m, s in FASTMRI_SHAPES.items()}
  columns["label"] = rng.integers(0, 2, (n, 4))
  source = input_pipeline.InMemorySource(columns)
  dataset = Dataset(name="fastmri_random", modalities=FASTMRI_SHAPES, num_classes=2,
                    sources={"train": source, "val": source, "test": source},
                    targets={"label": (4,)}, task="multilabel",
                    label_names=("abnormal", "mtear", "acl", "cartilage"))
  config = fastmri_config.get_config("i2m2,smoke")
  # SGD: updates linear in the gradients (AdamW's first step, g / (|g| + eps), magnifies the
  # rounding of near-zero gradients, which grouped and separate convolutions round differently).
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e-2
  task = tasks.build_task(config.task, dataset)
  separate, stacked = separate_and_stacked(config.model, FASTMRI_SHAPES, task.output_shape)
  mesh = sharding.make_mesh()
  # Random parameters instead of the experiment's initial state: its compiled init is slow.
  params = jax.device_get(random_params(separate, random_inputs(FASTMRI_SHAPES)))
  tx = optim.create_optimizer(config.optimizer, 10, n)
  train_fn = steps.jit_train_step(task, experiment.make_preprocess(FASTMRI_SHAPES, None), mesh)
  batch = sharding.global_batch({"inputs": {m: columns[m][:4] for m in FASTMRI_SHAPES},
                                 "label": columns["label"][:4].astype(np.int32),
                                 "mask": np.ones(4, bool)}, mesh)

  def step(model):
    state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats={},
                                    dropout_rng=jax.random.key_data(jax.random.key(0)))
    state, sums = train_fn(state, batch)
    updates = jax.tree.map(np.subtract, jax.device_get(state.params), params)
    return updates, sharding.to_host(sums)["loss_sum"]

  (updates_sep, loss_sep), (updates_stk, loss_stk) = step(separate), step(stacked)
  np.testing.assert_allclose(loss_stk, loss_sep, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(b).max()),
               updates_stk, updates_sep)
  assert min(np.abs(u).max() for u in jax.tree.leaves(updates_sep)) > 1e-6


def test_stack_experts_config_errors_name_the_field():
  config = fastmri_config.get_config("i2m2,smoke").model
  config.stack_experts = True
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.unlock()
  del bad["stack_experts"]
  bad.stack_experts = "yes"
  with pytest.raises(ValueError, match=r"config.model.stack_experts='yes'"):
    models.build_model(bad, FASTMRI_SHAPES, FASTMRI_OUTPUT)
  config.implementation = "fast"
  with pytest.raises(ValueError, match="config.model.stack_experts"):
    models.build_model(config, FASTMRI_SHAPES, (2,))
