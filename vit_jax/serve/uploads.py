"""Uploaded bytes -> model input, or an UploadError that says what is wrong with the file.

The pixel limit is checked on the header, before any pixel is decoded: a small file that
declares enormous dimensions (a decompression bomb) costs nothing.
"""

import io
import warnings

import numpy as np
from PIL import Image

from vit_jax import predict

MAX_PIXELS = 40_000_000  # 40 megapixels: any phone photo; PIL's own default limit is 89M


class UploadError(ValueError):
  """An uploaded file that cannot be classified; the message names the file and the problem."""


def decode(name: str, data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """The upload `name` with content `data` -> [H, W, 3] uint8 (as predict.load_rgb)."""
  if not data:
    raise UploadError(f"{name}: empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    raise UploadError(f"{name}: image dimensions too large (decompression bomb)") from None
  except Image.UnidentifiedImageError:
    raise UploadError(f"{name}: not an image (or a format Pillow cannot read)") from None
  except Exception as e:  # pylint: disable=broad-except  # a corrupt header, any kind
    raise UploadError(f"{name}: unreadable image header ({e})") from None
  if width * height > max_pixels:
    raise UploadError(
      f"{name}: image is {width}x{height} pixels, more than the limit of "
      f"{max_pixels} (decompression bomb?)"
    )
  try:
    return predict.load_rgb(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except  # truncated or corrupt pixel data
    raise UploadError(f"{name}: corrupt or truncated image ({str(e).splitlines()[0]})") from None


def overlay_png(image: np.ndarray, heat: np.ndarray, min_side: int = 224) -> bytes:
  """[H, W, 3] model input in [-1, 1] and an [H, W] map in [0, 1] -> PNG bytes: the photo in grey
  with the map in red over it, enlarged (nearest neighbour) to at least `min_side` pixels."""
  grey = ((image.mean(axis=-1) + 1.0) * 127.5).clip(0, 255)
  rgb = np.stack([grey * (1 - heat) + 255 * heat, grey * (1 - heat), grey * (1 - heat)], -1)
  picture = Image.fromarray(rgb.astype(np.uint8))
  scale = max(1, -(-min_side // max(picture.size)))
  picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  out = io.BytesIO()
  picture.save(out, format="PNG")
  return out.getvalue()
