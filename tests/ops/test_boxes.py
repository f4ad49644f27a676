import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from rethink_jax.ops import boxes as B
from tests.ops._util import random_boxes


def test_box_iou_matches_torchvision_jit_vmap(rng):
  b1 = random_boxes(rng, 3 * 17).reshape(3, 17, 4)
  b2 = random_boxes(rng, 3 * 11).reshape(3, 11, 4)
  ours = jax.jit(jax.vmap(B.box_iou))(b1, b2)
  for i in range(3):
    ref = torchvision.ops.box_iou(torch.from_numpy(b1[i]), torch.from_numpy(b2[i])).numpy()
    np.testing.assert_allclose(ours[i], ref, atol=1e-6)
  np.testing.assert_allclose(
    B.box_area(b1[0]), torchvision.ops.box_area(torch.from_numpy(b1[0])).numpy(), rtol=1e-6
  )
  # Broadcasting leading dims directly.
  np.testing.assert_allclose(jax.jit(B.box_iou)(b1, b2), ours, atol=1e-7)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_torchvision(rng, weights):
  anchors = random_boxes(rng, 64, min_wh=2.0)
  targets = random_boxes(rng, 64, min_wh=2.0)
  coder = BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
  ref_deltas = coder.encode_single(torch.from_numpy(targets), torch.from_numpy(anchors)).numpy()
  enc = jax.jit(jax.vmap(lambda t, a: B.encode_boxes(t, a, weights)))
  ours = enc(targets.reshape(4, 16, 4), anchors.reshape(4, 16, 4)).reshape(64, 4)
  np.testing.assert_allclose(ours, ref_deltas, rtol=1e-5, atol=1e-5)

  deltas = rng.normal(0, 2.0, (64, 4)).astype(np.float32)
  deltas[:4, 2:] = 10.0  # beyond the clamp
  ref_boxes = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
  dec = jax.jit(jax.vmap(lambda d, a: B.decode_boxes(d, a, weights)))
  ours = dec(deltas.reshape(4, 16, 4), anchors.reshape(4, 16, 4)).reshape(64, 4)
  np.testing.assert_allclose(ours, ref_boxes, rtol=1e-5, atol=1e-3)
  # Round trip.
  back = B.decode_boxes(B.encode_boxes(targets, anchors, weights), anchors, weights)
  np.testing.assert_allclose(back, targets, rtol=1e-5, atol=1e-3)


def test_clip_boxes(rng):
  boxes = random_boxes(rng, 40, size=120.0) - 10.0
  ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (90, 70)).numpy()
  np.testing.assert_allclose(jax.jit(B.clip_boxes)(boxes, jnp.array([90, 70])), ref)
  np.testing.assert_allclose(B.clip_boxes(boxes, (90, 70)), ref)
  batched = jax.vmap(B.clip_boxes)(np.stack([boxes, boxes]), jnp.array([[90, 70], [50, 60]]))
  np.testing.assert_allclose(batched[0], ref)
  ref1 = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (50, 60)).numpy()
  np.testing.assert_allclose(batched[1], ref1)


def test_wrong_shapes_raise():
  with pytest.raises(ValueError, match=r"\(5, 3\)"):
    B.box_iou(np.zeros((5, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="anchors"):
    B.encode_boxes(np.zeros((5, 4)), np.zeros((5, 2)))
