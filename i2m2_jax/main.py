r"""Trains one model kind on one data set.

  python -m i2m2_jax.main --config configs/digits.py --workdir runs/digits_i2m2
  python -m i2m2_jax.main --config configs/synthetic.py:smoke --workdir /tmp/s \
      --config.model.kind=intra --config.optimizer.learning_rate=0.01

Several hosts: pass --coordinator_address, --num_processes and --process_id (or set
--distributed with no arguments on Cloud TPU, Slurm or Kubernetes), and run the same command on
every host.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from i2m2_jax import train_lib

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results.json go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (implied by the flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    # Before any JAX computation; with no arguments JAX finds the cluster on TPU/Slurm/k8s.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("JAX process %d of %d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
