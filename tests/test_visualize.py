"""Tests of rethink_jax.visualize: drawing, COCO objects to drawables, the trainer's records of
the evaluation images, the TensorBoard images and compare's predictions.png."""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from rethink_jax import visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _detections(rng, h, w):
  """Two detections: #0 (score >= 0.5) and #1 (below), each mask a rectangle inside its box."""
  y0, x0 = int(rng.integers(14, h // 2 - 8)), int(rng.integers(2, w // 2 - 8))
  box0 = np.array([x0, y0, x0 + 16, y0 + 12], np.float32)
  box1 = np.array([w // 2 + 4, h // 2 + 4, w - 2, h - 2], np.float32)
  masks = np.zeros((2, h, w), bool)
  masks[0, y0 + 3 : y0 + 10, x0 + 3 : x0 + 14] = True
  masks[1, h // 2 + 7 : h - 5, w // 2 + 7 : w - 5] = True
  return {
    "boxes": np.stack([box0, box1]),
    "scores": np.array([rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.49)], np.float32),
    "labels": np.array([1, 2]),
    "names": ["circle", "square"],
    "masks": masks,
  }


def test_draw_blends_masks_draws_boxes_and_labels_above_the_threshold():
  rng = np.random.default_rng()
  h, w = 64, 80
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  det = _detections(rng, h, w)
  assert visualize.label_texts(det, 0.5) == [f"circle {det['scores'][0]:.2f}"]
  drawn = np.asarray(visualize.draw(image, det, score_thresh=0.5))
  assert drawn.shape == image.shape and drawn.dtype == np.uint8
  m0, m1 = det["masks"]
  blended = (0.5 * image.astype(np.float32) + 0.5 * visualize.color(0)).astype(np.uint8)
  np.testing.assert_array_equal(drawn[m0], blended[m0])
  np.testing.assert_array_equal(drawn[m1], image[m1])  # below the threshold: not drawn
  x0, y0, x1, y1 = (int(v) for v in det["boxes"][0])
  assert tuple(drawn[y1, (x0 + x1) // 2]) == tuple(int(v) for v in visualize.color(0))
  # Away from the box and its label the image is untouched.
  np.testing.assert_array_equal(drawn[y1 + 2 :, :x0], image[y1 + 2 :, :x0])
  # Ground truth (no scores): every object, labelled by name alone.
  gt = {k: v for k, v in det.items() if k != "scores"}
  assert visualize.label_texts(gt) == ["circle", "square"]
  drawn_gt = np.asarray(visualize.draw(image, gt, score_thresh=0.5))
  assert (drawn_gt[m1] != image[m1]).any()


def test_fit_scales_boxes_and_masks():
  rng = np.random.default_rng()
  det = _detections(rng, 64, 48)
  image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
  big, res = visualize.fit(image, det, 256)  # small images grow by an integer factor
  assert big.shape == (256, 192, 3)
  np.testing.assert_array_equal(big[::4, ::4], image)
  np.testing.assert_allclose(res["boxes"], det["boxes"] * 4)
  np.testing.assert_array_equal(res["masks"][:, ::4, ::4], det["masks"])
  assert res["masks"].sum() == 16 * det["masks"].sum()
  image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
  det = _detections(rng, 400, 600)
  small, res = visualize.fit(image, det, 300)
  assert small.shape == (200, 300, 3) and res["masks"].shape == (2, 200, 300)
  np.testing.assert_allclose(res["boxes"], det["boxes"] / 2, rtol=1e-6)


def test_from_coco_reads_boxes_masks_names_and_scores():
  rng = np.random.default_rng()
  h, w = 48, 56
  det = _detections(rng, h, w)
  rles = mask_utils.encode(np.asfortranarray(det["masks"].transpose(1, 2, 0).astype(np.uint8)))
  objects = []
  for box, score, rle in zip(det["boxes"], det["scores"], rles):
    x0, y0, x1, y1 = (float(v) for v in box)
    seg = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    objects.append(dict(bbox=[x0, y0, x1 - x0, y1 - y0], category_id=7, score=float(score)))
    objects[-1]["segmentation"] = seg
  out = visualize.from_coco(objects, (h, w), {7: "hexagon"})
  np.testing.assert_array_equal(out["masks"], det["masks"])
  np.testing.assert_allclose(out["boxes"], det["boxes"])
  np.testing.assert_allclose(out["scores"], det["scores"])
  assert out["names"] == ["hexagon", "hexagon"] and list(out["labels"]) == [7, 7]
  gt = visualize.from_coco([{k: v for k, v in o.items() if k != "score"} for o in objects], (h, w))
  assert "scores" not in gt and gt["names"] == ["7", "7"]
  assert visualize.from_coco([], (h, w))["masks"].shape == (0, h, w)


def test_keypoints_drawn_above_the_threshold_joined_by_the_skeleton():
  rng = np.random.default_rng()
  h, w = 64, 80
  image = np.full((h, w, 3), 128, np.uint8)
  # Keypoints 0 and 1 on one row, 2 (below the threshold) and 3 (unlabeled) well below it.
  y = float(rng.integers(20, 28)) + 0.5  # below the label
  xa, xb = float(rng.integers(10, 25)) + 0.5, float(rng.integers(50, 70)) + 0.5
  points = np.array([[xa, y, 0.9], [xb, y, 0.8], [40.5, 50.5, 0.01], [20.5, 50.5, 0.0]], np.float32)
  det = {
    "boxes": np.array([[2, 2, w - 3, h - 3]], np.float32),
    "scores": np.array([0.9], np.float32),
    "labels": np.array([1]),
    "masks": np.zeros((1, h, w), bool),
    "keypoints": points[None],
    "skeleton": np.array([[0, 1], [1, 2], [2, 3]]),
  }
  drawn = np.asarray(visualize.draw(image, det, score_thresh=0.5))
  rgb = tuple(int(v) for v in visualize.color(0))
  assert tuple(drawn[int(y), int(xa)]) == rgb and tuple(drawn[int(y), int(xb)]) == rgb
  assert tuple(drawn[int(y), int((xa + xb) / 2)]) == rgb  # the skeleton line 0 - 1
  np.testing.assert_array_equal(drawn[44:56, 12:50], image[44:56, 12:50])  # 2, 3 and their lines
  # Ground truth: v = 1 (labeled, not visible) is hollow, v = 2 filled, v = 0 not drawn.
  gt = {k: v for k, v in det.items() if k != "scores"}
  gt["keypoints"] = np.array([[[xa, y, 2], [xb, y, 1], [40.5, 50.5, 0], [20.5, 50.5, 0]]])
  gt["skeleton"] = np.array([[2, 3]])  # no line through the hollow keypoint
  drawn = np.asarray(visualize.draw(image, gt))
  assert tuple(drawn[int(y), int(xa)]) == rgb
  assert tuple(drawn[int(y), int(xb)]) == (128, 128, 128)  # hollow centre
  assert (drawn[int(y) - 3 : int(y) + 4, int(xb) - 3 : int(xb) + 4] == 0).all(-1).any()  # ring
  np.testing.assert_array_equal(drawn[44:56, 12:50], image[44:56, 12:50])
  # fit scales keypoints with the image; from_coco moves COCO's pixel indices to their centres.
  big, res = visualize.fit(image, gt, 160)
  np.testing.assert_allclose(res["keypoints"][..., :2], gt["keypoints"][..., :2] * 2)
  np.testing.assert_array_equal(res["keypoints"][..., 2], gt["keypoints"][..., 2])
  coco_kp = rng.integers(0, 40, (2, 4, 3)).astype(np.float64)
  objects = [
    dict(bbox=[1, 2, 3, 4], category_id=1, keypoints=coco_kp[0].reshape(-1).tolist()),
    dict(bbox=[1, 2, 3, 4], category_id=1, keypoints=coco_kp[1].reshape(-1).tolist()),
    dict(bbox=[1, 2, 3, 4], category_id=2),  # a category without keypoints
  ]
  out = visualize.from_coco(objects, (h, w), skeleton=[[1, 2], [2, 4]])
  np.testing.assert_allclose(out["keypoints"][:2, :, :2], coco_kp[..., :2] + 0.5)
  np.testing.assert_allclose(out["keypoints"][:2, :, 2], coco_kp[..., 2])
  assert not out["keypoints"][2, :, 2].any()  # nothing to draw
  np.testing.assert_array_equal(out["skeleton"], [[0, 1], [1, 3]])
  assert "keypoints" not in visualize.from_coco(objects[2:], (h, w))


# ------------------------------------------------------------------------------------------------
# Records of the trainer's evaluations, on the tiny shapes data set.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  config = pipeline.default_data_config()
  config.update(dict(builder_config="tiny", data_dir=data_dir, eval_split="validation"))
  return config, pipeline.get_coco_gt(config)


def _rle(coco_gt, ann):
  rle = coco_gt.annToRLE(ann)
  counts = rle["counts"]
  counts = counts.decode() if isinstance(counts, bytes) else counts
  return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _results_from_gt(rng, coco_gt, score_range):
  """Every ground-truth object as a COCO result scoring within score_range, plus MAX_RECORDED
  copies of each image's first object scoring 0.01 (which the records must cut)."""
  out = []
  for image_id in coco_gt.getImgIds():
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
    for k, a in enumerate(anns):
      r = dict(image_id=image_id, category_id=a["category_id"], bbox=a["bbox"])
      r["segmentation"] = _rle(coco_gt, a)
      out.append(dict(r, score=float(rng.uniform(*score_range))))
      if k == 0:
        out += [dict(r, score=0.01) for _ in range(visualize.MAX_RECORDED)]
  rng.shuffle(out)
  return out


def _first_images_with_objects(coco_gt, num):
  ids = sorted(coco_gt.getImgIds())
  return [i for i in ids if coco_gt.getAnnIds(imgIds=[i], iscrowd=False)][:num]


def test_record_evaluation_writes_sample_records_and_tensorboard_images(tiny_data, tmp_path):
  config, coco_gt = tiny_data
  rng = np.random.default_rng()
  results = _results_from_gt(rng, coco_gt, (0.6, 1.0))
  images = visualize.record_evaluation(config, str(tmp_path), 4, results, 5, 2)
  record_dir = tmp_path / visualize.RECORD_DIR
  sample, pictures = visualize.load_sample(str(record_dir))
  assert sample["image_ids"] == _first_images_with_objects(coco_gt, 5)
  for image_id in sample["image_ids"]:
    info = coco_gt.loadImgs([image_id])[0]
    assert pictures[image_id].shape == (info["height"], info["width"], 3)
    assert len(sample["annotations"][str(image_id)]) == len(coco_gt.getAnnIds(imgIds=[image_id]))
  # The records hold each image's MAX_RECORDED best detections, best first.
  record = json.loads((record_dir / "step_00000004.json").read_text())
  assert record["step"] == 4 and set(record["detections"]) == {str(i) for i in sample["image_ids"]}
  for image_id, dets in record["detections"].items():
    mine = sorted((r["score"] for r in results if r["image_id"] == int(image_id)), reverse=True)
    assert [d["score"] for d in dets] == mine[: visualize.MAX_RECORDED]
  # TensorBoard: ground truth | detections of the first two images, 64 px grown to 256.
  assert sorted(images) == [f"eval_images/{i}" for i in sorted(sample["image_ids"][:2])]
  for v in images.values():
    assert v.shape == (1, 256, 2 * 256 + 4, 3) and v.dtype == np.uint8
  # A later evaluation keeps the sample and adds its record.
  visualize.record_evaluation(config, str(tmp_path), 8, results[:3], 5, 2)
  assert visualize.load_sample(str(record_dir))[0] == sample
  assert sorted(visualize.read_records(str(record_dir))) == [4, 8]
  assert visualize.record_evaluation(config, str(tmp_path / "off"), 4, results, 0, 2) == {}
  assert not (tmp_path / "off").exists()


def _cells(png_path, layout):
  """{(row, column): (cell, cell, 3) pixels} of predictions.png."""
  grid = np.asarray(Image.open(png_path).convert("RGB"))
  side, gap = layout["cell"], layout["gap"]
  top = layout["title_h"] + layout["header_h"]
  rows, cols = len(layout["image_ids"]), len(layout["columns"])
  assert grid.shape == (top + rows * (side + gap) - gap, cols * (side + gap) - gap, 3)
  return {
    (r, c): grid[top + r * (side + gap) :][:side, c * (side + gap) :][:, :side]
    for r in range(rows)
    for c in range(cols)
  }


def test_predictions_png_columns_for_both_arms(tiny_data, tmp_path):
  config, coco_gt = tiny_data
  rng = np.random.default_rng()
  unit = int(rng.integers(2, 6))
  confident = _results_from_gt(rng, coco_gt, (0.6, 1.0))
  unsure = _results_from_gt(rng, coco_gt, (0.05, 0.45))
  arms = {"finetune": [1, 2], "scratch": [1, 2, 3]}
  for arm, multiples in arms.items():
    # The scratch arm never reached its longest multiple: that column is left out.
    recorded = multiples if arm == "finetune" else multiples[:-1]
    for m in recorded:
      res = unsure if (arm, m) == ("scratch", 1) else confident
      visualize.record_evaluation(config, str(tmp_path / arm), m * unit, res, 6, 0)
  results = {
    "unit_steps": unit,
    "arms": {a: {"multiples": m, "workdir": str(tmp_path / a)} for a, m in arms.items()},
  }
  layout = visualize.write_predictions_png(results, str(tmp_path))
  assert layout["columns"] == [
    "ground truth",
    f"fine-tuned 1x (iter {unit})",
    f"fine-tuned 2x (iter {2 * unit})",
    f"scratch 1x (iter {unit})",
  ]
  assert layout["notes"] == ["scratch 3x: not recorded"]
  assert layout["image_ids"] == _first_images_with_objects(coco_gt, 6)
  png = tmp_path / "predictions.png"
  assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size < 1_500_000
  cells = _cells(png, layout)
  sample, pictures = visualize.load_sample(str(tmp_path / "finetune" / visualize.RECORD_DIR))
  for r, image_id in enumerate(layout["image_ids"]):
    plain = np.repeat(np.repeat(pictures[image_id], 4, axis=0), 4, axis=1)  # 64 px -> 256
    assert (cells[r, 0] != plain).any()  # ground truth drawn
    assert (cells[r, 1] != plain).any()  # confident detections drawn
    np.testing.assert_array_equal(cells[r, 3], plain)  # nothing scores >= 0.5: nothing drawn
  # Without any record there is no picture.
  assert visualize.write_predictions_png({"unit_steps": 1, "arms": {}}, str(tmp_path / "x")) is None


def check_comparison_pictures(workdir, arms):
  """What a comparison run leaves: every arm's eval_images/ records and TensorBoard images, and
  predictions.png with ground truth and a column per arm (used by tests/test_compare.py)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  res = json.loads((workdir / "results.json").read_text())
  for arm in arms:
    record_dir = os.path.join(res["arms"][arm]["workdir"], visualize.RECORD_DIR)
    steps = sorted(p["step"] for p in res["arms"][arm]["curve"])
    assert sorted(visualize.read_records(record_dir)) == steps
    tags = set()
    for name in os.listdir(res["arms"][arm]["workdir"]):
      if name.startswith("events.out.tfevents"):
        path = os.path.join(res["arms"][arm]["workdir"], name)
        for raw in tf.data.TFRecordDataset(path):
          event = tf.compat.v1.Event.FromString(raw.numpy())
          tags |= {v.tag for v in event.summary.value if v.tag.startswith("eval_images/")}
    assert tags, f"{arm}: no eval_images/ in TensorBoard"
  png = workdir / "predictions.png"
  assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size < 1_500_000
  layout = visualize.write_predictions_png(res, str(workdir))
  for arm in arms:
    label = visualize._ARM_LABELS[arm]  # pylint: disable=protected-access
    assert any(c.startswith(f"{label} 1x") for c in layout["columns"]), layout
  _cells(png, layout)  # the PNG's size is the layout's
