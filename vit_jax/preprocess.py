"""Image preprocessing in TensorFlow: decoding, Inception crop, resize, flip, [-1, 1] scaling.

The training augmentation is stateless-random: its randomness comes from a key per example, so a
resumed run augments every example as the uninterrupted run would. `vit_jax.predict` holds a
numpy twin of `eval_preprocess` (a test compares the two).
"""

import ml_collections
import tensorflow as tf

try:  # TF must never take the accelerator from JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was initialised before this import; nothing to do then.
  pass


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Any supported file (grey, RGBA, palette, 16-bit, animated) -> [H, W, 3] uint8."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def _normalise(image: tf.Tensor, pp: ml_collections.ConfigDict) -> tf.Tensor:
  image = (tf.cast(image, tf.float32) - 127.5) / 127.5  # [0, 255] -> [-1, 1], as the checkpoints.
  return tf.cast(image, tf.bfloat16) if pp.bfloat16 else image


def _inception_crop(image: tf.Tensor, key: tf.Tensor, pp: ml_collections.ConfigDict) -> tf.Tensor:
  """Random area crop of `image` ([H, W, 3] uint8 or encoded bytes), as Inception and
  google-research/vision_transformer."""

  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.zeros([1, 0, 4]),
      seed=key,
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(pp.area_min, 1.0),
      use_image_if_no_bounding_boxes=True,
    )
    return begin, size

  def decode_then_crop(image):
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  if image.dtype != tf.string:
    return decode_then_crop(image)

  def jpeg():  # Decodes only the window: less work, pixels within a few levels of the full decode.
    begin, size = window(tf.image.extract_jpeg_shape(image))
    window_yxhw = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(image, window_yxhw, channels=3)

  return tf.cond(tf.io.is_jpeg(image), jpeg, lambda: decode_then_crop(decode(image)))


def train_preprocess(image: tf.Tensor, key: tf.Tensor, pp: ml_collections.ConfigDict) -> tf.Tensor:
  """`image`: [H, W, 3] uint8 or an encoded file. Randomness comes from `key` only."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if pp.inception_crop:
    image = _inception_crop(image, crop_key, pp)
  elif image.dtype == tf.string:
    image = decode(image)
  image = tf.image.resize(image, [pp.crop, pp.crop], method="bilinear")
  if pp.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  return _normalise(image, pp)


def eval_preprocess(image: tf.Tensor, pp: ml_collections.ConfigDict) -> tf.Tensor:
  if pp.eval_resize > pp.crop:
    image = tf.image.resize(image, [pp.eval_resize, pp.eval_resize], method="bilinear")
    offset = (pp.eval_resize - pp.crop) // 2
    image = image[offset : offset + pp.crop, offset : offset + pp.crop]
  else:
    image = tf.image.resize(image, [pp.crop, pp.crop], method="bilinear")
  return _normalise(image, pp)
