"""Cascade R-CNN ROI heads against references this project did not write.

Each stage's input boxes, labels, regression targets and losses against a NumPy transcription of
Detectron2's CascadeROIHeads rules; the 1 / num_stages gradient on the pooled features; a Cascade
checkpoint in Detectron2's model-zoo layout (the Standard R50-FPN names Detectron2 recorded in
tests/fixtures/detectron2, with the box head and predictor as Detectron2's per-stage ModuleLists)
converted, and its inference against a torch implementation built here from torchvision ops; a
tiny cascade Mask R-CNN whose train step compiles once.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml

from rethink_jax import zoo_detectron2
from rethink_jax.convert import ConversionError
from rethink_jax.models import cascade_roi_heads as cascade
from rethink_jax.models import mask_rcnn
from tests.models.test_mask_rcnn import synthetic_batch
from tests.models.test_mask_rcnn import tiny_config

FIXTURE = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), "fixtures", "detectron2", "frozenbn_r50.json"
)
IOUS = (0.5, 0.6, 0.7)
WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
SCALE_CLAMP = math.log(1000.0 / 16)  # Detectron2's _DEFAULT_SCALE_CLAMP
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
SIZE = 128  # padded image side of the synthetic batches


def _rng():
  seed = time.time_ns() % 2**32
  print(f"seed={seed}")
  return np.random.default_rng(seed)


def _random_boxes(rng, n, lo, hi, min_wh, max_wh):
  xy = rng.uniform(lo, hi - min_wh, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# NumPy transcription of Detectron2's rules (float64).
# ----------------------------------------------------------------------------------------------
def np_pairwise_iou(a, b):
  """structures.boxes.pairwise_iou: (N, M), 0 where the boxes do not intersect."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
  wh = np.clip(wh, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(inter > 0, inter / (area_a[:, None] + area_b[None] - inter), 0.0)


def np_match(iou, threshold):
  """Matcher([threshold], [0, 1], allow_low_quality_matches=False) on a (G, R) matrix."""
  if iou.shape[0] == 0:
    return np.zeros(iou.shape[1], np.int64), np.zeros(iou.shape[1], np.int64)
  return iou.argmax(0), (iou.max(0) >= threshold).astype(np.int64)


def np_apply_deltas(deltas, boxes, weights):
  """Box2BoxTransform.apply_deltas for class-agnostic (R, 4) deltas."""
  wx, wy, ww, wh = weights
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
  dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
  dw = np.minimum(deltas[:, 2] / ww, SCALE_CLAMP)
  dh = np.minimum(deltas[:, 3] / wh, SCALE_CLAMP)
  cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
  w, h = np.exp(dw) * widths, np.exp(dh) * heights
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def np_get_deltas(src, target, weights):
  """Box2BoxTransform.get_deltas."""
  wx, wy, ww, wh = weights
  sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
  tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
  tx, ty = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
  return np.stack(
    [wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * np.log(tw / sw), wh * np.log(th / sh)], -1
  )


def np_clip(boxes, hw):
  """Boxes.clip((h, w))."""
  h, w = hw
  return np.stack(
    [
      np.clip(boxes[:, 0], 0, w),
      np.clip(boxes[:, 1], 0, h),
      np.clip(boxes[:, 2], 0, w),
      np.clip(boxes[:, 3], 0, h),
    ],
    -1,
  )


def np_fast_rcnn_losses(logits, deltas, classes, rois, gt_boxes, matched, weights):
  """FastRCNNOutputLayers.losses with class-agnostic regression over one stage's boxes.

  classes in 0..K (0 = background, our convention); Detectron2's index K is background.
  """
  num_classes = logits.shape[1] - 1
  labels = np.where(classes > 0, classes - 1, num_classes)
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  loss_cls = -logp[np.arange(len(labels)), labels].mean() if len(labels) else 0.0
  fg = classes > 0
  targets = np_get_deltas(rois[fg], gt_boxes[matched[fg]], weights)
  loss_box = np.abs(deltas[fg] - targets).sum() / max(len(labels), 1)
  return loss_cls, loss_box


# ----------------------------------------------------------------------------------------------
# Training: stages against the NumPy transcription, and the gradient scale.
# ----------------------------------------------------------------------------------------------
def _cascade_config(mask_chunk_rois=0):
  c = tiny_config()  # K = 3, 2 GN convs of 32 + fc 64, 64 ROIs per image
  c.roi_heads.name = "cascade"
  c.mask_head.chunk_rois = mask_chunk_rois
  return c


@pytest.fixture(scope="module")
def training_case():
  """Random FPN features, proposals and ground truth of 3 images (3, 1 and 0 objects; heights
  128, 96, 128 and widths 128, 128, 100 inside a 128 x 128 batch), the cascade heads, and
  parameters whose box deltas move boxes by about a tenth of their size."""
  rng = _rng()
  b, g, p, c = 3, 4, 100, 32
  features = {
    k: rng.normal(size=(b, SIZE // s, SIZE // s, c)).astype(np.float32) for k, s in STRIDES.items()
  }
  image_hw = np.array([[128, 128], [96, 128], [128, 100]], np.int32)
  gt_boxes = np.zeros((b, g, 4), np.float32)
  gt_classes = np.zeros((b, g), np.int32)
  for i, n in enumerate((3, 1, 0)):
    gt_boxes[i, :n] = _random_boxes(rng, n, 0, 90, 16, 40)
    gt_classes[i, :n] = rng.integers(1, 4, n)
  proposals = np.zeros((b, p, 4), np.float32)
  for i in range(b):
    near = gt_boxes[i, rng.integers(0, max(int((gt_classes[i] > 0).sum()), 1), p // 2)]
    near = near + rng.normal(scale=4.0, size=near.shape).astype(np.float32)
    # Random boxes anywhere in the padded batch: some lie beyond image 1's and 2's borders and
    # become empty when clipped for the next stage.
    proposals[i] = np.concatenate([near, _random_boxes(rng, p - p // 2, 0, SIZE, 8, 50)])
  proposals[..., 2:] = np.maximum(proposals[..., 2:], proposals[..., :2] + 2)
  proposal_valid = rng.uniform(size=(b, p)) < 0.9
  gt_masks = np.ones((b, g, 32, 32), np.uint8)
  heads = mask_rcnn.build_roi_heads(_cascade_config())
  args = (features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks)
  key = jax.random.key(int(rng.integers(1 << 30)))
  params = jax.jit(lambda k: heads.init({"params": k, "sampling": k}, *args, train=True))(key)[
    "params"
  ]
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 100.0 if "bbox_pred" in jax.tree_util.keystr(path) else x, params
  )
  return dict(heads=heads, args=args, params=params, key=key)


def test_parameter_tree_is_detectron2s_module_list():
  heads = mask_rcnn.build_roi_heads(_cascade_config())
  b, r = 1, 8
  features = {k: jnp.zeros((b, SIZE // s, SIZE // s, 32)) for k, s in STRIDES.items()}
  args = (features, jnp.zeros((b, r, 4)), jnp.ones((b, r), bool), jnp.full((b, 2), SIZE))
  shapes = jax.eval_shape(
    lambda: heads.init(
      {"params": jax.random.key(0), "sampling": jax.random.key(1)}, *args, train=False
    )
  )["params"]
  assert set(shapes) == {"box_head", "box_predictor", "mask_head"}
  assert set(shapes["box_head"]) == set(shapes["box_predictor"]) == {"0", "1", "2"}
  for k in "012":
    assert set(shapes["box_head"][k]) == {"conv1", "conv2", "fc1"}
    assert shapes["box_predictor"][k]["cls_score"]["kernel"].shape == (64, 4)
    assert shapes["box_predictor"][k]["bbox_pred"]["kernel"].shape == (64, 4)  # class-agnostic
  c = _cascade_config()
  c.roi_heads.cascade_iou_thresholds = (0.4, 0.6, 0.7)
  with pytest.raises(ValueError, match="iou_threshold"):
    mask_rcnn.build_roi_heads(c)
  c.roi_heads.name = "other"
  with pytest.raises(ValueError, match="'standard' or 'cascade'"):
    mask_rcnn.build_roi_heads(c)


def test_stages_match_detectron2_rules(training_case):
  heads, args, params, key = (training_case[k] for k in ("heads", "args", "params", "key"))
  losses, state = jax.jit(
    lambda p: heads.apply(
      {"params": p}, *args, train=True, rngs={"sampling": key}, mutable=["intermediates"]
    )
  )(params)
  stages = [jax.device_get(state["intermediates"][f"stage{k}"][0]) for k in range(3)]
  features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, _ = args
  ambiguous = 0
  for k, s in enumerate(stages):
    rois_all, classes_all, gts_all, matched_all = [], [], [], []
    logits_all, deltas_all = [], []
    for i in range(len(image_hw)):
      gv = gt_classes[i] > 0
      gt = gt_boxes[i][gv].astype(np.float64)
      valid = s["valid"][i]
      if k == 0:
        # The sampler's boxes: valid proposals and the image's ground truth appended.
        pool = np.concatenate([proposals[i][proposal_valid[i]], gt_boxes[i][gv]])
        assert all(np.any(np.all(pool == r, axis=1)) for r in s["rois"][i][valid])
        fg = (np_pairwise_iou(gt, pool).max(0) >= IOUS[0]).sum() if len(gt) else 0
        num_fg = min(fg, 16)  # 64 ROIs, at most 25% foreground, background fills the rest
        assert valid.sum() == num_fg + min(len(pool) - fg, 64 - num_fg)
        rois = s["rois"][i].astype(np.float64)
      else:
        prev = stages[k - 1]
        # The previous stage's regressed boxes of the same ROIs, clipped; empty ones dropped.
        rois = np_clip(
          np_apply_deltas(prev["deltas"][i].astype(np.float64), prev["rois"][i], WEIGHTS[k - 1]),
          image_hw[i],
        )
        prev_valid = prev["valid"][i]
        np.testing.assert_allclose(s["rois"][i][prev_valid], rois[prev_valid], rtol=1e-5, atol=1e-3)
        side = np.minimum(rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1])
        sure = (side == 0) | (np.abs(side) > 1e-3)  # clipped away: exactly 0 in both
        np.testing.assert_array_equal(valid[sure], (prev_valid & (side > 0))[sure])
      iou = np_pairwise_iou(gt, rois[valid])
      matched, labels = np_match(iou, IOUS[k])
      want = np.where(labels == 1, gt_classes[i][gv][matched] if len(gt) else 0, 0)
      got = s["classes"][i][valid]
      # IoUs within float32 rounding of the threshold may go either way.
      sure = np.abs(iou.max(0) - IOUS[k]) > 1e-5 if len(gt) else np.ones(len(got), bool)
      ambiguous += int((~sure).sum())
      np.testing.assert_array_equal(got[sure], want[sure])
      fg = got > 0
      # Valid ground truth comes first in the padded rows, so the indices agree.
      np.testing.assert_array_equal(s["matched_gt"][i][valid][fg], matched[fg])
      rois_all.append(s["rois"][i][valid].astype(np.float64))
      classes_all.append(got)
      gts_all.append(gt_boxes[i].astype(np.float64))
      matched_all.append(s["matched_gt"][i][valid] + sum(len(x) for x in gts_all[:-1]))
      logits_all.append(s["logits"][i][valid].astype(np.float64))
      deltas_all.append(s["deltas"][i][valid].astype(np.float64))
    cat = np.concatenate
    loss_cls, loss_box = np_fast_rcnn_losses(
      cat(logits_all),
      cat(deltas_all),
      cat(classes_all),
      cat(rois_all),
      cat(gts_all),
      cat(matched_all),
      WEIGHTS[k],
    )
    n_fg = int((cat(classes_all) > 0).sum())
    print(f"stage {k}: {len(cat(classes_all))} boxes, {n_fg} foreground")
    assert k > 0 or n_fg > 0
    np.testing.assert_allclose(float(losses[f"loss_cls_stage{k}"]), loss_cls, rtol=1e-5)
    np.testing.assert_allclose(float(losses[f"loss_box_reg_stage{k}"]), loss_box, rtol=1e-4)
  assert ambiguous <= 2
  # Some boxes left images 1 and 2 (clipped to nothing) and stage 1 dropped them.
  assert stages[1]["valid"].sum() < stages[0]["valid"].sum()
  assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)} | {
    "loss_mask"
  }


def test_next_stage_boxes_drop_empty_only_in_training():
  rois = jnp.array([[[10.0, 10.0, 30.0, 30.0], [90.0, 90.0, 120.0, 120.0]]])
  deltas = jnp.zeros((1, 2, 4))
  hw = jnp.array([[80, 80]])
  valid = jnp.ones((1, 2), bool)
  kw = dict(box_reg_weights=WEIGHTS[0])
  boxes, v = cascade.next_stage_boxes(deltas, rois, valid, hw, drop_empty=True, **kw)
  np.testing.assert_allclose(boxes[0], [[10, 10, 30, 30], [80, 80, 80, 80]])
  assert v.tolist() == [[True, False]]
  _, v = cascade.next_stage_boxes(deltas, rois, valid, hw, drop_empty=False, **kw)
  assert v.tolist() == [[True, True]]


def test_scale_gradient():
  rng = _rng()
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  f = lambda y: jnp.sum(jnp.sin(y) * t)
  np.testing.assert_array_equal(cascade.scale_gradient(x, 0.25), x)
  np.testing.assert_allclose(
    jax.grad(lambda y: f(cascade.scale_gradient(y, 1 / 3)))(x), jax.grad(f)(x) / 3, rtol=1e-6
  )


def test_pooled_feature_gradient_is_scaled_by_one_third(training_case, monkeypatch):
  """Each stage's loss sends 1/3 of its gradient to the features; the heads' parameter
  gradients are those of the plain sum of the stages' losses."""
  heads, args, params, key = (training_case[k] for k in ("heads", "args", "params", "key"))
  features, others = args[0], args[1:]

  def grads():
    def stage_losses(f, p):
      out = heads.apply({"params": p}, f, *others, train=True, rngs={"sampling": key})
      return jnp.stack(
        [out[f"loss_cls_stage{k}"] + out[f"loss_box_reg_stage{k}"] for k in range(3)]
      )

    both = lambda f, p: (
      jax.jacrev(stage_losses)(f, p),
      jax.grad(lambda q: jnp.sum(stage_losses(f, q)))(p),
    )
    return jax.device_get(jax.jit(both)(features, params))

  scaled_f, scaled_p = grads()
  monkeypatch.setattr(cascade, "scale_gradient", lambda x, scale: x)
  plain_f, plain_p = grads()
  for level in STRIDES:
    for k in range(3):
      # Boxes under 112 pixels (all of these) pool from P2 only.
      assert level != "p2" or np.abs(plain_f[level][k]).max() > 0, k
      np.testing.assert_allclose(
        scaled_f[level][k],
        plain_f[level][k] / 3,
        rtol=1e-4,
        atol=1e-7 * np.abs(plain_f[level][k]).max(),
      )
  for a, b in zip(jax.tree_util.tree_leaves(scaled_p), jax.tree_util.tree_leaves(plain_p)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * (np.abs(b).max() + 1e-30))


# ----------------------------------------------------------------------------------------------
# A Detectron2-layout Cascade checkpoint: conversion and inference vs torchvision ops.
# ----------------------------------------------------------------------------------------------
def cascade_state_dict(rng, record, stages=3, spread=4.0):
  """Random weights under the names of Detectron2's Cascade Mask R-CNN R50-FPN (2fc box heads):
  the recorded Standard model's names with box_head / box_predictor as per-stage ModuleLists
  (CascadeROIHeads: nn.ModuleList of FastRCNNConvFCHead, of class-agnostic FastRCNNOutputLayers).
  Conv / linear weights z / sqrt(fan_in), biases 0.1 z, norm scales 1 + 0.1 z, BN variances
  1 + 0.2 |z|; the class scores spread by `spread` so that detections spread out."""
  k1 = record["num_classes"] + 1
  shapes = {
    p["name"]: tuple(p["shape"])
    for p in record["params"]
    if not p["name"].startswith(("roi_heads.box_head.", "roi_heads.box_predictor."))
  }
  for k in range(stages):
    shapes.update(
      {
        f"roi_heads.box_head.{k}.fc1.weight": (1024, 256 * 7 * 7),
        f"roi_heads.box_head.{k}.fc1.bias": (1024,),
        f"roi_heads.box_head.{k}.fc2.weight": (1024, 1024),
        f"roi_heads.box_head.{k}.fc2.bias": (1024,),
        f"roi_heads.box_predictor.{k}.cls_score.weight": (k1, 1024),
        f"roi_heads.box_predictor.{k}.cls_score.bias": (k1,),
        f"roi_heads.box_predictor.{k}.bbox_pred.weight": (4, 1024),
        f"roi_heads.box_predictor.{k}.bbox_pred.bias": (4,),
      }
    )
  sd = {}
  for name, shape in shapes.items():
    z = rng.standard_normal(shape, dtype=np.float32)
    leaf = name.rsplit(".", 1)[1]
    if leaf == "running_var":
      v = 1 + 0.2 * np.abs(z)
    elif leaf in ("running_mean", "bias"):
      v = 0.1 * z
    elif leaf == "weight" and len(shape) == 1:
      v = 1 + 0.1 * z
    else:
      v = z / np.float32(np.sqrt(np.prod(shape[1:])))
      if ".cls_score." in name:
        v = v * spread
    sd[name] = v.astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  with open(FIXTURE) as f:
    record = json.load(f)
  rng = _rng()
  sd = cascade_state_dict(rng, record)
  cfg = yaml.safe_load(record["cfg"])  # Detectron2's mask_rcnn_R_50_FPN_3x config, as it ran
  cfg["MODEL"]["ROI_HEADS"]["NAME"] = "CascadeROIHeads"  # Misc/cascade_mask_rcnn_R_50_FPN_3x
  cfg["MODEL"]["ROI_BOX_HEAD"]["CLS_AGNOSTIC_BBOX_REG"] = True
  tmp = tmp_path_factory.mktemp("cascade")
  yaml_path = tmp / "cascade.yaml"
  yaml_path.write_text(yaml.safe_dump(cfg))
  variables, model_config, meta = zoo_detectron2.convert(
    sd, str(tmp / "model_final.pkl"), d2_config=str(yaml_path)
  )
  return dict(
    sd=sd, record=record, cfg=cfg, tmp=tmp, variables=variables, model_config=model_config,
    meta=meta, rng=rng,
  )  # fmt: skip


def test_conversion_of_a_cascade_checkpoint(converted):
  sd, variables, c = converted["sd"], converted["variables"], converted["model_config"]
  assert c.roi_heads.name == "cascade"
  assert tuple(c.roi_heads.cascade_iou_thresholds) == IOUS
  assert tuple(map(tuple, c.roi_heads.cascade_bbox_reg_weights)) == WEIGHTS
  assert (c.box_head.name, c.num_classes) == ("2fc", 3)
  # Every tensor lands where the inverse map says, in our layout.
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  names = set()
  for path, value in flat:
    name = zoo_detectron2.d2_name(tuple(k.key for k in path))
    names.add(name)
    if name in sd and sd[name].ndim == 2:
      np.testing.assert_array_equal(value, sd[name].T)
  assert {n for n in sd if n.startswith("roi_heads.box_")} <= names
  # Without a config, the tensors say it is a 3-stage class-agnostic cascade.
  structure = zoo_detectron2.structure_from_tensors(sd)
  assert structure["MODEL"]["ROI_HEADS"]["NAME"] == "CascadeROIHeads"
  assert structure["MODEL"]["ROI_BOX_HEAD"]["CLS_AGNOSTIC_BBOX_REG"]
  assert (
    structure["MODEL"]["ROI_BOX_HEAD"]["NUM_CONV"],
    structure["MODEL"]["ROI_BOX_HEAD"]["NUM_FC"],
  ) == (0, 2)
  c2 = zoo_detectron2.model_config_from_d2(
    zoo_detectron2._merge(zoo_detectron2.read_d2_config(None), structure)
  )
  assert c2.roi_heads.name == "cascade" and c2.roi_heads.cascade_iou_thresholds == IOUS


def test_bad_cascade_inputs_fail_clearly(converted):
  sd, cfg, tmp = converted["sd"], converted["cfg"], converted["tmp"]
  two = {k: v for k, v in sd.items() if ".2." not in k or not k.startswith("roi_heads.box_")}
  with pytest.raises(ConversionError, match="2 stages"):
    zoo_detectron2.structure_from_tensors(two)
  standard = tmp / "standard.yaml"
  standard.write_text(converted["record"]["cfg"])
  with pytest.raises(ConversionError, match=r"roi_heads\.box_head\.0\.fc1\.weight"):
    zoo_detectron2.convert(sd, "x.pkl", d2_config=str(standard))
  specific = json.loads(json.dumps(cfg))
  specific["MODEL"]["ROI_BOX_HEAD"]["CLS_AGNOSTIC_BBOX_REG"] = False
  with pytest.raises(ConversionError, match="CLS_AGNOSTIC_BBOX_REG"):
    zoo_detectron2.model_config_from_d2(
      zoo_detectron2._merge(zoo_detectron2.BASE_RCNN_FPN, specific)
    )


def torch_pool(features, boxes, resolution):
  """ROIPooler(ROIAlignV2, sampling_ratio 0) on P2..P5 with Detectron2's level rule, from
  torchvision.ops.roi_align. features {name: (B, C, H, W)}, boxes: list of (R_i, 4)."""
  index = torch.cat([torch.full((len(b),), i, dtype=torch.float32) for i, b in enumerate(boxes)])
  rois = torch.cat(boxes)
  size = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
  level = torch.clamp(torch.floor(4 + torch.log2(size / 224 + 1e-8)), 2, 5).long()
  c = features["p2"].shape[1]
  out = torch.zeros((len(rois), c, resolution, resolution))
  for lvl in range(2, 6):
    sel = level == lvl
    if sel.any():
      out[sel] = torchvision.ops.roi_align(
        features[f"p{lvl}"],
        torch.cat([index[sel, None], rois[sel]], 1),
        resolution,
        spatial_scale=1.0 / STRIDES[f"p{lvl}"],
        sampling_ratio=0,
        aligned=True,
      )
  return out


def torch_cascade_inference(sd, features, proposals, image_hw, num_classes):
  """Detectron2's CascadeROIHeads inference and mask head, from the checkpoint's tensors."""
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  lin = lambda x, n: F.linear(x, t[n + ".weight"], t[n + ".bias"])
  boxes, probs, deltas = proposals, [], None
  for k in range(3):
    if k > 0:
      coder = torchvision.models.detection._utils.BoxCoder(WEIGHTS[k - 1], SCALE_CLAMP)
      boxes = [
        torchvision.ops.clip_boxes_to_image(coder.decode_single(d, b), tuple(map(int, hw)))
        for d, b, hw in zip(deltas, boxes, image_hw)
      ]
    x = torch_pool(features, boxes, 7).flatten(1)
    x = F.relu(lin(F.relu(lin(x, f"roi_heads.box_head.{k}.fc1")), f"roi_heads.box_head.{k}.fc2"))
    logits = lin(x, f"roi_heads.box_predictor.{k}.cls_score")
    d = lin(x, f"roi_heads.box_predictor.{k}.bbox_pred")
    probs.append(F.softmax(logits, -1))
    deltas = torch.split(d, [len(b) for b in boxes])
  scores = torch.split(sum(probs) * (1.0 / 3), [len(b) for b in boxes])
  coder = torchvision.models.detection._utils.BoxCoder(WEIGHTS[2], SCALE_CLAMP)
  out = []
  for d, b, s, hw in zip(deltas, boxes, scores, image_hw):
    pred = torchvision.ops.clip_boxes_to_image(coder.decode_single(d, b), tuple(map(int, hw)))
    s = s[:, :-1]
    keep = s > 0.05
    idx = keep.nonzero()
    det_boxes, det_scores, det_classes = pred[idx[:, 0]], s[keep], idx[:, 1]
    kept = torchvision.ops.batched_nms(det_boxes, det_scores, det_classes, 0.5)[:100]
    out.append((det_boxes[kept], det_scores[kept], det_classes[kept]))
  # Mask head on the detections.
  x = torch_pool(features, [o[0] for o in out], 14)
  for i in range(1, 5):
    n = f"roi_heads.mask_head.mask_fcn{i}"
    x = F.relu(F.conv2d(x, t[n + ".weight"], t[n + ".bias"], padding=1))
  n = "roi_heads.mask_head"
  x = F.relu(F.conv_transpose2d(x, t[n + ".deconv.weight"], t[n + ".deconv.bias"], stride=2))
  x = F.conv2d(x, t[n + ".predictor.weight"], t[n + ".predictor.bias"])
  classes = torch.cat([o[2] for o in out])
  masks = torch.split(x[torch.arange(len(classes)), classes].sigmoid(), [len(o[2]) for o in out])
  return [(*map(np.asarray, o), np.asarray(m)) for o, m in zip(out, masks)]


def test_inference_matches_torchvision_ops(converted):
  rng, sd, variables = converted["rng"], converted["sd"], converted["variables"]
  c = converted["model_config"].copy_and_resolve_references()
  for head in (c.box_head, c.mask_head):  # no RoIAlign grid cap for ROIs inside these images
    head.pooler_max_sampling_ratio = math.ceil(SIZE / 4 / head.pooler_resolution)
  c.mask_head.chunk_rois = 0
  heads = mask_rcnn.build_roi_heads(c)
  image_hw = np.array([[128, 112], [96, 128]], np.int32)
  b, p = len(image_hw), 48
  features = {
    k: rng.normal(size=(b, SIZE // s, SIZE // s, 256)).astype(np.float32)
    for k, s in STRIDES.items()
  }
  proposals = np.stack(
    [np_clip(_random_boxes(rng, p, 0, min(hw), 6, 60), hw).astype(np.float32) for hw in image_hw]
  )
  proposal_valid = np.ones((b, p), bool)
  proposal_valid[1, -8:] = False  # padding of the RPN's fixed-size output
  out = jax.jit(lambda v, *a: heads.apply({"params": v}, *a, train=False))(
    variables["params"]["roi_heads"], features, proposals, proposal_valid, image_hw
  )
  out = jax.device_get(out)
  ref = torch_cascade_inference(
    sd,
    {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for k, v in features.items()},
    [torch.from_numpy(proposals[i][proposal_valid[i]]) for i in range(b)],
    image_hw,
    c.num_classes,
  )
  for i, (boxes, scores, classes, masks) in enumerate(ref):
    n = int(out["num_detections"][i])
    print(f"image {i}: {n} detections, torch {len(boxes)}")
    assert n == len(boxes) and n > 10
    if np.array_equal(out["classes"][i, :n], classes + 1):
      print(
        f"  max |diff|: scores {np.abs(out['scores'][i, :n] - scores).max():.2e}, boxes "
        f"{np.abs(out['boxes'][i, :n] - boxes).max():.2e} px, masks "
        f"{np.abs(out['masks'][i, :n] - masks).max():.2e}"
      )
    np.testing.assert_allclose(out["scores"][i, :n], scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["classes"][i, :n], classes + 1)
    np.testing.assert_allclose(out["boxes"][i, :n], boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(out["masks"][i, :n], masks, atol=1e-4)
    assert np.all(out["masks"][i, n:] == 0) and np.all(out["classes"][i, n:] == 0)


# ----------------------------------------------------------------------------------------------
# The whole model: static shapes, one compilation.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_cascade_model_trains_without_recompiling():
  import optax  # pylint: disable=g-import-not-at-top

  rng = _rng()
  model = mask_rcnn.build_model(_cascade_config(mask_chunk_rois=4))  # skippable chunks
  batch = synthetic_batch(rng)
  key = jax.random.key(int(rng.integers(1 << 30)), impl="rbg")
  params = jax.jit(lambda k: model.init({"params": k, "sampling": k}, batch, train=False))(key)[
    "params"
  ]
  assert set(params["roi_heads"]["box_head"]) == {"0", "1", "2"}
  tx = optax.sgd(0.01)
  traces = []

  @jax.jit
  def train_step(params, opt_state, batch, key):
    traces.append(1)

    def loss_fn(p):
      losses = model.apply({"params": p}, batch, train=True, rngs={"sampling": key})
      return sum(v for k, v in losses.items() if k.startswith("loss_")), losses

    (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total, losses

  opt_state = tx.init(params)
  for counts in ((3, 2), (0, 1), (4, 4)):
    key, sub = jax.random.split(key)
    batch = synthetic_batch(rng, num_instances=counts)
    params, opt_state, total, losses = train_step(params, opt_state, batch, sub)
    stage_losses = {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)}
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"} | stage_losses
    assert all(v.dtype == jnp.float32 and v.shape == () for v in losses.values())
    assert np.isfinite(float(total)), losses
  assert len(traces) == 1
  dets = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))(params, batch)
  assert dets["boxes"].shape == (2, 10, 4) and dets["masks"].shape == (2, 10, 28, 28)
  assert dets["classes"].dtype == jnp.int32 and dets["num_detections"].shape == (2,)
