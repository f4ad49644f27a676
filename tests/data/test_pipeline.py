"""The fixed-shape pipeline: shapes, alignment, sharding, resume, subsets."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from rethink_jax.data import instances
from rethink_jax.data import pipeline
from rethink_jax.data import stream

KEYS = {
  "image": ((64, 64, 3), np.float32),
  "image_hw": ((2,), np.int32),
  "image_id": ((), np.int32),
  "orig_hw": ((2,), np.int32),
  "scale": ((), np.float32),
  "valid": ((), np.bool_),
  "gt_boxes": ((8, 4), np.float32),
  "gt_classes": ((8,), np.int32),
  "gt_masks": ((8, 28, 28), np.uint8),
}


def _check_batch(batch, b):
  assert set(batch) == set(KEYS)
  for k, (shape, dtype) in KEYS.items():
    assert batch[k].shape == (b,) + shape, k
    assert batch[k].dtype == dtype, k


def _take(it, n):
  return [next(it) for _ in range(n)]


def _bilinear_clamped(img, y, x):
  """RoIAlign-style bilinear sample of img (h, w) at index coords (y, x): arrays."""
  h, w = img.shape
  out = np.zeros(np.broadcast(y, x).shape)
  y, x = np.broadcast_arrays(y, x)
  ok = (y >= -1) & (y <= h) & (x >= -1) & (x <= w)
  yc, xc = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)
  y0, x0 = np.floor(yc).astype(int), np.floor(xc).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  ly, lx = yc - y0, xc - x0
  v = (
    img[y0, x0] * (1 - ly) * (1 - lx)
    + img[y0, x1] * (1 - ly) * lx
    + img[y1, x0] * ly * (1 - lx)
    + img[y1, x1] * ly * lx
  )
  out[ok] = v[ok]
  return out


def _reference_crop(full, box, size):
  """Contract of CONTRACTS.md: sample full (h, w) mask at box cell centres (same frame)."""
  x1, y1, x2, y2 = box
  ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size - 0.5
  xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size - 0.5
  return _bilinear_clamped(full.astype(np.float64), ys[:, None], xs[None, :]) >= 0.5


def test_fixed_shapes_every_batch(tiny_config):
  c = tiny_config
  c.min_size = (48, 56, 64)  # "train aug": shorter side drawn per image
  it = stream.make_train_iterator(c, 4, seed=1, process_index=0, process_count=1)
  for batch in _take(it, 8):  # more than an epoch (24 images / 4)
    _check_batch(batch, 4)
    assert batch["valid"].all()
    assert (batch["gt_classes"] > 0).any(axis=1).all()  # empty images dropped
    hw = batch["image_hw"]
    assert (hw.min(axis=1) <= 64).all() and (hw.min(axis=1) >= 48).all()
    assert np.allclose(batch["scale"], hw.min(axis=1) / 64.0, atol=0.02)
  ev = list(pipeline.make_eval_iterator(c, 3, process_index=0, process_count=1))
  assert len(ev) == 3  # 8 images -> 3 batches of 3, one padding image
  for batch in ev:
    _check_batch(batch, 3)
  assert ev[-1]["image_id"][-1] == -1 and not ev[-1]["valid"][-1]
  assert (ev[-1]["gt_classes"][-1] == 0).all()


def test_boxes_and_masks_stay_aligned(tiny_config):
  """Crops match the contract, flips mirror everything, masks fill their boxes."""
  c = tiny_config
  c.min_size = 48
  c.max_size = 48  # downscale 64 -> 48
  b = pipeline.get_builder(c)
  source = pipeline._data_source(b, "train")
  by_id = {}
  for i in range(len(source)):
    ex = tfds.as_numpy(b.info.features.deserialize_example(source[i]))
    by_id[int(ex["image_id"])] = ex
  c.flip_prob = 0.0
  plain = _take(stream.make_train_iterator(c, 4, seed=3, process_index=0, process_count=1), 3)
  c.flip_prob = 1.0
  flipped = _take(stream.make_train_iterator(c, 4, seed=3, process_index=0, process_count=1), 3)
  mean = np.asarray(c.pixel_mean, np.float32)
  std = np.asarray(c.pixel_std, np.float32)
  checked = 0
  for p, f in zip(plain, flipped):
    np.testing.assert_array_equal(p["image_id"], f["image_id"])
    for k in range(4):
      h, w = p["image_hw"][k]
      assert (h, w) == (48, 48)
      np.testing.assert_allclose(f["image"][k, :h, :w], p["image"][k, :h, ::-1][:, -w:], atol=1e-4)
      n = int((p["gt_classes"][k] > 0).sum())
      pb, fb = p["gt_boxes"][k, :n], f["gt_boxes"][k, :n]
      np.testing.assert_allclose(fb[:, [0, 2]], w - pb[:, [2, 0]], atol=1e-4)
      np.testing.assert_array_equal(f["gt_masks"][k, :n], p["gt_masks"][k, :n, :, ::-1])
      ex = by_id[int(p["image_id"][k])]
      objs = ex["objects"]
      counts = np.split(ex["mask_counts"], np.cumsum(objs["mask_runs"])[:-1])
      scale = p["scale"][k]
      for g in range(n):
        full = instances.counts_to_mask(counts[g], 64, 64)
        ymin, xmin, ymax, xmax = objs["bbox"][g]
        np.testing.assert_allclose(
          pb[g], np.array([xmin, ymin, xmax, ymax]) * 64 * scale, atol=1e-3
        )
        crop = p["gt_masks"][k, g]
        ref = _reference_crop(full, pb[g] / scale, c.mask_size)
        assert (crop != ref).mean() < 0.01
        # The box is tight around the mask: the crop touches all four borders.
        assert crop[:2].any() and crop[-2:].any() and crop[:, :2].any() and crop[:, -2:].any()
        checked += 1
      # The image is the original resized by the same scale as the boxes (so objects stay
      # under their boxes and masks), zero (= mean) padded, and normalized.
      img = p["image"][k] * std + mean
      ref = tf.image.resize(ex["image"], [h, w], method="bilinear").numpy()
      np.testing.assert_allclose(img[:h, :w], ref, atol=1e-2)
      assert h == round(64 * float(scale)) and w == round(64 * float(scale))
      assert not p["image"][k, h:].any() and not p["image"][k, :, w:].any()
  assert checked > 5


def test_two_processes_disjoint_and_covering(tiny_config):
  c = tiny_config
  pool = pipeline.train_pool(c)
  n = len(pool)
  meta = pipeline.records_meta(pipeline.get_builder(c), "train")
  b = 2
  steps = n // (2 * b)
  seen = []
  for p in range(2):
    it = stream.make_train_iterator(c, b, seed=5, process_index=p, process_count=2)
    ids = np.concatenate([x["image_id"] for x in _take(it, steps)])
    seen.append(set(ids.tolist()))
    assert len(ids) == len(set(ids.tolist()))
  assert not seen[0] & seen[1]
  covered = seen[0] | seen[1]
  assert covered <= set(meta["image_id"][pool].tolist())
  assert len(covered) == steps * 2 * b >= n - 2 * b + 1
  ev = [set(), set()]
  num_batches = []
  for p in range(2):
    batches = list(pipeline.make_eval_iterator(c, 3, process_index=p, process_count=2))
    num_batches.append(len(batches))
    for x in batches:
      ev[p] |= set(x["image_id"][x["valid"]].tolist())
  assert num_batches[0] == num_batches[1]
  assert not ev[0] & ev[1]
  assert ev[0] | ev[1] == set(range(1, 9))


def test_resume_equals_uninterrupted(tiny_config):
  c = tiny_config
  c.min_size = (40, 64)
  full = _take(stream.make_train_iterator(c, 4, seed=7, process_index=0, process_count=1), 9)
  it = stream.make_train_iterator(c, 4, seed=7, start_step=5, process_index=0, process_count=1)
  assert it.step == 5
  resumed = _take(it, 4)
  assert it.step == 9
  for a, r in zip(full[5:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], r[k], err_msg=k)
  other = next(stream.make_train_iterator(c, 4, seed=8, process_index=0, process_count=1))
  assert not np.array_equal(other["image_id"], full[0]["image_id"]) or not np.array_equal(
    other["image"], full[0]["image"]
  )


def test_subsets_are_deterministic(tiny_config):
  c = tiny_config
  c.num_train_images = 10
  c.subset_seed = 3
  a = pipeline.train_pool(c)
  assert len(a) == 10 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, pipeline.train_pool(c))
  c.subset_seed = 4
  assert not np.array_equal(a, pipeline.train_pool(c))
  c.subset_seed = 3
  it = stream.make_train_iterator(c, 5, seed=0, process_index=0, process_count=1)
  ids = np.concatenate([x["image_id"] for x in _take(it, 2)])
  meta = pipeline.records_meta(pipeline.get_builder(c), "train")
  assert set(ids.tolist()) == set(meta["image_id"][a].tolist())
  c.num_train_images = 1000
  with pytest.raises(ValueError, match="num_train_images"):
    pipeline.train_pool(c)


def test_bgr_and_normalization(tiny_config):
  c = tiny_config
  c.flip_prob = 0.0
  rgb = next(pipeline.make_eval_iterator(c, 2, process_index=0, process_count=1))
  c.input_format = "BGR"
  c.pixel_mean = tuple(c.pixel_mean)[::-1]
  c.pixel_std = tuple(c.pixel_std)[::-1]
  bgr = next(pipeline.make_eval_iterator(c, 2, process_index=0, process_count=1))
  np.testing.assert_allclose(bgr["image"], rgb["image"][..., ::-1], atol=1e-5)


def test_coco_gt_and_categories(tiny_config):
  c = tiny_config
  assert pipeline.category_ids(c) == [1, 2, 3]
  gt = pipeline.get_coco_gt(c)
  assert len(gt.getImgIds()) == 8
  c.eval_split = "validation[:3]"
  gt = pipeline.get_coco_gt(c)
  assert sorted(gt.getImgIds()) == [1, 2, 3]
  ids = np.concatenate(
    [
      x["image_id"][x["valid"]]
      for x in pipeline.make_eval_iterator(c, 2, process_index=0, process_count=1)
    ]
  )
  assert sorted(ids.tolist()) == [1, 2, 3]


def test_bad_config(tiny_config):
  c = tiny_config
  c.pad_to = (60, 64)
  with pytest.raises(ValueError, match="multiples of 32"):
    stream.make_train_iterator(c, 2, seed=0, process_index=0, process_count=1)


def test_crops_match_ops_reference(tiny_config):
  """At scale 1 the pipeline's gt_masks equal ops.masks.crop_masks_to_boxes of the full masks."""
  from rethink_jax.ops import masks as ops_masks  # pylint: disable=g-import-not-at-top

  c = tiny_config
  c.flip_prob = 0.0
  b = pipeline.get_builder(c)
  source = pipeline._data_source(b, "validation")
  by_id = {}
  for i in range(len(source)):
    ex = tfds.as_numpy(b.info.features.deserialize_example(source[i]))
    by_id[int(ex["image_id"])] = ex
  full, boxes, ours = [], [], []
  for batch in pipeline.make_eval_iterator(c, 4, process_index=0, process_count=1):
    for k in np.flatnonzero(batch["valid"]):
      assert batch["scale"][k] == 1.0
      ex = by_id[int(batch["image_id"][k])]
      n = int((batch["gt_classes"][k] > 0).sum())
      counts = np.split(ex["mask_counts"], np.cumsum(ex["objects"]["mask_runs"])[:-1])
      full += [instances.counts_to_mask(cc, 64, 64) for cc in counts[:n]]
      boxes.append(batch["gt_boxes"][k, :n])
      ours.append(batch["gt_masks"][k, :n])
  ours = np.concatenate(ours)
  ref = np.asarray(
    ops_masks.crop_masks_to_boxes(np.stack(full), np.concatenate(boxes), c.mask_size)
  )  # one call: one compilation
  diffs = int((ref != ours).sum())
  assert ref.size > 0 and diffs <= 0.002 * ref.size, (diffs, ref.size)


def test_builder_overrides(tiny_config):
  c = tiny_config
  c.builder_overrides = {"num_train": 6, "num_validation": 2}
  b = pipeline.get_builder(c)  # generated on first use
  assert b.info.splits["train"].num_examples == 6
  assert b.builder_config.name == "tiny_num_train6_num_validation2"
  ev = list(pipeline.make_eval_iterator(c, 2, process_index=0, process_count=1))
  assert len(ev) == 1 and ev[0]["valid"].all()
  tr = stream.make_train_iterator(c, 2, seed=0, process_index=0, process_count=1)
  _check_batch(next(tr), 2)
