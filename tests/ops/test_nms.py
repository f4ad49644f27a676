import functools

import jax
import numpy as np
import pytest
import torch
import torchvision

from rethink_jax.ops import xla_cpu
from rethink_jax.ops.nms import batched_nms
from rethink_jax.ops.nms import nms
from tests.ops._util import random_boxes

# The public functions get the CPU form on CPU; the other platforms' form is tested here too.
IMPLS = {"public": None, "tiled": functools.partial(xla_cpu.tiled_nms, tile=64)}


def _run(impl, boxes, scores, classes, thr, max_out):
  if impl == "public":
    if classes is None:
      return nms(boxes, scores, thr, max_out)
    return batched_nms(boxes, scores, classes, thr, max_out)
  return IMPLS[impl](boxes, scores, classes, thr, max_out)


def _ref(boxes, scores, thr, max_out, classes=None):
  keep = scores > -np.inf
  idx = np.nonzero(keep)[0]
  b, s = torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx])
  if classes is None:
    k = torchvision.ops.nms(b, s, thr).numpy()
  else:
    k = torchvision.ops.batched_nms(b, s, torch.from_numpy(classes[idx]), thr).numpy()
  return idx[k][:max_out]


@pytest.mark.parametrize("impl", ["public", "tiled"])
@pytest.mark.parametrize("thr,max_out", [(0.7, 150), (0.5, 40), (0.3, 400)])
def test_nms_matches_torchvision_vmapped(rng, thr, max_out, impl):
  batch, n = 3, 300
  boxes = random_boxes(rng, batch * n, size=100.0, min_wh=2.0, max_wh=40.0).reshape(batch, n, 4)
  scores = rng.permutation(batch * n).reshape(batch, n).astype(np.float32) / (batch * n)
  scores[1, rng.random(n) < 0.3] = -np.inf  # padding
  scores[2, :] = -np.inf
  scores[2, :5] = 1.0 + np.arange(5)
  boxes[0, :3] = boxes[0, 3]  # exact duplicates and one empty box
  boxes[0, 4, 2:] = boxes[0, 4, :2]
  fn = jax.jit(jax.vmap(lambda b, s: _run(impl, b, s, None, thr, max_out)))
  idx, num = map(np.asarray, fn(boxes, scores))
  for i in range(batch):
    ref = _ref(boxes[i], scores[i], thr, max_out)
    assert num[i] == len(ref)
    np.testing.assert_array_equal(idx[i, : num[i]], ref)
    assert (idx[i, num[i] :] == -1).all()


@pytest.mark.parametrize("impl", ["public", "tiled"])
def test_batched_nms_matches_torchvision(rng, impl):
  batch, n, max_out = 2, 400, 120
  boxes = random_boxes(rng, batch * n, size=100.0, min_wh=2.0, max_wh=40.0).reshape(batch, n, 4)
  scores = rng.permutation(batch * n).reshape(batch, n).astype(np.float32) / (batch * n)
  classes = rng.integers(1, 5, (batch, n)).astype(np.int32)
  scores[1, :50] = -np.inf
  fn = jax.jit(jax.vmap(lambda b, s, c: _run(impl, b, s, c, 0.5, max_out)))
  idx, num = map(np.asarray, fn(boxes, scores, classes))
  for i in range(batch):
    ref = _ref(boxes[i], scores[i], 0.5, max_out, classes[i])
    assert num[i] == len(ref)
    np.testing.assert_array_equal(idx[i, : num[i]], ref)


def test_nms_shape_error():
  with pytest.raises(ValueError, match=r"\(4,\)"):
    nms(np.zeros((5, 4)), np.zeros(4), 0.5, 3)
