"""Test-time augmentation (rethink_jax/tta.py) against Detectron2's GeneralizedRCNNWithTTA rules.

The merge rule and the view mappings are checked on random detections against a NumPy
transcription that calls torchvision's batched_nms (Detectron2's own call); the whole predictor
on a tiny randomly initialised model: one unflipped view is the plain inference, flip TTA is
flip-equivariant, and duplicated views average to the single view.
"""

import jax
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax import optim
from rethink_jax import train
from rethink_jax import trainer
from rethink_jax import tta
from tests import tiny

NMS_THRESH = 0.5


def _random_detections(rng, batch, num, num_classes, width, height):
  """Boxes in clusters (so NMS suppresses), some beyond the image, scores in (0, 1) with a few
  at 0, classes 0..K (0 = padding)."""
  centers = rng.uniform(0, [width, height], size=(batch, 4, 2))
  pick = centers[np.arange(batch)[:, None], rng.integers(0, 4, size=(batch, num))]
  half = rng.uniform(2, 12, size=(batch, num, 2))
  jitter = rng.normal(0, 2, size=(batch, num, 2))
  xy = pick + jitter
  boxes = np.concatenate([xy - half, xy + half], axis=-1).astype(np.float32)
  scores = rng.uniform(0, 1, size=(batch, num)).astype(np.float32)
  scores[rng.uniform(size=(batch, num)) < 0.1] = 0.0
  classes = rng.integers(0, num_classes + 1, size=(batch, num)).astype(np.int32)
  return boxes, scores, classes


def _reference_merge(boxes, scores, classes, orig_hw, detections_per_image):
  """Detectron2's _merge_detections (fast_rcnn_inference_single_image, score_thresh 1e-8) for
  one image: clip, keep scores > 1e-8, batched_nms, the best detections_per_image."""
  h, w = orig_hw
  boxes = np.stack(
    [
      np.clip(boxes[:, 0], 0, w),
      np.clip(boxes[:, 1], 0, h),
      np.clip(boxes[:, 2], 0, w),
      np.clip(boxes[:, 3], 0, h),
    ],
    axis=1,
  ).astype(np.float32)
  keep = (classes > 0) & (scores > 1e-8)
  boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
  kept = torchvision.ops.batched_nms(
    torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), NMS_THRESH
  ).numpy()[:detections_per_image]
  return boxes[kept], scores[kept], classes[kept]


def _check_merged(merged, reference, b):
  ref_boxes, ref_scores, ref_classes = reference
  n = int(merged["num_detections"][b])
  assert n == len(ref_scores)
  np.testing.assert_allclose(np.asarray(merged["boxes"])[b, :n], ref_boxes, atol=1e-4)
  np.testing.assert_allclose(np.asarray(merged["scores"])[b, :n], ref_scores, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(merged["classes"])[b, :n], ref_classes)
  assert not np.asarray(merged["classes"])[b, n:].any()


def test_merge_is_detectron2s_rule():
  rng = np.random.default_rng()
  d = 12
  boxes, scores, classes = _random_detections(rng, 3, 90, 3, 60, 40)
  orig_hw = np.asarray([[40, 60], [40, 60], [30, 50]], np.int32)
  merged = tta.merge_detections(
    boxes, scores, classes, orig_hw, nms_thresh=NMS_THRESH, detections_per_image=d
  )
  for b in range(3):
    reference = _reference_merge(boxes[b], scores[b], classes[b], orig_hw[b], d)
    assert 0 < len(reference[1]) <= d
    _check_merged(merged, reference, b)


def test_views_map_back_and_merge():
  """Two views (unflipped and flipped) at one scale: each view's detections mirrored back within
  the view's width and divided by the scale, then one merge of their union."""
  rng = np.random.default_rng()
  d, scale = 10, 1.5
  orig_hw = np.asarray([[40, 60], [44, 58]], np.int32)
  image_hw = np.round(orig_hw * scale).astype(np.int32)  # the view's resized [h, w]
  scales = np.full(2, scale, np.float32)
  views = [(False,) + _random_detections(rng, 2, 40, 3, 90, 60)]
  views.append((True,) + _random_detections(rng, 2, 40, 3, 90, 60))
  mapped = [
    np.asarray(tta.boxes_to_original(boxes, image_hw, scales, np.asarray(flip)))
    for flip, boxes, _, _ in views
  ]
  merged = tta.merge_detections(
    np.concatenate(mapped, axis=1),
    np.concatenate([v[2] for v in views], axis=1),
    np.concatenate([v[3] for v in views], axis=1),
    orig_hw,
    nms_thresh=NMS_THRESH,
    detections_per_image=d,
  )
  for b in range(2):
    w = image_hw[b, 1]
    union = []
    for flip, boxes, _, _ in views:
      x = boxes[b].astype(np.float64)
      if flip:
        x = np.stack([w - x[:, 2], x[:, 1], w - x[:, 0], x[:, 3]], axis=1)
      union.append(x / scale)
    reference = _reference_merge(
      np.concatenate(union).astype(np.float32),
      np.concatenate([v[2][b] for v in views]),
      np.concatenate([v[3][b] for v in views]),
      orig_hw[b],
      d,
    )
    _check_merged(merged, reference, b)
  # boxes_to_view is the inverse (the mask pass's mapping).
  for flip, boxes, _, _ in views:
    there = tta.boxes_to_view(
      tta.boxes_to_original(boxes, image_hw, scales, np.asarray(flip)),
      image_hw,
      scales,
      np.asarray(flip),
    )
    np.testing.assert_allclose(np.asarray(there), boxes, atol=1e-4)


def test_average_masks_mirrors_flipped_views_back():
  rng = np.random.default_rng()
  masks = [rng.uniform(size=(2, 5, 7, 7)).astype(np.float32) for _ in range(4)]
  flips = [False, True, False, True]
  got = np.asarray(tta.average_masks(masks, flips))
  want = np.mean([m[..., ::-1] if f else m for m, f in zip(masks, flips)], axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_flip_images_mirrors_inside_the_image_only():
  rng = np.random.default_rng()
  images = rng.normal(size=(2, 4, 8, 3)).astype(np.float32)
  image_hw = np.asarray([[4, 5], [3, 8]], np.int32)
  got = np.asarray(tta.flip_images(images, image_hw, np.asarray(True)))
  want = images.copy()
  for b, (_, w) in enumerate(image_hw):
    want[b, :, :w] = images[b, :, :w][:, ::-1]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(tta.flip_images(images, image_hw, False)), images)


def test_view_data_config_scales_the_recipe_shapes():
  from configs import common  # pylint: disable=g-import-not-at-top

  data = common.shapes_data("tiny", 64)
  view = tta.view_data_config(data, 96, 4000)
  assert (view.min_size_test, view.max_size, tuple(view.pad_to)) == (96, 4000, (96, 96))
  assert tuple(tta.view_data_config(data, 100, 4000).pad_to) == (128, 128)
  coco = data.copy_and_resolve_references()
  coco.update(min_size=800, min_size_test=800, max_size=1333, pad_to=(1344, 1344))
  coco.pad_buckets = ((800, 1344), (1344, 800))
  view = tta.view_data_config(coco, 1200, 4000)
  assert tuple(map(tuple, view.pad_buckets)) == ((1216, 2016), (2016, 1216))
  view = tta.view_data_config(coco, 1200, 1333)
  assert tuple(map(tuple, view.pad_buckets)) == ((1216, 1344), (1344, 1216))
  assert coco.min_size_test == 800  # the recipe's config is not changed


def test_views_of_a_batch_hold_the_same_images(shapes_dir):
  c = tiny.train_config(shapes_dir, 1)
  config = tta.default_tta_config()
  config.update(min_sizes=(48, 96), max_size=200)
  batches = list(tta.eval_batches(c.data, 3, 0, 1, tta_config=config))
  assert len(batches) == 3  # 8 validation images, 3 per batch
  for batch in batches:
    small, large = batch["views"]
    assert small["image"].shape[1:3] == (64, 64) and large["image"].shape[1:3] == (96, 96)
    np.testing.assert_allclose(small["scale"], 0.75)
    np.testing.assert_allclose(large["scale"], 1.5)
    for view in batch["views"]:
      np.testing.assert_array_equal(view["image_id"], batch["image_id"])
    np.testing.assert_array_equal(batch["scale"], 1.0)


# ------------------------------------------------------------------------------------------------
# The predictor on a tiny model.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(shapes_dir):
  """The tiny config's model, randomly initialised, and its first evaluation batches."""
  c = tiny.train_config(shapes_dir, 1)
  config = tta.default_tta_config()
  config.update(min_sizes=(64,), max_size=4000, flip=False)
  batches = list(tta.eval_batches(train.eval_data_config(c), 4, 0, 1, tta_config=config))
  sample = train.init_batch(batches[0]["views"][0])
  sched = optim.resolve_schedule(c.schedule, c.optim, int(c.batch_size))
  parts = train.build_parts(c, sched, trainer.make_mesh(), sample)
  seed = int(np.random.default_rng().integers(2**31))
  variables = trainer.variables_of(parts.init(jax.random.PRNGKey(seed), sample))
  return dict(config=c, parts=parts, variables=variables, batches=batches)


def _predictor(model, **tta_fields):
  c = model["config"].copy_and_resolve_references()
  c.eval.tta.update(enabled=True, max_size=4000, **tta_fields)
  return tta.make_predict_fn(model["parts"], c)


def _mirrored(batch):
  """A TTA batch whose images are mirrored (each within its own width)."""
  views = []
  for view in batch["views"]:
    image = view["image"].copy()
    for b, (_, w) in enumerate(view["image_hw"]):
      image[b, :, :w] = view["image"][b, :, :w][:, ::-1]
    views.append(dict(view, image=image))
  return dict(batch, views=views)


@pytest.mark.slow
def test_one_unflipped_view_is_the_plain_inference(model):
  predict = _predictor(model, min_sizes=(64,), flip=False)
  for batch in model["batches"]:
    view = batch["views"][0]
    got = predict(model["variables"], batch)
    want = model["parts"].predict_fn(model["variables"], view)
    np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
    assert got["num_detections"].min() > 0
    np.testing.assert_array_equal(got["classes"], want["classes"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
    np.testing.assert_allclose(
      got["boxes"], want["boxes"] / view["scale"][:, None, None], atol=1e-4
    )
    np.testing.assert_allclose(got["masks"], want["masks"], atol=1e-5)


@pytest.mark.slow
def test_flip_tta_is_flip_equivariant(model):
  """With views {image, mirrored image}, TTA of the mirrored image is the mirrored TTA."""
  predict = _predictor(model, min_sizes=(64,), flip=True)
  batch = model["batches"][0]
  got = predict(model["variables"], batch)
  mirrored = predict(model["variables"], _mirrored(batch))
  np.testing.assert_array_equal(mirrored["num_detections"], got["num_detections"])
  np.testing.assert_array_equal(mirrored["classes"], got["classes"])
  np.testing.assert_allclose(mirrored["scores"], got["scores"], rtol=1e-6)
  w = batch["orig_hw"][:, 1].astype(np.float32)[:, None]
  valid = np.arange(got["boxes"].shape[1])[None, :] < got["num_detections"][:, None]
  x1, y1, x2, y2 = np.moveaxis(got["boxes"], -1, 0)
  want = np.stack([w - x2, y1, w - x1, y2], axis=-1) * valid[..., None]
  np.testing.assert_allclose(mirrored["boxes"], want, atol=1e-4)
  np.testing.assert_allclose(mirrored["masks"], got["masks"][..., ::-1], atol=1e-5)
  # Both views count: the merged set differs from the unflipped view's alone.
  single = _predictor(model, min_sizes=(64,), flip=False)(model["variables"], batch)
  assert not np.array_equal(single["boxes"], got["boxes"])


@pytest.mark.slow
def test_duplicated_views_average_to_the_single_view(model):
  batch = model["batches"][0]
  single = _predictor(model, min_sizes=(64,), flip=False)(model["variables"], batch)
  twice = dict(batch, views=batch["views"] * 2)
  double = _predictor(model, min_sizes=(64, 64), flip=False)(model["variables"], twice)
  for key in ("num_detections", "classes"):
    np.testing.assert_array_equal(double[key], single[key])
  for key in ("boxes", "scores", "masks"):
    np.testing.assert_allclose(double[key], single[key], atol=1e-6)


@pytest.mark.slow
def test_evaluator_with_one_view_scores_as_without_tta(model):
  """The trainer's evaluation hook: eval.tta with one unflipped view gives the plain metrics."""
  c = model["config"].copy_and_resolve_references()
  plain = train.make_evaluator(c, model["parts"])(model["variables"])
  c.eval.tta.update(enabled=True, min_sizes=(64,), max_size=4000, flip=False)
  with_tta = train.make_evaluator(c, model["parts"])(model["variables"])
  assert set(with_tta) == set(plain)
  for key, value in plain.items():
    assert with_tta[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
