r"""Keypoint R-CNN R-50-FPN with GroupNorm, trained from random initialization (the paper's
keypoint experiment, random-init arm).

  python -m rethink_jax.main --config configs/scratch_keypoint_rcnn_R_50_FPN_gn.py:3 \
      --workdir runs/scratch_keypoint_rcnn_R_50_FPN_gn

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "2" = 180k) or iterations at
16 images per step ("270k"); default 3. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) (rethink_jax.optim.schedule).
Random initialization: nothing frozen, every norm trained, no ImageNet weights; otherwise
configs/keypoint_rcnn_R_50_FPN_gn.py (COCO person keypoints, Detectron2's keypoint head, one
class, no mask head).

Reference: the paper's keypoint experiment (keypoint AP on COCO val2017 against iterations,
R50-FPN GN, pre-trained vs random init), where random init catches up sooner than for box AP.
Its values and schedules are not transcribed in ../shared/REFERENCE.md
(config.reference.keypoints_AP = -1): the default schedules here (2x fine-tuned, 3x from scratch)
are this project's choice, to be checked against the paper.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_keypoint_rcnn(
    depth=50, norm="GN", pretrained=False, multiple=common.parse_schedule_arg(arg, 3)
  )
