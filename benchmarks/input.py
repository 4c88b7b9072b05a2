r"""Measures the training input pipeline's throughput; prints one JSON line.

  python -m benchmarks input [--num_images 500] [--crop 224] [--batch 64]
  python -m benchmarks input --fashion_mnist [--crop 32] [--batch 128] [--batches 50]

Default: writes photo-like JPEGs (smooth colour fields plus noise, 500x375, ~50 KB like real
photos) to a temporary folder, builds `get_train_dataset` (Inception crop, flip, resize, normalise)
and times whole batches after a warm-up. It also times the one-off check of every file and the
cached re-check. --fashion_mnist times the in-memory Fashion-MNIST shoe pipeline instead.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Optional

import ml_collections
import numpy as np
from PIL import Image

from configs import common
from vit_jax import data_sources, input_pipeline


def write_jpegs(root: pathlib.Path, num_images: int, size: tuple[int, int]) -> None:
  """num_images train JPEGs in two classes and one test JPEG per class (the pipeline needs one)."""
  rng = np.random.default_rng(0)
  w, h = size
  for i in range(num_images + 2):
    coarse = rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    split = "train" if i < num_images else "test"
    path = root / split / f"class_{i % 2}" / f"{i:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, "JPEG", quality=90)


def time_batches(
  config: ml_collections.ConfigDict, info: data_sources.DatasetInfo, args: argparse.Namespace
) -> dict[str, float]:
  """Images per second of get_train_dataset, after `args.warmup_batches` batches."""
  batches = input_pipeline.get_train_dataset(
    config, info, process_index=0, process_count=1
  ).as_numpy_iterator()
  for _ in range(args.warmup_batches):
    next(batches)
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(batches)
  seconds = time.perf_counter() - start
  assert batch["image"].shape == (args.batch, args.crop, args.crop, 3)
  return {
    "images_per_s": round(args.batches * args.batch / seconds, 1),
    "batches": args.batches,
    "batch": args.batch,
    "crop": args.crop,
  }


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks input", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--crop", type=int, default=None, help="default: 224; 32 for Fashion-MNIST")
  parser.add_argument("--batch", type=int, default=None, help="default: 64; 128 for Fashion-MNIST")
  parser.add_argument("--warmup_batches", type=int, default=3)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument(
    "--fashion_mnist",
    action="store_true",
    help="the in-memory Fashion-MNIST shoe classes (needs the Debian package)",
  )
  args = parser.parse_args(argv)
  args.crop = args.crop or (32 if args.fashion_mnist else 224)
  args.batch = args.batch or (128 if args.fashion_mnist else 64)
  if min(args.num_images, args.width, args.height, args.crop, args.batch, args.batches) < 1:
    parser.error("sizes, counts and --batches must be positive")
  return args


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  if args.fashion_mnist:
    config = common.with_dataset(common.get_config(), "fashion_mnist_shoes")
    config.pp.crop = args.crop
    config.batch = args.batch
    info = data_sources.get_dataset_info(config)
    print(
      json.dumps(
        {
          "source": "fashion_mnist_shoes",
          **time_batches(config, info, args),
          "cpu_count": os.cpu_count(),
        }
      )
    )
    return

  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "images"
    os.environ["VIT_JAX_CACHE_DIR"] = str(pathlib.Path(tmp) / "cache")
    start = time.perf_counter()
    write_jpegs(root, args.num_images, (args.width, args.height))
    write_s = time.perf_counter() - start
    mean_kb = np.mean([p.stat().st_size for p in root.rglob("*.jpg")]) / 1024

    config = common.get_config()
    config.dataset = str(root)
    config.pp.crop = args.crop
    config.batch = args.batch
    start = time.perf_counter()
    info = data_sources.get_dataset_info(config)  # includes the one-off file check
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    data_sources.get_dataset_info(config)
    recheck_s = time.perf_counter() - start

    timing = time_batches(config, info, args)

  print(
    json.dumps(
      {
        "source": "jpeg_folder",
        **timing,
        "num_images": args.num_images,
        "image_size": [args.width, args.height],
        "mean_jpeg_kb": round(float(mean_kb), 1),
        "cpu_count": os.cpu_count(),
        "write_s": round(write_s, 2),
        "first_check_s": round(check_s, 2),
        "cached_check_s": round(recheck_s, 3),
      }
    )
  )
