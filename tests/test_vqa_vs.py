"""VQA-VS and heads on frozen features: answer normalisation, the soft targets against a hand
computation, the loader on small files in the release's formats (features of arbitrary sizes,
some answers outside the vocabulary, OOD sets by question id), its errors, the FIBER head, the
npz route with identity encoders for every model kind, feature extraction with a tiny backbone,
and the documented commands end to end (reproduce.py's table with the OOD columns, main.py).

The losses (vqa_bce, soft_ce) and the VQA score of a batch are checked against NumPy in
tests/test_tasks.py.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import npz as npz_config
from configs import vqa_vs as vqa_vs_config
from i2m2_jax import models, train_lib
from i2m2_jax.datasets import features, load_dataset, vqa_vs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import example_backbone  # noqa: E402  pylint: disable=g-import-not-at-top
import extract_features  # noqa: E402  pylint: disable=g-import-not-at-top

SIZES = {"image": 5, "text": 3, "fused": 7}  # arbitrary feature sizes
OOD = {"QT": [401, 403, 404], "KW+KO": [400, 409]}


@pytest.mark.parametrize("answer, normalized", [
    ("Yes", "yes"), ("yes.", "yes"), ("Two", "2"), ("none", "0"), ("the cat", "cat"),
    ("A dog's bone", "dog's bone"), ("dont know", "don't know"), ("couldnt've", "couldn't've"),
    ("1,000", "1000"), ("3.5", "3.5"), ("t-shirt", "t shirt"), ("black - white", "black white"),
    ("What?!", "what"), ("(red)", "red"), ("left/right", "left right"),
    ("red & white", "red & white"),
])
def test_answers_are_normalised_as_the_vqa_evaluation_does(answer, normalized):
  assert vqa_vs.normalize_answer(answer) == normalized


def test_vocabulary_and_soft_scores_by_hand():
  annotations = [{"multiple_choice_answer": a} for a in
                 ["Yes", "two", "yes", "red", "2", "Two.", "blue", "yes"]]
  # Normalised: yes x3, 2 x3, red, blue; in order of first occurrence.
  assert vqa_vs.answer_vocabulary(annotations, 2) == ["yes", "2"]
  assert vqa_vs.answer_vocabulary(annotations, 1) == ["yes", "2", "red", "blue"]
  assert [vqa_vs.soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
  index = {"yes": 0, "2": 1, "red": 2}
  answers = [{"answer": a} for a in ["Two", "2", "two.", "yes", "Yes", "red", "Red", "red", "red",
                                     "green"]]
  # 2: 3 annotators -> 0.9, yes: 2 -> 0.6, red: 4 -> 1.0; green is not in the vocabulary.
  assert vqa_vs.answer_scores(answers, index) == {1: 0.9, 0: 0.6, 2: 1.0}
  # As written (write_vqa.py): '2' and 'yes' once each and 'red' 3 times match the vocabulary.
  assert vqa_vs.answer_scores(answers, index, normalize=False) == {1: 0.3, 0: 0.3, 2: 0.9}
  dense = vqa_vs.sparse_scores([{1: 0.9, 0: 0.6}, {}], 3).dense(np.array([1, 0]))
  np.testing.assert_allclose(dense, [[0, 0, 0], [0.6, 0.9, 0]])


# ---------------------------------------------------------------------------------------------
# Files in the release's formats

# question id -> (multiple-choice answer, the ten annotators' answers). 'weird' answers are outside
# every vocabulary; question 106 has no answer in it and is dropped from training.
HAND = {
    100: ("yes", ["yes"] * 6 + ["Yes."] * 2 + ["no", "weird"]),
    101: ("2", ["2", "two", "Two", "3", "3", "weird", "weird", "four", "yes", "no"]),
    106: ("weird", ["weird"] * 10),
}
POOL = ["yes", "no", "2", "3", "4", "red"]


def annotation(qid, mca, answers):
  return {"question_type": "what", "multiple_choice_answer": mca, "image_id": qid // 10,
          "answer_type": "other", "question_id": qid,
          "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                      for i, a in enumerate(answers)]}


def write_release(root, rng, n_train=28, npy_val=True):
  """VQA-VS files: questions/annotations (JSON lists) per split, features per split with the
  question ids in a shuffled order (train and test .npz, val a folder of .npy), the OOD sets'
  question files and test_annotations.json. Returns {split: [question ids]}."""
  ids = {"Training": [*HAND, *range(200, 200 + n_train - len(HAND))],
         "Val": list(range(300, 310)), "IID-Test": list(range(400, 412))}
  for split, qids in ids.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    annotations = []
    for q in qids:
      mca, answers = HAND.get(q, (None, None))
      if mca is None:
        mca = POOL[q % len(POOL)]
        answers = [mca] * 4 + [str(a) for a in rng.choice(POOL + ["weird"], 6)]
      annotations.append(annotation(q, mca, answers))
    with open(os.path.join(root, split, f"{split}-Ques.json"), "w") as f:
      json.dump([{"image_id": q // 10, "question": f"what is {q}?", "question_id": q}
                 for q in qids], f)
    with open(os.path.join(root, split, f"{split}-Ans.json"), "w") as f:
      json.dump(annotations, f)
    order = rng.permutation(len(qids))
    arrays = {"question_id": np.asarray(qids)[order],
              **{m: rng.normal(size=(len(qids), d)).astype(np.float32) for m, d in SIZES.items()}}
    write_features(os.path.join(root, "features", split), arrays, npy=npy_val and split == "Val")
  for split, qids in OOD.items():
    os.makedirs(os.path.join(root, "OOD-Test", split))
    with open(os.path.join(root, "OOD-Test", split, f"OOD-Test-{split}-Ques.json"), "w") as f:
      json.dump([{"image_id": q // 10, "question": "?", "question_id": q} for q in qids], f)
  with open(os.path.join(root, "test_annotations.json"), "w") as f:
    json.dump({"annotations": [], **{s.replace("+", "") + "_qid": q for s, q in OOD.items()}}, f)
  return ids


def write_features(path, arrays, npy=False):
  if npy:
    os.makedirs(path, exist_ok=True)
    for k, v in arrays.items():
      np.save(os.path.join(path, f"{k}.npy"), v)
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".npz", **arrays)


def vqa_config(root, *tokens, **data):
  config = vqa_vs_config.get_config(",".join(("smoke",) + tokens))
  config.data.manual_dir = str(root)
  config.data.min_answer_count = 2
  config.data.ood_splits = ",".join(OOD)
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture(name="release")
def _release(tmp_path):
  root = tmp_path / "vqa_vs"
  return root, write_release(str(root), np.random.default_rng(0))


@pytest.mark.parametrize("ids_file", ["", "test_annotations.json"])
def test_loader_targets_features_and_ood_subsets(release, ids_file):
  root, ids = release
  dataset = load_dataset(vqa_config(root, ood_ids_file=ids_file).data)
  assert dataset.task == "soft_label" and dataset.modalities == {m: (d,) for m, d in SIZES.items()}
  # The vocabulary by hand: normalised multiple-choice answers seen twice in train + val.
  mcas = [vqa_vs.normalize_answer(HAND.get(q, (POOL[q % len(POOL)],))[0])
          for split in ("Training", "Val") for q in ids[split]]
  vocabulary = [a for a in dict.fromkeys(mcas) if mcas.count(a) >= 2]
  assert dataset.num_classes == len(vocabulary) and "weird" not in vocabulary
  index = {a: i for i, a in enumerate(vocabulary)}
  train = dataset.sources["train"]
  assert len(train) == len(ids["Training"]) - 1  # 106 (no answer in the vocabulary) dropped
  yes, two, three = index["yes"], index["2"], index["3"]
  np.testing.assert_allclose(train[0]["scores"][[yes, index["no"]]], [1.0, 0.3])
  assert np.count_nonzero(train[0]["scores"]) == 2
  np.testing.assert_allclose(train[1]["scores"][[two, three, index["4"], yes]],
                             [0.9, 0.6, 0.3, 0.3])
  assert np.count_nonzero(train[1]["scores"]) == 5  # 2, 3, 4, yes, no
  # Features follow the question ids, whatever the order of the file's rows.
  with np.load(os.path.join(root, "features", "Training.npz")) as f:
    row = int(np.flatnonzero(f["question_id"] == 101)[0])
    for m in SIZES:
      np.testing.assert_array_equal(train[1][m], f[m][row])
  # Test keeps every question; the OOD sets are its examples with their ids.
  test = dataset.sources["test"]
  assert len(test) == len(ids["IID-Test"])
  assert list(dataset.extra_test_splits) == ["ood_QT", "ood_KW+KO"]
  assert dataset.extra_test_mean == "ood_mean"
  for split, qids in OOD.items():
    subset = dataset.extra_test_splits["ood_" + split]
    positions = [ids["IID-Test"].index(q) for q in qids]
    batch = subset.gather(np.arange(len(qids)), ["image", "scores"])
    np.testing.assert_array_equal(batch["image"],
                                  test.gather(np.array(positions), ["image"])["image"])
  assert dataset.provenance["fingerprint"].startswith("sha256:")


@pytest.mark.parametrize("break_it, message", [
    (lambda root: os.remove(os.path.join(root, "features", "Val", "fused.npy")),
     r"features/Val: no key 'fused'"),
    (lambda root: os.remove(os.path.join(root, "features", "IID-Test.npz")),
     r"features/IID-Test: no feature file for split 'IID-Test'"),
    (lambda root: np.savez(os.path.join(root, "features", "IID-Test.npz"),
                           question_id=np.arange(500, 512),
                           **{m: np.zeros((12, d), np.float32) for m, d in SIZES.items()}),
     r"IID-Test.npz: key 'question_id' does not match the split's questions: 12 question"),
    (lambda root: os.remove(os.path.join(root, "OOD-Test", "QT", "OOD-Test-QT-Ques.json")),
     r"OOD-Test-QT-Ques.json: missing for OOD split 'QT'"),
    (lambda root: json.dump([{"question_id": 100, "image_id": 10, "question": "?"}],
                            open(os.path.join(root, "Val", "Val-Ques.json"), "w")),
     r"Val-Ans.json: no annotation \(key 'question_id'\) for 1 question\(s\).*e.g. 100"),
])
def test_errors_name_the_file_and_the_key(release, break_it, message):
  root, _ = release
  break_it(str(root))
  with pytest.raises(ValueError, match=message):
    load_dataset(vqa_config(root).data)


def test_unknown_ood_split_names_the_ids_file_and_key(release):
  root, _ = release
  config = vqa_config(root, ood_ids_file="test_annotations.json", ood_splits="QT,XY")
  with pytest.raises(ValueError, match=r"test_annotations.json: no key 'XY_qid' for OOD split"):
    load_dataset(config.data)
  with open(os.path.join(root, "test_annotations.json"), "w") as f:
    json.dump({"QT_qid": [401, 999]}, f)
  with pytest.raises(ValueError, match=r"key 'QT_qid' \(OOD split 'QT'\) holds 1 question id"):
    load_dataset(vqa_config(root, ood_ids_file="test_annotations.json", ood_splits="QT").data)


# ---------------------------------------------------------------------------------------------
# Heads on features


def test_fiber_head_matches_numpy_and_keeps_parameter_paths():
  config = vqa_config("unused", "i2m2")
  config.model.head_hidden = (12,)
  shapes = {m: (d,) for m, d in SIZES.items()}
  model = models.build_model(config.model, shapes, 9)
  inputs = {m: jax.random.normal(jax.random.key(i), (4, d)) for i, (m, d) in
            enumerate(SIZES.items())}
  params = jax.jit(model.init)(jax.random.key(0), inputs)["params"]
  head = params["joint"]["head"]
  assert set(params["joint"]) == {"head"}  # identity encoders have no parameters
  assert set(head) == {"dense_0", "layer_norm_0", "dense_1"}
  assert head["dense_0"]["kernel"].shape == (SIZES["fused"], 12)
  assert params["uni_image"]["head"]["dense_0"]["kernel"].shape == (SIZES["image"], 12)
  kernels = np.concatenate([np.ravel(p["head"]["dense_1"]["kernel"]) for p in params.values()])
  assert abs(kernels.std() - 0.02) < 0.004 and not np.any(head["dense_0"]["bias"])
  np.testing.assert_array_equal(head["layer_norm_0"]["scale"], 1.0)
  # Linear -> LayerNorm (eps 1e-5) -> exact GELU -> Linear in float64.
  x = np.asarray(inputs["fused"], np.float64)
  h = x @ np.asarray(head["dense_0"]["kernel"], np.float64) + 0.1
  head["dense_0"]["bias"] = jnp.full((12,), 0.1)
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = h @ np.asarray(head["dense_1"]["kernel"], np.float64)
  got = jax.jit(model.apply)({"params": params}, inputs)["expert_logits"]["joint"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The default MLP head keeps its parameter paths, head/dense_i.
  config.model.head = "mlp"
  mlp = jax.eval_shape(models.build_model(config.model, shapes, 9).init, jax.random.key(0),
                       inputs)["params"]
  assert set(mlp["joint"]["head"]) == {"dense_0", "dense_1"}


def test_npz_features_train_every_model_kind(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "npz"
  os.makedirs(folder)
  for split, n in (("train", 48), ("val", 16), ("test", 16)):
    best = rng.integers(0, 4, n)
    scores = np.zeros((n, 4), np.float32)
    scores[np.arange(n), best] = 1.0
    arrays = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in SIZES.items()}
    arrays["fused"][np.arange(n), best] += 3.0  # the joint expert's features carry the answer
    np.savez(folder / f"{split}.npz", scores=scores, **arrays)
  for kind, modality in (("uni", "text"), ("intra", ""), ("inter", ""), ("i2m2", "")):
    config = npz_config.get_config("smoke")
    config.data.path, config.data.data_dir = str(folder), str(tmp_path / "tfds")
    config.model.kind, config.model.modality = kind, modality
    config.model.expert_inputs = "uni_image=image,uni_text=text,joint=fused"
    config.model.encoders = "image=identity,text=identity,fused=identity"
    config.num_train_steps, config.eval_every_steps = 4, 4
    config.eval_missing_modalities = config.eval_attribution = kind == "i2m2"
    results = train_lib.train_and_evaluate(config, str(tmp_path / kind))
    experts = {"uni": ["uni_text"], "intra": ["uni_image", "uni_text"], "inter": ["joint"],
               "i2m2": ["uni_image", "uni_text", "joint"]}[kind]
    assert sorted(results["test"]["experts"]) == sorted(experts)
  # Without the fused features I2M2 is the product of its uni-modal experts.
  assert results["missing_modality"]["fused"]["experts_used"] == ["uni_image", "uni_text"]


def test_extract_features_with_a_tiny_backbone_resumes_by_shard(tmp_path, monkeypatch):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  questions = [{"question_id": 50 + k, "image_id": k % 3, "question": f"what is thing {k}?"}
               for k in range(7)]
  with open(tmp_path / "q.json", "w") as f:
    json.dump(questions, f)
  records = extract_features.vqa_records(
      str(tmp_path / "q.json"), [str(tmp_path / "absent_{image_id}.jpg"),
                                 str(tmp_path / "{image_id}.png")])
  backbone = example_backbone.make_backbone(image_size=16)
  out = str(tmp_path / "features")
  # A run killed after every shard was written but before they were joined, then shard 1 lost.
  monkeypatch.setattr(extract_features, "merge_shards", lambda *a: None)
  assert extract_features.extract(records, backbone, out, batch_size=4, shard_size=3) == [0, 1, 2]
  os.remove(os.path.join(out, "shards", "00001.npz"))
  monkeypatch.undo()
  assert extract_features.extract(records, backbone, out, batch_size=4, shard_size=3) == [1]
  assert extract_features.extract(records, backbone, out, batch_size=4, shard_size=3) == []
  got = features.read(out, {"question_id": features.INTEGERS,
                            **{m: features.FEATURES for m in SIZES}})
  np.testing.assert_array_equal(got["question_id"], np.arange(50, 57))
  images = np.stack([extract_features.load_image(r.images[0], 16) for r in records])
  want = backbone.apply(backbone.params, images,
                        backbone.tokenize([q["question"] for q in questions]))
  for m in SIZES:
    np.testing.assert_allclose(got[m], want[m], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The documented commands


def start(args, cache):
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true"),
      "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")})
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(process):
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return out


def read_table(path):
  """(header line, {row label: row line}) of reproduce.py's table.md."""
  lines = path.read_text().splitlines()
  return lines[4], {line.split(" | ")[0].strip("| "): line for line in lines[6:]}


def test_reproduce_table_with_ood_columns_and_main(release, tmp_path):
  root, _ = release
  # One evaluation per run; the I2M2 run of main.py compiles what reproduce.py's last stage reads
  # back from the shared compilation cache.
  data = [f"--config.data.manual_dir={root}", "--config.data.min_answer_count=2",
          f"--config.data.ood_splits={','.join(OOD)}", "--config.eval_every_steps=4"]
  reproduce = start(["experiments/reproduce.py", "--config", "configs/vqa_vs.py:smoke",
                     "--workdir", str(tmp_path / "table"), "--seeds", "1", *data,
                     "--config.eval_missing_modalities=false", "--config.eval_attribution=false"],
                    tmp_path / "cache")
  main = start(["-m", "i2m2_jax.main", "--config", "configs/vqa_vs.py:smoke", "--workdir",
                str(tmp_path / "main"), *data,
                "--config.data.ood_ids_file=test_annotations.json"], tmp_path / "cache")
  finish(main)
  with open(tmp_path / "main" / "results.json") as f:
    results = json.load(f)
  assert results["model"] == "i2m2" and results["selection_metric"] == "vqa_score"
  assert [results[f"ood_{s}"]["count"] for s in OOD] == [len(q) for q in OOD.values()]
  assert results["ood_mean"]["vqa_score"] == pytest.approx(
      np.mean([results[f"ood_{s}"]["vqa_score"] for s in OOD]))
  assert results["ood_mean"]["splits"] == [f"ood_{s}" for s in OOD]
  assert results["missing_modality"]["image"]["experts_used"] == ["uni_text", "joint"]

  finish(reproduce)
  header, rows = read_table(tmp_path / "table" / "table.md")
  for column in ("test/vqa_score", "ood_QT/vqa_score", "ood_KW+KO/vqa_score",
                 "ood_mean/vqa_score", "test/experts/joint"):
    assert column in header
  assert set(rows) == set(vqa_vs_config.STAGES)
  assert "68.63 (IID test), 48.74 (OOD mean)" in rows["i2m2"]
  with open(tmp_path / "table" / "i2m2" / "seed_0" / "hparams.json") as f:
    init_from = json.load(f)["model.init_from"]
  assert sorted(e.split("=")[0] for e in init_from.split(",")) == ["joint", "uni_image",
                                                                   "uni_text"]
