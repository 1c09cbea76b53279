"""The C++ CPU kernels of LeNet blocks (i2m2_jax/fast/cpu_kernels.cc) against float64 NumPy
references, the blocks and the fast model built on them, and the fallback when they cannot be
built."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from i2m2_jax import paper_models
from i2m2_jax.fast import cpu_kernels
from i2m2_jax.fast import ops as fast_ops
import test_fast_path

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")


def conv_reference(x, kernel):
  """float64 'same' convolution of x [B, Ci, H, W] with kernel [K, K, Ci, C] -> [B, H, W, C]."""
  b, _, h, w = x.shape
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
  y = np.zeros((b, h, w, kernel.shape[-1]))
  for dy in range(k):
    for dx in range(k):
      y += np.einsum("bihw,ic->bhwc", xp[:, :, dy:dy + h, dx:dx + w], kernel[dy, dx])
  return y


def windows(y):
  """[B, H, W, C] -> [B, C, H/2, W/2, 4], window element e = 2 * row + column."""
  b, h, w, c = y.shape
  return y.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 5, 1, 3, 2, 4).reshape(
      b, c, h // 2, w // 2, 4)


def from_windows(a):
  """The inverse of windows: [B, C, H/2, W/2, 4] -> [B, H, W, C]."""
  b, c, h2, w2, _ = a.shape
  return a.reshape(b, c, h2, w2, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(b, 2 * h2, 2 * w2, c)


# (batch, input channels, H, W, output channels, kernel size): output channel groups of 3 with
# tails of 1 and 2, input channel groups likewise (input gradient); pooled widths that fill the
# vectors of 8 or 16 lanes and ones that end in a partial vector.
SHAPES = [(3, 1, 12, 20, 5, 5), (2, 1, 28, 28, 9, 5), (2, 3, 16, 32, 4, 3), (2, 5, 12, 40, 2, 3),
          (1, 2, 6, 6, 1, 3), (2, 4, 10, 12, 7, 5)]


def random_case(shape, seed):
  b, ci, h, w, c, k = shape
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, ci, h, w)).astype(np.float32) + 0.3
  kernel = (rng.normal(size=(k, k, ci, c)) / (k * np.sqrt(ci))).astype(np.float32)
  return rng, x, kernel


@needs_compiler
def test_kernels_are_built_where_a_compiler_exists():
  assert cpu_kernels.available()


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(shape):
  _, x, kernel = random_case(shape, sum(shape))
  c = shape[4]
  scale = np.where(np.arange(c) % 2 == 0, 1.0, -0.5).astype(np.float32)  # max and min channels
  sel, first, moments = jax.jit(cpu_kernels.conv_pool_forward)(x, kernel, scale)
  y = conv_reference(x, kernel)
  yw = windows(y)
  want = np.where((scale >= 0)[None, :, None, None], yw.max(-1), yw.min(-1))
  np.testing.assert_allclose(sel, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(first, np.argmax(yw == want[..., None], -1))  # no ties in y
  np.testing.assert_allclose(moments[0], y.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(moments[1], y.var((0, 1, 2)), rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_float64_reference(shape):
  b, ci, h, w, c, k = shape
  rng, x, kernel = random_case(shape, sum(shape) + 1)
  g_pre = rng.normal(size=(b, c, h // 2, w // 2)).astype(np.float32)
  first = rng.integers(0, 4, size=g_pre.shape).astype(np.int8)
  coef = rng.normal(size=(4, c)).astype(np.float32)
  d_kernel, d_x = jax.jit(functools.partial(cpu_kernels.conv_pool_grads, input_grad=True))(
      x, kernel, g_pre, first, coef)
  only_kernel = jax.jit(functools.partial(cpu_kernels.conv_pool_grads, input_grad=False))(
      x, kernel, g_pre, first, coef)
  a, c1, c2, mean = (v.astype(np.float64)[None, :, None, None, None] for v in coef)
  g_z = np.where(first[..., None] == np.arange(4), g_pre.astype(np.float64)[..., None], 0.0)
  g_y = from_windows(a * (g_z - c1 - (windows(conv_reference(x, kernel)) - mean) * c2))
  p = k // 2
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
  gp = np.pad(g_y, ((0, 0), (p, p), (p, p), (0, 0)))  # gp[i + 2p - dy] = g_y[i + p - dy]
  want_kernel = np.zeros((k, k, ci, c))
  want_x = np.zeros(x.shape)
  for dy in range(k):
    for dx in range(k):
      want_kernel[dy, dx] = np.einsum("bihw,bhwc->ic", xp[:, :, dy:dy + h, dx:dx + w], g_y)
      window = gp[:, 2 * p - dy:2 * p - dy + h, 2 * p - dx:2 * p - dx + w]
      want_x += np.einsum("bhwc,ic->bihw", window, kernel[dy, dx].astype(np.float64))
  tolerance = lambda want: {"rtol": 1e-4, "atol": 1e-5 * np.abs(want).max()}  # noqa: E731
  np.testing.assert_allclose(d_kernel, want_kernel, **tolerance(want_kernel))
  np.testing.assert_allclose(only_kernel, d_kernel, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(d_x, want_x, **tolerance(want_x))


@needs_compiler
@pytest.mark.parametrize("k,ci", [(5, 1), (3, 4)])
def test_block_matches_reference_function_and_gradients(k, ci):
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, ci, 12, 16)), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (k, k, ci, 5)) * 0.3
  scale, bias = jnp.array([1.0, -0.5, 0.7, 0.0001, -2.0]), jnp.linspace(-0.2, 0.3, 5)
  cot = jax.random.normal(jax.random.key(2), (6, 5, 6, 8))

  def reference(x, kernel, scale, bias):
    y = paper_models.conv2d(x.transpose(0, 2, 3, 1), kernel, k // 2)
    out, mean, var = fast_ops.bn_relu_pool(y, scale, bias, "nhwc")
    return out.transpose(0, 3, 1, 2), mean, var

  def loss(f, *args):
    return jnp.sum(f(*args)[0] * cot)

  args = (x, kernel, scale, bias)
  for got, want in zip(jax.jit(fast_ops.conv_bn_relu_pool_cpu)(*args), reference(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for argnums in ((1, 2, 3), (0, 1, 2, 3)):  # without and with the input gradient
    got = jax.jit(jax.grad(functools.partial(loss, fast_ops.conv_bn_relu_pool_cpu),
                           argnums))(*args)
    want = jax.grad(functools.partial(loss, reference), argnums)(*args)
    test_fast_path.assert_close(want, got, rtol=1e-4, atol=1e-5)  # atol relative to max |want|
  mean, var = jnp.array([0.1, 0.2, -0.1, 0.0, 0.3]), jnp.array([1.0, 0.5, 2.0, 0.1, 0.7])
  want = fast_ops.bn_relu_pool_eval(
      paper_models.conv2d(x.transpose(0, 2, 3, 1), kernel, k // 2), scale, bias, mean, var)
  np.testing.assert_allclose(fast_ops.conv_bn_relu_pool_eval_cpu(*args, mean, var),
                             want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_vmap_calls_the_kernels_once_per_mapped_slice():
  _, x, kernel = random_case((2, 3, 8, 12, 4, 3), 5)
  xs = np.stack([x, 2 * x[::-1]])
  scale = np.ones(4, np.float32)
  mapped = jax.vmap(cpu_kernels.conv_pool_forward, in_axes=(0, None, None))(xs, kernel, scale)
  for i, xi in enumerate(xs):
    for got, want in zip(mapped, cpu_kernels.conv_pool_forward(xi, kernel, scale)):
      np.testing.assert_array_equal(got[i], want)


@needs_compiler
def test_fast_model_on_kernels_computes_the_plain_function(monkeypatch):
  # Every even-sized block on the kernels (the AV-MNIST sizes are covered in test_fast_path).
  monkeypatch.setattr(fast_ops, "CPU_KERNEL_MIN_PIXELS", 0)
  model_config = test_fast_path.small_model_config(num_blocks=1)
  _, fast = test_fast_path.build_pair(model_config, test_fast_path.TINY_SHAPES)
  x = test_fast_path.random_inputs(test_fast_path.TINY_SHAPES, 4)
  variables = jax.jit(fast.init)(test_fast_path.KEY, x)
  jaxpr = str(jax.make_jaxpr(lambda v: fast.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables))
  assert jaxpr.count("i2m2_conv_pool_forward") == 2 + 4  # fused first blocks + 4 branches
  test_fast_path.check_same_function(model_config, test_fast_path.TINY_SHAPES, batch=4)


@needs_compiler
def test_kernels_serve_3x3_and_5x5_on_even_sizes_from_the_threshold():
  assert fast_ops.use_cpu_kernels((4, 28, 28, 1), (5, 5, 1, 9), min_pixels=0)
  assert fast_ops.use_cpu_kernels((4, 6, 6, 3), (5, 5, 3, 9), min_pixels=0)
  assert not fast_ops.use_cpu_kernels((4, 6, 6, 3), (3, 3, 3, 9))  # below the threshold
  assert fast_ops.use_cpu_kernels((4, 56, 56, 6), (3, 3, 6, 12))
  assert not fast_ops.use_cpu_kernels((4, 27, 28, 1), (5, 5, 1, 9), min_pixels=0)  # odd
  assert not fast_ops.use_cpu_kernels((4, 56, 56, 6), (7, 7, 6, 12))  # kernel size


def test_switched_off_or_unbuildable_kernels_fall_back(monkeypatch):
  monkeypatch.setenv("I2M2_JAX_CPU_KERNELS", "0")
  cpu_kernels.available.cache_clear()
  try:
    assert not cpu_kernels.available()
    assert not fast_ops.use_cpu_kernels((4, 28, 28, 1), (5, 5, 1, 9), min_pixels=0)
  finally:
    cpu_kernels.available.cache_clear()
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    cpu_kernels.build()
