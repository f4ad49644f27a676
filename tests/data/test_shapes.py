"""shapes_instances / shapes_classification: offline, deterministic, masks match the JSON."""

import json
import os

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from rethink_jax.data import instances
from rethink_jax.data import pipeline
from rethink_jax.data import shapes


def test_instances_builder_splits_and_metadata(shapes_dir):
  b = shapes.ShapesInstances(config="tiny", data_dir=shapes_dir)
  assert b.is_prepared()
  assert b.info.splits["train"].num_examples == 24
  assert b.info.splits["validation"].num_examples == 8
  assert b.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert [c["name"] for c in b.info.metadata["categories"]] == ["circle", "square", "triangle"]
  assert [c["id"] for c in b.info.metadata["categories"]] == [1, 2, 3]


def test_classification_builder(shapes_dir):
  ds = tfds.load("shapes_classification/tiny", data_dir=shapes_dir, split="train")
  labels, n = set(), 0
  for ex in tfds.as_numpy(ds):
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    labels.add(int(ex["label"]))
    n += 1
  assert n == 48
  assert labels <= set(range(len(shapes.CLASSIFICATION_CATEGORIES)))
  assert len(labels) > 3  # several categories present


def test_rendering_is_deterministic_and_masks_exact():
  seed = int(np.random.default_rng().integers(1 << 30))
  a = shapes.render_instances(
    shapes.example_rng(seed, "train", 3), 64, shapes.INSTANCE_CATEGORIES, 1, 4
  )
  b = shapes.render_instances(
    shapes.example_rng(seed, "train", 3), 64, shapes.INSTANCE_CATEGORIES, 1, 4
  )
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=f"seed {seed}")
  image, masks, labels = a
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert masks.shape[0] == labels.shape[0] >= 1, f"seed {seed}"
  # Visible masks of one image never overlap.
  assert masks.sum(axis=0).max() <= 1, f"seed {seed}"


def test_records_agree_with_coco_json(shapes_dir):
  b = shapes.ShapesInstances(config="tiny", data_dir=shapes_dir)
  with open(os.path.join(b.data_dir, "annotations", "validation.json")) as f:
    gt = json.load(f)
  anns = {}
  for a in gt["annotations"]:
    anns.setdefault(a["image_id"], []).append(a)
  source = pipeline._data_source(b, "validation")
  meta = pipeline.records_meta(b, "validation")
  for i in range(len(source)):
    ex = tfds.as_numpy(b.info.features.deserialize_example(source[i]))
    image_id = int(ex["image_id"])
    assert image_id == meta["image_id"][i]
    objs = ex["objects"]
    assert len(objs["id"]) == meta["num_objects"][i] == len(anns.get(image_id, []))
    counts = np.split(ex["mask_counts"], np.cumsum(objs["mask_runs"])[:-1])
    for k, a in enumerate(anns.get(image_id, [])):
      assert a["id"] == objs["id"][k]
      mask = instances.counts_to_mask(counts[k], 64, 64)
      np.testing.assert_array_equal(mask, mask_utils.decode(a["segmentation"]))
      assert a["area"] == mask.sum() == objs["area"][k]
      x, y, w, h = a["bbox"]
      ys, xs = np.nonzero(mask)
      assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
      ymin, xmin, ymax, xmax = objs["bbox"][k]
      np.testing.assert_allclose(
        [xmin * 64, ymin * 64, xmax * 64, ymax * 64], [x, y, x + w, y + h], atol=1e-4
      )


def test_mask_counts_roundtrip():
  rng = np.random.default_rng()
  for _ in range(20):
    h, w = rng.integers(1, 30, 2)
    m = rng.random((h, w)) < rng.random()
    counts = instances.mask_to_counts(m)
    assert counts.sum() == h * w
    np.testing.assert_array_equal(instances.counts_to_mask(counts, h, w), m)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    np.testing.assert_array_equal(mask_utils.decode(rle), instances.counts_to_mask(counts, h, w))
