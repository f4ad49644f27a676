"""The fixed-shape, per-process input pipeline (tf.data on the host, numpy batches out).

The batch dict (the one place it is documented; every batch of a config has the same shapes):
  image       (B, H, W, 3) float32  (pixel - pixel_mean) / pixel_std in channel order
                                    data.input_format ("RGB" | "BGR"); the resized image sits at the
                                    top-left, the rest (bottom/right) is 0. (H, W) = data.pad_to,
                                    or the image's orientation bucket of data.pad_buckets (one
                                    shape per batch; see below).
  image_hw    (B, 2) int32          [h, w] of the resized image inside the padding.
  image_id    (B,)   int32          COCO image id; -1 for padding images of eval batches.
  orig_hw     (B, 2) int32          original image size [h, w].
  scale       (B,)   float32        resized / original, the same for x and y: a point p of the
                                    original image is at p * scale in the input (before a flip).
  valid       (B,)   bool           False for padding images (last eval batches), True otherwise.
  gt_boxes    (B, G, 4) float32     xyxy in input pixels (after resize and flip), G = max_instances;
                                    padding rows are 0. Images with more than G instances keep the
                                    first G (annotation order).
  gt_classes  (B, G) int32          1..num_classes, 0 = padding. Crowd regions are dropped (training
                                    and eval batches alike; evaluation scores against the JSON).
  gt_masks    (B, G, S, S) uint8    {0, 1}, S = data.mask_size: instance g's mask cropped to ITS OWN
                                    gt box and resampled: pixel (i, j) is the bilinear value of the
                                    full-resolution mask at input point (x1 + (j + 0.5) *
                                    (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S), thresholded
                                    at >= 0.5 (ops/masks.py's representation). Sampled from
                                    the original-resolution RLE (at that point / scale), with edge
                                    clamping like RoIAlign; a flip mirrors the crop.

Order and sharding. The training stream of every process is cut from one global stream: position t
of the global stream is record pool[perm_e[t % N]] with e = t // N, where pool holds the N usable
training records (subset, empty images dropped) and perm_e is a permutation drawn from (seed, e).
Global step s uses positions [s * B * P, (s + 1) * B * P); process p takes the B positions starting
at s * B * P + p * B (B = batch per process, P = processes). Hence processes never duplicate data,
an epoch is covered exactly once, and resuming at start_step=k reads from position k * B * P without
decoding anything before it (records are read by index from array_record files). Augmentation
randomness is a function of (seed, t) only.

Orientation buckets (data.pad_buckets, e.g. ((800, 1344), (1344, 800))): a landscape image
(w > h, Detectron2's AspectRatioGroupedDataset rule) is padded to the first bucket with W >= H,
the others to the first with H >= W, so padding stays near Detectron2's own (its batch's largest
image rounded to 32) with one static shape per bucket. Steps are then cut from the same global
stream by Detectron2's grouping, applied globally: position t goes to its bucket's buffer, and a
buffer that reaches B * P positions becomes the next global step (process p again takes its B
positions at p * B). Every process computes the same steps from the records' sizes alone (no
decoding, no communication), so every process has the same bucket, hence batch shape, at a step;
resuming at step k replays the grouping from the sizes. A step may hold positions of two epochs;
an epoch's positions are still each used once. Without pad_buckets (()), step s is positions
[s * B * P, (s + 1) * B * P) as above.

Bad records. A training record that cannot be read or decoded (a truncated image, a damaged
record) stops the iterator with a BadRecordError at the step whose batch holds it, naming the
step, the position, the record (index, split, file) and its image id. With
data.skip_bad_records=True it is skipped instead: position t then takes the record of the first
position after t whose record decodes (in t's orientation bucket; with position t's
augmentation), so every batch keeps its size, every later position its record, and a resumed run
skips the same way; the skipped records are counted (TrainIterator.skipped_before) and logged as
warnings.

Eval: process p reads records p, p + P, p + 2P, ... of the eval split (shorter side min_size_test,
no flip), padded with valid=False images (image_id -1, gt_classes 0) so that every process yields
the same number of batches. With buckets, this is done per bucket, bucket after bucket (padding
images are copies of one of the bucket's records), so every process has the same bucket at a
batch too.

config.data fields (ConfigDict; `default_data_config()` lists them with defaults):
  name "shapes_instances" | "coco_instances"; data_dir (tfds data dir, None = tfds default);
  builder_config (config name); builder_kwargs (dict, passed to the builder); builder_overrides
  (shapes_instances only: dict of ShapesConfig fields, e.g. {"num_train": 500}, deriving a new
  config named after them); train_split, eval_split (tfds split specs,
  slices like "validation[:100]" allowed); min_size (int, or a sequence of ints to choose from per
  image in training: "train aug"); min_size_test (int; 0 = max of min_size); max_size (int);
  pad_to (H, W), multiples of 32 (() = max_size rounded up to a multiple of 32, square);
  pad_buckets (((H, W), ...) batch shapes by orientation, training and eval, multiples of 32;
  () = pad_to only);
  max_instances; mask_size; pixel_mean, pixel_std (0..255, in
  input_format order); input_format; flip_prob; num_train_images (0 = all); subset_seed;
  drop_empty_train; skip_bad_records (see "Bad records"); num_parallel_calls; prefetch;
  class_names, category_ids (filled from the data set's metadata by
  rethink_jax.data.recipe.resolve_config; informational).
If an image resized by (min_size, max_size) would not fit into pad_to (its bucket), it is scaled
down to fit.
"""

from collections.abc import Callable, Iterator
import dataclasses
import fcntl
import functools
import json
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rethink_jax.data import instances


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields with their defaults (the demo: shapes_instances/demo at 128 x 128)."""
  return ml_collections.ConfigDict(
    {
      "name": "shapes_instances",
      "data_dir": None,
      "builder_config": "demo",
      "builder_kwargs": {},
      "builder_overrides": {},
      "train_split": "train",
      "eval_split": "validation",
      "min_size": 128,
      "min_size_test": 0,
      "max_size": 128,
      "pad_to": (128, 128),
      "pad_buckets": (),
      "max_instances": 100,
      "mask_size": 112,
      "pixel_mean": (123.675, 116.28, 103.53),
      "pixel_std": (58.395, 57.12, 57.375),
      "input_format": "RGB",
      "flip_prob": 0.5,
      "num_train_images": 0,
      "subset_seed": 0,
      "drop_empty_train": True,
      "skip_bad_records": False,  # True: a training record that does not decode is skipped
      "num_parallel_calls": 2,
      "prefetch": 2,
      "class_names": (),
      "category_ids": (),
    },
    type_safe=False,
  )  # min_size may be an int or a sequence


# ---------------------------------------------------------------------------------------------
# Builders, splits, side files.
# ---------------------------------------------------------------------------------------------
def _builder_cls(name):
  if name == "shapes_instances":
    from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

    return shapes.ShapesInstances
  if name == "coco_instances":
    from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

    return coco.CocoInstances
  raise ValueError(f"data.name must be 'shapes_instances' or 'coco_instances', got {name!r}")


class DatasetNotBuiltError(FileNotFoundError):
  """config.data names a data set that is not in its data_dir (the message has the command)."""


def build_command(data_config: ml_collections.ConfigDict, data_dir: str | None = None) -> str:
  """The command line that builds config.data's data set (paths to fill in for own data)."""
  name = data_config.name
  config = data_config.get("builder_config") or ""
  data_dir = data_dir or data_config.get("data_dir") or "~/tensorflow_datasets"
  cmd = f"python -m rethink_jax.data.build --data_dir={data_dir} --name={name}"
  if name != "coco_instances":
    return cmd + (f" --config={config}" if config else "")
  if config in ("", "2017"):
    return cmd + " --config=2017 --manual_dir=/path/to/coco"
  if config == "folder":
    return cmd + " --config=folder --manual_dir=/path/to/dataset"
  return (
    cmd + f" --config={config} --split=train:TRAIN.json:TRAIN_IMAGE_DIR"
    " --split=validation:VAL.json:VAL_IMAGE_DIR"
  )


def get_builder(
  data_config: ml_collections.ConfigDict, prepare: bool = True
) -> tfds.core.DatasetBuilder:
  """The tfds builder of config.data; generates synthetic data on first use.

  Args:
    data_config: config.data.
    prepare: generate shapes_instances if absent (under a file lock: safe for parallel runs).
  Returns:
    a prepared tfds builder.
  """
  name = data_config.name
  cls = _builder_cls(name)
  kwargs = dict(data_config.get("builder_kwargs") or {})
  config = data_config.get("builder_config") or None
  if name == "coco_instances" and config is not None:
    from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

    config = coco.config_for_name(config)
  overrides = dict(data_config.get("builder_overrides") or {})
  if overrides:
    if name != "shapes_instances":
      raise ValueError(f"data.builder_overrides is for shapes_instances, not {name!r}")
    base = cls.builder_configs[config or cls.DEFAULT_CONFIG_NAME]
    tag = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    config = dataclasses.replace(base, name=f"{base.name}_{tag}", **overrides)
  builder = cls(config=config, data_dir=data_config.get("data_dir"), **kwargs)
  if not builder.is_prepared():
    if not prepare or name != "shapes_instances":
      raise DatasetNotBuiltError(
        f"{builder.info.full_name} is not built in {builder.data_dir_root}. Build it with\n  "
        + build_command(data_config, builder.data_dir_root)
      )
    os.makedirs(builder.data_dir_root, exist_ok=True)
    with open(os.path.join(builder.data_dir_root, f".{name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = cls(config=config, data_dir=data_config.get("data_dir"), **kwargs)
      if not builder.is_prepared():
        logging.info("Generating %s in %s", builder.info.full_name, builder.data_dir_root)
        builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
      fcntl.flock(lock, fcntl.LOCK_UN)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"{builder.data_dir} holds {builder.info.file_format} files; the pipeline reads records "
      "by index and needs array_record: rebuild with file_format='array_record'."
    )
  return builder


def _split_range(builder, split):
  """A split spec ("train", "validation[:100]", "train[10%:]") -> (base split, record indices)."""
  instr = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  if len(instr) != 1:
    raise ValueError(f"split {split!r}: only one split (optionally sliced) is supported")
  base = instr[0].splitname
  n = builder.info.splits[base].num_examples
  start = instr[0].from_ if instr[0].from_ is not None else 0
  stop = instr[0].to if instr[0].to is not None else n
  return base, np.arange(start, stop, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _records_meta_cached(path):
  with open(path) as f:
    meta = json.load(f)
  return {k: np.asarray(v, np.int64) for k, v in meta.items()}


def records_meta(builder: tfds.core.DatasetBuilder, base_split: str) -> dict[str, np.ndarray]:
  """Per-record side info of a split: {"image_id": (N,), "num_objects": (N,)} int64."""
  path = os.path.join(builder.data_dir, instances.RECORDS_DIR, f"{base_split}.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} is missing: the dataset was not built by this project's "
      "builders (they write it next to the records)."
    )
  return _records_meta_cached(path)


def select_subset(pool: np.ndarray, num_images: int, seed: int) -> np.ndarray:
  """Deterministic seeded choice of `num_images` records from `pool` (sorted record indices).

  The same (pool, num_images, seed) always gives the same subset: both arms of a comparison that
  share data.subset_seed train on the same images.

  Args:
    pool: (N,) int64 candidate record indices.
    num_images: how many to keep (0 = all).
    seed: subset seed.
  Returns:
    (num_images,) int64 sorted record indices.
  """
  pool = np.asarray(pool, np.int64)
  if num_images <= 0:
    return pool
  if num_images > len(pool):
    raise ValueError(f"num_train_images={num_images} but only {len(pool)} usable training images")
  chosen = np.random.default_rng([seed, len(pool)]).choice(len(pool), num_images, replace=False)
  return np.sort(pool[chosen])


def train_pool(
  data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder | None = None
) -> np.ndarray:
  """Record indices of the training split that the training stream draws from, sorted (N,)."""
  builder = builder or get_builder(data_config)
  base, idx = _split_range(builder, data_config.train_split)
  if data_config.get("drop_empty_train", True):
    num_objects = records_meta(builder, base)["num_objects"]
    idx = idx[num_objects[idx] > 0]
  if len(idx) == 0:
    raise ValueError(f"no usable training images in {data_config.train_split!r}")
  return select_subset(
    idx, data_config.get("num_train_images", 0), data_config.get("subset_seed", 0)
  )


def record_sizes(builder: tfds.core.DatasetBuilder, base_split: str) -> np.ndarray:
  """Original [h, w] of every record of a split (N, 2) int64, from records/<split>.json; for data
  sets built without sizes there, from the COCO ground truth's images, or else from the records
  themselves (reads the whole split: rebuilding the data set writes the sizes)."""
  meta = records_meta(builder, base_split)
  if "height" in meta and "width" in meta:
    return np.stack([meta["height"], meta["width"]], axis=1)
  path = os.path.join(builder.data_dir, instances.ANNOTATIONS_DIR, f"{base_split}.json")
  if not os.path.exists(path):
    return sizes_from_records(builder, base_split)
  logging.info("Reading image sizes from %s (records/%s.json has none)", path, base_split)
  with open(path) as f:
    images = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in json.load(f)["images"]}
  return np.asarray([images[int(i)] for i in meta["image_id"]], np.int64).reshape(-1, 2)


def sizes_from_records(
  builder: tfds.core.DatasetBuilder, base_split: str, chunk: int = 1024
) -> np.ndarray:
  """[h, w] (N, 2) int64 of every record of a split, parsed from the records."""
  source = _data_source(builder, base_split)
  logging.warning(
    "Reading the image sizes of all %d records of %s (records/%s.json of an older build has "
    "none; rebuilding the data set writes them)",
    len(source),
    base_split,
    base_split,
  )
  spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in ("height", "width")}
  out = []
  for start in range(0, len(source), chunk):
    records = [source[i] for i in range(start, min(start + chunk, len(source)))]
    parsed = tf.io.parse_example(tf.constant(records), spec)
    out.append(np.stack([parsed["height"].numpy(), parsed["width"].numpy()], axis=1))
  return np.concatenate(out).astype(np.int64)


def _data_source(builder, base_split):
  """Random access to the serialized records of a split; checks they are in generation order."""
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

  paths = [os.fspath(p) for p in builder.info.splits[base_split].filepaths]
  source = array_record_data_source.ArrayRecordDataSource(paths)
  ids = records_meta(builder, base_split)["image_id"]
  if len(ids) != len(source):
    raise ValueError(
      f"{builder.data_dir}: {len(source)} records in split {base_split!r} but "
      f"{len(ids)} entries in its records/{base_split}.json"
    )
  parse = {"image_id": tf.io.FixedLenFeature([], tf.int64)}
  for i in {0, len(source) - 1}:
    got = int(tf.io.parse_single_example(source[i], parse)["image_id"])
    if got != ids[i]:
      raise ValueError(
        f"{builder.data_dir}: record {i} of {base_split!r} has image id {got}, "
        f"records/{base_split}.json says {ids[i]} (records shuffled?)"
      )
  return source


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
  """Bucket index of images of size hw (N, 2) [h, w]: (N,) int64 (module docstring's rule)."""
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


def _check_config(data_config):
  for pad_h, pad_w in {padded_size(data_config), *pad_buckets(data_config)}:
    if pad_h % 32 or pad_w % 32:
      raise ValueError(f"data.pad_to / pad_buckets must be multiples of 32, got {(pad_h, pad_w)}")
  _orientation_buckets(pad_buckets(data_config))
  if data_config.input_format not in ("RGB", "BGR"):
    raise ValueError(f"data.input_format must be 'RGB' or 'BGR', got {data_config.input_format!r}")
  if len(data_config.pixel_mean) != 3 or len(data_config.pixel_std) != 3:
    raise ValueError("data.pixel_mean and data.pixel_std need 3 values each")


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


def make_preprocess_fn(
  data_config: ml_collections.ConfigDict,
  features: tfds.features.FeaturesDict,
  *,
  train: bool,
  seed: int = 0,
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
  """Returns fn(position t int64, serialized record, valid bool) -> one element of the batch dict.

  Augmentation randomness (size choice, flip) is a function of (seed, t) only.
  """
  _check_config(data_config)
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
    return {
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

  return fn


# ---------------------------------------------------------------------------------------------
# Iterators.
# ---------------------------------------------------------------------------------------------
def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def _options(data_config):
  options = tf.data.Options()
  threads = int(data_config.get("num_parallel_calls", 2))
  options.threading.private_threadpool_size = max(threads, 1)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  options.autotune.enabled = True
  return options


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


def train_positions(
  step: int, batch_size_per_process: int, process_index: int, process_count: int
) -> range:
  """Global stream positions of one process's batch at `step`: (B,) int64."""
  start = (step * process_count + process_index) * batch_size_per_process
  return np.arange(start, start + batch_size_per_process, dtype=np.int64)


class _EpochPermutations:
  """perm_e of the module docstring, cached for the current epoch."""

  def __init__(self, n, seed):
    self.n, self.seed, self._epoch, self._perm = n, seed, None, None

  def __call__(self, epoch):
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.n)
    return self._perm


class BadRecordError(ValueError):
  """A training record that cannot be read or decoded; the message names it and the step."""


class _TrainRecords:
  """Position t of the training stream -> its record (module docstring, "Order and sharding"),
  with the replacements of records found bad (data.skip_bad_records)."""

  def __init__(self, builder, base_split, pool, seed, preprocess, bucket_ids=None):
    self.source = _data_source(builder, base_split)
    self.pool, self.n, self.seed = pool, len(pool), seed
    self.bucket_ids = bucket_ids  # (N,) orientation bucket per pool index, None: one bucket
    self.preprocess = preprocess
    self.replaced = {}  # position -> record read there instead of its own (it did not decode)
    self._perms = _EpochPermutations(self.n, seed)  # the generator's (it runs in a TF thread)
    self._split = base_split
    self._image_ids = records_meta(builder, base_split)["image_id"]
    info = builder.info.splits[base_split]
    self._files = [os.fspath(p) for p in info.filepaths]
    self._file_ends = np.cumsum(info.shard_lengths)

  def _pool_index(self, t: int, perms=None) -> int:
    return int((perms or self._perms)(t // self.n)[t % self.n])

  def record(self, t: int, perms=None) -> int:
    """The record index of position t (without replacements)."""
    return int(self.pool[self._pool_index(t, perms)])

  def serialized(self, t: int) -> bytes:
    """What position t feeds the pipeline."""
    return self.source[self.replaced.get(t, self.record(t))]

  def problem(self, t: int, record: int) -> str | None:
    """Why `record` cannot be read or preprocessed at position t; None if it can."""
    try:
      serialized = self.source[record]
    except Exception as e:  # pylint: disable=broad-except
      return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    try:
      self.preprocess(tf.constant(t, tf.int64), tf.constant(serialized), tf.constant(True))
    except (tf.errors.OpError, ValueError) as e:
      message = getattr(e, "message", str(e)).strip().splitlines()[0][:200]
      return f"does not decode ({type(e).__name__}: {message})"
    return None

  def bad_positions(self, positions) -> list[tuple[int, int, str]]:
    """(position, record, problem) of each given position whose record fails (a diagnosis, run
    only after the pipeline failed: it reads and decodes those records again)."""
    perms = _EpochPermutations(self.n, self.seed)  # not the generator's cache
    bad = []
    for t in positions:
      t = int(t)
      record = self.replaced.get(t, self.record(t, perms))
      why = self.problem(t, record)
      if why is not None:
        bad.append((t, record, why))
    return bad

  def describe(self, step: int, t: int, record: int, why: str) -> str:
    file = self._files[int(np.searchsorted(self._file_ends, record, side="right"))]
    return (
      f"training record {record} of split {self._split!r} (image id "
      f"{int(self._image_ids[record])}, file {file}), read at stream position {t} for the batch "
      f"of step {step}: {why}"
    )

  def replace(self, t: int) -> int:
    """Makes position t read the record of the first later position that decodes (and, with
    orientation buckets, pads to t's bucket, the shape of t's step); returns it."""
    perms = _EpochPermutations(self.n, self.seed)
    bucket = None if self.bucket_ids is None else self.bucket_ids[self._pool_index(t, perms)]
    for u in range(t + 1, t + 1 + self.n):
      if bucket is not None and self.bucket_ids[self._pool_index(u, perms)] != bucket:
        continue
      record = self.record(u, perms)
      if self.problem(t, record) is None:
        self.replaced[t] = record
        return record
    raise BadRecordError(f"no training record after stream position {t} decodes")


class StepPlan:
  """The global steps of the training stream: plan(step) -> (positions t, pool indices), both
  (B * P,) int64, process p's share at [p * B, (p + 1) * B).

  Without buckets, step s is positions [s * B * P, (s + 1) * B * P). With buckets (bucket_ids not
  None), the module docstring's grouping: positions fill one buffer per bucket in stream order and
  a full buffer is the next step. Steps are computed an epoch at a time from the buckets of the
  pool's records only; asking for an earlier step than the last replays from the start.

  Args:
    n: pool size N; seed: data seed (the epoch permutations); global_batch: B * P.
    bucket_ids: (N,) bucket of each pool record, or None (one bucket).
  """

  def __init__(self, n: int, seed: int, global_batch: int, bucket_ids: np.ndarray | None = None):
    self.n, self.global_batch = n, global_batch
    self.bucket_ids = None if bucket_ids is None else np.asarray(bucket_ids, np.int64)
    self._perms = _EpochPermutations(n, seed)
    self._reset()

  def _reset(self):
    self._epoch = -1
    self._first = 0  # step of self._steps[0]
    self._steps = np.zeros((0, 2, self.global_batch), np.int64)  # (steps, [t, index], G)
    self._carry = {}  # bucket -> (2, k) positions and indices waiting for a full step

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    if self.bucket_ids is None:
      t = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
      index = np.empty_like(t)
      for e in np.unique(t // self.n):
        mine = t // self.n == e
        index[mine] = self._perms(int(e))[t[mine] % self.n]
      return t, index
    if step < self._first:
      self._reset()
    while step >= self._first + len(self._steps):
      self._next_epoch()
    t, index = self._steps[step - self._first]
    return t, index

  def _next_epoch(self):
    self._first += len(self._steps)
    self._epoch += 1
    index = self._perms(self._epoch)
    t = self._epoch * self.n + np.arange(self.n, dtype=np.int64)
    g = self.global_batch
    full = []
    for k in np.unique(self.bucket_ids):
      mine = self.bucket_ids[index] == k
      pending = np.concatenate(
        [self._carry.get(k, np.zeros((2, 0), np.int64)), np.stack([t[mine], index[mine]])], axis=1
      )
      m = pending.shape[1] // g * g
      full.append(pending[:, :m].reshape(2, -1, g).transpose(1, 0, 2))
      self._carry[k] = pending[:, m:]
    steps = np.concatenate(full)
    # A bucket's step is complete at its last position: steps run in that order.
    self._steps = steps[np.argsort(steps[:, 0, -1], kind="stable")]


class TrainIterator:
  """Infinite iterator of training batch dicts; `step` is the step of the next batch.

  Checkpoint `step` (or the trainer's own step) and pass it back as start_step to resume.
  `skipped` lists (step, description) of every record skipped so far (data.skip_bad_records).
  """

  def __init__(self, make_batches, records, positions, start_step, skip_bad_records):
    self._make_batches = make_batches  # step -> numpy iterator of the batches from that step on
    self._records = records
    self._positions = positions  # step -> this process's stream positions of that step
    self._skip = skip_bad_records
    self._it = make_batches(start_step)
    self.step = start_step
    self.skipped = []

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._it)
    except (tf.errors.OpError, UnicodeDecodeError) as e:  # TF's message may quote the bytes
      bad = self._records.bad_positions(self._positions(self.step))
      if not bad:
        raise
      if not self._skip:
        raise BadRecordError(
          self._records.describe(self.step, *bad[0])
          + ". Set data.skip_bad_records=True to skip such records, or rebuild the data set."
        ) from e
      for t, record, why in bad:
        instead = self._records.replace(t)
        what = self._records.describe(self.step, t, record, why)
        logging.warning("skipped %s; position %d reads record %d instead", what, t, instead)
        self.skipped.append((self.step, what))
      self._it = self._make_batches(self.step)  # the same step again, with the replacements
      return next(self)
    self.step += 1
    return batch

  def skipped_before(self, step: int) -> int:
    """How many records were skipped in the batches of the steps before `step`."""
    return sum(1 for s, _ in self.skipped if s < step)


def make_train_iterator(
  data_config: ml_collections.ConfigDict,
  batch_size_per_process: int,
  *,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainIterator:
  """The training iterator of this process (see the module docstring for order and sharding).

  Args:
    data_config: config.data.
    batch_size_per_process: B, images per process and step.
    seed: data seed (order and augmentation).
    start_step: first step to yield; resuming at k gives exactly the batches an uninterrupted
      iterator yields from step k on.
    process_index, process_count: default jax.process_index() / jax.process_count().
  Returns:
    a TrainIterator of batch dicts (host-local numpy, fixed shapes); it raises BadRecordError
    at the step whose batch holds a record that does not decode (unless data.skip_bad_records).
  """
  p, num_p = _process(process_index, process_count)
  builder = get_builder(data_config)
  base, _ = _split_range(builder, data_config.train_split)
  preprocess = make_preprocess_fn(data_config, builder.info.features, train=True, seed=seed)
  pool = train_pool(data_config, builder)
  b = int(batch_size_per_process)
  plan = make_step_plan(data_config, builder, pool, seed, b * num_p)
  records = _TrainRecords(builder, base, pool, seed, preprocess, plan.bucket_ids)
  # A StepPlan keeps state: each generator (a TF thread) and each diagnosis gets its own.
  new_plan = lambda: StepPlan(len(pool), seed, b * num_p, plan.bucket_ids)

  def positions(step, step_plan=None):
    return (step_plan or new_plan())(step)[0][p * b : (p + 1) * b]

  def make_batches(first_step):
    def gen():
      step, step_plan = first_step, new_plan()
      while True:
        for t in positions(step, step_plan):
          yield t, records.serialized(int(t)), True
        step += 1

    ds = _records_dataset(gen)
    return _to_batches(ds, data_config, preprocess, b).as_numpy_iterator()

  skip = bool(data_config.get("skip_bad_records", False))
  return TrainIterator(make_batches, records, positions, start_step, skip)


def make_step_plan(
  data_config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  pool: np.ndarray,
  seed: int,
  global_batch: int,
) -> StepPlan:
  """The StepPlan of config.data's training stream (pool: train_pool's record indices)."""
  buckets = pad_buckets(data_config)
  bucket_ids = None
  if len(set(_bucket_pad_hws(data_config))) > 1:
    base, _ = _split_range(builder, data_config.train_split)
    bucket_ids = bucket_of(record_sizes(builder, base)[pool], buckets)
  return StepPlan(len(pool), seed, global_batch, bucket_ids)


def _records_dataset(gen: Callable[[], Iterator[tuple[int, bytes, bool]]]) -> tf.data.Dataset:
  """tf.data over gen()'s (position, serialized record, valid) triples."""
  spec = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool))
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def eval_records(
  num_records: int, batch_size_per_process: int, process_index: int, process_count: int
) -> np.ndarray:
  """Record indices of one process's eval batches: (num_batches * B,) int64, -1 = padding."""
  mine = np.arange(process_index, num_records, process_count, dtype=np.int64)
  per_process = -(-num_records // process_count)
  num_batches = -(-per_process // batch_size_per_process)
  out = np.full(num_batches * batch_size_per_process, -1, np.int64)
  out[: len(mine)] = mine
  return out


def eval_records_by_bucket(
  bucket_ids: np.ndarray, batch_size_per_process: int, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
  """One process's eval batches with buckets: (record index (M,) int64, valid (M,) bool), bucket
  after bucket, each as eval_records over the bucket's records; padding repeats its first."""
  records, valid = [], []
  for k in np.unique(bucket_ids):
    members = np.flatnonzero(bucket_ids == k)
    block = eval_records(len(members), batch_size_per_process, process_index, process_count)
    records.append(members[np.maximum(block, 0)])
    valid.append(block >= 0)
  return np.concatenate(records), np.concatenate(valid)


def make_eval_iterator(
  data_config: ml_collections.ConfigDict,
  batch_size_per_process: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Finite iterator over this process's share of the eval split (no augmentation).

  All processes yield the same number of batches; padding images have valid=False, image_id=-1
  and no ground truth.
  """
  p, num_p = _process(process_index, process_count)
  builder = get_builder(data_config)
  base, idx = _split_range(builder, data_config.eval_split)
  source = _data_source(builder, base)
  b = int(batch_size_per_process)
  positions = eval_records(len(idx), b, p, num_p)
  valid = positions >= 0
  if len(set(_bucket_pad_hws(data_config))) > 1:
    bucket_ids = bucket_of(record_sizes(builder, base)[idx], pad_buckets(data_config))
    positions, valid = eval_records_by_bucket(bucket_ids, b, p, num_p)

  def gen():
    for t, (pos, ok) in enumerate(zip(positions, valid)):
      yield t, source[int(idx[max(pos, 0)])], bool(ok)

  ds = _records_dataset(gen)
  preprocess = make_preprocess_fn(data_config, builder.info.features, train=False)
  return _to_batches(ds, data_config, preprocess, b).as_numpy_iterator()


def num_train_images(data_config: ml_collections.ConfigDict) -> int:
  """Number of images the training stream draws from (after subset and empty-image drop)."""
  return len(train_pool(data_config))


# ---------------------------------------------------------------------------------------------
# Ground truth and categories.
# ---------------------------------------------------------------------------------------------
def category_ids(data_config: ml_collections.ConfigDict) -> list[int]:
  """COCO category ids in contiguous-label order: index = label - 1."""
  return [int(c["id"]) for c in get_builder(data_config).info.metadata["categories"]]


def class_names(data_config: ml_collections.ConfigDict) -> list[str]:
  """Category names in contiguous-label order: index = label - 1."""
  return [str(c["name"]) for c in get_builder(data_config).info.metadata["categories"]]


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  return len(category_ids(data_config))


def annotation_file(data_config: ml_collections.ConfigDict, split: str | None = None) -> str:
  """Path of the COCO-format ground truth of a split (the base split of a sliced spec)."""
  builder = get_builder(data_config)
  base, _ = _split_range(builder, split or data_config.eval_split)
  path = os.path.join(builder.data_dir, instances.ANNOTATIONS_DIR, f"{base}.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no COCO ground truth for split {base!r}: {path} is missing")
  return path


def get_coco_gt(data_config: ml_collections.ConfigDict, split: str | None = None) -> Any:
  """pycocotools COCO of the eval split (restricted to the records of a sliced spec)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  from pycocotools import coco as coco_lib  # pylint: disable=g-import-not-at-top

  builder = get_builder(data_config)
  split = split or data_config.eval_split
  base, idx = _split_range(builder, split)
  with open(annotation_file(data_config, split)) as f:
    dataset = json.load(f)
  if len(idx) != builder.info.splits[base].num_examples:
    keep = set(records_meta(builder, base)["image_id"][idx].tolist())
    dataset["images"] = [im for im in dataset["images"] if im["id"] in keep]
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in keep]
  gt = coco_lib.COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  logging.info(
    "COCO ground truth of %s: %d images, %d annotations",
    split,
    len(dataset["images"]),
    len(dataset["annotations"]),
  )
  return gt
