"""A training config checked before anything compiles, its schedule in steps, and the
pretrained file it names.

`validate_config` fails in a second with one line naming the field, not after compiling;
`train.train_and_evaluate` and the preflight call it. `resolve_schedule` turns epochs into steps
once the train split's size is known.
"""

import math
import os
from typing import Optional

import jax
import ml_collections

from vit_jax import models, models_resnet


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


BEST_MODES = {"val_accuracy": "max", "val_loss": "min"}  # config.best_metric -> orbax best_mode


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
  need(
    config.best_metric not in ("test_accuracy", "test_loss"),
    f"config.best_metric={config.best_metric!r} would choose the checkpoint on the test split, "
    f"which must be read once, at the end: use {config.best_metric.replace('test_', 'val_')!r}",
  )
  need(
    config.early_stop_patience >= 0,
    f"config.early_stop_patience must be >= 0, got {config.early_stop_patience}",
  )
  need(
    not config.early_stop_patience or config.best_metric,
    "config.early_stop_patience needs config.best_metric (val_accuracy or val_loss) to watch",
  )
  need(
    0 <= config.val_fraction < 1,
    f"config.val_fraction must be in [0, 1), got {config.val_fraction}",
  )
  by_epochs = config.num_epochs > 0
  need(
    config.num_epochs >= 0 and config.warmup_epochs >= 0,
    "config.num_epochs and config.warmup_epochs must be >= 0",
  )
  need(
    not (by_epochs and config.total_steps),
    f"config.num_epochs={config.num_epochs} and config.total_steps={config.total_steps} are "
    "both set: set one (--config.total_steps=0 to train by epochs)",
  )
  need(
    not (config.warmup_epochs and config.warmup_steps),
    f"config.warmup_epochs={config.warmup_epochs} and config.warmup_steps="
    f"{config.warmup_steps} are both set: set one (--config.warmup_steps=0)",
  )
  for field in (
    *(() if by_epochs else ("total_steps",)),
    "batch",
    "batch_eval",
    "accum_steps",
    "eval_every",
    "checkpoint_every",
    "progress_every",
  ):
    need(config[field] > 0, f"config.{field} must be positive, got {config[field]}")
  need(  # by epochs, resolve_schedule checks the warmup once the steps are known
    by_epochs or 0 <= config.warmup_steps < config.total_steps,
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


def resolve_schedule(
  config: ml_collections.ConfigDict, num_train: int
) -> tuple[ml_collections.ConfigDict, Optional[str]]:
  """`config` with `total_steps` and `warmup_steps` in steps, and the line that says how epochs
  became steps (None when the config gives steps): steps = ceil(epochs * num_train / batch)."""
  if not (config.num_epochs or config.warmup_epochs):
    return config, None
  config = config.copy_and_resolve_references()
  parts = []
  with config.unlocked():
    if config.num_epochs:
      config.total_steps = math.ceil(config.num_epochs * num_train / config.batch)
      parts.append(
        f"num_epochs={config.num_epochs:g}: ceil({config.num_epochs:g} x {num_train:,} train "
        f"examples / batch {config.batch}) = {config.total_steps:,} steps"
      )
    if config.warmup_epochs:
      config.warmup_steps = math.ceil(config.warmup_epochs * num_train / config.batch)
      parts.append(f"warmup_epochs={config.warmup_epochs:g}: {config.warmup_steps:,} steps")
  if not 0 <= config.warmup_steps < config.total_steps:
    raise ConfigError(
      f"warmup of {config.warmup_steps} steps is not shorter than the {config.total_steps} "
      "training steps; lower config.warmup_epochs / warmup_steps"
    )
  return config, "; ".join(parts)


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
