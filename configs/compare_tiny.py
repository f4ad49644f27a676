r"""The smoke preset of the comparison: every step of `make demo` in a minute or two, no AP.

  python -m rethink_jax.compare --config configs/compare_tiny.py --workdir runs/compare_tiny

The tiny R-18-FPN Mask R-CNN of configs/tiny_shapes.py (8-channel ResNet stages) on
shapes_instances/tiny (64 x 64, 24 train / 8 validation images); pre-training runs 10 steps on a
64-image, 32 x 32 shapes_classification set. 1x = 4 iterations at batch 2: both arms train 2x
(8 iterations), evaluating at 1x and 2x. Used by tests/test_compare.py; expect AP near 0.
"""

import ml_collections

from configs import tiny_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  unit = 4
  c = tiny_shapes.get_config(str(unit))
  c.schedule.total_steps = 0  # set per arm by rethink_jax.compare
  c.schedule.decay_steps = ()
  c.eval_every = unit
  c.log_every = 2
  c.checkpoint.every_steps = 0
  c.checkpoint.keep = 1
  c.compare = ml_collections.ConfigDict(
    dict(
      unit_steps=unit,
      multiples=(1, 2),
      seeds=1,
      train_images=0,
      pretrained_backbone="",
      pretrain=dict(
        steps=10,
        batch_size=8,
        base_lr=0.02,
        warmup_steps=2,
        log_every=5,
        data=dict(
          builder_config="tiny",
          image_size=32,
          builder_overrides={"image_size": 32, "num_train": 64, "num_validation": 16},
        ),
      ),
    )
  )
  return c
