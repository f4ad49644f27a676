r"""Cascade Mask R-CNN R-101-FPN with GroupNorm, trained from random initialization: the paper's
enhanced baseline on the ResNet-101 backbone (Cascade R-CNN, train-time scale augmentation,
test-time augmentation).

  python -m rethink_jax.main --config configs/scratch_cascade_mask_rcnn_R_101_FPN_gn.py:9 \
      --workdir runs/scratch_cascade_mask_rcnn_R_101_FPN_gn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images) or iterations at 16 images
per step ("810k"); default 9. Model, recipe and why no paper number is quoted:
configs/common.py, coco_enhanced_mask_rcnn.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_enhanced_mask_rcnn(
    depth=101,
    groups=1,
    width_per_group=64,
    pretrained=False,
    multiple=common.parse_schedule_arg(arg, 9),
  )
