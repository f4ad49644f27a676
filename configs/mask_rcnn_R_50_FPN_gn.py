r"""Mask R-CNN R-50-FPN with GroupNorm everywhere, fine-tuned from ImageNet R-50-GN weights.

  python -m rethink_jax.main --config configs/mask_rcnn_R_50_FPN_gn.py:2 \
      --workdir runs/mask_rcnn_R_50_FPN_gn \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 2. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Fine-tuning needs --config.init_from: a backbone checkpoint from rethink_jax.convert; its
norm, stride and pixel format must match the config (the trainer names the fields to set).

Reference box AP (paper, Table 1): 2x 40.3, 3x 40.8, 4x 40.9, 5x 40.9, 6x 41.1.
Best schedule (Table 2): box 41.1 / 61.7 / 44.6, mask 36.4 / 58.5 / 38.7 (AP / AP50 / AP75).
Detectron2 mask_rcnn_R_50_FPN_3x_gn: 42.6 / 38.6.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50, norm="GN", pretrained=True, multiple=common.parse_schedule_arg(arg, 2)
  )
