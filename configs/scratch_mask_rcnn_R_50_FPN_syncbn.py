r"""Mask R-CNN R-50-FPN with SyncBN everywhere (statistics over the global batch), from scratch.

  python -m rethink_jax.main --config configs/scratch_mask_rcnn_R_50_FPN_syncbn.py:6 \
      --workdir runs/scratch_mask_rcnn_R_50_FPN_syncbn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 6. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Random initialization: nothing frozen, every norm trained, no ImageNet weights.

The paper's Figure 5 (SyncBN curves) shows the same convergence as GN; no table number.
Detectron2 scratch_mask_rcnn_R_50_FPN_9x_syncbn (batch 64, train aug): 43.6 / 39.3.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50, norm="SyncBN", pretrained=False, multiple=common.parse_schedule_arg(arg, 6)
  )
