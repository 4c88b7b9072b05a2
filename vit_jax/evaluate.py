r"""Evaluates a checkpoint on a whole split: predictions, metrics, figures and one HTML page.

  python -m vit_jax.evaluate --checkpoint PATH --output DIR [--split test] \
      [--config.FIELD=VALUE ...]

PATH is a training workdir, an exported `params.npz` (with its `params.json`) or an orbax step
folder. The data is what the run trained on (its `run.json`), unless `--config.*` flags say
otherwise: `--config.dataset=` an image folder, `fashion_mnist` or a tfds name, and any other
field (`classes`, `pp.eval_resize`, `batch_eval`, ...). A `params.npz` with no `run.json` beside
it needs `--config.dataset`. `--split` (default: the config's `pp.test`) is `train` or `test` for
folders and Fashion-MNIST, any split for tfds.

DIR receives predictions.npz, report.json, the figures (PNG) and report.html (docs/evaluation.md
says what each holds). Exit codes: 0 done; 2 a bad checkpoint, flag or data (one line on stderr,
no traceback).
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vit_jax.evaluate", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--checkpoint", required=True, help="training workdir, exported .npz, or orbax step folder"
  )
  parser.add_argument("--output", required=True, help="folder for the report")
  parser.add_argument(
    "--split", default=None, help="split to evaluate (default: the config's pp.test)"
  )
  args, config_flags = parser.parse_known_args(argv)
  unknown = [a for a in config_flags if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)} (data fields are --config.X=Y)")
  if not os.path.exists(args.checkpoint):  # before TensorFlow and JAX load: a typo fails at once
    print(
      f"error: {args.checkpoint}: no such checkpoint (expected a training workdir, an .npz "
      "or an orbax step folder)",
      file=sys.stderr,
    )
    return 2
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vit_jax import evaluation  # pylint: disable=g-import-not-at-top

  try:
    report = evaluation.evaluate(args.checkpoint, args.output, config_flags, args.split)
  except ValueError as e:  # EvaluateError, and the data sources' errors naming file or field
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  print(json.dumps({k: report[k] for k in ("count", "accuracy", "macro_f1", "log_loss", "ece")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
