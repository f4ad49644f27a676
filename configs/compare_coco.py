r"""The paper's comparison on COCO or on your own COCO-format data: R-50-FPN-GN from random init
vs fine-tuned from ImageNet R-50-GN weights, both to 6x, evaluated every half 1x (Table 1 at
1x-6x).

  python -m rethink_jax.compare --config configs/compare_coco.py --workdir runs/compare_coco \
      --config.compare.pretrained_backbone=weights/R-50-GN \
      --config.data.data_dir=$HOME/tensorflow_datasets

Your own data set (built as in configs/custom_coco.py): add --config.data.builder_config=NAME.
Everything configs/custom_coco.py reads from the data applies: the class count (model.num_classes
0), and the schedule unit: 1x = the paper's 1x on the training set's own size (12.28 epochs:
90k iterations at 16 images on COCO's 117,266 training images; on N images at batch B,
12.28 * N / B iterations, rounded to an even number), evaluated every half 1x. On COCO train2017
1x stays 90k iterations at batch 16. Image sizes: --config.data.min_size / max_size, set once.

The backbone directory comes from rethink_jax.convert (FAIR's R-50-GN.pkl: Detectron BGR pixels,
std 1, stride in the 3x3 conv). The arms are long (6x = 540k iterations at batch 16 on COCO): run
them on two machines with --arm scratch / --arm finetune and merge the results with --merge.
--config.batch_size scales the unit's iterations and the LR (0.02 at 16 images).

Reference box AP (paper, Table 1, R50, COCO): random init 2x 36.8, 3x 39.5, 4x 40.6, 5x 40.7,
6x 41.3; pre-trained 2x 40.3, 3x 40.8, 4x 40.9, 5x 40.9, 6x 41.1. Mask AP at the best schedule:
36.6 (scratch) vs 36.4 (pre-trained).
"""

import ml_collections

from configs import common
from configs import custom_coco


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = custom_coco.get_config("2017,6x")
  c.schedule.evals_per_1x = 0.0  # the comparison evaluates every half of its own unit
  unit = int(round(common.ITERS_1X * 16 / c.batch_size))
  c.compare = ml_collections.ConfigDict(
    dict(
      unit_steps=unit,  # COCO's; scaled to the training set's size when the run starts
      scale_unit_to_data=True,
      multiples=(1, 2, 3, 4, 5, 6),
      seeds=1,
      train_images=0,
      pretrained_backbone="",
      # The fine-tune arm reads pixels as FAIR's ImageNet GN weights expect (BGR, std 1); the
      # scratch arm keeps Detectron2's scratch normalization. Nothing else differs.
      finetune_overrides={"data": dict(common.DETECTRON_BGR), "require_init_from": True},
      scratch_overrides={},
    )
  )
  return c
