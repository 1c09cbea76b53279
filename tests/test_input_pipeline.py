"""The grain input pipeline on in-memory sources: batch format, determinism, resume, epochs,
multi-process sharding, eval padding and standardisation statistics."""
import itertools

import numpy as np
import pytest

from i2m2_jax import input_pipeline as ip
from i2m2_jax.input_pipeline import InMemorySource

MODALITIES = ("vec", "img")


def make_columns(n, seed=0):
  """'vec' float32 [n, 3] whose column 0 is the example id; 'img' uint8 [n, 4, 4, 2]."""
  rng = np.random.default_rng(seed)
  vec = rng.standard_normal((n, 3)).astype(np.float32)
  vec[:, 0] = np.arange(n)
  return {"vec": vec, "img": rng.integers(0, 256, (n, 4, 4, 2), dtype=np.uint8),
          "label": np.arange(n) % 5}


def as_list(columns):
  """The same examples as a plain list of dicts (the generic, non-columnar source path)."""
  n = len(columns["label"])
  return [{"vec": columns["vec"][i], "img": columns["img"][i], "label": int(columns["label"][i])}
          for i in range(n)]


SOURCES = {"in_memory": lambda n: InMemorySource(make_columns(n)),
           "list": lambda n: as_list(make_columns(n))}


def ids(batch):
  return batch["inputs"]["vec"][:, 0].astype(int)


def take(iterator, k):
  return list(itertools.islice(iterator, k))


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_train_batch_format(kind):
  source = SOURCES[kind](50)
  batch = next(ip.train_batches(source, batch_size=8, seed=0, modalities=MODALITIES))
  assert set(batch) == {"inputs", "label", "mask"}
  assert set(batch["inputs"]) == set(MODALITIES)
  assert batch["inputs"]["vec"].shape == (8, 3) and batch["inputs"]["vec"].dtype == np.float32
  assert batch["inputs"]["img"].shape == (8, 4, 4, 2) and batch["inputs"]["img"].dtype == np.uint8
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["mask"].dtype == np.bool_ and batch["mask"].all()
  np.testing.assert_array_equal(batch["label"], ids(batch) % 5)  # rows stay together


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_train_batches_are_deterministic_and_resume_exactly(kind):
  source = SOURCES[kind](37)
  run = lambda **kw: ip.train_batches(source, batch_size=6, modalities=MODALITIES, **kw)
  full = take(run(seed=3), 20)
  again = take(run(seed=3), 20)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(ids(a), ids(b))
  for k in (1, 6, 13):  # 37 // 6: restarts inside the first, second and third epoch
    resumed = take(run(seed=3, start_step=k), 20 - k)
    for step, batch in enumerate(resumed, start=k):
      np.testing.assert_array_equal(ids(batch), ids(full[step]))
      np.testing.assert_array_equal(batch["inputs"]["img"], full[step]["inputs"]["img"])
      np.testing.assert_array_equal(batch["label"], full[step]["label"])
  other = take(run(seed=4), 20)
  assert any(not np.array_equal(ids(a), ids(b)) for a, b in zip(full, other))


def test_every_epoch_is_a_new_permutation():
  n, batch_size = 40, 8
  stream = np.concatenate([ids(b) for b in take(
      ip.train_batches(InMemorySource(make_columns(n)), batch_size=batch_size, seed=0,
                       modalities=MODALITIES), 3 * n // batch_size)])
  epochs = stream.reshape(3, n)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))


def test_train_processes_read_disjoint_slices_of_the_same_global_batches():
  source = InMemorySource(make_columns(30))
  # One process with batch 15 sees the global batches; 3 processes with 5 each read their slices.
  single = take(ip.train_batches(source, batch_size=15, seed=0, modalities=MODALITIES), 4)
  per_process = [take(ip.train_batches(source, batch_size=5, seed=0, process_index=p,
                                       process_count=3, modalities=MODALITIES), 4)
                 for p in range(3)]
  for step in range(4):
    np.testing.assert_array_equal(
        np.concatenate([ids(per_process[p][step]) for p in range(3)]), ids(single[step]))
  for epoch in (0, 1):  # 2 global batches = one epoch: every example read once, by one process
    seen = [set(np.concatenate([ids(per_process[p][s]) for s in (2 * epoch, 2 * epoch + 1)]))
            for p in range(3)]
    assert set.union(*seen) == set(range(30)) and sum(map(len, seen)) == 30


def test_train_resume_without_prefetch_thread():
  source = InMemorySource(make_columns(20))
  a = take(ip.train_batches(source, batch_size=4, seed=1, start_step=7, modalities=MODALITIES,
                            prefetch=0), 3)
  b = take(ip.train_batches(source, batch_size=4, seed=1, modalities=MODALITIES), 10)[7:]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(ids(x), ids(y))


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("n,batch_size,process_count", [(13, 4, 2), (16, 4, 2), (1, 4, 2),
                                                        (10, 3, 1), (9, 2, 4)])
def test_eval_covers_every_example_once_with_equal_batch_counts(kind, n, batch_size,
                                                                process_count):
  source = SOURCES[kind](n)
  expected_batches = ip.num_eval_batches(n, batch_size, process_count)
  seen, all_batches = [], []
  for p in range(process_count):
    batches = list(ip.eval_batches(source, batch_size=batch_size, process_index=p,
                                   process_count=process_count, modalities=MODALITIES))
    assert len(batches) == expected_batches
    for batch in batches:
      assert batch["inputs"]["vec"].shape == (batch_size, 3)
      assert batch["inputs"]["img"].dtype == np.uint8
      assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
      mask = batch["mask"]
      assert not np.any(batch["inputs"]["img"][~mask])  # padding is zeros
      np.testing.assert_array_equal(batch["label"][mask], ids(batch)[mask] % 5)
      seen.extend(ids(batch)[mask])
    all_batches.append(batches)
  # Global batch b is process 0's slice, then process 1's, ...: examples in order, as with 1
  # process and a P times larger batch.
  in_order = [ids(all_batches[p][b])[all_batches[p][b]["mask"]]
              for b in range(expected_batches) for p in range(process_count)]
  np.testing.assert_array_equal(np.concatenate(in_order) if in_order else [], np.arange(n))
  assert sorted(seen) == list(range(n))


def test_num_eval_batches():
  assert ip.num_eval_batches(13, 4, 2) == 2  # shards of 7 and 6
  assert ip.num_eval_batches(16, 4, 2) == 2
  assert ip.num_eval_batches(17, 4, 2) == 3
  assert ip.num_eval_batches(1, 4, 8) == 1
  assert ip.num_eval_batches(0, 4, 2) == 0


def test_standardization_stats_match_numpy_float64():
  rng = np.random.default_rng(0)
  n = 300
  columns = {
      "vec": (rng.standard_normal((n, 5)) * [1, 10, 100, 0.01, 1] + 1000).astype(np.float32),
      "seq": rng.standard_normal((n, 7, 3)).astype(np.float32) * 3 + 2,
      "img": rng.integers(0, 256, (n, 6, 6, 2), dtype=np.uint8),
      "const": np.full((n, 2), 7.0, np.float32),
      "label": np.zeros(n, np.int64),
  }
  stats = ip.standardization_stats(InMemorySource(columns), ["vec", "seq", "img", "const"],
                                   chunk_size=64)  # several chunks merged
  for key, axes in (("vec", (0,)), ("seq", (0, 1)), ("img", (0, 1, 2))):
    x = columns[key].astype(np.float64)
    mean, std = stats[key]
    assert mean.dtype == np.float32 and std.dtype == np.float32
    assert mean.shape == (x.shape[-1],)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=axes), rtol=1e-5)
  np.testing.assert_array_equal(stats["const"][0], [7.0, 7.0])
  np.testing.assert_array_equal(stats["const"][1], [1.0, 1.0])  # floored: no division by ~0


def test_standardization_stats_subsample_is_seeded():
  source = InMemorySource(make_columns(500))
  full = ip.standardization_stats(source, ["vec"])
  a = ip.standardization_stats(source, ["vec"], max_examples=200, seed=1)
  b = ip.standardization_stats(source, ["vec"], max_examples=200, seed=1)
  c = ip.standardization_stats(source, ["vec"], max_examples=200, seed=2)
  np.testing.assert_array_equal(a["vec"][0], b["vec"][0])
  assert not np.array_equal(a["vec"][0], c["vec"][0])
  np.testing.assert_allclose(a["vec"][1][1:], full["vec"][1][1:], rtol=0.2)
  same = ip.standardization_stats(as_list(make_columns(500)), ["vec"], max_examples=200, seed=1)
  np.testing.assert_allclose(same["vec"][0], a["vec"][0], rtol=1e-6)


def test_in_memory_source_contract():
  columns = make_columns(6)
  source = InMemorySource(columns)
  assert len(source) == 6
  example = source[4]
  assert isinstance(example["label"], int) and example["label"] == 4
  np.testing.assert_array_equal(example["img"], columns["img"][4])
  assert [e["label"] for e in source.__getitems__([5, 0])] == [0, 0]
  with pytest.raises(IndexError):
    source[6]
  with pytest.raises(ValueError, match="length"):
    InMemorySource({"a": np.zeros(3), "label": np.zeros(4)})


@pytest.mark.parametrize("n, batch_size, process_count, seed", [
    (10, 3, 1, 0), (37, 5, 2, 7), (101, 7, 3, 2 ** 32 - 1), (64, 64, 1, 5)])
def test_step_indices_equal_grain_index_dataset(n, batch_size, process_count, seed):
  """The epoch-at-a-time indices are exactly grain's element-by-element ones (train_batches
  reads the former; runs and checkpoints made with the latter stay valid)."""
  for p in range(process_count):
    reference = ip.train_index_dataset(n, batch_size=batch_size, seed=seed, process_index=p,
                                       process_count=process_count)
    fast = ip.StepIndices(n, batch_size=batch_size, seed=seed, process_index=p,
                          process_count=process_count)
    # Several epochs, batches that straddle them, and steps out of order (as after a resume).
    for step in [*range(3 * n // batch_size + 2), 500, 7, 0]:
      np.testing.assert_array_equal(fast(step), reference[step])


def test_in_memory_reads_a_source_once_when_it_fits():
  columns = make_columns(30)
  source = as_list(columns)  # reads example by example, as a file-backed source
  loaded = ip.in_memory(source, max_gb=1.0)
  assert isinstance(loaded, InMemorySource) and len(loaded) == 30
  for key in ("vec", "img", "label"):
    np.testing.assert_array_equal(loaded.columns[key], columns[key])
  per_example = ip.example_nbytes(source[0])
  assert per_example == 3 * 4 + 4 * 4 * 2 + np.asarray(0).nbytes
  assert ip.in_memory(source, max_gb=29 * per_example / 2 ** 30) is source  # too big: streamed
  assert ip.in_memory(source, max_gb=0) is source                           # switched off
