"""ROI heads of Mask R-CNN (Detectron2's StandardROIHeads), with static shapes.

Training, per image: ground-truth boxes are appended to the proposals, every box is matched to the
ground truth at IoU 0.5 (no low-quality matches), and a balanced sampler picks 512 ROIs, at most 25%
foreground. The box branch pools 7x7 with the multilevel RoIAlign (P2..P5, aligned, adaptive
sampling), runs the box head ("4conv1fc" or "2fc") and the box predictor. The mask branch trains on
a fixed `max_fg_rois` foreground ROIs per image with a validity mask (the TPU reference's design),
in chunks that are skipped when they hold no foreground ROI (`mask_chunk_rois`). The keypoint
branch (Keypoint R-CNN, optional) does the same on the foreground ROIs that hold at least one
visible keypoint (Detectron2's select_proposals_with_visible_keypoints), pooling 14x14.

Class index conventions: labels in the batch are 0 = background, 1..K objects. Inside the box
predictor the logits follow Detectron2's order (column k-1 is class k, column K is background) and
the class-specific deltas are (K, 4) class-major, so predictor weights map 1:1 to Detectron2's.
fc1 of the box head flattens its input in (C, H, W) order for the same reason.

Inference, per image: softmax scores, class-specific decoding, clipping, score > 0.05, per-class NMS
0.5 keeping 100, then the mask head on the kept boxes and the sigmoid of the predicted class's mask,
and the keypoint head on the kept boxes with its heatmaps decoded to keypoints.

StandardROIHeads receives its poolers, box head, box predictor, mask head and keypoint head built
(either of the last two may be absent: config mask_on / keypoint_on), as Detectron2's does;
`build_roi_heads(model_config)` builds them.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.models import keypoint_head as keypoint_lib
from rethink_jax.models import layers
from rethink_jax.models.layers import Activation
from rethink_jax.models.layers import ConvDef
from rethink_jax.models.layers import DenseDef
from rethink_jax.ops import boxes as box_ops
from rethink_jax.ops import keypoints as keypoint_ops
from rethink_jax.ops import masks as mask_ops
from rethink_jax.ops import matching
from rethink_jax.ops import sampling
from rethink_jax.ops import xla_cpu
from rethink_jax.ops.nms import batched_nms
from rethink_jax.ops.roi_align import multilevel_roi_align

Array = jax.Array
# ConvTranspose2d(C, C, 2, 2) weight is (C_in, C_out, 2, 2) in PyTorch, whose "fan_out" is C_in*4:
# our (2, 2, C_in, C_out) kernel's fan_in.
_DECONV_FILL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

POOLER_FEATURES = ("p2", "p3", "p4", "p5")  # every pooler's (Detectron2: IN_FEATURES)


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ROIPooler:
  """Multilevel RoIAlign on P2..P5 (Detectron2's ROIPooler, ROIAlignV2): no parameters.

  __call__(features {"p2".."p5": (B, H_l, W_l, C)}, rois (B, R, 4)) -> (B*R, S, S, C),
  S = resolution.
  """

  resolution: int
  sampling_ratio: int  # 0: adaptive, ceil(roi size / resolution) taps per bin
  aligned: bool
  max_sampling_ratio: int = 4  # static cap of the adaptive grid
  level_rule: str = "detectron2"  # or "torchvision" (ops.roi_align.assign_levels)

  def __call__(self, features: Mapping[str, Array], rois: Array) -> Array:
    feats = {k: features[k] for k in POOLER_FEATURES}
    x = multilevel_roi_align(
      feats,
      rois,
      self.resolution,
      self.sampling_ratio,
      self.aligned,
      max_sampling_ratio=self.max_sampling_ratio,
      level_rule=self.level_rule,
    )
    return x.reshape((-1,) + x.shape[2:])


class FastRCNNConvFCHead(nn.Module):
  """Box head: num_conv x (conv3x3 + norm + ReLU), then num_fc x (fc + ReLU).

  "4conv1fc": num_conv=4, num_fc=1; "2fc": num_conv=0, num_fc=2.
  __call__(x (R, S, S, C), train) -> (R, fc_dim) (or (R, S*S*conv_dim) when num_fc == 0).

  Attributes:
    conv: the head's normed Conv2d (layers.conv_def); dense: its nn.Dense (layers.dense_def).
  """

  num_conv: int
  conv_dim: int
  num_fc: int
  fc_dim: int
  conv: ConvDef
  dense: DenseDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    _check(x.ndim == 4, f"box head input must be (R, S, S, C), got {x.shape}")
    for i in range(self.num_conv):
      x = self.conv(self.conv_dim, 3, padding=1, kernel_init=layers.msra_fill, name=f"conv{i + 1}")(
        x, train=train
      )
      x = self.activation(x)
    # Flatten in (C, H, W) order, as PyTorch does, so fc1 maps 1:1 onto Detectron2's weight.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for i in range(self.num_fc):
      x = self.activation(
        self.dense(self.fc_dim, kernel_init=layers.xavier_fill, name=f"fc{i + 1}")(x)
      )
    return x


class FastRCNNOutputLayers(nn.Module):
  """Box predictor: cls_score (K+1, background last) and class-specific bbox_pred (4K).

  __call__(x (R, D)) -> (logits (R, K+1) float32, deltas (R, K, 4) float32).
  """

  num_classes: int
  dense: DenseDef

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    _check(x.ndim == 2, f"box predictor input must be (R, D), got {x.shape}")
    logits = self.dense(
      self.num_classes + 1, kernel_init=nn.initializers.normal(0.01), name="cls_score"
    )(x)
    deltas = self.dense(
      4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), name="bbox_pred"
    )(x)
    return (
      logits.astype(jnp.float32),
      deltas.astype(jnp.float32).reshape(x.shape[0], self.num_classes, 4),
    )


class ConvTranspose2x2(nn.Module):
  """ConvTranspose 2x2 stride 2 (no overlap): one (R*H*W, C_in) @ (C_in, 4*C_out) product + a
  pixel shuffle (a 2D product: XLA:CPU copied einsum's 4D operands transposed in the backward).

  Owns "kernel" (2, 2, C_in, C_out) with kernel[a, b, c, o] = PyTorch weight[c, o, a, b], and
  "bias".
  __call__(x (R, H, W, C_in)) -> (R, 2H, 2W, C_out), computed in x's dtype.
  """

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    r, h, w, c = x.shape
    kernel = self.param("kernel", _DECONV_FILL, (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    k = kernel.astype(x.dtype).transpose(2, 0, 1, 3).reshape(c, 4 * self.features)
    y = (x.reshape(r * h * w, c) @ k).reshape(r, h, w, 2, 2, self.features)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(r, 2 * h, 2 * w, self.features)
    return xla_cpu.add_bias(y, bias.astype(x.dtype))


class ClassMaskPredictor(nn.Module):
  """1x1 conv to one mask per class, evaluated only on the channel of each ROI's class.

  Owns "kernel" (1, 1, C, K) and "bias" (K,) (a plain 1x1 conv's parameters, init N(0, 0.001)).
  __call__(x (R, M, M, C), classes (R,) int in 1..K (0 is treated as class 1)) -> logits (R, M, M)
  float32; the product is computed in x's dtype.
  """

  num_classes: int

  @nn.compact
  def __call__(self, x: Array, classes: Array) -> Array:
    _check(
      x.ndim == 4 and classes.shape == x.shape[:1],
      f"mask predictor wants x (R, M, M, C) and classes (R,), got {x.shape}, {classes.shape}",
    )
    kernel = self.param(
      "kernel", nn.initializers.normal(0.001), (1, 1, x.shape[-1], self.num_classes), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
    k = jnp.clip(classes - 1, 0, self.num_classes - 1)
    w = kernel[0, 0].T[k]  # (R, C)
    logits = jnp.einsum("rhwc,rc->rhw", x, w.astype(x.dtype))
    return logits.astype(jnp.float32) + bias[k][:, None, None]


class MaskRCNNConvUpsampleHead(nn.Module):
  """Mask head: num_conv x (conv3x3 + norm + ReLU), deconv 2x2 s2 + ReLU, class-specific 1x1.

  __call__(x (R, 14, 14, C), classes (R,), train) -> mask logits (R, 28, 28) float32 of `classes`.

  Attributes:
    conv: the head's normed Conv2d (layers.conv_def); the deconv and the predictor compute in
      the dtype of its output.
  """

  num_classes: int
  num_conv: int
  conv_dim: int
  conv: ConvDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, classes: Array, train: bool = False) -> Array:
    _check(x.ndim == 4, f"mask head input must be (R, S, S, C), got {x.shape}")
    _check(self.num_conv > 0, "the mask head needs num_conv >= 1 (its convs set the dtype)")
    for i in range(self.num_conv):
      x = self.conv(
        self.conv_dim, 3, padding=1, kernel_init=layers.msra_fill, name=f"mask_fcn{i + 1}"
      )(x, train=train)
      x = self.activation(x)
    x = self.activation(ConvTranspose2x2(self.conv_dim, name="deconv")(x))
    return ClassMaskPredictor(self.num_classes, name="predictor")(x, classes)


# ----------------------------------------------------------------------------------------------
# Per-image label/sample, losses and inference (plain functions; vmapped over the batch).
# ----------------------------------------------------------------------------------------------
def label_and_sample_proposals(
  proposals: Array,
  proposal_valid: Array,
  gt_boxes: Array,
  gt_classes: Array,
  key: Array,
  *,
  batch_size_per_image: int,
  positive_fraction: float,
  iou_threshold: float,
  append_gt: bool,
) -> dict[str, Array]:
  """Detectron2's label_and_sample_proposals for one image.

  Args:
    proposals (P, 4), proposal_valid (P,) bool, gt_boxes (G, 4), gt_classes (G,) int (0 = padding),
    key: PRNG key of the sampler.
  Returns dict of S = batch_size_per_image sampled ROIs:
    rois (S, 4), classes (S,) int32 (0 = background), matched_gt (S,) int32, valid (S,) bool.
  """
  _check(
    proposals.shape == proposal_valid.shape + (4,) and gt_boxes.shape == gt_classes.shape + (4,),
    f"proposals {proposals.shape}, proposal_valid {proposal_valid.shape}, gt_boxes "
    f"{gt_boxes.shape}, gt_classes {gt_classes.shape}: want (P, 4), (P,), (G, 4), (G,)",
  )
  gt_valid = gt_classes > 0
  boxes, valid = proposals, proposal_valid
  if append_gt:
    boxes = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)])
    valid = jnp.concatenate([proposal_valid, gt_valid])
  iou = box_ops.box_iou(gt_boxes, boxes)  # (G, P + G)
  matched_gt, labels = matching.match(iou, gt_valid, (iou_threshold,), (0, 1), False)
  fg = (labels == 1) & jnp.any(gt_valid)
  classes = jnp.where(fg, gt_classes[matched_gt], 0).astype(jnp.int32)
  sampler_labels = jnp.where(valid, fg.astype(jnp.int32), -1)
  idx, svalid = sampling.sample_balanced(
    sampler_labels, batch_size_per_image, positive_fraction, key
  )
  safe = jnp.where(svalid, idx, 0)
  return {
    "rois": jnp.where(svalid[:, None], boxes[safe], 0.0),
    "classes": jnp.where(svalid, classes[safe], 0),
    "matched_gt": matched_gt[safe].astype(jnp.int32),
    "valid": svalid,
  }


def select_foreground(
  samples: Mapping[str, Array], max_fg_rois: int, eligible: Optional[Array] = None
) -> dict[str, Array]:
  """The first max_fg_rois foreground ROIs of one image's samples (label_and_sample output),
  of those where `eligible` (S,) bool is True when given.

  Returns dict rois (M, 4), classes (M,), matched_gt (M,), valid (M,) bool.
  """
  fg = samples["valid"] & (samples["classes"] > 0)
  if eligible is not None:
    fg &= eligible
  order = jnp.argsort(~fg, stable=True)[:max_fg_rois]
  out = {k: samples[k][order] for k in ("rois", "classes", "matched_gt")}
  out["valid"] = fg[order]
  return out


def fast_rcnn_losses(
  logits: Array, deltas: Array, classes: Array, valid: Array, targets: Array
) -> dict[str, Array]:
  """Detectron2's FastRCNNOutputLayers.losses over a batch of sampled ROIs.

  Args:
    logits (N, K+1) (background last), deltas (N, K, 4), classes (N,) in 0..K (0 = background),
    valid (N,) bool, targets (N, 4) encoded regression targets of each ROI's matched gt.
  Returns {"loss_cls": mean softmax CE over valid ROIs,
           "loss_box_reg": L1 over foreground / number of valid ROIs}.
  """
  n, k1 = logits.shape
  _check(
    deltas.shape == (n, k1 - 1, 4)
    and classes.shape == (n,)
    and valid.shape == (n,)
    and targets.shape == (n, 4),
    f"logits {logits.shape}, deltas {deltas.shape}, classes {classes.shape}, valid "
    f"{valid.shape}, targets {targets.shape} disagree",
  )
  num_classes = k1 - 1
  fvalid = valid.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(fvalid), 1.0)
  target_index = jnp.where(classes > 0, classes - 1, num_classes)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, target_index[:, None], axis=-1)[:, 0]
  loss_cls = jnp.sum(ce * fvalid) / denom
  fg = valid & (classes > 0)
  pred = jnp.take_along_axis(deltas, jnp.clip(classes - 1, 0)[:, None, None], axis=1)[:, 0]
  # Background ROIs may carry non-finite targets (matched to padding): `where`, not a product.
  l1 = jnp.sum(jnp.abs(pred - jnp.where(fg[:, None], targets, 0.0)), axis=-1)
  return {"loss_cls": loss_cls, "loss_box_reg": jnp.sum(jnp.where(fg, l1, 0.0)) / denom}


def mask_rcnn_loss(mask_logits: Array, mask_targets: Array, valid: Array) -> Array:
  """Mean per-pixel sigmoid BCE over the valid foreground ROIs.

  mask_logits (N, M, M) of each ROI's gt class, mask_targets (N, M, M) in {0, 1}, valid (N,).
  """
  _check(
    mask_logits.shape == mask_targets.shape and valid.shape == mask_logits.shape[:1],
    f"mask_logits {mask_logits.shape}, targets {mask_targets.shape}, valid {valid.shape}",
  )
  x = mask_logits.astype(jnp.float32)
  bce = jnp.maximum(x, 0) - x * mask_targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
  w = valid.astype(jnp.float32)[:, None, None]
  pixels = jnp.maximum(jnp.sum(w) * x.shape[1] * x.shape[2], 1.0)
  return jnp.sum(bce * w) / pixels


def fast_rcnn_inference(
  proposals: Array,
  proposal_valid: Array,
  logits: Array,
  deltas: Array,
  image_hw: Array,
  *,
  box_reg_weights: Sequence[float],
  score_thresh: float,
  nms_thresh: float,
  detections_per_image: int,
  num_candidates: int,
  min_box_size: float = 0.0,
  probs: Optional[Array] = None,
) -> tuple[Array, Array, Array, Array]:
  """Detections of one image (Detectron2's fast_rcnn_inference_single_image, fixed shapes).

  Before the per-class NMS the (proposal, class) candidates above score_thresh are cut to the
  num_candidates best (exact whenever fewer pass the threshold, the usual case). Candidates whose
  clipped box has w < min_box_size or h < min_box_size are dropped (torchvision 1e-2; 0 keeps all).
  Args:
    proposals (P, 4), proposal_valid (P,), logits (P, K+1) (background last), deltas (P, K, 4),
    image_hw (2,); probs: (P, K+1) class probabilities used instead of softmax(logits) (Cascade
    R-CNN's average over its stages).
  Returns boxes (D, 4), scores (D,), classes (D,) int32 in 1..K (0 = padding), num (int32), with
  D = detections_per_image; padded rows are zero.
  """
  p, k1 = logits.shape
  k = k1 - 1
  _check(
    proposals.shape == (p, 4) and deltas.shape == (p, k, 4),
    f"proposals {proposals.shape}, logits {logits.shape}, deltas {deltas.shape} disagree",
  )
  if probs is None:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _check(probs.shape == (p, k1), f"probs {probs.shape} != logits {logits.shape}")
  scores = probs.astype(jnp.float32)[:, :k]
  anchors = jnp.broadcast_to(proposals[:, None, :], (p, k, 4))
  boxes = box_ops.decode_boxes(deltas.reshape(p * k, 4), anchors.reshape(p * k, 4), box_reg_weights)
  finite = jnp.all(jnp.isfinite(boxes), axis=-1)
  boxes = box_ops.clip_boxes(jnp.where(finite[:, None], boxes, 0.0), image_hw)
  scores = scores.reshape(-1)
  keep = finite & jnp.repeat(proposal_valid, k) & (scores > score_thresh)
  if min_box_size > 0:
    keep &= (boxes[:, 2] - boxes[:, 0] >= min_box_size) & (
      boxes[:, 3] - boxes[:, 1] >= min_box_size
    )
  scores = jnp.where(keep, scores, -jnp.inf)
  cand_scores, cand = jax.lax.top_k(scores, min(num_candidates, p * k))
  cand_boxes = boxes[cand]
  cand_classes = (cand % k + 1).astype(jnp.int32)
  idx, num = batched_nms(cand_boxes, cand_scores, cand_classes, nms_thresh, detections_per_image)
  ok = jnp.arange(detections_per_image) < num
  safe = jnp.where(ok, idx, 0)
  return (
    jnp.where(ok[:, None], cand_boxes[safe], 0.0),
    jnp.where(ok, cand_scores[safe], 0.0),
    jnp.where(ok, cand_classes[safe], 0),
    num.astype(jnp.int32),
  )


# ----------------------------------------------------------------------------------------------
# StandardROIHeads.
# ----------------------------------------------------------------------------------------------
class StandardROIHeads(nn.Module):
  """Box, mask and keypoint branches. Parameters: box_head, box_predictor, mask_head (when
  built), keypoint_head (when built).

  __call__(features {"p2".."p5": (B, H_l, W_l, C)}, proposals (B, P, 4), proposal_valid (B, P),
           image_hw (B, 2), gt_boxes (B, G, 4), gt_classes (B, G), gt_masks (B, G, S, S) crops
           or (B, G, H, W) full-image masks (mask_target_rule "full_image"), gt_keypoints
           (B, G, K, 3) [x, y, v] in input pixels, train)
    train: {"loss_cls", "loss_box_reg"} and "loss_mask" / "loss_keypoint" with their heads,
           float32 scalars.
    test:  {"boxes" (B, D, 4), "scores" (B, D), "classes" (B, D), "num_detections" (B,)}, and
           with the mask head "masks" (B, D, 28, 28) probabilities, with the keypoint head
           "keypoints" (B, D, K, 3) [x, y, score] in input pixels (Detectron2's pred_keypoints:
           score = softmax of the resized heatmap's maximum over the 56 x 56 map) and
           "keypoint_logits" (B, D, K) (the resized heatmap's maximum: torchvision's
           keypoints_scores); rows of padding detections are 0.

  The sub-modules come built (`build_roi_heads`); the other attributes are the config's
  roi_heads section, mask_head.{max_fg_rois, resolution, chunk_rois, target_rule} and
  keypoint_head.{max_fg_rois, chunk_rois, loss_weight, resize_cap} with the loss normaliser.
  """

  num_classes: int
  box_pooler: ROIPooler
  box_head: nn.Module
  box_predictor: nn.Module
  # Sampling.
  batch_size_per_image: int
  positive_fraction: float
  iou_threshold: float
  proposal_append_gt: bool
  bbox_reg_weights: Sequence[float]
  # Inference.
  score_thresh_test: float
  nms_thresh_test: float
  detections_per_image: int
  test_candidates: int
  min_box_size_test: float
  # Mask branch (absent when mask_head is None).
  mask_pooler: Optional[ROIPooler] = None
  mask_head: Optional[nn.Module] = None
  mask_max_fg_rois: int = 128
  mask_resolution: int = 28
  mask_chunk_rois: int = 0  # 0: one pass; must be 0 when the mask head's norm has batch statistics
  mask_target_rule: str = "crop"  # config mask_head.target_rule
  # Keypoint branch (absent when keypoint_head is None).
  keypoint_pooler: Optional[ROIPooler] = None
  keypoint_head: Optional[nn.Module] = None
  keypoint_max_fg_rois: int = 128
  keypoint_chunk_rois: int = 0
  keypoint_loss_weight: float = 1.0
  # None: divide by the batch's visible keypoints; else by this times the number of images.
  keypoint_loss_normalizer: Optional[float] = None
  keypoint_resize_cap: int = 64

  def _box_branch(self, features, rois, train):
    b, r = rois.shape[:2]
    logits, deltas = self.box_predictor(self.box_head(self.box_pooler(features, rois), train=train))
    return logits.reshape(b, r, -1), deltas.reshape(b, r, self.num_classes, 4)

  def _mask_branch(self, features, rois, classes, train):
    b, r = rois.shape[:2]
    logits = self.mask_head(self.mask_pooler(features, rois), classes.reshape(-1), train=train)
    return logits.reshape((b, r) + logits.shape[1:])

  def _keypoint_branch(self, features, rois, train):
    b, r = rois.shape[:2]
    logits = self.keypoint_head(self.keypoint_pooler(features, rois), train=train)
    return logits.reshape((b, r) + logits.shape[1:])

  def _keypoint_predictions(self, features, rois):
    b, r = rois.shape[:2]
    logits = self._keypoint_branch(features, rois, False)
    out = keypoint_ops.heatmaps_to_keypoints(
      logits.reshape((b * r,) + logits.shape[2:]), rois.reshape(-1, 4), self.keypoint_resize_cap
    )
    return out.reshape((b, r) + out.shape[1:])

  def _in_chunks(self, branch, tail, chunk, valid, features, *per_roi):
    """branch(module, features, *per_roi) -> (B, R) + tail float32, over the R slots of per_roi
    ((B, R, ...) arrays) in chunks of `chunk` per image; a chunk with no valid slot in any image
    of the (global) batch is skipped (zeros): the static maximum (128 foreground ROIs, 100
    detections) is paid only where ROIs fill it, as torchvision pays only for its positives.
    Valid slots come first in every image, so the result equals one pass over all R.
    """
    b, r = valid.shape
    if not chunk or chunk >= r or self.is_initializing():
      return branch(self, features, *per_roi)
    skip = lambda mdl, f, x, *rest: jnp.zeros(x.shape[:2] + tuple(tail), jnp.float32)
    out = [
      nn.cond(
        jnp.any(valid[:, s : s + chunk]),
        branch,
        skip,
        self,
        features,
        *(a[:, s : s + chunk] for a in per_roi),
      )
      for s in range(0, r, chunk)
    ]
    return jnp.concatenate(out, axis=1)

  def _mask_logits(self, features, rois, classes, valid, train):
    """(B, R, 4) boxes, (B, R) classes, (B, R) valid -> (B, R, M, M) mask logits."""
    m = self.mask_resolution
    run = lambda mdl, f, x, c: mdl._mask_branch(f, x, c, train)
    return self._in_chunks(run, (m, m), self.mask_chunk_rois, valid, features, rois, classes)

  def _check_inputs(
    self, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks, gt_keypoints, train
  ):
    """Shapes of the inputs, and the ground truth each head needs in training."""
    _check(
      proposals.shape[-1] == 4
      and proposal_valid.shape == proposals.shape[:2]
      and image_hw.shape == (proposals.shape[0], 2),
      f"proposals {proposals.shape}, proposal_valid {proposal_valid.shape}, image_hw "
      f"{image_hw.shape}: want (B, P, 4), (B, P), (B, 2)",
    )
    if not train:
      return
    _check(
      gt_boxes is not None and gt_classes is not None,
      "training the ROI heads needs gt_boxes and gt_classes",
    )
    _check(self.mask_head is None or gt_masks is not None, "training the mask head needs gt_masks")
    _check(
      self.keypoint_head is None or gt_keypoints is not None,
      "training the keypoint head needs gt_keypoints",
    )

  def __call__(
    self,
    features: Mapping[str, Array],
    proposals: Array,
    proposal_valid: Array,
    image_hw: Array,
    gt_boxes: Optional[Array] = None,
    gt_classes: Optional[Array] = None,
    gt_masks: Optional[Array] = None,
    gt_keypoints: Optional[Array] = None,
    *,
    train: bool,
  ) -> dict[str, Array]:
    self._check_inputs(
      proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks, gt_keypoints, train
    )
    weights = tuple(self.bbox_reg_weights)
    if not train:
      return self._inference(features, proposals, proposal_valid, image_hw)

    samples = self._sample_proposals(proposals, proposal_valid, gt_boxes, gt_classes)

    # Box branch.
    logits, deltas = self._box_branch(features, samples["rois"], train)
    matched_boxes = jnp.take_along_axis(gt_boxes, samples["matched_gt"][..., None], axis=1)
    targets = box_ops.encode_boxes(
      matched_boxes.reshape(-1, 4), samples["rois"].reshape(-1, 4), weights
    )
    losses = fast_rcnn_losses(
      logits.reshape(-1, self.num_classes + 1),
      deltas.reshape(-1, self.num_classes, 4),
      samples["classes"].reshape(-1),
      samples["valid"].reshape(-1),
      jax.lax.stop_gradient(targets),
    )
    if self.mask_head is not None:
      losses["loss_mask"] = self._mask_loss(features, samples, gt_boxes, gt_masks, train)
    if self.keypoint_head is not None:
      losses["loss_keypoint"] = self._keypoint_loss(features, samples, gt_keypoints, train)
    return losses

  def _sample_proposals(self, proposals, proposal_valid, gt_boxes, gt_classes):
    """label_and_sample_proposals per image with this module's settings (no gradient)."""
    keys = jax.random.split(self.make_rng("sampling"), proposals.shape[0])
    sample = lambda p, v, g, c, k: label_and_sample_proposals(
      p,
      v,
      g,
      c,
      k,
      batch_size_per_image=self.batch_size_per_image,
      positive_fraction=self.positive_fraction,
      iou_threshold=self.iou_threshold,
      append_gt=self.proposal_append_gt,
    )
    samples = jax.vmap(sample)(proposals, proposal_valid, gt_boxes, gt_classes, keys)
    return jax.lax.stop_gradient(samples)

  def _mask_loss(self, features, samples, gt_boxes, gt_masks, train):
    """The mask branch on a fixed number of foreground ROIs per image: loss_mask."""
    fg = jax.vmap(lambda s: select_foreground(s, self.mask_max_fg_rois))(samples)
    if self.mask_target_rule == "full_image":
      targets = jax.vmap(
        lambda m, r, i: mask_ops.full_image_mask_targets(m, r, i, self.mask_resolution)
      )(gt_masks, fg["rois"], fg["matched_gt"])
    else:
      targets = jax.vmap(
        lambda m, g, r, i: mask_ops.mask_targets(m, g, r, i, self.mask_resolution)
      )(gt_masks, gt_boxes, fg["rois"], fg["matched_gt"])
    mask_logits = self._mask_logits(features, fg["rois"], fg["classes"], fg["valid"], train)
    m = self.mask_resolution
    return mask_rcnn_loss(
      mask_logits.reshape(-1, m, m),
      jax.lax.stop_gradient(targets).reshape(-1, m, m),
      fg["valid"].reshape(-1),
    )

  def _keypoint_loss(self, features, samples, gt_keypoints, train):
    """The keypoint branch on the first keypoint_max_fg_rois foreground ROIs of each image with
    a visible keypoint inside (Detectron2's select_proposals_with_visible_keypoints):
    loss_keypoint."""
    gt_keypoints = gt_keypoints.astype(jnp.float32)
    matched = jax.vmap(lambda kp, i: kp[i])(gt_keypoints, samples["matched_gt"])  # (B, S, K, 3)
    eligible = jax.vmap(keypoint_ops.has_visible_keypoint_in_box)(matched, samples["rois"])
    fg = jax.vmap(lambda s, e: select_foreground(s, self.keypoint_max_fg_rois, e))(
      samples, eligible
    )
    fg_keypoints = jax.vmap(lambda kp, i: kp[i])(gt_keypoints, fg["matched_gt"])  # (B, M, K, 3)
    run = lambda mdl, f, x: mdl._keypoint_branch(f, x, train)
    side = 4 * self.keypoint_pooler.resolution  # deconv x2, then bilinear x2
    k = gt_keypoints.shape[2]
    logits = self._in_chunks(
      run, (side, side, k), self.keypoint_chunk_rois, fg["valid"], features, fg["rois"]
    )
    normalizer = None
    if self.keypoint_loss_normalizer is not None:
      normalizer = self.keypoint_loss_normalizer * fg["rois"].shape[0]
    loss = keypoint_lib.keypoint_rcnn_loss(
      logits.reshape((-1,) + logits.shape[2:]),
      fg["rois"].reshape(-1, 4),
      jax.lax.stop_gradient(fg_keypoints).reshape(-1, k, 3),
      fg["valid"].reshape(-1),
      normalizer,
    )
    return loss * self.keypoint_loss_weight

  def _inference(self, features, proposals, proposal_valid, image_hw):
    logits, deltas = self._box_branch(features, proposals, False)
    infer = lambda p, v, l, d, hw: fast_rcnn_inference(
      p,
      v,
      l,
      d,
      hw,
      box_reg_weights=tuple(self.bbox_reg_weights),
      score_thresh=self.score_thresh_test,
      nms_thresh=self.nms_thresh_test,
      detections_per_image=self.detections_per_image,
      num_candidates=self.test_candidates,
      min_box_size=self.min_box_size_test,
    )
    boxes, scores, classes, num = jax.vmap(infer)(
      proposals, proposal_valid, logits, deltas, image_hw
    )
    valid = jnp.arange(self.detections_per_image)[None, :] < num[:, None]
    out = {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": num}
    if self.mask_head is not None:
      mask_logits = self._mask_logits(features, boxes, classes, valid, False)
      out["masks"] = jnp.where(valid[..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
    if self.keypoint_head is not None:
      run = lambda mdl, f, x: mdl._keypoint_predictions(f, x)
      k = self.keypoint_head.num_keypoints
      kp = self._in_chunks(run, (k, 4), self.keypoint_chunk_rois, valid, features, boxes)
      kp = jnp.where(valid[..., None, None], kp, 0.0)
      out["keypoints"] = kp[..., jnp.array([0, 1, 3])]
      out["keypoint_logits"] = kp[..., 2]
    return out


def _pooler(head_config: Mapping[str, Any]) -> ROIPooler:
  return ROIPooler(
    head_config["pooler_resolution"],
    head_config["pooler_sampling_ratio"],
    head_config["pooler_aligned"],
    head_config["pooler_max_sampling_ratio"],
    head_config["pooler_level_rule"],
  )


def build_roi_heads(model_config: Mapping[str, Any]) -> StandardROIHeads:
  """StandardROIHeads of a model config (default_model_config() layout), with its poolers,
  box head, box predictor, mask head (mask_on) and keypoint head (keypoint_on) built."""
  c, bh = model_config["roi_heads"], model_config["box_head"]
  dtype, num_classes = model_config["dtype"], model_config["num_classes"]
  if bh["name"] == "4conv1fc":
    num_conv, num_fc = bh["num_conv"], bh["num_fc"]
  elif bh["name"] == "2fc":
    num_conv, num_fc = 0, 2
  else:
    raise ValueError(f"unknown box head {bh['name']!r}: '4conv1fc' or '2fc'")
  # Head norms see (R, S, S, C) ROI batches: BN statistics over all ROIs, no image groups.
  head_conv = lambda h: layers.conv_def(
    norm=layers.build_norm(h["norm"], num_groups=h["num_groups"]), dtype=dtype
  )
  dense = layers.dense_def(dtype=dtype)
  box_head = FastRCNNConvFCHead(
    num_conv=num_conv,
    conv_dim=bh["conv_dim"],
    num_fc=num_fc,
    fc_dim=bh["fc_dim"],
    conv=head_conv(bh),
    dense=dense,
  )
  branches = {}
  if model_config.get("mask_on", True):
    mh = model_config["mask_head"]
    if mh["target_rule"] not in ("crop", "full_image"):
      raise ValueError(
        f"mask_head.target_rule must be 'crop' or 'full_image', not {mh['target_rule']!r}"
      )
    branches.update(
      mask_pooler=_pooler(mh),
      mask_head=MaskRCNNConvUpsampleHead(
        num_classes=num_classes,
        num_conv=mh["num_conv"],
        conv_dim=mh["conv_dim"],
        conv=head_conv(mh),
      ),
      mask_max_fg_rois=mh["max_fg_rois"],
      mask_resolution=mh["resolution"],
      # Batch statistics must see all ROIs at once, so BN mask heads run in one pass.
      mask_chunk_rois=0 if mh["norm"] in ("BN", "SyncBN") else mh["chunk_rois"],
      mask_target_rule=mh["target_rule"],
    )
  if model_config.get("keypoint_on", False):
    kh = model_config["keypoint_head"]
    normalizer = None
    if not kh["normalize_by_visible_keypoints"]:
      normalizer = float(kh["num_keypoints"] * c["batch_size_per_image"] * c["positive_fraction"])
    branches.update(
      keypoint_pooler=_pooler(kh),
      keypoint_head=keypoint_lib.KRCNNConvDeconvUpsampleHead(
        num_keypoints=kh["num_keypoints"],
        conv_dims=tuple(kh["conv_dims"]),
        conv=layers.conv_def(norm=None, dtype=dtype),
      ),
      keypoint_max_fg_rois=kh["max_fg_rois"],
      keypoint_chunk_rois=kh["chunk_rois"],
      keypoint_loss_weight=kh["loss_weight"],
      keypoint_loss_normalizer=normalizer,
      keypoint_resize_cap=kh["resize_cap"],
    )
  return StandardROIHeads(
    num_classes=num_classes,
    box_pooler=_pooler(bh),
    box_head=box_head,
    box_predictor=FastRCNNOutputLayers(num_classes, dense),
    batch_size_per_image=c["batch_size_per_image"],
    positive_fraction=c["positive_fraction"],
    iou_threshold=c["iou_threshold"],
    proposal_append_gt=c["proposal_append_gt"],
    bbox_reg_weights=tuple(c["bbox_reg_weights"]),
    score_thresh_test=c["score_thresh_test"],
    nms_thresh_test=c["nms_thresh_test"],
    detections_per_image=c["detections_per_image"],
    test_candidates=c["test_candidates"],
    min_box_size_test=c["min_box_size_test"],
    **branches,
  )
