"""Device mesh, parameter shardings (data parallel, FSDP), batches as global arrays, and the
one object that holds what differs between the jit and the pmap path (`parallelism`).

The canonical training state is a tree of global `jax.Array`s on a 1-D mesh over every device
of every process, axis 'data'. The jit path uses it as is; the pmap path converts it to and from
per-device replicas (`to_pmap` / `from_pmap`) only at start-up and when checkpointing.
"""

from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """The 1-D 'data' mesh over `devices` (default: every device of every process)."""
  # Auto axes (classic sharding propagation); jax.make_mesh defaults to Explicit axes now.
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA,), axis_types=(AxisType.Auto,))
  return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Shards the largest axis that divides evenly over the devices; small leaves replicated."""
  axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
  if not axes or int(np.prod(shape)) < 2**14:
    return P()
  spec = [None] * len(shape)
  spec[axes[0]] = DATA
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool) -> Any:
  """NamedShardings for a state tree: replicated, or FSDP over the data axis."""
  n = mesh.shape[DATA]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, n) if fsdp else P()), abstract_state
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch (this process's slice) -> global arrays split over every device."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def pmap_batch(local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local batch -> [local_devices, per_device, ...] arrays, one shard per local device."""
  devices = jax.local_devices()
  return {
    k: _put_sharded(np.reshape(v, (len(devices), -1) + v.shape[1:]), devices)
    for k, v in local_batch.items()
  }


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


def put_global(tree: Any, shardings: Any) -> Any:
  """Host numpy tree -> global arrays; every process passes the same values (multi-host safe)."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
    tree,
    shardings,
  )


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathers FSDP shards across hosts)."""

  def get(x):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


class Jit:
  """`jax.jit` over the mesh: the running state is the canonical one, batches are global arrays."""

  axis_name: Optional[str] = None  # the step functions see the global batch

  def __init__(self, mesh: Mesh, state_shardings: Any):
    self.mesh, self.shardings = mesh, state_shardings

  def train_step(self, fn: Callable) -> Callable:
    return jax.jit(
      fn,
      in_shardings=(self.shardings, batch_sharding(self.mesh)),
      out_shardings=(self.shardings, None),
      donate_argnums=(0,),
    )

  def eval_step(self, fn: Callable) -> Callable:
    return jax.jit(fn, in_shardings=(self.shardings["params"], batch_sharding(self.mesh)))

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return global_batch(local_batch, self.mesh)

  def enter(self, state: Any) -> Any:
    """Canonical state -> the state the step runs on."""
    return state

  def canonical(self, run_state: Any) -> Any:
    """The running state -> canonical global arrays (to checkpoint or export)."""
    return run_state

  def fetch(self, tree: Any) -> Any:
    """Replicated step outputs (metrics) -> numpy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class Pmap(Jit):
  """`jax.pmap` over the local devices: a replica per device, per-device batches, `pmean`."""

  axis_name = "batch"

  def train_step(self, fn: Callable) -> Callable:
    return jax.pmap(fn, axis_name=self.axis_name, donate_argnums=(0,))

  def eval_step(self, fn: Callable) -> Callable:
    return jax.pmap(fn, axis_name=self.axis_name)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return pmap_batch(local_batch)

  def enter(self, state: Any) -> Any:
    return to_pmap(state)

  def canonical(self, run_state: Any) -> Any:
    return from_pmap(run_state, self.shardings)

  def fetch(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def parallelism(name: str, mesh: Mesh, state_shardings: Any) -> Jit:
  """`config.parallelism` ('jit' or 'pmap') as the object the training loop calls."""
  if name not in ("jit", "pmap"):
    raise ValueError(f"parallelism must be 'jit' or 'pmap', got {name!r}")
  return (Jit if name == "jit" else Pmap)(mesh, state_shardings)
