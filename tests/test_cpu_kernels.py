"""The C++ CPU kernels of the first LeNet block (i2m2_jax/cpu_kernels.cc) against float64 NumPy
references, the fast model's use of them, and the fallback when they cannot be built."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from i2m2_jax import cpu_kernels
from i2m2_jax import fast_models

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")


def conv5x5_reference(x, kernel):
  """float64 'same' 5x5 convolution of x [B, H, W] with kernel [5, 5, C] -> [B, H, W, C]."""
  b, h, w = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (2, 2)))
  y = np.zeros((b, h, w, kernel.shape[-1]))
  for dy in range(5):
    for dx in range(5):
      y += xp[:, dy:dy + h, dx:dx + w, None] * kernel[dy, dx].astype(np.float64)
  return y


def windows(y):
  """[B, H, W, C] -> [B, C, H/2, W/2, 4], window element e = 2 * row + column."""
  b, h, w, c = y.shape
  return y.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 5, 1, 3, 2, 4).reshape(
      b, c, h // 2, w // 2, 4)


# (batch, H, W, channels): channel groups of 3 with tails of 1 and 2; pooled widths that are a
# multiple of the 8 lanes and ones that end in a partial vector.
SHAPES = [(3, 12, 20, 5), (2, 16, 32, 4), (1, 6, 6, 1), (2, 28, 28, 9)]


@needs_compiler
def test_kernels_are_built_where_a_compiler_exists():
  assert cpu_kernels.available()


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_stem_forward_matches_float64_reference(shape):
  b, h, w, c = shape
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=(b, h, w)).astype(np.float32) + 0.3
  kernel = (rng.normal(size=(5, 5, c)) * 0.3).astype(np.float32)
  scale = np.where(np.arange(c) % 2 == 0, 1.0, -0.5).astype(np.float32)  # max and min channels
  sel, first, moments = jax.jit(cpu_kernels.stem_forward)(x, kernel.reshape(25, c), scale)
  y = conv5x5_reference(x, kernel)
  yw = windows(y)
  want = np.where((scale >= 0)[None, :, None, None], yw.max(-1), yw.min(-1))
  np.testing.assert_allclose(sel, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(first, np.argmax(yw == want[..., None], -1))  # no ties in y
  np.testing.assert_allclose(moments[0], y.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(moments[1], y.var((0, 1, 2)), rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_stem_kernel_grad_matches_float64_reference(shape):
  b, h, w, c = shape
  rng = np.random.default_rng(sum(shape) + 1)
  x = rng.normal(size=(b, h, w)).astype(np.float32)
  kernel = (rng.normal(size=(5, 5, c)) * 0.3).astype(np.float32)
  g_pre = rng.normal(size=(b, c, h // 2, w // 2)).astype(np.float32)
  first = rng.integers(0, 4, size=g_pre.shape).astype(np.int8)
  coef = rng.normal(size=(4, c)).astype(np.float32)
  got = jax.jit(cpu_kernels.stem_kernel_grad)(x, kernel.reshape(25, c), g_pre, first, coef)
  a, c1, c2, mean = (v.astype(np.float64)[None, :, None, None, None] for v in coef)
  g_z = np.where(first[..., None] == np.arange(4), g_pre.astype(np.float64)[..., None], 0.0)
  g_y = a * (g_z - c1 - (windows(conv5x5_reference(x, kernel)) - mean) * c2)
  g_y = g_y.reshape(b, c, h // 2, w // 2, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(b, h, w, c)
  xp = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (2, 2)))
  want = np.stack([np.einsum("bhw,bhwc->c", xp[:, dy:dy + h, dx:dx + w], g_y)
                   for dy in range(5) for dx in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_compiler
def test_cpu_stem_block_matches_reference_function_and_gradients():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 12, 16, 1)), jnp.float32)
  k = jax.random.normal(jax.random.key(1), (5, 5, 1, 5)) * 0.3
  scale, bias = jnp.array([1.0, -0.5, 0.7, 0.0001, -2.0]), jnp.linspace(-0.2, 0.3, 5)
  cot = jax.random.normal(jax.random.key(2), (6, 6, 8, 5))

  def reference(x, k, scale, bias):
    return fast_models.bn_relu_pool(fast_models.conv2d(x, k, 2), scale, bias, "nhwc")

  def loss(f, *args):
    return jnp.sum(f(*args)[0] * cot)

  for got, want in zip(jax.jit(fast_models.stem_bn_relu_pool_cpu)(x, k, scale, bias),
                       reference(x, k, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Parameter gradients from the kernels; the input gradient from the XLA implementation.
  for argnums in ((1, 2, 3), (0, 1, 2, 3)):
    got = jax.jit(jax.grad(functools.partial(loss, fast_models.stem_bn_relu_pool_cpu),
                           argnums))(x, k, scale, bias)
    want = jax.grad(functools.partial(loss, reference), argnums)(x, k, scale, bias)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  mean, var = jnp.array([0.1, 0.2, -0.1, 0.0, 0.3]), jnp.array([1.0, 0.5, 2.0, 0.1, 0.7])
  np.testing.assert_allclose(
      fast_models.stem_bn_relu_pool_eval_cpu(x, k, scale, bias, mean, var),
      fast_models.bn_relu_pool_eval(fast_models.conv2d(x, k, 2), scale, bias, mean, var),
      rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernels_serve_one_input_channel_and_even_sizes():
  shape = (4, 28, 28, 1)
  kernel_shape = (5, 5, 1, 9)
  assert fast_models.use_cpu_kernels(shape, kernel_shape)
  assert not fast_models.use_cpu_kernels((4, 28, 28, 2), (5, 5, 2, 9))  # one input channel only
  assert not fast_models.use_cpu_kernels((4, 27, 28, 1), kernel_shape)  # even sizes only


def test_switched_off_or_unbuildable_kernels_fall_back(monkeypatch):
  monkeypatch.setenv("I2M2_JAX_CPU_KERNELS", "0")
  cpu_kernels.available.cache_clear()
  try:
    assert not cpu_kernels.available()
    assert not fast_models.use_cpu_kernels((4, 28, 28, 1), (5, 5, 1, 9))
  finally:
    cpu_kernels.available.cache_clear()
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    cpu_kernels.build()
