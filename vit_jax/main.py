"""Fine-tunes a ViT: `python -m vit_jax.main --config=configs/shoes.py --workdir=DIR`.

Multi-process runs start `jax.distributed` here, before anything touches a device: with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; a flag wins over its variable), or,
given none of them, by jax's own cluster detection (Cloud TPU VM, SLURM's `srun`, Open MPI's
`mpirun`). Where jax finds no cluster, the run is a single process.
"""

import json
import os
import sys
from typing import Any, Mapping, NoReturn, Optional

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Training config file (file.py or file.py:arg).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the export.")
flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 (multi-process runs; env JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
  "num_processes", None, "Number of processes (multi-process runs; env JAX_NUM_PROCESSES)."
)
flags.DEFINE_integer(
  "process_id", None, "This process's index, 0..N-1 (multi-process runs; env JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])

_ENV = dict(
  coordinator_address="JAX_COORDINATOR_ADDRESS",
  num_processes="JAX_NUM_PROCESSES",
  process_id="JAX_PROCESS_ID",
)
# What jax.distributed.initialize() raises when its cluster detection finds no cluster.
_NO_CLUSTER = "coordinator_address should be defined"


class DistributedSetupError(ValueError):
  """Flags or environment that cannot start a multi-process run; the message says why."""


def distributed_args(
  coordinator_address: Optional[str],
  num_processes: Optional[int],
  process_id: Optional[int],
  environ: Mapping[str, str],
) -> dict[str, Any]:
  """kwargs for `jax.distributed.initialize`: all three values, or {} for jax's detection.

  Raises DistributedSetupError, before any JAX work, for a half-given set or a bad value.
  """
  flag_values = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  given: dict[str, Any] = {}
  for name, env in _ENV.items():
    value = flag_values[name]
    if value is None and environ.get(env, "").strip():
      value = environ[env].strip()
      if name != "coordinator_address":
        try:
          value = int(value)
        except ValueError:
          raise DistributedSetupError(f"{env}={value!r} is not an integer") from None
    if value is not None:
      given[name] = value
  if not given:
    return {}
  if len(given) < 3:
    missing = [f"--{k} (or {_ENV[k]})" for k in _ENV if k not in given]
    have = ", ".join(f"--{k}={v}" for k, v in given.items())
    raise DistributedSetupError(f"a multi-process run needs {', '.join(missing)} as well as {have}")
  address, n, i = given["coordinator_address"], given["num_processes"], given["process_id"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedSetupError(
      f"--coordinator_address={address!r} (or JAX_COORDINATOR_ADDRESS) is not HOST:PORT"
    )
  if n < 1 or not 0 <= i < n:
    raise DistributedSetupError(
      f"--process_id={i} must be in [0, --num_processes={n}) (or JAX_PROCESS_ID, JAX_NUM_PROCESSES)"
    )
  # Explicit values mean exactly these processes: without 'deactivate', jax would still detect
  # SLURM/Open MPI and restrict each process to the GPU numbered by its local rank.
  return dict(given, cluster_detection_method="deactivate")


def start_distributed(args: dict[str, Any]) -> None:
  """Starts `jax.distributed` with `args`, or with jax's cluster detection when they are empty;
  where that detection finds no cluster, this is a single-process run."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.distributed.initialize(**args)
  except ValueError as e:
    if args or _NO_CLUSTER not in str(e):
      raise DistributedSetupError(
        f"jax.distributed.initialize({args}) failed: {_first_line(e)}"
      ) from None
    ranks = os.environ.get("OMPI_COMM_WORLD_SIZE", "1")
    if ranks.isdigit() and int(ranks) > 1:
      # Open MPI 5 sets no variable jax reads: N processes would each train alone.
      raise DistributedSetupError(
        f"OMPI_COMM_WORLD_SIZE={ranks} but jax found no cluster to join (it reads Open MPI "
        "<= 4's variables): pass --coordinator_address, --num_processes and --process_id "
        "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
      ) from None
  except (TypeError, RuntimeError) as e:  # e.g. no coordinator within the timeout
    raise DistributedSetupError(
      f"jax.distributed.initialize({args}) failed: {_first_line(e)}"
    ) from None


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]  # XLA errors run long


def fail(e: Exception) -> NoReturn:
  """A user's mistake: a readable message on stderr, exit code 2, no traceback."""
  logging.error("%s", e)
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:  # flags first: a bad combination fails in a second, before TensorFlow or a device
    dist = distributed_args(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, os.environ
    )
  except DistributedSetupError as e:
    fail(e)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")  # TF only feeds data; the accelerators are JAX's
  import jax  # pylint: disable=g-import-not-at-top

  try:
    start_distributed(dist)
  except DistributedSetupError as e:
    fail(e)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # N copies of every INFO line help nobody
  from vit_jax import train  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX process %d/%d, %d local devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.local_devices(),
  )
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  # ConfigError, CheckpointError and the data sources' errors are ValueErrors that name the
  # field, file or split.
  except (ValueError, train.TrainingDiverged) as e:
    fail(e)
  print(json.dumps(summary), flush=True)
  if jax.distributed.is_initialized():
    # After the run's final barrier: leave together, so that process 0 (the coordination
    # service) does not go away while another process still talks to it.
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
