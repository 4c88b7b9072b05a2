"""A run's orbax checkpoints: the managers (the latest steps for resuming, the best one by
`config.best_metric` on validation), the early-stopping count, and the resume ladder that gives
the starting state.
"""

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vit_jax import checkpoint, sharding, steps
from vit_jax.config_checks import BEST_MODES, ConfigError, pretrained_path

State = steps.State


def checkpoint_manager(directory: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints, enable_async_checkpointing=config.async_checkpoints
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def best_checkpoint_manager(workdir: str, config) -> Optional[ocp.CheckpointManager]:
  """WORKDIR/checkpoints_best/: the one checkpoint with the best `config.best_metric`, None when
  that is off. A manager of its own, so that `keep_checkpoints` (the latest, for resuming) never
  deletes the best; orbax stores the metric with the step, so a resumed run still knows it."""
  if not config.best_metric:
    return None
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    best_fn=lambda m: m[config.best_metric],
    best_mode=BEST_MODES[config.best_metric],
    enable_async_checkpointing=config.async_checkpoints,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints_best")),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


class Selection:
  """The best value of `config.best_metric` so far, its step, and the evaluations since then
  (early stopping). Rebuilt from the best manager on resume: its steps after `first_step` are
  forgotten (the resumed run evaluates them again, to the same values), and the evaluations
  between the best step and `first_step` are counted from `config.eval_every`."""

  def __init__(self, config, best_mngr: ocp.CheckpointManager, first_step: int):
    self.metric, self.mngr = config.best_metric, best_mngr
    self.maximise = BEST_MODES[config.best_metric] == "max"
    self.patience = config.early_stop_patience
    for step in best_mngr.all_steps():
      if step > first_step:
        best_mngr.delete(step)
    self.best_step = best_mngr.best_step()
    self.best_value, self.since = None, 0
    if self.best_step is not None:
      self.best_value = float(best_mngr.metrics(self.best_step)[self.metric])
      every = config.eval_every
      self.since = first_step // every - self.best_step // every

  def update(self, step: int, value: float) -> bool:
    """Records an evaluation; True when it is a new best (then save it to the best manager)."""
    better = self.best_value is None or (
      value > self.best_value if self.maximise else value < self.best_value
    )
    if better:
      self.best_step, self.best_value, self.since = step, value, 0
    else:
      self.since += 1
    return better

  @property
  def exhausted(self) -> bool:
    """Whether `early_stop_patience` evaluations in a row did not improve the best."""
    return bool(self.patience) and self.since >= self.patience


def export_best(
  best_mngr: ocp.CheckpointManager, target: State, path: str, metadata: dict[str, Any], metric: str
) -> tuple[int, State]:
  """Writes the best checkpoint's params to `path` (.npz + .json, which names the metric and
  split that chose it); returns its step and its state (sharded like `target`)."""
  step = best_mngr.best_step()
  state = best_mngr.restore(step, args=ocp.args.StandardRestore(target))
  params = sharding.to_host(state["params"])
  if jax.process_index() == 0:
    checkpoint.save_npz(
      params, path, metadata=dict(metadata, best_step=step, best_metric=metric, chosen_on="val")
    )
  return step, state


def _resume_dir(path: str) -> str:
  """config.resume may name a workdir, its checkpoints/ folder, or one step folder."""
  path = os.path.normpath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "default")):
    return path  # a step folder holds no numbered folders itself: the loop below misses it
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
      return candidate
  raise ConfigError(
    f"config.resume={path!r}: no orbax checkpoints there (expected a workdir, "
    "its checkpoints/ folder, or a step folder)"
  )


def initial_state(
  config, model, tx, mngr: ocp.CheckpointManager, abstract: State, shardings: Any
) -> tuple[State, str]:
  """The resume ladder. Returns the starting state (global arrays with `shardings`) and where it
  came from: 1. the workdir's latest checkpoint; 2. `config.resume`; 3. the pretrained `.npz`
  (the step stays 0); 4. random weights with `config.from_scratch`."""
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  latest = mngr.latest_step()
  if latest is not None:
    state = mngr.restore(latest, args=ocp.args.StandardRestore(target))
    return state, f"resumed from {mngr.directory}/{latest}"
  if config.resume:
    other = _resume_dir(config.resume)
    if os.path.basename(os.path.normpath(other)).isdigit():
      step_dir = os.path.normpath(other)
      other, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
    else:
      step = None
    omngr = checkpoint_manager(other, config)
    step = omngr.latest_step() if step is None else step
    state = omngr.restore(step, args=ocp.args.StandardRestore(target))
    return state, f"resumed from config.resume={other}/{step}"

  init_fn = functools.partial(
    steps.init_state, model=model, tx=tx, image_size=config.pp.crop, seed=config.seed
  )
  path = pretrained_path(config)
  if path is None:
    state = jax.jit(init_fn, out_shardings=shardings)()
    return state, "random initialisation (config.from_scratch)"
  init_params = sharding.to_host(
    jax.jit(lambda: init_fn()["params"], out_shardings=shardings["params"])()
  )
  params = checkpoint.load_pretrained(
    pretrained_path=path, init_params=init_params, model_config=model
  )
  params = sharding.put_global(params, shardings["params"])
  state = jax.jit(
    lambda p: dict(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
    out_shardings=shardings,
  )(params)
  return state, f"pretrained {path}"
