r"""Evaluates a trained run on a data set, without training.

  python -m i2m2_jax.evaluate --workdir runs/my_task --config configs/npz.py \
      --config.data.path=/data/new_task --out runs/my_task_on_new
  python -m i2m2_jax.evaluate --workdir runs/digits_i2m2 --config configs/digits.py \
      --out runs/digits_i2m2_eval --robustness

Loads the run (`inference.load_run`: its best checkpoint, or --step) and the data set of
--config (any data set config; only its `data` fields are used, the model and preprocessing are
the run's), checks that the data set has the run's modalities with the same per-example shapes
and stored dtypes (else an error names each difference), and writes OUT/results.json with the
metrics results.json has for the run's own data: the task's metrics of each of --splits,
`missing_modality` and, for i2m2 and intra, `attribution`, on the test split. With --robustness
it also writes OUT/robustness.json: the task's main metric of the test split with each modality
corrupted at noise levels 0.0 .. 1.0 (i2m2_jax/robustness.py; --robustness_kinds overrides the
corruption of a modality, e.g. 'static=feature_drop').
"""
import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from i2m2_jax import checkpointing
from i2m2_jax import inference
from i2m2_jax import robustness
from i2m2_jax import writers
from i2m2_jax.datasets import load_dataset


def define_flags():
  """The command-line flags (defined only when run as a script, so that importing this module
  leaves absl's global flags alone: i2m2_jax.main defines some of the same names)."""
  config_flags.DEFINE_config_file("config", None, "The data set's config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's folder.")
  flags.DEFINE_string("out", None, "Where results.json (and robustness.json) go.")
  flags.DEFINE_integer("step", None, "The checkpoint to evaluate (default: the best).")
  flags.DEFINE_list("splits", ["val", "test"], "The splits whose metrics to report.")
  flags.DEFINE_bool("robustness", False, "Also the noise curves of every modality.")
  flags.DEFINE_string("robustness_kinds", "",
                      "modality=kind,... overriding the corruption chosen by rank.")
  flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  predictor = inference.load_run(FLAGS.workdir, FLAGS.step)
  dataset = load_dataset(FLAGS.config.data)
  results = {"workdir": os.path.abspath(FLAGS.workdir), "step": predictor.step,
             "model": predictor.config.model.kind, "dataset": dataset.name,
             "task": predictor.task.name, "data": dict(dataset.provenance),
             **inference.evaluate_dataset(predictor, dataset, FLAGS.splits)}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(checkpointing.to_json(results), f, indent=2)
  print(f"Written: {os.path.join(FLAGS.out, 'results.json')}")
  if FLAGS.robustness:
    curves = robustness.evaluate_robustness(predictor, dataset.sources["test"],
                                            kinds=FLAGS.robustness_kinds)
    with open(os.path.join(FLAGS.out, "robustness.json"), "w") as f:
      json.dump(curves, f, indent=2)
    print(f"Written: {os.path.join(FLAGS.out, 'robustness.json')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
