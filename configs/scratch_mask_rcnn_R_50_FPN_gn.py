r"""Mask R-CNN R-50-FPN with GroupNorm everywhere, trained from random initialization.

  python -m rethink_jax.main --config configs/scratch_mask_rcnn_R_50_FPN_gn.py:6 \
      --workdir runs/scratch_mask_rcnn_R_50_FPN_gn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 6. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Random initialization: nothing frozen, every norm trained, no ImageNet weights.

Reference box AP (paper, Table 1): 2x 36.8, 3x 39.5, 4x 40.6, 5x 40.7, 6x 41.3.
Best schedule (6x, Table 2): box 41.3 / 61.8 / 45.6, mask 36.6 / 59.0 / 38.9 (AP / AP50 / AP75).
Others: Detectron scratch 3x 39.5 / 35.2; Detectron2 scratch_mask_rcnn_R_50_FPN_3x_gn 39.9 / 36.6;
MMDetection GN-all scratch 6x 41.2 / 37.4.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50, norm="GN", pretrained=False, multiple=common.parse_schedule_arg(arg, 6)
  )
