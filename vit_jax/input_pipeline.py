"""Input pipelines: deterministic, resumable tf.data over the sources of `data_sources`.

Training data is a pure function of (config.seed, step). Folder and Fashion-MNIST examples are
shuffled at the index level with one stateless permutation per epoch, the same for every
process; global batch s is elements s*B .. s*B+B-1 of that stream whatever the process count, and
process i of P takes elements s*B + i*B/P .. s*B + (i+1)*B/P - 1 of it and reads only their files.
Resuming at step k skips integers, not images. tfds records are split between processes by file,
so their order depends on the process count; they are shuffled by tf.data with fixed seeds and
resumed with `skip` on the (still encoded) records.
Augmentation (`preprocess`) is stateless-random, keyed by (seed, global element index), so a
resumed run augments each example as the uninterrupted run would.
"""

import math
from typing import Any, Callable

import jax
import ml_collections
import tensorflow as tf

from vit_jax import data_sources, preprocess

# The face of google-research/vision_transformer: `input_pipeline.get_dataset_info(config)`.
from vit_jax.data_sources import DatasetInfo, get_dataset_info  # pylint: disable=unused-import

_FOREVER = 2**62  # "infinite" bound for tf.data.Dataset.range


def _source(config: ml_collections.ConfigDict, info: DatasetInfo) -> Any:
  return info.source if info.source is not None else get_dataset_info(config).source


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not in [0, process_count={count}).")
  return index, count


def _local_batch(batch: int, process_count: int, field: str) -> int:
  if batch <= 0 or batch % process_count:
    raise ValueError(
      f"{field}={batch} must be a positive multiple of the process count ({process_count})."
    )
  return batch // process_count


def _slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This process's [start, end) of n examples; the slices partition range(n)."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _loader(
  examples: data_sources.Examples, is_files: bool, decode: bool = True
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """index -> (image, int32 label); the image is [H, W, 3] uint8, or file bytes if not `decode`."""
  data, labels = tf.constant(examples.data), tf.constant(examples.labels)

  def load(index):
    item = tf.gather(data, index)
    if is_files:
      image = tf.io.read_file(item)
      image = preprocess.decode(image) if decode else image
    else:
      image = tf.image.grayscale_to_rgb(item[..., None])
    return image, tf.gather(labels, index)

  return load


def _epoch_permutations(n: int, seed: int, start: int) -> tf.data.Dataset:
  """Example indices in training order from element `start` on: epoch e is a permutation of
  range(n) that depends only on (seed, e), so skipping costs integers, not images."""
  first_epoch, offset = divmod(start, n)

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e])
    )
    return tf.data.Dataset.from_tensor_slices(order)

  return tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch).skip(offset)


def _process_indices(
  n: int, seed: int, start_step: int, global_batch: int, process_index: int, local_batch: int
) -> tf.data.Dataset:
  """This process's example indices from step `start_step` on: of each global batch of the
  process-independent stream `_epoch_permutations`, rows process_index * local_batch onwards."""
  lo = process_index * local_batch
  ds = _epoch_permutations(n, seed, start_step * global_batch).batch(global_batch)
  return ds.map(lambda rows: rows[lo : lo + local_batch]).unbatch()


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep element order (explicit: the contract needs it)
  return ds.with_options(options)


def get_train_dataset(
  config: ml_collections.ConfigDict,
  info: DatasetInfo,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """Infinite batches {'image': [B, crop, crop, 3], 'label': [B] int32}, B = batch / processes.

  Deterministic in config.seed; with start_step=k it yields exactly batches k, k+1, ... of the
  start_step=0 dataset. For folders and Fashion-MNIST, the P processes' batches of a step,
  concatenated in process order, are the batch of one process (augmentations included); each
  process reads only its own rows' files.
  """
  index, count = _processes(process_index, process_count)
  batch = _local_batch(config.batch, count, "config.batch")
  source = _source(config, info)
  start = start_step * batch  # first element of this process's stream
  base_key = tf.constant([config.seed, 0], tf.int64)

  def key_of(element):
    # Element e of this process is element (e//B)*global_batch + index*B + e%B of the global batch
    # stream: unique over processes, and the same whichever step the pipeline started at.
    global_element = (element // batch) * config.batch + index * batch + element % batch
    return tf.random.experimental.stateless_fold_in(base_key, global_element)

  if isinstance(source, data_sources.IndexedSource):
    load = _loader(source.splits["train"], source.is_files, decode=False)

    def prepare(element, example):
      image, label = load(example)
      return {
        "image": preprocess.train_preprocess(image, key_of(element), config.pp),
        "label": label,
      }

    ds = _process_indices(
      source.split_size("train"), config.seed, start_step, config.batch, index, batch
    ).enumerate(start)
  else:
    split = data_sources.tfds_process_split(source.split_names["train"], index, count)
    n_local = data_sources.tfds_split_size(source.builder, split)
    ds = data_sources.tfds_records(source, split, seed=config.seed).repeat()
    # Shuffling (seeded) before `skip`, and decoding after it, keeps resuming deterministic; its
    # cost is reading start_step * B encoded records.
    ds = ds.shuffle(min(config.shuffle_buffer, n_local), seed=config.seed)
    ds = ds.enumerate().skip(start)

    def prepare(element, record):
      encoded, label = record
      return {
        "image": preprocess.train_preprocess(encoded, key_of(element), config.pp),
        "label": label,
      }

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if isinstance(source, data_sources.TfdsSource) or source.is_files:
    # Safety net only: files were checked up front. A file dropped here shifts later batches.
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(batch, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def _eval_local_sizes(source: Any, count: int, split: str) -> list[int]:
  if isinstance(source, data_sources.IndexedSource):
    n = source.split_size(split)
    return [hi - lo for lo, hi in (_slice(n, i, count) for i in range(count))]
  split = source.split_names[split]
  return [
    data_sources.tfds_split_size(source.builder, data_sources.tfds_process_split(split, i, count))
    for i in range(count)
  ]


def num_eval_batches(
  config: ml_collections.ConfigDict,
  info: DatasetInfo,
  process_count: int | None = None,
  split: str = "test",
) -> int:
  """Batches every process yields in evaluation: enough for the largest process slice."""
  _, count = _processes(0, process_count)
  batch = _local_batch(config.batch_eval, count, "config.batch_eval")
  return math.ceil(max(_eval_local_sizes(_source(config, info), count, split)) / batch)


def get_eval_dataset(
  config: ml_collections.ConfigDict,
  info: DatasetInfo,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  with_ids: bool = False,
  split: str = "test",
) -> tf.data.Dataset:
  """Finite eval batches {'image', 'label', 'mask' (int32, 0 = padding)} of batch_eval/processes
  over `split` ('test' or 'val').

  Every process yields num_eval_batches(...) batches; padding (zero images, mask 0) fills the
  rest, so summing over mask on all processes counts each example exactly once.
  `with_ids` adds 'index' (int32): the example's position in the whole split, -1 for padding.
  """
  index, count = _processes(process_index, process_count)
  batch = _local_batch(config.batch_eval, count, "config.batch_eval")
  source = _source(config, info)
  num_batches = num_eval_batches(config, info, count, split)

  if isinstance(source, data_sources.IndexedSource):
    lo, hi = _slice(source.split_size(split), index, count)
    load = _loader(source.splits[split], source.is_files)
    ds = tf.data.Dataset.range(lo, hi).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    n_local = hi - lo
  else:
    local = data_sources.tfds_process_split(source.split_names[split], index, count)
    n_local = data_sources.tfds_split_size(source.builder, local)
    ds = data_sources.tfds_records(source, local, seed=None)
    ds = ds.map(
      lambda encoded, label: (preprocess.decode(encoded), label),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  ds = ds.map(
    lambda image, label: {
      "image": preprocess.eval_preprocess(image, config.pp),
      "label": label,
      "mask": tf.constant(1, tf.int32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  if with_ids:  # processes read consecutive slices of the split: offset = earlier slices' sizes
    offset = sum(_eval_local_sizes(source, count, split)[:index])
    ds = ds.enumerate(offset).map(lambda i, ex: {**ex, "index": tf.cast(i, tf.int32)})
  if config.cache:
    ds = ds.cache()
  dtype = tf.bfloat16 if config.pp.bfloat16 else tf.float32
  padding = {
    "image": tf.zeros([config.pp.crop, config.pp.crop, 3], dtype),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0, tf.int32),
  }
  if with_ids:
    padding["index"] = tf.constant(-1, tf.int32)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch - n_local))
  return _options(ds.batch(batch).prefetch(tf.data.AUTOTUNE))
