r"""The "train aug" variant: shorter side sampled from [640, 800] at training; from scratch, 9x.

  python -m rethink_jax.main --config configs/scratch_mask_rcnn_R_50_FPN_gn_trainaug.py:9 \
      --workdir runs/scratch_mask_rcnn_R_50_FPN_gn_trainaug

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 9. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Random initialization: nothing frozen, every norm trained, no ImageNet weights.

The paper trains this variant 9x from scratch and 6x fine-tuned. Detectron2
scratch_mask_rcnn_R_50_FPN_9x_gn (the same augmentation, batch 64, LR 0.08): 43.7 / 39.6.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50,
    norm="GN",
    pretrained=False,
    multiple=common.parse_schedule_arg(arg, 9),
    min_size=common.TRAIN_AUG_SIZES,
  )
