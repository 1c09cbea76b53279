r"""Serialises a trained run's predictor with jax.export, for serving without the model code.

  python -m i2m2_jax.export --workdir runs/digits_i2m2 --out model.jaxexport
  python -m i2m2_jax.export --workdir runs/digits_i2m2 --out model.jaxexport --platforms=cpu,cuda

The artefact is `inference.predict` of the run's best checkpoint (or --step), preprocessing
included: f(inputs, present) with `inputs` the raw arrays {modality: [b, ...]} in their stored
dtypes and `present` bool [b, E] (experts in model order), for any batch size b (a symbolic
dimension), returning {'probs': [b, *output_shape], 'expert_probs': {expert: [b, ...]}}. The
parameters are constants inside it. Platforms: cpu, plus the one of this machine's devices when
it is another (cuda on an NVIDIA GPU), or those named by --platforms (JAX lowers for cpu, cuda,
rocm and tpu from any machine). `i2m2_jax/exported.py`, which needs JAX alone, loads and runs it.
"""
from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
import jax
from jax import export as jax_export
import numpy as np

from i2m2_jax import inference
from i2m2_jax import writers

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for

def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
  """The platforms to export for: `platforms`, or cpu and this machine's; ValueError naming an
  unknown one."""
  if not platforms:
    return tuple(dict.fromkeys(("cpu", jax_export.default_export_platform())))
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    hint = " ('gpu' is 'cuda' on NVIDIA, 'rocm' on AMD)" if "gpu" in unknown else ""
    raise ValueError(f"Cannot export for platform {unknown[0]!r}{hint}: jax.export knows "
                     f"{list(PLATFORMS)}.")
  return tuple(dict.fromkeys(platforms))


def export_predictor(predictor: inference.Predictor,
                     platforms: Sequence[str] | None = None) -> jax_export.Exported:
  """`predictor`'s function (module docstring) exported for `platforms` (check_platforms)."""
  platforms = check_platforms(platforms)
  state = jax.device_get(predictor.state)  # host constants, not arrays of this machine's devices

  def predict(inputs, present):
    return inference.predict(state, inputs, present, preprocess=predictor.preprocess)

  batch, = jax_export.symbolic_shape("b")
  inputs = {m: jax.ShapeDtypeStruct((batch,) + shape, dtype)
            for m, (shape, dtype) in predictor.modalities.items()}
  present = jax.ShapeDtypeStruct((batch, len(predictor.experts)), np.bool_)
  return jax_export.export(jax.jit(predict), platforms=platforms)(inputs, present)


def export_run(workdir: str, out: str, step: int | None = None,
               platforms: Sequence[str] | None = None) -> jax_export.Exported:
  """Exports the run in `workdir` (its plain implementation) and writes it to `out`."""
  exported = export_predictor(inference.load_run(workdir, step, implementation="plain"),
                              platforms)
  with open(out, "wb") as f:
    f.write(exported.serialize())
  return exported


def define_flags():
  """The command-line flags (defined only when run as a script, so that importing this module
  leaves absl's global flags alone)."""
  flags.DEFINE_string("workdir", None, "A finished run's folder.")
  flags.DEFINE_string("out", None, "The file to write, e.g. model.jaxexport.")
  flags.DEFINE_integer("step", None, "The checkpoint to export (default: the best).")
  flags.DEFINE_list("platforms", None, f"Platforms to export for, some of {list(PLATFORMS)} "
                    f"(default: cpu and this machine's).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  exported = export_run(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.platforms)
  print(f"Written: {FLAGS.out} (platforms {list(exported.platforms)})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
