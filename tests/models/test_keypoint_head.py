"""Keypoint R-CNN: targets and loss vs a NumPy transcription of Detectron2's, heatmap decoding vs
torchvision's heatmaps_to_keypoints, the head vs a torch build of the same layers, and a tiny
keypoint model (mask_on=False) that trains one step and predicts fixed shapes."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import keypoint_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from rethink_jax.models import default_model_config
from rethink_jax.models import keypoint_head
from rethink_jax.models import layers
from rethink_jax.models import mask_rcnn
from rethink_jax.models import roi_heads
from rethink_jax.ops import keypoints as keypoint_ops
from tests.models import test_mask_rcnn

CONV = layers.conv_def(norm=None, dtype=jnp.float32)


def _rng():
  seed = time.time_ns() % 2**32
  print(f"seed={seed}")
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Detectron2's keypoint_rcnn_loss, transcribed to NumPy (structures/keypoints.py and
# modeling/roi_heads/keypoint_head.py).
# ----------------------------------------------------------------------------------------------
def _d2_keypoints_to_heatmap(keypoints, rois, size):
  keypoints, rois = keypoints.astype(np.float32), rois.astype(np.float32)
  offset_x, offset_y = rois[:, 0:1], rois[:, 1:2]
  scale_x = np.float32(size) / (rois[:, 2:3] - rois[:, 0:1])
  scale_y = np.float32(size) / (rois[:, 3:4] - rois[:, 1:2])
  x, y = keypoints[..., 0], keypoints[..., 1]
  x_boundary = x == rois[:, 2:3]
  y_boundary = y == rois[:, 3:4]
  x = np.floor((x - offset_x) * scale_x).astype(np.int64)
  y = np.floor((y - offset_y) * scale_y).astype(np.int64)
  x[x_boundary] = size - 1
  y[y_boundary] = size - 1
  valid = (x >= 0) & (y >= 0) & (x < size) & (y < size) & (keypoints[..., 2] > 0)
  return (y * size + x) * valid, valid


def _d2_keypoint_rcnn_loss(logits_nkss, rois, keypoints, normalizer):
  """logits (N, K, S, S) of the selected ROIs only (Detectron2 passes only those)."""
  n, k, s, _ = logits_nkss.shape
  heatmaps, valid = _d2_keypoints_to_heatmap(keypoints, rois, s)
  heatmaps, valid = heatmaps.reshape(-1), valid.reshape(-1)
  idx = np.nonzero(valid)[0]
  if idx.size == 0:
    return 0.0
  flat = logits_nkss.astype(np.float64).reshape(n * k, s * s)[idx]
  top = flat.max(-1, keepdims=True)
  lse = np.log(np.exp(flat - top).sum(-1)) + top[:, 0]
  loss = np.sum(lse - flat[np.arange(idx.size), heatmaps[idx]])
  return loss / (idx.size if normalizer is None else normalizer)


def _random_rois(rng, n, size=200.0):
  xy = rng.uniform(0, size / 2, (n, 2))
  wh = rng.uniform(2.0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _random_keypoints(rng, rois, k):
  """Keypoints inside, on every edge, just inside the far edges and outside their ROIs."""
  n = rois.shape[0]
  x1, y1, x2, y2 = (rois[:, i : i + 1] for i in range(4))
  u = rng.uniform(-0.2, 1.2, (n, k))
  v = rng.uniform(-0.2, 1.2, (n, k))
  x = (x1 + u * (x2 - x1)).astype(np.float32)
  y = (y1 + v * (y2 - y1)).astype(np.float32)
  pick = lambda: rng.uniform(size=(n, k)) < 0.1
  x = np.where(pick(), x2, x)
  y = np.where(pick(), y2, y)
  x = np.where(pick(), x1, x)
  x = np.where(pick(), np.nextafter(x2, np.float32(-np.inf)), x)
  y = np.where(pick(), np.nextafter(y2, np.float32(-np.inf)), y)
  vis = rng.integers(0, 3, (n, k)).astype(np.float32)
  return np.stack([x, y, vis], -1).astype(np.float32)


def test_keypoints_to_heatmap_matches_detectron2():
  rng = _rng()
  rois = _random_rois(rng, 64)
  kps = _random_keypoints(rng, rois, 17)
  index, valid = jax.device_get(keypoint_ops.keypoints_to_heatmap(kps, rois, 56))
  want_index, want_valid = _d2_keypoints_to_heatmap(kps, rois, 56)
  print(f"valid {want_valid.mean():.2f}")
  assert 0.2 < want_valid.mean() < 0.8
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(index, want_index)
  # Detectron2's select_proposals_with_visible_keypoints: v >= 1 inside the box, edges included.
  x, y = kps[..., 0], kps[..., 1]
  inside = (x >= rois[:, :1]) & (x <= rois[:, 2:3]) & (y >= rois[:, 1:2]) & (y <= rois[:, 3:])
  kps[rng.uniform(size=64) < 0.3, :, 2] = 0  # some ROIs with no visible keypoint
  want = np.any(inside & (kps[..., 2] >= 1), axis=1)
  got = keypoint_ops.has_visible_keypoint_in_box(jnp.asarray(kps), jnp.asarray(rois))
  assert 0 < want.sum() < 64
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("normalizer", [None, 17 * 512 * 0.25 * 2])
def test_keypoint_loss_matches_detectron2(normalizer):
  rng = _rng()
  n, k, s = 40, 17, 56
  rois = _random_rois(rng, n)
  kps = _random_keypoints(rng, rois, k)
  logits = rng.normal(scale=3.0, size=(n, k, s, s)).astype(np.float32)
  slots = rng.uniform(size=n) < 0.7  # the ROI slots that hold a selected ROI
  got = keypoint_head.keypoint_rcnn_loss(
    jnp.asarray(logits.transpose(0, 2, 3, 1)), rois, kps, jnp.asarray(slots), normalizer
  )
  want = _d2_keypoint_rcnn_loss(logits[slots], rois[slots], kps[slots], normalizer)
  print(f"loss {float(got):.6f} vs {want:.6f}")
  assert got.dtype == jnp.float32 and want > 0
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # No valid keypoint: 0, as Detectron2's `pred.sum() * 0`.
  kps[..., 2] = 0
  none = keypoint_head.keypoint_rcnn_loss(logits.transpose(0, 2, 3, 1), rois, kps, slots)
  assert float(none) == 0.0


# ----------------------------------------------------------------------------------------------
# Heatmaps to keypoints vs torchvision (and Detectron2's score).
# ----------------------------------------------------------------------------------------------
def _reference_keypoints(maps_rkss, rois):
  """torchvision's heatmaps_to_keypoints, plus Detectron2's score at the same argmax and each
  ROI's resized map (K, ceil h, ceil w)."""
  maps, boxes = torch.from_numpy(maps_rkss), torch.from_numpy(rois)
  xy, logits = tv_roi_heads.heatmaps_to_keypoints(maps, boxes)
  d2_scores, roi_maps = [], []
  for i in range(len(rois)):
    w = max(float(rois[i, 2] - rois[i, 0]), 1.0)
    h = max(float(rois[i, 3] - rois[i, 1]), 1.0)
    size = (int(np.ceil(np.float32(h))), int(np.ceil(np.float32(w))))
    roi_map = F.interpolate(maps[[i]], size=size, mode="bicubic", align_corners=False)[0]
    top = roi_map.flatten(1).max(1)[0][:, None, None]
    scores = (roi_map - top).exp() / (maps[i] - top).exp().sum((1, 2), keepdim=True)
    d2_scores.append(scores.flatten(1).max(1)[0])
    roi_maps.append(roi_map.numpy())
  return xy.numpy(), logits.numpy(), torch.stack(d2_scores).numpy(), roi_maps


def _check_against_reference(maps_rkss, rois, cap):
  got = np.asarray(
    keypoint_ops.heatmaps_to_keypoints(jnp.asarray(maps_rkss.transpose(0, 2, 3, 1)), rois, cap)
  )
  xy, logits, d2_scores, roi_maps = _reference_keypoints(maps_rkss, rois)
  err = np.abs(got[..., :2] - xy[..., :2]).max(-1)
  print(f"coordinate error: max {err.max():.4f}, mean {err.mean():.2e}")
  assert np.mean(err >= 1e-3) <= 0.05
  # Any other pixel is a tie: torch's resized map there equals its maximum up to rounding.
  for i, k in zip(*np.nonzero(err >= 1e-3)):
    w, h = (max(float(rois[i, j + 2] - rois[i, j]), 1.0) for j in (0, 1))
    x_int = round((got[i, k, 0] - rois[i, 0]) / (w / np.ceil(w)) - 0.5)
    y_int = round((got[i, k, 1] - rois[i, 1]) / (h / np.ceil(h)) - 0.5)
    print(f"tie at roi {i} keypoint {k}: {got[i, k]} vs {xy[i, k]}")
    assert roi_maps[i][k, y_int, x_int] >= logits[i, k] - 1e-5 * max(1, abs(logits[i, k]))
  np.testing.assert_allclose(got[..., 2], logits, rtol=0, atol=1e-3)
  np.testing.assert_allclose(got[..., 3], d2_scores, rtol=1e-3, atol=1e-6)


def test_heatmaps_to_keypoints_matches_torchvision_under_the_cap():
  rng = _rng()
  cap, r, k = 48, 24, 5
  xy = rng.uniform(0, 300, (r, 2))
  wh = rng.uniform(0.3, cap, (r, 2))  # sides <= cap, some below the 1-pixel clamp
  wh[:4] = rng.integers(1, cap + 1, (4, 2))  # integer sides: ceil(w) == w
  rois = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  maps = rng.normal(scale=2.0, size=(r, k, 56, 56)).astype(np.float32)
  _check_against_reference(maps, rois, cap)


def test_heatmaps_to_keypoints_coarse_to_fine_above_the_cap():
  """Boxes longer than the cap, single-peaked heatmaps: the two-step argmax is exact."""
  rng = _rng()
  cap, r, k = 32, 12, 4
  xy = rng.uniform(0, 300, (r, 2))
  wh = rng.uniform(cap + 1, 400, (r, 2))
  rois = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  grid = np.arange(56, dtype=np.float32)
  centre = rng.uniform(3, 53, (r, k, 2))
  sigma = rng.uniform(2, 6, (r, k, 1, 1))
  d2 = (grid[:, None] - centre[..., 1, None, None]) ** 2
  d2 = d2 + (grid[None, :] - centre[..., 0, None, None]) ** 2
  maps = 8 * np.exp(-d2 / (2 * sigma**2)) + rng.normal(scale=0.01, size=(r, k, 56, 56))
  _check_against_reference(maps.astype(np.float32), rois, cap)


# ----------------------------------------------------------------------------------------------
# The head vs torch.
# ----------------------------------------------------------------------------------------------
def test_head_matches_torch_layers():
  rng = _rng()
  dims, k = (16, 12, 8), 5
  head = keypoint_head.KRCNNConvDeconvUpsampleHead(num_keypoints=k, conv_dims=dims, conv=CONV)
  x = rng.normal(size=(3, 14, 14, 6)).astype(np.float32)
  params = head.init(jax.random.key(0), x)["params"]
  assert set(params) == {"conv_fcn1", "conv_fcn2", "conv_fcn3", "score_lowres"}
  assert params["score_lowres"]["kernel"].shape == (4, 4, 8, k)
  # Random biases too (the initialiser's are 0).
  params = jax.tree_util.tree_map(
    lambda p: p + rng.normal(scale=0.1, size=p.shape).astype(np.float32), params
  )
  got = np.asarray(head.apply({"params": params}, x))
  assert got.shape == (3, 56, 56, k) and got.dtype == np.float32

  t = lambda a: torch.from_numpy(np.array(a))
  layers_ = []
  c_in = 6
  for i, d in enumerate(dims):
    conv = torch.nn.Conv2d(c_in, d, 3, padding=1)
    conv.weight.data = t(params[f"conv_fcn{i + 1}"]["kernel"]).permute(3, 2, 0, 1).contiguous()
    conv.bias.data = t(params[f"conv_fcn{i + 1}"]["bias"])
    layers_ += [conv, torch.nn.ReLU()]
    c_in = d
  deconv = torch.nn.ConvTranspose2d(c_in, k, 4, stride=2, padding=1)
  deconv.weight.data = t(params["score_lowres"]["kernel"]).permute(2, 3, 0, 1).contiguous()
  deconv.bias.data = t(params["score_lowres"]["bias"])
  net = torch.nn.Sequential(*layers_, deconv)
  tx = t(x).permute(0, 3, 1, 2).requires_grad_(True)
  ty = F.interpolate(net(tx), scale_factor=2, mode="bilinear", align_corners=False)
  want = ty.permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  # Gradients of the input and of the transposed conv's kernel against torch autograd.
  cot = rng.normal(size=got.shape).astype(np.float32)
  ty.backward(t(cot).permute(0, 3, 1, 2))
  grads = jax.grad(lambda p, xx: jnp.sum(head.apply({"params": p}, xx) * cot), argnums=(0, 1))(
    params, x
  )
  g_kernel = np.asarray(grads[0]["score_lowres"]["kernel"]).transpose(2, 3, 0, 1)
  w_grad = deconv.weight.grad.numpy()
  np.testing.assert_allclose(g_kernel, w_grad, rtol=1e-4, atol=1e-4 * np.abs(w_grad).max())
  x_grad = tx.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(grads[1], x_grad, rtol=1e-4, atol=1e-4 * np.abs(x_grad).max())


def test_default_head_parameters_match_torchvision():
  """Detectron2's default head (8 x conv 512, K = 17) has torchvision's keypoint head's and
  predictor's parameter count; MSRA fill (fan_out) initialisation, zero biases."""
  c = default_model_config()
  c.keypoint_on = True
  heads = roi_heads.build_roi_heads(c)
  p = jax.eval_shape(
    lambda: heads.keypoint_head.init(jax.random.key(0), jnp.zeros((1, 14, 14, 256)))
  )["params"]
  assert set(p) == {f"conv_fcn{i}" for i in range(1, 9)} | {"score_lowres"}
  count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(p))
  tv = keypoint_rcnn.KeypointRCNNHeads(256, [512] * 8)
  tv_pred = keypoint_rcnn.KeypointRCNNPredictor(512, 17)
  want = sum(q.numel() for q in tv.parameters()) + sum(q.numel() for q in tv_pred.parameters())
  assert count == want == 17_838_097
  assert (heads.keypoint_pooler.resolution, heads.keypoint_max_fg_rois) == (14, 128)
  assert heads.keypoint_loss_normalizer is None
  c.keypoint_head.normalize_by_visible_keypoints = False
  assert roi_heads.build_roi_heads(c).keypoint_loss_normalizer == 17 * 512 * 0.25

  small = keypoint_head.KRCNNConvDeconvUpsampleHead(num_keypoints=17, conv_dims=(64,), conv=CONV)
  q = small.init(jax.random.key(1), jnp.zeros((1, 14, 14, 32)))["params"]
  std = lambda a: float(jnp.std(a))
  assert abs(std(q["conv_fcn1"]["kernel"]) / np.sqrt(2 / (9 * 64)) - 1) < 0.05
  assert abs(std(q["score_lowres"]["kernel"]) / np.sqrt(2 / (16 * 64)) - 1) < 0.05
  assert float(jnp.abs(q["score_lowres"]["bias"]).max()) == 0.0


def test_select_foreground_with_eligible():
  samples = {
    "rois": jnp.arange(24, dtype=jnp.float32).reshape(6, 4),
    "classes": jnp.array([1, 0, 2, 3, 1, 2]),
    "matched_gt": jnp.arange(6),
    "valid": jnp.array([True, True, True, True, True, False]),
  }
  eligible = jnp.array([False, True, True, True, True, True])
  out = roi_heads.select_foreground(samples, 3, eligible)
  np.testing.assert_array_equal(out["matched_gt"], [2, 3, 4])
  assert bool(out["valid"].all())
  out = roi_heads.select_foreground(samples, 5, eligible)
  np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])


# ----------------------------------------------------------------------------------------------
# A tiny keypoint model.
# ----------------------------------------------------------------------------------------------
K = 3


def _keypoint_config():
  c = test_mask_rcnn.tiny_config()
  c.mask_on = False
  c.keypoint_on = True
  c.keypoint_head.update(
    num_keypoints=K, conv_dims=(16, 16), max_fg_rois=8, chunk_rois=4, resize_cap=32
  )
  return c


def _keypoint_batch(rng):
  batch = test_mask_rcnn.synthetic_batch(rng)
  del batch["gt_masks"]
  boxes = batch["gt_boxes"]
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  frac = np.array([0.25, 0.5, 0.75], np.float32)
  xs = x1[..., None] + frac * (x2 - x1)[..., None]
  ys = y1[..., None] + frac[::-1] * (y2 - y1)[..., None]
  v = rng.integers(0, 3, xs.shape).astype(np.float32)
  v[..., 1] = 2  # every object has a visible keypoint
  kps = np.stack([xs, ys, v], -1) * (batch["gt_classes"] > 0)[..., None, None]
  batch["gt_keypoints"] = kps.astype(np.float32)
  return batch


def test_model_param_trees_follow_mask_on_and_keypoint_on():
  batch = {"image": jnp.zeros((1, 64, 64, 3)), "image_hw": jnp.full((1, 2), 64, jnp.int32)}

  def roi_params(c):
    model = mask_rcnn.build_model(c)
    keys = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(keys, batch, train=False))["params"]["roi_heads"]

  c = _keypoint_config()
  assert set(roi_params(c)) == {"box_head", "box_predictor", "keypoint_head"}
  c.mask_on = True
  p = roi_params(c)
  assert set(p) == {"box_head", "box_predictor", "mask_head", "keypoint_head"}
  assert set(p["keypoint_head"]) == {"conv_fcn1", "conv_fcn2", "score_lowres"}
  c.keypoint_on = False
  assert set(roi_params(c)) == {"box_head", "box_predictor", "mask_head"}


def test_tiny_keypoint_model_trains_and_predicts():
  rng = _rng()
  model = mask_rcnn.build_model(_keypoint_config())
  batch = _keypoint_batch(rng)
  key = jax.random.key(int(rng.integers(1 << 30)), impl="rbg")
  params = jax.jit(
    lambda k: model.init({"params": k, "sampling": k}, batch, train=False)["params"]
  )(key)
  tx = optax.sgd(0.01)

  @jax.jit
  def train_step(params, batch, key):
    def loss_fn(p):
      losses = model.apply({"params": p}, batch, train=True, rngs={"sampling": key})
      return sum(losses.values()), losses

    (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), losses, grads

  new_params, losses, grads = train_step(params, batch, key)
  losses = jax.device_get(losses)
  print({k: float(v) for k, v in losses.items()})
  assert set(losses) == {
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_keypoint",
  }
  assert all(np.isfinite(v) and v.dtype == np.float32 and v.shape == () for v in losses.values())
  assert losses["loss_keypoint"] > 1.0  # about log(56 * 56) = 8 at initialisation
  g = grads["roi_heads"]["keypoint_head"]
  assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree_util.tree_leaves(g))
  assert "mask_head" not in new_params["roi_heads"]

  dets = jax.device_get(
    jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))(new_params, batch)
  )
  d = 10
  assert "masks" not in dets
  assert dets["keypoints"].shape == (2, d, K, 3) and dets["keypoints"].dtype == np.float32
  assert dets["keypoint_logits"].shape == (2, d, K)
  for b in range(2):
    n = int(dets["num_detections"][b])
    assert n >= 1
    kp, boxes = dets["keypoints"][b, :n], dets["boxes"][b, :n]
    # Inside the box (sides clamped to >= 1 pixel), scores positive.
    assert np.all(kp[..., 0] >= boxes[:, None, 0]) and np.all(kp[..., 1] >= boxes[:, None, 1])
    assert np.all(kp[..., 0] <= np.maximum(boxes[:, None, 2], boxes[:, None, 0] + 1))
    assert np.all(kp[..., 1] <= np.maximum(boxes[:, None, 3], boxes[:, None, 1] + 1))
    assert np.all(kp[..., 2] > 0)
    assert np.all(dets["keypoints"][b, n:] == 0) and np.all(dets["keypoint_logits"][b, n:] == 0)
