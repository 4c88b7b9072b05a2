"""Fine-tunes a ViT: `python -m vit_jax.main --config=configs/shoes.py --workdir=DIR`.

Multi-process runs (Cloud TPU VM pods, several GPU nodes) start `jax.distributed` here, before
anything touches a device:
* on a Cloud TPU VM, and under SLURM (`srun`, more than one task) or Open MPI <= 4 (`mpirun`,
  more than one rank), `jax.distributed.initialize()` reads the cluster itself;
* anywhere, --coordinator_address=HOST:PORT --num_processes=N --process_id=I (the names
  `jax.distributed.initialize` uses) or the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID give them explicitly (a flag wins over its variable). Given
  all three, jax's cluster detection is off, so each process uses every device it can see
  (on GPUs, CUDA_VISIBLE_DEVICES decides); given some, a detected cluster supplies the rest.
A single-process run needs nothing. Only process 0 logs INFO; the others log warnings and errors.
"""

import json
import os
import sys
from typing import Any, Mapping, NoReturn, Optional

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (file.py or file.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the export.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (multi-process runs; env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None,
                     "Number of processes (multi-process runs; env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None,
                     "This process's index, 0..N-1 (multi-process runs; env JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

# What jax 0.10.2's SlurmCluster needs to configure itself (jax/_src/clusters/slurm_cluster.py):
# set by `srun`; a batch script's own shell is not one of the tasks.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


class DistributedSetupError(ValueError):
  """Flags or environment that cannot start a multi-process run; the message says why."""


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  if "tpu" not in environ.get("JAX_PLATFORMS", "tpu"):
    return False  # e.g. JAX_PLATFORMS=cpu: a run that does not use the TPU joins no TPU cluster
  # `import jax` probes the TPU chips (cloud_tpu_init) without starting a backend; this private
  # flag is what jax's own TPU cluster detection checks.
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detected_cluster(environ: Mapping[str, str]) -> Optional[str]:
  """The multi-process cluster `jax.distributed.initialize()` configures itself for, or None."""
  if all(v in environ for v in _SLURM_VARS) and (_int_env(environ, "SLURM_NTASKS") or 1) > 1:
    return "SLURM"
  # jax's OmpiCluster reads the coordinator from ORTE's URI, which only Open MPI <= 4 sets.
  if ("OMPI_MCA_orte_hnp_uri" in environ
      and (_int_env(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1):
    return "Open MPI"
  if _on_cloud_tpu_vm(environ):  # single-host VMs too: jax then finds a cluster of one worker
    return "Cloud TPU VM"
  return None


def distributed_args(coordinator_address: Optional[str], num_processes: Optional[int],
                     process_id: Optional[int],
                     environ: Mapping[str, str]) -> Optional[dict[str, Any]]:
  """kwargs for `jax.distributed.initialize`, or None for a single-process run.

  Raises DistributedSetupError for a combination that cannot work, before any JAX work.
  """
  given = {
      "coordinator_address": coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None,
      "num_processes": (num_processes if num_processes is not None
                        else _int_env(environ, "JAX_NUM_PROCESSES")),
      "process_id": process_id if process_id is not None else _int_env(environ, "JAX_PROCESS_ID"),
  }
  given = {k: v for k, v in given.items() if v is not None}
  if len(given) == 3:
    address, n, i = given["coordinator_address"], given["num_processes"], given["process_id"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedSetupError(
          f"--coordinator_address={address!r} (or JAX_COORDINATOR_ADDRESS) is not HOST:PORT")
    if n < 1 or not 0 <= i < n:
      raise DistributedSetupError(
          f"--process_id={i} must be in [0, --num_processes={n}) (or JAX_PROCESS_ID, "
          "JAX_NUM_PROCESSES)")
    # Explicit values mean exactly these processes: without 'deactivate', jax would still detect
    # SLURM/Open MPI and restrict each process to the GPU numbered by its local rank.
    return dict(given, cluster_detection_method="deactivate")
  cluster = detected_cluster(environ)
  if cluster is None and (given or (_int_env(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1):
    # Open MPI 5 (PMIx) sets no ORTE URI: N processes would each train alone into one workdir.
    missing = [f"--{k} (or {env})" for k, env in (
        ("coordinator_address", "JAX_COORDINATOR_ADDRESS"), ("num_processes", "JAX_NUM_PROCESSES"),
        ("process_id", "JAX_PROCESS_ID")) if k not in given]
    have = ", ".join(f"--{k}={v}" for k, v in given.items()) or (
        f"OMPI_COMM_WORLD_SIZE={environ['OMPI_COMM_WORLD_SIZE']}")
    raise DistributedSetupError(
        f"a multi-process run needs {', '.join(missing)} as well as {have}; under srun, "
        "Open MPI <= 4's mpirun or on a Cloud TPU VM jax finds them itself")
  if cluster is None:
    return None
  logging.info("%s detected: jax.distributed.initialize() reads the cluster", cluster)
  return given  # jax fills in the rest from the cluster's environment


def _fail(e: Exception) -> NoReturn:
  """A user's mistake: a readable message on stderr, exit code 2, no traceback."""
  logging.error("%s", e)
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:  # flags first: a bad combination fails in a second, before TensorFlow or a device
    dist = distributed_args(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                            os.environ)
  except DistributedSetupError as e:
    _fail(e)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TF only feeds data; the accelerators are JAX's
  import jax  # pylint: disable=g-import-not-at-top
  if dist is not None:
    try:
      jax.distributed.initialize(**dist)
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. no coordinator within the timeout
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]  # XLA errors run long
      _fail(DistributedSetupError(f"jax.distributed.initialize({dist}) failed: {first_line}"))
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # N copies of every INFO line help nobody
  from vit_jax import checkpoint, input_pipeline, train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, %d local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices())
  user_errors = (train.ConfigError, checkpoint.CheckpointError,
                 getattr(input_pipeline, "DataError", ValueError), train.TrainingDiverged)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except user_errors as e:
    _fail(e)
  print(json.dumps(summary), flush=True)
  if jax.distributed.is_initialized():
    # After the run's final barrier: leave together, so that process 0 (the coordination
    # service) does not go away while another process still talks to it.
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
