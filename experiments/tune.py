r"""Picks each model kind's learning rate, weight decay and encoders on validation.

  python experiments/tune.py --config configs/npz.py --config.data.path=/data/my_task \
      --workdir runs/my_task_cmp [--models inter,i2m2] [--budget_minutes 60]

Per model kind (uni per modality, intra, inter, i2m2; or --models, and the runs I2M2 starts from
unless --i2m2_init=scratch)
a small grid (experiments/recipes/tuning.py): learning rate x weight decay x encoder family
(sequences and images flattened, or read by a GRU/conv/CNN), the config's own values first, one
seed, within the time budget. Each point trains in DIR/tune/<model>/<point>/seed_<s>; the best on
validation is linked as DIR/<model>/seed_<s>, where experiments/compare.py with the same --workdir
finds it, and DIR/tune.md, .csv and .png tabulate the grid. `compare.py --tune` does this and
then compares the chosen runs.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.recipes import comparison, tuning  # noqa: E402
from i2m2_jax import studies  # noqa: E402
from i2m2_jax.datasets import load_dataset  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Data set config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_MODELS = flags.DEFINE_list("models", None, "Only these models (e.g. inter,i2m2); default all.")
_I2M2_INIT = flags.DEFINE_enum("i2m2_init", comparison.I2M2_INITS[0], comparison.I2M2_INITS,
                               "experts: I2M2 starts from the chosen uni and inter runs.")
_BUDGET = flags.DEFINE_float("budget_minutes", 60.0, "Time budget of the whole grid.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  studies.prepare_workdir(_WORKDIR.value)
  dataset = load_dataset(_CONFIG.value.data)
  runs = comparison.model_runs(_CONFIG.value, list(dataset.modalities), _MODELS.value,
                               _I2M2_INIT.value)
  tuning.tune(runs, _WORKDIR.value, dataset, 60 * _BUDGET.value)
  with open(os.path.join(_WORKDIR.value, "tune.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
