"""Data sources: image folders, Fashion-MNIST and tfds, found and checked before any training.

Three sources, chosen by `config.dataset`:
* an image folder, `ROOT/{train,val,test}/<class>/*` or `ROOT/<class>/*` (test split off by a hash
  of each file's path, so a file keeps its split as files are added);
* `fashion_mnist`: the Debian IDX files (or a `.npz` slice), held in memory;
* any other name: a prepared tfds dataset.

Each has three splits: train, val (model selection) and test (read once, at the end). Without a
`val/` folder or a tfds `config.pp.val`, val is `config.val_fraction` of each class of train
(stratified), chosen by a hash of each example's name: the same on every host and every run
(tfds: the end of the train split, by tfds' slicing). Adding files keeps each file's test split;
it may move a few files between train and val, as the per-class counts grow.

`get_dataset_info` finds the classes and examples and raises a ValueError naming the file or
config field at fault; `input_pipeline` turns what it found into tf.data pipelines.
"""

import dataclasses
import functools
import gzip
import hashlib
import math
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax import image_checks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
FASHION_MNIST_DIRS = (
  "/usr/share/datasets/fashion-mnist",
  ".cache/fashion-mnist",
  ".cache/fmnist/usr/share/datasets/fashion-mnist",
)
SPLITS = ("train", "val", "test")

# --- Sources ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split of a source whose examples are addressable by index."""

  data: np.ndarray  # file paths (str) or images [N, H, W] uint8
  labels: np.ndarray  # [N] int32


@dataclasses.dataclass(frozen=True)
class IndexedSource:
  """An image folder (data = paths) or in-memory arrays (data = pixels)."""

  splits: dict[str, Examples]
  is_files: bool

  def split_size(self, split: str) -> int:
    return len(self.splits[split].labels)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  builder: Any  # tfds.core.DatasetBuilder
  split_names: dict[str, str]  # 'train'/'val'/'test' -> tfds split string ('' for no val)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]
  num_examples: dict[str, int]  # {'train': N, 'val': N, 'test': N}, over all processes
  # What get_dataset_info found (file lists, arrays, builder), so the pipelines need not redo it.
  source: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def subset(info: DatasetInfo, split: str, rows: np.ndarray) -> DatasetInfo | None:
  """`info` whose `split` holds only its examples `rows`, in that order (the pipelines then read
  just those); None for a tfds source, whose examples are not addressable by index."""
  if not isinstance(info.source, IndexedSource):
    return None
  rows = np.asarray(rows, np.int64)
  examples = info.source.splits[split]
  picked = Examples(data=examples.data[rows], labels=examples.labels[rows])
  source = dataclasses.replace(info.source, splits={**info.source.splits, split: picked})
  num_examples = {**info.num_examples, split: len(rows)}
  return dataclasses.replace(info, num_examples=num_examples, source=source)


def split_digest(info: DatasetInfo, split: str) -> dict[str, Any]:
  """{'examples': N, 'md5': ...} of what a split holds (file paths or pixels, and labels; the
  split string for tfds): equal digests, equal splits, across reruns and process counts."""
  md5 = hashlib.md5()
  if isinstance(info.source, IndexedSource):
    examples = info.source.splits[split]
    data = examples.data
    md5.update("\n".join(data).encode() if info.source.is_files else data.tobytes())
    md5.update(examples.labels.tobytes())
  else:
    md5.update(f"{info.source.builder.name}:{info.source.split_names[split]}".encode())
  return dict(examples=int(info.num_examples[split]), md5=md5.hexdigest())


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Finds and checks the data of `config.dataset`; every data error surfaces here."""
  if not config.dataset:
    raise ValueError(
      "config.dataset is empty: give an image folder, 'fashion_mnist' or a tfds name."
    )
  if config.dataset == "fashion_mnist":
    class_names, source = _fashion_mnist_source(config)
  elif os.path.isdir(os.path.expanduser(config.dataset)) or config.dataset.startswith(
    ("/", ".", "~")
  ):
    class_names, source = _folder_source(config)
  else:  # tfds names may contain '/' too ("name/config"), so a missing folder ends up here.
    class_names, source = _tfds_source(config)
  if isinstance(source, IndexedSource):
    num_examples = {split: source.split_size(split) for split in SPLITS}
  else:
    num_examples = {
      split: tfds_split_size(source.builder, name, f"config.pp.{split}") if name else 0
      for split, name in source.split_names.items()
    }
  for split, n in num_examples.items():
    if n == 0 and not (split == "val" and not config.val_fraction):
      raise ValueError(
        f"The {split} split of {config.dataset!r} is empty"
        + (f" (config.val_fraction={config.val_fraction})." if split == "val" else ".")
      )
  return DatasetInfo(class_names=tuple(class_names), num_examples=num_examples, source=source)


def _check_split_names(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Folders and Fashion-MNIST know only 'train', 'val' and 'test' (no tfds slicing)."""
  if config.pp.val:
    raise ValueError(
      f"config.pp.val={config.pp.val!r}: names a tfds split; {config.dataset!r} takes its "
      "validation split from a val/ folder or config.val_fraction (leave config.pp.val empty)."
    )
  names = {"train": config.pp.train, "test": config.pp.test}
  for field, name in names.items():
    if name not in SPLITS:
      raise ValueError(
        f"config.pp.{field}={name!r}: {config.dataset!r} has only the splits "
        f"'train', 'val' and 'test' (slicing like 'train[:90%]' is for tfds datasets)."
      )
  return names


def held_out(keys: list[str], fraction: float) -> set[str]:
  """The `round(fraction * n)` of `keys` with the smallest hashes (one at least when there are two
  or more, never all): exact per-class counts, the same on every machine whatever the order of
  `keys`. Salted, so that it does not depend on the test split's hash of the same path."""
  n = len(keys)
  k = min(max(round(fraction * n), 1 if fraction > 0 and n > 1 else 0), max(n - 1, 0))
  return set(sorted(keys, key=lambda key: (_hash_fraction("val:" + key), key))[:k])


def _check_classes_in_train(root: pathlib.Path, files: dict[str, dict[str, list[str]]]) -> None:
  """A class of val/ or test/ that train/ lacks is an error; one without examples, a warning."""
  for split in ("val", "test"):
    extra = sorted(set(files[split]) - set(files["train"]))
    if extra:
      raise ValueError(
        f"Class folder {root / split / extra[0]} has no counterpart in "
        f"{root / 'train'} ({split} classes missing from train: {extra})."
      )
  for name in sorted(set(files["train"]) - set(files["test"])):
    logging.warning("Class %s has no test images in %s.", name, root / "test")


def _select_classes(
  config: ml_collections.ConfigDict, known: list[str], where: str
) -> tuple[list[str], np.ndarray]:
  """Applies config.classes: returns the kept names and a map old label -> new label (-1: drop)."""
  wanted = list(config.classes or known)
  unknown = [c for c in wanted if c not in known]
  if unknown:
    raise ValueError(
      f"config.classes has unknown class(es) {unknown}; the classes of {where} are: {known}"
    )
  if len(set(wanted)) != len(wanted):
    raise ValueError(f"config.classes lists a class twice: {wanted}")
  relabel = np.full(len(known), -1, np.int32)
  for new, name in enumerate(wanted):
    relabel[known.index(name)] = new
  return wanted, relabel


# --- Image folders ------------------------------------------------------------------------------


def _folder_source(config: ml_collections.ConfigDict) -> tuple[list[str], IndexedSource]:
  root = pathlib.Path(config.dataset).expanduser()
  if not root.is_dir():
    raise ValueError(f"Dataset folder {root} does not exist (config.dataset={config.dataset!r}).")
  split_names = _check_split_names(config)
  has_splits = (root / "train").is_dir() or (root / "test").is_dir()
  if has_splits:
    files = {split: _list_class_files(root, root / split) for split in ("train", "test")}
  else:
    by_class = _list_class_files(root, root)
    # A hash of the path, not a seeded permutation: a file keeps its split as files are added.
    files = {
      split: {
        name: [r for r in rels if (_hash_fraction(r) < config.test_fraction) == (split == "test")]
        for name, rels in by_class.items()
      }
      for split in ("train", "test")
    }
  if has_splits and (root / "val").is_dir():
    files["val"] = _list_class_files(root, root / "val")
  else:  # per class, so that val has train's class balance
    val = {name: held_out(rels, config.val_fraction) for name, rels in files["train"].items()}
    files["val"] = {name: sorted(val[name]) for name in files["train"]}
    files["train"] = {
      name: [r for r in rels if r not in val[name]] for name, rels in files["train"].items()
    }
  class_names = sorted(files["train"])
  if has_splits:
    _check_classes_in_train(root, files)

  all_files = [r for split in SPLITS for rels in files[split].values() for r in rels]
  errors = image_checks.check_images(root, all_files)
  image_checks.report_bad_images(root, errors, config.strict_images)
  found = class_names
  class_names, relabel = _select_classes(config, found, str(root))
  for name in class_names:  # A kept class with no readable file is an error, not a skip.
    rels = [r for split in SPLITS for r in files[split].get(name, [])]
    by_folder: dict[str, list[str]] = {}
    for r in rels:  # by the folder a file lives in (held-out val files live under train/)
      by_folder.setdefault(pathlib.Path(r).parts[0] if has_splits else "", []).append(r)
    for split, rels in by_folder.items():
      if rels and all(errors[r] is not None for r in rels):
        raise ValueError(f"No readable image in {root / split / name}.")
  splits = {}
  for split in SPLITS:
    examples = [
      (r, label)
      for name, label in zip(found, relabel)
      if label >= 0
      for r in files[split].get(name, [])
      if errors[r] is None
    ]
    if not examples and split != "val":
      raise ValueError(
        f"The {split} split of {root} is empty"
        + ("." if has_splits else f" (config.test_fraction={config.test_fraction}).")
      )
    # Interleave the classes (order by path hash), so that each process's slice is class-balanced.
    examples.sort(key=lambda e: _hash_fraction(e[0]))
    splits[split] = Examples(
      data=np.array([str(root / r) for r, _ in examples], dtype=str),
      labels=np.array([l for _, l in examples], np.int32),
    )
  splits = {
    "train": splits[split_names["train"]],
    "val": splits["val"],
    "test": splits[split_names["test"]],
  }
  return class_names, IndexedSource(splits=splits, is_files=True)


def _list_class_files(root: pathlib.Path, top: pathlib.Path) -> dict[str, list[str]]:
  """Returns {class: [image paths relative to root]} for `top/<class>/**`."""
  if not top.is_dir():
    raise ValueError(
      f"Missing split folder {top}: a dataset with a train/ or test/ folder needs both."
    )
  classes = sorted(d.name for d in top.iterdir() if d.is_dir() and not d.name.startswith("."))
  if not classes:
    raise ValueError(f"No class folders in {top}: expected {top}/<class name>/<images>.")
  files = {}
  for name in classes:
    rels = []
    for dirpath, dirnames, filenames in os.walk(top / name):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      rels += [
        os.path.relpath(os.path.join(dirpath, f), root)
        for f in sorted(filenames)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
      ]
    if not rels:
      raise ValueError(
        f"Class folder {top / name} has no images (extensions: {', '.join(IMAGE_EXTENSIONS)})."
      )
    files[name] = rels
  return files


def _hash_fraction(text: str) -> float:
  """A fixed pseudo-random number in [0, 1) for `text` (same on every machine and run)."""
  return int(hashlib.md5(text.encode()).hexdigest()[:8], 16) / 2**32


# --- Fashion-MNIST ------------------------------------------------------------------------------


def _fashion_mnist_source(config: ml_collections.ConfigDict) -> tuple[list[str], IndexedSource]:
  split_names = _check_split_names(config)
  arrays = load_fashion_mnist(find_fashion_mnist(config.fashion_mnist_dir))
  class_names, relabel = _select_classes(config, list(FASHION_MNIST_CLASSES), "fashion_mnist")
  images, labels = arrays["train"]
  # val: a fixed stratified part of the train split, by example index (see held_out).
  in_val = np.zeros(len(labels), bool)
  for c in range(len(FASHION_MNIST_CLASSES)):
    rows = np.flatnonzero(labels == c)
    keys = [f"fashion_mnist/train/{i}" for i in rows]
    held = held_out(keys, config.val_fraction)
    in_val[[i for i, key in zip(rows, keys) if key in held]] = True
  parts = {
    "train": (images[~in_val], labels[~in_val]),
    "val": (images[in_val], labels[in_val]),
    "test": arrays["test"],
  }
  names = {"train": split_names["train"], "val": "val", "test": split_names["test"]}
  splits = {}
  for split in SPLITS:
    images, labels = parts[names[split]]
    labels = relabel[labels]
    keep = labels >= 0
    splits[split] = Examples(data=images[keep], labels=labels[keep])
  return class_names, IndexedSource(splits=splits, is_files=False)


def find_fashion_mnist(configured: str) -> str:
  candidates = [configured] if configured else list(FASHION_MNIST_DIRS)
  for path in candidates:
    path = os.path.expanduser(path)
    if os.path.isfile(path) and path.endswith(".npz"):
      return path
    if os.path.isfile(os.path.join(path, "train-images-idx3-ubyte.gz")):
      return path
  raise ValueError(
    f"Fashion-MNIST not found in {', '.join(candidates)}. Install it with `apt-get install "
    f"dataset-fashion-mnist` (as root), or set --config.fashion_mnist_dir to a folder with its "
    f"four IDX .gz files or to a .npz with x_train, y_train, x_test, y_test."
  )


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns {'train': (images [N,28,28] uint8, labels [N] int32), 'test': ...}."""
  if path.endswith(".npz"):
    with np.load(path) as f:
      missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
      if missing:
        raise ValueError(f"{path} lacks the array(s) {sorted(missing)}.")
      out = {
        s: (f[f"x_{s}"].astype(np.uint8), f[f"y_{s}"].astype(np.int32)) for s in ("train", "test")
      }
  else:
    out = {
      s: (
        _read_idx(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"), 3),
        _read_idx(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"), 1).astype(np.int32),
      )
      for s, prefix in (("train", "train"), ("test", "t10k"))
    }
  for split, (images, labels) in out.items():
    if images.ndim != 3 or len(images) != len(labels) or not np.all((labels >= 0) & (labels < 10)):
      raise ValueError(
        f"{path}: the {split} images {images.shape} and labels {labels.shape} do "
        f"not look like Fashion-MNIST."
      )
  return out


def _read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads a gzip IDX file: big-endian magic 0x0000080<ndim>, ndim sizes, then uint8 data."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"Cannot read {path}: {e}") from e
  header = 4 * (1 + ndim)
  magic = int.from_bytes(raw[:4], "big")
  if magic != 0x800 + ndim or len(raw) < header:
    raise ValueError(f"{path} is not an IDX file of {ndim} dimension(s) (magic {magic:#x}).")
  shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  if len(raw) - header != math.prod(shape):
    raise ValueError(
      f"{path} is truncated: header says {shape}, data has {len(raw) - header} bytes."
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


# --- tfds ---------------------------------------------------------------------------------------


def _tfds_source(config: ml_collections.ConfigDict) -> tuple[list[str], TfdsSource]:
  data_dir = config.tfds_data_dir or None
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except ValueError as e:  # includes tfds' DatasetNotFoundError
    reason = str(e).split(" Available datasets")[0].splitlines()[0][:200]
    raise ValueError(
      f"Dataset folder {os.path.abspath(config.dataset)} does not exist, and "
      f"config.dataset={config.dataset!r} is no tfds dataset either ({reason})."
    ) from e
  if config.classes:
    raise ValueError(
      "config.classes is only supported for image folders and fashion_mnist, not "
      f"for the tfds dataset {config.dataset!r}."
    )
  if not builder.is_prepared():
    if not config.tfds_download:
      raise ValueError(
        f"tfds dataset {config.dataset!r} is not prepared in {builder.data_dir}. Prepare it once "
        f"with --config.tfds_download=True on a machine with internet access, or point "
        f"--config.tfds_data_dir at a folder where it is prepared."
      )
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=config.tfds_manual_dir or None)
    )
  features = builder.info.features
  if (
    "image" not in features
    or "label" not in features
    or not isinstance(features["label"], tfds.features.ClassLabel)
  ):
    raise ValueError(
      f"tfds dataset {config.dataset!r} needs an 'image' and a ClassLabel 'label' "
      f"feature; it has {list(features.keys())}."
    )
  train, val = config.pp.train, config.pp.val
  if not val and config.val_fraction:
    if "[" in train or "+" in train:
      raise ValueError(
        f"config.pp.val is empty and config.pp.train={train!r} is already sliced: name the "
        "validation split (e.g. --config.pp.val='train[98%:]' beside 'train[:98%]'), or "
        "--config.val_fraction=0 for none."
      )
    n = tfds_split_size(builder, train, "config.pp.train")
    k = max(1, round(config.val_fraction * n))  # the end of train, by tfds' own slicing
    train, val = f"{train}[:{n - k}]", f"{train}[{n - k}:]"
    logging.info("tfds %s: train %s, val %s (config.val_fraction)", config.dataset, train, val)
  source = TfdsSource(
    builder=builder, split_names={"train": train, "val": val, "test": config.pp.test}
  )
  return list(features["label"].names), source


def tfds_split_size(builder: Any, split: Any, field: str = "split") -> int:
  if not builder.info.splits:  # No split metadata, as under tfds.testing.mock_data: count.
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(
      f"{field}={split!r} is not a split of {builder.name} (its splits: "
      f"{list(builder.info.splits)}; slicing like 'train[:90%]' works)."
    ) from e


def tfds_process_split(split: str, process_index: int, process_count: int) -> Any:
  return tfds.even_splits(split, n=process_count)[process_index] if process_count > 1 else split


def tfds_records(source: TfdsSource, split: Any, *, seed: int | None) -> tf.data.Dataset:
  """(encoded image, label) records; file order shuffled with `seed` unless it is None."""
  ds = source.builder.as_dataset(
    split=split,
    shuffle_files=seed is not None,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True),
  )
  return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
