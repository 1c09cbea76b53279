"""Shapes and parameter counts of every module, and how config kinds map to experts."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from i2m2_jax import models
from i2m2_jax.combine import product_of_experts

B = 3


def num_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def init_apply(module, x):
  variables = module.init(jax.random.key(0), x)
  return variables, module.apply(variables, x)


def dense(n_in, n_out):
  return n_in * n_out + n_out


def test_mlp_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 16))
  variables, y = init_apply(models.MLPEncoder(features=(8, 4)), x)
  assert y.shape == (B, 4)
  assert num_params(variables) == dense(16, 8) + dense(8, 4)
  assert np.all(np.asarray(y) >= 0)  # features end in ReLU


def test_gru_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 7, 3))
  variables, y = init_apply(models.GRUEncoder(hidden=5), x)
  assert y.shape == (B, 5)
  # flax GRUCell: input kernels with biases (3 gates), hidden kernels, one hidden bias (n gate).
  assert num_params(variables) == 3 * (3 * 5 + 5) + 3 * 5 * 5 + 5


def test_conv1d_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 10, 3))
  variables, y = init_apply(models.Conv1DEncoder(features=(4, 6), kernel_size=3), x)
  assert y.shape == (B, 6)
  assert num_params(variables) == (3 * 3 * 4 + 4) + (3 * 4 * 6 + 6)


def test_cnn_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 16, 16, 2))
  variables, y = init_apply(models.CNNEncoder(features=(4, 8)), x)
  assert y.shape == (B, 8)
  assert num_params(variables) == (9 * 2 * 4 + 4) + (9 * 4 * 8 + 8)


def test_unimodal_expert_reads_only_its_modality():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4))}
  expert = models.UniModalExpert("a", models.MLPEncoder(features=(5,)), head=(7, 3))
  variables, logits = init_apply(expert, inputs)
  assert logits.shape == (B, 3)
  assert num_params(variables) == dense(6, 5) + dense(5, 7) + dense(7, 3)
  changed = dict(inputs, b=inputs["b"] + 10.0)
  np.testing.assert_allclose(expert.apply(variables, changed), logits)


def test_late_fusion_expert_concatenates_its_own_encoders():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4, 2))}
  expert = models.LateFusionExpert(
      (("a", models.MLPEncoder(features=(5,))), ("b", models.GRUEncoder(hidden=3))), head=(7, 3))
  variables, logits = init_apply(expert, inputs)
  assert logits.shape == (B, 3)
  assert set(variables["params"]) == {"encoder_a", "encoder_b", "head"}
  gru = 3 * (2 * 3 + 3) + 3 * 3 * 3 + 3
  assert num_params(variables) == dense(6, 5) + gru + dense(5 + 3, 7) + dense(7, 3)


def test_classifier_returns_product_and_every_expert():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4))}
  experts = (("uni_a", models.UniModalExpert("a", models.MLPEncoder((5,)), (3,))),
             ("uni_b", models.UniModalExpert("b", models.MLPEncoder((5,)), (3,))))
  model = models.MultiModalClassifier(experts)
  variables, out = init_apply(model, inputs)
  assert set(out["expert_logits"]) == {"uni_a", "uni_b"}
  np.testing.assert_allclose(out["log_probs"], product_of_experts(out["expert_logits"]), atol=1e-6)
  dropped = model.apply(variables, inputs, present=jnp.array([True, False]))
  np.testing.assert_allclose(dropped["log_probs"],
                             jax.nn.log_softmax(out["expert_logits"]["uni_a"]), atol=1e-5)


SHAPES = {"vec": (12,), "seq": (5, 3), "img": (8, 8, 1), "vec2": (4,)}  # 4 modalities


def config_for(kind, modality=""):
  config = default.get_config()
  config.model.kind = kind
  config.model.modality = modality
  config.model.head_hidden = (16,)
  return config.model


@pytest.mark.parametrize("kind,experts", [
    ("i2m2", ["uni_vec", "uni_seq", "uni_img", "uni_vec2", "joint"]),
    ("intra", ["uni_vec", "uni_seq", "uni_img", "uni_vec2"]),
    ("inter", ["joint"]),
    ("uni", ["uni_seq"]),
])
def test_build_model_kinds(kind, experts):
  model = models.build_model(config_for(kind, "seq"), SHAPES, num_classes=4)
  inputs = {m: jax.random.normal(jax.random.key(i), (B,) + s) for i, (m, s) in enumerate(SHAPES.items())}
  variables, out = init_apply(model, inputs)
  assert list(variables["params"]) == experts
  assert out["log_probs"].shape == (B, 4)
  # Default encoders by rank: MLP for vectors, GRU for sequences, CNN for images.
  if "joint" in experts:
    joint = variables["params"]["joint"]
    assert "gru" in joint["encoder_seq"] and "conv_0" in joint["encoder_img"]


def test_i2m2_parameters_are_the_sum_of_its_experts():
  counts = {}
  inputs = {m: jnp.ones((B,) + s) for m, s in SHAPES.items()}
  for kind, modality in [("i2m2", ""), ("inter", ""), *[("uni", m) for m in SHAPES]]:
    model = models.build_model(config_for(kind, modality), SHAPES, num_classes=4)
    counts[kind + modality] = num_params(model.init(jax.random.key(0), inputs))
  assert counts["i2m2"] == counts["inter"] + sum(counts["uni" + m] for m in SHAPES)


def test_encoder_override_and_kwargs_from_config():
  config = config_for("uni", "seq")
  config.encoders = ml_collections.ConfigDict({"seq": "conv1d"})
  config.encoder_kwargs = ml_collections.ConfigDict({"seq": {"features": (6,), "kernel_size": 3}})
  model = models.build_model(config, SHAPES, num_classes=4)
  variables = model.init(jax.random.key(0), {m: jnp.ones((B,) + s) for m, s in SHAPES.items()})
  assert variables["params"]["uni_seq"]["encoder"]["conv_0"]["kernel"].shape == (3, 3, 6)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.model.kind='fusion'.*i2m2"):
    models.build_model(config_for("fusion"), SHAPES, 4)
  with pytest.raises(ValueError, match=r"config.model.modality='audio'.*vec"):
    models.build_model(config_for("uni", "audio"), SHAPES, 4)
  config = config_for("inter")
  config.encoders = ml_collections.ConfigDict({"vec": "transformer"})
  with pytest.raises(ValueError, match=r"config.model.encoders.vec='transformer'"):
    models.build_model(config, SHAPES, 4)
  config = config_for("inter")
  config.fusion = "tensor"
  with pytest.raises(ValueError, match=r"config.model.fusion='tensor'"):
    models.build_model(config, SHAPES, 4)
