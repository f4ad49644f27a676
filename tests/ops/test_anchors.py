import math

import numpy as np
import pytest

from rethink_jax.ops.anchors import generate_anchors


def _detectron2_rules(feature_hw, strides, sizes, ratios, offset):
  """Plain-loop transcription of DefaultAnchorGenerator (per level: locations row-major, then
  size, then aspect ratio; w = sqrt(size^2 / r), h = r * w; centre (x + offset) * stride)."""
  out = []
  for (h, w), stride, sz in zip(feature_hw, strides, sizes):
    rows = []
    for y in range(h):
      for x in range(w):
        cx, cy = (x + offset) * stride, (y + offset) * stride
        for s in sz:
          for r in ratios:
            aw = math.sqrt(s * s / r)
            ah = r * aw
            rows.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    out.append(np.array(rows, np.float64))
  return out


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_generate_anchors_matches_detectron2_rules(rng, offset):
  base = int(rng.integers(3, 7))
  feature_hw = [
    (base * 4 + int(rng.integers(0, 3)), base * 4 + 1),
    (base * 2, base * 2 + 1),
    (base, base),
  ]
  strides = [4, 8, 16]
  sizes = [(32,), (64, 90.5), (128,)]
  ratios = (0.5, 1.0, 2.0)
  ours = generate_anchors(feature_hw, strides, sizes, ratios, offset=offset)
  ref = _detectron2_rules(feature_hw, strides, sizes, ratios, offset)
  for o, r, (h, w), sz in zip(ours, ref, feature_hw, sizes):
    assert o.shape == (h * w * len(sz) * 3, 4) and o.dtype == np.float32
    np.testing.assert_allclose(np.asarray(o), r, rtol=1e-6, atol=1e-4)


def test_generate_anchors_flat_sizes_and_errors():
  a = generate_anchors([(2, 3)], [8], (32,), (1.0,))
  np.testing.assert_allclose(np.asarray(a[0])[:2], [[-16, -16, 16, 16], [-8, -16, 24, 16]])
  with pytest.raises(ValueError):
    generate_anchors([(2, 2), (1, 1)], [8], (32,), (1.0,))


def test_torchvision_switches_match_its_anchor_generator(rng):
  """round_cell + grid_strides equal torchvision's AnchorGenerator exactly, on a padded input
  whose P5 has odd sides (P6 strides 56 x 57); either switch alone differs."""
  import torch
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList

  from rethink_jax.ops.anchors import grid_strides

  sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0)
  h, w = 32 * int(rng.choice([5, 7, 9])), 32 * int(rng.choice([3, 7, 11]))
  feature_hw = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
  feature_hw.append(((h // 32 + 1) // 2, (w // 32 + 1) // 2))  # max_pool2d(1, 2) of P5
  generator = AnchorGenerator(sizes, (ratios,) * 5)
  image_list = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  feats = [torch.zeros(1, 1, fh, fw) for fh, fw in feature_hw]
  want = generator(image_list, feats)[0].numpy()
  strides = grid_strides((h, w), feature_hw)
  assert strides[-1] == (h // feature_hw[-1][0], w // feature_hw[-1][1]) != (64, 64)
  ours = np.concatenate(
    [np.asarray(a) for a in generate_anchors(feature_hw, strides, sizes, ratios, round_cell=True)]
  )
  np.testing.assert_array_equal(ours, want)
  for s, r in ((strides, False), ([4, 8, 16, 32, 64], True)):
    other = np.concatenate(
      [np.asarray(a) for a in generate_anchors(feature_hw, s, sizes, ratios, 0.0, r)]
    )
    assert np.abs(other - want).max() >= 0.3
