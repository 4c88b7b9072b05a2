r"""Classifies image files with a trained checkpoint: top-k class names and probabilities.

  python -m vit_jax.predict --checkpoint workdirs/demo/finetune IMAGE_OR_FOLDER... \
      [--top_k 3] [--json]

--checkpoint is an exported `.npz` (with its `.json` metadata beside it), a training workdir, or
an orbax step folder (checkpoint.load_for_inference). Folders are searched recursively for
images. Each image is preprocessed exactly as the evaluation pipeline does (RGB, bilinear resize
to the trained size, [-1, 1]) but with PIL and numpy: no TensorFlow, so it starts fast.

Exit codes: 0 all images classified; 1 some image could not be read (reported by name, the rest
are still classified); 2 a bad checkpoint or no image at all (one line, no traceback).
"""

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

# As data_sources.IMAGE_EXTENSIONS (not imported from there: that module imports TensorFlow).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_BATCH = 64


class PredictError(ValueError):
  """A user error (bad checkpoint, no images): the message is one readable line."""


# ---------------------------------------------------------------------------------------------
# Preprocessing: the numpy twin of preprocess.eval_preprocess.


def _resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tf.image.resize(method='bilinear', antialias=False) sampling: half-pixel centres, edges
  clamped. Returns (lower index, upper index, weight of upper) per output position."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  floor = np.floor(src)
  lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
  upper = np.clip(np.ceil(src), 0, in_size - 1).astype(np.int64)
  return lower, upper, (src - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] -> [height, width, C] float32, as TensorFlow's bilinear resize (no antialias)."""
  x = image.astype(np.float32)
  lo, hi, w = _resize_weights(x.shape[0], height)
  x = x[lo] * (1 - w)[:, None, None] + x[hi] * w[:, None, None]
  lo, hi, w = _resize_weights(x.shape[1], width)
  return x[:, lo] * (1 - w)[None, :, None] + x[:, hi] * w[None, :, None]


def load_rgb(path: str) -> np.ndarray:
  """Any image file -> [H, W, 3] uint8, as tf.io.decode_image(channels=3) decodes it:
  grey is repeated, alpha is dropped (not composited), an animation gives its first frame."""
  with Image.open(path) as image:
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the high byte, as TF
      pixels = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
      return np.repeat(pixels[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def preprocess(image: np.ndarray, image_size: int, eval_resize: int = 0) -> np.ndarray:
  """[H, W, 3] uint8 -> [image_size, image_size, 3] float32 in [-1, 1], as the eval pipeline."""
  if eval_resize > image_size:
    x = resize_bilinear(image, eval_resize, eval_resize)
    offset = (eval_resize - image_size) // 2
    x = x[offset : offset + image_size, offset : offset + image_size]
  else:
    x = resize_bilinear(image, image_size, image_size)
  return (x - 127.5) / 127.5


# ---------------------------------------------------------------------------------------------
# Model.


def load_classifier(path: str) -> tuple[Any, dict[str, Any]]:
  """(params, metadata) of a classifier checkpoint: a training workdir, an exported `.npz` (with
  its `.json`) or an orbax step folder; a PredictError naming the path otherwise."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise PredictError(
      f"{path}: no such checkpoint (expected an .npz, a training workdir or an orbax step folder)"
    )
  try:
    params, meta = checkpoint.load_for_inference(path)
  except checkpoint.CheckpointError as e:
    raise PredictError(str(e).splitlines()[0]) from None
  if not meta.get("architecture") or not meta.get("image_size"):
    raise PredictError(
      f"{path}: no metadata (model, image size, class names) beside it; "
      "use a checkpoint exported by vit_jax.train (params.npz + params.json)"
    )
  if not meta.get("num_classes"):
    raise PredictError(f"{path}: a feature extractor without a classification head")
  return params, meta


class Predictor:
  """A checkpoint ready to classify: `Predictor(path)(images) -> probabilities [N, classes]`."""

  def __init__(self, path: str):
    # Imported here so that `--help` and argument errors answer without loading JAX.
    import jax  # pylint: disable=g-import-not-at-top

    from vit_jax import models  # pylint: disable=g-import-not-at-top

    params, meta = load_classifier(path)
    self.image_size = int(meta["image_size"])
    self.class_names = list(
      meta.get("class_names") or [f"class_{i}" for i in range(meta["num_classes"])]
    )
    self.model_name = meta.get("model_name")
    # The Flax model and its parameters (attention maps use them).
    self.model = model = models.model_from_metadata(meta)
    self.params = params
    self._apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x, train=False)))
    try:  # a params/metadata mismatch fails here, once, with a readable message
      self(np.zeros((1, self.image_size, self.image_size, 3), np.float32))
    except (ValueError, TypeError, KeyError) as e:
      raise PredictError(
        f"{path}: the parameters do not match the model in its metadata "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      ) from None

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = [
      np.asarray(self._apply(self.params, images[i : i + _BATCH]))
      for i in range(0, len(images), _BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)


# ---------------------------------------------------------------------------------------------
# Command line.


def find_images(inputs: Sequence[str]) -> list[str]:
  """Files as given (any extension: a bad one is reported later), folders searched recursively
  for image extensions, in sorted order."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      for dirpath, dirnames, filenames in os.walk(item):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [
          os.path.join(dirpath, f)
          for f in sorted(filenames)
          if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    else:
      paths.append(item)
  return paths


def predict(checkpoint_path: str, inputs: Sequence[str], top_k: int = 3) -> dict[str, Any]:
  """Classifies `inputs` (files or folders). Returns the JSON document `--json` prints:
  {checkpoint, model_name, image_size, class_names, predictions: [{image, top_k: [{label,
  probability}]}], errors: [{image, error}]}. Raises PredictError for a bad checkpoint."""
  paths = find_images(inputs)
  if not paths:
    raise PredictError(
      f"no images found in {', '.join(inputs)} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
    )
  predictor = Predictor(checkpoint_path)
  images, good, errors = [], [], []
  for path in paths:
    try:
      images.append(preprocess(load_rgb(path), predictor.image_size))
      good.append(path)
    except Exception as e:  # pylint: disable=broad-except  # any failure: report, carry on
      reason = str(e).splitlines()[0] if str(e) else ""
      errors.append(dict(image=path, error=f"{type(e).__name__}: {reason}".rstrip(": ")))
  probs = predictor(np.stack(images)) if images else np.zeros((0, 0))
  k = max(1, min(top_k, len(predictor.class_names)))
  predictions = []
  for path, p in zip(good, probs):
    best = np.argsort(-p, kind="stable")[:k]
    predictions.append(
      dict(
        image=path,
        top_k=[dict(label=predictor.class_names[i], probability=float(p[i])) for i in best],
      )
    )
  return dict(
    checkpoint=checkpoint_path,
    model_name=predictor.model_name,
    image_size=predictor.image_size,
    class_names=predictor.class_names,
    predictions=predictions,
    errors=errors,
  )


def _format_text(result: dict[str, Any]) -> str:
  width = max(len(n) for n in result["class_names"])
  lines = []
  for pred in result["predictions"]:
    lines.append(pred["image"])
    lines += [f"  {t['label']:<{width}}  {t['probability']:.4f}" for t in pred["top_k"]]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vit_jax.predict", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--checkpoint", required=True, help="exported .npz, training workdir, or orbax step folder"
  )
  parser.add_argument("--top_k", type=int, default=3, help="classes shown per image")
  parser.add_argument("--json", action="store_true", help="print one JSON document")
  parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
  args = parser.parse_args(argv)
  if args.top_k < 1:
    parser.error(f"--top_k must be >= 1, got {args.top_k}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    result = predict(args.checkpoint, args.images, args.top_k)
  except PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=2))
  elif result["predictions"]:
    print(_format_text(result))
  for err in result["errors"]:
    print(f"error: cannot read {err['image']}: {err['error']}", file=sys.stderr)
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
