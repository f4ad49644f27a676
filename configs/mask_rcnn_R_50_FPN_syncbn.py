r"""Mask R-CNN R-50-FPN with SyncBN everywhere, fine-tuned from ImageNet BN weights (torchvision).

  python -m rethink_jax.main --config configs/mask_rcnn_R_50_FPN_syncbn.py:2 \
      --workdir runs/mask_rcnn_R_50_FPN_syncbn \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 2. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Fine-tuning needs --config.init_from: a backbone checkpoint from rethink_jax.convert; its
norm, stride and pixel format must match the config (the trainer names the fields to set).

The paper's Figure 5 (SyncBN curves); no table number. Pixel format: torchvision's (RGB,
ImageNet mean/std); convert the weights with rethink_jax.convert.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50, norm="SyncBN", pretrained=True, multiple=common.parse_schedule_arg(arg, 2)
  )
