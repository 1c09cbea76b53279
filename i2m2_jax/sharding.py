"""Devices and data parallelism: the mesh, shardings, global batches across processes, the pmap
layout, and copies to the host.

Under jit the state is replicated (`P()`) and every batch is split on its leading axis over the
'data' mesh axis; under pmap (`config.parallel='pmap'`) the batch is reshaped to [devices,
B / devices, ...] and the step runs once per device over the axis PMAP_AXIS.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"   # the jit mesh axis
PMAP_AXIS = "batch"  # the pmap axis name (BatchNorm layers average their statistics over it)
Batch = Mapping[str, Any]


def make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: Batch, mesh: Mesh) -> Batch:
  """This process's batch as part of a global array sharded over every device of every process."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def split_for_pmap(local_batch: Batch) -> Batch:
  """[B, ...] -> [local devices, B / local devices, ...]."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), local_batch)


def replicate_for_pmap(tree):
  return flax.jax_utils.replicate(jax.device_get(tree))


def unreplicate_from_pmap(tree, mesh: Mesh):
  return jax.device_put(jax.device_get(flax.jax_utils.unreplicate(tree)), replicated(mesh))


def to_host(tree):
  """Host numpy copy of replicated (possibly multi-process) arrays."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def gather_to_host(tree):
  """Host numpy copy of data-sharded arrays, gathered from every process."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
