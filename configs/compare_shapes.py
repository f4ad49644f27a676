r"""The embedded default of `make demo`: the paper's comparison on synthetic shapes, on a CPU.

  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/compare

Both arms train the same small Mask R-CNN (R-18-FPN-GN, 16-channel-wide ResNet stages, 64-channel
FPN, GN in the backbone, FPN, box and mask heads, as in the paper) on shapes_instances/demo
(128 x 128 images resized to 96 x 96, 1600 train / 200 validation, 4 categories) at batch 4, LR
0.02 (0.08 quoted at 16 images) after a 30-iteration warmup, and are evaluated once per unit on
the same 200 validation images:
  * fine-tune arm: the ResNet pre-trained on shapes_classification (12 categories, single objects,
    10,000 images rendered at 48 x 48; the demo's "ImageNet", generated offline) for
    `compare.pretrain.steps` steps, then the detector;
  * scratch arm: the same detector from random init.
Both arms train to the longest of `compare.multiples` (1x, 2x, 3x, 4x, 6x) and are evaluated at
every multiple. One schedule unit (1x) is `compare.unit_steps` = 400 iterations at batch
`batch_size` = 4 (the paper's 1x is 90k iterations at batch 16). The LR decays follow the paper's
rule scaled to this unit (x0.1 at the last 2/3 and the last 2/9 of a unit). Everything random
derives from `seed` (rethink_jax/compare.py); `--config.compare.seeds=N` repeats both arms with
seeds seed .. seed + N - 1 and reports mean and standard deviation;
`--config.compare.train_images=K` trains both arms on the same K-image subset
(configs/compare_shapes_lessdata.py).

Sized so that the fine-tune arm reaches segm AP >= 50 within its schedule and the whole run (data
generation, pre-training, both arms, evaluations) takes under 20 minutes on 2 CPU cores; the
README has the measured run.
"""

import ml_collections

from configs import common


def demo_model(num_classes: int = 4, norm: str = "GN") -> ml_collections.ConfigDict:
  """R-18-FPN-GN Mask R-CNN sized for 128 x 128 images on a CPU."""
  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  m = mask_rcnn.default_model_config()
  m.num_classes = num_classes
  m.backbone.update(depth=18, norm=norm, width=16, num_groups=8, freeze_at=0, stride_in_1x1=False)
  m.fpn.update(out_channels=64, norm=norm)
  # Objects are 10-90 px: anchors of 16..256 px on P2..P6.
  m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
  m.rpn.update(
    pre_nms_topk_train=300,
    pre_nms_topk_test=200,
    post_nms_topk_train=64,
    post_nms_topk_test=50,
    batch_size_per_image=64,
  )
  m.roi_heads.update(batch_size_per_image=32, detections_per_image=20, test_candidates=200)
  m.box_head.update(name="4conv1fc", num_conv=2, conv_dim=64, num_fc=1, fc_dim=256, norm=norm)
  m.mask_head.update(num_conv=2, conv_dim=64, norm=norm, max_fg_rois=8)
  return m


def compare_config(
  *,
  unit_steps: int,
  multiples: tuple[float, ...],
  pretrain: dict,
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.unit_steps = unit_steps
  c.multiples = tuple(multiples)  # both arms train to the longest, evaluated at each
  c.seeds = 1  # replicas with seeds seed, seed + 1, ...: mean and std in the report
  c.train_images = 0  # > 0: both arms train on the same subset of this many images
  # A converted backbone checkpoint dir (rethink_jax.convert) for the fine-tune arm; "" = pre-train
  # on shapes_classification in this run (rethink_jax/pretrain.py, settings below).
  c.pretrained_backbone = ""
  c.pretrain = ml_collections.ConfigDict(pretrain)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  batch = 4
  # The 128 x 128 shapes_instances/demo images, resized to 96 x 96 (objects ~8-68 px).
  c = common.base_config(demo_model(), common.shapes_data("demo", 96), 1.0, batch_size=batch)
  # Quoted at 16 images: 0.02 at batch 4 (the best of three LRs tried: docs/performance.md).
  c.optim.base_lr = 0.08
  c.optim.warmup_steps = 30
  c.optim.warmup_factor = 0.1
  unit = 400
  c.eval_every = unit
  c.log_every = 25
  c.eval.batch_size = 20
  c.eval.num_images = 0
  c.checkpoint.every_steps = unit
  c.checkpoint.keep = 1
  c.reference = ml_collections.ConfigDict()
  c.compare = compare_config(
    unit_steps=unit,
    multiples=(1, 2, 3, 4, 6),
    pretrain=dict(
      # Shape classification under random colours and textures starts on a plateau at chance
      # whose length varies with the seed: AdamW's steps on the scale-invariant (GN) conv weights
      # are mostly noise there, so the LR stays low until the gradients carry class signal (a
      # 1000-step warmup), then rises to 0.003 to fit within the budget.
      optimizer="adamw",
      steps=4500,
      batch_size=32,
      base_lr=0.003,
      weight_decay=1e-4,
      warmup_steps=1000,
      log_every=250,
      data=dict(
        builder_config="demo",
        image_size=48,
        builder_overrides={"image_size": 48, "num_train": 10000},
      ),
    ),
  )
  return c
