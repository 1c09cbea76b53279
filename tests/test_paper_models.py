"""The paper's experts (i2m2_jax.paper_models): shapes, parameter counts derived by hand from the
reference architecture, PyTorch-matching init and semantics (BatchNorm, GRU, LRTF)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from i2m2_jax import models
from i2m2_jax import paper_models as pm


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init_apply(model, *inputs, **kwargs):
  """Variables and output as shapes only (jax.eval_shape: nothing is compiled or run)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
  return variables, jax.eval_shape(lambda v: model.apply(v, *inputs, **kwargs), variables)


def init(model, *inputs, **kwargs):
  """Real variables, jitted with the 'rbg' PRNG: threefry's init takes seconds to compile on CPU."""
  return jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), *inputs, **kwargs))()


def lenet_widths(c, k):
  return [c] + [c * 2 ** (i + 1) for i in range(k)]


def lenet_param_count(c, k, in_ch=1):
  """Block 0: 5x5 conv in_ch -> c (no bias); block i: 3x3 conv 2^i c -> 2^(i+1) c; BN scale+bias."""
  widths = lenet_widths(c, k)
  convs = 25 * in_ch * c + sum(9 * widths[i] * widths[i + 1] for i in range(k))
  return convs + 2 * sum(widths)


def mlp_param_count(*dims):
  return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def gru_param_count(d, h):
  """flax GRUCell: 3 input kernels + 3 recurrent kernels, biases for ir, iz, in and hn."""
  return 3 * d * h + 3 * h * h + 4 * h


def lrtf_param_count(dims, out, rank):
  return sum(rank * (d + 1) * out for d in dims) + rank + out


# ---------------------------------------------------------------------------------------------
# Hand-derived numbers


def test_hand_counts_match_reference_numbers():
  # Spelled out once so a formula slip would show: LeNet(1,3,3): 75+162+648+2592 conv, 90 BN.
  assert lenet_param_count(3, 3) == 3567
  assert lenet_param_count(3, 5) == 55695
  assert lenet_param_count(6, 3) == 13938
  assert lenet_param_count(6, 5) == 221874
  assert lrtf_param_count([48, 192], 120, 40) == 1161760
  assert gru_param_count(12, 30) == 3900  # PyTorch's nn.GRU(12, 30) has 3960 (6H biases)
  assert mlp_param_count(5, 10, 10) == 170


# ---------------------------------------------------------------------------------------------
# LeNet


@pytest.mark.parametrize("c,k,size,features", [(3, 3, 28, 24), (3, 5, 112, 96), (6, 3, 28, 48)])
def test_lenet_shapes_and_params(c, k, size, features):
  model = pm.LeNet(channels=c, num_blocks=k)
  variables, out = abstract_init_apply(model, jnp.zeros((2, size, size, 1)))
  assert out.shape == (2, features) == (2, 2 ** k * c)
  assert n_params(variables["params"]) == lenet_param_count(c, k)
  assert n_params(variables["batch_stats"]) == 2 * sum(lenet_widths(c, k))
  kernels = [variables["params"][f"conv_{i}"]["kernel"].shape for i in range(k + 1)]
  assert kernels[0] == (5, 5, 1, c) and all(s[:2] == (3, 3) for s in kernels[1:])
  assert all("bias" not in variables["params"][f"conv_{i}"] for i in range(k + 1))


@pytest.mark.parametrize("k,size,conv_sizes", [(3, 28, [28, 14, 7, 3]),
                                                (5, 112, [112, 56, 28, 14, 7, 3])])
def test_lenet_same_padding_and_flooring_pools(k, size, conv_sizes):
  """Each conv keeps the size (pad 2 for 5x5, 1 for 3x3); each pool floors it: 7 -> 3 -> 1."""
  model = pm.LeNet(3, k)
  x = jnp.zeros((1, size, size, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True,
                                                  mutable=["intermediates"]), variables)
  sizes = [state["intermediates"][f"conv_{i}"]["__call__"][0].shape[1:3] for i in range(k + 1)]
  assert sizes == [(s, s) for s in conv_sizes]


def test_lenet_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    abstract_init_apply(pm.LeNet(), jnp.zeros((2, 784)))


def test_lenet_conv_init_is_reference_kaiming_uniform():
  # The parameters do not depend on the image size: 64x64 is enough to reach 1x1.
  variables = init(pm.LeNet(3, 5), jnp.zeros((1, 64, 64, 1)))
  kernel = np.asarray(variables["params"]["conv_5"]["kernel"])  # 3x3x48x96
  bound = math.sqrt(6.0 / (9 * 48))  # kaiming_uniform_(a=0): sqrt(2) * sqrt(3 / fan_in)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.95 * bound
  assert np.std(kernel) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_torch_batchnorm_matches_pytorch_semantics():
  x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
  bn = pm.TorchBatchNorm()
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  assert np.allclose(variables["batch_stats"]["mean"], 0) and np.allclose(
      variables["batch_stats"]["var"], 1)
  y, updates = bn.apply(variables, x, use_running_average=False, update_stats=True,
                        mutable=["batch_stats"])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  n = 8 * 4 * 4
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  # Running averages: a per-channel affine map, independent of the rest of the batch.
  z = bn.apply({**variables, **updates}, x[:1], use_running_average=True)
  np.testing.assert_allclose(
      z, (x[:1] - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), rtol=1e-4, atol=1e-5)


def test_lenet_batchnorm_train_updates_stats_eval_uses_running_averages():
  model = pm.LeNet(3, 3)
  rng = np.random.default_rng(1)
  batch = rng.uniform(0, 1, (6, 28, 28, 1)).astype(np.float32)
  variables = init(model, batch[:1])
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  _, updates = apply(variables, batch, train=True, mutable=("batch_stats",))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  variables = {**variables, **updates}
  other = np.concatenate([batch[:1], rng.uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)])
  eval_a = apply(variables, batch, train=False)
  eval_b = apply(variables, other, train=False)
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)  # no batch dependence
  train_a, _ = apply(variables, batch, train=True, mutable=("batch_stats",))
  train_b, _ = apply(variables, other, train=True, mutable=("batch_stats",))
  assert not np.allclose(train_a[0], train_b[0])
  # Quirk #1 reproduction: batch statistics at eval, with batch_stats left immutable.
  quirk = pm.LeNet(3, 3, batch_stats_at_eval=True)
  np.testing.assert_allclose(jax.jit(quirk.apply)(variables, batch), train_a,
                             rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MIMIC encoders


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _gru_reference(params, x):
  """PyTorch's GRU equations in numpy, on flax's parameters."""
  p = jax.tree.map(np.asarray, params)
  h = np.zeros((x.shape[0], p["hr"]["kernel"].shape[0]))
  states = []
  for t in range(x.shape[1]):
    xt = x[:, t]
    r = _sigmoid(xt @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
    z = _sigmoid(xt @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
    n = np.tanh(xt @ p["in"]["kernel"] + p["in"]["bias"] +
                r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    h = (1 - z) * n + z * h
    states.append(h)
  return np.stack(states, axis=1)


def test_gru_linear_encoder_matches_reference_equations():
  x = np.random.default_rng(0).normal(size=(3, 24, 12)).astype(np.float32)
  enc = pm.GRUSequenceEncoder(hidden=30, per_step_features=15)
  variables = init(enc, x)
  out = jax.jit(enc.apply)(variables, x)
  assert out.shape == (3, 360)
  assert n_params(variables) == gru_param_count(12, 30) + mlp_param_count(30, 15) == 4365
  params = variables["params"]
  states = _gru_reference(params["gru"], x.astype(np.float64))
  lin = jax.tree.map(np.asarray, params["linear"])
  expected = (states @ lin["kernel"] + lin["bias"]).reshape(3, -1)  # no activation
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  # PyTorch's default init: every GRU weight and bias in U(+-1/sqrt(hidden)).
  bound = 1 / math.sqrt(30)
  assert max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(params["gru"])) <= bound


def test_gru_all_states_and_last_step():
  x = np.random.default_rng(1).normal(size=(2, 24, 12)).astype(np.float32)
  all_states = models.ENCODERS["gru_all_states"](hidden=30)
  variables = init(all_states, x)
  out = jax.jit(all_states.apply)(variables, x)
  assert out.shape == (2, 720) and n_params(variables) == 3900
  np.testing.assert_allclose(out.reshape(2, 24, 30),
                             _gru_reference(variables["params"]["gru"], x.astype(np.float64)),
                             rtol=1e-4, atol=1e-5)
  last = pm.GRUSequenceEncoder(hidden=30, per_step_features=0, flatten_all_steps=False)
  np.testing.assert_allclose(jax.jit(last.apply)(variables, x), out.reshape(2, 24, 30)[:, -1], rtol=1e-6)


def test_mlp_raw_has_no_output_activation():
  enc = models.ENCODERS["mlp_raw"](features=(10, 10))
  x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  variables = enc.init(jax.random.key(0), x)
  out = np.asarray(enc.apply(variables, x))
  assert out.shape == (16, 10) and n_params(variables) == 170
  assert (out < 0).any()  # models.MLPEncoder would end in a ReLU
  p = jax.tree.map(np.asarray, variables["params"])
  hidden = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0)
  np.testing.assert_allclose(out, hidden @ p["dense_1"]["kernel"] + p["dense_1"]["bias"],
                             rtol=1e-5, atol=1e-6)
  assert np.abs(p["dense_0"]["kernel"]).max() <= 1 / math.sqrt(5)  # torch Linear init
  assert np.abs(p["dense_0"]["bias"]).max() > 0


# ---------------------------------------------------------------------------------------------
# Low-rank tensor fusion


def test_lrtf_matches_multibench_formula_and_init():
  rng = np.random.default_rng(0)
  feats = [rng.normal(size=(4, d)).astype(np.float32) for d in (48, 192)]
  lrtf = pm.LowRankTensorFusion(output_dim=120, rank=40)
  variables = init(lrtf, feats)
  assert n_params(variables) == lrtf_param_count([48, 192], 120, 40)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  fused = 1.0
  for i, f in enumerate(feats):
    with_one = np.concatenate([np.ones((4, 1)), f], axis=1)
    fused = fused * np.matmul(with_one, p[f"factor_{i}"])  # [rank, B, out]
  expected = (p["fusion_weights"] @ fused.transpose(1, 0, 2)).squeeze(1) + p["fusion_bias"]
  np.testing.assert_allclose(lrtf.apply(variables, feats), expected, rtol=1e-4, atol=1e-4)
  # xavier_normal with PyTorch's fans on (rank, d+1, out): std sqrt(2 / (out * (d + 1 + rank))).
  std = math.sqrt(2 / (120 * (193 + 40)))
  assert np.std(p["factor_1"]) == pytest.approx(std, rel=0.05)
  assert np.all(p["fusion_bias"] == 0)


# ---------------------------------------------------------------------------------------------
# Through build_model: the paper's configurations


def _model_config(**overrides):
  config = default_config.get_config().model
  config.update(overrides)
  return config


def avmnist_model_config(kind, fusion):
  return _model_config(
      kind=kind, fusion=fusion, head_hidden=(100,),
      encoders="image=lenet,audio=lenet",
      encoder_kwargs=ml_collections.ConfigDict({
          "image": {"channels": 3, "num_blocks": 3}, "audio": {"channels": 3, "num_blocks": 5}}),
      joint_encoder_kwargs=ml_collections.ConfigDict({
          "image": {"channels": 6, "num_blocks": 3}, "audio": {"channels": 6, "num_blocks": 5}}))


def mimic_model_config(kind):
  return _model_config(
      kind=kind, fusion="late_fusion", head_hidden=(40,),
      encoders="static=mlp_raw,timeseries=gru_linear",
      encoder_kwargs=ml_collections.ConfigDict({
          "static": {"features": (10, 10)},
          "timeseries": {"hidden": 30, "per_step_features": 15}}),
      joint_encoder_kwargs=ml_collections.ConfigDict({
          "timeseries": {"hidden": 30, "per_step_features": 0}}))


def _expert_param_counts(model, inputs):
  variables, out = abstract_init_apply(model, inputs)
  return {k: n_params(v) for k, v in variables["params"].items()}, out


@pytest.mark.parametrize("fusion,joint_count", [
    ("late_fusion", lenet_param_count(6, 3) + lenet_param_count(6, 5)
     + mlp_param_count(240, 100, 10)),
    ("lrtf", lenet_param_count(6, 3) + lenet_param_count(6, 5)
     + lrtf_param_count([48, 192], 120, 40) + mlp_param_count(120, 100, 10)),
])
def test_avmnist_i2m2_model(fusion, joint_count):
  shapes = {"image": (28, 28, 1), "audio": (112, 112, 1)}
  model = models.build_model(avmnist_model_config("i2m2", fusion), shapes, 10)
  inputs = {m: jnp.zeros((2,) + s) for m, s in shapes.items()}
  counts, out = _expert_param_counts(model, inputs)
  assert counts == {
      "uni_image": lenet_param_count(3, 3) + mlp_param_count(24, 100, 10),
      "uni_audio": lenet_param_count(3, 5) + mlp_param_count(96, 100, 10),
      "joint": joint_count}
  assert out["log_probs"].shape == (2, 10)
  assert {k: v.shape for k, v in out["expert_logits"].items()} == {
      "uni_image": (2, 10), "uni_audio": (2, 10), "joint": (2, 10)}


@pytest.mark.parametrize("num_classes", [6, 2])
def test_mimic_i2m2_model(num_classes):
  shapes = {"static": (5,), "timeseries": (24, 12)}
  model = models.build_model(mimic_model_config("i2m2"), shapes, num_classes)
  inputs = {m: jnp.ones((3,) + s) for m, s in shapes.items()}
  counts, out = _expert_param_counts(model, inputs)
  c = num_classes
  assert counts == {
      "uni_static": mlp_param_count(5, 10, 10) + mlp_param_count(10, 40, c),
      "uni_timeseries": gru_param_count(12, 30) + mlp_param_count(30, 15)
                        + mlp_param_count(360, 40, c),
      "joint": mlp_param_count(5, 10, 10) + gru_param_count(12, 30)
               + mlp_param_count(730, 40, c)}
  assert out["log_probs"].shape == (3, c)
