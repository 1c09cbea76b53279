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

I2M2 starts from the uni and inter runs' best checkpoints (--i2m2_init=experts, the default: the
paper's staged recipe; those runs are trained first even when --models leaves them out);
--i2m2_init=scratch trains it from a random start, as the single command does.
--tune first picks each model kind's learning rate, weight decay and encoders on validation
(experiments/tune.py's grid, DIR/tune.md) and compares the chosen runs.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.recipes import comparison  # noqa: E402
from i2m2_jax import studies  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Data set config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (config.seed, config.seed + 1, ...).")
_MODELS = flags.DEFINE_list("models", None, "Only these models (e.g. intra,inter,i2m2); default all.")
_I2M2_INIT = flags.DEFINE_enum("i2m2_init", comparison.I2M2_INITS[0], comparison.I2M2_INITS,
                               "experts: I2M2 fine-tuned from the uni and inter runs; scratch: "
                               "alone.")
_TUNE = flags.DEFINE_bool("tune", False, "Tune every model kind on validation first (tune.py).")
_BUDGET = flags.DEFINE_float("tune_budget_minutes", 60.0, "With --tune: the grid's time budget.")
_ROBUSTNESS = flags.DEFINE_bool("robustness", False,
                                "Also evaluate every model with each modality corrupted at noise "
                                "levels 0.0 .. 1.0: DIR/robustness.md and .png.")
_KINDS = flags.DEFINE_string("robustness_kinds", "",
                             "modality=kind,... overriding the corruption chosen by rank "
                             "(gaussian, salt_pepper, time_drop, feature_drop).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  studies.prepare_workdir(_WORKDIR.value)
  _, table = comparison.compare(
      _CONFIG.value, _WORKDIR.value, _SEEDS.value, _MODELS.value, i2m2_init=_I2M2_INIT.value,
      tune_budget_s=60 * _BUDGET.value if _TUNE.value else None,
      robustness=_ROBUSTNESS.value, robustness_kinds=_KINDS.value)
  print(table)
  print(f"Written: {os.path.join(_WORKDIR.value, 'comparison.md')}, comparison.csv, "
        f"comparison.png, missing_modality.md"
        f"{', robustness.md, robustness.png' if _ROBUSTNESS.value else ''}")


if __name__ == "__main__":
  app.run(main)
