"""A tiny randomly initialised Flax vision-and-language backbone in the form
experiments/extract_features.py expects (`make_backbone`): it shows the contract and the tests
use it. Its features mean nothing.

  python experiments/extract_features.py --backbone experiments.example_backbone:make_backbone \
      --backbone_kwargs '{"image_size": 32}' --texts questions.json --images 'img/{image_id}.png' \
      --out features/train
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyBackbone(nn.Module):
  """Image: mean colour -> Dense; text: mean of word embeddings -> Dense; fused: Dense of both."""
  dims: tuple[int, int, int] = (6, 4, 5)  # image, text, fused
  vocab: int = 101

  @nn.compact
  def __call__(self, images, tokens):
    colour = images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0
    image = jnp.tanh(nn.Dense(self.dims[0], name="image")(colour))
    mask = tokens["mask"].astype(jnp.float32)[..., None]
    words = nn.Embed(self.vocab, 8, name="embed")(tokens["ids"])
    text = nn.Dense(self.dims[1], name="text")((words * mask).sum(1) / jnp.maximum(mask.sum(1), 1))
    fused = nn.Dense(self.dims[2], name="fused")(jnp.concatenate([image, text], axis=-1))
    return {"image": image, "text": text, "fused": fused}


@dataclasses.dataclass(frozen=True)
class Backbone:
  image_size: int
  params: Any
  apply: Callable[..., Any]
  tokenize: Callable[[Sequence[str]], dict[str, np.ndarray]]


def make_backbone(seed: int = 0, image_size: int = 16, length: int = 8) -> Backbone:
  """TinyBackbone with random weights; texts become hashed word ids, padded to `length`."""
  module = TinyBackbone()

  def tokenize(texts):
    ids = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      words = [zlib.crc32(w.encode()) % (module.vocab - 1) + 1 for w in text.lower().split()]
      ids[i, :min(len(words), length)] = words[:length]
    return {"ids": ids, "mask": (ids > 0).astype(np.int32)}

  example = (jnp.zeros((1, image_size, image_size, 3), jnp.uint8),
             {k: jnp.asarray(v) for k, v in tokenize(["a"]).items()})
  params = module.init(jax.random.key(seed), *example)
  return Backbone(image_size=image_size, params=params, apply=module.apply, tokenize=tokenize)
