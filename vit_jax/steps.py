"""The training and evaluation step functions, and a fresh state: pure JAX, no TensorFlow.

`train` compiles them for its parallelism (`sharding.Jit` / `sharding.Pmap`); the benchmarks time
exactly these. `axis_name` is set for the pmap path (per-device batch, `pmean`).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

State = dict[str, Any]  # {'step': int32 scalar, 'params': tree, 'opt_state': tree}


def init_state(*, model, tx, image_size: int, seed: int) -> State:
  """A fresh state from random weights: what `jax.eval_shape` reads the shapes from."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = model.init({"params": jax.random.key(seed)}, x, train=False)["params"]
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def is_stochastic(model) -> bool:
  """Whether the model draws random numbers in training (dropout, stochastic depth)."""
  return any(
    getattr(model, f, 0.0) > 0.0
    for f in ("dropout_rate", "attention_dropout_rate", "stochastic_depth")
  )


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  lr_fn: Callable,
  config,
  num_classes: int,
  axis_name: Optional[str] = None,
) -> Callable:
  """One update. With dropout, example r of the global batch draws from fold_in(step key, r):
  the numbers are those of one device, whatever the devices, processes, pmap or accumulation."""
  accum = config.accum_steps
  stochastic = is_stochastic(model)

  def logits_fn(params, images, rows, rng):
    if not stochastic:
      return model.apply({"params": params}, images, train=True)

    def one(image, row):
      rngs = {"dropout": jax.random.fold_in(rng, row)}
      return model.apply({"params": params}, image[None], train=True, rngs=rngs)[0]

    return jax.vmap(one)(images, rows)

  def loss_fn(params, images, labels, rows, rng):
    logits = logits_fn(params, images, rows, rng)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    params, images, labels = state["params"], batch["image"], batch["label"]
    rows = jnp.arange(images.shape[0])  # this device's rows of the global batch
    if axis_name:
      rows += jax.lax.axis_index(axis_name) * images.shape[0]
    if accum == 1:
      loss, grads = grad_fn(params, images, labels, rows, rng)
    else:
      # Micro-batch i holds rows r with r % accum == i: the same examples on both paths.
      split = lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1)

      def micro(carry, xs):
        loss_i, g = grad_fn(params, *xs, rng)
        return jax.tree.map(jnp.add, carry, (loss_i, g)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(micro, zeros, (split(images), split(labels), split(rows)))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    if axis_name:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(
      step=state["step"] + 1, params=optax.apply_updates(params, updates), opt_state=opt_state
    )
    return new_state, dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state["step"]))

  return train_step


def make_eval_step(model, num_classes: int, axis_name: Optional[str] = None) -> Callable:

  def eval_step(params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    sums = dict(
      correct=jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
      loss=jnp.sum(losses * mask),
      count=jnp.sum(mask),
    )
    return jax.lax.psum(sums, axis_name) if axis_name else sums

  return eval_step
