import jax
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax.ops.masks import crop_masks_to_boxes
from rethink_jax.ops.masks import full_image_mask_targets
from rethink_jax.ops.masks import mask_targets


def _blob_masks(rng, g, h, w):
  """(G, H, W) uint8 random blobs (unions of 1-3 ellipses), with their tight boxes (G, 4)."""
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  masks = np.zeros((g, h, w), np.uint8)
  for k in range(g):
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    for _ in range(rng.integers(1, 4)):
      ry, rx = rng.uniform(6, h / 3), rng.uniform(6, w / 3)
      oy, ox = cy + rng.normal(0, ry / 2), cx + rng.normal(0, rx / 2)
      masks[k] |= (((yy - oy) / ry) ** 2 + ((xx - ox) / rx) ** 2 <= 1).astype(np.uint8)
  boxes = np.zeros((g, 4), np.float32)
  for k in range(g):
    ys, xs = np.nonzero(masks[k])
    boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  return masks, boxes


def _tv_align(masks, boxes, size, sr):
  rois = torch.cat([torch.arange(len(boxes)).float()[:, None], torch.from_numpy(boxes)], 1)
  return torchvision.ops.roi_align(
    torch.from_numpy(masks).float()[:, None], rois, size, 1.0, sr, True
  )[:, 0].numpy()


def test_crop_masks_to_boxes_is_roi_align_of_full_mask(rng):
  masks, boxes = _blob_masks(rng, 6, 90, 110)
  boxes[0] += [-3.5, 2.0, 5.0, 1.0]  # boxes other than the tight one are fine too
  ours = np.asarray(jax.jit(lambda m, b: crop_masks_to_boxes(m, b, 32))(masks, boxes))
  ref = _tv_align(masks, boxes, 32, 1) >= 0.5
  assert ours.dtype == np.uint8
  np.testing.assert_array_equal(ours, ref)


def test_full_image_mask_targets_are_detectron2s(rng):
  # Detectron2's BitMasks.crop_and_resize: RoIAlign(aligned, sampling_ratio 0) of the mask, >= 0.5.
  masks, _ = _blob_masks(rng, 3, 90, 110)
  r = 24
  x1, y1 = rng.uniform(-5, 80, r), rng.uniform(-5, 60, r)
  rois = np.stack([x1, y1, x1 + rng.uniform(1, 90, r), y1 + rng.uniform(1, 70, r)], 1)
  rois = rois.astype(np.float32)
  matched = rng.integers(0, 3, r)
  ours = np.asarray(jax.jit(full_image_mask_targets)(masks, rois, matched))
  ref = _tv_align(masks[matched], rois, 28, 0) >= 0.5
  np.testing.assert_array_equal(ours, ref)


def _dilate(mask, k):
  out = mask.copy()
  for _ in range(k):
    p = np.pad(out, 1)
    out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    out |= p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
  return out


def test_mask_targets_within_documented_bound_of_full_resolution(rng):
  g, r, s, h, w = 5, 40, 32, 140, 150
  masks, gt_boxes = _blob_masks(rng, g, h, w)
  gt_masks = np.asarray(jax.jit(lambda m, b: crop_masks_to_boxes(m, b, s))(masks, gt_boxes))
  matched = rng.integers(0, g, r).astype(np.int32)
  gb = gt_boxes[matched]
  gwh = gb[:, 2:] - gb[:, :2]
  # ROIs: jittered gt boxes (as positives are), from well inside to larger than the box.
  ctr = (gb[:, :2] + gb[:, 2:]) / 2 + rng.uniform(-0.2, 0.2, (r, 2)) * gwh
  half = gwh / 2 * rng.uniform(0.4, 1.4, (r, 2))
  rois = np.concatenate([ctr - half, ctr + half], 1).astype(np.float32)
  fn = jax.jit(
    jax.vmap(lambda m, b, ro, mg: mask_targets(m, b, ro, mg, 28), in_axes=(None, None, 0, 0))
  )
  ours = np.asarray(fn(gt_masks, gt_boxes, rois.reshape(2, r // 2, 4), matched.reshape(2, r // 2)))
  ours = ours.reshape(r, 28, 28)
  ref_vals = np.stack(
    [_tv_align(masks[matched[i]][None], rois[i][None], 28, 0)[0] for i in range(r)]
  )
  ref = ref_vals >= 0.5
  assert set(np.unique(ours)) <= {0.0, 1.0}
  diff = (ours > 0.5) != ref
  for i in range(r):
    delta = gwh[i].max() / s + 1.0
    bins = (rois[i, 2:] - rois[i, :2]) / 28
    band = int(np.ceil(delta / bins.min())) + 1
    # The reference on a grid extended by `band` bins each side (same bins and samples), so that
    # mask boundaries just outside the ROI count too.
    k = band + 1
    big_roi = np.concatenate([rois[i, :2] - k * bins, rois[i, 2:] + k * bins]).astype(np.float32)
    big = _tv_align(masks[matched[i]][None], big_roi[None], 28 + 2 * k, 0)[0] >= 0.5
    boundary = (_dilate(big, 1) & _dilate(~big, 1))[k:-k, k:-k]
    allowed = _dilate(boundary, band - 1)
    assert not (diff[i] & ~allowed).any(), f"roi {i}: differences outside the band {band}"
  assert diff.mean() < 0.05, diff.mean()
  # Targets of an ROI equal to its own gt box reproduce the crop at 28 x 28 closely.
  same = np.asarray(jax.jit(mask_targets)(gt_masks, gt_boxes, gt_boxes, np.arange(g)))
  direct = _tv_align(masks, gt_boxes, 28, 0) >= 0.5
  assert ((same > 0.5) != direct).mean() < 0.03


def test_mask_shape_errors():
  with pytest.raises(ValueError, match=r"\(2, 5, 6\)"):
    mask_targets(np.zeros((2, 5, 6)), np.zeros((2, 4)), np.zeros((3, 4)), np.zeros(3, np.int32))
