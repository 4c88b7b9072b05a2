r"""The `testing` model (1 block, width 10) at 32 px: a smoke test of the whole loop in seconds.

  python -m vit_jax.main --config=configs/testing.py --workdir=/tmp/vit_testing \
      --config.dataset=/path/to/image/folder

Expected: it runs 12 steps from random weights, writes checkpoints at steps 4, 8, 12 and
`params.npz`; accuracy depends on the folder. The tests use this config.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.get_config()
  config.model_name = "testing"
  config.model.dropout_rate = 0.0  # the preset has 0.1; the tests compare runs without it
  config.from_scratch = True
  config.pp.crop = 32
  config.batch = 32
  config.batch_eval = 16
  config.total_steps = 12
  config.warmup_steps = 2
  config.base_lr = 0.1
  config.eval_every = 6
  config.checkpoint_every = 4
  config.progress_every = 2
  config.keep_checkpoints = 10
  config.shuffle_buffer = 1_000
  config.lock()
  return config
