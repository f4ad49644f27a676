r"""Mask R-CNN R-101-FPN with GroupNorm everywhere, trained from random initialization.

  python -m rethink_jax.main --config configs/scratch_mask_rcnn_R_101_FPN_gn.py:6 \
      --workdir runs/scratch_mask_rcnn_R_101_FPN_gn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 6. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Random initialization: nothing frozen, every norm trained, no ImageNet weights.

Reference box AP (paper, Table 1): 2x 38.2, 3x 41.0, 4x 41.8, 5x 42.2, 6x 42.7.
Best schedule (Table 2): box 42.7 / 62.9 / 47.0, mask 37.6 / 59.9 / 39.7 (AP / AP50 / AP75).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=101, norm="GN", pretrained=False, multiple=common.parse_schedule_arg(arg, 6)
  )
