import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax.ops import boxes as B
from rethink_jax.ops.matching import match
from tests.ops._util import random_boxes


def _detectron2_matcher(iou, thresholds, labels, allow_low_quality):
  """NumPy transcription of detectron2.modeling.matcher.Matcher.__call__ on the valid rows."""
  g, n = iou.shape
  if g == 0:
    return np.zeros(n, np.int64), np.full(n, labels[0], np.int64)
  matched_vals = iou.max(axis=0)
  matches = iou.argmax(axis=0)
  out = np.ones(n, np.int64)
  bounds = [-np.inf] + list(thresholds) + [np.inf]
  for l, low, high in zip(labels, bounds[:-1], bounds[1:]):
    out[(matched_vals >= low) & (matched_vals < high)] = l
  if allow_low_quality:
    best = iou.max(axis=1)
    _, preds = np.nonzero(iou == best[:, None])
    out[preds] = 1
  return matches, out


CONFIGS = [((0.3, 0.7), (0, -1, 1), True), ((0.5,), (0, 1), False)]


@pytest.mark.parametrize("thresholds,labels,low_quality", CONFIGS)
def test_match_equals_detectron2(rng, thresholds, labels, low_quality):
  g, n, batch = 8, 200, 4
  gt = random_boxes(rng, batch * g, size=100.0, min_wh=5.0).reshape(batch, g, 4)
  pred = random_boxes(rng, batch * n, size=100.0, min_wh=5.0).reshape(batch, n, 4)
  iou = np.array(B.box_iou(gt, pred))
  iou[1] = np.round(iou[1] * 10) / 10  # ties: several predictions attain a GT's max
  valid = rng.random((batch, g)) < 0.7
  valid[2] = False  # no valid ground truth at all
  valid[3, :] = False
  valid[3, 5] = True
  fn = jax.jit(jax.vmap(lambda i, v: match(i, v, thresholds, labels, low_quality)))
  matched, lab = fn(iou, valid)
  for b in range(batch):
    rows = np.nonzero(valid[b])[0]
    ref_m, ref_l = _detectron2_matcher(iou[b][rows], thresholds, labels, low_quality)
    np.testing.assert_array_equal(lab[b], ref_l)
    if len(rows):
      np.testing.assert_array_equal(matched[b], rows[ref_m])
    else:
      assert (np.asarray(matched[b]) == 0).all() and (np.asarray(lab[b]) == 0).all()
  assert matched.dtype == jnp.int32 and lab.dtype == jnp.int32


def test_match_without_gt_rows():
  m, l = jax.jit(lambda i, v: match(i, v, (0.3, 0.7), (0, -1, 1), True))(
    np.zeros((0, 7)), np.zeros(0, bool)
  )
  assert m.shape == l.shape == (7,) and not np.asarray(m).any() and not np.asarray(l).any()


def test_match_shape_error():
  with pytest.raises(ValueError, match=r"\(3,\)"):
    match(np.zeros((4, 5)), np.ones(3, bool), (0.5,), (0, 1), False)
