"""Test-time augmentation: Detectron2's GeneralizedRCNNWithTTA on the evaluation images.

Every image is seen in several views: each shorter side of eval.tta.min_sizes (longer side at most
eval.tta.max_size), unflipped and, with eval.tta.flip, mirrored (DatasetMapperTTA's order). Then:
  1. the detector runs on every view; its boxes go back to original-image pixels (mirrored back
     within the view's width, divided by the view's scale);
  2. the union of every view's detections is merged as Detectron2's _merge_detections does: boxes
     clipped to the image, scores > 1e-8, ONE per-class NMS at roi_heads.nms_thresh_test, the
     detections_per_image best by score (merge_detections);
  3. the mask head runs on the merged boxes (mapped into every view, with the merged classes) and
     the mask probabilities of all views, mirrored ones mirrored back, are averaged.
Keypoints are not augmented (Detectron2's TTA does not support them either).

A view of size s is the pipeline's evaluation batch at min_size_test = s: the recipe's padded
shapes (data.pad_to / pad_buckets) scaled by s / min_size_test and rounded up to 32, so an image
fits as it does at the recipe's own size (the pipeline scales down one that would not). Shapes
are static: one compiled detect and one mask program per view size (the flip is an argument),
one merge program.

config.eval.tta (default_tta_config): enabled, min_sizes, max_size, flip. Used by the trainer's
evaluation (train.make_evaluator: periodic evaluation and evaluate_only) when enabled, and by
rethink_jax.predict.Predictor(tta=...); both run make_programs' pieces through predict_views, and
differ only in how they build the views (the pipeline's batches here, the Predictor's resize rule
and canvases there).
"""

from collections.abc import Iterator, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rethink_jax import trainer
from rethink_jax.ops import boxes as box_ops
from rethink_jax.ops import nms as nms_ops

MERGE_SCORE_THRESH = 1e-8  # Detectron2's _merge_detections keeps every scored box
VIEW_KEYS = ("image", "image_hw", "scale")  # what the model sees of a view's batch


def default_tta_config() -> ml_collections.ConfigDict:
  """config.eval.tta with Detectron2's TEST.AUG defaults (off unless enabled)."""
  return ml_collections.ConfigDict(
    dict(
      enabled=False,
      min_sizes=(400, 500, 600, 700, 800, 900, 1000, 1100, 1200),
      max_size=4000,
      flip=True,
    )
  )


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the recipe's evaluation uses TTA (config.eval.tta.enabled)."""
  tta = config.eval.get("tta")
  return bool(tta is not None and tta.get("enabled", False))


def views(tta_config: ml_collections.ConfigDict) -> list[tuple[int, bool]]:
  """(index into min_sizes, flipped) of every view, in DatasetMapperTTA's order."""
  flips = (False, True) if tta_config.get("flip", True) else (False,)
  return [(i, f) for i in range(len(tta_config.min_sizes)) for f in flips]


# ------------------------------------------------------------------------------------------------
# Views' data.
# ------------------------------------------------------------------------------------------------
def view_data_config(
  data_config: ml_collections.ConfigDict, size: int, max_size: int
) -> ml_collections.ConfigDict:
  """config.data whose evaluation batches are the views of shorter side `size` (module doc)."""
  from rethink_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  test_size = int(data_config.get("min_size_test", 0) or 0)
  if not test_size:
    min_size = data_config.min_size
    test_size = max(min_size) if isinstance(min_size, (tuple, list)) else int(min_size)
  ratio = int(size) / test_size
  cap = -(-int(max_size) // 32) * 32
  scaled = lambda hw: tuple(min(cap, -(-int(np.ceil(v * ratio - 1e-6)) // 32) * 32) for v in hw)
  out = ml_collections.ConfigDict(data_config.to_dict(), type_safe=False)
  out.min_size_test = int(size)
  out.max_size = int(max_size)
  out.pad_to = scaled(preprocess.padded_size(data_config))
  out.pad_buckets = tuple(scaled(hw) for hw in data_config.get("pad_buckets") or ())
  return out


def eval_batches(
  data_config: ml_collections.ConfigDict,
  batch_size_per_process: int,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  tta_config: ml_collections.ConfigDict,
) -> Iterator[dict]:
  """This process's evaluation batches with their views (pipeline.make_eval_iterator per size).

  Yields {"image_id", "valid", "orig_hw", "scale" (ones: TTA detections are in original pixels),
  "views": [one batch dict per min_sizes entry]}; the views of a batch hold the same images.
  """
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  iterators = [
    pipeline.make_eval_iterator(
      view_data_config(data_config, size, tta_config.max_size),
      batch_size_per_process,
      process_index=process_index,
      process_count=process_count,
    )
    for size in tta_config.min_sizes
  ]
  for batches in zip(*iterators, strict=True):
    first = batches[0]
    for b in batches[1:]:
      if not np.array_equal(b["image_id"], first["image_id"]):
        raise ValueError("TTA views of one batch hold different images")
    yield {
      "image_id": first["image_id"],
      "valid": first["valid"],
      "orig_hw": first["orig_hw"],
      "scale": np.ones_like(first["scale"]),
      "views": list(batches),
    }


# ------------------------------------------------------------------------------------------------
# Flips and coordinates (traced; `flip` is a bool scalar, so one program serves both).
# ------------------------------------------------------------------------------------------------
def flip_images(images: jax.Array, image_hw: jax.Array, flip: jax.Array) -> jax.Array:
  """(B, H, W, C) images mirrored within their [h, w] (the padding stays bottom / right)."""
  x = jnp.arange(images.shape[2])
  w = image_hw[:, 1:2]
  src = jnp.where(flip & (x[None, :] < w), w - 1 - x[None, :], x[None, :])  # (B, W)
  return jax.vmap(lambda im, s: im[:, s])(images, src)


def flip_boxes(boxes: jax.Array, widths: jax.Array, flip: jax.Array) -> jax.Array:
  """(B, N, 4) xyxy boxes mirrored in images of widths (B,): x -> w - x (its own inverse)."""
  w = widths.astype(jnp.float32)[:, None]
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  mirrored = jnp.stack([w - x2, y1, w - x1, y2], axis=-1)
  return jnp.where(flip, mirrored, boxes)


def _xyxy_scale(scale: jax.Array) -> jax.Array:
  """(B,) scales, or (B, 2) [y, x] scales of an image resized per axis -> (B, 1, 1 or 4)."""
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim == 1:
    return scale[:, None, None]
  return jnp.tile(scale[:, ::-1], (1, 2))[:, None, :]


def boxes_to_original(
  boxes: jax.Array, image_hw: jax.Array, scale: jax.Array, flip: jax.Array
) -> jax.Array:
  """(B, N, 4) boxes in a view's input pixels -> original-image pixels (the view's image_hw
  (B, 2), scale (B,) or per axis (B, 2) [y, x] as view / original, and flip)."""
  return flip_boxes(boxes, image_hw[:, 1], flip) / _xyxy_scale(scale)


def boxes_to_view(
  boxes: jax.Array, image_hw: jax.Array, scale: jax.Array, flip: jax.Array
) -> jax.Array:
  """boxes_to_original's inverse: (B, N, 4) original pixels -> the view's input pixels."""
  return flip_boxes(boxes * _xyxy_scale(scale), image_hw[:, 1], flip)


def merge_detections(
  boxes: jax.Array,
  scores: jax.Array,
  classes: jax.Array,
  orig_hw: jax.Array,
  *,
  nms_thresh: float,
  detections_per_image: int,
) -> dict[str, jax.Array]:
  """Detectron2's _merge_detections on the union of the views' detections, per image.

  Args:
    boxes: (B, N, 4) xyxy in original pixels; scores (B, N); classes (B, N) int, 0 = none.
    orig_hw: (B, 2) original [h, w].
    nms_thresh: per-class NMS IoU threshold; detections_per_image: D (static).
  Returns:
    {"boxes" (B, D, 4), "scores" (B, D), "classes" (B, D) (0 = padding), "num_detections" (B,)},
    highest score first, padding rows zero.
  """

  def one(b, s, c, hw):
    b = box_ops.clip_boxes(b, hw)
    s = jnp.where((c > 0) & (s > MERGE_SCORE_THRESH), s.astype(jnp.float32), -jnp.inf)
    idx, num = nms_ops.batched_nms(b, s, c, nms_thresh, detections_per_image)
    ok = jnp.arange(detections_per_image) < num
    safe = jnp.where(ok, idx, 0)
    return (
      jnp.where(ok[:, None], b[safe], 0.0),
      jnp.where(ok, s[safe], 0.0),
      jnp.where(ok, c[safe], 0).astype(jnp.int32),
      num.astype(jnp.int32),
    )

  out = jax.vmap(one)(boxes, scores, classes, orig_hw)
  return dict(zip(("boxes", "scores", "classes", "num_detections"), out))


def average_masks(masks: Sequence[jax.Array], flips: Sequence[bool]) -> jax.Array:
  """The mean of every view's (B, D, M, M) mask probabilities, mirrored views mirrored back."""
  back = [m[..., ::-1] if f else m for m, f in zip(masks, flips)]
  return sum(m.astype(jnp.float32) for m in back) / len(back)


# ------------------------------------------------------------------------------------------------
# The model's passes.
# ------------------------------------------------------------------------------------------------
def _mask_probs(module, batch, boxes, classes, valid):
  """MaskRCNN method: the mask head on given boxes (B, D, 4) (input pixels) of classes (B, D)."""
  features = module.backbone(batch["image"], False, batch["image_hw"])
  logits = module.roi_heads._mask_logits(features, boxes, classes, valid, False)  # pylint: disable=protected-access
  return jnp.where(valid[..., None, None], jax.nn.sigmoid(logits), 0.0)


def _detect(model, variables, view, flip):
  """One view's detections in original pixels: boxes (B, D, 4), scores (B, D), classes (B, D)."""
  image = flip_images(view["image"], view["image_hw"], flip)
  out = model.apply(variables, {"image": image, "image_hw": view["image_hw"]}, train=False)
  boxes = boxes_to_original(out["boxes"], view["image_hw"], view["scale"], flip)
  boxes = jnp.where(out["classes"][..., None] > 0, boxes, 0.0)
  return boxes, out["scores"], out["classes"]


def _view_masks(model, variables, view, merged, flip):
  """Mask probabilities (B, D, M, M) of the merged detections seen in one view, still mirrored
  when the view is (average_masks mirrors them back)."""
  d = merged["classes"].shape[1]
  valid = jnp.arange(d)[None, :] < merged["num_detections"][:, None]
  boxes = boxes_to_view(merged["boxes"], view["image_hw"], view["scale"], flip)
  image = flip_images(view["image"], view["image_hw"], flip)
  batch = {"image": image, "image_hw": view["image_hw"]}
  probs = model.apply(variables, batch, boxes, merged["classes"], valid, method=_mask_probs)
  return probs.astype(jnp.float32)


def check_supported(model_config: ml_collections.ConfigDict) -> None:
  """Raises NotImplementedError for keypoint models (Detectron2's TTA refuses them too)."""
  if model_config.get("keypoint_on", False):
    raise NotImplementedError("test-time augmentation does not support keypoint models")


def make_programs(
  model: Any,
  model_config: ml_collections.ConfigDict,
  flips: Sequence[bool],
  shardings: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
  """The jitted pieces of a TTA prediction (predict_views runs them), static in shape:

    detect(variables, view, flip): one view's detections in original pixels (B, D, ...);
    merge(boxes, scores, classes, orig_hw): lists over views -> merge_detections' dict;
    view_masks(variables, view, merged, flip): (B, D, M, M) probabilities in one view;
    average(masks): average_masks of the list over views (mirrored as `flips` says).

  The mask pieces are left out for models without a mask head. model_config: the model's
  (roi_heads.nms_thresh_test, detections_per_image, mask_on); flips: every view's flip in
  predict_views' order; shardings: (replicated, batch) of a mesh, or None (default placement).
  """
  check_supported(model_config)
  heads = model_config.roi_heads

  def jit(fn, kinds):
    if shardings is None:
      return jax.jit(fn)
    pick = {"r": shardings[0], "s": shardings[1]}
    return jax.jit(fn, in_shardings=tuple(pick[k] for k in kinds), out_shardings=shardings[1])

  merge = lambda boxes, scores, classes, orig_hw: merge_detections(
    jnp.concatenate(boxes, axis=1),
    jnp.concatenate(scores, axis=1),
    jnp.concatenate(classes, axis=1),
    orig_hw,
    nms_thresh=float(heads.nms_thresh_test),
    detections_per_image=int(heads.detections_per_image),
  )
  programs = {
    "detect": jit(functools.partial(_detect, model), "rsr"),
    "merge": jit(merge, "ssss"),
  }
  if model_config.get("mask_on", True):
    flips = [bool(f) for f in flips]
    programs["view_masks"] = jit(functools.partial(_view_masks, model), "rssr")
    programs["average"] = jit(lambda masks: average_masks(masks, flips), "s")
  return programs


def predict_views(
  programs: dict[str, Any],
  variables: dict,
  views: Sequence[dict],
  view_list: Sequence[tuple[int, bool]],
  orig_hw: jax.Array,
) -> dict[str, jax.Array]:
  """TTA of one batch of images (module doc, steps 1-3).

  Args:
    programs: make_programs' (built with view_list's flips).
    views: one dict per min size: "image" (B, H, W, C), "image_hw" (B, 2), "scale" (B,) or
      (B, 2) (view / original), the same images in each.
    view_list: (index into views, flipped) of every view (views()).
    orig_hw: (B, 2) the images' original [h, w].
  Returns:
    merge_detections' dict in original pixels, with "masks" (B, D, M, M) averaged
    probabilities when the model has a mask head.
  """
  flags = [(views[i], np.asarray(f)) for i, f in view_list]
  found = [programs["detect"](variables, view, flip) for view, flip in flags]
  merged = programs["merge"](*(list(x) for x in zip(*found)), orig_hw)
  if "view_masks" not in programs:
    return merged
  masks = [programs["view_masks"](variables, view, merged, flip) for view, flip in flags]
  return {**merged, "masks": programs["average"](masks)}


def make_predict_fn(parts: Any, config: ml_collections.ConfigDict):
  """predict(variables, tta batch) -> this process's detections of eval_batches' batch, as
  numpy: boxes (B, D, 4) in ORIGINAL pixels (the batch's scale is 1), scores, classes,
  num_detections, masks (B, D, M, M) averaged probabilities.

  parts: train.build_parts' (model, replicated and batch shardings); config: the recipe.
  """
  view_list = views(config.eval.tta)
  shard = parts.batch_sharding
  programs = make_programs(
    parts.model, config.model, [f for _, f in view_list], (parts.replicated, shard)
  )

  def predict(variables: dict, batch: dict) -> dict[str, np.ndarray]:
    inputs = [trainer.to_global({k: v[k] for k in VIEW_KEYS}, shard) for v in batch["views"]]
    orig_hw = trainer.to_global({"orig_hw": batch["orig_hw"]}, shard)["orig_hw"]
    out = predict_views(programs, variables, inputs, view_list, orig_hw)
    return {k: trainer.local_rows(v) for k, v in out.items()}

  return predict
