"""Learning-rate schedule and the optax optimizer, as google-research/vision_transformer."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def create_learning_rate_schedule(
  *, total_steps: int, base: float, decay_type: str, warmup_steps: int, linear_end: float = 1e-5
) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up, then cosine or linear decay. `step` is optax's 0-based update count.

  The anchor evaluates its schedule at the 0-based count, so its first update has lr 0; here
  update n (0-based) uses the rate of step n+1.
  """
  if decay_type not in ("cosine", "linear"):
    raise ValueError(f"decay_type must be 'cosine' or 'linear', got {decay_type!r}")

  def step_fn(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if decay_type == "cosine":
      lr = base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      lr = linear_end + (base - linear_end) * (1.0 - progress)
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr

  return step_fn


def _kernels_only(params: Any) -> Any:
  """Weight decay mask: matrices and conv kernels, not biases, LayerNorm or embeddings."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) == "kernel", params
  )


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (tx, lr_fn) for `config.optimizer` in {'sgd', 'adamw'}."""
  lr_fn = create_learning_rate_schedule(
    total_steps=config.total_steps,
    base=config.base_lr,
    decay_type=config.decay_type,
    warmup_steps=config.warmup_steps,
    linear_end=config.linear_end,
  )
  dtype = jnp.dtype(config.optim_dtype)
  parts = []
  if config.grad_norm_clip:
    parts.append(optax.clip_by_global_norm(config.grad_norm_clip))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=_kernels_only))
    parts.append(optax.sgd(lr_fn, momentum=config.momentum, accumulator_dtype=dtype))
  elif config.optimizer == "adamw":
    parts.append(
      optax.adamw(lr_fn, weight_decay=config.weight_decay, mask=_kernels_only, mu_dtype=dtype)
    )
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  return optax.chain(*parts), lr_fn
