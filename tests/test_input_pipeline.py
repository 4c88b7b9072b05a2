"""Specification of vit_jax.input_pipeline: sources, preprocessing, determinism, slicing, bad
input. Tiny generated image folders, a committed Fashion-MNIST slice and offline tfds datasets."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io
import logging
import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from vit_jax import input_pipeline

FMNIST_SLICE = pathlib.Path(__file__).parent / "data" / "fashion_mnist_slice.npz"
SHOES = ("Sandal", "Sneaker", "Ankle boot")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
  """Keeps the image-check manifests out of the home directory."""
  monkeypatch.setenv("VIT_JAX_CACHE_DIR", str(tmp_path / "cache"))


def make_config(dataset, **overrides):
  config = common.get_config()
  config.dataset = str(dataset)
  config.pp.crop = 16
  config.batch = 4
  config.batch_eval = 4
  for name, value in overrides.items():
    target = config.pp if name in config.pp else config
    setattr(target, name, value)
  return config


def write_image(path, size=(12, 10), mode="RGB", value=None, seed=0):
  """Random pixels, or a solid `value` (an id that survives any resize, see `ids_of`)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = size
  if value is None:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  else:
    pixels = np.full((h, w, 3), value, np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix[1:].upper())
  image.save(path, fmt)
  return path


def make_folder(root, classes=("cat", "dog"), per_class=(3, 2), split_layout=True, solid=False):
  """Writes ROOT/{train,test}/<class>/*.png (or ROOT/<class>/*.png). With solid=True each image is
  a solid grey whose value is a unique id, so examples can be recognised after preprocessing."""
  next_id = 0
  for c, name in enumerate(classes):
    for split, count in zip(("train", "test") if split_layout else ("",), per_class):
      for i in range(count):
        next_id += 1
        value = 3 * next_id if solid else None  # steps of 3 survive float rounding
        write_image(
          root / split / name / f"{i}.png", size=(8 + i % 4, 6 + c), value=value, seed=next_id
        )
  return root


def ids_of(batch):
  """Solid-image ids of the real (unmasked) examples in a batch."""
  images = np.asarray(batch["image"], np.float32)
  mask = batch.get("mask", np.ones(len(images)))
  values = np.rint((images[:, 0, 0, 0] + 1) * 127.5).astype(int)
  return [v // 3 for v, m in zip(values, mask) if m]


def take(ds, n):
  return [batch for _, batch in zip(range(n), ds.as_numpy_iterator())]


def train_batches(config, n, start_step=0, index=0, count=1):
  info = input_pipeline.get_dataset_info(config)
  ds = input_pipeline.get_train_dataset(
    config, info, start_step=start_step, process_index=index, process_count=count
  )
  return take(ds, n)


def eval_batches(config, index=0, count=1):
  info = input_pipeline.get_dataset_info(config)
  return list(
    input_pipeline.get_eval_dataset(
      config, info, process_index=index, process_count=count
    ).as_numpy_iterator()
  )


# --- Image folders: discovery and splits --------------------------------------------------------


def test_train_test_layout_gives_sorted_class_names_and_counts(tmp_path):
  make_folder(tmp_path / "data", classes=("zebra", "ant", "mole"), per_class=(3, 2))
  info = input_pipeline.get_dataset_info(make_config(tmp_path / "data"))
  assert info.class_names == ("ant", "mole", "zebra")
  assert info.num_classes == 3
  # val: config.val_fraction (0.1) of train per class, one at least.
  assert info.num_examples == {"train": 6, "val": 3, "test": 6}


def test_single_tree_is_split_by_test_fraction_disjointly(tmp_path):
  make_folder(tmp_path / "data", classes=("a", "b"), per_class=(100,), split_layout=False)
  config = make_config(tmp_path / "data", test_fraction=0.25)
  info = input_pipeline.get_dataset_info(config)
  train, val, test = (set(info.source.splits[s].data) for s in ("train", "val", "test"))
  assert not train & test and not train & val and not val & test
  assert len(train | val | test) == 200
  assert 0.15 < len(test) / 200 < 0.35 and 0.05 < len(val) / len(train | val) < 0.15


def test_single_tree_split_keeps_files_in_their_split_when_files_are_added(tmp_path):
  root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=(30,), split_layout=False)
  before = input_pipeline.get_dataset_info(make_config(root)).source.splits
  make_folder(tmp_path / "more", classes=("a", "b"), per_class=(30,), split_layout=False)
  for path in (tmp_path / "more").rglob("*.png"):
    path.rename(root / path.parent.name / f"new_{path.name}")
  after = input_pipeline.get_dataset_info(make_config(root)).source.splits
  assert set(before["test"].data) <= set(after["test"].data)
  # val keeps its exact per-class share, so a file may move between train and val, never to test.
  fit = [set(splits["train"].data) | set(splits["val"].data) for splits in (before, after)]
  assert fit[0] <= fit[1]


def test_image_extensions_are_case_insensitive_and_other_files_ignored(tmp_path):
  root = tmp_path / "data"
  for name in ("a.JPG", "b.jpeg", "c.PNG", "d.bmp", "e.gif", "f.webp", "ümlaut and space.png"):
    write_image(root / "train" / "x" / name)
  write_image(root / "test" / "x" / "t.jpg")
  (root / "train" / "x" / "notes.txt").write_text("not an image")
  (root / "README.md").write_text("top-level files are not classes")
  info = input_pipeline.get_dataset_info(make_config(root, val_fraction=0.0))
  assert info.num_examples == {"train": 7, "val": 0, "test": 1}
  batch = train_batches(make_config(root, batch=7, val_fraction=0.0), 1)[0]
  assert batch["image"].shape == (7, 16, 16, 3)


def test_config_classes_keeps_those_classes_relabelled_in_given_order(tmp_path):
  root = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=(2, 1), solid=True)
  config = make_config(
    root, classes=("c", "a"), batch=4, inception_crop=False, flip=False, val_fraction=0.0
  )
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names == ("c", "a")
  assert info.num_examples == {"train": 4, "val": 0, "test": 2}
  batch = train_batches(config, 1)[0]
  # Ids 1-3 are class a (train, train, test), ids 7-9 class c.
  assert {i: l for i, l in zip(ids_of(batch), batch["label"])} == {1: 1, 2: 1, 7: 0, 8: 0}


@pytest.mark.parametrize(
  "setup, message",
  [
    (lambda root: None, "does not exist"),
    (lambda root: (make_folder(root), write_image(root / "test" / "bird" / "0.png")), "bird"),
    (lambda root: (make_folder(root), (root / "train" / "empty").mkdir()), "empty"),
    (
      lambda root: (
        make_folder(root),
        [p.unlink() for p in (root / "test").rglob("*.png")],
        [p.rmdir() for p in (root / "test").iterdir()],
      ),
      "test",
    ),
    (lambda root: make_folder(root, per_class=(3,), split_layout=False), "test_fraction"),
    (lambda root: write_image(root / "train" / "a" / "0.png"), "test"),
  ],
  ids=[
    "missing_root",
    "class_only_in_test",
    "empty_class_folder",
    "empty_test_split",
    "split_empties_test",
    "train_without_test",
  ],
)
def test_folder_problems_raise_a_value_error_naming_the_path(tmp_path, setup, message):
  root = tmp_path / "data"
  setup(root)
  config = make_config(root, test_fraction=0.0 if message == "test_fraction" else 0.2)
  with pytest.raises(ValueError, match=message) as error:
    input_pipeline.get_dataset_info(config)
  assert str(root) in str(error.value)


def test_folder_split_names_other_than_train_and_test_are_an_error(tmp_path):
  root = make_folder(tmp_path / "data")
  with pytest.raises(ValueError, match=r"config.pp.train='train\[:90%\]'"):
    input_pipeline.get_dataset_info(make_config(root, train="train[:90%]"))


def test_unknown_class_in_config_classes_lists_the_known_ones(tmp_path):
  root = make_folder(tmp_path / "data", classes=("cat", "dog"))
  with pytest.raises(ValueError, match=r"\['cow'\].*\['cat', 'dog'\]"):
    input_pipeline.get_dataset_info(make_config(root, classes=("cat", "cow")))


# --- Preprocessing -------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
  """Varying sizes and modes: RGB JPEG, greyscale PNG, RGBA PNG, palette GIF."""
  root = tmp_path / "mixed"
  for split, n in (("train", 3), ("test", 2)):
    for i in range(n):
      write_image(root / split / "a" / f"{i}.jpg", size=(40 + 7 * i, 30), seed=i)
      write_image(root / split / "b" / f"{i}.png", size=(9, 31 + i), mode="L", seed=i)
      write_image(root / split / "c" / f"{i}.png", size=(17, 13), mode="RGBA", seed=i)
      write_image(root / split / "d" / f"{i}.gif", size=(21, 20), mode="P", seed=i)
  return root


def test_train_batches_have_shape_dtype_and_range(mixed_folder):
  for batch in train_batches(make_config(mixed_folder, batch=6), 3):
    assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2, 3}


def test_bfloat16_option_gives_bfloat16_images(mixed_folder):
  batch = train_batches(make_config(mixed_folder, bfloat16=True), 1)[0]
  assert batch["image"].dtype.name == "bfloat16"


def test_eval_images_are_resized_then_centre_cropped(tmp_path):
  root = tmp_path / "data"
  # Left half black, right half white: after resize to 32 and a central crop of 16, the crop
  # starts at column 8 of 32, so its left half is black and its right half white.
  pixels = np.zeros((20, 20, 3), np.uint8)
  pixels[:, 10:] = 255
  for split in ("train", "test"):
    (root / split / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(root / split / "a" / "0.png")
  batch = eval_batches(make_config(root, eval_resize=32, batch_eval=1, val_fraction=0.0))[0]
  image = batch["image"][0]
  assert image.shape == (16, 16, 3)
  np.testing.assert_allclose(image[:, :7], -1.0)
  np.testing.assert_allclose(image[:, 9:], 1.0)


def test_eval_preprocessing_is_deterministic_and_in_range(mixed_folder):
  config = make_config(mixed_folder, batch_eval=8)
  first, second = eval_batches(config), eval_batches(config)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0


# --- Determinism and resuming --------------------------------------------------------------------


def test_training_data_is_a_function_of_the_seed(mixed_folder):
  first = train_batches(make_config(mixed_folder, seed=3), 3)
  again = train_batches(make_config(mixed_folder, seed=3), 3)
  other = train_batches(make_config(mixed_folder, seed=4), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_epochs_are_reshuffled_and_each_covers_the_split_once(tmp_path):
  root = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=(4, 1), solid=True)
  config = make_config(root, batch=4, inception_crop=False, flip=False, val_fraction=0.0)
  epochs = [sum((ids_of(b) for b in train_batches(config, 6)[k : k + 3]), []) for k in (0, 3)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize("start_step", [1, 4])  # 4 batches of 3 cross the 9-example epoch boundary
def test_resuming_at_step_k_yields_batches_k_onwards(mixed_folder, start_step):
  config = make_config(mixed_folder, batch=3, seed=7)
  fresh = train_batches(config, start_step + 2)
  resumed = train_batches(config, 2, start_step=start_step)
  for a, b in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


# --- Processes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("count, start_step", [(2, 0), (4, 0), (2, 3)])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, count, start_step):
  # 15 examples, global batch 4: 6 steps cross epoch boundaries mid-batch. Augmentation on.
  root = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=(5, 1))
  config = make_config(root, batch=4, seed=5)
  single = train_batches(config, start_step + 6)[start_step:]
  parts = [
    train_batches(config, 6, start_step=start_step, index=p, count=count) for p in range(count)
  ]
  for step, batch in enumerate(single):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
        np.concatenate([part[step][key] for part in parts]),
        batch[key],
        err_msg=f"step {start_step + step}, {key}",
      )


def test_each_process_reads_only_the_files_of_its_own_rows(tmp_path):
  root = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=(5, 1), solid=True)
  config = make_config(root, batch=4, inception_crop=False, flip=False)
  info = input_pipeline.get_dataset_info(config)
  batches = [ids_of(b) for b in train_batches(config, 3)]
  own = [ids[:2] for ids in batches]  # process 0 of 2: rows 0-1 of each global batch
  keep = set(sum(own, []))
  assert len(keep) < len(set(sum(batches, [])))  # the other rows need other files
  for path in (root / "train").rglob("*.png"):
    if int(np.asarray(Image.open(path))[0, 0, 0]) // 3 not in keep:
      path.unlink()  # a read of it would fail and be skipped, shifting the rows
  ds = input_pipeline.get_train_dataset(config, info, process_index=0, process_count=2)
  assert [ids_of(b) for b in take(ds, 3)] == own


def test_two_processes_get_different_augmentations(tmp_path):
  root = tmp_path / "data"
  for name in ("train/a/0.png", "train/a/1.png", "test/a/0.png"):
    write_image(root / name, size=(30, 30), seed=0)
  config = make_config(root, batch=2)  # each process holds one copy of the same image
  images = [train_batches(config, 1, index=p, count=2)[0]["image"][0] for p in (0, 1)]
  assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_test_example_once_with_equal_batch_counts(tmp_path, count):
  # 7 test examples, local batch 2 per process: remainders on every process.
  root = make_folder(
    tmp_path / "data", classes=("a", "b", "c", "d", "e", "f", "g"), per_class=(1, 1), solid=True
  )
  config = make_config(root, batch_eval=2 * count, val_fraction=0.0)
  info = input_pipeline.get_dataset_info(config)
  expected = input_pipeline.num_eval_batches(config, info, process_count=count)
  ids = []
  for p in range(count):
    batches = eval_batches(config, index=p, count=count)
    assert len(batches) == expected
    for batch in batches:
      assert batch["image"].shape == (2, 16, 16, 3) and batch["mask"].dtype == np.int32
      assert np.all(batch["image"][batch["mask"] == 0] == 0)
      ids += ids_of(batch)
  assert sorted(ids) == [2, 4, 6, 8, 10, 12, 14]
  assert expected == (4 if count == 1 else 2)


def test_batch_not_divisible_by_process_count_is_an_error(tmp_path):
  root = make_folder(tmp_path / "data")
  config = make_config(root, batch=5)
  info = input_pipeline.get_dataset_info(config)
  with pytest.raises(ValueError, match="config.batch=5"):
    input_pipeline.get_train_dataset(config, info, process_index=0, process_count=2)


# --- Bad input -----------------------------------------------------------------------------------


def _truncated_jpeg(path):
  buffer = io.BytesIO()
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(pixels).save(buffer, "JPEG")
  path.write_bytes(buffer.getvalue()[:600])


BAD_FILES = {
  "zero_byte.jpg": lambda path: path.write_bytes(b""),
  "truncated.jpg": _truncated_jpeg,
  "text.jpg": lambda path: path.write_text("this is not an image\n"),
  "broken_link.png": lambda path: path.symlink_to(path.parent / "missing.png"),
  # Pillow reads these two, TensorFlow cannot decode them:
  "tiff.jpg": lambda path: Image.new("RGB", (8, 8)).save(path, "TIFF"),
  "one_bit.bmp": lambda path: Image.new("1", (8, 8)).save(path, "BMP"),
}


@pytest.fixture
def folder_with_bad_files(tmp_path):
  root = make_folder(tmp_path / "data", per_class=(3, 2))
  for name, write in BAD_FILES.items():
    write(root / "train" / "cat" / name)
  return root


def test_bad_files_are_skipped_with_a_warning_naming_each(folder_with_bad_files, caplog):
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(make_config(folder_with_bad_files))
  # 9 cat files, 6 of them bad: held-out val files can be bad ones too.
  assert info.num_examples == {"train": 5, "val": 1, "test": 4}
  for name in BAD_FILES:
    assert str(folder_with_bad_files / "train" / "cat" / name) in caplog.text
  assert f"Skipped {len(BAD_FILES)} unreadable image file(s)" in caplog.text
  assert len(train_batches(make_config(folder_with_bad_files, batch=6), 2)) == 2


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_strict_images_makes_a_bad_file_an_error_naming_it(tmp_path, name):
  root = make_folder(tmp_path / "data")
  BAD_FILES[name](root / "test" / "dog" / name)
  with pytest.raises(ValueError, match=str(root / "test" / "dog" / name)):
    input_pipeline.get_dataset_info(make_config(root, strict_images=True))


def test_a_repaired_file_is_checked_again(folder_with_bad_files):
  config = make_config(folder_with_bad_files)

  def readable(info):
    return info.num_examples["train"] + info.num_examples["val"]

  assert readable(input_pipeline.get_dataset_info(config)) == 6
  path = folder_with_bad_files / "train" / "cat" / "text.jpg"
  write_image(path)
  os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime differs even on coarse clocks
  assert readable(input_pipeline.get_dataset_info(config)) == 7


def test_a_class_of_only_bad_files_is_an_error_naming_its_folder(tmp_path):
  root = make_folder(tmp_path / "data")
  (root / "train" / "cow").mkdir()
  BAD_FILES["text.jpg"](root / "train" / "cow" / "text.jpg")
  with pytest.raises(ValueError, match=str(root / "train" / "cow")):
    input_pipeline.get_dataset_info(make_config(root))


# --- Fashion-MNIST -------------------------------------------------------------------------------


def test_fashion_mnist_slice_shoe_classes(tmp_path):
  config = make_config(
    "fashion_mnist",
    fashion_mnist_dir=str(FMNIST_SLICE),
    classes=SHOES,
    crop=28,
    batch=16,
    batch_eval=64,
    inception_crop=False,
    flip=False,
  )
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names == SHOES
  assert info.num_examples == {"train": 270, "val": 30, "test": 150}
  batch = train_batches(config, 1)[0]
  assert batch["image"].shape == (16, 28, 28, 3) and set(batch["label"]) <= {0, 1, 2}
  # Grey -> RGB, and labels follow the images: compare with the raw slice.
  with np.load(FMNIST_SLICE) as raw:
    fmnist_label = {x.tobytes(): y for x, y in zip(raw["x_train"], raw["y_train"])}
  for image, label in zip(batch["image"], batch["label"]):
    assert np.array_equal(image[..., 0], image[..., 2])
    pixels = np.rint((image[..., 0] + 1) * 127.5).astype(np.uint8)
    assert fmnist_label[pixels.tobytes()] == (5, 7, 9)[label]
  masks = sum(int(b["mask"].sum()) for b in eval_batches(config))
  assert masks == 150


def test_fashion_mnist_all_classes_have_their_published_names():
  config = make_config("fashion_mnist", fashion_mnist_dir=str(FMNIST_SLICE))
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
  assert info.num_examples == {"train": 900, "val": 100, "test": 500}


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
  config = make_config("fashion_mnist", fashion_mnist_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
    input_pipeline.get_dataset_info(config)


# --- tfds ----------------------------------------------------------------------------------------


class VitJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """A tiny real tfds dataset (prepared offline in tmp_path): 23 train, 11 test images."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(23), "test": self._generate_examples(11)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (8 + i % 5, 12, 3), dtype=np.uint8), "label": i % 3}


@pytest.fixture
def tfds_dir(tmp_path):
  VitJaxTestImages(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  return str(tmp_path / "tfds")


def test_tfds_source_yields_batches_and_exact_eval_counts(tfds_dir):
  config = make_config("vit_jax_test_images", tfds_data_dir=tfds_dir, batch_eval=4)
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names == ("x", "y", "z") and info.num_examples == {
    "train": 21,
    "val": 2,
    "test": 11,
  }
  batch = train_batches(config, 1)[0]
  assert batch["image"].shape == (4, 16, 16, 3)
  assert -1 <= batch["image"].min() <= batch["image"].max() <= 1
  for count in (1, 2):
    counts = [len(eval_batches(config, index=p, count=count)) for p in range(count)]
    assert counts == [input_pipeline.num_eval_batches(config, info, count)] * count
    assert (
      sum(
        int(b["mask"].sum())
        for p in range(count)
        for b in eval_batches(config, index=p, count=count)
      )
      == 11
    )


def test_tfds_source_is_deterministic_and_resumable(tfds_dir):
  config = make_config("vit_jax_test_images", tfds_data_dir=tfds_dir, batch=4, shuffle_buffer=8)
  fresh = train_batches(config, 8)
  again = train_batches(config, 8)
  resumed = train_batches(config, 2, start_step=6)  # past the 23-example epoch
  for a, b in zip(fresh + fresh[6:], again + resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_unknown_split_is_an_error_listing_the_splits(tfds_dir):
  config = make_config("vit_jax_test_images", tfds_data_dir=tfds_dir, test="validation")
  with pytest.raises(ValueError, match=r"config.pp.test='validation'.*\['train', 'test'\]"):
    input_pipeline.get_dataset_info(config)


def test_tfds_mock_data_yields_correctly_shaped_batches(tmp_path):
  # mock_data has no split metadata (sizes are counted) and ignores sub-splits: one process only.
  config = make_config("cifar10", tfds_data_dir=str(tmp_path), tfds_download=True, batch_eval=4)
  with tfds.testing.mock_data(num_examples=6):
    info = input_pipeline.get_dataset_info(config)
    assert info.num_classes == 10 and info.num_examples == {"train": 6, "val": 6, "test": 6}
    batch = train_batches(config, 2)[1]
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    assert sum(int(b["mask"].sum()) for b in eval_batches(config)) == 6


def test_unprepared_tfds_dataset_fails_fast_saying_how_to_prepare_it(tmp_path):
  config = make_config("cifar10", tfds_data_dir=str(tmp_path))
  start = time.time()
  with pytest.raises(ValueError, match="tfds_download=True.*tfds_data_dir"):
    input_pipeline.get_dataset_info(config)
  assert time.time() - start < 10
