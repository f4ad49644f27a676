"""Mask R-CNN (Detectron2's GeneralizedRCNN with StandardROIHeads), Flax Linen, static shapes;
with keypoint_on also Keypoint R-CNN's keypoint head, with mask_on=False without the mask head.

  model = build_model(default_model_config())
  variables = model.init({"params": k1, "sampling": k2}, batch, train=False)
  losses, new_state = model.apply(variables, batch, train=True, rngs={"sampling": key},
                                  mutable=["batch_stats"])
  dets = model.apply(variables, batch, train=False)

The batch (rethink_jax.data.pipeline) gives image, image_hw and, to train, gt_boxes, gt_classes,
gt_masks (mask_on) and gt_keypoints (B, G, K, 3) [x, y, v] in input pixels (keypoint_on).
Training returns float32 scalars loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, and
loss_mask (mask_on), loss_keypoint (keypoint_on).
Inference returns boxes (B, D, 4) in input pixels, scores (B, D), classes (B, D) int32 (1..K,
0 = padding), num_detections (B,), D = detections_per_image, masks (B, D, 28, 28) probabilities
(mask_on), keypoints (B, D, K, 3) [x, y, score] in input pixels and keypoint_logits (B, D, K)
(keypoint_on; scores as roi_heads.StandardROIHeads documents), and the RPN's proposals (B, P, 4)
with their objectness proposal_logits (B, P) (-inf = padding), highest first,
P = post_nms_topk_test.

build_model is the one reader of the config: it builds every part (fpn.backbone_from_config,
rpn.build_rpn, roi_heads.build_roi_heads or, with roi_heads.name "cascade",
cascade_roi_heads.build_cascade_roi_heads) and the modules receive built sub-modules and layer
factories (layers.conv_def / dense_def / build_norm), as Detectron2's from_config builders do.

Parameter tree (Detectron2's module names, so importing weights is a rename table):
  backbone/{bottom_up/..., fpn_lateral2..5, fpn_output2..5}
  proposal_generator/rpn_head/{conv, objectness_logits, anchor_deltas}
  roi_heads/{box_head/{conv1..conv4, fc1}, box_predictor/{cls_score, bbox_pred},
             mask_head/{mask_fcn1..mask_fcn4, deconv, predictor} (mask_on),
             keypoint_head/{conv_fcn1..conv_fcn8, score_lowres} (keypoint_on)}
  (Cascade: roi_heads/box_head/{0,1,2}/..., roi_heads/box_predictor/{0,1,2}/..., and its
  training losses loss_cls_stage{k} / loss_box_reg_stage{k} replace loss_cls / loss_box_reg.)
"""

from collections.abc import Mapping, Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rethink_jax.models import cascade_roi_heads as cascade_lib
from rethink_jax.models import fpn as fpn_lib
from rethink_jax.models import roi_heads as roi_heads_lib
from rethink_jax.models import rpn as rpn_lib
from rethink_jax.models.config import default_model_config  # noqa: F401  (the public home)
from rethink_jax.ops import anchors as anchor_ops

Array = jax.Array
PROPOSAL_FEATURES = ("p2", "p3", "p4", "p5", "p6")
STRIDES = (4, 8, 16, 32, 64)
DTYPES = ("float32", "bfloat16")


class MaskRCNN(nn.Module):
  """Mask R-CNN: backbone -> proposal_generator -> roi_heads. See the module docstring.

  Attributes:
    backbone: images (B, H, W, 3) -> {"p2".."p6"} (fpn.FPN).
    proposal_generator: rpn.RPN.
    roi_heads: roi_heads.StandardROIHeads or cascade_roi_heads.CascadeROIHeads.
    anchor_sizes, anchor_aspect_ratios, anchor_offset, anchor_round_cell,
      anchor_grid_strides: the config's anchors section.
  """

  backbone: nn.Module
  proposal_generator: nn.Module
  roi_heads: nn.Module
  anchor_sizes: Sequence[Sequence[float]]
  anchor_aspect_ratios: Sequence[float]
  anchor_offset: float
  anchor_round_cell: bool = False
  anchor_grid_strides: bool = False

  def anchors(self, features: Mapping[str, Array], image_hw: tuple[int, int]) -> list[Array]:
    """Anchors of every level P2..P6 for these (static) feature sizes: list of (H_l*W_l*A, 4).

    image_hw: the padded input's (H, W), which sets the strides when anchor_grid_strides.
    """
    hw = [features[k].shape[1:3] for k in PROPOSAL_FEATURES]
    strides = anchor_ops.grid_strides(image_hw, hw) if self.anchor_grid_strides else STRIDES
    return [
      jnp.asarray(x, jnp.float32)
      for x in anchor_ops.generate_anchors(
        hw,
        strides,
        self.anchor_sizes,
        self.anchor_aspect_ratios,
        self.anchor_offset,
        self.anchor_round_cell,
      )
    ]

  def __call__(self, batch: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
    images, image_hw = batch["image"], batch["image_hw"]
    if images.ndim != 4 or image_hw.shape != (images.shape[0], 2):
      raise ValueError(
        f"image {images.shape}, image_hw {image_hw.shape}: want (B, H, W, 3), (B, 2)"
      )
    features = self.backbone(images, train, image_hw)

    gt_boxes = gt_classes = gt_masks = gt_keypoints = gt_valid = None
    if train:
      gt_boxes = batch["gt_boxes"].astype(jnp.float32)
      gt_classes = batch["gt_classes"].astype(jnp.int32)
      gt_masks = batch.get("gt_masks")  # the heads check that theirs are present
      gt_keypoints = batch.get("gt_keypoints")
      gt_valid = gt_classes > 0
    proposals, proposal_valid, proposal_logits, losses = self.proposal_generator(
      [features[k] for k in PROPOSAL_FEATURES],
      self.anchors(features, images.shape[1:3]),
      image_hw,
      gt_boxes,
      gt_valid,
      train=train,
    )
    outputs = self.roi_heads(
      features,
      proposals,
      proposal_valid,
      image_hw,
      gt_boxes,
      gt_classes,
      gt_masks,
      gt_keypoints,
      train=train,
    )
    if not train:
      return {**outputs, "proposals": proposals, "proposal_logits": proposal_logits}
    losses.update(outputs)
    return losses


def build_roi_heads(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The ROI heads that roi_heads.name selects: "standard" or "cascade"."""
  name = model_config.roi_heads.get("name", "standard")
  if name == "standard":
    return roi_heads_lib.build_roi_heads(model_config)
  if name == "cascade":
    return cascade_lib.build_cascade_roi_heads(model_config)
  raise ValueError(f"unknown roi_heads.name {name!r}: 'standard' or 'cascade'")


def build_model(
  model_config: ml_collections.ConfigDict, axis_name: Optional[str] = None
) -> MaskRCNN:
  """MaskRCNN from a model config (default_model_config() layout); the only reader of it.

  axis_name: mapped axis of the SyncBN / BN statistics under shard_map / pmap (None under jit).
  """
  c = ml_collections.FrozenConfigDict(model_config)
  if c.dtype not in DTYPES:
    raise ValueError(f"model dtype must be one of {DTYPES}, got {c.dtype!r}")
  a = c.anchors
  return MaskRCNN(
    backbone=fpn_lib.backbone_from_config(c, axis_name),
    proposal_generator=rpn_lib.build_rpn(c),
    roi_heads=build_roi_heads(c),
    anchor_sizes=a.sizes,
    anchor_aspect_ratios=a.aspect_ratios,
    anchor_offset=a.offset,
    anchor_round_cell=a.round_cell,
    anchor_grid_strides=a.grid_strides,
  )
