"""Evaluation of a checkpoint on a whole split, and the report it writes.

`pipeline` runs it (config, predictions on all devices, the report files); `metrics` computes the
numbers with scikit-learn, `figures` draws them with matplotlib, `html_report` renders
report.html. `python -m vit_jax.evaluate` is the command line.
"""

from vit_jax.evaluation.metrics import load_predictions, report_from_predictions
from vit_jax.evaluation.pipeline import (
  EvaluateError,
  build_config,
  evaluate,
  load_checkpoint,
  predict_split,
  run_dir,
  write_report,
)

__all__ = [
  "EvaluateError",
  "build_config",
  "evaluate",
  "load_checkpoint",
  "load_predictions",
  "predict_split",
  "report_from_predictions",
  "run_dir",
  "write_report",
]
