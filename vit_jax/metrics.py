"""Metric writing (TensorBoard + JSON lines, process 0 only) and progress with an honest ETA."""

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
from absl import logging
from clu import metric_writers


class MetricWriter:
  """Writes scalars to TensorBoard (clu) and `metrics.jsonl` in the workdir, on process 0."""

  def __init__(self, workdir: str):
    self._primary = jax.process_index() == 0
    self._tb = metric_writers.create_default_writer(
      workdir, just_logging=not self._primary, asynchronous=False
    )
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._primary else None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._tb.write_scalars(step, scalars)
    if self._jsonl:
      self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self._jsonl.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._tb.write_hparams(dict(hparams))

  def close(self) -> None:
    self._tb.flush()
    self._tb.close()
    if self._jsonl:
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows `MetricWriter` wrote to `workdir`/metrics.jsonl ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Training throughput and ETA that leave out compilation, evaluation and checkpoint pauses.

  Call `start(step)` once the first (compiling) step has finished, `tick(step)` at every report,
  and wrap pauses in `paused()`.
  """

  def __init__(self, total_steps: int, global_batch: int):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self._t0: Optional[float] = None
    self._step0 = 0
    self._paused = 0.0
    self._last = (0, 0.0)  # (step, train seconds) at the previous tick

  def start(self, step: int) -> None:
    self._t0, self._step0, self._last = time.perf_counter(), step, (step, 0.0)

  def _train_seconds(self) -> float:
    return time.perf_counter() - self._t0 - self._paused

  def tick(self, step: int) -> dict[str, float]:
    """Returns images/s per device since the last tick and logs a progress line."""
    if self._t0 is None:
      return {}
    elapsed = self._train_seconds()
    last_step, last_elapsed = self._last
    self._last = (step, elapsed)
    rate = (step - last_step) / max(elapsed - last_elapsed, 1e-9)  # steps/s
    eta = (self.total_steps - step) * (elapsed / max(step - self._step0, 1))
    img_s = rate * self.global_batch / jax.device_count()
    logging.info(
      "step %d/%d (%.1f%%): %.1f img/s/device, ETA %s",
      step,
      self.total_steps,
      100 * step / self.total_steps,
      img_s,
      _hms(eta),
    )
    return {"img_sec_device": img_s}

  def paused(self) -> "_Pause":
    return _Pause(self)


class _Pause:
  def __init__(self, progress: Progress):
    self._p = progress

  def __enter__(self):
    self._t = time.perf_counter()

  def __exit__(self, *exc):
    if self._p._t0 is not None:
      self._p._paused += time.perf_counter() - self._t


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
