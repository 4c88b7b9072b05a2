"""Fine-tunes a ViT: `python -m vit_jax.main --config=configs/shoes.py --workdir=DIR`.

Multi-process runs (TPU VM pods, several GPU nodes) start `jax.distributed` here: automatically
on Cloud TPU VMs and under SLURM/Open MPI, or from --coordinator_address / --num_processes /
--process_id (the names `jax.distributed.initialize` uses).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (file.py or file.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the export.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])

# Env variables that mean "several processes": SLURM, Open MPI, Cloud TPU pods, or ours.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                      "JAX_COORDINATOR_ADDRESS")


def _start_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif any(int(os.environ.get(v, "1") or 1) > 1 if v.endswith(("NTASKS", "SIZE")) else
           v in os.environ for v in _MULTI_PROCESS_ENV):
    jax.distributed.initialize()  # JAX reads the cluster from the environment


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TF only feeds data; the accelerators are JAX's
  _start_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, input_pipeline, train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, %d local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices())
  user_errors = (train.ConfigError, checkpoint.CheckpointError,
                 getattr(input_pipeline, "DataError", ValueError), train.TrainingDiverged)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except user_errors as e:
    # A user's mistake: one readable message, no traceback.
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
