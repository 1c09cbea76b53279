"""The TFDS builders (synthetic, digits, npz): built without TensorFlow into tmp_path."""
import dataclasses
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from i2m2_jax.datasets import SPLITS, load_dataset
from i2m2_jax.datasets import builder_utils, digits, synthetic
from i2m2_jax.input_pipeline import InMemorySource, gather_batch

SMALL_SYNTHETIC = dict(num_train=300, num_val=60, num_test=80)


def data_config(**fields):
  return ml_collections.ConfigDict(fields)


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def assert_matches_spec(dataset, split_sizes):
  """Every split has the declared size, shapes, dtypes and label range; data not all zero."""
  assert {s: len(dataset.sources[s]) for s in SPLITS} == split_sizes
  for split in SPLITS:
    source = dataset.sources[split]
    batch = gather_batch(source, range(len(source)), list(dataset.modalities))
    for m, shape in dataset.modalities.items():
      x = batch["inputs"][m]
      assert x.shape == (len(source),) + tuple(shape), (split, m)
      assert np.any(x != 0), (split, m)
    labels = batch["label"]
    assert labels.min() >= 0 and labels.max() < dataset.num_classes
    example = source[0]
    assert set(example) == set(dataset.modalities) | {"label"}
    assert isinstance(example["label"], (int, np.integer))


# ---------------------------------------------------------------------------------------------
# synthetic


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  config = data_config(name="synthetic", data_dir=str(data_dir), num_modalities=3, dims=(5, 8, 6),
                       intra_strength=(1.0,), **SMALL_SYNTHETIC)
  return load_dataset(config), config


def test_synthetic_builds_with_declared_shapes(synthetic_dataset):
  dataset, config = synthetic_dataset
  assert dataset.name == "synthetic"
  assert dataset.modalities == {"m0": (5,), "m1": (8,), "m2": (6,)}
  assert dataset.num_classes == synthetic.DEFAULTS["num_classes"]
  assert_matches_spec(dataset, {"train": 300, "val": 60, "test": 80})
  assert dataset.sources["train"][0]["m0"].dtype == np.float32


def test_synthetic_source_is_the_sampled_data_in_order(synthetic_dataset):
  dataset, config = synthetic_dataset
  spec = synthetic.spec_from_config(config)
  xs, labels, _ = synthetic.sample(spec, spec.num_test, stream=2)
  batch = gather_batch(dataset.sources["test"], range(spec.num_test), ["m0", "m1", "m2"])
  np.testing.assert_array_equal(batch["label"], labels)
  np.testing.assert_array_equal(batch["inputs"]["m1"], xs[1])


def test_synthetic_reload_reuses_build_and_knobs_change_the_config_name(synthetic_dataset):
  dataset, config = synthetic_dataset
  again = load_dataset(config)
  np.testing.assert_array_equal(again.sources["val"][3]["m2"], dataset.sources["val"][3]["m2"])
  spec = synthetic.spec_from_config(config)
  name = builder_utils.knobs_config(dataclasses.asdict(spec)).name
  for change in (dict(inter_strength=0.5), dict(data_seed=1), dict(code_scale=2.0),
                 dict(num_train=301)):
    other = synthetic.spec_from_config(data_config(**{**config.to_dict(), **change}))
    assert builder_utils.knobs_config(dataclasses.asdict(other)).name != name, change


def test_synthetic_per_modality_knobs():
  spec = synthetic.spec_from_config(data_config(num_modalities=2, dims=(4, 9),
                                                intra_strength=0.5))
  assert spec.dims == (4, 9) and spec.intra_strength == (0.5, 0.5)
  with pytest.raises(ValueError, match="dims"):
    synthetic.spec_from_config(data_config(num_modalities=3, dims=(4, 9)))
  with pytest.raises(ValueError, match="inter_strength"):
    synthetic.spec_from_config(data_config(inter_strength=1.5))
  with pytest.raises(ValueError, match="num_modalities"):
    synthetic.spec_from_config(data_config(num_modalities=1))


def _nearest_mean_log_scores(x_train, y_train, x_test, num_classes):
  """Gaussian class-mean scores -|x - mu_c|^2 / 2: a per-modality 'expert' in numpy."""
  means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(num_classes)])
  return -0.5 * ((x_test[:, None, :] - means[None]) ** 2).sum(-1)


def _sample_train_test(**knobs):
  spec = synthetic.spec_from_config(data_config(**knobs))
  return spec, synthetic.sample(spec, 4000, stream=0), synthetic.sample(spec, 4000, stream=2)


def test_synthetic_without_inter_the_uni_modal_product_beats_chance():
  spec, (xs, y, _), (xt, yt, _) = _sample_train_test(intra_strength=1.5, inter_strength=0.0)
  scores = [_nearest_mean_log_scores(a, y, b, spec.num_classes) for a, b in zip(xs, xt)]
  single = [np.mean(s.argmax(1) == yt) for s in scores]
  product = np.mean(np.sum(scores, axis=0).argmax(1) == yt)
  chance = 1 / spec.num_classes
  assert min(single) > chance + 0.25, single
  assert product > max(single) + 0.05, (product, single)


def test_synthetic_without_intra_single_modalities_are_at_chance_but_jointly_informative():
  inter = 0.7
  spec, (xs, y, codes), (xt, yt, ct) = _sample_train_test(intra_strength=0.0, inter_strength=inter)
  c = spec.num_classes
  chance = 1 / c
  for a, b in zip(xs, xt):
    acc = np.mean(_nearest_mean_log_scores(a, y, b, c).argmax(1) == yt)
    assert abs(acc - chance) < 0.04, acc
  # The selection ties the codes to y for a fraction inter (plus chance for the rest).
  relation = np.mean(ct.sum(axis=1) % c == yt)
  assert abs(relation - (inter + (1 - inter) / c)) < 0.03, relation
  # A joint decoder (each code from its own modality, then the sum mod C) recovers y.
  decoded = [_nearest_mean_log_scores(a, codes[:, i], b, c).argmax(1)
             for i, (a, b) in enumerate(zip(xs, xt))]
  code_accuracy = np.mean(np.stack(decoded, 1) == ct)
  joint_accuracy = np.mean(np.sum(decoded, axis=0) % c == yt)
  assert code_accuracy > 0.9, code_accuracy
  assert joint_accuracy > chance + 0.4, joint_accuracy


# ---------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return load_dataset(data_config(name="digits", data_dir=str(data_dir)))


def test_digits_builds_with_declared_shapes(digits_dataset):
  dataset = digits_dataset
  assert dataset.modalities == {"top": (4, 8, 1), "bottom": (4, 8, 1)}
  assert dataset.num_classes == 10
  assert_matches_spec(dataset, {"train": 1078, "val": 360, "test": 359})
  x = dataset.sources["train"][0]["top"]
  assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_digits_split_is_stratified_deterministic_and_disjoint(digits_dataset):
  images, labels = digits.load_digit_images()
  splits = digits.split_indices(labels, seed=0)
  again = digits.split_indices(labels, seed=0)
  for name in splits:
    np.testing.assert_array_equal(splits[name], again[name])
  everything = np.concatenate(list(splits.values()))
  assert len(everything) == len(labels) == len(np.unique(everything))
  overall = np.bincount(labels, minlength=10) / len(labels)
  for name, fraction in digits.SPLIT_FRACTIONS.items():
    share = np.bincount(labels[splits[name]], minlength=10) / len(splits[name])
    np.testing.assert_allclose(share, overall, atol=0.01)
    assert abs(len(splits[name]) / len(labels) - fraction) < 0.01
  # The built train split is those examples in that order, the halves of the original images.
  source = digits_dataset.sources["train"]
  first = splits["train"][0]
  np.testing.assert_array_equal(
      np.concatenate([source[0]["top"], source[0]["bottom"]], axis=0)[..., 0], images[first])
  assert source[0]["label"] == labels[first]


# ---------------------------------------------------------------------------------------------
# npz


def make_arrays(n, seed, num_classes=3, offset=0):
  """Vectors (with an example id in column 0), sequences and uint8 images."""
  rng = np.random.default_rng(seed)
  vec = rng.standard_normal((n, 4))
  vec[:, 0] = offset + np.arange(n)  # to track examples through the build
  return {
      "vec": vec.astype(np.float32),
      "seq": rng.standard_normal((n, 6, 3)).astype(np.float32),
      "img": rng.integers(1, 256, size=(n, 5, 5, 2), dtype=np.uint8),
      "label": np.arange(n) % num_classes,
  }


def write_folder(folder, **splits):
  os.makedirs(folder, exist_ok=True)
  for split, arrays in splits.items():
    np.savez(os.path.join(folder, f"{split}.npz"), **arrays)
  return str(folder)


def npz_config(folder, data_dir, **fields):
  return data_config(**{"name": "npz", "data_dir": str(data_dir), "path": str(folder),
                        "val_fraction": 0.1, "split_seed": 0, "num_classes": -1, **fields})


def test_npz_builds_vectors_sequences_and_uint8_images(tmp_path):
  folder = write_folder(tmp_path / "data", train=make_arrays(90, 0), val=make_arrays(30, 1),
                        test=make_arrays(40, 2))
  dataset = load_dataset(npz_config(folder, tmp_path / "tfds"))
  assert dataset.modalities == {"vec": (4,), "seq": (6, 3), "img": (5, 5, 2)}  # file order
  assert dataset.num_classes == 3
  assert_matches_spec(dataset, {"train": 90, "val": 30, "test": 40})
  example = dataset.sources["test"][7]
  assert example["img"].dtype == np.uint8 and example["seq"].dtype == np.float32
  expected = make_arrays(40, 2)
  batch = gather_batch(dataset.sources["test"], range(40), ["vec", "seq", "img"])
  for key in ("vec", "seq", "img"):  # kept in file order
    np.testing.assert_array_equal(batch["inputs"][key], expected[key])
  np.testing.assert_array_equal(batch["label"], expected["label"])


def test_npz_casts_other_dtypes_and_honours_num_classes(tmp_path):
  arrays = {"a": np.arange(40, dtype=np.float64).reshape(20, 2), "b": np.ones((20, 3), np.int16),
            "c": np.ones((20, 1), np.bool_), "label": np.arange(20, dtype=np.int32) % 2}
  folder = write_folder(tmp_path / "data", train=arrays, val=arrays, test=arrays)
  dataset = load_dataset(npz_config(folder, tmp_path / "tfds", num_classes=5))
  example = dataset.sources["train"][3]
  assert (example["a"].dtype, example["b"].dtype, example["c"].dtype) == (
      np.float32, np.float32, np.uint8)
  np.testing.assert_array_equal(example["a"], [6.0, 7.0])
  assert dataset.num_classes == 5


def test_npz_stratified_hold_out_without_val_file(tmp_path):
  train = make_arrays(200, 0, num_classes=4)
  train["label"] = np.repeat([0, 1, 2, 3], [100, 50, 30, 20])  # unbalanced, grouped
  folder = write_folder(tmp_path / "data", train=train, test=make_arrays(20, 1, num_classes=4))
  dataset = load_dataset(npz_config(folder, tmp_path / "tfds", val_fraction=0.2))
  assert len(dataset.sources["val"]) == 40 and len(dataset.sources["train"]) == 160

  def ids_and_labels(split):
    batch = gather_batch(dataset.sources[split], range(len(dataset.sources[split])), ["vec"])
    return batch["inputs"]["vec"][:, 0].astype(int), batch["label"]

  train_ids, train_labels = ids_and_labels("train")
  val_ids, val_labels = ids_and_labels("val")
  assert sorted(np.concatenate([train_ids, val_ids])) == list(range(200))  # a partition
  np.testing.assert_array_equal(np.bincount(val_labels), [20, 10, 6, 4])   # proportions kept
  np.testing.assert_array_equal(train["label"][val_ids], val_labels)
  # Deterministic: the same hold-out from a fresh build; another seed, another hold-out.
  again = load_dataset(npz_config(folder, tmp_path / "tfds2", val_fraction=0.2))
  again_ids = gather_batch(again.sources["val"], range(40), ["vec"])["inputs"]["vec"][:, 0]
  np.testing.assert_array_equal(again_ids.astype(int), val_ids)
  other = load_dataset(npz_config(folder, tmp_path / "tfds", val_fraction=0.2, split_seed=1))
  other_ids = gather_batch(other.sources["val"], range(40), ["vec"])["inputs"]["vec"][:, 0]
  assert set(other_ids.astype(int)) != set(val_ids)


def test_npz_rebuilds_after_the_files_change(tmp_path):
  folder = write_folder(tmp_path / "data", train=make_arrays(30, 0), test=make_arrays(10, 1))
  config = npz_config(folder, tmp_path / "tfds")
  before = load_dataset(config).sources["test"][0]["vec"]
  changed = make_arrays(10, 1)
  changed["vec"][0] = 42.0
  write_folder(folder, test=changed)
  os.utime(os.path.join(folder, "test.npz"), ns=(1, 1))  # a surely different mtime
  after = load_dataset(config).sources["test"][0]["vec"]
  assert not np.array_equal(before, after)
  np.testing.assert_array_equal(after, changed["vec"][0])


def _bad(case, arrays):
  """Mutates the {split: arrays} of a valid folder into one bad-input case."""
  train, val, test = arrays["train"], arrays["val"], arrays["test"]
  if case == "no_label":
    del test["label"]
  elif case == "float_labels":
    train["label"] = train["label"] + 0.5
  elif case == "string_labels":
    train["label"] = train["label"].astype(str)
  elif case == "label_out_of_range":
    test["label"] = test["label"].copy()
    test["label"][3] = 7
  elif case == "negative_label":
    val["label"] = val["label"] - 1
  elif case == "label_not_1d":
    train["label"] = train["label"][:, None, None]
  elif case == "first_axis_mismatch":
    train["seq"] = train["seq"][:-1]
  elif case == "missing_modality":
    del test["vec"]
  elif case == "extra_modality":
    test["extra"] = test["vec"]
  elif case == "shape_mismatch":
    val["vec"] = val["vec"][:, :3]
  elif case == "dtype_mismatch":
    test["img"] = test["img"].astype(np.float32)
  elif case == "nan":
    train["vec"] = train["vec"].copy()
    train["vec"][5, 2] = np.nan
  elif case == "inf":
    val["seq"] = val["seq"].copy()
    val["seq"][1, 0, 0] = np.inf
  elif case == "scalar_modality":
    train["vec"] = train["vec"][:, 0]
  elif case == "reserved_key":
    for split in (train, val, test):
      split["mask"] = split["vec"]
  elif case == "no_modality":
    for split in (train, val, test):
      for key in ("vec", "seq", "img"):
        del split[key]
  elif case == "object_dtype":
    for split in (train, val, test):
      split["vec"] = split["vec"].astype(np.complex64)
  return arrays


# case -> substrings the ValueError message must contain (file, key, what was expected)
BAD_CASES = {
    "no_label": ["test.npz", "'label'"],
    "float_labels": ["train.npz", "'label'", "non-integer"],
    "string_labels": ["train.npz", "'label'", "integer"],
    "label_out_of_range": ["test.npz", "'label'", "0..2"],
    "negative_label": ["val.npz", "'label'", "negative"],
    "label_not_1d": ["train.npz", "'label'", "[N]", "[N, L]"],
    "first_axis_mismatch": ["train.npz", "'seq'", "first ax"],
    "missing_modality": ["test.npz", "'vec'", "missing"],
    "extra_modality": ["test.npz", "extra"],
    "shape_mismatch": ["val.npz", "'vec'", "(3,)", "(4,)"],
    "dtype_mismatch": ["test.npz", "'img'", "uint8", "float32"],
    "nan": ["train.npz", "'vec'", "NaN", "example 5"],
    "inf": ["val.npz", "'seq'", "NaN/Inf"],
    "scalar_modality": ["train.npz", "'vec'", "[N, ...]"],
    "reserved_key": ["train.npz", "'mask'", "reserved"],
    "no_modality": ["train.npz", "modality"],
    "object_dtype": ["train.npz", "'vec'", "complex64"],
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_npz_bad_input_raises_naming_file_and_key(tmp_path, case):
  arrays = {"train": make_arrays(30, 0), "val": make_arrays(9, 1), "test": make_arrays(12, 2)}
  folder = write_folder(tmp_path / "data", **_bad(case, arrays))
  with pytest.raises(ValueError) as error:
    load_dataset(npz_config(folder, tmp_path / "tfds"))
  for text in BAD_CASES[case]:
    assert text in str(error.value), (text, str(error.value))
  assert not (tmp_path / "tfds" / "i2m2_npz").exists() or not any(
      (tmp_path / "tfds" / "i2m2_npz").rglob("*.array_record*"))  # nothing was built


def test_npz_bad_folder_or_missing_files(tmp_path):
  with pytest.raises(ValueError, match="config.data.path"):
    load_dataset(npz_config("", tmp_path / "tfds"))
  with pytest.raises(ValueError, match="not a folder"):
    load_dataset(npz_config(tmp_path / "nowhere", tmp_path / "tfds"))
  folder = write_folder(tmp_path / "a", test=make_arrays(10, 0))
  with pytest.raises(ValueError, match="train.npz"):
    load_dataset(npz_config(folder, tmp_path / "tfds"))
  folder = write_folder(tmp_path / "b", train=make_arrays(10, 0))
  with pytest.raises(ValueError, match="test.npz"):
    load_dataset(npz_config(folder, tmp_path / "tfds"))
  folder = write_folder(tmp_path / "c", train=make_arrays(10, 0), test=make_arrays(10, 0))
  with pytest.raises(ValueError, match="train.npz.*num_classes"):
    load_dataset(npz_config(folder, tmp_path / "tfds", num_classes=2))
  with pytest.raises(ValueError, match="val.npz.*val_fraction"):
    load_dataset(npz_config(folder, tmp_path / "tfds", val_fraction=0.0))


# ---------------------------------------------------------------------------------------------
# builder_utils


def test_in_memory_splits_read_as_the_tfds_sources(tmp_path):
  config = builder_utils.knobs_config(
      {**synthetic.DEFAULTS, "dims": [3, 3], "intra_strength": [1.0, 1.0], **SMALL_SYNTHETIC})
  builder = builder_utils.prepare(synthetic.I2m2Synthetic, config, str(tmp_path))
  on_disk = builder_utils.split_sources(builder)
  in_memory = {k: InMemorySource.from_source(v) for k, v in on_disk.items()}
  assert not isinstance(on_disk["train"], InMemorySource)
  a = gather_batch(on_disk["val"], [5, 2, 7], ["m0", "m1"])
  b = gather_batch(in_memory["val"], [5, 2, 7], ["m0", "m1"])
  for key in ("m0", "m1"):
    np.testing.assert_array_equal(a["inputs"][key], b["inputs"][key])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert a["label"].dtype == np.int32


def test_stratified_partition():
  labels = np.repeat([0, 1, 2], [50, 30, 20])
  parts = builder_utils.stratified_partition(labels, [0.6, 0.2, 0.2], seed=3)
  assert [len(p) for p in parts] == [60, 20, 20]
  for p in parts:
    assert list(p) == sorted(p)
  np.testing.assert_array_equal(np.bincount(labels[parts[1]]), [10, 6, 4])
  assert len(np.unique(np.concatenate(parts))) == 100


def test_one_in_memory_setting_from_config(tmp_path):
  """config.data.in_memory_max_gb decides, in load_dataset, which splits are held in memory:
  train and val when small enough; the test split (read once) never."""
  on_disk = load_dataset(data_config(name="synthetic", data_dir=str(tmp_path),
                                     in_memory_max_gb=0.0, **SMALL_SYNTHETIC))
  assert not any(isinstance(s, InMemorySource) for s in on_disk.sources.values())
  assert_matches_spec(on_disk, {"train": 300, "val": 60, "test": 80})
  held = load_dataset(data_config(name="synthetic", data_dir=str(tmp_path),
                                  in_memory_max_gb=1.0, **SMALL_SYNTHETIC))
  assert [isinstance(held.sources[s], InMemorySource) for s in SPLITS] == [True, True, False]
  assert_matches_spec(held, {"train": 300, "val": 60, "test": 80})
  assert held.provenance["fingerprint"] == on_disk.provenance["fingerprint"]
  assert held.provenance["fingerprint"].startswith("knobs:")


# ---------------------------------------------------------------------------------------------
# npz folders of the kinds users bring


def _user_arrays(case, n, seed):
  """One split of a user's folder for each case of test_npz_user_cases."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 4
  arrays = {"vec": rng.normal(size=(n, 3)).astype(np.float32), "label": labels}
  if case == "many_small_classes":
    arrays["label"] = np.arange(n) % (n // 3)      # 3 examples per class
  elif case == "object_labels":
    arrays["label"] = np.array([f"class {i}" for i in labels], dtype=object)
  elif case == "label_gaps":
    arrays["label"] = np.array([3, 7, 9])[labels % 3]
  elif case == "rank5_modality":
    arrays["video"] = rng.normal(size=(n, 2, 4, 4, 1)).astype(np.float32)
  elif case == "single_modality":
    pass
  elif case == "float_labels_holding_integers":
    arrays["label"] = labels.astype(np.float64)
  elif case == "feature_dtypes":
    arrays.update(flags=rng.uniform(size=(n, 2)) < 0.5, pixels=rng.integers(0, 256, (n, 2, 2, 1),
                                                                            dtype=np.uint8),
                  counts=rng.integers(0, 9, (n, 4)).astype(np.int64),
                  half=rng.normal(size=(n, 5)).astype(np.float16))
  elif case == "odd_key_names_and_order":
    arrays = {"label": labels, "Z last-first.v2": arrays["vec"],
              "a b": rng.normal(size=(n, 2)).astype(np.float32)}
  return arrays


def _write_user_folder(folder, case, compressed=False):
  os.makedirs(folder, exist_ok=True)
  save = np.savez_compressed if compressed else np.savez
  sizes = {"train": 600, "test": 60} if case == "many_small_classes" else {"train": 40, "test": 12}
  for i, (split, n) in enumerate(sizes.items()):
    with open(os.path.join(folder, f"{split}.npz"), "wb") as f:
      save(f, **_user_arrays(case, n, i))
  return str(folder)


def _check_many_small_classes(dataset, tmp_path, folder):
  assert len(dataset.sources["val"]) == 60 and len(dataset.sources["train"]) == 540
  other = load_dataset(npz_config(folder, tmp_path / "tfds", val_fraction=0.2))
  assert len(other.sources["val"]) == 120  # the requested fraction, not a third


def _check_label_gaps(dataset, *_):
  assert dataset.num_classes == 10


def _check_rank5(dataset, *_):
  from configs import default  # pylint: disable=g-import-not-at-top
  from i2m2_jax import models  # pylint: disable=g-import-not-at-top
  config = default.get_config().model
  with pytest.raises(ValueError, match=r"no default encoder for rank 4.*"
                                       r"--config.model.encoders=video=NAME"):
    models.build_model(config, dataset.modalities, 4)
  config.encoders = "video=cnn"
  with pytest.raises(ValueError, match=r"video='cnn' reads examples of rank \(3,\).*"
                                       r"\(2, 4, 4, 1\).*mlp"):
    models.build_model(config, dataset.modalities, 4)
  config.encoders = "video=mlp"
  models.build_model(config, dataset.modalities, 4)  # works: flattens


def _check_dtypes(dataset, *_):
  example = dataset.sources["train"][0]
  assert {k: example[k].dtype for k in ("flags", "pixels", "counts", "half")} == {
      "flags": np.uint8, "pixels": np.uint8, "counts": np.float32, "half": np.float32}


def _check_single_modality(dataset, *_):
  assert list(dataset.modalities) == ["vec"]


def _check_float_labels(dataset, *_):
  assert dataset.num_classes == 4 and isinstance(dataset.sources["train"][0]["label"], int)


def _check_compressed(dataset, *_):
  assert len(dataset.sources["train"]) + len(dataset.sources["val"]) == 40
  assert np.any(gather_batch(dataset.sources["test"], range(12), ["vec"])["inputs"]["vec"] != 0)


def _check_key_order(dataset, *_):
  assert list(dataset.modalities) == ["Z last-first.v2", "a b"]  # the file's order


# case -> (compressed, substrings of the error it must raise, or a check of the data set)
USER_CASES = {
    "many_small_classes": (False, _check_many_small_classes),
    "object_labels": (False, ["train.npz", "'label'", "Python objects", "np.unique"]),
    "label_gaps": (False, _check_label_gaps),
    "rank5_modality": (False, _check_rank5),
    "single_modality": (False, _check_single_modality),
    "float_labels_holding_integers": (False, _check_float_labels),
    "feature_dtypes": (False, _check_dtypes),
    "compressed": (True, _check_compressed),
    "odd_key_names_and_order": (False, _check_key_order),
}


@pytest.mark.parametrize("case", sorted(USER_CASES))
def test_npz_user_cases(tmp_path, case, caplog):
  compressed, expected = USER_CASES[case]
  folder = _write_user_folder(tmp_path / "data", case, compressed)
  if isinstance(expected, list):
    with pytest.raises(ValueError) as error:
      load_dataset(npz_config(folder, tmp_path / "tfds"))
    for text in expected:
      assert text in str(error.value), (text, str(error.value))
    return
  with caplog.at_level("INFO"):
    dataset = load_dataset(npz_config(folder, tmp_path / "tfds"))
  expected(dataset, tmp_path, folder)
  if case == "label_gaps":
    assert "use 3 of the 10 classes" in caplog.text
  if case == "many_small_classes":
    assert "split without stratification" in caplog.text
