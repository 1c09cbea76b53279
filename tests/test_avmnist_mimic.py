"""AV-MNIST and MIMIC-III builders on small files written in MultiBench's exact formats.

Each test writes the files into tmp_path, builds through the real TFDS builders (array_record,
data_dir in tmp_path) and checks what the trainer would read against numpy references.
"""
import os
import pickle
import random

import ml_collections
import numpy as np
import pytest

from i2m2_jax.datasets import DATASETS
from i2m2_jax.datasets import avmnist
from i2m2_jax.datasets import mimic
from helpers import import_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# AV-MNIST


def write_avmnist(root, n_train=120, n_test=30, integral=True, seed=0):
  """MultiBench's layout: image/{split}_data.npy [N, 784], audio/{split}_data.npy [N, 112, 112],
  {split}_labels.npy [N]; values 0..255 with a bright class-dependent band (learnable)."""
  rng = np.random.default_rng(seed)
  files = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, n)
    image = rng.uniform(1, 100, (n, 28, 28))
    audio = rng.uniform(1, 100, (n, 112, 112))
    for i, y in enumerate(labels):
      image[i, 2 * y:2 * y + 3] = 250
      audio[i, :, 10 * y:10 * y + 8] = 250
    if integral:  # MultiBench's image files are float (its loader divides them in place)
      image, audio = np.round(image), np.round(audio).astype(np.float32)
    files[split] = {"image": image.reshape(n, 784), "audio": audio, "label": labels}
    avmnist.write_split(root, split, files[split]["image"], audio, labels)
  return files


def avmnist_config(tmp_path, manual, **overrides):
  return ml_collections.ConfigDict(dict(name="avmnist", data_dir=str(tmp_path / "tfds"),
                                        manual_dir=str(manual), **overrides))


def stack(source, key):
  return np.stack([np.asarray(source[i][key]) for i in range(len(source))])


def test_avmnist_uint8_build_splits_and_values(tmp_path):
  files = write_avmnist(tmp_path / "manual")
  ds = DATASETS["avmnist"](avmnist_config(tmp_path, tmp_path / "manual", num_val=20))
  assert ds.name == "avmnist" and ds.num_classes == 10
  assert list(ds.modalities) == ["image", "audio"]
  assert ds.modalities == {"image": (28, 28, 1), "audio": (112, 112, 1)}
  assert {s: len(ds.sources[s]) for s in ("train", "val", "test")} == {
      "train": 100, "val": 20, "test": 30}
  train, test = files["train"], files["test"]
  expected = {  # train = first rows, val = last num_val rows, in file order
      "train": {k: v[:100] for k, v in train.items()},
      "val": {k: v[100:] for k, v in train.items()}, "test": test}
  for split, arrays in expected.items():
    image, audio = stack(ds.sources[split], "image"), stack(ds.sources[split], "audio")
    assert image.dtype == np.uint8 and audio.dtype == np.uint8  # trainer: x / 255
    assert image.shape[1:] == (28, 28, 1) and audio.shape[1:] == (112, 112, 1)
    np.testing.assert_array_equal(image, arrays["image"].reshape(-1, 28, 28, 1))
    np.testing.assert_array_equal(audio, arrays["audio"][..., None])
    labels = [ds.sources[split][i]["label"] for i in range(len(ds.sources[split]))]
    assert all(isinstance(y, int) for y in labels)
    np.testing.assert_array_equal(labels, arrays["label"])


def test_avmnist_float_values_stored_divided_by_255_and_build_reused(tmp_path):
  manual = tmp_path / "downloads"
  files = write_avmnist(manual / "avmnist", n_train=40, n_test=10, integral=False, seed=1)
  # Non-integral image, integral audio: each modality gets its own storage.
  np.save(manual / "avmnist" / "audio" / "train_data.npy", np.round(files["train"]["audio"]))
  np.save(manual / "avmnist" / "audio" / "test_data.npy", np.round(files["test"]["audio"]))
  config = avmnist_config(tmp_path, manual, num_val=10)  # files under avmnist/, as unpacked
  ds = DATASETS["avmnist"](config)
  image, audio = stack(ds.sources["test"], "image"), stack(ds.sources["test"], "audio")
  assert image.dtype == np.float32 and audio.dtype == np.uint8
  np.testing.assert_allclose(image, files["test"]["image"].reshape(-1, 28, 28, 1) / 255.0,
                             rtol=1e-6)
  assert 0 < image.min() and image.max() <= 1
  np.testing.assert_array_equal(audio, np.round(files["test"]["audio"])[..., None])
  # The build is found again without the manual files; another num_val is another build.
  for name in os.listdir(manual / "avmnist" / "image"):
    os.remove(manual / "avmnist" / "image" / name)
  again = DATASETS["avmnist"](config)
  np.testing.assert_array_equal(stack(again.sources["val"], "image"),
                                stack(ds.sources["val"], "image"))
  with pytest.raises(FileNotFoundError, match="image/train_data.npy"):
    DATASETS["avmnist"](avmnist_config(tmp_path, manual, num_val=5))


def test_avmnist_missing_file_names_it_and_its_shape(tmp_path):
  write_avmnist(tmp_path / "manual", n_train=12, n_test=4)
  os.remove(tmp_path / "manual" / "audio" / "test_data.npy")
  with pytest.raises(FileNotFoundError, match=r"audio/test_data\.npy.*\('N', 112, 112\)"):
    DATASETS["avmnist"](avmnist_config(tmp_path, tmp_path / "manual", num_val=2))


def test_avmnist_wrong_shapes_are_named(tmp_path):
  manual = tmp_path / "manual"
  write_avmnist(manual, n_train=12, n_test=4)
  np.save(manual / "image" / "test_data.npy", np.zeros((4, 780)))
  with pytest.raises(ValueError, match=r"image/test_data\.npy has shape \(4, 780\).*\(4, 784\)"):
    DATASETS["avmnist"](avmnist_config(tmp_path, manual, num_val=2))
  np.save(manual / "image" / "test_data.npy", np.zeros((4, 784)))
  np.save(manual / "test_labels.npy", np.zeros(5, np.int64))
  with pytest.raises(ValueError, match="disagree on the number of rows"):
    DATASETS["avmnist"](avmnist_config(tmp_path, manual, num_val=2))
  np.save(manual / "test_labels.npy", np.full(4, 10))
  with pytest.raises(ValueError, match="labels.*0..9"):
    DATASETS["avmnist"](avmnist_config(tmp_path, manual, num_val=2))
  np.save(manual / "test_labels.npy", np.zeros(4, np.int64))
  with pytest.raises(ValueError, match="num_val=12"):
    DATASETS["avmnist"](avmnist_config(tmp_path, manual, num_val=12))


# ---------------------------------------------------------------------------------------------
# MIMIC-III

N_PATIENTS = 200


def mimic_arrays(n=N_PATIENTS, seed=0):
  """im.pk's dict: ep_tdata [N, 24, 12], adm_features_all [N, 5], adm_labels_all [N, 6],
  y_icd9 [N, 20]; with NaN/inf sprinkled in and a label signal in both modalities."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, 6)) < 0.15).astype(np.float64)
  labels[:4] = [[1, 0, 0, 1, 1, 0],   # first positive among 1..5 is column 3
                [0, 0, 0, 0, 0, 0],   # none -> 0
                [1, 0, 0, 0, 0, 0],   # column 0 does not count -> 0
                [0, 0, 0, 0, 0, 7]]   # column 5 (any value > 0)
  icd9 = (rng.random((n, 20)) < 0.3).astype(np.float64)
  static = rng.normal(3.0, 2.0, (n, 5)) + labels[:, 1:2]
  series = rng.normal(-1.0, 5.0, (n, 24, 12)) + icd9[:, 1, None, None]
  static[5, 2], static[6, 0], series[7, 3, 4], series[8, 0, 11] = np.nan, np.inf, -np.inf, np.nan
  return {"ep_tdata": series, "adm_features_all": static, "adm_labels_all": labels,
          "y_icd9": icd9}


def write_mimic(folder, arrays):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "im.pk"), "wb") as f:
    pickle.dump(arrays, f)


def mimic_config(tmp_path, **overrides):
  return ml_collections.ConfigDict(dict(name="mimic", data_dir=str(tmp_path / "tfds"),
                                        manual_dir=str(tmp_path / "manual"), **overrides))


def reference_expectation(arrays, task, all_splits):
  """The reference pipeline, written independently in float64: clean, seeded shuffle of the
  (static, series, label) tuples in file order, split; statistics over all or training rows."""
  n = len(arrays["y_icd9"])
  x_s = np.nan_to_num(arrays["adm_features_all"], nan=0.0, posinf=0.0, neginf=0.0)
  x_t = np.nan_to_num(arrays["ep_tdata"], nan=0.0, posinf=0.0, neginf=0.0)
  if task == "mortality":
    y = []
    for row in arrays["adm_labels_all"]:
      y.append(next((c for c in range(1, 6) if row[c] > 0), 0))
  else:
    y = arrays["y_icd9"][:, {"icd9_140_239": 1, "icd9_460_519": 7}[task]].astype(int)
  tuples = [(i, x_s[i], x_t[i], int(y[i])) for i in range(n)]
  state = random.getstate()
  random.seed(10)
  random.shuffle(tuples)
  random.setstate(state)
  splits = {"val": tuples[:n // 10], "test": tuples[n // 10:n // 5], "train": tuples[n // 5:]}
  rows = np.arange(n) if all_splits else np.array([t[0] for t in splits["train"]])
  s_mean, s_std = x_s[rows].mean(0), x_s[rows].std(0)
  t_mean, t_std = x_t[rows].mean((0, 1)), x_t[rows].std((0, 1))
  return {split: {"static": np.stack([(t[1] - s_mean) / s_std for t in part]),
                  "timeseries": np.stack([(t[2] - t_mean) / t_std for t in part]),
                  "label": np.array([t[3] for t in part])}
          for split, part in splits.items()}


@pytest.mark.parametrize("task,all_splits,num_classes", [
    ("mortality", False, 6), ("mortality", True, 6),
    ("icd9_140_239", False, 2), ("icd9_460_519", True, 2)])
def test_mimic_matches_reference_pipeline(tmp_path, task, all_splits, num_classes):
  arrays = mimic_arrays()
  write_mimic(tmp_path / "manual", arrays)
  ds = DATASETS["mimic"](mimic_config(tmp_path, task=task,
                                      normalize_with_all_splits=all_splits))
  assert ds.num_classes == num_classes
  assert ds.modalities == {"static": (5,), "timeseries": (24, 12)}
  sizes = {s: len(ds.sources[s]) for s in ("train", "val", "test")}
  assert sizes == {"train": 160, "val": 20, "test": 20}
  for split, want in reference_expectation(arrays, task, all_splits).items():
    source = ds.sources[split]
    static, series = stack(source, "static"), stack(source, "timeseries")
    assert static.dtype == np.float32 and series.dtype == np.float32
    assert np.isfinite(static).all() and np.isfinite(series).all()
    np.testing.assert_allclose(static, want["static"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(series, want["timeseries"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal([source[i]["label"] for i in range(len(source))],
                                  want["label"])
  if not all_splits:  # z-scored with training statistics: train is standardised exactly
    train = stack(ds.sources["train"], "timeseries")
    np.testing.assert_allclose(train.mean((0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(train.std((0, 1)), 1, atol=1e-4)


def test_mimic_labels_and_cleaning():
  arrays = mimic_arrays()
  labels = mimic.task_labels(arrays, "mortality")
  assert list(labels[:4]) == [3, 0, 0, 5]
  np.testing.assert_array_equal(mimic.task_labels(arrays, "icd9_140_239"), arrays["y_icd9"][:, 1])
  np.testing.assert_array_equal(mimic.task_labels(arrays, "icd9_460_519"), arrays["y_icd9"][:, 7])
  features, _, splits = mimic.preprocess(arrays, "mortality", normalize_with_all_splits=True)
  s_mean = np.nan_to_num(arrays["adm_features_all"], posinf=0).mean(0)
  s_std = np.nan_to_num(arrays["adm_features_all"], posinf=0).std(0)
  assert features["static"][5, 2] == pytest.approx(-s_mean[2] / s_std[2], rel=1e-5)  # NaN -> 0
  assert features["static"][6, 0] == pytest.approx(-s_mean[0] / s_std[0], rel=1e-5)  # inf -> 0
  assert sorted(np.concatenate(list(splits.values()))) == list(range(N_PATIENTS))


def test_mimic_config_names_carry_task_and_normalisation():
  names = {mimic.builder_config(t, a).name for t in mimic.TASKS for a in (False, True)}
  assert len(names) == 6
  assert mimic.builder_config("icd9_460_519", True).name.startswith("icd9_460_519_allsplits")
  with pytest.raises(ValueError, match="task='icd9_1'"):
    mimic.builder_config("icd9_1", False)


def test_mimic_errors_name_file_and_key(tmp_path):
  config = mimic_config(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"manual/im\.pk.*'ep_tdata' \[N, 24, 12\]"):
    DATASETS["mimic"](config)
  arrays = mimic_arrays(n=20)
  arrays["ep_tdata"] = np.zeros((20, 24, 30))
  write_mimic(tmp_path / "manual", arrays)
  with pytest.raises(ValueError, match=r"im\.pk: 'ep_tdata' has shape \(20, 24, 30\); expected "
                                       r"\[N, 24, 12\]"):
    DATASETS["mimic"](config)
  arrays = mimic_arrays(n=20)
  del arrays["y_icd9"]
  write_mimic(tmp_path / "manual", arrays)
  with pytest.raises(ValueError, match=r"im\.pk has no key 'y_icd9'"):
    DATASETS["mimic"](config)
  arrays = mimic_arrays(n=20)
  arrays["adm_features_all"] = arrays["adm_features_all"][:19]
  write_mimic(tmp_path / "manual", arrays)
  with pytest.raises(ValueError, match="disagree on the number of patients"):
    DATASETS["mimic"](config)


def test_digits_as_avmnist_files_load_and_carry_the_label(tmp_path):
  digits_as_avmnist = import_experiment("digits_as_avmnist")
  digits_as_avmnist.write(str(tmp_path / "manual"), train=300, val=60, test=40)
  ds = DATASETS["avmnist"](avmnist_config(tmp_path, tmp_path / "manual", num_val=60))
  assert {s: len(ds.sources[s]) for s in ("train", "val", "test")} == {
      "train": 240, "val": 60, "test": 40}
  image, audio = stack(ds.sources["train"], "image"), stack(ds.sources["train"], "audio")
  labels = np.array([ds.sources["train"][i]["label"] for i in range(240)])
  assert image.dtype == np.uint8 and audio.shape == (240, 112, 112, 1) and image.std() > 10
  assert set(labels) == set(range(10))
  # Each modality alone carries the label: the nearest class mean (of the other examples)
  # classifies far above chance (10 %).
  for x in (image, audio):
    flat = x.reshape(len(x), -1).astype(np.float64)
    means = np.stack([flat[labels == c].mean(0) for c in range(10)])
    predicted = np.argmin(((flat[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == labels) > 0.5
