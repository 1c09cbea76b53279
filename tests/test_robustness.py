"""Robustness to noise (i2m2_jax/robustness.py): the corruptions on hand-made arrays, the
evaluation against a hand computation with fake experts, and MultiBench's measures."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from i2m2_jax import evaluation, inference, input_pipeline, robustness, sharding, steps, tasks
from i2m2_jax.datasets import Dataset
from i2m2_jax.experiment import make_preprocess
from test_faults import fake_state, log_softmax


@functools.partial(jax.jit, static_argnames=("kind", "modality"))
def _corrupted(x, level, scale, first, seed, *, kind, modality):
  keys = robustness.example_keys(seed, modality, first + jnp.arange(x.shape[0]))
  return robustness.corrupt(x, kind, level, keys, scale)


def corrupted(x, kind, level, scale, seed=0, modality="m", first=0):
  """`x` corrupted as robustness.evaluate_robustness corrupts examples first, first + 1, ...
  (one compilation per kind, modality and shape)."""
  return np.asarray(_corrupted(x, np.float32(level), scale, np.int32(first), np.int32(seed),
                               kind=kind, modality=modality))


def scale_of(std, low=0.0, high=255.0):
  std = np.asarray(std, np.float32)
  return robustness.NoiseScale(std=std, low=np.full_like(std, low), high=np.full_like(std, high))


def test_gaussian_noise_is_scaled_to_each_feature_and_the_same_draw_at_every_level():
  x = np.random.default_rng(0).normal(size=(4000, 5)).astype(np.float32)
  scale = scale_of([1.0, 2.0, 3.0, 4.0, 5.0])
  np.testing.assert_array_equal(corrupted(x, "gaussian", 0.0, scale), x)
  noise = (corrupted(x, "gaussian", 0.5, scale) - x) / scale.std
  np.testing.assert_allclose(noise.mean(0), 0.0, atol=0.03)
  np.testing.assert_allclose(noise.std(0), 0.5, rtol=0.04)
  np.testing.assert_allclose(corrupted(x, "gaussian", 1.0, scale) - x, 2 * noise * scale.std,
                             rtol=1e-4, atol=1e-5)


def test_salt_and_pepper_hits_whole_pixels_with_the_extremes():
  x = np.random.default_rng(1).integers(1, 255, size=(400, 8, 8, 3)).astype(np.uint8)
  scale = scale_of([1.0, 1.0, 1.0], low=0.0, high=255.0)
  np.testing.assert_array_equal(corrupted(x, "salt_pepper", 0.0, scale), x)
  assert corrupted(x, "salt_pepper", 0.5, scale).dtype == np.uint8
  hits = {}
  for level in (0.3, 0.6):
    out = corrupted(x, "salt_pepper", level, scale)
    changed = out != x
    assert np.all(changed.all(-1) == changed.any(-1))  # all channels of a pixel or none
    hit = changed.all(-1)
    assert np.all(np.isin(out[hit], (0, 255))) and abs(np.mean(out[hit] == 255) - 0.5) < 0.03
    assert abs(hit.mean() - level) < 0.02
    hits[level] = hit
  assert np.all(hits[0.6] | ~hits[0.3])  # what is hit at 0.3 is hit at 0.6


def test_time_drop_zeroes_whole_steps_at_random_and_in_runs_of_three():
  x = np.random.default_rng(2).uniform(1, 2, size=(3000, 20, 4)).astype(np.float32)
  scale = scale_of(np.ones(4))
  np.testing.assert_array_equal(corrupted(x, "time_drop", 0.0, scale), x)
  assert not np.any(corrupted(x, "time_drop", 1.0, scale))
  p = 0.2
  out = corrupted(x, "time_drop", p, scale)
  dropped = np.all(out == 0, -1)
  np.testing.assert_array_equal(out[~dropped], x[~dropped])  # a step is dropped whole or kept
  # Step t >= 2 is kept when neither dropped itself nor covered by a run starting at t-2..t.
  assert abs((~dropped[:, 2:]).mean() - (1 - p) ** 4) < 0.01
  assert abs((~dropped[:, 0]).mean() - (1 - p) ** 2) < 0.02


def test_feature_drop_zeroes_entries_independently_by_example_index():
  x = np.random.default_rng(3).uniform(1, 2, size=(2000, 10)).astype(np.float32)
  scale = scale_of(np.ones(10))
  out = corrupted(x, "feature_drop", 0.25, scale)
  kept = out != 0
  np.testing.assert_array_equal(out[kept], x[kept])
  assert abs((~kept).mean() - 0.25) < 0.01
  # An example's noise depends on its index, the seed and the modality, not on its batch.
  halves = [corrupted(x[:1000], "feature_drop", 0.25, scale),
            corrupted(x[1000:], "feature_drop", 0.25, scale, first=1000)]
  np.testing.assert_array_equal(out, np.concatenate(halves))
  assert not np.array_equal(out, corrupted(x, "feature_drop", 0.25, scale, seed=1))
  keys = {m: jax.random.key_data(robustness.example_keys(0, m, jnp.arange(3))) for m in "ab"}
  assert not np.array_equal(keys["a"], keys["b"])


def test_kinds_follow_rank_and_dtype_and_can_be_overridden():
  shapes = {"vec": ((5,), np.float32), "seq": ((7, 3), np.float32),
            "img": ((8, 8, 1), np.float32), "jpg": ((8, 8, 3), np.uint8)}
  assert robustness.noise_kinds("", shapes) == {"vec": "gaussian", "seq": "time_drop",
                                                "img": "gaussian", "jpg": "salt_pepper"}
  assert robustness.noise_kinds("vec=feature_drop", shapes)["vec"] == "feature_drop"
  with pytest.raises(ValueError, match=r"--robustness_kinds: vec='blur' is unknown"):
    robustness.noise_kinds("vec=blur", shapes)
  with pytest.raises(ValueError, match=r"names modality 'audio'; the modalities are"):
    robustness.noise_kinds("audio=gaussian", shapes)


def test_curves_match_a_hand_computation_and_level_zero_is_the_clean_metric():
  rng = np.random.default_rng(5)
  n, c = 37, 3  # 37: the last batch of 8 is padded
  a = rng.normal(size=(n, c)).astype(np.float32) * 2
  b = rng.normal(size=(n, c)).astype(np.float32) * 2
  label = rng.integers(0, c, n)
  source = input_pipeline.InMemorySource({"a": a, "b": b, "label": label})
  modalities = {"a": (c,), "b": (c,)}
  data = Dataset(name="fake", modalities=modalities, num_classes=c,
                 sources={"train": source, "val": source, "test": source})
  mesh = sharding.make_mesh()
  task, preprocess = tasks.MulticlassTask(c), make_preprocess(list(modalities), None)
  state, layout = fake_state(["uni_a", "uni_b", "joint"], mesh)  # i2m2 of echoing experts
  spec = {"dataset": "fake", "modalities": {m: {"shape": [c], "dtype": "float32"} for m in "ab"},
          "targets": {"label": []}, "task": "multiclass", "num_classes": c, "label_names": []}
  predictor = inference.Predictor(
      workdir="fake", step=0, config=ml_collections.ConfigDict({"eval_batch_size": 8}),
      spec=spec, task=task, layout=layout, preprocess=preprocess, state=state, mesh=mesh)

  curves = robustness.evaluate_robustness(predictor, source, levels=(0.0, 0.5, 1.0))
  clean = evaluation.evaluate(steps.jit_eval_step(task, preprocess, mesh), state, source, data,
                              task, 8, mesh)
  assert curves["metric"] == "accuracy"
  for m in ("a", "b"):
    assert curves["modalities"][m]["kind"] == "gaussian"
    assert curves["modalities"][m]["values"][0] == clean["accuracy"]
  scale = robustness.noise_scale(source, "a")
  np.testing.assert_allclose(scale.std, a.astype(np.float64).std(0), rtol=1e-5)
  np.testing.assert_array_equal(scale.high, a.max(0))
  for i, level in enumerate((0.5, 1.0)):
    noisy = corrupted(a, "gaussian", level, scale, modality="a").astype(np.float64)
    logp = log_softmax(log_softmax(noisy) + log_softmax(b) + log_softmax(noisy - 0.5 * b))
    assert curves["modalities"]["a"]["values"][i + 1] == np.mean(logp.argmax(-1) == label)
  values = curves["modalities"]["b"]["values"]
  assert curves["modalities"]["b"]["auc"] == pytest.approx(
      0.25 * (values[0] + 2 * values[1] + values[2]))


def test_multibench_measures_on_hand_made_curves():
  levels = robustness.LEVELS
  assert robustness.area_under_curve(levels, [0.8] * 11) == pytest.approx(0.8)
  assert robustness.area_under_curve(levels, np.linspace(1.0, 0.0, 11)) == pytest.approx(0.5)
  # f loses 0.1 per level less than the baseline at levels 1 and 2: +0.1 + 0.2.
  assert robustness.effective_robustness([0.9, 0.8, 0.7], [0.8, 0.6, 0.4]) == pytest.approx(0.3)
  assert robustness.effective_robustness([0.5, 0.4], [0.9, 0.8]) == pytest.approx(0.0)
  assert robustness.relative_robustness({"x": 0.6, "y": 0.8, "z": 0.7}) == pytest.approx(
      {"x": 0.0, "y": 1.0, "z": 0.5})
