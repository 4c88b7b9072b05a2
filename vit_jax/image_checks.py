"""Image files checked before training: which ones the pipeline can decode, cached per file.

A verdict is kept per (path, size, mtime) in a JSON manifest under $VIT_JAX_CACHE_DIR (default
~/.cache/vit_jax), so a second run over the same folder reads no image.
"""

import concurrent.futures
import hashlib
import json
import os
import pathlib

import tensorflow as tf
from absl import logging
from PIL import Image

from vit_jax import preprocess

MAX_LOGGED_BAD_FILES = 20


def image_error(path: str) -> str | None:
  """Why the pipeline could not use `path`, or None. Cheap: JPEGs are decoded at 1/8 scale."""
  try:
    if os.path.getsize(path) == 0:
      return "empty file"
    with Image.open(path) as image:
      image_format = image.format
      image.draft("RGB", (1, 1))  # JPEG only: still reads every byte, so truncation is caught.
      image.load()
    if image_format not in ("JPEG", "MPO", "PNG"):
      # TF's BMP/GIF/WebP decoders reject some files PIL reads (e.g. 1-bit BMPs): ask TF itself.
      preprocess.decode(tf.io.read_file(path))  # the decoder training uses
  except Exception as e:  # pylint: disable=broad-except  # any failure means "unreadable"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
  return None


def cache_dir() -> pathlib.Path:
  if os.environ.get("VIT_JAX_CACHE_DIR"):
    return pathlib.Path(os.environ["VIT_JAX_CACHE_DIR"])
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(xdg) / "vit_jax"


def check_images(root: pathlib.Path, rels: list[str]) -> dict[str, str | None]:
  """Returns {rel: error or None}. Verdicts are cached per (path, size, mtime) in a JSON manifest
  under the cache dir ($VIT_JAX_CACHE_DIR, default ~/.cache/vit_jax), so a second run is instant."""
  manifest_path = (
    cache_dir()
    / "image_checks"
    / f"{hashlib.md5(str(root.resolve()).encode()).hexdigest()[:16]}.json"
  )
  try:
    cached = json.loads(manifest_path.read_text())["files"]
  except (OSError, ValueError, KeyError):
    cached = {}
  entries, todo = {}, []
  for rel in rels:
    try:
      stat = os.stat(root / rel)
    except OSError as e:  # e.g. a broken symlink; -1 keeps it from ever matching the cache
      entries[rel] = [-1, -1, f"{type(e).__name__}: {e.strerror}"]
      continue
    key = [stat.st_size, stat.st_mtime_ns]
    if rel in cached and cached[rel][:2] == key:
      entries[rel] = cached[rel]
    else:
      entries[rel] = key + [None]
      todo.append(rel)
  if todo:
    logging.info("Checking %d image file(s) under %s.", len(todo), root)
    workers = min(32, 2 * (os.cpu_count() or 1))  # PIL and TF decoders release the GIL
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      for rel, error in zip(todo, pool.map(image_error, [str(root / r) for r in todo])):
        entries[rel][2] = error
    try:
      manifest_path.parent.mkdir(parents=True, exist_ok=True)
      tmp = manifest_path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_text(json.dumps({"root": str(root.resolve()), "files": entries}))
      os.replace(tmp, manifest_path)
    except OSError as e:
      logging.warning("Could not write the image-check cache %s: %s", manifest_path, e)
  return {rel: entry[2] for rel, entry in entries.items()}


def report_bad_images(root: pathlib.Path, errors: dict[str, str | None], strict: bool) -> None:
  bad = sorted(rel for rel, error in errors.items() if error is not None)
  if not bad:
    return
  if strict:
    raise ValueError(
      f"Unreadable image {root / bad[0]}: {errors[bad[0]]} ({len(bad)} unreadable "
      f"file(s) in all; config.strict_images=False skips them with a warning)."
    )
  for rel in bad[:MAX_LOGGED_BAD_FILES]:
    logging.warning("Skipping unreadable image %s: %s", root / rel, errors[rel])
  if len(bad) > MAX_LOGGED_BAD_FILES:
    logging.warning("... and %d more unreadable images.", len(bad) - MAX_LOGGED_BAD_FILES)
  logging.warning("Skipped %d unreadable image file(s) under %s.", len(bad), root)
