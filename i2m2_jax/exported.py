r"""Runs a predictor written by `python -m i2m2_jax.export`, with JAX and NumPy alone: no
i2m2_jax, Flax or model code. Copy this file next to the artefact in a serving process.

  from exported import load_exported   # or: from i2m2_jax.exported import load_exported
  predict = load_exported("model.jaxexport")
  out = predict({"top": top, "bottom": bottom})  # raw arrays [B, ...] in their stored dtypes
  out["probs"], out["expert_probs"]["joint"]      # [B, C] NumPy arrays

  python exported.py model.jaxexport inputs.npz predictions.npz

`predict.modalities` gives each input's per-example shape and dtype, `predict.experts` the
experts in model order. `present` (bool [E] or [B, E]) leaves experts out of the product; for a
missing modality pass zeros for it and leave out the experts that read it. The command line
reads one array per modality (and optionally `present`) from an .npz and writes `probs` and
`expert_probs.<expert>` to another.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import jax
from jax import export
import numpy as np


class ExportedPredictor:
  """A deserialised predictor; calls return NumPy arrays."""

  def __init__(self, exported: export.Exported, name: str = "the exported predictor"):
    self.exported = exported
    self.name = name
    (inputs, _), _ = exported.in_tree.unflatten(exported.in_avals)
    self.modalities = {m: (tuple(a.shape[1:]), np.dtype(a.dtype)) for m, a in inputs.items()}
    outputs = exported.out_tree.unflatten(exported.out_avals)
    self.experts = list(outputs["expert_probs"])

  def __call__(self, inputs: Mapping[str, Any], present: Any = None) -> dict[str, Any]:
    platform = export.default_export_platform()
    if platform not in self.exported.platforms:
      raise ValueError(f"{self.name} was exported for platforms {list(self.exported.platforms)}, "
                       f"not for this machine's {platform!r}: export it again with "
                       f"--platforms={','.join(self.exported.platforms + (platform,))}.")
    if set(inputs) != set(self.modalities):
      raise ValueError(f"{self.name} takes the modalities {list(self.modalities)}; got "
                       f"{sorted(inputs)}.")
    arrays = {}
    for m, (shape, dtype) in self.modalities.items():
      x = np.asarray(inputs[m])
      if x.shape[1:] != shape or not np.can_cast(x.dtype, dtype, "same_kind"):
        raise ValueError(f"inputs[{m!r}] is {x.dtype} {list(x.shape)}; {self.name} takes {dtype} "
                         f"[batch, {', '.join(map(str, shape))}].")
      arrays[m] = x.astype(dtype, copy=False)
    size = len(next(iter(arrays.values())))
    mask = np.ones((size, len(self.experts)), bool) if present is None else np.broadcast_to(
        np.asarray(present, bool), (size, len(self.experts)))
    return jax.tree.map(np.asarray, self.exported.call(arrays, mask))


def load_exported(path: str) -> ExportedPredictor:
  with open(path, "rb") as f:
    return ExportedPredictor(export.deserialize(bytearray(f.read())), path)


def main(argv: list[str]) -> None:
  if len(argv) != 4:
    raise SystemExit(f"usage: {argv[0]} MODEL.jaxexport INPUTS.npz OUT.npz")
  predict = load_exported(argv[1])
  with np.load(argv[2]) as data:
    out = predict({m: data[m] for m in predict.modalities},
                  data["present"] if "present" in data else None)
  np.savez(argv[3], probs=out["probs"],
           **{f"expert_probs.{e}": p for e, p in out["expert_probs"].items()})
  print(f"Written: {argv[3]} ({len(out['probs'])} examples)")


if __name__ == "__main__":
  main(sys.argv)
