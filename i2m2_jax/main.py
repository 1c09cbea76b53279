r"""Trains one model kind on one data set.

  python -m i2m2_jax.main --config configs/digits.py --workdir runs/digits_i2m2
  python -m i2m2_jax.main --config configs/synthetic.py:smoke --workdir /tmp/s \
      --config.model.kind=intra --config.optimizer.learning_rate=0.01

With config.model.i2m2_init='experts' (configs/npz.py), kind i2m2 is trained as the paper's
staged recipe: each uni-modal expert and the joint one alone in --workdir/experts/, then I2M2
from their best checkpoints (i2m2_jax/studies.py train_i2m2).

Restarts: run the same command again; it resumes from the latest complete checkpoint in
--workdir and ends exactly as an uninterrupted run would. On SIGTERM the run finishes its step,
saves a checkpoint and exits with status 143 (128 + SIGTERM) after logging "Stopped by SIGTERM at
step N"; a non-finite loss, gradient or parameter exits with status 1 and a message naming the
step and the experts, without saving that step.

Several hosts (data parallel): run the same command on every host with --coordinator_address
(host:port of process 0), --num_processes and --process_id, or the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on Cloud TPU, Slurm or Kubernetes
--distributed alone lets JAX find the cluster. --workdir must be a directory every process can
write (a shared file system or gs://); only process 0 writes logs and results.json.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from i2m2_jax import host_memory
from i2m2_jax import studies
from i2m2_jax import train_lib
from i2m2_jax import writers

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results.json go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (implied by the flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (else $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (else $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 128 + 15  # what a shell reports for a process ended by SIGTERM


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"${name}={value!r} is not an integer.") from None


def distributed_args() -> dict | None:
  """jax.distributed.initialize arguments from the flags (first) or the environment; None for a
  single-process run."""
  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = (_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
                   else _env_int("JAX_NUM_PROCESSES"))
  process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  if not (_DISTRIBUTED.value or coordinator or num_processes is not None
          or process_id is not None):
    return None
  if num_processes is not None and num_processes < 1:
    raise app.UsageError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id} must be in [0, {num_processes}).")
  return {"coordinator_address": coordinator, "num_processes": num_processes,
          "process_id": process_id}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  args = distributed_args()
  if args is not None:
    # Before any JAX computation; with no arguments JAX finds the cluster on TPU/Slurm/k8s.
    jax.distributed.initialize(**args)
  logging.info("JAX process %d of %d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    studies.train_i2m2(_CONFIG.value, _WORKDIR.value)
  except train_lib.Preempted as e:
    logging.warning("%s", e)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  # Before JAX starts its backend: keep freed host memory for reuse (i2m2_jax/host_memory.py; on
  # CPU it saves the page faults of every step's buffers, and it is harmless elsewhere).
  host_memory.retain_freed_memory()
  app.run(main)
