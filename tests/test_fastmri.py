"""fastMRI knee end to end: the builder on small files in the real formats (HDF5 volumes with
k-space [slices, 640, W], the fastMRI+ CSVs), the PreActResNet encoder and the channel-stack
joint expert against hand counts and a float64 NumPy reference, the operating-point metrics
against scikit-learn, and `experiments/reproduce.py --config configs/fastmri.py:smoke`.

The folder written here: 8 volumes listed in knee_file_list.csv (split 5 / 2 / 1 by
scikit-learn; one train volume is 420 columns wide and must be dropped, another is listed but not
on disk), plus one volume on disk that is not listed. The normal volumes have 3 slices of
640 x W k-space (W = 368..372, one odd) with labels: slice 0 all four, slice 1 none, slice 2 one
pattern per volume (whitespace and case variants, an unknown string, a study-level row).
"""
import csv
import json
import os
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn.model_selection import train_test_split

from configs import fastmri as fastmri_config
from experiments import recipes
from i2m2_jax import metrics, models, paper_models, tasks
from i2m2_jax.datasets import fastmri
from i2m2_jax.datasets import load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("abnormal", "mtear", "acl", "cartilage")
LISTED = [f"file10000{i:02d}" for i in range(1, 9)]
UNLISTED = "file1000100"
ALL_FOUR = ("Meniscus Tear", "Ligament - ACL High Grade Sprain",
            "Cartilage - Full Thickness loss/defect")
# slice 2's strings -> its expected labels (abnormal, mtear, acl, cartilage)
SLICE_2 = [
    (("Joint Effusion ",), (1, 0, 0, 0)),
    (("  displaced   MENISCAL tissue",), (1, 1, 0, 0)),
    (("Ligament - ACL Low Grade sprain", "Bone- Subchondral edema"), (1, 0, 1, 0)),
    (("cartilage - partial thickness loss/defect",), (1, 0, 0, 1)),
    (("Made-up finding",), (0, 0, 0, 0)),
]


def reference_split():
  """Volume ids per split, by scikit-learn as the official metadata script (on sorted ids)."""
  train, rest = train_test_split(sorted(LISTED), test_size=0.3, random_state=0)
  test, val = train_test_split(rest, test_size=0.5, random_state=0)
  return {"train": train, "val": val, "test": test}


def write_volume(path, kspace):
  """A single-coil knee volume as fastMRI ships it (kspace, reconstructions, header, attrs)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, "w") as f:
    f.create_dataset("kspace", data=kspace.astype(np.complex64))
    for name in ("reconstruction_esc", "reconstruction_rss"):
      f.create_dataset(name, data=np.ones((len(kspace), 320, 320), np.float32))
    f.create_dataset("ismrmrd_header", data=np.bytes_(b"<ismrmrdHeader/>"))
    f.attrs.update({"acquisition": "CORPD_FBK", "max": 1.0, "norm": 1.0, "patient_id": "x"})


def write_csvs(folder, rows, listed=LISTED, header=("file", "slice", "study_level", "x", "y",
                                                     "width", "height", "label")):
  """knee.csv (fastMRI+ 1.0's column order) and knee_file_list.csv (no header)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "knee.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for volume, slice_index, study_level, label in rows:
      writer.writerow([volume, slice_index, study_level, 10, 20, 30, 40, label][:len(header) - 1]
                      + [label])
  with open(os.path.join(folder, "knee_file_list.csv"), "w") as f:
    f.write("".join(f"{v}\n" for v in listed))


@pytest.fixture(scope="module")
def knee(tmp_path_factory):
  """(folder, {volume: k-space}, {volume: labels [3, 4]}, wide id, absent id)."""
  root = tmp_path_factory.mktemp("knee")
  rng = np.random.default_rng(0)
  split = reference_split()
  wide, absent = split["train"][0], split["train"][1]
  kspaces, expected, rows = {}, {}, []
  normal = [v for v in LISTED if v not in (wide, absent)]
  for i, volume in enumerate(normal + [wide, UNLISTED]):
    width = 420 if volume == wide else (368, 369, 370, 372)[i % 4]
    slices = 3 if volume in normal else 1
    kspace = (rng.normal(size=(slices, 640, width)) + 1j * rng.normal(size=(slices, 640, width)))
    folder = "singlecoil_val" if i % 2 else "singlecoil_train"
    write_volume(os.path.join(root, folder, f"{volume}.h5"), kspace)
    kspaces[volume] = kspace.astype(np.complex64)
    strings, labels = SLICE_2[i % len(SLICE_2)]
    rows += [(volume, 0, "No", s) for s in ALL_FOUR] + [(volume, 2, "No", s) for s in strings]
    rows += [(volume, 0, "Yes", "artifact"), (volume, 1, "Yes", "Meniscus Tear")]  # study level
    expected[volume] = np.array([(1, 1, 1, 1), (0, 0, 0, 0), labels], np.int32)
  write_csvs(os.path.join(root, "Annotations"), rows)
  return str(root), kspaces, expected, wide, absent


def data_config(manual_dir, data_dir, image_size=320):
  config = fastmri_config.get_config().data
  config.manual_dir, config.data_dir, config.image_size = manual_dir, str(data_dir), image_size
  return config


def read_split(source):
  return [source[i] for i in range(len(source))]


def reference_images(kspace, image_size):
  """Float64 NumPy: zero-fill to 400 columns (n // 2 on the left), fftshift(ifft2(ifftshift,
  ortho)), centre 320 x 320, block means; magnitude and phase."""
  missing = 400 - kspace.shape[-1]
  filled = np.zeros(kspace.shape[:-1] + (400,), np.complex128)
  filled[..., missing // 2:missing // 2 + kspace.shape[-1]] = kspace
  image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(filled, axes=(1, 2)), axes=(1, 2),
                                       norm="ortho"), axes=(1, 2))[:, 160:480, 40:360]
  f = 320 // image_size
  image = image.reshape(len(image), image_size, f, image_size, f).mean(axis=(2, 4))
  return np.abs(image), np.angle(image)


# ---------------------------------------------------------------------------------------------
# The builder


@pytest.mark.parametrize("image_size", [320, 32])
def test_builder_splits_by_volume_labels_slices_and_matches_numpy_fft(knee, tmp_path, image_size):
  root, kspaces, expected, wide, absent = knee
  dataset = load_dataset(data_config(root, tmp_path / "tfds", image_size))
  assert dataset.task == "multilabel" and dataset.label_names == LABELS
  assert dataset.modalities == {"magnitude": (image_size,) * 2 + (1,),
                                "phase": (image_size,) * 2 + (1,)}
  assert dataset.provenance["fingerprint"].startswith("sha256:")
  want_split = reference_split()
  for split, source in dataset.sources.items():
    examples = read_split(source)
    volumes = [ex["volume"].decode() for ex in examples]
    # Every slice of exactly the split's volumes (the wide and the absent one dropped), in order.
    want = sorted(v for v in want_split[split] if v not in (wide, absent))
    assert sorted(set(volumes)) == want and len(volumes) == 3 * len(want)
    for ex in examples:
      volume, s = ex["volume"].decode(), int(ex["slice"])
      np.testing.assert_array_equal(ex["label"], expected[volume][s], err_msg=f"{volume} {s}")
      magnitude, phase = reference_images(kspaces[volume][s:s + 1], image_size)
      np.testing.assert_allclose(ex["magnitude"][..., 0], magnitude[0], rtol=1e-5, atol=1e-7)
      # Phase where the magnitude is not tiny (else its angle is noise at float32).
      big = magnitude[0] > 1e-3 * magnitude.max()
      np.testing.assert_allclose(ex["phase"][..., 0][big], phase[0][big], atol=2e-5)
  assert UNLISTED not in {ex["volume"].decode() for s in dataset.sources.values()
                          for ex in read_split(s)}


def test_centred_orthonormal_ifft_convention():
  """A lone k-space sample at the centre (row 320, the centre column of W) is a constant image
  of amplitude |v| / sqrt(640 * 400) and phase angle(v): fftshift/ifft2/ifftshift, orthonormal,
  centred zero-fill."""
  kspace = np.zeros((1, 640, 368), np.complex64)
  kspace[0, 320, 184] = 3.0 - 4.0j
  magnitude, phase = fastmri.slice_images(kspace, 320)
  np.testing.assert_allclose(magnitude, 5.0 / np.sqrt(640 * 400), rtol=1e-6)
  np.testing.assert_allclose(phase, np.angle(3.0 - 4.0j), atol=1e-6)


def link_volumes(root, target):
  """A new manual folder whose volume folders link to the fixture's files."""
  for folder in fastmri.VOLUME_FOLDERS:
    os.makedirs(os.path.join(target, folder))
    for name in os.listdir(os.path.join(root, folder)):
      os.symlink(os.path.join(root, folder, name), os.path.join(target, folder, name))


def test_build_errors_name_the_file_and_what_was_expected(knee, tmp_path):
  root, *_ = knee
  annotations = os.path.join(root, "Annotations")

  def load(manual_dir):
    return load_dataset(data_config(str(manual_dir), tmp_path / "tfds"))

  # A missing folder.
  missing = tmp_path / "missing"
  link_volumes(root, missing)
  os.rename(missing / "singlecoil_val", missing / "elsewhere")
  for name in os.listdir(annotations):
    os.symlink(os.path.join(annotations, name), missing / name)
  with pytest.raises(FileNotFoundError, match=r"singlecoil_val is missing; expected the single"):
    load(missing)
  # The CSVs nowhere.
  no_csv = tmp_path / "no_csv"
  link_volumes(root, no_csv)
  with pytest.raises(FileNotFoundError, match=r"expected knee.csv and knee_file_list.csv in"):
    load(no_csv)
  # A CSV without its columns.
  bad_csv = tmp_path / "bad_csv"
  link_volumes(root, bad_csv)
  write_csvs(str(bad_csv), [(LISTED[0], 0, "No", "Meniscus Tear")],
             header=("file", "slice", "x", "y", "width", "height", "finding"))
  with pytest.raises(ValueError, match=r"bad_csv/knee.csv has columns .*missing \['study_level', "
                                       r"'label'\]"):
    load(bad_csv)
  # A volume without k-space.
  no_kspace = tmp_path / "no_kspace"
  link_volumes(root, no_kspace)
  for name in os.listdir(annotations):
    os.symlink(os.path.join(annotations, name), no_kspace / name)
  path = no_kspace / "singlecoil_train" / f"{reference_split()['train'][1]}.h5"  # the absent one
  with h5py.File(path, "w") as f:
    f.create_dataset("reconstruction_rss", data=np.ones((1, 320, 320), np.float32))
  with pytest.raises(ValueError, match=r"no_kspace/singlecoil_train/file\d+\.h5 has no 'kspace' "
                                       r"dataset .*expected complex k-space \[slices, 640, W\]"):
    load(no_kspace)


# ---------------------------------------------------------------------------------------------
# The model


def resnet_parameters(widths, blocks, in_channels, groups_norm=True):
  """Hand count of the PreActResNet's parameters: 3x3 stem, per block two GroupNorms (scale
  and bias) and two 3x3 convolutions, plus a 1x1 shortcut where the width or stride changes."""
  count, previous = 9 * in_channels * widths[0], widths[0]
  for stage, (width, n) in enumerate(zip(widths, blocks)):
    for block in range(n):
      count += 2 * previous + 9 * previous * width + 2 * width + 9 * width * width
      if previous != width or (stage > 0 and block == 0):
        count += previous * width
      previous = width
  return count


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_variables(module, seed, *args):
  """Variables of `module` with its shapes and random normal values (no compiled init: drawing
  normals compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.3, shapes)


def test_parameter_counts_match_a_hand_count():
  config = fastmri_config.get_config("i2m2").model
  shapes = {"magnitude": (320, 320, 1), "phase": (320, 320, 1)}
  model = models.build_model(config, shapes, (4, 2))
  params = jax.eval_shape(model.init, jax.random.key(0),
                          {m: jnp.zeros((1,) + s) for m, s in shapes.items()})["params"]
  widths, blocks = (64, 128, 256, 512), (2, 2, 2, 2)
  head = 512 * 10 * 10 * 8 + 8  # one linear layer, 2 logits for each of 4 labels
  assert n_params(params["uni_magnitude"]["encoder"]) == resnet_parameters(widths, blocks, 1)
  assert n_params(params["uni_magnitude"]) == resnet_parameters(widths, blocks, 1) + head
  assert n_params(params["joint"]) == resnet_parameters(widths, blocks, 2) + head
  assert params["joint"]["encoder"]["stem"]["kernel"].shape == (3, 3, 2, 64)
  assert n_params(params["uni_magnitude"]["encoder"]) == 11_164_864  # the config's docstring
  out = jax.eval_shape(model.apply, {"params": params},
                       {m: jnp.zeros((2,) + s) for m, s in shapes.items()})
  assert out["log_probs"].shape == (2, 4, 2)


def conv_ref(x, kernel, stride, padding):
  """Float64 NHWC convolution with symmetric zero padding (PyTorch's Conv2d)."""
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  k = kernel.shape[0]
  h, w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      patch = x[:, i:i + stride * h:stride, j:j + stride * w:stride]
      out += np.einsum("bhwc,cd->bhwd", patch, kernel[i, j])
  return out


def group_norm_ref(x, scale, bias, groups, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_preact_block_and_pooling_match_float64_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 9, 4))
  block = paper_models.PreActBlock(8, stride=2, groups=2)
  params = random_variables(block, 1, jnp.asarray(x, jnp.float32))["params"]
  got = np.asarray(jax.jit(block.apply)({"params": params}, jnp.asarray(x, jnp.float32)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  a = np.maximum(group_norm_ref(x, p["norm_1"]["scale"], p["norm_1"]["bias"], 2), 0)
  out = conv_ref(a, p["conv_1"]["kernel"], 2, 1)
  out = np.maximum(group_norm_ref(out, p["norm_2"]["scale"], p["norm_2"]["bias"], 2), 0)
  want = conv_ref(out, p["conv_2"]["kernel"], 1, 1) + conv_ref(a, p["shortcut"]["kernel"], 2, 0)
  assert got.shape == (2, 5, 5, 8)  # PyTorch: floor((9 + 2 - 3) / 2) + 1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Adaptive average pooling, 7 -> 3 (overlapping bins [0, 3), [2, 5), [4, 7)) and 5 -> 5.
  y = rng.normal(size=(2, 7, 5, 3))
  bins = [(0, 3), (2, 5), (4, 7)]
  want = np.stack([np.stack([y[:, r0:r1, c].mean(1) for c in range(5)], 1) for r0, r1 in bins], 1)
  np.testing.assert_allclose(paper_models.adaptive_avg_pool(jnp.asarray(y, jnp.float32), (3, 5)),
                             want, rtol=1e-5, atol=1e-6)
  # Convolutions: PyTorch's kaiming_normal_(mode='fan_out'): N(0, 2 / (C_out K K)), untruncated.
  kernel = np.asarray(paper_models.kaiming_normal_fan_out(jax.random.key(0), (3, 3, 64, 128)))
  std = np.sqrt(2 / (128 * 9))
  assert kernel.std() == pytest.approx(std, rel=0.02) and abs(kernel.mean()) < 0.02 * std
  assert np.abs(kernel).max() > 3.5 * std  # a truncated normal would stop at 2 std


def test_channel_stack_joint_expert_reads_both_modalities_with_one_encoder():
  config = fastmri_config.get_config("joint,smoke").model
  shapes = {"magnitude": (16, 16, 1), "phase": (16, 16, 1)}
  model = models.build_model(config, shapes, (4, 2))
  rng = np.random.default_rng(0)
  inputs = {m: jnp.asarray(rng.normal(size=(3,) + s), jnp.float32) for m, s in shapes.items()}
  variables = random_variables(model, 1, inputs)
  assert list(variables["params"]["joint"]) == ["encoder", "head"]
  encoder = paper_models.PreActResNet(**fastmri_config.SMOKE_RESNET)
  features = jax.jit(encoder.apply)({"params": variables["params"]["joint"]["encoder"]},
                                    jnp.concatenate([inputs["magnitude"], inputs["phase"]], -1))
  head = variables["params"]["joint"]["head"]["dense_0"]
  want = (features @ head["kernel"] + head["bias"]).reshape(3, 4, 2)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, inputs)["expert_logits"]["joint"], want, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="channel_stack fusion stacks its inputs"):
    apply(variables, {"magnitude": inputs["magnitude"], "phase": inputs["phase"][:, :8]})


# ---------------------------------------------------------------------------------------------
# Operating-point metrics


def operating_point_by_hand(scores, labels):
  """The official rule from counts: the first of roc_curve's thresholds (highest first) at which
  fewer than 10 % of the positives score below it."""
  _, _, thresholds = sk_metrics.roc_curve(labels, scores)
  for t in thresholds:
    if 1 - np.mean(scores[labels == 1] >= t) < 0.1:
      return t
  raise AssertionError("the ROC curve ends at TPR 1")


def official_metrics(scores, labels, threshold):
  """classification_metrics.py's decisions and scores, with scikit-learn."""
  predicted = (scores > threshold).astype(int)
  return {"sensitivity": sk_metrics.recall_score(labels, predicted),
          "specificity": sk_metrics.recall_score(1 - labels, 1 - predicted),
          "balanced_accuracy": sk_metrics.balanced_accuracy_score(labels, predicted)}


def test_operating_point_metrics_match_scikit_learn_val_to_test():
  n, names = 300, ("a", "b", "c")
  task = tasks.MultilabelTask(names, bootstrap_samples=20)

  def summarize(seed, reference=None):
    """A split of one expert's rounded logits (ties, as a saturated model has), summarised as
    the evaluator does; returns (summary, P(1) [n, 3], labels [n, 3])."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(n, 3)) < [0.1, 0.4, 0.7]).astype(np.int32)
    logits = rng.normal(size=(n, 3, 2))
    logits[..., 1] += 1.2 * labels
    logits = jnp.asarray(np.round(logits, 1), jnp.float32)
    outputs = {"log_probs": jax.nn.log_softmax(logits), "expert_logits": {"joint": logits}}
    batch = {"label": labels, "mask": np.ones(n, bool)}
    ranked = jax.device_get(task.ranking_outputs(outputs, batch))
    summary = task.summarize(metrics.add_sums(None, task.eval_sums(outputs, batch)), ranked,
                             reference)
    return summary, np.asarray(ranked["positive_prob"], np.float64), labels

  val, val_scores, val_labels = summarize(1)
  test, test_scores, test_labels = summarize(2, reference=val)
  for l, name in enumerate(names):
    threshold = operating_point_by_hand(val_scores[:, l], val_labels[:, l])
    assert val["per_label"][name]["operating_point"] == pytest.approx(threshold, rel=1e-12)
    assert test["per_label"][name]["operating_point"] == val["per_label"][name]["operating_point"]
    for got, scores, labels in ((val, val_scores, val_labels), (test, test_scores, test_labels)):
      for metric, value in official_metrics(scores[:, l], labels[:, l], threshold).items():
        assert got["per_label"][name][metric] == pytest.approx(value, abs=1e-12), (name, metric)
  for metric in ("balanced_accuracy", "sensitivity", "specificity"):
    assert test[metric] == pytest.approx(np.mean([r[metric] for r in test["per_label"].values()]))
  # The bootstrap: 20 seeded resamples of the test rows, the same for every label, ddof 0.
  draws = np.random.default_rng(0)
  aurocs = []
  for _ in range(20):
    rows = draws.integers(0, n, n)
    aurocs.append([sk_metrics.roc_auc_score(test_labels[rows, l], test_scores[rows, l])
                   for l in range(3)])
  aurocs = np.array(aurocs)
  for l, name in enumerate(names):
    assert test["per_label"][name]["auroc_std"] == pytest.approx(aurocs[:, l].std(), rel=1e-9)
  assert test["auroc_std"] == pytest.approx(aurocs.mean(1).std(), rel=1e-9) and test["auroc_std"] > 0
  assert "auroc_std" not in val  # validation chooses; only a split with a reference is resampled


# ---------------------------------------------------------------------------------------------
# The recipe, end to end


def test_reproduce_smoke_writes_auroc_per_label_for_every_model(knee, tmp_path):
  root, *_ = knee
  workdir = tmp_path / "w"
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true"),
      "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")})
  proc = subprocess.run(
      [sys.executable, "experiments/reproduce.py", "--config", "configs/fastmri.py:smoke",
       f"--config.data.manual_dir={root}", f"--config.data.data_dir={tmp_path / 'tfds'}",
       "--workdir", str(workdir), "--seeds", "1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  recipe = recipes.for_config(fastmri_config.get_config("smoke"))
  with open(workdir / "table.csv", newline="") as f:
    rows = {row["model"]: row for row in csv.DictReader(f)}
  assert list(rows) == recipe.stages_for("")  # magnitude, phase, joint, intra, i2m2
  for model, row in rows.items():
    for label in LABELS:
      assert 0.0 <= float(row[f"test/per_label/{label}/auroc_mean"]) <= 1.0, (model, label)
  table = (workdir / "table.md").read_text()
  assert "test/per_label/cartilage/auroc" in table and "| i2m2 | 1 |" in table
  with open(workdir / "i2m2" / "seed_0" / "results.json") as f:
    results = json.load(f)
  for label in LABELS:  # test decided at validation's operating points
    assert (results["test"]["per_label"][label]["operating_point"]
            == results["val"]["per_label"][label]["operating_point"])
  # Bootstrapped (5 resamples in smoke; of 3 test slices most hold a single class: NaN is fair).
  assert "auroc_std" in results["test"] and "auroc_std" not in results["val"]
  assert set(results["test"]["experts"]) == {"uni_magnitude", "uni_phase", "joint"}
