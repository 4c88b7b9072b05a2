"""A training config checked before anything compiles, and the pretrained file it names.

`validate_config` fails in a second with one line naming the field, not after compiling;
`train.train_and_evaluate` and the preflight call it.
"""

import os
from typing import Optional

import jax
import ml_collections

from vit_jax import models, models_resnet


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


BEST_MODES = {"test_accuracy": "max", "test_loss": "min"}  # config.best_metric -> orbax best_mode


def validate_config(
  config: ml_collections.ConfigDict, num_devices: Optional[int] = None, needs_data: bool = True
) -> None:
  """Checks values up front so that a mistake fails in a second, not after compiling.

  `num_devices`: the devices the run will use (default: this run's `jax.device_count()`);
  `needs_data=False` skips the dataset check (the preflight compiles shapes only).
  """

  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ConfigError(msg)

  need(
    config.model_name in models.MODEL_CONFIGS,
    f"config.model_name={config.model_name!r} is unknown; known: {', '.join(models.MODEL_CONFIGS)}",
  )
  need(
    bool(config.dataset) or not needs_data,
    "config.dataset is empty: set a tfds name, an image folder or "
    "'fashion_mnist' (--config.dataset=...)",
  )
  need(
    config.parallelism in ("jit", "pmap"),
    f"config.parallelism must be 'jit' or 'pmap', got {config.parallelism!r}",
  )
  need(
    not (config.fsdp and config.parallelism == "pmap"),
    "config.fsdp=True needs config.parallelism='jit'",
  )
  need(
    config.optimizer in ("sgd", "adamw"),
    f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}",
  )
  need(
    config.decay_type in ("cosine", "linear"),
    f"config.decay_type must be 'cosine' or 'linear', got {config.decay_type!r}",
  )
  for field in (
    "total_steps",
    "batch",
    "batch_eval",
    "accum_steps",
    "eval_every",
    "checkpoint_every",
    "progress_every",
  ):
    need(config[field] > 0, f"config.{field} must be positive, got {config[field]}")
  need(
    0 <= config.warmup_steps < config.total_steps,
    f"config.warmup_steps={config.warmup_steps} must be in [0, total_steps={config.total_steps})",
  )
  n = jax.device_count() if num_devices is None else num_devices
  need(config.batch % n == 0, f"config.batch={config.batch} is not divisible by the {n} devices")
  need(
    (config.batch // n) % config.accum_steps == 0,
    f"the per-device batch {config.batch // n} (config.batch={config.batch} over {n} devices)"
    f" is not divisible by config.accum_steps={config.accum_steps}",
  )
  need(
    config.batch_eval % n == 0,
    f"config.batch_eval={config.batch_eval} is not divisible by the {n} devices",
  )
  need(
    config.best_metric in ("",) + tuple(BEST_MODES),
    f"config.best_metric must be '' (off) or one of {', '.join(BEST_MODES)}, got "
    f"{config.best_metric!r}",
  )
  if config.fewshot.datasets:
    shots = tuple(config.fewshot.shots)
    need(
      bool(shots) and all(isinstance(k, int) and k > 0 for k in shots),
      f"config.fewshot.shots must be positive integers, got {shots}",
    )
    need(
      config.fewshot.seeds > 0, f"config.fewshot.seeds must be positive, got {config.fewshot.seeds}"
    )
    need(
      config.fewshot.every >= 0, f"config.fewshot.every must be >= 0, got {config.fewshot.every}"
    )
  try:
    model = models.get_model(config.model_name, 1, **config.model)
  except ValueError as e:
    raise ConfigError(f"config.model.{e}") from None
  # A hybrid cuts its patches from the stem's feature map: pixels per token = patch * stride.
  # A CNN (BiT) takes any size.
  patch = model.patch_size * models_resnet.stem_stride(model.resnet)
  need(
    models.is_bit(model) or config.pp.crop % patch == 0,
    f"config.pp.crop={config.pp.crop} is not a multiple of {config.model_name}'s "
    f"{'patch size' if model.resnet is None else 'pixels per token (patch x ResNet stride)'} "
    f"{patch}",
  )


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """The `.npz` to start from, or None with `from_scratch`; a missing file is a ConfigError."""
  if config.from_scratch:
    return None
  path = config.pretrained_path or os.path.join(config.pretrained_dir, f"{config.model_name}.npz")
  if not os.path.exists(path):
    raise ConfigError(
      f"pretrained checkpoint {path} not found. Download the original file:\n"
      f"  wget -P {config.pretrained_dir} {models.pretrained_url(config.model_name)}\n"
      f"(see checkpoints/README.md), set --config.pretrained_path, or "
      f"train from random weights with --config.from_scratch=True"
    )
  return path
