"""Server-side batching: concurrent requests share one forward pass.

Requests put their images on a queue; one worker thread takes the first waiting request, gathers
more for up to `window_s` or until `max_batch` images, pads the batch to the next bucket size
(powers of two up to max_batch) and runs the model once. Fixed bucket sizes mean a jitted model
compiles once per bucket (`warm_up` does it before the server says it is ready) instead of once
per distinct batch size.
"""

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Callable

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]


def bucket_sizes(max_batch: int) -> list[int]:
  """1, 2, 4, ... and max_batch itself: the batch sizes the model is ever called with."""
  sizes, size = [], 1
  while size < max_batch:
    sizes.append(size)
    size *= 2
  return sizes + [max_batch]


class Batcher:
  """`await batcher.predict(images)` -> the model's outputs for `images`, batched with others."""

  def __init__(self, model: Model, max_batch: int = 32, window_s: float = 0.005):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self._model, self.max_batch, self._window_s = model, max_batch, window_s
    self.buckets = bucket_sizes(max_batch)
    self._queue: queue.Queue = queue.Queue()
    self.batches_run = 0  # for tests and logs: how many forward passes served the requests
    self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
    self._thread.start()

  def warm_up(self, image_shape: tuple[int, ...]) -> None:
    """Runs every bucket size once so that no request pays for compilation."""
    for size in self.buckets:
      self._model(np.zeros((size, *image_shape), np.float32))

  async def predict(self, images: np.ndarray) -> np.ndarray:
    """Outputs for `images` [N, ...] in order; more than max_batch go as several chunks."""
    chunks = [images[i : i + self.max_batch] for i in range(0, len(images), self.max_batch)]
    futures = []
    for chunk in chunks:
      future: concurrent.futures.Future = concurrent.futures.Future()
      self._queue.put((chunk, future))
      futures.append(asyncio.wrap_future(future))
    return np.concatenate(await asyncio.gather(*futures))

  def close(self) -> None:
    self._queue.put(None)

  def _take(self, timeout: float):
    """The next waiting request within `timeout` seconds, else None."""
    try:
      return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
    except queue.Empty:
      return None

  def _work(self) -> None:
    carry = None  # a request that did not fit in the previous batch
    while True:
      first = carry or self._queue.get()
      carry = None
      if first is None:
        return
      items, count = [first], len(first[0])
      deadline = time.monotonic() + self._window_s
      while count < self.max_batch:
        item = self._take(deadline - time.monotonic())
        if item is None:
          break
        if count + len(item[0]) > self.max_batch:
          carry = item
          break
        items.append(item)
        count += len(item[0])
      self._run(items, count)

  def _run(self, items: list, count: int) -> None:
    size = next(b for b in self.buckets if b >= count)
    batch = np.concatenate([images for images, _ in items])
    if size > count:  # zero padding: its outputs are dropped
      batch = np.concatenate([batch, np.zeros((size - count, *batch.shape[1:]), batch.dtype)])
    try:
      outputs = self._model(batch)[:count]
    except Exception as e:  # pylint: disable=broad-except  # every waiting request learns of it
      for _, future in items:
        future.set_exception(e)
      return
    self.batches_run += 1
    start = 0
    for images, future in items:
      future.set_result(outputs[start : start + len(images)])
      start += len(images)
