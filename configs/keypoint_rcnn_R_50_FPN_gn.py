r"""Keypoint R-CNN R-50-FPN with GroupNorm, fine-tuned from ImageNet R-50-GN weights (the
paper's keypoint experiment, pre-trained arm).

  python -m rethink_jax.main --config configs/keypoint_rcnn_R_50_FPN_gn.py:2 \
      --workdir runs/keypoint_rcnn_R_50_FPN_gn \
      --config.init_from=BACKBONE_DIR

ARG: the schedule, a multiple of 1x (= 90k iterations at 16 images; "3" = 270k) or iterations at
16 images per step ("270k"); default 2. The LR (0.02 at 16 images) and the iteration counts
scale linearly with --config.batch_size; the LR drops x0.1 at the last 60k and 20k iterations
(at 16 images) (rethink_jax.optim.schedule).
Data: COCO 2017 person keypoints (coco_instances/keypoints_2017: person_keypoints_*2017.json),
evaluated by keypoint AP (OKS, COCO's 17 person sigmas) beside box AP.
Model: configs/common.py coco_keypoint_rcnn: GN in the ResNet, FPN and 4conv1fc box head;
Detectron2's keypoint head (8 x conv 3x3 512, deconv, x2 bilinear to 56 x 56 heatmaps), one
class, no mask head. Fine-tuning needs --config.init_from (see configs/mask_rcnn_R_50_FPN_gn.py).

Reference: the paper's keypoint experiment (keypoint AP on COCO val2017 against iterations,
R50-FPN GN, pre-trained vs random init), where random init catches up sooner than for box AP.
Its values and schedules are not transcribed in ../shared/REFERENCE.md
(config.reference.keypoints_AP = -1): the default schedules here (2x fine-tuned, 3x from scratch)
are this project's choice, to be checked against the paper.
Detectron2's keypoint_rcnn_R_50_FPN_3x (frozen BN, ImageNet): 55.4 box AP / 65.5 keypoint AP.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.coco_keypoint_rcnn(
    depth=50, norm="GN", pretrained=True, multiple=common.parse_schedule_arg(arg, 2)
  )
