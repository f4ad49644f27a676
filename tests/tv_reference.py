"""torchvision Mask / Keypoint R-CNNs with random, well-conditioned weights, and their reference
outputs.

Shared by tests/test_torchvision_detector.py and tests/test_torchvision_keypoints.py (and usable
from a shell for the worst differences). Each model is torchvision's own: maskrcnn_resnet50_fpn,
maskrcnn_resnet50_fpn_v2, MaskRCNN with GroupNorm as scripts/benchmark_model.py builds it, or
keypointrcnn_resnet50_fpn (one class and 17 keypoints, torchvision's defaults). Weights are drawn
from a seed:
  - every norm's affine is random (a swapped scale / bias would show), BN running statistics are
    those of the test images themselves (measured in train mode, as a trained model's would be);
  - biases are random;
  - the heads are rescaled on the test images so that their outputs spread: RPN logits std 3
    (top-k and NMS orders far from ties) shifted to a maximum of 2 (below float32 sigmoid's
    saturation), class logits centred per class over the proposals, std 2, with a background
    bias, so that well over 20 detections per image pass 0.05 yet fewer than 2000 (proposal,
    class) pairs per image do (the model's test_candidates: beyond it our candidate cut would
    differ), mask logits std 3 plus 4 (masks mostly on, few pixels near the 0.5 threshold, so that a
    mask moved by one pixel keeps most of its IoU), keypoint heatmap logits std 1 (after the box
    heads are scaled, on the detections they give).
The models keep POST_NMS_TOPK proposals per image instead of 1000 (the box head's fc6 on 1000
proposals costs ~10 s per batch on a CPU); the converted config gets the same count. The keypoint
model keeps KEYPOINT_DETECTIONS detections per image instead of 100 (its head of eight 512-channel
convs costs ~4 GFLOP per detection).
"""

import functools
import os
import time

import numpy as np
import torch
import torchvision
from torchvision.models.detection import keypointrcnn_resnet50_fpn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

ARCHITECTURES = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_gn")
NUM_CLASSES = 4  # torchvision's count: background + 3 objects
KEYPOINT_ARCHITECTURE = "keypointrcnn_resnet50_fpn"
NUM_KEYPOINT_CLASSES = 2  # torchvision's keypoint R-CNN: background + person
NUM_KEYPOINTS = 17
KEYPOINT_DETECTIONS = 40
POST_NMS_TOPK = 200
# Detections whose score is within MARGIN of a cut (the score threshold, the top 100) may fall
# on either side of it in two implementations whose scores differ by ~1e-5: cases drawn with
# such a detection are drawn again (`_cut_margins`).
MARGIN = 1e-4
# IoUs of the same boxes differ by ~1e-6 between the implementations: NMS cuts get this margin.
IOU_MARGIN = 2e-5
# Draws of the heads a test tries before it gives up (a draw takes one torch forward, ~1 s).
MAX_DRAWS = 40
MAX_OBJECTNESS_LOGIT = 2.0


def build(architecture: str) -> torch.nn.Module:
  """torchvision's model of `architecture`, untrained (its own initialisation)."""
  kwargs = dict(num_classes=NUM_CLASSES, rpn_post_nms_top_n_test=POST_NMS_TOPK)
  if architecture == KEYPOINT_ARCHITECTURE:
    return keypointrcnn_resnet50_fpn(
      weights=None,
      weights_backbone=None,
      num_classes=NUM_KEYPOINT_CLASSES,
      num_keypoints=NUM_KEYPOINTS,
      rpn_post_nms_top_n_test=POST_NMS_TOPK,
      box_detections_per_img=KEYPOINT_DETECTIONS,
    )
  if architecture == "maskrcnn_resnet50_fpn":
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
  if architecture == "maskrcnn_resnet50_fpn_v2":
    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kwargs)
  # scripts/benchmark_model.py's GroupNorm model (sampling ratio 2, torchvision's default).
  gn = functools.partial(torch.nn.GroupNorm, 32)
  body = torchvision.models.resnet50(weights=None, norm_layer=gn)
  backbone = _resnet_fpn_extractor(body, trainable_layers=5, norm_layer=gn)
  return MaskRCNN(
    backbone,
    **kwargs,
    box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=gn),
    mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=gn),
  )


def no_resize(model: torch.nn.Module) -> torch.nn.Module:
  """Images enter at their own size (normalised and padded to 32 only)."""
  model.transform.resize = lambda image, target=None: (image, target)
  return model


@torch.no_grad()
def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
  for m in model.modules():
    if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
      m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
      m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
      if m.bias is not None:
        m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen))


def _calibrate_batch_norms(model, images) -> None:
  """BN running statistics := the statistics of these images (cumulative average, one pass)."""
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  if not bns:
    return
  for m in bns:
    m.reset_running_stats()
    m.momentum = None
  with torch.no_grad():
    image_list, _ = model.transform(images)
    model.backbone.train()
    features = model.backbone(image_list.tensors)
    model.backbone.eval()
    proposals, _ = model.rpn(image_list, features)
    rh = model.roi_heads
    rh.box_head.train()
    rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
    rh.box_head.eval()
    if rh.has_mask():
      few = [p[:64] for p in proposals]
      rh.mask_head.train()
      rh.mask_head(rh.mask_roi_pool(features, few, image_list.image_sizes))
      rh.mask_head.eval()
  for m in bns:
    m.momentum = 0.1


@torch.no_grad()
def _rescale_outputs(run, layers, centered=()) -> None:
  """Scales each layer (weight and bias) so that its output in `run()` has standard deviation
  std, then adds value to the bias entries `index` when given: layers = [(layer, std, extra)]
  with extra None or (index, value). The (R, C) outputs of the `centered` layers first lose each
  channel's mean over R (through the bias)."""
  seen = {id(layer): [] for layer, _, _ in layers}
  hooks = [
    layer.register_forward_hook(lambda m, i, o: seen[id(m)].append(o.detach()))
    for layer, _, _ in layers
  ]
  run()
  for h in hooks:
    h.remove()
  for layer, std, extra in layers:
    if any(layer is c for c in centered):
      out = torch.cat(seen[id(layer)])
      layer.bias.sub_(out.mean(0))
      out = out - out.mean(0)
    else:
      out = torch.cat([o.flatten() for o in seen[id(layer)]])
    factor = std / max(float(out.std()), 1e-6)
    layer.weight.mul_(factor)
    layer.bias.mul_(factor)
    if extra is not None:
      layer.bias[extra[0]] += extra[1]


def random_model(architecture: str, seed: int, images: list) -> torch.nn.Module:
  """torchvision's model with weights drawn from `seed`, conditioned on `images` (list of
  (3, H, W) float tensors in 0..1), in eval mode, resizing disabled."""
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  model = no_resize(build(architecture)).eval()
  _randomise(model, gen)
  _calibrate_batch_norms(model, images)
  image_list, _ = model.transform(images)
  with torch.no_grad():
    features = model.backbone(image_list.tensors)
  head = model.rpn.head
  _rescale_outputs(
    lambda: head(list(features.values())),
    [(head.cls_logits, 3.0, None), (head.bbox_pred, 0.2, None)],
  )
  # torchvision ranks proposals by float32 sigmoid, which saturates above a logit of ~9 (distinct
  # logits, equal probabilities): a shift of all logits, which keeps their order, avoids those ties.
  with torch.no_grad():
    top = max(float(o.max()) for o in head(list(features.values()))[0])
    head.cls_logits.bias.sub_(top - MAX_OBJECTNESS_LOGIT)
  rh = model.roi_heads

  def heads():
    proposals, _ = model.rpn(image_list, features)
    rh(features, proposals, image_list.image_sizes)

  box_layers = [
    (rh.box_predictor.cls_score, 2.0, (0, 1.5)),
    (rh.box_predictor.bbox_pred, 1.0, None),
  ]
  if rh.has_mask():
    box_layers.append((rh.mask_predictor.mask_fcn_logits, 3.0, (slice(None), 4.0)))
  # The box head's features are ReLUs: their mean alone gives each class a constant offset, which
  # could outweigh the spread over proposals and leave one class (or none) above the threshold.
  _rescale_outputs(heads, box_layers, centered=(rh.box_predictor.cls_score,))
  if rh.has_keypoint():
    _rescale_outputs(heads, [(rh.keypoint_predictor.kps_score_lowres, 1.0, None)])
  return model


def random_images(rng: np.random.Generator, sizes) -> list[np.ndarray]:
  """uint8 RGB (H, W, 3) images: smooth random colour fields with a few rectangles."""
  out = []
  for h, w in sizes:
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    img = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:h, :w]
    for _ in range(6):
      y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
      img[y : y + rng.integers(10, h // 2), x : x + rng.integers(10, w // 2)] = rng.integers(
        0, 256, 3
      )
    img += rng.normal(0, 8, img.shape)
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def to_torch(images: list[np.ndarray]) -> list:
  return [
    torch.from_numpy(np.ascontiguousarray(i.transpose(2, 0, 1))).float() / 255.0 for i in images
  ]


def _cut_margins(rh, logits, deltas, proposals, image_sizes) -> dict:
  """How far the detections are from their cuts, per image: "threshold": whether moving the
  score threshold by +-MARGIN changes no detection (True: no candidate that would survive NMS
  scores within MARGIN of it); "top_k": score gap between the last kept detection and the
  first one cut by detections_per_img (inf when none is cut); "nms": whether moving the NMS IoU
  threshold by +-IOU_MARGIN changes no detection."""
  thresh, top_k = rh.score_thresh, rh.detections_per_img
  counts = {}
  try:
    rh.detections_per_img = 10**6
    for t in (thresh - MARGIN, thresh, thresh + MARGIN):
      rh.score_thresh = t
      _, scores, _ = rh.postprocess_detections(logits, deltas, proposals, image_sizes)
      counts[t] = scores
  finally:
    rh.score_thresh, rh.detections_per_img = thresh, top_k
  # The per-class NMS: an IoU within IOU_MARGIN of nms_thresh may suppress in one implementation
  # and not the other (IoUs differ by ~1e-6): the kept detections must not depend on it.
  nms_thresh, nms_kept = rh.nms_thresh, []
  try:
    for t in (nms_thresh - IOU_MARGIN, nms_thresh + IOU_MARGIN):
      rh.nms_thresh = t
      nms_kept.append(rh.postprocess_detections(logits, deltas, proposals, image_sizes)[1])
  finally:
    rh.nms_thresh = nms_thresh
  out = {"threshold": [], "top_k": [], "nms": []}
  for lo, hi in zip(*nms_kept):
    out["nms"].append(len(lo) == len(hi) and bool(torch.equal(lo, hi)))
  for lo, mid, hi in zip(*(counts[t] for t in (thresh - MARGIN, thresh, thresh + MARGIN))):
    lo, hi = (torch.sort(x, descending=True).values[:top_k] for x in (lo, hi))
    out["threshold"].append(len(lo) == len(hi) and bool(torch.equal(lo, hi)))
    s = torch.sort(mid, descending=True).values
    out["top_k"].append(float(s[top_k - 1] - s[top_k]) if len(s) > top_k else float("inf"))
  return out


def _proposal_margins(rpn, image_list, features) -> dict:
  """Per image: "gap", the smallest objectness logit gap at the RPN's top-k cuts (each level's
  pre-NMS top-k and the post-NMS top-k; inf when nothing is cut), and "nms", whether moving the
  RPN's NMS IoU threshold by +-IOU_MARGIN keeps the same proposals."""
  from torchvision.models.detection.rpn import concat_box_prediction_layers

  feats = list(features.values())
  objectness, deltas = rpn.head(feats)
  anchors = rpn.anchor_generator(image_list, feats)
  per_level = [o[0].numel() for o in objectness]
  objectness, deltas = concat_box_prediction_layers(objectness, deltas)
  boxes = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
  top, pre_top = rpn._post_nms_top_n["testing"], rpn._pre_nms_top_n["testing"]
  nms_thresh = rpn.nms_thresh
  kept = {}
  try:
    rpn._post_nms_top_n["testing"] = 10**9
    _, scores = rpn.filter_proposals(boxes, objectness, image_list.image_sizes, per_level)
    rpn._post_nms_top_n["testing"] = top
    for t in (nms_thresh - IOU_MARGIN, nms_thresh + IOU_MARGIN):
      rpn.nms_thresh = t
      kept[t] = rpn.filter_proposals(boxes, objectness, image_list.image_sizes, per_level)[0]
  finally:
    rpn._post_nms_top_n["testing"], rpn.nms_thresh = top, nms_thresh
  gap = lambda s, k: float(s[k - 1] - s[k]) if len(s) > k else float("inf")
  logit = lambda p: torch.logit(p.double())
  out = {"gap": [], "nms": []}
  levels = objectness.detach().view(len(anchors), -1).split(per_level, dim=1)
  for i, s in enumerate(scores):
    pre = [gap(torch.sort(lv[i].double(), descending=True).values, pre_top) for lv in levels]
    out["gap"].append(min([gap(logit(s), top)] + pre))
    lo, hi = (kept[t][i] for t in (nms_thresh - IOU_MARGIN, nms_thresh + IOU_MARGIN))
    out["nms"].append(lo.shape == hi.shape and bool(torch.equal(lo, hi)))
  return out


def far_from_cuts(ref: dict) -> bool:
  """No detection of `reference`'s output within MARGIN of a cut (score threshold, top-k, NMS
  IoU), no proposal within 3 MARGIN (objectness logits, std 3) of the RPN's pre- and post-NMS
  top-k, none within IOU_MARGIN of the RPN's NMS IoU."""
  m = ref["margins"]
  return (
    all(m["threshold"])
    and all(m["nms"])
    and all(m["rpn_nms"])
    and min(m["top_k"]) >= MARGIN
    and min(m["proposals"]) >= 3 * MARGIN
  )


def model_far_from_cuts(architecture: str, seed: int, images: list):
  """random_model(architecture, seed, images) with its heads redrawn (redraw_heads) until its
  reference output is far_from_cuts, at most MAX_DRAWS times: (model, reference)."""
  model = random_model(architecture, seed, images)
  gen = torch.Generator().manual_seed(seed)
  for _ in range(MAX_DRAWS):
    ref = reference(model, images)
    if far_from_cuts(ref):
      return model, ref
    print(f"a detection within {MARGIN} of a cut {ref['margins']}: redrawn")
    redraw_heads(model, gen)
  raise AssertionError(f"{MAX_DRAWS} draws of the heads in a row were all near a cut")


def seed() -> int:
  """A fresh seed for a test's draw, printed; RETHINK_TEST_SEED=N reproduces a draw."""
  value = int(os.environ.get("RETHINK_TEST_SEED", time.time_ns() % 2**31))
  print(f"seed={value}")
  return value


@torch.no_grad()
def redraw_heads(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Perturbs the RPN's cls_logits and bbox_pred and the box predictor's cls_score by 10% (new
  draws of the objectness, the proposals' boxes, whose IoUs set the RPN's NMS, and the class
  scores; the rest of the model unchanged)."""
  heads = (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor)
  for layer in heads[:2] + (heads[2].cls_score,):
    layer.weight.mul_(1 + 0.1 * torch.randn(layer.weight.shape, generator=gen))


@torch.no_grad()
def reference(model: torch.nn.Module, images: list) -> dict:
  """torchvision's eval forward, step by step: the normalised padded batch and, per image,
  proposals, detections (boxes, scores, labels 1..K) and, by the model's branch, 28 x 28 mask
  probabilities of the label and the pasted masks, or the keypoints (N, K, 3) [x, y, 1], their
  keypoints_scores (N, K) and the 56 x 56 heatmap logits (N, K, 56, 56) they were decoded from
  (the masks and keypoints as model.forward returns them)."""
  image_list, _ = model.transform(images)
  features = model.backbone(image_list.tensors)
  proposals, _ = model.rpn(image_list, features)
  detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
  rh = model.roi_heads
  pooled = rh.box_roi_pool(features, proposals, image_list.image_sizes)
  logits, deltas = rh.box_predictor(rh.box_head(pooled))
  scores = torch.softmax(logits, -1)[:, 1:].split([len(p) for p in proposals])
  margins = _cut_margins(rh, logits, deltas, proposals, image_list.image_sizes)
  rpn_margins = _proposal_margins(model.rpn, image_list, features)
  margins["proposals"], margins["rpn_nms"] = rpn_margins["gap"], rpn_margins["nms"]
  sizes = [tuple(i.shape[-2:]) for i in images]
  # What model.forward returns: GeneralizedRCNNTransform.postprocess pastes the masks.
  full = model.transform.postprocess([dict(d) for d in detections], image_list.image_sizes, sizes)
  out = {
    "tensor": image_list.tensors.numpy(),
    "image_sizes": [tuple(s) for s in image_list.image_sizes],
    "proposals": [p.numpy() for p in proposals],
    # (proposal, class) pairs above the score threshold, before NMS.
    "candidates": [int((s > rh.score_thresh).sum()) for s in scores],
    "margins": margins,
    "boxes": [d["boxes"].numpy() for d in detections],
    "scores": [d["scores"].numpy() for d in detections],
    "labels": [d["labels"].numpy() for d in detections],
  }
  if rh.has_mask():
    out["mask_probs"] = [d["masks"][:, 0].numpy() for d in detections]
    out["pasted"] = [f["masks"][:, 0].numpy() >= 0.5 for f in full]
  if rh.has_keypoint():
    boxes = [d["boxes"] for d in detections]
    pooled = rh.keypoint_roi_pool(features, boxes, image_list.image_sizes)
    heatmaps = rh.keypoint_predictor(rh.keypoint_head(pooled))
    out["heatmaps"] = [h.numpy() for h in heatmaps.split([len(b) for b in boxes])]
    out["keypoints"] = [f["keypoints"].numpy() for f in full]
    out["keypoint_scores"] = [f["keypoints_scores"].numpy() for f in full]
  return out


@torch.no_grad()
def keypoints_at(model: torch.nn.Module, images: list, boxes: list[np.ndarray]) -> dict:
  """torchvision's keypoint branch on given boxes (per image (N, 4) in the input's pixels):
  "heatmaps" (N, K, 56, 56), "keypoints" (N, K, 3) and "keypoint_scores" (N, K) per image, as its
  eval forward decodes them for its own detections."""
  image_list, _ = model.transform(images)
  features = model.backbone(image_list.tensors)
  rh = model.roi_heads
  rois = [torch.from_numpy(np.array(b, np.float32)) for b in boxes]
  pooled = rh.keypoint_roi_pool(features, rois, image_list.image_sizes)
  heatmaps = rh.keypoint_predictor(rh.keypoint_head(pooled))
  out = {"heatmaps": [], "keypoints": [], "keypoint_scores": []}
  for h, b in zip(heatmaps.split([len(b) for b in rois]), rois):
    xy, scores = heatmaps_to_keypoints(h, b)
    out["heatmaps"].append(h.numpy())
    out["keypoints"].append(xy.numpy())
    out["keypoint_scores"].append(scores.numpy())
  return out


def match(ref: dict, i: int, boxes: np.ndarray, labels: np.ndarray) -> list[tuple[int, int]]:
  """Pairs (j in torchvision's detections of image i, q in ours: `boxes`, `labels`), one-to-one
  with the same label, the assignment of least total box distance (max coordinate difference),
  in torchvision's score order. A global assignment: a greedy nearest-box pairing can hand a
  near-duplicate's partner to the wrong detection."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  tb, tl = np.asarray(ref["boxes"][i]), np.asarray(ref["labels"][i])
  boxes, labels = np.asarray(boxes).reshape(-1, 4), np.asarray(labels)
  dist = np.abs(tb[:, None, :] - boxes[None, :, :]).max(-1)
  cost = np.where(tl[:, None] == labels[None, :], dist, 1e9)
  rows, cols = optimize.linear_sum_assignment(cost)
  partner = dict(zip(rows.tolist(), cols.tolist()))
  pairs = []
  for j in np.argsort(-np.asarray(ref["scores"][i]), kind="stable"):
    q = partner.get(int(j))
    assert q is not None and cost[j, q] < 1e9, (
      f"image {i}: torchvision detection {j} (label {tl[j]}) has no partner"
    )
    pairs.append((int(j), int(q)))
  return pairs
