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
