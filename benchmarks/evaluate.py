r"""Evaluation throughput (images/s) of `vit_jax.evaluation.predict_split`; prints one JSON line.

  python -m benchmarks.evaluate [--model_name ViT-B_16] [--image_size 224] [--num_images 96] \
      [--batch 32] [--passes 3] [--features]

`--features` times the few-shot evaluator's feature extraction instead (`vit_jax.fewshot`: the
model without its head, the pre-logits of every image through the same `forward.apply_split`).

What is timed is what `python -m vit_jax.evaluate` spends on its predictions: photo-like JPEGs
(500x375, as `benchmarks.input` writes them) read, decoded, resized and normalised by the eval
pipeline, and the jitted forward pass over all devices, logits gathered in split order. Random
weights (the speed does not depend on them). The first pass includes compilation and is reported
apart; the images/s are the median over the later passes (and the fastest of them). The report's
figures are not timed.
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import numpy as np

from benchmarks import harness
from benchmarks import input as input_bench
from configs import common
from vit_jax import data_sources, evaluation, fewshot, models


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.evaluate", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--model_name", default="ViT-B_16", help="a vit_jax.models preset")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--num_images", type=int, default=96, help="images in the evaluated split")
  parser.add_argument("--batch", type=int, default=32, help="config.batch_eval")
  parser.add_argument(
    "--features", action="store_true", help="few-shot feature extraction (no head) instead"
  )
  parser.add_argument(
    "--passes",
    type=int,
    default=3,
    help="passes over the split; the first (compiling) one is not in the median",
  )
  args = parser.parse_args(argv)
  if args.model_name not in models.MODEL_CONFIGS:
    parser.error(f"--model_name {args.model_name!r} is unknown")
  if min(args.image_size, args.num_classes, args.num_images, args.batch) < 1 or args.passes < 2:
    parser.error("sizes and counts must be positive, --passes at least 2")
  if args.batch % jax.device_count():
    parser.error(f"--batch {args.batch} is not divisible by the {jax.device_count()} devices")
  return args


def random_params(model: Any, image_size: int) -> Any:
  """Host arrays of the model's shapes, N(0, 0.02): no initialiser to compile."""
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)


def measure(args: argparse.Namespace, root: pathlib.Path) -> dict[str, Any]:
  input_bench.write_jpegs(root, args.num_images, (500, 375))
  config = common.get_config()
  config.dataset = str(root)
  config.pp.test = "train"  # write_jpegs puts the images in train/: evaluate that split
  config.pp.crop = args.image_size
  config.batch_eval = args.batch
  info = data_sources.get_dataset_info(config)
  model = models.get_model(args.model_name, None if args.features else args.num_classes)
  params = random_params(model, args.image_size)
  if args.features:
    extract = fewshot.FeatureExtractor(config)
    run = lambda: extract.split(model, params, "test")
  else:
    run = lambda: evaluation.predict_split(config, info, model, params)
  seconds = []
  for _ in range(args.passes):
    start = time.perf_counter()
    out = run()
    seconds.append(time.perf_counter() - start)
  assert len(out[1] if args.features else out["labels"]) == args.num_images
  median = statistics.median(seconds[1:])
  return dict(
    benchmark="fewshot_features" if args.features else "evaluate",
    model_name=args.model_name,
    image_size=args.image_size,
    batch=args.batch,
    num_images=args.num_images,
    images_per_sec=round(args.num_images / median, 2),
    # Under contention from other processes the fastest pass is the fairest number.
    best_images_per_sec=round(args.num_images / min(seconds[1:]), 2),
    pass_s=[round(s, 2) for s in seconds],
    first_pass_s=round(seconds[0], 2),
    num_devices=jax.device_count(),
    platform=jax.devices()[0].platform,
    cpu=harness.host_cpu(),
    cpu_count=os.cpu_count(),
    load_average=harness.load_average(),
  )


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  stdout = harness.reserve_stdout()  # one JSON line alone on stdout
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["VIT_JAX_CACHE_DIR"] = str(pathlib.Path(tmp) / "cache")
    result = measure(args, pathlib.Path(tmp) / "images")
  harness.write_json(stdout, result)


if __name__ == "__main__":
  main()
