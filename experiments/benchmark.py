r"""Speed of the AV-MNIST I2M2 step, fast implementation against the plain one, in one run.

  python experiments/benchmark.py --config configs/avmnist.py [--json bench.json]
  python experiments/benchmark.py --config configs/avmnist.py --steps 2 --batches 8 --quick

Random uint8 data of the real shapes (image 28x28x1, audio 112x112x1; never zeros), so no data
set is needed. For each path -- 'plain' (models.build_model's modules, the straightforward Flax
version, compiled with XLA's default options), 'plain_tuned' (the same modules with the
trainer's compile options, compile_options.compiler_options: what a plain-implementation model gets
from the trainer) and 'fast' (config.model.implementation='fast', the i2m2_jax/fast package, with
the trainer's options) -- and each batch size, the trainer's own jitted steps
(steps.jit_train_step / jit_eval_step, state donated, uint8 inputs scaled on device) are
timed with a host sync after every step (the step alone); the paths are interleaved (repeat r of
plain, then of plain_tuned, then of fast, ...) so that a shared machine's load falls on all
alike, and medians are reported. Printed, as one Markdown table:

* train and eval examples/s and step time per path and batch, and fast/plain;
* achieved GFLOP/s and its fraction of this machine's matmul rate in the same dtype (a 2048^2
  jnp.dot on CPU, 8192^2 elsewhere, timed in the same run). FLOPs are counted by hand from the
  model config (`model_flops`): 2 per multiply-add of every convolution and dense layer,
  forward once and backward twice (input and weight gradients), except that each encoder's
  first convolution has no input gradient;
  BatchNorm, pooling, activations and the optimiser are not counted. Both paths compute the same
  function and are credited the same FLOPs;
* the first train step's time (tracing, compilation and one run) and XLA's compile time in it,
  and the number of compilations after it, in training and in a padded evaluation (a split whose
  last batch is padded, through evaluation.evaluate);
* (--experts) the step time of each expert of I2M2 trained alone (kind uni/inter with the same
  config) and of I2M2, timed interleaved, per path listed in --expert_paths;
* (--input) the fraction of step time spent waiting for input when the step of --input_path
  (default fast) is fed by the real pipeline: a small AV-MNIST array_record build (random
  MultiBench-format files through the TFDS builder of i2m2_jax/datasets/avmnist.py) read by
  input_pipeline.train_batches (grain, one prefetch thread) from the split read into memory once
  (input_pipeline.in_memory, the trainer's default) and, 'streamed', from the ArrayRecord files
  at every batch, in the trainer's loop (one step in flight: step n+1 is dispatched before the
  host reads step n's metrics); the examples/s fed by each over those of the step alone (the
  wait misses time the pipeline's thread holds the GIL while the step is dispatched); and the
  examples/s of each pipeline alone.

--dtypes float32,bfloat16 also times bfloat16 compute (config.model.compute_dtype; mixed
precision, plain path only: the fast path is a float32 CPU implementation); each dtype's rows
are compared with the matmul rate of that dtype.

--json PATH also writes the rows as a JSON list; every row has path, dtype, mode ('train' or
'eval'), batch and examples_per_s, plus the other measurements of that row. Runs unchanged on a
GPU, where the matmul is 8192^2 (2048^2 on CPU) so that it comes near the card's peak.

Process settings, the same for every path: glibc malloc keeps freed memory (host_memory;
--noretain_memory to measure without), the 'rbg' PRNG (it only makes the parameter
initialisation compile faster; dropout is off), and no persistent compilation cache unless
--compilation_cache (compile times are cold). XLA_FLAGS are taken from the environment.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from i2m2_jax import host_memory  # noqa: E402  (no JAX import: runs before JAX starts threads)

_CONFIG = config_flags.DEFINE_config_file("config", None, "AV-MNIST config (configs/avmnist.py).",
                                          lock_config=False)
_BATCHES = flags.DEFINE_list("batches", ["40", "256"], "Batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per path, batch and repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats (every path, then every path again, ...).")
_PATHS = flags.DEFINE_list("paths", ["plain", "plain_tuned", "fast"],
                           "Implementations to compare: plain, plain_tuned, fast (docstring).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes (config.model.compute_dtype) "
                            "to time; 'fast' is float32 only, so it is skipped in others.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as a JSON list here.")
_QUICK = flags.DEFINE_bool("quick", False, "Plumbing check: 1 repeat, a 64-row data set, small "
                           "matmul, no expert breakdown unless --experts is given explicitly.")
_EXPERTS = flags.DEFINE_bool("experts", True, "Time each expert of I2M2 trained alone.")
_EXPERT_PATHS = flags.DEFINE_list("expert_paths", ["fast"], "Paths of the expert breakdown.")
_INPUT = flags.DEFINE_bool("input", True, "Measure the input wait with the real pipeline.")
_INPUT_PATH = flags.DEFINE_string("input_path", "fast", "Path (float32) fed by the real pipeline "
                                  "for the input wait; the first path run if it is not run.")
_INPUT_ROWS = flags.DEFINE_integer("input_rows", 2000, "Training rows of the array_record build.")
_RETAIN_MEMORY = flags.DEFINE_bool("retain_memory", True, "glibc malloc keeps freed memory.")
_COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", False,
                                       "Keep JAX's persistent compilation cache if configured.")

MODALITY_SHAPES = {"image": (28, 28, 1), "audio": (112, 112, 1)}
NUM_CLASSES = 10
# The paper's AV-MNIST I2M2 as the official code builds it (github.com/divyam3897/I2M2,
# avmnist_and_mimic/avmnist_main.py: uni-modal LeNet(1, 3, 3) image and LeNet(1, 3, 5) audio
# experts with MLP(., 100, 10) heads; the LF joint expert on LeNet(1, 6, .) of both), used when
# the config does not define it.
PAPER_MODEL = {
    "encoders": "image=lenet,audio=lenet",
    "encoder_kwargs": {"image": {"channels": 3, "num_blocks": 3},
                       "audio": {"channels": 3, "num_blocks": 5}},
    "joint_encoder_kwargs": {"image": {"channels": 6, "num_blocks": 3},
                             "audio": {"channels": 6, "num_blocks": 5}},
    "head_hidden": (100,), "fusion": "late_fusion",
}


# ---------------------------------------------------------------------------------------------
# Config and FLOPs


def benchmark_config(config):
  """The config's I2M2 model and optimiser; the paper's model where the config lacks it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  base = default.get_config()
  notes = []
  if config is None:
    config, notes = base, ["no --config: configs/default.py with the paper's AV-MNIST model"]
  from i2m2_jax import models  # pylint: disable=g-import-not-at-top
  model = config.model
  encoders = models.config_mapping(model.get("encoders"), "config.model.encoders")
  if any(encoders.get(m) != "lenet" for m in MODALITY_SHAPES):
    notes.append("the config's model is not the AV-MNIST LeNet one; using the paper's model "
                 "(divyam3897/I2M2, avmnist_and_mimic/avmnist_main.py) with the config's "
                 "optimiser")
    for key, value in PAPER_MODEL.items():
      model[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    model.fusion_kwargs = ml_collections.ConfigDict()
  model.kind = "i2m2"
  model.init_from = ""
  if config.optimizer.name != "sgd":
    notes.append(f"optimiser {config.optimizer.name} (the paper's is SGD)")
  return config, notes


def _lenet_flops(shape, channels: int, num_blocks: int) -> tuple[float, float, int]:
  """(forward FLOPs of all convolutions, forward FLOPs of the first, output features)."""
  h, w, cin = shape
  widths = [channels] + [channels * 2 ** (i + 1) for i in range(num_blocks)]
  total, first = 0.0, 0.0
  for i, cout in enumerate(widths):
    k = 5 if i == 0 else 3
    flops = 2.0 * h * w * k * k * cin * cout
    total += flops
    if i == 0:
      first = flops
    h, w, cin = h // 2, w // 2, cout
  return total, first, h * w * cin


def model_flops(model_config, shapes: Mapping[str, Sequence[int]] = MODALITY_SHAPES,
                num_classes: int = NUM_CLASSES, kind: str | None = None,
                modality: str | None = None) -> dict[str, float]:
  """Per-example FLOPs of the LeNet model of `model_config` (module docstring):
  {'forward', 'train'}, for its kind (or `kind`/`modality` to count one expert)."""
  from i2m2_jax import models  # pylint: disable=g-import-not-at-top
  counted = model_config.copy_and_resolve_references()
  counted.kind = kind or model_config.kind
  counted.modality = modality or model_config.get("modality", "")
  forward, first_convs = 0.0, 0.0
  for name, reads in models.expert_layout(counted, list(shapes)).items():
    features = 0
    for m in reads:
      kw = dict(model_config.encoder_kwargs[m])
      if name == models.JOINT and model_config.get("joint_encoder_kwargs") and \
          m in model_config.joint_encoder_kwargs:
        kw = dict(model_config.joint_encoder_kwargs[m])
      total, first, out = _lenet_flops(shapes[m], kw.get("channels", 3), kw.get("num_blocks", 3))
      forward += total
      first_convs += first
      features += out
    dims = [features] + list(model_config.head_hidden) + [num_classes]
    forward += sum(2.0 * a * b for a, b in zip(dims[:-1], dims[1:]))
  return {"forward": forward, "train": 3 * forward - first_convs}


# ---------------------------------------------------------------------------------------------
# Measurement helpers


class CompileCounter:
  """Counts XLA compilations (and their seconds) through jax.monitoring."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import dispatch  # pylint: disable=g-import-not-at-top
    self.count, self.seconds = 0, 0.0
    self._event = getattr(dispatch, "BACKEND_COMPILE_EVENT",
                          "/jax/core/compile/backend_compile_duration")
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs):
    del kwargs
    if event == self._event:
      self.count += 1
      self.seconds += duration

  def snapshot(self) -> tuple[int, float]:
    return self.count, self.seconds


def matmul_gflops(n: int, repeats: int = 5, dtype: str = "float32") -> float:
  """Best n x n matmul rate of this device in `dtype` (jnp.dot, jitted, default precision)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best / 1e9


def random_batches(batch: int, count: int, seed: int) -> list[dict[str, Any]]:
  """Host batches of random uint8 inputs in 1..255 (never zeros) and random labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [{"inputs": {m: rng.integers(1, 256, (batch,) + tuple(s), dtype=np.uint8)
                      for m, s in MODALITY_SHAPES.items()},
           "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
           "mask": np.ones(batch, dtype=bool)} for _ in range(count)]


def _fake_dataset(rows: int, seed: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from i2m2_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from i2m2_jax.datasets import Dataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  columns = {m: rng.integers(1, 256, (rows,) + tuple(s), dtype=np.uint8)
             for m, s in MODALITY_SHAPES.items()}
  columns["label"] = rng.integers(0, NUM_CLASSES, rows)
  source = input_pipeline.InMemorySource(columns)
  return Dataset(name="avmnist_random", modalities=dict(MODALITY_SHAPES), num_classes=NUM_CLASSES,
                 sources={"train": source, "val": source, "test": source})


class Path:
  """One implementation: its model, state and compiled steps."""

  def __init__(self, name: str, config, mesh, counter: CompileCounter, kind: str = "i2m2",
               modality: str = "", dtype: str = "float32"):
    import jax  # pylint: disable=g-import-not-at-top
    from i2m2_jax import steps  # pylint: disable=g-import-not-at-top
    from i2m2_jax.experiment import build_experiment  # pylint: disable=g-import-not-at-top
    self.name, self.mesh, self.counter = name, mesh, counter
    run = config.copy_and_resolve_references()
    run.model.implementation = "fast" if name == "fast" else "plain"
    run.model.kind, run.model.modality, run.model.compute_dtype = kind, modality, dtype
    run.seed, run.num_train_steps = 0, 10_000
    self.dataset = _fake_dataset(8, 0)
    exp = build_experiment(run, self.dataset, mesh=mesh, stats=None)  # uint8 scaled to [0, 1]
    self.model, self.preprocess, self.task, self.state = exp.model, exp.preprocess, exp.task, exp.state
    jax.block_until_ready(self.state)
    baseline = name == "plain"  # the straightforward version: XLA's default compile options
    self.train_fn = steps.jit_train_step(exp.task, exp.preprocess, mesh, xla_defaults=baseline)
    self.eval_fn = steps.jit_eval_step(exp.task, exp.preprocess, mesh, xla_defaults=baseline)
    self.first_step: dict[int, dict[str, float]] = {}

  def train(self, batch) -> float:
    """One synchronised train step; returns its seconds (the first per shape is recorded)."""
    from i2m2_jax import sharding  # pylint: disable=g-import-not-at-top
    size = int(batch["label"].shape[0])
    count, seconds = self.counter.snapshot()
    t = time.perf_counter()
    self.state, sums = self.train_fn(self.state, batch)
    sharding.to_host(sums)
    elapsed = time.perf_counter() - t
    if size not in self.first_step:
      n, s = self.counter.snapshot()
      self.first_step[size] = {"first_step_s": elapsed, "compile_s": s - seconds,
                               "compilations": n - count}
    return elapsed

  def evaluate(self, batch) -> float:
    from i2m2_jax import sharding  # pylint: disable=g-import-not-at-top
    t = time.perf_counter()
    out = self.eval_fn(self.state, batch)
    sharding.to_host(out["sums"])
    return time.perf_counter() - t


def _median_row(times: Sequence[float], batch: int) -> dict[str, float]:
  med = statistics.median(times)
  return {"examples_per_s": batch / med, "step_ms": 1e3 * med, "step_ms_min": 1e3 * min(times),
          "step_ms_max": 1e3 * max(times), "timed_steps": len(times)}


# ---------------------------------------------------------------------------------------------
# Input wait


def build_array_record(rows: int, workdir: str, seed: int = 0):
  """A small AV-MNIST build: random MultiBench-format .npy files -> the real TFDS builder
  (array_record). Returns the builder's ArrayRecord source of the training split."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from i2m2_jax.datasets import avmnist, builder_utils  # pylint: disable=g-import-not-at-top
  manual = os.path.join(workdir, "manual")
  rng = np.random.default_rng(seed)
  for split, n in (("train", rows), ("test", max(rows // 10, 2))):
    avmnist.write_split(manual, split, rng.integers(1, 256, (n, 784), dtype=np.uint8),
                        rng.integers(1, 256, (n, 112, 112), dtype=np.uint8),
                        rng.integers(0, 10, n))
  num_val = max(rows // 10, 1)
  dtypes = {m: "uint8" for m in avmnist.MODALITY_SHAPES}
  builder = builder_utils.prepare(avmnist.I2m2Avmnist, avmnist.builder_config(num_val, dtypes),
                                  os.path.join(workdir, "tfds"), root_dir=manual)
  return builder.as_data_source("train")


def pipeline_rate(source, batch: int, batches: int = 8) -> float:
  """Examples/s of input_pipeline.train_batches alone (no step), in the caller's thread."""
  from i2m2_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  it = input_pipeline.train_batches(source, batch_size=batch, seed=1,
                                    modalities=list(MODALITY_SHAPES), prefetch=0)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - t)


def input_wait(path: Path, source, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
  """Fraction of the fed loop's wall time spent in next(iterator) of the real pipeline, and its
  examples/s. The loop is the trainer's (train_lib.train_and_evaluate): one step in flight, i.e.
  step n+1 is dispatched before the host waits for step n's metric sums."""
  from i2m2_jax import input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  batches = input_pipeline.train_batches(source, batch_size=batch, seed=0,
                                         modalities=list(MODALITY_SHAPES))
  waits, in_flight, start = [], None, 0.0
  for i in range(warmup + steps):
    if i == warmup:
      sharding.to_host(in_flight)  # the warm-up steps are done
      in_flight, start = None, time.perf_counter()
    t0 = time.perf_counter()
    local = next(batches)
    if i >= warmup:
      waits.append(time.perf_counter() - t0)
    path.state, sums = path.train_fn(path.state, sharding.global_batch(local, path.mesh))
    if in_flight is not None:
      sharding.to_host(in_flight)
    in_flight = sums
  sharding.to_host(in_flight)
  total = time.perf_counter() - start
  return {"input_wait_fraction": sum(waits) / total,
          "input_wait_ms": 1e3 * sum(waits) / len(waits),
          "input_examples_per_s": batch * steps / total}


# ---------------------------------------------------------------------------------------------
# The run


def _machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return {"device": f"{jax.device_count()} x {device.platform} ({device.device_kind})",
          "cpu": f"{cpu}, {os.cpu_count()} cores", "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run(config, batches: Sequence[int], steps: int, repeats: int, paths: Sequence[str],
        experts: bool, expert_paths: Sequence[str], measure_input: bool, input_rows: int,
        matmul_n: int, log: Callable[[str], None] = print,
        dtypes: Sequence[str] = ("float32",),
        input_path: str = "fast") -> tuple[list[dict[str, Any]], str]:
  """Measures everything (module docstring); returns (JSON rows, Markdown report)."""
  import jax  # pylint: disable=g-import-not-at-top
  from i2m2_jax import evaluation, input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()
  config, notes = benchmark_config(config)
  counter = CompileCounter()
  mesh = sharding.make_mesh()
  machine = _machine()
  for b in batches:
    if b % jax.device_count():
      raise ValueError(f"Batch {b} is not a multiple of the device count {jax.device_count()}.")
  peaks = {d: matmul_gflops(matmul_n, dtype=d) for d in dtypes}
  flops = model_flops(config.model)
  log(", ".join(f"matmul {matmul_n}^2 {d}: {g:.1f} GFLOP/s" for d, g in peaks.items())
      + f"; model: {flops['train'] / 1e6:.1f} MFLOP per training example "
      f"({flops['forward'] / 1e6:.1f} forward)")

  # Runs are (path, dtype); the fast implementation computes in float32 only.
  runs = [(p, d) for d in dtypes for p in paths if p != "fast" or d == "float32"]
  if len(runs) < len(paths) * len(dtypes):
    notes.append("path fast computes in float32 only: its other dtypes are not run")
  built = {(p, d): Path(p, config, mesh, counter, dtype=d) for p, d in runs}
  rows: dict[tuple[str, str, str, int], dict[str, Any]] = {}
  for b in batches:
    device_batches = [sharding.global_batch(h, mesh) for h in random_batches(b, 4, seed=b)]
    for run_key in runs:  # the first step of each shape compiles
      built[run_key].train(device_batches[0])
      built[run_key].evaluate(device_batches[0])
    times = {(k, mode): [] for k in runs for mode in ("train", "eval")}
    recompiles = {(k, mode): 0 for k in runs for mode in ("train", "eval")}
    for r in range(repeats):
      for mode in ("train", "eval"):
        for run_key in runs:
          step = built[run_key].train if mode == "train" else built[run_key].evaluate
          n0 = counter.snapshot()[0]
          times[(run_key, mode)] += [step(device_batches[i % len(device_batches)])
                                     for i in range(steps)]
          recompiles[(run_key, mode)] += counter.snapshot()[0] - n0
      log(f"batch {b}, repeat {r + 1}/{repeats}: " + ", ".join(
          f"{p} {d} {mode} {1e3 * statistics.median(times[((p, d), mode)]):.1f} ms"
          for p, d in runs for mode in ("train", "eval")))
    for p, d in runs:
      path = built[(p, d)]
      rows[(p, d, "train", b)] = {**_median_row(times[((p, d), "train")], b),
                                  **path.first_step[b],
                                  "recompilations": recompiles[((p, d), "train")]}
      # Padded evaluation: a split whose last batch is padded, through evaluation.evaluate.
      padded = _fake_dataset(2 * b + b // 2 + 1, seed=b + 1)
      n0 = counter.snapshot()[0]
      evaluation.evaluate(path.eval_fn, path.state, padded.sources["val"], padded, path.task, b,
                          mesh)
      rows[(p, d, "eval", b)] = {**_median_row(times[((p, d), "eval")], b),
                                 "recompilations": recompiles[((p, d), "eval")],
                                 "recompilations_padded_eval": counter.snapshot()[0] - n0}

  for (p, d, mode, b), row in rows.items():
    per_example = flops["train"] if mode == "train" else flops["forward"]
    row["dtype"] = d
    row["gflop_per_s"] = per_example * row["examples_per_s"] / 1e9
    row["matmul_gflop_per_s"] = peaks[d]
    row["peak_fraction"] = row["gflop_per_s"] / peaks[d]
    base = rows.get(("plain", d, mode, b))
    if base and p != "plain":
      row["speedup_vs_plain"] = row["examples_per_s"] / base["examples_per_s"]
    base32 = rows.get((p, "float32", mode, b))
    if base32 and d != "float32":
      row["speedup_vs_float32"] = row["examples_per_s"] / base32["examples_per_s"]

  expert_rows: dict[tuple[str, int], dict[str, float]] = {}
  if experts:
    # Each expert of I2M2 trained alone (same config, kind uni/inter), timed interleaved with
    # I2M2 itself so that the comparison sees the same machine load.
    alone = {"uni_image": ("uni", "image"), "uni_audio": ("uni", "audio"), "joint": ("inter", "")}
    for p in expert_paths:
      alone_runs = {"i2m2": built.get((p, "float32")) or Path(p, config, mesh, counter)}
      alone_runs.update({name: Path(p, config, mesh, counter, kind=kind, modality=modality)
                         for name, (kind, modality) in alone.items()})
      for b in batches:
        batch = sharding.global_batch(random_batches(b, 1, seed=b)[0], mesh)
        times = {name: [] for name in alone_runs}
        for path in alone_runs.values():
          path.train(batch)
        for _ in range(max(repeats, 1)):
          for name, path in alone_runs.items():
            times[name] += [path.train(batch) for _ in range(steps)]
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        parts = {name: med[name] for name in alone}
        expert_rows[(p, b)] = parts
        row = rows.setdefault((p, "float32", "train", b), {})
        row["expert_step_ms"] = parts
        row["experts_sum_step_ms"] = sum(parts.values())
        row["i2m2_step_ms_with_experts"] = med["i2m2"]
        row["i2m2_over_experts_sum"] = med["i2m2"] / sum(parts.values())
        log(f"experts alone ({p}, batch {b}): " + ", ".join(f"{k} {v:.1f} ms"
                                                            for k, v in med.items()))

  input_note = ""
  if measure_input:
    with tempfile.TemporaryDirectory() as tmp:
      t = time.perf_counter()
      streamed = build_array_record(input_rows, tmp)
      build_s = time.perf_counter() - t
      t = time.perf_counter()
      # What the trainer feeds by default (config.data.in_memory_max_gb): the split read from
      # its array_record files into memory once.
      cached = input_pipeline.in_memory(streamed, max_gb=1e9)
      load_s = time.perf_counter() - t
      p, d = (input_path, "float32") if (input_path, "float32") in built else runs[0]
      for b in batches:
        if b > len(streamed):
          continue
        row = rows[(p, d, "train", b)]
        row.update(input_wait(built[(p, d)], cached, b, max(steps, 10)))
        row.update({f"{k}_streamed": v for k, v in
                    input_wait(built[(p, d)], streamed, b, max(steps, 10)).items()})
        row["pipeline_examples_per_s"] = pipeline_rate(cached, b)
        row["pipeline_examples_per_s_streamed"] = pipeline_rate(streamed, b)
        # The wait misses time the pipeline's thread holds the GIL while the step is dispatched
        # (and the host-to-device copy the timed steps above do not make): the end-to-end rate
        # fed by the pipeline over the rate of the step alone tells the whole cost.
        for suffix in ("", "_streamed"):
          row[f"fed_over_alone{suffix}"] = (row[f"input_examples_per_s{suffix}"]
                                            / row["examples_per_s"])
      input_note = (f"Input: {len(streamed)} training rows of random uint8 AV-MNIST written as "
                    f"MultiBench .npy files and built by the TFDS builder into array_record in "
                    f"{build_s:.0f} s; fed to path {p} ({d}) by input_pipeline.train_batches "
                    f"(grain, one prefetch thread) from the split read into memory once "
                    f"({load_s:.1f} s; the trainer's default, config.data.in_memory_max_gb) and, "
                    f"'streamed', from the ArrayRecord files at every batch. Pipeline alone: "
                    f"examples/s of train_batches with no step.")

  load_after = os.getloadavg()
  out = []
  dtype_order = {d: i for i, d in enumerate(dtypes)}
  for (p, d, mode, b), row in sorted(
      rows.items(), key=lambda kv: (kv[0][3], kv[0][2] != "train", dtype_order[kv[0][1]],
                                    kv[0][0] != "plain")):
    out.append({"path": p, "mode": mode, "batch": b, **row, **machine,
                "load_before": list(load_before), "load_after": list(load_after)})
  report = _report(out, expert_rows, peaks, flops, machine, load_before, load_after, notes,
                   input_note, matmul_n, steps, repeats)
  return out, report


def _fmt(x, spec: str, missing: str = "–") -> str:
  return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _vs(row) -> str:
  """The 'vs plain' cell: speed-up over plain in the same dtype, and over float32."""
  parts = []
  if "speedup_vs_plain" in row:
    parts.append(f"{row['speedup_vs_plain']:.2f}x")
  if "speedup_vs_float32" in row:
    parts.append(f"{row['speedup_vs_float32']:.2f}x vs float32")
  return ", ".join(parts) or "–"


def _report(rows, expert_rows, peaks, flops, machine, load_before, load_after, notes, input_note,
            matmul_n, steps, repeats) -> str:
  lines = [f"Machine: {machine['cpu']}; JAX {machine['jax']} on {machine['device']}"
           + (f"; XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else "") + ".",
           f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
           f"after {'/'.join(f'{x:.2f}' for x in load_after)}. Medians of {steps} steps x "
           f"{repeats} interleaved repeats.",
           "Matmul rate (" + ", ".join(f"{d} {matmul_n}^2 jnp.dot {g:.1f}"
                                       for d, g in peaks.items())
           + f" GFLOP/s). Model FLOPs (hand count "
           f"from the config): {flops['train'] / 1e6:.1f} M per training example, "
           f"{flops['forward'] / 1e6:.1f} M per evaluated example."]
  lines += [f"Note: {n}." for n in notes]
  lines += ["", "| path | dtype | mode | batch | step ms (min–max) | examples/s | vs plain | "
            "GFLOP/s | % of matmul | first step s (XLA compile s) | recompiles (padded eval) | "
            "input wait | experts alone, ms: image + audio + joint = sum; I2M2 (I2M2 / sum) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    first = (f"{r['first_step_s']:.1f} ({r['compile_s']:.1f})" if "first_step_s" in r else "")
    recompiles = _fmt(r.get("recompilations"), "d")
    if r["mode"] == "eval":
      recompiles += f" ({_fmt(r.get('recompilations_padded_eval'), 'd')})"
    wait = ""
    if "input_wait_fraction" in r:
      wait = (f"{100 * r['input_wait_fraction']:.1f} % (streamed "
              f"{100 * r['input_wait_fraction_streamed']:.1f} %); fed/alone "
              f"{r['fed_over_alone']:.2f} ({r['fed_over_alone_streamed']:.2f}); pipeline alone "
              f"{r['pipeline_examples_per_s']:.0f} ({r['pipeline_examples_per_s_streamed']:.0f})"
              f" ex/s")
    parts = ""
    if "expert_step_ms" in r:
      e = r["expert_step_ms"]
      parts = (f"{e['uni_image']:.1f} + {e['uni_audio']:.1f} + {e['joint']:.1f} = "
               f"{r['experts_sum_step_ms']:.1f}; I2M2 {r['i2m2_step_ms_with_experts']:.1f} "
               f"({r['i2m2_over_experts_sum']:.2f})")
    lines.append(
        f"| {r['path']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['step_ms']:.1f} "
        f"({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | {r['examples_per_s']:.0f} | "
        f"{_vs(r)} | "
        f"{r['gflop_per_s']:.1f} | {100 * r['peak_fraction']:.1f} | {first} | {recompiles} | "
        f"{wait} | {parts} |")
  if input_note:
    lines += ["", input_note]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if not _COMPILATION_CACHE.value:
    jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_default_prng_impl", "rbg")
  quick = _QUICK.value
  experts = _EXPERTS.value and (not quick or flags.FLAGS["experts"].present)
  rows, report = run(
      _CONFIG.value, [int(b) for b in _BATCHES.value], _STEPS.value,
      1 if quick and not flags.FLAGS["repeats"].present else _REPEATS.value,
      list(_PATHS.value), experts, list(_EXPERT_PATHS.value), _INPUT.value,
      64 if quick and not flags.FLAGS["input_rows"].present else _INPUT_ROWS.value,
      512 if quick else (2048 if jax.default_backend() == "cpu" else 8192),
      dtypes=list(_DTYPES.value), input_path=_INPUT_PATH.value)
  print()
  print("Command: python " + " ".join(sys.argv))
  print(report)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"Written: {_JSON.value}")


def _early_setup():
  """Before JAX starts its threads: keep freed host memory (i2m2_jax/host_memory.py; it only
  matters for CPU buffers and is harmless elsewhere). Flags are not parsed yet, hence argv."""
  if not any(a in sys.argv for a in ("--noretain_memory", "--retain_memory=false",
                                     "--retain_memory=False")):
    host_memory.retain_freed_memory()


if __name__ == "__main__":
  _early_setup()
  app.run(main)
