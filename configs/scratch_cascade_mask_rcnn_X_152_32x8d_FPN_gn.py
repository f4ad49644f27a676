r"""Cascade Mask R-CNN X-152-32x8d-FPN with GroupNorm, trained from random initialization:
the paper's enhanced baseline (deeper and wider backbone, Cascade R-CNN, train-time scale
augmentation, test-time augmentation).

  python -m rethink_jax.main --config configs/scratch_cascade_mask_rcnn_X_152_32x8d_FPN_gn.py:9 \
      --workdir runs/scratch_cascade_mask_rcnn_X_152_32x8d_FPN_gn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images) or iterations at 16 images
per step ("810k"); default 9. The LR (0.02 at 16 images) and the iteration counts scale
linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations.
Model: ResNeXt-152 32x8d (groups 32, width 8 per group) with GN, FPN GN, three Cascade stages
(IoU 0.5 / 0.6 / 0.7) with 4conv1fc GN box heads, the GN mask head; training shorter side
sampled from [640, 800]; evaluation with test-time augmentation (eval.tta: Detectron2's sizes
400..1200 and flip; --config.eval.tta.enabled=False for the plain evaluation).

Reference: the paper's enhanced-baseline results (its abstract: 50.9 box AP on COCO from random
initialization without external data) are not transcribed in ../shared/REFERENCE.md, so this
file does not quote the table's settings or numbers (config.reference.bbox_AP = -1); the
schedule default is this project's choice, to be checked against the paper.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_enhanced_mask_rcnn(
    pretrained=False, multiple=common.parse_schedule_arg(arg, 9)
  )
