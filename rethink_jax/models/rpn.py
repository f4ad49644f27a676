"""Region Proposal Network (Detectron2's StandardRPNHead + RPN), with static shapes.

The head runs one shared 3x3 conv (or head_num_conv of them) over every FPN level, then two 1x1
convs: objectness logits (A per location) and anchor deltas (4A per location). Flattened outputs
follow Detectron2's order: location major, then anchor, i.e. index = (y * W + x) * A + a, the
order of `ops.anchors.generate_anchors`.

Training labels every anchor with the matcher (IoU 0.3 / 0.7, low-quality matches allowed) and
samples 256 per image, half positive; both losses are sums over the sampled anchors divided by
batch_size_per_image * num_images (Detectron2's normaliser). Proposals are per level top-k by
objectness, decoded, clipped, NMS'd per level at 0.7 (batched NMS with level ids) and cut to the top
post_nms_topk per image; they carry no gradient.

RPN receives its head built (StandardRPNHead); `build_rpn(model_config)` builds both.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.models import layers
from rethink_jax.models.layers import Activation
from rethink_jax.models.layers import ConvDef
from rethink_jax.ops import boxes as box_ops
from rethink_jax.ops import matching
from rethink_jax.ops import sampling
from rethink_jax.ops.nms import batched_nms

# Detectron2's RPN init: normal(std=0.01), zero bias, for all three convs.
_RPN_INIT = nn.initializers.normal(stddev=0.01)

Array = jax.Array


class StackedRPNConvs(nn.Module):
  """num_conv x (3x3 conv + activation), named conv0, conv1, ... (Detectron2's Sequential of RPN
  convs when RPN.CONV_DIMS has several entries; torchvision v2's RPNHead(conv_depth=2)).

  __call__(x (B, H, W, C)) -> (B, H, W, dims).
  """

  num_conv: int
  dims: int
  conv: ConvDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_conv):
      conv = self.conv(
        self.dims, 3, padding=1, use_bias=True, kernel_init=_RPN_INIT, name=f"conv{i}"
      )
      x = self.activation(conv(x))
    return x


class StandardRPNHead(nn.Module):
  """Shared 3x3 conv(s) + ReLU, objectness_logits (A) and anchor_deltas (4A) 1x1 convs.

  __call__(features: list of (B, H_l, W_l, C)) ->
    (objectness: list of (B, H_l*W_l*A) float32, deltas: list of (B, H_l*W_l*A, 4) float32).

  Attributes:
    num_anchors: A, anchors per location.
    conv_dims: channels of the shared conv; -1 = the input channel count.
    conv: the head's Conv2d (layers.conv_def, no norm; the convs have biases).
    num_conv: shared convs; one is named "conv", several "conv/conv0", "conv/conv1", ...
  """

  num_anchors: int
  conv_dims: int
  conv: ConvDef
  activation: Activation = nn.relu
  num_conv: int = 1

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> tuple[list[Array], list[Array]]:
    channels = features[0].shape[-1]
    if any(f.shape[-1] != channels for f in features):
      raise ValueError(f"RPN levels must share channels, got {[f.shape for f in features]}")
    if self.num_conv < 1:
      raise ValueError(f"the RPN head needs num_conv >= 1, got {self.num_conv}")
    dims = channels if self.conv_dims == -1 else self.conv_dims
    conv = lambda f, k, name: self.conv(
      f, k, padding=k // 2, use_bias=True, kernel_init=_RPN_INIT, name=name
    )
    if self.num_conv == 1:
      conv1 = conv(dims, 3, "conv")
      shared = lambda x: self.activation(conv1(x))
    else:
      shared = StackedRPNConvs(self.num_conv, dims, self.conv, self.activation, name="conv")
    cls = conv(self.num_anchors, 1, "objectness_logits")
    reg = conv(4 * self.num_anchors, 1, "anchor_deltas")
    objectness, deltas = [], []
    for x in features:
      b = x.shape[0]
      t = shared(x)
      objectness.append(cls(t).astype(jnp.float32).reshape(b, -1))
      deltas.append(reg(t).astype(jnp.float32).reshape(b, -1, 4))
    return objectness, deltas


def find_top_proposals(
  objectness: Sequence[Array],
  deltas: Sequence[Array],
  anchors: Sequence[Array],
  image_hw: Array,
  *,
  pre_nms_topk: int,
  post_nms_topk: int,
  nms_thresh: float,
  min_size: float,
  box_reg_weights: Sequence[float],
  min_size_inclusive: bool = False,
) -> tuple[Array, Array, Array]:
  """Proposals of one image (Detectron2's find_top_rpn_proposals with fixed shapes).

  Args:
    objectness: list over levels of (N_l,) logits.
    deltas: list over levels of (N_l, 4).
    anchors: list over levels of (N_l, 4) xyxy.
    image_hw: (2,) [h, w] of the real image.
    pre_nms_topk: per level top-k (capped at N_l); post_nms_topk: P, proposals kept.
    min_size, min_size_inclusive: boxes are kept when w > min_size and h > min_size (Detectron2),
      or w >= min_size and h >= min_size when inclusive (torchvision's remove_small_boxes).
  Returns:
    boxes (P, 4) float32, logits (P,) float32 (-inf where invalid), valid (P,) bool.
  """
  if not (len(objectness) == len(deltas) == len(anchors)):
    raise ValueError(
      "objectness, deltas and anchors need one entry per level, got "
      f"{len(objectness)}, {len(deltas)}, {len(anchors)}"
    )
  all_boxes, all_scores, all_levels = [], [], []
  for level, (logits, d, a) in enumerate(zip(objectness, deltas, anchors)):
    if logits.shape != (a.shape[0],) or d.shape != a.shape:
      raise ValueError(
        f"level {level}: objectness {logits.shape}, deltas {d.shape}, anchors {a.shape} disagree"
      )
    k = min(pre_nms_topk, a.shape[0])
    scores, idx = jax.lax.top_k(logits, k)
    boxes = box_ops.decode_boxes(d[idx], a[idx], box_reg_weights)
    all_boxes.append(boxes)
    all_scores.append(scores)
    all_levels.append(jnp.full((k,), level, jnp.int32))
  boxes = jnp.concatenate(all_boxes)
  scores = jnp.concatenate(all_scores)
  levels = jnp.concatenate(all_levels)

  finite = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
  boxes = box_ops.clip_boxes(jnp.where(finite[:, None], boxes, 0.0), image_hw)
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  if min_size_inclusive:
    keep = finite & (w >= min_size) & (h >= min_size)
  else:
    keep = finite & (w > min_size) & (h > min_size)
  scores = jnp.where(keep, scores, -jnp.inf)

  idx, num_valid = batched_nms(boxes, scores, levels, nms_thresh, post_nms_topk)
  valid = jnp.arange(post_nms_topk) < num_valid
  safe = jnp.where(valid, idx, 0)
  boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
  logits = jnp.where(valid, scores[safe], -jnp.inf)
  return boxes, logits, valid


def label_and_sample_anchors(
  anchors: Array,
  gt_boxes: Array,
  gt_valid: Array,
  key: Array,
  *,
  iou_thresholds: Sequence[float],
  iou_labels: Sequence[int],
  batch_size_per_image: int,
  positive_fraction: float,
  box_reg_weights: Sequence[float],
) -> dict[str, Array]:
  """Samples the anchors that train the RPN of one image.

  Args:
    anchors: (N, 4) all levels concatenated. gt_boxes: (G, 4). gt_valid: (G,) bool.
    key: PRNG key of the balanced sampler.
  Returns dict:
    indices (S,) int32 into anchors, valid (S,) bool, labels (S,) int32 in {0, 1} (sampled),
    targets (S, 4) float32 encoded regression targets of the matched gt (meaningful where label 1).
  """
  if anchors.ndim != 2 or anchors.shape[-1] != 4 or gt_boxes.shape != gt_valid.shape + (4,):
    raise ValueError(
      f"anchors {anchors.shape}, gt_boxes {gt_boxes.shape}, gt_valid "
      f"{gt_valid.shape}: want (N, 4), (G, 4), (G,)"
    )
  iou = box_ops.box_iou(gt_boxes, anchors)  # (G, N)
  matched_gt, labels = matching.match(iou, gt_valid, tuple(iou_thresholds), tuple(iou_labels), True)
  # Without any ground truth every anchor is background (Detectron2).
  labels = jnp.where(jnp.any(gt_valid), labels, 0)
  idx, valid = sampling.sample_balanced(labels, batch_size_per_image, positive_fraction, key)
  safe = jnp.where(valid, idx, 0)
  sampled_labels = jnp.where(valid, labels[safe], 0).astype(jnp.int32)
  targets = box_ops.encode_boxes(gt_boxes[matched_gt[safe]], anchors[safe], box_reg_weights)
  # Background anchors may match padding (zero) boxes whose encoding is -inf: zero them.
  targets = jnp.where((sampled_labels == 1)[:, None], targets, 0.0)
  return {"indices": safe, "valid": valid, "labels": sampled_labels, "targets": targets}


def rpn_losses(
  objectness: Array, deltas: Array, samples: Mapping[str, Array], normalizer: float
) -> dict[str, Array]:
  """Detectron2's RPN losses over the sampled anchors of a batch.

  Args:
    objectness: (B, N) logits over all anchors. deltas: (B, N, 4).
    samples: label_and_sample_anchors output batched: indices/valid/labels (B, S),
      targets (B, S, 4).
    normalizer: batch_size_per_image * B.
  Returns: {"loss_rpn_cls", "loss_rpn_loc"} float32 scalars (sums / normalizer).
  """
  if objectness.shape != deltas.shape[:-1]:
    raise ValueError(f"objectness {objectness.shape} vs deltas {deltas.shape}")
  idx = samples["indices"]
  valid = samples["valid"].astype(jnp.float32)
  labels = samples["labels"].astype(jnp.float32)
  logits = jnp.take_along_axis(objectness.astype(jnp.float32), idx, axis=1)
  pred = jnp.take_along_axis(deltas.astype(jnp.float32), idx[..., None], axis=1)
  bce = sigmoid_bce(logits, labels)
  loss_cls = jnp.sum(bce * valid) / normalizer
  pos = (valid * labels) > 0
  l1 = jnp.sum(jnp.abs(pred - samples["targets"]), axis=-1)  # smooth L1 with beta 0
  loss_loc = jnp.sum(jnp.where(pos, l1, 0.0)) / normalizer
  return {"loss_rpn_cls": loss_cls, "loss_rpn_loc": loss_loc}


def sigmoid_bce(logits: Array, labels: Array) -> Array:
  """Numerically stable binary cross-entropy with logits, elementwise (same shapes)."""
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


class RPN(nn.Module):
  """RPN: head, proposals and (in training) losses. Parameters live under "rpn_head".

  __call__(features: list of (B, H_l, W_l, C) (P2..P6), anchors: list of (N_l, 4), image_hw (B, 2),
           gt_boxes (B, G, 4) | None, gt_valid (B, G) | None, train) ->
    (proposals (B, P, 4) float32, proposal_valid (B, P) bool, proposal_logits (B, P) float32
     objectness (-inf where invalid), losses dict (empty at test time)).
  Attributes are the config's rpn section (default_model_config()); rpn_head is the built head.
  """

  rpn_head: nn.Module
  pre_nms_topk_train: int
  pre_nms_topk_test: int
  post_nms_topk_train: int
  post_nms_topk_test: int
  nms_thresh: float
  min_size: float
  min_size_inclusive: bool
  iou_thresholds: Sequence[float]
  iou_labels: Sequence[int]
  batch_size_per_image: int
  positive_fraction: float
  bbox_reg_weights: Sequence[float]
  loss_weight: float

  @nn.compact
  def __call__(
    self,
    features: Sequence[Array],
    anchors: Sequence[Array],
    image_hw: Array,
    gt_boxes: Optional[Array] = None,
    gt_valid: Optional[Array] = None,
    *,
    train: bool,
  ) -> tuple[Array, Array, Array, dict[str, Array]]:
    objectness, deltas = self.rpn_head(features)
    for o, a in zip(objectness, anchors):
      if o.shape[1] != a.shape[0]:
        raise ValueError(f"objectness {o.shape} vs anchors {a.shape}: anchor count mismatch")

    pre = self.pre_nms_topk_train if train else self.pre_nms_topk_test
    post = self.post_nms_topk_train if train else self.post_nms_topk_test
    find = lambda o, d, hw: find_top_proposals(
      o,
      d,
      anchors,
      hw,
      pre_nms_topk=pre,
      post_nms_topk=post,
      nms_thresh=self.nms_thresh,
      min_size=self.min_size,
      box_reg_weights=tuple(self.bbox_reg_weights),
      min_size_inclusive=self.min_size_inclusive,
    )
    proposals, proposal_logits, valid = jax.vmap(find)(
      jax.lax.stop_gradient(objectness), jax.lax.stop_gradient(deltas), image_hw
    )
    proposals = jax.lax.stop_gradient(proposals)

    losses = {}
    if train:
      if gt_boxes is None or gt_valid is None:
        raise ValueError("training the RPN needs gt_boxes and gt_valid")
      all_anchors = jnp.concatenate(anchors)
      b = gt_boxes.shape[0]
      keys = jax.random.split(self.make_rng("sampling"), b)
      label = lambda g, v, k: label_and_sample_anchors(
        all_anchors,
        g,
        v,
        k,
        iou_thresholds=tuple(self.iou_thresholds),
        iou_labels=tuple(self.iou_labels),
        batch_size_per_image=self.batch_size_per_image,
        positive_fraction=self.positive_fraction,
        box_reg_weights=tuple(self.bbox_reg_weights),
      )
      samples = jax.vmap(label)(gt_boxes, gt_valid, keys)
      samples = jax.lax.stop_gradient(samples)
      losses = rpn_losses(
        jnp.concatenate(objectness, axis=1),
        jnp.concatenate(deltas, axis=1),
        samples,
        float(self.batch_size_per_image * b),
      )
      losses = {k: v * self.loss_weight for k, v in losses.items()}
    return proposals, valid, proposal_logits, losses


def build_rpn(model_config: Mapping[str, Any]) -> RPN:
  """The RPN of a model config (default_model_config() layout), with its StandardRPNHead."""
  c, a = model_config["rpn"], model_config["anchors"]
  if c["smooth_l1_beta"] != 0.0:
    raise ValueError("only smooth_l1_beta=0 (L1, Detectron2's default) is implemented")
  num_anchors = len(a["aspect_ratios"]) * len(a["sizes"][0])
  head = StandardRPNHead(
    num_anchors=num_anchors,
    conv_dims=c["head_conv_dims"],
    conv=layers.conv_def(norm=None, dtype=model_config["dtype"]),
    num_conv=c["head_num_conv"],
  )
  return RPN(
    rpn_head=head,
    pre_nms_topk_train=c["pre_nms_topk_train"],
    pre_nms_topk_test=c["pre_nms_topk_test"],
    post_nms_topk_train=c["post_nms_topk_train"],
    post_nms_topk_test=c["post_nms_topk_test"],
    nms_thresh=c["nms_thresh"],
    min_size=c["min_size"],
    min_size_inclusive=c["min_size_inclusive"],
    iou_thresholds=tuple(c["iou_thresholds"]),
    iou_labels=tuple(c["iou_labels"]),
    batch_size_per_image=c["batch_size_per_image"],
    positive_fraction=c["positive_fraction"],
    bbox_reg_weights=tuple(c["bbox_reg_weights"]),
    loss_weight=c["loss_weight"],
  )
