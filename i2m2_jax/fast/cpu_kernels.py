"""Multi-threaded CPU kernels for LeNet blocks on large images (cpu_kernels.cc), built on first use.

The C++ source ships with the package; the first call of `available()` in a process compiles it
with the machine's C++ compiler (g++ or $CXX, against the XLA FFI headers that jaxlib ships) into a
cache folder, `$I2M2_JAX_CACHE` or `~/.cache/i2m2_jax`, and registers its handlers with XLA.
Later processes load the cached library (a few milliseconds). Where there is no compiler, the
build fails, or `I2M2_JAX_CPU_KERNELS=0` is set, `available()` is False (with one warning naming
the reason) and fast/ops.py uses its XLA implementation instead: same function, slower on CPU.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
# Under jax.vmap each mapped slice is its own call (a batch of its own, as BatchNorm needs).
_VMAP = "sequential"
# XLA FFI target name -> symbol in the library.
_TARGETS = {"i2m2_conv_pool_forward": "I2m2ConvPoolForward",
            "i2m2_conv_pool_kernel_grad": "I2m2ConvPoolKernelGrad",
            "i2m2_conv_pool_grads": "I2m2ConvPoolGrads"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  return pathlib.Path(os.environ.get("I2M2_JAX_CACHE", default / "i2m2_jax"))


def _cpu_flags() -> str:
  """The CPU's feature flags: -march=native code must not be loaded on another kind of CPU."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def _library_path(compiler: str) -> pathlib.Path:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=False).stdout
  key = hashlib.sha256("\n".join([SOURCE.read_text(), jaxlib.__version__, compiler, version,
                                  *_FLAGS, platform.machine(), _cpu_flags()]).encode())
  return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
  """Compiles cpu_kernels.cc into the cache (once per source, jaxlib, compiler and CPU); returns
  the library's path."""
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  path = _library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(out, path)  # atomic: concurrent builds leave one complete library
  return path


@functools.cache
def _load() -> None:
  """Builds (or finds) the library and registers its handlers, once per process."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered for this process's CPU backend."""
  if os.environ.get("I2M2_JAX_CPU_KERNELS", "1") == "0":
    return False
  try:
    _load()
  except Exception as error:  # noqa: BLE001 - any failure means: use the XLA implementation
    logging.warning("i2m2_jax CPU kernels unavailable, using the XLA implementation: %s", error)
    return False
  return True


def conv_pool_forward(x: jax.Array, kernel: jax.Array, scale: jax.Array):
  """The forward pass of a LeNet block up to its pooling choice.

  x [B, Ci, H, W] (H, W even), kernel [K, K, Ci, C] (K = 3 or 5; 'same' padding, no bias),
  scale [C] (BatchNorm's) -> the selected element of each 2x2 pooling window of the convolution
  [B, C, H/2, W/2] (max, or min where scale < 0), the index of the first selected element (int8,
  e = 2 * row + column of the window), and the batch moments [2, C] (mean, biased variance)."""
  b, _, h, w = x.shape
  c = kernel.shape[-1]
  pooled = (b, c, h // 2, w // 2)
  out = (jax.ShapeDtypeStruct(pooled, jnp.float32), jax.ShapeDtypeStruct(pooled, jnp.int8),
         jax.ShapeDtypeStruct((2, c), jnp.float32))
  return jax.ffi.ffi_call("i2m2_conv_pool_forward", out, vmap_method=_VMAP)(
      x, kernel.reshape(-1, c), scale)


def conv_pool_grads(x: jax.Array, kernel: jax.Array, g_pre: jax.Array, first: jax.Array,
                    coef: jax.Array, input_grad: bool):
  """The block's kernel gradient [K, K, Ci, C] and, with input_grad, input gradient
  [B, Ci, H, W], from g_y = a (g_z - c1 - (y - mean) c2): coef = [a, c1, c2, mean] ([4, C]),
  g_z the pooled gradient g_pre [B, C, H/2, W/2] routed to each window's `first` element, y the
  convolution (recomputed from x and kernel)."""
  c = kernel.shape[-1]
  d_kernel = jax.ShapeDtypeStruct((kernel.size // c, c), jnp.float32)
  args = (x, kernel.reshape(-1, c), g_pre, first, coef)
  if not input_grad:
    return jax.ffi.ffi_call("i2m2_conv_pool_kernel_grad", d_kernel, vmap_method=_VMAP)(
        *args).reshape(kernel.shape)
  d_x = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  d_k, d_x = jax.ffi.ffi_call("i2m2_conv_pool_grads", (d_kernel, d_x), vmap_method=_VMAP)(*args)
  return d_k.reshape(kernel.shape), d_x
