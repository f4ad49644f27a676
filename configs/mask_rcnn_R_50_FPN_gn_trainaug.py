r"""The "train aug" variant: shorter side sampled from [640, 800]; fine-tuned from ImageNet, 6x.

  python -m rethink_jax.main --config configs/mask_rcnn_R_50_FPN_gn_trainaug.py:6 \
      --workdir runs/mask_rcnn_R_50_FPN_gn_trainaug \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 6. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Fine-tuning needs --config.init_from: a backbone checkpoint from rethink_jax.convert; its
norm, stride and pixel format must match the config (the trainer names the fields to set).

The paper trains this variant 6x fine-tuned and 9x from scratch.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50,
    norm="GN",
    pretrained=True,
    multiple=common.parse_schedule_arg(arg, 6),
    min_size=common.TRAIN_AUG_SIZES,
  )
