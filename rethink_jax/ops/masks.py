"""Instance masks: the fixed per-instance representation and the mask head's training targets.

Pasting predicted masks into images is evaluation's (rethink_jax.evaluate.paste_masks, NumPy).

Representation (what the data pipeline feeds, `gt_masks (G, S, S)` uint8, S = 112 by default):
each instance's full-resolution binary mask cropped to ITS OWN ground-truth box and resampled to
S x S. Crop pixel (i, j) is the bilinear value of the full-resolution mask at input-space point
(x1 + (j + 0.5) * (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S), thresholded at >= 0.5; that is
torchvision's roi_align(aligned=True, sampling_ratio=1) of the mask at the box, >= 0.5.
`crop_masks_to_boxes` is the reference implementation (100 instances x 112 x 112 bytes = 1.25 MB
per image, instead of 100 x 800 x 1333 for full bitmaps).

mask_targets reads that representation back as a function on the input plane: the bilinear
interpolation of the crop at crop coordinates, clamped to the crop's edge pixels inside the gt box
and 0 outside it. How far it can differ from Detectron2's targets (RoIAlign(aligned=True,
sampling_ratio=0) of the full-resolution mask at the ROI, >= 0.5): the represented boundary lies
within delta = max(gt_w, gt_h) / S + 1 input pixels of the true one (one crop pixel of
quantisation plus the one-pixel reach of bilinear interpolation), so a target pixel can differ only
if its bin lies within delta of the mask boundary, i.e. within ceil(delta / bin) + 1 target pixels
of the boundary of Detectron2's target (bin = roi side / 28). Elsewhere the targets are equal.
tests/ops/test_masks.py checks exactly this band on random blob masks.
"""

import math

import jax
import jax.numpy as jnp

from rethink_jax.ops.roi_align import _pool_flat


def crop_masks_to_boxes(full_masks: jax.Array, boxes: jax.Array, size: int = 112) -> jax.Array:
  """Reference for the gt_masks representation (see module doc).

  Args:
    full_masks: (G, H, W) binary (any dtype) full-resolution masks in input pixels.
    boxes: (G, 4) xyxy boxes, usually the instances' own gt boxes.
    size: static S.

  Returns:
    (G, S, S) uint8 in {0, 1}.
  """
  full_masks = jnp.asarray(full_masks)
  boxes = jnp.asarray(boxes, jnp.float32)
  if full_masks.ndim != 3 or boxes.shape != (full_masks.shape[0], 4):
    raise ValueError(
      f"crop_masks_to_boxes needs full_masks (G, H, W) and boxes (G, 4), got "
      f"{full_masks.shape} and {boxes.shape}"
    )
  g, h, w = full_masks.shape
  flat = full_masks.reshape(g, h * w, 1).astype(jnp.float32)
  ones = jnp.ones((1,), jnp.float32)

  def one(f, box):
    i32 = lambda v: jnp.full((1,), v, jnp.int32)
    out = _pool_flat(f, box[None], i32(h), i32(w), i32(0), ones, (size, size), 1, True, 1)
    return out[0, :, :, 0]

  return (jax.vmap(one)(flat, boxes) >= 0.5).astype(jnp.uint8)


def _sample_weights(start, length, num_bins, grid, max_grid, box_lo, box_len, crop_size):
  """Interpolation matrices from crop rows (or columns) to target bins, one axis.

  The target bin p of a ROI [start, start + length) averages `grid` samples at
  start + (p + (i + 0.5) / grid) * length / num_bins (input pixels); each sample reads the crop
  bilinearly at crop coordinate (point - box_lo) * crop_size / box_len - 0.5, clamped to the edge
  pixels, and reads 0 outside [box_lo, box_lo + box_len].

  Args: (R,) arrays start, length, grid (int), box_lo, box_len.
  Returns: (R, num_bins, crop_size) float32.
  """
  g = jnp.clip(grid, 1, max_grid).astype(jnp.float32)[:, None, None]
  p = jnp.arange(num_bins, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
  point = start[:, None, None] + (p + (i + 0.5) / g) * (length / num_bins)[:, None, None]
  rel = (point - box_lo[:, None, None]) / box_len[:, None, None]
  inside = (rel >= 0.0) & (rel <= 1.0) & (i < g)
  u = jnp.clip(rel * crop_size - 0.5, 0.0, crop_size - 1.0)
  low = jnp.floor(u)
  frac = u - low
  high = jnp.minimum(low + 1.0, crop_size - 1.0)
  scale = jnp.where(inside, 1.0 / g, 0.0)
  cols = jnp.arange(crop_size, dtype=jnp.float32)
  onehot = lambda idx: (idx[..., None] == cols).astype(jnp.float32)
  mat = onehot(low) * ((1.0 - frac) * scale)[..., None] + onehot(high) * (frac * scale)[..., None]
  return jnp.sum(mat, axis=2)


def mask_targets(
  gt_masks: jax.Array,
  gt_boxes: jax.Array,
  rois: jax.Array,
  matched_gt: jax.Array,
  size: int = 28,
  max_sampling_ratio: int = 8,
) -> jax.Array:
  """Mask-head targets: each ROI's matched instance mask cropped to the ROI at size x size.

  Detectron2's rule (RoIAlign(aligned=True, sampling_ratio=0) of the binary mask at the ROI,
  >= 0.5) applied to the per-instance representation; see the module doc for the bound on the
  difference. The adaptive grid ceil(roi_side / size) is capped at max_sampling_ratio (static)
  samples per bin and axis; with the crop's resolution, more samples change nothing visible.

  Args:
    gt_masks: (G, S, S) crops in {0, 1} (uint8 / bool / float).
    gt_boxes: (G, 4) xyxy gt boxes the crops belong to.
    rois: (R, 4) xyxy ROIs in input pixels.
    matched_gt: (R,) int index into G of each ROI's instance.
    size: static output side (28).
    max_sampling_ratio: static cap of the adaptive grid.

  Returns:
    (R, size, size) float32 in {0, 1}.
  """
  gt_masks = jnp.asarray(gt_masks)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  rois = jnp.asarray(rois, jnp.float32)
  matched_gt = jnp.asarray(matched_gt)
  if (
    gt_masks.ndim != 3
    or gt_masks.shape[1] != gt_masks.shape[2]
    or gt_boxes.shape != (gt_masks.shape[0], 4)
    or rois.ndim != 2
    or rois.shape[1] != 4
    or matched_gt.shape != rois.shape[:1]
  ):
    raise ValueError(
      f"mask_targets needs gt_masks (G, S, S), gt_boxes (G, 4), rois (R, 4), matched_gt (R,); "
      f"got {gt_masks.shape}, {gt_boxes.shape}, {rois.shape}, {matched_gt.shape}"
    )
  s = gt_masks.shape[1]
  crops = gt_masks.astype(jnp.float32)[matched_gt]  # (R, S, S)
  gt = jax.lax.stop_gradient(gt_boxes[matched_gt])
  rois = jax.lax.stop_gradient(rois)
  roi_w = rois[:, 2] - rois[:, 0]
  roi_h = rois[:, 3] - rois[:, 1]
  grid_w = jnp.ceil(roi_w / size).astype(jnp.int32)
  grid_h = jnp.ceil(roi_h / size).astype(jnp.int32)
  wy = _sample_weights(
    rois[:, 1], roi_h, size, grid_h, max_sampling_ratio, gt[:, 1], gt[:, 3] - gt[:, 1], s
  )
  wx = _sample_weights(
    rois[:, 0], roi_w, size, grid_w, max_sampling_ratio, gt[:, 0], gt[:, 2] - gt[:, 0], s
  )
  hi = jax.lax.Precision.HIGHEST
  vals = jnp.einsum("rps,rst,rqt->rpq", wy, crops, wx, precision=hi)
  # Adaptive grids of size <= 0 (empty ROIs) average nothing: target 0, as in torchvision.
  empty = (grid_h < 1) | (grid_w < 1)
  return jnp.where(empty[:, None, None], 0.0, (vals >= 0.5).astype(jnp.float32))


def full_image_mask_targets(
  gt_masks: jax.Array, rois: jax.Array, matched_gt: jax.Array, size: int = 28
) -> jax.Array:
  """Detectron2's mask-head targets from full-image bitmaps (BitMasks.crop_and_resize).

  RoIAlign(aligned=True, sampling_ratio=0) of each ROI's matched mask at the ROI, >= 0.5. The
  adaptive grid's static cap is ceil(max(H, W) / size), which no ROI inside the image exceeds,
  so the targets are exact.

  Args:
    gt_masks: (G, H, W) full-image masks in {0, 1} (any dtype), zero beyond the image.
    rois: (R, 4) xyxy ROIs in input pixels.
    matched_gt: (R,) int index into G of each ROI's instance.
    size: static output side (28).

  Returns:
    (R, size, size) float32 in {0, 1}.
  """
  gt_masks = jnp.asarray(gt_masks)
  rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
  if (
    gt_masks.ndim != 3 or rois.ndim != 2 or rois.shape[1] != 4 or matched_gt.shape != rois.shape[:1]
  ):
    raise ValueError(
      f"full_image_mask_targets needs gt_masks (G, H, W), rois (R, 4), matched_gt (R,); got "
      f"{gt_masks.shape}, {rois.shape}, {matched_gt.shape}"
    )
  g, h, w = gt_masks.shape
  r = rois.shape[0]
  flat = gt_masks.reshape(g * h * w, 1).astype(jnp.float32)
  full = lambda v: jnp.full((r,), v, jnp.int32)
  offsets = jnp.asarray(matched_gt, jnp.int32) * (h * w)
  cap = max(1, math.ceil(max(h, w) / size))
  out = _pool_flat(
    flat, rois, full(h), full(w), offsets, jnp.ones((r,), jnp.float32), (size, size), 0, True, cap
  )
  return (out[..., 0] >= 0.5).astype(jnp.float32)
