"""Tests for i2m2_jax.checkpointing: round trips, retention (latest N + best), resume, atomicity."""
import os
import shutil
import subprocess
import sys

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from i2m2_jax import checkpointing
from i2m2_jax.checkpointing import (Checkpointer, checkpoint_dir, parse_init_from,
                                    restore_expert_params)

ACCS = [0.5, 0.9, 0.7, 0.6, 0.8]  # validation accuracy at steps 1..5


class TrainState(train_state.TrainState):
  batch_stats: dict
  rng: jax.Array


class _Expert(nn.Module):
  use_bn: bool

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x)


class _TwoExperts(nn.Module):
  """Stands in for the I2M2 classifier: params/batch_stats keyed by expert name."""

  @nn.compact
  def __call__(self, x, train=False):
    return (_Expert(True, name="uni_image")(x, train) +
            _Expert(False, name="joint")(x, train))


def _make_state(seed, tx):
  model = _TwoExperts()
  variables = model.init(jax.random.PRNGKey(seed), jnp.ones((2, 5)))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], rng=jax.random.PRNGKey(seed + 100))


def _trained_state(seed, tx, steps=2):
  """A state whose opt_state, step, batch_stats are not at their initial values."""
  state = _make_state(seed, tx)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (8, 5))

  @jax.jit  # one compile instead of many small eager ones
  def train_step(state):
    def loss_fn(params):
      out, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, True,
                                mutable=["batch_stats"])
      return jnp.mean(out ** 2), upd
    grads, upd = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=upd["batch_stats"])

  for _ in range(steps):
    state = train_step(state)
  return state


def _step_dirs(directory):
  return {int(n) for n in os.listdir(directory) if n.isdigit()}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tx", [optax.adamw(1e-2), optax.sgd(0.1, momentum=0.9)],
                         ids=["adamw", "sgd_momentum"])
def test_round_trip_keeps_types_and_values(tmp_path, tx):
  state = _trained_state(0, tx)
  with Checkpointer(tmp_path / "ck") as ckpt:
    assert ckpt.save(int(state.step), state, metrics={"accuracy": 0.5})
    ckpt.wait()
    target = _make_state(7, tx)  # same structure, other values
    restored = ckpt.restore(ckpt.latest_step(), target)
  assert isinstance(restored, TrainState)
  assert restored.apply_fn is target.apply_fn and restored.tx is target.tx
  # optax NamedTuples survive (ScaleByAdamState / TraceState ...), not lists of dicts.
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
  assert type(restored.opt_state[0]) is type(state.opt_state[0])
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.batch_stats, state.batch_stats)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  _assert_trees_equal(restored.rng, state.rng)
  # The restored state trains on.
  restored.apply_gradients(grads=jax.tree.map(jnp.ones_like, restored.params))


def test_restore_honours_target_shardings(tmp_path):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  n = len(jax.devices())
  tree = {"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), repl),
          "v": jax.device_put(jnp.arange(2.0 * n), split),
          "host": np.arange(3, dtype=np.int32)}
  with Checkpointer(tmp_path / "ck", async_save=False) as ckpt:
    ckpt.save(1, tree)
    restored = ckpt.restore(1, tree)
  assert restored["w"].sharding == repl
  assert restored["v"].sharding == split
  assert isinstance(restored["host"], np.ndarray)
  _assert_trees_equal(restored, tree)


@pytest.mark.parametrize("mode,best,kept", [("max", 2, {2, 4, 5}), ("min", 1, {1, 4, 5})])
def test_retention_keeps_latest_and_best(tmp_path, mode, best, kept):
  directory = tmp_path / "ck"
  state = {"x": jnp.zeros(3)}
  with Checkpointer(directory, keep=2, best_metric="accuracy", best_mode=mode) as ckpt:
    for step, acc in enumerate(ACCS, start=1):
      assert ckpt.save(step, state, metrics={"accuracy": acc, "nll": 1.0 - acc})
    ckpt.wait()
    assert set(ckpt.all_steps()) == kept
    assert ckpt.best_step() == best
    assert ckpt.latest_step() == 5
    assert ckpt.metrics(best)["accuracy"] == ACCS[best - 1]
  assert _step_dirs(directory) == kept


def test_saves_without_metrics_do_not_pile_up(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory, keep=2) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, metrics={"accuracy": 0.9})
    for step in range(2, 7):
      ckpt.save(step, {"x": jnp.ones(2)})
    ckpt.wait()
    assert ckpt.best_step() == 1
  assert _step_dirs(directory) == {1, 5, 6}

  other = tmp_path / "no_metrics"
  with Checkpointer(other, keep=2) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, {"x": jnp.ones(2)})
    ckpt.wait()
    assert ckpt.best_step() is None
    assert ckpt.latest_step() == 5
  assert _step_dirs(other) == {4, 5}


def test_nan_metric_never_becomes_best(tmp_path):
  with Checkpointer(tmp_path / "ck", keep=1) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, metrics={"accuracy": 0.3})
    ckpt.save(2, {"x": jnp.ones(2)}, metrics={"accuracy": float("nan")})
    ckpt.wait()
    assert ckpt.best_step() == 1
    assert ckpt.all_steps() == [1, 2]


def test_save_checks_metrics_and_step_order(tmp_path):
  with Checkpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(ValueError, match="best_metric='accuracy'"):
      ckpt.save(1, {"x": jnp.ones(2)}, metrics={"acc": 0.3})
    assert ckpt.save(3, {"x": jnp.ones(2)}, metrics={"accuracy": np.float32(0.3)})
    assert not ckpt.save(3, {"x": jnp.ones(2)}, metrics={"accuracy": 0.4})  # not after latest
    assert not ckpt.save(2, {"x": jnp.ones(2)}, metrics={"accuracy": 0.4})


def test_resume_in_a_new_checkpointer(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory) as ckpt:
    for step, acc in enumerate(ACCS, start=1):
      ckpt.save(step, {"w": jnp.full(3, float(step))}, metrics={"accuracy": acc})
  with Checkpointer(directory) as ckpt:  # what a restarted trainer does
    assert ckpt.latest_step() == 5
    assert ckpt.best_step() == 2
    assert ckpt.all_steps() == [2, 4, 5]
    restored = ckpt.restore(None, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["w"], np.full(3, 5.0))
    # Retention goes on across the restart: the best (step 2) stays, the latest two rotate.
    ckpt.save(6, {"w": jnp.full(3, 6.0)}, metrics={"accuracy": 0.1})
    ckpt.save(7, {"w": jnp.full(3, 7.0)}, metrics={"accuracy": 0.2})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7]
  assert _step_dirs(directory) == {2, 6, 7}


def test_meta_round_trip(tmp_path):
  config = {"model": {"kind": "i2m2", "widths": (8, 16)}, "lr": np.float32(0.5),
            "seed": np.int64(3), "name": "run"}
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(4, {"x": jnp.ones(2)}, metrics={"accuracy": jnp.float32(0.75)},
              meta={"config": config})
    ckpt.wait()
    meta = ckpt.restore_meta(4)
    assert ckpt.restore_meta() == meta
  assert meta == {"config": {"model": {"kind": "i2m2", "widths": [8, 16]}, "lr": 0.5, "seed": 3,
                             "name": "run"},
                  "step": 4, "metrics": {"accuracy": 0.75}}


def test_unfinished_checkpoints_are_ignored(tmp_path):
  directory = tmp_path / "ck"
  with Checkpointer(directory) as ckpt:
    ckpt.save(1, {"w": jnp.full(2, 1.0)}, metrics={"accuracy": 0.9})
    ckpt.save(2, {"w": jnp.full(2, 2.0)}, metrics={"accuracy": 0.5})
  # Crash leftovers: complete-looking data that was never renamed, in this Orbax version's naming
  # and with a timestamp suffix, and a bare step directory without Orbax's metadata.
  shutil.copytree(directory / "2", directory / "7.orbax-checkpoint-tmp")
  shutil.copytree(directory / "2", directory / "8.orbax-checkpoint-tmp-1234567")
  os.makedirs(directory / "9" / "state")

  with Checkpointer(directory, read_only=True) as reader:  # read-only: leaves the disk alone
    assert reader.all_steps() == [1, 2]
    assert reader.latest_step() == 2
    assert reader.best_step() == 1
    np.testing.assert_array_equal(reader.restore(None, {"w": jnp.zeros(2)})["w"], [2.0, 2.0])
    with pytest.raises(FileNotFoundError, match="step 9"):
      reader.restore(9, {"w": jnp.zeros(2)})
  assert (directory / "8.orbax-checkpoint-tmp-1234567").exists()

  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 2
    with pytest.raises(RuntimeError, match=r"Unfinished checkpoint directories \[9\]"):
      ckpt.save(3, {"w": jnp.full(2, 3.0)}, metrics={"accuracy": 0.1})


def test_read_only_refuses_to_save(tmp_path):
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, metrics={"accuracy": 0.5})
  with Checkpointer(tmp_path / "ck", read_only=True) as reader:
    with pytest.raises(RuntimeError, match="read-only"):
      reader.save(2, {"x": jnp.ones(2)})
  with pytest.raises(FileNotFoundError):
    Checkpointer(tmp_path / "missing", read_only=True)


def test_restore_expert_params_takes_that_experts_best_weights(tmp_path):
  workdir = tmp_path / "run_a"
  tx = optax.adamw(1e-2)
  best, later = _trained_state(0, tx, steps=1), _trained_state(1, tx, steps=2)
  with Checkpointer(checkpoint_dir(workdir), best_metric="nll", best_mode="min") as ckpt:
    ckpt.save(1, best, metrics={"nll": 0.2})
    ckpt.save(2, later, metrics={"nll": 0.4})

  got = restore_expert_params(str(workdir), "uni_image")
  assert set(got) == {"params", "batch_stats"}
  _assert_trees_equal(got["params"], jax.device_get(best.params["uni_image"]))
  _assert_trees_equal(got["batch_stats"], jax.device_get(best.batch_stats["uni_image"]))

  joint = restore_expert_params(str(workdir), "joint")  # no BatchNorm in this expert
  _assert_trees_equal(joint["params"], jax.device_get(best.params["joint"]))
  assert joint["batch_stats"] == {}

  with pytest.raises(ValueError, match=r"run_a.*'uni_audio'.*\['joint', 'uni_image'\]"):
    restore_expert_params(str(workdir), "uni_audio")
  with pytest.raises(ValueError, match="no checkpoints"):
    restore_expert_params(str(tmp_path / "nowhere"), "joint")


def test_restore_expert_params_falls_back_to_latest(tmp_path):
  workdir = tmp_path / "run_b"
  with Checkpointer(checkpoint_dir(workdir)) as ckpt:
    ckpt.save(1, {"params": {"joint": {"w": jnp.ones(2)}}})
    ckpt.save(2, {"params": {"joint": {"w": jnp.full(2, 2.0)}}})
  got = restore_expert_params(str(workdir), "joint")
  np.testing.assert_array_equal(got["params"]["w"], [2.0, 2.0])
  assert got["batch_stats"] == {}


def test_restore_raw_gives_host_arrays(tmp_path):
  tree = {"w": jnp.arange(3.0), "key": jax.random.key(0), "old_key": jax.random.PRNGKey(1),
          "step": 5, "empty": None}
  with Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, tree)
    ckpt.wait()
    raw = ckpt.restore_raw()
  assert isinstance(raw["w"], np.ndarray) and isinstance(raw["old_key"], np.ndarray)
  np.testing.assert_array_equal(raw["w"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(raw["old_key"], jax.random.PRNGKey(1))
  np.testing.assert_array_equal(jax.random.key_data(raw["key"]),
                                jax.random.key_data(jax.random.key(0)))
  assert int(raw["step"]) == 5 and raw["empty"] is None


_RESTORE_ON_ONE_DEVICE = """
import sys
import numpy as np
from i2m2_jax.checkpointing import restore_expert_params
got = restore_expert_params(sys.argv[1], "joint")
np.testing.assert_array_equal(got["params"]["w"], np.arange(8.0))
print("OK", type(got["params"]["w"]).__name__)
"""


def test_restore_expert_params_on_another_topology(tmp_path):
  # Saved sharded over this process's 2 devices, read back in a process with a single device.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  w = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
  with Checkpointer(checkpoint_dir(tmp_path)) as ckpt:
    ckpt.save(1, {"params": {"joint": {"w": w}}}, metrics={"accuracy": 1.0})
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _RESTORE_ON_ONE_DEVICE, str(tmp_path)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK ndarray" in result.stdout


def test_checkpoint_dir():
  assert checkpoint_dir("runs/a") == os.path.join("runs/a", "checkpoints")


@pytest.mark.parametrize("spec,expected", [
    ("", {}),
    ("   ", {}),
    (None, {}),
    ("joint=runs/b", {"joint": "runs/b"}),
    ("uni_image=runs/a,joint=runs/b", {"uni_image": "runs/a", "joint": "runs/b"}),
    (" uni_image = /abs/run a , joint=gs://b/c ", {"uni_image": "/abs/run a", "joint": "gs://b/c"}),
])
def test_parse_init_from(spec, expected):
  assert parse_init_from(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("joint", "not of the form"),
    ("joint=", "not of the form"),
    ("=runs/a", "not of the form"),
    ("uni_image=runs/a,,joint=runs/b", "not of the form"),
    ("uni_image=runs/a,", "not of the form"),
    ("uni image=runs/a", "not a valid expert name"),
    ("joint=runs/a,joint=runs/b", "twice"),
])
def test_parse_init_from_rejects_bad_strings(spec, message):
  with pytest.raises(ValueError, match=message):
    parse_init_from(spec)


def test_to_json_converts_arrays():
  assert checkpointing.to_json({"a": np.float32(1.5), "b": jnp.arange(2), "c": (1, "x")}) == {
      "a": 1.5, "b": [0, 1], "c": [1, "x"]}
