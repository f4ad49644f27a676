"""The recipe fields that come from the built data set: class count, names, schedule length.

`resolve_config(config)` is the one check the trainer runs where it opens the data, before
anything is compiled or trained:
  * the data set must be built, with the train and eval splits the config names; otherwise
    DatasetNotBuiltError with the `python -m rethink_jax.data.build ...` command that builds it;
  * config.model.num_classes: 0 = the data set's class count (its metadata); any other value must
    equal it, else NumClassesMismatchError naming both counts and the flag that fixes it;
  * config.data.class_names / category_ids are filled from the metadata (a workdir's config.json
    then names the classes without the data set);
  * keypoints: config.model.keypoint_on turns config.data.keypoints on (the head trains on
    gt_keypoints), and with data.keypoints the data set must have keypoints;
    config.model.keypoint_head.num_keypoints: 0 = the data set's K, any other value must equal it
    (KeypointCountMismatchError); config.data.min_keypoints_per_image is the model's
    keypoint_head.min_keypoints_per_image (Detectron2 keeps that training-image filter in the
    keypoint head's config; the data pipeline applies it);
  * config.schedule.scale_to_data: the paper's schedule multiples of THIS training set's size;
  * config.pixels_from_init with init_from: config.data's pixel format (input_format,
    pixel_mean, pixel_std) from the backbone checkpoint's meta.json.

The paper's 1x is 90k iterations at 16 images on COCO train2017, whose 117,266 images with at least
one non-crowd instance are the ones trained on: 1x = 90,000 * 16 / 117,266 = 12.28 epochs. On a
training set of N images (the images the stream draws from: non-empty, after any subset) at batch
B, 1x is therefore 12.28 * N / B iterations, and the LR decays sit where the paper's rule puts them
(x0.1 at the last 60k and 20k iterations of 2x and longer, at 2/3 and 8/9 of shorter runs), scaled
by the same factor N / 117,266. On COCO train2017 itself this is exactly the paper's 90k.
"""

import copy
import os

from absl import logging
import ml_collections
import tensorflow_datasets as tfds

from rethink_jax import files
from rethink_jax import optim
from rethink_jax.data import pipeline

# COCO train2017 images with a non-crowd instance: the training set of the paper's 1x.
COCO_TRAIN_IMAGES = 117_266
EPOCHS_1X = optim.ITERS_1X * optim.BASE_BATCH_SIZE / COCO_TRAIN_IMAGES  # 12.28

DatasetNotBuiltError = pipeline.DatasetNotBuiltError


class NumClassesMismatchError(ValueError):
  """config.model.num_classes disagrees with the data set's class count."""


class KeypointCountMismatchError(ValueError):
  """config.model.keypoint_head.num_keypoints disagrees with the data set's keypoint count."""


def open_data(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared builder of config.data, with its train and eval splits checked to exist."""
  builder = pipeline.get_builder(data_config)
  for key in ("train_split", "eval_split"):
    spec = data_config.get(key)
    base = str(spec).split("[", 1)[0].strip()
    if spec and base not in builder.info.splits:
      raise DatasetNotBuiltError(
        f"{builder.info.full_name} in {builder.data_dir_root} has no split {base!r} "
        f"(config.data.{key}={spec!r}; it has {sorted(builder.info.splits)}). Build it with\n  "
        + pipeline.build_command(data_config, builder.data_dir_root)
      )
  return builder


def check_num_classes(num_classes: int, data_config: ml_collections.ConfigDict, builder) -> int:
  """The model's class count: the data set's when num_classes is 0, else checked against it."""
  categories = builder.info.metadata["categories"]
  names = [str(c["name"]) for c in categories]
  if int(num_classes) == 0:
    return len(categories)
  if int(num_classes) != len(categories):
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    raise NumClassesMismatchError(
      f"config.model.num_classes={num_classes} but {builder.info.full_name} in "
      f"{builder.data_dir_root} has {len(categories)} classes ({shown}). Set "
      f"--config.model.num_classes={len(categories)} (or 0: the data set's count), or point "
      f"--config.data.builder_config / --config.data.data_dir at the data set meant."
    )
  return int(num_classes)


def resolve_keypoints(c: ml_collections.ConfigDict, builder) -> None:
  """The module docstring's keypoint fields of config `c` (unlocked), in place."""
  keypoint_head = c.model.get("keypoint_head")
  if c.model.get("keypoint_on"):
    c.data.keypoints = True
  if not c.data.get("keypoints"):
    return
  names = builder.info.metadata.get("keypoint_names") or []
  if not names:
    raise ValueError(
      f"config.data.keypoints (or model.keypoint_on) needs keypoints, but "
      f"{builder.info.full_name} has none: use a keypoint data set (shapes_keypoints, or "
      "coco_instances built from a person_keypoints JSON such as config keypoints_2017)"
    )
  if keypoint_head is None:
    return
  num = int(keypoint_head.get("num_keypoints", 0) or 0)
  if num == 0:
    keypoint_head.num_keypoints = len(names)
  elif num != len(names):
    raise KeypointCountMismatchError(
      f"config.model.keypoint_head.num_keypoints={num} but {builder.info.full_name} has "
      f"{len(names)} keypoints ({', '.join(names)}). Set "
      f"--config.model.keypoint_head.num_keypoints={len(names)} (or 0: the data set's count)."
    )
  if "min_keypoints_per_image" in keypoint_head:
    c.data.min_keypoints_per_image = int(keypoint_head.min_keypoints_per_image)


def training_set_size(data_config: ml_collections.ConfigDict, builder) -> int:
  """N of the module docstring: COCO_TRAIN_IMAGES for the whole COCO train2017, else the images
  the training stream draws from."""
  whole_coco = (
    data_config.name == "coco_instances"
    and (data_config.get("builder_config") or "2017") == "2017"
    and data_config.train_split == "train"
    and not data_config.get("num_train_images", 0)
  )
  return COCO_TRAIN_IMAGES if whole_coco else len(pipeline.train_pool(data_config, builder))


def iters_1x(num_images: int, batch_size: int) -> float:
  """Iterations of the paper's 1x on `num_images` training images at `batch_size`."""
  return optim.ITERS_1X * num_images / COCO_TRAIN_IMAGES * optim.BASE_BATCH_SIZE / batch_size


def data_schedule(schedule_config, optim_config, batch_size: int, num_images: int) -> dict:
  """config.schedule in units of the training set's own size.

  schedule_config: total_steps (> 0: the length in iterations), else epochs (> 0: the length in
    epochs), else multiple (the paper's multiple; 1x = EPOCHS_1X epochs); base_batch_size;
    evals_per_1x. optim_config: base_lr.
  Returns:
    dict(total_steps, decay_steps (the paper's rule scaled to the data), eval_every
    (evals_per_1x evaluations per 1x; 0 if evals_per_1x is 0), multiple, epochs, iters_1x).
  """
  unit = iters_1x(num_images, batch_size)
  total = int(schedule_config.get("total_steps", 0) or 0)
  epochs = float(schedule_config.get("epochs", 0) or 0)
  if total > 0:
    multiple = total / unit
  elif epochs > 0:
    multiple = epochs / EPOCHS_1X
  else:
    multiple = float(schedule_config.multiple)
  scale = num_images / COCO_TRAIN_IMAGES
  s = optim.schedule(
    multiple,
    batch_size,
    base_lr=float(optim_config.base_lr),
    base_batch_size=int(schedule_config.get("base_batch_size", optim.BASE_BATCH_SIZE)),
    iters_1x=optim.ITERS_1X * scale,
    decay_last_iters=tuple(d * scale for d in optim.DECAY_LAST_ITERS),
  )
  total = total if total > 0 else max(1, s["total_steps"])
  evals = float(schedule_config.get("evals_per_1x", 0) or 0)
  return dict(
    total_steps=total,
    decay_steps=tuple(min(max(1, d), total) for d in s["decay_steps"]),
    eval_every=max(1, int(round(unit / evals))) if evals > 0 else 0,
    multiple=multiple,
    epochs=multiple * EPOCHS_1X,
    iters_1x=unit,
  )


def _pixels_from_backbone(c: ml_collections.ConfigDict) -> None:
  """Sets config.data's pixel format to the one in init_from's meta.json."""
  path = os.path.join(c.init_from, "meta.json")
  meta = files.read_json(path)
  if meta is None:
    raise FileNotFoundError(
      f"init_from={c.init_from}: {path} not found (not a backbone checkpoint)"
    )
  for key in ("input_format", "pixel_mean", "pixel_std"):
    if meta.get(key) is not None:
      value = meta[key]
      c.data[key] = str(value) if key == "input_format" else tuple(float(v) for v in value)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the trainer's config with the fields of the module docstring resolved.

  Raises DatasetNotBuiltError, NumClassesMismatchError or KeypointCountMismatchError (they name
  the fix) before training.
  """
  c = copy.deepcopy(config)
  builder = open_data(c.data)
  categories = builder.info.metadata["categories"]
  with c.unlocked():
    c.model.num_classes = check_num_classes(c.model.num_classes, c.data, builder)
    c.data.class_names = tuple(str(cat["name"]) for cat in categories)
    c.data.category_ids = tuple(int(cat["id"]) for cat in categories)
    resolve_keypoints(c, builder)
    if c.get("pixels_from_init") and c.get("init_from"):
      _pixels_from_backbone(c)
    if c.schedule.get("scale_to_data", False):
      n = training_set_size(c.data, builder)
      s = data_schedule(c.schedule, c.optim, int(c.batch_size), n)
      c.schedule.total_steps = s["total_steps"]
      if not c.schedule.get("decay_steps"):
        c.schedule.decay_steps = s["decay_steps"]
      # The paper's warmup is in iterations; on a small data set it must not fill the run.
      c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(1, c.schedule.total_steps // 4))
      if s["eval_every"]:
        c.eval_every = s["eval_every"]
      logging.info(
        "%s: %d training images, 1x = %.1f iterations at batch %d; %.3gx = %.1f epochs = %d "
        "iterations, LR decays at %s, warmup %d, evaluation every %d",
        builder.info.full_name,
        n,
        s["iters_1x"],
        int(c.batch_size),
        s["multiple"],
        s["epochs"],
        c.schedule.total_steps,
        tuple(c.schedule.decay_steps),
        c.optim.warmup_steps,
        c.eval_every,
      )
  return c
