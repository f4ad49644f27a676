"""evaluate.py: GT fed back scores 100, coco_metrics == COCOeval, pasting == ops.paste_masks."""
import contextlib
import io
import json

import numpy as np
from pycocotools import cocoeval
from pycocotools import mask as mask_utils
import pytest

from rethink_jax import evaluate


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_eval"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  c = pipeline.default_data_config()
  c.update(data_dir=data_dir, builder_config="tiny", min_size=64, max_size=64, pad_to=(64, 64),
           mask_size=112, max_instances=8)
  return c


def _gt_as_detections(batch, upscale=1.0):
  """The batch's ground truth in the detections format (scores 1, masks = the gt crops)."""
  classes = batch["gt_classes"]
  return {"boxes": batch["gt_boxes"] * upscale, "scores": (classes > 0).astype(np.float32),
          "classes": classes, "num_detections": (classes > 0).sum(axis=1),
          "masks": batch["gt_masks"].astype(np.float32)}


def test_ground_truth_scores_100(data_config, tmp_path):
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  gt = pipeline.get_coco_gt(data_config)
  ids = pipeline.category_ids(data_config)
  out = tmp_path / "results.json"
  it = pipeline.make_eval_iterator(data_config, 3, process_index=0, process_count=1)
  metrics = evaluate.evaluate(_gt_as_detections, it, gt, ids, output_json=str(out))
  assert set(metrics) == {f"{t}/{n}" for t in ("bbox", "segm") for n in evaluate.METRIC_NAMES}
  assert metrics["bbox/AP"] == pytest.approx(100.0)
  assert metrics["segm/AP"] == pytest.approx(100.0)
  assert metrics["segm/AP75"] == pytest.approx(100.0)
  results = json.loads(out.read_text())
  assert len(results) == len(gt.getAnnIds())
  assert {r["image_id"] for r in results} == set(gt.getImgIds())


def test_resized_ground_truth_maps_back(data_config):
  """At another input scale, boxes are divided by the scale back into original pixels."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = data_config.copy_and_resolve_references()
  c.update(min_size=96, max_size=96, pad_to=(96, 96))
  gt = pipeline.get_coco_gt(c)
  results = []
  for batch in pipeline.make_eval_iterator(c, 4, process_index=0, process_count=1):
    np.testing.assert_allclose(batch["scale"][batch["valid"]], 1.5)
    dets = _gt_as_detections(batch)
    dets.pop("masks")
    results += evaluate.detections_to_coco(dets, batch, pipeline.category_ids(c))
  by_id = {(r["image_id"], tuple(np.round(r["bbox"], 3))) for r in results}
  for a in gt.loadAnns(gt.getAnnIds()):
    assert (a["image_id"], tuple(np.round(a["bbox"], 3))) in by_id
  assert evaluate.coco_metrics(gt, results, ("bbox",))["bbox/AP"] == pytest.approx(100.0)


def _random_results(gt, rng):
  """Perturbed ground truth plus false positives, with masks."""
  results = []
  ids = gt.getCatIds()
  for a in gt.loadAnns(gt.getAnnIds()):
    img = gt.imgs[a["image_id"]]
    h, w = img["height"], img["width"]
    x, y, bw, bh = np.asarray(a["bbox"]) + rng.normal(0, 2, 4)
    m = mask_utils.decode(a["segmentation"])
    m = np.roll(m, rng.integers(-2, 3, 2), axis=(0, 1))
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(ids))
    results.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                    "bbox": [float(x), float(y), float(max(bw, 1)), float(max(bh, 1))],
                    "segmentation": rle})
    if rng.random() < 0.5:  # a false positive
      fm = np.zeros((h, w), np.uint8, order="F")
      x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
      fm[y0:y0 + 8, x0:x0 + 8] = 1
      rle = mask_utils.encode(fm)
      rle["counts"] = rle["counts"].decode()
      results.append({"image_id": a["image_id"], "category_id": int(rng.choice(ids)),
                      "score": float(rng.random()), "bbox": [float(x0), float(y0), 8.0, 8.0],
                      "segmentation": rle})
  return results


def test_coco_metrics_equals_cocoeval(data_config):
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  seed = int(np.random.default_rng().integers(1 << 31))
  rng = np.random.default_rng(seed)
  gt = pipeline.get_coco_gt(data_config)
  results = _random_results(gt, rng)
  ours = evaluate.coco_metrics(pipeline.annotation_file(data_config), results)
  for iou_type in ("bbox", "segm"):
    res = [dict(r) for r in results]
    if iou_type == "segm":
      for r in res:
        r.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
      ev = cocoeval.COCOeval(gt, gt.loadRes(res), iou_type)
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    for name, v in zip(evaluate.METRIC_NAMES, ev.stats):
      expected = v * 100 if v >= 0 else float("nan")
      np.testing.assert_allclose(ours[f"{iou_type}/{name}"], expected, rtol=1e-12,
                                 err_msg=f"{iou_type}/{name} seed {seed}")
  assert 0 < ours["bbox/AP"] < 100 and 0 < ours["segm/AP"] < 100, seed


def test_paste_matches_ops_paste_masks():
  from rethink_jax.ops import masks as jnp_masks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  r, m, h, w = 6, 28, 37, 53
  masks = rng.random((r, m, m)).astype(np.float32)
  x1, y1 = rng.uniform(-5, w - 5, r), rng.uniform(-5, h - 5, r)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, 30, r), y1 + rng.uniform(1, 30, r)], 1)
  ours = evaluate.paste_masks_numpy(masks, boxes, (h, w))
  ref = np.asarray(jnp_masks.paste_masks(masks, boxes, (h, w), method="detectron2"))
  # Equal except for values within float32 rounding of the threshold.
  assert (ours != ref).sum() <= 2, (ours != ref).sum()


def test_detections_to_coco_drops_padding_and_maps_categories():
  batch = {"image_id": np.array([7, -1], np.int32), "valid": np.array([True, False]),
           "scale": np.array([2.0, 1.0], np.float32), "orig_hw": np.array([[10, 20], [10, 20]])}
  dets = {"boxes": np.array([[[2, 4, 50, 12], [0, 0, 4, 4]], [[0, 0, 4, 4], [0, 0, 4, 4]]],
                            np.float32),
          "scores": np.array([[0.9, 0.5], [0.9, 0.9]], np.float32),
          "classes": np.array([[2, 0], [1, 1]], np.int32),
          "num_detections": np.array([2, 2])}
  out = evaluate.detections_to_coco(dets, batch, [11, 22])
  assert len(out) == 1
  assert out[0]["image_id"] == 7 and out[0]["category_id"] == 22
  np.testing.assert_allclose(out[0]["bbox"], [1, 2, 19, 4])  # /2, clipped to width 20
  assert evaluate.coco_metrics({}, [], ()) == {}
