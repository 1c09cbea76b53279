"""XLA compile options of the jitted steps on CPU (other backends keep XLA's defaults).

CPU training here is mostly tests, debugging and small runs, where the compile dominates; long
runs go to accelerators, which these options leave alone. Options this XLA does not know are
dropped with a warning (experimental ones may come and go).
"""
from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax

# Convolutions on CPU go to XLA's default (Eigen) implementation instead of its library fusions
# (YNNPACK), which keep matrix products only. fastMRI's I2M2 (three PreActResNet-18, 64x64,
# experiments/benchmark.py, interleaved in one run on 2 cores): train step 4.9 -> 3.1 s at batch 8
# and 11.3 -> 6.0 s at 16. AV-MNIST, eval steps: plain 520 -> 434 ms at batch 256 and 81 -> 65
# ms at 40; fast 190 -> 175 and 23.6 -> 22.9 ms; train steps (an earlier run): the library won
# at batch 40 (fast 89.5 vs 95.1 ms, plain 283 vs 293 ms) and lost at 256 (fast 757 vs 704,
# plain 1970 vs 1833 ms). Since a few % at one small batch weigh less than 1.6-1.9x on residual
# networks, training and evaluation both take it.
CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

# XLA's CPU loop fusions emitted by its classic LLVM emitters instead of its newer MLIR fusion
# emitters: about a third less compile time, at about the same step speed. AV-MNIST I2M2 on
# 2 cores, separate processes, twice each (experiments/benchmark.py): fast train step first
# step 6.4 -> 4.7-5.0 s at batch 40 and 9.0 -> 6.5 s at 256 (XLA compile 5.0 -> 3.4 s and
# 7.1 -> 4.6 s), steps 1-2 % slower at batch 40 and 3 % at 256; plain modules 8.5 -> 5.1 s
# (XLA 7.0 -> 3.6 s) with 4 % faster steps.
CPU_FAST_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def accepted(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this XLA takes these compile options."""
  try:
    jax.jit(lambda: 0, compiler_options=dict(options)).lower().compile()
    return True
  except jax.errors.JaxRuntimeError:
    logging.warning("XLA does not accept the compile options %s; using its defaults.", options)
    return False


def compiler_options() -> dict[str, Any] | None:
  """XLA options of the jitted steps; None (XLA's defaults) on other backends than CPU.

  On CPU, LLVM's optimisation level 1 instead of 2: most of a step's compile time is LLVM's
  passes, and level 1 compiled the AV-MNIST I2M2 train step 0.4-0.7 s (batch 40) and 1.5-1.9 s
  (batch 256) faster on 2 cores with step times equal within noise (level 0 halved compile time
  but ran 2.5x slower); XLA's classic loop emitters (CPU_FAST_COMPILE_OPTIONS); and XLA's own
  convolutions (CPU_CONV_OPTIONS), for training and evaluation alike."""
  if jax.default_backend() != "cpu":
    return None
  options = {"xla_backend_optimization_level": 1}
  if accepted(tuple(CPU_FAST_COMPILE_OPTIONS.items())):
    options.update(CPU_FAST_COMPILE_OPTIONS)
  if accepted(tuple(CPU_CONV_OPTIONS.items())):
    options.update(CPU_CONV_OPTIONS)
  return options
