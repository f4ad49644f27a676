"""Synthetic data sets generated offline: the embedded default of the demo.

shapes_instances: images with one to several instances of a few categories (circle, square,
  triangle, star, ring) of varied size, colour and texture on textured backgrounds, overlapping
  sometimes, with exact instance masks. Same record format as coco_instances (data/instances.py),
  plus COCO-format ground truth JSON per split (what evaluation scores against).
shapes_classification: single objects of more categories and appearances on different
  backgrounds; the "ImageNet" of the demo's pre-training arm. Features: image, label.

Everything is a deterministic function of (config.seed, split, image index): the same config
gives the same bytes on every machine, and generation needs no network.

Build: `tfds build rethink_jax/data/shapes.py --config=demo` or, from Python,
  builder = ShapesInstances(config="demo", data_dir=...); builder.download_and_prepare()
Records are stored as array_record (random access, used by data/pipeline.py) by default.
"""

from collections.abc import Sequence
import dataclasses
import functools
import io
import sys

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from rethink_jax.data import instances

# Instance categories in contiguous-label order; COCO category id = position + 1.
INSTANCE_CATEGORIES = ("circle", "square", "triangle", "star", "ring")
# The classification set has more categories (a superset) so pre-training is not the target task.
CLASSIFICATION_CATEGORIES = INSTANCE_CATEGORIES + (
  "hexagon",
  "cross",
  "ellipse",
  "diamond",
  "crescent",
  "pentagon",
  "heart",
)

_SPLIT_CODES = {"train": 0, "validation": 1}


# ---------------------------------------------------------------------------------------------
# Rendering (pure numpy).
# ---------------------------------------------------------------------------------------------
def _shape_mask(name, yy, xx, cy, cx, r, theta, rng):
  """Boolean (H, W) mask of one shape.

  Args:
    name: category name.
    yy, xx: (H, W) float32 pixel-centre coordinates.
    cy, cx: centre; r: radius (half extent) in pixels; theta: rotation in radians.
    rng: np.random.Generator for shape-specific proportions.
  """
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(theta), np.sin(theta)
  u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
  d2 = dx * dx + dy * dy

  def polygon(n, apothem):
    inside = np.ones(u.shape, bool)
    for k in range(n):
      a = 2 * np.pi * k / n
      inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside

  if name == "circle":
    return d2 <= r * r
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
  if name == "triangle":
    return polygon(3, 0.5 * r)
  if name == "hexagon":
    return polygon(6, 0.87 * r)
  if name == "pentagon":
    return polygon(5, 0.81 * r)
  if name in ("star",):
    phi = np.arctan2(v, u)
    sector = 2 * np.pi / 5
    t = np.abs(np.mod(phi, sector) - sector / 2) / (sector / 2)  # 1 at the tips, 0 between
    inner = r * rng.uniform(0.38, 0.5)
    return np.sqrt(d2) <= inner + (r - inner) * t**1.5
  if name == "ring":
    inner = r * rng.uniform(0.45, 0.65)
    return (d2 <= r * r) & (d2 >= inner * inner)
  if name == "cross":
    w = r * rng.uniform(0.25, 0.4)
    return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
  if name == "ellipse":
    b = rng.uniform(0.35, 0.6)
    return (u / r) ** 2 + (v / (b * r)) ** 2 <= 1.0
  if name == "diamond":
    return np.abs(u) / r + np.abs(v) / (0.6 * r) <= 1.0
  if name == "crescent":
    off = r * rng.uniform(0.35, 0.55)
    return (d2 <= r * r) & ((u - off) ** 2 + v**2 > (0.85 * r) ** 2)
  if name == "heart":
    x, y = u / r, -v / r + 0.1
    return (x * x + y * y - 0.6) ** 3 - x * x * y**3 <= 0.0
  raise ValueError(f"unknown shape category {name!r}")


def _texture(rng, yy, xx, size, base):
  """(H, W, 3) float32 fill: solid, stripes, checker, noise or gradient around colour `base`."""
  kind = rng.integers(5)
  base = base.astype(np.float32)
  if kind == 0:
    return np.broadcast_to(base, yy.shape + (3,))
  other = rng.uniform(0, 255, 3).astype(np.float32)
  if kind == 1:
    period = rng.uniform(3, 10) * size / 64
    a = rng.uniform(0, np.pi)
    t = np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period) > 0
  elif kind == 2:
    cell = max(2, int(rng.uniform(3, 9) * size / 64))
    t = ((yy.astype(np.int32) // cell + xx.astype(np.int32) // cell) % 2).astype(bool)
  elif kind == 3:
    return np.clip(base + 25 * rng.standard_normal(yy.shape + (3,), dtype=np.float32), 0, 255)
  else:
    a = rng.uniform(0, 2 * np.pi)
    g = ((np.cos(a) * xx + np.sin(a) * yy) / size)[..., None]
    g = (g - g.min()) / max(float(np.ptp(g)), 1e-6)
    return base * (1 - 0.6 * g) + other * 0.6 * g
  t = t[..., None].astype(np.float32)
  return base * (1 - 0.5 * t) + other * 0.5 * t


def _colour(rng, away_from, min_dist=80.0):
  """A random RGB colour at least `min_dist` away from `away_from` (best of a few tries)."""
  best, best_d = None, -1.0
  for _ in range(8):
    c = rng.uniform(0, 255, 3)
    d = float(np.linalg.norm(c - away_from))
    if d >= min_dist:
      return c
    if d > best_d:
      best, best_d = c, d
  return best


@functools.lru_cache(maxsize=8)
def pixel_grid(size):
  """Pixel-centre coordinates yy, xx, each (size, size) float32 (read-only, cached)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def background(rng, yy, xx, size):
  """A textured (H, W, 3) float32 background and its base colour (3,)."""
  base = rng.uniform(0, 255, 3)
  return _texture(rng, yy, xx, size, base).astype(np.float32), base


def _window(size, cy, cx, r):
  """Slices of the square window that contains a shape of radius r centred at (cy, cx)."""
  r = 1.1 * r + 2
  y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 1)
  x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 1)
  return slice(y0, y1), slice(x0, x1)


def place_shape(rng, name, yy, xx, size, r, cy, cx):
  """Full-image (size, size) bool mask of one shape, computed on its window only (fast)."""
  ys, xs = _window(size, cy, cx, r)
  full = np.zeros((size, size), bool)
  full[ys, xs] = _shape_mask(
    name, yy[ys, xs], xx[ys, xs], cy, cx, r, rng.uniform(0, 2 * np.pi), rng
  )
  return full, (ys, xs)


def paint(rng, image, mask, window, bg):
  """Paints `mask` (restricted to `window`) with a random texture of a colour far from bg."""
  ys, xs = window
  yy, xx = pixel_grid(image.shape[0])
  local = mask[ys, xs]
  tex = _texture(rng, yy[ys, xs], xx[ys, xs], image.shape[0], _colour(rng, bg))
  image[ys, xs] = np.where(local[..., None], tex, image[ys, xs])


def add_noise(rng, image):
  """(H, W, 3) float32 image plus Gaussian noise of a random sigma, as uint8."""
  sigma = rng.uniform(0, 8)
  image += sigma * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def render_instances(
  rng: np.random.Generator,
  size: int,
  categories: Sequence[str],
  min_objects: int,
  max_objects: int,
  min_visible: float = 0.6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders one instance-segmentation image.

  Args:
    rng: np.random.Generator (the only source of randomness).
    size: image side in pixels (square images).
    categories: category names; labels index into it.
    min_objects, max_objects: how many objects to try to place (inclusive).
    min_visible: an object may be occluded by later ones down to this fraction of its area.
  Returns:
    image (size, size, 3) uint8, masks (N, size, size) bool (visible parts), labels (N,) int64.
  """
  yy, xx = pixel_grid(size)
  image, bg = background(rng, yy, xx, size)
  image = np.array(image, np.float32)
  n_target = int(rng.integers(min_objects, max_objects + 1))
  masks, labels, areas = [], [], []
  for _ in range(n_target):
    for _attempt in range(10):
      label = int(rng.integers(len(categories)))
      r = rng.uniform(0.08, 0.3) * size
      cy, cx = rng.uniform(0.4 * r, size - 0.4 * r, 2)
      m, window = place_shape(rng, categories[label], yy, xx, size, r, cy, cx)
      area = int(m.sum())
      if area < max(16, 0.002 * size * size):
        continue
      # Occluding earlier objects is fine as long as each keeps most of its visible area.
      if all((prev & ~m).sum() >= min_visible * a for prev, a in zip(masks, areas)):
        break
    else:
      continue
    paint(rng, image, m, window, bg)
    masks = [prev & ~m for prev in masks] + [m]
    areas.append(area)
    labels.append(label)
  image = add_noise(rng, image)
  masks = np.stack(masks) if masks else np.zeros((0, size, size), bool)
  return image, masks, np.asarray(labels, np.int64)


def render_classification(
  rng: np.random.Generator, size: int, categories: Sequence[str]
) -> tuple[np.ndarray, int]:
  """One object centred-ish on a background: image (size, size, 3) uint8, label int."""
  yy, xx = pixel_grid(size)
  image, bg = background(rng, yy, xx, size)
  image = np.array(image, np.float32)
  label = int(rng.integers(len(categories)))
  r = rng.uniform(0.2, 0.42) * size
  cy, cx = rng.uniform(r * 0.8, size - r * 0.8, 2)
  m, window = place_shape(rng, categories[label], yy, xx, size, r, cy, cx)
  paint(rng, image, m, window, bg)
  # Distractor clutter: small blobs of other colours that are not the labelled object.
  for _ in range(int(rng.integers(0, 3))):
    rr = rng.uniform(0.03, 0.08) * size
    cy, cx = rng.uniform(0, size, 2)
    ys, xs = _window(size, cy, cx, rr)
    blob = (yy[ys, xs] - cy) ** 2 + (xx[ys, xs] - cx) ** 2 <= rr * rr
    image[ys, xs] = np.where(blob[..., None], rng.uniform(0, 255, 3), image[ys, xs])
  return add_noise(rng, image), label


def jpeg_bytes(image):
  """(H, W, 3) uint8 -> JPEG file bytes."""
  # JPEG: 10x faster to encode than PNG on these noisy images; the masks stay exact.
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=92)
  return buf.getvalue()


def example_rng(seed, split, index):
  """The generator of example `index` of `split` (the only randomness of that example)."""
  return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def mask_bbox_xyxy(mask):
  """Tight box of an (H, W) mask: [x1, y1, x2, y2] with x2 = last column + 1 (COCO style)."""
  ys = np.flatnonzero(mask.any(axis=1))
  xs = np.flatnonzero(mask.any(axis=0))
  return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def instance_entries(ann_id: int, image_id: int, mask: np.ndarray, label: int, size: int):
  """One instance of a square `size` image: (its record object, its COCO annotation, its mask's
  run-length counts); label is 0-based, the COCO category id label + 1."""
  xyxy = mask_bbox_xyxy(mask)
  area = float(mask.sum())
  counts = instances.mask_to_counts(mask)
  record_object = {
    "id": ann_id,
    "bbox": instances.normalized_bbox(xyxy, size, size),
    "label": int(label),
    "category_id": int(label) + 1,
    "is_crowd": False,
    "area": area,
    "mask_runs": len(counts),
  }
  annotation = {
    "id": ann_id,
    "image_id": image_id,
    "category_id": int(label) + 1,
    "bbox": [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]],
    "area": area,
    "iscrowd": 0,
    "segmentation": instances.coco_rle(mask),
  }
  return record_object, annotation, counts


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Builder config: image_size (square side), split sizes, categories, objects per image, seed."""

  image_size: int = 128
  num_train: int = 1600
  num_validation: int = 200
  num_categories: int = 4
  min_objects: int = 1
  max_objects: int = 4
  seed: int = 0


class ArrayRecordBuilderMixin:
  """Mixin for this project's builders.

  Stores records as array_record (random access, needed by data/pipeline.py) unless another
  file_format is asked for, and states the builder's code path directly (tfds' own lookup needs
  the optional `importlib_resources` package, absent from a minimal install).
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(sys.modules[cls.__module__].__file__)


class SyntheticBuilderMixin:
  """What the two synthetic builders share: version, default config, and train / validation
  splits of the config's num_train / num_validation generated examples."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  DEFAULT_CONFIG_NAME = "demo"
  code_path = ArrayRecordBuilderMixin.code_path

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
      "train": self._generate_examples("train", cfg.num_train),
      "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _category_names(self, all_names):
    """The first num_categories of all_names (ValueError when the config asks for more)."""
    n = self.builder_config.num_categories
    if not 1 <= n <= len(all_names):
      raise ValueError(f"num_categories must be in 1..{len(all_names)}, got {n}")
    return list(all_names[:n])


def _instances_config(name, image_size, num_train, num_validation, num_categories, max_objects=4):
  """A ShapesConfig whose description states its sizes."""
  return ShapesConfig(
    name=name,
    description=f"{image_size}x{image_size}, {num_train} train / {num_validation} validation, "
    f"{num_categories} categories.",
    image_size=image_size,
    num_train=num_train,
    num_validation=num_validation,
    num_categories=num_categories,
    max_objects=max_objects,
  )


class ShapesInstances(
  SyntheticBuilderMixin, ArrayRecordBuilderMixin, tfds.core.GeneratorBasedBuilder
):
  """Synthetic instance segmentation: circles, squares, triangles, stars, rings with masks."""

  BUILDER_CONFIGS = [
    _instances_config("tiny", 64, 24, 8, 3, max_objects=3),  # unit tests: well under a second
    _instances_config("demo", 128, 1600, 200, 4),  # `make demo`: a few seconds on one core
    _instances_config("large", 256, 10000, 500, 5, max_objects=6),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
      features=instances.instance_features(),
      metadata=tfds.core.MetadataDict(categories=self._categories()),
      homepage="https://arxiv.org/abs/1811.08883",
      # Record i of a split is generated example i (the side files index records by number).
      disable_shuffling=True,
    )

  def _categories(self):
    names = self._category_names(INSTANCE_CATEGORIES)
    return [{"id": i + 1, "name": n} for i, n in enumerate(names)]

  def _generate_examples(self, split, num_images):
    cfg = self.builder_config
    categories = self._categories()
    names = [c["name"] for c in categories]
    size = cfg.image_size
    images, annotations, image_ids, num_objects = [], [], [], []
    ann_id = 1
    for index in range(num_images):
      image, masks, labels = render_instances(
        example_rng(cfg.seed, split, index), size, names, cfg.min_objects, cfg.max_objects
      )
      image_id = index + 1
      file_name = f"{split}_{index:06d}.jpg"
      objects, counts = [], []
      for mask, label in zip(masks, labels):
        record_object, annotation, mask_counts = instance_entries(
          ann_id, image_id, mask, label, size
        )
        objects.append(record_object)
        annotations.append(annotation)
        counts.append(mask_counts)
        ann_id += 1
      images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
      image_ids.append(image_id)
      num_objects.append(len(objects))
      yield (
        index,
        {
          "image": jpeg_bytes(image),
          "image_id": image_id,
          "file_name": file_name,
          "height": size,
          "width": size,
          "objects": objects,
          "mask_counts": instances.concat_counts(counts),
          "keypoints": np.zeros((0,), np.float32),
        },
      )
    # Generation finished: write the side files next to the records (the temporary data dir).
    instances.write_split_files(
      self.data_path,
      split,
      images=images,
      annotations=annotations,
      categories=categories,
      image_ids=image_ids,
      num_objects=num_objects,
    )


@dataclasses.dataclass(eq=False)
class ShapesClassificationConfig(tfds.core.BuilderConfig):
  """Builder config: image_size (square side), split sizes, number of categories, seed."""

  image_size: int = 128
  num_train: int = 4000
  num_validation: int = 400
  num_categories: int = len(CLASSIFICATION_CATEGORIES)
  seed: int = 1


def _classification_config(name, image_size, num_train, num_validation):
  """A ShapesClassificationConfig whose description states its sizes."""
  sizes = dict(image_size=image_size, num_train=num_train, num_validation=num_validation)
  description = f"{image_size}x{image_size}, {num_train} train / {num_validation} validation."
  return ShapesClassificationConfig(name=name, description=description, **sizes)


class ShapesClassification(SyntheticBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Synthetic classification: one shape per image among more categories than the detection set.

  Stored as tfrecord (tfds' default) so that the usual `tfds.load(...)` / `as_dataset` work.
  """

  BUILDER_CONFIGS = [
    _classification_config("tiny", 64, 48, 16),
    _classification_config("demo", 128, 3000, 300),
  ]

  def _info(self):
    names = self._category_names(CLASSIFICATION_CATEGORIES)
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=names),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://arxiv.org/abs/1811.08883",
      disable_shuffling=True,
    )

  def _generate_examples(self, split, num_images):
    cfg = self.builder_config
    names = CLASSIFICATION_CATEGORIES[: cfg.num_categories]
    for index in range(num_images):
      image, label = render_classification(
        example_rng(cfg.seed, split, index), cfg.image_size, names
      )
      yield index, {"image": jpeg_bytes(image), "label": label}
