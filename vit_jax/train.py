"""Fine-tuning loop: `train_and_evaluate(config, workdir)`, one ladder from config to export.

Shapes first (`jax.eval_shape`), state created already sharded, one jitted update with donated
state, the step in the state and the rng derived from it: a resumed run computes exactly what an
uninterrupted one does. What differs between jit and pmap is `sharding.parallelism`'s object.
"""

import json
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vit_jax import (
  checkpoint,
  config_checks,
  data_sources,
  fewshot,
  input_pipeline,
  metrics,
  models,
  program,
  sharding,
  steps,
)
from vit_jax.config_checks import validate_config
from vit_jax.run_state import (
  Selection,
  best_checkpoint_manager,
  checkpoint_manager,
  export_best,
  initial_state,
)

State = steps.State


class TrainingDiverged(RuntimeError):
  """Loss or gradient norm became NaN or inf."""


# ---------------------------------------------------------------------------------------------
# The loop's helpers.


class _Preemption:
  """SIGTERM (pre-emption) sets a flag; the loop saves a checkpoint and stops at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
    self.requested = True

  def stop_now(self, step: int, every: int) -> bool:
    """Whether to stop after `step`. Collective across processes: every one stops at the same
    step, agreed at report steps only, where every process calls the allgather (a local flag
    alone would pair one process's allgather with another's at a later step)."""
    if jax.process_count() == 1:
      return self.requested
    return step % every == 0 and bool(
      multihost_utils.process_allgather(np.array(self.requested)).any()
    )

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class _PendingMetrics:
  """Per-step metrics left on the devices until a report step fetches them (no sync per step)."""

  def __init__(self, fetch: Callable, mngr: ocp.CheckpointManager):
    self.rows: list[tuple[int, dict]] = []
    self.fetch, self.mngr = fetch, mngr

  def add(self, step: int, step_metrics: dict) -> None:
    self.rows.append((step, step_metrics))

  def mean(self) -> dict[str, float]:
    """Fetches pending metrics; stops the run at the first NaN/inf with its step number."""
    rows = [(s, self.fetch(m)) for s, m in self.rows]
    self.rows.clear()
    for s, m in rows:
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise TrainingDiverged(
          f"training diverged at step {s}: loss={float(m['loss'])}, grad_norm="
          f"{float(m['grad_norm'])}. The last good checkpoint (step "
          f"{self.mngr.latest_step()}) in {self.mngr.directory} is intact; lower "
          "config.base_lr or check the data."
        )
    return {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]} if rows else {}


def _prefetch(iterator: Iterator, put: Callable, size: int) -> Iterator:
  """Keeps `size` batches in flight to the devices (device_put is asynchronous)."""
  queue = []
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def evaluate(
  config, info, eval_step: Callable, params: Any, par: sharding.Jit, split: str
) -> dict[str, float]:
  """Accuracy and loss over a whole split ('val' or 'test'): every example counted once."""
  ds = input_pipeline.get_eval_dataset(config, info, split=split)
  totals = None
  for batch in _prefetch(ds.as_numpy_iterator(), par.put_batch, config.prefetch):
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = par.fetch(totals)
  count = float(totals["count"])
  return dict(
    accuracy=float(totals["correct"]) / count, loss=float(totals["loss"]) / count, count=count
  )


def _log_eval(step: int, name: str, result: dict[str, float]) -> None:
  logging.info(
    "step %d: %s accuracy %.4f, loss %.4f (%d examples)",
    step,
    name,
    result["accuracy"],
    result["loss"],
    result["count"],
  )


# ---------------------------------------------------------------------------------------------
# The ladder.


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, final_test: bool = True
) -> dict[str, Any]:
  """Fine-tunes per `config`, writing checkpoints, metrics and the export into `workdir`.

  Evaluation during training is on the validation split; the test split is read once, at the
  end, for the final parameters and the best checkpoint (`final_test=False`: not at all, for a
  sweep that reads test for its chosen point only)."""
  # 1. Config: every value checked before anything compiles.
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()

  # 2. Data and model; epochs become steps once the train split's size is known.
  info = input_pipeline.get_dataset_info(config)
  config, schedule = config_checks.resolve_schedule(config, info.num_examples["train"])
  if schedule:
    logging.info("%s", schedule)
  has_val = info.num_examples["val"] > 0
  if not has_val and config.best_metric:
    raise config_checks.ConfigError(
      f"config.best_metric={config.best_metric!r} needs a validation split: add a val/ folder "
      "or set config.val_fraction > 0 (tfds: config.pp.val)"
    )
  logging.info("splits: %s", ", ".join(f"{k} {v:,}" for k, v in info.num_examples.items()))
  mesh = sharding.make_mesh()
  prog = program.build_program(config, info.num_classes, mesh)
  model, tx, abstract, shardings, par = (
    prog.model,
    prog.tx,
    prog.abstract,
    prog.shardings,
    prog.par,
  )
  logging.info(
    "process %d/%d, %d local / %d global devices (%s), parallelism=%s%s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
    config.parallelism,
    " + FSDP" if config.fsdp else "",
  )

  # 3. State: shapes first, created sharded, from the resume ladder.
  mngr = checkpoint_manager(os.path.join(workdir, "checkpoints"), config)
  best_mngr = best_checkpoint_manager(workdir, config)
  state, origin = initial_state(config, model, tx, mngr, abstract, shardings)
  first_step = int(sharding.to_host(state["step"]))
  logging.info(
    "initial state: %s (step %d); %s parameters",
    origin,
    first_step,
    f"{sum(x.size for x in jax.tree.leaves(abstract['params'])):,}",
  )
  selection = Selection(config, best_mngr, first_step) if best_mngr else None

  meta = models.model_metadata(model, image_size=config.pp.crop, class_names=info.class_names)
  splits = {k: data_sources.split_digest(info, k) for k in info.num_examples}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "run.json"), "w") as f:
      run = dict(meta, splits=splits, config=json.loads(config.to_json_best_effort()))
      json.dump(run, f, indent=2)
  writer = metrics.MetricWriter(workdir)
  if first_step == 0:
    writer.write_hparams(
      {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    )

  # 4. Steps: one donated update and one evaluation, compiled for the parallelism.
  train_step, eval_step = prog.train_step, prog.eval_step
  run_state = par.enter(state)
  del state
  fewshot_eval = fewshot.Evaluator(config) if config.fewshot.datasets else None

  # 5. The loop: report, checkpoint, validate at their cadences; stop on SIGTERM, NaN or
  # exhausted patience (a rerun of an early-stopped run stops again at once).
  pending = _PendingMetrics(par.fetch, mngr)
  progress = metrics.Progress(config.total_steps, config.batch)
  preemption = _Preemption()
  summary: dict[str, Any] = dict(
    origin=origin, first_step=first_step, preempted=False, splits=splits
  )
  if schedule:
    summary["schedule"] = schedule
  ds_train = input_pipeline.get_train_dataset(config, info, start_step=first_step)
  batches = _prefetch(ds_train.as_numpy_iterator(), par.put_batch, config.prefetch)
  step = first_step
  early_stop = selection is not None and selection.exhausted
  try:
    while step < config.total_steps and not early_stop:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        run_state, step_metrics = train_step(run_state, next(batches))
      step += 1
      pending.add(step, step_metrics)
      if step == first_step + 1:
        jax.block_until_ready(step_metrics)
        logging.info("first step (compilation included) took %.1f s", time.time() - t_start)
        progress.start(step)
      stop = preemption.stop_now(step, config.progress_every)
      if has_val and (step % config.eval_every == 0 or step == config.total_steps) and not stop:
        with progress.paused():
          result = evaluate(config, info, eval_step, run_state["params"], par, "val")
        _log_eval(step, "val", result)
        writer.write(step, {f"val_{k}": v for k, v in result.items()})
        summary.update(val_accuracy=result["accuracy"], val_loss=result["loss"])
        if selection and selection.update(step, summary[config.best_metric]):
          with progress.paused():  # the new best; orbax then drops the previous one
            best_mngr.save(
              step,
              args=ocp.args.StandardSave(par.canonical(run_state)),
              metrics={config.best_metric: summary[config.best_metric]},
              force=True,
            )
        if selection:
          early_stop = selection.exhausted
      last = step == config.total_steps or stop or early_stop
      if step % config.progress_every == 0 or last:
        scalars = pending.mean()
        writer.write(
          step,
          {f"train_{k}" if k == "loss" else k: v for k, v in scalars.items()} | progress.tick(step),
        )
      if step % config.checkpoint_every == 0 or last:
        with progress.paused():
          pending.mean()
          mngr.save(step, args=ocp.args.StandardSave(par.canonical(run_state)), force=True)
      every = config.fewshot.every
      if fewshot_eval and ((every and step % every == 0) or last) and not stop:
        with progress.paused():
          scalars = fewshot_eval(sharding.to_host(par.canonical(run_state)["params"]))
        logging.info(
          "step %d: few-shot %s",
          step,
          ", ".join(f"{k} {v:.4f}" for k, v in scalars.items() if not k.endswith("_std")),
        )
        writer.write(step, scalars)
        summary["fewshot"] = scalars
      if stop:
        summary["preempted"] = True
        logging.warning(
          "pre-empted: saved step %d to %s; rerun the same command to resume", step, mngr.directory
        )
        break
  except BaseException:
    writer.close()  # a finished loop's writer stays open for the test rows below
    raise
  finally:
    preemption.restore()
    mngr.wait_until_finished()
    if best_mngr:
      best_mngr.wait_until_finished()

  # 6. The end (all steps, or early stopping): export, then the test split, read once.
  summary["step"] = step
  finished = step == config.total_steps or early_stop
  if early_stop:
    summary["early_stop"] = dict(
      step=step,
      reason=f"{config.best_metric} did not improve on {selection.best_value:.6g} (step "
      f"{selection.best_step}) in {selection.since} evaluations (early_stop_patience="
      f"{config.early_stop_patience})",
    )
    logging.warning("early stop at step %d: %s", step, summary["early_stop"]["reason"])
  if finished and config.export_npz:
    params = sharding.to_host(par.canonical(run_state)["params"])
    if jax.process_index() == 0:
      checkpoint.save_npz(params, os.path.join(workdir, "params.npz"), metadata=meta)
      logging.info("exported %s/params.npz (+ params.json) in the original format", workdir)
  chosen, chosen_by = run_state["params"], "the final parameters (config.best_metric is off)"
  report_params = None  # the final ones unless a best checkpoint was chosen
  if finished and selection and selection.best_step is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    best_step, best_state = export_best(
      best_mngr, target, os.path.join(workdir, "best_params.npz"), meta, config.best_metric
    )
    chosen, report_params = par.enter(best_state)["params"], best_state["params"]
    chosen_by = checkpoint.chosen_by(
      dict(best_metric=config.best_metric, chosen_on="val", best_step=best_step)
    )
    summary.update(best_step=best_step, best_metric=config.best_metric, chosen_on="val")
  if finished and final_test:
    tests = dict(test=run_state["params"])
    if selection and selection.best_step is not None:
      tests["best_test"] = chosen
    for name, params in tests.items():
      result = evaluate(config, info, eval_step, params, par, "test")
      _log_eval(step, name.replace("_", " "), result)
      writer.write(step, {f"{name}_{k}": v for k, v in result.items()})
      summary.update({f"{name}_accuracy": result["accuracy"], f"{name}_loss": result["loss"]})
      summary[f"{name}_count"] = int(result["count"])
  writer.close()
  if finished and final_test and config.report:
    from vit_jax import evaluation  # pylint: disable=g-import-not-at-top  (matplotlib, sklearn)

    evaluation.write_report(
      os.path.join(workdir, "report"),
      config=config,
      info=info,
      params=sharding.to_host(report_params or par.canonical(run_state)["params"]),
      meta=meta,
      workdir=workdir,
      source=dict(checkpoint=workdir, chosen_by=chosen_by),
    )
  summary["seconds"] = time.time() - t_start
  multihost_utils.sync_global_devices("train_and_evaluate done")
  return summary
