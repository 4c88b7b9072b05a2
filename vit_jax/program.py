"""From a config to what a run compiles: `build_program` (model, optimizer, state shardings,
jitted steps) and `batch_shapes`. `train.py` runs it; `preflight.py` compiles it for a TPU slice.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import models, optim, sharding, steps


@dataclasses.dataclass
class Program:
  """What a run compiles: the model, optimizer, state shapes and shardings, the jitted steps."""

  model: models.Model
  tx: Any
  lr_fn: Callable
  abstract: Any  # the state's shapes (jax.ShapeDtypeStruct tree)
  shardings: Any  # its NamedShardings on the mesh
  par: sharding.Jit
  train_step: Callable  # (state, batch) -> (state, metrics), state donated
  eval_step: Callable  # (params, batch) -> metrics


def build_program(
  config: ml_collections.ConfigDict,
  num_classes: int,
  mesh: jax.sharding.Mesh,
  platform: Optional[str] = None,
) -> Program:
  """The model, optimizer, state shardings and steps for `config` on `mesh`; compiles nothing.

  `platform` is the one the steps are compiled for (default: jax's default backend), which picks
  the model's platform defaults; the preflight passes 'tpu' to compile here for a TPU slice.
  """
  model = models.get_model(config.model_name, num_classes, platform=platform, **config.model)
  tx, lr_fn = optim.make_optimizer(config)
  abstract = jax.eval_shape(
    functools.partial(
      steps.init_state, model=model, tx=tx, image_size=config.pp.crop, seed=config.seed
    )
  )
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp)
  par = sharding.parallelism(config.parallelism, mesh, shardings)
  train_step = par.train_step(
    steps.make_train_step(model, tx, lr_fn, config, num_classes, axis_name=par.axis_name)
  )
  eval_step = par.eval_step(steps.make_eval_step(model, num_classes, axis_name=par.axis_name))
  return Program(model, tx, lr_fn, abstract, shardings, par, train_step, eval_step)


def batch_shapes(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The global train and eval batches the steps take, as shapes (what input_pipeline yields,
  over every process)."""
  crop = config.pp.crop
  image = jnp.bfloat16 if config.pp.bfloat16 else jnp.float32
  train = dict(
    image=jax.ShapeDtypeStruct((config.batch, crop, crop, 3), image),
    label=jax.ShapeDtypeStruct((config.batch,), jnp.int32),
  )
  n = config.batch_eval
  evals = dict(
    image=jax.ShapeDtypeStruct((n, crop, crop, 3), image),
    label=jax.ShapeDtypeStruct((n,), jnp.int32),
    mask=jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  return train, evals
