"""Several processes: `python -m i2m2_jax.main` as 2 JAX processes on one machine (CPU, gloo
collectives, loopback coordinator, one CPU device each), stopped by SIGTERM on one process and
restarted, trains to the same parameters and metrics as one process with 2 devices over the same
global batches."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import chex

from configs import synthetic
from i2m2_jax import checkpointing, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
STEPS = ["--config.num_train_steps=40", "--config.eval_every_steps=20",
         "--config.checkpoint_every_steps=5"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(port):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="",  # one CPU device per process, not conftest's 2
             JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def start_processes(workdir, data_dir, logs):
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "i2m2_jax.main", "--config", "configs/synthetic.py:smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *STEPS,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
      cwd=REPO, env=child_env(port), stdout=logs[pid], stderr=subprocess.STDOUT)
      for pid in range(2)]


def wait_all(procs, timeout):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def complete_steps(workdir):
  directory = checkpointing.checkpoint_dir(str(workdir))
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def final_state(workdir):
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), read_only=True) as ckpt:
    return ckpt.latest_step(), ckpt.restore_raw(ckpt.latest_step())


def test_two_processes_preempted_and_resumed_match_one_process(tmp_path, tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / "synthetic_tfds"  # shared with test_faults.py
  config = synthetic.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 40, 20, 5
  # One process, 2 devices (conftest); it also builds the data the children then read.
  single = train_lib.train_and_evaluate(config, str(tmp_path / "single"))

  workdir = tmp_path / "multi"
  log_paths = [tmp_path / f"process_{pid}.log" for pid in range(2)]
  logs = [open(path, "w") for path in log_paths]
  start = time.perf_counter()
  try:
    # 1. SIGTERM to process 1 once a checkpoint exists: both stop at the same step, after
    #    saving it, with status 143.
    procs = start_processes(workdir, data_dir, logs)
    deadline = time.monotonic() + TIMEOUT_S
    while not complete_steps(workdir):
      assert all(p.poll() is None for p in procs), "a process ended before the first checkpoint"
      assert time.monotonic() < deadline, "no checkpoint in time"
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs, TIMEOUT_S)
    for log in logs:
      log.flush()
    texts = [path.read_text() for path in log_paths]
    assert codes == [143, 143], [t[-3000:] for t in texts]
    stopped = [re.findall(r"Stopped by SIGTERM at step (\d+) after saving", t) for t in texts]
    assert stopped[0] and stopped[0] == stopped[1], stopped
    stop_step = int(stopped[0][-1])
    assert complete_steps(workdir)[-1] == stop_step < 40
    # 2. The same commands again: both resume there and finish.
    codes = wait_all(start_processes(workdir, data_dir, logs), TIMEOUT_S)
    texts = [path.read_text() for path in log_paths]
    assert codes == [0, 0], [t[-3000:] for t in texts]
  finally:
    for log in logs:
      log.close()
  elapsed = time.perf_counter() - start
  for pid in range(2):
    assert f"JAX process {pid} of 2" in texts[pid]
    assert f"Resumed from step {stop_step} " in texts[pid]
  print(f"2 processes: SIGTERM at step {stop_step}, restart; {elapsed:.1f} s in all")

  step_s, state_s = final_state(tmp_path / "single")
  step_m, state_m = final_state(workdir)
  assert step_s == step_m == 40
  chex.assert_trees_all_equal(state_m["params"], state_s["params"])
  chex.assert_trees_all_equal(state_m["opt_state"], state_s["opt_state"])

  with open(workdir / "results.json") as f:
    multi = json.load(f)
  for key in ("val", "test", "missing_modality"):  # eval batches are global batches too
    assert multi[key] == json.loads(json.dumps(single[key])), key
  assert multi["steps"] == single["steps"] == 40 and multi["best_step"] == single["best_step"]

  # Only process 0 wrote logs: one TensorBoard event file per run, and the rows of steps logged
  # once (the ones before the SIGTERM checkpoint are not replayed).
  with open(workdir / "metrics.jsonl") as f:
    train_steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]
  assert len(os.listdir(workdir / "tensorboard")) == 2
