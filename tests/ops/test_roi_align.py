import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax.ops.roi_align import assign_levels
from rethink_jax.ops.roi_align import multilevel_roi_align
from rethink_jax.ops.roi_align import roi_align

OUT = (5, 4)


def _tv_roi_align(features, boxes, output_size, scale, sr, aligned):
  """torchvision on NHWC features / (B, R, 4) boxes -> (B, R, oh, ow, C) numpy."""
  b, r = boxes.shape[:2]
  rois = torch.cat([torch.full((b * r, 1), 0.0), torch.from_numpy(boxes.reshape(-1, 4))], 1)
  rois[:, 0] = torch.arange(b).repeat_interleave(r).float()
  f = torch.from_numpy(features).permute(0, 3, 1, 2)
  out = torchvision.ops.roi_align(f, rois, output_size, scale, sr, aligned)
  return out.permute(0, 2, 3, 1).reshape(b, r, *output_size, -1).numpy()


def _random_case(rng, b=2, h=12, w=15, c=3, r=24, scale=0.25):
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  lo = -0.3 / scale * max(h, w)  # some boxes partly or wholly outside the map
  xy = rng.uniform(lo, 1.2 * max(h, w) / scale, (b, r, 2))
  wh = rng.uniform(0, 0.7 * max(h, w) / scale, (b, r, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  boxes[:, :2, 2:] = boxes[:, :2, :2]  # zero-size boxes
  boxes[:, 2] = [-30.0, -30.0, -10.0, -5.0]  # wholly outside
  return feats, boxes


_JIT = {}


def _jitted(sr, aligned, cap=4, out=OUT):
  key = (sr, aligned, cap, out)
  if key not in _JIT:
    _JIT[key] = jax.jit(
      lambda f, b: roi_align(f, b, out, 0.25, sr, aligned, max_sampling_ratio=cap)
    )
  return _JIT[key]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [1, 2, 4])
def test_roi_align_matches_torchvision(rng, sr, aligned):
  feats, boxes = _random_case(rng)
  ours = _jitted(sr, aligned)(feats, boxes)
  np.testing.assert_allclose(ours, _tv_roi_align(feats, boxes, OUT, 0.25, sr, aligned), atol=1e-4)


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_sampling_exact_under_cap_and_documented_beyond(rng, aligned):
  feats, boxes = _random_case(rng, r=40)
  ours = np.asarray(_jitted(0, aligned, cap=2)(feats, boxes))
  ref = _tv_roi_align(feats, boxes, OUT, 0.25, 0, aligned)
  ref_cap = _tv_roi_align(feats, boxes, OUT, 0.25, 2, aligned)
  size = (boxes[..., 2:] - boxes[..., :2]) * 0.25
  if not aligned:
    size = np.maximum(size, 1.0)
  grid = np.ceil(size / np.array([OUT[1], OUT[0]], np.float32))
  under = (grid <= 2).all(-1)
  beyond = (grid >= 2).all(-1)
  assert under.sum() > 5 and beyond.sum() > 5
  np.testing.assert_allclose(ours[under], ref[under], atol=1e-4)
  # Beyond the cap (both axes), a ROI is pooled as with sampling_ratio = cap.
  np.testing.assert_allclose(ours[beyond], ref_cap[beyond], atol=1e-4)


@pytest.mark.parametrize("sr,aligned", [(2, True), (0, True), (1, False)])
def test_roi_align_feature_gradient_matches_torchvision(rng, sr, aligned):
  feats, boxes = _random_case(rng, r=16)
  cot = rng.normal(size=(2, 16) + OUT + (3,)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(roi_align(f, boxes, OUT, 0.25, sr, aligned, 8) * cot)))
  ours = grad(feats)
  tf = torch.from_numpy(feats).requires_grad_(True)
  rois = torch.cat(
    [
      torch.arange(2).repeat_interleave(16).float()[:, None],
      torch.from_numpy(boxes.reshape(-1, 4)),
    ],
    1,
  )
  out = torchvision.ops.roi_align(tf.permute(0, 3, 1, 2), rois, OUT, 0.25, sr, aligned)
  (out * torch.from_numpy(cot).reshape(32, *OUT, 3).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_allclose(ours, tf.grad.numpy(), atol=1e-4)


def test_roi_align_vmap_and_bfloat16(rng):
  feats, boxes = _random_case(rng, r=8)
  stacked_f, stacked_b = np.stack([feats, feats[::-1]]), np.stack([boxes, boxes[::-1]])
  ours = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, OUT, 0.25, 2, True)))(stacked_f, stacked_b)
  np.testing.assert_allclose(
    ours[1], _tv_roi_align(feats[::-1].copy(), boxes[::-1].copy(), OUT, 0.25, 2, True), atol=1e-4
  )
  half = _jitted(2, True)(jnp.asarray(feats, jnp.bfloat16), boxes)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), ours[0], atol=5e-2)


def _detectron2_levels(boxes, lo, hi):
  """Detectron2's assign_boxes_to_levels in torch float32."""
  t = torch.from_numpy(boxes)
  size = torch.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]))
  lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8))
  return torch.clamp(lvl, min=lo, max=hi).to(torch.int64).numpy()


@pytest.mark.parametrize("sr,out", [(2, 7), (0, 6)])
def test_multilevel_equals_pooling_each_box_on_its_level(rng, sr, out):
  b, r, c, image = 2, 96, 4, 256
  feats = {
    f"p{k}": rng.normal(size=(b, image >> k, (image >> k) + 1, c)).astype(np.float32)
    for k in range(2, 6)
  }
  # sqrt(area) drawn per level band: [16, 112) -> P2, [112, 224) -> P3, [224, 448) -> P4,
  # [448, 700) -> P5 (floor(4 + log2(size / 224)), clamped), so every level gets a quarter.
  edges = np.log(np.array([16.0, 112.0, 224.0, 448.0, 700.0]))
  band = np.arange(b * r).reshape(b, r, 1) % 4
  size = np.exp(rng.uniform(edges[band], edges[band + 1]))
  # Aspect ratios up to e^0.5 = 1.65: with sr=0 about 40% of P3/P4 boxes still fit the 4 x 4 cap.
  aspect = np.exp(rng.uniform(-0.5, 0.5, (b, r, 1)))
  ctr = rng.uniform(0, image, (b, r, 2))
  wh = np.concatenate([size * aspect, size / aspect], -1)
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).astype(np.float32)
  fn = jax.jit(lambda f, bx: multilevel_roi_align(f, bx, out, sr, True))
  ours = np.asarray(fn(feats, boxes))
  levels = _detectron2_levels(boxes.reshape(-1, 4), 2, 5).reshape(b, r)
  np.testing.assert_array_equal(assign_levels(boxes, 2, 5), levels)
  assert len(np.unique(levels)) == 4
  for k in range(2, 6):
    ref = _tv_roi_align(feats[f"p{k}"], boxes, (out, out), 2.0**-k, sr, True)
    sel = levels == k
    if sr == 0:  # compare only where the adaptive grid fits the cap (see roi_align's doc)
      grid = np.ceil((boxes[..., 2:] - boxes[..., :2]) * 2.0**-k / out)
      sel &= (grid <= 4).all(-1)
    assert sel.sum() >= 4, f"too few boxes compared on P{k}"
    np.testing.assert_allclose(ours[sel], ref[sel], atol=1e-4)


def test_roi_align_shape_errors():
  with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
    roi_align(np.zeros((2, 3, 4)), np.zeros((2, 1, 4)), 2, 1.0, 1, True)
  with pytest.raises(ValueError, match=r"\(1, 5, 4\)"):
    roi_align(np.zeros((2, 3, 4, 1)), np.zeros((1, 5, 4)), 2, 1.0, 1, True)


def test_level_rule_torchvision_matches_its_level_mapper(rng):
  """level_rule="torchvision" equals torchvision's LevelMapper (eps 1e-6 outside the log) on
  random boxes and on boxes just below 112 / 224 / 448 px, where Detectron2's rule differs."""
  from torchvision.ops.poolers import LevelMapper

  xy = rng.uniform(0, 100, (200, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(1, 600, (200, 2))], 1)
  edges = np.array([112.0, 224.0, 448.0])
  below = [[0.0, 0.0, s, s * (1 - 8e-7)] for s in edges]  # sqrt(area) ~ s * (1 - 4e-7)
  boxes = np.concatenate([boxes, below]).astype(np.float32)
  want = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy() + 2
  got = np.asarray(assign_levels(jnp.asarray(boxes), 2, 5, level_rule="torchvision"))
  np.testing.assert_array_equal(got, want)
  d2 = np.asarray(assign_levels(jnp.asarray(boxes[-3:]), 2, 5))
  np.testing.assert_array_equal(d2, want[-3:] - 1)
