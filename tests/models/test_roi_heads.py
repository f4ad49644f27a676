"""ROI heads: layouts and parameter counts, proposal labelling, losses vs NumPy/torch, the
transposed conv and class-specific mask predictor vs torch, inference vs a torchvision reference."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax.models import default_model_config
from rethink_jax.models import layers
from rethink_jax.models import roi_heads

GN = layers.build_norm("GN", num_groups=32)
DENSE = layers.dense_def(dtype=jnp.float32)


def _conv(norm=GN):
  return layers.conv_def(norm=norm, dtype=jnp.float32)


def _rng():
  seed = time.time_ns() % 2**32
  print(f"seed={seed}")
  return np.random.default_rng(seed)


def _random_boxes(rng, n, size, min_wh=4.0, max_wh=None):
  max_wh = max_wh or size / 2
  xy = rng.uniform(0, size - min_wh, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, np.minimum(xy + wh, size)], -1).astype(np.float32)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_head_parameter_counts_and_names():
  x = jnp.zeros((2, 7, 7, 256))
  shapes = lambda m, *a: jax.eval_shape(lambda: m.init(jax.random.key(0), *a))["params"]
  heads = roi_heads.build_roi_heads(default_model_config())  # 4conv1fc, GN, 80 classes
  p = shapes(heads.box_head, x)
  assert set(p) == {"conv1", "conv2", "conv3", "conv4", "fc1"}
  assert _count(p) == 15_207_424  # 4 x (conv 3x3 256, no bias, GN) + fc 12544 -> 1024
  assert "bias" not in p["conv1"] and set(p["conv1"]["norm"]) == {"scale", "bias"}
  c = default_model_config()
  c.box_head.update(name="2fc", norm="")
  p = shapes(roi_heads.build_roi_heads(c).box_head, x)
  assert set(p) == {"fc1", "fc2"} and _count(p) == 12_846_080 + 1_049_600  # "2fc"
  p = shapes(heads.box_predictor, jnp.zeros((2, 1024)))
  assert p["cls_score"]["kernel"].shape == (1024, 81)
  assert p["bbox_pred"]["kernel"].shape == (1024, 320)
  assert _count(p) == 411_025
  p = shapes(heads.mask_head, jnp.zeros((2, 14, 14, 256)), jnp.ones((2,), jnp.int32))
  assert set(p) == {"mask_fcn1", "mask_fcn2", "mask_fcn3", "mask_fcn4", "deconv", "predictor"}
  assert p["deconv"]["kernel"].shape == (2, 2, 256, 256)
  assert p["predictor"]["kernel"].shape == (1, 1, 256, 80)
  assert _count(p) == 2_361_344 + 282_960


def test_build_roi_heads_reads_the_config():
  c = default_model_config()
  heads = roi_heads.build_roi_heads(c)
  assert heads.test_candidates == c.roi_heads.test_candidates == 2000
  assert heads.mask_chunk_rois == c.mask_head.chunk_rois
  assert (heads.box_pooler.resolution, heads.mask_pooler.resolution) == (7, 14)
  assert heads.box_head.conv.keywords["norm"]().num_groups == c.box_head.num_groups
  # Batch statistics must see every ROI: BN mask heads run in one pass.
  c.mask_head.norm = "SyncBN"
  assert roi_heads.build_roi_heads(c).mask_chunk_rois == 0
  c.box_head.name = "3fc"
  with pytest.raises(ValueError, match="3fc"):
    roi_heads.build_roi_heads(c)


def test_initialisation_statistics():
  head = roi_heads.FastRCNNOutputLayers(80, DENSE)
  p = head.init(jax.random.key(1), jnp.zeros((1, 1024)))["params"]
  assert abs(float(jnp.std(p["cls_score"]["kernel"])) - 0.01) < 0.0005
  assert abs(float(jnp.std(p["bbox_pred"]["kernel"])) - 0.001) < 0.00005
  assert float(jnp.abs(p["cls_score"]["bias"]).max()) == 0.0
  mask = roi_heads.MaskRCNNConvUpsampleHead(80, num_conv=1, conv_dim=64, conv=_conv())
  p = mask.init(jax.random.key(2), jnp.zeros((1, 14, 14, 64)), jnp.ones((1,), jnp.int32))["params"]
  assert abs(float(jnp.std(p["predictor"]["kernel"])) - 0.001) < 0.0001
  # MSRA fill: std sqrt(2 / fan_out), fan_out = 3 * 3 * 64 (conv), 4 * C_in (deconv, PyTorch).
  assert abs(float(jnp.std(p["mask_fcn1"]["kernel"])) / np.sqrt(2 / 576) - 1) < 0.05
  assert abs(float(jnp.std(p["deconv"]["kernel"])) / np.sqrt(2 / 256) - 1) < 0.05
  box = roi_heads.FastRCNNConvFCHead(
    num_conv=0, conv_dim=256, num_fc=1, fc_dim=256, conv=_conv(), dense=DENSE
  )
  p = box.init(jax.random.key(3), jnp.zeros((1, 7, 7, 64)))["params"]
  bound = np.sqrt(3 / (7 * 7 * 64))  # c2_xavier_fill: U(-sqrt(3/fan_in), sqrt(3/fan_in))
  k = np.asarray(p["fc1"]["kernel"])
  assert k.max() <= bound and k.min() >= -bound and k.max() > 0.95 * bound


def test_deconv_and_mask_predictor_match_torch():
  rng = _rng()
  x = rng.normal(size=(3, 5, 6, 8)).astype(np.float32)
  deconv = roi_heads.ConvTranspose2x2(4)
  v = deconv.init(jax.random.key(0), x)
  w = torch.from_numpy(np.array(v["params"]["kernel"])).permute(2, 3, 0, 1)  # (C_in, C_out, 2, 2)
  b = torch.from_numpy(rng.normal(size=4).astype(np.float32))
  v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.asarray(b.numpy())}}
  y = deconv.apply(v, x)
  want = (
    torch.nn.functional.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, b, stride=2)
    .permute(0, 2, 3, 1)
    .numpy()
  )
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)

  # Gradients (the 2D product, the pixel shuffle and xla_cpu.add_bias) against torch autograd.
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
  tw, tb = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
  ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, stride=2)
  dy = rng.normal(size=ty.shape).astype(np.float32)
  ty.backward(torch.from_numpy(dy))
  loss = lambda p, x: jnp.sum(deconv.apply({"params": p}, x) * dy.transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    dp, dx = jax.grad(loss, (0, 1))(v["params"], x)
  np.testing.assert_allclose(dx, tx.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    dp["kernel"], tw.grad.permute(2, 3, 0, 1).numpy(), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(dp["bias"], tb.grad.numpy(), rtol=1e-4, atol=1e-4)

  pred = roi_heads.ClassMaskPredictor(5)
  classes = jnp.array([1, 5, 3])
  v = pred.init(jax.random.key(1), x, classes)
  bias = rng.normal(size=5).astype(np.float32)
  v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.asarray(bias)}}
  got = pred.apply(v, x, classes)
  full = np.einsum("rhwc,cf->rhwf", x, np.asarray(v["params"]["kernel"][0, 0])) + bias
  np.testing.assert_allclose(
    np.asarray(got), full[np.arange(3), :, :, np.asarray(classes) - 1], rtol=1e-5, atol=1e-6
  )


def test_label_and_sample_proposals():
  rng = _rng()
  p, g = 300, 5
  gt = _random_boxes(rng, g, 100, 10, 50)
  gt_classes = np.array([3, 1, 2, 0, 0], np.int32)
  # Proposals: jittered copies of the gt (many positives) and random boxes.
  jitter = gt[rng.integers(0, 3, p // 2)] + rng.normal(scale=3, size=(p // 2, 4)).astype(np.float32)
  proposals = np.concatenate([jitter, _random_boxes(rng, p - p // 2, 100)])
  proposals[:, 2:] = np.maximum(proposals[:, 2:], proposals[:, :2] + 1)
  valid = rng.uniform(size=p) < 0.9
  out = jax.jit(
    lambda *a: roi_heads.label_and_sample_proposals(
      *a, batch_size_per_image=128, positive_fraction=0.25, iou_threshold=0.5, append_gt=True
    )
  )(proposals, valid, gt, gt_classes, jax.random.key(int(rng.integers(1 << 30))))
  rois, classes = np.asarray(out["rois"]), np.asarray(out["classes"])
  svalid, matched = np.asarray(out["valid"]), np.asarray(out["matched_gt"])
  all_boxes = np.concatenate([proposals, gt])
  all_valid = np.concatenate([valid, gt_classes > 0])
  # Every sampled roi is a valid proposal or a (valid) appended gt box; no repeats.
  idx = [np.flatnonzero(np.all(all_boxes == r, axis=1) & all_valid) for r in rois[svalid]]
  assert all(len(i) >= 1 for i in idx)
  iou = torchvision.ops.box_iou(torch.from_numpy(rois[svalid]), torch.from_numpy(gt[:3])).numpy()
  fg = classes[svalid] > 0
  assert fg.sum() == min(
    32,
    int(
      (
        (
          torchvision.ops.box_iou(torch.from_numpy(all_boxes[all_valid]), torch.from_numpy(gt[:3]))
          .numpy()
          .max(1)
        )
        >= 0.5
      ).sum()
    ),
  )
  assert np.all(iou[fg].max(1) >= 0.5) and np.all(iou[~fg].max(1) < 0.5)
  np.testing.assert_array_equal(classes[svalid][fg], gt_classes[matched[svalid][fg]])
  np.testing.assert_array_equal(matched[svalid][fg], iou[fg].argmax(1))
  assert svalid.sum() == min(128, all_valid.sum())
  # Foreground selection for the mask head keeps every positive (fewer than max_fg_rois here).
  sel = roi_heads.select_foreground(out, 40)
  assert int(sel["valid"].sum()) == int(fg.sum())
  assert bool(jnp.all(sel["classes"][sel["valid"]] > 0))


def test_fast_rcnn_and_mask_losses_match_reference():
  rng = _rng()
  n, k = 40, 6
  logits = rng.normal(size=(n, k + 1)).astype(np.float32)
  deltas = rng.normal(size=(n, k, 4)).astype(np.float32)
  classes = rng.integers(0, k + 1, n).astype(np.int32)
  valid = rng.uniform(size=n) < 0.8
  targets = rng.normal(size=(n, 4)).astype(np.float32)
  targets[classes == 0] = -np.inf  # background targets may be garbage
  losses = roi_heads.fast_rcnn_losses(logits, deltas, classes, valid, targets)
  # torch's cross-entropy with Detectron2's class order (background = index K).
  torch_labels = torch.from_numpy(np.where(classes == 0, k, classes - 1)[valid]).long()
  ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits[valid]), torch_labels)
  np.testing.assert_allclose(float(losses["loss_cls"]), float(ce), rtol=1e-5)
  fg = valid & (classes > 0)
  l1 = np.abs(deltas[fg, classes[fg] - 1] - targets[fg]).sum() / valid.sum()
  np.testing.assert_allclose(float(losses["loss_box_reg"]), l1, rtol=1e-5)
  grads = jax.grad(
    lambda d: roi_heads.fast_rcnn_losses(logits, d, classes, valid, targets)["loss_box_reg"]
  )(jnp.asarray(deltas))
  assert bool(jnp.all(jnp.isfinite(grads)))

  m = rng.normal(size=(n, 28, 28)).astype(np.float32)
  t = (rng.uniform(size=(n, 28, 28)) < 0.5).astype(np.float32)
  loss = roi_heads.mask_rcnn_loss(m, t, valid)
  want = torch.nn.functional.binary_cross_entropy_with_logits(
    torch.from_numpy(m[valid]), torch.from_numpy(t[valid])
  )
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert float(roi_heads.mask_rcnn_loss(m, t, np.zeros(n, bool))) == 0.0


def _reference_inference(proposals, logits, deltas, hw, thresh, nms, topk):
  """Detectron2's fast_rcnn_inference_single_image with torch ops."""
  p, k = deltas.shape[:2]
  scores = torch.softmax(torch.from_numpy(logits), -1)[:, :-1]
  coder = torchvision.models.detection._utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  boxes = coder.decode_single(
    torch.from_numpy(deltas.reshape(p, 4 * k)), torch.from_numpy(proposals)
  ).reshape(p, k, 4)
  boxes[..., 0::2] = boxes[..., 0::2].clamp(0, hw[1])
  boxes[..., 1::2] = boxes[..., 1::2].clamp(0, hw[0])
  keep = scores > thresh
  idx = keep.nonzero()
  boxes, scores, cls = boxes[keep], scores[keep], idx[:, 1]
  kept = torchvision.ops.batched_nms(boxes, scores, cls, nms)[:topk]
  return boxes[kept].numpy(), scores[kept].numpy(), cls[kept].numpy() + 1


def test_fast_rcnn_inference_matches_reference():
  rng = _rng()
  p, k, hw = 60, 4, (80, 100)
  proposals = _random_boxes(rng, p, 90, 8, 60)
  logits = rng.normal(scale=2.0, size=(p, k + 1)).astype(np.float32)
  deltas = rng.normal(scale=0.5, size=(p, k, 4)).astype(np.float32)
  valid = np.ones(p, bool)
  boxes, scores, classes, num = jax.jit(
    lambda *a: roi_heads.fast_rcnn_inference(
      *a,
      box_reg_weights=(10.0, 10.0, 5.0, 5.0),
      score_thresh=0.05,
      nms_thresh=0.5,
      detections_per_image=20,
      num_candidates=p * k,
    )
  )(proposals, valid, logits, deltas, jnp.array(hw))
  want_boxes, want_scores, want_classes = _reference_inference(
    proposals, logits, deltas, hw, 0.05, 0.5, 20
  )
  n = int(num)
  assert n == len(want_boxes)
  np.testing.assert_allclose(np.asarray(scores[:n]), want_scores, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(boxes[:n]), want_boxes, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(classes[:n]), want_classes)
  assert np.all(np.asarray(classes[n:]) == 0) and np.all(np.asarray(scores[n:]) == 0)
  # Invalid proposals never produce detections.
  _, _, _, num = roi_heads.fast_rcnn_inference(
    proposals,
    np.zeros(p, bool),
    logits,
    deltas,
    jnp.array(hw),
    box_reg_weights=(10.0, 10.0, 5.0, 5.0),
    score_thresh=0.05,
    nms_thresh=0.5,
    detections_per_image=20,
    num_candidates=p * k,
  )
  assert int(num) == 0


def test_mask_branch_chunks_equal_one_pass():
  """Chunks of the mask branch with no ROI are skipped; losses, gradients and masks are those of
  one pass over all max_fg_rois (or detections_per_image) slots."""
  rng = _rng()
  size, c = 64, 16
  features = {
    f"p{k}": jnp.asarray(rng.normal(size=(2, size >> k, size >> k, c)), jnp.float32)
    for k in range(2, 6)
  }
  hw = np.full((2, 2), size, np.int32)
  gt = np.stack([_random_boxes(rng, 3, size, 12, 30), _random_boxes(rng, 3, size, 12, 30)])
  gt_classes = np.array([[1, 3, 2], [2, 0, 0]], np.int32)  # image 1: one object
  gt_masks = (rng.uniform(size=(2, 3, 16, 16)) < 0.5).astype(np.uint8)
  # Image 0: jittered copies of its objects (about 2 x 4 = 8 foreground ROIs with the appended gt);
  # image 1: random boxes far from positive, so 1-2 foreground.
  jitter = np.repeat(gt[0], 2, axis=0) + rng.normal(scale=1.0, size=(6, 4)).astype(np.float32)
  proposals = np.stack(
    [
      np.concatenate([jitter, _random_boxes(rng, 26, size, 2, 6)]),
      _random_boxes(rng, 32, size, 2, 6),
    ]
  )
  proposals[..., 2:] = np.maximum(proposals[..., 2:], proposals[..., :2] + 1)
  proposal_valid = np.ones((2, 32), bool)

  def heads(chunk):
    c = default_model_config()
    c.num_classes = 3
    c.roi_heads.update(batch_size_per_image=32, detections_per_image=10, test_candidates=50)
    c.box_head.update(num_conv=1, conv_dim=16, fc_dim=32)
    c.mask_head.update(num_conv=2, conv_dim=16, max_fg_rois=16, chunk_rois=chunk)
    return roi_heads.build_roi_heads(c)

  key = jax.random.key(int(rng.integers(1 << 30)))
  args = (features, proposals, proposal_valid, hw, gt, gt_classes, gt_masks)
  params = heads(0).init({"params": key, "sampling": key}, *args, train=True)["params"]

  def loss_and_grads(chunk):
    def loss(p):
      out = heads(chunk).apply({"params": p}, *args, train=True, rngs={"sampling": key})
      return out["loss_mask"], out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, one), g_one = loss_and_grads(0)
  (_, chunked), g_chunked = loss_and_grads(4)
  num_fg = jax.vmap(lambda s: jnp.sum(s["valid"] & (s["classes"] > 0)))(
    jax.vmap(
      lambda p, v, g, k, kk: roi_heads.label_and_sample_proposals(
        p,
        v,
        g,
        k,
        kk,
        batch_size_per_image=32,
        positive_fraction=0.25,
        iou_threshold=0.5,
        append_gt=True,
      )
    )(proposals, proposal_valid, gt, gt_classes, jax.random.split(key, 2))
  )
  print(f"foreground ROIs per image {np.asarray(num_fg)}, losses {one}")
  assert 1 <= int(num_fg.max()) <= 12  # the last of the four chunks is skipped
  for k in one:
    np.testing.assert_allclose(chunked[k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
  flat_one = jax.tree_util.tree_leaves_with_path(g_one["mask_head"])
  flat_chunked = jax.tree_util.tree_leaves(g_chunked["mask_head"])
  for (path, a), b in zip(flat_one, flat_chunked):
    scale = float(jnp.abs(a).max())
    assert scale > 0, path
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=str(path))

  # Inference: image 0 keeps up to 3 classes x 1 proposal, image 1 up to 3 x 2 (<= 6 of 10 slots).
  infer_valid = np.zeros((2, 32), bool)
  infer_valid[0, 0] = infer_valid[1, :2] = True
  predict = lambda chunk: jax.jit(
    lambda p: heads(chunk).apply({"params": p}, features, proposals, infer_valid, hw, train=False)
  )(params)
  one, chunked = predict(0), predict(4)
  assert 1 <= int(one["num_detections"].max()) <= 6
  np.testing.assert_array_equal(chunked["num_detections"], one["num_detections"])
  np.testing.assert_allclose(chunked["masks"], one["masks"], rtol=0, atol=1e-6)


def test_min_box_size_test_drops_tiny_detections():
  """min_box_size (torchvision's remove_small_boxes(1e-2) before NMS) drops a detection whose
  clipped box is 5e-3 wide; 0 (Detectron2) keeps it."""
  proposals = np.array([[5.0, 5.0, 5.005, 15.0], [20.0, 20.0, 30.0, 30.0]], np.float32)
  logits = np.array([[3.0, 0.0], [2.0, 0.0]], np.float32)  # class 1, background last
  deltas = np.zeros((2, 1, 4), np.float32)
  nums = []
  for min_box_size in (0.0, 1e-2):
    _, _, _, num = roi_heads.fast_rcnn_inference(
      proposals,
      np.ones(2, bool),
      logits,
      deltas,
      jnp.array([40, 40]),
      box_reg_weights=(10.0, 10.0, 5.0, 5.0),
      score_thresh=0.05,
      nms_thresh=0.5,
      detections_per_image=5,
      num_candidates=2,
      min_box_size=min_box_size,
    )
    nums.append(int(num))
  assert nums == [2, 1]
