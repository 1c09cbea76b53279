"""Batches for the trainer from random-access sources (tfds data sources or in-memory arrays).

A batch is {'inputs': {modality: np.ndarray [B_local, ...] in the stored dtype},
target key: its array, 'mask': np.bool_ [B_local]}, where B_local is the per-process batch size
and the targets are those the task reads ('label' as int32 [B_local] or [B_local, L], 'scores' as
float32 [B_local, C]). A source is anything with `len` and `source[i] -> {modality: array,
target key: value}` (a tfds data source, an `InMemorySource`, a list of dicts). A source with
`gather(indices, keys) -> {key: [len(indices), ...]}` reads whole batches itself and counts as
in memory (`InMemorySource`, `datasets.features.FeatureSource`).

* `train_batches`: an endless, shuffled stream built with grain, deterministic in (seed, step):
  restarting at `start_step=k` yields exactly the batches an uninterrupted run yields from step k.
  The *global* batch of a step (batch_size * process_count examples) is the same whatever the
  number of processes: every process shuffles the example indices identically and reads only its
  own contiguous slice of the global batch (process p: rows p*B..(p+1)*B-1), so P processes
  train on exactly the batches of one process with a P times larger batch. The order is
  reshuffled every epoch (grain's shuffle seeds epoch e with seed + e); batches may straddle
  epochs.
  Grain shuffles and batches example *indices* (`train_index_dataset`, computed an epoch at a
  time by `StepIndices`); each batch is then read in one go (`gather_batch`), which is ~2x
  faster than stacking grain-fetched examples one by one.
* `eval_batches`: one pass over a split in order, padded so that every process yields
  `num_eval_batches(...)` batches; padding rows are zeros with mask False, so summing
  mask-weighted metrics over all processes counts every example exactly once. As in training,
  global eval batch b is examples [b * B * P, (b + 1) * B * P) whatever the number of processes
  P, and process p reads its contiguous slice of it, so metrics do not depend on P either.
* `standardization_stats`: per-feature (last axis) mean and std of the training split.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import grain
from grain._src.python.experimental.index_shuffle.python.index_shuffle_module import index_shuffle as _index_shuffle  # pylint: disable=line-too-long
import numpy as np

Batch = dict[str, Any]
_ENDLESS = 2 ** 62  # steps of the training stream
TARGET_DTYPES = {"label": np.int32, "scores": np.float32}  # as batches carry them


class InMemorySource(Sequence):
  """Examples stored as one array per key ([N, ...]); `source[i]` gives example i as a dict.

  Same contract as a tfds data source (`len`, `[i]`, `__getitems__`, labels as Python ints), and
  `gather_batch` reads whole batches from its `columns` by fancy indexing.
  """

  def __init__(self, columns: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"Columns differ in length: {lengths}")
    self.columns = dict(columns)
    self._length = next(iter(lengths.values()), 0)

  @classmethod
  def from_source(cls, source, chunk_size: int = 4096) -> "InMemorySource":
    """Reads a whole source (in bulk reads of chunk_size examples) into memory."""
    n = len(source)
    if n == 0:
      return cls({})
    chunks = [read_examples(source, range(s, min(n, s + chunk_size)))
              for s in range(0, n, chunk_size)]
    keys = list(chunks[0][0])
    return cls({k: np.stack([np.asarray(ex[k]) for chunk in chunks for ex in chunk])
                for k in keys})

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    index = int(index)
    if not -self._length <= index < self._length:
      raise IndexError(f"index {index} out of range for {self._length} examples")
    return {k: (int(v[index]) if k == "label" and v.ndim == 1 else v[index])
            for k, v in self.columns.items()}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def gather(self, indices: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The rows `indices` of each key's column, by fancy indexing."""
    return {k: self.columns[k][indices] for k in keys}

  def __repr__(self) -> str:
    shapes = {k: (v.shape[1:], str(v.dtype)) for k, v in self.columns.items()}
    return f"InMemorySource(n={self._length}, {shapes})"


def example_nbytes(example: Mapping[str, Any]) -> int:
  """Bytes of one example's arrays (and label) as stored."""
  return sum(np.asarray(v).nbytes for v in example.values())


def in_memory(source, max_gb: float, name: str = "source"):
  """`source` read once into host memory (an InMemorySource) when its estimated size, its length
  times the bytes of its first example, is at most `max_gb` GiB; else `source` itself.

  Reading an array_record source decodes every example each time it is read (~4,000 AV-MNIST
  examples/s on one core, measured with experiments/benchmark.py), which a GPU outruns; from
  memory a batch is one fancy-indexing copy per modality (~10x faster). max_gb <= 0 keeps the
  source as it is. Logs which way it went and why.
  """
  if hasattr(source, "gather") or max_gb <= 0 or len(source) == 0:
    return source
  nbytes = len(source) * example_nbytes(source[0])
  if nbytes > max_gb * 2 ** 30:
    logging.info("%s: %.2f GiB exceeds config.data.in_memory_max_gb=%g; read from its files at "
                 "every batch.", name, nbytes / 2 ** 30, max_gb)
    return source
  start = time.perf_counter()
  loaded = InMemorySource.from_source(source)
  logging.info("%s: %d examples (%.2f GiB) read into memory in %.1f s.", name, len(loaded),
               nbytes / 2 ** 30, time.perf_counter() - start)
  return loaded


def read_examples(source, indices: Sequence[int]) -> list[Mapping[str, Any]]:
  """source[i] for each index, in one bulk read when the source has `__getitems__` (tfds does)."""
  indices = [int(i) for i in indices]
  if not indices:
    return []
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def gather_batch(source, indices: Sequence[int], modalities: Sequence[str],
                 targets: Sequence[str] = ("label",)) -> Batch:
  """The examples at `indices` as one batch with mask all True (modalities in their stored
  dtypes, targets in TARGET_DTYPES)."""
  if hasattr(source, "gather"):
    columns = source.gather(np.asarray(indices, dtype=np.int64), (*modalities, *targets))
  else:
    examples = read_examples(source, indices)
    columns = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in (*modalities, *targets)}
  batch = {"inputs": {m: columns[m] for m in modalities},
           "mask": np.ones(len(indices), dtype=np.bool_)}
  batch.update({k: columns[k].astype(TARGET_DTYPES[k], copy=False) for k in targets})
  return batch


def read_column(source, key: str, chunk_size: int = 4096) -> np.ndarray:
  """One key of every example of `source`, stacked [N, ...] (from memory when it is there)."""
  if hasattr(source, "gather"):
    return source.gather(np.arange(len(source)), (key,))[key]
  n = len(source)
  return np.stack([np.asarray(ex[key]) for start in range(0, n, chunk_size)
                   for ex in read_examples(source, range(start, min(n, start + chunk_size)))])


# ---------------------------------------------------------------------------------------------
# Training


def train_index_dataset(num_examples: int, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.MapDataset:
  """Endless grain MapDataset whose element `step` is the int64 [batch_size] array of the example
  indices of training step `step` on this process: its slice of the global batch of
  batch_size * process_count indices, which does not depend on process_count."""
  if num_examples == 0:
    raise ValueError("The training split has no example.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  ds = grain.MapDataset.range(num_examples)
  ds = ds.seed(seed).shuffle().repeat()  # shuffle before repeat: a new order every epoch
  lo, hi = process_index * batch_size, (process_index + 1) * batch_size
  return ds.batch(batch_size * process_count, drop_remainder=True,
                  batch_fn=lambda idx: np.asarray(idx, dtype=np.int64)[lo:hi])


class StepIndices:
  """step -> the int64 [batch_size] example indices of that step on this process: the elements
  of `train_index_dataset`, computed from one epoch's order at a time.

  Going through grain's dataset layers costs ~25 us per example in Python, which caps the whole
  pipeline near 36,000 examples/s; the same order is the epoch's permutation by grain's own
  `index_shuffle` (with the per-epoch seed grain's ShuffleMapDataset uses), computed once per
  epoch at ~5 us per example and then sliced. tests/test_input_pipeline.py checks that both give
  the same indices, across epoch boundaries and processes (so runs and checkpoints made before
  are unaffected); it would catch a grain release that changes its shuffle.
  """

  def __init__(self, num_examples: int, *, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    # Validates the arguments as the reference does, and gives the seed grain derives.
    shuffled = train_index_dataset(num_examples, batch_size=batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count)
    while type(shuffled).__name__ != "ShuffleMapDataset":
      shuffled = shuffled._parent  # pylint: disable=protected-access
    self._seed = int(shuffled._seed)  # pylint: disable=protected-access
    self._n = num_examples
    self._global = batch_size * process_count
    self._lo, self._hi = process_index * batch_size, (process_index + 1) * batch_size
    self._orders: dict[int, np.ndarray] = {}

  def _epoch_order(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      seed, last = (self._seed + epoch) % 2 ** 32, self._n - 1
      order = np.fromiter((_index_shuffle(i, max_index=last, seed=seed, rounds=4)
                           for i in range(self._n)), np.int64, self._n)
      # A batch spans at most the epochs of its first and last positions: keep two.
      self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
      self._orders[epoch] = order
    return order

  def __call__(self, step: int) -> np.ndarray:
    first = int(step) * self._global + self._lo
    positions = np.arange(first, first + self._hi - self._lo)
    epochs = positions // self._n
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self._epoch_order(int(epoch))[positions[where] % self._n]
    return out


def train_batches(source, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  modalities: Sequence[str], targets: Sequence[str] = ("label",),
                  prefetch: int = 2) -> Iterator[Batch]:
  """Endless iterator of training batches starting at step `start_step` (for resuming).

  Batches are made in one background thread, `prefetch` batches ahead (0: in the caller's
  thread); no worker processes.
  """
  modalities, targets = tuple(modalities), tuple(targets)
  indices = StepIndices(len(source), batch_size=batch_size, seed=seed,
                        process_index=process_index, process_count=process_count)
  steps = grain.MapDataset.range(start_step, _ENDLESS)
  ds = steps.map(lambda step: gather_batch(source, indices(step), modalities, targets))
  # One thread is enough here and leaves the CPU cores to the training step.
  read_options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                   prefetch_buffer_size=max(prefetch, 0))
  return iter(ds.to_iter_dataset(read_options))


# ---------------------------------------------------------------------------------------------
# Evaluation


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches each process yields for a split: ceil(N / (batch_size * P)) (global batches)."""
  return math.ceil(num_examples / (batch_size * process_count))


def eval_batches(source, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                 modalities: Sequence[str], targets: Sequence[str] = ("label",)
                 ) -> Iterator[Batch]:
  """One ordered pass over this process's slices of the global batches (process p reads rows
  p*B..(p+1)*B-1 of each global batch of B*P examples), the last batch and any batch past the
  end padded with zeros and mask False."""
  modalities, targets = tuple(modalities), tuple(targets)
  n = len(source)
  for b in range(num_eval_batches(n, batch_size, process_count)):
    start = (b * process_count + process_index) * batch_size
    indices = range(min(start, n), min(start + batch_size, n))
    num_real = len(indices)
    # A shard that has run dry reads example 0 as a stand-in; it is zeroed and masked below.
    batch = gather_batch(source, list(indices) or [0], modalities, targets)
    if num_real < batch_size:
      batch = _pad(batch, num_real, batch_size)
    yield batch


def _pad(batch: Batch, num_real: int, batch_size: int) -> Batch:
  """Keeps the first num_real rows and adds zero rows up to batch_size, masked False."""
  def pad(x):
    out = np.zeros((batch_size,) + x.shape[1:], dtype=x.dtype)
    out[:num_real] = x[:num_real]
    return out
  mask = np.zeros(batch_size, dtype=np.bool_)
  mask[:num_real] = True
  padded = {k: pad(v) for k, v in batch.items() if k not in ("inputs", "mask")}
  return {"inputs": {m: pad(x) for m, x in batch["inputs"].items()}, **padded, "mask": mask}


# ---------------------------------------------------------------------------------------------
# Standardisation


def _chunk_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """(count, mean, sum of squared deviations) over all axes but the last, in float64."""
  x = np.asarray(x, dtype=np.float64)
  flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
  mean = flat.mean(axis=0)
  return len(flat), mean, ((flat - mean) ** 2).sum(axis=0)


def _merge_moments(a, b):
  """Chan et al.'s pairwise update of (count, mean, M2)."""
  (na, ma, sa), (nb, mb, sb) = a, b
  n = na + nb
  delta = mb - ma
  return n, ma + delta * (nb / n), sa + sb + delta ** 2 * (na * nb / n)


def standardization_stats(source, modalities: Sequence[str], max_examples: int = 10000,
                          seed: int = 0, min_std: float = 1e-6,
                          chunk_size: int = 1024) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{modality: (mean, std)} as float32 over the last axis ([D] for vectors [D], [F] for
  sequences [T, F], [C] for images [H, W, C]), in float64 from up to max_examples examples
  (a seeded subsample when the split is larger). A std below min_std (a constant feature)
  becomes 1, so standardising leaves that feature centred instead of blowing it up.
  """
  n = len(source)
  if n == 0:
    raise ValueError("Cannot compute standardisation statistics of an empty split.")
  if n > max_examples:
    indices = np.sort(np.random.default_rng(seed).choice(n, size=max_examples, replace=False))
  else:
    indices = np.arange(n)
  modalities = tuple(modalities)
  moments = {}
  for start in range(0, len(indices), chunk_size):
    inputs = gather_batch(source, indices[start:start + chunk_size], modalities, ())["inputs"]
    for m in modalities:
      chunk = _chunk_moments(inputs[m])
      moments[m] = chunk if m not in moments else _merge_moments(moments[m], chunk)
  stats = {}
  for m, (count, mean, m2) in moments.items():
    std = np.sqrt(m2 / count)
    std = np.where(std < min_std, 1.0, std)
    if inputs[m].ndim == 1:  # a scalar modality (example shape ()): one mean and std
      mean, std = mean.reshape(()), std.reshape(())
    stats[m] = (mean.astype(np.float32), std.astype(np.float32))
  return stats
