"""The fixed-shape, per-process input pipeline (tf.data on the host, numpy batches out): the
data config, the data sets' builders and records, the evaluation iterator and the ground truth.

The training iterator is rethink_jax/data/stream.py's make_train_iterator (order, sharding,
orientation steps, bad records); the per-image preprocessing and the batching into the shapes
below are rethink_jax/data/preprocess.py's.

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
  gt_keypoints (B, G, K, 3) float32 only with data.keypoints: instance g's K keypoints [x, y, v]
                                    in input pixels, Detectron2's: (x + 0.5, y + 0.5) * scale
                                    (COCO's integer pixel -> its centre), x -> w - x after a
                                    flip (w = image_hw's) with the left / right keypoints of the
                                    data set's flip map swapped; v as in COCO (0 unlabeled, 1
                                    labeled not visible, 2 visible), 0 for points outside
                                    [0, w] x [0, h] of the resized image; unlabeled points and
                                    padding rows (and padding images) are (0, 0, 0). K and the
                                    names, flip map, skeleton and OKS sigmas: keypoint_info().

Orientation buckets (data.pad_buckets, e.g. ((800, 1344), (1344, 800))): a landscape image
(w > h, Detectron2's AspectRatioGroupedDataset rule) is padded to the first bucket with W >= H,
the others to the first with H >= W, so padding stays near Detectron2's own (its batch's largest
image rounded to 32) with one static shape per bucket. A batch holds one bucket's images
(training: stream.py's grouping; eval: below).

Eval: process p reads records p, p + P, p + 2P, ... of the eval split (shorter side min_size_test,
no flip), padded with valid=False images (image_id -1, gt_classes 0) so that every process yields
the same number of batches. With buckets, this is done per bucket, bucket after bucket (padding
images are copies of one of the bucket's records), so every process has the same bucket at a
batch too.

config.data fields (ConfigDict; `default_data_config()` lists them with defaults):
  name "shapes_instances" | "shapes_keypoints" | "coco_instances"; data_dir (tfds data dir,
  None = tfds default); builder_config (config name); builder_kwargs (dict, passed to the
  builder); builder_overrides (synthetic sets only: dict of their config's fields, e.g.
  {"num_train": 500}, deriving a new config named after them); train_split, eval_split (tfds
  split specs, slices like "validation[:100]" allowed); min_size (int, or a sequence of ints to
  choose from per image in training: "train aug"); min_size_test (int; 0 = max of min_size);
  max_size (int); pad_to (H, W), multiples of 32 (() = max_size rounded up to a multiple of 32,
  square); pad_buckets (((H, W), ...) batch shapes by orientation, training and eval, multiples
  of 32; () = pad_to only); max_instances; mask_size; pixel_mean, pixel_std (0..255, in
  input_format order); input_format; flip_prob; num_train_images (0 = all); subset_seed;
  drop_empty_train; skip_bad_records (stream.py, "Bad records"); num_parallel_calls; prefetch;
  keypoints (bool: gt_keypoints in the batches; the data set must have keypoints);
  min_keypoints_per_image (with keypoints: training images need this many labeled keypoints,
  Detectron2's filter; recipe.resolve_config copies the model's keypoint_head value);
  class_names, category_ids (filled from the data set's metadata by
  rethink_jax.data.recipe.resolve_config; informational).
If an image resized by (min_size, max_size) would not fit into pad_to (its bucket), it is scaled
down to fit.
"""

from collections.abc import Iterator
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
from rethink_jax.data import preprocess


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
      "keypoints": False,  # True: gt_keypoints (B, G, K, 3) in the batches
      "min_keypoints_per_image": 0,  # with keypoints: fewer labeled ones drop a training image
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
  if name == "shapes_keypoints":
    from rethink_jax.data import shapes_keypoints  # pylint: disable=g-import-not-at-top

    return shapes_keypoints.ShapesKeypoints
  if name == "coco_instances":
    from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

    return coco.CocoInstances
  raise ValueError(
    f"data.name must be 'shapes_instances', 'shapes_keypoints' or 'coco_instances', got {name!r}"
  )


# The builders that generate their data offline on first use.
_SYNTHETIC = ("shapes_instances", "shapes_keypoints")


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
    prepare: generate a synthetic data set if absent (under a file lock: safe for parallel runs).
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
    if name not in _SYNTHETIC:
      raise ValueError(
        f"data.builder_overrides is for the synthetic sets {_SYNTHETIC}, not {name!r}"
      )
    base = cls.builder_configs[config or cls.DEFAULT_CONFIG_NAME]
    tag = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    config = dataclasses.replace(base, name=f"{base.name}_{tag}", **overrides)
  builder = cls(config=config, data_dir=data_config.get("data_dir"), **kwargs)
  if not builder.is_prepared():
    if not prepare or name not in _SYNTHETIC:
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
  min_keypoints = int(data_config.get("min_keypoints_per_image", 0) or 0)
  if data_config.get("keypoints", False) and min_keypoints > 0:
    meta = records_meta(builder, base)
    if "num_keypoints" not in meta:
      raise ValueError(f"{builder.info.full_name} records no keypoint counts (no keypoints?)")
    idx = idx[meta["num_keypoints"][idx] >= min_keypoints]
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
    try:
      parsed = tf.io.parse_example(tf.constant(records), spec)
    except (tf.errors.OpError, UnicodeDecodeError):  # TF's message may quote the bytes
      bad = _first_unparsable(records, spec)
      if bad is None:
        raise
      image_id = int(records_meta(builder, base_split)["image_id"][start + bad])
      raise ValueError(
        f"{builder.data_dir}: record {start + bad} of split {base_split!r} (image id "
        f"{image_id}) does not parse, so its image size is unknown. records/{base_split}.json of "
        "this older build has no sizes; rebuilding the data set writes them, and the training "
        "stream then names a damaged record at its step or skips it (data.skip_bad_records)."
      ) from None
    out.append(np.stack([parsed["height"].numpy(), parsed["width"].numpy()], axis=1))
  return np.concatenate(out).astype(np.int64)


def _first_unparsable(records: list[bytes], spec: dict) -> int | None:
  """Index of the first serialized tf.Example in `records` that does not parse with `spec`."""
  for i, record in enumerate(records):
    try:
      tf.io.parse_single_example(record, spec)
    except (tf.errors.OpError, UnicodeDecodeError):
      return i
  return None


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
    try:
      got = int(tf.io.parse_single_example(source[i], parse)["image_id"])
    except (tf.errors.OpError, UnicodeDecodeError):  # TF's message may quote the bytes
      continue  # a damaged record: the training stream names it at its step
    if got != ids[i]:
      raise ValueError(
        f"{builder.data_dir}: record {i} of {base_split!r} has image id {got}, "
        f"records/{base_split}.json says {ids[i]} (records shuffled?)"
      )
  return source


# ---------------------------------------------------------------------------------------------
# Process shares and the evaluation iterator.
# ---------------------------------------------------------------------------------------------
def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


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
  if len(set(preprocess._bucket_pad_hws(data_config))) > 1:
    bucket_ids = preprocess.bucket_of(
      record_sizes(builder, base)[idx], preprocess.pad_buckets(data_config)
    )
    positions, valid = eval_records_by_bucket(bucket_ids, b, p, num_p)

  def gen():
    for t, (pos, ok) in enumerate(zip(positions, valid)):
      yield t, source[int(idx[max(pos, 0)])], bool(ok)

  ds = preprocess._records_dataset(gen)
  preprocess_fn = preprocess.make_preprocess_fn(
    data_config,
    builder.info.features,
    train=False,
    keypoint_flip_indices=keypoint_flip_indices(data_config, builder),
  )
  return preprocess._to_batches(ds, data_config, preprocess_fn, b).as_numpy_iterator()


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


def keypoint_info(
  data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder | None = None
) -> dict[str, list]:
  """The data set's keypoints (data/instances.py's metadata), K = len(names):

  {"names": K str, "flip_map": [left, right] name pairs, "flip_indices": K int (keypoint k of a
   flipped image is keypoint flip_indices[k] before the flip's swap), "skeleton": COCO's 1-based
   [i, j] pairs, "oks_sigmas": K float (COCOeval's kpt_oks_sigmas)}.
  Raises ValueError when the data set has no keypoints.
  """
  builder = builder or get_builder(data_config)
  meta = builder.info.metadata
  names = list(meta.get("keypoint_names") or [])
  if not names:
    raise ValueError(f"{builder.info.full_name} has no keypoints")
  flip_map = [list(p) for p in meta["keypoint_flip_map"]]
  return {
    "names": names,
    "flip_map": flip_map,
    "flip_indices": instances.flip_indices(names, flip_map).tolist(),
    "skeleton": [list(p) for p in meta["skeleton"]],
    "oks_sigmas": [float(v) for v in meta["keypoint_oks_sigmas"]],
  }


def keypoint_flip_indices(
  data_config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder | None = None
) -> list[int] | None:
  """keypoint_info's flip_indices when config.data.keypoints is on, else None."""
  if not data_config.get("keypoints", False):
    return None
  return keypoint_info(data_config, builder)["flip_indices"]


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
