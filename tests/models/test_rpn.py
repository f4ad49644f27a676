"""RPN: head layout and init, proposals vs a torchvision reference, labels and losses vs NumPy."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax.models import default_model_config
from rethink_jax.models import layers
from rethink_jax.models import rpn


def _rng():
  seed = time.time_ns() % 2**32
  print(f"seed={seed}")
  return np.random.default_rng(seed)


def _random_boxes(rng, n, size, min_wh=2.0, max_wh=None):
  max_wh = max_wh or size / 2
  xy = rng.uniform(0, size - min_wh, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, np.minimum(xy + wh, size)], -1).astype(np.float32)


def _np_iou(a, b):
  return torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _np_encode(t, a):
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  ax, ay = a[:, 0] + 0.5 * aw, a[:, 1] + 0.5 * ah
  tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
  tx, ty = t[:, 0] + 0.5 * tw, t[:, 1] + 0.5 * th
  return np.stack([(tx - ax) / aw, (ty - ay) / ah, np.log(tw / aw), np.log(th / ah)], -1)


_SCALE_CLAMP = np.log(1000.0 / 16)


def _np_decode(d, a, clamp=_SCALE_CLAMP):
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  ax, ay = a[:, 0] + 0.5 * aw, a[:, 1] + 0.5 * ah
  cx, cy = d[:, 0] * aw + ax, d[:, 1] * ah + ay
  w, h = np.exp(np.minimum(d[:, 2], clamp)) * aw, np.exp(np.minimum(d[:, 3], clamp)) * ah
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def test_head_layout_shapes_and_init():
  head = rpn.StandardRPNHead(
    num_anchors=3, conv_dims=-1, conv=layers.conv_def(norm=None, dtype=jnp.float32)
  )
  feats = [jnp.ones((2, 8, 8, 256)), jnp.ones((2, 4, 4, 256))]
  variables = head.init(jax.random.key(0), feats)
  p = variables["params"]
  assert set(p) == {"conv", "objectness_logits", "anchor_deltas"}
  assert p["conv"]["kernel"].shape == (3, 3, 256, 256)
  assert p["objectness_logits"]["kernel"].shape == (1, 1, 256, 3)
  assert p["anchor_deltas"]["kernel"].shape == (1, 1, 256, 12)
  n = sum(x.size for x in jax.tree_util.tree_leaves(p))
  assert n == 593_935, n  # Detectron2's StandardRPNHead at 256 channels, 3 anchors
  std = float(jnp.std(p["conv"]["kernel"]))
  assert 0.0095 < std < 0.0105, std  # normal(std=0.01)
  for name in p:
    assert float(jnp.abs(p[name]["bias"]).max()) == 0.0
  obj, deltas = head.apply(variables, feats)
  assert [o.shape for o in obj] == [(2, 192), (2, 48)]
  assert [d.shape for d in deltas] == [(2, 192, 4), (2, 48, 4)]
  # Location-major, then anchor: entry (y*W + x)*A + a is channel a (4a..4a+3) at (y, x).
  y, x, a = 3, 5, 2
  raw = (
    jax.lax.conv_general_dilated(
      feats[0],
      p["conv"]["kernel"],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    + p["conv"]["bias"]
  )
  t = jax.nn.relu(raw)[0, y, x]
  want = t @ p["anchor_deltas"]["kernel"][0, 0] + p["anchor_deltas"]["bias"]
  np.testing.assert_allclose(
    deltas[0][0, (y * 8 + x) * 3 + a], want[4 * a : 4 * a + 4], rtol=1e-4, atol=1e-6
  )


def _reference_proposals(objectness, deltas, anchors, hw, pre, post, thresh):
  """Detectron2's find_top_rpn_proposals for one image, with torchvision's batched_nms."""
  boxes, scores, levels = [], [], []
  for lvl, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
    k = min(pre, len(a))
    idx = np.argsort(-o, kind="stable")[:k]
    boxes.append(_np_decode(d[idx], a[idx]))
    scores.append(o[idx])
    levels.append(np.full(k, lvl))
  boxes, scores, levels = map(np.concatenate, (boxes, scores, levels))
  h, w = hw
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
  k = torchvision.ops.batched_nms(
    torch.from_numpy(boxes).float(),
    torch.from_numpy(scores).float(),
    torch.from_numpy(levels),
    thresh,
  ).numpy()[:post]
  return boxes[k], scores[k]


def test_find_top_proposals_matches_reference():
  rng = _rng()
  hw = (60, 80)
  sizes = [(16, 20), (8, 10), (4, 5)]
  anchors = [_random_boxes(rng, h * w * 3, 80, 4, 40) for h, w in sizes]
  objectness = [rng.normal(size=len(a)).astype(np.float32) for a in anchors]
  deltas = [rng.normal(scale=0.5, size=(len(a), 4)).astype(np.float32) for a in anchors]
  pre, post = 300, 200
  f = jax.jit(
    lambda o, d, a, s: rpn.find_top_proposals(
      o,
      d,
      a,
      s,
      pre_nms_topk=pre,
      post_nms_topk=post,
      nms_thresh=0.7,
      min_size=0.0,
      box_reg_weights=(1.0, 1.0, 1.0, 1.0),
    )
  )
  boxes, logits, valid = f(objectness, deltas, anchors, jnp.array(hw))
  want_boxes, want_scores = _reference_proposals(objectness, deltas, anchors, hw, pre, post, 0.7)
  n = int(valid.sum())
  assert n == len(want_boxes)
  assert bool(jnp.all(valid[:n])) and not bool(jnp.any(valid[n:]))
  np.testing.assert_allclose(np.asarray(boxes[:n]), want_boxes, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(logits[:n]), want_scores, rtol=1e-6)
  assert np.all(np.asarray(boxes[n:]) == 0)


def test_label_sample_and_losses_match_numpy():
  rng = _rng()
  anchors = _random_boxes(rng, 3000, 128, 4, 64)
  g = 6
  gt = _random_boxes(rng, g, 128, 8, 64)
  gt_valid = np.array([True] * 4 + [False] * 2)
  samples = jax.jit(
    lambda a, b, v, k: rpn.label_and_sample_anchors(
      a,
      b,
      v,
      k,
      iou_thresholds=(0.3, 0.7),
      iou_labels=(0, -1, 1),
      batch_size_per_image=256,
      positive_fraction=0.5,
      box_reg_weights=(1.0, 1.0, 1.0, 1.0),
    )
  )(anchors, gt, gt_valid, jax.random.key(int(rng.integers(1 << 30))))
  idx = np.asarray(samples["indices"])
  valid = np.asarray(samples["valid"])
  labels = np.asarray(samples["labels"])

  # Matcher semantics on the sampled anchors (only the 4 valid gt count).
  iou = _np_iou(gt[:4], anchors)  # (4, N)
  best = iou.max(0)
  low_quality = np.any((iou == iou.max(1, keepdims=True)), axis=0)
  want_pos = (best >= 0.7) | low_quality
  want_neg = (best < 0.3) & ~want_pos
  assert len(np.unique(idx[valid])) == valid.sum() <= 256
  assert labels[valid].sum() <= 128
  assert np.all(want_pos[idx[valid & (labels == 1)]])
  assert np.all(want_neg[idx[valid & (labels == 0)]])
  assert valid.sum() == min(256, min(want_pos.sum(), 128) + want_neg.sum())
  pos = idx[valid & (labels == 1)]
  matched = gt[:4][iou[:, pos].argmax(0)]
  np.testing.assert_allclose(
    np.asarray(samples["targets"])[valid & (labels == 1)],
    _np_encode(matched, anchors[pos]),
    rtol=1e-4,
    atol=1e-4,
  )

  # Losses over a batch of two images (the second with the same samples), vs NumPy.
  obj = rng.normal(size=(2, len(anchors))).astype(np.float32)
  deltas = rng.normal(size=(2, len(anchors), 4)).astype(np.float32)
  batched = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), samples)
  losses = rpn.rpn_losses(jnp.asarray(obj), jnp.asarray(deltas), batched, 256.0 * 2)
  targets = np.asarray(samples["targets"])
  want_cls = want_loc = 0.0
  for b in range(2):
    z = obj[b, idx[valid]]
    y = labels[valid]
    want_cls += np.sum(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    p = valid & (labels == 1)
    want_loc += np.abs(deltas[b, idx[p]] - targets[p]).sum()
  np.testing.assert_allclose(float(losses["loss_rpn_cls"]), want_cls / 512, rtol=1e-5)
  np.testing.assert_allclose(float(losses["loss_rpn_loc"]), want_loc / 512, rtol=1e-5)
  # Cross-check the BCE against torch's.
  t = sum(
    torch.nn.functional.binary_cross_entropy_with_logits(
      torch.from_numpy(obj[b, idx[valid]]),
      torch.from_numpy(labels[valid].astype(np.float32)),
      reduction="sum",
    )
    for b in range(2)
  )
  np.testing.assert_allclose(want_cls, float(t), rtol=1e-5)


def test_no_ground_truth_samples_only_background():
  rng = _rng()
  anchors = _random_boxes(rng, 1000, 64)
  samples = rpn.label_and_sample_anchors(
    jnp.asarray(anchors),
    jnp.zeros((3, 4)),
    jnp.zeros((3,), bool),
    jax.random.key(0),
    iou_thresholds=(0.3, 0.7),
    iou_labels=(0, -1, 1),
    batch_size_per_image=256,
    positive_fraction=0.5,
    box_reg_weights=(1.0, 1.0, 1.0, 1.0),
  )
  assert int(samples["valid"].sum()) == 256
  assert int(samples["labels"].sum()) == 0


def test_rpn_module_train_and_test_shapes():
  rng = _rng()
  feats = [jnp.asarray(rng.normal(size=(2, s, s, 16)), jnp.float32) for s in (16, 8, 4)]
  anchors = [jnp.asarray(_random_boxes(rng, s * s * 3, 64, 4, 32)) for s in (16, 8, 4)]
  c = default_model_config()  # 3 anchors per location
  c.rpn.update(
    pre_nms_topk_train=100,
    post_nms_topk_train=50,
    pre_nms_topk_test=80,
    post_nms_topk_test=40,
    batch_size_per_image=64,
  )
  module = rpn.build_rpn(c)
  assert module.rpn_head.num_anchors == 3 and module.nms_thresh == c.rpn.nms_thresh
  gt = jnp.asarray(np.stack([_random_boxes(rng, 3, 64, 8, 32)] * 2))
  gt_valid = jnp.array([[True, True, False], [True, False, False]])
  hw = jnp.array([[64, 64], [50, 60]])
  variables = jax.jit(lambda k: module.init(k, feats, anchors, hw, train=False))(jax.random.key(0))
  train = jax.jit(
    lambda v, k: module.apply(v, feats, anchors, hw, gt, gt_valid, train=True, rngs={"sampling": k})
  )
  props, valid, logits, losses = train(variables, jax.random.key(1))
  assert props.shape == (2, 50, 4) and valid.shape == (2, 50) and logits.shape == (2, 50)
  logits, valid = np.asarray(logits), np.asarray(valid)
  assert np.all(np.isfinite(logits) == valid) and np.all(np.diff(logits, axis=1)[valid[:, 1:]] <= 0)
  assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
  assert all(np.isfinite(float(v)) for v in losses.values())
  # Proposals stay inside each image.
  assert float(props[1, :, 2].max()) <= 60 and float(props[1, :, 3].max()) <= 50
  # No gradient flows through proposals.
  test = lambda v: module.apply(v, feats, anchors, hw, train=False)
  (props, valid, _, losses), g = jax.jit(
    lambda v: (test(v), jax.grad(lambda w: test(w)[0].sum())(v))
  )(variables)
  assert props.shape == (2, 40, 4) and losses == {}
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g))
  c.rpn.smooth_l1_beta = 0.1
  with pytest.raises(ValueError, match="smooth_l1_beta"):
    rpn.build_rpn(c)


if __name__ == "__main__":
  pytest.main([__file__, "-q"])


def test_two_conv_head_matches_torchvision_rpn_head():
  """head_num_conv=2: params conv/conv0, conv/conv1 (Detectron2's names), and the outputs of
  torchvision's RPNHead(conv_depth=2) with the same weights."""
  from torchvision.models.detection.rpn import RPNHead

  rng = _rng()
  torch.manual_seed(int(rng.integers(1 << 30)))
  ref = RPNHead(16, 3, conv_depth=2)
  head = rpn.StandardRPNHead(
    num_anchors=3, conv_dims=-1, conv=layers.conv_def(norm=None, dtype=jnp.float32), num_conv=2
  )
  feats = [rng.normal(size=(2, 8, 10, 16)).astype(np.float32) for _ in range(2)]
  params = head.init(jax.random.key(0), feats)["params"]
  assert set(params["conv"]) == {"conv0", "conv1"}
  hwio = lambda t: t.detach().numpy().transpose(2, 3, 1, 0)
  conv = lambda m: {"kernel": hwio(m.weight), "bias": m.bias.detach().numpy()}
  params = {
    "conv": {f"conv{j}": conv(ref.conv[j][0]) for j in range(2)},
    "objectness_logits": conv(ref.cls_logits),
    "anchor_deltas": conv(ref.bbox_pred),
  }
  objectness, deltas = head.apply({"params": params}, feats)
  with torch.no_grad():
    want_o, want_d = ref([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats])
  for o, d, wo, wd in zip(objectness, deltas, want_o, want_d):
    np.testing.assert_allclose(np.asarray(o), wo.permute(0, 2, 3, 1).reshape(2, -1), atol=1e-5)
    wd = wd.reshape(2, 3, 4, *wd.shape[2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
    np.testing.assert_allclose(np.asarray(d), wd, atol=1e-5)


@pytest.mark.parametrize("inclusive", [False, True])
def test_min_size_rule(inclusive):
  """A proposal exactly min_size wide survives only with min_size_inclusive (torchvision's
  remove_small_boxes keeps w >= min_size; Detectron2's nonempty keeps w > min_size)."""
  anchors = [np.array([[0, 0, 2, 8], [10, 10, 14, 14], [20, 20, 21.5, 30]], np.float32)]
  boxes, _, valid = rpn.find_top_proposals(
    [np.array([3.0, 2.0, 1.0], np.float32)],
    [np.zeros((3, 4), np.float32)],
    anchors,
    jnp.array([40, 40]),
    pre_nms_topk=3,
    post_nms_topk=3,
    nms_thresh=0.7,
    min_size=2.0,
    box_reg_weights=(1.0, 1.0, 1.0, 1.0),
    min_size_inclusive=inclusive,
  )
  kept = np.asarray(boxes)[np.asarray(valid)]
  want = anchors[0][:2] if inclusive else anchors[0][1:2]
  np.testing.assert_array_equal(kept, want)
