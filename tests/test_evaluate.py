"""evaluate.py: GT fed back scores 100, coco_metrics == COCOeval, pasting == Detectron2's."""

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
  c.update(
    data_dir=data_dir,
    builder_config="tiny",
    min_size=64,
    max_size=64,
    pad_to=(64, 64),
    mask_size=112,
    max_instances=8,
  )
  return c


def _gt_as_detections(batch, upscale=1.0):
  """The batch's ground truth in the detections format (scores 1, masks = the gt crops)."""
  classes = batch["gt_classes"]
  return {
    "boxes": batch["gt_boxes"] * upscale,
    "scores": (classes > 0).astype(np.float32),
    "classes": classes,
    "num_detections": (classes > 0).sum(axis=1),
    "masks": batch["gt_masks"].astype(np.float32),
  }


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
    results.append(
      {
        "image_id": a["image_id"],
        "category_id": cat,
        "score": float(rng.random()),
        "bbox": [float(x), float(y), float(max(bw, 1)), float(max(bh, 1))],
        "segmentation": rle,
      }
    )
    if rng.random() < 0.5:  # a false positive
      fm = np.zeros((h, w), np.uint8, order="F")
      x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
      fm[y0 : y0 + 8, x0 : x0 + 8] = 1
      rle = mask_utils.encode(fm)
      rle["counts"] = rle["counts"].decode()
      results.append(
        {
          "image_id": a["image_id"],
          "category_id": int(rng.choice(ids)),
          "score": float(rng.random()),
          "bbox": [float(x0), float(y0), 8.0, 8.0],
          "segmentation": rle,
        }
      )
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
      np.testing.assert_allclose(
        ours[f"{iou_type}/{name}"], expected, rtol=1e-12, err_msg=f"{iou_type}/{name} seed {seed}"
      )
  assert 0 < ours["bbox/AP"] < 100 and 0 < ours["segm/AP"] < 100, seed


def _detectron2_paste(masks, boxes, h, w):
  """Detectron2's _do_paste_mask transcribed (grid_sample, align_corners=False), whole image."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  m = torch.from_numpy(masks)[:, None]
  b = torch.from_numpy(boxes)
  x0, y0, x1, y1 = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]
  iy = (torch.arange(h).float() + 0.5 - y0) / (y1 - y0) * 2 - 1
  ix = (torch.arange(w).float() + 0.5 - x0) / (x1 - x0) * 2 - 1
  gx = ix[:, None, :].expand(len(boxes), h, w)
  gy = iy[:, :, None].expand(len(boxes), h, w)
  grid = torch.stack([gx, gy], dim=3)
  return F.grid_sample(m, grid, align_corners=False)[:, 0].numpy()


def _dilate(mask, k):
  """(..., H, W) bool grown by k pixels (8-neighbourhood)."""
  out = mask.copy()
  for _ in range(k):
    p = np.pad(out, [(0, 0)] * (out.ndim - 2) + [(1, 1), (1, 1)])
    out = np.zeros_like(out)
    for dy in range(3):
      for dx in range(3):
        out |= p[..., dy : dy + out.shape[-2], dx : dx + out.shape[-1]]
  return out


def test_paste_masks_matches_detectron2_and_torchvision():
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.roi_heads import paste_masks_in_image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  r, m, h, w = 12, 28, 96, 120
  yy, xx = np.mgrid[0:m, 0:m] / m
  probs = np.zeros((r, m, m), np.float32)
  for k in range(r):  # smooth blob-shaped probabilities
    for _ in range(3):
      cy, cx, sd = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
      probs[k] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd**2))
  probs = (1 / (1 + np.exp(-6 * (probs - 0.6)))).astype(np.float32)
  size = rng.uniform(4, 70, (r, 2))
  lo = rng.uniform(-0.5, 1.0, (r, 2)) * size + rng.uniform(0, 1, (r, 2)) * (np.array([w, h]) - size)
  boxes = np.concatenate([lo, lo + size], 1).astype(np.float32)
  boxes[0, :2] = 0.0  # touching the border
  boxes[1, 2:] = [w, h]
  boxes[2, 0], boxes[2, 3] = 0.0, h
  ours = evaluate.paste_masks(probs, boxes, (h, w))
  assert ours.shape == (h, w, r) and ours.dtype == np.uint8 and ours.flags.f_contiguous
  ours = ours.transpose(2, 0, 1).astype(bool)
  # Detectron2's rule: equal except where its value is within float noise of the threshold.
  d2 = _detectron2_paste(probs, boxes, h, w)
  clear = np.abs(d2 - 0.5) > 1e-4
  np.testing.assert_array_equal(ours[clear], (d2 >= 0.5)[clear])
  # torchvision's rule (the original Detectron's) pads the mask by a zero cell, grows the box by a
  # cell and rounds it to whole pixels: the masks differ only within about a cell of torchvision's
  # mask boundary. Compared on a canvas that holds every box whole (no boundary cut off).
  pad = 80
  canvas = (h + 2 * pad, w + 2 * pad)
  ours = evaluate.paste_masks(probs, boxes + pad, canvas).transpose(2, 0, 1).astype(bool)
  tv = (
    paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes + pad), canvas)[
      :, 0
    ].numpy()
    > 0.5
  )
  boundary = _dilate(tv, 1) & _dilate(~tv, 1)
  for i in range(r):
    band = int(np.ceil((boxes[i, 2:] - boxes[i, :2]).max() / m)) + 1
    outside = (ours[i] != tv[i]) & ~_dilate(boundary[i], band)
    assert not outside.any(), (i, boxes[i], np.argwhere(outside)[:5])
  assert (ours != tv).sum() < 0.2 * tv.sum()


def test_paste_masks_shape_errors():
  with pytest.raises(ValueError, match=r"\(3, 4\)"):
    evaluate.paste_masks(np.zeros((2, 5, 5)), np.zeros((3, 4)), (10, 10))
  with pytest.raises(ValueError, match=r"\(5, 6\)"):
    evaluate.paste_mask(np.zeros((5, 6)), np.zeros(4), (10, 10))


def test_detections_to_coco_drops_padding_and_maps_categories():
  batch = {
    "image_id": np.array([7, -1], np.int32),
    "valid": np.array([True, False]),
    "scale": np.array([2.0, 1.0], np.float32),
    "orig_hw": np.array([[10, 20], [10, 20]]),
  }
  dets = {
    "boxes": np.array([[[2, 4, 50, 12], [0, 0, 4, 4]], [[0, 0, 4, 4], [0, 0, 4, 4]]], np.float32),
    "scores": np.array([[0.9, 0.5], [0.9, 0.9]], np.float32),
    "classes": np.array([[2, 0], [1, 1]], np.int32),
    "num_detections": np.array([2, 2]),
  }
  out = evaluate.detections_to_coco(dets, batch, [11, 22])
  assert len(out) == 1
  assert out[0]["image_id"] == 7 and out[0]["category_id"] == 22
  np.testing.assert_allclose(out[0]["bbox"], [1, 2, 19, 4])  # /2, clipped to width 20
  assert evaluate.coco_metrics({}, [], ()) == {}


def test_torchvision_paste_rule_matches_torchvision():
  """The "torchvision" rule == torchvision's paste_masks_in_image (> 0.5) on random inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.roi_heads import paste_masks_in_image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  r, m, h, w = 40, 28, 90, 130
  probs = rng.uniform(0, 1, (r, m, m)).astype(np.float32)
  size = rng.uniform(0.3, 80, (r, 2))
  # Boxes overlap the image (torchvision fails on a box wholly outside it; detections never are).
  lo = rng.uniform(-0.9 * size, np.array([w, h]) - 0.1 * size)
  boxes = np.concatenate([lo, lo + size], 1).astype(np.float32)
  boxes[0] = [0, 0, w, h]  # the whole image
  boxes[1] = [-5.3, -7.9, w + 3.2, h + 6.6]  # beyond every border
  boxes[2] = [w - 2.5, h - 1.5, w + 40.0, h + 30.0]  # a corner only
  boxes[3] = [10.2, 20.7, 10.4, 20.9]  # below a pixel
  ours = evaluate.paste_masks(probs, boxes, (h, w), rule="torchvision")
  assert ours.shape == (h, w, r) and ours.dtype == np.uint8
  ours = ours.transpose(2, 0, 1).astype(bool)
  tv = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (h, w))
  tv = tv[:, 0].numpy()
  clear = np.abs(tv - 0.5) > 1e-5  # float rounding decides pixels at the threshold itself
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(ours[clear], (tv > 0.5)[clear])
  assert ours.sum() > 0.1 * (tv > 0.5).sum() > 0
  with pytest.raises(ValueError, match="paste rule"):
    evaluate.paste_masks(probs, boxes, (h, w), rule="nearest")
