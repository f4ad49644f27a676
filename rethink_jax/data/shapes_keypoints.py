"""shapes_keypoints: synthetic keypoint detection, generated offline (the keypoint demo's data).

Images of one to a few stick figures (category "figure": a head disk and thick limbs) on textured
backgrounds, with exact visible-part masks and K = 7 keypoints per figure: head, neck,
left_hand, right_hand, hip, left_foot, right_foot (the head's centre, the arms' shoulder, the arm
tips, the legs' joint and the leg tips). Figures stand upright (tilted by at most 20 degrees) and
face the viewer, so a figure's left limbs are on the image's right: a horizontal flip with the
left/right swap gives a figure that follows the same rule, like COCO's people.

Visibility: v = 2 where the keypoint's pixel shows its figure; v = 1 (labeled, not visible) where
a later figure or an unannotated occluder shape is painted over it; v = 0 with (0, 0) (COCO's
unlabeled) where the point falls outside the image, and, with probability
config.unlabeled_prob, for points an annotator "skipped". Coordinates follow COCO's integer
convention: a point at continuous position p is stored as floor(p), the index of the pixel that
holds it (Detectron2's +0.5 on loading gives that pixel's centre). Unannotated shapes (circles,
squares, ... of shapes_instances) sit behind or in front of the figures as clutter.

Records are data/instances.py's format with keypoints; the COCO ground truth JSON carries
"keypoints" and "num_keypoints" per annotation and the category's "keypoints" and "skeleton";
info.metadata has the keypoint names, flip map, skeleton and OKS sigmas (KEYPOINT_OKS_SIGMAS).
Everything is a deterministic function of (config.seed, split, image index).

Build: `python -m rethink_jax.data.build --name=shapes_keypoints --config=demo` or, from Python,
  ShapesKeypoints(config="demo", data_dir=...).download_and_prepare()
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from rethink_jax.data import instances
from rethink_jax.data import shapes

CATEGORY = "figure"
KEYPOINT_NAMES = ("head", "neck", "left_hand", "right_hand", "hip", "left_foot", "right_foot")
KEYPOINT_FLIP_MAP = (("left_hand", "right_hand"), ("left_foot", "right_foot"))
# COCO's 1-based keypoint pairs of the drawing: head-neck, the arms, the torso, the legs.
SKELETON = ((1, 2), (2, 3), (2, 4), (2, 5), (5, 6), (5, 7))
# COCOeval's per-keypoint OKS sigmas (COCO's wrists 0.062, ankles 0.089): on a median figure of the
# demo (area ~1100 px), a 2-pixel error scores an OKS of about 0.9, a 4-pixel one about 0.7.
KEYPOINT_OKS_SIGMAS = (0.07,) * len(KEYPOINT_NAMES)

_DEG = np.pi / 180.0


# ---------------------------------------------------------------------------------------------
# Rendering (pure numpy).
# ---------------------------------------------------------------------------------------------
def figure_geometry(rng: np.random.Generator, height: float, cy: float, cx: float) -> dict:
  """A random stick figure of `height` pixels centred at (cy, cx).

  Returns:
    {"points": (7, 2) float64 [x, y] of the keypoints (KEYPOINT_NAMES order, continuous pixel
     coordinates: pixel centres at i + 0.5), "head_radius", "limb_radius", "torso_radius"} (px).
  """
  width = rng.uniform(0.8, 1.2)
  arm_left, arm_right = rng.uniform(-60, 60, 2) * _DEG  # from horizontal, positive = down
  leg_left, leg_right = rng.uniform(8, 40, 2) * _DEG  # from vertical
  arm_len = rng.uniform(0.25, 0.35, 2)
  leg_len = rng.uniform(0.35, 0.45, 2)
  head = np.array([0.0, -0.36])
  neck = np.array([0.0, -0.22])
  hip = np.array([0.0, 0.08])
  local = np.stack(
    [
      head,
      neck,
      neck + arm_len[0] * np.array([np.cos(arm_left) * width, np.sin(arm_left)]),
      neck + arm_len[1] * np.array([-np.cos(arm_right) * width, np.sin(arm_right)]),
      hip,
      hip + leg_len[0] * np.array([np.sin(leg_left) * width, np.cos(leg_left)]),
      hip + leg_len[1] * np.array([-np.sin(leg_right) * width, np.cos(leg_right)]),
    ]
  )
  tilt = rng.uniform(-20, 20) * _DEG
  rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
  limb = max(rng.uniform(0.045, 0.07) * height, 1.5)
  return {
    "points": local @ rot.T * height + np.array([cx, cy]),
    "head_radius": rng.uniform(0.09, 0.12) * height,
    "limb_radius": limb,
    "torso_radius": 1.6 * limb,
  }


def _segment_distance(yy, xx, a, b):
  """Distance of every pixel centre (yy, xx) to the segment a-b ([x, y] each)."""
  d = b - a
  t = ((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(float(d @ d), 1e-9)
  t = np.clip(t, 0.0, 1.0)
  return np.hypot(xx - (a[0] + t * d[0]), yy - (a[1] + t * d[1]))


def figure_mask(geometry: dict, size: int) -> np.ndarray:
  """(size, size) bool mask of a figure: the head disk and the limbs as capsules."""
  yy, xx = shapes.pixel_grid(size)
  p = geometry["points"]
  reach = geometry["head_radius"] + geometry["torso_radius"] + 2
  x0, y0 = np.maximum(np.floor(p.min(axis=0) - reach), 0).astype(int)
  x1, y1 = np.minimum(np.ceil(p.max(axis=0) + reach) + 1, size).astype(int)
  mask = np.zeros((size, size), bool)
  if x1 <= x0 or y1 <= y0:
    return mask
  wy, wx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
  head, neck, hand_l, hand_r, hip, foot_l, foot_r = p
  local = np.hypot(wx - head[0], wy - head[1]) <= geometry["head_radius"]
  local |= _segment_distance(wy, wx, neck, hip) <= geometry["torso_radius"]
  for a, b in ((head, neck), (neck, hand_l), (neck, hand_r), (hip, foot_l), (hip, foot_r)):
    local |= _segment_distance(wy, wx, a, b) <= geometry["limb_radius"]
  mask[y0:y1, x0:x1] = local
  return mask


def _pixels(points, size):
  """Integer pixel [x, y] of each point (K, 2) and whether it lies inside the image (K,)."""
  pix = np.floor(points).astype(np.int64)
  inside = ((pix >= 0) & (pix < size)).all(axis=1)
  return pix, inside


def render_figures(
  rng: np.random.Generator,
  size: int,
  min_objects: int = 1,
  max_objects: int = 3,
  max_distractors: int = 2,
  unlabeled_prob: float = 0.05,
  min_visible: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders one keypoint image (module docstring).

  Args:
    rng: np.random.Generator (the only source of randomness).
    size: image side in pixels (square images).
    min_objects, max_objects: how many figures to try to place (inclusive).
    max_distractors: up to this many unannotated shapes, each behind or in front of the figures.
    unlabeled_prob: probability that a keypoint inside the image is left unlabeled.
    min_visible: occlusion keeps at least this fraction of every figure's area visible.
  Returns:
    image (size, size, 3) uint8, masks (N, size, size) bool (visible parts), keypoints
    (N, K, 3) float32 [x, y, v] in COCO's convention.
  """
  yy, xx = shapes.pixel_grid(size)
  image, bg = shapes.background(rng, yy, xx, size)
  image = np.array(image, np.float32)
  n_figures = int(rng.integers(min_objects, max_objects + 1))
  n_distractors = int(rng.integers(0, max_distractors + 1))
  in_front = rng.uniform(size=n_distractors) < 0.5
  min_area = max(16, 0.002 * size * size)
  for _ in range(int((~in_front).sum())):  # clutter behind the figures
    _distractor(rng, image, yy, xx, size, bg, [], [], min_visible)
  masks, areas, points, covered = [], [], [], []
  for _ in range(n_figures):
    for _attempt in range(10):
      geometry = figure_geometry(
        rng,
        rng.uniform(0.35, 0.75) * size,
        rng.uniform(0.25, 0.75) * size,
        rng.uniform(0.15, 0.85) * size,
      )
      m = figure_mask(geometry, size)
      pix, inside = _pixels(geometry["points"], size)
      m[pix[inside, 1], pix[inside, 0]] = True  # a keypoint's own pixel shows its figure
      area = int(m.sum())
      if area >= min_area and all((p & ~m).sum() >= min_visible * a for p, a in zip(masks, areas)):
        break
    else:
      continue
    shapes.paint(rng, image, m, _window_of(m), bg)
    _occlude(m, masks, points, covered)
    masks.append(m)
    areas.append(area)
    points.append(geometry["points"])
    covered.append(np.zeros(len(KEYPOINT_NAMES), bool))
  for _ in range(int(in_front.sum())):  # occluders in front of the figures
    m = _distractor(rng, image, yy, xx, size, bg, masks, areas, min_visible)
    if m is not None:
      _occlude(m, masks, points, covered)
  image = shapes.add_noise(rng, image)
  keypoints = np.zeros((len(masks), len(KEYPOINT_NAMES), 3), np.float32)
  for i, (p, c) in enumerate(zip(points, covered)):
    pix, inside = _pixels(p, size)
    labeled = inside & (rng.uniform(size=len(p)) >= unlabeled_prob)
    keypoints[i, :, :2] = np.where(labeled[:, None], pix, 0)
    keypoints[i, :, 2] = np.where(labeled, np.where(c, 1, 2), 0)
  masks = np.stack(masks) if masks else np.zeros((0, size, size), bool)
  return image, masks, keypoints


def _window_of(mask):
  """Slices of the bounding window of a non-empty mask."""
  ys = np.flatnonzero(mask.any(axis=1))
  xs = np.flatnonzero(mask.any(axis=0))
  return slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def _occlude(mask, masks, points, covered):
  """Paints `mask` over the earlier figures: their visible masks shrink and the keypoints whose
  pixel it covers become labeled-not-visible."""
  size = mask.shape[0]
  for i, p in enumerate(points):
    masks[i] &= ~mask
    pix, inside = _pixels(p, size)
    hit = np.zeros(len(p), bool)
    hit[inside] = mask[pix[inside, 1], pix[inside, 0]]
    covered[i] |= hit


def _distractor(rng, image, yy, xx, size, bg, masks, areas, min_visible):
  """Paints one unannotated shape that leaves every figure of `masks` min_visible of its area;
  returns its mask (None when no placement of a few tries does)."""
  for _attempt in range(5):
    name = shapes.INSTANCE_CATEGORIES[int(rng.integers(len(shapes.INSTANCE_CATEGORIES)))]
    r = rng.uniform(0.06, 0.15) * size
    cy, cx = rng.uniform(0, size, 2)
    m, window = shapes.place_shape(rng, name, yy, xx, size, r, cy, cx)
    if m.any() and all((p & ~m).sum() >= min_visible * a for p, a in zip(masks, areas)):
      shapes.paint(rng, image, m, window, bg)
      return m
  return None


# ---------------------------------------------------------------------------------------------
# Builder.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ShapesKeypointsConfig(tfds.core.BuilderConfig):
  """Builder config: image_size (square side), split sizes, figures and unannotated shapes per
  image, the unlabeled-keypoint probability, seed."""

  image_size: int = 128
  num_train: int = 1600
  num_validation: int = 200
  min_objects: int = 1
  max_objects: int = 3
  max_distractors: int = 2
  unlabeled_prob: float = 0.05
  seed: int = 0


def _config(name, image_size, num_train, num_validation, max_objects):
  """A ShapesKeypointsConfig whose description states its sizes."""
  return ShapesKeypointsConfig(
    name=name,
    description=f"{image_size}x{image_size}, {num_train} train / {num_validation} validation, "
    f"1 to {max_objects} figures with {len(KEYPOINT_NAMES)} keypoints.",
    image_size=image_size,
    num_train=num_train,
    num_validation=num_validation,
    max_objects=max_objects,
  )


class ShapesKeypoints(
  shapes.SyntheticBuilderMixin, shapes.ArrayRecordBuilderMixin, tfds.core.GeneratorBasedBuilder
):
  """Synthetic keypoint detection: stick figures with 7 keypoints, masks and occlusion flags."""

  BUILDER_CONFIGS = [
    _config("tiny", 64, 24, 8, max_objects=2),  # unit tests
    _config("demo", 128, 1600, 200, max_objects=3),  # the keypoint demo
  ]

  def _info(self):
    metadata = {"categories": self._categories()}
    metadata.update(
      instances.keypoint_metadata(KEYPOINT_NAMES, SKELETON, KEYPOINT_OKS_SIGMAS, KEYPOINT_FLIP_MAP)
    )
    return self.dataset_info_from_configs(
      features=instances.instance_features(),
      metadata=tfds.core.MetadataDict(**metadata),
      homepage="https://arxiv.org/abs/1811.08883",
      disable_shuffling=True,  # record i = generated example i (side files index by record)
    )

  def _categories(self):
    return [{"id": 1, "name": CATEGORY}]

  def _generate_examples(self, split, num_images):
    cfg = self.builder_config
    size = cfg.image_size
    category = {**self._categories()[0], "keypoints": list(KEYPOINT_NAMES)}
    category["skeleton"] = [list(p) for p in SKELETON]
    images, annotations, image_ids, num_objects, num_labeled = [], [], [], [], []
    ann_id = 1
    for index in range(num_images):
      image, masks, keypoints = render_figures(
        shapes.example_rng(cfg.seed, split, index),
        size,
        cfg.min_objects,
        cfg.max_objects,
        cfg.max_distractors,
        cfg.unlabeled_prob,
      )
      image_id = index + 1
      file_name = f"{split}_{index:06d}.jpg"
      objects, counts = [], []
      for mask, kp in zip(masks, keypoints):
        record_object, annotation, mask_counts = shapes.instance_entries(
          ann_id, image_id, mask, 0, size
        )
        annotation["keypoints"] = [int(v) for v in kp.reshape(-1)]
        annotation["num_keypoints"] = int((kp[:, 2] > 0).sum())
        objects.append(record_object)
        annotations.append(annotation)
        counts.append(mask_counts)
        ann_id += 1
      images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
      image_ids.append(image_id)
      num_objects.append(len(objects))
      num_labeled.append(int((keypoints[..., 2] > 0).sum()))
      yield (
        index,
        {
          "image": shapes.jpeg_bytes(image),
          "image_id": image_id,
          "file_name": file_name,
          "height": size,
          "width": size,
          "objects": objects,
          "mask_counts": instances.concat_counts(counts),
          "keypoints": keypoints.reshape(-1),
        },
      )
    instances.write_split_files(
      self.data_path,
      split,
      images=images,
      annotations=annotations,
      categories=[category],
      image_ids=image_ids,
      num_objects=num_objects,
      num_keypoints=num_labeled,
    )
