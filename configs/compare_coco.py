r"""The paper's comparison on COCO: R-50-FPN-GN from random init (2x-6x) vs fine-tuned from
ImageNet R-50-GN weights (1x-3x), both evaluated on val2017 every half 1x.

  python -m rethink_jax.compare --config configs/compare_coco.py --workdir runs/compare_coco \
      --config.compare.pretrained_backbone=weights/R-50-GN \
      --config.data.data_dir=$HOME/tensorflow_datasets

The backbone directory comes from rethink_jax.convert (FAIR's R-50-GN.pkl: Detectron BGR pixels,
std 1, stride in the 3x3 conv). The arms are long (6x = 540k iterations at batch 16): run them on
two machines with --arm scratch / --arm finetune and merge the results with --merge.
1x = 90k iterations at 16 images, scaled with --config.batch_size (set before the unit: the
unit is computed here, so pass --config.batch_size only together with
--config.compare.unit_steps=90000*16/batch).

Reference box AP (paper, Table 1, R50): random init 2x 36.8, 3x 39.5, 4x 40.6, 5x 40.7, 6x 41.3;
pre-trained 2x 40.3, 3x 40.8. Mask AP at the best schedule: 36.6 (scratch) vs 36.4 (pre-trained).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.coco_mask_rcnn(depth=50, norm="GN", pretrained=False, multiple=6)
  c.require_init_from = False
  unit = int(round(common.ITERS_1X * 16 / c.batch_size))
  c.compare = ml_collections.ConfigDict(
    dict(
      unit_steps=unit,
      finetune_multiples=(1, 2, 3),
      scratch_multiples=(2, 3, 4, 5, 6),
      pretrained_backbone="",
      # The fine-tune arm reads pixels as FAIR's ImageNet GN weights expect (BGR, std 1); the
      # scratch arm keeps Detectron2's scratch normalization. Nothing else differs.
      finetune_overrides={"data": dict(common.DETECTRON_BGR), "require_init_from": True},
      scratch_overrides={},
    )
  )
  return c
