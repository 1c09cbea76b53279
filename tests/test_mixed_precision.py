"""config.model.compute_dtype: bfloat16 activations, float32 parameters, statistics and product."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, tiny_dataset
from i2m2_jax import checkpointing, models, sharding, steps, tasks, train_lib
from i2m2_jax.experiment import create_train_state, make_preprocess
from i2m2_jax.optim import create_optimizer

LENET_SHAPES = {"image": (12, 12, 1), "audio": (16, 16, 1)}


@pytest.fixture(scope="module")
def dataset():
  return tiny_dataset()


def lenet_config():
  config = tiny_config()
  config.model.encoders = "image=lenet,audio=lenet"
  config.model.encoder_kwargs = {"image": {"channels": 2, "num_blocks": 1},
                                 "audio": {"channels": 2, "num_blocks": 2}}
  config.model.joint_encoder_kwargs = {"image": {"channels": 3, "num_blocks": 1},
                                       "audio": {"channels": 3, "num_blocks": 2}}
  return config


def state_and_batch(config, shapes, dtype, seed=0):
  mesh = sharding.make_mesh()
  model = models.build_model(config.model, shapes, 3)
  preprocess = make_preprocess(list(shapes), None, dtype)
  tx = create_optimizer(config.optimizer, 10)
  example = {m: jnp.zeros((1,) + s) for m, s in shapes.items()}
  state = create_train_state(model, tx, example, jax.random.key(seed), mesh, dtype)
  rng = np.random.default_rng(seed + 1)
  batch = {"inputs": {m: rng.normal(size=(8,) + s).astype(np.float32) for m, s in shapes.items()},
           "label": rng.integers(0, 3, 8).astype(np.int32), "mask": np.ones(8, bool)}
  return state, preprocess, batch


@pytest.mark.parametrize("which", ["mlp_gru", "lenet"])
def test_bfloat16_computes_the_float32_function_to_bfloat16_rounding(which):
  config = tiny_config() if which == "mlp_gru" else lenet_config()
  shapes = {"a": (6,), "b": (4, 3)} if which == "mlp_gru" else LENET_SHAPES
  grads, outs = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state, preprocess, batch = state_and_batch(config, shapes, dtype)
    inputs = preprocess(batch["inputs"])
    assert all(x.dtype == dtype for x in inputs.values())
    outs[dtype] = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                                 inputs, train=False)
    g, new_stats, _ = steps.loss_and_grads(state, batch, task=tasks.MulticlassTask(3),
                                           preprocess=preprocess)
    grads[dtype] = g
    # Parameters, their gradients and BatchNorm statistics stay float32.
    for leaf in jax.tree.leaves((state.params, g, new_stats)):
      assert leaf.dtype == jnp.float32
  low, high = outs[jnp.bfloat16], outs[jnp.float32]
  assert low["log_probs"].dtype == jnp.float32  # the product is formed in float32
  # Computed in bfloat16: every LeNet expert and the MLP one; a GRU keeps its recurrent state
  # (flax's default carry) in float32, so the experts reading 'b' end in float32.
  low_experts = ["uni_a"] if which == "mlp_gru" else list(low["expert_logits"])
  assert all(low["expert_logits"][name].dtype == jnp.bfloat16 for name in low_experts)
  np.testing.assert_allclose(np.exp(low["log_probs"]), np.exp(high["log_probs"]), atol=0.03)
  flat_low = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[jnp.bfloat16])])
  flat_high = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[jnp.float32])])
  assert np.linalg.norm(flat_high) > 0
  cosine = flat_low @ flat_high / (np.linalg.norm(flat_low) * np.linalg.norm(flat_high))
  assert cosine > 0.99


def test_bfloat16_training_run_learns_and_stores_float32(dataset, tmp_path):  # noqa: F811
  config = tiny_config(**{"model.compute_dtype": "bfloat16", "num_train_steps": 24})
  results = train_lib.train_and_evaluate(config, str(tmp_path), dataset=dataset)
  assert results["val"]["accuracy"] > 0.6  # chance is 1/3
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path))) as ckpt:
    saved = ckpt.restore_raw(ckpt.best_step())
  leaves = jax.tree.leaves(saved["params"])
  assert leaves and all(np.asarray(x).dtype == np.float32 for x in leaves)


def test_fast_implementation_refuses_bfloat16():
  config = lenet_config()
  config.model.implementation = "fast"
  config.model.compute_dtype = "bfloat16"
  with pytest.raises(ValueError, match="compute_dtype is 'bfloat16'"):
    models.build_model(config.model, LENET_SHAPES, 3)
