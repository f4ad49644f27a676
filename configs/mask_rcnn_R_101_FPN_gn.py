r"""Mask R-CNN R-101-FPN with GroupNorm everywhere, fine-tuned from ImageNet R-101-GN weights.

  python -m rethink_jax.main --config configs/mask_rcnn_R_101_FPN_gn.py:2 \
      --workdir runs/mask_rcnn_R_101_FPN_gn \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 2. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Fine-tuning needs --config.init_from: a backbone checkpoint from rethink_jax.convert; its
norm, stride and pixel format must match the config (the trainer names the fields to set).

Reference box AP (paper, Table 1): 2x 41.8, 3x 42.3, 4x 42.3, 5x 41.9, 6x 42.2.
Best schedule (Table 2): box 42.3 / 62.6 / 46.2, mask 37.2 / 59.7 / 39.7 (AP / AP50 / AP75).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=101, norm="GN", pretrained=True, multiple=common.parse_schedule_arg(arg, 2)
  )
