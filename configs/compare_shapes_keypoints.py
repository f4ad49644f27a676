r"""The paper's keypoint comparison on a CPU: random init vs pre-trained on synthetic keypoints.

  python -m rethink_jax.compare --config configs/compare_shapes_keypoints.py \
      --workdir runs/compare_keypoints

Both arms train the same small Keypoint R-CNN (configs/compare_shapes.py's R-18-FPN-GN with its
box head; no mask head; the keypoint head scaled down as the demo scales the mask head: 2 convs
of 64 channels instead of 8 of 512, 14 x 14 pooling and 56 x 56 heatmaps as Detectron2's) on
shapes_keypoints/demo (128 x 128 stick figures resized to 96 x 96, 1600 train / 200 validation,
one category, K = 7 keypoints with left / right pairs and occlusion flags) at batch 4, with
configs/compare_shapes.py's optimizer, schedule unit (1x = 400 iterations), LR decay rule and
pre-training (the ResNet pre-trained on shapes_classification for the fine-tune arm). Both arms
train to the longest of `compare.multiples` (the box / mask demo's 1x, 2x, 3x, 4x, 6x, so the
keypoint curves sit beside the mask curves of configs/compare_shapes.py) and are evaluated at
every multiple on the same 200 validation images by box AP and keypoint AP (OKS with the data
set's sigmas).
results.md has both arms' keypoint AP at each multiple, curves.png its curve and predictions.png
the predicted keypoints.

Meant to run (data generation, pre-training, both arms, evaluations) within 20 minutes on 2 CPU
cores, as configs/compare_shapes.py does with the same schedule; the README has the measured run.
"""

import ml_collections

from configs import compare_shapes


def keypoint_demo_model(num_keypoints: int = 7) -> ml_collections.ConfigDict:
  """compare_shapes.demo_model with one class, no mask head and a small keypoint head."""
  m = compare_shapes.demo_model(num_classes=1)
  m.mask_on = False
  m.keypoint_on = True
  m.keypoint_head.update(
    num_keypoints=num_keypoints,
    conv_dims=(64, 64),
    max_fg_rois=8,  # as the demo's mask head
  )
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = compare_shapes.get_config()
  c.model = keypoint_demo_model()
  c.data.name = "shapes_keypoints"
  c.data.keypoints = True
  c.data.min_keypoints_per_image = c.model.keypoint_head.min_keypoints_per_image  # Detectron2's
  return c
