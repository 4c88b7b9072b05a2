"""Fine-tuning loop: `train_and_evaluate(config, workdir)`.

Shapes first (`jax.eval_shape`), state created already sharded, one jitted update with donated
state, the step in the state and the rng derived from it: a resumed run computes exactly what an
uninterrupted one does. Initialisation follows the resume ladder: the workdir's own latest
checkpoint, else `config.resume`, else the pretrained `.npz` (which never sets the step), else
random weights when `config.from_scratch`.
"""

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vit_jax import (checkpoint, input_pipeline, metrics, models, models_resnet, models_vit, optim,
                     sharding)

State = dict[str, Any]  # {'step': int32 scalar, 'params': tree, 'opt_state': tree}
PMAP_AXIS = "batch"


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class TrainingDiverged(RuntimeError):
  """Loss or gradient norm became NaN or inf."""


# ---------------------------------------------------------------------------------------------
# Configuration.

def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks values up front so that a mistake fails in a second, not after compiling."""
  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ConfigError(msg)

  need(config.model_name in models.MODEL_CONFIGS,
       f"config.model_name={config.model_name!r} is unknown; known: "
       f"{', '.join(models.MODEL_CONFIGS)}")
  need(bool(config.dataset), "config.dataset is empty: set a tfds name, an image folder or "
       "'fashion_mnist' (--config.dataset=...)")
  need(config.parallelism in ("jit", "pmap"),
       f"config.parallelism must be 'jit' or 'pmap', got {config.parallelism!r}")
  need(not (config.fsdp and config.parallelism == "pmap"),
       "config.fsdp=True needs config.parallelism='jit'")
  need(config.optimizer in ("sgd", "adamw"),
       f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  need(config.decay_type in ("cosine", "linear"),
       f"config.decay_type must be 'cosine' or 'linear', got {config.decay_type!r}")
  need(config.model.dtype in ("float32", "bfloat16"),
       f"config.model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
  need(config.model.remat_policy in models_vit.REMAT_POLICIES,
       f"config.model.remat_policy must be one of {', '.join(models_vit.REMAT_POLICIES)}, got "
       f"{config.model.remat_policy!r}")
  need(config.model.attention_impl in ("", "cudnn"),
       f"config.model.attention_impl must be '' (XLA) or 'cudnn', got "
       f"{config.model.attention_impl!r}")
  for field in ("total_steps", "batch", "batch_eval", "accum_steps", "eval_every",
                "checkpoint_every", "progress_every"):
    need(config[field] > 0, f"config.{field} must be positive, got {config[field]}")
  need(0 <= config.warmup_steps < config.total_steps,
       f"config.warmup_steps={config.warmup_steps} must be in [0, total_steps="
       f"{config.total_steps})")
  n = jax.device_count()
  need(config.batch % n == 0,
       f"config.batch={config.batch} is not divisible by the {n} devices")
  need((config.batch // n) % config.accum_steps == 0,
       f"the per-device batch {config.batch // n} (config.batch={config.batch} over {n} devices)"
       f" is not divisible by config.accum_steps={config.accum_steps}")
  need(config.batch_eval % n == 0,
       f"config.batch_eval={config.batch_eval} is not divisible by the {n} devices")
  resnet = _resnet_override(config) or models.MODEL_CONFIGS[config.model_name]["resnet"]
  try:
    stride = models_resnet.stem_stride(resnet)
  except ValueError as e:
    raise ConfigError(f"config.model.{e}") from None
  # A hybrid cuts its patches from the stem's feature map: pixels per token = patch * stride.
  patch = models.MODEL_CONFIGS[config.model_name]["patch_size"] * stride
  need(config.pp.crop % patch == 0,
       f"config.pp.crop={config.pp.crop} is not a multiple of {config.model_name}'s "
       f"{'patch size' if resnet is None else 'pixels per token (patch x ResNet stride)'} {patch}")


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """The `.npz` to start from, or None with `from_scratch`; a missing file is a ConfigError."""
  if config.from_scratch:
    return None
  path = config.pretrained_path or os.path.join(config.pretrained_dir, f"{config.model_name}.npz")
  if not os.path.exists(path):
    raise ConfigError(
        f"pretrained checkpoint {path} not found. Download the original ImageNet-21k file:\n"
        f"  wget -P {config.pretrained_dir} https://storage.googleapis.com/vit_models/imagenet21k/"
        f"{config.model_name}.npz\n(see checkpoints/README.md), set --config.pretrained_path, or "
        f"train from random weights with --config.from_scratch=True")
  return path


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  m = config.model
  return models.get_model(
      config.model_name, num_classes, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate, stochastic_depth=m.stochastic_depth,
      representation_size=m.representation_size, classifier=m.classifier,
      gelu_approximate=m.gelu_approximate, recompute_gelu=m.recompute_gelu,
      dtype=jnp.dtype(m.dtype), remat=m.remat, remat_policy=m.remat_policy,
      attention_impl=m.attention_impl or None,
      resnet=_resnet_override(config))


def _resnet_override(config: ml_collections.ConfigDict) -> Optional[dict[str, Any]]:
  """`config.model.resnet` over the preset's stem; None when neither field is set."""
  r = config.model.resnet
  if r.num_layers is None and r.width_factor is None:
    return None
  preset = (models.MODEL_CONFIGS.get(config.model_name, {}).get("resnet") or
            models_resnet.ResNetConfig())
  return dict(num_layers=preset.num_layers if r.num_layers is None else r.num_layers,
              width_factor=preset.width_factor if r.width_factor is None else r.width_factor)


# ---------------------------------------------------------------------------------------------
# The step functions. `axis_name` is set for the pmap path (per-device batch, pmean).

def make_train_step(model, tx: optax.GradientTransformation, lr_fn: Callable, config,
                    num_classes: int, axis_name: Optional[str] = None) -> Callable:
  accum = config.accum_steps

  def loss_fn(params, images, labels, rng):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    if axis_name:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    params, images, labels = state["params"], batch["image"], batch["label"]
    if accum == 1:
      loss, grads = grad_fn(params, images, labels, rng)
    else:
      # Micro-batch i holds rows r with r % accum == i: the same examples on both paths.
      split = lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1)

      def micro(carry, xs):
        i, img, lab = xs
        loss_i, g = grad_fn(params, img, lab, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, g)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), split(images),
                                                     split(labels)))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    if axis_name:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    return new_state, dict(loss=loss, grad_norm=optax.tree.norm(grads),
                           lr=lr_fn(state["step"]))

  return train_step


def make_eval_step(model, num_classes: int, axis_name: Optional[str] = None) -> Callable:

  def eval_step(params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    sums = dict(correct=jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
                loss=jnp.sum(losses * mask), count=jnp.sum(mask))
    return jax.lax.psum(sums, axis_name) if axis_name else sums

  return eval_step


# ---------------------------------------------------------------------------------------------
# State: creation, the resume ladder, host copies.

def _put(tree: Any, shardings: Any) -> Any:
  """Host numpy tree -> global arrays; every process passes the same values (multi-host safe)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathers FSDP shards across hosts)."""
  def get(x):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def _checkpoint_manager(directory: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpoints)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _resume_dir(path: str) -> str:
  """config.resume may name a workdir, its checkpoints/ folder, or one step folder."""
  path = os.path.normpath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "default")):
    return path  # a step folder holds no numbered folders itself: the loop below misses it
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
      return candidate
  raise ConfigError(f"config.resume={path!r}: no orbax checkpoints there (expected a workdir, "
                    "its checkpoints/ folder, or a step folder)")


def initial_state(config, model, tx, mngr: ocp.CheckpointManager, abstract: State,
                  shardings: Any) -> tuple[State, str]:
  """Returns the starting state (global arrays with `shardings`) and where it came from."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
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
    omngr = _checkpoint_manager(other, config)
    step = omngr.latest_step() if step is None else step
    state = omngr.restore(step, args=ocp.args.StandardRestore(target))
    return state, f"resumed from config.resume={other}/{step}"

  init_fn = functools.partial(_init_state, model=model, tx=tx, image_size=config.pp.crop,
                              seed=config.seed)
  path = pretrained_path(config)
  if path is None:
    state = jax.jit(init_fn, out_shardings=shardings)()
    return state, "random initialisation (config.from_scratch)"
  init_params = to_host(jax.jit(lambda: init_fn()["params"],
                                out_shardings=shardings["params"])())
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init_params,
                                      model_config=model)
  params = _put(params, shardings["params"])
  state = jax.jit(lambda p: dict(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                  out_shardings=shardings)(params)
  return state, f"pretrained {path}"


def _init_state(*, model, tx, image_size: int, seed: int) -> State:
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = model.init({"params": jax.random.key(seed)}, x, train=False)["params"]
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ---------------------------------------------------------------------------------------------
# The loop.

class _Preemption:
  """SIGTERM (pre-emption) sets a flag; the loop saves a checkpoint and stops at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _prefetch(iterator: Iterator, put: Callable, size: int) -> Iterator:
  """Keeps `size` batches in flight to the devices (device_put is asynchronous)."""
  queue = []
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes per `config`, writing checkpoints, metrics and the export into `workdir`."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  info = input_pipeline.get_dataset_info(config)
  num_classes = info.num_classes
  model = create_model(config, num_classes)
  tx, lr_fn = optim.make_optimizer(config)
  mesh = sharding.make_mesh()
  pmap = config.parallelism == "pmap"
  logging.info("process %d/%d, %d local / %d global devices (%s), parallelism=%s%s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, config.parallelism,
               " + FSDP" if config.fsdp else "")

  abstract = jax.eval_shape(functools.partial(
      _init_state, model=model, tx=tx, image_size=config.pp.crop, seed=config.seed))
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp)
  mngr = _checkpoint_manager(os.path.join(workdir, "checkpoints"), config)
  state, origin = initial_state(config, model, tx, mngr, abstract, shardings)
  first_step = int(to_host(state["step"]))
  logging.info("initial state: %s (step %d); %s parameters", origin, first_step,
               f"{sum(x.size for x in jax.tree.leaves(abstract['params'])):,}")

  meta = models.model_metadata(model, image_size=config.pp.crop, class_names=info.class_names)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump(dict(meta, config=json.loads(config.to_json_best_effort())), f, indent=2)
  writer = metrics.MetricWriter(workdir)
  if first_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})

  train_step = make_train_step(model, tx, lr_fn, config, num_classes,
                               axis_name=PMAP_AXIS if pmap else None)
  eval_step = make_eval_step(model, num_classes, axis_name=PMAP_AXIS if pmap else None)
  if pmap:
    train_step = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=(0,))
    eval_step = jax.pmap(eval_step, axis_name=PMAP_AXIS)
    put_batch = sharding.pmap_batch
    run_state = sharding.to_pmap(state)
    params_of = lambda s: s["params"]
    canonical = lambda s: sharding.from_pmap(s, shardings)
    fetch = lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
  else:
    train_step = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    eval_step = jax.jit(eval_step, in_shardings=(shardings["params"],
                                                 sharding.batch_sharding(mesh)))
    put_batch = functools.partial(sharding.global_batch, mesh=mesh)
    run_state, params_of, canonical = state, (lambda s: s["params"]), (lambda s: s)
    fetch = lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
  del state

  def evaluate(run_state) -> dict[str, float]:
    ds = input_pipeline.get_eval_dataset(config, info)
    totals = None
    for batch in _prefetch(ds.as_numpy_iterator(), put_batch, config.prefetch):
      sums = eval_step(params_of(run_state), batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = fetch(totals)
    count = float(totals["count"])
    return dict(accuracy=float(totals["correct"]) / count, loss=float(totals["loss"]) / count,
                count=count)

  def save(step: int) -> None:
    mngr.save(step, args=ocp.args.StandardSave(canonical(run_state)), force=True)

  pending: list[tuple[int, dict]] = []  # per-step metrics still on device

  def check_pending() -> dict[str, float]:
    """Fetches pending metrics; stops the run at the first NaN/inf with its step number."""
    rows = [(s, fetch(m)) for s, m in pending]
    pending.clear()
    for s, m in rows:
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise TrainingDiverged(
            f"training diverged at step {s}: loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}. The last good checkpoint (step {mngr.latest_step()}) in "
            f"{mngr.directory} is intact; lower config.base_lr or check the data.")
    return {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]} if rows else {}

  progress = metrics.Progress(config.total_steps, config.batch)
  preemption = _Preemption()
  summary: dict[str, Any] = dict(origin=origin, first_step=first_step, preempted=False)
  ds_train = input_pipeline.get_train_dataset(config, info, start_step=first_step)
  batches = _prefetch(ds_train.as_numpy_iterator(), put_batch, config.prefetch)
  step = first_step
  try:
    while step < config.total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        run_state, step_metrics = train_step(run_state, next(batches))
      step += 1
      pending.append((step, step_metrics))
      if step == first_step + 1:
        jax.block_until_ready(step_metrics)
        logging.info("first step (compilation included) took %.1f s", time.time() - t_start)
        progress.start(step)
      stop = preemption.requested
      if jax.process_count() > 1:
        # The stop (a checkpoint, then the exit) is collective, so every process must take it at
        # the same step: agree at report steps only, where every process calls the allgather. A
        # local flag alone would pair one process's allgather with another's at a later step.
        stop = (step % config.progress_every == 0
                and bool(multihost_utils.process_allgather(np.array(stop)).any()))
      last = step == config.total_steps or stop
      if step % config.progress_every == 0 or last:
        scalars = check_pending()
        writer.write(step, {f"train_{k}" if k == "loss" else k: v for k, v in scalars.items()}
                     | progress.tick(step))
      if step % config.checkpoint_every == 0 or last:
        with progress.paused():
          check_pending()
          save(step)
      if (step % config.eval_every == 0 or step == config.total_steps) and not stop:
        with progress.paused():
          result = evaluate(run_state)
        logging.info("step %d: test accuracy %.4f, loss %.4f (%d examples)", step,
                     result["accuracy"], result["loss"], result["count"])
        writer.write(step, {f"test_{k}": v for k, v in result.items()})
        summary.update(test_accuracy=result["accuracy"], test_loss=result["loss"],
                       test_count=int(result["count"]))
      if stop:
        summary["preempted"] = True
        logging.warning("pre-empted: saved step %d to %s; rerun the same command to resume",
                        step, mngr.directory)
        break
  finally:
    preemption.restore()
    mngr.wait_until_finished()
    writer.close()

  summary["step"] = step
  if step == config.total_steps and config.export_npz:
    params = to_host(canonical(run_state)["params"])
    if jax.process_index() == 0:
      checkpoint.save_npz(params, os.path.join(workdir, "params.npz"), metadata=meta)
      logging.info("exported %s/params.npz (+ params.json) in the original format", workdir)
  summary["seconds"] = time.time() - t_start
  multihost_utils.sync_global_devices("train_and_evaluate done")
  return summary
