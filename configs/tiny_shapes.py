r"""The tiniest end-to-end Mask R-CNN: for tests and smoke runs on a CPU (seconds per step).

  python -m rethink_jax.main --config configs/tiny_shapes.py:20 --workdir runs/tiny

ARG: number of training steps (default 4). Data: the "tiny" shapes_instances set (64x64 images,
24 train / 8 validation, 3 categories, generated offline in under a second). Model: R-18-FPN-GN
with 8-channel-wide ResNet stages, 16-channel FPN, small heads and few anchors / ROIs. No AP is
expected (it trains for a handful of steps); tests use it to exercise the whole trainer.
"""

import ml_collections

from configs import common


def tiny_model(norm: str = "GN") -> ml_collections.ConfigDict:
  """R-18-FPN Mask R-CNN small enough to compile on a CPU in well under a minute."""
  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  m = mask_rcnn.default_model_config()
  m.num_classes = 3
  m.backbone.update(depth=18, norm=norm, width=8, num_groups=4, freeze_at=0)
  m.fpn.update(out_channels=16, norm=norm)
  m.anchors.sizes = ((8,), (16,), (32,), (64,), (128,))
  m.rpn.update(
    pre_nms_topk_train=64,
    pre_nms_topk_test=64,
    post_nms_topk_train=32,
    post_nms_topk_test=32,
    batch_size_per_image=32,
  )
  m.roi_heads.update(batch_size_per_image=16, detections_per_image=10)
  if "test_candidates" in m.roi_heads:
    m.roi_heads.test_candidates = 64
  m.box_head.update(num_conv=1, conv_dim=16, fc_dim=32, norm=norm)
  # Chunks of 2 foreground ROIs (detections): the tests' runs take the skippable-chunk path
  # (sharded over devices and processes too).
  m.mask_head.update(num_conv=1, conv_dim=16, norm=norm, max_fg_rois=4, chunk_rois=2)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  steps = int(arg) if arg else 4
  c = common.base_config(
    tiny_model(), common.shapes_data("tiny", 64), 1.0, batch_size=2, eval_every=steps
  )
  c.schedule.total_steps = steps
  c.schedule.decay_steps = (max(1, steps * 2 // 3),)
  c.optim.warmup_steps = 2
  c.optim.base_lr = 0.02 * 16 / 2  # 0.02 at batch 2 (base_lr is quoted at base_batch_size 16)
  c.log_every = 1
  c.eval.batch_size = 4
  c.checkpoint.every_steps = steps
  c.checkpoint.keep = 2
  c.reference = {}
  return c
