"""Detectron2 GeneralizedRCNN (Standard or Cascade ROI heads, ResNet-FPN) checkpoints -> MaskRCNN.

  variables, model_config, meta = convert(state_dict, "model_final.pkl", d2_config="cfg.yaml")
  build_model(model_config).apply(variables, batch, train=False)

The model's parameter tree already uses Detectron2's module names, so the rename table is one
rule: the module path "roi_heads.box_head.conv1" becomes ("roi_heads", "box_head", "conv1") and
the leaf moves as (a Cascade R-CNN's "roi_heads.box_head.1.fc1" becomes
("roi_heads", "box_head", "1", "fc1"): its stages are the ModuleList's indices)

  weight (conv, OIHW)            -> kernel (HWIO)
  weight (mask_head.deconv, IOHW) -> kernel (HWIO)
  weight (linear, (out, in))     -> kernel ((in, out))
  bias                           -> bias
  norm.weight / norm.bias        -> norm/scale, norm/bias (collection "params")
  norm.running_mean / _var       -> batch_stats norm/mean, norm/var (BN, SyncBN), or folded with
                                    norm.weight / norm.bias into the "frozen" collection's affine
                                    (FrozenBN): scale = w / sqrt(var + eps), bias = b - mean * scale

`d2_name(path)` is the inverse (our param path -> Detectron2 name). What the tensors do not hold
(pixel statistics, channel order, stride_in_1x1, poolers, anchors, test thresholds) comes from the
Detectron2 config YAML (`read_d2_config`); without one, from BASE_RCNN_FPN: Detectron2's
defaults.py overridden by configs/Base-RCNN-FPN.yaml (the base of every R50 / R101 FPN Mask R-CNN of
its model zoo) with MASK_ON, while the structure (depth, norms, head sizes, classes) is read from
the tensors. A setting this model cannot represent is a ConversionError that names it.
"""

from collections.abc import Mapping
import copy
import os
import re
from typing import Any, Optional

import ml_collections
import numpy as np

from rethink_jax.convert import BN_EPS
from rethink_jax.convert import ConversionError
from rethink_jax.convert import infer_depth
from rethink_jax.convert import sha256_file
from rethink_jax.models.config import default_model_config

# Detectron2's defaults.py with configs/Base-RCNN-FPN.yaml merged and MASK_ON: True, restricted to
# the keys this converter reads.
BASE_RCNN_FPN = {
  "MODEL": {
    "META_ARCHITECTURE": "GeneralizedRCNN",
    "MASK_ON": True,
    "KEYPOINT_ON": False,
    "LOAD_PROPOSALS": False,
    "PIXEL_MEAN": [103.53, 116.28, 123.675],
    "PIXEL_STD": [1.0, 1.0, 1.0],
    "BACKBONE": {"NAME": "build_resnet_fpn_backbone", "FREEZE_AT": 2},
    "RESNETS": {
      "DEPTH": 50,
      "NORM": "FrozenBN",
      "STRIDE_IN_1X1": True,
      "NUM_GROUPS": 1,
      "WIDTH_PER_GROUP": 64,
      "STEM_OUT_CHANNELS": 64,
      "RES2_OUT_CHANNELS": 256,
      "RES5_DILATION": 1,
      "DEFORM_ON_PER_STAGE": [False, False, False, False],
      "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    },
    "FPN": {
      "IN_FEATURES": ["res2", "res3", "res4", "res5"],
      "OUT_CHANNELS": 256,
      "NORM": "",
      "FUSE_TYPE": "sum",
    },
    "ANCHOR_GENERATOR": {
      "NAME": "DefaultAnchorGenerator",
      "SIZES": [[32], [64], [128], [256], [512]],
      "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
      "OFFSET": 0.0,
    },
    "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
    "RPN": {
      "HEAD_NAME": "StandardRPNHead",
      "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
      "BOUNDARY_THRESH": -1,
      "IOU_THRESHOLDS": [0.3, 0.7],
      "IOU_LABELS": [0, -1, 1],
      "BATCH_SIZE_PER_IMAGE": 256,
      "POSITIVE_FRACTION": 0.5,
      "BBOX_REG_LOSS_TYPE": "smooth_l1",
      "BBOX_REG_LOSS_WEIGHT": 1.0,
      "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
      "SMOOTH_L1_BETA": 0.0,
      "LOSS_WEIGHT": 1.0,
      "PRE_NMS_TOPK_TRAIN": 2000,
      "PRE_NMS_TOPK_TEST": 1000,
      "POST_NMS_TOPK_TRAIN": 1000,
      "POST_NMS_TOPK_TEST": 1000,
      "NMS_THRESH": 0.7,
      "CONV_DIMS": [-1],
    },
    "ROI_HEADS": {
      "NAME": "StandardROIHeads",
      "NUM_CLASSES": 80,
      "IN_FEATURES": ["p2", "p3", "p4", "p5"],
      "IOU_THRESHOLDS": [0.5],
      "IOU_LABELS": [0, 1],
      "BATCH_SIZE_PER_IMAGE": 512,
      "POSITIVE_FRACTION": 0.25,
      "SCORE_THRESH_TEST": 0.05,
      "NMS_THRESH_TEST": 0.5,
      "PROPOSAL_APPEND_GT": True,
    },
    "ROI_BOX_HEAD": {
      "NAME": "FastRCNNConvFCHead",
      "BBOX_REG_LOSS_TYPE": "smooth_l1",
      "BBOX_REG_LOSS_WEIGHT": 1.0,
      "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
      "SMOOTH_L1_BETA": 0.0,
      "POOLER_RESOLUTION": 7,
      "POOLER_SAMPLING_RATIO": 0,
      "POOLER_TYPE": "ROIAlignV2",
      "NUM_FC": 2,
      "FC_DIM": 1024,
      "NUM_CONV": 0,
      "CONV_DIM": 256,
      "NORM": "",
      "CLS_AGNOSTIC_BBOX_REG": False,
      "TRAIN_ON_PRED_BOXES": False,
      "USE_FED_LOSS": False,
      "USE_SIGMOID_CE": False,
    },
    "ROI_BOX_CASCADE_HEAD": {
      "BBOX_REG_WEIGHTS": [
        [10.0, 10.0, 5.0, 5.0],
        [20.0, 20.0, 10.0, 10.0],
        [30.0, 30.0, 15.0, 15.0],
      ],
      "IOUS": [0.5, 0.6, 0.7],
    },
    "ROI_MASK_HEAD": {
      "NAME": "MaskRCNNConvUpsampleHead",
      "POOLER_RESOLUTION": 14,
      "POOLER_SAMPLING_RATIO": 0,
      "POOLER_TYPE": "ROIAlignV2",
      "NUM_CONV": 4,
      "CONV_DIM": 256,
      "NORM": "",
      "CLS_AGNOSTIC_MASK": False,
    },
  },
  "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333},
  "TEST": {"DETECTIONS_PER_IMAGE": 100},
  "DATASETS": {"TEST": ["coco_2017_val"]},
}
# Detectron2's ResNet-FPN backbone pads every batch to a multiple of its coarsest stride (P5).
FPN_SIZE_DIVISIBILITY = 32
GN_GROUPS = 32  # Detectron2's get_norm("GN")
POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}  # -> aligned
NORMS = ("", "GN", "BN", "SyncBN", "FrozenBN")
ROI_HEADS = {"StandardROIHeads": "standard", "CascadeROIHeads": "cascade"}  # -> roi_heads.name
# Buffers a Detectron2 state dict may hold that carry no weights.
_DROPPED = re.compile(r".*num_batches_tracked|pixel_mean|pixel_std|.*anchor_generator\..*")

COCO_CLASS_NAMES = (
  "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
  "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
  "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
  "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
  "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
  "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
  "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
  "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
  "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
  "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# COCO's category id of each of those 80 classes: the ids of its annotation files (1..90, gaps).
COCO_CATEGORY_IDS = tuple(
  [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70]
  + [*range(72, 83), *range(84, 91)]
)


# --------------------------------------------------------------------------------------------
# The Detectron2 config.
# --------------------------------------------------------------------------------------------


def _merge(base: dict, new: Mapping) -> dict:
  out = copy.deepcopy(base)
  for k, v in new.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def _load_yaml(path: str, depth: int = 0) -> dict:
  """A Detectron2 YAML file with its _BASE_ chain merged (base first), as CfgNode does."""
  import yaml  # pylint: disable=g-import-not-at-top

  if depth > 10:
    raise ConversionError(f"{path}: _BASE_ chain deeper than 10 files")
  try:
    with open(path) as f:
      cfg = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as e:
    raise ConversionError(f"cannot read the Detectron2 config {path}: {e}") from e
  if not isinstance(cfg, dict):
    raise ConversionError(f"{path}: a Detectron2 config is a mapping, got {type(cfg).__name__}")
  base = cfg.pop("_BASE_", None)
  if base is None:
    return cfg
  base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
  return _merge(_load_yaml(base_path, depth + 1), cfg)


def read_d2_config(path: Optional[str]) -> dict:
  """The Detectron2 config at `path` (YAML, _BASE_ files merged) over BASE_RCNN_FPN; None: the
  base alone."""
  if path is None:
    return copy.deepcopy(BASE_RCNN_FPN)
  return _merge(BASE_RCNN_FPN, _load_yaml(path))


def _get(cfg: Mapping, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _require(cfg: Mapping, dotted: str, allowed: Any) -> None:
  value = _get(cfg, dotted)
  ok = value in allowed if isinstance(allowed, (tuple, set)) else value == allowed
  if not ok:
    raise ConversionError(
      f"Detectron2 config {dotted}={value!r}: this model supports only {allowed!r}"
    )


def _check_supported(cfg: Mapping) -> None:
  """ConversionError for every setting MaskRCNN cannot represent."""
  fixed = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": True,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.BOUNDARY_THRESH": -1,
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": False,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False,
  }
  for key, value in fixed.items():
    try:
      _require(cfg, key, value)
    except KeyError:
      pass  # absent from a partial YAML and its base: Detectron2's default applies
  _require(cfg, "MODEL.ROI_HEADS.NAME", tuple(ROI_HEADS))
  name = _get(cfg, "MODEL.ROI_HEADS.NAME")
  cascade = name == "CascadeROIHeads"
  # Detectron2's CascadeROIHeads supports only class-agnostic regression, the standard heads
  # (here) only class-specific.
  agnostic = _get(cfg, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG")
  if agnostic != cascade:
    raise ConversionError(
      f"Detectron2 config MODEL.ROI_HEADS.NAME={name!r} with "
      f"MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG={agnostic!r}: this model supports only "
      f"{cascade!r} with {name}"
    )
  if cascade:
    ious = _get(cfg, "MODEL.ROI_BOX_CASCADE_HEAD.IOUS")
    weights = _get(cfg, "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS")
    if (
      not ious
      or len(weights) != len(ious)
      or any(len(w) != 4 for w in weights)
      or ious[0] != _get(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")[0]
    ):
      raise ConversionError(
        f"Detectron2 config MODEL.ROI_BOX_CASCADE_HEAD.IOUS={ious} / BBOX_REG_WEIGHTS={weights}: "
        "one IoU and four weights per stage, the first IoU = MODEL.ROI_HEADS.IOU_THRESHOLDS[0]"
      )
  for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM"):
    _require(cfg, key, NORMS)
  for key in ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"):
    _require(cfg, key, ("", "GN", "BN", "SyncBN"))
  for key in ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "MODEL.ROI_MASK_HEAD.POOLER_TYPE"):
    _require(cfg, key, tuple(POOLER_TYPES))
  conv_dims = _get(cfg, "MODEL.RPN.CONV_DIMS")
  if not conv_dims or len(set(conv_dims)) != 1:
    raise ConversionError(
      f"Detectron2 config MODEL.RPN.CONV_DIMS={conv_dims}: this model's RPN head has one or "
      "more shared convs of one width"
    )
  if len(_get(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")) != 1:
    raise ConversionError(
      "Detectron2 config MODEL.ROI_HEADS.IOU_THRESHOLDS="
      f"{_get(cfg, 'MODEL.ROI_HEADS.IOU_THRESHOLDS')}: this model takes one threshold"
    )
  ratios = _get(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
  ratios = [tuple(r) for r in ratios] if isinstance(ratios[0], (list, tuple)) else [tuple(ratios)]
  if len(set(ratios)) != 1:
    raise ConversionError(
      f"Detectron2 config MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS={ratios}: this model uses one "
      "list of aspect ratios for every level"
    )
  width = _get(cfg, "MODEL.RESNETS.WIDTH_PER_GROUP")
  if (
    _get(cfg, "MODEL.RESNETS.STEM_OUT_CHANNELS") != width
    or _get(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS") != 4 * width
  ):
    raise ConversionError(
      "Detectron2 config MODEL.RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS must be "
      f"WIDTH_PER_GROUP ({width}) and 4 x WIDTH_PER_GROUP"
    )


def _flat_ratios(aspect_ratios: Any) -> tuple[float, ...]:
  first = aspect_ratios[0]
  return tuple(float(r) for r in (first if isinstance(first, (list, tuple)) else aspect_ratios))


def _set_head(head: ml_collections.ConfigDict, section: Mapping) -> None:
  """The conv width, norm and pooler of a box or mask head from its ROI_*_HEAD section."""
  head.conv_dim = int(section["CONV_DIM"])
  head.norm = section["NORM"]
  head.num_groups = GN_GROUPS
  head.pooler_resolution = int(section["POOLER_RESOLUTION"])
  head.pooler_sampling_ratio = int(section["POOLER_SAMPLING_RATIO"])
  head.pooler_aligned = POOLER_TYPES[section["POOLER_TYPE"]]


def model_config_from_d2(cfg: Mapping) -> ml_collections.ConfigDict:
  """The model config (default_model_config() layout) of a Detectron2 config (read_d2_config)."""
  _check_supported(cfg)
  m = cfg["MODEL"]
  c = default_model_config()
  c.num_classes = int(m["ROI_HEADS"]["NUM_CLASSES"])
  r = m["RESNETS"]
  c.backbone.depth = int(r["DEPTH"])
  c.backbone.norm = r["NORM"]
  c.backbone.num_groups = GN_GROUPS
  c.backbone.stride_in_1x1 = bool(r["STRIDE_IN_1X1"])
  c.backbone.freeze_at = int(m["BACKBONE"]["FREEZE_AT"])
  c.backbone.width = int(r["WIDTH_PER_GROUP"])
  c.fpn.out_channels = int(m["FPN"]["OUT_CHANNELS"])
  c.fpn.norm = m["FPN"]["NORM"]

  a = m["ANCHOR_GENERATOR"]
  c.anchors.sizes = tuple(
    tuple(float(s) for s in (lvl if isinstance(lvl, (list, tuple)) else [lvl]))
    for lvl in a["SIZES"]
  )
  c.anchors.aspect_ratios = _flat_ratios(a["ASPECT_RATIOS"])
  c.anchors.offset = float(a["OFFSET"])

  p = m["RPN"]
  c.rpn.head_conv_dims = int(p["CONV_DIMS"][0])
  c.rpn.head_num_conv = len(p["CONV_DIMS"])
  c.rpn.pre_nms_topk_train = int(p["PRE_NMS_TOPK_TRAIN"])
  c.rpn.pre_nms_topk_test = int(p["PRE_NMS_TOPK_TEST"])
  c.rpn.post_nms_topk_train = int(p["POST_NMS_TOPK_TRAIN"])
  c.rpn.post_nms_topk_test = int(p["POST_NMS_TOPK_TEST"])
  c.rpn.nms_thresh = float(p["NMS_THRESH"])
  c.rpn.min_size = float(m["PROPOSAL_GENERATOR"]["MIN_SIZE"])
  c.rpn.iou_thresholds = tuple(float(t) for t in p["IOU_THRESHOLDS"])
  c.rpn.iou_labels = tuple(int(v) for v in p["IOU_LABELS"])
  c.rpn.batch_size_per_image = int(p["BATCH_SIZE_PER_IMAGE"])
  c.rpn.positive_fraction = float(p["POSITIVE_FRACTION"])
  c.rpn.bbox_reg_weights = tuple(float(w) for w in p["BBOX_REG_WEIGHTS"])
  c.rpn.smooth_l1_beta = float(p["SMOOTH_L1_BETA"])
  c.rpn.loss_weight = float(p["LOSS_WEIGHT"])

  h = m["ROI_HEADS"]
  c.roi_heads.batch_size_per_image = int(h["BATCH_SIZE_PER_IMAGE"])
  c.roi_heads.positive_fraction = float(h["POSITIVE_FRACTION"])
  c.roi_heads.iou_threshold = float(h["IOU_THRESHOLDS"][0])
  c.roi_heads.bbox_reg_weights = tuple(float(w) for w in m["ROI_BOX_HEAD"]["BBOX_REG_WEIGHTS"])
  c.roi_heads.score_thresh_test = float(h["SCORE_THRESH_TEST"])
  c.roi_heads.nms_thresh_test = float(h["NMS_THRESH_TEST"])
  c.roi_heads.detections_per_image = int(cfg["TEST"]["DETECTIONS_PER_IMAGE"])
  c.roi_heads.proposal_append_gt = bool(h["PROPOSAL_APPEND_GT"])
  c.roi_heads.name = ROI_HEADS[h["NAME"]]
  if c.roi_heads.name == "cascade":
    ch = m["ROI_BOX_CASCADE_HEAD"]
    c.roi_heads.cascade_iou_thresholds = tuple(float(t) for t in ch["IOUS"])
    c.roi_heads.cascade_bbox_reg_weights = tuple(
      tuple(float(w) for w in ws) for ws in ch["BBOX_REG_WEIGHTS"]
    )

  b = m["ROI_BOX_HEAD"]
  num_conv, num_fc = int(b["NUM_CONV"]), int(b["NUM_FC"])
  c.box_head.name = "2fc" if (num_conv, num_fc) == (0, 2) else "4conv1fc"
  c.box_head.num_conv, c.box_head.num_fc = num_conv, num_fc
  c.box_head.fc_dim = int(b["FC_DIM"])
  _set_head(c.box_head, b)

  k = m["ROI_MASK_HEAD"]
  c.mask_head.num_conv = int(k["NUM_CONV"])
  _set_head(c.mask_head, k)
  # Detectron2 trains the mask head on every sampled foreground ROI: at most this many.
  c.mask_head.max_fg_rois = int(h["BATCH_SIZE_PER_IMAGE"] * h["POSITIVE_FRACTION"])

  i = cfg["INPUT"]
  c.input.format = i["FORMAT"]
  c.input.pixel_mean = tuple(float(v) for v in m["PIXEL_MEAN"])
  c.input.pixel_std = tuple(float(v) for v in m["PIXEL_STD"])
  c.input.min_size_test = int(i["MIN_SIZE_TEST"])
  c.input.max_size_test = int(i["MAX_SIZE_TEST"])
  c.input.resize = "detectron2"
  c.input.size_divisibility = FPN_SIZE_DIVISIBILITY
  c.output.first_label = 0
  c.output.mask_paste = "detectron2"
  if c.input.format not in ("BGR", "RGB"):
    raise ConversionError(f"Detectron2 config INPUT.FORMAT={c.input.format!r}: BGR or RGB only")
  return c


# --------------------------------------------------------------------------------------------
# The structure the tensors hold (used when no config is given, and to check one).
# --------------------------------------------------------------------------------------------


def _norm_of(sd: Mapping[str, np.ndarray], module_prefix: str) -> str:
  """'' / 'GN' / 'FrozenBN' / 'SyncBN' of the norms under `module_prefix`."""
  names = [k for k in sd if k.startswith(module_prefix) and ".norm." in k]
  if not names:
    return ""
  if not any(k.endswith("running_mean") for k in names):
    return "GN"
  # FrozenBatchNorm2d has no num_batches_tracked; BatchNorm2d (BN, SyncBN) has one.
  return "SyncBN" if any(k.endswith("num_batches_tracked") for k in names) else "FrozenBN"


def _count(sd: Mapping[str, np.ndarray], pattern: str) -> int:
  return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def structure_from_tensors(sd: Mapping[str, np.ndarray]) -> dict:
  """Config overrides that the tensors determine: depth, norms, head sizes, classes, and the ROI
  heads (Cascade when the box predictor is a ModuleList: roi_heads.box_predictor.0.*)."""
  cascade = "roi_heads.box_predictor.0.cls_score.weight" in sd
  # A cascade's stages share one structure: stage 0's tensors describe it.
  box = "roi_heads.box_head.0." if cascade else "roi_heads.box_head."
  cls_score = (
    "roi_heads.box_predictor.0.cls_score.weight"
    if cascade
    else ("roi_heads.box_predictor.cls_score.weight")
  )
  if cls_score not in sd:
    raise ConversionError(
      "no roi_heads.box_predictor.cls_score.weight (nor roi_heads.box_predictor.0.*): not a "
      f"Detectron2 GeneralizedRCNN with Standard or Cascade ROI heads (first keys: "
      f"{sorted(sd)[:5]})"
    )
  roi_heads: dict[str, Any] = {"NUM_CLASSES": int(np.shape(sd[cls_score])[0]) - 1}
  box_head: dict[str, Any] = {}
  if cascade:
    roi_heads["NAME"] = "CascadeROIHeads"
    box_head["CLS_AGNOSTIC_BBOX_REG"] = True
    stages = _count(sd, r"roi_heads\.box_predictor\.(\d+)\.cls_score\.weight")
    default_stages = len(BASE_RCNN_FPN["MODEL"]["ROI_BOX_CASCADE_HEAD"]["IOUS"])
    if stages != default_stages:
      raise ConversionError(
        f"a Cascade R-CNN of {stages} stages: its IoUs and box weights are not in the tensors; "
        f"give its Detectron2 config (the default has {default_stages} stages)"
      )
  bottom_up = {
    k[len("backbone.bottom_up.") :]: v for k, v in sd.items() if k.startswith("backbone.bottom_up.")
  }
  return {
    "MODEL": {
      "RESNETS": {
        "DEPTH": infer_depth(bottom_up),
        "NORM": _norm_of(sd, "backbone.bottom_up.") or "FrozenBN",
        "STRIDE_IN_1X1": _norm_of(sd, "backbone.bottom_up.") in ("FrozenBN", ""),
      },
      "FPN": {"NORM": _norm_of(sd, "backbone.fpn_")},
      "ROI_HEADS": roi_heads,
      "ROI_BOX_HEAD": {
        "NUM_CONV": _count(sd, re.escape(box) + r"conv(\d+)\.weight"),
        "NUM_FC": _count(sd, re.escape(box) + r"fc(\d+)\.weight"),
        "NORM": _norm_of(sd, box),
        **box_head,
      },
      "ROI_MASK_HEAD": {
        "NUM_CONV": _count(sd, r"roi_heads\.mask_head\.mask_fcn(\d+)\.weight"),
        "NORM": _norm_of(sd, "roi_heads.mask_head."),
      },
    }
  }


# --------------------------------------------------------------------------------------------
# The rename table.
# --------------------------------------------------------------------------------------------

_LEAVES = {
  "weight": "kernel",
  "bias": "bias",
  "norm.weight": "norm/scale",
  "norm.bias": "norm/bias",
  "norm.running_mean": "norm/mean",
  "norm.running_var": "norm/var",
}
_STATS = ("norm.running_mean", "norm.running_var")
_DECONV = "roi_heads.mask_head.deconv"


def split_name(name: str) -> tuple[str, str]:
  """'roi_heads.box_head.conv1.norm.weight' -> ('roi_heads.box_head.conv1', 'norm.weight')."""
  for leaf in sorted(_LEAVES, key=len, reverse=True):
    if name.endswith("." + leaf):
      return name[: -len(leaf) - 1], leaf
  raise ConversionError(f"{name}: not a weight, bias or norm tensor of a Detectron2 module")


def target_path(name: str) -> tuple[str, ...]:
  """Detectron2 name -> our variable path (collection first) for BN-like statistics kept as BN.

  'backbone.bottom_up.res2.0.conv1.weight' -> ('params', 'backbone', 'bottom_up', 'res2', '0',
  'conv1', 'kernel'); running statistics go to 'batch_stats'.
  """
  module, leaf = split_name(name)
  collection = "batch_stats" if leaf in _STATS else "params"
  return (collection,) + tuple(module.split(".")) + tuple(_LEAVES[leaf].split("/"))


def d2_name(path: tuple[str, ...]) -> str:
  """Our param path (without the collection) -> Detectron2's state-dict name (the inverse map).

  ('roi_heads', 'box_head', 'conv1', 'norm', 'scale') -> 'roi_heads.box_head.conv1.norm.weight'.
  """
  inverse = {tuple(v.split("/")): k for k, v in _LEAVES.items()}
  for n in (2, 1):
    if tuple(path[-n:]) in inverse:
      return ".".join(path[:-n]) + "." + inverse[tuple(path[-n:])]
  raise ValueError(f"{'/'.join(path)} has no Detectron2 name")


def to_target_layout(name: str, value: np.ndarray) -> np.ndarray:
  """A Detectron2 tensor in our layout: OIHW -> HWIO, IOHW (deconv) -> HWIO, (out, in) ->
  (in, out)."""
  module, leaf = split_name(name)
  value = np.asarray(value, np.float32)
  if leaf != "weight":
    return value
  if value.ndim == 4:
    axes = (2, 3, 0, 1) if module == _DECONV else (2, 3, 1, 0)
    return np.ascontiguousarray(value.transpose(axes))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  raise ConversionError(f"{name}: a weight of shape {value.shape} is neither conv nor linear")


def _template(model_config: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, *path): shape} of build_model(model_config)'s variables (nothing computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rethink_jax.models.mask_rcnn import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(model_config)
  batch = {"image": jnp.zeros((1, 64, 64, 3)), "image_hw": jnp.array([[64, 64]])}
  rngs = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
  shapes = jax.eval_shape(lambda: model.init(rngs, batch, train=False))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(str(getattr(k, "key", k)) for k in p): tuple(s.shape) for p, s in flat}


def state_dict_to_variables(
  sd: Mapping[str, np.ndarray],
  template: Mapping[tuple[str, ...], tuple[int, ...]],
  eps: float = BN_EPS,
) -> tuple[dict, list[str], list[str]]:
  """Renames a Detectron2 state dict onto `template`'s variables.

  Returns (variables, used lines, dropped keys). Raises ConversionError naming every leftover
  tensor, every target left unfilled and every shape mismatch.
  """
  flat: dict[tuple[str, ...], np.ndarray] = {}
  source_of: dict[tuple[str, ...], str] = {}
  used, dropped, errors = [], [], []
  for name in sorted(sd):
    if _DROPPED.fullmatch(name):
      dropped.append(name)
      continue
    try:
      module, leaf = split_name(name)
    except ConversionError as e:
      errors.append(f"{e} {tuple(np.shape(sd[name]))}")
      continue
    if leaf.startswith("norm.") and ("frozen",) + tuple(module.split(".")) + ("norm", "scale") in (
      template
    ):
      continue  # FrozenBN: folded below with the module's other norm tensors
    path = target_path(name)
    value = to_target_layout(name, sd[name])
    flat[path], source_of[path] = value, name
    used.append(f"{name} {tuple(np.shape(sd[name]))} -> {'/'.join(path)}")

  # FrozenBN: fold each norm's four tensors into the "frozen" affine.
  for path in [p for p in template if p[0] == "frozen" and p[-1] == "scale"]:
    module = ".".join(path[1:-2])
    parts = {
      s: sd.get(f"{module}.norm.{s}") for s in ("weight", "bias", "running_mean", "running_var")
    }
    absent = [s for s, v in parts.items() if v is None]
    if absent:
      errors.append(f"target {'/'.join(path[:-1])} (FrozenBN) lacks {module}.norm.{absent}")
      continue
    w, b, mean, var = (np.asarray(parts[s], np.float64) for s in parts)
    scale = w / np.sqrt(var + eps)
    bias_path = path[:-1] + ("bias",)
    flat[path], flat[bias_path] = scale.astype(np.float32), (b - mean * scale).astype(np.float32)
    source_of[path] = source_of[bias_path] = f"{module}.norm.*"
    for s in parts:
      used.append(f"{module}.norm.{s} {tuple(np.shape(parts[s]))} -> {'/'.join(path[:-1])}")

  for path, shape in sorted(template.items()):
    if path not in flat:
      errors.append(
        f"target {'/'.join(path)} {shape}: no tensor {d2_name(path[1:])} in the checkpoint"
      )
    elif tuple(flat[path].shape) != shape:
      errors.append(
        f"{source_of[path]} -> {'/'.join(path)}: source shape {tuple(flat[path].shape)} "
        f"(in our layout) != target shape {shape}"
      )
  for path in sorted(set(flat) - set(template)):
    errors.append(
      f"{source_of[path]} {tuple(flat[path].shape)} has no place in the model "
      f"({'/'.join(path)}): another architecture, or a config that does not match"
    )
  if errors:
    raise ConversionError(
      "Detectron2 conversion failed:\n  "
      + "\n  ".join(errors[:40])
      + (f"\n  ... and {len(errors) - 40} more" if len(errors) > 40 else "")
    )
  variables: dict = {}
  for path, value in flat.items():
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return variables, used, dropped


# --------------------------------------------------------------------------------------------
# The converter.
# --------------------------------------------------------------------------------------------


def convert(
  state_dict: Mapping[str, np.ndarray],
  path: str,
  d2_config: Optional[str] = None,
  class_names: Optional[list[str]] = None,
) -> tuple[dict, ml_collections.ConfigDict, dict]:
  """A Detectron2 Mask R-CNN state dict -> (variables, model_config, meta).

  Args:
    state_dict: {Detectron2 name: array} (the "model" entry of a model-zoo file).
    path: the file it came from (for the sha256 and the meta).
    d2_config: the Detectron2 config YAML it was trained with; None: BASE_RCNN_FPN with the
      structure read from the tensors.
    class_names: the K class names; default COCO's 80 when K = 80 and the config tests on COCO.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  structure = structure_from_tensors(sd)
  cfg = read_d2_config(d2_config)
  if d2_config is None:
    cfg = _merge(cfg, structure)
  model_config = model_config_from_d2(cfg)
  variables, used, dropped = state_dict_to_variables(sd, _template(model_config))
  k = model_config.num_classes
  category_ids = None
  if class_names is None and k == len(COCO_CLASS_NAMES):
    if any("coco" in str(d) for d in cfg.get("DATASETS", {}).get("TEST", [])):
      class_names, category_ids = list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
  if class_names is not None and len(class_names) != k:
    raise ConversionError(f"{len(class_names)} class names for a model of {k} classes")
  meta = {
    "source": "detectron2",
    "sha256": sha256_file(path) if os.path.exists(path) else None,
    "input": os.path.basename(path),
    "d2_config": os.path.abspath(d2_config) if d2_config else None,
    "class_names": list(class_names) if class_names is not None else None,
    # COCO results (rethink_jax.predict) report label l as category_ids[l] when known.
    "category_ids": category_ids,
    # Detectron2 reports class k (1..K in the model) as k - 1.
    "label_map": {str(i + 1): i for i in range(k)},
    "bn_eps": BN_EPS,
    "used": used,
    "dropped": dropped,
  }
  return variables, model_config, meta
