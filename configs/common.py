"""Pieces shared by the recipes in configs/: the paper's COCO recipe and the synthetic defaults.

Every recipe file is `get_config(arg) -> ml_collections.ConfigDict` with these groups:
  seed, batch_size (global images per step), init_from (backbone checkpoint dir or ""),
  init_from_detector (whole detector checkpoint dir or ""),
  eval_every (steps; the AP-versus-iteration curve), log_every (steps), data_timeout_s,
  model      rethink_jax.models.default_model_config() with the recipe's overrides,
  data       the input pipeline (rethink_jax/data/pipeline.py),
  optim      base_lr (at schedule.base_batch_size images), momentum, weight_decay,
             weight_decay_norm, weight_decay_bias, warmup_steps, warmup_factor, grad_clip_norm,
  schedule   multiple (1x = 90k iterations at 16 images), base_batch_size, total_steps and
             decay_steps (0 / () = derived by rethink_jax.optim.schedule), decay_factor,
  eval       batch_size (global), num_images (0 = the whole split, else its first N images),
             at_start (evaluate the initial model too), at_end (evaluate after the last step),
             record_images, tensorboard_images (pictures of detections: rethink_jax/visualize.py),
             tta (test-time augmentation: enabled, min_sizes, max_size, flip; rethink_jax/tta.py),
  checkpoint every_steps, keep, async_save, restart_if_unreadable,
  reference  the paper's numbers for this recipe (documentation and comparisons only).
Import from a recipe file as `from configs import common` (from the repository root, or anywhere
after `pip install -e .`).
"""

import ml_collections

from rethink_jax.optim import ITERS_1X  # 1x at 16 images per step

# Pixel formats (0..255 scale, in the channel order of input_format). See REFERENCE.md.
DETECTRON_BGR = dict(
  input_format="BGR", pixel_mean=(103.530, 116.280, 123.675), pixel_std=(1.0, 1.0, 1.0)
)  # MSRA / FAIR Detectron weights (R-50-GN.pkl)
# Detectron2's scratch configs: same mean, the ImageNet std (BGR order) so inputs are ~unit scale.
SCRATCH_BGR = dict(
  input_format="BGR", pixel_mean=(103.530, 116.280, 123.675), pixel_std=(57.375, 57.120, 58.395)
)
TORCHVISION_RGB = dict(
  input_format="RGB", pixel_mean=(123.675, 116.280, 103.530), pixel_std=(58.395, 57.120, 57.375)
)  # torchvision / timm weights

# Table 1 of the paper (box AP, COCO val2017).
TABLE1_BOX_AP = {
  (50, "scratch"): {2: 36.8, 3: 39.5, 4: 40.6, 5: 40.7, 6: 41.3},
  (50, "pretrained"): {2: 40.3, 3: 40.8, 4: 40.9, 5: 40.9, 6: 41.1},
  (101, "scratch"): {2: 38.2, 3: 41.0, 4: 41.8, 5: 42.2, 6: 42.7},
  (101, "pretrained"): {2: 41.8, 3: 42.3, 4: 42.3, 5: 41.9, 6: 42.2},
}


def parse_schedule_arg(arg: str | None, default: float | str) -> float:
  """The recipes' ARG: a schedule multiple ("3", "0.5") or iterations at batch 16 ("220k",
  "60000"). Returns the multiple (float). An empty ARG gives `default`."""
  arg = str(arg).strip() if arg not in (None, "") else str(default)
  if arg.lower().endswith("k"):
    return float(arg[:-1]) * 1000 / ITERS_1X
  value = float(arg)
  if value <= 0:
    raise ValueError(f"schedule ARG must be > 0, got {arg!r}")
  return value / ITERS_1X if value >= 1000 else value


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The paper's (Detectron's) optimizer: SGD 0.9, wd 1e-4, LR 0.02 at 16 images, warmup 500
  iterations from 1/3. No weight decay on norm parameters (Detectron2's scratch configs; kept for
  both arms so they differ only in initialization and schedule)."""
  c = ml_collections.ConfigDict(
    dict(
      base_lr=0.02,
      momentum=0.9,
      nesterov=False,
      weight_decay=1e-4,
      weight_decay_norm=0.0,
      weight_decay_bias=ml_collections.FieldReference(None, field_type=float),
      warmup_steps=500,
      warmup_factor=1.0 / 3.0,
      grad_clip_norm=0.0,
    )
  )
  c.update(overrides)
  return c


def schedule_config(multiple: float, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      multiple=float(multiple), base_batch_size=16, total_steps=0, decay_steps=(), decay_factor=0.1
    )
  )
  c.update(overrides)
  return c


def _data(**fields):
  """rethink_jax.data.pipeline.default_data_config() with `fields` set."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  d = pipeline.default_data_config().to_dict()
  d.update(fields)  # not ConfigDict.update: min_size may change from int to a tuple of choices
  for key in ("data_dir", "builder_config"):  # None, but settable from the command line
    if d.get(key) is None:
      d[key] = ml_collections.FieldReference(None, field_type=str)
  return ml_collections.ConfigDict(d)


def coco_data(
  pixel: dict,
  *,
  min_size: int | tuple[int, ...] = 800,
  max_size: int = 1333,
  num_train_images: int = 0,
) -> ml_collections.ConfigDict:
  """COCO 2017 instances (coco_instances builder): train2017 -> val2017.

  min_size: shorter side at training, one value, or the "train aug" choices (640, 672, ..., 800:
  Detectron2's multi-scale training, one per image); evaluation uses 800 (min_size_test).
  Batches are padded by orientation (pad_buckets: 800 x 1344 landscape, 1344 x 800 portrait for
  the 800 / 1333 recipe) as Detectron2 groups them, in training and evaluation.
  """
  sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
  short = -(-max(*sizes, 800) // 32) * 32  # training sizes and min_size_test
  long = -(-max_size // 32) * 32
  return _data(
    name="coco_instances",
    builder_config=None,
    train_split="train",
    eval_split="validation",
    min_size=min_size,
    min_size_test=800,
    max_size=max_size,
    # 1333 rounded up to a multiple of 32 (the FPN's coarsest stride); used with pad_buckets=()
    pad_to=(1344, 1344),
    pad_buckets=((short, long), (long, short)),
    max_instances=100,
    mask_size=112,
    flip_prob=0.5,
    num_train_images=num_train_images,
    subset_seed=0,
    drop_empty_train=True,
    num_parallel_calls=8,
    prefetch=2,
    **pixel,
  )


def shapes_data(
  builder_config: str = "demo", image_size: int = 128, pixel: dict | None = None, **fields
) -> ml_collections.ConfigDict:
  """The synthetic shapes_instances set (data/shapes.py), generated offline on first use."""
  pixel = pixel or SCRATCH_BGR
  return _data(
    name="shapes_instances",
    builder_config=builder_config,
    train_split="train",
    eval_split="validation",
    min_size=image_size,
    min_size_test=image_size,
    max_size=image_size,
    pad_to=(image_size, image_size),
    max_instances=16,
    mask_size=28,
    flip_prob=0.5,
    num_train_images=0,
    subset_seed=0,
    drop_empty_train=True,
    **dict(pixel, **fields),
  )


def base_config(
  model: ml_collections.ConfigDict,
  data: ml_collections.ConfigDict,
  multiple: float,
  *,
  batch_size: int = 16,
  eval_every: int = 0,
) -> ml_collections.ConfigDict:
  """The groups every recipe has. eval_every=0: twice per 1x of the schedule (an AP curve)."""
  from rethink_jax import tta  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size
  c.init_from = ""
  c.init_from_detector = ""  # whole-detector checkpoint dir (detector_checkpoint), "" = none
  c.model = model
  c.data = data
  c.optim = optim_config()
  c.schedule = schedule_config(multiple)
  c.eval_every = eval_every or int(round(ITERS_1X / 2 * 16 / batch_size))
  c.log_every = 20
  c.data_timeout_s = 1800.0  # a training batch taking longer stops the run (0: wait forever)
  c.eval = ml_collections.ConfigDict(
    dict(
      batch_size=8,
      num_images=0,
      at_start=False,
      at_end=True,
      record_images=6,  # images whose detections every evaluation saves (workdir/eval_images)
      tensorboard_images=3,  # of those, drawn to TensorBoard at every evaluation
      tta=tta.default_tta_config(),  # test-time augmentation (rethink_jax/tta.py), off
    )
  )
  c.checkpoint = ml_collections.ConfigDict(
    dict(
      every_steps=5000,
      keep=3,
      async_save=True,
      restart_if_unreadable=False,  # True: start over when checkpoints exist but none restores
    )
  )
  c.reference = ml_collections.ConfigDict()
  return c


TRAIN_AUG_SIZES = (640, 672, 704, 736, 768, 800)  # "train aug": shorter side in [640, 800]


def coco_mask_rcnn(
  *,
  depth: int = 50,
  norm: str = "GN",
  pretrained: bool = False,
  multiple: float = 3.0,
  min_size: int | tuple[int, ...] = 800,
  num_train_images: int = 0,
) -> ml_collections.ConfigDict:
  """Mask R-CNN R-{depth}-FPN with `norm` everywhere (ResNet, FPN, 4conv1fc box head, mask head),
  trained from random init or fine-tuned from ImageNet weights (the paper's Section 4 recipe).

  Scratch and fine-tuned models differ only in init and schedule: nothing frozen (freeze_at 0,
  norms trained), stride in the 3x3 conv (FAIR's GN weights), no zero-init of residual norms.
  GN statistics are Detectron2's (model.backbone.norm_stats "padded", over the padded tensor): the
  orientation buckets pad about as much as Detectron2's batches do, so the features are close to
  those of the paper's models; "valid" would make them independent of the padding instead.
  """
  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  m = mask_rcnn.default_model_config()
  m.num_classes = 80
  m.backbone.depth = depth
  m.backbone.norm = norm
  m.backbone.stride_in_1x1 = False
  m.backbone.freeze_at = 0
  m.fpn.norm = norm
  m.backbone.norm_stats = "padded"
  m.box_head.name = "4conv1fc"
  m.box_head.num_conv = 4
  m.box_head.num_fc = 1
  m.box_head.norm = norm
  m.mask_head.norm = norm
  if pretrained:
    # FAIR's ImageNet GN weights are Detectron (BGR, std 1); BN weights come from torchvision.
    pixel = DETECTRON_BGR if norm == "GN" else TORCHVISION_RGB
  else:
    pixel = SCRATCH_BGR
  c = base_config(
    m, coco_data(pixel, min_size=min_size, num_train_images=num_train_images), multiple
  )
  arm = "pretrained" if pretrained else "scratch"
  # Fine-tuning: set --config.init_from=DIR, a backbone checkpoint (convert.save_backbone's
  # output), or --config.init_from_detector=DIR, a whole detector; train.py refuses to fine-tune
  # from nothing (config.require_init_from).
  c.init_from = ""
  c.require_init_from = bool(pretrained)
  table = TABLE1_BOX_AP.get((depth, arm), {}) if norm == "GN" and min_size == 800 else {}
  mult = c.schedule.multiple
  c.reference = ml_collections.ConfigDict(
    dict(
      source="Rethinking ImageNet Pre-training, Table 1 (box AP, COCO val2017)",
      arm=arm,
      bbox_AP=table.get(int(mult), -1.0) if float(mult).is_integer() else -1.0,
    )
  )
  return c


def coco_enhanced_mask_rcnn(
  *,
  depth: int = 152,
  groups: int = 32,
  width_per_group: int = 8,
  pretrained: bool = False,
  multiple: float = 9.0,
) -> ml_collections.ConfigDict:
  """The paper's enhanced baseline: a ResNeXt-{depth}-{groups}x{width_per_group}d-FPN GN Mask
  R-CNN with Cascade R-CNN heads, train-time scale augmentation (TRAIN_AUG_SIZES) and test-time
  augmentation at evaluation (Detectron2's eval sizes and flip). Detectron2's ResNeXt layout:
  stride in the 3x3 conv, the groups in the 3x3 convs.

  The X-152-32x8d configs: ResNeXt-152 32x8d with GN (the R-101 ones: groups 1, width 64), FPN
  GN, three Cascade stages (IoU 0.5 / 0.6 / 0.7) with 4conv1fc GN box heads, the GN mask head;
  training shorter side sampled from [640, 800]; evaluation with eval.tta (shorter sides
  400..1200 and flip; --config.eval.tta.enabled=False for the plain evaluation). The LR (0.02 at
  16 images) and the iteration counts scale linearly with --config.batch_size; the LR drops x0.1
  at the last 60k and 20k iterations.

  The paper's enhanced-baseline results (its abstract: 50.9 box AP on COCO from random
  initialization without external data) are not transcribed in ../shared/REFERENCE.md, so no
  setting or number of its table is quoted (reference.bbox_AP = -1); the schedule defaults of
  the X-152 and R-101 configs are this project's choice, to be checked against the paper.
  """
  c = coco_mask_rcnn(
    depth=depth, norm="GN", pretrained=pretrained, multiple=multiple, min_size=TRAIN_AUG_SIZES
  )
  c.model.backbone.update(groups=groups, width_per_group=width_per_group)
  c.model.roi_heads.name = "cascade"
  c.eval.tta.enabled = True
  c.reference = ml_collections.ConfigDict(
    dict(
      source="Rethinking ImageNet Pre-training, enhanced baselines (not transcribed)",
      arm="pretrained" if pretrained else "scratch",
      bbox_AP=-1.0,  # the paper's table is not in ../shared/REFERENCE.md
    )
  )
  return c


def coco_keypoint_rcnn(
  *, depth: int = 50, norm: str = "GN", pretrained: bool = False, multiple: float = 3.0
) -> ml_collections.ConfigDict:
  """Keypoint R-CNN R-{depth}-FPN with `norm` in the backbone, FPN and box head on COCO person
  keypoints (the paper's keypoint experiment): coco_mask_rcnn's recipe with Detectron2's keypoint
  settings (Base-Keypoint-RCNN-FPN): one class (person), no mask head, the keypoint head
  (KRCNNConvDeconvUpsampleHead, 17 keypoints, no norm), 1500 RPN proposals per image in training,
  shorter side sampled from 640..800 in training, images with at least one visible keypoint.
  The box head keeps this project's L1 box loss (Detectron2's keypoint configs use smooth L1 with
  beta 0.5 there; the ROI box loss here has no beta).
  """
  c = coco_mask_rcnn(
    depth=depth, norm=norm, pretrained=pretrained, multiple=multiple, min_size=TRAIN_AUG_SIZES
  )
  m = c.model
  m.num_classes = 1
  m.mask_on = False
  m.keypoint_on = True
  m.keypoint_head.num_keypoints = 17
  m.rpn.post_nms_topk_train = 1500
  c.data.builder_config = "keypoints_2017"  # person_keypoints_{train,val}2017.json
  c.data.keypoints = True
  c.data.min_keypoints_per_image = m.keypoint_head.min_keypoints_per_image
  c.reference = ml_collections.ConfigDict(
    dict(
      source="Rethinking ImageNet Pre-training, keypoint experiment (keypoint AP, COCO val2017)",
      arm="pretrained" if pretrained else "scratch",
      keypoints_AP=-1.0,  # the figure's values are not transcribed (../shared/REFERENCE.md)
    )
  )
  return c
