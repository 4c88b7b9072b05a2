"""Device mesh, parameter shardings (data parallel, FSDP) and batches as global arrays.

The canonical training state is a tree of global `jax.Array`s on a 1-D mesh over every device
of every process, axis 'data'. The jit path uses it as is; the pmap path converts it to and from
per-device replicas (`to_pmap` / `from_pmap`) only at start-up and when checkpointing.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh() -> Mesh:
  # Auto axes (classic sharding propagation); jax.make_mesh defaults to Explicit axes now.
  return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=(AxisType.Auto,))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Shards the largest axis that divides evenly over the devices; small leaves replicated."""
  axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
  if not axes or int(np.prod(shape)) < 2 ** 14:
    return P()
  spec = [None] * len(shape)
  spec[axes[0]] = DATA
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool) -> Any:
  """NamedShardings for a state tree: replicated, or FSDP over the data axis."""
  n = mesh.shape[DATA]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, n) if fsdp else P()), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch (this process's slice) -> global arrays split over every device."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def pmap_batch(local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local batch -> [local_devices, per_device, ...] arrays, one shard per local device."""
  devices = jax.local_devices()
  return {k: _put_sharded(np.reshape(v, (len(devices), -1) + v.shape[1:]), devices)
          for k, v in local_batch.items()}


def _put_sharded(stacked: np.ndarray, devices: list) -> jax.Array:
  """Row i of `stacked` onto devices[i] (what the removed jax.device_put_sharded did)."""
  mesh = Mesh(np.array(devices), ("local",))
  return jax.device_put(stacked, NamedSharding(mesh, P("local")))


def to_pmap(state: Any) -> Any:
  """Canonical (replicated) global state -> a replica per local device, for jax.pmap."""
  devices = jax.local_devices()

  def put(x):
    local = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
    return _put_sharded(np.broadcast_to(local, (len(devices),) + local.shape), devices)

  return jax.tree.map(put, state)


def from_pmap(pstate: Any, shardings: Any) -> Any:
  """Replicas of a pmap state -> canonical global arrays with `shardings` (all processes)."""
  def get(x, s):
    local = np.asarray(x.addressable_data(0))[0]  # this device's replica, leading axis 1
    return jax.make_array_from_callback(local.shape, s, lambda idx: local[idx])

  return jax.tree.map(get, pstate, shardings)
