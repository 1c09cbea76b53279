"""Shared test data: a tiny two-modality data set with a learnable signal, and its config."""
import json
import os

import numpy as np

from configs import default
from i2m2_jax import input_pipeline, train_lib
from i2m2_jax.datasets import Dataset

NUM_CLASSES = 3
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
