"""Cascade R-CNN ROI heads (Detectron2's CascadeROIHeads), with static shapes.

Three box stages (default IoU 0.5 / 0.6 / 0.7, box weights (10, 10, 5, 5), (20, 20, 10, 10),
(30, 30, 15, 15)), each with its own box head and a class-agnostic box predictor (K+1 logits, 4
deltas); one pooler and one mask head, as StandardROIHeads'.

Training, per image: stage 0 takes StandardROIHeads' sampled ROIs (ground truth appended to the
proposals, IoU 0.5, 512 ROIs at most 25% foreground). Stage k > 0 takes the previous stage's
regressed boxes of those same ROIs, without gradient, clipped to the image; empty boxes drop out
(validity mask); they are matched again to the ground truth at the stage's IoU (no low-quality
matches, no sampling, no ground truth appended: Detectron2 appends it only before stage 0). Each
stage has its own losses, "loss_cls_stage{k}" and "loss_box_reg_stage{k}" (fast_rcnn_losses with
the stage's targets). The pooled features enter every stage's head with their gradient scaled by
1 / num_stages (Detectron2's _ScaleGradient): the stages' losses are summed, but the backbone sees
their mean. The mask head trains on stage 0's foreground samples, exactly as StandardROIHeads'.

Inference, per image: every stage runs on all proposals (stage k > 0 on the previous stage's
clipped boxes, empty ones kept), the stages' softmax probabilities are averaged, the boxes are the
last stage's, then fast_rcnn_inference (score threshold, per-class NMS, top detections) and the
mask head on the kept boxes.

Parameter tree (Detectron2's module names):
  roi_heads/{box_head/{0,1,2}/{conv1..., fc1...}, box_predictor/{0,1,2}/{cls_score, bbox_pred},
             mask_head/...}
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.models import roi_heads as roi_heads_lib
from rethink_jax.models.layers import DenseDef
from rethink_jax.ops import boxes as box_ops
from rethink_jax.ops import matching

Array = jax.Array


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: Array, scale: float) -> Array:
  """Identity forward; the backward multiplies the incoming gradient by `scale`."""
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


class StageModules(nn.Module):
  """One module per cascade stage, named "0", "1", ... (Detectron2's nn.ModuleList layout).

  __call__(stage, *args, **kwargs) -> stages[stage](*args, **kwargs).
  """

  stages: Sequence[nn.Module]
  # Keep the names the stages were built with ("0", "1", ...) rather than "stages_0", ...
  preserve_adopted_names: ClassVar[bool] = True

  def __call__(self, stage: int, *args, **kwargs):
    return self.stages[stage](*args, **kwargs)


class ClassAgnosticOutputLayers(nn.Module):
  """Box predictor with class-agnostic regression: cls_score (K+1, background last), bbox_pred (4).

  __call__(x (R, D)) -> (logits (R, K+1) float32, deltas (R, 4) float32).
  """

  num_classes: int
  dense: DenseDef

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    _check(x.ndim == 2, f"box predictor input must be (R, D), got {x.shape}")
    logits = self.dense(
      self.num_classes + 1, kernel_init=nn.initializers.normal(0.01), name="cls_score"
    )(x)
    deltas = self.dense(4, kernel_init=nn.initializers.normal(0.001), name="bbox_pred")(x)
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)


def label_boxes(
  boxes: Array, valid: Array, gt_boxes: Array, gt_classes: Array, *, iou_threshold: float
) -> tuple[Array, Array]:
  """Detectron2's CascadeROIHeads._match_and_label_boxes for one image (no sampling).

  Args:
    boxes (R, 4), valid (R,) bool, gt_boxes (G, 4), gt_classes (G,) int (0 = padding).
  Returns classes (R,) int32 (0 = background or invalid) and matched_gt (R,) int32: IoU >=
  iou_threshold with the best valid ground truth is foreground; no low-quality matches.
  """
  _check(
    boxes.shape == valid.shape + (4,) and gt_boxes.shape == gt_classes.shape + (4,),
    f"boxes {boxes.shape}, valid {valid.shape}, gt_boxes {gt_boxes.shape}, gt_classes "
    f"{gt_classes.shape}: want (R, 4), (R,), (G, 4), (G,)",
  )
  gt_valid = gt_classes > 0
  iou = box_ops.box_iou(gt_boxes, boxes)
  matched_gt, labels = matching.match(iou, gt_valid, (iou_threshold,), (0, 1), False)
  fg = (labels == 1) & valid
  return jnp.where(fg, gt_classes[matched_gt], 0).astype(jnp.int32), matched_gt


def next_stage_boxes(
  deltas: Array,
  rois: Array,
  valid: Array,
  image_hw: Array,
  *,
  box_reg_weights: Sequence[float],
  drop_empty: bool,
) -> tuple[Array, Array]:
  """The next stage's input boxes (Detectron2's _create_proposals_from_boxes), batched.

  Args:
    deltas (B, R, 4) class-agnostic deltas of this stage, rois (B, R, 4) its input boxes, valid
    (B, R) bool, image_hw (B, 2); drop_empty: training drops boxes with no width or height.
  Returns boxes (B, R, 4) decoded with box_reg_weights, without gradient, clipped to the image,
  and their validity (B, R).
  """
  boxes = box_ops.decode_boxes(jax.lax.stop_gradient(deltas), rois, box_reg_weights)
  boxes = box_ops.clip_boxes(boxes, image_hw[:, None, :])
  if drop_empty:
    valid = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return boxes, valid


class CascadeROIHeads(roi_heads_lib.StandardROIHeads):
  """Cascade box branch (see the module docstring) with StandardROIHeads' mask branch.

  box_head and box_predictor are StageModules of num_stages FastRCNNConvFCHead /
  ClassAgnosticOutputLayers. Stage 0 samples with StandardROIHeads' fields (iou_threshold must be
  cascade_iou_thresholds[0]); bbox_reg_weights is unused (each stage has its own).

  __call__ as StandardROIHeads' (gt_keypoints is ignored): train returns {"loss_cls_stage{k}",
  "loss_box_reg_stage{k}" for each stage k, "loss_mask"}; test the same detections dict. With
  mutable=["intermediates"], each stage sows "stage{k}": rois, valid, classes, matched_gt (train
  only), logits, deltas.
  """

  cascade_iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7)
  cascade_bbox_reg_weights: Sequence[Sequence[float]] = (
    (10.0, 10.0, 5.0, 5.0),
    (20.0, 20.0, 10.0, 10.0),
    (30.0, 30.0, 15.0, 15.0),
  )

  @property
  def num_stages(self) -> int:
    return len(self.cascade_iou_thresholds)

  def _stage(self, features, rois, stage, train):
    """Stage `stage` on (B, R, 4) rois -> logits (B, R, K+1), class-agnostic deltas (B, R, 4)."""
    b, r = rois.shape[:2]
    x = self.box_pooler(features, rois)
    if train:
      x = scale_gradient(x, 1.0 / self.num_stages)
    logits, deltas = self.box_predictor(stage, self.box_head(stage, x, train=train))
    return logits.reshape(b, r, -1), deltas.reshape(b, r, 4)

  def _sow_stage(self, stage, **values):
    # Not at init: the variables of a model must not carry these.
    if not self.is_initializing():
      self.sow("intermediates", f"stage{stage}", values)

  def _weights(self, stage):
    return tuple(float(w) for w in self.cascade_bbox_reg_weights[stage])

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
    # No keypoint branch: build_cascade_roi_heads refuses keypoint_on.
    self._check_inputs(
      proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks, gt_keypoints, train
    )
    b = proposals.shape[0]
    _check(
      len(self.cascade_bbox_reg_weights) == self.num_stages
      and self.cascade_iou_thresholds[0] == self.iou_threshold,
      f"cascade_iou_thresholds {self.cascade_iou_thresholds} (first must be iou_threshold "
      f"{self.iou_threshold}) and cascade_bbox_reg_weights {self.cascade_bbox_reg_weights} "
      "need one entry per stage",
    )
    if not train:
      return self._inference(features, proposals, proposal_valid, image_hw)
    samples = self._sample_proposals(proposals, proposal_valid, gt_boxes, gt_classes)

    losses = {}
    rois, valid = samples["rois"], samples["valid"]
    classes, matched_gt = samples["classes"], samples["matched_gt"]
    deltas = None
    for k in range(self.num_stages):
      if k > 0:
        rois, valid = next_stage_boxes(
          deltas, rois, valid, image_hw, box_reg_weights=self._weights(k - 1), drop_empty=True
        )
        label = functools.partial(label_boxes, iou_threshold=self.cascade_iou_thresholds[k])
        classes, matched_gt = jax.vmap(label)(rois, valid, gt_boxes, gt_classes)
      logits, deltas = self._stage(features, rois, k, train)
      matched_boxes = jnp.take_along_axis(gt_boxes, matched_gt[..., None], axis=1)
      targets = box_ops.encode_boxes(matched_boxes, rois, self._weights(k))
      n = b * rois.shape[1]
      # Class-agnostic deltas serve every class: fast_rcnn_losses picks the gt class's row.
      stage_losses = roi_heads_lib.fast_rcnn_losses(
        logits.reshape(n, -1),
        jnp.broadcast_to(deltas.reshape(n, 1, 4), (n, self.num_classes, 4)),
        classes.reshape(n),
        valid.reshape(n),
        jax.lax.stop_gradient(targets).reshape(n, 4),
      )
      losses.update({f"{name}_stage{k}": v for name, v in stage_losses.items()})
      self._sow_stage(
        k,
        rois=rois,
        valid=valid,
        classes=classes,
        matched_gt=matched_gt,
        logits=logits,
        deltas=deltas,
      )

    if self.mask_head is not None:
      # Detectron2 trains the mask head on stage 0's foreground ROIs.
      losses["loss_mask"] = self._mask_loss(features, samples, gt_boxes, gt_masks, train)
    return losses

  def _inference(self, features, proposals, proposal_valid, image_hw):
    rois, valid = proposals, proposal_valid
    probs, deltas = 0.0, None
    for k in range(self.num_stages):
      if k > 0:
        rois, _ = next_stage_boxes(
          deltas, rois, valid, image_hw, box_reg_weights=self._weights(k - 1), drop_empty=False
        )
      logits, deltas = self._stage(features, rois, k, False)
      probs = probs + jax.nn.softmax(logits, axis=-1)
      self._sow_stage(k, rois=rois, valid=valid, logits=logits, deltas=deltas)
    probs = probs * (1.0 / self.num_stages)
    p, k1 = logits.shape[1:]
    infer = lambda r, v, lg, d, pr, hw: roi_heads_lib.fast_rcnn_inference(
      r,
      v,
      lg,
      jnp.broadcast_to(d[:, None, :], (p, k1 - 1, 4)),
      hw,
      box_reg_weights=self._weights(self.num_stages - 1),
      score_thresh=self.score_thresh_test,
      nms_thresh=self.nms_thresh_test,
      detections_per_image=self.detections_per_image,
      num_candidates=self.test_candidates,
      min_box_size=self.min_box_size_test,
      probs=pr,
    )
    boxes, scores, classes, num = jax.vmap(infer)(rois, valid, logits, deltas, probs, image_hw)
    out = {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": num}
    if self.mask_head is not None:
      det_valid = jnp.arange(self.detections_per_image)[None, :] < num[:, None]
      mask_logits = self._mask_logits(features, boxes, classes, det_valid, False)
      out["masks"] = jnp.where(det_valid[..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
    return out


def build_cascade_roi_heads(model_config: Mapping[str, Any]) -> CascadeROIHeads:
  """CascadeROIHeads of a model config: build_roi_heads' poolers and mask head, and per stage a
  copy of its box head and a class-agnostic predictor; roi_heads.cascade_* set the stages."""
  if model_config.get("keypoint_on", False):
    raise ValueError("Cascade R-CNN ROI heads have no keypoint branch: keypoint_on must be False")
  c = model_config["roi_heads"]
  ious = tuple(float(t) for t in c["cascade_iou_thresholds"])
  weights = tuple(tuple(float(w) for w in ws) for ws in c["cascade_bbox_reg_weights"])
  if len(weights) != len(ious) or any(len(w) != 4 for w in weights) or not ious:
    raise ValueError(
      f"roi_heads.cascade_iou_thresholds {ious} and cascade_bbox_reg_weights {weights}: one "
      "threshold and four weights per stage"
    )
  if ious[0] != float(c["iou_threshold"]):
    raise ValueError(
      f"roi_heads.cascade_iou_thresholds[0] = {ious[0]} must equal roi_heads.iou_threshold "
      f"{c['iou_threshold']} (stage 0 samples with it), as Detectron2 requires"
    )
  standard = roi_heads_lib.build_roi_heads(model_config)
  fields = {
    f.name: getattr(standard, f.name)
    for f in dataclasses.fields(standard)
    if f.init and f.name not in ("parent", "name")
  }
  fields["box_head"] = StageModules(
    tuple(standard.box_head.clone(name=str(k)) for k in range(len(ious)))
  )
  fields["box_predictor"] = StageModules(
    tuple(
      ClassAgnosticOutputLayers(standard.num_classes, standard.box_predictor.dense, name=str(k))
      for k in range(len(ious))
    )
  )
  return CascadeROIHeads(**fields, cascade_iou_thresholds=ious, cascade_bbox_reg_weights=weights)
