"""The product-of-experts combination against a float64 NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from i2m2_jax.combine import product_of_experts


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_poe(logits, present=None):
  """float64 reference: s = sum of present experts' log-softmax; log q = s - logsumexp(s)."""
  logits = [np.asarray(o, np.float64) for o in logits]
  s = np.zeros_like(logits[0])
  for e, o in enumerate(logits):
    weight = 1.0 if present is None else np.asarray(present, np.float64)[..., e:e + 1]
    s = s + weight * np_log_softmax(o)
  return np_log_softmax(s)


def random_logits(num_experts, batch=6, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(scale=3.0, size=(batch, classes)).astype(np.float32) for _ in range(num_experts)]


@pytest.mark.parametrize("num_experts", [1, 2, 3, 5])  # 5 = I2M2 over 4 modalities
def test_matches_float64_reference(num_experts):
  logits = random_logits(num_experts, seed=num_experts)
  got = product_of_experts([jnp.asarray(o) for o in logits])
  np.testing.assert_allclose(np.asarray(got), np_poe(logits), atol=2e-5, rtol=1e-5)


def test_output_is_normalised_and_equals_log_softmax_of_summed_logits():
  logits = random_logits(3)
  got = np.asarray(product_of_experts(logits), np.float64)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, np_log_softmax(np.sum(logits, axis=0, dtype=np.float64)), atol=2e-5)


def test_mapping_input_gives_same_result_as_sequence():
  logits = random_logits(3)
  as_map = product_of_experts({"uni_a": logits[0], "uni_b": logits[1], "joint": logits[2]})
  np.testing.assert_allclose(np.asarray(as_map), np.asarray(product_of_experts(logits)), atol=1e-6)


def test_invariant_to_per_expert_logit_shifts():
  # Each expert is normalised before the product: shifting one expert's logits changes nothing.
  logits = random_logits(3)
  shifted = [logits[0] + 7.0, logits[1] - 3.0, logits[2]]
  np.testing.assert_allclose(np.asarray(product_of_experts(shifted)),
                             np.asarray(product_of_experts(logits)), atol=1e-5)


def test_single_expert_is_its_log_softmax():  # the 'inter' and 'uni' baselines
  (o,) = random_logits(1)
  np.testing.assert_allclose(np.asarray(product_of_experts([o])), np_log_softmax(o.astype(np.float64)),
                             atol=1e-5)


def test_intra_is_the_product_of_the_unimodal_experts_only():
  a, b, joint = random_logits(3)
  intra = product_of_experts([a, b])
  i2m2 = product_of_experts([a, b, joint])
  np.testing.assert_allclose(np.asarray(intra), np_poe([a, b]), atol=2e-5)
  assert not np.allclose(np.asarray(intra), np.asarray(i2m2), atol=1e-3)


def test_dropped_expert_for_all_examples_equals_product_of_the_rest():
  logits = random_logits(4, seed=3)  # e.g. 3 modalities' experts + joint
  logits[1] = np.full_like(logits[1], np.nan)  # a missing modality's expert may be garbage
  got = product_of_experts(logits, present=jnp.array([True, False, True, True]))
  np.testing.assert_allclose(np.asarray(got), np_poe([logits[0], logits[2], logits[3]]), atol=2e-5)


def test_per_example_presence_mask():
  logits = random_logits(3, batch=4, seed=5)
  present = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], bool)
  got = np.asarray(product_of_experts(logits, present=present))
  np.testing.assert_allclose(got, np_poe(logits, present), atol=2e-5)
  # Row 2 keeps only expert 1: its log-softmax.
  np.testing.assert_allclose(got[2], np_log_softmax(logits[1][2].astype(np.float64)), atol=1e-5)


def test_jit_and_grad_are_finite_for_extreme_logits():
  logits = [jnp.array([[1e4, -1e4, 0.0]]), jnp.array([[-50.0, 60.0, 0.0]])]
  f = jax.jit(lambda ls: product_of_experts(ls)[0, 2])
  assert np.isfinite(float(f(logits)))
  grads = jax.grad(f)(logits)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_errors():
  with pytest.raises(ValueError, match="at least one"):
    product_of_experts([])
  with pytest.raises(ValueError, match="3 experts"):
    product_of_experts(random_logits(3), present=jnp.array([True, False]))
