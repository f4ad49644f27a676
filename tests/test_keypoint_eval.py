"""Keypoint evaluation: detections -> COCO keypoint results -> COCOeval iouType "keypoints".

Checked against pycocotools run directly on the JSON the evaluation writes, on random ground
truth and random detections (fresh inputs each run: the seed is in the failure message).
"""

import contextlib
import io
import json
import os

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
import pytest

from rethink_jax import evaluate

NUM_POINTS = 5
SIGMAS = (0.05, 0.04, 0.04, 0.07, 0.07)
PERSON, BALL = 1, 7  # category ids: persons carry keypoints, balls none


def _random_gt(rng, num_images=6):
  """A COCO dict: persons with NUM_POINTS keypoints (some unlabeled, some occluded) and balls
  without keypoints, on images of random sizes."""
  images, anns = [], []
  for image_id in range(1, num_images + 1):
    h, w = (int(v) for v in rng.integers(60, 160, 2))
    images.append({"id": image_id, "height": h, "width": w})
    for _ in range(int(rng.integers(1, 4))):
      bw, bh = rng.uniform(20, 0.8 * w), rng.uniform(20, 0.8 * h)
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      px = np.floor(rng.uniform(x, x + bw, NUM_POINTS))
      py = np.floor(rng.uniform(y, y + bh, NUM_POINTS))
      v = rng.choice([0, 1, 2], NUM_POINTS, p=[0.15, 0.2, 0.65])
      v[0] = 2  # at least one labeled keypoint
      px[v == 0], py[v == 0] = 0, 0  # COCO writes unlabeled keypoints as 0, 0, 0
      kp = np.stack([px, py, v], 1).reshape(-1)
      anns.append(
        {
          "id": len(anns) + 1,
          "image_id": image_id,
          "category_id": PERSON,
          "bbox": [float(x), float(y), float(bw), float(bh)],
          "area": float(bw * bh),
          "iscrowd": 0,
          "keypoints": [float(t) for t in kp],
          "num_keypoints": int((v > 0).sum()),
        }
      )
    if rng.random() < 0.5:
      anns.append(
        {
          "id": len(anns) + 1,
          "image_id": image_id,
          "category_id": BALL,
          "bbox": [2.0, 3.0, 10.0, 12.0],
          "area": 120.0,
          "iscrowd": 0,
        }
      )
  names = [f"p{k}" for k in range(NUM_POINTS)]
  categories = [
    {"id": PERSON, "name": "person", "keypoints": names, "skeleton": [[1, 2], [2, 3], [1, 4]]},
    {"id": BALL, "name": "ball"},
  ]
  return {"images": images, "annotations": anns, "categories": categories}


def _coco(gt_dict):
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco_lib.COCO()
    gt.dataset = json.loads(json.dumps(gt_dict))
    gt.createIndex()
  return gt


def _batches(gt_dict, rng, per_batch=4, noise=0.0, false_positives=False):
  """(batch, detections) pairs as the pipeline and the model give them: ground truth persons
  (and balls) resized by a random per-image scale, keypoints moved to continuous input pixels
  (+0.5, then x scale) with `noise` pixels of Gaussian noise; the last batch is padded."""
  images = gt_dict["images"]
  by_image = {im["id"]: [] for im in images}
  for a in gt_dict["annotations"]:
    by_image[a["image_id"]].append(a)
  cat_label = {PERSON: 1, BALL: 2}
  num_dets = 6
  out = []
  for start in range(0, len(images), per_batch):
    chunk = images[start : start + per_batch]
    b = per_batch
    batch = {
      "image_id": np.full(b, -1, np.int32),
      "valid": np.zeros(b, bool),
      "scale": np.ones(b, np.float32),
      "orig_hw": np.zeros((b, 2), np.int32),
    }
    dets = {
      "boxes": np.zeros((b, num_dets, 4), np.float32),
      "scores": np.zeros((b, num_dets), np.float32),
      "classes": np.zeros((b, num_dets), np.int32),
      "num_detections": np.zeros(b, np.int32),
      "keypoints": np.zeros((b, num_dets, NUM_POINTS, 3), np.float32),
    }
    for i, im in enumerate(chunk):
      scale = float(rng.uniform(0.6, 2.0))
      batch["image_id"][i], batch["valid"][i] = im["id"], True
      batch["scale"][i], batch["orig_hw"][i] = scale, (im["height"], im["width"])
      objs = list(by_image[im["id"]])
      if false_positives:
        objs.append(dict(objs[0], score_fp=True))
      for d, a in enumerate(objs[:num_dets]):
        x, y, bw, bh = a["bbox"]
        dets["boxes"][i, d] = np.array([x, y, x + bw, y + bh]) * scale
        dets["classes"][i, d] = cat_label[a["category_id"]]
        dets["scores"][i, d] = rng.uniform(0.05, 1.0) if noise or false_positives else 1.0
        if "keypoints" in a:
          kp = np.asarray(a["keypoints"], np.float64).reshape(NUM_POINTS, 3)
          xy = (kp[:, :2] + 0.5) * scale + rng.normal(0, noise, (NUM_POINTS, 2))
          if a.get("score_fp"):
            xy = xy[::-1] + rng.uniform(-20, 20, (NUM_POINTS, 2))
          dets["keypoints"][i, d, :, :2] = xy
          dets["keypoints"][i, d, :, 2] = rng.uniform(0, 1, NUM_POINTS)
        dets["num_detections"][i] = d + 1
    out.append((batch, dets))
  return out


def _pycocotools_keypoint_stats(gt, results, sigmas):
  """COCOeval run by hand as Detectron2 runs it: the results (boxes kept) of the persons."""
  with contextlib.redirect_stdout(io.StringIO()):
    ev = cocoeval.COCOeval(gt, gt.loadRes(results), "keypoints")
    ev.params.catIds = [PERSON]
    ev.params.kpt_oks_sigmas = np.asarray(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def _evaluate(gt_dict, pairs, tmp_path, **kwargs):
  by_batch = {id(b): d for b, d in pairs}
  out = tmp_path / "results.json"
  metrics = evaluate.evaluate(
    lambda batch: by_batch[id(batch)],
    [b for b, _ in pairs],
    _coco(gt_dict),
    [PERSON, BALL],
    output_json=str(out),
    **kwargs,
  )
  return metrics, json.loads(out.read_text())


def test_ground_truth_as_detections_scores_100(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 31))
  rng = np.random.default_rng(seed)
  gt_dict = _random_gt(rng)
  metrics, results = _evaluate(
    gt_dict, _batches(gt_dict, rng), tmp_path, keypoint_oks_sigmas=SIGMAS
  )
  names = {f"keypoints/{n}" for n in evaluate.KEYPOINT_METRIC_NAMES}
  assert names | {f"bbox/{n}" for n in evaluate.METRIC_NAMES} == set(metrics), seed
  assert metrics["keypoints/AP"] == pytest.approx(100.0), seed
  assert metrics["keypoints/AP75"] == pytest.approx(100.0), seed
  assert metrics["bbox/AP"] == pytest.approx(100.0), seed
  # Back in COCO's integer convention: the ground truth's own x, y (labelled keypoints).
  persons = [a for a in gt_dict["annotations"] if "keypoints" in a]
  got = sorted((r["image_id"], r["keypoints"][0]) for r in results if r["category_id"] == PERSON)
  want = sorted((a["image_id"], a["keypoints"][0]) for a in persons)
  assert [g[0] for g in got] == [w[0] for w in want], seed
  np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-3)
  assert all(len(r["keypoints"]) == 3 * NUM_POINTS for r in results)


def test_perturbed_keypoints_score_lower_and_equal_pycocotools(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 31))
  rng = np.random.default_rng(seed)
  gt_dict = _random_gt(rng, num_images=8)
  pairs = _batches(gt_dict, rng, noise=3.0, false_positives=True)
  metrics, results = _evaluate(gt_dict, pairs, tmp_path, keypoint_oks_sigmas=SIGMAS)
  assert 0 < metrics["keypoints/AP"] < 100, seed
  stats = _pycocotools_keypoint_stats(_coco(gt_dict), results, SIGMAS)
  for name, v in zip(evaluate.KEYPOINT_METRIC_NAMES, stats):
    expected = v * 100 if v >= 0 else float("nan")
    np.testing.assert_allclose(
      metrics[f"keypoints/{name}"], expected, rtol=1e-12, err_msg=f"{name} seed {seed}"
    )
  # coco_metrics on the written JSON alone gives the same numbers.
  again = evaluate.coco_metrics(_coco(gt_dict), results, ("keypoints",), SIGMAS)
  mine = {k: v for k, v in metrics.items() if k.startswith("keypoints/")}
  assert again == pytest.approx(mine, nan_ok=True)
  # Ground truth JSON with unlabeled keypoints on every object of other categories (as the
  # builders write it): only the categories that list keypoint names are scored, the same numbers.
  filled = json.loads(json.dumps(gt_dict))
  for a in filled["annotations"]:
    a.setdefault("keypoints", [0.0] * 3 * NUM_POINTS)
    a.setdefault("num_keypoints", 0)
  assert evaluate.keypoint_category_ids(_coco(filled)) == [PERSON]
  filled_metrics = evaluate.coco_metrics(_coco(filled), results, ("keypoints",), SIGMAS)
  assert filled_metrics == pytest.approx(again, nan_ok=True)
  # Other sigmas: other OKS, other AP (the data set's sigmas are the ones used).
  wide = evaluate.coco_metrics(_coco(gt_dict), results, ("keypoints",), [0.5] * NUM_POINTS)
  assert wide["keypoints/AP"] > metrics["keypoints/AP"], seed


def test_keypoints_need_matching_sigmas_and_keypoint_ground_truth(tmp_path):
  rng = np.random.default_rng()
  gt_dict = _random_gt(rng)
  pairs = _batches(gt_dict, rng)
  with pytest.raises(ValueError, match="5 keypoints per detection but 17 OKS sigmas"):
    _evaluate(gt_dict, pairs, tmp_path)  # pycocotools' default: COCO's 17 person sigmas
  no_kp = dict(gt_dict, annotations=[a for a in gt_dict["annotations"] if "keypoints" not in a])
  results = [
    {
      "image_id": 1,
      "category_id": PERSON,
      "bbox": [0, 0, 4, 4],
      "score": 0.5,
      "keypoints": [1.0] * 3 * NUM_POINTS,
    }
  ]
  with pytest.raises(ValueError, match="ground truth with keypoints"):
    evaluate.coco_metrics(_coco(no_kp), results, ("keypoints",), SIGMAS)


def test_detections_to_coco_keypoints_undo_the_scale_and_the_half_pixel():
  batch = {
    "image_id": np.array([3, -1], np.int32),
    "valid": np.array([True, False]),
    "scale": np.array([2.0, 1.0], np.float32),
    "orig_hw": np.array([[50, 60], [50, 60]]),
  }
  rng = np.random.default_rng()
  kps = rng.uniform(0, 100, (2, 3, 4, 3)).astype(np.float32)
  dets = {
    "boxes": np.tile(np.float32([2, 4, 50, 12]), (2, 3, 1)),
    "scores": np.float32([[0.9, 0.5, 0.0], [0.9, 0.9, 0.9]]),
    "classes": np.int32([[1, 1, 0], [1, 1, 1]]),
    "num_detections": np.array([2, 3]),
    "keypoints": kps,
  }
  out = evaluate.detections_to_coco(dets, batch, [5])
  assert len(out) == 2
  for r, k in zip(out, kps[0, :2]):
    want = k.astype(np.float64).copy()
    want[:, :2] = want[:, :2] / 2.0 - 0.5
    np.testing.assert_allclose(r["keypoints"], want.reshape(-1), rtol=1e-6)
  with pytest.raises(ValueError, match="keypoints must be"):
    evaluate.detections_to_coco(dict(dets, keypoints=kps[:, :, :, :2]), batch, [5])


# ------------------------------------------------------------------------------------------------
# End to end: a tiny keypoint model trains a few steps and is evaluated by the trainer.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keypoint_run(tmp_path_factory):
  """train_and_evaluate of a tiny Keypoint R-CNN (no mask head) on shapes_keypoints/tiny: 2 steps,
  evaluated at the end. Returns (its output, its workdir)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax import train  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes_keypoints  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_keypoints"))
  shapes_keypoints.ShapesKeypoints(config="tiny", data_dir=data_dir).download_and_prepare()
  c = tiny.train_config(data_dir, 2, **{"eval.at_end": True})
  c.data.update(name="shapes_keypoints", keypoints=True, min_keypoints_per_image=1)
  c.model.update(num_classes=1, mask_on=False, keypoint_on=True)
  c.model.keypoint_head.update(
    num_keypoints=len(shapes_keypoints.KEYPOINT_NAMES), conv_dims=(8,), max_fg_rois=4, chunk_rois=2
  )
  c.eval.update(record_images=3, tensorboard_images=1)
  workdir = str(tmp_path_factory.mktemp("keypoint_run"))
  return train.train_and_evaluate(c, workdir), workdir


@pytest.mark.slow
def test_trainer_evaluates_keypoints(keypoint_run):
  from rethink_jax import visualize  # pylint: disable=g-import-not-at-top

  out, workdir = keypoint_run
  assert out["history"] and all(np.isfinite(h["loss_keypoint"]) for h in out["history"])
  assert not any("loss_mask" in h for h in out["history"])
  metrics = out["metrics"]
  assert set(metrics) == {f"bbox/{n}" for n in evaluate.METRIC_NAMES} | {
    f"keypoints/{n}" for n in evaluate.KEYPOINT_METRIC_NAMES
  }
  assert 0.0 <= metrics["keypoints/AP"] <= 100.0  # finite: a number, not NaN
  curve = json.loads(open(os.path.join(workdir, "eval_curve.json")).read())
  assert curve[-1]["step"] == 2 and curve[-1]["keypoints/AP"] == metrics["keypoints/AP"]
  # The evaluation's pictures: ground truth keypoints and skeleton in the sample, predicted
  # keypoints (7 per detection, COCO's convention) in the record.
  record_dir = os.path.join(workdir, visualize.RECORD_DIR)
  sample, _ = visualize.load_sample(record_dir)
  assert len(sample["skeleton"]) == 6
  anns = [a for objs in sample["annotations"].values() for a in objs]
  assert anns and all(len(a["keypoints"]) == 21 for a in anns)
  record = json.loads(open(os.path.join(record_dir, "step_00000002.json")).read())
  dets = [d for ds in record["detections"].values() for d in ds]
  assert all(len(d["keypoints"]) == 21 and "segmentation" not in d for d in dets)
