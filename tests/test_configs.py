"""Every recipe in configs/ loads, and its numbers are the paper's (../shared/REFERENCE.md)."""

import glob
import importlib.util
import os

from absl import flags
from ml_collections import config_flags
import pytest

from rethink_jax import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
RECIPES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
  if not os.path.basename(p).startswith(("common", "compare_", "_"))
)
COCO = [r for r in RECIPES if "mask_rcnn" in r]


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(
    f"_cfg_{name}", os.path.join(CONFIG_DIR, name + ".py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def test_the_paper_recipes_exist():
  for name in [
    "scratch_mask_rcnn_R_50_FPN_gn",
    "mask_rcnn_R_50_FPN_gn",
    "scratch_mask_rcnn_R_101_FPN_gn",
    "mask_rcnn_R_101_FPN_gn",
    "scratch_mask_rcnn_R_50_FPN_syncbn",
    "mask_rcnn_R_50_FPN_syncbn",
    "scratch_mask_rcnn_R_50_FPN_gn_trainaug",
    "mask_rcnn_R_50_FPN_gn_trainaug",
    "scratch_mask_rcnn_R_50_FPN_gn_10k",
    "mask_rcnn_R_50_FPN_gn_10k",
    "tiny_shapes",
  ]:
    assert name in RECIPES, name


@pytest.mark.parametrize("name", RECIPES)
def test_every_config_loads_and_resolves(name):
  c = load(name)
  for group in ("model", "data", "optim", "schedule", "eval", "checkpoint"):
    assert group in c, (name, group)
  for key in ("seed", "batch_size", "init_from", "eval_every", "log_every"):
    assert key in c, (name, key)
  s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  assert s["total_steps"] > 0 and all(0 < d < s["total_steps"] for d in s["decay_steps"])
  with open(os.path.join(CONFIG_DIR, name + ".py")) as f:
    text = f.read()
  assert "python -m rethink_jax.main --config configs/" + name in text, "docstring: command"


@pytest.mark.parametrize("name", COCO)
def test_coco_recipe_matches_reference(name):
  scratch = name.startswith("scratch_")
  c = load(name)
  m = c.model
  norm = "SyncBN" if "syncbn" in name else "GN"
  depth = 152 if "X_152" in name else 101 if "R_101" in name else 50
  enhanced = "cascade" in name  # the enhanced baseline: ResNeXt, Cascade, train aug, TTA
  # Normalization everywhere (ResNet, FPN, 4conv1fc box head, mask head); nothing frozen.
  assert m.backbone.norm == m.fpn.norm == m.box_head.norm == m.mask_head.norm == norm
  assert m.backbone.depth == depth and m.backbone.width == 64
  if enhanced:
    resnext = (32, 8) if "X_152" in name else (1, 64)
    assert (m.backbone.groups, m.backbone.width_per_group) == resnext
    assert m.roi_heads.name == "cascade" and c.eval.tta.enabled
    assert tuple(m.roi_heads.cascade_iou_thresholds) == (0.5, 0.6, 0.7)
    assert [tuple(w) for w in m.roi_heads.cascade_bbox_reg_weights] == [
      (10, 10, 5, 5),
      (20, 20, 10, 10),
      (30, 30, 15, 15),
    ]
  else:
    assert (m.backbone.groups, m.roi_heads.name, c.eval.tta.enabled) == (1, "standard", False)
  assert m.backbone.freeze_at == 0 and m.backbone.stride_in_1x1 is False
  assert m.backbone.num_groups == 32
  assert (
    m.box_head.name,
    m.box_head.num_conv,
    m.box_head.conv_dim,
    m.box_head.num_fc,
    m.box_head.fc_dim,
  ) == ("4conv1fc", 4, 256, 1, 1024)
  assert (m.mask_head.num_conv, m.mask_head.conv_dim, m.mask_head.resolution) == (4, 256, 28)
  assert m.num_classes == 80 and m.fpn.out_channels == 256
  assert tuple(m.anchors.aspect_ratios) == (0.5, 1.0, 2.0)
  assert [s[0] for s in m.anchors.sizes] == [32, 64, 128, 256, 512]
  assert (m.rpn.batch_size_per_image, m.rpn.positive_fraction, m.rpn.nms_thresh) == (256, 0.5, 0.7)
  assert (m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train) == (2000, 1000)
  assert (m.roi_heads.batch_size_per_image, m.roi_heads.positive_fraction) == (512, 0.25)
  assert tuple(m.roi_heads.bbox_reg_weights) == (10, 10, 5, 5)
  assert (
    m.roi_heads.score_thresh_test,
    m.roi_heads.nms_thresh_test,
    m.roi_heads.detections_per_image,
  ) == (0.05, 0.5, 100)
  # Optimizer: SGD 0.9, wd 1e-4 (none on norms), LR 0.02 at 16 images, Detectron's warmup.
  o = c.optim
  assert (o.momentum, o.weight_decay, o.weight_decay_norm) == (0.9, 1e-4, 0.0)
  assert o.base_lr == 0.02 and c.schedule.base_batch_size == 16 and c.batch_size == 16
  assert o.warmup_steps == 500 and abs(o.warmup_factor - 1 / 3) < 1e-9
  assert not o.grad_clip_norm
  # Data: COCO 2017, shorter side 800 (train aug: [640, 800]), longer side <= 1333, flip only.
  d = c.data
  assert d.name == "coco_instances" and d.max_size == 1333 and d.flip_prob == 0.5
  if "trainaug" in name or enhanced:
    assert tuple(d.min_size) == (640, 672, 704, 736, 768, 800)
  else:
    assert d.min_size == 800
  assert d.min_size_test == 800
  assert d.pad_to[0] >= 1333 and d.pad_to[0] % 32 == 0
  if scratch:
    assert not c.require_init_from
    assert d.input_format == "BGR" and tuple(d.pixel_std) == (57.375, 57.12, 58.395)
  else:
    assert c.require_init_from
    if norm == "GN":  # FAIR's R-50-GN / R-101-GN (Detectron): BGR, std 1
      assert d.input_format == "BGR" and tuple(d.pixel_std) == (1.0, 1.0, 1.0)
      assert tuple(d.pixel_mean) == (103.53, 116.28, 123.675)
    else:  # torchvision BN weights
      assert d.input_format == "RGB" and tuple(d.pixel_mean) == (123.675, 116.28, 103.53)
  if "10k" in name:
    assert d.num_train_images == 10_000
    s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
    assert s["total_steps"] == (220_000 if scratch else 60_000)


@pytest.mark.parametrize("multiple", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("name", ["scratch_mask_rcnn_R_50_FPN_gn", "mask_rcnn_R_101_FPN_gn"])
def test_schedule_multiples(name, multiple):
  c = load(name, str(multiple))
  s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  assert s["total_steps"] == multiple * 90_000
  if multiple >= 2:  # x0.1 at the last 60k and the last 20k iterations
    assert s["decay_steps"] == (multiple * 90_000 - 60_000, multiple * 90_000 - 20_000)
  else:  # Detectron's 1x: 60k and 80k
    assert s["decay_steps"] == (60_000, 80_000)
  assert s["base_lr"] == pytest.approx(0.02)
  assert c.schedule.multiple == multiple
  table = (
    {2: 36.8, 3: 39.5, 4: 40.6, 5: 40.7, 6: 41.3}
    if name.startswith("scratch")
    else {2: 41.8, 3: 42.3, 4: 42.3, 5: 41.9, 6: 42.2}
  )
  assert c.reference.bbox_AP == table.get(multiple, -1.0)
  # Iterations given directly.
  c = load(name, f"{multiple * 90}k")
  assert (
    optim.resolve_schedule(c.schedule, c.optim, c.batch_size)["total_steps"] == multiple * 90_000
  )


def test_command_line_overrides_rescale_the_schedule():
  fv = flags.FlagValues()
  path = os.path.join(CONFIG_DIR, "scratch_mask_rcnn_R_50_FPN_gn_trainaug.py")
  argv = [
    "prog",
    f"--config={path}:9",
    "--config.batch_size=64",
    "--config.optim.grad_clip_norm=1.0",
  ]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  c = fv.config
  s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  # Detectron2's scratch_mask_rcnn_R_50_FPN_9x_gn: 202,500 iterations, decays 187,500 / 197,500.
  assert s["total_steps"] == 202_500 and s["decay_steps"] == (187_500, 197_500)
  assert s["base_lr"] == pytest.approx(0.08)
  assert c.optim.grad_clip_norm == 1.0


def test_tiny_config_is_tiny():
  c = load("tiny_shapes", "3")
  assert c.model.backbone.width <= 16 and c.model.fpn.out_channels <= 32
  assert c.data.name == "shapes_instances" and tuple(c.data.pad_to) == (64, 64)
  assert optim.resolve_schedule(c.schedule, c.optim, c.batch_size)["total_steps"] == 3


@pytest.mark.parametrize("name", ["keypoint_rcnn_R_50_FPN_gn", "scratch_keypoint_rcnn_R_50_FPN_gn"])
def test_keypoint_recipes(name):
  """The paper's keypoint experiment: R-50-FPN-GN Keypoint R-CNN on COCO person keypoints, with
  Detectron2's keypoint head and keypoint settings, 2x (pre-trained) / 3x (random init)."""
  scratch = name.startswith("scratch_")
  c = load(name)
  m = c.model
  assert m.keypoint_on is True and m.mask_on is False and m.num_classes == 1
  k = m.keypoint_head
  assert (k.num_keypoints, tuple(k.conv_dims), k.pooler_resolution) == (17, (512,) * 8, 14)
  assert (k.pooler_sampling_ratio, k.pooler_aligned, k.loss_weight) == (0, True, 1.0)
  assert k.normalize_by_visible_keypoints and k.min_keypoints_per_image == 1
  assert m.rpn.post_nms_topk_train == 1500
  assert m.backbone.norm == m.fpn.norm == m.box_head.norm == "GN" and m.backbone.depth == 50
  assert m.backbone.freeze_at == 0
  d = c.data
  assert (d.name, d.builder_config, d.keypoints) == ("coco_instances", "keypoints_2017", True)
  assert tuple(d.min_size) == (640, 672, 704, 736, 768, 800) and d.min_size_test == 800
  assert d.min_keypoints_per_image == 1
  assert c.require_init_from is (not scratch)
  s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  assert s["total_steps"] == (3 if scratch else 2) * 90_000
  assert s["base_lr"] == pytest.approx(0.02) and c.batch_size == 16
  assert load(name, "2").schedule.multiple == 2


def test_keypoint_comparison_config():
  """configs/compare_shapes_keypoints.py: the demo's comparison on the synthetic keypoint set."""
  c = load("compare_shapes_keypoints")
  demo = load("compare_shapes")
  assert (c.data.name, c.data.builder_config, c.data.keypoints) == (
    "shapes_keypoints",
    "demo",
    True,
  )
  m = c.model
  assert m.keypoint_on is True and m.mask_on is False and m.num_classes == 1
  assert m.keypoint_head.num_keypoints == 7
  assert len(m.keypoint_head.conv_dims) < 8 and max(m.keypoint_head.conv_dims) <= 64
  # Everything else is the box / mask demo's: backbone, optimizer, unit, pre-training.
  assert m.backbone.to_dict() == demo.model.backbone.to_dict()
  assert c.optim.to_dict() == demo.optim.to_dict() and c.batch_size == demo.batch_size
  assert c.compare.unit_steps == demo.compare.unit_steps
  assert c.compare.pretrain.to_dict() == demo.compare.pretrain.to_dict()
  assert tuple(c.compare.multiples) == tuple(demo.compare.multiples)
