r"""Cascade Mask R-CNN X-152-32x8d-FPN with GroupNorm, fine-tuned from ImageNet X-152-32x8d
weights: the paper's enhanced baseline (deeper and wider backbone, Cascade R-CNN, train-time scale
augmentation, test-time augmentation).

  python -m rethink_jax.main --config configs/cascade_mask_rcnn_X_152_32x8d_FPN_gn.py:6 \
      --workdir runs/cascade_mask_rcnn_X_152_32x8d_FPN_gn \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images) or iterations at 16 images
per step ("810k"); default 6. Model, recipe and why no paper number is quoted:
configs/common.py, coco_enhanced_mask_rcnn.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_enhanced_mask_rcnn(pretrained=True, multiple=common.parse_schedule_arg(arg, 6))
