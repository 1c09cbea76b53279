r"""Speed and memory of the I2M2 train and eval steps (AV-MNIST or fastMRI), path by path, in one run.

  python experiments/benchmark.py --config configs/avmnist.py [--json bench.json]
  python experiments/benchmark.py --config configs/avmnist.py --steps 2 --batches 8 --quick
  python experiments/benchmark.py --config configs/fastmri.py --hw 64 --batches 8,16 --json PATH
  python experiments/benchmark.py --config configs/fastmri.py --hw 320 --batches 4 \
      --paths plain_tuned,remat --memory_only          # memory per example, nothing timed

fastMRI (configs/fastmri.py): the I2M2 of three PreActResNet-18 (magnitude, phase, and the joint
one on both as 2 channels) with its AdamW, on standard-normal images hw x hw, four binary labels;
the ResNets pool to max(1, hw // 32) per side (the paper's 10 at 320). FLOPs are XLA's count of
the compiled steps (cost analysis), credited alike to every path; paths: plain, plain_tuned,
remat (config.model.remat), stacked (config.model.stack_experts) and any path with XLA options
added, `name+xla_option=value+...`
(the option-by-option study in the README). Every row has path, mode, batch, hw (None for
AV-MNIST's fixed shapes), dtype, examples_per_s, gflop_per_s, peak_bytes_per_example (XLA's
memory analysis of the compiled step: its temporary buffers over the batch, i.e. activations
kept for the backward pass and scratch; the parameters and optimiser state are state_bytes) and
first_step_s (lowering, compilation and one step).

AV-MNIST:
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

import dataclasses
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

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/avmnist.py or configs/fastmri.py.",
                                          lock_config=False)
_BATCHES = flags.DEFINE_list("batches", None, "Batch sizes (AV-MNIST: 40,256; fastMRI: 8,16).")
_HW = flags.DEFINE_integer("hw", 64, "fastMRI: side of the magnitude and phase images (the paper: "
                           "320); the ResNets pool to max(1, hw // 32) (320 -> 10, 64 -> 2), as "
                           "the PyTorch reference's --pool. AV-MNIST's shapes are fixed.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Compile only, time nothing: each path's "
                                 "train-step memory per example and the largest batch that fits "
                                 "in --memory_budget_gib.")
_MEMORY_BUDGET_GIB = flags.DEFINE_float("memory_budget_gib", 24.0, "Memory for max_batch_in_budget.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per path, batch and repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats (every path, then every path again, ...).")
_PATHS = flags.DEFINE_list("paths", None, "Implementations to compare (PATHS; default AV-MNIST: "
                           "plain,plain_tuned,fast; fastMRI: plain,plain_tuned,remat).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes (config.model.compute_dtype) "
                            "to time; 'fast' is float32 only, so it is skipped in others.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as a JSON list here.")
_QUICK = flags.DEFINE_bool("quick", False, "Plumbing check: 1 repeat, a 64-row data set, small "
                           "matmul, no expert breakdown unless --experts is given explicitly.")
_EXPERTS = flags.DEFINE_bool("experts", True, "Time each expert of I2M2 trained alone.")
_EXPERT_PATHS = flags.DEFINE_list("expert_paths", None, "Paths of the expert breakdown (default: "
                                  "fast for AV-MNIST, plain_tuned for fastMRI).")
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


# path -> (config.model fields it sets, compiled with XLA's default options rather than the
# trainer's). 'plain' is the straightforward Flax version; 'plain_tuned' what the trainer runs.
PATHS = {
    "plain": ({"implementation": "plain"}, True),
    "plain_tuned": ({"implementation": "plain"}, False),
    "fast": ({"implementation": "fast"}, False),             # AV-MNIST's LeNets only
    "remat": ({"implementation": "plain", "remat": True}, False),
    "stacked": ({"implementation": "plain", "stack_experts": True}, False),  # one vmapped network
}


def parse_path(path: str) -> tuple[dict[str, Any], bool, dict[str, Any]]:
  """'name[+xla_option=value...]' -> (config.model fields, XLA defaults?, extra XLA options):
  a path of PATHS with XLA compile options added, e.g.
  'plain+xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT' (values
  true/false and integers are converted; the option-by-option study of the README)."""
  name, *options = path.split("+")
  if name not in PATHS:
    raise ValueError(f"--paths: unknown path {name!r} in {path!r}; expected one of "
                     f"{list(PATHS)}, optionally followed by +xla_option=value.")
  extra = {}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep:
      raise ValueError(f"--paths: {option!r} in {path!r} is not xla_option=value.")
    lowered = value.lower()
    extra[key] = (lowered == "true" if lowered in ("true", "false")
                  else int(value) if value.lstrip("-").isdigit() else value)
  fields, xla_defaults = PATHS[name]
  return fields, xla_defaults, extra


@dataclasses.dataclass
class Workload:
  """What is benchmarked: the I2M2 config and random data of its shapes."""
  name: str                                 # 'avmnist' or 'fastmri'
  config: Any
  shapes: Mapping[str, tuple[int, ...]]     # modality -> one example's shape
  label_shape: tuple[int, ...]              # () one class label; (L,) L binary labels
  num_classes: int
  input_dtype: str                          # 'uint8' (1..255) or 'float32' (standard normal)
  hw: int | None                            # fastMRI's image side; None: fixed shapes
  paths: tuple[str, ...]                    # default --paths
  expert_paths: tuple[str, ...]             # default --expert_paths
  alone: Mapping[str, tuple[str, str]]      # expert -> (kind, modality) to train alone
  notes: list[str]
  label_names: tuple[str, ...] = ()

  @property
  def hand_flops(self) -> bool:  # AV-MNIST's LeNets are counted by hand, others by XLA
    return self.name == "avmnist"

  def inputs(self, rng, rows: int) -> dict[str, Any]:
    import numpy as np  # pylint: disable=g-import-not-at-top
    if self.input_dtype == "uint8":
      return {m: rng.integers(1, 256, (rows,) + tuple(s), dtype=np.uint8)
              for m, s in self.shapes.items()}
    return {m: rng.normal(size=(rows,) + tuple(s)).astype(np.float32)
            for m, s in self.shapes.items()}

  def labels(self, rng, rows: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    return rng.integers(0, self.num_classes, (rows,) + self.label_shape).astype(np.int32)


def workload(config, hw: int = 64) -> Workload:
  """The config's I2M2 model and optimiser on random data of its data set's shapes: fastMRI
  (configs/fastmri.py) at hw x hw, else AV-MNIST (the paper's model where the config lacks it)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from i2m2_jax import models  # pylint: disable=g-import-not-at-top
  notes = []
  if config is None:
    config, notes = default.get_config(), ["no --config: configs/default.py with the paper's "
                                           "AV-MNIST model"]
  model = config.model
  model.kind = "i2m2"
  model.init_from = ""
  if config.data.name == "fastmri":
    config.data.image_size = hw
    for m in model.encoder_kwargs:  # the paper's 10 x 10 at 320 x 320
      model.encoder_kwargs[m].pooled_size = max(1, hw // 32)
    names = tuple(config.data.label_names.split(","))
    return Workload(
        "fastmri", config, {"magnitude": (hw, hw, 1), "phase": (hw, hw, 1)}, (len(names),), 2,
        "float32", hw, ("plain", "plain_tuned", "remat"), ("plain_tuned",),
        {"uni_magnitude": ("uni", "magnitude"), "uni_phase": ("uni", "phase"),
         "joint": ("inter", "")}, notes, names)
  encoders = models.config_mapping(model.get("encoders"), "config.model.encoders")
  if any(encoders.get(m) != "lenet" for m in MODALITY_SHAPES):
    notes.append("the config's model is not the AV-MNIST LeNet one; using the paper's model "
                 "(divyam3897/I2M2, avmnist_and_mimic/avmnist_main.py) with the config's "
                 "optimiser")
    for key, value in PAPER_MODEL.items():
      model[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    model.fusion_kwargs = ml_collections.ConfigDict()
  if config.optimizer.name != "sgd":
    notes.append(f"optimiser {config.optimizer.name} (the paper's is SGD)")
  return Workload(
      "avmnist", config, dict(MODALITY_SHAPES), (), NUM_CLASSES, "uint8", None,
      ("plain", "plain_tuned", "fast"), ("fast",),
      {"uni_image": ("uni", "image"), "uni_audio": ("uni", "audio"), "joint": ("inter", "")},
      notes)


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


def random_batches(work: Workload, batch: int, count: int, seed: int) -> list[dict[str, Any]]:
  """Host batches of random inputs (uint8 in 1..255 or standard normal: never zeros) and
  labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [{"inputs": work.inputs(rng, batch), "label": work.labels(rng, batch),
           "mask": np.ones(batch, dtype=bool)} for _ in range(count)]


def _fake_dataset(work: Workload, rows: int, seed: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from i2m2_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from i2m2_jax.datasets import Dataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  columns = {**work.inputs(rng, rows), "label": work.labels(rng, rows)}
  source = input_pipeline.InMemorySource(columns)
  return Dataset(name=f"{work.name}_random", modalities=dict(work.shapes),
                 num_classes=work.num_classes,
                 sources={"train": source, "val": source, "test": source},
                 targets={"label": work.label_shape},
                 task="multilabel" if work.label_shape else "multiclass",
                 label_names=work.label_names)


def xla_analysis(compiled) -> dict[str, float]:
  """XLA's analyses of a compiled step: temp_bytes (activations kept for the backward pass and
  scratch: what grows with the batch), state_bytes (arguments: parameters, optimiser state,
  batch; donated to a train step, so its new state reuses them), output_bytes (outputs not
  aliased to an argument) and flops (XLA's count of the whole step)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older JAX
  return {"temp_bytes": int(memory.temp_size_in_bytes),
          "state_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
          "flops": float((cost or {}).get("flops", float("nan")))}


class Path:
  """One implementation (PATHS): its model, state and compiled steps."""

  def __init__(self, name: str, work: Workload, mesh, counter: CompileCounter,
               kind: str = "i2m2", modality: str = "", dtype: str = "float32"):
    import jax  # pylint: disable=g-import-not-at-top
    from i2m2_jax import steps  # pylint: disable=g-import-not-at-top
    from i2m2_jax.experiment import build_experiment  # pylint: disable=g-import-not-at-top
    self.name, self.mesh, self.counter = name, mesh, counter
    fields, xla_defaults, extra = parse_path(name)
    run = work.config.copy_and_resolve_references()
    for key, value in fields.items():
      run.model[key] = value
    run.model.kind, run.model.modality, run.model.compute_dtype = kind, modality, dtype
    run.seed, run.num_train_steps = 0, 10_000
    self.dataset = _fake_dataset(work, 8, 0)
    exp = build_experiment(run, self.dataset, mesh=mesh, stats=None)  # uint8 scaled to [0, 1]
    self.model, self.preprocess, self.task, self.state = exp.model, exp.preprocess, exp.task, exp.state
    jax.block_until_ready(self.state)
    self.train_fn = steps.jit_train_step(exp.task, exp.preprocess, mesh,
                                         xla_defaults=xla_defaults, extra_options=extra)
    self.eval_fn = steps.jit_eval_step(exp.task, exp.preprocess, mesh, xla_defaults=xla_defaults,
                                       extra_options=extra)
    self.first_step: dict[int, dict[str, float]] = {}
    self.eval_first: dict[int, dict[str, float]] = {}

  def compile_train(self, batch) -> dict[str, float]:
    """Compiles the train step for `batch`'s shapes (a later call reuses the executable) and
    returns XLA's analyses of it (xla_analysis)."""
    return xla_analysis(self.train_fn.lower(self.state, batch).compile())

  def train(self, batch) -> float:
    """One synchronised train step; returns its seconds. The first per shape is compiled
    ahead (compile_train) inside the timed first step, whose figures are recorded."""
    from i2m2_jax import sharding  # pylint: disable=g-import-not-at-top
    size = int(batch["label"].shape[0])
    count, seconds = self.counter.snapshot()
    t = time.perf_counter()
    analysis = self.compile_train(batch) if size not in self.first_step else None
    self.state, sums = self.train_fn(self.state, batch)
    sharding.to_host(sums)
    elapsed = time.perf_counter() - t
    if analysis is not None:
      n, s = self.counter.snapshot()
      self.first_step[size] = {"first_step_s": elapsed, "compile_s": s - seconds,
                               "compilations": n - count, **analysis}
    return elapsed

  def evaluate(self, batch) -> float:
    """One synchronised eval step; returns its seconds. The first per shape is compiled ahead
    inside the timed first step, for XLA's FLOP count and memory (eval_first)."""
    from i2m2_jax import sharding  # pylint: disable=g-import-not-at-top
    size = int(batch["label"].shape[0])
    t = time.perf_counter()
    first = None
    if size not in self.eval_first:
      first = xla_analysis(self.eval_fn.lower(self.state, batch).compile())
    out = self.eval_fn(self.state, batch)
    sharding.to_host(out["sums"])
    elapsed = time.perf_counter() - t
    if first is not None:
      self.eval_first[size] = {**first, "first_step_s": elapsed}
    return elapsed


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


def memory_rows(work: Workload, batches: Sequence[int], paths: Sequence[str],
                budget_gib: float, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Compiles each path's train step per batch (nothing runs) and reads XLA's memory analysis:
  peak_bytes_per_example = the step's temporary buffers over the batch; max_batch_in_budget =
  the largest batch whose state and temporaries (at that per-example rate) fit in budget_gib."""
  import jax  # pylint: disable=g-import-not-at-top
  from i2m2_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh, counter, rows = sharding.make_mesh(), CompileCounter(), []
  for p in paths:
    path = Path(p, work, mesh, counter)
    for b in batches:
      t = time.perf_counter()
      batch = sharding.global_batch(random_batches(work, b, 1, seed=b)[0], mesh)
      a = path.compile_train(batch)
      fixed = a["state_bytes"] + a["output_bytes"]
      per_example = a["temp_bytes"] / b
      rows.append({"path": p, "mode": "train", "batch": b, "hw": work.hw, "dtype": "float32",
                   "peak_bytes_per_example": per_example, "state_bytes": a["state_bytes"],
                   "temp_bytes": a["temp_bytes"], "output_bytes": a["output_bytes"],
                   "compile_s": time.perf_counter() - t,
                   "max_batch_in_budget": int((budget_gib * 2 ** 30 - fixed) // per_example),
                   "budget_gib": budget_gib, "device": str(jax.devices()[0].device_kind)})
      log(f"{p} batch {b}: {per_example / 2 ** 20:.1f} MiB per example, state "
          f"{a['state_bytes'] / 2 ** 20:.0f} MiB, largest batch in {budget_gib:g} GiB "
          f"{rows[-1]['max_batch_in_budget']}")
  return rows


def run(work: Workload, batches: Sequence[int], steps: int, repeats: int, paths: Sequence[str],
        experts: bool, expert_paths: Sequence[str], measure_input: bool, input_rows: int,
        matmul_n: int, log: Callable[[str], None] = print,
        dtypes: Sequence[str] = ("float32",),
        input_path: str = "fast") -> tuple[list[dict[str, Any]], str]:
  """Measures everything (module docstring); returns (JSON rows, Markdown report)."""
  import jax  # pylint: disable=g-import-not-at-top
  from i2m2_jax import evaluation, input_pipeline, sharding  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()
  notes = list(work.notes)
  counter = CompileCounter()
  mesh = sharding.make_mesh()
  machine = _machine()
  for b in batches:
    if b % jax.device_count():
      raise ValueError(f"Batch {b} is not a multiple of the device count {jax.device_count()}.")
  peaks = {d: matmul_gflops(matmul_n, dtype=d) for d in dtypes}
  flops = model_flops(work.config.model) if work.hand_flops else None
  log(", ".join(f"matmul {matmul_n}^2 {d}: {g:.1f} GFLOP/s" for d, g in peaks.items())
      + (f"; model: {flops['train'] / 1e6:.1f} MFLOP per training example "
         f"({flops['forward'] / 1e6:.1f} forward)" if flops else ""))

  # Runs are (path, dtype); the fast implementation is AV-MNIST's, in float32 only.
  if any(p.split("+")[0] == "fast" for p in paths) and work.name != "avmnist":
    paths = [p for p in paths if p.split("+")[0] != "fast"]
    notes.append("path fast implements AV-MNIST's LeNet models only: not run")
  runs = [(p, d) for d in dtypes for p in paths if p.split("+")[0] != "fast" or d == "float32"]
  if len(runs) < len(paths) * len(dtypes):
    notes.append("path fast computes in float32 only: its other dtypes are not run")
  built = {(p, d): Path(p, work, mesh, counter, dtype=d) for p, d in runs}
  rows: dict[tuple[str, str, str, int], dict[str, Any]] = {}
  for b in batches:
    device_batches = [sharding.global_batch(h, mesh)
                      for h in random_batches(work, b, 4, seed=b)]
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
      first = dict(path.first_step[b])
      analysis = {k: first.pop(k) for k in ("temp_bytes", "state_bytes", "output_bytes",
                                            "flops")}
      rows[(p, d, "train", b)] = {**_median_row(times[((p, d), "train")], b), **first,
                                  "peak_bytes_per_example": analysis["temp_bytes"] / b,
                                  "state_bytes": analysis["state_bytes"],
                                  "xla_flops_per_example": analysis["flops"] / b,
                                  "recompilations": recompiles[((p, d), "train")]}
      # Padded evaluation: a split whose last batch is padded, through evaluation.evaluate.
      padded = _fake_dataset(work, 2 * b + b // 2 + 1, seed=b + 1)
      n0 = counter.snapshot()[0]
      evaluation.evaluate(path.eval_fn, path.state, padded.sources["val"], padded, path.task, b,
                          mesh)
      rows[(p, d, "eval", b)] = {**_median_row(times[((p, d), "eval")], b),
                                 "first_step_s": path.eval_first[b]["first_step_s"],
                                 "peak_bytes_per_example": path.eval_first[b]["temp_bytes"] / b,
                                 "xla_flops_per_example": path.eval_first[b]["flops"] / b,
                                 "recompilations": recompiles[((p, d), "eval")],
                                 "recompilations_padded_eval": counter.snapshot()[0] - n0}

  for (p, d, mode, b), row in rows.items():
    if flops:
      per_example = flops["train"] if mode == "train" else flops["forward"]
    else:  # XLA's count of the first path's steps: the same function on every path (a
      # rematerialised step's recomputation is not credited)
      first = built[runs[0]]
      per_example = (first.first_step[b] if mode == "train" else first.eval_first[b])["flops"] / b
    row["dtype"] = d
    row["hw"] = work.hw
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
    for p in expert_paths:
      alone_runs = {"i2m2": built.get((p, "float32")) or Path(p, work, mesh, counter)}
      alone_runs.update({name: Path(p, work, mesh, counter, kind=kind, modality=modality)
                         for name, (kind, modality) in work.alone.items()})
      for b in batches:
        batch = sharding.global_batch(random_batches(work, b, 1, seed=b)[0], mesh)
        times = {name: [] for name in alone_runs}
        for path in alone_runs.values():
          path.train(batch)
        for _ in range(max(repeats, 1)):
          for name, path in alone_runs.items():
            times[name] += [path.train(batch) for _ in range(steps)]
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        parts = {name: med[name] for name in work.alone}
        expert_rows[(p, b)] = parts
        row = rows.setdefault((p, "float32", "train", b), {})
        row["expert_step_ms"] = parts
        row["experts_sum_step_ms"] = sum(parts.values())
        row["i2m2_step_ms_with_experts"] = med["i2m2"]
        row["i2m2_over_experts_sum"] = med["i2m2"] / sum(parts.values())
        log(f"experts alone ({p}, batch {b}): " + ", ".join(f"{k} {v:.1f} ms"
                                                            for k, v in med.items()))

  input_note = ""
  if measure_input and work.name != "avmnist":
    notes.append("the input wait is measured for AV-MNIST only (its array_record build)")
  elif measure_input:
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
                   input_note, matmul_n, steps, repeats, work)
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
            matmul_n, steps, repeats, work: Workload) -> str:
  del expert_rows  # in the rows
  if flops:
    counted = (f"hand count from the config: {flops['train'] / 1e6:.1f} M per training example, "
               f"{flops['forward'] / 1e6:.1f} M per evaluated example")
  else:
    train = [r for r in rows if r["mode"] == "train"]
    counted = (f"XLA's count of the compiled steps: {train[0]['gflop_per_s'] / train[0]['examples_per_s']:.2f} "
               f"G per training example" if train else "XLA's count")
  shapes = ", ".join(f"{m} {'x'.join(map(str, s))}" for m, s in work.shapes.items())
  lines = [f"Machine: {machine['cpu']}; JAX {machine['jax']} on {machine['device']}"
           + (f"; XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else "") + ".",
           f"Model: {work.name} I2M2 ({shapes}); load average (1/5/15 min) before "
           f"{'/'.join(f'{x:.2f}' for x in load_before)}, "
           f"after {'/'.join(f'{x:.2f}' for x in load_after)}. Medians of {steps} steps x "
           f"{repeats} interleaved repeats.",
           "Matmul rate (" + ", ".join(f"{d} {matmul_n}^2 jnp.dot {g:.1f}"
                                       for d, g in peaks.items())
           + f" GFLOP/s). Model FLOPs ({counted})."]
  lines += [f"Note: {n}." for n in notes]
  lines += ["", "| path | dtype | mode | batch | step ms (min–max) | examples/s | vs plain | "
            "GFLOP/s | % of matmul | first step s (XLA compile s) | recompiles (padded eval) | "
            "train memory / example MiB | input wait | experts alone, ms: "
            + " + ".join(e.replace("uni_", "") for e in work.alone) + " = sum; I2M2 (I2M2 / sum) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    first = (f"{r['first_step_s']:.1f} ({r['compile_s']:.1f})" if "compile_s" in r
             else _fmt(r.get("first_step_s"), ".1f", ""))
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
      parts = (" + ".join(f"{e[name]:.1f}" for name in work.alone) + " = "
               f"{r['experts_sum_step_ms']:.1f}; I2M2 {r['i2m2_step_ms_with_experts']:.1f} "
               f"({r['i2m2_over_experts_sum']:.2f})")
    lines.append(
        f"| {r['path']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['step_ms']:.1f} "
        f"({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | {r['examples_per_s']:.0f} | "
        f"{_vs(r)} | "
        f"{r['gflop_per_s']:.1f} | {100 * r['peak_fraction']:.1f} | {first} | {recompiles} | "
        f"{_fmt(r.get('peak_bytes_per_example', 0) / 2 ** 20 or None, '.1f')} | {wait} | "
        f"{parts} |")
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
  work = workload(_CONFIG.value, _HW.value)
  batches = [int(b) for b in _BATCHES.value or (("8", "16") if work.name == "fastmri"
                                                  else ("40", "256"))]
  paths = list(_PATHS.value or work.paths)
  if _MEMORY_ONLY.value:
    rows = memory_rows(work, batches, paths, _MEMORY_BUDGET_GIB.value)
    report = "\n".join(
        ["| path | batch | hw | train memory / example (MiB) | state (MiB) | largest batch in "
         f"{_MEMORY_BUDGET_GIB.value:g} GiB |", "|---|---|---|---|---|---|"]
        + [f"| {r['path']} | {r['batch']} | {r['hw']} | {r['peak_bytes_per_example'] / 2 ** 20:.1f}"
           f" | {r['state_bytes'] / 2 ** 20:.0f} | {r['max_batch_in_budget']} |" for r in rows])
  else:
    quick = _QUICK.value
    experts = _EXPERTS.value and (not quick or flags.FLAGS["experts"].present)
    rows, report = run(
        work, batches, _STEPS.value,
        1 if quick and not flags.FLAGS["repeats"].present else _REPEATS.value,
        paths, experts, list(_EXPERT_PATHS.value or work.expert_paths), _INPUT.value,
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
