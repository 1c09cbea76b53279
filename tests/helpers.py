"""Shared test data: a tiny two-modality data set with a learnable signal, and its config."""
import importlib
import json
import os
import sys

from absl import flags
import numpy as np

from configs import default
from i2m2_jax import input_pipeline, train_lib
from i2m2_jax.datasets import Dataset

NUM_CLASSES = 3
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
MODALITIES = {"a": (6,), "b": (4, 3)}


def make_split(n, seed):
  """Two modalities with a learnable signal: a's first features and b's mean carry the label."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, n)
  a = rng.normal(size=(n, 6)).astype(np.float32)
  a[np.arange(n), label] += 2.5
  b = rng.normal(size=(n, 4, 3)).astype(np.float32)
  b[np.arange(n), :, label] += 1.5
  return input_pipeline.InMemorySource({"a": a, "b": b, "label": label.astype(np.int64)})


def tiny_dataset():
  return Dataset(name="tiny", modalities=MODALITIES, num_classes=NUM_CLASSES,
                 sources={"train": make_split(128, 0), "val": make_split(40, 1),
                          "test": make_split(44, 2)})


def tiny_config(kind="i2m2", **overrides):
  config = default.get_config()
  config.model.kind = kind
  config.model.head_hidden = (16,)
  config.model.encoders = "a=mlp,b=gru"  # (the defaults flatten such small inputs)
  config.model.encoder_kwargs = {"a": {"features": (16,)}, "b": {"hidden": 8}}
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 12
  config.eval_every_steps = 6
  config.log_every_steps = 3
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "constant"
  config.eval_attribution = False  # one more compilation per run; tested in test_attribution.py
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides):
  """Sets config fields named by dotted keys ({'optimizer.learning_rate': 0.1}), as the command
  line's --config.optimizer.learning_rate=0.1 does; returns config."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def train_batches(dataset, batch_size, n, targets=("label",)):
  it = input_pipeline.train_batches(dataset.sources["train"], batch_size=batch_size, seed=0,
                                    modalities=list(dataset.modalities), targets=targets,
                                    prefetch=0)
  return [next(it) for _ in range(n)]


def import_experiment(name):
  """experiments/<name>.py as a module, for its functions, without its command-line flags.

  Each script defines its flags at import, as absl scripts do, and several share a name (--out,
  --config); absl refuses a second definition in one process. Tests use the functions, never the
  flags, so the flags a script defined are dropped again once it is imported.
  """
  if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
  if name in sys.modules:
    return sys.modules[name]
  module = importlib.import_module(name)
  for flag in flags.FLAGS.get_flags_for_module(name):
    if flag.name in flags.FLAGS:
      delattr(flags.FLAGS, flag.name)
  return module


def fake_training(monkeypatch, results_for, expected):
  """Replaces train_lib.train_and_evaluate: each call checks it got the data set `expected`,
  records (run dir relative to the cwd, seed, init_from), writes results_for(config) as
  results.json and returns it. Returns the list of calls. For tests of the orchestration alone (studies, tuning)."""
  calls = []

  def train(cfg, directory, dataset=None):
    assert dataset is expected
    calls.append((os.path.relpath(directory), cfg.seed, cfg.model.init_from))
    results = results_for(cfg)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.json"), "w") as f:
      json.dump(results, f)
    return results

  monkeypatch.setattr(train_lib, "train_and_evaluate", train)
  return calls
