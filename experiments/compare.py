r"""Trains every model kind on one data set and seeds, and compares them.

  python experiments/compare.py --config configs/digits.py --workdir runs/compare_digits --seeds 3

Runs uni (one per modality), intra, inter and i2m2 with the same data, config and seeds, each in
DIR/<model>/seed_<s> (a finished run, with its results.json, is not run again; an unfinished one
resumes from its checkpoint), then writes DIR/comparison.md (mean ± std over seeds per model and
metric), DIR/comparison.csv and DIR/comparison.png (test accuracy), DIR/missing_modality.md (each
model's test accuracy with each modality missing), and prints the table. With --robustness, every
model is also evaluated with each modality corrupted at noise levels 0.0 .. 1.0 (the same noise
for all; i2m2_jax/robustness.py): DIR/robustness.md and DIR/robustness.png.
Config overrides work as in i2m2_jax.main: --config.data.inter_strength=0.5.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.recipes import comparison  # noqa: E402
from i2m2_jax import studies, writers  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Data set config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (config.seed, config.seed + 1, ...).")
_MODELS = flags.DEFINE_list("models", None, "Only these models (e.g. intra,inter,i2m2); default all.")
_ROBUSTNESS = flags.DEFINE_bool("robustness", False,
                                "Also evaluate every model with each modality corrupted at noise "
                                "levels 0.0 .. 1.0: DIR/robustness.md and .png.")
_KINDS = flags.DEFINE_string("robustness_kinds", "",
                             "modality=kind,... overriding the corruption chosen by rank "
                             "(gaussian, salt_pepper, time_drop, feature_drop).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  studies.enable_compilation_cache(_WORKDIR.value)
  writers.quiet_library_logs()
  _, table = comparison.compare(_CONFIG.value, _WORKDIR.value, _SEEDS.value, _MODELS.value,
                                robustness=_ROBUSTNESS.value, robustness_kinds=_KINDS.value)
  print(table)
  print(f"Written: {os.path.join(_WORKDIR.value, 'comparison.md')}, comparison.csv, "
        f"comparison.png, missing_modality.md"
        f"{', robustness.md, robustness.png' if _ROBUSTNESS.value else ''}")


if __name__ == "__main__":
  app.run(main)
