r"""The 10k-image experiment (10% of COCO train2017), fine-tuned from ImageNet: 60k iterations.

  python -m rethink_jax.main --config configs/mask_rcnn_R_50_FPN_gn_10k.py:60k \
      --workdir runs/mask_rcnn_R_50_FPN_gn_10k \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default '60k'. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) of schedules >= 2x, at 2/3 and 8/9 of shorter ones (rethink_jax.optim.schedule).
Fine-tuning needs --config.init_from: a backbone checkpoint from rethink_jax.convert; its
norm, stride and pixel format must match the config (the trainer names the fields to set).

Reference (paper, Section 5): pre-trained 26.0 box AP at 60k iterations (it overfits when
trained longer) vs scratch 25.9 at 220k.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_mask_rcnn(
    depth=50,
    norm="GN",
    pretrained=True,
    multiple=common.parse_schedule_arg(arg, "60k"),
    num_train_images=10000,
  )
