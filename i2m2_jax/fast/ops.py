"""The operations of the fast LeNet classifier (items 2-5 of the package docstring): LeNet blocks
(convolution -> BatchNorm -> ReLU -> 2x2 max-pool) and their parts as fused operations with
hand-written gradients, each computing what paper_models.LeNet computes, to float32 rounding.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from i2m2_jax.fast import cpu_kernels
from i2m2_jax.paper_models import BN_EPSILON
from i2m2_jax.paper_models import conv2d

# ---------------------------------------------------------------------------------------------
# Convolutions


# XLA's CPU backend hands a convolution to its fast library (YNNPACK) only when more than 16
# channels go in or out, and not when the kernel is reversed (as in the input gradient XLA
# derives). LeNet's early convolutions have 3..12 channels, so they ran on a slower generic
# path; computing them with the output channels zero-padded to 17 (and the input gradient as a
# plain convolution with an explicitly flipped kernel) takes the fast path: about 2x faster for
# the 6->12 and 12->6 convolutions of AV-MNIST on 2 CPU cores, same results to float32 rounding.
# Only on CPU; with 3 input channels the padded form was slower, so those are left alone.
# Only in training: evaluation is compiled with convolutions left to XLA's own implementation
# (train_lib.compiler_options), which was faster there without padding.
_LIBRARY_MIN_CHANNELS = 17
_PAD_MIN_INPUT_CHANNELS = 6


def _padded_out_channels(ci: int, co: int) -> int:
  if (jax.default_backend() == "cpu" and ci >= _PAD_MIN_INPUT_CHANNELS
      and max(ci, co) < _LIBRARY_MIN_CHANNELS):
    return _LIBRARY_MIN_CHANNELS
  return co


def _conv_padded(x, kernel, padding):
  """conv2d with the output channels zero-padded when that reaches the fast CPU path."""
  ci, co = kernel.shape[2], kernel.shape[3]
  n = _padded_out_channels(ci, co)
  if n == co:
    return conv2d(x, kernel, padding)
  return conv2d(x, jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, n - co))), padding)[..., :co]


_FLIP3 = np.array([2, 1, 0])


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' 3x3 stride-1 NHWC convolution (no bias) = conv2d(x, kernel, 1), with the
  channel padding above in the forward pass and the input gradient."""
  return _conv_padded(x, kernel, 1)


def _conv3x3_fwd(x, kernel):
  return _conv_padded(x, kernel, 1), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  # Input gradient: the convolution of g with the spatially flipped, transposed kernel. The flip
  # is a gather so that XLA does not fold it into a reversed window.
  flipped = jnp.take(jnp.take(kernel, _FLIP3, axis=0), _FLIP3, axis=1).transpose(0, 1, 3, 2)
  d_x = _conv_padded(g, flipped, 1)
  return d_x, conv3x3_kernel_grad(x, g)


# XLA computes a kernel gradient as a convolution whose features are the batch (after
# transposing both operands); on CPU that got much slower with more than ~16 examples. Summing
# it over independent chunks of 8-16 examples (16 chunks at most) was 2-5x faster at batch 40 and
# 256, and the chunks run concurrently on the cores. Every chunk is a separate XLA operation to
# compile (+3 s for the AV-MNIST I2M2 step when done for all layers), so only the layers of at
# least 28x28 pixels, where nearly all the gain is, are chunked, in chunks of up to 16 examples:
# at batch 40 four chunks of 10 took as long as five of 8 (7.5 vs 7.2 ms for the four chunked
# layers) and compiled ~0.4 s faster; chunks of 20 took twice as long. (On CPU those layers run
# on cpu_kernels when they are available: this is the path without them, and on other backends.)
_KERNEL_GRAD_CHUNK = 16
_KERNEL_GRAD_MAX_CHUNKS = 16
_KERNEL_GRAD_MIN_SIZE = 28 * 28


def _kernel_grad(x, g):
  """Gradient of conv2d(x, kernel, 1) (3x3) wrt kernel for output cotangent g: the convolution
  of the padded input with g, examples as the contracted features. The HLO jax.vjp derives,
  written directly: tracing a vjp per chunk took ~0.1 s of the first step's 0.9 s of tracing."""
  return lax.conv_general_dilated(x, g, (1, 1), [(1, 1), (1, 1)],
                                  dimension_numbers=("CHWN", "IHWO", "HWNC"))


def conv3x3_kernel_grad(x, g):
  """Gradient of conv2d(x, kernel, 1) wrt kernel for output cotangent g, summed over chunks."""
  b = x.shape[0]
  target = max(_KERNEL_GRAD_CHUNK, -(-b // _KERNEL_GRAD_MAX_CHUNKS))
  chunked = jax.default_backend() == "cpu" and x.shape[1] * x.shape[2] >= _KERNEL_GRAD_MIN_SIZE
  size = _chunk_size(b, target) if chunked else b
  total = None
  for lo in range(0, b, size):
    part = _kernel_grad(x[lo:lo + size], g[lo:lo + size])
    total = part if total is None else total + part
  return total


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def space_to_depth(x: jax.Array, block: int = 2) -> jax.Array:
  """[B, H, W, C] -> [B, H/b, W/b, b*b*C], channels ordered (row in block, column, channel)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


@functools.lru_cache(maxsize=None)
def _s2d_taps(kernel_size: int, block: int):
  """For each (block offset t in 0..2, input sub-position a, output sub-position p): the tap d of
  the original kernel that connects them (d = (t-1)*block + a - p + kernel_size//2), and whether
  it lies inside the kernel."""
  t = np.arange(3)[:, None, None]
  a = np.arange(block)[None, :, None]
  p = np.arange(block)[None, None, :]
  d = (t - 1) * block + a - p + kernel_size // 2
  valid = (d >= 0) & (d < kernel_size)
  return np.clip(d, 0, kernel_size - 1), valid


def s2d_kernel(kernel: jax.Array, block: int = 2) -> jax.Array:
  """A 'same' KxK kernel [K, K, Ci, Co] (K odd, K//2 <= block) as the 3x3 kernel
  [3, 3, b*b*Ci, b*b*Co] of the same convolution on space-to-depth input and output.

  Output channel (py, px, co) of block (i, j) is pixel (b*i + py, b*j + px); input channel
  (ay, ax, ci) of block (i + ty - 1, j + tx - 1) is pixel (b*(i + ty - 1) + ay, ...). A linear
  (gather) function of the kernel, so gradients flow back to the KxK kernel.
  """
  k, _, ci, co = kernel.shape
  if k % 2 != 1 or k // 2 > block:
    raise ValueError(f"s2d_kernel needs an odd kernel no larger than 2*block+1; got {k}.")
  d, valid = _s2d_taps(k, block)  # [3, b, b]
  # Index [ty, tx, ay, ax, py, px] -> kernel[dy, dx].
  dy = d[:, None, :, None, :, None]
  dx = d[None, :, None, :, None, :]
  mask = (valid[:, None, :, None, :, None] & valid[None, :, None, :, None, :])
  w = kernel[dy, dx]  # [3, 3, b, b, b, b, ci, co]
  w = jnp.where(mask[..., None, None], w, 0.0)
  # -> [ty, tx, (ay, ax, ci), (py, px, co)]
  w = w.transpose(0, 1, 2, 3, 6, 4, 5, 7)
  return w.reshape(3, 3, block * block * ci, block * block * co)


def can_use_s2d(shape: Sequence[int], kernel_size: int) -> bool:
  """Space-to-depth by 2 needs even spatial sizes and a kernel of at most 5x5."""
  return shape[1] % 2 == 0 and shape[2] % 2 == 0 and kernel_size % 2 == 1 and kernel_size <= 5


def use_s2d_conv3x3(shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
  """Whether conv3x3_s2d is the faster form (see there): on CPU, for the 3x3 convolutions with
  fewer input channels than the padded form needs, on even sizes."""
  return (jax.default_backend() == "cpu" and kernel_shape[0] == 3
          and kernel_shape[2] < _PAD_MIN_INPUT_CHANNELS and can_use_s2d(shape, 3))


def conv3x3_s2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv2d(x, kernel, 1) for a 3x3 kernel, computed on the 2x2 space-to-depth of x and returned
  in the 's2d' pooling layout [B, H/2, W/2, 4, Co] (the four pixels of each 2x2 window on axis 3,
  as bn_relu_pool reads them). Four times the multiply-adds, but with 4*Ci input and 4*Co output
  channels: for the 3 -> 6 convolutions of AV-MNIST, 2x faster in inference at 56x56 and batch
  256 (13 vs 27 ms on 2 cores) and 1.5x at 14x14 with XLA's library convolutions; with XLA's own
  (as evaluation now compiles) the eval step was 175 vs 182 ms at batch 256 and 22.9 vs 25.4 ms
  at 40 with it than without. Their kernel and input gradients in this form were slower at batch
  40, and so was the whole train step with it (85.6 vs 84.3 ms), so training keeps conv3x3."""
  y = conv2d(space_to_depth(x, 2), s2d_kernel(kernel, 2), 1)
  b, h, w, _ = y.shape
  return y.reshape(b, h, w, 4, kernel.shape[-1])


# ---------------------------------------------------------------------------------------------
# BatchNorm + ReLU + 2x2 max-pool
#
# Two layouts of the convolution output y:
#   'nhwc': [B, H, W, C]; windows are 2x2 spatial blocks (odd sizes: the last row/column is
#           dropped by the pool, VALID, but still counts in the BatchNorm statistics);
#   's2d':  [B, H/2, W/2, 4, C]; axis 3 holds the four pixels of each window (space-to-depth).


def _windows(y: jax.Array, layout: str) -> tuple[jax.Array, tuple[int, ...]]:
  """The pooled region of y viewed with explicit window axes, and those axes."""
  if layout == "s2d":
    return y, (3,)
  b, h, w, c = y.shape
  h2, w2 = h // 2, w // 2
  return y[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c), (2, 4)


def _window_index(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[jax.Array, int]:
  """Row-major position inside the window ([shape] broadcastable, int8) and the window size."""
  idx_shape = [shape[i] if i in axes else 1 for i in range(len(shape))]
  idx = jnp.zeros(idx_shape, jnp.int8)
  size = 1
  for ax in reversed(axes):
    idx = idx + lax.broadcasted_iota(jnp.int8, idx_shape, ax) * jnp.int8(size)
    size *= shape[ax]
  return idx, size


def _window_elements(yw, axes) -> list[jax.Array]:
  """The window's elements in row-major window order, each with the window axes kept as size 1."""
  elements = [yw]
  for ax in axes:
    elements = [lax.slice_in_dim(e, i, i + 1, axis=ax) for e in elements
                for i in range(yw.shape[ax])]
  return elements


def _tree_reduce(op, xs):
  while len(xs) > 1:
    xs = [op(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
  return xs[0]


def _pool_selected(yw, axes, scale):
  """Per window the element BatchNorm maps to the largest value: max where scale >= 0, else min
  (BatchNorm is a monotone map per channel, so this commutes exactly with the pool).

  Written as elementwise max/min of the window's elements, which XLA fuses into one loop; a
  reduce over small window axes went to a slow library reduction on CPU."""
  elements = _window_elements(yw, axes)
  return jnp.where(scale >= 0, _tree_reduce(jnp.maximum, elements),
                   _tree_reduce(jnp.minimum, elements))


def _first_selected(elements, selected):
  """Index (int8) of the first window element equal to `selected`, in window order (as XLA's
  select-and-scatter picks for max-pool)."""
  first = jnp.full(selected.shape, len(elements), jnp.int8)
  for i in reversed(range(len(elements))):
    first = jnp.where(elements[i] == selected, jnp.int8(i), first)
  return first


def _moments(y):
  axes = tuple(range(y.ndim - 1))
  mean = y.mean(axes)
  var = jnp.square(y - mean).mean(axes)
  return mean, var


def _squeeze_pooled(x, layout):
  if layout == "s2d":
    return jnp.squeeze(x, 3)
  return jnp.squeeze(x, (2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bn_relu_pool(y: jax.Array, scale: jax.Array, bias: jax.Array, layout: str = "nhwc"):
  """Training-mode BatchNorm (batch statistics, biased variance) -> ReLU -> 2x2 max-pool.

  Returns (pooled [B, H/2, W/2, C], batch mean [C], biased batch variance [C]). The statistics
  are for the running averages only: their cotangents are ignored (they must not feed the loss).
  """
  return _bn_relu_pool_fwd(y, scale, bias, layout)[0]


def _bn_relu_pool_fwd(y, scale, bias, layout):
  mean, var = _moments(y)
  rstd = lax.rsqrt(var + BN_EPSILON)
  yw, axes = _windows(y, layout)
  selected = _pool_selected(yw, axes, scale)
  pre = (selected - mean) * rstd * scale + bias  # the order of TorchBatchNorm's operations
  out = _squeeze_pooled(nn.relu(pre), layout)
  return (out, mean, var), (y, selected, pre, mean, rstd, scale)


def _bn_relu_pool_bwd(layout, residuals, cotangents):
  y, selected, pre, mean, rstd, scale = residuals
  g_out = cotangents[0]  # the statistics' cotangents are ignored (see the docstring)
  count = y.size // y.shape[-1]
  a = rstd * scale
  yw, axes = _windows(y, layout)
  g_pre = jnp.where(pre > 0, jnp.expand_dims(g_out, axes), 0.0)
  x_selected = (selected - mean) * rstd
  stat_axes = tuple(range(g_pre.ndim - 1))
  g_bias = g_pre.sum(stat_axes)
  g_scale = (g_pre * x_selected).sum(stat_axes)
  # The pooled gradient goes to the first maximal element of each window in row-major order,
  # as XLA's select-and-scatter does for max-pool.
  idx, _ = _window_index(yw.shape, axes)
  first = _first_selected(_window_elements(yw, axes), selected)
  g_z = jnp.where(idx == first, g_pre, 0.0)
  if layout == "s2d" or yw.size == y.size:
    g_z = g_z.reshape(y.shape)
  else:  # odd sizes: the dropped row/column gets no pooled gradient
    b, h, w, c = y.shape
    g_z = g_z.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    g_z = jnp.pad(g_z, ((0, 0), (0, h - g_z.shape[1]), (0, w - g_z.shape[2]), (0, 0)))
  g_y = a * (g_z - g_bias / count - (y - mean) * rstd * (g_scale / count))
  return g_y, g_scale, g_bias


bn_relu_pool.defvjp(_bn_relu_pool_fwd, _bn_relu_pool_bwd)


def bn_relu_pool_eval(y, scale, bias, mean, var, layout: str = "nhwc"):
  """Inference-mode BatchNorm (running statistics) -> ReLU -> 2x2 max-pool, pooling first."""
  rstd = lax.rsqrt(var + BN_EPSILON)
  yw, axes = _windows(y, layout)
  selected = _pool_selected(yw, axes, scale)
  return _squeeze_pooled(nn.relu((selected - mean) * rstd * scale + bias), layout)


# ---------------------------------------------------------------------------------------------
# The first block as matrix products, channels first
#
# The 5x5 convolution of the first block, written on the 2x2 space-to-depth input (s2d_kernel),
# is one matrix product Y^T = Ws^T P^T where P^T [9*4*Ci, N] holds, for each of the N = B*H/2*W/2
# output blocks, its 3x3 neighbourhood of input blocks (channels first: rows are (ty, tx, ay, ax,
# ci), columns (b, i, j)), and the rows (py, px, co) of Y^T are the four pixels of each pooling
# window. BatchNorm statistics and the pool are then reductions and maxima over contiguous rows
# (an XLA library reduction over the 4 rows was 10x slower than the elementwise maxima used).


def stem_patches(x: jax.Array) -> jax.Array:
  """P^T [36*Ci, B*H/2*W/2] of NHWC x [B, H, W, Ci] (H, W even): the 3x3 block neighbourhoods of
  its 2x2 space-to-depth, zero-padded by one block (= 2 pixels, the 5x5 kernel's 'same')."""
  b, h, w, ci = x.shape
  h2, w2 = h // 2, w // 2
  xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  planes = xp.reshape(b, h2 + 2, 2, w2 + 2, 2, ci).transpose(2, 4, 5, 0, 1, 3)  # ay ax ci b i j
  taps = [planes[..., ty:ty + h2, tx:tx + w2] for ty in range(3) for tx in range(3)]
  return jnp.stack(taps).reshape(36 * ci, b * h2 * w2)


def _stem_pool(yt, scale):
  """Max (min where scale < 0) over the four window rows of yt [4, co, N], elementwise."""
  rows = list(yt)
  return jnp.where((scale >= 0)[:, None], _tree_reduce(jnp.maximum, rows),
                   _tree_reduce(jnp.minimum, rows))


def _per_channel(v, ndim: int):
  """[C] -> broadcastable against an `ndim`-axis array with its channels on axis 1."""
  return v.reshape((-1,) + (1,) * (ndim - 2))


def _bn_relu(sel, mean, rstd, scale, bias):
  """ReLU(BatchNorm) of selected window elements with their channels on axis 1 (in the order of
  TorchBatchNorm's operations)."""
  c = functools.partial(_per_channel, ndim=sel.ndim)
  return nn.relu((sel - c(mean)) * c(rstd) * c(scale) + c(bias))


def _bn_relu_grads(sel, g, mean, rstd, scale, bias, count: int):
  """The backward pass of _bn_relu for the pooled gradient g: (g_pre, g_scale, g_bias, (a, c1,
  c2)), g_pre the gradient before the ReLU, and BatchNorm's input gradient
  g_y = a (g_z - c1 - (y - mean) c2) with g_z g_pre routed to its window's selected element;
  `count` is the number of elements per channel of the convolution output y."""
  c = functools.partial(_per_channel, ndim=sel.ndim)
  x_sel = (sel - c(mean)) * c(rstd)
  g_pre = jnp.where(x_sel * c(scale) + c(bias) > 0, g, 0.0)
  axes = (0, *range(2, sel.ndim))
  g_bias = g_pre.sum(axes)
  g_scale = (g_pre * x_sel).sum(axes)
  return g_pre, g_scale, g_bias, (rstd * scale, g_bias / count, rstd * g_scale / count)


def _chunk_size(batch: int, target: int) -> int:
  """The largest divisor of batch that is at most target."""
  return max(d for d in range(1, min(batch, max(target, 1)) + 1) if batch % d == 0)


def _stem_chunk_stats(xc, ws, scale):
  """One chunk of examples: the pooled selection, its window index, and the chunk's mean and
  sum of squared deviations per channel (exact two-pass within the chunk)."""
  pt = stem_patches(xc)
  co = ws.shape[1] // 4
  yt = jnp.dot(ws.T, pt).reshape(4, co, -1)
  mean = yt.mean((0, 2))
  m2 = jnp.square(yt - mean[:, None]).sum((0, 2))
  sel = _stem_pool(yt, scale)
  return sel, _first_selected(list(yt), sel), mean, m2


# In evaluation the chunks are processed in two independent loops (lax.map over a share each),
# which XLA's CPU runtime can run concurrently: 4.6 % faster at batch 40 than one loop (2 % slower
# at 256). Training uses one loop: two were as fast (0.9 % faster at batch 40, 0.3 % slower at
# 256, 2 CPU cores) but each loop body is compiled again (+0.18 s XLA compile at batch 40), and
# a trace of the step showed the two loops mostly run one after the other: XLA's CPU executor
# hands ready operations to a second thread only when more than 8 are ready at once.
_EVAL_STEM_LANES = 2


def _lanes(n: int, lanes: int) -> list[tuple[int, int]]:
  k = max(1, min(lanes, n))
  bounds = [round(i * n / k) for i in range(k + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _in_lanes(f, xs, lanes: int):
  """lax.map(f, xs) as `lanes` independent maps over contiguous shares of xs."""
  parts = [lax.map(f, xs[lo:hi]) for lo, hi in _lanes(xs.shape[0], lanes)]
  return parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def stem_chunk(batch: int, train: bool) -> int:
  """Examples per chunk of the first block (at most; `_chunk_size` takes a divisor of the batch).
  On CPU: 4 in training, whose backward pass recomputes each chunk and should find it in cache
  (larger chunks were faster for the block alone, 12 vs 20 ms as one chunk at batch 40, but made
  the whole train step slower: 104 vs 82 ms at batch 40, 689 vs 653 ms at batch 256 with 16);
  32 in evaluation, where fewer, larger products won (AV-MNIST audio stem, 2 cores: 42 vs 50 ms
  at batch 256, 4.6 vs 7.0 ms at batch 40, i.e. two chunks of 20, one per core). Elsewhere the
  whole batch: one large matrix product fills the device and a loop would serialise it."""
  if jax.default_backend() != "cpu":
    return batch
  return 4 if train else 32


# The training forward pass needs no recomputation, so it takes larger chunks than the backward
# pass (a multiple of its chunk, so that the saved pooling choices regroup by a transpose): on 2
# CPU cores chunks of up to 20 made the AV-MNIST I2M2 train step 8 % faster at batch 40 (chunks
# of 20) and 4 % at 256 (16) than chunks of 4; the whole batch as one chunk (40) was 7 % slower
# than 20 at batch 40, and 32 at batch 256 1 % faster than 16. Only for inputs of at least 56x56
# pixels: for the 28x28 image stem it changed nothing (-1.6 % at batch 40, +1 % at 256) but the
# regrouping added 0.2 s to the XLA compile.
TRAIN_FORWARD_CHUNK = 20
_FORWARD_CHUNK_MIN_PIXELS = 56 * 56


def stem_forward_chunk(x_shape: Sequence[int]) -> int:
  """stem_bn_relu_pool's forward_chunk for NHWC input x_shape: TRAIN_FORWARD_CHUNK from
  _FORWARD_CHUNK_MIN_PIXELS on, else 0 (the backward pass's chunk)."""
  return TRAIN_FORWARD_CHUNK if x_shape[1] * x_shape[2] >= _FORWARD_CHUNK_MIN_PIXELS else 0


def _forward_chunk_size(batch: int, chunk: int, target: int) -> int:
  """The largest multiple of `chunk` (a divisor of batch) that divides batch and is at most
  max(target, chunk): `chunk` times the largest divisor of batch / chunk within the target."""
  return chunk * _chunk_size(batch // chunk, max(target, chunk) // chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def stem_bn_relu_pool(x, kernel, scale, bias, chunk: int = 4, forward_chunk: int = 0):
  """First LeNet block in training mode: 5x5 'same' convolution (no bias) -> BatchNorm (batch
  statistics) -> ReLU -> 2x2 max-pool, for NHWC x with even H, W. Returns (pooled NHWC, batch
  mean, biased batch variance); the statistics' cotangents are ignored (as bn_relu_pool).

  The batch is processed `chunk` examples at a time (lax.map), so that the full-resolution
  patches and convolution output of a chunk stay in cache instead of making several passes over
  memory; the BatchNorm statistics are merged exactly over chunks (Chan et al.). The backward
  pass goes over the chunks again, recomputing each chunk's patches and output and accumulating
  the kernel gradient P g_y^T, with g_y BatchNorm's gradient of the pooled gradient routed to
  each window's first maximum. The input gradient is computed only when x is differentiated.
  """
  return _stem_fwd(*(_Primal(v) for v in (x, kernel, scale, bias)), chunk, forward_chunk)[0]


class _Primal:
  """Stands in for CustomVJPPrimal when stem_bn_relu_pool is called without differentiation."""

  def __init__(self, value):
    self.value, self.perturbed = value, False


def _stem_fwd(x, kernel, scale, bias, chunk, forward_chunk):
  x_perturbed = x.perturbed
  x, kernel, scale, bias = x.value, kernel.value, scale.value, bias.value
  b, h, w, ci = x.shape
  co = kernel.shape[-1]
  h2, w2 = h // 2, w // 2
  cb = _chunk_size(b, chunk)  # the backward pass's chunk
  cf = _forward_chunk_size(b, cb, forward_chunk)
  ws = s2d_kernel(kernel, 2).reshape(36 * ci, 4 * co)
  sel, first, means, m2s = lax.map(lambda xc: _stem_chunk_stats(xc, ws, scale),
                                   x.reshape(b // cf, cf, h, w, ci))
  per_chunk = 4 * cf * h2 * w2
  mean = means.mean(0)
  var = (m2s.sum(0) + per_chunk * jnp.square(means - mean).sum(0)) / (per_chunk * (b // cf))
  rstd = lax.rsqrt(var + BN_EPSILON)
  out = _bn_relu(sel, mean, rstd, scale, bias)  # [nc, co, Nc]
  out = out.reshape(b // cf, co, cf, h2, w2).transpose(0, 2, 3, 4, 1)

  def backward_chunks(a):  # [b/cf, co, cf*h2*w2] -> [b/cb, co, cb*h2*w2]
    k = cf // cb
    return a.reshape(b // cf, co, k, -1).transpose(0, 2, 1, 3).reshape(b // cb, co, -1)

  residuals = (x.reshape(b // cb, cb, h, w, ci), ws, kernel, scale, bias, backward_chunks(sel),
               backward_chunks(first), mean, rstd, x_perturbed)
  return (out.reshape(b, h2, w2, co), mean, var), residuals


def _stem_bwd(chunk, forward_chunk, residuals, cotangents):
  del chunk, forward_chunk
  xs, ws, kernel, scale, bias, sel, first, mean, rstd, x_perturbed = residuals
  g_out = cotangents[0]
  nc, cb, h, w, ci = xs.shape
  co = kernel.shape[-1]
  h2, w2 = h // 2, w // 2
  count = 4 * nc * cb * h2 * w2
  if isinstance(g_out, jax.custom_derivatives.SymbolicZero):
    g_out = jnp.zeros((nc * cb, h2, w2, co), jnp.float32)
  g = g_out.reshape(nc, cb, h2, w2, co).transpose(0, 4, 1, 2, 3).reshape(nc, co, -1)
  g_pre, g_scale, g_bias, coef = _bn_relu_grads(sel, g, mean, rstd, scale, bias, count)
  tile = lambda v: jnp.tile(v, 4)[:, None]  # [co] -> [(p, co), 1]  # noqa: E731
  a, c1, c2 = map(tile, coef)
  mean4 = tile(mean)
  idx = lax.broadcasted_iota(jnp.int8, (4, co, 1), 0)

  def body(d_ws_t, inputs):
    xc, first_c, g_pre_c = inputs
    pt = stem_patches(xc)
    yt = jnp.dot(ws.T, pt)
    g_z = jnp.where(idx == first_c[None], g_pre_c[None], 0.0).reshape(4 * co, -1)
    g_y = a * (g_z - c1 - (yt - mean4) * c2)
    d_x = None
    if x_perturbed:
      _, patches_vjp = jax.vjp(stem_patches, xc)
      d_x = patches_vjp(jnp.dot(ws, g_y))[0]
    return d_ws_t + jnp.dot(g_y, pt.T), d_x

  zero = jnp.zeros((4 * co, 36 * ci), jnp.float32)
  d_ws_t, d_x = lax.scan(body, zero, (xs, first, g_pre))
  _, s2d_vjp = jax.vjp(lambda k: s2d_kernel(k, 2), kernel)
  d_kernel = s2d_vjp(d_ws_t.T.reshape(3, 3, 4 * ci, 4 * co))[0]
  d_x = d_x.reshape(nc * cb, h, w, ci) if x_perturbed else None
  return d_x, d_kernel, g_scale, g_bias


stem_bn_relu_pool.defvjp(_stem_fwd, _stem_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------
# Blocks on the C++ CPU kernels (cpu_kernels.cc), channels-first [B, C, H, W] in and out

# On CPU, blocks whose input has at least this many pixels run on cpu_kernels; smaller ones on
# XLA's convolution library (conv3x3 above).
CPU_KERNEL_MIN_PIXELS = 28 * 28


def use_cpu_kernels(x_shape: Sequence[int], kernel_shape: Sequence[int],
                    min_pixels: int | None = None) -> bool:
  """Whether a block with NHWC input x_shape and HWIO kernel_shape runs on cpu_kernels: on CPU,
  for 3x3 and 5x5 kernels on even sizes of at least min_pixels (CPU_KERNEL_MIN_PIXELS; the
  first block takes them at any size), when they built."""
  _, h, w, _ = x_shape
  min_pixels = CPU_KERNEL_MIN_PIXELS if min_pixels is None else min_pixels
  return (jax.default_backend() == "cpu" and kernel_shape[0] in (3, 5)
          and h % 2 == 0 and w % 2 == 0 and h * w >= min_pixels and cpu_kernels.available())


@jax.custom_vjp
def conv_bn_relu_pool_cpu(x, kernel, scale, bias):
  """A LeNet block in training mode on cpu_kernels: KxK 'same' convolution (no bias) ->
  BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool of channels-first x [B, Ci, H, W] (H, W
  even). Returns (pooled [B, C, H/2, W/2], batch mean, biased batch variance); the statistics'
  cotangents are ignored (as bn_relu_pool). Forward: convolution, pooling choice and batch
  moments in one multi-threaded pass over the batch; backward: the kernel gradient (and the input
  gradient when x is differentiated) in another, which recomputes the convolution."""
  return _conv_cpu_fwd(*(_Primal(v) for v in (x, kernel, scale, bias)))[0]


def _conv_cpu_fwd(x, kernel, scale, bias):
  x_perturbed = x.perturbed
  x, kernel, scale, bias = x.value, kernel.value, scale.value, bias.value
  sel, first, moments = cpu_kernels.conv_pool_forward(x, kernel, scale)
  mean, var = moments[0], moments[1]
  rstd = lax.rsqrt(var + BN_EPSILON)
  out = _bn_relu(sel, mean, rstd, scale, bias)
  return (out, mean, var), (x, kernel, scale, bias, sel, first, mean, rstd, x_perturbed)


def _conv_cpu_bwd(residuals, cotangents):
  x, kernel, scale, bias, sel, first, mean, rstd, x_perturbed = residuals
  count = x.shape[0] * x.shape[2] * x.shape[3]
  g = cotangents[0]
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    g = jnp.zeros(sel.shape, jnp.float32)
  g_pre, g_scale, g_bias, coef = _bn_relu_grads(sel, g, mean, rstd, scale, bias, count)
  grads = cpu_kernels.conv_pool_grads(x, kernel, g_pre, first, jnp.stack([*coef, mean]),
                                      input_grad=x_perturbed)
  d_kernel, d_x = grads if x_perturbed else (grads, None)
  return d_x, d_kernel, g_scale, g_bias


conv_bn_relu_pool_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd, symbolic_zeros=True)


def conv_bn_relu_pool_eval_cpu(x, kernel, scale, bias, mean, var):
  """conv_bn_relu_pool_cpu in inference mode (running statistics)."""
  sel, _, _ = cpu_kernels.conv_pool_forward(x, kernel, scale)
  return _bn_relu(sel, mean, lax.rsqrt(var + BN_EPSILON), scale, bias)


def stem_bn_relu_pool_eval(x, kernel, scale, bias, mean, var, chunk: int = 4):
  """The first block in inference mode (running statistics), chunked as stem_bn_relu_pool."""
  b, h, w, ci = x.shape
  co = kernel.shape[-1]
  h2, w2 = h // 2, w // 2
  cb = _chunk_size(b, chunk)
  ws = s2d_kernel(kernel, 2).reshape(36 * ci, 4 * co)

  def pooled(xc):
    return _stem_pool(jnp.dot(ws.T, stem_patches(xc)).reshape(4, co, -1), scale)

  sel = _in_lanes(pooled, x.reshape(b // cb, cb, h, w, ci), _EVAL_STEM_LANES)  # [nc, co, Nc]
  out = _bn_relu(sel, mean, lax.rsqrt(var + BN_EPSILON), scale, bias)
  out = out.reshape(b // cb, co, cb, h2, w2).transpose(0, 2, 3, 4, 1)
  return out.reshape(b, h2, w2, co)
