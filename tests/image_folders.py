"""Generated image folders for end-to-end training tests (shared by test_train, test_multihost)."""

import os

import numpy as np
from PIL import Image

COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_colour_folder(
  root: os.PathLike, train_per_class: int = 24, test_per_class: int = 7
) -> str:
  """ROOT/{train,test}/<colour>/*.jpg: noisy 40x40 solid colours, 3 classes, deterministic.

  The defaults give 72 train and 21 test images: 21 is no multiple of the `testing` config's
  batch_eval (16), so evaluation has a padded remainder.
  """
  rng = np.random.default_rng(0)
  for split, n in (("train", train_per_class), ("test", test_per_class)):
    for name, colour in COLORS.items():
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, split, name, f"{i}.jpg"))
  return str(root)
