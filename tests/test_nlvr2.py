"""NLVR2 on frozen features: the loader on small files in the documented format (arbitrary sizes,
.npz and .npy folders, the balanced/unbalanced test sets when present), its errors, what each
expert reads, feature extraction from the release's JSON-lines format with two images per
statement, and reproduce.py end to end."""
import json
import os

import jax
import numpy as np
import pytest

from configs import nlvr2 as nlvr2_config
from i2m2_jax import models
from i2m2_jax.datasets import features, load_dataset, nlvr2
from test_vqa_vs import (example_backbone, extract_features, finish, read_table, start,
                         write_features)

SIZES = {"text": 3, "image_0": 5, "image_1": 5, "fused_0": 4, "fused_1": 4}


def write_split(root, split, n, rng, npy=False):
  label = rng.integers(0, 2, n)
  arrays = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in SIZES.items()}
  arrays["fused_1"][:, 0] += 2.0 * label  # something to learn
  write_features(os.path.join(root, split), {**arrays, "label": label}, npy=npy)
  return arrays, label


@pytest.fixture(name="folder")
def _folder(tmp_path):
  rng = np.random.default_rng(0)
  root = str(tmp_path / "nlvr2")
  for split, n in (("train", 40), ("dev", 16), ("test1", 16), ("balanced_test1", 12)):
    write_split(root, split, n, rng, npy=split == "dev")
  return root


def nlvr2_data(root, *tokens):
  config = nlvr2_config.get_config(",".join(("smoke",) + tokens))
  config.data.manual_dir = root
  return config


def test_loader_splits_labels_and_extra_test_sets(folder):
  dataset = load_dataset(nlvr2_data(folder).data)
  assert dataset.task == "multiclass" and dataset.num_classes == 2
  assert dataset.modalities == {m: (d,) for m, d in SIZES.items()}
  assert {k: len(v) for k, v in dataset.sources.items()} == {"train": 40, "val": 16, "test": 16}
  assert list(dataset.extra_test_splits) == ["balanced_test1"]  # the others are absent
  with np.load(os.path.join(folder, "test1.npz")) as f:
    batch = dataset.sources["test"].gather(np.arange(16), ["label", "image_1"])
    np.testing.assert_array_equal(batch["label"], f["label"])
    np.testing.assert_array_equal(batch["image_1"], f["image_1"])
  assert dataset.sources["val"][3]["label"] in (0, 1)


def test_experts_read_their_inputs_concatenated():
  config = nlvr2_data("unused", "i2m2")
  model = models.build_model(config.model, {m: (d,) for m, d in SIZES.items()}, 2)
  inputs = {m: np.ones((2, d), np.float32) for m, d in SIZES.items()}
  params = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
  first = {e: params[e]["head"]["dense_0"]["kernel"].shape[0] for e in params}
  assert first == {"uni_image": 10, "uni_text": 3, "joint": 8}


@pytest.mark.parametrize("break_it, message", [
    (lambda root: os.remove(os.path.join(root, "test1.npz")),
     r"test1: no feature file for split 'test1'"),
    (lambda root: np.savez(os.path.join(root, "test1.npz"), label=np.array([0, 2]),
                           **{m: np.zeros((2, d), np.float32) for m, d in SIZES.items()}),
     r"test1.npz: key 'label' has values other than 0 and 1"),
    (lambda root: os.remove(os.path.join(root, "dev", "fused_1.npy")),
     r"dev: no key 'fused_1'"),
    (lambda root: np.savez(os.path.join(root, "test1.npz"), label=np.array([0, 1]),
                           **{m: np.zeros((2, d + (m == "text")), np.float32)
                              for m, d in SIZES.items()}),
     r"test1.npz: key 'text' has per-example shape \(4,\), but .*train.npz has \(3,\)"),
])
def test_errors_name_the_file_and_the_key(folder, break_it, message):
  break_it(folder)
  with pytest.raises(ValueError, match=message):
    load_dataset(nlvr2_data(folder).data)


def test_extract_two_images_per_statement(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  rows = [{"identifier": f"train-{k}-0-{k % 2}", "sentence": f"there are {k} dogs",
           "label": "True" if k % 2 else "False", "directory": str(k)} for k in range(3)]
  for row in rows:
    os.makedirs(tmp_path / row["directory"], exist_ok=True)
    for i in (0, 1):
      pair = row["identifier"].rsplit("-", 1)[0]
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
          tmp_path / row["directory"] / f"{pair}-img{i}.png")
  with open(tmp_path / "train.json", "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  records = extract_features.nlvr2_records(str(tmp_path / "train.json"),
                                           [str(tmp_path / "{directory}/{pair}-img{i}.png")])
  backbone = example_backbone.make_backbone(image_size=8)
  out = str(tmp_path / "features")
  assert extract_features.extract(records, backbone, out, batch_size=2, shard_size=2) == [0, 1]
  got = features.read(out, {**{m: features.FEATURES for m in nlvr2.MODALITIES},
                            "label": features.INTEGERS})
  np.testing.assert_array_equal(got["label"], [0, 1, 0])
  tokens = backbone.tokenize([r["sentence"] for r in rows])
  for i in (0, 1):
    images = np.stack([extract_features.load_image(r.images[i], 8) for r in records])
    want = backbone.apply(backbone.params, images, tokens)
    np.testing.assert_allclose(got[f"image_{i}"], want["image"], atol=1e-5)
    np.testing.assert_allclose(got[f"fused_{i}"], want["fused"], atol=1e-5)
    np.testing.assert_allclose(got["text"], want["text"], atol=1e-5)


def test_reproduce_table(folder, tmp_path):
  finish(start(["experiments/reproduce.py", "--config", "configs/nlvr2.py:smoke", "--workdir",
                str(tmp_path / "table"), "--seeds", "1", f"--config.data.manual_dir={folder}",
                "--config.eval_missing_modalities=false", "--config.eval_attribution=false",
                "--config.eval_every_steps=4"],
               tmp_path / "cache"))
  header, rows = read_table(tmp_path / "table" / "table.md")
  for column in ("test/accuracy", "balanced_test1/accuracy", "unbalanced_test1/accuracy",
                 "test/experts/uni_image", "test/experts/joint"):
    assert column in header
  assert set(rows) == set(nlvr2_config.vqa_vs.STAGES)
  assert "85.36 (test acc)" in rows["i2m2"]
  with open(tmp_path / "table" / "i2m2" / "seed_0" / "results.json") as f:
    results = json.load(f)
  assert results["balanced_test1"]["count"] == 12 and "unbalanced_test1" not in results
