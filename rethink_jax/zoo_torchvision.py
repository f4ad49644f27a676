"""torchvision Mask / Keypoint R-CNN state dicts -> this project's model (variables, config, meta).

  sd = convert.read_state_dict("maskrcnn_resnet50_fpn_coco.pth")
  variables, model_config, meta = zoo_torchvision.convert(sd, "maskrcnn_resnet50_fpn_coco.pth")
  outputs = mask_rcnn.build_model(model_config).apply(variables, batch, train=False)

Architectures (ARCHITECTURES), told apart by their keys; the ResNet depth is read from the blocks:
  maskrcnn_resnet50_fpn     torchvision.models.detection.maskrcnn_resnet50_fpn: BN statistics in
                            the backbone (FrozenBatchNorm2d in the zoo file), FPN without norm,
                            one-conv RPN head, 2fc box head, mask head without norm.
  maskrcnn_resnet50_fpn_v2  maskrcnn_resnet50_fpn_v2: BN in the backbone, FPN, 4conv1fc box head
                            and mask head; RPN head of two convs (with bias, without norm).
  maskrcnn_resnet50_fpn_gn  MaskRCNN with GroupNorm everywhere, as scripts/benchmark_model.py
                            builds it: GN backbone and FPN, 4conv1fc box head and mask head with
                            GN, one-conv RPN head.
  keypointrcnn_resnet50_fpn torchvision.models.detection.keypointrcnn_resnet50_fpn: as
                            maskrcnn_resnet50_fpn, with a keypoint head (8 conv 3x3 512 + ReLU,
                            ConvTranspose 4x4 stride 2) instead of the mask head: keypoint_on,
                            not mask_on; num_keypoints from the weights.

Weights map onto the Detectron2-named tree:
  backbone.body.{conv1, bn1}                 backbone/bottom_up/stem/conv1
  backbone.body.layer{k}.i.{convj, bnj}      backbone/bottom_up/res{k+1}/i/convj
  backbone.body.layer{k}.i.downsample        backbone/bottom_up/res{k+1}/i/shortcut
  backbone.fpn.{inner, layer}_blocks.i       backbone/fpn_{lateral, output}{i+2}
  rpn.head.conv.j.0                          proposal_generator/rpn_head/conv (or conv/conv{j})
  rpn.head.{cls_logits, bbox_pred}           proposal_generator/rpn_head/{objectness_logits,
                                             anchor_deltas}
  roi_heads.box_head.{fc6, fc7}              roi_heads/box_head/{fc1, fc2}
  roi_heads.box_head.j.{0, 1}; .{n+1}        roi_heads/box_head/conv{j+1}; fc1 (after Flatten)
  roi_heads.mask_head.j.{0, 1}               roi_heads/mask_head/mask_fcn{j+1}
  roi_heads.mask_predictor.conv5_mask        roi_heads/mask_head/deconv
  roi_heads.mask_predictor.mask_fcn_logits   roi_heads/mask_head/predictor
  roi_heads.keypoint_head.{2j}               roi_heads/keypoint_head/conv_fcn{j+1} (ReLUs between)
  roi_heads.keypoint_predictor.kps_score_lowres  roi_heads/keypoint_head/score_lowres
torchvision puts the background first: row 0 of cls_score moves to the end, and the background's
4 rows of bbox_pred and channel of mask_fcn_logits (never read at inference) are dropped. That is
exact (the softmax does not care about the order of its columns), and labels come out in
torchvision's space (output.first_label).

Semantics: every difference from Detectron2 is a model config field, set here (the docstring of
`model_config_for` lists them). torchvision's RPN score_thresh (0.0 on sigmoid probabilities)
keeps every finite proposal, as Detectron2 does, so it needs none. FrozenBatchNorm2d folds with
eps 0 for the COCO_V1 zoo files whose builders set it so (ZERO_EPS_SHA256_PREFIXES, found by the
file's sha256), 1e-5 otherwise (option frozen_bn_eps). Training a converted model
uses this project's (Detectron2's) losses and sampling, not torchvision's (smooth L1 with beta
1/9 in the RPN, losses normalised by the sampled count).
"""

from collections.abc import Mapping
import os
import re
from typing import Any, Optional

import ml_collections
import numpy as np

from rethink_jax import convert as convert_lib
from rethink_jax.convert import ConversionError
from rethink_jax.models.config import default_model_config

SOURCE = "torchvision"
# name -> norms (backbone, FPN, box and mask heads), RPN convs, box head and the branch after the
# box head ("mask" or "keypoint").
ARCHITECTURES = {
  "maskrcnn_resnet50_fpn": dict(
    backbone="BN", fpn="", heads="", rpn_convs=1, box_head="2fc", branch="mask"
  ),
  "maskrcnn_resnet50_fpn_v2": dict(
    backbone="BN", fpn="BN", heads="BN", rpn_convs=2, box_head="4conv1fc", branch="mask"
  ),
  "maskrcnn_resnet50_fpn_gn": dict(
    backbone="GN", fpn="GN", heads="GN", rpn_convs=1, box_head="4conv1fc", branch="mask"
  ),
  "keypointrcnn_resnet50_fpn": dict(
    backbone="BN", fpn="", heads="", rpn_convs=1, box_head="2fc", branch="keypoint"
  ),
}
# The model's norm for each source norm: the v1 zoo backbones are FrozenBatchNorm2d.
_BACKBONE_NORM = {
  "maskrcnn_resnet50_fpn": "FrozenBN",
  "maskrcnn_resnet50_fpn_v2": "BN",
  "maskrcnn_resnet50_fpn_gn": "GN",
  "keypointrcnn_resnet50_fpn": "FrozenBN",
}
# torchvision's GeneralizedRCNNTransform: image_mean / std on 0..1, here on 0..255, RGB.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
OPTIONS = (
  "freeze_at",
  "num_groups",
  "pooler_sampling_ratio",
  "class_names",
  "keypoint_names",
  "frozen_bn_eps",
)
# torchvision's builders set FrozenBatchNorm2d's eps to 0 for these zoo files (overwrite_eps),
# 1e-5 elsewhere; the files are named by their sha256 prefix.
ZERO_EPS_SHA256_PREFIXES = {
  "bf2d0c1e": "maskrcnn_resnet50_fpn_coco (COCO_V1)",
  "fc266e95": "keypointrcnn_resnet50_fpn_coco (COCO_V1)",
}

# torchvision's COCO label space (its weights' meta["categories"]): label i is COCO category id i;
# "N/A" marks the ids COCO does not use, "__background__" is label 0.
COCO_CATEGORIES = (
  "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
  "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird",
  "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
  "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
  "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
  "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
  "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
  "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
  "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
  "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
  "hair drier", "toothbrush",
)  # fmt: skip
# torchvision's keypoint R-CNN: labels 0 "no person" (background), 1 "person"; COCO's 17 keypoints.
COCO_PERSON_CATEGORIES = ("no person", "person")
COCO_PERSON_KEYPOINT_NAMES = (
  "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
  "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The architecture, from the keys.
# --------------------------------------------------------------------------------------------
def _norm_kind(sd: Mapping[str, np.ndarray], prefix: str) -> str:
  """'BN' (running statistics), 'GN' (affine only) or '' (no norm) of a torch module prefix."""
  if prefix + "running_mean" in sd:
    return "BN"
  return "GN" if prefix + "weight" in sd else ""


def _count(sd: Mapping[str, np.ndarray], pattern: str) -> int:
  """How many consecutive j = 0, 1, ... have pattern.format(j) among the keys."""
  j = 0
  while pattern.format(j) in sd:
    j += 1
  return j


def _branch(sd: Mapping[str, np.ndarray]) -> str:
  """ "mask", "keypoint", "mask+keypoint" or "none": the heads after the box head."""
  mask = any(k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor.")) for k in sd)
  keypoint = any(
    k.startswith(("roi_heads.keypoint_head.", "roi_heads.keypoint_predictor.")) for k in sd
  )
  return "+".join(n for n, b in (("mask", mask), ("keypoint", keypoint)) if b) or "none"


def _keypoint_conv_dims(sd: Mapping[str, np.ndarray]) -> list[int]:
  """Out channels of each Conv2d of roi_heads.keypoint_head (its Sequential's entries 2j, a ReLU
  after each), as many as the highest index says: a conv whose weight is absent takes its bias's
  size or its predecessor's (the Writer then names the missing key)."""
  indices = [
    int(k.split(".")[2])
    for k in sd
    if re.fullmatch(r"roi_heads\.keypoint_head\.\d+\.(weight|bias)", k)
  ]
  if not indices:
    raise ConversionError("missing key roi_heads.keypoint_head.0.weight: a keypoint head needs it")
  dims = []
  for j in range(max(indices) // 2 + 1):
    weight, bias = (f"roi_heads.keypoint_head.{2 * j}.{n}" for n in ("weight", "bias"))
    if weight in sd:
      dims.append(int(sd[weight].shape[0]))
    elif bias in sd:
      dims.append(int(sd[bias].shape[0]))
    else:
      dims.append(dims[-1] if dims else int(sd["backbone.fpn.inner_blocks.0.0.weight"].shape[0]))
  return dims


def layout_of(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The structure a torchvision Mask / Keypoint R-CNN state dict describes (ConversionError if
  none).

  Returns dict architecture (a key of ARCHITECTURES), num_classes (K, background excluded),
  num_anchors, fpn_channels, box_num_conv, box_conv_dim, box_fc_dim, mask_num_conv,
  mask_conv_dim, keypoint_conv_dims (out channels of each keypoint head conv, () without one)
  and num_keypoints (0 without a keypoint head).
  """
  if "backbone.body.conv1.weight" not in sd or "roi_heads.box_predictor.cls_score.weight" not in sd:
    raise ConversionError(
      "not a torchvision Mask R-CNN (or Keypoint R-CNN) state dict: backbone.body.conv1.weight "
      f"or roi_heads.box_predictor.cls_score.weight is absent (first keys: {sorted(sd)[:5]})"
    )
  box_two_fc = "roi_heads.box_head.fc6.weight" in sd
  box_num_conv = _count(sd, "roi_heads.box_head.{}.0.weight")
  mask_num_conv = _count(sd, "roi_heads.mask_head.{}.0.weight")
  box_norm = "" if box_two_fc else _norm_kind(sd, "roi_heads.box_head.0.1.")
  mask_norm = _norm_kind(sd, "roi_heads.mask_head.0.1.")
  found = dict(
    backbone=_norm_kind(sd, "backbone.body.bn1."),
    fpn=_norm_kind(sd, "backbone.fpn.inner_blocks.0.1."),
    heads=mask_norm if box_two_fc or box_norm == mask_norm else f"{box_norm}/{mask_norm}",
    rpn_convs=_count(sd, "rpn.head.conv.{}.0.weight"),
    box_head="2fc" if box_two_fc else ("4conv1fc" if box_num_conv else "none"),
    branch=_branch(sd),
  )
  names = [n for n, a in ARCHITECTURES.items() if a == found]
  if not names:
    raise ConversionError(
      f"unknown torchvision Mask R-CNN layout {found}; known: "
      + "; ".join(f"{n} {a}" for n, a in ARCHITECTURES.items())
    )
  cls = sd["roi_heads.box_predictor.cls_score.weight"]
  if box_two_fc:
    fc = sd["roi_heads.box_head.fc6.weight"]
    box_conv_dim = 0
  else:
    fc_key = f"roi_heads.box_head.{box_num_conv + 1}.weight"
    if fc_key not in sd:
      raise ConversionError(f"missing key {fc_key}: the box head's Linear after its Flatten")
    fc = sd[fc_key]
    box_conv_dim = sd["roi_heads.box_head.0.0.weight"].shape[0]
  if "rpn.head.cls_logits.weight" not in sd or "backbone.fpn.inner_blocks.0.0.weight" not in sd:
    raise ConversionError("missing key rpn.head.cls_logits.weight or backbone.fpn.inner_blocks.0")
  keypoint_conv_dims, num_keypoints = [], 0
  if "keypoint" in found["branch"]:
    lowres = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    if lowres not in sd:
      raise ConversionError(f"missing key {lowres}: a keypoint head needs it")
    num_keypoints = int(sd[lowres].shape[1])  # ConvTranspose2d weight (C_in, K, 4, 4)
    keypoint_conv_dims = _keypoint_conv_dims(sd)
  return dict(
    architecture=names[0],
    num_classes=int(cls.shape[0]) - 1,
    num_anchors=int(sd["rpn.head.cls_logits.weight"].shape[0]),
    fpn_channels=int(sd["backbone.fpn.inner_blocks.0.0.weight"].shape[0]),
    box_num_conv=box_num_conv,
    box_conv_dim=int(box_conv_dim),
    box_fc_dim=int(fc.shape[0]),
    mask_num_conv=mask_num_conv,
    mask_conv_dim=int(sd["roi_heads.mask_head.0.0.weight"].shape[0]) if mask_num_conv else 0,
    keypoint_conv_dims=tuple(keypoint_conv_dims),
    num_keypoints=num_keypoints,
  )


def model_config_for(
  layout: Mapping[str, Any],
  depth: int,
  freeze_at: Optional[int] = None,
  num_groups: int = 32,
  pooler_sampling_ratio: int = 2,
) -> ml_collections.ConfigDict:
  """The model config of a torchvision Mask / Keypoint R-CNN (`layout_of`), ResNet of `depth`.

  torchvision's semantics, each a field (Detectron2's value is the default_model_config()'s):
    anchors.round_cell (integer cell anchors), anchors.grid_strides (stride = padded size //
    feature size); rpn.head_num_conv; rpn.min_size 1e-3 with min_size_inclusive (w, h >= it);
    rpn.pre/post_nms_topk_train 2000 / 2000; roi_heads.min_box_size_test 1e-2; poolers:
    sampling_ratio 2, aligned False, level_rule "torchvision"; input: RGB, ImageNet mean / std
    * 255, 800 / 1333, resize "torchvision", size_divisibility 32; output: first_label 1
    (labels 1..K, torchvision's), mask_paste "torchvision". A keypoint model: mask_on False,
    keypoint_on True, keypoint_head.num_keypoints and conv_dims from the weights (its pooler as
    above; torchvision decodes heatmaps as Detectron2 does, and its keypoints_scores are the
    model's "keypoint_logits").
  Settings the tensors do not hold: freeze_at (None: 2 for BN backbones, torchvision's
  trainable_backbone_layers=3; 0 for GN, the benchmark's 5), num_groups (GN), and the pooler
  sampling ratio (torchvision's MultiScaleRoIAlign default 2; the benchmark may pass 0).
  """
  arch = ARCHITECTURES[layout["architecture"]]
  c = default_model_config()
  c.num_classes = layout["num_classes"]
  b = c.backbone
  b.depth = depth
  b.norm = _BACKBONE_NORM[layout["architecture"]]
  b.num_groups = num_groups
  b.stride_in_1x1 = False  # torchvision's Bottleneck strides in its 3x3 conv
  b.freeze_at = (0 if b.norm == "GN" else 2) if freeze_at is None else freeze_at
  c.fpn.norm = arch["fpn"]
  c.fpn.out_channels = layout["fpn_channels"]

  if layout["num_anchors"] != len(c.anchors.aspect_ratios):
    raise ConversionError(
      f"rpn.head.cls_logits has {layout['num_anchors']} anchors per location; torchvision's "
      f"default AnchorGenerator (sizes {c.anchors.sizes}, ratios {c.anchors.aspect_ratios}) has "
      f"{len(c.anchors.aspect_ratios)}"
    )
  c.anchors.round_cell = True
  c.anchors.grid_strides = True

  r = c.rpn
  r.head_num_conv = arch["rpn_convs"]
  r.min_size = 1e-3
  r.min_size_inclusive = True
  r.pre_nms_topk_train = r.post_nms_topk_train = 2000
  r.pre_nms_topk_test = r.post_nms_topk_test = 1000

  c.roi_heads.min_box_size_test = 1e-2
  bh, mh = c.box_head, c.mask_head
  if arch["box_head"] == "2fc":
    bh.name, bh.num_conv, bh.num_fc = "2fc", 0, 2
  else:
    bh.name, bh.num_conv, bh.num_fc = "4conv1fc", layout["box_num_conv"], 1
    bh.conv_dim = layout["box_conv_dim"]
  bh.fc_dim = layout["box_fc_dim"]
  pooled = [bh]
  c.mask_on = arch["branch"] == "mask"
  c.keypoint_on = arch["branch"] == "keypoint"
  if c.mask_on:
    mh.num_conv = layout["mask_num_conv"]
    mh.conv_dim = layout["mask_conv_dim"]
    pooled.append(mh)
  for h in pooled:
    h.norm = arch["heads"]
    h.num_groups = num_groups
  if c.keypoint_on:
    kh = c.keypoint_head
    kh.num_keypoints = layout["num_keypoints"]
    kh.conv_dims = layout["keypoint_conv_dims"]
    pooled.append(kh)
  for h in pooled:
    h.pooler_sampling_ratio = pooler_sampling_ratio
    h.pooler_aligned = False
    h.pooler_level_rule = "torchvision"

  i = c.input
  i.format, i.pixel_mean, i.pixel_std = "RGB", PIXEL_MEAN, PIXEL_STD
  i.min_size_test, i.max_size_test = 800, 1333
  i.resize, i.size_divisibility = "torchvision", 32
  c.output.first_label = 1
  c.output.mask_paste = "torchvision"
  return c


# --------------------------------------------------------------------------------------------
# The weights.
# --------------------------------------------------------------------------------------------
def _template(model_config: ml_collections.ConfigDict) -> dict[tuple, tuple]:
  """{(collection, *path): shape} of build_model(model_config)'s variables, computing nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  model = mask_rcnn.build_model(model_config)
  batch = {"image": jnp.zeros((1, 64, 64, 3)), "image_hw": jnp.full((1, 2), 64, jnp.int32)}
  rngs = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
  shapes = jax.eval_shape(lambda: model.init(rngs, batch, train=False))
  return {
    tuple(getattr(k, "key", str(k)) for k in path): tuple(v.shape)
    for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]
  }


class _Writer:
  """Fills the flat target {(collection, *path): array} from source keys, checking each shape
  against the model's template and recording every problem (raised together by `finish`)."""

  def __init__(
    self, sd: Mapping[str, np.ndarray], template: dict[tuple, tuple], frozen_bn_eps: float
  ):
    self.sd, self.template, self.frozen_bn_eps = sd, template, frozen_bn_eps
    self.out: dict[tuple, np.ndarray] = {}
    self.used: list[str] = []
    self.errors: list[str] = []

  def put(self, target: tuple, key: str, fn=lambda a: a):
    """target <- fn(sd[key])."""
    want = self.template.get(target)
    if key not in self.sd:
      self.errors.append(f"missing key {key} (for {'/'.join(target)} {want})")
      return
    src = np.asarray(self.sd[key])
    value = np.ascontiguousarray(fn(src), dtype=np.float32)
    if want is None:
      self.errors.append(f"{key} {src.shape} -> {'/'.join(target)}: no such variable in the model")
    elif tuple(value.shape) != want:
      self.errors.append(
        f"{key} {src.shape} -> {'/'.join(target)} {tuple(value.shape)}: the model wants {want}"
      )
    self.out[target] = value
    self.used.append(key)

  def conv(self, module: tuple, key: str, norm_key: Optional[str] = None):
    """A torch Conv2d (OIHW weight [+ bias]) at `key`, its norm at `norm_key`, onto `module`."""
    self.put(("params",) + module + ("kernel",), key + "weight", lambda w: w.transpose(2, 3, 1, 0))
    if key + "bias" in self.sd:
      self.put(("params",) + module + ("bias",), key + "bias")
    if norm_key is not None:
      self.norm(module + ("norm",), norm_key)

  def dense(self, module: tuple, key: str, rows=slice(None)):
    """A torch Linear (out, in) at `key`, its output rows `rows`, onto an nn.Dense (in, out)."""
    self.put(("params",) + module + ("kernel",), key + "weight", lambda w: w[rows].T)
    self.put(("params",) + module + ("bias",), key + "bias", lambda b: b[rows])

  def norm(self, module: tuple, key: str):
    """A BatchNorm2d / FrozenBatchNorm2d / GroupNorm at `key` onto the norm the model has at
    `module`: FrozenBN (folded), BN (params + batch_stats) or GN (params)."""
    has_stats = key + "running_mean" in self.sd
    if key + "num_batches_tracked" in self.sd:
      self.used.append(key + "num_batches_tracked")  # a counter, unused by inference or training
    if ("frozen",) + module + ("scale",) in self.template:
      names = [key + n for n in ("weight", "bias", "running_mean", "running_var")]
      absent = [n for n in names if n not in self.sd]
      if absent:
        self.errors.append(f"missing keys {absent} (FrozenBN at {'/'.join(module)})")
        return
      gamma, beta, mean, var = (np.asarray(self.sd[n], np.float64) for n in names)
      want = self.template[("frozen",) + module + ("scale",)]
      if any(np.shape(self.sd[n]) != want for n in names):
        shapes = {n: np.shape(self.sd[n]) for n in names}
        self.errors.append(f"{shapes} -> {'/'.join(module)}: the model wants {want}")
      scale = gamma / np.sqrt(var + self.frozen_bn_eps)
      self.out[("frozen",) + module + ("scale",)] = scale.astype(np.float32)
      self.out[("frozen",) + module + ("bias",)] = (beta - mean * scale).astype(np.float32)
      self.used += names
      return
    self.put(("params",) + module + ("scale",), key + "weight")
    self.put(("params",) + module + ("bias",), key + "bias")
    wants_stats = ("batch_stats",) + module + ("mean",) in self.template
    if wants_stats:
      self.put(("batch_stats",) + module + ("mean",), key + "running_mean")
      self.put(("batch_stats",) + module + ("var",), key + "running_var")
    elif has_stats:
      self.errors.append(
        f"{key}running_mean: BatchNorm statistics, but the model has GroupNorm at "
        f"{'/'.join(module)}"
      )

  def finish(self):
    """Raises ConversionError for any recorded problem, leftover key or unfilled variable."""
    left = sorted(set(self.sd) - set(self.used))
    errors = list(self.errors)
    errors += [f"leftover key {k} {np.shape(self.sd[k])}: no place in the model" for k in left]
    errors += [
      f"{'/'.join(t)} {s} was not filled by any key"
      for t, s in sorted(self.template.items())
      if t not in self.out
    ]
    if errors:
      raise ConversionError(
        f"torchvision conversion failed ({len(errors)} problems):\n  "
        + "\n  ".join(errors[:40])
        + (f"\n  ... and {len(errors) - 40} more" if len(errors) > 40 else "")
      )


def _torchvision_body_names(module: tuple) -> tuple[str, str]:
  """A ResNet conv of the tree -> (its torchvision conv, its norm): ("stem", "conv1") ->
  ("conv1", "bn1"); ("res3", "1", "conv2") -> ("layer2.1.conv2", "layer2.1.bn2");
  ("res3", "0", "shortcut") -> ("layer2.0.downsample.0", "layer2.0.downsample.1")."""
  if module == ("stem", "conv1"):
    return "conv1", "bn1"
  stage, block, conv = module
  layer = f"layer{int(stage[3:]) - 1}.{block}"
  if conv == "shortcut":
    return f"{layer}.downsample.0", f"{layer}.downsample.1"
  return f"{layer}.{conv}", f"{layer}.bn{conv[4:]}"


def _backbone_body(w: _Writer) -> None:
  """backbone.body.* (a torchvision ResNet) onto every conv of backbone/bottom_up."""
  root = ("backbone", "bottom_up")
  for target in sorted(w.template):
    if target[0] != "params" or target[1:3] != root or target[-1] != "kernel":
      continue
    module = target[1:-1]
    conv, norm = (f"backbone.body.{n}." for n in _torchvision_body_names(module[2:]))
    w.put(target, conv + "weight", lambda a: a.transpose(2, 3, 1, 0))
    normed = any((c,) + module + ("norm", "scale") in w.template for c in ("params", "frozen"))
    if normed:
      w.norm(module + ("norm",), norm)


def _mask_branch(w: _Writer, num_conv: int, norm: str) -> None:
  """roi_heads.mask_head / mask_predictor onto roi_heads/mask_head (background channel dropped)."""
  mask = ("roi_heads", "mask_head")
  for j in range(num_conv):
    key = f"roi_heads.mask_head.{j}."
    w.conv(mask + (f"mask_fcn{j + 1}",), key + "0.", key + "1." if norm else None)
  # ConvTranspose2d weight (C_in, C_out, 2, 2) -> kernel (2, 2, C_in, C_out).
  deconv = "roi_heads.mask_predictor.conv5_mask."
  w.put(
    ("params",) + mask + ("deconv", "kernel"), deconv + "weight", lambda a: a.transpose(2, 3, 0, 1)
  )
  w.put(("params",) + mask + ("deconv", "bias"), deconv + "bias")
  logits = "roi_heads.mask_predictor.mask_fcn_logits."
  w.put(
    ("params",) + mask + ("predictor", "kernel"),
    logits + "weight",
    lambda a: a[1:].transpose(2, 3, 1, 0),
  )
  w.put(("params",) + mask + ("predictor", "bias"), logits + "bias", lambda a: a[1:])


def _keypoint_branch(w: _Writer, num_conv: int) -> None:
  """roi_heads.keypoint_head / keypoint_predictor onto roi_heads/keypoint_head."""
  head = ("roi_heads", "keypoint_head")
  for j in range(num_conv):
    w.conv(head + (f"conv_fcn{j + 1}",), f"roi_heads.keypoint_head.{2 * j}.")
  # ConvTranspose2d weight (C_in, K, 4, 4) -> kernel (4, 4, C_in, K), as the mask deconv's.
  lowres = "roi_heads.keypoint_predictor.kps_score_lowres."
  w.put(
    ("params",) + head + ("score_lowres", "kernel"),
    lowres + "weight",
    lambda a: a.transpose(2, 3, 0, 1),
  )
  w.put(("params",) + head + ("score_lowres", "bias"), lowres + "bias")


def state_dict_to_variables(
  sd: Mapping[str, np.ndarray],
  layout: Mapping[str, Any],
  template: dict[tuple, tuple],
  frozen_bn_eps: float = convert_lib.BN_EPS,
) -> tuple[dict, list[str]]:
  """Maps the tensors onto build_model(config)'s variables (nested numpy dicts), FrozenBN folded
  with `frozen_bn_eps`.

  Returns (variables, used keys). Raises ConversionError naming every missing or leftover key
  and every shape mismatch.
  """
  w = _Writer(sd, template, frozen_bn_eps)
  _backbone_body(w)
  arch = ARCHITECTURES[layout["architecture"]]
  for i in range(4):
    for src, dst in (("inner_blocks", "fpn_lateral"), ("layer_blocks", "fpn_output")):
      key = f"backbone.fpn.{src}.{i}."
      w.conv(("backbone", f"{dst}{i + 2}"), key + "0.", key + "1." if arch["fpn"] else None)

  rpn = ("proposal_generator", "rpn_head")
  convs = arch["rpn_convs"]
  for j in range(convs):
    w.conv(rpn + (("conv",) if convs == 1 else ("conv", f"conv{j}")), f"rpn.head.conv.{j}.0.")
  w.conv(rpn + ("objectness_logits",), "rpn.head.cls_logits.")
  w.conv(rpn + ("anchor_deltas",), "rpn.head.bbox_pred.")

  heads = arch["heads"]
  box = ("roi_heads", "box_head")
  if layout["box_num_conv"] == 0:
    w.dense(box + ("fc1",), "roi_heads.box_head.fc6.")
    w.dense(box + ("fc2",), "roi_heads.box_head.fc7.")
  else:
    n = layout["box_num_conv"]
    for j in range(n):
      key = f"roi_heads.box_head.{j}."
      w.conv(box + (f"conv{j + 1}",), key + "0.", key + "1." if heads else None)
    w.dense(box + ("fc1",), f"roi_heads.box_head.{n + 1}.")  # after the Flatten at index n

  # Background first in torchvision, last here; its box rows and mask channel are dropped.
  k = layout["num_classes"]
  pred = ("roi_heads", "box_predictor")
  order = np.r_[1 : k + 1, 0]
  w.dense(pred + ("cls_score",), "roi_heads.box_predictor.cls_score.", order)
  w.dense(pred + ("bbox_pred",), "roi_heads.box_predictor.bbox_pred.", slice(4, None))

  if arch["branch"] == "mask":
    _mask_branch(w, layout["mask_num_conv"], heads)
  else:
    _keypoint_branch(w, len(layout["keypoint_conv_dims"]))
  w.finish()

  variables: dict = {}
  for path, value in w.out.items():
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return variables, w.used


# --------------------------------------------------------------------------------------------
# The converter.
# --------------------------------------------------------------------------------------------
def convert(
  state_dict: Mapping[str, np.ndarray], path: str, **options: Any
) -> tuple[dict, ml_collections.ConfigDict, dict]:
  """A torchvision Mask / Keypoint R-CNN state dict -> (variables, model_config, meta).

  Args:
    state_dict: {torchvision name: array} (convert.read_state_dict of the .pth file).
    path: the file it came from (for the sha256 and the meta).
    **options: freeze_at, num_groups, pooler_sampling_ratio (see `model_config_for`),
      class_names: the K names of labels 1..K (default: torchvision's COCO categories when
      K = 90; "person" for a keypoint model of one class and 17 keypoints), and keypoint_names
      (keypoint models: the names of the keypoints, in meta["keypoint_names"]; default COCO's
      17 when there are 17), frozen_bn_eps (the eps FrozenBatchNorm2d is folded with; default
      0 for the zoo files ZERO_EPS_SHA256_PREFIXES names, as torchvision loads them, else 1e-5).
  Raises:
    ConversionError naming the offending keys and shapes.
  """
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ConversionError(f"unknown torchvision options {unknown}; known: {list(OPTIONS)}")
  sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
  sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
  layout = layout_of(sd)
  body = {k: v for k, v in sd.items() if k.startswith("backbone.body.")}
  renamed = convert_lib._rename_torch(  # pylint: disable=protected-access
    {k[len("backbone.body.") :]: v for k, v in body.items()}
  )[0]
  depth = convert_lib.infer_depth(renamed)
  model_config = model_config_for(
    layout,
    depth,
    freeze_at=options.get("freeze_at"),
    num_groups=options.get("num_groups", 32),
    pooler_sampling_ratio=options.get("pooler_sampling_ratio", 2),
  )
  sha256 = convert_lib.sha256_file(path) if os.path.isfile(path) else None
  eps = options.get("frozen_bn_eps")
  if eps is None:
    eps = 0.0 if sha256 and sha256[:8] in ZERO_EPS_SHA256_PREFIXES else convert_lib.BN_EPS
  variables, used = state_dict_to_variables(sd, layout, _template(model_config), eps)

  k = layout["num_classes"]
  class_names = options.get("class_names")
  if class_names is None and k == len(COCO_CATEGORIES) - 1:
    class_names = list(COCO_CATEGORIES[1:])
  num_keypoints = layout["num_keypoints"]
  coco_person = num_keypoints == len(COCO_PERSON_KEYPOINT_NAMES)
  if class_names is None and coco_person and k == len(COCO_PERSON_CATEGORIES) - 1:
    class_names = list(COCO_PERSON_CATEGORIES[1:])
  if class_names is not None and len(class_names) != k:
    raise ConversionError(f"{len(class_names)} class names for a model of {k} classes")
  keypoint_names = options.get("keypoint_names")
  if keypoint_names is None and coco_person:
    keypoint_names = list(COCO_PERSON_KEYPOINT_NAMES)
  if keypoint_names is not None and len(keypoint_names) != num_keypoints:
    raise ConversionError(
      f"{len(keypoint_names)} keypoint names for a model of {num_keypoints} keypoints"
    )
  meta = {
    "source": SOURCE,
    "architecture": layout["architecture"],
    "sha256": sha256,
    "input": os.path.basename(path),
    "class_names": list(class_names) if class_names is not None else None,
    # torchvision reports class k (1..K in the model) as label k; 0 is its background.
    "label_map": {str(i): i for i in range(1, k + 1)},
    "bn_eps": convert_lib.BN_EPS,
    "frozen_bn_eps": float(eps) if _BACKBONE_NORM[layout["architecture"]] == "FrozenBN" else None,
    "used": sorted(set(used)),
    "dropped": sorted(k for k in sd if k.endswith("num_batches_tracked")),
  }
  if num_keypoints:
    meta["keypoint_names"] = list(keypoint_names) if keypoint_names is not None else None
  return variables, model_config, meta
