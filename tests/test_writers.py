"""Tests for i2m2_jax.writers: JSONL + TensorBoard output, disabled writers, the progress bar."""
import glob
import json
import math
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from i2m2_jax.writers import MetricWriter, ProgressBar


def _read_events(path):
  """Parses a TFRecord event file (length, crc, data, crc) without TensorFlow."""
  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)
  return events


def _tb_scalars(workdir):
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  out = {}
  for event in _read_events(files[0]):
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out[(value.tag, event.step)] = value.simple_value
  return out, files[0]


def test_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with MetricWriter(workdir) as writer:
    writer.write_scalars(10, {"train/loss": jnp.float32(0.25), "lr": np.float64(1e-3)})
    writer.write_scalars(np.int64(20), {
        "val": {"accuracy": 0.5, "experts": {"joint": np.float32(0.75)}},
        "count": np.int32(7), "nan": float("nan")})
    writer.flush()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # flushed while open
  rows = [json.loads(line) for line in lines]
  assert rows[0] == {"step": 10, "train/loss": 0.25, "lr": 1e-3}
  assert rows[1]["step"] == 20 and rows[1]["val/accuracy"] == 0.5
  assert rows[1]["val/experts/joint"] == 0.75 and rows[1]["count"] == 7
  assert isinstance(rows[1]["count"], int) and isinstance(rows[1]["val/experts/joint"], float)
  assert math.isnan(rows[1]["nan"])

  scalars, _ = _tb_scalars(workdir)
  assert scalars[("train/loss", 10)] == pytest.approx(0.25)
  assert scalars[("val/experts/joint", 20)] == pytest.approx(0.75)
  assert scalars[("count", 20)] == 7


def test_appends_on_resume(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"a": 1.0})
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(2, {"a": 2.0})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]


def test_hparams(tmp_path):
  hparams = {"model": {"kind": "i2m2", "widths": (8, 16)}, "lr": np.float32(0.5), "seed": 0}
  with MetricWriter(tmp_path) as writer:
    writer.write_hparams(hparams)
  saved = json.loads((tmp_path / "hparams.json").read_text())
  assert saved == {"model": {"kind": "i2m2", "widths": [8, 16]}, "lr": 0.5, "seed": 0}
  _, path = _tb_scalars(str(tmp_path))
  plugins = {value.metadata.plugin_data.plugin_name
             for event in _read_events(path) for value in event.summary.value}
  assert "hparams" in plugins


def test_rejects_non_scalars(tmp_path):
  with MetricWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="'hist'"):
      writer.write_scalars(1, {"hist": np.arange(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(1, {"step": 3})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {"a": 1.0})
  writer.write_hparams({"lr": 0.1})
  writer.flush()
  writer.close()
  assert not workdir.exists()
  assert not writer.enabled


def test_close_is_idempotent(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write_scalars(1, {"a": 1.0})
  writer.close()
  writer.close()
  writer.write_scalars(2, {"a": 2.0})  # after close: ignored, like a disabled writer
  writer.flush()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "a": 1.0}]


def test_one_record_per_step_across_flushes(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(5, {"train/loss": 1.0})
    writer.write_scalars(5, {"val/accuracy": 0.5})
    writer.flush()  # e.g. before a checkpoint
    writer.write_scalars(5, {"test/accuracy": 0.4})
    writer.write_scalars(6, {"train/loss": 0.9})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 5, "train/loss": 1.0, "val/accuracy": 0.5, "test/accuracy": 0.4},
                  {"step": 6, "train/loss": 0.9}]


def test_resume_replaces_what_was_logged_after_the_resumed_step(tmp_path):
  with MetricWriter(tmp_path) as writer:
    for step in (3, 6, 9):
      writer.write_scalars(step, {"loss": float(step)})
  with MetricWriter(tmp_path, resume_step=6) as writer:  # step 9 runs again
    writer.write_scalars(9, {"loss": 90.0})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 3, "loss": 3.0}, {"step": 6, "loss": 6.0}, {"step": 9, "loss": 90.0}]
  events = [e for f in glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
            for e in _read_events(f)]
  # TensorBoard is told to drop the first run's events from step 7 on.
  assert any(e.HasField("session_log") and e.session_log.status == e.session_log.START
             and e.step == 7 for e in events)


def test_progress_bar(capsys):
  with ProgressBar(10, initial_step=2, mininterval=0) as bar:
    bar.update(5, {"loss": jnp.float32(0.123456), "step_kind": "x"})
    bar.update(4)  # going backwards is ignored
    bar.update(10)
    assert bar._bar.n == 10  # pylint: disable=protected-access
    assert bar.rate > 0
  err = capsys.readouterr().err
  assert "10/10" in err and "step/s" in err and "loss=0.1235" in err


def test_progress_bar_disabled(capsys):
  bar = ProgressBar(10, enabled=False)
  bar.update(3, {"loss": 1.0})
  bar.close()
  assert capsys.readouterr().err == ""
  assert bar.rate is None


def test_progress_bar_is_quiet_off_a_terminal(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  bar = ProgressBar(100)
  assert bar._bar.mininterval >= 10  # pylint: disable=protected-access
  bar.close()
