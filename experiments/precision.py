r"""Does bfloat16 compute keep accuracy? The same config and seeds trained in float32 and bfloat16.

  python experiments/precision.py --config configs/digits.py --workdir runs/precision_digits \
      --seeds 3
  python experiments/digits_as_avmnist.py --out /tmp/digits_av   # AV-MNIST files, no download
  python experiments/precision.py --config configs/avmnist.py:i2m2 --workdir runs/precision_av \
      --config.model.init_from= --config.data.manual_dir=/tmp/digits_av \
      --config.data.num_val=1000 --config.num_epochs=4 --config.optimizer.learning_rate=0.05

Each (dtype, seed) trains in DIR/<dtype>/seed_<s> with config.model.compute_dtype set (mixed
precision: float32 parameters, bfloat16 activations; i2m2_jax/models.py apply_in_dtype); a
finished run is read back, an unfinished one resumes. Writes DIR/precision.md (mean ± std per
dtype, and the per-seed difference bfloat16 - float32 in points) and prints it. bfloat16 is meant
for GPUs and TPUs: on a CPU it runs, slowly, and shows the same numerics.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from i2m2_jax import report, studies, writers  # noqa: E402
from i2m2_jax.datasets import load_dataset  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Number of seeds (config.seed, config.seed + 1, ...).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes; the first is "
                            "the reference of the differences.")
flags.mark_flags_as_required(["config", "workdir"])

METRICS = ["val/accuracy", "test/accuracy", "test/nll", "train_examples_per_s"]


def with_dtype(config, dtype: str):
  config = config.copy_and_resolve_references()
  config.model.compute_dtype = dtype
  return config


def run_precision(config, workdir: str, seeds: int, dtypes) -> tuple[dict, str]:
  """Trains every (dtype, seed); returns ({dtype: [results]}, Markdown report)."""
  dataset = load_dataset(config.data)
  runs = studies.run_study([studies.Run(dtype, with_dtype(config, dtype)) for dtype in dtypes],
                           workdir, range(config.seed, config.seed + seeds), dataset)
  table = report.markdown_table(report.summarize_runs(runs, METRICS), METRICS)
  reference = dtypes[0]
  lines = [f"# {dataset.name}, model {config.model.kind} ({config.model.get('implementation')}):"
           f" float32 vs bfloat16 compute, {seeds} seed(s)", "", table]
  for dtype in dtypes[1:]:
    for metric in ("val/accuracy", "test/accuracy"):
      diffs = 100 * np.array([report.metric_value(a, metric) - report.metric_value(b, metric)
                              for a, b in zip(runs[dtype], runs[reference])])
      lines.append(f"{metric}: {dtype} - {reference} per seed {np.round(diffs, 2).tolist()} pt, "
                   f"mean {diffs.mean():+.2f} pt.")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "precision.md"), "w") as f:
    f.write(text)
  return runs, text


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  studies.enable_compilation_cache(_WORKDIR.value)
  writers.quiet_library_logs()
  _, text = run_precision(_CONFIG.value, _WORKDIR.value, _SEEDS.value, list(_DTYPES.value))
  print(text)
  print(f"Written: {os.path.join(_WORKDIR.value, 'precision.md')}")


if __name__ == "__main__":
  app.run(main)
