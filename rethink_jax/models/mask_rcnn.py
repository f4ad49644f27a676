"""Mask R-CNN (Detectron2's GeneralizedRCNN with StandardROIHeads), Flax Linen, static shapes.

  model = build_model(default_model_config())
  variables = model.init({"params": k1, "sampling": k2}, batch, train=False)
  losses, new_state = model.apply(variables, batch, train=True, rngs={"sampling": key},
                                  mutable=["batch_stats"])
  dets = model.apply(variables, batch, train=False)

Training returns float32 scalars loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, loss_mask.
Inference returns boxes (B, D, 4) in input pixels, scores (B, D), classes (B, D) int32 (1..K,
0 = padding), masks (B, D, 28, 28) probabilities, num_detections (B,), D = detections_per_image.

Parameter tree (Detectron2's module names, so importing weights is a rename table):
  backbone/{bottom_up/..., fpn_lateral2..5, fpn_output2..5}
  proposal_generator/rpn_head/{conv, objectness_logits, anchor_deltas}
  roi_heads/{box_head/{conv1..conv4, fc1}, box_predictor/{cls_score, bbox_pred},
             mask_head/{mask_fcn1..mask_fcn4, deconv, predictor}}
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rethink_jax.models import fpn as fpn_lib
from rethink_jax.models import roi_heads as roi_heads_lib
from rethink_jax.models import rpn as rpn_lib
from rethink_jax.ops import anchors as anchor_ops

PROPOSAL_FEATURES = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)


def default_model_config() -> ml_collections.ConfigDict:
  """Detectron2's defaults with the paper's GN variant: R50-FPN-GN Mask R-CNN, 4conv1fc, COCO."""
  c = ml_collections.ConfigDict()
  c.num_classes = 80  # objects only; background is implicit
  c.dtype = "float32"  # "bfloat16": convs / matmuls in bf16, norms, losses and boxes in f32

  c.backbone = ml_collections.ConfigDict(dict(
      depth=50, norm="GN", num_groups=32, stride_in_1x1=False, freeze_at=0, width=64,
      bn_group_size=0))  # 0: BN statistics over the whole batch
  c.fpn = ml_collections.ConfigDict(dict(out_channels=256, norm="GN"))
  c.anchors = ml_collections.ConfigDict(dict(
      sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0), offset=0.0))
  c.rpn = ml_collections.ConfigDict(dict(
      head_conv_dims=-1, pre_nms_topk_train=2000, pre_nms_topk_test=1000,
      post_nms_topk_train=1000, post_nms_topk_test=1000, nms_thresh=0.7, min_size=0.0,
      iou_thresholds=(0.3, 0.7), iou_labels=(0, -1, 1), batch_size_per_image=256,
      positive_fraction=0.5, bbox_reg_weights=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=0.0,
      loss_weight=1.0))
  c.roi_heads = ml_collections.ConfigDict(dict(
      batch_size_per_image=512, positive_fraction=0.25, iou_threshold=0.5,
      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh_test=0.05, nms_thresh_test=0.5,
      detections_per_image=100, proposal_append_gt=True,
      # Fixed-shape inference: the best (proposal, class) candidates above the score threshold
      # that enter the per-class NMS (Detectron2 keeps all of them; exact when fewer pass).
      test_candidates=2000))
  c.box_head = ml_collections.ConfigDict(dict(
      name="4conv1fc", num_conv=4, conv_dim=256, num_fc=1, fc_dim=1024, norm="GN",
      pooler_resolution=7, pooler_sampling_ratio=0, pooler_aligned=True))
  c.mask_head = ml_collections.ConfigDict(dict(
      num_conv=4, conv_dim=256, norm="GN", pooler_resolution=14, pooler_sampling_ratio=0,
      pooler_aligned=True, max_fg_rois=128, resolution=28,
      # The mask branch runs in chunks of this many ROIs per image and skips chunks that hold no
      # ROI (foreground in training, detection in inference) in any image; 0 = one pass.
      # 16: the CPU train step at 512 x 512, batch 2, measured 7.5-7.9 s against 8.0-8.3 s with
      # 32 and 8.1-8.6 s with 8 (benchmark_model.py --set mask_head.chunk_rois=N).
      chunk_rois=16))
  return c


def _dtype(name: str) -> Any:
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


class MaskRCNN(nn.Module):
  """Mask R-CNN: backbone -> proposal_generator -> roi_heads. See the module docstring.

  config: the model section (default_model_config() layout), frozen.
  """
  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    dtype = _dtype(c.dtype)
    if c.rpn.smooth_l1_beta != 0.0:
      raise ValueError("only smooth_l1_beta=0 (L1, Detectron2's default) is implemented")
    self.backbone = fpn_lib.build_resnet_fpn(
        depth=c.backbone.depth, norm=c.backbone.norm, fpn_norm=c.fpn.norm,
        stride_in_1x1=c.backbone.stride_in_1x1, freeze_at=c.backbone.freeze_at,
        num_groups=c.backbone.num_groups, width=c.backbone.width,
        bn_group_size=c.backbone.bn_group_size or None, out_channels=c.fpn.out_channels,
        dtype=dtype)
    num_anchors = len(c.anchors.aspect_ratios) * len(c.anchors.sizes[0])
    self.proposal_generator = rpn_lib.RPN(
        num_anchors=num_anchors, head_conv_dims=c.rpn.head_conv_dims,
        pre_nms_topk_train=c.rpn.pre_nms_topk_train, pre_nms_topk_test=c.rpn.pre_nms_topk_test,
        post_nms_topk_train=c.rpn.post_nms_topk_train,
        post_nms_topk_test=c.rpn.post_nms_topk_test, nms_thresh=c.rpn.nms_thresh,
        min_size=c.rpn.min_size, iou_thresholds=tuple(c.rpn.iou_thresholds),
        iou_labels=tuple(c.rpn.iou_labels), batch_size_per_image=c.rpn.batch_size_per_image,
        positive_fraction=c.rpn.positive_fraction,
        bbox_reg_weights=tuple(c.rpn.bbox_reg_weights), loss_weight=c.rpn.loss_weight,
        dtype=dtype)
    r, bh, mh = c.roi_heads, c.box_head, c.mask_head
    self.roi_heads = roi_heads_lib.StandardROIHeads(
        num_classes=c.num_classes, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction, iou_threshold=r.iou_threshold,
        proposal_append_gt=r.proposal_append_gt, bbox_reg_weights=tuple(r.bbox_reg_weights),
        score_thresh_test=r.score_thresh_test, nms_thresh_test=r.nms_thresh_test,
        detections_per_image=r.detections_per_image, test_candidates=r.test_candidates,
        box_head_name=bh.name, box_num_conv=bh.num_conv, box_conv_dim=bh.conv_dim,
        box_num_fc=bh.num_fc, box_fc_dim=bh.fc_dim, box_norm=bh.norm or None,
        box_pooler_resolution=bh.pooler_resolution,
        box_pooler_sampling_ratio=bh.pooler_sampling_ratio, box_pooler_aligned=bh.pooler_aligned,
        mask_num_conv=mh.num_conv, mask_conv_dim=mh.conv_dim, mask_norm=mh.norm or None,
        mask_pooler_resolution=mh.pooler_resolution,
        mask_pooler_sampling_ratio=mh.pooler_sampling_ratio,
        mask_pooler_aligned=mh.pooler_aligned, mask_max_fg_rois=mh.max_fg_rois,
        mask_resolution=mh.resolution, mask_chunk_rois=mh.chunk_rois,
        dtype=dtype)

  def anchors(self, features):
    """Anchors of every level P2..P6 for these (static) feature sizes: list of (H_l*W_l*A, 4)."""
    hw = [features[k].shape[1:3] for k in PROPOSAL_FEATURES]
    a = self.config.anchors
    return [jnp.asarray(x, jnp.float32) for x in anchor_ops.generate_anchors(
        hw, STRIDES, a.sizes, a.aspect_ratios, a.offset)]

  def __call__(self, batch, train: bool = False):
    images, image_hw = batch["image"], batch["image_hw"]
    if images.ndim != 4 or image_hw.shape != (images.shape[0], 2):
      raise ValueError(f"image {images.shape}, image_hw {image_hw.shape}: want (B, H, W, 3), (B, 2)")
    features = self.backbone(images, train)

    gt_boxes = gt_classes = gt_masks = gt_valid = None
    if train:
      gt_boxes = batch["gt_boxes"].astype(jnp.float32)
      gt_classes = batch["gt_classes"].astype(jnp.int32)
      gt_masks = batch["gt_masks"]
      gt_valid = gt_classes > 0
    proposals, proposal_valid, losses = self.proposal_generator(
        [features[k] for k in PROPOSAL_FEATURES], self.anchors(features), image_hw, gt_boxes,
        gt_valid, train=train)
    outputs = self.roi_heads(features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes,
                             gt_masks, train=train)
    if not train:
      return outputs
    losses.update(outputs)
    return losses


def build_model(model_config: ml_collections.ConfigDict) -> MaskRCNN:
  """MaskRCNN from a model config (default_model_config() layout)."""
  if not isinstance(model_config, ml_collections.FrozenConfigDict):
    model_config = ml_collections.FrozenConfigDict(model_config)
  return MaskRCNN(model_config)
