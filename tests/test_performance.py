"""Issue 18's pieces: config.model.remat computes the same function and gradients, and
experiments/benchmark.py measures the fastMRI step (rows, XLA's memory and FLOPs, XLA options)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from configs import fastmri as fastmri_config
from helpers import import_experiment
from i2m2_jax import models

benchmark = import_experiment("benchmark")
TINY_RESNET = {"widths": (8,), "blocks": (2,), "pooled_size": 2}


@pytest.mark.parametrize("encoder, kwargs, shape", [
    ("preactresnet18", TINY_RESNET, (8, 8, 1)),        # remat per residual block
    ("mlp", {"features": (8,)}, (6,)),               # the whole encoder
])
def test_remat_gives_the_same_outputs_and_gradients(encoder, kwargs, shape):
  config = default.get_config().model
  config.encoders = f"a={encoder},b={encoder}"
  config.encoder_kwargs = ml_collections.ConfigDict({"a": kwargs, "b": kwargs})
  shapes = {"a": shape, "b": shape}
  rng = np.random.default_rng(0)
  x = {k: jnp.asarray(rng.normal(size=(4,) + s), jnp.float32) for k, s in shapes.items()}
  plain = models.build_model(config, shapes, (3,))
  variables = plain.init(jax.random.key(0), x, train=False)
  config.remat = True
  remat = models.build_model(config, shapes, (3,))
  assert (jax.tree.structure(remat.init(jax.random.key(0), x, train=False))
          == jax.tree.structure(variables))  # the same variables: checkpoints are interchangeable

  def loss(params, model):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out["log_probs"][:, 0] * jnp.arange(1.0, 5.0)), out["log_probs"]

  # remat is in effect: the gradient's program recomputes under a checkpoint (primitive
  # 'remat2', 'checkpoint' in some JAX versions), the plain one does not.
  primitives = [{e.primitive.name for e in jax.make_jaxpr(jax.grad(
      lambda p, m=m: loss(p, m)[0]))(variables["params"]).jaxpr.eqns} for m in (plain, remat)]
  assert not primitives[0] & {"remat2", "checkpoint"} and primitives[1] & {"remat2", "checkpoint"}
  (l0, out0), g0 = jax.value_and_grad(loss, has_aux=True)(variables["params"], plain)
  (l1, out1), g1 = jax.value_and_grad(loss, has_aux=True)(variables["params"], remat)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  assert float(l0) == pytest.approx(float(l1), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g0))


def test_remat_is_refused_by_the_fast_implementation():
  config = default.get_config().model
  config.encoders, config.implementation, config.remat = "a=lenet,b=lenet", "fast", True
  with pytest.raises(ValueError, match="config.model.remat"):
    models.build_model(config, {"a": (28, 28, 1), "b": (28, 28, 1)}, (10,))


def test_benchmark_measures_the_fastmri_step_with_xla_options():
  work = benchmark.workload(fastmri_config.get_config("smoke"), hw=16)
  assert work.shapes == {"magnitude": (16, 16, 1), "phase": (16, 16, 1)}
  assert work.config.model.encoder_kwargs.magnitude.pooled_size == 1  # hw // 32, at least 1
  options = "plain+xla_cpu_enable_fast_math=false"
  rows, report = benchmark.run(work, [2], steps=1, repeats=1, paths=["plain", options, "fast"],
                               experts=False, expert_paths=[], measure_input=False,
                               input_rows=0, matmul_n=64, log=lambda _: None,
                               dtypes=("float32", "bfloat16"))
  assert sorted((r["path"], r["dtype"], r["mode"]) for r in rows) == sorted(
      (p, d, m) for p in ("plain", options) for d in ("float32", "bfloat16")
      for m in ("train", "eval"))  # fast: AV-MNIST only
  low = [r for r in rows if r["dtype"] == "bfloat16"]
  assert all(r["speedup_vs_float32"] > 0 and r["matmul_gflop_per_s"] > 0 for r in low)
  assert "fast implements AV-MNIST's LeNet models only" in report
  for r in rows:
    assert {"path", "mode", "batch", "hw", "dtype", "examples_per_s", "gflop_per_s",
            "peak_bytes_per_example", "first_step_s"} <= set(r)
    assert r["hw"] == 16 and r["examples_per_s"] > 0 and r["peak_bytes_per_example"] > 0
  train = {r["path"]: r for r in rows if r["mode"] == "train" and r["dtype"] == "float32"}
  # The same function on both paths, credited the same XLA FLOP count per example.
  flops = {p: r["gflop_per_s"] / r["examples_per_s"] for p, r in train.items()}
  assert flops["plain"] == pytest.approx(flops[options], rel=1e-6) and flops["plain"] > 0
  assert train["plain"]["recompilations"] == 0


def test_benchmark_memory_rows_and_path_errors():
  work = benchmark.workload(fastmri_config.get_config("smoke"), hw=16)
  rows = benchmark.memory_rows(work, [2], ["plain"], budget_gib=1.0, log=lambda _: None)
  assert [r["batch"] for r in rows] == [2]
  for r in rows:
    # The largest batch: its temporaries (at this rate), the state and the outputs fit in the
    # budget, and one more example would not.
    fixed = r["state_bytes"] + r["output_bytes"]
    assert r["max_batch_in_budget"] * r["peak_bytes_per_example"] + fixed <= 2 ** 30
    assert (r["max_batch_in_budget"] + 1) * r["peak_bytes_per_example"] + fixed > 2 ** 30
  with pytest.raises(ValueError, match="unknown path 'tuned'"):
    benchmark.parse_path("tuned")
  with pytest.raises(ValueError, match="is not xla_option=value"):
    benchmark.parse_path("plain+xla_cpu_enable_fast_math")
  assert benchmark.parse_path("remat+a=true+b=3+c=X")[1:] == (False, {"a": True, "b": 3, "c": "X"})
