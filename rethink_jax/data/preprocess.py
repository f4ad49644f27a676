"""Per-image preprocessing and batching: a serialized record -> one element of the batch dict
(rethink_jax/data/pipeline.py documents it) -> batches of the padded shapes.

make_preprocess_fn: decode, resize by (min_size, max_size) (scaled down further when the image
would not fit its padded shape), flip, channel order and normalisation; instances without crowd
regions and degenerate boxes, boxes in input pixels, masks sampled at their boxes straight from
the RLE (crop_masks_from_rle), keypoints (with data.keypoints) by Detectron2's rules
(transform_keypoints). Batch shapes: data.pad_to, or the orientation buckets of
data.pad_buckets (padded_size, pad_buckets, bucket_of; the rule is in pipeline.py's docstring).
"""

from collections.abc import Callable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


# ---------------------------------------------------------------------------------------------
# Batch shapes.
# ---------------------------------------------------------------------------------------------
def padded_size(data_config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(H, W) of every batch image: data.pad_to, or max_size rounded up to 32 (square) if empty."""
  if data_config.get("pad_to"):
    pad_h, pad_w = (int(v) for v in data_config.pad_to)
    return pad_h, pad_w
  side = -(-int(data_config.max_size) // 32) * 32
  return side, side


def pad_buckets(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """Batch shapes (H, W): data.pad_buckets, or (padded_size,) when it is empty."""
  buckets = tuple(tuple(int(v) for v in hw) for hw in data_config.get("pad_buckets") or ())
  return buckets or (padded_size(data_config),)


def bucket_of(hw: np.ndarray, buckets: tuple[tuple[int, int], ...]) -> np.ndarray:
  """Bucket index of images of size hw (N, 2) [h, w]: (N,) int64 (pipeline.py's rule)."""
  hw = np.asarray(hw, np.int64).reshape(-1, 2)
  wide, tall = _orientation_buckets(buckets)
  return np.where(hw[:, 1] > hw[:, 0], wide, tall).astype(np.int64)


def _orientation_buckets(buckets):
  """(index of the landscape images' bucket, index of the others'); one bucket takes all."""
  if len(buckets) == 1:
    return 0, 0
  wide = [i for i, (h, w) in enumerate(buckets) if w >= h]
  tall = [i for i, (h, w) in enumerate(buckets) if h >= w]
  if not wide or not tall:
    raise ValueError(f"data.pad_buckets {buckets} needs a bucket with W >= H and one with H >= W")
  return wide[0], tall[0]


def _bucket_pad_hws(data_config):
  """((H, W) of landscape images, (H, W) of the others)."""
  buckets = pad_buckets(data_config)
  return tuple(buckets[i] for i in _orientation_buckets(buckets))


def _pad_hw_of(pad_hws, h, w):
  """The padded (H, W) (int32 scalars) of an original h x w image: its orientation's shape."""
  wide = tf.constant(pad_hws[0], tf.int32)
  other = tf.constant(pad_hws[1], tf.int32)
  hw = tf.where(w > h, wide, other)
  return hw[0], hw[1]


def _check_config(data_config):
  for pad_h, pad_w in {padded_size(data_config), *pad_buckets(data_config)}:
    if pad_h % 32 or pad_w % 32:
      raise ValueError(f"data.pad_to / pad_buckets must be multiples of 32, got {(pad_h, pad_w)}")
  _orientation_buckets(pad_buckets(data_config))
  if data_config.input_format not in ("RGB", "BGR"):
    raise ValueError(f"data.input_format must be 'RGB' or 'BGR', got {data_config.input_format!r}")
  if len(data_config.pixel_mean) != 3 or len(data_config.pixel_std) != 3:
    raise ValueError("data.pixel_mean and data.pixel_std need 3 values each")


# ---------------------------------------------------------------------------------------------
# Per-example preprocessing (TF graph).
# ---------------------------------------------------------------------------------------------
def _sizes(data_config, train):
  min_size = data_config.min_size
  sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (int(min_size),)
  if not train:
    test = data_config.get("min_size_test", 0) or max(sizes)
    sizes = (int(test),)
  return sizes


def _sample_taps(lo, hi, size, dim):
  """RoIAlign-style bilinear taps along one axis for S cell centres of [lo, hi] (pixel coords).

  Args:
    lo, hi: (n,) float32 box sides; size: S; dim: image extent (int32 scalar).
  Returns:
    i0, i1 (n, S) int32 clamped pixel indices, w0, w1 (n, S) float32 weights (0 where the sample
    lies more than one pixel outside the image, as RoIAlign).
  """
  k = (tf.range(size, dtype=tf.float32) + 0.5) / size
  u = lo[:, None] + k[None, :] * (hi - lo)[:, None] - 0.5  # pixel-index coordinate
  dimf = tf.cast(dim, tf.float32)
  inside = tf.cast((u >= -1.0) & (u <= dimf), tf.float32)
  u = tf.clip_by_value(u, 0.0, dimf - 1.0)
  f0 = tf.floor(u)
  i0 = tf.cast(f0, tf.int32)
  i1 = tf.minimum(i0 + 1, dim - 1)
  frac = u - f0
  return i0, i1, (1.0 - frac) * inside, frac * inside


def crop_masks_from_rle(
  counts: tf.Tensor,
  runs: tf.Tensor,
  height: tf.Tensor,
  width: tf.Tensor,
  boxes: tf.Tensor,
  size: int,
) -> tf.Tensor:
  """Samples instance masks at their boxes straight from the RLE (no full-resolution mask).

  Pixel (i, j) of crop g is the bilinear value of mask g at the point
  (x1 + (j + 0.5) (x2 - x1) / S, y1 + (i + 0.5) (y2 - y1) / S) (continuous pixel coordinates),
  with RoIAlign's edge handling (clamped within one pixel outside the image, 0 beyond),
  thresholded at >= 0.5: ops/masks.py's representation. A pixel's value is the parity of the
  number of RLE runs that end at or before its column-major index, i.e. a binary search.

  Args:
    counts: (R,) int32 concatenated uncompressed RLEs; runs: (n,) int32 runs per instance.
    height, width: scalar int32 image size.
    boxes: (n, 4) float32 xyxy in the image's pixels.
    size: S.
  Returns:
    (n, S, S) uint8 in {0, 1}.
  """
  hw = height * width
  counts = tf.cast(counts, tf.int32)
  runs = tf.cast(runs, tf.int32)
  n = tf.shape(runs)[0]

  def sample():
    # Run ends within each instance: global running sum minus the instances before (each sums
    # to hw).
    owner = tf.repeat(tf.range(n), runs)
    ends = tf.cumsum(counts) - owner * hw
    ends = tf.RaggedTensor.from_row_lengths(ends, runs).to_tensor(default_value=hw + 1)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
    yi0, yi1, yw0, yw1 = _sample_taps(y1, y2, size, height)
    xi0, xi1, xw0, xw1 = _sample_taps(x1, x2, size, width)
    total = tf.zeros([n, size, size], tf.float32)
    for yi, yw in ((yi0, yw0), (yi1, yw1)):
      for xi, xw in ((xi0, xw0), (xi1, xw1)):
        idx = xi[:, None, :] * height + yi[:, :, None]  # (n, S, S) column-major index
        val = tf.searchsorted(ends, tf.reshape(idx, [n, size * size]), side="right") % 2
        val = tf.cast(tf.reshape(val, [n, size, size]), tf.float32)
        total += val * yw[:, :, None] * xw[:, None, :]
    return tf.cast(total >= 0.5, tf.uint8)

  # searchsorted rejects empty batches.
  return tf.cond(n > 0, sample, lambda: tf.zeros([0, size, size], tf.uint8))


def _pad_to(x, length, axis=0):
  """Pads (or truncates) axis 0 of x to `length` with zeros."""
  x = x[:length]
  pad = [[0, 0]] * len(x.shape)
  pad[axis] = [0, length - tf.shape(x)[axis]]
  return tf.pad(x, pad)


def transform_keypoints(
  keypoints: tf.Tensor,
  scale: tf.Tensor,
  new_h: tf.Tensor,
  new_w: tf.Tensor,
  flip: tf.Tensor,
  flip_indices: Sequence[int],
) -> tf.Tensor:
  """Instances' keypoints from the records into the input frame, as Detectron2 loads them.

  Detectron2 adds 0.5 to COCO's integer x, y (pixel centres) when reading the JSON; its
  transform_keypoint_annotations then maps the points with the resize (here the one `scale` of
  the boxes) and flip (x -> new_w - x), makes points outside [0, new_w] x [0, new_h] unlabeled,
  swaps the left / right keypoints when flipped and sets unlabeled points to (0, 0, 0).

  Args:
    keypoints: (n, K, 3) float32 [x, y, v] in the records' COCO convention (original pixels).
    scale: scalar float32, resized / original. new_h, new_w: scalar int32, the resized size.
    flip: scalar bool. flip_indices: (K,) data/instances.py's flip_indices.
  Returns:
    (n, K, 3) float32 [x, y, v] in input pixels (v kept: 0, 1, 2).
  """
  size = tf.stack([tf.cast(new_w, tf.float32), tf.cast(new_h, tf.float32)])
  xy = (keypoints[..., :2] + 0.5) * scale
  inside = tf.reduce_all((xy >= 0.0) & (xy <= size), axis=-1)
  v = tf.where(inside, keypoints[..., 2], 0.0)

  def flipped():
    out = tf.stack([size[0] - xy[..., 0], xy[..., 1], v], axis=-1)
    return tf.gather(out, tf.constant(flip_indices, tf.int32), axis=1)

  out = tf.cond(flip, flipped, lambda: tf.stack([xy[..., 0], xy[..., 1], v], axis=-1))
  return tf.where(out[..., 2:] > 0.0, out, 0.0)


def make_preprocess_fn(
  data_config: ml_collections.ConfigDict,
  features: tfds.features.FeaturesDict,
  *,
  train: bool,
  seed: int = 0,
  keypoint_flip_indices: Sequence[int] | None = None,
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
  """Returns fn(position t int64, serialized record, valid bool) -> one element of the batch dict.

  Augmentation randomness (size choice, flip) is a function of (seed, t) only. With
  data.keypoints, keypoint_flip_indices (K,) (pipeline.keypoint_flip_indices) gives K and the
  flip's left / right swap.
  """
  _check_config(data_config)
  with_keypoints = bool(data_config.get("keypoints", False))
  if with_keypoints and keypoint_flip_indices is None:
    raise ValueError("data.keypoints needs the data set's keypoint_flip_indices")
  num_kp = len(keypoint_flip_indices) if with_keypoints else 0
  sizes = tf.constant(_sizes(data_config, train), tf.float32)
  max_size = float(data_config.max_size)
  pad_hws = _bucket_pad_hws(data_config)
  num_inst = int(data_config.max_instances)
  mask_size = int(data_config.mask_size)
  mean = np.asarray(data_config.pixel_mean, np.float32)
  std = np.asarray(data_config.pixel_std, np.float32)
  bgr = data_config.input_format == "BGR"
  flip_prob = float(data_config.get("flip_prob", 0.5)) if train else 0.0
  seed = int(seed)

  def fn(t, serialized, valid):
    ex = features.deserialize_example(serialized)
    image = ex["image"]
    h = tf.shape(image)[0]
    w = tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    pad_h, pad_w = _pad_hw_of(pad_hws, h, w)
    rng_seed = tf.stack([tf.constant(seed, tf.int64), t])
    size_i = tf.random.stateless_uniform(
      [], seed=rng_seed, maxval=len(_sizes(data_config, train)), dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([], seed=rng_seed + [0, 1 << 40]) < flip_prob
    short = tf.gather(sizes, size_i)
    scale = tf.reduce_min(
      tf.stack(
        [
          short / tf.minimum(hf, wf),
          max_size / tf.maximum(hf, wf),
          tf.cast(pad_h, tf.float32) / hf,
          tf.cast(pad_w, tf.float32) / wf,
        ]
      )
    )
    new_h = tf.minimum(tf.cast(tf.round(hf * scale), tf.int32), pad_h)
    new_w = tf.minimum(tf.cast(tf.round(wf * scale), tf.int32), pad_w)

    # Image: flip, channel order and normalization commute with bilinear resizing (symmetric
    # sampling, weights summing to 1), so they run on the smaller original image; padding to
    # pad_to happens in padded_batch (one copy instead of two).
    img = tf.cast(image, tf.float32)
    img = tf.cond(flip, lambda: img[:, ::-1], lambda: img)
    if bgr:
      img = img[..., ::-1]
    img = (img - mean) * (1.0 / std)
    img = tf.image.resize(img, tf.stack([new_h, new_w]), method="bilinear")

    # Instances: no crowd, no degenerate box, at most max_instances.
    obj = ex["objects"]
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(obj["bbox"], [-1, 4]), axis=1)
    boxes = tf.stack([xmin * wf, ymin * hf, xmax * wf, ymax * hf], axis=1)  # original pixels
    keep = ~obj["is_crowd"] & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep_idx = tf.where(keep)[:num_inst, 0]
    rle = tf.RaggedTensor.from_row_lengths(ex["mask_counts"], tf.cast(obj["mask_runs"], tf.int64))
    rle = tf.gather(rle, keep_idx)
    boxes = tf.gather(boxes, keep_idx)
    classes = tf.cast(tf.gather(obj["label"], keep_idx), tf.int32) + 1
    crops = crop_masks_from_rle(
      rle.flat_values, tf.cast(rle.row_lengths(), tf.int32), h, w, boxes, mask_size
    )  # sampled in the original frame
    in_boxes = boxes * scale
    new_wf = tf.cast(new_w, tf.float32)
    in_boxes = tf.minimum(
      tf.maximum(in_boxes, 0.0), tf.stack([new_wf, tf.cast(new_h, tf.float32)] * 2)
    )

    def flip_fn():
      x1, y1, x2, y2 = tf.unstack(in_boxes, axis=1)
      return tf.stack([new_wf - x2, y1, new_wf - x1, y2], axis=1), crops[:, :, ::-1]

    in_boxes, crops = tf.cond(flip, flip_fn, lambda: (in_boxes, crops))
    valid_f = tf.cast(valid, tf.int32)
    out = {
      "image": img,
      "image_hw": tf.stack([new_h, new_w]),
      "image_id": tf.where(valid, tf.cast(ex["image_id"], tf.int32), -1),
      "orig_hw": tf.stack([h, w]),
      "scale": scale,
      "valid": valid,
      "gt_boxes": tf.ensure_shape(_pad_to(in_boxes, num_inst), [num_inst, 4]),
      "gt_classes": tf.ensure_shape(_pad_to(classes * valid_f, num_inst), [num_inst]),
      "gt_masks": tf.ensure_shape(_pad_to(crops, num_inst), [num_inst, mask_size, mask_size]),
    }
    if with_keypoints:
      kp = tf.gather(tf.reshape(ex["keypoints"], [-1, num_kp, 3]), keep_idx)
      kp = transform_keypoints(kp, scale, new_h, new_w, flip, keypoint_flip_indices)
      kp = _pad_to(kp * tf.cast(valid, tf.float32), num_inst)
      out["gt_keypoints"] = tf.ensure_shape(kp, [num_inst, num_kp, 3])
    return out

  return fn


# ---------------------------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------------------------
def _records_dataset(gen: Callable[[], Iterator[tuple[int, bytes, bool]]]) -> tf.data.Dataset:
  """tf.data over gen()'s (position, serialized record, valid) triples."""
  spec = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool))
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def _options(data_config):
  options = tf.data.Options()
  threads = int(data_config.get("num_parallel_calls", 2))
  options.threading.private_threadpool_size = max(threads, 1)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  options.autotune.enabled = True
  return options


def _to_batches(ds, data_config, preprocess, batch_size):
  threads = int(data_config.get("num_parallel_calls", 2))
  ds = ds.map(preprocess, num_parallel_calls=threads, deterministic=True)
  pad_hws = _bucket_pad_hws(data_config)
  pad_h, pad_w = pad_hws[0]
  shapes = {k: v.shape for k, v in ds.element_spec.items()}
  shapes["image"] = tf.TensorShape([pad_h, pad_w, 3])  # zero padding at the bottom / right
  if pad_hws[0] != pad_hws[1]:
    # Each image to its bucket's shape, then batched as is: a step's images share the bucket.

    def pad_image(ex):
      bucket_h, bucket_w = _pad_hw_of(pad_hws, ex["orig_hw"][0], ex["orig_hw"][1])
      image = tf.image.pad_to_bounding_box(ex["image"], 0, 0, bucket_h, bucket_w)
      return {**ex, "image": image}

    ds = ds.map(pad_image, num_parallel_calls=threads, deterministic=True)
    shapes["image"] = tf.TensorShape([None, None, 3])
  ds = ds.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=True)
  ds = ds.prefetch(int(data_config.get("prefetch", 2)))
  return ds.with_options(_options(data_config))
