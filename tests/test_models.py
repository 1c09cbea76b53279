"""Shapes and parameter counts of every module, and how config kinds map to experts."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from i2m2_jax import models, modules
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
  variables, y = init_apply(modules.MLPEncoder(features=(8, 4)), x)
  assert y.shape == (B, 4)
  assert num_params(variables) == dense(16, 8) + dense(8, 4)
  assert np.all(np.asarray(y) >= 0)  # features end in ReLU


def test_gru_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 7, 3))
  variables, y = init_apply(modules.GRUEncoder(hidden=5), x)
  assert y.shape == (B, 5)
  # flax GRUCell: input kernels with biases (3 gates), hidden kernels, one hidden bias (n gate).
  assert num_params(variables) == 3 * (3 * 5 + 5) + 3 * 5 * 5 + 5


def test_conv1d_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 10, 3))
  variables, y = init_apply(modules.Conv1DEncoder(features=(4, 6), kernel_size=3), x)
  assert y.shape == (B, 6)
  assert num_params(variables) == (3 * 3 * 4 + 4) + (3 * 4 * 6 + 6)


def test_cnn_encoder():
  x = jax.random.normal(jax.random.key(1), (B, 16, 16, 2))
  variables, y = init_apply(modules.CNNEncoder(features=(4, 8)), x)
  assert y.shape == (B, 8)
  assert num_params(variables) == (9 * 2 * 4 + 4) + (9 * 4 * 8 + 8)


def test_unimodal_expert_reads_only_its_modality():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4))}
  expert = modules.UniModalExpert("a", modules.MLPEncoder(features=(5,)), head=(7, 3))
  variables, logits = init_apply(expert, inputs)
  assert logits.shape == (B, 3)
  assert num_params(variables) == dense(6, 5) + dense(5, 7) + dense(7, 3)
  changed = dict(inputs, b=inputs["b"] + 10.0)
  np.testing.assert_allclose(expert.apply(variables, changed), logits)


def test_late_fusion_expert_concatenates_its_own_encoders():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4, 2))}
  expert = modules.LateFusionExpert(
      (("a", modules.MLPEncoder(features=(5,))), ("b", modules.GRUEncoder(hidden=3))), head=(7, 3))
  variables, logits = init_apply(expert, inputs)
  assert logits.shape == (B, 3)
  assert set(variables["params"]) == {"encoder_a", "encoder_b", "head"}
  gru = 3 * (2 * 3 + 3) + 3 * 3 * 3 + 3
  assert num_params(variables) == dense(6, 5) + gru + dense(5 + 3, 7) + dense(7, 3)


def test_classifier_returns_product_and_every_expert():
  inputs = {"a": jax.random.normal(jax.random.key(1), (B, 6)),
            "b": jax.random.normal(jax.random.key(2), (B, 4))}
  experts = (("uni_a", modules.UniModalExpert("a", modules.MLPEncoder((5,)), (3,))),
             ("uni_b", modules.UniModalExpert("b", modules.MLPEncoder((5,)), (3,))))
  model = modules.MultiModalClassifier(experts)
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
  model = models.build_model(config_for(kind, "seq"), SHAPES, 4)
  inputs = {m: jax.random.normal(jax.random.key(i), (B,) + s) for i, (m, s) in enumerate(SHAPES.items())}
  variables, out = init_apply(model, inputs)
  assert list(variables["params"]) == experts
  assert out["log_probs"].shape == (B, 4)
  # Default encoders: these small inputs are flattened, so each expert is its MLP head.
  for name in experts:
    assert set(variables["params"][name]) == {"head"}


@pytest.mark.parametrize("shape,encoder", [
    ((5,), "identity"), ((20, 4), "identity"), ((12, 12, 1), "identity"),
    ((32, 32, 1), "identity"),
    ((200, 8), "conv1d"), ((32, 32, 3), "cnn"), ((2, 4, 4, 1), None),
])
def test_default_encoder_flattens_small_inputs_and_structures_large_ones(shape, encoder):
  assert models.default_encoder(shape) == encoder
  # The size threshold is the one place deciding: just above it, a structured encoder.
  if len(shape) in (2, 3):
    assert models.default_encoder((models.FLATTEN_MAX_SIZE + 1,) + (1,) * (len(shape) - 1)) \
        == models.STRUCTURED_ENCODER_BY_RANK[len(shape)]


def test_default_encoder_field_sets_the_modalities_encoders_leaves_out():
  config = config_for("inter")
  config.default_encoder, config.encoders = "mlp", "seq=gru"
  model = models.build_model(config, SHAPES, 4)
  joint = model.init(jax.random.key(0), {m: jnp.ones((B,) + s) for m, s in SHAPES.items()})[
      "params"]["joint"]
  assert "gru" in joint["encoder_seq"]
  assert all("mlp" in joint[f"encoder_{m}"] for m in ("vec", "img", "vec2"))
  config.default_encoder = "gru"  # cannot read vectors: the error names the field
  with pytest.raises(ValueError, match=r"config.model.default_encoder: vec='gru' reads examples "
                                       r"of rank \(2,\)"):
    models.build_model(config, SHAPES, 4)


def test_default_expert_is_an_mlp_on_the_flattened_inputs():
  """uni = MLP on one flattened modality; joint = MLP on their concatenation (float64 NumPy)."""
  shapes = {"seq": (3, 2), "img": (2, 2, 1)}
  config = ml_collections.ConfigDict({"kind": "inter", "head_hidden": (4,), "dropout_rate": 0.0,
                                      "encoders": "", "encoder_kwargs": {}})
  model = models.build_model(config, shapes, 3)
  inputs = {m: jax.random.normal(jax.random.key(i), (B,) + s) for i, (m, s) in
            enumerate(shapes.items())}
  variables, out = init_apply(model, inputs)
  head = variables["params"]["joint"]["head"]
  x = np.concatenate([np.asarray(inputs[m], np.float64).reshape(B, -1) for m in shapes], 1)
  w = lambda i, k: np.asarray(head[f"dense_{i}"][k], np.float64)  # noqa: E731
  logits = np.maximum(x @ w(0, "kernel") + w(0, "bias"), 0) @ w(1, "kernel") + w(1, "bias")
  np.testing.assert_allclose(out["expert_logits"]["joint"], logits, rtol=1e-5, atol=1e-5)


def test_i2m2_parameters_are_the_sum_of_its_experts():
  counts = {}
  inputs = {m: jnp.ones((B,) + s) for m, s in SHAPES.items()}
  for kind, modality in [("i2m2", ""), ("inter", ""), *[("uni", m) for m in SHAPES]]:
    model = models.build_model(config_for(kind, modality), SHAPES, 4)
    counts[kind + modality] = num_params(model.init(jax.random.key(0), inputs))
  assert counts["i2m2"] == counts["inter"] + sum(counts["uni" + m] for m in SHAPES)


def test_encoder_override_and_kwargs_from_config():
  config = config_for("uni", "seq")
  config.encoders = "seq=conv1d"
  config.encoder_kwargs = ml_collections.ConfigDict({"seq": {"features": (6,), "kernel_size": 3}})
  model = models.build_model(config, SHAPES, 4)
  variables = model.init(jax.random.key(0), {m: jnp.ones((B,) + s) for m, s in SHAPES.items()})
  assert variables["params"]["uni_seq"]["encoder"]["conv_0"]["kernel"].shape == (3, 3, 6)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.model.kind='fusion'.*i2m2"):
    models.build_model(config_for("fusion"), SHAPES, 4)
  with pytest.raises(ValueError, match=r"config.model.modality='audio'.*vec"):
    models.build_model(config_for("uni", "audio"), SHAPES, 4)
  config = config_for("inter")
  config.encoders = "vec=transformer"
  with pytest.raises(ValueError, match=r"config.model.encoders: vec='transformer' is unknown"):
    models.build_model(config, SHAPES, 4)
  config = config_for("inter")
  config.fusion = "tensor"
  with pytest.raises(ValueError, match=r"config.model.fusion='tensor'"):
    models.build_model(config, SHAPES, 4)


def test_expert_layout_is_the_one_place_that_says_what_each_expert_reads():
  config = config_for("i2m2")
  assert models.expert_layout(config, ["a", "b"]) == {"uni_a": ("a",), "uni_b": ("b",),
                                                      "joint": ("a", "b")}
  # Precomputed features: each expert reads its own key; '+' joins keys.
  config.expert_inputs = "joint=f0+f1,uni_img=i0+i1,uni_txt=t"
  keys = ["t", "i0", "i1", "f0", "f1"]
  assert models.expert_layout(config, keys) == {"uni_img": ("i0", "i1"), "uni_txt": ("t",),
                                                "joint": ("f0", "f1")}
  config.kind = "intra"
  assert list(models.expert_layout(config, keys)) == ["uni_img", "uni_txt"]
  config.kind, config.modality = "uni", "txt"
  assert list(models.expert_layout(config, keys)) == ["uni_txt"]
  assert models.experts_without({"uni_a": ("a",), "joint": ("a", "b")}, "b") == (True, False)
  config.kind, config.expert_inputs = "i2m2", "joint=f0,uni_img=zz"
  with pytest.raises(ValueError, match=r"expert 'uni_img' reads \['zz'\]"):
    models.expert_layout(config, keys)
  config.expert_inputs = "joint=f0"
  with pytest.raises(ValueError, match=r"kind='i2m2' needs uni-modal experts"):
    models.expert_layout(config, keys)


def test_experts_reading_several_keys_and_label_shaped_outputs():
  config = config_for("i2m2")
  config.expert_inputs = "uni_img=i0+i1,uni_txt=t,joint=i0+i1+t"
  config.encoders = "t=mlp,i0=mlp,i1=mlp"  # with parameters, to see one encoder per key
  shapes = {"t": (4,), "i0": (3,), "i1": (5,)}
  model = models.build_model(config, shapes, (3, 2))  # 3 binary labels
  inputs = {m: jax.random.normal(jax.random.key(i), (B,) + s) for i, (m, s) in enumerate(shapes.items())}
  variables, out = init_apply(model, inputs)
  assert set(variables["params"]["uni_img"]) == {"encoder_i0", "encoder_i1", "head"}
  assert out["log_probs"].shape == (B, 3, 2)
  assert all(v.shape == (B, 3, 2) for v in out["expert_logits"].values())
  # The product is taken per label: each label's two probabilities sum to one.
  np.testing.assert_allclose(np.exp(out["log_probs"]).sum(-1), 1.0, rtol=1e-6)
  want = product_of_experts({k: v[:, 1] for k, v in out["expert_logits"].items()})
  np.testing.assert_allclose(out["log_probs"][:, 1], want, rtol=1e-5, atol=1e-6)
  # Per-example presence drops experts for every label of that example.
  present = jnp.array([[True, False, False]] * B)
  dropped = model.apply(variables, inputs, present=present)["log_probs"]
  np.testing.assert_allclose(dropped, jax.nn.log_softmax(out["expert_logits"]["uni_img"]),
                             rtol=1e-5, atol=1e-6)


def test_the_package_has_no_import_cycle():
  """Top-level imports between i2m2_jax's modules form no cycle (tests/test_fast_path.py checks
  that `import i2m2_jax` leaves the opt-in fast path out)."""
  import ast  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(modules.__file__)
  graph = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      module = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
      module = module.removesuffix(".__init__")
      deps = set()
      for node in ast.parse(open(path).read()).body:  # module level only: lazy imports allowed
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("i2m2_jax"):
          deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
          deps |= {a.name for a in node.names if a.name.startswith("i2m2_jax")}
      graph[module] = deps
  # A package's __init__ only gathers its modules: `from package import module` depends on the
  # module, not on the package.
  packages = {m for m in graph if os.path.isdir(os.path.join(os.path.dirname(root),
                                                             *m.split(".")))}
  graph = {m: {d for d in deps if d in graph and d != m and d not in packages}
           for m, deps in graph.items()}

  def visit(m, stack):
    assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
    for d in graph[m]:
      if d not in done:
        visit(d, stack + [m])
    done.add(m)

  done = set()
  for m in graph:
    visit(m, [])
  assert "i2m2_jax.models" in graph and "i2m2_jax.fast.ops" in graph
