r"""Converts a ViT checkpoint to timm, Hugging Face transformers or ONNX and checks the logits.

  python scripts/convert_to_pytorch.py --checkpoint checkpoints/vit_shoes.npz \
      --format hf --output exported/vit_hf

Writes DIR/model.safetensors + DIR/config.json (+ DIR/preprocessor_config.json for hf), reloads
them in PyTorch (--format onnx: DIR/model.onnx, traced from the timm model, run by onnxruntime)
and compares the outputs with the Flax model on --num_check_images images; the
folder is written only when the largest difference is within --tolerance. Without the .json
metadata beside the .npz (an original Google file), pass --model_name (e.g. ViT-B_16).
--checkpoint may also be a training workdir or an orbax step folder (checkpoint.load_for_inference).
Exit codes: 0 ok, 1 outputs differ (or int8 lost too much accuracy), 2 bad input or a model the
format cannot represent.

int8 for CPU serving (docs/serving.md): `--format onnx --int8` also writes DIR/model.int8.onnx
(onnxruntime's dynamic quantization; `--int8_method static` calibrates on --calibration_images
of --calibration_split), runs both models over the checkpoint's test split (the data of its
run.json, or --dataset) and prints and stores their accuracies, top-1 agreement and largest
probability difference. It writes nothing when int8 loses more than --max_accuracy_drop points.

Serving the hf export from PyTorch (the folder above; any RGB photo):

  from PIL import Image
  from transformers import pipeline
  classifier = pipeline("image-classification", model="exported/vit_hf")
  predictions = classifier(Image.open("photo.jpg").convert("RGB"), top_k=5)
  print(predictions)  # [{'label': ..., 'score': ...}, ...], best first

Serving any of them (and the Flax checkpoint itself) over HTTP: `python -m vit_jax.serve
--backend jax|torch|onnx --checkpoint PATH` (docs/serving.md).

A timm export loads with `vit_jax.convert.load_timm(DIR)` or
`timm.create_model("local-dir:DIR", pretrained=True)`.
"""

# torch and timm before anything that may import tensorflow: the other order segfaults.
import argparse
import sys
from typing import Optional, Sequence

import transformers
from absl import logging

from vit_jax import checkpoint, convert


def _non_negative(value: str) -> int:
  if int(value) < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return int(value)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--checkpoint",
    required=True,
    help=".npz (with its .json metadata beside it, or an original Google file), "
    "a training workdir, or an orbax step folder",
  )
  parser.add_argument(
    "--model_name",
    default=None,
    help="preset of vit_jax.models.MODEL_CONFIGS; required without metadata",
  )
  parser.add_argument("--format", required=True, choices=convert.ALL_FORMATS)
  parser.add_argument("--output", required=True, help="output directory")
  parser.add_argument(
    "--image_size",
    type=int,
    default=None,
    help="default: the metadata's, else the position-embedding grid x patch",
  )
  parser.add_argument(
    "--num_check_images",
    type=_non_negative,
    default=4,
    help="images for the logit check (0 skips it)",
  )
  parser.add_argument(
    "--tolerance",
    type=float,
    default=convert.DEFAULT_TOLERANCE,
    help="largest allowed |PyTorch - Flax| output difference",
  )
  int8 = parser.add_argument_group("int8 (with --format onnx --int8)")
  int8.add_argument("--int8", action="store_true", help="also write model.int8.onnx, measured")
  int8.add_argument("--int8_method", choices=convert.INT8_METHODS, help="default: dynamic")
  int8.add_argument("--calibration_split", help="static: the split calibrated on (train)")
  int8.add_argument(
    "--calibration_images",
    type=_non_negative,
    help=f"static: how many of its images ({convert.DEFAULT_CALIBRATION_IMAGES})",
  )
  int8.add_argument(
    "--max_accuracy_drop",
    type=float,
    help="largest allowed loss of test accuracy, in points "
    f"({convert.DEFAULT_MAX_ACCURACY_DROP:g})",
  )
  int8.add_argument(
    "--dataset",
    help="the data to measure on when the checkpoint has no run.json (a preset of "
    "configs/common.py or an image folder)",
  )
  args = parser.parse_args(argv)
  names = ("int8_method", "calibration_split", "calibration_images", "max_accuracy_drop", "dataset")
  given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
  if given and not args.int8:
    parser.error(f"--{next(iter(given))} needs --int8")
  args.int8_options = convert.Int8Options(**given) if args.int8 else None
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse(argv)
  logging.set_verbosity(logging.INFO)
  transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars for 1 load
  try:
    result = convert.convert(
      args.checkpoint,
      args.output,
      args.format,
      model_name=args.model_name,
      image_size=args.image_size,
      num_check_images=args.num_check_images,
      tolerance=args.tolerance,
      int8=args.int8_options,
    )
  except checkpoint.CheckpointError as e:  # includes convert.ConversionError
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (convert.ParityError, convert.AccuracyDropError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  diff = (
    "not checked"
    if result.max_abs_diff is None
    else f"max |{result.outputs} difference| vs Flax {result.max_abs_diff:.3g} "
    f"on {result.num_images} images"
  )
  print(f"wrote {result.format} {result.outputs} model to {result.output_dir} ({diff})")
  if m := result.int8:
    print(
      f"wrote {convert.ONNX_INT8_FILE} ({m['quantization']['method']} int8): test accuracy "
      f"{m['int8_accuracy']:.2f} % against float {m['float_accuracy']:.2f} % on {m['count']} "
      f"{m['split']} images of {m['dataset']}; top-1 agreement {m['top1_agreement']:.2f} %, "
      f"largest probability difference {m['max_probability_difference']:.4f}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
