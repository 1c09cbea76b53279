r"""Runs a frozen JAX/Flax vision-and-language backbone over images and texts and writes the feature
files the `vqa_vs` and `nlvr2` data sets read (i2m2_jax/datasets/features.py: a folder of
<key>.npy files).

  # VQA-VS / VQA v2: one file per split; COCO images by image_id (the first template that exists)
  TRAIN='/coco/train2014/COCO_train2014_{image_id:012d}.jpg'
  VAL='/coco/val2014/COCO_val2014_{image_id:012d}.jpg'
  python experiments/extract_features.py --task vqa \
      --backbone my_package.fiber_jax:make_backbone --backbone_kwargs '{"checkpoint": "/ckpt"}' \
      --texts /data/vqa_vs/Training/Training-Ques.json --images "$TRAIN,$VAL" \
      --out /data/vqa_vs/features/Training
  # NLVR2: the release's JSON-lines file of a split and its image pairs
  python experiments/extract_features.py --task nlvr2 --backbone ... \
      --texts /nlvr2/data/train.json --images '/nlvr2/images/train/{directory}/{pair}-img{i}.png' \
      --out /data/nlvr2_features/train

The backbone: `--backbone module.path:factory`; `factory(**json.loads(--backbone_kwargs))` returns
an object with

  image_size: int       images are given square, RGB, resized to image_size x image_size;
  tokenize(texts)       list[str] -> {name: int array [B, L]} on the host (L fixed by the
                        backbone: the arrays of every batch must have the same shapes);
  params                its variables (a pytree; replicated over the devices);
  apply(params, images, tokens) -> {'image': [B, Di], 'text': [B, Dt], 'fused': [B, Df]}
                        jittable; `images` uint8 [B, S, S, 3] (0..255, no normalisation: the
                        backbone does its own), `tokens` what tokenize gave, on the devices.

A Flax backbone is `apply=module.apply, params=variables`; `experiments/example_backbone.py` is a
tiny randomly initialised one (used by the tests). Features computed by other means (e.g. FIBER
in PyTorch) need no extractor: write the same keys with np.save / np.savez.

Written: VQA (`--task vqa`, one image per question): `question_id`, `image`, `text`, `fused`, in
the order of the questions file (a VQA v2 / VQA-VS questions JSON). NLVR2 (`--task nlvr2`, two
images per statement, the backbone run once per image with the statement): `text` (from the
first image's run), `image_0`, `image_1`, `fused_0`, `fused_1`, `label` (1 for "True"), in the
order of the JSON-lines file. Image path templates are comma-separated; the first that exists is
read; fields: VQA {image_id}; NLVR2 {pair} (the identifier without its last '-<n>'), {i} (0 or 1),
{directory} (train only), {identifier}.

Batches are sharded over every device JAX sees (`--batch_size` a multiple of their number; the
last batch padded) with the parameters replicated. The output is written in shards of
`--shard_size` examples (OUT/shards/<k>.npz, each written whole or not at all): a run killed at
any point resumes where it stopped when started again with the same command, skipping finished
shards; at the end the shards are joined into OUT/<key>.npy, OUT/extracted.json records that
the folder is complete, and the shards are removed. One process (no multi-host).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from i2m2_jax.datasets import vqa_vs  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

OUTPUTS = ("image", "text", "fused")  # what the backbone returns for one image and one text


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: its text, its images' paths (one or two) and what is written beside the
  features (question_id, or label)."""
  text: str
  images: tuple[str, ...]
  extra: Mapping[str, int]


# ---------------------------------------------------------------------------------------------
# Inputs


def image_path(templates: Sequence[str], **fields) -> str:
  """The first template, filled in with `fields`, that names an existing file."""
  tried = []
  for template in templates:
    try:
      path = template.format(**fields)
    except KeyError as e:
      raise ValueError(f"--images template {template!r} uses {e}, which this example does not "
                       f"have (fields: {sorted(fields)}).") from e
    if os.path.isfile(path):
      return path
    tried.append(path)
  raise ValueError(f"No image file for {fields}: tried {tried}.")


def vqa_records(questions_path: str, templates: Sequence[str]) -> list[Record]:
  questions = vqa_vs.read_json_list(questions_path, "questions")
  return [Record(q["question"], (image_path(templates, image_id=int(q["image_id"])),),
                 {"question_id": int(q["question_id"])}) for q in questions]


def nlvr2_records(jsonl_path: str, templates: Sequence[str]) -> list[Record]:
  records = []
  with open(jsonl_path) as f:
    for line in filter(str.strip, f):
      row = json.loads(line)
      pair = row["identifier"].rsplit("-", 1)[0]
      fields = {k: row[k] for k in ("identifier", "directory") if k in row}
      images = tuple(image_path(templates, pair=pair, i=i, **fields) for i in (0, 1))
      records.append(Record(row["sentence"], images,
                            {"label": int(str(row["label"]).lower() == "true")}))
  return records


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 RGB [size, size, 3] (Pillow, which matplotlib brings)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)


def load_backbone(spec: str, kwargs: Mapping[str, Any]):
  module, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"--backbone={spec!r}: expected 'module.path:factory'.")
  return getattr(importlib.import_module(module), name)(**kwargs)


# ---------------------------------------------------------------------------------------------
# Extraction


def batch_apply(backbone, mesh: Mesh) -> Callable[..., dict[str, np.ndarray]]:
  """(images [B, S, S, 3], tokens) -> the backbone's outputs on the host, B sharded over `mesh`."""
  data = NamedSharding(mesh, PartitionSpec("data"))
  params = jax.device_put(backbone.params, NamedSharding(mesh, PartitionSpec()))
  apply = jax.jit(backbone.apply, in_shardings=(NamedSharding(mesh, PartitionSpec()), data, data))
  return lambda images, tokens: jax.device_get(apply(params, images, tokens))


def features_of(records: Sequence[Record], backbone, run, batch_size: int) -> dict[str, np.ndarray]:
  """The features of `records` (one shard), batch by batch, the last batch padded."""
  num_images = len(records[0].images)
  out: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # padding, dropped below
    tokens = {k: np.asarray(v) for k, v in backbone.tokenize([r.text for r in chunk]).items()}
    for i in range(num_images):
      images = np.stack([load_image(r.images[i], backbone.image_size) for r in chunk])
      result = run(images, tokens)
      suffix = f"_{i}" if num_images > 1 else ""
      names = {"image": "image" + suffix, "fused": "fused" + suffix}
      if i == 0:
        names["text"] = "text"
      for key, name in names.items():
        out.setdefault(name, []).append(np.asarray(result[key])[:real])
  arrays = {k: np.concatenate(v) for k, v in out.items()}
  for key in records[0].extra:
    arrays[key] = np.array([r.extra[key] for r in records], np.int64)
  return arrays


def _shard_path(out: str, k: int) -> str:
  return os.path.join(out, "shards", f"{k:05d}.npz")


DONE_FILE = "extracted.json"  # written once every <key>.npy is in place


def merge_shards(out: str, num_shards: int) -> None:
  """Joins the shards into OUT/<key>.npy (written to temporary names, then renamed), records
  that in OUT/extracted.json, then removes the shards."""
  with np.load(_shard_path(out, 0)) as first:
    keys = list(first.files)
  sizes = []
  for k in range(num_shards):
    with np.load(_shard_path(out, k)) as shard:
      sizes.append(len(shard[keys[0]]))
  for key in keys:
    with np.load(_shard_path(out, 0)) as first:
      template = first[key]
    target = np.lib.format.open_memmap(os.path.join(out, f".{key}.npy.tmp"), mode="w+",
                                       dtype=template.dtype,
                                       shape=(sum(sizes),) + template.shape[1:])
    offset = 0
    for k, size in enumerate(sizes):
      with np.load(_shard_path(out, k)) as shard:
        target[offset:offset + size] = shard[key]
      offset += size
    target.flush()
    del target
  for key in keys:
    os.replace(os.path.join(out, f".{key}.npy.tmp"), os.path.join(out, f"{key}.npy"))
  with open(os.path.join(out, DONE_FILE), "w") as f:
    json.dump({"num_examples": sum(sizes), "keys": keys}, f)
  shutil.rmtree(os.path.join(out, "shards"))


def extract(records: Sequence[Record], backbone, out: str, *, batch_size: int,
            shard_size: int) -> list[int]:
  """Writes the features of `records` into the folder `out`; returns the shards computed now
  (those finished by an earlier run are skipped)."""
  if not records:
    raise ValueError("No examples to extract features of.")
  devices = jax.devices()
  if batch_size % len(devices):
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the device count "
                     f"({len(devices)}).")
  done = os.path.join(out, DONE_FILE)
  if os.path.isfile(done):
    with open(done) as f:
      if json.load(f)["num_examples"] == len(records):
        return []
  num_shards = -(-len(records) // shard_size)
  os.makedirs(os.path.join(out, "shards"), exist_ok=True)
  todo = [k for k in range(num_shards) if not os.path.isfile(_shard_path(out, k))]
  if todo:
    run = batch_apply(backbone, Mesh(np.asarray(devices), ("data",)))
  for k in todo:
    arrays = features_of(records[k * shard_size:(k + 1) * shard_size], backbone, run, batch_size)
    tmp = _shard_path(out, k) + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, _shard_path(out, k))  # a shard exists whole or not at all
    logging.info("Shard %d of %d written.", k + 1, num_shards)
  merge_shards(out, num_shards)
  return todo


# ---------------------------------------------------------------------------------------------
# Command line

_TASK = flags.DEFINE_enum("task", "vqa", ["vqa", "nlvr2"], "vqa: a questions JSON, one image "
                          "per question; nlvr2: a JSON-lines file, two images per statement.")
_BACKBONE = flags.DEFINE_string("backbone", None, "module.path:factory of the backbone.")
_BACKBONE_KWARGS = flags.DEFINE_string("backbone_kwargs", "{}", "JSON object of the factory's "
                                       "keyword arguments.")
_TEXTS = flags.DEFINE_string("texts", None, "The questions JSON (vqa) or JSON-lines file (nlvr2).")
_IMAGES = flags.DEFINE_string("images", None, "Comma-separated image path templates.")
_OUT = flags.DEFINE_string("out", None, "Output folder (<key>.npy files).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch, over all devices.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 8192, "Examples per resumable output shard.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  templates = [t.strip() for t in _IMAGES.value.split(",") if t.strip()]
  reader = vqa_records if _TASK.value == "vqa" else nlvr2_records
  records = reader(_TEXTS.value, templates)
  backbone = load_backbone(_BACKBONE.value, json.loads(_BACKBONE_KWARGS.value))
  done = extract(records, backbone, _OUT.value, batch_size=_BATCH_SIZE.value,
                 shard_size=_SHARD_SIZE.value)
  print(f"{len(records)} examples; {len(done)} shard(s) computed now; written to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["backbone", "texts", "images", "out"])
  app.run(main)
